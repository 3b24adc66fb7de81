"""Benchmark: the share of differentiable ICP in a DCP training step.

One training step of Experiment 2, part 2 (:mod:`diffcp.experiments.dcp_train`) on the same batch,
two ways:

- ``dcp``: DCP forward, DCP's loss, backward, Adam step;
- ``dcp+icp``: DCP forward, the ICP layer of ``--icp end_to_end`` from DCP's transform (soft nearest
  neighbours at diffcp's default temperature, point-to-point Procrustes, 10 iterations, tolerance 0,
  unrolled: ``dcp_train.icp_layer``), the loss after ICP, backward through ICP and DCP, gradient
  clipping, Adam step.

The ICP share is ``(t(dcp+icp) - t(dcp)) / t(dcp+icp)`` with medians over ``--repeats`` steps after
one warm-up step of each; the kinds of step alternate, so a change of the machine's load hits them
alike. Where ICP is a few per cent of the step, that difference drowns in the step's own noise on a
shared machine, so the ICP layer is also timed by itself (``icp_alone``: forward from DCP's
transform, detached, and backward to it; the backward through DCP is then not counted, it is the
same with and without ICP): share ``t(icp_alone) / (t(dcp) + t(icp_alone))``.

DCP-v1 with the released weights, in training mode (BatchNorm batch statistics); pairs of the
``noise`` protocol from the ModelNet40 train split (the subset unless ``--folder``). One torch
thread and one numba thread (``--threads 1``: ``dcp_train.single_thread``, since numba's pool
would reset torch to all cores at the first ICP call; each row records torch's threads after it). The load average is recorded before and after every configuration:
on a shared machine the absolute times move with it, the share much less.

Usage::

    OMP_NUM_THREADS=1 LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \\
        python benchmarks/bench_dcp_icp_share.py [--configs 8x512 8x1024 16x512 32x512] [--repeats 3]

Writes ``benchmarks/results/dcp-icp-share-<machine>.json`` (with provenance) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from diffcp.experiments import dcp_train as dt  # noqa: E402

GOAL_SHARE = 0.25


def machine_tag() -> str:
    from diffcp.provenance import _cpu_model

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = f"cpu-{len(os.sched_getaffinity(0))}core-{_cpu_model()}"
    name = re.sub(r"\((r|tm)\)", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def _batch(settings, batch: int):
    """The first ``batch`` training pairs of epoch 0 (the first ``batch`` train objects)."""
    objects, _ = dt._objects(dataclasses.replace(settings, max_train=batch), "train")
    return dt._stack(dt.training_pairs(objects, settings, 0), range(batch))


def _step(model, opt, batch, use_icp: bool, clip) -> float:
    source, target, R, t = batch
    start = time.perf_counter()
    _, T = model(source, target, use_icp=use_icp)
    loss = dt.dcp_loss(T, R, t)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    opt.step()
    return time.perf_counter() - start


def _icp_alone(model, batch) -> float:
    """The ICP layer by itself: forward from DCP's transform (a leaf here) and backward to it."""
    source, target, R, t = batch
    with torch.no_grad():
        T0, _ = model(source, target, use_icp=False)
    init = T0.detach().requires_grad_(True)
    start = time.perf_counter()
    loss = dt.dcp_loss(model.icp(source, target, init=init).transform, R, t)
    loss.backward()
    return time.perf_counter() - start


def measure(batch_size: int, points: int, repeats: int, folder=None) -> dict:
    settings = dt.TrainSettings(protocol="noise", model="v1", init="released", icp="end_to_end", batch_size=batch_size,
                                points=points, folder=folder)
    model = dt.build_model(settings).train()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.0)  # lr 0: same weights each step
    batch = _batch(settings, batch_size)
    load_before = os.getloadavg()
    times = {"dcp": [], "dcp+icp": [], "icp_alone": []}
    for i in range(repeats + 1):  # the first of each is a warm-up
        for kind, use_icp, clip in (("dcp", False, None), ("dcp+icp", True, settings.clip_norm), ("icp_alone", None, None)):
            model.load_state_dict(snapshot)
            seconds = _icp_alone(model, batch) if use_icp is None else _step(model, opt, batch, use_icp, clip)
            if i > 0:
                times[kind].append(seconds)
            print(f"  B={batch_size} N={points} {kind:8s} step {i}: {seconds:.3f} s", flush=True)
    dcp, both, alone = (statistics.median(times[k]) for k in ("dcp", "dcp+icp", "icp_alone"))
    return {"batch": batch_size, "points": points, "repeats": repeats, "dcp_step_s": dcp, "dcp_icp_step_s": both,
            "icp_s": both - dcp, "icp_share": (both - dcp) / both, "icp_alone_s": alone,
            "icp_alone_share": alone / (dcp + alone), "dcp_step_all_s": times["dcp"],
            "dcp_icp_step_all_s": times["dcp+icp"], "icp_alone_all_s": times["icp_alone"], "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()), "icp_settings": model.icp.settings.to_dict()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["8x512", "8x1024", "16x512", "32x512"],
                        help="BATCHxPOINTS, e.g. 8x512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--folder", default=None)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/dcp-icp-share-<machine>.json")
    args = parser.parse_args(argv)
    if args.threads == 1:
        dt.single_thread()  # numba's pool would otherwise reset torch to all cores at the first ICP call
    else:
        torch.set_num_threads(args.threads)
    started = time.time()
    rows = []
    for config in args.configs:
        b, n = (int(x) for x in config.lower().split("x"))
        rows.append(measure(b, n, args.repeats, args.folder))
        rows[-1]["torch_threads_after"] = torch.get_num_threads()
    print(f"\n{'batch':>5} {'points':>6} {'DCP step s':>10} {'DCP+ICP s':>10} {'diff s':>7} {'share':>7} "
          f"{'ICP alone s':>11} {'share':>7}  load avg (1 min) before/after")
    for r in rows:
        print(f"{r['batch']:5d} {r['points']:6d} {r['dcp_step_s']:10.3f} {r['dcp_icp_step_s']:10.3f} {r['icp_s']:7.3f} "
              f"{100 * r['icp_share']:6.1f}% {r['icp_alone_s']:11.3f} {100 * r['icp_alone_share']:6.1f}%  "
              f"{r['load_average_before'][0]:.2f} / {r['load_average_after'][0]:.2f}")
    from diffcp.provenance import write_result

    out = Path(args.out) if args.out else HERE / "results" / f"dcp-icp-share-{machine_tag()}.json"
    if out.exists():
        out.unlink()  # a rerun replaces the file
    data = {"what": "share of the differentiable ICP layer in a DCP-v1 training step (forward + backward + Adam, "
                    "same batch); medians after one warm-up", "goal_share": GOAL_SHARE,
            "threads": args.threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "ld_preload": os.environ.get("LD_PRELOAD"), "cores": os.cpu_count(),
            "note": "the machine was shared with other jobs: see the load averages per row", "rows": rows}
    command = ["python", "benchmarks/bench_dcp_icp_share.py", *(argv if argv is not None else sys.argv[1:])]
    write_result(out, data, command=command, started=started)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
