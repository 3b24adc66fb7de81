"""Depth maps of triangle meshes: a z-buffer rasteriser in torch, differentiable in the vertices.

Camera model and conventions are those of :mod:`diffcp.camera` (OpenCV pinhole: ``+z`` forward,
``y`` down, pixel centres at integer coordinates ``(u, v)``, z-depth, camera-to-world poses).

How a depth map is made, for every batch element at once:

1. vertices go into the camera frame and are projected (:func:`diffcp.camera.project`); faces with
   a vertex closer than ``near`` are dropped (no clipping);
2. each face's bounding box lists the pixel centres it may cover (``ceil(min)`` to ``floor(max)``,
   clipped to the image);
3. the three edge functions of each (face, pixel) pair give its barycentric coordinates in the
   image; pairs with all three ``>= 0`` are covered (a pixel on a shared edge is covered by both);
4. depth is interpolated perspective-correctly, ``z = 1 / sum_i(b_i / z_i)`` (``1/z`` is affine in
   the image for a planar triangle);
5. a z-buffer keeps the nearest candidate per pixel (``scatter_reduce(amin)``; ties go to the
   lower face index), and only the winners' depths are recomputed with autograd.

The depth is differentiable in the vertex positions (through the barycentric coordinates and the
vertex depths); which face is visible is not (the usual z-buffer gradient: none at occlusion
boundaries). Background pixels have depth 0, which :mod:`diffcp.camera` treats as invalid.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import checks
from .camera import _check_intrinsics, project
from .geometry import make_transform, transform_points, invert_transform

__all__ = ["DepthRender", "render_depth", "look_at"]


class DepthRender(NamedTuple):
    """Result of :func:`render_depth`."""

    depth: Tensor  # (B, H, W) z-depth, 0 where no face is seen
    face_index: Tensor  # (B, H, W) int64 index of the visible face, -1 for background


def look_at(eye: Tensor, center: Tensor, up: Optional[Tensor] = None) -> Tensor:
    """Camera-to-world poses ``(B, 4, 4)`` of OpenCV cameras at ``eye`` looking at ``center``.

    The camera's ``+z`` points from ``eye`` to ``center``, its ``y`` (image down) is as close as
    possible to ``-up``. Where the viewing direction is (nearly) parallel to ``up``, another world
    axis serves as ``up`` so the pose stays a rotation.

    Args:
        eye: ``(B, 3)`` camera centres.
        center: ``(B, 3)`` or ``(3,)`` points looked at.
        up: ``(3,)`` world up direction; default ``+z``.

    Example:
        >>> pose = look_at(torch.tensor([[0.0, -3.0, 0.0]]), torch.zeros(3))
        >>> pose[0, :3, :3]  # columns: right (+x), down (-z), forward (+y)
        tensor([[ 1.,  0.,  0.],
                [ 0.,  0.,  1.],
                [ 0., -1.,  0.]])
    """
    if not isinstance(eye, Tensor) or not eye.is_floating_point():
        raise TypeError(f"eye must be a floating-point torch.Tensor of shape (B, 3); got {type(eye).__name__}.")
    if eye.dim() != 2 or eye.shape[1] != 3:
        raise ValueError(f"eye must have shape (B, 3); got {tuple(eye.shape)}.")
    center = torch.as_tensor(center, dtype=eye.dtype, device=eye.device).expand_as(eye)
    up = torch.tensor([0.0, 0.0, 1.0]) if up is None else up
    up = torch.as_tensor(up, dtype=eye.dtype, device=eye.device).expand_as(eye)
    forward = center - eye
    norm = forward.norm(dim=-1, keepdim=True)
    if bool((norm <= 0).any()):
        raise ValueError("eye and center must differ for every camera; got a camera looking at itself.")
    z = forward / norm
    alt = torch.tensor([0.0, 1.0, 0.0], dtype=eye.dtype, device=eye.device).expand_as(eye)
    up = torch.where((torch.linalg.cross(z, up).norm(dim=-1, keepdim=True) < 1e-6), alt, up)
    x = torch.linalg.cross(z, up)  # right = down x forward = forward x up
    x = x / x.norm(dim=-1, keepdim=True)
    y = torch.linalg.cross(z, x)
    return make_transform(torch.stack([x, y, z], dim=-1), eye)


def _barycentric(tri: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Barycentric coordinates ``(P, 3)`` of pixel centres ``(u, v)`` in image triangles ``(P, 3, 2)``."""
    def edge(a, b):  # > 0 when (u, v) lies left of a -> b
        return (b[:, 0] - a[:, 0]) * (v - a[:, 1]) - (b[:, 1] - a[:, 1]) * (u - a[:, 0])

    p0, p1, p2 = tri[:, 0], tri[:, 1], tri[:, 2]
    area = (p1[:, 0] - p0[:, 0]) * (p2[:, 1] - p0[:, 1]) - (p1[:, 1] - p0[:, 1]) * (p2[:, 0] - p0[:, 0])
    area = torch.where(area == 0, 1.0, area)
    return torch.stack([edge(p1, p2), edge(p2, p0), edge(p0, p1)], -1) / area[:, None]


def _candidates(uv: Tensor, z: Tensor, H: int, W: int, near: float):
    """(face, pixel) pairs inside each face's clipped bounding box: ``(b, f, u, v)`` int64 ``(P,)``."""
    ok = (z > near).all(-1) & torch.isfinite(uv).all(-1).all(-1)
    lo = uv.amin(2).ceil().clamp(-1, max(H, W) + 1)  # (B, F, 2)
    hi = uv.amax(2).floor().clamp(-1, max(H, W) + 1)
    u0, v0 = lo[..., 0].clamp(min=0).long(), lo[..., 1].clamp(min=0).long()
    u1, v1 = hi[..., 0].clamp(max=W - 1).long(), hi[..., 1].clamp(max=H - 1).long()
    nu, nv = (u1 - u0 + 1).clamp(min=0), (v1 - v0 + 1).clamp(min=0)
    count = torch.where(ok, nu * nv, 0)
    b, f = count.nonzero(as_tuple=True)
    n = count[b, f]
    pair = torch.repeat_interleave(torch.arange(n.numel(), device=uv.device), n)
    offset = torch.arange(pair.numel(), device=uv.device) - (torch.cumsum(n, 0) - n)[pair]
    width = nu[b, f][pair]
    b, f = b[pair], f[pair]
    return b, f, u0[b, f] + offset % width, v0[b, f] + offset // width


def render_depth(vertices: Tensor, faces: Tensor, intrinsics: Tensor, height: int, width: int,
                 camera_pose: Optional[Tensor] = None, *, near: float = 1e-3) -> DepthRender:
    """Render z-depth maps of meshes, differentiable in the vertex positions.

    Args:
        vertices: ``(B, V, 3)`` or ``(V, 3)`` world-frame vertices, float32 or float64.
        faces: ``(F, 3)`` int64 vertex indices shared by the batch (orientation does not matter).
        intrinsics: ``(3, 3)`` or ``(B, 3, 3)`` pinhole matrices (pixel centres at integers).
        height, width: image size ``H, W``.
        camera_pose: camera-to-world ``(4, 4)`` or ``(B, 4, 4)``; default: the identity (the
            vertices are already in the camera frame).
        near: faces with a vertex at ``z <= near`` are not drawn.

    Returns:
        :class:`DepthRender` with ``depth (B, H, W)`` (0 = background) and ``face_index (B, H, W)``
        (unbatched if ``vertices`` was).

    Example:
        >>> K = torch.tensor([[10.0, 0, 2], [0, 10.0, 2], [0, 0, 1]])
        >>> quad = torch.tensor([[-1.0, -1, 2], [1, -1, 2], [1, 1, 2], [-1, 1, 2]])
        >>> out = render_depth(quad, torch.tensor([[0, 1, 2], [0, 2, 3]]), K, 5, 5)
        >>> out.depth[2]
        tensor([2., 2., 2., 2., 2.])
    """
    pts, unbatched = checks.as_batched_points("vertices", vertices)
    B, V, _ = pts.shape
    if not isinstance(faces, Tensor) or faces.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"faces must be an integer torch.Tensor of shape (F, 3); got {type(faces).__name__}"
                        f"{'' if not isinstance(faces, Tensor) else ' of dtype ' + str(faces.dtype)}.")
    if faces.dim() != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3); got {tuple(faces.shape)}.")
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= V):
        raise ValueError(f"faces must index vertices 0..{V - 1}; got indices in [{int(faces.min())}, {int(faces.max())}].")
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    if not isinstance(near, (int, float)) or not near >= 0:
        raise ValueError(f"near must be a number >= 0; got {near!r}.")
    K = _check_intrinsics("intrinsics", intrinsics, B, pts.dtype)
    if camera_pose is not None:
        pose = checks.check_transform("camera_pose", camera_pose, B).to(pts.dtype)
        pts = transform_points(invert_transform(pose), pts)
    depth, face_index = _rasterise(pts, faces.long(), K, height, width, float(near))
    if unbatched:
        return DepthRender(depth[0], face_index[0])
    return DepthRender(depth, face_index)


def _rasterise(pts: Tensor, faces: Tensor, K: Tensor, H: int, W: int, near: float):
    """Unchecked rasteriser of camera-frame vertices ``(B, V, 3)``; returns depth and face index."""
    B = pts.shape[0]
    uv, z = project(pts, K)
    tri_uv, tri_z = uv[:, faces], z[:, faces]  # (B, F, 3, 2), (B, F, 3)
    with torch.no_grad():
        b, f, u, v = _candidates(tri_uv, tri_z, H, W, near)
        bary = _barycentric(tri_uv[b, f], u.to(uv.dtype), v.to(uv.dtype))
        inside = (bary >= 0).all(-1)
        b, f, u, v, bary = b[inside], f[inside], u[inside], v[inside], bary[inside]
        d = 1.0 / (bary / tri_z[b, f]).sum(-1)
        pixel = (b * H + v) * W + u
        zbuf = torch.full((B * H * W,), torch.inf, dtype=d.dtype, device=d.device)
        zbuf = zbuf.scatter_reduce(0, pixel, d, "amin")
        first = torch.full((B * H * W,), f.numel(), dtype=torch.long, device=d.device)
        winner = (d == zbuf[pixel]).nonzero(as_tuple=True)[0]
        first = first.scatter_reduce(0, pixel[winner], winner, "amin")
        seen = (first < f.numel()).nonzero(as_tuple=True)[0]
        pick = first[seen]
        b, f, u, v = b[pick], f[pick], u[pick], v[pick]
    bary = _barycentric(tri_uv[b, f], u.to(uv.dtype), v.to(uv.dtype))  # with autograd this time
    d = 1.0 / (bary / tri_z[b, f]).sum(-1)
    depth = torch.zeros(B * H * W, dtype=pts.dtype, device=pts.device).index_put((seen,), d)
    face_index = torch.full((B * H * W,), -1, dtype=torch.long, device=pts.device).index_put_((seen,), f)
    return depth.reshape(B, H, W), face_index.reshape(B, H, W)
