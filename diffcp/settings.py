"""ICP settings as data: one small immutable option per step, each validated once, at construction.

Every option carries its own parameters, so a parameter that does not apply cannot be passed: a
temperature exists only on a soft correspondence or a soft rejection, a camera only on projective
association, inner iterations only on Levenberg-Marquardt, a truncation length only on the
truncated backward mode. :class:`ICPSettings` bundles one option per step; plain strings are the
shorthand for an option with its defaults (``correspondence="soft_nn"``).

Settings are immutable, printable (``repr``), comparable (``==``) and round-trip exactly through a
plain dict and JSON (:meth:`ICPSettings.to_dict`, :meth:`ICPSettings.from_dict`), so every result
of record can name the ICP that produced it.

Temperatures are numbers in the settings. The function :func:`diffcp.icp` also accepts a tensor
temperature (a number per batch or a ``(B,)`` tensor, one per cloud) that keeps its gradient; the
layer :class:`diffcp.ICP` learns the temperatures marked ``learnable=True`` (the settings then hold
their initial values). Settings that hold a tensor cannot be written to a dict.

Example:
    >>> s = ICPSettings(correspondence=SoftNearestNeighbor(temperature=1e-3), metric="point_to_plane",
    ...                 solver="gauss_newton", rejection=[DistanceRejection(0.1, temperature=1e-3)])
    >>> s.correspondence
    SoftNearestNeighbor(temperature=0.001, learnable=False, backend='auto')
    >>> ICPSettings.from_dict(s.to_dict()) == s
    True
    >>> NearestNeighbor(temperature=1e-3)
    Traceback (most recent call last):
    ...
    TypeError: NearestNeighbor.__init__() got an unexpected keyword argument 'temperature'
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "ICPSettings",
    "NearestNeighbor", "SoftNearestNeighbor", "ProjectiveAssociation",
    "ProcrustesSolver", "GaussNewtonSolver", "LevenbergMarquardtSolver",
    "DistanceWeights", "NormalWeights", "RobustKernel",
    "DistanceRejection", "NormalAngleRejection",
    "RandomSelection", "Stopping",
    "UnrollBackward", "TruncatedBackward", "ImplicitBackward",
    "METRICS", "SOLVER_METRICS",
]

METRICS = ("point_to_point", "point_to_plane", "symmetric")
#: Every (solver, metric) pair that :class:`ICPSettings` accepts: Procrustes solves point_to_point
#: only, Gauss-Newton and Levenberg-Marquardt every metric.
SOLVER_METRICS = (("procrustes", "point_to_point"),
                  *((solver, metric) for solver in ("gauss_newton", "levenberg_marquardt") for metric in METRICS))
ROBUST_KERNELS = ("huber", "tukey", "cauchy", "geman_mcclure")

Number = Union[float, Tensor]


# ----------------------------------------------------------------------------- value checks
def _owner(obj) -> str:
    return type(obj).__name__


def _positive(obj, name: str, value, allow_zero: bool = False, allow_tensor: bool = False) -> Number:
    """A finite positive (or non-negative) number; with ``allow_tensor`` also a 0-d or ``(B,)``
    floating-point tensor of them (kept as it is, with its gradient)."""
    need = "non-negative" if allow_zero else "positive"
    where = f"{_owner(obj)}.{name}"
    if isinstance(value, Tensor):
        if not allow_tensor:
            raise TypeError(f"{where} must be a number; got a tensor.")
        if not value.is_floating_point() or value.dim() > 1:
            raise TypeError(f"{where} must be a number or a floating-point tensor of shape () or (B,); "
                            f"got dtype {value.dtype} and shape {tuple(value.shape)}.")
        v = value.detach()
        ok = bool(torch.isfinite(v).all()) and bool((v >= 0).all() if allow_zero else (v > 0).all())
        if not ok:
            raise ValueError(f"{where} must hold finite {need} values; got {value!r}.")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a {need} number; got {type(value).__name__}.")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{where} must be a finite {need} number; got {value!r}.")
    return v


def _count(obj, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{_owner(obj)}.{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def _choice(obj, name: str, value, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{_owner(obj)}.{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}.")
    return value


def _flag(obj, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{_owner(obj)}.{name} must be True or False; got {value!r}.")
    return value


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)


def _check_learnable(obj, temperature) -> None:
    if obj.learnable and (temperature is None or (not isinstance(temperature, Tensor) and temperature == 0)):
        raise ValueError(f"{_owner(obj)}(learnable=True) needs a positive initial temperature; got {temperature!r}.")
    if obj.learnable and isinstance(temperature, Tensor):
        raise TypeError(f"{_owner(obj)}(learnable=True) takes a number as the initial temperature; "
                        "the layer diffcp.ICP makes it a parameter.")


# ----------------------------------------------------------------------------- step 2: correspondences
@dataclass(frozen=True)
class NearestNeighbor:
    """Hard nearest-neighbour correspondences (exact).

    Args:
        backend: ``"auto"``, ``"grid"``, ``"tree"`` or ``"matmul"`` (see :func:`diffcp.knn`). On a
            CPU with the grid, the iterations of plain hard-NN ICP that need no gradient run as one
            compiled loop (:mod:`diffcp.fused`).
    """

    backend: str = "auto"
    name: ClassVar[str] = "nn"

    def __post_init__(self):
        _choice(self, "backend", self.backend, ("auto", "grid", "tree", "matmul"))


@dataclass(frozen=True)
class SoftNearestNeighbor:
    """Soft nearest neighbours: the softmax average of the target over ``-|y - q|^2 / T``.

    Args:
        temperature: ``T > 0`` in squared distance units; a number, or in the function form a
            0-d or ``(B,)`` tensor that keeps its gradient. None picks, per cloud, ``0.1 x`` the
            median squared nearest-neighbour spacing of the target (``T`` must sit well below the
            squared spacing or the forward result is biased towards the centroid).
        learnable: make ``T`` a parameter of the layer :class:`diffcp.ICP` (positive by a log
            parametrisation), initialised at ``temperature``.
        backend: ``"auto"``, ``"dense"``, ``"attention"`` or ``"truncated"`` (see
            :func:`diffcp.soft_nearest`).
    """

    temperature: Optional[Number] = None
    learnable: bool = False
    backend: str = "auto"
    name: ClassVar[str] = "soft_nn"

    def __post_init__(self):
        if self.temperature is not None:
            _set(self, "temperature", _positive(self, "temperature", self.temperature, allow_tensor=True))
        _flag(self, "learnable", self.learnable)
        _check_learnable(self, self.temperature)
        _choice(self, "backend", self.backend, ("auto", "dense", "attention", "truncated"))


def _matrix(obj, name: str, value, size: int):
    """A ``(size, size)`` or ``(B, size, size)`` matrix as nested tuples of floats."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.requires_grad:
            raise ValueError(f"{_owner(obj)}.{name} is a constant of the settings; got a tensor that requires grad.")
        value = value.detach().cpu().double().tolist()
    try:
        t = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{_owner(obj)}.{name} must be a ({size}, {size}) or (B, {size}, {size}) matrix; "
                        f"got {type(value).__name__}.") from None
    if t.dim() not in (2, 3) or t.shape[-2:] != (size, size) or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{_owner(obj)}.{name} must be a finite ({size}, {size}) or (B, {size}, {size}) matrix; "
                         f"got shape {tuple(t.shape)}.")
    as_tuple = lambda x: tuple(as_tuple(r) for r in x) if isinstance(x, list) else float(x)
    return as_tuple(t.tolist())


@dataclass(frozen=True)
class ProjectiveAssociation:
    """Projective association into a target depth map seen by a pinhole camera.

    Args:
        intrinsics: ``(3, 3)`` or ``(B, 3, 3)`` pinhole matrix of the target depth map (tensor,
            array or nested lists; stored as nested tuples of floats).
        camera_pose: ``(4, 4)`` or ``(B, 4, 4)`` camera-to-world pose; None is the identity.
        mode: ``"nearest"`` (hard) or ``"bilinear"`` (differentiable in the source points).
    """

    intrinsics: Any
    camera_pose: Any = None
    mode: str = "nearest"
    name: ClassVar[str] = "projective"

    def __post_init__(self):
        _set(self, "intrinsics", _matrix(self, "intrinsics", self.intrinsics, 3))
        _set(self, "camera_pose", _matrix(self, "camera_pose", self.camera_pose, 4))
        _choice(self, "mode", self.mode, ("nearest", "bilinear"))


# ----------------------------------------------------------------------------- step 3: weighting
@dataclass(frozen=True)
class DistanceWeights:
    """Weight pairs by ``1 - d / max_distance`` (clamped at 0); see :func:`diffcp.distance_weights`."""

    max_distance: float
    name: ClassVar[str] = "distance"

    def __post_init__(self):
        _set(self, "max_distance", _positive(self, "max_distance", self.max_distance))


@dataclass(frozen=True)
class NormalWeights:
    """Weight pairs by ``max(n_y . n_q, 0)``; needs source and target normals."""

    name: ClassVar[str] = "normal"


@dataclass(frozen=True)
class RobustKernel:
    """IRLS weights of a robust kernel on the residuals; see :func:`diffcp.robust_weights`.

    Args:
        kernel: ``"huber"``, ``"tukey"``, ``"cauchy"`` or ``"geman_mcclure"``.
        scale: the kernel's scale, in distance units.
    """

    kernel: str = "huber"
    scale: float = 1.0
    name: ClassVar[str] = "robust"

    def __post_init__(self):
        _choice(self, "kernel", self.kernel, ROBUST_KERNELS)
        _set(self, "scale", _positive(self, "scale", self.scale))


# ----------------------------------------------------------------------------- step 4: rejection
@dataclass(frozen=True)
class DistanceRejection:
    """Reject pairs farther apart than ``max_distance``; see :func:`diffcp.reject_by_distance`.

    Args:
        max_distance: the threshold, in distance units.
        temperature: 0 for hard rejection; ``T > 0`` for a sigmoid of width ``T`` (a number, or in
            the function form a tensor that keeps its gradient).
        learnable: make ``T`` a parameter of the layer :class:`diffcp.ICP`.
    """

    max_distance: float
    temperature: Number = 0.0
    learnable: bool = False
    name: ClassVar[str] = "distance"

    def __post_init__(self):
        _set(self, "max_distance", _positive(self, "max_distance", self.max_distance))
        _set(self, "temperature", _positive(self, "temperature", self.temperature, allow_zero=True, allow_tensor=True))
        _flag(self, "learnable", self.learnable)
        _check_learnable(self, self.temperature)


@dataclass(frozen=True)
class NormalAngleRejection:
    """Reject pairs whose normals differ by more than ``max_angle`` degrees; needs both normals.

    Args:
        max_angle: the threshold in degrees, in ``(0, 180]``.
        temperature: 0 for hard rejection; ``T > 0`` for a sigmoid of width ``T`` in cosine units.
        learnable: make ``T`` a parameter of the layer :class:`diffcp.ICP`.
    """

    max_angle: float
    temperature: Number = 0.0
    learnable: bool = False
    name: ClassVar[str] = "normal_angle"

    def __post_init__(self):
        _set(self, "max_angle", _positive(self, "max_angle", self.max_angle))
        if self.max_angle > 180:
            raise ValueError(f"NormalAngleRejection.max_angle must lie in (0, 180] degrees; got {self.max_angle}.")
        _set(self, "temperature", _positive(self, "temperature", self.temperature, allow_zero=True, allow_tensor=True))
        _flag(self, "learnable", self.learnable)
        _check_learnable(self, self.temperature)


# ----------------------------------------------------------------------------- step 5: solvers
@dataclass(frozen=True)
class ProcrustesSolver:
    """Closed-form weighted Procrustes (Kabsch); the point-to-point metric only.

    Args:
        scale: also estimate a scale, so that each iteration solves for a similarity
            ``y = s R x + t`` by Umeyama's closed form (weighted; :func:`diffcp.umeyama`, as
            PyTorch3D's ``corresponding_points_alignment(estimate_scale=True)``). The result's
            ``transform`` is then ``[s R | t]`` and its ``scale`` field holds ``s``. Not with the
            implicit backward mode (its fixed point is differentiated on rigid motions). Start it
            near the answer: from a poor ``init``, nearest-neighbour ICP with a free scale can
            shrink the source onto one target point, a spurious fit with zero error.
    """

    scale: bool = False
    name: ClassVar[str] = "procrustes"

    def __post_init__(self):
        _flag(self, "scale", self.scale)


@dataclass(frozen=True)
class GaussNewtonSolver:
    """One Gauss-Newton step per iteration, any metric.

    Args:
        damping: relative Tikhonov damping of the 6x6 solve (see :func:`diffcp.damped_solve`).
    """

    damping: float = 1e-9
    name: ClassVar[str] = "gauss_newton"

    def __post_init__(self):
        _set(self, "damping", _positive(self, "damping", self.damping, allow_zero=True))


@dataclass(frozen=True)
class LevenbergMarquardtSolver:
    """A bounded Levenberg-Marquardt run per iteration, any metric.

    Args:
        iterations: inner steps per ICP iteration.
        initial_damping: the first damping ``lambda``.
        factor: ``lambda`` is divided by it after an accepted step and multiplied after a rejected one.
    """

    iterations: int = 5
    initial_damping: float = 1e-3
    factor: float = 10.0
    name: ClassVar[str] = "levenberg_marquardt"

    def __post_init__(self):
        _set(self, "iterations", _count(self, "iterations", self.iterations))
        _set(self, "initial_damping", _positive(self, "initial_damping", self.initial_damping))
        _set(self, "factor", _positive(self, "factor", self.factor))
        if self.factor <= 1:
            raise ValueError(f"LevenbergMarquardtSolver.factor must be > 1; got {self.factor}.")


# ----------------------------------------------------------------------------- step 1, stopping, backward
@dataclass(frozen=True)
class RandomSelection:
    """Use a random subset of ``num_samples`` source points per cloud, fixed for the whole run.

    Args:
        num_samples: points kept per cloud (>= 3); a cloud with fewer keeps all of them.
        seed: None draws from torch's global generator; an integer gives the same subset every call.
    """

    num_samples: int
    seed: Optional[int] = None
    name: ClassVar[str] = "random"

    def __post_init__(self):
        _set(self, "num_samples", _count(self, "num_samples", self.num_samples, minimum=3))
        if self.seed is not None:
            _set(self, "seed", _count(self, "seed", self.seed, minimum=0))


@dataclass(frozen=True)
class Stopping:
    """When the loop stops.

    Args:
        max_iterations: upper bound on iterations.
        tolerance: a cloud stops when its update rotates by less than ``tolerance`` radians and
            translates by less than ``tolerance`` times the RMS radius of its source cloud; 0 runs
            every iteration.
        relative_rmse: a cloud also stops when its weighted RMS error changes by at most this
            fraction of its previous value (Open3D's and PyTorch3D's criterion); 0 turns it off.
    """

    max_iterations: int = 30
    tolerance: float = 1e-6
    relative_rmse: float = 0.0
    name: ClassVar[str] = "stopping"

    def __post_init__(self):
        _set(self, "max_iterations", _count(self, "max_iterations", self.max_iterations))
        _set(self, "tolerance", _positive(self, "tolerance", self.tolerance, allow_zero=True))
        _set(self, "relative_rmse", _positive(self, "relative_rmse", self.relative_rmse, allow_zero=True))


@dataclass(frozen=True)
class UnrollBackward:
    """Autograd through every iteration: the exact gradient of the computed result."""

    name: ClassVar[str] = "unroll"


@dataclass(frozen=True)
class TruncatedBackward:
    """The first iterations run without a graph, the last ``iterations`` with one. The gradient
    reaches ``init`` only when every iteration is kept."""

    iterations: int = 5
    name: ClassVar[str] = "truncated"

    def __post_init__(self):
        _set(self, "iterations", _count(self, "iterations", self.iterations))


@dataclass(frozen=True)
class ImplicitBackward:
    """Differentiate the fixed point by the implicit function theorem (one 6x6 solve per cloud).
    The fixed point does not depend on ``init``, so no gradient reaches it."""

    name: ClassVar[str] = "implicit"


# ----------------------------------------------------------------------------- the bundle
_SLOTS: Dict[str, Tuple[type, ...]] = {
    "correspondence": (NearestNeighbor, SoftNearestNeighbor, ProjectiveAssociation),
    "solver": (ProcrustesSolver, GaussNewtonSolver, LevenbergMarquardtSolver),
    "weighting": (DistanceWeights, NormalWeights, RobustKernel),
    "rejection": (DistanceRejection, NormalAngleRejection),
    "selection": (RandomSelection,),
    "stopping": (Stopping,),
    "backward": (UnrollBackward, TruncatedBackward, ImplicitBackward),
}


def _option(slot: str, value):
    """An option object for ``slot`` from an option or its shorthand string."""
    kinds = _SLOTS[slot]
    if isinstance(value, kinds):
        return value
    names = [k.name for k in kinds]
    if isinstance(value, str):
        for k in kinds:
            if k.name == value:
                try:
                    return k()
                except TypeError as e:
                    missing = str(e).split("missing ")[-1]
                    raise ValueError(f"{slot}={value!r} needs parameters (missing {missing}): pass "
                                     f"diffcp.{k.__name__}(...).") from None
    raise ValueError(
        f"{slot} must be one of {', '.join(map(repr, names))} or an option "
        f"({', '.join('diffcp.' + k.__name__ for k in kinds)}); got {value!r}."
    )


def _options(slot: str, value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str) or dataclasses.is_dataclass(value):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{slot} must be an option or a sequence of options; got {type(value).__name__}.")
    return tuple(_option(slot, v) for v in value)


@dataclass(frozen=True)
class ICPSettings:
    """Which ICP: one option per step. Strings are shorthand for an option with its defaults.

    Args:
        correspondence: ``"nn"`` / :class:`NearestNeighbor`, ``"soft_nn"`` /
            :class:`SoftNearestNeighbor`, or :class:`ProjectiveAssociation` (it needs a camera).
        metric: ``"point_to_point"``, ``"point_to_plane"`` or ``"symmetric"`` (Rusinkiewicz 2019:
            ``(y - q) . (R n_x + n_q)``).
        solver: ``"procrustes"`` (point-to-point only), ``"gauss_newton"``,
            ``"levenberg_marquardt"``, or their option objects.
        weighting: a sequence of :class:`DistanceWeights`, :class:`NormalWeights`,
            :class:`RobustKernel` (``"normal"`` and ``"robust"`` are shorthands); their weights multiply.
        rejection: a sequence of :class:`DistanceRejection`, :class:`NormalAngleRejection`.
        selection: None (every valid point) or :class:`RandomSelection`.
        stopping: :class:`Stopping`.
        backward: ``"unroll"``, ``"truncated"``, ``"implicit"`` or their option objects.
    """

    correspondence: Any = "nn"
    metric: str = "point_to_point"
    solver: Any = "procrustes"
    weighting: Any = ()
    rejection: Any = ()
    selection: Any = None
    stopping: Any = field(default_factory=Stopping)
    backward: Any = "unroll"

    def __post_init__(self):
        for slot in ("correspondence", "solver", "stopping", "backward"):
            _set(self, slot, _option(slot, self.__getattribute__(slot)))
        _set(self, "weighting", _options("weighting", self.weighting))
        _set(self, "rejection", _options("rejection", self.rejection))
        if self.selection is not None:
            _set(self, "selection", _option("selection", self.selection))
        if not isinstance(self.metric, str) or self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(map(repr, METRICS))}; got {self.metric!r}.")
        if isinstance(self.solver, ProcrustesSolver) and self.metric != "point_to_point":
            raise ValueError(
                f"solver='procrustes' solves the point_to_point metric in closed form only; got "
                f"metric={self.metric!r}. Use solver='gauss_newton' or 'levenberg_marquardt'."
            )
        if isinstance(self.solver, ProcrustesSolver) and self.solver.scale and isinstance(self.backward, ImplicitBackward):
            raise ValueError(
                "ProcrustesSolver(scale=True) cannot be combined with backward='implicit': the implicit "
                "backward differentiates a fixed point over rigid motions; use backward='unroll' or 'truncated'."
            )

    # -- what the data must provide
    @property
    def needs_target_normals(self) -> bool:
        """Whether the target's normals take part (metric, normal weights or normal rejection)."""
        return self.metric != "point_to_point" or self._uses_normal_terms()

    @property
    def needs_source_normals(self) -> bool:
        """Whether the source's normals take part (symmetric metric, normal weights or rejection)."""
        return self.metric == "symmetric" or self._uses_normal_terms()

    def _uses_normal_terms(self) -> bool:
        return any(isinstance(o, (NormalWeights, NormalAngleRejection)) for o in self.weighting + self.rejection)

    # -- data round trip
    def to_dict(self) -> Dict[str, Any]:
        """Plain data (str, float, int, bool, None, lists, dicts) that :meth:`from_dict` reads back."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "metric":
                out["metric"] = value
            elif isinstance(value, tuple):
                out[f.name] = [_option_to_dict(f.name, v) for v in value]
            else:
                out[f.name] = None if value is None else _option_to_dict(f.name, value)
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ICPSettings":
        """The settings that :meth:`to_dict` wrote (unknown keys raise ``ValueError``)."""
        if not isinstance(data, dict):
            raise TypeError(f"ICPSettings.from_dict needs a dict; got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"ICPSettings.from_dict got unknown keys {sorted(unknown)}; expected some of {sorted(known)}.")
        kwargs: Dict[str, Any] = {}
        for name, value in data.items():
            if name == "metric" or value is None:
                kwargs[name] = value
            elif isinstance(value, list):
                kwargs[name] = tuple(_option_from_dict(name, v) for v in value)
            else:
                kwargs[name] = _option_from_dict(name, value)
        return cls(**kwargs)


def _plain(value):
    if isinstance(value, Tensor):
        raise TypeError("settings holding a tensor cannot be written as data; store numbers (the layer "
                        "diffcp.ICP keeps learnable temperatures as parameters and numbers in its settings).")
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _unplain(value):
    return tuple(_unplain(v) for v in value) if isinstance(value, list) else value


def _option_to_dict(slot: str, option) -> Dict[str, Any]:
    out = {"type": option.name}
    out.update({f.name: _plain(getattr(option, f.name)) for f in dataclasses.fields(option)})
    return out


def _option_from_dict(slot: str, data) -> Any:
    if not isinstance(data, dict) or "type" not in data:
        raise ValueError(f"{slot} must be written as a dict with a 'type' key; got {data!r}.")
    params = {k: _unplain(v) for k, v in data.items() if k != "type"}
    for kind in _SLOTS[slot]:
        if kind.name == data["type"]:
            return kind(**params)
    raise ValueError(f"{slot} has unknown type {data['type']!r}; expected one of {[k.name for k in _SLOTS[slot]]}.")
