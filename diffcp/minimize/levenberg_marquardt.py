"""Bounded Levenberg-Marquardt on fixed correspondences, batched and differentiable."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..checks import check_option, check_positive, check_transform
from ..geometry import apply_twist, rotate_vectors, split_transform, transform_points
from .gauss_newton import normal_equations
from .linear_solve import damped_solve
from .residuals import METRICS, _check_cloud, _check_weights, residuals, weighted_cost

__all__ = ["LMResult", "levenberg_marquardt"]


class LMResult(NamedTuple):
    """Result of :func:`levenberg_marquardt`."""

    transform: Tensor  # (B, 4, 4) refined source -> target transform
    cost: Tensor  # (B,) weighted mean squared residual at ``transform``
    damping: Tensor  # (B,) Marquardt damping after the last iteration


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
    solves ``(A + lambda diag(A)) xi = -g`` (Marquardt scaling) with :func:`damped_solve`, and
    evaluates the weighted cost (:func:`weighted_cost`) at ``apply_twist(T, xi)``. Per batch
    element the candidate is accepted where the cost decreases (``torch.where``: no Python branch
    on tensor values, no host synchronisation), and ``lambda`` is divided by ``factor`` on accept,
    multiplied on reject. Differentiable w.r.t. every tensor input (the accept decisions are
    piecewise constant).

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
    ns = source_normals if metric == "symmetric" else None

    def pose(T):
        y = transform_points(T, source)
        ny = None if ns is None else rotate_vectors(split_transform(T)[0], ns)
        return y, ny

    T = transform
    lam = torch.full(source.shape[:1], float(initial_damping), dtype=source.dtype, device=source.device)
    y, ny = pose(T)
    cost = weighted_cost(residuals(metric, y, q, target_normals, ny), weights)
    for _ in range(iterations):
        A, g, _ = normal_equations(metric, y, q, weights, target_normals, ny)
        diag = torch.diagonal(A, dim1=-2, dim2=-1)
        xi = -damped_solve(A + torch.diag_embed(lam[:, None] * diag), g)
        T_new = apply_twist(T, xi)
        y_new, ny_new = pose(T_new)
        cost_new = weighted_cost(residuals(metric, y_new, q, target_normals, ny_new), weights)
        accept = cost_new < cost
        T = torch.where(accept[:, None, None], T_new, T)
        y = torch.where(accept[:, None, None], y_new, y)
        if ny is not None:
            ny = torch.where(accept[:, None, None], ny_new, ny)
        cost = torch.where(accept, cost_new, cost)
        lam = torch.where(accept, lam / factor, lam * factor)
    return LMResult(T, cost, lam)
