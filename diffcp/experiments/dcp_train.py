"""Experiment 2, part 2: train DCP on ModelNet40, alone or end to end through differentiable ICP.

    python -m diffcp.experiments.dcp_train --protocol noise|sampling|partial --model v1|v2
        [--init released|scratch] --icp none|end_to_end|test_time [--learn-temperature]
        --epochs E --batch-size B --points N --out RUN_DIR [--folder FULL_MODELNET40]

    torchrun --standalone --nproc_per_node=2 -m diffcp.experiments.dcp_train ...   # DDP, gloo on CPU

The question: does training pay on the protocols where the answer is not free (independent noise,
independent sampling, partial overlap; see :mod:`diffcp.datasets.protocols`)? Three ways to use ICP:

- ``--icp none``: DCP alone, trained on DCP's loss;
- ``--icp test_time``: DCP trained alone, the ICP layer applied only at evaluation;
- ``--icp end_to_end``: the ICP layer (:class:`diffcp.ICP`, soft nearest neighbours, point-to-point
  Procrustes, ``--icp-iterations`` iterations, no early stop) runs after DCP with DCP's transform
  as its ``init``, and the loss is taken *after* ICP. The gradient reaches DCP only through
  ``init``, so every iteration must carry it: ``--icp-backward unroll`` (default) or ``truncated``
  (with all iterations kept, the same gradient). The implicit mode differentiates the fixed point,
  which does not depend on ``init``: it gives DCP **no gradient at all**, and is refused here with
  a ``ValueError``. ``--learn-temperature`` makes the soft correspondences' temperature a
  parameter (``SoftNearestNeighbor(temperature=..., learnable=True)``, log-parametrised). Gradients
  through unrolled ICP range over orders of magnitude: their norm is clipped (``--clip-norm``).

Models: ``v1`` (DGCNN + identity pointer) fine-tuned from the released ``dcp_v1.t7`` by default
(``--init released``); ``v2`` (DGCNN + transformer) from scratch. DCP's loss (the authors'
``main.py``): ``mse(R_pred^T R_gt, I) + mse(t_pred, t_gt)``, each ``F.mse_loss`` (a mean over the
entries); DCP's cycle-consistency term (``--cycle``, off by default in the authors' code) is not
implemented. Optimiser as DCP: Adam, weight decay 1e-4, learning rate divided by 10 at 30 %, 60 %
and 80 % of the epochs (DCP: epochs 75/150/200 of 250); learning rate 1e-3 from scratch, 1e-4 for
fine-tuning the released weights.

Data: ``load_modelnet40("train")`` for training, ``"val"`` (carved from the official train split)
for model selection; the test split is never read here. Training pairs are drawn fresh every
epoch, yet reproducibly: in epoch ``e`` object ``i`` draws its pair from
``RandomState(item_seed[e, i])`` with the seeds from ``SeedSequence([seed, e])``, so a pair depends
on (seed, epoch, object) only, not on the order, the number of ranks or a resume. Validation pairs
are fixed (object ``i`` seeded with its official row, as the test protocol does). The order of the
pairs is :class:`~torch.utils.data.distributed.DistributedSampler`'s (seeded, ``set_epoch``); with
``torchrun`` each rank takes its shard and ``--batch-size / world_size`` pairs a step, so the global
batch is the same (BatchNorm statistics are per rank).

Checkpoints: ``RUN_DIR/checkpoint.pt`` after every epoch, written atomically (temporary file +
``os.replace``) by rank 0 only, with the model, optimiser, scheduler, RNG states, epoch, history,
best validation state and the settings (the ICP's as ``layer.settings.to_dict()``). A run resumes
from it (same settings required) and ends with the same weights and history as an uninterrupted
run (CPU, one thread, fixed seed: deterministic). ``RUN_DIR/best.pt`` holds the weights of the
epoch with the lowest validation error. At the end ``RUN_DIR/result.json`` (with provenance) holds
the settings, the per-epoch history, the validation metrics of :mod:`diffcp.metrics`, the
training wall time, and the command of the full-scale run with its expected time, extrapolated
from the measured step time.

Expected time of the full-scale runs (measured by ``benchmarks/bench_dcp_icp_share.py``, DCP-v1
with the released weights, one thread, on the 2-core AMD EPYC machine under a load average of 5-8
from other jobs; ``benchmarks/results/dcp-icp-share-cpu-2core-amd-epyc.json``, two runs): a training
step of 8 pairs x 1024 points takes 16.6-17.2 s (6.5-7.3 s at 512 points; 23-30 s for 32 x 512),
the ICP layer (10 unrolled soft iterations, forward + backward) 0.33-0.46 s of it: 1.7-2.7 % of
the step at every size measured. So one epoch of the full train split (8,856 pairs, 1024 points) takes ~5.3 h on one such
loaded thread, ~36 min with two quiet ranks (``shared/notes/REFERENCE.md``: v1 batch 32 x 1024,
7.0 s a step); fine-tuning v1 for 50 epochs ~30 h quiet, DCP-v2 from scratch for 250 epochs
(~2.5 h an epoch) ~600 h: the full-scale runs need a GPU (not measured yet). ``result.json`` also
gives an extrapolation from the run's own step time (``full_scale.expected``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffcp.experiments.progress import progress_bar
from diffcp.provenance import atomic_write

__all__ = ["TrainSettings", "DCPWithICP", "dcp_loss", "build_model", "icp_layer", "training_pairs", "train", "main",
           "ICP_MODES", "TRAIN_PROTOCOLS", "weights_sha256", "epoch_item_seeds", "evaluate",
           "expected_time", "full_scale_command", "single_thread"]

ICP_MODES = ("none", "end_to_end", "test_time")
TRAIN_PROTOCOLS = ("noise", "sampling", "partial", "clean")
#: Objects of the full official train split minus the validation share (9840 - 10 % per class).
FULL_TRAIN_OBJECTS = 8856
DEFAULT_LEARNABLE_TEMPERATURE = 5e-4


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything that defines a run (stored in the checkpoint; a resumed run must use the same)."""

    protocol: str = "noise"
    model: str = "v1"
    init: Optional[str] = None  # "released" | "scratch"; None: released for v1, scratch for v2
    icp: str = "none"
    learn_temperature: bool = False
    icp_temperature: Optional[float] = None  # None: diffcp's per-cloud default (a number if learnable)
    icp_iterations: int = 10
    icp_backward: str = "unroll"  # "unroll" | "truncated" (all iterations kept) | "implicit" (refused end to end)
    epochs: int = 20
    batch_size: int = 32
    points: int = 1024
    lr: Optional[float] = None  # None: 1e-3 from scratch, 1e-4 from the released weights
    weight_decay: float = 1e-4
    clip_norm: Optional[float] = None  # None: 1.0 end to end, off otherwise
    emb_dims: int = 512
    seed: int = 0
    max_train: Optional[int] = None  # first N train objects (tests, smoke runs)
    max_val: Optional[int] = None
    folder: Optional[str] = None

    def __post_init__(self):
        def check(name, ok, expected):
            if not ok:
                raise ValueError(f"{name} must be {expected}; got {getattr(self, name)!r}.")

        check("protocol", self.protocol in TRAIN_PROTOCOLS, f"one of {TRAIN_PROTOCOLS}")
        check("model", self.model in ("v1", "v2"), "'v1' or 'v2'")
        if self.init is None:
            object.__setattr__(self, "init", "released" if self.model == "v1" else "scratch")
        check("init", self.init in ("released", "scratch"), "'released' or 'scratch'")
        if self.init == "released" and (self.model != "v1" or self.emb_dims != 512):
            raise ValueError("init='released' needs model='v1' and emb_dims=512 (only dcp_v1.t7 is released); "
                             f"got model={self.model!r}, emb_dims={self.emb_dims}.")
        check("icp", self.icp in ICP_MODES, f"one of {ICP_MODES}")
        check("icp_backward", self.icp_backward in ("unroll", "truncated", "implicit"), "'unroll', 'truncated' or 'implicit'")
        if self.icp == "end_to_end" and self.icp_backward == "implicit":
            raise ValueError("icp_backward='implicit' cannot train DCP end to end: the implicit mode differentiates "
                             "ICP's fixed point, which does not depend on init (DCP's output), so DCP would get no "
                             "gradient at all; use 'unroll' or 'truncated' (every iteration kept).")
        if self.learn_temperature and self.icp != "end_to_end":
            raise ValueError(f"learn_temperature needs icp='end_to_end' (the temperature is learned through the loss "
                             f"after ICP); got icp={self.icp!r}.")
        for name in ("icp_iterations", "epochs", "batch_size", "points", "emb_dims"):
            value = getattr(self, name)
            check(name, isinstance(value, int) and not isinstance(value, bool) and value >= 1, "a positive integer")
        check("points", self.points <= 1024, "at most 1024 (the sampling protocol takes 2 x points of the 2048)")
        if self.lr is None:
            object.__setattr__(self, "lr", 1e-4 if self.init == "released" else 1e-3)
        if self.clip_norm is None and self.icp == "end_to_end":
            object.__setattr__(self, "clip_norm", 1.0)
        if self.learn_temperature and self.icp_temperature is None:
            object.__setattr__(self, "icp_temperature", DEFAULT_LEARNABLE_TEMPERATURE)
        check("lr", self.lr > 0, "positive")
        check("clip_norm", self.clip_norm is None or self.clip_norm > 0, "positive or None")
        check("icp_temperature", self.icp_temperature is None or self.icp_temperature > 0, "positive or None")

    def milestones(self) -> List[int]:
        """Epochs at which the learning rate drops tenfold (DCP: 75/150/200 of 250 epochs)."""
        return sorted({max(1, round(self.epochs * f)) for f in (0.3, 0.6, 0.8)})


# ----------------------------------------------------------------------------- model, ICP, loss
def icp_layer(settings: TrainSettings):
    """The :class:`diffcp.ICP` layer of a run, or None for ``icp="none"``."""
    if settings.icp == "none":
        return None
    from diffcp.layer import ICP
    from diffcp.settings import SoftNearestNeighbor, Stopping, TruncatedBackward

    k = settings.icp_iterations
    backward = TruncatedBackward(iterations=k) if settings.icp_backward == "truncated" else settings.icp_backward
    return ICP(correspondence=SoftNearestNeighbor(temperature=settings.icp_temperature, learnable=settings.learn_temperature),
               stopping=Stopping(max_iterations=k, tolerance=0.0), backward=backward)


class DCPWithICP(nn.Module):
    """DCP, then (optionally) the ICP layer from DCP's transform; ``forward`` returns both ``(B, 4, 4)``.

    ``use_icp=False`` skips the layer (DCP alone, and ``icp="test_time"`` during training).
    """

    def __init__(self, dcp: nn.Module, icp: Optional[nn.Module]):
        super().__init__()
        self.dcp, self.icp = dcp, icp

    def forward(self, source: Tensor, target: Tensor, use_icp: bool = True):
        from diffcp.geometry import make_transform

        out = self.dcp(source, target)
        T0 = make_transform(out.rotation, out.translation)
        if self.icp is None or not use_icp:
            return T0, T0
        return T0, self.icp(source, target, init=T0).transform


def build_model(settings: TrainSettings) -> DCPWithICP:
    """DCP (released v1 weights or a seeded fresh network) and the run's ICP layer."""
    from diffcp.models.dcp import DCP, load_dcp

    torch.manual_seed(settings.seed)
    if settings.init == "released":
        dcp = load_dcp("v1")
    else:
        dcp = DCP("dgcnn", "identity" if settings.model == "v1" else "transformer", emb_dims=settings.emb_dims)
    return DCPWithICP(dcp, icp_layer(settings))


def dcp_loss(T: Tensor, R_true: Tensor, t_true: Tensor) -> Tensor:
    """DCP's loss: ``mse(R^T R_true, I) + mse(t, t_true)`` (means over the entries, as ``F.mse_loss``)."""
    R, t = T[:, :3, :3], T[:, :3, 3]
    eye = torch.eye(3, dtype=R.dtype, device=R.device).expand_as(R)
    return F.mse_loss(R.transpose(1, 2) @ R_true, eye) + F.mse_loss(t, t_true)


# ----------------------------------------------------------------------------- data
def _protocol(settings: TrainSettings):
    from diffcp.datasets.protocols import get_protocol

    return get_protocol(settings.protocol)._replace(num_points=settings.points)


def _objects(settings: TrainSettings, split: str):
    from diffcp.datasets.modelnet40 import load_modelnet40

    data = load_modelnet40(split, settings.folder)
    limit = settings.max_train if split == "train" else settings.max_val
    n = len(data.labels) if limit is None else min(limit, len(data.labels))
    return data.points[:n], data.rows[:n]


def epoch_item_seeds(seed: int, epoch: int, count: int) -> np.ndarray:
    """The per-object seeds of the training pairs of one epoch (a function of seed and epoch only)."""
    return np.random.SeedSequence([seed, epoch]).generate_state(count).astype(np.int64)


def training_pairs(points: np.ndarray, settings: TrainSettings, epoch: int):
    """The training pairs of ``epoch``: fresh every epoch, the same on every rank and after a resume."""
    from diffcp.datasets.protocols import RegistrationPairs

    return RegistrationPairs(points, _protocol(settings), deterministic=True,
                             item_seeds=epoch_item_seeds(settings.seed, epoch, len(points)))


def _stack(pairs, items) -> List[Tensor]:
    return [torch.stack(x) for x in zip(*(pairs[int(i)] for i in items))]


# ----------------------------------------------------------------------------- distributed helpers
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank_world():
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d else (0, 1)


def _mean_over_ranks(values: List[float]) -> float:
    d = _dist()
    total = torch.tensor([sum(values), float(len(values))], dtype=torch.float64)
    if d:
        d.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _average_buffers(model: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the ranks.

    DDP keeps the parameters equal, but each rank updates its BatchNorm running statistics with its
    own shard (DDP broadcasts rank 0's at the next forward): without this, the ranks would validate
    and end with different statistics. The averages are what every rank then holds.
    """
    d = _dist()
    if not d:
        return
    world = d.get_world_size()
    for buffer in model.buffers():
        if buffer.is_floating_point():
            d.all_reduce(buffer)
            buffer /= world


# ----------------------------------------------------------------------------- checkpoints
def _save_atomic(obj, path: Path) -> None:
    """``torch.save`` through :func:`diffcp.provenance.atomic_write`: a checkpoint is never half-written."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def settings_record(settings: TrainSettings, model: DCPWithICP) -> dict:
    """The run's settings as plain data: the training settings, the ICP's (``to_dict``), the schedule."""
    record = dataclasses.asdict(settings)
    record["icp_settings"] = model.icp.settings.to_dict() if model.icp is not None else None
    record["lr_milestones"] = settings.milestones()
    record["protocol_settings"] = _protocol(settings)._asdict()
    record["loss"] = "mse(R^T R_gt, I) + mse(t, t_gt) (DCP's, no cycle term), after ICP when icp='end_to_end'"
    return record


# ----------------------------------------------------------------------------- evaluation
def evaluate(model: DCPWithICP, points: np.ndarray, rows: np.ndarray, settings: TrainSettings,
             batch_size: Optional[int] = None) -> Dict[str, dict]:
    """Validation metrics (:func:`diffcp.metrics.registration_metrics`) of DCP and, with an ICP
    layer, of DCP + ICP; with several ranks each takes a shard and the predictions are gathered."""
    from diffcp.datasets.protocols import RegistrationPairs
    from diffcp.metrics import registration_metrics

    pairs = RegistrationPairs(points, _protocol(settings), deterministic=True, item_seeds=rows)
    rank, world = _rank_world()
    mine = np.array_split(np.arange(len(pairs)), world)[rank]
    batch_size = batch_size or max(1, settings.batch_size // world)
    was_training = model.training
    model.eval()
    out = {"dcp": [], "dcp+icp": [], "R": [], "t": []}
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            source, target, R, t = _stack(pairs, mine[start:start + batch_size])
            T0, T = model(source, target, use_icp=True)
            out["dcp"].append(T0), out["dcp+icp"].append(T), out["R"].append(R), out["t"].append(t)
    model.train(was_training)
    local = {k: torch.cat(v) if v else torch.zeros(0, *(3, 3) if k == "R" else (3,) if k == "t" else (4, 4))
             for k, v in out.items()}
    d = _dist()
    if d:
        gathered = [None] * world
        d.all_gather_object(gathered, local)
        local = {k: torch.cat([g[k] for g in gathered]) for k in local}
    methods = ["dcp"] + (["dcp+icp"] if model.icp is not None else [])
    return {m: registration_metrics(local[m][:, :3, :3], local[m][:, :3, 3], local["R"], local["t"]).as_dict()
            for m in methods}


def _selected_error(metrics: Dict[str, dict], settings: TrainSettings) -> float:
    """Model selection: mean isotropic rotation error of what the run delivers (after ICP if any)."""
    return float(metrics["dcp+icp" if settings.icp != "none" else "dcp"]["isotropic_r_deg"])


# ----------------------------------------------------------------------------- training
def _epoch(model, ddp_model, opt, points, settings: TrainSettings, epoch: int, progress: bool) -> dict:
    from torch.utils.data.distributed import DistributedSampler

    rank, world = _rank_world()
    if settings.batch_size % world:
        raise ValueError(f"batch_size must be divisible by the number of ranks {world}; got {settings.batch_size}.")
    per_rank = settings.batch_size // world
    pairs = training_pairs(points, settings, epoch)
    sampler = DistributedSampler(range(len(pairs)), num_replicas=world, rank=rank, shuffle=True, seed=settings.seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    order = list(sampler)
    batches = [order[i:i + per_rank] for i in range(0, len(order), per_rank)]
    # every rank must take the same number of steps (DDP): drop a short last batch
    batches = [b for b in batches if len(b) == per_rank] or batches[:1]
    use_icp = settings.icp == "end_to_end"
    losses, norms, times = [], [], []
    ddp_model.train()
    bar = progress_bar(batches, f"{settings.model}/{settings.protocol}/{settings.icp} epoch {epoch + 1}/{settings.epochs}",
                    progress and rank == 0)
    for items in bar:
        t0 = time.perf_counter()
        source, target, R, t = _stack(pairs, items)
        _, T = ddp_model(source, target, use_icp=use_icp)
        loss = dcp_loss(T, R, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        if settings.clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, settings.clip_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        norms.append(float(norm))
        if math.isfinite(norms[-1]):
            opt.step()  # a non-finite gradient skips the step (counted in the history)
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - t0)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    finite = [n for n in norms if math.isfinite(n)]
    record = {"epoch": epoch + 1, "train_loss": _mean_over_ranks(losses), "steps": len(batches),
              "grad_norm_median": float(np.median(finite)) if finite else None,
              "grad_norm_max": max(finite) if finite else None, "nonfinite_grads": len(norms) - len(finite),
              "step_seconds_median": float(np.median(times)), "epoch_train_seconds": float(sum(times))}
    if model.icp is not None and len(model.icp.log_temperatures):
        record["temperatures"] = {k: float(v.detach()) for k, v in model.icp.temperatures().items()}
    return record


class TrainResult(dict):
    """What :func:`train` returns: ``model``, ``history``, ``best``, ``checkpoint`` (a dict)."""


def single_thread() -> None:
    """One torch thread and one numba thread in this process.

    numba's first parallel call starts its OpenMP thread pool, which sets the OpenMP runtime that
    torch shares to numba's thread count (all cores unless ``NUMBA_NUM_THREADS``): after the first
    ICP call torch silently ran on 2 threads here, and its reductions changed order (float32
    differences of ~5e-7 between "identical" runs). Starting numba's pool first, at one thread, and
    then setting torch's keeps both at one.
    """
    try:
        import numba

        numba.set_num_threads(1)
    except ImportError:  # pragma: no cover - numba is a dependency; without it nothing to pin
        pass
    torch.set_num_threads(1)


def train(settings: TrainSettings, out_dir, *, progress: bool = True, stop_after: Optional[int] = None) -> TrainResult:
    """Train (or resume) a run into ``out_dir``; ``stop_after`` ends this call after that many
    epochs (a stand-in for a kill, for the tests). Call inside ``torchrun`` for DDP (the process
    group must be initialised already: :func:`main` does it). Runs on one thread (:func:`single_thread`)."""
    single_thread()
    out = Path(out_dir)
    rank, world = _rank_world()
    model = build_model(settings)
    record = settings_record(settings, model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                           weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, settings.milestones(), gamma=0.1)
    start, history, best = 0, [], None
    path = out / "checkpoint.pt"
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["settings"] != record:
            raise ValueError(f"out_dir {str(out)!r} holds a checkpoint of other settings; choose another folder "
                             "or delete it to start again.")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_states(state["rng"])
        start, history, best = int(state["epoch"]), list(state["history"]), state["best"]
    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model)
    points, _ = _objects(settings, "train")
    val_points, val_rows = _objects(settings, "val")
    for epoch in range(start, settings.epochs):
        if stop_after is not None and epoch - start >= stop_after:
            break
        entry = _epoch(model, ddp_model, opt, points, settings, epoch, progress)
        _average_buffers(model)
        entry["lr"] = opt.param_groups[0]["lr"]
        sched.step()
        t0 = time.perf_counter()
        entry["val"] = evaluate(model, val_points, val_rows, settings)
        entry["val_seconds"] = time.perf_counter() - t0
        entry["val_selected_error_deg"] = _selected_error(entry["val"], settings)
        history.append(entry)
        if best is None or entry["val_selected_error_deg"] < best["val_selected_error_deg"]:
            best = {"epoch": epoch + 1, "val_selected_error_deg": entry["val_selected_error_deg"], "val": entry["val"],
                    "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        if rank == 0:
            _save_atomic({"settings": record, "epoch": epoch + 1, "model": model.state_dict(),
                          "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_states(),
                          "history": history, "best": best}, path)
            if best["epoch"] == epoch + 1:
                _save_atomic({"settings": record, "epoch": best["epoch"], "model": best["model"]}, out / "best.pt")
            if progress:
                print(json.dumps({k: v for k, v in entry.items() if k != "val"} |
                                 {"val_rmse_r": {m: v["rmse_r"] for m, v in entry["val"].items()}}), flush=True)
        if _dist():
            _dist().barrier()
    return TrainResult(model=model, history=history, best=best, checkpoint=path, settings_record=record,
                       rank_weight_sha256=_weights_by_rank(model))


def weights_sha256(model: nn.Module) -> str:
    """A hash of every tensor of ``model.state_dict()`` (names, dtypes, shapes and bytes)."""
    import hashlib

    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        v = value.detach().cpu().contiguous()
        h.update(f"{name}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.numpy().tobytes() if v.dtype != torch.bfloat16 else v.float().numpy().tobytes())
    return h.hexdigest()


def _weights_by_rank(model: nn.Module) -> List[str]:
    """Each rank's :func:`weights_sha256` (DDP keeps them equal; recorded to show it)."""
    mine = weights_sha256(model)
    d = _dist()
    if not d:
        return [mine]
    gathered = [None] * d.get_world_size()
    d.all_gather_object(gathered, mine)
    return gathered


# ----------------------------------------------------------------------------- the command line
def full_scale_epochs(settings: TrainSettings) -> int:
    """Epochs of the full-scale run: DCP's 250 from scratch, 50 to fine-tune the released weights."""
    return 250 if settings.init == "scratch" else 50


def full_scale_command(settings: TrainSettings, epochs: Optional[int] = None, batch_size: int = 32,
                       points: int = 1024) -> str:
    """The command of the full-scale run of the same configuration (full ModelNet40, 2 ranks)."""
    epochs = full_scale_epochs(settings) if epochs is None else epochs
    parts = ["torchrun --standalone --nproc_per_node=2 -m diffcp.experiments.dcp_train",
             f"--protocol {settings.protocol} --model {settings.model} --init {settings.init} --icp {settings.icp}",
             "--learn-temperature" if settings.learn_temperature else "",
             f"--epochs {epochs} --batch-size {batch_size} --points {points}",
             "--folder $DIFFCP_DATA/modelnet40_ply_hdf5_2048",
             f"--out runs/dcp_train/{settings.protocol}_{settings.model}_{settings.icp}"]
    return " ".join(p for p in parts if p)


def expected_time(history: List[dict], settings: TrainSettings, epochs: int = 50, batch_size: int = 32,
                  points: int = 1024, objects: int = FULL_TRAIN_OBJECTS,
                  step_seconds: Optional[float] = None) -> dict:
    """The full-scale run's expected time on this machine, from a measured step time.

    ``step_seconds``: a step measured at ``batch_size`` x ``points`` (e.g. by
    ``benchmarks/bench_dcp_icp_share.py``); None extrapolates this run's median step time, per pair
    linearly in the batch, and between linearly (``low``) and quadratically (``high``) in the points
    (DGCNN's k-NN and DCP's soft matching are all-pairs; per-point work dominates small clouds).
    Validation time is not included.
    """
    steps = [h["step_seconds_median"] for h in history if h.get("step_seconds_median")]
    per_epoch_steps = math.ceil(objects / batch_size)
    record = {"epochs": epochs, "batch_size": batch_size, "points": points, "train_objects": objects,
              "steps_per_epoch": per_epoch_steps}
    if step_seconds is not None:
        hours = step_seconds * per_epoch_steps * epochs / 3600
        return record | {"step_seconds": step_seconds, "source": "given", "expected_hours": hours}
    if not steps:
        return record
    measured = float(np.median(steps))
    per_pair = measured / settings.batch_size
    ratio = points / settings.points
    low, high = (per_pair * objects * epochs * r / 3600 for r in (ratio, ratio ** 2))
    return record | {"measured_step_seconds": measured, "measured_batch": settings.batch_size,
                     "measured_points": settings.points, "expected_hours_low": low, "expected_hours_high": high,
                     "source": "extrapolated from this run's median step time on this machine"}


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", default="noise", choices=TRAIN_PROTOCOLS)
    p.add_argument("--model", default="v1", choices=("v1", "v2"))
    p.add_argument("--init", default=None, choices=("released", "scratch"))
    p.add_argument("--icp", default="none", choices=ICP_MODES)
    p.add_argument("--learn-temperature", action="store_true")
    p.add_argument("--icp-temperature", type=float, default=None)
    p.add_argument("--icp-iterations", type=int, default=10)
    p.add_argument("--icp-backward", default="unroll", choices=("unroll", "truncated", "implicit"))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--points", type=int, default=1024)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--clip-norm", type=float, default=None)
    p.add_argument("--emb-dims", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-val", type=int, default=None)
    p.add_argument("--folder", default=None, help="modelnet40_ply_hdf5_2048 folder (default: the subset)")
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt, best.pt, result.json)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    single_thread()
    started = time.time()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    try:
        settings = TrainSettings(
            protocol=args.protocol, model=args.model, init=args.init, icp=args.icp,
            learn_temperature=args.learn_temperature, icp_temperature=args.icp_temperature,
            icp_iterations=args.icp_iterations, icp_backward=args.icp_backward, epochs=args.epochs,
            batch_size=args.batch_size, points=args.points, lr=args.lr, weight_decay=args.weight_decay,
            clip_norm=args.clip_norm, emb_dims=args.emb_dims, seed=args.seed, max_train=args.max_train,
            max_val=args.max_val, folder=args.folder)
        result = train(settings, args.out, progress=not args.no_progress)
        rank, world = _rank_world()
        if rank == 0:
            from diffcp.provenance import write_result

            history = result["history"]
            last = history[-1] if history else {}
            best = result["best"] or {}
            data = {
                "settings": result["settings_record"],
                "world_size": world, "threads_per_rank": torch.get_num_threads(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "history": history,
                "rank_weight_sha256": result["rank_weight_sha256"],
                "validation": {"last_epoch": last.get("epoch"), "last": last.get("val"),
                               "best_epoch": best.get("epoch"), "best": best.get("val"),
                               "selection": "lowest mean isotropic rotation error on the validation split "
                                            "(after ICP when the run has ICP); the test split is never read"},
                "train_wall_seconds": time.time() - started,
                "full_scale": {"command": full_scale_command(settings),
                               "expected": expected_time(history, settings, epochs=full_scale_epochs(settings))},
            }
            command = (["torchrun", f"--nproc_per_node={world}"] if distributed else ["python"]) + \
                ["-m", "diffcp.experiments.dcp_train", *(sys.argv[1:] if argv is None else argv)]
            out = Path(args.out) / "result.json"
            if out.exists():
                out.unlink()  # a rerun of a finished run rewrites its result
            write_result(out, data, command=command, started=started)
            print(f"wrote {out}")
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
