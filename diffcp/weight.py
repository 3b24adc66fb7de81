"""Step 3 of ICP: per-correspondence weights in ``[0, 1]``.

Each function maps per-point quantities of a padded batch ``(B, N)`` (``B`` clouds of ``N``
points; any shape works, the output has the shape of the per-point input) to weights for the
weighted least-squares step. All of them are differentiable in their inputs and parameters, never
give a NaN gradient, and take an optional ``valid`` ``(B, N)`` bool mask (e.g.
``Correspondences.valid``): entries where it is False (padding, unmatched points) get weight 0 and
zero gradient, whatever their input values, even NaN or Inf.

Linear weights follow Rusinkiewicz & Levoy (2001), *Efficient variants of the ICP algorithm*;
robust kernels are IRLS weights ``w(r) = rho'(r) / r`` of an M-estimator ``rho``.
"""

from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from . import checks

__all__ = ["distance_weights", "normal_weights", "robust_weights", "KERNELS"]

KERNELS = ("huber", "tukey", "cauchy", "geman_mcclure")

Scalar = Union[float, Tensor]


def _check_values(name: str, values) -> Tensor:
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(values).__name__}.")
    if not values.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype (float32 or float64); got {values.dtype}.")
    return values


def _check_param(name: str, value: Scalar, shape: torch.Size, allow_zero: bool = False) -> Scalar:
    """A positive (or non-negative) finite number, or a tensor of them broadcastable to ``shape``."""
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a number or a floating-point tensor; got {value.dtype}.")
        try:
            ok = torch.broadcast_shapes(value.shape, shape) == shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a number or broadcastable to {tuple(shape)}; got shape {tuple(value.shape)}.")
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or a tensor; got {type(value).__name__}.")
    checks.check_positive(name, value, allow_zero=allow_zero)
    return value if isinstance(value, Tensor) else float(value)


def _check_valid(valid: Optional[Tensor], shape: torch.Size) -> Optional[Tensor]:
    if valid is None:
        return None
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
        what = valid.dtype if isinstance(valid, Tensor) else type(valid).__name__
        raise TypeError(f"valid must be a bool torch.Tensor of shape {tuple(shape)}; got {what}.")
    if valid.shape != shape:
        raise ValueError(f"valid must have shape {tuple(shape)}, one flag per point; got {tuple(valid.shape)}.")
    return valid


def _clean(values: Tensor, valid: Optional[Tensor], fill: float = 0.0) -> Tensor:
    """Replace masked-out entries by ``fill`` before any arithmetic, so they cannot make NaNs."""
    if valid is None:
        return values
    mask = valid if values.dim() == valid.dim() else valid[..., None]
    return torch.where(mask, values, torch.full_like(values, fill))


def _apply_valid(weights: Tensor, valid: Optional[Tensor]) -> Tensor:
    return weights if valid is None else torch.where(valid, weights, torch.zeros_like(weights))


def finite_distances(sq_distances: Tensor, valid: Optional[Tensor]) -> Optional[Tensor]:
    """``valid`` narrowed to the pairs whose squared distance is finite: a NaN or infinite distance
    (no match) never gets weight. (A slightly negative one, from rounding, counts as 0.)"""
    ok = torch.isfinite(sq_distances)
    return ok if valid is None else ok & valid


def usable_normals(source_normals: Tensor, target_normals: Tensor, valid: Optional[Tensor]) -> Optional[Tensor]:
    """``valid`` narrowed to the pairs whose normals are both finite and of length near 1 (a zero
    or NaN normal has no direction, so no angle or agreement can be measured for it)."""
    def unit(n):
        length2 = (torch.where(torch.isfinite(n), n, torch.zeros_like(n)) ** 2).sum(-1)
        return torch.isfinite(n).all(-1) & (length2 > 0.25)
    ok = unit(source_normals) & unit(target_normals)
    return ok if valid is None else ok & valid


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(max(x, 0))`` with gradient 0 (instead of Inf/NaN) where ``x <= 0``."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def _check_normal_pair(source_normals, target_normals) -> None:
    _check_values("source_normals", source_normals)
    _check_values("target_normals", target_normals)
    if source_normals.dim() < 1 or source_normals.shape[-1] != 3:
        raise ValueError(f"source_normals must have shape (B, N, 3); got {tuple(source_normals.shape)}.")
    if target_normals.shape != source_normals.shape:
        raise ValueError(
            f"target_normals must have the shape of source_normals {tuple(source_normals.shape)}; "
            f"got {tuple(target_normals.shape)}."
        )
    checks.check_same_device(source_normals=source_normals, target_normals=target_normals)


def distance_weights(
    sq_distances: Tensor, max_distance: Scalar, *, valid: Optional[Tensor] = None
) -> Tensor:
    """Weights falling linearly with the correspondence distance: ``w = clamp(1 - d / max_distance, 0, 1)``.

    ``d = sqrt(sq_distances)``; slightly negative squared distances (rounding in matrix-product
    searches) count as 0, and the gradient at ``d = 0`` is taken as 0 instead of the infinite
    one-sided derivative of the square root, so it is never NaN.

    Args:
        sq_distances: ``(B, N)`` squared source-to-match distances (``Correspondences.sq_distances``).
        max_distance: positive number, or a tensor broadcastable to ``(B, N)`` (e.g. ``(B, 1)``
            per cloud); the distance at which the weight reaches 0. Differentiable.
        valid: optional ``(B, N)`` bool; False entries get weight 0, and so do pairs with a NaN
            or infinite value (see :func:`finite_distances`, :func:`usable_normals`).

    Returns:
        ``(B, N)`` weights in ``[0, 1]``, dtype and device of ``sq_distances``.

    Example:
        >>> distance_weights(torch.tensor([[0.0, 0.25, 4.0]]), 1.0)
        tensor([[1.0000, 0.5000, 0.0000]])
    """
    sq_distances = _check_values("sq_distances", sq_distances)
    max_distance = _check_param("max_distance", max_distance, sq_distances.shape)
    valid = finite_distances(sq_distances, _check_valid(valid, sq_distances.shape))
    d = safe_sqrt(_clean(sq_distances, valid))
    return _apply_valid((1 - d / max_distance).clamp(0.0, 1.0), valid)


def normal_weights(
    source_normals: Tensor, target_normals: Tensor, *, valid: Optional[Tensor] = None
) -> Tensor:
    """Weights rising linearly with normal agreement: ``w = clamp(n_s . n_t, 0, 1)``.

    Pass unit normals (the source normals rotated by the current estimate, ``R n``); then the
    weight is the cosine of the angle between them, and opposite-facing normals get 0.

    Args:
        source_normals: ``(B, N, 3)``.
        target_normals: ``(B, N, 3)``, the normal of each source point's match.
        valid: optional ``(B, N)`` bool; False entries get weight 0, and so do pairs with a NaN
            or infinite value (see :func:`finite_distances`, :func:`usable_normals`).

    Returns:
        ``(B, N)`` weights in ``[0, 1]``.

    Example:
        >>> n = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])
        >>> normal_weights(n, torch.tensor([[[0.0, 0.6, 0.8], [0.0, 0.0, -1.0]]]))
        tensor([[0.8000, 0.0000]])
    """
    _check_normal_pair(source_normals, target_normals)
    valid = usable_normals(source_normals, target_normals, _check_valid(valid, source_normals.shape[:-1]))
    dot = (_clean(source_normals, valid) * _clean(target_normals, valid)).sum(-1)
    return _apply_valid(dot.clamp(0.0, 1.0), valid)


def robust_weights(
    residuals: Tensor, kernel: str = "huber", scale: Scalar = 1.0, *, valid: Optional[Tensor] = None
) -> Tensor:
    """IRLS weights ``w(r) = rho'(r) / r`` of a robust kernel ``rho`` with scale ``s``.

    Minimising ``sum rho(r_i)`` by iteratively reweighted least squares solves
    ``min sum w_i r_i^2 / 2`` with ``w_i = rho'(r_i) / r_i`` frozen at the current residuals.
    With ``u = r / s`` the kernels are (each ``rho`` behaves like ``r^2 / 2`` near 0, so ``w(0) = 1``
    and ``w`` is in ``[0, 1]``):

    - ``"huber"``: ``rho = r^2/2`` if ``|r| <= s`` else ``s (|r| - s/2)``;
      ``w = min(1, s / |r|)``.
    - ``"tukey"`` (biweight): ``rho = s^2/6 (1 - (1 - u^2)^3)`` if ``|r| <= s`` else ``s^2/6``;
      ``w = (1 - u^2)^2`` if ``|r| <= s`` else 0.
    - ``"cauchy"``: ``rho = s^2/2 log(1 + u^2)``; ``w = 1 / (1 + u^2)``.
    - ``"geman_mcclure"``: ``rho = (s^2/2) u^2 / (1 + u^2)``; ``w = 1 / (1 + u^2)^2``.

    Relation to Open3D (``open3d.pipelines.registration``, parameter ``k``): ``HuberLoss(k)``,
    ``TukeyLoss(k)`` and ``CauchyLoss(k)`` give the same weights with ``k = s``. (Open3D documents
    Tukey's ``rho`` as ``k^2/2 (...)``, three times ours, but its ``weight`` is ours.)
    ``GMLoss(k)`` uses ``rho = (r^2/2) / (k + r^2)`` and ``w = k / (k + r^2)^2``: ``k`` plays the
    role of ``s^2`` and its weight is ours divided by ``s^2``, i.e.
    ``robust_weights(r, "geman_mcclure", s) == s**2 * GMLoss(s**2).weight(r)`` (a constant factor,
    which does not change a weighted least-squares solution).

    Args:
        residuals: ``(B, N)`` scalar residuals (e.g. point-to-plane) or ``(B, N, k)`` vector
            residuals (e.g. point-to-point, ``k = 3``), whose Euclidean norm over the last
            dimension is the ``r`` above. Only ``r^2`` is used, so there is no square root at 0.
        kernel: ``"huber"``, ``"tukey"``, ``"cauchy"`` or ``"geman_mcclure"``.
        scale: positive number, or a tensor broadcastable to ``(B, N)``; differentiable.
        valid: optional ``(B, N)`` bool; False entries get weight 0, and so do residuals with
            a NaN or infinite entry.

    Returns:
        ``(B, N)`` weights in ``[0, 1]``.

    Example:
        >>> robust_weights(torch.tensor([[0.5, 2.0]]), "huber", 1.0)
        tensor([[1.0000, 0.5000]])
        >>> robust_weights(torch.tensor([[[0.0, 3.0, 4.0]]]), "cauchy", 5.0)
        tensor([[0.5000]])
    """
    residuals = _check_values("residuals", residuals)
    checks.check_option("kernel", kernel, KERNELS)
    if residuals.dim() not in (2, 3):
        raise ValueError(f"residuals must have shape (B, N) or (B, N, k); got {tuple(residuals.shape)}.")
    shape = residuals.shape[:2]
    scale = _check_param("scale", scale, shape)
    finite = torch.isfinite(residuals) if residuals.dim() == 2 else torch.isfinite(residuals).all(-1)
    valid = finite if valid is None else finite & _check_valid(valid, shape)
    r = _clean(residuals, valid)
    r2 = r * r if r.dim() == 2 else (r * r).sum(-1)
    u2 = r2 / (scale * scale)
    if kernel == "huber":
        # s / max(|r|, s): the square root only ever sees values >= s^2 > 0
        w = scale / torch.maximum(r2, torch.ones_like(r2) * (scale * scale)).sqrt()
    elif kernel == "tukey":
        w = (1 - u2).clamp_min(0.0) ** 2
    elif kernel == "cauchy":
        w = 1 / (1 + u2)
    else:
        c = 1 / (1 + u2)  # squared afterwards, not (1 + u2) ** 2: that gives 0 * inf if r^2 overflows
        w = c * c
    return _apply_valid(w, valid)
