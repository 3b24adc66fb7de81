"""Pinhole camera: projection, back-projection, depth maps to points and normals.

OpenCV convention: the camera looks along ``+z``, ``x`` points right and ``y`` down; a camera-frame
point ``(x, y, z)`` lands on pixel ``(u, v) = (fx x / z + s y / z + cx, fy y / z + cy)`` with ``u``
the column and ``v`` the row, and pixel centres at integer coordinates. Intrinsics are upper
triangular ``K = [[fx, s, cx], [0, fy, cy], [0, 0, 1]]`` (skew ``s`` is usually 0). A
``camera_pose`` is camera-to-world, ``(B, 4, 4)``: ``y_world = R x_cam + t``.

Depth maps are ``(B, H, W)`` z-depths (not ray lengths); a pixel is valid when its depth is finite
and positive. Invalid pixels never produce NaN: they back-project to zero and get zero normals.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks
from .geometry import invert_transform, rotate_vectors, split_transform, transform_points

__all__ = [
    "intrinsics_matrix",
    "project",
    "backproject",
    "depth_to_points",
    "normals_from_depth",
    "world_to_camera",
]


def intrinsics_matrix(fx, fy, cx, cy, skew=0.0, *, dtype: Optional[torch.dtype] = None, device=None) -> Tensor:
    """Build pinhole intrinsics ``K = [[fx, skew, cx], [0, fy, cy], [0, 0, 1]]``.

    Args:
        fx, fy: focal lengths in pixels (numbers or tensors of shape ``(B,)``), positive.
        cx, cy: principal point in pixels (numbers or ``(B,)`` tensors).
        skew: axis skew (number or ``(B,)``), usually 0.
        dtype: dtype of the result; default: that of the first tensor argument, else float32.
        device: device of the result; default: that of the first tensor argument.

    Returns:
        ``(3, 3)`` if every argument is a number or a 0-d tensor, else ``(B, 3, 3)``.
        Differentiable with respect to tensor arguments.

    Example:
        >>> intrinsics_matrix(500.0, 500.0, 320.0, 240.0)
        tensor([[500.,   0., 320.],
                [  0., 500., 240.],
                [  0.,   0.,   1.]])
    """
    args = {"fx": fx, "fy": fy, "cx": cx, "cy": cy, "skew": skew}
    first = next((a for a in args.values() if isinstance(a, Tensor)), None)
    if dtype is None:
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    if device is None and first is not None:
        device = first.device
    values = {}
    for name, a in args.items():
        if not isinstance(a, (Tensor, int, float)) or isinstance(a, bool):
            raise TypeError(f"{name} must be a number or a tensor of shape (B,); got {type(a).__name__}.")
        t = torch.as_tensor(a, dtype=dtype, device=device)
        if t.dim() > 1:
            raise ValueError(f"{name} must be a number or a tensor of shape (B,); got shape {tuple(t.shape)}.")
        values[name] = t
    for name in ("fx", "fy"):
        checks.check_positive(name, values[name].detach())
    try:
        fx, fy, cx, cy, skew = torch.broadcast_tensors(*values.values())
    except RuntimeError:
        shapes = {k: tuple(v.shape) for k, v in values.items()}
        raise ValueError(f"fx, fy, cx, cy and skew must have one batch size; got shapes {shapes}.") from None
    o, i = torch.zeros_like(fx), torch.ones_like(fx)
    return torch.stack([fx, skew, cx, o, fy, cy, o, o, i], -1).reshape(fx.shape + (3, 3))


def _check_intrinsics(name: str, K, batch: int, dtype: torch.dtype) -> Tensor:
    """Validate ``(3, 3)`` or ``(B, 3, 3)`` upper-triangular intrinsics; return ``(B, 3, 3)`` in ``dtype``."""
    if not isinstance(K, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (3, 3) or (B, 3, 3); got {type(K).__name__}.")
    if not K.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype; got {K.dtype}.")
    if K.dim() not in (2, 3) or K.shape[-2:] != (3, 3):
        raise ValueError(f"{name} must have shape (3, 3) or (B, 3, 3); got {tuple(K.shape)}.")
    if K.dim() == 2:
        K = K.expand(batch, 3, 3)
    if K.shape[0] != batch:
        raise ValueError(f"{name} holds {K.shape[0]} matrices but the batch has {batch} entries.")
    if checks.ENABLED:
        Kd = K.detach()
        if not bool(torch.isfinite(Kd).all()):
            raise ValueError(f"{name} contains NaN or Inf values.")
        lower = torch.stack([Kd[:, 1, 0], Kd[:, 2, 0], Kd[:, 2, 1], Kd[:, 2, 2] - 1], -1)
        if bool((lower != 0).any()):
            raise ValueError(f"{name} must be pinhole intrinsics [[fx, s, cx], [0, fy, cy], [0, 0, 1]].")
        if bool((Kd[:, 0, 0] <= 0).any() | (Kd[:, 1, 1] <= 0).any()):
            raise ValueError(
                f"{name} must have positive focal lengths fx = {name}[..., 0, 0] and fy = {name}[..., 1, 1]."
            )
    return K.to(dtype)


def _check_depth(name: str, depth) -> Tuple[Tensor, bool]:
    """Validate a ``(H, W)`` or ``(B, H, W)`` depth map; return it batched plus the unbatched flag."""
    if not isinstance(depth, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, H, W); got {type(depth).__name__}.")
    if not depth.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype (float32 or float64); got {depth.dtype}.")
    if depth.dim() not in (2, 3) or depth.shape[-1] == 0 or depth.shape[-2] == 0:
        raise ValueError(f"{name} must have shape (B, H, W) or (H, W) with H, W > 0; got {tuple(depth.shape)}.")
    unbatched = depth.dim() == 2
    depth = depth[None] if unbatched else depth
    if depth.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one depth map; got batch size 0.")
    return depth, unbatched


def _valid_depth(depth: Tensor) -> Tensor:
    return torch.isfinite(depth) & (depth > 0)


def _backproject(depth: Tensor, K: Tensor) -> Tensor:
    """Unchecked back-projection ``(B, H, W) -> (B, H, W, 3)``; invalid depths give zero points."""
    B, H, W = depth.shape
    d = torch.where(_valid_depth(depth), depth, 0.0)
    u = torch.arange(W, dtype=depth.dtype, device=depth.device)[None, None, :]
    v = torch.arange(H, dtype=depth.dtype, device=depth.device)[None, :, None]
    fx, s, cx = K[:, 0, 0, None, None], K[:, 0, 1, None, None], K[:, 0, 2, None, None]
    fy, cy = K[:, 1, 1, None, None], K[:, 1, 2, None, None]
    y = (v - cy) / fy
    x = (u - cx - s * y) / fx
    x, y = torch.broadcast_tensors(x, y)
    ray = torch.stack([x, y, torch.ones_like(x)], -1)  # (B, H, W, 3)
    return ray * d[..., None]


def _safe_depth(z: Tensor) -> Tensor:
    """``z`` with values of magnitude ``<= eps`` replaced by 1, so ``1 / z`` and its gradient stay finite."""
    return torch.where(z.abs() > torch.finfo(z.dtype).eps, z, 1.0)


def project(points_cam: Tensor, intrinsics: Tensor) -> Tuple[Tensor, Tensor]:
    """Project camera-frame points to pixels.

    Args:
        points_cam: ``(B, N, 3)`` or ``(N, 3)`` points in the camera frame (OpenCV: ``+z`` forward).
        intrinsics: ``(B, 3, 3)`` or ``(3, 3)`` pinhole matrices ``K``.

    Returns:
        ``(uv, z)``: pixel coordinates ``(B, N, 2)`` (``u`` = column, ``v`` = row, pixel centres at
        integers) and depths ``(B, N)``; unbatched if ``points_cam`` was. ``uv`` is meaningful only
        where ``z > 0``; where ``|z| <= eps`` (machine epsilon) it is computed with ``z = 1`` so
        it stays finite.
        Differentiable in both arguments.

    Example:
        >>> K = intrinsics_matrix(100.0, 100.0, 50.0, 40.0)
        >>> project(torch.tensor([[0.1, -0.2, 2.0]]), K)
        (tensor([[55., 30.]]), tensor([2.]))
    """
    pts, unbatched = checks.as_batched_points("points_cam", points_cam)
    K = _check_intrinsics("intrinsics", intrinsics, pts.shape[0], pts.dtype)
    z = pts[..., 2]
    z_safe = _safe_depth(z)
    uv = (pts @ K[:, :2, :].transpose(-1, -2)) / z_safe[..., None]
    if unbatched:
        return uv[0], z[0]
    return uv, z


def backproject(depth: Tensor, intrinsics: Tensor) -> Tensor:
    """Back-project every pixel of a depth map into the camera frame.

    Pixel ``(u, v)`` (column, row; centres at integers) with depth ``d`` maps to
    ``d K^-1 [u, v, 1]^T``. Invalid depths (non-finite or ``<= 0``) give the zero point.

    Args:
        depth: ``(B, H, W)`` or ``(H, W)`` z-depths.
        intrinsics: ``(B, 3, 3)`` or ``(3, 3)``.

    Returns:
        ``(B, H, W, 3)`` (or ``(H, W, 3)``) camera-frame points, differentiable in ``depth`` and
        ``intrinsics``.

    Example:
        >>> K = intrinsics_matrix(100.0, 100.0, 1.0, 1.0)
        >>> backproject(torch.full((3, 3), 2.0), K)[2, 1]
        tensor([0.0000, 0.0200, 2.0000])
    """
    d, unbatched = _check_depth("depth", depth)
    K = _check_intrinsics("intrinsics", intrinsics, d.shape[0], d.dtype)
    pts = _backproject(d, K)
    return pts[0] if unbatched else pts


def _camera_rotation(camera_pose: Optional[Tensor], batch: int, dtype) -> Optional[Tensor]:
    if camera_pose is None:
        return None
    return checks.check_transform("camera_pose", camera_pose, batch).to(dtype)


def depth_to_points(
    depth: Tensor, intrinsics: Tensor, camera_pose: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Turn depth maps into point clouds (one point per pixel, row-major order).

    Args:
        depth: ``(B, H, W)`` z-depths; a pixel is valid where the depth is finite and ``> 0``.
        intrinsics: ``(B, 3, 3)`` or ``(3, 3)``.
        camera_pose: optional camera-to-world ``(B, 4, 4)`` or ``(4, 4)`` (``y = R x_cam + t``);
            without it the points stay in the camera frame.

    Returns:
        ``(points (B, H*W, 3), valid (B, H*W) bool)``; invalid pixels hold zeros. Point
        ``h * W + w`` comes from row ``h``, column ``w``. Differentiable in depth, intrinsics and pose.

    Example:
        >>> K = intrinsics_matrix(10.0, 10.0, 0.5, 0.5)
        >>> pts, valid = depth_to_points(torch.tensor([[[1.0, 0.0], [2.0, 1.0]]]), K)
        >>> valid
        tensor([[ True, False,  True,  True]])
    """
    d, _ = _check_depth("depth", depth)
    B, H, W = d.shape
    K = _check_intrinsics("intrinsics", intrinsics, B, d.dtype)
    pose = _camera_rotation(camera_pose, B, d.dtype)
    pts = _backproject(d, K).reshape(B, H * W, 3)
    valid = _valid_depth(d).reshape(B, H * W)
    if pose is not None:
        pts = torch.where(valid[..., None], transform_points(pose, pts), 0.0)
    return pts, valid


def _safe_normalize(v: Tensor, ok: Tensor) -> Tensor:
    """``v / |v|`` where ``ok``, zero elsewhere, with zero (never NaN) gradients there."""
    sq = (v * v).sum(-1, keepdim=True)
    ok = ok[..., None] & (sq > 0)
    norm = torch.where(ok, sq, 1.0).sqrt()
    return torch.where(ok, v / norm, 0.0)


def _normals_camera(depth: Tensor, K: Tensor) -> Tensor:
    """Unchecked camera-frame normals ``(B, H, W, 3)`` from a batched depth map."""
    B, H, W = depth.shape
    out = depth.new_zeros(B, H, W, 3)
    if H < 3 or W < 3:
        return out
    P = _backproject(depth, K)
    valid = _valid_depth(depth)
    du = P[:, 1:-1, 2:] - P[:, 1:-1, :-2]  # along columns (u)
    dv = P[:, 2:, 1:-1] - P[:, :-2, 1:-1]  # along rows (v)
    n = torch.linalg.cross(dv, du, dim=-1)
    ok = valid[:, 1:-1, 1:-1] & valid[:, 1:-1, 2:] & valid[:, 1:-1, :-2] & valid[:, 2:, 1:-1] & valid[:, :-2, 1:-1]
    # degenerate when the two differences are (nearly) parallel; relative test, scale-free
    eps = torch.finfo(depth.dtype).eps
    sq_n = (n * n).sum(-1)
    ok = ok & (sq_n > eps * eps * (du * du).sum(-1) * (dv * dv).sum(-1))
    # orient towards the camera centre (the origin): n . (0 - p) > 0
    centre = P[:, 1:-1, 1:-1]
    flip = (n * centre).sum(-1, keepdim=True) > 0
    n = torch.where(flip, -n, n)
    n = _safe_normalize(n, ok)
    return F.pad(n, (0, 0, 1, 1, 1, 1))


def normals_from_depth(depth: Tensor, intrinsics: Tensor, camera_pose: Optional[Tensor] = None) -> Tensor:
    """Unit surface normals of a depth map, oriented towards the camera.

    The normal at pixel ``(v, u)`` is the normalised cross product of the central differences of
    back-projected points along the row and the column. It is defined where the pixel and its four
    neighbours have valid depth and the differences are not parallel; elsewhere (image border,
    holes) it is the zero vector. Differentiable in ``depth`` (gradients never NaN).

    Args:
        depth: ``(B, H, W)`` (or ``(H, W)``) z-depths.
        intrinsics: ``(B, 3, 3)`` or ``(3, 3)``.
        camera_pose: optional camera-to-world ``(B, 4, 4)`` or ``(4, 4)``; if given, the normals are
            rotated into the world frame, else they are in the camera frame.

    Returns:
        ``(B, H, W, 3)`` (or ``(H, W, 3)``) unit normals, zero where undefined.

    Example:
        >>> K = intrinsics_matrix(10.0, 10.0, 2.0, 2.0)
        >>> normals_from_depth(torch.full((5, 5), 3.0), K)[2, 2]
        tensor([ 0.,  0., -1.])
    """
    d, unbatched = _check_depth("depth", depth)
    B, H, W = d.shape
    K = _check_intrinsics("intrinsics", intrinsics, B, d.dtype)
    pose = _camera_rotation(camera_pose, B, d.dtype)
    n = _normals_camera(d, K)
    if pose is not None:
        R, _ = split_transform(pose)
        n = rotate_vectors(R, n.reshape(B, H * W, 3)).reshape(B, H, W, 3)
    return n[0] if unbatched else n


def world_to_camera(camera_pose: Tensor, points_world: Tensor) -> Tensor:
    """Map world points ``(B, N, 3)`` into the frame of a camera with camera-to-world pose ``(B, 4, 4)``."""
    return transform_points(invert_transform(camera_pose), points_world)
