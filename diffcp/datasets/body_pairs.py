"""Pairs of depth maps of one posed body: a deterministic registration dataset on disk.

A sample is made in the frame of a camera that looks at the body's centre from a random direction
(uniform on the sphere) at a random distance (``distance``, metres):

1. the source is the body's depth map ``(H, W)`` (z-depth in metres, 0 = background);
2. the body is moved by a random rigid motion ``G`` about its centre - rotation angle uniform in
   ``[0, max_angle_deg]`` about a uniform axis, translation of length uniform in
   ``[0, max_translation]`` in a uniform direction - and rendered again: the target;
3. both maps are back-projected to camera-frame points with normals
   (:func:`diffcp.camera.normals_from_depth`); ``num_points`` are drawn from the pixels with a
   defined normal, with replacement when there are fewer. A view with fewer than
   ``min_valid_pixels`` valid pixels in either map is drawn again.

``transform = G`` maps the source into the target (``y = R x + t``, column vectors, camera
frame). The *initial distance* of a pair is the RMS over its source points of ``|G x - x|``: the
RMS distance between corresponding points before registration (metres).

Each sample's random numbers come from ``numpy.random.SeedSequence([seed, split_number, index])``,
so the data do not depend on the number of workers.

On-disk format (``FORMAT``, version ``FORMAT_VERSION``): a folder with ``manifest.json`` and
uncompressed ``.npz`` shards ``{split}-{k:04d}.npz`` holding, for ``n`` samples,

==================  ==============  =====================================================
key                 shape, dtype    meaning
==================  ==============  =====================================================
source_depth        (n, H, W) f4    source z-depth map, 0 = background
target_depth        (n, H, W) f4    target z-depth map
source_points       (n, P, 3) f4    sampled source points, camera frame
source_normals      (n, P, 3) f4    their unit normals (towards the camera)
target_points       (n, P, 3) f4    sampled target points
target_normals      (n, P, 3) f4    their normals
transform           (n, 4, 4) f8    ground truth source -> target
camera_pose         (n, 4, 4) f8    camera-to-world pose of the camera (body frame)
initial_distance    (n,) f8         RMS |G x - x| over the source points, metres
angle_deg           (n,) f8         rotation angle of G
translation         (n,) f8         length of G's translation (about the body centre)
index               (n,) i8         sample index within the split
==================  ==============  =====================================================

``manifest.json`` holds the format and generator version, seed, settings, intrinsics, the body
(model, topology, pose, shape, vertex checksum), per split the count and every shard's file name,
count and sha256, and the command, date and duration of the run. A dataset is written into a
temporary folder and renamed into place when complete; an existing folder is never replaced
unless asked.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..camera import depth_to_points, intrinsics_matrix, normals_from_depth, world_to_camera
from ..geometry import make_transform, so3_exp, transform_points
from ..render import look_at, render_depth

__all__ = ["PairSettings", "Pair", "make_pair", "generate", "BodyPairs", "load_manifest", "intrinsics",
           "FORMAT", "FORMAT_VERSION", "GENERATOR_VERSION", "SPLITS"]

FORMAT = "diffcp-body-pairs"
FORMAT_VERSION = 1
GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")


def check_view(settings, min_image_size: int) -> None:
    """Check the camera fields shared by the generated datasets' settings: ``image_size``,
    ``fov_deg`` and ``distance`` ``(min, max)``; a ``ValueError`` names the field at fault."""
    if not (isinstance(settings.image_size, int) and settings.image_size >= min_image_size):
        raise ValueError(f"image_size must be an integer >= {min_image_size}; got {settings.image_size!r}.")
    if not 0 < settings.fov_deg < 180:
        raise ValueError(f"fov_deg must lie in (0, 180); got {settings.fov_deg!r}.")
    lo, hi = settings.distance
    if not 0 < lo <= hi:
        raise ValueError(f"distance must be (min, max) with 0 < min <= max; got {settings.distance!r}.")


@dataclasses.dataclass(frozen=True)
class PairSettings:
    """How pairs are made (all lengths in metres). Stored in the manifest."""

    image_size: int = 128
    fov_deg: float = 30.0
    distance: Tuple[float, float] = (2.5, 3.5)
    max_angle_deg: float = 60.0
    max_translation: float = 0.5
    num_points: int = 1024
    min_valid_pixels: int = 200
    max_attempts: int = 50

    def __post_init__(self):
        check_view(self, min_image_size=8)
        if self.max_angle_deg < 0 or self.max_translation < 0:
            raise ValueError("max_angle_deg and max_translation must be >= 0; got "
                             f"{self.max_angle_deg!r} and {self.max_translation!r}.")
        if not (isinstance(self.num_points, int) and self.num_points >= 1):
            raise ValueError(f"num_points must be a positive integer; got {self.num_points!r}.")
        if not (isinstance(self.min_valid_pixels, int) and self.min_valid_pixels >= 4):
            raise ValueError(f"min_valid_pixels must be an integer >= 4; got {self.min_valid_pixels!r}.")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["distance"] = list(self.distance)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PairSettings":
        d = dict(d)
        d["distance"] = tuple(d["distance"])
        return cls(**d)


class Pair(NamedTuple):
    """One sample as numpy arrays (see the module docstring for the meaning of each)."""

    source_depth: np.ndarray
    target_depth: np.ndarray
    source_points: np.ndarray
    source_normals: np.ndarray
    target_points: np.ndarray
    target_normals: np.ndarray
    transform: np.ndarray
    camera_pose: np.ndarray
    initial_distance: float
    angle_deg: float
    translation: float


def intrinsics(settings: PairSettings) -> Tensor:
    """The ``(3, 3)`` float32 pinhole matrix: square pixels, principal point at the image centre.

    Example:
        >>> intrinsics(PairSettings(image_size=8, fov_deg=90.0))
        tensor([[4.0000, 0.0000, 3.5000],
                [0.0000, 4.0000, 3.5000],
                [0.0000, 0.0000, 1.0000]])
    """
    n = settings.image_size
    f = n / 2 / math.tan(math.radians(settings.fov_deg) / 2)
    return intrinsics_matrix(f, f, (n - 1) / 2, (n - 1) / 2)


def _unit(g: torch.Generator, n: int = 1) -> Tensor:
    v = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


def _sample(depth: Tensor, K: Tensor, n: int, g: torch.Generator) -> Tuple[Tensor, Tensor, int]:
    """``n`` points and normals ``(n, 3)`` of a depth map ``(H, W)``; also the number of candidates."""
    pts, _ = depth_to_points(depth[None], K)
    normals = normals_from_depth(depth[None], K).reshape(1, -1, 3)
    ok = (normals[0].abs().sum(-1) > 0).nonzero(as_tuple=True)[0]
    if ok.numel() == 0:
        return pts.new_zeros(n, 3), pts.new_zeros(n, 3), 0
    if ok.numel() >= n:
        pick = ok[torch.randperm(ok.numel(), generator=g)[:n]]
    else:
        pick = ok[torch.randint(ok.numel(), (n,), generator=g)]
    return pts[0, pick], normals[0, pick], int(ok.numel())


def make_pair(vertices: Tensor, faces: Tensor, settings: PairSettings, generator: torch.Generator) -> Pair:
    """Make one pair from a body mesh ``vertices (V, 3)``, ``faces (F, 3)`` (see the module docstring).

    Raises:
        RuntimeError: when ``settings.max_attempts`` views in a row show too few valid pixels.
    """
    K = intrinsics(settings)
    n = settings.image_size
    v = vertices.to(torch.float64)
    centre = (v.amin(0) + v.amax(0)) / 2
    lo, hi = settings.distance
    for _ in range(settings.max_attempts):
        r = lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))
        pose = look_at(centre + r * _unit(generator), centre)
        angle = math.radians(settings.max_angle_deg) * float(torch.rand((), generator=generator, dtype=torch.float64))
        R = so3_exp(_unit(generator)[0] * angle)
        shift = settings.max_translation * float(torch.rand((), generator=generator, dtype=torch.float64))
        t = _unit(generator)[0] * shift
        c = torch.tensor([0.0, 0.0, r], dtype=torch.float64)  # the body centre in the camera frame
        G = make_transform(R, c - R @ c + t)
        x = world_to_camera(pose, v[None])
        both = torch.cat([x, transform_points(G[None], x)]).to(torch.float32)
        depth = render_depth(both, faces, K, n, n).depth
        if bool(((depth > 0).flatten(1).sum(1) >= settings.min_valid_pixels).all()):
            break
    else:
        raise RuntimeError(f"no view with {settings.min_valid_pixels} valid pixels in {settings.max_attempts} attempts.")
    sp, sn, _ = _sample(depth[0], K, settings.num_points, generator)
    tp, tn, _ = _sample(depth[1], K, settings.num_points, generator)
    moved = transform_points(G[None], sp[None].double())[0]
    rms = float((moved - sp.double()).square().sum(-1).mean().sqrt())
    return Pair(depth[0].numpy(), depth[1].numpy(), sp.numpy(), sn.numpy(), tp.numpy(), tn.numpy(),
                G.numpy(), pose[0].numpy(), rms, math.degrees(angle), shift)


def _seed(seed: int, split: str, index: int) -> int:
    state = np.random.SeedSequence([seed, SPLITS.index(split), index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_WORKER: dict = {}


def _init_worker(vertices: np.ndarray, faces: np.ndarray, settings: dict) -> None:
    torch.set_num_threads(1)
    _WORKER.update(vertices=torch.from_numpy(vertices), faces=torch.from_numpy(faces),
                   settings=PairSettings.from_dict(settings))


def _write_shard(task) -> dict:
    """Make samples ``[start, stop)`` of a split and write them to ``folder/name``; return the shard entry."""
    folder, name, split, seed, start, stop = task
    pairs = []
    for i in range(start, stop):
        g = torch.Generator().manual_seed(_seed(seed, split, i))
        pairs.append(make_pair(_WORKER["vertices"], _WORKER["faces"], _WORKER["settings"], g))
    arrays = {key: np.stack([getattr(p, key) for p in pairs]) for key in Pair._fields}
    arrays["index"] = np.arange(start, stop, dtype=np.int64)
    path = Path(folder) / name
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return {"file": name, "count": stop - start, "first_index": start, "sha256": _sha256(path)}


def fixed_body(body, pose_seed: int = 0, pose_scale: float = 0.15, shape: Optional[Tensor] = None):
    """The one posed body of a dataset: ``(vertices (V, 3) float32, faces (F, 3) int64, info dict)``.

    The pose rotates every joint but the root by a random axis-angle with components
    ``N(0, pose_scale^2)`` (radians) drawn from ``pose_seed``; ``shape`` defaults to the model's
    default body. ``info`` (for the manifest) holds the pose, the shape and a vertex checksum.
    """
    g = torch.Generator().manual_seed(int(pose_seed))
    pose = torch.randn(1, body.num_joints, 3, generator=g, dtype=torch.float64) * float(pose_scale)
    pose[:, 0] = 0.0
    shape = body.default_shape(1) if shape is None else shape.reshape(1, -1)
    with torch.no_grad():
        v = body.vertices(pose.to(body.dtype), shape)[0].to(torch.float32).contiguous()
    info = {"model": body.name, "num_vertices": int(v.shape[0]), "num_faces": int(body.faces.shape[0]),
            "pose_seed": int(pose_seed), "pose_scale": float(pose_scale),
            "shape": [float(s) for s in shape.flatten()], "shape_labels": getattr(body, "shape_labels", None),
            "vertices_sha256": hashlib.sha256(v.numpy().tobytes()).hexdigest()}
    return v, body.faces.clone(), info


def _check_counts(counts) -> Dict[str, int]:
    if not isinstance(counts, dict) or not counts or set(counts) - set(SPLITS):
        raise ValueError(f"counts must be a non-empty dict with keys among {SPLITS}; got {counts!r}.")
    for split, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"counts[{split!r}] must be an integer >= 0; got {n!r}.")
    return {s: counts[s] for s in SPLITS if s in counts}


def _run_tasks(tasks, vertices, faces, settings, workers, progress):
    initargs = (vertices.numpy(), faces.numpy(), settings.to_dict())
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=sum(t[5] - t[4] for t in tasks), unit="pair", desc="body pairs")
        except ImportError:  # pragma: no cover - tqdm is optional here
            bar = None
    results = []
    if workers == 1:
        _init_worker(*initargs)
        iterator = map(_write_shard, tasks)
        pool = None
    else:
        # spawned workers inherit the environment at their start: one thread each. The parent's own
        # values come back at once (numba refuses a NUMBA_NUM_THREADS that changes after its pool started).
        saved = {var: os.environ.get(var) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
        os.environ.update({var: "1" for var in saved})
        try:
            pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=initargs)
        finally:
            for var, value in saved.items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value
        iterator = pool.imap_unordered(_write_shard, tasks)
    try:
        for entry in iterator:
            results.append(entry)
            if bar is not None:
                bar.update(entry["count"])
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()
    return sorted(results, key=lambda e: e["file"])


def temporary_folder(out: Path, overwrite: bool) -> Path:
    """An empty folder beside ``out`` to write a dataset into before :func:`_move_into_place`.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False.
    """
    if out.exists() and not overwrite:
        raise FileExistsError(f"out_dir {str(out)!r} already exists; refusing to overwrite a dataset "
                              "(pass overwrite=True / --overwrite, or choose another folder).")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``; an existing ``out`` is moved aside first and
    deleted only once the new one is in place."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)


def generate(out_dir: Union[str, os.PathLike], vertices: Tensor, faces: Tensor, counts: Dict[str, int], *,
             seed: int = 0, settings: PairSettings = PairSettings(), body_info: Optional[dict] = None,
             workers: int = 1, shard_size: int = 250, overwrite: bool = False, progress: bool = False,
             command: Optional[Union[str, Sequence[str]]] = None) -> dict:
    """Generate a dataset folder (see the module docstring) and return its manifest.

    Args:
        out_dir: the dataset folder; it must not exist unless ``overwrite`` (then it is replaced
            only once the new dataset is complete).
        vertices, faces: the body mesh ``(V, 3)``, ``(F, 3)`` (see :func:`fixed_body`).
        counts: samples per split, e.g. ``{"train": 500, "val": 100, "test": 200}``.
        seed: the dataset seed.
        settings: :class:`PairSettings`.
        body_info: what to record about the body in the manifest.
        workers: processes (each with one thread); the data do not depend on it.
        shard_size: samples per ``.npz`` shard.
        overwrite: replace an existing ``out_dir``.
        progress: show a tqdm bar.
        command: the command line to record.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    counts = _check_counts(counts)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer; got {workers!r}.")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer; got {shard_size!r}.")
    out = Path(out_dir)
    started = time.time()
    tmp = temporary_folder(out, overwrite)
    try:
        tasks = [(str(tmp), f"{split}-{k // shard_size:04d}.npz", split, int(seed), k, min(k + shard_size, n))
                 for split, n in counts.items() for k in range(0, n, shard_size)]
        shards = _run_tasks(tasks, vertices, faces, settings, workers, progress)
        duration = time.time() - started
        total = sum(counts.values())
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "generator_version": GENERATOR_VERSION,
            "seed": int(seed), "settings": settings.to_dict(),
            "intrinsics": intrinsics(settings).tolist(), "body": body_info or {},
            "splits": {s: {"count": n, "shards": [e for e in shards if e["file"].startswith(s + "-")]}
                       for s, n in counts.items()},
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command if command is None or isinstance(command, str) else " ".join(command),
            "workers": workers, "duration_s": round(duration, 3),
            "pairs_per_minute": round(60 * total / duration, 1) if duration > 0 else None,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def load_manifest(root: Union[str, os.PathLike]) -> dict:
    """Read and check a dataset's ``manifest.json``.

    Raises:
        FileNotFoundError: no manifest in ``root``.
        ValueError: not this format, or a newer format version.
    """
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"root {str(root)!r} holds no manifest.json; generate the dataset first "
                                "(python data_scripts/generate_body_pairs.py).")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"root {str(root)!r} holds format {manifest.get('format')!r} version "
                         f"{manifest.get('format_version')!r}; expected {FORMAT!r} version <= {FORMAT_VERSION}.")
    return manifest


class BodyPairs(torch.utils.data.Dataset):
    """One split of a body-pairs dataset, in memory, as tensors.

    Args:
        root: the dataset folder.
        split: ``"train"``, ``"val"`` or ``"test"``.
        verify: check every shard's sha256 against the manifest.
        limit: keep only the first ``limit`` samples.

    ``dataset[i]`` is a dict of tensors with the keys of the on-disk format (depth maps
    ``(H, W)``, points ``(P, 3)``, ``transform (4, 4)`` float32, scalars as 0-d tensors).
    ``dataset.arrays`` holds the whole split as ``(n, ...)`` tensors.
    """

    def __init__(self, root: Union[str, os.PathLike], split: str = "train", *, verify: bool = True,
                 limit: Optional[int] = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        if split not in self.manifest["splits"]:
            raise ValueError(f"split {split!r} is not in the dataset at {str(root)!r}; it has "
                             f"{sorted(self.manifest['splits'])}.")
        parts = []
        for entry in self.manifest["splits"][split]["shards"]:
            path = self.root / entry["file"]
            if verify and _sha256(path) != entry["sha256"]:
                raise ValueError(f"shard {str(path)!r} does not match its sha256 in the manifest; regenerate it.")
            with np.load(path) as z:
                parts.append({k: z[k] for k in z.files})
        keys = list(Pair._fields) + ["index"]
        arrays = {k: torch.from_numpy(np.concatenate([p[k] for p in parts])) for k in keys} if parts else {}
        if limit is not None:
            arrays = {k: a[:limit] for k, a in arrays.items()}
        for k in ("transform", "camera_pose"):
            if k in arrays:
                arrays[k] = arrays[k].to(torch.float32)
        self.arrays = arrays
        self.split = split
        self.intrinsics = torch.tensor(self.manifest["intrinsics"], dtype=torch.float32)

    def __len__(self) -> int:
        return int(self.arrays["index"].shape[0]) if self.arrays else 0

    def __getitem__(self, i: int) -> Dict[str, Tensor]:
        return {k: a[i] for k, a in self.arrays.items()}
