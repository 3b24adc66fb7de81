"""A CNN that reads one depth scan of a body and predicts where the body is, its pose and its shape.

It extends experiment 1's :class:`~diffcp.models.pose_cnn.PoseCNN` (same convolutional trunk,
:func:`~diffcp.models.pose_cnn.depth_encoder`) from a rigid motion to every unknown of the
non-rigid fit, :class:`~diffcp.bodies.placed.BodyParameters`:

- input: a depth map ``(B, H, W)`` (metres, 0 = no data) and its ``(3, 3)`` intrinsics. Two
  channels enter the trunk: ``(median - d) / 0.5`` on valid pixels (0 elsewhere), so the encoding
  does not depend on how far the body stands, and the validity mask;
- output: the rotation (6D representation of Zhou et al. 2019, starting upright and facing the
  camera), the root as an offset from the centroid of the back-projected valid pixels (metres,
  ``translation_scale`` per unit), the pose as ``pose_scales`` times the head's outputs (radians),
  and the shape as a sigmoid (anny's phenotype values in ``(0, 1)``; 0.5 at the start).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..bodies.placed import BodyParameters
from ..camera import depth_to_points
from .pose_cnn import depth_encoder, encoder_channels, rotation_from_6d, rotation_to_6d

__all__ = ["BodyCNN"]


class BodyCNN(nn.Module):
    """Depth scan -> :class:`~diffcp.bodies.placed.BodyParameters`.

    Args:
        num_posed: ``J``, the joints the pose rotates.
        num_shape: ``S``, the shape parameters.
        pose_scales: ``J`` radians per unit of the pose outputs (the spread of the training poses).
        translation_scale: metres per unit of the root offset.
        width: channels of the first convolution.

    Example:
        >>> net = BodyCNN(num_posed=2, num_shape=6, pose_scales=(0.1, 0.2))
        >>> depth = torch.zeros(1, 64, 64); depth[0, 20:40, 28:36] = 3.0
        >>> out = net(depth, torch.tensor([[60.0, 0, 31.5], [0, 60, 31.5], [0, 0, 1]]))
        >>> out.pose.shape, round(out.shape[0, 0].item(), 1)
        (torch.Size([1, 2, 3]), 0.5)
    """

    def __init__(self, num_posed: int, num_shape: int, pose_scales: Sequence[float], translation_scale: float = 0.3,
                 width: int = 16):
        super().__init__()
        if len(pose_scales) != num_posed:
            raise ValueError(f"pose_scales must hold num_posed={num_posed} numbers; got {len(pose_scales)}.")
        self.num_posed, self.num_shape = int(num_posed), int(num_shape)
        self.translation_scale = float(translation_scale)
        self.register_buffer("pose_scales", torch.tensor([float(s) for s in pose_scales]))
        self.features = depth_encoder(2, width)
        out = 6 + 3 + 3 * self.num_posed + self.num_shape
        self.head = nn.Sequential(nn.Linear(encoder_channels(width) * 16, 256), nn.ReLU(inplace=True), nn.Linear(256, out))
        facing = torch.tensor([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # anny upright, facing the camera
        with torch.no_grad():
            self.head[-1].weight.mul_(0.01)
            self.head[-1].bias.zero_()
            self.head[-1].bias[:6] = rotation_to_6d(facing)

    def encode(self, depth: Tensor) -> Tensor:
        """``(B, H, W)`` depth -> ``(B, 2, H, W)`` network input."""
        valid = depth > 0
        masked = torch.where(valid, depth, torch.nan).flatten(1)
        median = masked.nanmedian(dim=1).values.nan_to_num(0.0)[:, None, None]
        return torch.stack([torch.where(valid, (median - depth) / 0.5, 0.0), valid.to(depth.dtype)], dim=1)

    def forward(self, depth: Tensor, intrinsics: Tensor) -> BodyParameters:
        if not isinstance(depth, Tensor) or depth.dim() != 3:
            raise ValueError(f"depth must be a tensor of shape (B, H, W); got {getattr(depth, 'shape', type(depth).__name__)}.")
        if not bool((depth > 0).flatten(1).any(1).all()):
            raise ValueError("depth must hold at least one valid (positive) pixel in every map; got an empty map.")
        out = self.head(self.features(self.encode(depth)))
        pts, valid = depth_to_points(depth, intrinsics)
        w = valid.to(pts.dtype)[..., None]
        centroid = (pts * w).sum(1) / w.sum(1)
        J = self.num_posed
        return BodyParameters(rotation_from_6d(out[:, :6]), centroid + self.translation_scale * out[:, 6:9],
                              out[:, 9:9 + 3 * J].reshape(-1, J, 3) * self.pose_scales[:, None],
                              torch.sigmoid(out[:, 9 + 3 * J:]))
