"""The ICP loop: the five steps composed, per-cloud convergence, and three backward modes.

Convention (as everywhere in diffcp): column vectors, ``y = R x + t`` maps the **source** into the
**target**; clouds are ``(B, N, 3)`` with optional per-cloud lengths; transforms ``(B, 4, 4)``.

The pipeline reads top to bottom: :class:`~diffcp.settings.ICPSettings` (which ICP) ->
:func:`~diffcp.problem.build_problem` (validated, batched tensors) -> :func:`_run` (the loop) ->
:func:`_solve` (the backward mode). One iteration, :func:`_step`, for every cloud at once:

1. *select* source points (all, a random subset, or a mask) - :mod:`diffcp.select`;
2. *match* each transformed source point ``y = R x + t`` to the target (hard nearest neighbour,
   soft nearest neighbour with temperature ``T``, or projective association into a depth map) -
   :mod:`diffcp.correspond`;
3. *weight* the pairs (linear in distance or normal agreement, robust kernels) - :mod:`diffcp.weight`;
4. *reject* pairs (hard or sigmoid-soft, on distance and normal angle) - :mod:`diffcp.reject`;
5. *minimise* the error metric (point-to-point, point-to-plane, symmetric) by Procrustes, one
   Gauss-Newton step, or a bounded Levenberg-Marquardt run - :mod:`diffcp.minimize`.

Backward modes (how gradients reach ``source``, ``target``, normals, temperatures and ``init``):

- ``"unroll"``: autograd through every iteration (exact gradient of the computed result);
- ``"truncated"``: the first iterations run without a graph, the last ``iterations`` with one;
  gradients w.r.t. ``init`` vanish unless every iteration is kept;
- ``"implicit"``: run to the fixed point ``T* = F(T*, theta)`` without a graph, then
  differentiate the fixed point by the implicit function theorem,
  ``dT*/dtheta = (I - dF/dT)^{-1} dF/dtheta``, with one 6x6 solve per cloud.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import checks
from .correspond import (
    Correspondences,
    nearest_correspondences,
    projective_correspondences,
    soft_correspondences,
)
from .fused import conditioning_gauss_newton, point_to_point_diagnostics, run_gauss_newton, run_point_to_point
from .geometry import apply_twist, make_transform, rotate_vectors, split_transform, transform_points, twist_between
from .minimize.gauss_newton import gauss_newton_step, normal_equations
from .minimize.levenberg_marquardt import levenberg_marquardt
from .minimize.procrustes import procrustes, procrustes_conditioning, procrustes_from_moments, umeyama
from .minimize.residuals import residuals, weighted_cost
from .problem import Problem, build_problem
from .reject import reject_by_distance, reject_by_normal_angle
from .settings import (
    DistanceRejection,
    DistanceWeights,
    GaussNewtonSolver,
    ICPSettings,
    ImplicitBackward,
    LevenbergMarquardtSolver,
    NearestNeighbor,
    NormalWeights,
    ProcrustesSolver,
    RobustKernel,
    SoftNearestNeighbor,
    TruncatedBackward,
)
from .weight import distance_weights, normal_weights, robust_weights, safe_sqrt

__all__ = ["icp", "ICPResult"]


class ICPResult(NamedTuple):
    """What :func:`icp` returns (unbatched input gives unbatched fields).

    Attributes:
        transform: ``(B, 4, 4)`` mapping source into target, ``y = R x + t``.
        rotation: ``(B, 3, 3)``.
        translation: ``(B, 3)``.
        converged: ``(B,)`` bool, True where the last update fell below the tolerance.
        iterations: ``(B,)`` int64, iterations each cloud ran before it converged (or stopped).
        errors: ``(B, K)`` weighted RMS residual at the correspondences of each of the K
            iterations run (a cloud that converged repeats its last value).
        final_error: ``(B,)`` the weighted RMS residual of the last iteration.
        fitness: ``(B,)`` at the returned transform, the share of the selected source points that
            are matched and not rejected (soft rejections count by their weight); with a hard
            :class:`~diffcp.DistanceRejection` this is Open3D's ``fitness``. No gradient.
        inlier_rmse: ``(B,)`` at the returned transform, the RMS Euclidean distance from those
            points to their matches (Open3D's ``inlier_rmse``). No gradient.
        scale: ``(B,)`` the scale ``s`` of a similarity ``transform = [s R | t]`` estimated by
            ``ProcrustesSolver(scale=True)``; 1 otherwise (``rotation`` is always a rotation).
    """

    transform: Tensor
    rotation: Tensor
    translation: Tensor
    converged: Tensor
    iterations: Tensor
    errors: Tensor
    final_error: Tensor
    fitness: Tensor
    inlier_rmse: Tensor
    scale: Tensor


# ----------------------------------------------------------------------------- one iteration
def _match(p: Problem, y: Tensor) -> Correspondences:
    """Step 2: correspondences of the moved source points ``y``."""
    corr = p.settings.correspondence
    if isinstance(corr, NearestNeighbor):
        return nearest_correspondences(y, p.target, p.target_normals, source_lengths=p.source_lengths,
                                       target_lengths=p.target_lengths, index=p.index)
    if isinstance(corr, SoftNearestNeighbor):
        return soft_correspondences(y, p.target, p.temperature, p.target_normals, source_lengths=p.source_lengths,
                                    target_lengths=p.target_lengths, backend=corr.backend)
    return projective_correspondences(y, p.target, p.intrinsics, p.camera_pose, normal_map=p.target_normals,
                                      mode=corr.mode, source_lengths=p.source_lengths)


def _pair_weights(p: Problem, match: Correspondences, ny: Optional[Tensor], dtype) -> Tensor:
    """Steps 1, 3 and 4 before the residuals: selection, linear weights and rejections, ``(B, N)``."""
    w = p.source_weights * match.valid.to(dtype)
    for opt in p.settings.weighting:
        if isinstance(opt, DistanceWeights):
            w = w * distance_weights(match.sq_distances, opt.max_distance)
        elif isinstance(opt, NormalWeights):
            w = w * normal_weights(ny, match.normals)
    for opt, t in zip(p.settings.rejection, p.rejection_temperatures):
        if isinstance(opt, DistanceRejection):
            w = w * reject_by_distance(match.sq_distances, opt.max_distance, t)
        else:
            w = w * reject_by_normal_angle(ny, match.normals, opt.max_angle, t)
    return w


def _minimise(p: Problem, T: Tensor, y: Tensor, ny: Optional[Tensor], match: Correspondences, w: Tensor) -> Tensor:
    """Step 5: the new transform from the weighted pairs."""
    solver = p.settings.solver
    if isinstance(solver, ProcrustesSolver) and solver.scale:
        sol = umeyama(p.source, match.points, weights=w)
        return make_transform(sol.scale[:, None, None] * sol.rotation, sol.translation)
    if isinstance(solver, ProcrustesSolver):
        sol = procrustes(p.source, match.points, weights=w)
        return make_transform(sol.rotation, sol.translation)
    if isinstance(solver, GaussNewtonSolver):
        xi = gauss_newton_step(p.settings.metric, y, match.points, w, target_normals=match.normals,
                               source_normals=ny, damping=solver.damping)
        return apply_twist(T, xi)
    return levenberg_marquardt(p.settings.metric, T, p.source, match.points, w, source_normals=p.source_normals,
                               target_normals=match.normals, iterations=solver.iterations,
                               initial_damping=solver.initial_damping, factor=solver.factor).transform


def _fused_step(p: Problem, T: Tensor):
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


def _scaled(p: Problem) -> bool:
    """Whether the transforms are similarities ``[s R | t]`` (``ProcrustesSolver(scale=True)``)."""
    return isinstance(p.settings.solver, ProcrustesSolver) and p.settings.solver.scale


def _rotation_and_scale(p: Problem, T: Tensor):
    """``(R (B, 3, 3), s (B,))`` of ``T = [s R | t]``; ``s = 1`` (and ``R`` as it is) for rigid ICP."""
    A = T[:, :3, :3]
    if not _scaled(p):
        return A, torch.ones(T.shape[0], dtype=T.dtype, device=T.device)
    s = A[:, :, 0].norm(dim=-1)  # a column of s R has length s > 0
    return A / s[:, None, None], s


def _rigid(p: Problem, T: Tensor) -> Tensor:
    """``T = [s R | t]`` without its scale, ``[R | t]`` (``T`` itself for rigid ICP)."""
    if not _scaled(p):
        return T
    R, _ = _rotation_and_scale(p, T)
    return make_transform(R, T[:, :3, 3])


def _step(p: Problem, T: Tensor):
    """One ICP iteration from the current transform ``T``: returns ``(T_new, error (B,))``."""
    if p.fused and not p.needs_graph(T):
        out = _fused_step(p, T)
        if out is not None:
            return out
    R, _ = _rotation_and_scale(p, T)
    y = transform_points(T, p.source)
    ny = rotate_vectors(R, p.source_normals) if p.source_normals is not None else None
    match = _match(p, y)
    w = _pair_weights(p, match, ny, y.dtype)
    r = residuals(p.settings.metric, y, match.points, target_normals=match.normals, source_normals=ny)
    for opt in p.settings.weighting:
        if isinstance(opt, RobustKernel):
            w = w * robust_weights(r, opt.kernel, opt.scale)
    error = safe_sqrt(weighted_cost(r, w))  # gradient 0, not NaN, at an exact fit
    return _minimise(p, T, y, ny, match, w), error


# ----------------------------------------------------------------------------- the loop
def _run_compiled(p: Problem, T: Tensor, iterations: int, tolerance: float):
    """The compiled CPU loop (:mod:`diffcp.fused`) where it applies, else None."""
    if not (p.fused or p.fused_linear) or p.needs_graph(T):
        return None
    rel = p.settings.stopping.relative_rmse
    if p.fused:
        return run_point_to_point(p.index, p.source, p.source_weights, p.source_lengths, T, iterations,
                                  tolerance, p.scale, rel)
    symmetric = p.source_normals if p.settings.metric == "symmetric" else None
    return run_gauss_newton(p.index, p.source, p.source_weights, p.source_lengths, p.target_normals, symmetric, T,
                            iterations, tolerance, p.scale, p.settings.solver.damping, rel)


def _run(p: Problem, T: Tensor, iterations: int, tolerance: float, freeze: bool):
    """Iterate up to ``iterations`` times with per-cloud convergence: ``(T, converged, count, errors)``.

    Clouds whose update falls below the tolerance are frozen (they stop changing) when ``freeze`` is
    set; the loop stops once all have converged (one host sync per iteration).
    """
    out = _run_compiled(p, T, iterations, tolerance) if freeze else None
    if out is not None:
        return out
    B = T.shape[0]
    converged = torch.zeros(B, dtype=torch.bool, device=T.device)
    count = torch.zeros(B, dtype=torch.int64, device=T.device)
    errors = []
    for _ in range(iterations):
        T_new, err = _step(p, T)
        with torch.no_grad():
            xi = twist_between(_rigid(p, T_new), _rigid(p, T))
            small = (xi[:, :3].norm(dim=-1) <= tolerance) & (xi[:, 3:].norm(dim=-1) <= tolerance * p.scale)
            if _scaled(p):  # and the scale changes by at most the tolerance (relative)
                small = small & ((_rotation_and_scale(p, T_new)[1] / _rotation_and_scale(p, T)[1]).log().abs() <= tolerance)
            if errors and p.settings.stopping.relative_rmse > 0:
                prev = errors[-1].detach()
                small = small | ((prev - err.detach()).abs() <= p.settings.stopping.relative_rmse * prev)
        if freeze:
            T = torch.where(converged[:, None, None], T, T_new)
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
        # A is first divided by its largest entry c (J can reach 1e20 on a degenerate float32 cloud,
        # whose square A^T A would overflow): u = (A_c^T A_c + lam I)^-1 A_c^T g / c, A_c = A / c.
        # The damping is relative to the trace and never below the dtype's rounding (64 eps), or
        # float32 would round it away next to an exactly rank-deficient matrix (a planar shape); it
        # is floored at sqrt(tiny), not at a multiple of tiny, which is subnormal (its reciprocal
        # overflows: NaN where I - J = 0, e.g. when every soft match is the same blurred point).
        tiny = torch.finfo(J.dtype).tiny
        c = A.abs().amax((-2, -1)).clamp_min(tiny)[:, None, None]
        A = A / c
        AtA = A.transpose(-1, -2) @ A
        rel = max(1e-12, 64 * torch.finfo(J.dtype).eps)
        lam = rel * AtA.diagonal(dim1=-2, dim2=-1).sum(-1) + tiny ** 0.5
        rhs = A.transpose(-1, -2) @ g[..., None]
        u = torch.linalg.solve(AtA + lam[:, None, None] * eye, rhs)[..., 0] / c[..., 0]
        return u, None



def _implicit(p: Problem, T_star: Tensor):
    """Differentiable fixed point at ``T_star`` by the implicit function theorem.

    Levenberg-Marquardt's accept/reject makes its map locally the identity at a minimum (every
    step is rejected), so its fixed point is differentiated through the Gauss-Newton map, which
    has the same fixed points.
    """
    if isinstance(p.settings.solver, LevenbergMarquardtSolver):
        p = dataclasses.replace(p, settings=dataclasses.replace(p.settings, solver=GaussNewtonSolver()))
    xi0 = torch.zeros(T_star.shape[0], 6, dtype=T_star.dtype, device=T_star.device, requires_grad=True)
    T1, err = _step(p, apply_twist(T_star, xi0))
    z = twist_between(T1, T_star)  # ~0 at the fixed point; a function of xi0 and the inputs
    if not z.requires_grad:
        # The step reads nothing that needs a gradient: only init does (hard correspondences, say),
        # and the fixed point does not depend on init. Its gradient is zero: no graph to build.
        return T_star, err
    rows = []
    for k in range(6):
        (g,) = torch.autograd.grad(z[:, k].sum(), xi0, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(xi0) if g is None else g)
    J = torch.stack(rows, dim=1).detach()  # (B, 6, 6): dz/dxi0
    z = _ImplicitGradient.apply(z, J)
    return apply_twist(T_star, z), err


def _solve(p: Problem):
    """Run the loop in the settings' backward mode: ``(T, converged, count, errors)``."""
    stop, backward, T0 = p.settings.stopping, p.settings.backward, p.init
    if isinstance(backward, TruncatedBackward):
        k = min(backward.iterations, stop.max_iterations)
        with torch.no_grad():
            T, converged, count, errors = _run(p, T0, stop.max_iterations - k, stop.tolerance, freeze=True)
        T = T0 if stop.max_iterations == k else T.detach()  # every iteration kept: the gradient reaches init
        T, converged, count2, errors2 = _run(p, T, k, stop.tolerance, freeze=False)
        return T, converged, count + count2, torch.cat([errors, errors2], dim=1)
    if isinstance(backward, ImplicitBackward):
        with torch.no_grad():
            T, converged, count, errors = _run(p, T0, stop.max_iterations, stop.tolerance, freeze=True)
        if p.needs_graph(T):
            T, _ = _implicit(p, T.detach())
        return T, converged, count, errors
    return _run(p, T0, stop.max_iterations, stop.tolerance, freeze=True)


# ----------------------------------------------------------------------------- the entry point
_MOVED = {
    "temperature": "correspondence=diffcp.SoftNearestNeighbor(temperature=...)",
    "soft_backend": "correspondence=diffcp.SoftNearestNeighbor(backend=...)",
    "search_backend": "correspondence=diffcp.NearestNeighbor(backend=...)",
    "intrinsics": "correspondence=diffcp.ProjectiveAssociation(intrinsics, camera_pose, mode)",
    "camera_pose": "correspondence=diffcp.ProjectiveAssociation(intrinsics, camera_pose, mode)",
    "projective_mode": "correspondence=diffcp.ProjectiveAssociation(intrinsics, camera_pose, mode)",
    "max_iterations": "stopping=diffcp.Stopping(max_iterations=..., tolerance=...)",
    "tolerance": "stopping=diffcp.Stopping(max_iterations=..., tolerance=...)",
    "truncate_iterations": "backward=diffcp.TruncatedBackward(iterations=...)",
    "lm_iterations": "solver=diffcp.LevenbergMarquardtSolver(iterations=...)",
    "damping": "solver=diffcp.GaussNewtonSolver(damping=...)",
    "num_samples": "selection=diffcp.RandomSelection(num_samples, seed)",
    "generator": "selection=diffcp.RandomSelection(num_samples, seed)",
    "distance_weighting": "weighting=[diffcp.DistanceWeights(max_distance)]",
    "normal_weighting": "weighting=[diffcp.NormalWeights()]",
    "robust_kernel": "weighting=[diffcp.RobustKernel(kernel, scale)]",
    "robust_scale": "weighting=[diffcp.RobustKernel(kernel, scale)]",
    "reject_distance": "rejection=[diffcp.DistanceRejection(max_distance, temperature)]",
    "reject_angle": "rejection=[diffcp.NormalAngleRejection(max_angle, temperature)]",
    "rejection_temperature": "the temperature of each rejection option, e.g. diffcp.DistanceRejection(0.1, temperature=...)",
}
_OPTIONS = tuple(f.name for f in dataclasses.fields(ICPSettings))


def resolve_settings(settings: Optional[ICPSettings], options: dict, where: str = "icp") -> ICPSettings:
    """``settings``, or the settings the keyword options describe (not both)."""
    for name in options:
        if name in _MOVED:
            raise TypeError(f"{where}() takes no argument {name!r}; it belongs to an option: {_MOVED[name]}.")
        if name not in _OPTIONS:
            raise TypeError(f"{where}() got an unexpected argument {name!r}; the options are {', '.join(_OPTIONS)}.")
    if settings is None:
        settings = ICPSettings(**options)
    elif not isinstance(settings, ICPSettings):
        raise TypeError(f"settings must be a diffcp.ICPSettings; got {type(settings).__name__}.")
    elif options:
        raise TypeError(f"{where}() takes either settings or option keywords ({', '.join(options)}), not both.")
    return settings


def icp(source: Tensor, target: Tensor, settings: Optional[ICPSettings] = None, *, init: Optional[Tensor] = None,
        source_normals: Optional[Tensor] = None, target_normals: Optional[Tensor] = None,
        source_lengths: Optional[Tensor] = None, target_lengths: Optional[Tensor] = None,
        source_mask: Optional[Tensor] = None, **options) -> ICPResult:
    """Register ``source`` to ``target`` by Iterative Closest Point, batched and differentiable.

    Convention: column vectors, the result maps the source into the target, ``y = R x + t``.

    Args:
        source: ``(N, 3)`` or ``(B, N, 3)`` float32/float64 points.
        target: ``(M, 3)`` or ``(B, M, 3)`` points; with :class:`~diffcp.ProjectiveAssociation` a
            depth map ``(H, W)`` or ``(B, H, W)`` seen by the option's pinhole camera.
        settings: an :class:`~diffcp.ICPSettings`, or None to build one from ``options``.
        init: initial transform ``(4, 4)`` or ``(B, 4, 4)``; identity if None. Differentiable.
        source_normals: like ``source``; needed by the symmetric metric and by normal weights or
            normal-angle rejection.
        target_normals: like ``target``; needed by point-to-plane, symmetric, normal weights and
            normal-angle rejection. For projective association: an optional ``(B, H, W, 3)`` normal
            map in world coordinates (estimated from the depth if None).
        source_lengths, target_lengths: ``(B,)`` number of valid points in padded clouds.
        source_mask: ``(B, N)`` bool, the source points to use (step 1).
        **options: the fields of :class:`~diffcp.ICPSettings` (``correspondence``, ``metric``,
            ``solver``, ``weighting``, ``rejection``, ``selection``, ``stopping``, ``backward``),
            each an option object or its shorthand string. A temperature may be a tensor (0-d or
            ``(B,)``, one per cloud) that keeps its gradient.

    Returns:
        :class:`ICPResult`.

    Raises:
        ValueError, TypeError: on bad input, naming the argument.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2, 200, 3, generator=g, dtype=torch.float64)
        >>> T = diffcp.random_transform(2, max_angle=0.3, max_translation=0.1, generator=g, dtype=torch.float64)
        >>> y = diffcp.transform_points(T, x)
        >>> out = icp(x, y)
        >>> bool(torch.allclose(out.transform, T, atol=1e-6)), out.converged.tolist()
        (True, [True, True])
        >>> soft = icp(x, y, correspondence=diffcp.SoftNearestNeighbor(temperature=1e-4),
        ...            stopping=diffcp.Stopping(max_iterations=50))
        >>> bool(diffcp.rotation_error(soft.rotation, T[:, :3, :3]).max() < 0.1)
        True
    """
    settings = resolve_settings(settings, options)
    problem, unbatched = build_problem(settings, source, target, init=init, source_normals=source_normals,
                                       target_normals=target_normals, source_lengths=source_lengths,
                                       target_lengths=target_lengths, source_mask=source_mask)
    checks_enabled = checks.ENABLED
    with checks.disabled():
        T, converged, count, errors = _solve(problem)
    with checks.disabled():
        fitness, inlier_rmse = _diagnose(problem, T.detach(), warn=checks_enabled)
    T = problem.to_caller_frames(T)
    (R, scale), t = _rotation_and_scale(problem, T), T[:, :3, 3]
    out = ICPResult(T, R, t, converged, count, errors, errors[:, -1], fitness, inlier_rmse, scale)
    return ICPResult(*(f[0] for f in out)) if unbatched else out


# ----------------------------------------------------------------------------- diagnostics
def _diagnose(p: Problem, T: Tensor, warn: bool):
    """``(fitness, inlier_rmse)`` at ``T``, and the ambiguity warning when ``warn``: one fused pass
    gives all three for plain hard-NN point-to-point ICP."""
    with torch.no_grad():
        if p.fused and bool((p.source_weights.sum(1) > 0).all()):
            cond, w_sum, r2_sum = point_to_point_diagnostics(p.index, p.source, T, p.source_weights,
                                                             p.source_lengths)
            if warn:
                _warn_ambiguous(cond < 1e-6)
            tiny = torch.finfo(torch.float64).tiny
            fitness = (w_sum / p.source_weights.sum(1).double().clamp_min(tiny)).to(T)
            return fitness, (r2_sum.clamp_min(0) / w_sum.clamp_min(tiny)).sqrt().to(T)
        if warn:
            _warn_if_ambiguous(p, T)
        return _evaluate(p, T)


def _evaluate(p: Problem, T: Tensor):
    """``(fitness (B,), inlier_rmse (B,))`` of the matches at ``T`` (see :class:`ICPResult`)."""
    with torch.no_grad():
        R, _ = _rotation_and_scale(p, T)
        y = transform_points(T, p.source)
        ny = rotate_vectors(R, p.source_normals) if p.source_normals is not None else None
        match = _match(p, y)
        w = p.source_weights * match.valid.to(T.dtype)
        for opt, t in zip(p.settings.rejection, p.rejection_temperatures):
            w = w * (reject_by_distance(match.sq_distances, opt.max_distance, t) if isinstance(opt, DistanceRejection)
                     else reject_by_normal_angle(ny, match.normals, opt.max_angle, t))
        tiny = torch.finfo(T.dtype).tiny
        fitness = w.sum(1) / p.source_weights.sum(1).clamp_min(tiny)
        d2 = torch.where(w > 0, match.sq_distances.clamp_min(0), torch.zeros_like(w))
        inlier_rmse = ((w * d2).sum(1) / w.sum(1).clamp_min(tiny)).sqrt()
        return fitness, inlier_rmse


def _warn_if_ambiguous(p: Problem, T: Tensor) -> None:
    """Warn (once, naming the clouds) where the data do not determine the transform.

    Procrustes: the sum of the two smallest signed singular values of the cross-covariance is
    (relatively) zero, e.g. collinear points. Gauss-Newton / LM: the normal equations, written
    about the centroid with the rotation columns scaled by the cloud's radius, are singular, e.g.
    point-to-plane on a single plane (it slides along the plane).
    """
    with torch.no_grad():
        procrustes_solver = isinstance(p.settings.solver, ProcrustesSolver)
        if p.fused_linear:
            symmetric = p.source_normals if p.settings.metric == "symmetric" else None
            cond = conditioning_gauss_newton(p.index, p.source, T, p.source_weights, p.source_lengths,
                                             p.target_normals, symmetric, p.scale)
        else:
            cond = _conditioning(p, T)
        _warn_ambiguous(cond < (1e-6 if procrustes_solver else 1e-9), stacklevel=5)


def _conditioning(p: Problem, T: Tensor) -> Tensor:
    """``(B,)`` relative conditioning of the last step's problem, computed by the general path."""
    R, _ = split_transform(T)
    y = transform_points(T, p.source)
    match = _match(p, y)
    w = p.source_weights * match.valid.to(T.dtype)
    if isinstance(p.settings.solver, ProcrustesSolver):
        return procrustes_conditioning(p.source, match.points, weights=w)
    ny = rotate_vectors(R, p.source_normals) if p.source_normals is not None else None
    c = (y * w[..., None]).sum(1) / w.sum(1).clamp_min(torch.finfo(T.dtype).tiny)[:, None]
    A, _, _ = normal_equations(p.settings.metric, y - c[:, None], match.points - c[:, None], w,
                               target_normals=match.normals, source_normals=ny)
    scale = p.scale.clamp_min(torch.finfo(T.dtype).tiny ** 0.25)  # a cloud of one repeated point: any scale
    d = torch.cat([1 / scale[:, None].expand(-1, 3), torch.ones_like(scale)[:, None].expand(-1, 3)], 1)
    ev = torch.linalg.eigvalsh(A * d[:, :, None] * d[:, None, :])
    return ev[:, 0] / ev[:, -1].clamp_min(torch.finfo(T.dtype).tiny)


def _warn_ambiguous(bad: Tensor, stacklevel: int = 4) -> None:
    """Warn where ``bad`` ``(B,)``; ``stacklevel`` points at the caller of :func:`icp`."""
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        warnings.warn(
            f"ICP: the transform is ambiguous for batch elements {idx}: the matched points do not "
            "determine it (collinear points, a single plane for point-to-plane, ...). The result is "
            "one of several equally good transforms and its gradient is regularised.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
