"""One Gauss-Newton step of weighted ICP, for any metric of :mod:`diffcp.minimize.residuals`."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .linear_solve import damped_solve
from .residuals import _check_weights, residuals_and_jacobian

__all__ = ["normal_equations", "gauss_newton_step", "twist_solve"]


def _block_scales(A: Tensor) -> Tensor:
    """``(B, 6)``: ``sqrt(m_trans / m_rot)`` for the rotation entries where the rotation block's mean
    diagonal ``m_rot`` exceeds the translation block's ``m_trans``, 1 elsewhere."""
    d = torch.diagonal(A, dim1=-2, dim2=-1)
    m_rot, m_trans = d[..., :3].mean(-1), d[..., 3:].mean(-1)
    big = (m_rot > m_trans) & (m_trans > 0)
    ratio = torch.where(big, m_trans / torch.where(big, m_rot, torch.ones_like(m_rot)), torch.ones_like(m_rot))
    s_rot = ratio.sqrt()  # 1 (not sqrt(0), whose gradient is infinite) where the block is not scaled
    return torch.cat([s_rot[..., None].expand(*s_rot.shape, 3), torch.ones_like(d[..., 3:])], -1)


def twist_solve(A: Tensor, b: Tensor, damping: float = 1e-9) -> Tensor:
    """Solve a twist system ``A x = b`` (``A (B, 6, 6)``, ``b (B, 6)``) by :func:`damped_solve`
    after scaling its rotation block down to the translation block's mean diagonal.

    ``x = S damped_solve(S A S, S b)`` with ``S = diag(sqrt(m_trans / m_rot) I_3, I_3)``, ``m_rot``
    and ``m_trans`` the mean diagonals of the rotation and translation blocks, where ``m_rot >
    m_trans`` (else ``S = I``, and the solve is :func:`damped_solve`'s, bit for bit). A rotation
    entry of ``A`` is a squared length times a translation entry: for large clouds, or far from the frame's origin (the target's centroid,
    e.g. at the start of a registration 100 radii away), the rotation block exceeds the translation
    block by 1e7 and more, and a damping relative to the whole trace (raised to ``64 eps`` when the
    unscaled pivots look singular, which in float32 they then do) shrank the translation step
    50-fold: float32 ICP crawled where float64 converged, and its unrolled gradient grew without
    bound. A rotation block smaller than the translation block is left as it is: it is small for a
    cloud of (almost) no extent too, whose rotation is rounding noise and stays damped relative to
    the translation block (scaling it up would make its step, and gradient, arbitrary). The block
    means are invariant under rotations of the frame (see
    :func:`diffcp.minimize.levenberg_marquardt.block_damping`), so the step stays rigid-equivariant.
    """
    s = _block_scales(A)
    return damped_solve(A * s[..., :, None] * s[..., None, :], b * s, damping) * s


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

    ``xi = -(J^T W J + lambda D)^{-1} J^T W r`` solved by :func:`twist_solve` (relative damping
    ``damping`` of the blocks' mean diagonals ``D``); apply it with ``geometry.apply_twist(T, xi)`` (left twist: ``y -> exp(omega) y +
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
    return -twist_solve(A, g, damping)
