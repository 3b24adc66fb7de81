"""Experiment 3: non-rigid fitting of a body model to depth scans, with and without a network.

Commands (``python -m diffcp.experiments.body_fit {train,evaluate,merge,export} --help``):

- ``train``: a :class:`~diffcp.models.body_cnn.BodyCNN` on the train split of a scans dataset
  (:mod:`diffcp.datasets.body_scans`). The loss is the mean vertex error plus the mean joint
  error (metres) of the body the network predicts (``--method alone``) or of the body after
  ``--fit-iterations`` differentiable iterations (half of them rigid only) of
  :func:`diffcp.nonrigid.fit_body` started from that
  prediction (``--method end_to_end``; gradients flow through the unrolled fit), plus
  ``parameter_weight`` times the squared errors of rotation, pose and shape (the same loss on
  the final output of either method). ``--init RUN``
  starts from another run's weights. One thread, seeded batch order, gradient norm clipped to
  ``clip_norm`` in both methods; ``RUN/checkpoint.pt`` is written atomically every epoch and a run
  resumes from it to the same weights.
- ``evaluate``: on the test split (unseen poses and shapes; clean, noisy and partial scans), the
  vertex and joint errors (mm) and success rates of: the network alone; the fit alone from the
  mean body (one upright start facing the camera; or the start, among four turned by 90 degrees,
  whose rigid-only fit ends at the lowest energy);
  the network followed by the fit at test time; the network trained through the fit, followed
  by the fit. Writes ``book/_data/body_fit.json`` with the provenance of every run. ``--methods``
  with ``--part FILE`` evaluates some methods only; ``merge PART...`` joins such parts (same data,
  networks and fit settings) into the results file, keeping each part's provenance.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..bodies.anny import LOW_RESOLUTION, AnnyBody
from ..bodies.placed import BodyParameters, PlacedBody
from ..datasets.body_scans import load_scans
from ..models.body_cnn import BodyCNN
from ..nonrigid import BodyFitSettings, fit_body, joint_error, mean_body_start, vertex_error
from ..provenance import atomic_write, provenance, write_result
from .progress import progress_bar

__all__ = ["TrainSettings", "train", "load_network", "export_weights", "evaluate", "summarise", "METHODS", "THRESHOLDS_MM", "main"]

METHODS = ("network", "fit_mean_body", "fit_mean_body_best_of_4", "network_then_fit", "end_to_end_then_fit")
THRESHOLDS_MM = (25.0, 50.0, 100.0)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """One training run (see the module docstring)."""

    method: str = "alone"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    clip_norm: float = 1.0
    parameter_weight: float = 0.1
    seed: int = 0
    fit_iterations: int = 6
    train_limit: Optional[int] = None
    init: Optional[str] = None

    def __post_init__(self):
        if self.method not in ("alone", "end_to_end"):
            raise ValueError(f"method must be 'alone' or 'end_to_end'; got {self.method!r}.")
        for name in ("epochs", "batch_size", "fit_iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if not self.lr > 0 or not self.clip_norm > 0:
            raise ValueError(f"lr and clip_norm must be positive; got {self.lr!r} and {self.clip_norm!r}.")


def _placed() -> PlacedBody:
    return PlacedBody(AnnyBody(topology=LOW_RESOLUTION))


def _new_network(manifest: dict) -> BodyCNN:
    s = manifest["settings"]
    return BodyCNN(len(s["pose_scales"]), len(s["shape_ranges"]), s["pose_scales"])


def _params(arrays: Dict[str, Tensor], index=slice(None)) -> BodyParameters:
    return BodyParameters(arrays["rotation"][index], arrays["root"][index], arrays["pose"][index], arrays["shape"][index])


def _loss(placed: PlacedBody, params: BodyParameters, arrays: Dict[str, Tensor], index: Tensor,
          parameter_weight: float) -> Tensor:
    """Mean vertex error + mean joint error (m) + ``parameter_weight`` times the squared errors of
    the parameters (rotation: squared Frobenius distance; pose, shape: mean squared difference)."""
    mesh = placed.mesh(params)
    loss = vertex_error(mesh.vertices, arrays["vertices"][index]) + joint_error(mesh.joints, arrays["joints"][index])
    truth = _params(arrays, index)
    parameters = ((params.rotation - truth.rotation).square().sum((-1, -2)) + (params.pose - truth.pose).square().mean((-1, -2))
                  + (params.shape - truth.shape).square().mean(-1))
    return (loss + parameter_weight * parameters).mean()


def _step_loss(net, placed, arrays, index, K, settings: TrainSettings) -> Tensor:
    params = net(arrays["depth"][index], K)
    if settings.method == "end_to_end":  # half the iterations rigid only, half with pose and shape
        fit = BodyFitSettings(iterations=settings.fit_iterations, rigid_iterations=settings.fit_iterations // 2)
        params = fit_body(placed, arrays["points"][index], arrays["normals"][index], params, fit, differentiable=True).params
    return _loss(placed, params, arrays, index, settings.parameter_weight)


def _data_sha(root) -> str:
    return hashlib.sha256((Path(root) / "manifest.json").read_bytes()).hexdigest()


def _start(out: Path, settings: TrainSettings, manifest: dict, data_sha: str):
    torch.manual_seed(settings.seed)
    net = _new_network(manifest)
    if settings.init is not None:
        net.load_state_dict(load_network(settings.init)[0].state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
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


def _epoch(net, opt, placed, arrays, K, settings: TrainSettings, epoch: int, progress: bool) -> dict:
    g = torch.Generator().manual_seed(settings.seed * 100003 + epoch)
    order = torch.randperm(arrays["index"].shape[0], generator=g)
    batches = [order[i:i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    losses, norms, started = [], [], time.time()
    net.train()
    for index in progress_bar(batches, f"{settings.method} epoch {epoch + 1}/{settings.epochs}", progress):
        loss = _step_loss(net, placed, arrays, index, K, settings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), settings.clip_norm)))
        opt.step()
        losses.append(loss.item())
    return {"epoch": epoch + 1, "train_loss_m": sum(losses) / len(losses),
            "grad_norm_median": float(torch.tensor(norms).median()), "epoch_seconds": round(time.time() - started, 1)}


def train(data_root, out_dir, settings: TrainSettings = TrainSettings(), *, progress: bool = True,
          stop_after: Optional[int] = None, command: Optional[Sequence[str]] = None) -> List[dict]:
    """Train one network (see the module docstring); returns the per-epoch history.

    Resumes from ``out_dir/checkpoint.pt`` (same settings and data required). ``stop_after`` ends
    this call after that many epochs (a stand-in for a kill, used by the tests). When the last epoch
    is done, ``out_dir/run.json`` records the settings, history, weights' sha256 and provenance.
    """
    torch.set_num_threads(1)
    started = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest, arrays = load_scans(data_root, "train", limit=settings.train_limit)
    _, val = load_scans(data_root, "val") if "val" in manifest["splits"] else (None, None)
    K = torch.tensor(manifest["intrinsics"])
    placed = _placed()
    data_sha = _data_sha(data_root)
    net, opt, start, history = _start(out, settings, manifest, data_sha)
    for epoch in range(start, settings.epochs):
        if stop_after is not None and epoch - start >= stop_after:
            return history
        record = _epoch(net, opt, placed, arrays, K, settings, epoch, progress)
        if val is not None:
            with torch.no_grad():
                mesh = placed.mesh(net.eval()(val["depth"], K))
            record["val_vertex_error_mm"] = float(vertex_error(mesh.vertices, val["vertices"]).mean() * 1000)
        history.append(record)
        atomic_write(out / "checkpoint.pt", lambda f: torch.save(
            {"settings": dataclasses.asdict(settings), "data_sha256": data_sha, "epoch": epoch + 1,
             "model": net.state_dict(), "optimizer": opt.state_dict(), "history": history}, f))
        print(json.dumps(record), flush=True)
    weights = out / "weights.pt"
    atomic_write(weights, lambda f: torch.save(net.state_dict(), f))
    write_result(out / "run.json", {"settings": dataclasses.asdict(settings), "data_sha256": data_sha,
                                    "history": history, "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()},
                 command=command, started=started)
    return history


def load_network(run_or_weights, manifest: Optional[dict] = None):
    """``(BodyCNN, info)`` from a finished run folder (its ``weights.pt`` and ``run.json``) or a
    weights file with a ``.json`` sidecar holding ``pose_scales``/``num_shape``."""
    path = Path(run_or_weights)
    weights = path / "weights.pt" if path.is_dir() else path
    info_path = path / "run.json" if path.is_dir() else path.with_suffix(".json")
    if not weights.is_file():
        raise FileNotFoundError(f"run_or_weights must be a finished run folder (with weights.pt) or a weights file; "
                                f"{str(weights)!r} does not exist.")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    scales = state["pose_scales"].tolist()
    net = BodyCNN(len(scales), state["head.2.bias"].shape[0] - 9 - 3 * len(scales), scales)
    net.load_state_dict(state)
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    init = info.get("settings", {}).get("init")
    if init and (Path(init) / "run.json").is_file():  # the run this one started from, for the record
        info["init_run"] = json.loads((Path(init) / "run.json").read_text(encoding="utf-8"))
    return net.eval(), info


def export_weights(run_dir, path) -> Path:
    """Copy a finished run's weights to ``path`` (a plain ``state_dict``) with a ``.json`` sidecar:
    the file's sha256, the run's command, commit, machine, date and settings, and the run it started from."""
    net, info = load_network(run_dir)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(net.state_dict(), f))
    prov, machine = info["provenance"], info["provenance"]["machine"]
    sidecar = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size,
               "command": prov["command"], "commit": prov["git"]["commit"],
               "machine": f"{machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB, GPU: {machine['gpu']}",
               "date_utc": prov["date_utc"],
               "origin": (f"fine-tuned here from the run {info['settings']['init']!r} (its record: run.init_run), itself "
                          "trained from a seeded random initialisation" if info["settings"].get("init")
                          else "trained here from a seeded random initialisation"),
               "loads_into": "diffcp.experiments.body_fit.load_network(path)", "run": info}
    text = json.dumps(sidecar, indent=2) + "\n"
    atomic_write(path.with_suffix(".json"), lambda f: f.write(text.encode("utf-8")))
    return path


def _fit(placed, arrays, index, init, fit_settings):
    return fit_body(placed, arrays["points"][index], arrays["normals"][index], init, fit_settings)


def _predict(method: str, nets: Dict[str, BodyCNN], placed, arrays, index, K, fit_settings) -> BodyParameters:
    if method == "network":
        return nets["alone"](arrays["depth"][index], K)
    if method in ("network_then_fit", "end_to_end_then_fit"):
        net = nets["alone" if method == "network_then_fit" else "end_to_end"]
        return _fit(placed, arrays, index, net(arrays["depth"][index], K), fit_settings).params
    start = mean_body_start(placed, arrays["points"][index])
    if method == "fit_mean_body_best_of_4":  # four rigid-only fits choose the facing, by their energy
        rigid = dataclasses.replace(fit_settings, iterations=fit_settings.rigid_iterations)
        starts = [mean_body_start(placed, arrays["points"][index], a) for a in (0.0, 90.0, 180.0, 270.0)]
        energies = torch.stack([_fit(placed, arrays, index, s, rigid).energies[-1] for s in starts])
        best, rows = energies.argmin(0), torch.arange(energies.shape[1])
        start = BodyParameters(*(torch.stack([getattr(s, k) for s in starts])[best, rows] for k in BodyParameters._fields))
    return _fit(placed, arrays, index, start, fit_settings).params


def evaluate(data_root, nets: Dict[str, BodyCNN], fit_settings: BodyFitSettings = BodyFitSettings(), *,
             methods: Sequence[str] = METHODS, limit: Optional[int] = None, batch_size: int = 50,
             progress: bool = True) -> Dict[str, Dict[str, List[float]]]:
    """Per-scan vertex and joint errors (mm) of each method on the test split:
    ``{method: {"vertex_mm": [...], "joint_mm": [...]}}``; also ``"condition"`` (per scan)."""
    torch.set_num_threads(1)
    manifest, arrays = load_scans(data_root, "test", limit=limit)
    K = torch.tensor(manifest["intrinsics"])
    placed = _placed()
    n = arrays["index"].shape[0]
    out = {"condition": [manifest["conditions"][int(c)] for c in arrays["condition"]]}
    for method in methods:
        vert, joint = [], []
        for start in progress_bar(range(0, n, batch_size), method, progress):
            index = torch.arange(start, min(start + batch_size, n))
            with torch.no_grad():
                params = _predict(method, nets, placed, arrays, index, K, fit_settings)
                mesh = placed.mesh(params)
            vert += (vertex_error(mesh.vertices, arrays["vertices"][index]) * 1000).tolist()
            joint += (joint_error(mesh.joints, arrays["joints"][index]) * 1000).tolist()
        out[method] = {"vertex_mm": [round(v, 2) for v in vert], "joint_mm": [round(v, 2) for v in joint]}
    return out


def summarise(per_scan: dict, thresholds: Sequence[float] = THRESHOLDS_MM) -> Dict[str, Dict[str, dict]]:
    """``{method: {condition or "all": {mean/median vertex and joint mm, success rate per threshold}}}``."""
    conditions = per_scan["condition"]
    table = {}
    for method, errs in per_scan.items():
        if method == "condition":
            continue
        table[method] = {}
        for cond in ["all"] + sorted(set(conditions)):
            keep = [i for i, c in enumerate(conditions) if cond in ("all", c)]
            v = torch.tensor([errs["vertex_mm"][i] for i in keep])
            j = torch.tensor([errs["joint_mm"][i] for i in keep])
            table[method][cond] = {"count": len(keep), "vertex_mean_mm": round(float(v.mean()), 1),
                                   "vertex_median_mm": round(float(v.median()), 1),
                                   "joint_mean_mm": round(float(j.mean()), 1),
                                   "success": {f"{t:g}mm": round(float((v < t).double().mean()), 3) for t in thresholds}}
    return table


def _paired_margin(per_scan: dict, better: str, worse: str) -> dict:
    """Mean per-scan difference (mm) with a 95 % normal interval, and the share of scans improved."""
    a = torch.tensor(per_scan[better]["vertex_mm"], dtype=torch.float64)
    b = torch.tensor(per_scan[worse]["vertex_mm"], dtype=torch.float64)
    d = b - a
    half = 1.96 * float(d.std() / len(d) ** 0.5)
    return {"better": better, "worse": worse, "mean_gain_mm": round(float(d.mean()), 1),
            "ci95_mm": [round(float(d.mean()) - half, 1), round(float(d.mean()) + half, 1)],
            "share_improved": round(float((d > 0).double().mean()), 3)}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m diffcp.experiments.body_fit", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a BodyCNN alone or through the fit")
    t.add_argument("--data", default="data/body_scans")
    t.add_argument("--out", required=True, help="run folder (resumed if it holds a checkpoint)")
    for f in dataclasses.fields(TrainSettings):
        kind = {"train_limit": int, "init": str}.get(f.name, type(f.default))
        t.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    t.add_argument("--no-progress", action="store_true")
    e = sub.add_parser("evaluate", help="evaluate every method on the test split")
    e.add_argument("--data", default="data/body_scans")
    e.add_argument("--alone", required=True, help="run folder of the network trained alone")
    e.add_argument("--end-to-end", default=None, help="run folder of the network trained through the fit "
                   "(needed for end_to_end_then_fit)")
    e.add_argument("--into", default="book/_data/body_fit.json")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="evaluate only these (with --part, to share the work between processes)")
    e.add_argument("--part", default=None, help="write these methods' per-scan rows here instead of --into")
    e.add_argument("--no-progress", action="store_true")
    x = sub.add_parser("export", help="copy a run's weights with a sidecar of their provenance")
    x.add_argument("run")
    x.add_argument("--to", required=True, help="the .pt file to write (book/_data/weights/body_cnn_alone.pt)")
    m = sub.add_parser("merge", help="merge --part files of one dataset and one pair of networks into --into")
    m.add_argument("parts", nargs="+")
    m.add_argument("--into", default="book/_data/body_fit.json")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    command = ["python", "-m", "diffcp.experiments.body_fit"] + list(sys.argv[1:] if argv is None else argv)
    if args.command == "train":
        settings = TrainSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)})
        train(args.data, args.out, settings, progress=not args.no_progress, command=command)
        return 0
    if args.command == "export":
        print(export_weights(args.run, args.to))
        return 0
    if args.command == "merge":
        return _merge(args.parts, args.into, command)
    started = time.time()
    nets, runs = {}, {}
    if "end_to_end_then_fit" in args.methods and args.end_to_end is None:
        raise SystemExit("error: --end-to-end is needed to evaluate end_to_end_then_fit.")
    for name, run in (("alone", args.alone), ("end_to_end", args.end_to_end)):
        if run is not None:
            nets[name], runs[name] = load_network(run)
    fit_settings = BodyFitSettings()
    per_scan = evaluate(args.data, nets, fit_settings, methods=args.methods, limit=args.limit,
                        progress=not args.no_progress)
    manifest, _ = load_scans(args.data, "test", limit=1)
    record = {"per_scan": per_scan, "fit_settings": fit_settings.to_dict(), "thresholds_mm": list(THRESHOLDS_MM),
              "dataset": {"manifest_sha256": _data_sha(args.data), "command": manifest["command"],
                          "settings": manifest["settings"], "splits": manifest["splits"]}, "runs": runs}
    if args.part is not None:
        write_result(args.part, record, command=command, started=started)
        return 0
    write_result(args.into, _with_summary(record), command=command, started=started)
    print(json.dumps({k: _with_summary(record)[k] for k in ("summary", "margins")}, indent=1))
    return 0


def _with_summary(record: dict) -> dict:
    per_scan = record["per_scan"]
    margins = [_paired_margin(per_scan, "network_then_fit", m) for m in ("network", "fit_mean_body", "fit_mean_body_best_of_4")
               if m in per_scan and "network_then_fit" in per_scan]
    if "end_to_end_then_fit" in per_scan and "network_then_fit" in per_scan:
        margins.append(_paired_margin(per_scan, "end_to_end_then_fit", "network_then_fit"))
    return {"summary": summarise(per_scan), "margins": margins, **record}


def _merge(parts: Sequence[str], into: str, command: Sequence[str]) -> int:
    """One results file from ``--part`` files of the same dataset, networks and fit settings."""
    records = [json.loads(Path(p).read_text(encoding="utf-8")) for p in parts]
    first = records[0]
    runs: dict = {}
    for path, r in zip(parts, records):
        for key in ("dataset", "fit_settings"):
            if r[key] != first[key]:
                raise ValueError(f"parts must share one {key}; {path!r} differs from {parts[0]!r}.")
        for name, run in r["runs"].items():
            if runs.setdefault(name, run) != run:
                raise ValueError(f"parts must share one runs[{name!r}]; {path!r} differs from an earlier part.")
        if r["per_scan"]["condition"] != first["per_scan"]["condition"]:
            raise ValueError(f"parts must cover the same test scans; {path!r} differs from {parts[0]!r}.")
    per_scan = {"condition": first["per_scan"]["condition"]}
    for r in records:
        per_scan.update({k: v for k, v in r["per_scan"].items() if k != "condition"})
    record = {k: first[k] for k in ("fit_settings", "thresholds_mm", "dataset")}
    record["runs"] = runs
    record.update(per_scan=per_scan, parts=[{"file": Path(p).name, "methods": [k for k in r["per_scan"] if k != "condition"],
                                             "provenance": r["provenance"]} for p, r in zip(parts, records)])
    write_result(into, _with_summary(record), command=command)
    print(json.dumps({k: _with_summary(record)[k] for k in ("summary", "margins")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
