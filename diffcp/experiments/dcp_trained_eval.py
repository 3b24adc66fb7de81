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
  (:data:`diffcp.experiments.modelnet40_eval.REFINE_SETTINGS`).

The rows go into the part-1 results file under ``"trained"``:
``{"provenance": <this evaluation>, "runs": {name: {"protocol", "model", "init", "icp",
"points", "pairs", "test": {row: metrics}, "training": {...}}}}``, where ``training`` carries the
run's own provenance (command, commit, machine, date, duration), its epochs, wall time, the chosen
epoch with its validation metrics, the number of training objects and the sha256 of the weights
evaluated. The part-1 sections of the file are left as they are; a run evaluated again replaces its
own entry only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from diffcp.experiments.dcp_train import TrainSettings, _objects, build_model, icp_layer, single_thread, weights_sha256
from diffcp.provenance import atomic_write, provenance

__all__ = ["load_run", "evaluate_run", "test_time_layer", "run_name", "merge_into", "main"]

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


def evaluate_run(settings: TrainSettings, model, max_objects: Optional[int] = None, log=print) -> Dict[str, dict]:
    """Test metrics of every row (see the module docstring) for one run, and the number of pairs."""
    from diffcp.datasets.modelnet40 import load_modelnet40
    from diffcp.datasets.protocols import RegistrationPairs, get_protocol, labels_for
    from diffcp.experiments.modelnet40_eval import REFINE_VARIANTS, refine
    from diffcp.metrics import registration_metrics

    protocol = get_protocol(settings.protocol)._replace(num_points=settings.points)
    data = load_modelnet40("test", settings.folder, labels=labels_for(protocol, "test"))
    count = len(data.labels) if max_objects is None else min(max_objects, len(data.labels))
    pairs = RegistrationPairs(data.points[:count], protocol, item_seeds=data.rows[:count])
    source, target, R, t = (torch.stack(x) for x in zip(*(pairs[i] for i in range(count))))
    layer = test_time_layer(settings, model)
    rows: Dict[str, List[torch.Tensor]] = {"dcp": [], "dcp+icp_layer": []}
    rows.update({f"dcp+icp_{v}": [] for v in REFINE_VARIANTS})
    with torch.no_grad():
        for i in range(0, count, BATCH):
            x, y = source[i:i + BATCH], target[i:i + BATCH]
            T0, _ = model(x, y, use_icp=False)
            rows["dcp"].append(T0)
            rows["dcp+icp_layer"].append(layer(x, y, init=T0).transform)
            for v in REFINE_VARIANTS:
                rows[f"dcp+icp_{v}"].append(refine(x, y, T0, v))
    metrics = {}
    for key, parts in rows.items():
        T = torch.cat(parts)
        metrics[key] = registration_metrics(T[:, :3, :3], T[:, :3, 3], R, t).as_dict()
    log(f"{run_name(settings):40s} " + "  ".join(f"{k} {m['rmse_r']:.3f}" for k, m in metrics.items()) +
        f"  (rmse_r, {count} pairs)")
    return {"test": metrics, "pairs": count}


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
        "settings": result["settings"],
    }


def merge_into(path, entries: Dict[str, dict], command: Sequence[str], started: float) -> Path:
    """Put ``entries`` into ``path``'s ``"trained"`` section (replacing runs of the same name only),
    leaving every other key of the file untouched; written atomically."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    trained = data.get("trained", {"runs": {}})
    trained["runs"] = {**trained.get("runs", {}), **entries}
    trained["provenance"] = provenance(command=list(command), started=started)
    data["trained"] = trained
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished dcp_train run folders")
    parser.add_argument("--into", required=True, help="results file to add the rows to (book/_data/modelnet40.json)")
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
            "points": settings.points, "pairs": out["pairs"], "test": out["test"],
            "icp_layer_settings": test_time_layer(settings, model).settings.to_dict(),
            "training": _training_record(result, model, len(_objects(settings, "train")[0])),
        }
    command = ["python", "-m", "diffcp.experiments.dcp_trained_eval", *(sys.argv[1:] if argv is None else argv)]
    merge_into(args.into, entries, command, started)
    print(f"wrote {len(entries)} runs into {args.into}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
