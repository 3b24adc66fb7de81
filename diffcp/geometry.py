"""Rigid-body geometry: SO(3) and SE(3) in the convention ``y = R x + t``.

Points are row-stacked column vectors, so a batch of clouds ``x`` of shape ``(B, N, 3)`` is
mapped by ``x @ R.transpose(-1, -2) + t[..., None, :]``. Transforms are homogeneous ``(..., 4, 4)``
matrices. Small increments are twists ``xi = (omega, v)`` acting on the left (see
:func:`apply_twist`). Every function accepts any number of leading batch dimensions unless its
docstring says otherwise, and is differentiable, including at the identity.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "hat",
    "so3_exp",
    "so3_log",
    "make_transform",
    "split_transform",
    "invert_transform",
    "transform_points",
    "rotate_vectors",
    "apply_twist",
    "twist_between",
    "rotation_angle",
    "rotation_error",
    "translation_error",
    "random_rotation",
    "random_transform",
    "euler_to_rotation",
    "rotation_to_euler",
]

# Below this angle, Taylor expansions replace the closed forms (their cancellation error would
# otherwise dominate in float32, and their gradients would be 0/0 at the identity).
_SMALL_ANGLE = 1e-3


def _check(name: str, x, suffix: Tuple[int, ...]) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``x`` is a float32/float64 tensor shaped ``(..., *suffix)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., {', '.join(map(str, suffix))}); "
                        f"got {type(x).__name__}.")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must have a floating-point dtype (float32 or float64); got {x.dtype}.")
    if x.dim() < len(suffix) or tuple(x.shape[-len(suffix):]) != suffix:
        raise ValueError(f"{name} must have shape (..., {', '.join(map(str, suffix))}); got {tuple(x.shape)}.")


def _check_rotation(name: str, R: Tensor) -> None:
    """Also, while checks are enabled, that ``R`` holds finite rotations (orthonormal, det +1)."""
    _check(name, R, (3, 3))
    from . import checks  # checks imports nothing from here; imported late to keep this module first

    if checks.ENABLED and R.numel():
        with torch.no_grad():
            Rd = R.detach().reshape(-1, 3, 3)
            tol = max(1e-4, 10 * torch.finfo(R.dtype).eps ** 0.5)  # float32 results promoted to float64 pass
            eye = torch.eye(3, dtype=R.dtype, device=R.device)
            bad = ~torch.isfinite(Rd).all() or bool(((Rd.transpose(-1, -2) @ Rd - eye).abs() > tol).any())
            if bad or bool((torch.linalg.det(Rd) < 0).any()):
                raise ValueError(f"{name} must hold rotation matrices (orthonormal, det +1, finite).")


def _check_range(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (low <= value <= high):
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}]; got {value!r}.")
    return float(value)


def hat(v: Tensor) -> Tensor:
    """Skew-symmetric matrix of a 3-vector: ``hat(v) @ u == cross(v, u)``.

    Args:
        v: ``(..., 3)``.

    Returns:
        ``(..., 3, 3)``.

    Example:
        >>> hat(torch.tensor([0.0, 0.0, 1.0])) @ torch.tensor([1.0, 0.0, 0.0])
        tensor([0., 1., 0.])
    """
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(v.shape[:-1] + (3, 3))


def so3_exp(omega: Tensor) -> Tensor:
    """Rotation matrix of a rotation vector (Rodrigues' formula), smooth at zero.

    Args:
        omega: ``(..., 3)`` axis times angle in radians.

    Returns:
        ``(..., 3, 3)`` rotation matrices.

    Example:
        >>> R = so3_exp(torch.tensor([0.0, 0.0, math.pi / 2]))
        >>> torch.allclose(R @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
        True
    """
    _check("omega", omega, (3,))
    theta2 = (omega * omega).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    small = theta2 < _SMALL_ANGLE**2
    safe2 = torch.where(small, torch.ones_like(theta2), theta2)
    safe = safe2.sqrt()
    a = torch.where(small, 1 - theta2 / 6 + theta2 * theta2 / 120, torch.sin(safe) / safe)
    b = torch.where(small, 0.5 - theta2 / 24 + theta2 * theta2 / 720, (1 - torch.cos(safe)) / safe2)
    K = hat(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand_as(K)
    return eye + a * K + b * (K @ K)


def so3_log(R: Tensor) -> Tensor:
    """Rotation vector of a rotation matrix (inverse of :func:`so3_exp`), for angles in ``[0, pi]``.

    Smooth near the identity; near ``pi`` it uses the symmetric part of ``R`` for the axis.

    Args:
        R: ``(..., 3, 3)`` rotation matrices.

    Returns:
        ``(..., 3)`` rotation vectors.
    """
    _check_rotation("R", R)
    trace = R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2]
    cos = ((trace - 1) / 2).clamp(-1.0, 1.0)
    # vee of the antisymmetric part: sin(theta) * axis
    w = torch.stack(
        [R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1
    ) / 2
    sin = w.norm(dim=-1)
    theta = torch.atan2(sin, cos)
    small = theta < _SMALL_ANGLE
    near_pi = cos < -0.99
    safe_sin = torch.where(small | near_pi, torch.ones_like(sin), sin)
    factor = torch.where(small, 1 + theta * theta / 6, theta / safe_sin)
    regular = w * factor[..., None]
    # near pi: axis from R + I = 2 a a^T (scaled by 1 - cos), sign from w
    S = (R + R.transpose(-1, -2)) / 2 - cos[..., None, None] * torch.eye(3, dtype=R.dtype, device=R.device)
    diag = torch.diagonal(S, dim1=-2, dim2=-1)
    col = diag.argmax(-1)
    axis = torch.gather(S, -1, col[..., None, None].expand(S.shape[:-1] + (1,))).squeeze(-1)
    axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(R.dtype).tiny)
    sign = torch.where((axis * w).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(R.dtype)
    at_pi = axis * sign * theta[..., None]
    return torch.where(near_pi[..., None], at_pi, regular)


def make_transform(rotation: Tensor, translation: Tensor) -> Tensor:
    """Stack ``R (..., 3, 3)`` and ``t (..., 3)`` into homogeneous ``(..., 4, 4)`` matrices."""
    _check("rotation", rotation, (3, 3))
    _check("translation", translation, (3,))
    top = torch.cat([rotation, translation[..., :, None]], dim=-1)
    bottom = torch.zeros(top.shape[:-2] + (1, 4), dtype=top.dtype, device=top.device)
    bottom[..., 0, 3] = 1
    return torch.cat([top, bottom], dim=-2)


def split_transform(transform: Tensor) -> Tuple[Tensor, Tensor]:
    """Return ``(R (..., 3, 3), t (..., 3))`` of homogeneous ``(..., 4, 4)`` transforms."""
    return transform[..., :3, :3], transform[..., :3, 3]


def invert_transform(transform: Tensor) -> Tensor:
    """Inverse of a rigid transform: ``x = R^T (y - t)``."""
    R, t = split_transform(transform)
    Rt = R.transpose(-1, -2)
    return make_transform(Rt, -(Rt @ t[..., None])[..., 0])


def transform_points(transform: Tensor, points: Tensor) -> Tensor:
    """Apply ``y = R x + t`` to every point.

    Args:
        transform: ``(..., 4, 4)``.
        points: ``(..., N, 3)``.

    Returns:
        ``(..., N, 3)``.
    """
    _check("transform", transform, (4, 4))
    _check("points", points, (3,))
    if points.dtype != transform.dtype:
        raise TypeError(f"points have dtype {points.dtype} but transform has {transform.dtype}; use one dtype.")
    R, t = split_transform(transform)
    return points @ R.transpose(-1, -2) + t[..., None, :]


def rotate_vectors(rotation: Tensor, vectors: Tensor) -> Tensor:
    """Apply ``n -> R n`` to row-stacked vectors ``(..., N, 3)`` with ``R (..., 3, 3)``."""
    return vectors @ rotation.transpose(-1, -2)


def apply_twist(transform: Tensor, twist: Tensor) -> Tensor:
    """Left-compose a small motion: ``R <- exp(omega) R``, ``t <- exp(omega) t + v``.

    A point ``y`` already mapped by ``transform`` moves to ``exp(omega) y + v``, which is
    ``y + omega x y + v`` to first order: the linearisation every solver in
    :mod:`diffcp.minimize` uses.

    Args:
        transform: ``(..., 4, 4)``.
        twist: ``(..., 6)`` as ``(omega, v)``.
    """
    R, t = split_transform(transform)
    dR = so3_exp(twist[..., :3])
    return make_transform(dR @ R, (dR @ t[..., None])[..., 0] + twist[..., 3:])


def twist_between(new: Tensor, old: Tensor) -> Tensor:
    """The twist ``xi`` with ``apply_twist(old, xi) == new`` (for rotations under pi apart)."""
    Rn, tn = split_transform(new)
    Ro, to = split_transform(old)
    dR = Rn @ Ro.transpose(-1, -2)
    omega = so3_log(dR)
    v = tn - (dR @ to[..., None])[..., 0]
    return torch.cat([omega, v], dim=-1)


def rotation_angle(rotation: Tensor) -> Tensor:
    """Angle in radians of rotation matrices ``(..., 3, 3)``.

    Computed as ``atan2(|sin|, cos)`` through :func:`so3_log`, which keeps full precision near the
    identity (``acos`` of the trace loses half the digits there) and is gradient-safe.
    """
    return so3_log(rotation).norm(dim=-1)


def rotation_error(predicted: Tensor, expected: Tensor) -> Tensor:
    """Geodesic distance between rotations, in degrees: the angle of ``predicted^T expected``."""
    _check_rotation("predicted", predicted)
    _check_rotation("expected", expected)
    if predicted.dtype != expected.dtype:
        raise TypeError(f"predicted has dtype {predicted.dtype} but expected has {expected.dtype}; use one dtype.")
    return torch.rad2deg(rotation_angle(predicted.transpose(-1, -2) @ expected))


def translation_error(predicted: Tensor, expected: Tensor) -> Tensor:
    """Euclidean distance between translations ``(..., 3)``."""
    _check("predicted", predicted, (3,))
    _check("expected", expected, (3,))
    return (predicted - expected).norm(dim=-1)


def random_rotation(
    batch_size: int,
    max_angle: float = math.pi,
    *,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    """Rotations about uniformly random axes with angles uniform in ``[0, max_angle]`` (radians).

    Returns:
        ``(batch_size, 3, 3)``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be a non-negative integer; got {batch_size!r}.")
    max_angle = _check_range("max_angle", max_angle, 0.0, math.pi)
    axis = torch.randn(batch_size, 3, generator=generator, dtype=torch.float64)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    angle = torch.rand(batch_size, 1, generator=generator, dtype=torch.float64) * max_angle
    return so3_exp(axis * angle).to(dtype=dtype, device=device)


def random_transform(
    batch_size: int,
    max_angle: float = math.pi,
    max_translation: float = 1.0,
    *,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    """Random rigid transforms ``(batch_size, 4, 4)``: :func:`random_rotation` and a translation
    with every component uniform in ``[-max_translation, max_translation]``."""
    max_translation = _check_range("max_translation", max_translation, 0.0, math.inf)
    R = random_rotation(batch_size, max_angle, generator=generator, dtype=torch.float64)
    t = (torch.rand(batch_size, 3, generator=generator, dtype=torch.float64) * 2 - 1) * max_translation
    return make_transform(R, t).to(dtype=dtype, device=device)


def _axis_rotation(angle: Tensor, axis: int) -> Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    o, i = torch.zeros_like(angle), torch.ones_like(angle)
    if axis == 0:
        m = [i, o, o, o, c, -s, o, s, c]
    elif axis == 1:
        m = [c, o, s, o, i, o, -s, o, c]
    else:
        m = [c, -s, o, s, c, o, o, o, i]
    return torch.stack(m, -1).reshape(angle.shape + (3, 3))


_AXES = {"x": 0, "y": 1, "z": 2}


def euler_to_rotation(angles: Tensor, order: str = "xyz") -> Tensor:
    """Rotation ``R = R_a(angles[0]) R_b(angles[1]) R_c(angles[2])`` for ``order = "abc"``.

    DCP's protocol draws ``R = Rx Ry Rz``, i.e. ``order="xyz"``.

    Args:
        angles: ``(..., 3)`` radians, in the order named by ``order``.
        order: three distinct letters of ``x, y, z``.
    """
    if sorted(order) != ["x", "y", "z"]:
        raise ValueError(f"order must be a permutation of 'xyz', got {order!r}.")
    R = _axis_rotation(angles[..., 0], _AXES[order[0]])
    R = R @ _axis_rotation(angles[..., 1], _AXES[order[1]])
    return R @ _axis_rotation(angles[..., 2], _AXES[order[2]])


def rotation_to_euler(rotation: Tensor, order: str = "zyx") -> Tensor:
    """Angles ``(a, b, c)`` in radians with ``R = R_a(a) R_b(b) R_c(c)`` for ``order="abc"``.

    Same result as SciPy's ``Rotation.from_matrix(R).as_euler(order.upper())`` for proper
    (Tait-Bryan) orders away from gimbal lock. DCP reports its errors with ``order="zyx"``.
    """
    if sorted(order) != ["x", "y", "z"]:
        raise ValueError(f"order must be a permutation of 'xyz', got {order!r}.")
    i, j, k = (_AXES[c] for c in order)
    # sign of the permutation (i, j, k)
    parity = 1.0 if (j - i) % 3 == 1 else -1.0
    b = torch.asin((parity * rotation[..., i, k]).clamp(-1.0, 1.0))
    a = torch.atan2(-parity * rotation[..., j, k], rotation[..., k, k])
    c = torch.atan2(-parity * rotation[..., i, j], rotation[..., i, i])
    return torch.stack([a, b, c], dim=-1)
