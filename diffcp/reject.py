"""Step 4 of ICP: reject bad correspondences, hard (a 0/1 mask) or soft (a sigmoid).

Both functions return ``(B, N)`` weights in ``[0, 1]`` with the dtype of their input, to be
multiplied into the weights of step 3. ``temperature == 0`` gives the classical hard test; its
output is piecewise constant in the inputs, so its gradient is 0 almost everywhere and undefined on
the threshold: it is *not* differentiable, and gradients flow only through the points it keeps.
``temperature > 0`` replaces the step by a sigmoid of width ``temperature``, differentiable in the
inputs, the threshold and the temperature:

- ``temperature -> 0`` recovers the hard mask (except exactly on the threshold, where it is 1/2);
- ``temperature -> inf`` gives the constant 1/2 for every point. A constant weight ``c > 0``
  rejects nothing: weighted least squares minimises ``sum_i c w_i r_i^2``, whose minimiser is
  that of ``sum_i w_i r_i^2`` (the factor ``c`` scales the normal equations ``c A x = c b`` and
  cancels, as it does in the weighted centroids and covariance of Procrustes).

An optional ``valid`` ``(B, N)`` bool mask (e.g. ``Correspondences.valid``) sets padding and
unmatched points to 0, with zero gradient and no NaN whatever their input values.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .weight import (
    Scalar,
    _apply_valid,
    _check_normal_pair,
    _check_param,
    _check_valid,
    _check_values,
    _clean,
    finite_distances,
    safe_sqrt,
    usable_normals,
)

__all__ = ["reject_by_distance", "reject_by_normal_angle"]


def _check_temperature(temperature: Scalar, shape: torch.Size) -> Scalar:
    temperature = _check_param("temperature", temperature, shape, allow_zero=True)
    if isinstance(temperature, Tensor) and bool((temperature == 0).any()) and not bool((temperature == 0).all()):
        raise ValueError("temperature must be either 0 everywhere (hard rejection) or positive everywhere (soft).")
    return temperature


def _is_hard(temperature: Scalar) -> bool:
    return bool((temperature == 0).all()) if isinstance(temperature, Tensor) else temperature == 0.0


def reject_by_distance(
    sq_distances: Tensor,
    max_distance: Scalar,
    temperature: Scalar = 0.0,
    *,
    valid: Optional[Tensor] = None,
) -> Tensor:
    """Keep correspondences closer than ``max_distance``.

    With ``d = sqrt(sq_distances)``:

    - ``temperature == 0``: hard mask ``w = 1 if d <= max_distance else 0`` (not differentiable).
    - ``temperature > 0``: ``w = sigmoid((max_distance - d) / temperature)``, with the gradient of
      ``d`` at 0 taken as 0 (never NaN).

    Args:
        sq_distances: ``(B, N)`` squared source-to-match distances; slightly negative values
            (rounding) count as 0.
        max_distance: positive number or tensor broadcastable to ``(B, N)``, in distance units.
        temperature: non-negative number or tensor broadcastable to ``(B, N)`` (all zero or all
            positive), in distance units.
        valid: optional ``(B, N)`` bool; False entries get 0, and so do pairs with a NaN or
            infinite distance, or a zero or NaN normal.

    Returns:
        ``(B, N)`` weights in ``[0, 1]``, dtype of ``sq_distances``.

    Example:
        >>> reject_by_distance(torch.tensor([[0.25, 4.0]]), 1.0)
        tensor([[1., 0.]])
        >>> reject_by_distance(torch.tensor([[1.0]]), 1.0, temperature=0.1)
        tensor([[0.5000]])
    """
    sq_distances = _check_values("sq_distances", sq_distances)
    max_distance = _check_param("max_distance", max_distance, sq_distances.shape)
    temperature = _check_temperature(temperature, sq_distances.shape)
    valid = finite_distances(sq_distances, _check_valid(valid, sq_distances.shape))
    d = safe_sqrt(_clean(sq_distances, valid))
    if _is_hard(temperature):
        w = (d <= max_distance).to(sq_distances.dtype)
    else:
        w = torch.sigmoid((max_distance - d) / temperature)
    return _apply_valid(w, valid)


def reject_by_normal_angle(
    source_normals: Tensor,
    target_normals: Tensor,
    max_angle_deg: Scalar,
    temperature: Scalar = 0.0,
    *,
    valid: Optional[Tensor] = None,
) -> Tensor:
    """Keep correspondences whose normals differ by at most ``max_angle_deg`` degrees.

    With ``c = n_s . n_t`` (the cosine of the angle between unit normals):

    - ``temperature == 0``: hard mask ``w = 1 if c >= cos(max_angle) else 0`` (not differentiable).
    - ``temperature > 0``: ``w = sigmoid((c - cos(max_angle)) / temperature)``; the temperature is in
      cosine units (dimensionless).

    Args:
        source_normals: ``(B, N, 3)`` unit normals (rotated by the current estimate).
        target_normals: ``(B, N, 3)`` unit normals of the matches.
        max_angle_deg: angle in degrees in ``(0, 180]`` (a number, or a tensor broadcastable to
            ``(B, N)``); 180 keeps everything in the hard test, even ``c`` rounded below -1.
        temperature: non-negative number or tensor broadcastable to ``(B, N)`` (all zero or all
            positive).
        valid: optional ``(B, N)`` bool; False entries get 0, and so do pairs with a NaN or
            infinite distance, or a zero or NaN normal.

    Returns:
        ``(B, N)`` weights in ``[0, 1]``.

    Example:
        >>> n = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])
        >>> reject_by_normal_angle(n, torch.tensor([[[0.0, 0.6, 0.8], [0.0, 1.0, 0.0]]]), 45.0)
        tensor([[1., 0.]])
    """
    _check_normal_pair(source_normals, target_normals)
    shape = source_normals.shape[:-1]
    max_angle_deg = _check_param("max_angle_deg", max_angle_deg, shape)
    too_big = bool((max_angle_deg > 180).any()) if isinstance(max_angle_deg, Tensor) else max_angle_deg > 180
    if too_big:
        raise ValueError(f"max_angle_deg must lie in (0, 180] degrees; got {max_angle_deg!r}.")
    temperature = _check_temperature(temperature, shape)
    valid = usable_normals(source_normals, target_normals, _check_valid(valid, shape))
    if isinstance(max_angle_deg, Tensor):
        cos_max = torch.cos(torch.deg2rad(max_angle_deg))
    else:
        cos_max = math.cos(math.radians(max_angle_deg))
    c = (_clean(source_normals, valid) * _clean(target_normals, valid)).sum(-1)
    if _is_hard(temperature):
        w = ((c >= cos_max) | (max_angle_deg >= 180)).to(source_normals.dtype)  # 180: exact, no rounding
    else:
        w = torch.sigmoid((c - cos_max) / temperature)
    return _apply_valid(w, valid)
