"""Registration protocols on ModelNet40: how a pair (source, target, R, t) is made from an object.

Every protocol yields :class:`RegistrationPair` s with ``target ~ R source + t`` (column vectors,
the transform maps the **source into the target**: diffcp's convention). Rotations follow DCP's
code (``WangYueFt/dcp``, ``data.py``): three angles each uniform in ``[0, 45 deg)`` (not +-45),
``R = Rx(ax) Ry(ay) Rz(az)`` (the same matrix as SciPy's extrinsic ``from_euler('zyx', [az, ay,
ax])``, which DCP uses to move the points); translations uniform in ``[-0.5, 0.5]`` per axis.

The protocols (:data:`PROTOCOLS`):

``"clean"``  DCP's "unseen point clouds": the source is the object's first 1024 of its 2048
    points, the target the same points moved; both are permuted, so exact one-to-one
    correspondences exist. On the test split the random numbers are drawn exactly as DCP's code
    draws them after ``np.random.seed(item)`` (three angles, three translations, two
    permutations), so the test pairs are DCP's.
``"noise_dcp"``  DCP's Gaussian-noise experiment as its code does it: noise ``N(0, 0.01^2)``
    clipped to +-0.05 is added *in place* to the stored object before the pair is made, so the
    source and the target share the same noise (the target is the noisy source, moved), and the
    noise accumulates: the k-th read of an object carries the sum of k draws (standard deviation
    ``0.01 sqrt(k)``, before clipping). The noise is drawn before the per-item seed is set, so it
    is not reproducible in DCP either. Emulated here by a per-dataset copy of the points and its
    own noise generator; the transforms are those of ``"clean"``.
``"noise"``  the noise fixed: independent noise (same law) on each cloud, after the transform,
    drawn from the per-item generator, so a test pair is the same at every read.
``"sampling"``  independent sampling: the source is the first 1024 points, the target the other
    1024 of the 2048 (disjoint samples of the same surface, no exact correspondence), moved;
    plus independent noise as in ``"noise"``.
``"partial"``  partial overlap as RPM-Net defines it (``yewzijian/RPMNet``,
    ``data_loader/transforms.py``, ``RandomCrop``): each cloud is cut from all 2048 points by its
    own random plane (normal uniform on the sphere, through the centroid, shifted to keep the
    points above the 30th percentile of the signed distances: ~70 %), then
    ``ceil(0.7 x 1024) = 717`` points are sampled without replacement from each part, the target
    is moved, and independent noise (as in ``"noise"``) is added to both. RPM-Net moves the
    source and reports the inverse; here the target is moved so that ``(R, t)`` maps source to
    target like every other protocol (same law of rotation angles).
``"unseen"``  DCP's "unseen categories": ``"clean"`` pairs, training on labels < 20 and testing
    on labels >= 20 (:data:`UNSEEN_SPLIT`).

Pairs of the test and validation splits are fixed per item (``deterministic=True``): the item's
generator is ``numpy.random.RandomState(seed)`` with the item's seed: DCP's ``np.random.seed(item)``
with ``item`` the object's index in the official test split (``ModelNet40.rows``). Training pairs draw fresh numbers at
every read from the dataset's own generator.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RegistrationPair", "Protocol", "PROTOCOLS", "UNSEEN_SPLIT", "get_protocol", "dcp_transform",
    "crop_half_space", "make_pair", "RegistrationPairs", "labels_for",
]

PROTOCOLS = ("clean", "noise_dcp", "noise", "sampling", "partial", "unseen")
#: Labels used by the unseen-categories protocol on each split (DCP: train < 20, test >= 20).
UNSEEN_SPLIT = {"train": range(0, 20), "val": range(0, 20), "trainval": range(0, 20), "test": range(20, 40)}


class RegistrationPair(NamedTuple):
    """One registration problem: ``target ~ rotation @ source + translation``."""

    source: Tensor  # (N, 3) float32
    target: Tensor  # (M, 3) float32
    rotation: Tensor  # (3, 3) R_ab, source -> target
    translation: Tensor  # (3,) t_ab


class Protocol(NamedTuple):
    """The settings of a protocol (see the module docstring for each name)."""

    name: str
    num_points: int = 1024  # points per cloud before cropping
    max_angle_deg: float = 45.0  # each Euler angle uniform in [0, max_angle_deg)
    max_translation: float = 0.5  # each component uniform in [-max_translation, max_translation]
    noise: str = "none"  # "none" | "shared_accumulating" (DCP's code) | "independent"
    noise_sigma: float = 0.01
    noise_clip: float = 0.05
    sampling: str = "first"  # "first" | "disjoint" (first and other 1024) | "crop"
    keep: float = 0.7  # share kept by each crop ("crop" sampling)


_SETTINGS = {
    "clean": {},
    "noise_dcp": {"noise": "shared_accumulating"},
    "noise": {"noise": "independent"},
    "sampling": {"noise": "independent", "sampling": "disjoint"},
    "partial": {"noise": "independent", "sampling": "crop"},
    "unseen": {},
}


def get_protocol(name: str) -> Protocol:
    """The :class:`Protocol` called ``name`` (one of :data:`PROTOCOLS`).

    Example:
        >>> get_protocol("partial").sampling, get_protocol("partial").keep
        ('crop', 0.7)
    """
    if name not in _SETTINGS:
        raise ValueError(f"name must be one of {', '.join(map(repr, PROTOCOLS))}; got {name!r}.")
    return Protocol(name, **_SETTINGS[name])


def labels_for(protocol: Protocol, split: str) -> Optional[range]:
    """Labels a split keeps under ``protocol`` (None: all)."""
    return UNSEEN_SPLIT[split] if protocol.name == "unseen" else None


def dcp_transform(rng: np.random.RandomState, max_angle_deg: float = 45.0,
                  max_translation: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
    """DCP's random transform: ``R = Rx Ry Rz`` (angles uniform in ``[0, max_angle_deg)``, drawn
    x, y, z) and ``t`` uniform in ``[-max_translation, max_translation]^3``; float64 ``(3, 3), (3,)``.

    Example:
        >>> R, t = dcp_transform(np.random.RandomState(0))
        >>> np.allclose(R @ R.T, np.eye(3)), bool(np.abs(t).max() <= 0.5)
        (True, True)
    """
    ax, ay, az = (rng.uniform() * math.pi * max_angle_deg / 180.0 for _ in range(3))
    cx, cy, cz, sx, sy, sz = math.cos(ax), math.cos(ay), math.cos(az), math.sin(ax), math.sin(ay), math.sin(az)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    t = np.array([rng.uniform(-max_translation, max_translation) for _ in range(3)])
    return Rx @ Ry @ Rz, t


def crop_half_space(points: np.ndarray, keep: float, rng: np.random.RandomState) -> np.ndarray:
    """RPM-Net's crop: keep the points of ``(N, 3)`` above a random plane, about ``keep`` of them.

    The plane's normal is uniform on the sphere (azimuth uniform in ``[0, 2 pi)``, cosine of the
    polar angle uniform in ``[-1, 1]``); the signed distances to the plane through the centroid
    are thresholded at their ``(1 - keep)`` percentile (strictly above it; at 0 for
    ``keep = 0.5``). Returns the kept rows, in their original order.

    Example:
        >>> pts = np.random.RandomState(0).randn(2048, 3)
        >>> len(crop_half_space(pts, 0.7, np.random.RandomState(1)))
        1433
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must lie in (0, 1]; got {keep!r}.")
    phi = rng.uniform(0.0, 2 * np.pi)
    cos_theta = rng.uniform(-1.0, 1.0)
    sin_theta = math.sqrt(max(0.0, 1.0 - cos_theta ** 2))
    normal = np.array([sin_theta * math.cos(phi), sin_theta * math.sin(phi), cos_theta])
    distance = (points - points.mean(axis=0)) @ normal
    threshold = 0.0 if keep == 0.5 else np.percentile(distance, (1.0 - keep) * 100)
    return points[distance > threshold]


def _noise(rng: np.random.RandomState, shape, protocol: Protocol) -> np.ndarray:
    return np.clip(protocol.noise_sigma * rng.randn(*shape), -protocol.noise_clip, protocol.noise_clip)


def make_pair(cloud: np.ndarray, protocol: Protocol, rng: np.random.RandomState) -> RegistrationPair:
    """One pair from an object's points ``(2048, 3)`` under ``protocol``, drawing from ``rng``.

    For ``noise="shared_accumulating"`` the caller adds the noise to ``cloud`` beforehand (see
    :class:`RegistrationPairs`); here it is then treated as clean. Draw order: the transform
    (as :func:`dcp_transform`), then the crops and samples (``"crop"``), then the two
    permutations, then the noise of the source and of the target.
    """
    R, t = dcp_transform(rng, protocol.max_angle_deg, protocol.max_translation)
    n = protocol.num_points
    if protocol.sampling == "first":
        source, target = cloud[:n], cloud[:n]
    elif protocol.sampling == "disjoint":
        if len(cloud) < 2 * n:
            raise ValueError(f"cloud must hold at least {2 * n} points for disjoint sampling; got {len(cloud)}.")
        source, target = cloud[:n], cloud[n:2 * n]
    else:
        size = math.ceil(protocol.keep * n)
        source = crop_half_space(cloud, protocol.keep, rng)
        target = crop_half_space(cloud, protocol.keep, rng)
        source = source[rng.choice(len(source), size, replace=False)]
        target = target[rng.choice(len(target), size, replace=False)]
    target = target @ R.T + t
    source = source[rng.permutation(len(source))]
    target = target[rng.permutation(len(target))]
    if protocol.noise == "independent":
        source = source + _noise(rng, source.shape, protocol)
        target = target + _noise(rng, target.shape, protocol)
    f32 = torch.float32
    return RegistrationPair(torch.as_tensor(source, dtype=f32), torch.as_tensor(target, dtype=f32),
                            torch.as_tensor(R, dtype=f32), torch.as_tensor(t, dtype=f32))


class RegistrationPairs(torch.utils.data.Dataset):
    """A dataset of registration pairs: objects ``(K, P, 3)`` and a protocol.

    Args:
        points: ``(K, P, 3)`` object points (``P >= 1024``; 2048 for ``"sampling"``/``"partial"``),
            e.g. ``load_modelnet40("test").points``. Not modified (``"noise_dcp"`` works on a copy).
        protocol: a :class:`Protocol` or its name.
        deterministic: True (test, validation): item ``i`` draws from
            ``np.random.RandomState(item_seeds[i])`` and is the same at every read. False
            (training): every read draws from the dataset's generator (seeded by ``seed``).
        seed: seed of the dataset's generator (training draws, and DCP's accumulating noise).
        item_seeds: ``(K,)`` seed of each item's generator; None for ``0 .. K-1``. DCP seeds
            with the object's index in the official test split: pass ``load_modelnet40(...).rows``
            to get DCP's very pairs from a subset.

    Items are :class:`RegistrationPair` s (``torch.utils.data.default_collate`` stacks them).

    Example:
        >>> objects = np.random.RandomState(0).rand(3, 2048, 3).astype(np.float32)
        >>> pair = RegistrationPairs(objects, "clean")[1]
        >>> tuple(pair.source.shape), tuple(pair.rotation.shape)
        ((1024, 3), (3, 3))
    """

    def __init__(self, points: np.ndarray, protocol, *, deterministic: bool = True, seed: int = 0,
                 item_seeds: Optional[np.ndarray] = None):
        self.protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
        if not isinstance(self.protocol, Protocol):
            raise TypeError(f"protocol must be a Protocol or one of {PROTOCOLS}; got {type(protocol).__name__}.")
        points = np.asarray(points)
        if points.ndim != 3 or points.shape[-1] != 3 or points.shape[1] < self.protocol.num_points:
            raise ValueError(f"points must have shape (K, P, 3) with P >= {self.protocol.num_points}; got {points.shape}.")
        self.points = points.astype(np.float32, copy=self.protocol.noise == "shared_accumulating")
        self.deterministic = bool(deterministic)
        self.item_seeds = np.arange(len(points)) if item_seeds is None else np.asarray(item_seeds, dtype=np.int64)
        if self.item_seeds.shape != (len(points),):
            raise ValueError(f"item_seeds must have shape ({len(points)},); got {self.item_seeds.shape}.")
        self._rng = np.random.RandomState(seed)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, item: int) -> RegistrationPair:
        if not 0 <= item < len(self.points):
            raise IndexError(f"item must lie in [0, {len(self.points)}); got {item}.")
        cloud = self.points[item]
        if self.protocol.noise == "shared_accumulating":
            n = self.protocol.num_points  # DCP: jitter_pointcloud on a view, in place, before seeding
            cloud[:n] += _noise(self._rng, (n, 3), self.protocol).astype(np.float32)
        rng = np.random.RandomState(int(self.item_seeds[item])) if self.deterministic else self._rng
        return make_pair(cloud, self.protocol, rng)
