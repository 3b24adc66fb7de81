"""Residuals of the three ICP metrics and their analytic Jacobians w.r.t. a left twist.

Notation (conventions of :mod:`diffcp.geometry`): ``y = R s + t`` is a source point mapped by
the current pose, ``q`` its matched target point, ``n_q`` the target normal and ``n_y = R n_s``
the source normal *rotated by the current pose*. A twist ``xi = (omega, v)`` moves ``y`` to
``exp(omega) y + v`` and ``n_y`` to ``exp(omega) n_y`` (:func:`diffcp.geometry.apply_twist`).
With ``d = y - q``:

========================  ===============================  ====================================
metric                    residual ``r``                   Jacobian row(s) ``dr/dxi`` at xi = 0
========================  ===============================  ====================================
``"point_to_point"``      ``d`` (k = 3)                    ``[-hat(y), I]``
``"point_to_plane"``      ``d . n_q`` (Chen & Medioni)     ``[y x n_q, n_q]``
``"symmetric"``           ``d . (n_y + n_q)``              ``[y x n + n_y x d, n]``, n = n_y + n_q
                          (``n_q`` flipped to face ``n_y``)
========================  ===============================  ====================================

The symmetric metric is the objective of Rusinkiewicz (2019), "A symmetric objective function
for ICP", with the source normal rotated together with the source point (the original DiffICP
used the unrotated source normal, which is wrong as soon as the pose has a rotation); the
``n_y x d`` term of its Jacobian is the derivative of that rotation.

Relation to Open3D 0.20 (``TransformationEstimationSymmetric``; behaviour checked against the
installed 0.20.0 wheel in ``tests/test_gauss_newton_lm.py``): its ``compute_rmse`` is
``sqrt(mean(r^2))`` with this same residual ``r = d . (n_y + n_q)`` (the source cloud it is given
carries normals already rotated by the pose). Open3D flips ``n_y`` where ``n_y . n_q < 0``; we
flip ``n_q`` there (:func:`oriented_target_normals`), which changes only the sign of ``r`` and of
its Jacobian row, so the squared residual and every step are the same: normals need no
consistent orientation between the clouds. Its ``compute_transformation`` is Rusinkiewicz's
*closed-form linearisation*, not a Gauss-Newton step: it centres both clouds on their means,
solves the linear least squares with rows ``[(s_c + q_c) x n, n]`` and residuals
``(s_c - q_c) . n`` (``n`` held fixed) for a *half* rotation ``tan(theta) * axis``, and composes
the full transform from it. Both methods have the same fixed point for exact correspondences and
normals (the true pose, which Open3D reaches in one step and our Gauss-Newton quadratically);
with noisy data their fixed points need not coincide, because our step is the exact Gauss-Newton step
of ``sum w r^2`` on the left-twist manifold (including the rotation of ``n_y``). (An intermediate
Open3D source revision instead summed ``(d . n_q)^2 + (d . n_y)^2``.)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..checks import check_option
from ..geometry import hat

__all__ = ["METRICS", "residuals", "residuals_and_jacobian", "weighted_cost"]

METRICS = ("point_to_point", "point_to_plane", "symmetric")


def _check_cloud(name: str, x, like: Optional[Tensor] = None, like_name: str = "") -> Tensor:
    """Shape/dtype checks only (no device synchronisation): ``x`` must be ``(B, N, 3)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, N, 3); got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype (float32 or float64); got {x.dtype}.")
    if like is None:
        if x.dim() != 3 or x.shape[-1] != 3:
            raise ValueError(f"{name} must have shape (B, N, 3); got {tuple(x.shape)}.")
    else:
        if x.shape != like.shape:
            raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}; got {tuple(x.shape)}.")
        if x.dtype != like.dtype:
            raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}); got {x.dtype}.")
    return x


def _check_weights(weights, y: Tensor) -> Tensor:
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights must be a torch.Tensor of shape (B, N); got {type(weights).__name__}.")
    if not weights.is_floating_point():
        raise TypeError(f"weights must have a floating-point dtype; got {weights.dtype}.")
    if weights.shape != y.shape[:-1]:
        raise ValueError(f"weights must have shape (B, N) = {tuple(y.shape[:-1])}; got {tuple(weights.shape)}.")
    return weights


def _validate(metric, y, q, target_normals, source_normals) -> None:
    check_option("metric", metric, METRICS)
    _check_cloud("y", y)
    _check_cloud("q", q, y, "y")
    if metric in ("point_to_plane", "symmetric"):
        if target_normals is None:
            raise ValueError(f"target_normals are required for metric {metric!r}; got None.")
        _check_cloud("target_normals", target_normals, y, "y")
    if metric == "symmetric":
        if source_normals is None:
            raise ValueError(
                "source_normals (rotated by the current pose) are required for metric 'symmetric'; got None."
            )
        _check_cloud("source_normals", source_normals, y, "y")


def oriented_target_normals(ny: Tensor, nq: Tensor) -> Tensor:
    """``nq`` flipped where it faces away from ``ny``, so that ``ny + nq`` never cancels: the
    symmetric objective needs consistently oriented normal pairs, and estimated normals have no
    inherent sign (Open3D orients the pair the same way). The flip carries no gradient."""
    facing = ((ny * nq).sum(-1, keepdim=True) >= 0).to(nq.dtype)
    return nq * (2 * facing - 1)


def _residuals(metric: str, y: Tensor, q: Tensor, nq: Optional[Tensor], ny: Optional[Tensor]) -> Tensor:
    d = y - q
    if metric == "point_to_point":
        return d
    n = nq if metric == "point_to_plane" else ny + oriented_target_normals(ny, nq)
    return (d * n).sum(-1, keepdim=True)


def residuals(
    metric: str,
    y: Tensor,
    q: Tensor,
    target_normals: Optional[Tensor] = None,
    source_normals: Optional[Tensor] = None,
) -> Tensor:
    """Per-correspondence residuals of an ICP metric (see the module docstring).

    Args:
        metric: ``"point_to_point"``, ``"point_to_plane"`` or ``"symmetric"``.
        y: ``(B, N, 3)`` source points already mapped by the current pose, ``y = R s + t``.
        q: ``(B, N, 3)`` matched target points.
        target_normals: ``(B, N, 3)`` unit target normals ``n_q``; needed by the plane metrics.
        source_normals: ``(B, N, 3)`` source normals *rotated by the current pose*, ``n_y = R n_s``;
            needed by ``"symmetric"``.

    Returns:
        ``(B, N, k)`` with ``k = 3`` for ``"point_to_point"`` and ``k = 1`` otherwise.

    Example:
        >>> y = torch.tensor([[[1.0, 2.0, 3.0]]]); q = torch.zeros(1, 1, 3)
        >>> n = torch.tensor([[[0.0, 0.0, 1.0]]])
        >>> residuals("point_to_plane", y, q, target_normals=n)
        tensor([[[3.]]])
    """
    _validate(metric, y, q, target_normals, source_normals)
    return _residuals(metric, y, q, target_normals, source_normals)


def residuals_and_jacobian(
    metric: str,
    y: Tensor,
    q: Tensor,
    target_normals: Optional[Tensor] = None,
    source_normals: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Residuals and their analytic Jacobian w.r.t. the left twist ``xi = (omega, v)`` at ``xi = 0``.

    The twist moves ``y -> exp(omega) y + v`` and ``n_y -> exp(omega) n_y`` (target points and
    normals are fixed), as :func:`diffcp.geometry.apply_twist` does to the pose.

    Args:
        metric: ``"point_to_point"``, ``"point_to_plane"`` or ``"symmetric"``.
        y: ``(B, N, 3)`` transformed source points ``R s + t``.
        q: ``(B, N, 3)`` matched target points.
        target_normals: ``(B, N, 3)`` target normals (plane metrics).
        source_normals: ``(B, N, 3)`` rotated source normals ``R n_s`` (``"symmetric"``).

    Returns:
        ``(r (B, N, k), J (B, N, k, 6))``; ``k = 3`` for point-to-point, else 1.

    Example:
        >>> y = torch.tensor([[[1.0, 0.0, 0.0]]]); n = torch.tensor([[[0.0, 1.0, 0.0]]])
        >>> r, J = residuals_and_jacobian("point_to_plane", y, torch.zeros(1, 1, 3), n)
        >>> J[0, 0, 0].tolist()  # [y x n, n]
        [0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    """
    _validate(metric, y, q, target_normals, source_normals)
    r = _residuals(metric, y, q, target_normals, source_normals)
    if metric == "point_to_point":
        eye = torch.eye(3, dtype=y.dtype, device=y.device).expand(y.shape[:-1] + (3, 3))
        J = torch.cat([-hat(y), eye], dim=-1)
    elif metric == "point_to_plane":
        n = target_normals
        J = torch.cat([torch.cross(y, n, dim=-1), n], dim=-1)[..., None, :]
    else:
        n = source_normals + oriented_target_normals(source_normals, target_normals)
        rot = torch.cross(y, n, dim=-1) + torch.cross(source_normals, y - q, dim=-1)
        J = torch.cat([rot, n], dim=-1)[..., None, :]
    return r, J


def weighted_cost(r: Tensor, weights: Tensor) -> Tensor:
    """Weighted mean squared residual ``sum_i w_i |r_i|^2 / max(sum_i w_i, sqrt(tiny))`` per cloud.

    The floor is ``sqrt(finfo.tiny)`` rather than ``tiny`` so that the gradient w.r.t. the
    weights of a cloud whose weights are all 0 stays finite (``|r_i|^2 / floor``).

    Args:
        r: ``(B, N, k)`` residuals.
        weights: ``(B, N)`` non-negative weights, 0 for padding.

    Returns:
        ``(B,)``; 0 for a cloud whose weights are all 0.

    Example:
        >>> weighted_cost(torch.tensor([[[1.0], [3.0]]]), torch.tensor([[1.0, 0.0]]))
        tensor([1.])
    """
    if not isinstance(r, Tensor) or r.dim() != 3:
        raise ValueError(f"r must be a tensor of shape (B, N, k); got {getattr(r, 'shape', type(r).__name__)}.")
    if not isinstance(weights, Tensor) or weights.shape != r.shape[:2]:
        got = getattr(weights, "shape", type(weights).__name__)
        raise ValueError(f"weights must be a tensor of shape (B, N) = {tuple(r.shape[:2])}; got {got}.")
    total = (weights * (r * r).sum(-1)).sum(-1)
    return total / weights.sum(-1).clamp_min(torch.finfo(r.dtype).tiny ** 0.5)
