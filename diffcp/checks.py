"""Input validation shared by the public entry points.

Every check raises ``ValueError`` (wrong value or shape) or ``TypeError`` (wrong type or dtype)
with a full sentence that names the argument and says what was expected. Checks that need a value
from the device (NaN, lengths in range) synchronise with it; set ``diffcp.checks.ENABLED = False``
to skip those in a hot loop once inputs are known to be good.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor

ENABLED = True

__all__ = [
    "ENABLED",
    "disabled",
    "as_batched_points",
    "check_lengths",
    "check_option",
    "check_positive",
    "check_same_device",
    "check_transform",
    "check_normals",
    "check_float_dtype",
    "check_rigid",
    "lengths_mask",
]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Skip the value checks (NaN/Inf, length ranges) inside the block.

    :func:`diffcp.icp` validates its inputs once and then runs the step functions under this
    context, so the loop never synchronises with the device to re-check what it already checked.
    """
    global ENABLED
    previous, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = previous


def check_option(name: str, value: str, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {choices}; got {value!r}.")
    return value


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, Tensor):
        bad = (value < 0).any() if allow_zero else (value <= 0).any()
        bad = bool(bad) or not bool(torch.isfinite(value).all())
    else:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number; got {type(value).__name__}.") from None
        bad = not (v >= 0 if allow_zero else v > 0) or v != v or v in (float("inf"), float("-inf"))
    if bad:
        need = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {need} number; got {value!r}.")


FLOAT_DTYPES = (torch.float32, torch.float64)


def check_float_dtype(name: str, tensor: Tensor) -> None:
    """Raise ``TypeError`` unless ``tensor`` is float32 or float64 (half precision cannot hold the
    sums of squares ICP forms, and torch has no CPU SVD for it)."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating-point dtype (float32 or float64); got {tensor.dtype}.")


def as_batched_points(name: str, points, min_points: int = 1, check_finite: bool = True) -> Tuple[Tensor, bool]:
    """Validate a cloud and return it as ``(B, N, 3)`` plus whether the input was unbatched.

    Raises:
        TypeError: not a floating-point tensor.
        ValueError: wrong shape, empty, fewer than ``min_points`` points, or NaN/Inf values.
    """
    if not isinstance(points, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, 3) or (B, N, 3); got {type(points).__name__}.")
    check_float_dtype(name, points)
    if points.dim() not in (2, 3) or points.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (N, 3) or (B, N, 3); got {tuple(points.shape)}.")
    unbatched = points.dim() == 2
    if unbatched:
        points = points[None]
    if points.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one cloud; got batch size 0.")
    if points.shape[1] < min_points:
        raise ValueError(f"{name} must hold at least {min_points} points per cloud; got {points.shape[1]}.")
    if check_finite and ENABLED and not bool(torch.isfinite(points).all()):
        raise ValueError(f"{name} contains NaN or Inf values.")
    return points, unbatched


def check_lengths(name: str, lengths: Optional[Tensor], batch: int, size: int, device, min_points: int = 1) -> Tensor:
    """Validate per-cloud lengths and return them as int64 ``(B,)`` on ``device``.

    ``None`` means every cloud uses all ``size`` points.
    """
    if lengths is None:
        return torch.full((batch,), size, dtype=torch.int64, device=device)
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor; got {lengths.dtype}.")
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), one length per cloud; got {tuple(lengths.shape)}.")
    if lengths.device != torch.device(device) and not (lengths.device.type == torch.device(device).type):
        raise ValueError(f"{name} is on {lengths.device} but the points are on {device}.")
    lengths = lengths.to(device=device, dtype=torch.int64)
    if ENABLED and bool(((lengths < min_points) | (lengths > size)).any()):
        raise ValueError(
            f"{name} must lie in [{min_points}, {size}] (at least {min_points} points, at most the padded size); "
            f"got {lengths.tolist()}."
        )
    return lengths


def lengths_mask(lengths: Tensor, size: int) -> Tensor:
    """``(B, size)`` bool mask, True for the first ``lengths[b]`` entries of row ``b``."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def check_same_device(**tensors) -> None:
    """Raise ``ValueError`` if the given (non-None) tensors live on different devices."""
    items = [(k, v) for k, v in tensors.items() if isinstance(v, Tensor)]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device.")


def check_transform(name: str, transform, batch: int, rigid: bool = False) -> Tensor:
    """Validate a ``(4, 4)`` or ``(B, 4, 4)`` transform and return it as ``(B, 4, 4)``."""
    if not isinstance(transform, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (4, 4) or (B, 4, 4); got {type(transform).__name__}.")
    if not transform.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype; got {transform.dtype}.")
    if transform.shape[-2:] != (4, 4) or transform.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape (4, 4) or (B, 4, 4); got {tuple(transform.shape)}.")
    if transform.dim() == 2:
        transform = transform.expand(batch, 4, 4)
    if transform.shape[0] != batch:
        raise ValueError(f"{name} holds {transform.shape[0]} transforms but the batch has {batch} clouds.")
    if ENABLED and not bool(torch.isfinite(transform).all()):
        raise ValueError(f"{name} contains NaN or Inf values.")
    if rigid and ENABLED:
        check_rigid(name, transform)
    return transform


def check_rigid(name: str, transform: Tensor) -> None:
    """Raise ``ValueError`` unless every ``(4, 4)`` is a rigid motion: ``R^T R = I`` and
    ``det R = +1`` to ``sqrt(eps)`` of the dtype, last row ``(0, 0, 0, 1)``."""
    with torch.no_grad():
        T = transform.detach().reshape(-1, 4, 4)
        R = T[:, :3, :3]
        # loose enough for a float32 result or a matrix written with 6 decimals; far below any
        # scaling, shear or reflection
        tol = max(1e-5, torch.finfo(T.dtype).eps ** 0.5) if T.is_floating_point() else 1e-5
        eye = torch.eye(3, dtype=T.dtype, device=T.device)
        ortho = (R.transpose(-1, -2) @ R - eye).abs().amax((-1, -2))
        bottom = (T[:, 3] - torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=T.dtype, device=T.device)).abs().amax(-1)
        bad = (ortho > 10 * tol) | (torch.linalg.det(R) < 0) | (bottom > tol)
        if bool(bad.any()):
            idx = bad.nonzero().flatten().tolist()
            raise ValueError(f"{name} must hold rigid motions (a rotation with det +1 and a translation, last row "
                             f"0 0 0 1); entries {idx} are not (a reflection, a scaling or a shear).")


def check_normals(name: str, normals, points: Tensor, points_name: str, unbatched: bool,
                  check_finite: bool = True) -> Tensor:
    """Validate normals matching ``points (B, N, 3)`` and return them batched."""
    if not isinstance(normals, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor shaped like {points_name}; got {type(normals).__name__}.")
    if unbatched and normals.dim() == 2:
        normals = normals[None]
    check_float_dtype(name, normals)
    if normals.dtype != points.dtype:
        raise TypeError(f"{name} has dtype {normals.dtype} but {points_name} has {points.dtype}; use one dtype.")
    if normals.shape != points.shape:
        raise ValueError(f"{name} must have the shape of {points_name} {tuple(points.shape)}; got {tuple(normals.shape)}.")
    if check_finite and ENABLED and not bool(torch.isfinite(normals).all()):
        raise ValueError(f"{name} contains NaN or Inf values.")
    return normals


def valid_rows(name: str, values: Tensor, lengths: Tensor) -> Tensor:
    """``values (B, N, C)`` with its padding rows (index ``>= lengths[b]``) set to 0, after checking
    that the valid rows are finite: padding may hold anything, NaN included, and is ignored."""
    mask = lengths_mask(lengths, values.shape[1])[..., None]
    if ENABLED and not bool((torch.isfinite(values) | ~mask).all()):
        raise ValueError(f"{name} contains NaN or Inf values (in points before its length).")
    if bool(mask.all()):
        return values
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
