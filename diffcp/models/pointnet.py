"""PointNet per-point features (Qi et al. 2017) as DCP and learning3d's PointNetLK use them.

Five shared 1x1 convolutions ``3 -> 64 -> 64 -> 64 -> 128 -> emb_dims``, each followed by
BatchNorm and ReLU (the last one too), no input or feature transform nets. The two releases
differ only in the convolutions' bias: DCP's have none (``bias=False``, ``emb_dims=512``),
learning3d's have one (``bias=True``, ``emb_dims=1024``). Module names (``conv1..5``,
``bn1..5``) are the authors'; the global feature, where one is wanted, is the max over points.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PointNet"]


class PointNet(nn.Module):
    """Per-point PointNet features ``(B, emb_dims, N)`` of points ``(B, 3, N)``.

    Example:
        >>> net = PointNet(emb_dims=16).eval()
        >>> tuple(net(torch.randn(2, 3, 10)).shape)
        (2, 16, 10)
    """

    def __init__(self, emb_dims: int = 512, bias: bool = False):
        super().__init__()
        widths = [(3, 64), (64, 64), (64, 64), (64, 128), (128, emb_dims)]
        for i, (c_in, c_out) in enumerate(widths, start=1):
            setattr(self, f"conv{i}", nn.Conv1d(c_in, c_out, kernel_size=1, bias=bias))
            setattr(self, f"bn{i}", nn.BatchNorm1d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != 3:
            raise ValueError(f"x must have shape (B, 3, N); got {tuple(x.shape)}.")
        for i in range(1, 6):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return x
