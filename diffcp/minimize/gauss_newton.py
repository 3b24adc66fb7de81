"""One Gauss-Newton step of weighted ICP, for any metric of :mod:`diffcp.minimize.residuals`."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .linear_solve import damped_solve
from .residuals import _check_weights, residuals_and_jacobian

__all__ = ["normal_equations", "gauss_newton_step"]


def normal_equations(
    metric: str,
    y: Tensor,
    q: Tensor,
    weights: Tensor,
    target_normals: Optional[Tensor] = None,
    source_normals: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Batched normal equations ``J^T W J`` and ``J^T W r`` of the linearised weighted cost.

    Args:
        metric: ``"point_to_point"``, ``"point_to_plane"`` or ``"symmetric"``.
        y: ``(B, N, 3)`` transformed source points ``R s + t``.
        q: ``(B, N, 3)`` matched target points.
        weights: ``(B, N)`` non-negative weights (0 for padding; padded points must be finite).
        target_normals: ``(B, N, 3)`` target normals (plane metrics).
        source_normals: ``(B, N, 3)`` source normals rotated by the current pose (``"symmetric"``).

    Returns:
        ``(JtWJ (B, 6, 6), JtWr (B, 6), r (B, N, k))``, ``r`` the residuals at the current pose.
    """
    r, J = residuals_and_jacobian(metric, y, q, target_normals, source_normals)
    _check_weights(weights, y)
    B = y.shape[0]
    Jf = J.reshape(B, -1, 6)  # (B, N k, 6): every residual row of a cloud
    JtW = (J * weights[..., None, None]).reshape(B, -1, 6).transpose(-1, -2)
    A = JtW @ Jf
    g = (JtW @ r.reshape(B, -1, 1))[..., 0]
    return A, g, r


def gauss_newton_step(
    metric: str,
    y: Tensor,
    q: Tensor,
    weights: Tensor,
    target_normals: Optional[Tensor] = None,
    source_normals: Optional[Tensor] = None,
    damping: float = 1e-9,
) -> Tensor:
    """The twist minimising the linearised cost ``sum_i w_i |r_i + J_i xi|^2``.

    ``xi = -(J^T W J + lambda I)^{-1} J^T W r`` solved by :func:`damped_solve` (relative damping
    ``damping``); apply it with ``geometry.apply_twist(T, xi)`` (left twist: ``y -> exp(omega) y +
    v``). Differentiable w.r.t. every tensor argument.

    Args:
        metric: ``"point_to_point"``, ``"point_to_plane"`` or ``"symmetric"``.
        y: ``(B, N, 3)`` source points mapped by the current pose, ``y = R s + t``.
        q: ``(B, N, 3)`` matched target points.
        weights: ``(B, N)`` non-negative weights, 0 for padding.
        target_normals: ``(B, N, 3)`` target normals (plane metrics).
        source_normals: ``(B, N, 3)`` source normals rotated by the current pose (``"symmetric"``).
        damping: relative damping of the linear solve.

    Returns:
        ``(B, 6)`` twists ``(omega, v)``.

    Example:
        >>> y = torch.randn(1, 10, 3, dtype=torch.float64)
        >>> xi = gauss_newton_step("point_to_point", y, y + 0.5, torch.ones(1, 10, dtype=torch.float64))
        >>> torch.allclose(xi, torch.tensor([[0.0, 0, 0, 0.5, 0.5, 0.5]], dtype=torch.float64))
        True
    """
    A, g, _ = normal_equations(metric, y, q, weights, target_normals, source_normals)
    return -damped_solve(A, g, damping)
