"""DGCNN embedding as Deep Closest Point uses it (Wang et al. 2019; DCP's ``model.py``).

Per point, the ``k = 20`` nearest neighbours in the current feature space (the point itself
included, since its distance 0 is the smallest) give edge features; four shared 1x1 convolutions
with BatchNorm and ReLU each end in a max over the neighbours, their outputs (64 + 64 + 128 + 256
= 512 channels) are concatenated and mixed by a fifth convolution into ``emb_dims`` channels.

Two facts of DCP's variant that a re-implementation must match to load its weights and give its
numbers: the edge feature is ``[x_j, x_i]`` (the neighbour's feature next to the centre's), not
DGCNN's ``[x_j - x_i, x_i]``; and the neighbours are searched only once, on the input
coordinates, all four layers reusing the same graph. Module names (``conv1..5``, ``bn1..5``) are
the authors'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DGCNN", "knn_indices", "graph_features"]


def knn_indices(x: Tensor, k: int) -> Tensor:
    """Indices ``(B, N, k)`` of the ``k`` nearest columns of ``x (B, C, N)`` (itself included).

    Example:
        >>> x = torch.tensor([[[0., 1, 3, 7]]])
        >>> knn_indices(x, 2)[0].tolist()
        [[0, 1], [1, 0], [2, 1], [3, 2]]
    """
    inner = x.transpose(1, 2) @ x
    sq = (x * x).sum(dim=1, keepdim=True)
    neg_sq_dist = 2 * inner - sq - sq.transpose(1, 2)
    return neg_sq_dist.topk(k=k, dim=-1).indices


def graph_features(x: Tensor, k: int = 20) -> Tensor:
    """DCP's edge features ``(B, 2C, N, k)``: ``[x_j, x_i]`` for the ``k`` neighbours ``j`` of ``i``.

    Args:
        x: ``(B, C, N)`` features.
        k: neighbours per point (the point itself is one of them).
    """
    B, C, N = x.shape
    idx = knn_indices(x, k)  # (B, N, k)
    points = x.transpose(1, 2)  # (B, N, C)
    neighbours = torch.gather(points, 1, idx.reshape(B, N * k, 1).expand(B, N * k, C)).reshape(B, N, k, C)
    centres = points[:, :, None, :].expand(B, N, k, C)
    return torch.cat([neighbours, centres], dim=-1).permute(0, 3, 1, 2)


class DGCNN(nn.Module):
    """Per-point DGCNN features ``(B, emb_dims, N)`` of points ``(B, 3, N)``.

    Example:
        >>> net = DGCNN(emb_dims=32, k=4).eval()
        >>> tuple(net(torch.randn(2, 3, 50)).shape)
        (2, 32, 50)
    """

    def __init__(self, emb_dims: int = 512, k: int = 20):
        super().__init__()
        self.k = int(k)
        widths = [(6, 64), (64, 64), (64, 128), (128, 256), (512, emb_dims)]
        for i, (c_in, c_out) in enumerate(widths, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(c_in, c_out, kernel_size=1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != 3:
            raise ValueError(f"x must have shape (B, 3, N); got {tuple(x.shape)}.")
        B, _, N = x.shape
        h = graph_features(x, self.k)
        pooled = []
        for i in range(1, 5):
            h = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(h)))
            pooled.append(h.max(dim=-1, keepdim=True).values)
        h = torch.cat(pooled, dim=1)  # (B, 512, N, 1)
        return F.relu(self.bn5(self.conv5(h))).view(B, -1, N)
