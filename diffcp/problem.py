"""From settings and data to one validated, batched ICP problem (what every iteration reads).

:func:`build_problem` checks the clouds, normals, lengths, masks and initial transform against the
settings (which have validated themselves), batches everything as ``(B, ...)``, resolves the
temperatures (numbers, tensors that keep their gradient, or the per-cloud default) and builds the
nearest-neighbour index once. The loop in :mod:`diffcp.icp` never validates again.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import checks
from .camera import normals_from_depth
from .search import NearestNeighborIndex, knn
from .select import select_mask, select_random
from .settings import (
    GaussNewtonSolver,
    ICPSettings,
    NearestNeighbor,
    ProcrustesSolver,
    ProjectiveAssociation,
    SoftNearestNeighbor,
)

__all__ = ["Problem", "build_problem"]


@dataclass
class Problem:
    """Everything one ICP iteration needs, validated and batched (``B`` clouds)."""

    settings: ICPSettings
    source: Tensor  # (B, N, 3)
    source_normals: Optional[Tensor]
    source_lengths: Tensor  # (B,) int64
    source_weights: Tensor  # (B, N) selection * padding, float
    target: Tensor  # (B, M, 3) points, or (B, H, W) depth for projective association
    target_normals: Optional[Tensor]  # (B, M, 3), or (B, H, W, 3) normal map
    target_lengths: Optional[Tensor]
    init: Tensor  # (B, 4, 4)
    scale: Tensor  # (B,) RMS radius of each source cloud (no gradient)
    index: Optional[NearestNeighborIndex] = None
    temperature: Optional[Tensor] = None  # soft correspondences: (B,) or ()
    rejection_temperatures: Tuple[Union[float, Tensor], ...] = ()  # one per rejection option
    intrinsics: Optional[Tensor] = None  # projective: (B, 3, 3)
    camera_pose: Optional[Tensor] = None  # projective: (B, 4, 4)
    fused: bool = False  # hard-NN point-to-point Procrustes without options: fused CPU pass allowed
    fused_linear: bool = False  # hard-NN point-to-plane / symmetric Gauss-Newton without options
    source_offset: Optional[Tensor] = None  # (B, 3): the clouds are solved in centred frames
    target_offset: Optional[Tensor] = None

    def to_input_frames(self, T: Tensor) -> Tensor:
        """A transform between the caller's frames -> between the centred frames."""
        return _shifted(T, -self.source_offset, -self.target_offset)

    def to_caller_frames(self, T: Tensor) -> Tensor:
        """A transform between the centred frames -> between the caller's frames."""
        return _shifted(T, self.source_offset, self.target_offset)

    def inputs(self) -> List[Tensor]:
        """The tensors a gradient can flow to (data, init and temperatures)."""
        temps = [t for t in (self.temperature, *self.rejection_temperatures) if isinstance(t, Tensor)]
        data = (self.source, self.target, self.source_normals, self.target_normals, self.init)
        return [x for x in data if x is not None] + temps

    def needs_graph(self, T: Tensor) -> bool:
        """Whether autograd must record the iterations (grad enabled and some input needs it)."""
        return torch.is_grad_enabled() and (T.requires_grad or any(x.requires_grad for x in self.inputs()))


def build_problem(settings: ICPSettings, source, target, *, init=None, source_normals=None, target_normals=None,
                  source_lengths=None, target_lengths=None, source_mask=None) -> Tuple[Problem, bool]:
    """Validate the data against ``settings`` and return ``(problem, unbatched)``.

    Raises:
        ValueError, TypeError: naming the argument and what was expected.
    """
    source, unbatched = checks.as_batched_points("source", source, min_points=3, check_finite=False)
    B, N, _ = source.shape
    source_lengths = checks.check_lengths("source_lengths", source_lengths, B, N, source.device, min_points=3)
    source = checks.valid_rows("source", source, source_lengths)
    if source_normals is not None:
        source_normals = checks.check_normals("source_normals", source_normals, source, "source", unbatched,
                                              check_finite=False)
        source_normals = checks.valid_rows("source_normals", source_normals, source_lengths)
    corr = settings.correspondence
    if isinstance(corr, ProjectiveAssociation):
        if target_lengths is not None:
            raise ValueError("target_lengths do not apply to projective association: the target is a depth map.")
        target, target_normals, intrinsics, camera_pose = _check_projective(corr, target, target_normals, B, source)
    else:
        target, target_normals, target_lengths = _check_target(target, target_normals, target_lengths, B, source)
        intrinsics = camera_pose = None
    _check_dtypes(source, target=target, source_normals=source_normals, target_normals=target_normals)
    checks.check_same_device(source=source, target=target, source_normals=source_normals,
                             target_normals=target_normals, init=init, source_lengths=source_lengths,
                             target_lengths=target_lengths)
    _check_normals_needed(settings, source_normals, target_normals)
    T0 = _check_init(init, source, B)
    weights = _select(settings, source_mask, source_lengths, N, unbatched, source.device)
    p = Problem(settings=settings, source=source, source_normals=source_normals, source_lengths=source_lengths,
                source_weights=weights.to(source.dtype), target=target, target_normals=target_normals,
                target_lengths=target_lengths, init=T0, scale=cloud_scale(source.detach(), source_lengths),
                intrinsics=intrinsics, camera_pose=camera_pose)
    _centre(p)
    _resolve_temperatures(p)
    _plan_fast_paths(p)
    return p, unbatched


# The centred copy of the last cloud of each role, reused while the caller passes the same,
# unchanged tensor (no gradient): the search structures cache their host copies and grids by tensor
# object, so a new copy at every call would rebuild them (e.g. registering many sources to one target).
_CENTRED: dict = {}


def _centred(role: str, points: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
    """``(points - c, c)`` with ``c (B, 3)`` the centroid of each cloud's valid points."""
    key = (points._version, tuple(points.shape), points.dtype, points.device, tuple(lengths.tolist()))
    cached = _CENTRED.get(role)
    if cached is not None and cached[0]() is points and cached[1] == key and not points.requires_grad:
        return cached[2], cached[3]
    offset = _centroid(points, lengths)
    centred = points - offset[:, None]
    _CENTRED[role] = (weakref.ref(points), key, centred, offset) if not points.requires_grad else None
    return centred, offset


def _centroid(points: Tensor, lengths: Tensor) -> Tensor:
    with torch.no_grad():
        mask = checks.lengths_mask(lengths, points.shape[1]).to(points.dtype)[..., None]
        return (points * mask).sum(1) / mask.sum(1).clamp_min(1)


def _shifted(T: Tensor, source_shift: Tensor, target_shift: Tensor) -> Tensor:
    """``x -> T(x - source_shift) + target_shift`` as a ``(B, 4, 4)`` transform."""
    R, t = T[:, :3, :3], T[:, :3, 3]
    t_new = t - (R @ source_shift[..., None])[..., 0] + target_shift
    return torch.cat([torch.cat([R, t_new[..., None]], -1), T[:, 3:]], 1)


def _check_magnitude(name: str, centred: Tensor, lengths: Tensor, offset: Tensor) -> None:
    """Refuse clouds whose extent the dtype cannot square: ICP sums squared coordinates, which
    overflow above ``sqrt(max)`` and vanish below ``sqrt(tiny)`` (about 1.8e19 and 1.1e-19 in
    float32). Rescale the clouds (and the thresholds) or use float64."""
    if not checks.ENABLED:
        return
    finfo = torch.finfo(centred.dtype)
    radius = cloud_scale(centred, lengths)
    valid = checks.lengths_mask(lengths, centred.shape[1])[..., None]
    extent = torch.where(valid, centred.detach().abs(), torch.zeros((), dtype=centred.dtype)).amax((1, 2))
    # a cloud of one repeated point keeps only the rounding of its centroid: that is zero extent
    rounding = 16 * finfo.eps * offset.detach().abs().amax(-1)
    big, small = extent > finfo.max ** 0.5 / 1e3, (radius < finfo.tiny ** 0.5 * 1e3) & (extent > rounding)
    if bool(big.any()) or bool(small.any()):
        what = "spread over more than" if bool(big.any()) else "spread over less than"
        limit = finfo.max ** 0.5 / 1e3 if bool(big.any()) else finfo.tiny ** 0.5 * 1e3
        clouds = (big | small).nonzero().flatten().tolist()
        raise ValueError(f"{name} clouds {clouds} are {what} {limit:.1e} about their centroid, beyond what "
                         f"{centred.dtype} can square; rescale the clouds (and the distance thresholds) or use "
                         "float64.")


def _centre(p: Problem) -> None:
    """Solve in frames centred on the clouds, so that the answer does not depend on where they sit.

    The source moves by its centroid ``c_s`` and the target by its centroid ``c_t`` (for projective
    association, the world and the camera move by ``c_s``). The offsets carry no gradient: ICP is
    equivariant under these shifts, so the result depends on them only through rounding. Far from
    the origin, the linearised solvers would otherwise couple rotation and translation badly
    (a twist acts about the origin), and float32 would lose the cloud's detail to its offset.
    """
    p.source, p.source_offset = _centred("source", p.source, p.source_lengths)
    _check_magnitude("source", p.source, p.source_lengths, p.source_offset)
    if p.intrinsics is None:
        p.target, p.target_offset = _centred("target", p.target, p.target_lengths)
        _check_magnitude("target", p.target, p.target_lengths, p.target_offset)
    else:
        p.target_offset = p.source_offset
        p.camera_pose = _shifted(p.camera_pose, torch.zeros_like(p.source_offset), -p.source_offset)
    p.init = p.to_input_frames(p.init)


def _check_target(target, target_normals, target_lengths, B: int, source: Tensor):
    target, t_unbatched = checks.as_batched_points("target", target, min_points=3, check_finite=False)
    if target.shape[0] != B:
        raise ValueError(f"target holds {target.shape[0]} clouds but source holds {B}; the batch sizes must match.")
    target_lengths = checks.check_lengths("target_lengths", target_lengths, B, target.shape[1], source.device,
                                          min_points=3)
    target = checks.valid_rows("target", target, target_lengths)
    if target_normals is not None:
        target_normals = checks.check_normals("target_normals", target_normals, target, "target", t_unbatched,
                                              check_finite=False)
        target_normals = checks.valid_rows("target_normals", target_normals, target_lengths)
    return target, target_normals, target_lengths


def _check_dtypes(source: Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != source.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but source has {source.dtype}; use one floating-point dtype.")


def _check_normals_needed(settings: ICPSettings, source_normals, target_normals) -> None:
    why = f"metric={settings.metric!r}" if settings.metric != "point_to_point" else "normal weighting/rejection"
    if settings.needs_target_normals and target_normals is None:
        raise ValueError(f"target_normals are required for {why}; estimate them with diffcp.estimate_normals(target).")
    if settings.needs_source_normals and source_normals is None:
        why = "metric='symmetric'" if settings.metric == "symmetric" else "normal weighting/rejection"
        raise ValueError(f"source_normals are required for {why}; estimate them with diffcp.estimate_normals(source).")


def _check_init(init, source: Tensor, B: int) -> Tensor:
    if init is None:
        return torch.eye(4, dtype=source.dtype, device=source.device).expand(B, 4, 4)
    T0 = checks.check_transform("init", init, B, rigid=True)
    if T0.dtype != source.dtype:
        raise TypeError(f"init has dtype {T0.dtype} but source has {source.dtype}; use one floating-point dtype.")
    return T0


def _select(settings: ICPSettings, source_mask, source_lengths: Tensor, N: int, unbatched: bool, device) -> Tensor:
    """Step 1: the source points that take part, fixed for the whole run, ``(B, N)`` bool."""
    valid = checks.lengths_mask(source_lengths, N)
    if source_mask is not None:
        if unbatched and isinstance(source_mask, Tensor) and source_mask.dim() == 1:
            source_mask = source_mask[None]
        if isinstance(source_mask, Tensor) and source_mask.shape != valid.shape:
            raise ValueError(f"source_mask must have shape {tuple(valid.shape)}, one flag per source point; "
                             f"got {tuple(source_mask.shape)}.")
        if isinstance(source_mask, Tensor) and source_mask.device != valid.device:
            raise ValueError(f"source_mask is on {source_mask.device} but source is on {valid.device}.")
        valid = select_mask(source_mask, source_lengths)
    sel = settings.selection
    if sel is not None:
        gen = None if sel.seed is None else torch.Generator(device=device).manual_seed(sel.seed)
        valid = valid & select_random(source_lengths, N, sel.num_samples, generator=gen)
    return valid


def cloud_scale(points: Tensor, lengths: Tensor) -> Tensor:
    """RMS distance of each cloud's valid points from their centroid, ``(B,)`` (no gradient)."""
    with torch.no_grad():
        mask = checks.lengths_mask(lengths, points.shape[1]).to(points.dtype)[..., None]
        n = mask.sum(1).clamp_min(1)
        c = (points * mask).sum(1) / n
        var = (((points - c[:, None]) ** 2) * mask).sum((1, 2)) / n[:, 0]
        return var.sqrt().clamp_min(torch.finfo(points.dtype).tiny)


def default_temperature(target: Tensor, lengths: Tensor, backend: str = "auto") -> Tensor:
    """Per cloud, ``0.1 x`` the median squared nearest-neighbour spacing of the target, ``(B,)``.

    Duplicated points (spacing 0) are left out of the median, so a cloud with many duplicates keeps
    a temperature at the scale of its distinct points; a cloud of one repeated point gets
    ``1e-6 x`` its squared radius (any positive value gives the same, exact, match there).
    """
    with torch.no_grad():
        nn = knn(target, target, lengths, lengths, k=2, backend=backend)
        spacing2 = nn.sq_distances[..., 1]
        ok = checks.lengths_mask(lengths, target.shape[1]) & (spacing2 > 0)
        med = torch.nanmedian(torch.where(ok, spacing2, torch.full_like(spacing2, float("nan"))), dim=1).values
        fallback = 1e-5 * cloud_scale(target, lengths) ** 2
        fallback = torch.where(fallback > 0, fallback, torch.ones_like(fallback))  # one repeated point
        return 0.1 * torch.where(torch.isnan(med), fallback, med)


def _as_tensor_temperature(value, B: int, like: Tensor, name: str) -> Union[float, Tensor]:
    if not isinstance(value, Tensor):
        return value
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but source is on {like.device}; move them to one device.")
    if value.dim() == 1 and value.shape[0] not in (1, B):
        raise ValueError(f"{name} must be a number or a ({B},) tensor, one per cloud; got shape {tuple(value.shape)}.")
    return value.to(like.dtype)


def _resolve_temperatures(p: Problem) -> None:
    s, B = p.settings, p.source.shape[0]
    if any(getattr(o, "learnable", False) for o in (s.correspondence, *s.rejection)):
        raise ValueError("learnable temperatures are parameters of diffcp.ICP (the layer); the function icp() "
                         "takes a tensor temperature that requires grad instead.")
    if isinstance(s.correspondence, SoftNearestNeighbor):
        t = s.correspondence.temperature
        if t is None:
            t = default_temperature(p.target, p.target_lengths, backend="auto")
        t = _as_tensor_temperature(t, B, p.source, "SoftNearestNeighbor.temperature")
        p.temperature = t if isinstance(t, Tensor) else torch.tensor(t, dtype=p.source.dtype, device=p.source.device)
    temps = []
    for i, opt in enumerate(s.rejection):
        t = _as_tensor_temperature(opt.temperature, B, p.source, f"rejection[{i}].temperature")
        temps.append(t[:, None] if isinstance(t, Tensor) and t.dim() == 1 else t)
    p.rejection_temperatures = tuple(temps)


def _plan_fast_paths(p: Problem) -> None:
    """Build the nearest-neighbour index and decide whether the compiled CPU loop may run."""
    s = p.settings
    if not isinstance(s.correspondence, NearestNeighbor):
        return
    p.index = NearestNeighborIndex(p.target.detach(), p.target_lengths, backend=s.correspondence.backend,
                                   warm_start=True)
    plain = not s.weighting and not s.rejection and p.index.uses_grid(p.source.shape[1])
    p.fused = plain and isinstance(s.solver, ProcrustesSolver) and not s.solver.scale
    p.fused_linear = plain and isinstance(s.solver, GaussNewtonSolver) and s.metric != "point_to_point"


def _check_projective(option: ProjectiveAssociation, depth, normal_map, B: int, source: Tensor):
    if not isinstance(depth, Tensor) or depth.dtype != source.dtype:
        raise TypeError(f"target must be a depth map (H, W) or (B, H, W) of the source's dtype {source.dtype} for "
                        f"projective association; got {getattr(depth, 'dtype', type(depth).__name__)}.")
    if depth.dim() == 2:
        depth = depth[None]
    if depth.dim() != 3 or depth.shape[0] != B:
        raise ValueError(f"target must be a depth map of shape (H, W) or ({B}, H, W) for projective association; "
                         f"got {tuple(depth.shape)}.")
    as_batch = lambda m, n: torch.tensor(m, dtype=depth.dtype, device=depth.device).expand(B, n, n)
    try:
        intrinsics = as_batch(option.intrinsics, 3)
        camera_pose = (torch.eye(4, dtype=depth.dtype, device=depth.device).expand(B, 4, 4)
                       if option.camera_pose is None else as_batch(option.camera_pose, 4))
    except RuntimeError:
        raise ValueError(f"ProjectiveAssociation's intrinsics and camera_pose must hold one matrix or {B}, "
                         "one per cloud.") from None
    if normal_map is None:
        normal_map = normals_from_depth(depth, intrinsics, camera_pose)
    else:
        if isinstance(normal_map, Tensor) and normal_map.dim() == 3:
            normal_map = normal_map[None]
        if not isinstance(normal_map, Tensor) or normal_map.shape != depth.shape + (3,):
            raise ValueError(f"target_normals must be a normal map of shape {tuple(depth.shape) + (3,)} for "
                             f"projective association; got {tuple(getattr(normal_map, 'shape', ()))}.")
        if normal_map.dtype != source.dtype:
            raise TypeError(f"target_normals has dtype {normal_map.dtype} but source has {source.dtype}.")
        if checks.ENABLED and not bool(torch.isfinite(normal_map).all()):
            raise ValueError("target_normals (the normal map) contains NaN or Inf values.")
    return depth, normal_map, intrinsics, camera_pose
