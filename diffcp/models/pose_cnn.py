"""A CNN that regresses the rigid motion between two depth maps, with the 6D rotation representation.

Input: a source and a target depth map ``(B, H, W)`` (z-depth in metres, 0 = background), stacked
as two channels. Each valid depth ``d`` enters as ``(far - d) / scale`` (near is large, background
is 0), so the background is distinct from every surface at distances below ``far``.

Network: five 3x3/5x5 convolutions with stride 2 (2 -> 16 -> 32 -> 64 -> 128 -> 256 channels,
GroupNorm, ReLU), average-pooled to a 4x4 grid that keeps where things are, then two linear
layers to 9 numbers: a 6D rotation and a translation. About 1.05 M parameters.

Rotation: the continuous 6D representation of Zhou et al. (CVPR 2019, "On the continuity of
rotation representations in neural networks"): two 3-vectors ``a1, a2`` become the first two
columns of ``R`` by Gram-Schmidt, the third is their cross product. The head starts at the
identity rotation and zero translation.

Output: ``(B, 4, 4)`` transforms mapping the source into the target, ``y = R x + t`` (column
vectors), the convention of :mod:`diffcp`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..geometry import make_transform

__all__ = ["PoseCNN", "depth_encoder", "encoder_channels", "rotation_from_6d", "rotation_to_6d"]


def rotation_from_6d(x: Tensor) -> Tensor:
    """Rotation matrices ``(..., 3, 3)`` from 6D vectors ``(..., 6)`` (Zhou et al. 2019).

    ``x = (a1, a2)``: ``b1 = a1 / |a1|``, ``b2`` = normalised ``a2 - (b1 . a2) b1``, ``b3 = b1 x b2``;
    ``R = [b1 b2 b3]`` (columns).

    Example:
        >>> rotation_from_6d(torch.tensor([2.0, 0, 0, 1, 3, 0]))
        tensor([[1., 0., 0.],
                [0., 1., 0.],
                [0., 0., 1.]])
    """
    if not isinstance(x, Tensor) or x.shape[-1:] != (6,):
        raise ValueError(f"x must be a tensor of shape (..., 6); got {getattr(x, 'shape', type(x).__name__)}.")
    a1, a2 = x[..., :3], x[..., 3:]
    eps = torch.finfo(x.dtype).eps
    b1 = a1 / a1.norm(dim=-1, keepdim=True).clamp_min(eps)
    b2 = a2 - (b1 * a2).sum(-1, keepdim=True) * b1
    b2 = b2 / b2.norm(dim=-1, keepdim=True).clamp_min(eps)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def rotation_to_6d(R: Tensor) -> Tensor:
    """The 6D representation ``(..., 6)`` of rotations ``(..., 3, 3)``: their first two columns."""
    return torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1)


def encoder_channels(width: int = 16) -> int:
    """Channels of the last convolution of :func:`depth_encoder`."""
    return min(width * 2 ** 4, 256)


def depth_encoder(in_channels: int, width: int = 16) -> nn.Sequential:
    """The convolutional trunk shared by the depth networks: five stride-2 convolutions (5x5, then
    3x3; ``width`` channels doubled four times, at most 256; GroupNorm, ReLU), average-pooled to a
    4x4 grid and flattened: ``(B, in_channels, H, W) -> (B, 16 * encoder_channels(width))``."""
    chans = [in_channels] + [min(width * 2 ** i, 256) for i in range(5)]
    layers = []
    for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
        k = 5 if i == 0 else 3
        layers += [nn.Conv2d(cin, cout, k, stride=2, padding=k // 2), nn.GroupNorm(8, cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())


class PoseCNN(nn.Module):
    """Depth-pair pose regressor: ``forward(source_depth, target_depth) -> (B, 4, 4)``.

    Args:
        far: depths are encoded as ``(far - d) / scale``; ``far`` beyond the farthest surface.
        scale: metres per unit of the encoded depth.
        translation_scale: metres per unit of the translation output.
        width: channels of the first convolution (doubled four times, at most 256).

    Example:
        >>> net = PoseCNN()
        >>> sum(p.numel() for p in net.parameters())
        1050937
        >>> net(torch.rand(2, 128, 128) + 2.5, torch.rand(2, 128, 128) + 2.5).shape
        torch.Size([2, 4, 4])
    """

    def __init__(self, far: float = 5.0, scale: float = 1.0, translation_scale: float = 0.3, width: int = 16):
        super().__init__()
        if not far > 0 or not scale > 0 or not translation_scale > 0:
            raise ValueError(f"far, scale and translation_scale must be positive; got {far}, {scale}, {translation_scale}.")
        self.far, self.scale, self.translation_scale = float(far), float(scale), float(translation_scale)
        self.features = depth_encoder(2, width)
        self.head = nn.Sequential(nn.Linear(encoder_channels(width) * 16, 160), nn.ReLU(inplace=True), nn.Linear(160, 9))
        with torch.no_grad():  # start at the identity rotation and zero translation
            self.head[-1].weight.mul_(0.01)
            self.head[-1].bias.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0, 0]))

    def encode(self, depth: Tensor) -> Tensor:
        """``(B, H, W)`` depth -> ``(B, H, W)`` network input (0 for background)."""
        return torch.where(depth > 0, (self.far - depth) / self.scale, torch.zeros_like(depth))

    def forward(self, source_depth: Tensor, target_depth: Tensor) -> Tensor:
        for name, d in (("source_depth", source_depth), ("target_depth", target_depth)):
            if not isinstance(d, Tensor) or d.dim() != 3:
                raise ValueError(f"{name} must be a tensor of shape (B, H, W); got {getattr(d, 'shape', type(d).__name__)}.")
        if source_depth.shape != target_depth.shape:
            raise ValueError(f"source_depth and target_depth must have one shape; got {tuple(source_depth.shape)} "
                             f"and {tuple(target_depth.shape)}.")
        x = torch.stack([self.encode(source_depth), self.encode(target_depth)], dim=1)
        out = self.head(self.features(x))
        return make_transform(rotation_from_6d(out[:, :6]), out[:, 6:] * self.translation_scale)
