"""The ICP loop: the five steps composed, per-element convergence, and three backward modes.

Convention (as everywhere in diffcp): column vectors, ``y = R x + t`` maps the **source** into the
**target**; clouds are ``(B, N, 3)`` with optional per-cloud lengths; transforms ``(B, 4, 4)``.

One iteration, for every batch element at once:

1. *select* source points (all, a random subset, or a mask) - :mod:`diffcp.select`;
2. *match* each transformed source point ``y = R x + t`` to the target (hard nearest neighbour,
   soft nearest neighbour with temperature ``T``, or projective association into a depth map) -
   :mod:`diffcp.correspond`;
3. *weight* the pairs (linear in distance or normal agreement, robust kernels) - :mod:`diffcp.weight`;
4. *reject* pairs (hard or sigmoid-soft, on distance and normal angle) - :mod:`diffcp.reject`;
5. *minimise* the error metric (point-to-point, point-to-plane, symmetric) by Procrustes, one
   Gauss-Newton step, or a bounded Levenberg-Marquardt run - :mod:`diffcp.minimize`.

Backward modes (how gradients reach ``source``, ``target``, normals, weights and ``init``):

- ``"unroll"``: autograd through every iteration (exact gradient of the computed result);
- ``"truncated"``: the first iterations run without a graph, the last ``truncate_iterations``
  with one; gradients w.r.t. ``init`` vanish unless every iteration is kept;
- ``"implicit"``: run to the fixed point ``T* = F(T*, theta)`` without a graph, then
  differentiate the fixed point by the implicit function theorem,
  ``dT*/dtheta = (I - dF/dT)^{-1} dF/dtheta``, with one 6x6 solve per element.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import checks
from .camera import normals_from_depth
from .correspond import (
    Correspondences,
    nearest_correspondences,
    projective_correspondences,
    soft_correspondences,
)
from .geometry import (
    apply_twist,
    make_transform,
    rotate_vectors,
    split_transform,
    transform_points,
    twist_between,
)
from .fused import conditioning_gauss_newton, conditioning_point_to_point, run_gauss_newton, run_point_to_point
from .minimize.gauss_newton import gauss_newton_step, normal_equations
from .minimize.levenberg_marquardt import levenberg_marquardt
from .minimize.procrustes import procrustes, procrustes_conditioning, procrustes_from_moments
from .minimize.residuals import residuals, weighted_cost
from .reject import reject_by_distance, reject_by_normal_angle
from .search import NearestNeighborIndex, knn
from .select import select_mask, select_random
from .weight import distance_weights, normal_weights, robust_weights

__all__ = ["icp", "ICPResult", "CORRESPONDENCES", "METRICS", "SOLVERS", "BACKWARD_MODES"]

CORRESPONDENCES = ("nn", "soft_nn", "projective")
METRICS = ("point_to_point", "point_to_plane", "symmetric")
SOLVERS = ("procrustes", "linear", "lm")
BACKWARD_MODES = ("unroll", "truncated", "implicit")
ROBUST_KERNELS = ("huber", "tukey", "cauchy", "geman_mcclure")


class ICPResult(NamedTuple):
    """What :func:`icp` returns (unbatched input gives unbatched fields).

    Attributes:
        transform: ``(B, 4, 4)`` mapping source into target, ``y = R x + t``.
        rotation: ``(B, 3, 3)``.
        translation: ``(B, 3)``.
        converged: ``(B,)`` bool, True where the last update fell below the tolerance.
        iterations: ``(B,)`` int64, iterations each element ran before it converged (or stopped).
        errors: ``(B, K)`` weighted RMS residual at the correspondences of each of the K
            iterations run (an element that converged repeats its last value).
        final_error: ``(B,)`` the weighted RMS residual of the last iteration.
    """

    transform: Tensor
    rotation: Tensor
    translation: Tensor
    converged: Tensor
    iterations: Tensor
    errors: Tensor
    final_error: Tensor


@dataclass
class _Problem:
    """Everything one ICP iteration needs, validated and batched."""

    source: Tensor
    source_normals: Optional[Tensor]
    source_lengths: Tensor
    source_weights: Tensor  # (B, N) selection mask * padding mask, float
    target: Tensor  # (B, M, 3) points, or (B, H, W) depth for projective association
    target_normals: Optional[Tensor]
    target_lengths: Optional[Tensor]
    index: Optional[NearestNeighborIndex]
    correspondence: str
    temperature: float
    soft_backend: str
    intrinsics: Optional[Tensor]
    camera_pose: Optional[Tensor]
    projective_mode: str
    metric: str
    solver: str
    distance_weighting: Optional[float]
    normal_weighting: bool
    robust_kernel: Optional[str]
    robust_scale: float
    reject_distance: Optional[float]
    reject_angle: Optional[float]
    rejection_temperature: float
    lm_iterations: int
    damping: float
    fused: bool = False  # hard-NN point-to-point Procrustes without options: fused CPU pass allowed
    fused_linear: bool = False  # hard-NN point-to-plane / symmetric Gauss-Newton without options: compiled loop


def _match(p: _Problem, y: Tensor) -> Correspondences:
    if p.correspondence == "nn":
        return nearest_correspondences(
            y, p.target, p.target_normals, source_lengths=p.source_lengths,
            target_lengths=p.target_lengths, index=p.index,
        )
    if p.correspondence == "soft_nn":
        return soft_correspondences(
            y, p.target, p.temperature, p.target_normals, source_lengths=p.source_lengths,
            target_lengths=p.target_lengths, backend=p.soft_backend,
        )
    return projective_correspondences(
        y, p.target, p.intrinsics, p.camera_pose, normal_map=p.target_normals,
        mode=p.projective_mode, source_lengths=p.source_lengths,
    )


def _fused_step(p: _Problem, T: Tensor):
    """:func:`_step` for hard-NN point-to-point Procrustes in one compiled CPU pass (no autograd):
    match and accumulate the weighted moments (float64), then solve Procrustes from them. Returns
    None where a cloud has no weight (the general step handles it)."""
    mom, source_ref, target_ref = p.index.point_to_point_moments(p.source, T, p.source_weights, p.source_lengths)
    if not (mom[:, 0] > 0).all():
        return None
    m = torch.from_numpy(mom)
    sol = procrustes_from_moments(m[:, 0], m[:, 1:4], m[:, 4:7], m[:, 7:16].reshape(-1, 3, 3),
                                  torch.from_numpy(source_ref), torch.from_numpy(target_ref))
    T_new = make_transform(sol.rotation, sol.translation).to(T)
    error = (m[:, 16] / m[:, 0].clamp_min(torch.finfo(T.dtype).tiny ** 0.5)).sqrt().to(T)
    return T_new, error


def _step(p: _Problem, T: Tensor):
    """One ICP iteration from the current transform ``T``: returns ``(T_new, error (B,))``."""
    if p.fused and not (torch.is_grad_enabled() and (p.source.requires_grad or p.target.requires_grad
                                                      or T.requires_grad)):
        out = _fused_step(p, T)
        if out is not None:
            return out
    R, _ = split_transform(T)
    y = transform_points(T, p.source)
    ny = rotate_vectors(R, p.source_normals) if p.source_normals is not None else None
    match = _match(p, y)
    w = p.source_weights * match.valid.to(y.dtype)
    if p.distance_weighting is not None:
        w = w * distance_weights(match.sq_distances, p.distance_weighting)
    if p.normal_weighting:
        w = w * normal_weights(ny, match.normals)
    if p.reject_distance is not None:
        w = w * reject_by_distance(match.sq_distances, p.reject_distance, p.rejection_temperature)
    if p.reject_angle is not None:
        w = w * reject_by_normal_angle(ny, match.normals, p.reject_angle, p.rejection_temperature)
    r = residuals(p.metric, y, match.points, target_normals=match.normals, source_normals=ny)
    if p.robust_kernel is not None:
        w = w * robust_weights(r, p.robust_kernel, p.robust_scale)
    error = weighted_cost(r, w).clamp_min(0).sqrt()
    if p.solver == "procrustes":
        sol = procrustes(p.source, match.points, weights=w)
        T_new = make_transform(sol.rotation, sol.translation)
    elif p.solver == "linear":
        xi = gauss_newton_step(
            p.metric, y, match.points, w, target_normals=match.normals, source_normals=ny,
            damping=p.damping,
        )
        T_new = apply_twist(T, xi)
    else:
        T_new = levenberg_marquardt(
            p.metric, T, p.source, match.points, w, source_normals=p.source_normals,
            target_normals=match.normals, iterations=p.lm_iterations,
        ).transform
    return T_new, error


def _cloud_scale(points: Tensor, lengths: Tensor) -> Tensor:
    """RMS distance of each cloud's valid points from their centroid, ``(B,)`` (no gradient)."""
    with torch.no_grad():
        mask = checks.lengths_mask(lengths, points.shape[1]).to(points.dtype)[..., None]
        n = mask.sum(1).clamp_min(1)
        c = (points * mask).sum(1) / n
        var = (((points - c[:, None]) ** 2) * mask).sum((1, 2)) / n[:, 0]
        return var.sqrt().clamp_min(torch.finfo(points.dtype).tiny)


def _needs_graph(p: _Problem, T: Tensor) -> bool:
    """Whether autograd must record the iterations (a gradient is enabled and some input needs it)."""
    return torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (p.source, p.target, p.source_normals, p.target_normals, T)
    )


def _run(p: _Problem, T: Tensor, iterations: int, tolerance: float, scale: Tensor, freeze: bool):
    """Iterate up to ``iterations`` times with per-element convergence.

    Elements whose update falls below the tolerance are frozen (they stop changing) when
    ``freeze`` is set; the loop stops once all are converged (one host sync per iteration).
    """
    if freeze and (p.fused or p.fused_linear) and not _needs_graph(p, T):
        if p.fused:
            out = run_point_to_point(p.index, p.source, p.source_weights, p.source_lengths, T, iterations,
                                     tolerance, scale)
        else:
            out = run_gauss_newton(p.index, p.source, p.source_weights, p.source_lengths, p.target_normals,
                                   p.source_normals if p.metric == "symmetric" else None, T, iterations,
                                   tolerance, scale, p.damping)
        if out is not None:
            return out
    B = T.shape[0]
    converged = torch.zeros(B, dtype=torch.bool, device=T.device)
    count = torch.zeros(B, dtype=torch.int64, device=T.device)
    errors = []
    for _ in range(iterations):
        T_new, err = _step(p, T)
        with torch.no_grad():
            xi = twist_between(T_new, T)
            small = (xi[:, :3].norm(dim=-1) <= tolerance) & (xi[:, 3:].norm(dim=-1) <= tolerance * scale)
        if freeze:
            keep = converged[:, None, None]
            T = torch.where(keep, T, T_new)
            err = torch.where(converged, errors[-1], err) if errors else err
        else:
            T = T_new
        count = count + (~converged).long()
        converged = converged | small
        errors.append(err)
        if freeze and bool(converged.all()):
            break
    errs = torch.stack(errors, dim=1) if errors else T.new_zeros(B, 0)
    return T, converged, count, errs


class _ImplicitGradient(torch.autograd.Function):
    """Identity in the forward pass; in the backward pass solves ``(I - J)^T u = g`` per element."""

    @staticmethod
    def forward(ctx, z, jacobian):
        ctx.save_for_backward(jacobian)
        return z.view_as(z)

    @staticmethod
    def backward(ctx, g):
        (J,) = ctx.saved_tensors
        eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)
        A = (eye - J).transpose(-1, -2)
        # (I - J)^T is singular along directions the data do not determine (a symmetric shape):
        # a slightly damped least-squares solve keeps the gradient finite there and exact elsewhere.
        AtA = A.transpose(-1, -2) @ A
        lam = 1e-12 * AtA.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(J.dtype).tiny)
        u = torch.linalg.solve(AtA + lam[:, None, None] * eye, (A.transpose(-1, -2) @ g[..., None]))[..., 0]
        return u, None


def _implicit(p: _Problem, T_star: Tensor):
    """Differentiable fixed point at ``T_star`` by the implicit function theorem.

    Levenberg-Marquardt's accept/reject makes its map locally the identity at a minimum (every
    step is rejected), so its fixed point is differentiated through the Gauss-Newton map, which
    has the same fixed points.
    """
    if p.solver == "lm":
        p = replace(p, solver="linear")
    xi0 = torch.zeros(T_star.shape[0], 6, dtype=T_star.dtype, device=T_star.device, requires_grad=True)
    T1, err = _step(p, apply_twist(T_star, xi0))
    z = twist_between(T1, T_star)  # ~0 at the fixed point; a function of xi0 and the inputs
    rows = []
    for k in range(6):
        (g,) = torch.autograd.grad(z[:, k].sum(), xi0, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(xi0) if g is None else g)
    J = torch.stack(rows, dim=1).detach()  # (B, 6, 6): dz/dxi0
    z = _ImplicitGradient.apply(z, J)
    return apply_twist(T_star, z), err


def _as_float(name: str, value) -> float:
    checks.check_positive(name, value)
    return float(value)


def icp(
    source: Tensor,
    target: Tensor,
    *,
    init: Optional[Tensor] = None,
    source_normals: Optional[Tensor] = None,
    target_normals: Optional[Tensor] = None,
    source_lengths: Optional[Tensor] = None,
    target_lengths: Optional[Tensor] = None,
    correspondence: str = "nn",
    temperature: Optional[float] = None,
    metric: str = "point_to_point",
    solver: str = "procrustes",
    max_iterations: int = 30,
    tolerance: float = 1e-6,
    backward: str = "unroll",
    truncate_iterations: int = 5,
    source_mask: Optional[Tensor] = None,
    num_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    distance_weighting: Optional[float] = None,
    normal_weighting: bool = False,
    robust_kernel: Optional[str] = None,
    robust_scale: float = 1.0,
    reject_distance: Optional[float] = None,
    reject_angle: Optional[float] = None,
    rejection_temperature: float = 0.0,
    intrinsics: Optional[Tensor] = None,
    camera_pose: Optional[Tensor] = None,
    projective_mode: str = "nearest",
    lm_iterations: int = 5,
    damping: float = 1e-9,
    search_backend: str = "auto",
    soft_backend: str = "auto",
) -> ICPResult:
    """Register ``source`` to ``target`` by Iterative Closest Point, batched and differentiable.

    Convention: column vectors, the result maps the source into the target, ``y = R x + t``.

    Args:
        source: ``(N, 3)`` or ``(B, N, 3)`` float32/float64 points.
        target: ``(M, 3)`` or ``(B, M, 3)`` points; for ``correspondence="projective"`` a depth
            map ``(H, W)`` or ``(B, H, W)`` seen by a pinhole camera (``intrinsics``, ``camera_pose``).
        init: initial transform ``(4, 4)`` or ``(B, 4, 4)``; identity if None. Differentiable.
        source_normals: ``like source``; needed by ``metric="symmetric"``, ``normal_weighting``
            and ``reject_angle``.
        target_normals: ``like target``; needed by ``point_to_plane``, ``symmetric``,
            ``normal_weighting`` and ``reject_angle``. For projective association: an optional
            ``(B, H, W, 3)`` normal map in world coordinates (estimated from the depth if None).
        source_lengths, target_lengths: ``(B,)`` number of valid points in padded clouds.
        correspondence: ``"nn"`` (exact nearest neighbour), ``"soft_nn"`` (softmax over
            ``-|y - q|^2 / T``), or ``"projective"`` (project into the target depth map).
        temperature: ``T`` of ``soft_nn``; None picks ``0.1 x`` the median squared
            nearest-neighbour spacing of the target (scale-aware: ``T`` must sit well below the
            squared point spacing or the forward result is biased towards the centroid).
        metric: ``"point_to_point"``, ``"point_to_plane"`` or ``"symmetric"`` (Rusinkiewicz 2019:
            ``(y - q) . (R n_x + n_q)``).
        solver: ``"procrustes"`` (closed form, point-to-point only), ``"linear"`` (one
            Gauss-Newton step per iteration) or ``"lm"`` (Levenberg-Marquardt, ``lm_iterations``
            bounded inner steps per iteration).
        max_iterations: upper bound on iterations.
        tolerance: relative convergence threshold: an element stops when its update rotates by
            less than ``tolerance`` radians and translates by less than ``tolerance`` times the
            RMS radius of its source cloud. 0 runs every iteration.
        backward: ``"unroll"``, ``"truncated"`` or ``"implicit"`` (see the module docstring).
        truncate_iterations: iterations kept in the graph for ``backward="truncated"``.
        source_mask: ``(B, N)`` bool, the source points to use (step 1).
        num_samples: use a random subset of this many source points (fixed for the whole run).
        generator: random generator for ``num_samples``.
        distance_weighting: if given, weight pairs by ``1 - d / distance_weighting`` (clamped).
        normal_weighting: weight pairs by ``max(n_y . n_q, 0)``.
        robust_kernel: ``"huber"``, ``"tukey"``, ``"cauchy"`` or ``"geman_mcclure"`` IRLS weights
            with scale ``robust_scale``.
        reject_distance: reject pairs farther apart than this (soft if ``rejection_temperature > 0``).
        reject_angle: reject pairs whose normals differ by more than this many degrees.
        rejection_temperature: 0 for hard rejection; ``T > 0`` for sigmoid rejection, which tends
            to hard rejection as ``T -> 0`` and to no rejection as ``T -> inf``.
        intrinsics: ``(3, 3)`` or ``(B, 3, 3)`` pinhole matrix of the target depth map.
        camera_pose: ``(4, 4)`` or ``(B, 4, 4)`` camera-to-world pose of the target depth map.
        projective_mode: ``"nearest"`` (hard) or ``"bilinear"`` (differentiable) association.
        lm_iterations: bounded inner iterations of the LM solver.
        damping: relative Tikhonov damping of the linear solves.
        search_backend: ``"auto"``, ``"grid"``, ``"tree"`` or ``"matmul"`` for hard nearest
            neighbours (see :func:`diffcp.search.knn`). On a CPU with the grid, hard-NN
            point-to-point Procrustes, and point-to-plane or symmetric ICP with
            ``solver="linear"``, without weighting or rejection, run the iterations that need no
            gradient as one compiled loop (:mod:`diffcp.fused`; same result, float64 sums).
        soft_backend: ``"auto"``, ``"dense"``, ``"attention"`` or ``"truncated"`` (nearby
            candidates only, row by row where that is certified to the dtype's precision, the
            other rows exactly; see :func:`diffcp.search.soft_nearest`) for soft nearest
            neighbours. ``"auto"`` truncates on a CPU with numba.

    Returns:
        :class:`ICPResult`.

    Raises:
        ValueError, TypeError: on bad input, naming the argument.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2, 200, 3, generator=g, dtype=torch.float64)
        >>> T = diffcp.geometry.random_transform(2, max_angle=0.3, max_translation=0.1, generator=g,
        ...                                      dtype=torch.float64)
        >>> y = diffcp.geometry.transform_points(T, x)
        >>> out = icp(x, y)
        >>> bool(torch.allclose(out.transform, T, atol=1e-6)), out.converged.tolist()
        (True, [True, True])
    """
    checks.check_option("correspondence", correspondence, CORRESPONDENCES)
    checks.check_option("metric", metric, METRICS)
    checks.check_option("solver", solver, SOLVERS)
    checks.check_option("backward", backward, BACKWARD_MODES)
    checks.check_option("projective_mode", projective_mode, ("nearest", "bilinear"))
    checks.check_option("search_backend", search_backend, ("auto", "grid", "tree", "matmul"))
    checks.check_option("soft_backend", soft_backend, ("auto", "dense", "attention", "truncated"))
    if robust_kernel is not None:
        checks.check_option("robust_kernel", robust_kernel, ROBUST_KERNELS)
        robust_scale = _as_float("robust_scale", robust_scale)
    if solver == "procrustes" and metric != "point_to_point":
        raise ValueError(
            f"solver='procrustes' solves the point_to_point metric in closed form only; got metric={metric!r}. "
            "Use solver='linear' or solver='lm' for point_to_plane and symmetric."
        )
    for name, value in (("max_iterations", max_iterations), ("truncate_iterations", truncate_iterations),
                        ("lm_iterations", lm_iterations)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    checks.check_positive("tolerance", tolerance, allow_zero=True)
    checks.check_positive("damping", damping, allow_zero=True)
    checks.check_positive("rejection_temperature", rejection_temperature, allow_zero=True)
    if temperature is not None:
        temperature = _as_float("temperature", temperature)
    if distance_weighting is not None:
        distance_weighting = _as_float("distance_weighting", distance_weighting)
    if reject_distance is not None:
        reject_distance = _as_float("reject_distance", reject_distance)
    if reject_angle is not None:
        reject_angle = _as_float("reject_angle", reject_angle)
        if reject_angle > 180:
            raise ValueError(f"reject_angle must lie in (0, 180] degrees; got {reject_angle}.")

    source, unbatched = checks.as_batched_points("source", source, min_points=3)
    B, N, _ = source.shape
    dtype, device = source.dtype, source.device
    source_lengths = checks.check_lengths("source_lengths", source_lengths, B, N, device, min_points=3)
    if source_normals is not None:
        source_normals = checks.check_normals("source_normals", source_normals, source, "source", unbatched)

    if correspondence == "projective":
        target, intrinsics, camera_pose, target_normals = _check_projective(
            target, intrinsics, camera_pose, target_normals, B, unbatched
        )
        target_lengths = None
    else:
        target, t_unbatched = checks.as_batched_points("target", target, min_points=3)
        if target.shape[0] != B:
            raise ValueError(
                f"target holds {target.shape[0]} clouds but source holds {B}; the batch sizes must match."
            )
        target_lengths = checks.check_lengths("target_lengths", target_lengths, B, target.shape[1], device, min_points=3)
        if target_normals is not None:
            target_normals = checks.check_normals("target_normals", target_normals, target, "target", t_unbatched)
    if target.dtype != dtype:
        raise TypeError(f"target has dtype {target.dtype} but source has {dtype}; use one floating-point dtype.")
    checks.check_same_device(source=source, target=target, source_normals=source_normals,
                             target_normals=target_normals, intrinsics=intrinsics, camera_pose=camera_pose,
                             init=init, source_lengths=source_lengths, target_lengths=target_lengths)

    needs_target_normals = metric in ("point_to_plane", "symmetric") or normal_weighting or reject_angle is not None
    if needs_target_normals and target_normals is None:
        raise ValueError(
            f"target_normals are required for metric={metric!r}"
            + (", normal_weighting" if normal_weighting else "")
            + (", reject_angle" if reject_angle is not None else "")
            + "; estimate them with diffcp.estimate_normals(target)."
        )
    needs_source_normals = metric == "symmetric" or normal_weighting or reject_angle is not None
    if needs_source_normals and source_normals is None:
        raise ValueError(
            "source_normals are required for "
            + ("metric='symmetric'" if metric == "symmetric" else "normal weighting/rejection")
            + "; estimate them with diffcp.estimate_normals(source)."
        )

    T0 = torch.eye(4, dtype=dtype, device=device).expand(B, 4, 4) if init is None else checks.check_transform("init", init, B)
    if T0.dtype != dtype:
        raise TypeError(f"init has dtype {T0.dtype} but source has {dtype}; use one floating-point dtype.")

    # step 1: selection, fixed for the whole run
    valid = checks.lengths_mask(source_lengths, N)
    if source_mask is not None:
        if unbatched and isinstance(source_mask, Tensor) and source_mask.dim() == 1:
            source_mask = source_mask[None]
        valid = select_mask(source_mask, source_lengths)
    if num_samples is not None:
        if not isinstance(num_samples, int) or num_samples < 3:
            raise ValueError(f"num_samples must be an integer >= 3; got {num_samples!r}.")
        valid = valid & select_random(source_lengths, N, num_samples, generator=generator)

    index = None
    if correspondence == "nn":
        index = NearestNeighborIndex(target.detach(), target_lengths, backend=search_backend, warm_start=True)
    if correspondence == "soft_nn" and temperature is None:
        with torch.no_grad():
            nn = knn(target, target, target_lengths, target_lengths, k=2, backend=search_backend)
            spacing2 = nn.sq_distances[..., 1]
            tmask = checks.lengths_mask(target_lengths, target.shape[1])
            temperature = 0.1 * float(spacing2[tmask].median().clamp_min(torch.finfo(dtype).tiny))

    problem = _Problem(
        source=source, source_normals=source_normals, source_lengths=source_lengths,
        source_weights=valid.to(dtype), target=target, target_normals=target_normals,
        target_lengths=target_lengths, index=index, correspondence=correspondence,
        temperature=temperature if temperature is not None else 1.0, soft_backend=soft_backend,
        intrinsics=intrinsics, camera_pose=camera_pose, projective_mode=projective_mode,
        metric=metric, solver=solver, distance_weighting=distance_weighting,
        normal_weighting=normal_weighting, robust_kernel=robust_kernel, robust_scale=robust_scale,
        reject_distance=reject_distance, reject_angle=reject_angle,
        rejection_temperature=float(rejection_temperature), lm_iterations=lm_iterations,
        damping=float(damping),
    )
    plain = (correspondence == "nn" and distance_weighting is None and not normal_weighting and robust_kernel is None
             and reject_distance is None and reject_angle is None and index.uses_grid(N))
    problem.fused = plain and metric == "point_to_point" and solver == "procrustes"
    problem.fused_linear = plain and metric in ("point_to_plane", "symmetric") and solver == "linear"
    scale = _cloud_scale(source.detach(), source_lengths)
    checks_enabled = checks.ENABLED
    with checks.disabled():
        T, converged, count, errors = _solve(problem, T0, backward, max_iterations, truncate_iterations, tolerance, scale)

    if checks_enabled:
        _warn_if_ambiguous(problem, T.detach(), scale)

    R, t = split_transform(T)
    out = ICPResult(T, R, t, converged, count, errors, errors[:, -1])
    if unbatched:
        out = ICPResult(*(f[0] for f in out))
    return out


def _solve(problem: _Problem, T0: Tensor, backward: str, max_iterations: int, truncate_iterations: int,
           tolerance: float, scale: Tensor):
    """Run the loop in the requested backward mode: ``(T, converged, count, errors)``."""
    if backward == "unroll":
        T, converged, count, errors = _run(problem, T0, max_iterations, tolerance, scale, freeze=True)
    elif backward == "truncated":
        k = min(truncate_iterations, max_iterations)
        with torch.no_grad():
            T, converged, count, errors = _run(problem, T0, max_iterations - k, tolerance, scale, freeze=True)
        if max_iterations - k == 0:
            T = T0  # every iteration is kept: the gradient reaches init
        else:
            T = T.detach()
        T, conv2, count2, errors2 = _run(problem, T, k, tolerance, scale, freeze=False)
        converged, count = conv2, count + count2
        errors = torch.cat([errors, errors2], dim=1)
    else:
        with torch.no_grad():
            T, converged, count, errors = _run(problem, T0, max_iterations, tolerance, scale, freeze=True)
        if torch.is_grad_enabled():
            T, _ = _implicit(problem, T.detach())
    return T, converged, count, errors


def _warn_if_ambiguous(p: _Problem, T: Tensor, scale: Tensor) -> None:
    """Warn (once, naming the batch elements) where the data do not determine the transform.

    Procrustes: the sum of the two smallest signed singular values of the cross-covariance is
    (relatively) zero, e.g. collinear points. Gauss-Newton / LM: the normal equations, written
    about the centroid with the rotation columns scaled by the cloud's radius, are singular, e.g.
    point-to-plane on a single plane (it slides along the plane).
    """
    with torch.no_grad():
        if p.fused and bool((p.source_weights.sum(1) > 0).all()):
            cond = conditioning_point_to_point(p.index, p.source, T, p.source_weights, p.source_lengths)
            _warn_ambiguous(cond < 1e-6)
            return
        if p.fused_linear:
            cond = conditioning_gauss_newton(p.index, p.source, T, p.source_weights, p.source_lengths,
                                             p.target_normals, p.source_normals if p.metric == "symmetric" else None,
                                             scale)
            _warn_ambiguous(cond < 1e-9)
            return
        R, _ = split_transform(T)
        y = transform_points(T, p.source)
        match = _match(p, y)
        w = p.source_weights * match.valid.to(T.dtype)
        if p.solver == "procrustes":
            cond = procrustes_conditioning(p.source, match.points, weights=w)
        else:
            ny = rotate_vectors(R, p.source_normals) if p.source_normals is not None else None
            c = (y * w[..., None]).sum(1) / w.sum(1).clamp_min(torch.finfo(T.dtype).tiny)[:, None]
            A, _, _ = normal_equations(p.metric, y - c[:, None], match.points - c[:, None], w,
                                       target_normals=match.normals, source_normals=ny)
            d = torch.cat([1 / scale[:, None].expand(-1, 3), torch.ones_like(scale)[:, None].expand(-1, 3)], 1)
            ev = torch.linalg.eigvalsh(A * d[:, :, None] * d[:, None, :])
            cond = ev[:, 0] / ev[:, -1].clamp_min(torch.finfo(T.dtype).tiny)
        _warn_ambiguous(cond < (1e-6 if p.solver == "procrustes" else 1e-9))


def _warn_ambiguous(bad: Tensor) -> None:
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        warnings.warn(
            f"ICP: the transform is ambiguous for batch elements {idx}: the matched points do not "
            "determine it (collinear points, a single plane for point-to-plane, ...). The result is "
            "one of several equally good transforms and its gradient is regularised.",
            RuntimeWarning,
            stacklevel=4,
        )


def _check_projective(depth, intrinsics, camera_pose, normal_map, B: int, unbatched: bool):
    if not isinstance(depth, Tensor) or not depth.is_floating_point():
        raise TypeError("target must be a floating-point depth map (H, W) or (B, H, W) for correspondence='projective'.")
    if depth.dim() == 2:
        depth = depth[None]
    if depth.dim() != 3 or depth.shape[0] != B:
        raise ValueError(
            f"target must be a depth map of shape (H, W) or ({B}, H, W) for correspondence='projective'; "
            f"got {tuple(depth.shape)}."
        )
    if intrinsics is None:
        raise ValueError("intrinsics (3, 3) or (B, 3, 3) are required for correspondence='projective'.")
    if not isinstance(intrinsics, Tensor) or intrinsics.shape[-2:] != (3, 3):
        raise ValueError(f"intrinsics must have shape (3, 3) or (B, 3, 3); got {getattr(intrinsics, 'shape', intrinsics)}.")
    intrinsics = intrinsics.to(depth.dtype).expand(B, 3, 3)
    if camera_pose is None:
        camera_pose = torch.eye(4, dtype=depth.dtype, device=depth.device).expand(B, 4, 4)
    else:
        camera_pose = checks.check_transform("camera_pose", camera_pose, B)
    if normal_map is None:
        normal_map = normals_from_depth(depth, intrinsics, camera_pose)
    else:
        if normal_map.dim() == 3:
            normal_map = normal_map[None]
        if normal_map.shape != depth.shape + (3,):
            raise ValueError(
                f"target_normals must be a normal map of shape {tuple(depth.shape) + (3,)} for projective "
                f"association; got {tuple(normal_map.shape)}."
            )
    return depth, intrinsics, camera_pose, normal_map
