"""Step 2 of ICP: correspondences between the transformed source and the target.

Three associations, all batched and returning :class:`Correspondences`:

* :func:`nearest_correspondences`: hard nearest neighbour (k-d tree / tiled matmul search);
* :func:`soft_correspondences`: softmax-weighted average of the target (differentiable matching);
* :func:`projective_correspondences`: projective data association against a depth map (Blais &
  Levine 1995; KinectFusion), ``"nearest"`` pixel or ``"bilinear"`` (differentiable).

Conventions: clouds are ``(B, N, 3)``; ``source_t`` is the source already mapped by the current
estimate ``y = R x + t``; padded points (index ``>= lengths[b]``) are never valid. Entries where
``valid`` is False hold zeros (points, normals and squared distances), never NaN.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import checks
from .camera import _backproject, _check_depth, _check_intrinsics, _normals_camera, _safe_depth, _valid_depth
from .geometry import invert_transform, rotate_vectors, split_transform, transform_points
from .search import NearestNeighborIndex, knn, soft_nearest

__all__ = [
    "Correspondences",
    "nearest_correspondences",
    "soft_correspondences",
    "projective_correspondences",
]


class Correspondences(NamedTuple):
    """Matched target data for each source point.

    Attributes:
        points: ``(B, N, 3)`` matched target point of each source point.
        normals: ``(B, N, 3)`` matched target unit normal, or ``None`` without target normals.
        sq_distances: ``(B, N)`` squared distance between the source point and its match.
        valid: ``(B, N)`` bool; False for padding and for source points without a match.
    """

    points: Tensor
    normals: Optional[Tensor]
    sq_distances: Tensor
    valid: Tensor


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """``values (B, M, C)`` rows picked by ``index (B, K)`` -> ``(B, K, C)``, differentiable in ``values``."""
    return torch.gather(values, 1, index[..., None].expand(index.shape + values.shape[-1:]))


def _safe_unit(v: Tensor) -> Tensor:
    """Normalise ``(..., 3)`` vectors; vectors shorter than ``sqrt(eps)`` (e.g. cancelled
    averages of normals) become zero, and their gradients are zero, never NaN."""
    sq = (v * v).sum(-1, keepdim=True)
    ok = sq > torch.finfo(v.dtype).eps
    norm = torch.where(ok, sq, 1.0).sqrt()
    return torch.where(ok, v / norm, 0.0)


def _finish(
    source: Tensor, points: Tensor, normals: Optional[Tensor], valid: Tensor, unbatched: bool
) -> Correspondences:
    """Zero out invalid entries, compute squared distances, unbatch if needed."""
    points = torch.where(valid[..., None], points, 0.0)
    if normals is not None:
        normals = torch.where(valid[..., None], normals, 0.0)
    diff = (source - points).masked_fill(~valid[..., None], 0.0)
    sq = (diff * diff).sum(-1)
    if unbatched:
        return Correspondences(points[0], None if normals is None else normals[0], sq[0], valid[0])
    return Correspondences(points, normals, sq, valid)


def _check_pair(source_t, target, target_normals, source_lengths, target_lengths):
    src, unbatched = checks.as_batched_points("source_t", source_t)
    tgt, tgt_unbatched = checks.as_batched_points("target", target)
    checks.check_same_device(source_t=src, target=tgt)
    if src.shape[0] != tgt.shape[0]:
        raise ValueError(f"source_t holds {src.shape[0]} clouds but target holds {tgt.shape[0]}; they must match.")
    if src.dtype != tgt.dtype:
        raise TypeError(f"source_t ({src.dtype}) and target ({tgt.dtype}) must have the same dtype.")
    B, N, _ = src.shape
    M = tgt.shape[1]
    src_len = checks.check_lengths("source_lengths", source_lengths, B, N, src.device)
    tgt_len = checks.check_lengths("target_lengths", target_lengths, B, M, tgt.device)
    if target_normals is not None:
        target_normals = checks.check_normals("target_normals", target_normals, tgt, "target", tgt_unbatched)
        target_normals = target_normals.to(tgt.dtype)
    return src, tgt, target_normals, src_len, tgt_len, unbatched


def nearest_correspondences(
    source_t: Tensor,
    target: Tensor,
    target_normals: Optional[Tensor] = None,
    source_lengths: Optional[Tensor] = None,
    target_lengths: Optional[Tensor] = None,
    index=None,
) -> Correspondences:
    """Hard nearest-neighbour correspondences.

    The neighbour search itself is not differentiable (indices), but the matched points and
    normals are gathered from ``target`` / ``target_normals`` so gradients reach them, and the
    squared distances are recomputed from ``source_t`` and the matches so they are
    differentiable in both.

    Args:
        source_t: ``(B, N, 3)`` (or ``(N, 3)``) transformed source points ``R x + t``.
        target: ``(B, M, 3)`` (or ``(M, 3)``) target points.
        target_normals: optional ``(B, M, 3)`` target normals, gathered like the points.
        source_lengths, target_lengths: optional ``(B,)`` valid counts for padded batches.
        index: optional prebuilt :class:`diffcp.search.NearestNeighborIndex` over ``target``
            (with the same ``target_lengths``), to reuse one search structure every iteration.

    Returns:
        :class:`Correspondences`; ``valid`` is False exactly for source padding.

    Example:
        >>> src = torch.tensor([[[0.1, 0.0, 0.0], [0.9, 1.0, 0.0]]])
        >>> tgt = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
        >>> c = nearest_correspondences(src, tgt)
        >>> c.points
        tensor([[[0., 0., 0.],
                 [1., 1., 0.]]])
    """
    src, tgt, normals, src_len, tgt_len, unbatched = _check_pair(
        source_t, target, target_normals, source_lengths, target_lengths
    )
    N, M = src.shape[1], tgt.shape[1]
    if index is None:
        found = knn(src, tgt, query_lengths=src_len, points_lengths=tgt_len, k=1)
    else:
        if not isinstance(index, NearestNeighborIndex):
            raise TypeError(f"index must be a diffcp.search.NearestNeighborIndex or None; got {type(index).__name__}.")
        if index.points.shape != tgt.shape:
            raise ValueError(
                f"index must be built over target {tuple(tgt.shape)}; "
                f"it holds points of shape {tuple(index.points.shape)}."
            )
        found = index.query(src, query_lengths=src_len, k=1)
    idx = found.indices[..., 0].clamp(0, M - 1)
    valid = checks.lengths_mask(src_len, N)
    points = _gather(tgt, idx)
    matched_normals = None if normals is None else _gather(normals, idx)
    return _finish(src, points, matched_normals, valid, unbatched)


def soft_correspondences(
    source_t: Tensor,
    target: Tensor,
    temperature,
    target_normals: Optional[Tensor] = None,
    source_lengths: Optional[Tensor] = None,
    target_lengths: Optional[Tensor] = None,
    backend: str = "auto",
) -> Correspondences:
    """Soft nearest-neighbour correspondences: softmax-weighted averages of the target.

    The match of source point ``i`` is ``sum_j softmax_j(-|y_i - q_j|^2 / temperature) q_j`` over
    the non-padded target points (see :func:`diffcp.search.soft_nearest`); as ``temperature -> 0``
    it tends to the hard nearest neighbour. Target normals are averaged with the same weights and
    renormalised to unit length; where they cancel (average shorter than ``sqrt(eps)``) the matched
    normal is zero. Everything is differentiable in ``source_t``, ``target`` and ``target_normals``.

    Args:
        source_t: ``(B, N, 3)`` (or ``(N, 3)``) transformed source points.
        target: ``(B, M, 3)`` (or ``(M, 3)``) target points.
        temperature: positive softmax temperature in squared distance units, a number or a
            ``(B,)`` tensor (it may require grad).
        target_normals: optional ``(B, M, 3)`` target normals.
        source_lengths, target_lengths: optional ``(B,)`` valid counts for padded batches.
        backend: ``"auto"``, ``"dense"``, ``"attention"`` or ``"truncated"`` (passed to
            ``soft_nearest``).

    Returns:
        :class:`Correspondences` with ``sq_distances = |source_t - points|^2``; ``valid`` is False
        exactly for source padding.

    Example:
        >>> src = torch.tensor([[[0.0, 0.0, 0.0]]])
        >>> tgt = torch.tensor([[[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
        >>> soft_correspondences(src, tgt, temperature=1.0).points
        tensor([[[0., 0., 0.]]])
    """
    checks.check_positive("temperature", temperature)
    checks.check_option("backend", backend, ("auto", "dense", "attention", "truncated"))
    src, tgt, normals, src_len, tgt_len, unbatched = _check_pair(
        source_t, target, target_normals, source_lengths, target_lengths
    )
    match = soft_nearest(src, tgt, temperature, points_lengths=tgt_len, values=normals, backend=backend)
    matched_normals = None if normals is None else _safe_unit(match.values)
    valid = checks.lengths_mask(src_len, src.shape[1])
    return _finish(src, match.points, matched_normals, valid, unbatched)


def _check_map(name: str, value, batch: int, shape: tuple, dtype) -> Tensor:
    """Validate a per-pixel map shaped ``shape`` or ``(B,) + shape``; return it batched in ``dtype``."""
    if not isinstance(value, Tensor):
        dims = ", ".join(map(str, shape))
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, {dims}); got {type(value).__name__}.")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype; got {value.dtype}.")
    if value.shape == shape:
        value = value.expand((batch,) + shape)
    if value.shape != (batch,) + shape:
        raise ValueError(f"{name} must have shape {(batch,) + shape}; got {tuple(value.shape)}.")
    if checks.ENABLED and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf values.")
    return value.to(dtype)


def projective_correspondences(
    source_t: Tensor,
    depth: Tensor,
    intrinsics: Tensor,
    camera_pose: Tensor,
    normal_map: Optional[Tensor] = None,
    mode: str = "nearest",
    source_lengths: Optional[Tensor] = None,
) -> Correspondences:
    """Projective data association against a depth map (no search: project and look up).

    Each world-frame source point is moved into the camera (``x_cam = R^T (y - t)`` for the
    camera-to-world pose ``(R, t)``) and projected with the pinhole ``intrinsics`` (OpenCV
    convention, see :mod:`diffcp.camera`). ``"nearest"`` takes the back-projected (world) point of
    the rounded pixel: the classic hard association of Blais & Levine and KinectFusion.
    ``"bilinear"`` interpolates the world vertex map and the normal map (renormalised) at the
    sub-pixel location, which is differentiable in the source points, the depth, the intrinsics
    and the pose. Several source points may share a pixel.

    A correspondence is valid when the source point is not padding, lies in front of the camera
    (``z > eps``), projects inside the image (``[0, W-1] x [0, H-1]``, the span of the pixel
    centres, up to ``sqrt(eps)`` pixels of rounding, for ``"bilinear"``; the rounded pixel must
    exist for ``"nearest"``) and every pixel used has a
    finite positive depth (one pixel for ``"nearest"``, the four neighbours for ``"bilinear"``).
    Matched normals may be zero where the normal map is undefined (image border, depth holes).

    Args:
        source_t: ``(B, N, 3)`` (or ``(N, 3)``) transformed source points, world frame.
        depth: ``(B, H, W)`` (or ``(H, W)``, shared) z-depth map of the target.
        intrinsics: ``(B, 3, 3)`` or ``(3, 3)`` pinhole matrices.
        camera_pose: ``(B, 4, 4)`` or ``(4, 4)`` camera-to-world pose of the depth map.
        normal_map: optional ``(B, H, W, 3)`` world-frame normals; default
            :func:`diffcp.camera.normals_from_depth` of ``depth`` (rotated into the world).
        mode: ``"nearest"`` or ``"bilinear"`` (needs ``H, W >= 2``).
        source_lengths: optional ``(B,)`` valid counts for padded batches.

    Returns:
        :class:`Correspondences` with world-frame points and normals.

    Example:
        >>> from diffcp.camera import intrinsics_matrix
        >>> K = intrinsics_matrix(2.0, 2.0, 1.0, 1.0)
        >>> c = projective_correspondences(torch.tensor([[0.0, 0.0, 1.5]]), torch.full((3, 3), 2.0),
        ...                                K, torch.eye(4))
        >>> c.points, c.normals, c.valid
        (tensor([[0., 0., 2.]]), tensor([[ 0.,  0., -1.]]), tensor([True]))
    """
    mode = checks.check_option("mode", mode, ("nearest", "bilinear"))
    src, unbatched = checks.as_batched_points("source_t", source_t)
    B, N, _ = src.shape
    d, _ = _check_depth("depth", depth)
    if d.shape[0] == 1 and B > 1:
        d = d.expand(B, -1, -1)
    if d.shape[0] != B:
        raise ValueError(f"depth holds {d.shape[0]} maps but source_t holds {B} clouds; they must match.")
    checks.check_same_device(source_t=src, depth=d)
    d = d.to(src.dtype)
    H, W = d.shape[1:]
    if mode == "bilinear" and (H < 2 or W < 2):
        raise ValueError(f"depth must be at least 2 x 2 pixels for mode='bilinear'; got {H} x {W}.")
    K = _check_intrinsics("intrinsics", intrinsics, B, src.dtype)
    pose = checks.check_transform("camera_pose", camera_pose, B).to(src.dtype)
    src_len = checks.check_lengths("source_lengths", source_lengths, B, N, src.device)
    R, _ = split_transform(pose)
    if normal_map is None:
        normals = rotate_vectors(R, _normals_camera(d, K).reshape(B, H * W, 3))
    else:
        normals = _check_map("normal_map", normal_map, B, (H, W, 3), src.dtype).reshape(B, H * W, 3)
    vertices = transform_points(pose, _backproject(d, K).reshape(B, H * W, 3))
    pixel_ok = _valid_depth(d).reshape(B, H * W)

    # project into the camera; keep everything finite for points that are not used
    p_cam = transform_points(invert_transform(pose), src)
    z = p_cam[..., 2]
    front = z > torch.finfo(z.dtype).eps
    uv = (p_cam @ K[:, :2, :].transpose(-1, -2)) / _safe_depth(z)[..., None]
    u, v = uv.unbind(-1)
    valid = checks.lengths_mask(src_len, N) & front
    if mode == "nearest":
        ui, vi = torch.floor(u.detach() + 0.5), torch.floor(v.detach() + 0.5)
        valid = valid & (ui >= 0) & (ui <= W - 1) & (vi >= 0) & (vi <= H - 1)
        ui = torch.where(valid, ui, 0.0).long()
        vi = torch.where(valid, vi, 0.0).long()
        flat = vi * W + ui
        valid = valid & torch.gather(pixel_ok, 1, flat)
        return _finish(src, _gather(vertices, flat), _gather(normals, flat), valid, unbatched)

    tol = torch.finfo(u.dtype).eps ** 0.5  # pixels; keeps border pixel centres despite rounding
    valid = valid & (u >= -tol) & (u <= W - 1 + tol) & (v >= -tol) & (v <= H - 1 + tol)
    u = torch.where(valid, u, 0.0)
    v = torch.where(valid, v, 0.0)
    u0 = torch.floor(u.detach()).clamp(0, W - 2)
    v0 = torch.floor(v.detach()).clamp(0, H - 2)
    au, av = u - u0, v - v0  # in [0, 1] up to the rounding tolerance
    flat0 = (v0 * W + u0).long()
    flat = torch.stack([flat0, flat0 + 1, flat0 + W, flat0 + W + 1], -1).reshape(B, N * 4)
    weights = torch.stack([(1 - au) * (1 - av), au * (1 - av), (1 - au) * av, au * av], -1)  # (B, N, 4)
    valid = valid & torch.gather(pixel_ok, 1, flat).reshape(B, N, 4).all(-1)
    corners = _gather(vertices, flat).reshape(B, N, 4, 3)
    points = (weights[..., None] * corners).sum(-2)
    corner_normals = _gather(normals, flat).reshape(B, N, 4, 3)
    matched_normals = _safe_unit((weights[..., None] * corner_normals).sum(-2))
    return _finish(src, points, matched_normals, valid, unbatched)
