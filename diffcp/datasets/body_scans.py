"""Single depth scans of bodies with random pose and shape: the non-rigid fitting dataset.

A scan is made in four steps (all lengths in metres, the camera conventions of :mod:`diffcp.camera`):

1. a body: pose ``(J, 3)`` axis-angles of :data:`~diffcp.bodies.placed.POSED_JOINTS` with
   components ``N(0, s_j^2)`` (``pose_scales``: spine and neck 0.15, shoulders 0.25, arms 0.4,
   legs 0.25 rad); shape: each anny phenotype value uniform in its ``shape_ranges`` interval
   (age 0.4-0.9 keeps adults);
2. an upright camera (``look_at`` with world ``+z`` up) at azimuth uniform in ``[0, 360)`` deg,
   elevation uniform in ``elevation_deg``, distance uniform in ``distance``, looking at the body's
   bounding-box centre moved by ``N(0, aim_jitter^2)`` per axis;
3. a ``image_size``-square depth map (``fov_deg``) and one of three *conditions*, by index modulo 3:
   ``0 clean``; ``1 noise``: every valid depth plus ``N(0, noise_std^2)`` and a fraction
   ``outlier_fraction`` of valid pixels moved by up to +-``outlier_range``; ``2 partial``: a
   rectangle covering ``occluder_fraction`` (uniform in the interval) of the body's image box,
   placed uniformly inside it, is removed (depth 0);
4. ``num_points`` points with normals (:func:`diffcp.camera.normals_from_depth`) drawn from the
   pixels with a defined normal, with replacement when there are fewer. A view with fewer than
   ``min_valid_pixels`` such pixels is drawn again (a new body every fifth try).

Ground truth is stored in the camera frame: the :class:`~diffcp.bodies.placed.BodyParameters`
(``rotation``, ``root``, ``pose``, ``shape``), the vertices and the measured joints.
Sample ``i`` of a split draws its random numbers from ``SeedSequence([seed, split_number, i])``: a
test split never shares a pose or a shape with the training split.

On disk: ``manifest.json`` (settings, body, per split count, file and sha256, command, date,
duration, and the commit and machine under ``provenance``) and one uncompressed ``{split}.npz`` per split with the keys of :data:`KEYS`. A dataset
is written to a temporary folder and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..bodies.placed import BodyParameters, PlacedBody
from ..camera import depth_to_points, normals_from_depth
from ..provenance import provenance
from ..render import look_at, render_depth
from .body_pairs import SPLITS, _move_into_place, _seed, _sha256, check_view, temporary_folder
from .body_pairs import intrinsics as pair_intrinsics

__all__ = ["ScanSettings", "generate_scans", "make_scan", "scan_generator", "load_scans", "CONDITIONS", "KEYS", "FORMAT", "intrinsics"]

FORMAT = "diffcp-body-scans"
FORMAT_VERSION = 1
CONDITIONS = ("clean", "noise", "partial")
KEYS = ("depth", "points", "normals", "rotation", "root", "pose", "shape", "vertices", "joints",
        "camera_pose", "condition", "valid_pixels", "index")


@dataclasses.dataclass(frozen=True)
class ScanSettings:
    """How scans are made (see the module docstring). Stored in the manifest."""

    image_size: int = 128
    fov_deg: float = 45.0
    distance: Tuple[float, float] = (2.8, 3.6)
    elevation_deg: Tuple[float, float] = (-10.0, 30.0)
    aim_jitter: float = 0.1
    pose_scales: Tuple[float, ...] = (0.15, 0.15, 0.25, 0.25, 0.4, 0.4, 0.4, 0.4, 0.25, 0.25, 0.25, 0.25)
    shape_ranges: Tuple[Tuple[float, float], ...] = ((0.0, 1.0), (0.4, 0.9), (0.1, 0.9), (0.1, 0.9),
                                                     (0.2, 0.8), (0.1, 0.9))
    num_points: int = 512
    noise_std: float = 0.01
    outlier_fraction: float = 0.02
    outlier_range: float = 0.3
    occluder_fraction: Tuple[float, float] = (0.25, 0.45)
    min_valid_pixels: int = 250

    def __post_init__(self):
        check_view(self, min_image_size=16)
        if not (isinstance(self.num_points, int) and self.num_points >= 1):
            raise ValueError(f"num_points must be a positive integer; got {self.num_points!r}.")
        if not 0 <= self.outlier_fraction < 1 or self.noise_std < 0:
            raise ValueError("noise_std must be >= 0 and outlier_fraction in [0, 1); got "
                             f"{self.noise_std!r} and {self.outlier_fraction!r}.")
        if not 0 < self.occluder_fraction[0] <= self.occluder_fraction[1] < 1:
            raise ValueError(f"occluder_fraction must be (min, max) inside (0, 1); got {self.occluder_fraction!r}.")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "ScanSettings":
        d = dict(d)
        for key in ("distance", "elevation_deg", "pose_scales", "occluder_fraction"):
            d[key] = tuple(d[key])
        d["shape_ranges"] = tuple(tuple(r) for r in d["shape_ranges"])
        return cls(**d)


def intrinsics(settings: ScanSettings) -> Tensor:
    """The ``(3, 3)`` float32 pinhole matrix of the scans: the body pairs' camera model
    (:func:`diffcp.datasets.body_pairs.intrinsics`) at the scans' image size and field of view."""
    return pair_intrinsics(settings)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _draw_body(settings: ScanSettings, g: torch.Generator) -> Tuple[Tensor, Tensor]:
    scales = torch.tensor(settings.pose_scales, dtype=torch.float64)
    pose = torch.randn(len(scales), 3, generator=g, dtype=torch.float64) * scales[:, None]
    shape = torch.tensor([_uniform(g, lo, hi) for lo, hi in settings.shape_ranges], dtype=torch.float64)
    return pose, shape


def _camera(settings: ScanSettings, centre: Tensor, g: torch.Generator) -> Tensor:
    azimuth = _uniform(g, 0.0, 2 * math.pi)
    elevation = math.radians(_uniform(g, *settings.elevation_deg))
    r = _uniform(g, *settings.distance)
    aim = centre + settings.aim_jitter * torch.randn(3, generator=g, dtype=torch.float64)
    d = torch.tensor([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                      math.sin(elevation)], dtype=torch.float64)
    return look_at((aim + r * d)[None], aim)[0]


def _apply_condition(depth: Tensor, condition: int, settings: ScanSettings, g: torch.Generator) -> Tensor:
    depth = depth.clone()
    valid = depth > 0
    if condition == 1:
        noise = settings.noise_std * torch.randn(depth.shape, generator=g, dtype=torch.float64).float()
        depth = torch.where(valid, depth + noise, depth)
        picked = valid & (torch.rand(depth.shape, generator=g) < settings.outlier_fraction)
        shift = (2 * torch.rand(depth.shape, generator=g) - 1) * settings.outlier_range
        depth = torch.where(picked, depth + shift, depth)
    elif condition == 2:
        rows, cols = valid.any(1).nonzero()[:, 0], valid.any(0).nonzero()[:, 0]
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        frac = _uniform(g, *settings.occluder_fraction)
        aspect = _uniform(g, 0.5, 2.0)  # the occluder's share of height over its share of width
        fh, fw = min(1.0, math.sqrt(frac * aspect)), min(1.0, math.sqrt(frac / aspect))
        h, w = max(1, round(fh * (r1 - r0))), max(1, round(fw * (c1 - c0)))
        top = r0 + int(torch.randint(r1 - r0 - h + 1, (), generator=g))
        left = c0 + int(torch.randint(c1 - c0 - w + 1, (), generator=g))
        depth[top:top + h, left:left + w] = 0.0
    return depth


def _points(depth: Tensor, K: Tensor, n: int, g: torch.Generator) -> Tuple[Tensor, Tensor, int]:
    pts, _ = depth_to_points(depth[None], K)
    normals = normals_from_depth(depth[None], K).reshape(1, -1, 3)
    ok = (normals[0].abs().sum(-1) > 0).nonzero(as_tuple=True)[0]
    if ok.numel() == 0:
        return pts.new_zeros(n, 3), pts.new_zeros(n, 3), 0
    pick = ok[torch.randperm(ok.numel(), generator=g)[:n]] if ok.numel() >= n else ok[torch.randint(ok.numel(), (n,), generator=g)]
    return pts[0, pick], normals[0, pick], int(ok.numel())


def scan_generator(seed: int, split: str, index: int) -> torch.Generator:
    """The random-number generator of sample ``index`` of ``split`` in a dataset of seed ``seed``:
    ``make_scan(placed, settings, index % 3, scan_generator(seed, split, index))`` remakes that scan."""
    return torch.Generator().manual_seed(_seed(seed, split, index))


def make_scan(placed: PlacedBody, settings: ScanSettings, condition: int, g: torch.Generator) -> Dict[str, np.ndarray]:
    """One scan (a dict of the :data:`KEYS` but ``index``) of a fresh random body."""
    K = intrinsics(settings)
    n = settings.image_size
    dt = placed.body.dtype
    for attempt in range(50):
        if attempt % 5 == 0:  # a new body every fifth view
            pose, shape = _draw_body(settings, g)
            with torch.no_grad():
                verts, heads = placed.model_frame(pose[None].to(dt), shape[None].to(dt))
            v = verts[0].double()
            centre = (v.amin(0) + v.amax(0)) / 2
        cam = _camera(settings, centre, g)
        R = cam[:3, :3].T  # world -> camera
        t = -R @ cam[:3, 3]
        params = BodyParameters(R[None].to(dt), (R @ heads[0, placed.root_index].double() + t)[None].to(dt),
                                pose[None].to(dt), shape[None].to(dt))
        with torch.no_grad():
            mesh = placed.mesh(params)
        depth = render_depth(mesh.vertices.float(), placed.faces, K, n, n).depth[0]
        depth = _apply_condition(depth, condition, settings, g)
        pts, nrm, count = _points(depth, K, settings.num_points, g)
        if count >= settings.min_valid_pixels:
            break
    else:
        raise RuntimeError(f"no view with {settings.min_valid_pixels} valid pixels in 50 attempts (10 bodies).")
    f32 = lambda x: x.detach().float().numpy()  # noqa: E731
    return {"depth": f32(depth), "points": f32(pts), "normals": f32(nrm), "rotation": f32(params.rotation[0]),
            "root": f32(params.root[0]), "pose": f32(pose), "shape": f32(shape), "vertices": f32(mesh.vertices[0]),
            "joints": f32(mesh.joints[0]), "camera_pose": cam.numpy(), "condition": np.int64(condition),
            "valid_pixels": np.int64(count)}


def _progress(items, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(items, desc=desc, leave=False)
        except ImportError:  # pragma: no cover - tqdm is optional here
            pass
    return items


def generate_scans(out_dir: Union[str, os.PathLike], placed: PlacedBody, counts: Dict[str, int], *, seed: int = 0,
                   settings: ScanSettings = ScanSettings(), overwrite: bool = False, progress: bool = False,
                   command: Optional[Union[str, Sequence[str]]] = None) -> dict:
    """Write a scans dataset folder (see the module docstring) and return its manifest.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False (an existing dataset is only
            replaced once the new one is complete).
    """
    if not isinstance(counts, dict) or not counts or set(counts) - set(SPLITS) or \
            any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts.values()):
        raise ValueError(f"counts must map splits among {SPLITS} to positive integers; got {counts!r}.")
    out = Path(out_dir)
    started = time.time()
    tmp = temporary_folder(out, overwrite)
    try:
        splits = {}
        for split, count in counts.items():
            rows = []
            for i in _progress(range(count), f"{split} scans", progress):
                rows.append(make_scan(placed, settings, i % len(CONDITIONS), scan_generator(seed, split, i)))
            arrays = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            arrays["index"] = np.arange(count, dtype=np.int64)
            with open(tmp / f"{split}.npz", "wb") as f:
                np.savez(f, **arrays)
            splits[split] = {"count": count, "file": f"{split}.npz", "sha256": _sha256(tmp / f"{split}.npz")}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "seed": int(seed),
                    "settings": settings.to_dict(), "intrinsics": intrinsics(settings).tolist(),
                    "body": {"model": placed.body.name, "num_vertices": int(placed.body.num_vertices),
                             "posed_joints": list(placed.posed_joints), "measured_joints": list(placed.measured_joints)},
                    "conditions": list(CONDITIONS), "splits": splits,
                    "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "command": command if command is None or isinstance(command, str) else " ".join(command),
                    "duration_s": round(time.time() - started, 3), "provenance": provenance(command, started)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def load_scans(root: Union[str, os.PathLike], split: str, *, verify: bool = True, limit: Optional[int] = None):
    """``(manifest, arrays)``: one split as a dict of tensors ``(n, ...)`` (float32; ``condition``,
    ``valid_pixels``, ``index`` int64; ``camera_pose`` float64).

    Raises:
        FileNotFoundError: no manifest (generate the dataset first) or no such split.
        ValueError: another format, or a file whose sha256 differs from the manifest.
    """
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"root {str(root)!r} holds no manifest.json; generate the scans first "
                                "(python data_scripts/generate_body_scans.py).")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"root {str(root)!r} holds format {manifest.get('format')!r}; expected {FORMAT!r}.")
    if split not in manifest["splits"]:
        raise FileNotFoundError(f"split must be one of {sorted(manifest['splits'])}; got {split!r}.")
    entry = manifest["splits"][split]
    file = Path(root) / entry["file"]
    if verify and _sha256(file) != entry["sha256"]:
        raise ValueError(f"{str(file)!r} does not match the sha256 in its manifest; regenerate the dataset.")
    with np.load(file) as z:
        arrays = {k: torch.from_numpy(z[k][:limit].copy()) for k in KEYS}
    return manifest, arrays
