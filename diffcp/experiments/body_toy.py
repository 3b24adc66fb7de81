"""Experiment 1: a CNN predicts the pose between two depth maps of a body, differentiable ICP refines it.

Four methods, all mapping the source points into the target (``y = R x + t``, camera frame):

- ``cnn``: the :class:`~diffcp.models.pose_cnn.PoseCNN` alone, trained on the loss below;
- ``cnn_icp``: the CNN's transform as ICP's ``init``, trained end to end with the loss *after* ICP
  (soft-NN ICP unrolled: ``backward="implicit"`` would send no gradient to ``init``, since the fixed
  point does not depend on it);
- ``cnn_then_icp``: the ``cnn`` network, with ICP added at test time only;
- ``icp``: ICP alone from the identity.

With ``evaluate --icp-variants`` (:data:`VARIANT_METHODS`), also classic ICP variants at test time
only, on the same pairs and with the same schedule (:class:`ICPVariant`, :func:`variant_stages`):
hard nearest neighbours with point-to-point Procrustes (``icp_nn``) or point-to-plane Gauss-Newton
(``icp_nn_plane``), and projective association into the target depth map with point-to-plane
Gauss-Newton (``icp_projective``), each from the identity and after the ``cnn`` network
(``cnn_then_icp_nn``, ``cnn_then_icp_nn_plane``, ``cnn_then_icp_projective``).

Error of a transform ``T`` on a pair with ground truth ``G`` and source points ``x_i``:
``e(T) = sqrt(mean_i |T x_i - G x_i|^2)`` (metres). The training loss is its batch mean. The
*initial distance* of a pair is ``e(I)``, the RMS distance between corresponding points before
registration; a method succeeds on a pair when ``e(T) < threshold`` (3 cm and 30 cm).

Every ICP call goes through :func:`refine` (one place to port when the ICP API changes).

Usage::

    python -m diffcp.experiments.body_toy train --data data/body_pairs --method cnn --out runs/body_toy/cnn
    python -m diffcp.experiments.body_toy evaluate --data data/body_pairs --runs runs/body_toy \
        --json book/_data/body_toy.json
    python -m diffcp.experiments.body_toy run --data data/body_pairs --runs runs/body_toy   # both
    python -m diffcp.experiments.body_toy evaluate ... --icp-variants   # also the ICP variants

Training writes ``OUT/checkpoint.pt`` atomically after every epoch and resumes from it (same
result as an uninterrupted run; deterministic on a CPU for a fixed seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

import diffcp

from ..datasets.body_pairs import BodyPairs, load_manifest
from ..geometry import transform_points
from ..models.pose_cnn import PoseCNN
from ..provenance import atomic_write, provenance
from .progress import progress_bar
from ..settings import (DistanceRejection, GaussNewtonSolver, ICPSettings, NearestNeighbor, ProjectiveAssociation,
                        SoftNearestNeighbor, Stopping)

__all__ = ["RefineSettings", "TrainSettings", "EvalSettings", "ICPVariant", "VARIANTS", "refine", "variant_stages",
           "refine_variant", "transform_error", "predict", "train", "evaluate", "success_curves", "main", "METHODS",
           "VARIANT_METHODS"]

METHODS = ("cnn", "cnn_icp", "cnn_then_icp", "icp")
TRAINED = ("cnn", "cnn_icp")  # methods with a training run of their own


@dataclasses.dataclass(frozen=True)
class ICPVariant:
    """A test-time-only ICP of :func:`variant_stages`: which ``correspondence`` (``"nn"``: hard
    nearest neighbours among the target points; ``"projective"``: the pixel of the target depth map
    that a moved source point projects to) and which ``metric`` (``"point_to_point"``: Procrustes;
    ``"point_to_plane"``: one Gauss-Newton step per iteration)."""

    correspondence: str
    metric: str

    def __post_init__(self):
        if self.correspondence not in ("nn", "projective"):
            raise ValueError(f"correspondence must be 'nn' or 'projective'; got {self.correspondence!r}.")
        if self.metric not in ("point_to_point", "point_to_plane"):
            raise ValueError(f"metric must be 'point_to_point' or 'point_to_plane'; got {self.metric!r}.")


# the ICP variants evaluated with --icp-variants: method "icp_X" from the identity, "cnn_then_icp_X" after the CNN
VARIANTS = {"icp_nn": ICPVariant("nn", "point_to_point"),
            "icp_nn_plane": ICPVariant("nn", "point_to_plane"),
            "icp_projective": ICPVariant("projective", "point_to_plane")}
VARIANT_METHODS = tuple(VARIANTS) + tuple("cnn_then_" + v for v in VARIANTS)
NETWORK_OF = {"cnn": "cnn", "cnn_icp": "cnn_icp", "cnn_then_icp": "cnn", "icp": None,
              **{v: None for v in VARIANTS}, **{"cnn_then_" + v: "cnn" for v in VARIANTS}}


@dataclasses.dataclass(frozen=True)
class RefineSettings:
    """The ICP of :func:`refine`: ``iterations`` in all, the last ``reject_iterations`` of them with
    soft rejection of pairs farther apart than ``reject_distance`` (metres); ``temperature`` of the
    soft correspondences (None: diffcp's scale-aware default)."""

    iterations: int = 10
    reject_iterations: int = 3
    reject_distance: float = 0.05
    temperature: Optional[float] = None

    def __post_init__(self):
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be a positive integer; got {self.iterations!r}.")
        if not isinstance(self.reject_iterations, int) or not 0 <= self.reject_iterations <= self.iterations:
            raise ValueError(f"reject_iterations must be an integer in [0, iterations={self.iterations}]; "
                             f"got {self.reject_iterations!r}.")
        if not self.reject_distance > 0:
            raise ValueError(f"reject_distance must be positive; got {self.reject_distance!r}.")

    def stages(self) -> List[Tuple[int, ICPSettings]]:
        """The two ICP runs of :func:`refine` as ``(iterations, settings)``: soft nearest neighbours,
        point-to-point Procrustes, every iteration unrolled; the second adds soft rejection."""
        soft = SoftNearestNeighbor(temperature=self.temperature)
        coarse = self.iterations - self.reject_iterations
        return [(n, ICPSettings(correspondence=soft, rejection=rejection, backward="unroll",
                                stopping=Stopping(max_iterations=max(n, 1), tolerance=0.0)))
                for n, rejection in ((coarse, ()),
                                     (self.reject_iterations, (DistanceRejection(self.reject_distance, temperature=1e-4),)))]


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Training settings (stored in the checkpoint; a resumed run must use the same)."""

    method: str = "cnn"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0
    icp: RefineSettings = RefineSettings()
    train_limit: Optional[int] = None

    def __post_init__(self):
        if self.method not in TRAINED:
            raise ValueError(f"method must be one of {TRAINED} to be trained; got {self.method!r}.")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if not self.lr > 0 or not self.clip_norm > 0:
            raise ValueError(f"lr and clip_norm must be positive; got {self.lr!r} and {self.clip_norm!r}.")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Evaluation settings. ``bin_edges``: initial-distance bins in metres; the last is open."""

    icp: RefineSettings = RefineSettings(iterations=30, reject_iterations=10)
    batch_size: int = 64
    thresholds: Tuple[float, float] = (0.03, 0.3)
    bin_edges: Tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
    test_limit: Optional[int] = None


def refine(source: Tensor, target: Tensor, init: Tensor, settings: RefineSettings = RefineSettings(), *,
           differentiable: bool = True) -> Tensor:
    """Refine ``init (B, 4, 4)`` by ICP of ``source (B, N, 3)`` onto ``target (B, M, 3)``; ``(B, 4, 4)``.

    The ICP this experiment means (:meth:`RefineSettings.stages`, stored with the results):
    soft nearest-neighbour correspondences (``temperature``; None = diffcp's scale-aware default,
    0.1 x the median squared point spacing of the target), point-to-point metric minimised in
    closed form (Procrustes), no weighting, exactly ``iterations`` iterations (tolerance 0, no early
    stop), of which the last ``reject_iterations`` reject pairs farther apart than
    ``reject_distance`` metres softly (sigmoid, rejection temperature 1e-4 m; all from
    ``settings``, a :class:`RefineSettings`), gradients by
    unrolling every iteration (so they reach ``init``). With ``differentiable=False`` no graph.

    Why: point-to-plane with one Gauss-Newton step per iteration diverged from starts 0.3-0.7 m off
    (errors of metres, gradient norms of 1e13); Procrustes without rejection never moved a pair
    beyond 0.6 m but settles ~2 cm off (partial overlap biases it: 61 % of 64 pairs within 3 cm
    even when started at the truth); rejection alone is accurate (94 %) but narrows the basin
    (19 % from the identity). Both stages: 70 % from the identity with 20 + 10 iterations.
    """
    T = init
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        for n, icp_settings in settings.stages():
            if n > 0:
                T = diffcp.icp(source, target, icp_settings, init=T).transform
    return T


def variant_stages(variant: ICPVariant, schedule: RefineSettings = RefineSettings(),
                   intrinsics: Optional[Tensor] = None) -> List[Tuple[int, ICPSettings]]:
    """The ICP runs of an :class:`ICPVariant` as ``(iterations, settings)``, on the schedule of
    :meth:`RefineSettings.stages`: ``schedule.iterations`` in all, the last
    ``schedule.reject_iterations`` of them rejecting pairs farther apart than
    ``schedule.reject_distance`` (hard rejection: these variants are classic ICP, not differentiable
    in their matches). ``intrinsics``: the ``(3, 3)`` pinhole matrix of the target depth map, needed
    by projective association.

    The projective camera: ``body_pairs`` renders both depth maps with one camera and back-projects
    them into *its* frame, the frame of the points and of the transforms; so the target depth map is
    seen by ``intrinsics`` (the manifest's) with camera pose the identity (the dataset's
    ``camera_pose`` is the camera in the body's frame, which the points are not in).
    """
    if variant.correspondence == "nn":
        correspondence = NearestNeighbor()
    else:
        if intrinsics is None:
            raise ValueError("projective association needs the intrinsics of the target depth map.")
        correspondence = ProjectiveAssociation(intrinsics, None, "nearest")
    solver = "procrustes" if variant.metric == "point_to_point" else GaussNewtonSolver()
    coarse = schedule.iterations - schedule.reject_iterations
    return [(n, ICPSettings(correspondence=correspondence, metric=variant.metric, solver=solver, rejection=rejection,
                            backward="unroll", stopping=Stopping(max_iterations=max(n, 1), tolerance=0.0)))
            for n, rejection in ((coarse, ()),
                                 (schedule.reject_iterations, (DistanceRejection(schedule.reject_distance),)))]


def refine_variant(batch: Dict[str, Tensor], init: Tensor, stages: List[Tuple[int, ICPSettings]]) -> Tensor:
    """Run the stages of :func:`variant_stages` on a batch (dict of stacked dataset tensors) from
    ``init (B, 4, 4)``, without gradients; ``(B, 4, 4)``. Point-to-plane with hard neighbours uses
    the stored target normals; projective association matches into ``target_depth`` and takes its
    normals from the depth map (:func:`diffcp.camera.normals_from_depth`)."""
    T = init
    with torch.no_grad(), warnings.catch_warnings():
        # a depth map seen from one side often leaves a direction unconstrained; the result is still defined
        warnings.filterwarnings("ignore", message="ICP: the transform is ambiguous")
        for n, st in stages:
            if n == 0:
                continue
            if isinstance(st.correspondence, ProjectiveAssociation):
                T = diffcp.icp(batch["source_points"], batch["target_depth"], st, init=T).transform
            else:
                normals = batch["target_normals"] if st.needs_target_normals else None
                T = diffcp.icp(batch["source_points"], batch["target_points"], st, init=T,
                               target_normals=normals).transform
    return T


def transform_error(T: Tensor, G: Tensor, points: Tensor) -> Tensor:
    """``e(T) = sqrt(mean_i |T x_i - G x_i|^2)`` per pair, ``(B,)``, for ``points (B, N, 3)``.

    Example:
        >>> G = torch.eye(4).expand(1, 4, 4).clone(); G[0, 0, 3] = 0.1
        >>> transform_error(torch.eye(4)[None], G, torch.zeros(1, 5, 3))
        tensor([0.1000])
    """
    diff = transform_points(T, points) - transform_points(G, points)
    return diff.square().sum(-1).mean(-1).clamp_min(1e-20).sqrt()


def predict(method: str, net: Optional[PoseCNN], batch: Dict[str, Tensor], icp: RefineSettings = RefineSettings(),
            *, differentiable: bool = False, intrinsics: Optional[Tensor] = None) -> Tensor:
    """The transform ``(B, 4, 4)`` a method gives for a batch (dict of stacked dataset tensors).

    The methods of :data:`VARIANT_METHODS` run their ICP on the schedule ``icp`` (without
    gradients); the projective ones need the target's ``intrinsics`` ``(3, 3)``."""
    if method not in METHODS + VARIANT_METHODS:
        raise ValueError(f"method must be one of {METHODS + VARIANT_METHODS}; got {method!r}.")
    B = batch["source_points"].shape[0]
    if NETWORK_OF[method] is None:
        init = torch.eye(4, dtype=batch["source_points"].dtype).expand(B, 4, 4)
    else:
        init = net(batch["source_depth"], batch["target_depth"])
        if method == "cnn":
            return init
    if method in VARIANT_METHODS:
        variant = VARIANTS[method[len("cnn_then_"):] if method.startswith("cnn_then_") else method]
        return refine_variant(batch, init, variant_stages(variant, icp, intrinsics))
    return refine(batch["source_points"], batch["target_points"], init, icp, differentiable=differentiable)


def _batches(n: int, batch_size: int, generator: Optional[torch.Generator]) -> List[Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


def _take(arrays: Dict[str, Tensor], index: Tensor) -> Dict[str, Tensor]:
    return {k: v[index] for k, v in arrays.items()}


def _manifest_sha256(root) -> str:
    return hashlib.sha256((Path(root) / "manifest.json").read_bytes()).hexdigest()


def _save_atomic(obj, path: Path) -> None:
    """``torch.save`` through :func:`diffcp.provenance.atomic_write`: a checkpoint is never half-written."""
    atomic_write(path, lambda f: torch.save(obj, f))


class TrainResult(NamedTuple):
    """What :func:`train` returns."""

    checkpoint: Path
    net: PoseCNN
    history: List[dict]


def _load_or_start(out: Path, settings: TrainSettings, data_sha: str):
    """A fresh network and optimiser, or the state in ``out/checkpoint.pt`` (same settings and data)."""
    torch.manual_seed(settings.seed)
    net = PoseCNN()
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    path = out / "checkpoint.pt"
    if not path.exists():
        return net, opt, 0, []
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["settings"] != dataclasses.asdict(settings) or state["data_sha256"] != data_sha:
        raise ValueError(f"out_dir {str(out)!r} holds a checkpoint of other settings or data; "
                         "choose another folder or delete it to start again.")
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return net, opt, int(state["epoch"]), list(state["history"])


def _epoch(net, opt, data: Dict[str, Tensor], settings: TrainSettings, epoch: int, progress: bool) -> dict:
    g = torch.Generator().manual_seed(settings.seed * 100003 + epoch)  # the order depends on the epoch only
    batches = _batches(data["index"].shape[0], settings.batch_size, g)
    losses, norms, times = [], [], []
    bar = progress_bar(batches, f"{settings.method} epoch {epoch + 1}/{settings.epochs}", progress)
    net.train()
    for index in bar:
        t0 = time.perf_counter()
        batch = _take(data, index)
        T = predict(settings.method, net, batch, settings.icp, differentiable=True)
        loss = transform_error(T, batch["transform"], batch["source_points"]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # gradients through unrolled ICP range over orders of magnitude: clip their norm
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), settings.clip_norm)))
        opt.step()
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - t0)
    finite = [n for n in norms if math.isfinite(n)]
    return {"epoch": epoch + 1, "train_loss": sum(losses) / len(losses),
            "grad_norm_median": float(torch.tensor(finite).median()) if finite else None,
            "grad_norm_max": max(finite) if finite else None, "nonfinite_grads": len(norms) - len(finite),
            "step_seconds_median": float(torch.tensor(times).median()), "epoch_seconds": sum(times)}


def train(data_root, out_dir, settings: TrainSettings = TrainSettings(), *, progress: bool = True,
          stop_after: Optional[int] = None) -> TrainResult:
    """Train the CNN of ``settings.method`` (``"cnn"`` or ``"cnn_icp"``) on the train split.

    Resumes from ``out_dir/checkpoint.pt`` when it exists (same settings and data required);
    writes it atomically after every epoch. ``stop_after`` ends the call after that many epochs
    of this call (a stand-in for a kill, used by the tests).
    """
    torch.set_num_threads(1)
    out = Path(out_dir)
    data_sha = _manifest_sha256(data_root)
    data = BodyPairs(data_root, "train", limit=settings.train_limit).arrays
    val = BodyPairs(data_root, "val").arrays if "val" in load_manifest(data_root)["splits"] else None
    net, opt, start, history = _load_or_start(out, settings, data_sha)
    for epoch in range(start, settings.epochs):
        if stop_after is not None and epoch - start >= stop_after:
            break
        record = _epoch(net, opt, data, settings, epoch, progress)
        if val is not None:
            record["val_error_median"] = float(_errors(settings.method, net, val, settings.icp, 64).median())
        history.append(record)
        _save_atomic({"settings": dataclasses.asdict(settings), "data_sha256": data_sha, "epoch": epoch + 1,
                      "model": net.state_dict(), "optimizer": opt.state_dict(), "history": history},
                     out / "checkpoint.pt")
        print(json.dumps(record), flush=True)
    return TrainResult(out / "checkpoint.pt", net, history)


def _errors(method, net, arrays, icp: RefineSettings, batch_size: int, intrinsics: Optional[Tensor] = None) -> Tensor:
    """``e(T)`` of a method on every pair of a split, ``(n,)``, without gradients."""
    if net is not None:
        net.eval()
    out = []
    with torch.no_grad():
        for index in _batches(arrays["index"].shape[0], batch_size, None):
            batch = _take(arrays, index)
            T = predict(method, net, batch, icp, intrinsics=intrinsics)
            out.append(transform_error(T, batch["transform"], batch["source_points"]))
    return torch.cat(out)


def success_curves(initial: Tensor, errors: Tensor, bin_edges: Sequence[float], thresholds: Sequence[float]) -> dict:
    """Success rates per initial-distance bin: ``{"initial_distance_bins": [[lo, hi], ...] (last hi
    None: open), "success_3cm": [...], "success_30cm": [...], "n": [...]}`` (rates None in empty bins).

    Example:
        >>> c = success_curves(torch.tensor([0.01, 0.2, 0.3]), torch.tensor([0.01, 0.1, 0.5]), [0, 0.1], [0.03, 0.3])
        >>> c["n"], c["success_3cm"], c["success_30cm"]
        ([1, 2], [1.0, 0.0], [1.0, 0.5])
    """
    edges = list(bin_edges)
    bins = [[float(lo), float(hi)] for lo, hi in zip(edges[:-1], edges[1:])] + [[float(edges[-1]), None]]
    which = torch.bucketize(initial.double(), torch.tensor(edges[1:], dtype=torch.float64), right=True)
    curves = {"initial_distance_bins": bins, "n": []}
    keys = [f"success_{round(t * 100)}cm" for t in thresholds]
    for key in keys:
        curves[key] = []
    for b in range(len(bins)):
        mask = which == b
        curves["n"].append(int(mask.sum()))
        for key, t in zip(keys, thresholds):
            curves[key].append(float((errors[mask] < t).double().mean()) if mask.any() else None)
    return curves


def evaluate(data_root, networks: Dict[str, Optional[PoseCNN]], settings: EvalSettings = EvalSettings(),
             methods: Sequence[str] = METHODS) -> dict:
    """Evaluate ``methods`` (of :data:`METHODS` and :data:`VARIANT_METHODS`) on the test split:
    ``{"curves": {METHOD: ...}, "summary": {METHOD: ...}}``.

    ``networks`` maps a training-run name (``"cnn"``, ``"cnn_icp"``) to its trained network.
    A non-finite error (a diverged ICP) counts as a failure; the summary then gives their number.
    """
    torch.set_num_threads(1)
    pairs = BodyPairs(data_root, "test", limit=settings.test_limit)
    test = pairs.arrays
    curves, summary = {}, {}
    for method in methods:
        net = networks.get(NETWORK_OF[method]) if NETWORK_OF.get(method) else None
        if method not in METHODS + VARIANT_METHODS or (NETWORK_OF[method] and net is None):
            raise ValueError(f"method {method!r} needs the trained network {NETWORK_OF.get(method)!r}; "
                             f"got networks {sorted(networks)}.")
        t0 = time.perf_counter()
        errors = _errors(method, net, test, settings.icp, settings.batch_size, pairs.intrinsics)
        seconds = time.perf_counter() - t0
        nonfinite = int((~torch.isfinite(errors)).sum())
        errors = torch.nan_to_num(errors, nan=math.inf)  # fails every threshold; sorts last for the median
        curves[method] = success_curves(test["initial_distance"], errors, settings.bin_edges, settings.thresholds)
        median = float(errors.median())
        summary[method] = {"n": int(errors.numel()), "error_median_m": median if math.isfinite(median) else None,
                           **({"n_nonfinite": nonfinite} if nonfinite else {}),
                           **{f"success_{round(t * 100)}cm": float((errors < t).double().mean())
                              for t in settings.thresholds},
                           "seconds_per_pair": seconds / errors.numel()}
    return {"curves": curves, "summary": summary}


def _write_json_atomic(path: Path, payload: dict) -> None:
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_record(path, data_root, evaluation: dict, settings: dict, command, started: float) -> Path:
    """Write the result of record: provenance (command, commit, machine, date, duration, data
    manifest), settings, curves and summary; atomically."""
    manifest = load_manifest(data_root)
    record = provenance(command=command, started=started)
    record["data_manifest"] = {
        "path": str(data_root), "sha256": _manifest_sha256(data_root), "seed": manifest["seed"],
        "generator_version": manifest["generator_version"], "format_version": manifest["format_version"],
        "counts": {s: v["count"] for s, v in manifest["splits"].items()}, "settings": manifest["settings"],
        "body": {k: v for k, v in manifest["body"].items() if k != "shape_labels"}}
    payload = {"provenance": record, "settings": settings, **evaluation}
    _write_json_atomic(Path(path), payload)
    return Path(path)


def _load_network(run_dir: Path) -> Tuple[PoseCNN, dict]:
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    net = PoseCNN()
    net.load_state_dict(state["model"])
    return net, state


def _variant_record(data_root, schedule: RefineSettings) -> dict:
    """What the results file says about each ICP variant: its methods, a description and its stages
    as :meth:`diffcp.ICPSettings.to_dict` data."""
    K = torch.tensor(load_manifest(data_root)["intrinsics"], dtype=torch.float32)
    out = {}
    for name, variant in VARIANTS.items():
        how = ("hard nearest neighbours among the target points" if variant.correspondence == "nn" else
               "projective association: the nearest pixel of the target depth map, target camera = the "
               "dataset's intrinsics with the identity pose (the points' frame), normals from the depth map")
        solver = "Procrustes" if variant.metric == "point_to_point" else "one Gauss-Newton step per iteration"
        out[name] = {"methods": [name, "cnn_then_" + name], "correspondence": variant.correspondence,
                     "metric": variant.metric,
                     "description": f"{how}; {variant.metric.replace('_', '-')} metric, {solver}; "
                                    f"{schedule.iterations} iterations, the last {schedule.reject_iterations} "
                                    f"with hard rejection beyond {schedule.reject_distance} m; test time only",
                     "stages": [{"iterations": n, "settings": st.to_dict()}
                                for n, st in variant_stages(variant, schedule, K)]}
    return out


def _settings_from_args(args, method: str) -> TrainSettings:
    return TrainSettings(method=method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         clip_norm=args.clip_norm, seed=args.seed, train_limit=args.train_limit,
                         icp=RefineSettings(args.train_icp_iterations, args.train_reject_iterations,
                                            args.reject_distance, args.temperature))


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m diffcp.experiments.body_toy", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("train", "evaluate", "run"))
    p.add_argument("--data", default="data/body_pairs", help="dataset folder (data_scripts/generate_body_pairs.py)")
    p.add_argument("--runs", default="runs/body_toy", help="folder of the training runs (RUNS/cnn, RUNS/cnn_icp)")
    p.add_argument("--method", choices=TRAINED, action="append", help="train only these (default: both)")
    p.add_argument("--json", default="book/_data/body_toy.json", help="where evaluate writes the result")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-icp-iterations", type=int, default=10)
    p.add_argument("--test-icp-iterations", type=int, default=30)
    p.add_argument("--train-reject-iterations", type=int, default=3, help="of the train ICP iterations, the last ones with rejection")
    p.add_argument("--test-reject-iterations", type=int, default=10)
    p.add_argument("--reject-distance", type=float, default=0.05, help="metres")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--icp-variants", action="store_true",
                   help="also evaluate the test-time ICP variants (hard NN point-to-point and point-to-plane, "
                        "projective point-to-plane), from the identity and after the cnn network")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    started = time.time()
    torch.set_num_threads(1)
    runs = Path(args.runs)
    if args.command in ("train", "run"):
        for method in args.method or TRAINED:
            train(args.data, runs / method, _settings_from_args(args, method), progress=not args.no_progress)
    if args.command in ("evaluate", "run"):
        networks, histories = {}, {}
        for name in TRAINED:
            if (runs / name / "checkpoint.pt").exists():
                networks[name], state = _load_network(runs / name)
                histories[name] = {"settings": state["settings"], "history": state["history"]}
        methods = [m for m in METHODS + (VARIANT_METHODS if args.icp_variants else ())
                   if NETWORK_OF[m] is None or NETWORK_OF[m] in networks]
        ev = EvalSettings(icp=RefineSettings(args.test_icp_iterations, args.test_reject_iterations,
                                             args.reject_distance, args.temperature), test_limit=args.test_limit)
        result = evaluate(args.data, networks, ev, methods)
        icp_text = " ".join(refine.__doc__.split("\n\n")[1].split())
        settings = {"evaluation": {**dataclasses.asdict(ev), "icp_description": icp_text,
                                   "icp_stages": [{"iterations": n, "settings": st.to_dict()}
                                                  for n, st in ev.icp.stages()],
                                   **({"icp_variants": _variant_record(args.data, ev.icp)}
                                      if args.icp_variants else {})},
                    "training": histories,
                    "error": "e(T) = sqrt(mean_i |T x_i - G x_i|^2) over the source points, metres",
                    "initial_distance": "e(I): RMS distance between corresponding points before registration",
                    "success": "e(T) < threshold (3 cm, 30 cm)"}
        path = write_record(args.json, args.data, result, settings,
                            ["python", "-m", "diffcp.experiments.body_toy"] + argv, started)
        print(json.dumps(result["summary"], indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
