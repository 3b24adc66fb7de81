"""Experiment 2, part 2: the trained runs of :mod:`diffcp.experiments.dcp_train` on the test split.

    python -m diffcp.experiments.dcp_trained_eval RUN_DIR [RUN_DIR ...] --into book/_data/modelnet40.json

Each ``RUN_DIR`` is a finished training run (``result.json`` and ``best.pt``: the epoch chosen on
the validation split). Its DCP is evaluated on the same test pairs as part 1 (the run's protocol,
each pair seeded with its object's row in the official test split; the run's number of points):

- ``dcp``: the trained DCP alone;
- ``dcp+icp_layer``: DCP, then the run's ICP layer (soft nearest neighbours, point-to-point,
  ``icp_iterations`` iterations). For a run trained end to end this is what it was trained as; for
  a run trained alone (``--icp none``) it is the *same* layer applied at test time only, so the two
  rows compare end-to-end against test-time-only refinement on the same pairs and the same budget;
- ``dcp+icp_hard``, ``dcp+icp_soft``, ``dcp+icp_hard_reject``: part 1's refinements
  (:data:`diffcp.experiments.modelnet40_eval.REFINE_SETTINGS`);

and the same rows for the released DCP-v1 on the same pairs (``"released"``: where fine-tuning
started, at the run's number of points).

The rows go into the part-1 results file under ``"trained"``:
``{"provenance": <the latest evaluation>, "runs": {name: {"protocol", "model", "init", "icp",
"points", "pairs", "test": {row: metrics}, "released": {row: metrics}, "training": {...},
"evaluation": <the provenance of the command that evaluated this run>}}}``, where ``training`` carries the
run's own provenance (command, commit, machine, date, duration), its epochs, wall time, the chosen
epoch with its validation metrics, the number of training objects and the sha256 of the weights
evaluated. The part-1 sections of the file are left as they are; a run evaluated again replaces its
own entry only.
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

import numpy as np
import torch

from diffcp.experiments.dcp_train import TrainSettings, _objects, build_model, icp_layer, single_thread, weights_sha256
from diffcp.provenance import atomic_write, provenance

__all__ = ["export_weights", "load_run", "evaluate_run", "refined_rows", "test_pairs", "test_time_layer", "run_name", "merge_into", "main"]

BATCH = 16


def run_name(settings: TrainSettings) -> str:
    """The key of a run in the results file, e.g. ``"noise/v1_released/end_to_end"``."""
    return f"{settings.protocol}/{settings.model}_{settings.init}/{settings.icp}"


def load_run(run_dir) -> tuple:
    """``(settings, model, result)`` of a finished run: the :class:`TrainSettings`, the model with the
    weights of ``best.pt`` (in eval mode) and the run's ``result.json`` as a dict."""
    run = Path(run_dir)
    for needed in ("result.json", "best.pt"):
        if not (run / needed).is_file():
            raise FileNotFoundError(f"run_dir {str(run)!r} has no {needed}: it is not a finished dcp_train run.")
    result = json.loads((run / "result.json").read_text())
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    settings = TrainSettings(**{k: v for k, v in result["settings"].items() if k in fields})
    model = build_model(settings)
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    if state["settings"] != result["settings"]:
        raise ValueError(f"run_dir {str(run)!r}: best.pt and result.json hold different settings.")
    model.load_state_dict(state["model"])
    return settings, model.eval(), result | {"best_epoch_of_weights": state["epoch"]}


def test_time_layer(settings: TrainSettings, model):
    """The ICP layer of the ``dcp+icp_layer`` row: the run's own (trained) layer, or for a run trained
    without ICP the layer an end-to-end run of the same settings uses."""
    return model.icp if model.icp is not None else icp_layer(dataclasses.replace(settings, icp="end_to_end"))


def test_pairs(settings: TrainSettings, max_objects: Optional[int] = None):
    """Part 1's test pairs of the run's protocol, at the run's number of points."""
    from diffcp.datasets.protocols import get_protocol
    from diffcp.experiments import modelnet40_eval

    protocol = get_protocol(settings.protocol)._replace(num_points=settings.points)
    return modelnet40_eval.test_pairs(protocol, settings.folder, max_objects)


def refined_rows(dcp, layer, source, target, R, t) -> Dict[str, dict]:
    """Metrics of ``dcp`` (a callable returning ``(B, 4, 4)``) alone, then followed by ``layer`` and by
    each of part 1's refinements, in batches of :data:`BATCH`."""
    from diffcp.experiments.modelnet40_eval import REFINE_VARIANTS, refine
    from diffcp.metrics import registration_metrics

    rows: Dict[str, List[torch.Tensor]] = {"dcp": [], "dcp+icp_layer": []}
    rows.update({f"dcp+icp_{v}": [] for v in REFINE_VARIANTS})
    with torch.no_grad():
        for i in range(0, len(source), BATCH):
            x, y = source[i:i + BATCH], target[i:i + BATCH]
            T0 = dcp(x, y)
            rows["dcp"].append(T0)
            rows["dcp+icp_layer"].append(layer(x, y, init=T0).transform)
            for v in REFINE_VARIANTS:
                rows[f"dcp+icp_{v}"].append(refine(x, y, T0, v))
    out = {}
    for key, parts in rows.items():
        T = torch.cat(parts)
        out[key] = registration_metrics(T[:, :3, :3], T[:, :3, 3], R, t).as_dict()
    return out


def evaluate_run(settings: TrainSettings, model, max_objects: Optional[int] = None, log=print) -> Dict[str, dict]:
    """Test metrics of every row (see the module docstring) for one run, the same rows for the
    released DCP-v1 on the same pairs (``"released"``, the starting point of fine-tuning), and the
    number of pairs."""
    from diffcp.experiments.modelnet40_eval import _learned

    source, target, R, t = test_pairs(settings, max_objects)
    layer = test_time_layer(settings, model)
    trained = refined_rows(lambda x, y: model(x, y, use_icp=False)[0], layer, source, target, R, t)
    released = refined_rows(_learned("dcp_v1"), layer, source, target, R, t)
    log(f"{run_name(settings):40s} " + "  ".join(f"{k} {m['rmse_r']:.3f}" for k, m in trained.items()) +
        f"  (rmse_r, {len(source)} pairs; released DCP-v1: {released['dcp']['rmse_r']:.3f})")
    return {"test": trained, "released": released, "pairs": len(source)}


def _training_record(result: dict, model, train_objects: int) -> dict:
    history = result.get("history", [])
    return {
        "provenance": result["provenance"],
        "epochs": len(history),
        "train_wall_seconds": result.get("train_wall_seconds"),
        "step_seconds_median": [h.get("step_seconds_median") for h in history],
        "steps_per_epoch": history[0]["steps"] if history else None,
        "world_size": result.get("world_size"), "threads_per_rank": result.get("threads_per_rank"),
        "best_epoch": result["validation"]["best_epoch"],
        "validation_best": result["validation"]["best"],
        "selection": result["validation"]["selection"],
        "data": "ModelNet40 train split minus the validation share " +
                ("(the subset of ../shared/data)" if result["settings"].get("folder") is None else
                 f"({result['settings']['folder']})"),
        "train_objects": train_objects,
        "weights_sha256": weights_sha256(model),
        "history": [{k: h.get(k) for k in ("epoch", "train_loss", "lr", "grad_norm_median", "grad_norm_max",
                                            "nonfinite_grads", "val_selected_error_deg")} |
                    {"val_rmse_r": {m: v["rmse_r"] for m, v in h.get("val", {}).items()}} for h in history],
        "full_scale": result.get("full_scale"),
        "settings": result["settings"],
    }


def merge_into(path, entries: Dict[str, dict], command: Sequence[str], started: float) -> Path:
    """Put ``entries`` into ``path``'s ``"trained"`` section (replacing runs of the same name only),
    leaving every other key of the file untouched; written atomically."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    trained = data.get("trained", {"runs": {}})
    record = provenance(command=list(command), started=started)
    trained["runs"] = {**trained.get("runs", {}), **{k: v | {"evaluation": record} for k, v in entries.items()}}
    trained["provenance"] = record  # the latest evaluation; each run keeps its own under "evaluation"
    data["trained"] = trained
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def export_weights(run_dir, out_dir) -> Path:
    """Write a run's chosen DCP as a plain ``state_dict`` (``torch.load(..., weights_only=True)``) to
    ``out_dir/dcp_<model>_<protocol>_<icp>.pt`` with a sidecar ``.json``: the file's sha256, the run's
    training provenance and settings, and where the starting weights came from. Returns the path."""
    settings, model, result = load_run(run_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"dcp_{settings.model}_{settings.protocol}_{settings.icp}.pt"
    atomic_write(path, lambda f: torch.save(model.dcp.state_dict(), f))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    origin = ("fine-tuned from the DCP authors' released dcp_v1.t7 (WangYueFt/dcp, MIT licence; sha256 "
              "797d34fa5ef98593397233f2791225c38d8e45b02ce63041dd53643f74d081c1)" if settings.init == "released"
              else "trained from a seeded random initialisation")
    prov, machine = result["provenance"], result["provenance"]["machine"]
    sidecar = {"file": path.name, "sha256": digest, "bytes": path.stat().st_size,
               "command": prov["command"], "commit": prov["git"]["commit"],
               "machine": f"{machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB, GPU: {machine['gpu']}",
               "date_utc": prov["date_utc"], "origin": origin,
               "loads_into": f"diffcp.models.dcp.DCP('dgcnn', {'identity' if settings.model == 'v1' else 'transformer'!r}, "
                             f"emb_dims={settings.emb_dims})",
               "run": run_name(settings), "best_epoch": result["validation"]["best_epoch"],
               "training_provenance": result["provenance"], "settings": result["settings"]}
    text = json.dumps(sidecar, indent=2) + "\n"
    atomic_write(path.with_suffix(".json"), lambda f: f.write(text.encode("utf-8")))
    return path


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished dcp_train run folders")
    parser.add_argument("--into", required=True, help="results file to add the rows to (book/_data/modelnet40.json)")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="also write each run's chosen DCP weights (plain state_dict + sha256 sidecar) into DIR")
    parser.add_argument("--max-objects", type=int, default=None, help="first N test objects (smoke runs)")
    args = parser.parse_args(argv)
    single_thread()
    started = time.time()
    entries = {}
    for run in args.runs:
        settings, model, result = load_run(run)
        out = evaluate_run(settings, model, args.max_objects)
        entries[run_name(settings)] = {
            "protocol": settings.protocol, "model": settings.model, "init": settings.init, "icp": settings.icp,
            "points": settings.points, "pairs": out["pairs"], "test": out["test"], "released": out["released"],
            "icp_layer_settings": test_time_layer(settings, model).settings.to_dict(),
            "training": _training_record(result, model, len(_objects(settings, "train")[0])),
        }
        if args.export:
            print(f"exported {export_weights(run, args.export)}")
    command = ["python", "-m", "diffcp.experiments.dcp_trained_eval", *(sys.argv[1:] if argv is None else argv)]
    merge_into(args.into, entries, command, started)
    print(f"wrote {len(entries)} runs into {args.into}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
