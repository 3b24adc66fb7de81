"""Bounded Levenberg-Marquardt on fixed correspondences, batched and differentiable."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..checks import check_option, check_positive, check_transform
from ..geometry import apply_twist, rotate_vectors, split_transform, transform_points
from .gauss_newton import normal_equations, twist_solve
from .residuals import METRICS, _check_cloud, _check_weights, residuals, weighted_cost

__all__ = ["LMResult", "levenberg_marquardt", "block_damping", "not_worse", "decision_cost",
           "TrustRegion"]


def block_damping(A: Tensor) -> Tensor:
    """The damping matrix ``D`` of Levenberg-Marquardt, ``(B, 6, 6)`` from ``A = J^T W J`` ``(B, 6, 6)``.

    ``D = diag(m_rot I_3, m_trans I_3)``, with ``m_rot`` and ``m_trans`` the means of the diagonal
    of ``A``'s rotation block and of its translation block. Why not Marquardt's ``diag(A)``: a
    rotation ``Q`` of the frame maps ``A`` to ``P A P^T`` (``P = diag(Q, Q)``: both halves of a
    twist rotate with the frame), which changes ``diag(A)`` but neither block's trace, so ``D``
    commutes with ``P`` and the damped step rotates with the frame (ICP stays rigid-equivariant).
    ``diag(A)`` also vanishes along an axis the data do not constrain (a plane metric sliding along
    the plane), leaving the step there undamped; ``D`` damps every direction by the block's mean
    curvature. The two blocks keep separate scales because their units differ (a rotation entry
    is a squared length times a translation entry), so ``D`` follows a change of length unit too.
    """
    d = torch.diagonal(A, dim1=-2, dim2=-1)
    m = torch.stack([d[..., :3].mean(-1), d[..., 3:].mean(-1)], -1).repeat_interleave(3, dim=-1)
    return torch.diag_embed(m)


def not_worse(cost: Tensor, cost_new: Tensor, eps: Optional[float] = None) -> Tensor:
    """``(B,)`` bool: where ``cost_new`` is not above ``cost`` by more than ``8 eps cost`` (a tie
    counts as no increase).

    :func:`levenberg_marquardt` passes costs evaluated in float64 from the points of each pose
    (:func:`decision_cost`) and ``eps`` of the points' dtype. A rule that accepts only a decrease
    (``cost_new < cost``) decides steps near convergence, whose gain is below the cost's rounding,
    on that rounding: in float32 a batch and a loop over its clouds (whose sums and 6x6 solves
    round differently) took different steps, and the sensitive loop made 1e-3 of it. Near
    convergence the Gauss-Newton step changes the cost by less than the points' dtype resolves, so
    it is accepted whatever the rounding says, and the two runs take the same steps; a step that
    increases the cost by more than ``8 eps cost`` is rejected (the damping grows). (The steps a
    tie lets through cannot slide far: the :class:`TrustRegion` of the correspondences bounds them.)

    Args:
        cost, cost_new: ``(B,)`` weighted mean squared residuals before and after the step.
        eps: the rounding unit the tie is measured in; None takes the costs' dtype's.
    """
    eps = torch.finfo(cost.dtype).eps if eps is None else float(eps)
    with torch.no_grad():
        return cost_new <= cost + 8 * eps * cost.abs()


def decision_cost(metric: str, y: Tensor, q: Tensor, weights: Tensor, target_normals: Optional[Tensor],
                  source_normals: Optional[Tensor]) -> Tensor:
    """``(B,)`` float64 weighted cost of the points ``y (B, N, 3)`` (any dtype) against their matches,
    for the accept test of :func:`levenberg_marquardt` (no gradient): see :func:`not_worse`."""
    with torch.no_grad():
        f64 = [None if x is None else x.detach().double() for x in (y, q, target_normals, source_normals)]
        return weighted_cost(residuals(metric, f64[0], f64[1], f64[2], f64[3]), weights.detach().double())


class TrustRegion:
    """Where fixed correspondences still mean something: the poses that move the source points, in
    weighted RMS, by at most twice their RMS distance to their matches at the start.

    The matches ``q`` were found for the points ``y0``; a pose farther away is judged against
    correspondences that no longer apply. The point-to-point minimiser always lies inside
    (``rms(y* - y0) <= rms(y* - q) + rms(q - y0) <= 2 rms(q - y0)``), but the plane metrics only
    ask each point to reach a plane, which a large rotation can satisfy far away: without the
    region, Levenberg-Marquardt (which, unlike one Gauss-Newton step, follows the cost to its end)
    slid soft-NN point-to-plane ICP 38 radii away on a sparse cloud (``initial_damping=0.1``).
    Distances are invariant under rigid motions, so the region keeps LM rigid-equivariant.

    Args:
        y0: ``(B, N, 3)`` the source points at the start; q: ``(B, N, 3)`` their matches.
        weights: ``(B, N)`` the weights of the cost (0 for padding).
    """

    def __init__(self, y0: Tensor, q: Tensor, weights: Tensor):
        with torch.no_grad():
            self.y0, self.w = y0.detach(), weights.detach().clamp_min(0)
            self.radius2 = 4 * self._mean_sq(self.y0 - q.detach())

    def _mean_sq(self, d: Tensor) -> Tensor:
        sq = torch.where(self.w > 0, (d * d).sum(-1), torch.zeros_like(self.w))
        return (self.w * sq).sum(-1) / self.w.sum(-1).clamp_min(torch.finfo(d.dtype).tiny ** 0.5)

    def contains(self, y: Tensor) -> Tensor:
        """``(B,)`` bool: whether the points ``y (B, N, 3)`` lie within the region."""
        with torch.no_grad():
            return self._mean_sq(y.detach() - self.y0) <= self.radius2


class LMResult(NamedTuple):
    """Result of :func:`levenberg_marquardt`."""

    transform: Tensor  # (B, 4, 4) refined source -> target transform
    cost: Tensor  # (B,) weighted mean squared residual at ``transform``
    damping: Tensor  # (B,) the damping lambda after the last iteration


def _check_arguments(metric, transform, source, q, weights, source_normals, iterations, initial_damping,
                     factor) -> Tensor:
    """Validate the arguments of :func:`levenberg_marquardt`; return ``transform`` batched."""
    check_option("metric", metric, METRICS)
    _check_cloud("source", source)
    _check_cloud("q", q, source, "source")
    _check_weights(weights, source)
    transform = check_transform("transform", transform, source.shape[0])
    if transform.dtype != source.dtype:
        raise TypeError(f"transform must have the dtype of source ({source.dtype}); got {transform.dtype}.")
    if metric == "symmetric" and source_normals is None:
        raise ValueError("source_normals are required for metric 'symmetric'; got None.")
    if source_normals is not None:
        _check_cloud("source_normals", source_normals, source, "source")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer; got {iterations!r}.")
    check_positive("initial_damping", initial_damping)
    check_positive("factor", factor)
    if float(factor) <= 1.0:
        raise ValueError(f"factor must be greater than 1; got {factor!r}.")
    return transform


def levenberg_marquardt(
    metric: str,
    transform: Tensor,
    source: Tensor,
    q: Tensor,
    weights: Tensor,
    source_normals: Optional[Tensor] = None,
    target_normals: Optional[Tensor] = None,
    iterations: int = 5,
    initial_damping: float = 1e-3,
    factor: float = 10.0,
) -> LMResult:
    """Refine ``transform`` by ``iterations`` Levenberg-Marquardt steps with fixed correspondences.

    Each step builds the Gauss-Newton system ``A = J^T W J``, ``g = J^T W r`` at the current pose,
    solves ``(A + lambda D) xi = -g`` with :func:`~diffcp.minimize.gauss_newton.twist_solve`, ``D`` the rotation-invariant
    block damping of :func:`block_damping`, and evaluates the weighted cost
    (:func:`weighted_cost`) at ``apply_twist(T, xi)``. Per batch element the candidate is accepted
    where the cost does not increase beyond its rounding (:func:`not_worse`) and the points
    stay within the :class:`TrustRegion` of the correspondences (``torch.where``: no Python branch
    on tensor values, no host synchronisation), and ``lambda`` is
    divided by ``factor`` on accept, multiplied on reject. Differentiable w.r.t. every tensor input
    (the accept decisions are piecewise constant).

    Rigid motions of the inputs (with ``transform`` moved along) move the result along: ``D`` and
    the accept test are invariant under rotations of the frame, the cost under rigid motions.

    Convention: ``y = R s + t`` maps source to target; twists act on the left.

    Args:
        metric: ``"point_to_point"``, ``"point_to_plane"`` or ``"symmetric"``.
        transform: ``(B, 4, 4)`` (or ``(4, 4)``) initial source -> target transform.
        source: ``(B, N, 3)`` source points in the source frame.
        q: ``(B, N, 3)`` matched target points.
        weights: ``(B, N)`` non-negative weights, 0 for padding.
        source_normals: ``(B, N, 3)`` source normals in the source frame (unrotated; needed by
            ``"symmetric"``).
        target_normals: ``(B, N, 3)`` target normals (plane metrics).
        iterations: number of LM iterations (>= 0).
        initial_damping: initial ``lambda`` (> 0).
        factor: damping update factor (> 1).

    Returns:
        :class:`LMResult` ``(transform (B, 4, 4), cost (B,), damping (B,))``.

    Example:
        >>> from diffcp.geometry import random_transform, transform_points
        >>> s = torch.randn(1, 20, 3, dtype=torch.float64)
        >>> T = random_transform(1, 0.3, dtype=torch.float64)
        >>> out = levenberg_marquardt("point_to_point", torch.eye(4, dtype=torch.float64)[None], s,
        ...                           transform_points(T, s), torch.ones(1, 20, dtype=torch.float64),
        ...                           iterations=10)
        >>> torch.allclose(out.transform, T, atol=1e-8)
        True
    """
    transform = _check_arguments(metric, transform, source, q, weights, source_normals, iterations,
                                 initial_damping, factor)
    ns = source_normals if metric == "symmetric" else None

    def pose(T):
        y = transform_points(T, source)
        ny = None if ns is None else rotate_vectors(split_transform(T)[0], ns)
        return y, ny

    T = transform
    lam = torch.full(source.shape[:1], float(initial_damping), dtype=source.dtype, device=source.device)
    y, ny = pose(T)
    cost = weighted_cost(residuals(metric, y, q, target_normals, ny), weights)
    decided = decision_cost(metric, y, q, weights, target_normals, ny)
    eps = torch.finfo(source.dtype).eps
    region = TrustRegion(y, q, weights)
    for _ in range(iterations):
        A, g, _ = normal_equations(metric, y, q, weights, target_normals, ny)
        xi = -twist_solve(A + lam[:, None, None] * block_damping(A), g)
        T_new = apply_twist(T, xi)
        y_new, ny_new = pose(T_new)
        cost_new = weighted_cost(residuals(metric, y_new, q, target_normals, ny_new), weights)
        decided_new = decision_cost(metric, y_new, q, weights, target_normals, ny_new)
        accept = not_worse(decided, decided_new, eps) & region.contains(y_new)
        decided = torch.where(accept, decided_new, decided)
        T = torch.where(accept[:, None, None], T_new, T)
        y = torch.where(accept[:, None, None], y_new, y)
        if ny is not None:
            ny = torch.where(accept[:, None, None], ny_new, ny)
        cost = torch.where(accept, cost_new, cost)
        lam = torch.where(accept, lam / factor, lam * factor)
    return LMResult(T, cost, lam)
