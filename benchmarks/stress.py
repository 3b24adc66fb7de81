"""Stress run: many registrations over hard inputs; every result and every gradient must be finite.

Inputs (each cloud drawn from a seed, see :func:`make_spec`), scaled to an RMS radius from 1e-6 to
1e4 and offset by up to 1e3 x that radius (source and target independently):

- symmetric shapes: a regular polygon (3 to 12 vertices, planar), the 8 corners of a cube, a
  3 x 3 x 3 lattice, points on a sphere (ICP is ambiguous on these: diffcp warns, RuntimeWarning
  "ambiguous", and must stay finite);
- degenerate ones: a plane, a line (collinear points), a few points repeated (duplicates), one
  point repeated (a cloud of zero extent), 3 to 5 points in general position;
- an asymmetric bumpy ellipsoid (the control group);

paired with a target that is the source moved (and its points reordered), the same cloud
(identical clouds), the source moved with noise, or an independent sample of the same shape; the
motion rotates by up to 0.3 rad (or, for a quarter of them, by up to pi). Clouds of different
sizes share a batch through padding (NaN in the padding rows) and lengths.

Every configuration runs: float32 / float64 x correspondence (hard ``nn``, ``soft_nn`` with the
default temperature, ``soft_nn`` with an explicit per-cloud tensor temperature that requires grad:
1e-4 to 1e-1 x the squared radius, or for a quarter of the clouds 1e-3 to 1 in absolute units,
whatever the scale) x (solver, metric) where valid x backward mode (unroll, truncated to 3
iterations, implicit). Gradients of a random linear function of the transform plus the final
error flow to the source, the target, both normals, ``init`` and the temperature.

Counted per configuration: registrations, "refused" (a ``ValueError`` / ``TypeError`` raised by
diffcp's input validation, i.e. from ``build_problem``: documented input errors), non-finite
results (transform, errors), non-finite gradients (per input), exceptions by type and message
prefix (any other exception is a failure), and the clouds diffcp warned about ("ambiguous").
A batch that raises is split in halves (recursively), so one bad cloud does not hide the others.

Usage::

    python benchmarks/stress.py                  # >= 50,000 registrations (--registrations)
    python benchmarks/stress.py --quick          # one small batch per configuration (a few hundred)
    python benchmarks/stress.py --seed 3 --threads 1 --budget 3600   # stop after the round running at 1 h
    python benchmarks/stress.py --repro '{"config": {...}, "spec": {...}}'   # one failing cloud

The result goes to ``benchmarks/results/stress-<machine-tag>.json`` (``-quick`` appended for
``--quick``) through :func:`diffcp.provenance.write_result` (command, commit, machine, date,
duration). ``tests/test_stress.py`` runs the quick slice and asserts zero failures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import diffcp  # noqa: E402
from diffcp.geometry import make_transform, so3_exp  # noqa: E402

KINDS = ("polygon", "cube", "lattice", "sphere", "plane", "line", "duplicates", "one_point", "few", "bumpy")
SYMMETRIC_KINDS = ("polygon", "cube", "lattice", "sphere")
PAIRINGS = ("moved", "identical", "noisy", "resampled")
SOLVER_METRICS = diffcp.settings.SOLVER_METRICS   # tests/test_icp.py checks it against an explicit list
CORRESPONDENCES = ("nn", "soft_default", "soft_explicit")
BACKWARDS = ("unroll", "truncated", "implicit")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MAX_ITERATIONS = 10
TRUNCATED = 3
MAX_POINTS = 48
INPUTS = ("source", "target", "source_normals", "target_normals", "init", "temperature")


# --------------------------------------------------------------------------------------------- configurations
def configurations():
    """Every valid (dtype, correspondence, solver, metric, backward), as dicts."""
    return [dict(dtype=d, correspondence=c, solver=s, metric=m, backward=b)
            for d in DTYPES for c in CORRESPONDENCES for s, m in SOLVER_METRICS for b in BACKWARDS]


def config_name(config):
    return "{dtype} {correspondence} {solver} {metric} {backward}".format(**config)


def icp_options(config, temperature=None):
    """The keyword options of :func:`diffcp.icp` for a configuration (``temperature``: the
    explicit soft temperature, a tensor)."""
    corr = {"nn": "nn", "soft_default": "soft_nn"}.get(config["correspondence"])
    if corr is None:
        corr = diffcp.SoftNearestNeighbor(temperature=temperature)
    backward = diffcp.TruncatedBackward(iterations=TRUNCATED) if config["backward"] == "truncated" else config["backward"]
    return dict(correspondence=corr, solver=config["solver"], metric=config["metric"], backward=backward,
                stopping=diffcp.Stopping(max_iterations=MAX_ITERATIONS, tolerance=1e-6))


# --------------------------------------------------------------------------------------------- inputs
def _unit(rng, n):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _rotation(rng, max_angle):
    return so3_exp(torch.as_tensor(_unit(rng, 1)[0] * rng.uniform(0, max_angle), dtype=torch.float64)).numpy()


def _bumpy(rng_shape, rng, n):
    """An asymmetric bumpy ellipsoid (normals from the implicit function's gradient)."""
    freqs = rng_shape.normal(size=(4, 3))
    freqs *= rng_shape.uniform(1.0, 3.0, (4, 1)) / np.linalg.norm(freqs, axis=1, keepdims=True)
    amps, phases = rng_shape.uniform(0.04, 0.12, 4), rng_shape.uniform(0, 2 * np.pi, 4)
    axes = np.array([1.0, rng_shape.uniform(0.6, 0.8), rng_shape.uniform(0.3, 0.45)])
    f, a, ph, ax = (torch.as_tensor(x, dtype=torch.float64) for x in (freqs, amps, phases, axes))
    u = torch.as_tensor(_unit(rng, n), dtype=torch.float64)
    x = (ax * (1 + (a * torch.sin(u @ f.T + ph)).sum(-1))[:, None] * u).requires_grad_(True)
    q = x / ax
    rho = q.norm(dim=1)
    F = rho - (1 + (a * torch.sin((q / rho[:, None]) @ f.T + ph)).sum(-1))
    (g,) = torch.autograd.grad(F.sum(), x)
    return x.detach().numpy(), (g / g.norm(dim=1, keepdim=True)).numpy()


def shape(kind, n, shape_seed, sample_seed):
    """``(points (n, 3), unit normals (n, 3))`` float64 of a shape; ``n`` may be changed by the
    shape (a polygon has its vertices, a cube its 8 corners)."""
    rs, r = np.random.default_rng(shape_seed), np.random.default_rng(sample_seed)
    z = np.array([0.0, 0.0, 1.0])
    if kind == "polygon":
        k = int(rs.integers(3, 13))
        a = 2 * np.pi * np.arange(k) / k
        return np.stack([np.cos(a), np.sin(a), np.zeros(k)], 1), np.tile(z, (k, 1))
    if kind == "cube":
        c = np.array([[x, y, w] for x in (-1.0, 1.0) for y in (-1.0, 1.0) for w in (-1.0, 1.0)])
        return c, c / np.sqrt(3)
    if kind == "lattice":
        g = np.array([[x, y, w] for x in (-1.0, 0.0, 1.0) for y in (-1.0, 0.0, 1.0) for w in (-1.0, 0.0, 1.0)])
        nrm = g.copy()
        nrm[13] = z  # the centre
        return g, nrm / np.linalg.norm(nrm, axis=1, keepdims=True)
    if kind == "sphere":
        u = _unit(r, n)
        return u, u
    if kind == "plane":
        return np.concatenate([r.uniform(-1, 1, (n, 2)), np.zeros((n, 1))], 1), np.tile(z, (n, 1))
    if kind == "line":
        t = r.uniform(-1, 1, n)
        return t[:, None] * np.array([1.0, 0.0, 0.0]), np.tile(z, (n, 1))
    if kind == "duplicates":
        k = int(rs.integers(1, 5))
        base, nrm = rs.normal(size=(k, 3)), _unit(rs, k)
        idx = np.arange(n) % k
        return base[idx], nrm[idx]
    if kind == "one_point":
        return np.tile(rs.normal(size=(1, 3)), (n, 1)), np.tile(_unit(rs, 1), (n, 1))
    if kind == "few":
        return rs.normal(size=(n, 3)), _unit(rs, n)
    if kind == "bumpy":
        return _bumpy(rs, r, n)
    raise ValueError(f"unknown kind {kind!r}")


def make_spec(rng):
    """A random cloud pair, as plain data (its seeds and parameters): see :func:`make_pair`."""
    kind = KINDS[int(rng.integers(len(KINDS)))]
    n = int(rng.integers(3, 6)) if kind == "few" else int(rng.integers(3, MAX_POINTS + 1))
    pairing = PAIRINGS[int(rng.integers(len(PAIRINGS)))]
    scale = float(10 ** rng.choice([-6.0, -3.0, 0.0, 2.0, 4.0, float(rng.uniform(-6, 4))]))

    def offset():
        return 0.0 if rng.random() < 0.2 else float(10 ** rng.uniform(-3, 3))

    return dict(kind=kind, n=n, m=int(rng.integers(3, MAX_POINTS + 1)), pairing=pairing, scale=scale,
                source_offset=offset(), target_offset=offset(),
                max_angle=float(math.pi if rng.random() < 0.25 else 0.3),
                init=["identity", "small", "large"][int(rng.integers(3))],
                relative_temperature=bool(rng.random() < 0.75), temperature=float(10 ** rng.uniform(-4, -1)),
                absolute_temperature=float(10 ** rng.uniform(-3, 0)), seed=int(rng.integers(2**31)))


def make_pair(spec):
    """Float64 numpy ``source, source_normals, target, target_normals, init (4, 4)`` and the
    explicit temperature of a spec."""
    rng = np.random.default_rng(spec["seed"])
    src, src_n = shape(spec["kind"], spec["n"], spec["seed"], spec["seed"] + 1)
    pairing = spec["pairing"]
    if pairing == "resampled":
        tgt, tgt_n = shape(spec["kind"], spec["m"] if spec["kind"] != "few" else spec["n"], spec["seed"],
                           spec["seed"] + 2)
    else:
        perm = rng.permutation(len(src))
        tgt, tgt_n = src[perm], src_n[perm]
    # unit RMS radius, then the scale
    centre = src.mean(0)
    radius = float(np.sqrt(((src - centre) ** 2).sum(1).mean())) or 1.0
    src, tgt = (src - centre) / radius * spec["scale"], (tgt - centre) / radius * spec["scale"]
    if pairing != "identical":
        R = _rotation(rng, spec["max_angle"])
        t = _unit(rng, 1)[0] * rng.uniform(0, 0.3) * spec["scale"]
        tgt, tgt_n = tgt @ R.T + t, tgt_n @ R.T
    if pairing == "noisy":
        tgt = tgt + rng.normal(size=tgt.shape) * 1e-3 * spec["scale"]
    src = src + _unit(rng, 1)[0] * spec["source_offset"] * spec["scale"]
    tgt = tgt + _unit(rng, 1)[0] * spec["target_offset"] * spec["scale"]
    init = np.eye(4)
    if spec["init"] != "identity":
        init[:3, :3] = _rotation(rng, 0.2 if spec["init"] == "small" else math.pi)
        init[:3, 3] = _unit(rng, 1)[0] * rng.uniform(0, 0.3) * spec["scale"]
    temperature = (spec["temperature"] * spec["scale"] ** 2 if spec["relative_temperature"]
                   else spec["absolute_temperature"])
    return src, src_n, tgt, tgt_n, init, temperature


def make_batch(specs, dtype, padding=float("nan")):
    """Padded ``(B, N, 3)`` tensors (``padding`` in the rows past each length), lengths, init
    ``(B, 4, 4)`` and temperatures ``(B,)``, all float64 cast to ``dtype``."""
    pairs = [make_pair(s) for s in specs]
    N = max(len(p[0]) for p in pairs)
    M = max(len(p[2]) for p in pairs)

    def pad(arrays, size):
        out = np.full((len(arrays), size, 3), padding)
        for b, a in enumerate(arrays):
            out[b, :len(a)] = a
        return torch.as_tensor(out, dtype=torch.float64).to(dtype)

    return dict(
        source=pad([p[0] for p in pairs], N), source_normals=pad([p[1] for p in pairs], N),
        target=pad([p[2] for p in pairs], M), target_normals=pad([p[3] for p in pairs], M),
        source_lengths=torch.tensor([len(p[0]) for p in pairs]), target_lengths=torch.tensor([len(p[2]) for p in pairs]),
        init=torch.as_tensor(np.stack([p[4] for p in pairs]), dtype=torch.float64).to(dtype),
        temperature=torch.tensor([p[5] for p in pairs], dtype=torch.float64).to(dtype))


# --------------------------------------------------------------------------------------------- one call
class Refused(Exception):
    """diffcp's validation refused the input (a documented ValueError / TypeError)."""


def _refused_by_validation(err):
    """Whether ``err`` is a ValueError/TypeError raised while diffcp validated the input."""
    if not isinstance(err, (ValueError, TypeError)):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    return any(f.name in ("build_problem", "resolve_settings") and f"diffcp{os.sep}" in f.filename for f in frames)


def _ambiguous(caught):
    flagged = set()
    others = Counter()
    for w in caught:
        msg = str(w.message)
        m = re.search(r"ambiguous for batch elements \[([0-9, ]*)\]", msg)
        if m and issubclass(w.category, RuntimeWarning):
            flagged.update(int(i) for i in m.group(1).split(",") if i.strip())
        else:
            others[f"{w.category.__name__}: {msg[:80]}"] += 1
    return flagged, others


def run_batch(config, specs, loss_seed=0):
    """Register the clouds of ``specs`` in one call: a dict with, per cloud, whether the result
    and each input's gradient are finite, the clouds flagged ambiguous and other warnings. Raises
    :class:`Refused` or the exception diffcp raised."""
    dtype = DTYPES[config["dtype"]]
    data = make_batch(specs, dtype)
    B = len(specs)
    leaves = {k: data[k].clone().requires_grad_(True) for k in INPUTS}
    soft_explicit = config["correspondence"] == "soft_explicit"
    opts = icp_options(config, temperature=leaves["temperature"] if soft_explicit else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = diffcp.icp(leaves["source"], leaves["target"], source_normals=leaves["source_normals"],
                             target_normals=leaves["target_normals"], init=leaves["init"],
                             source_lengths=data["source_lengths"], target_lengths=data["target_lengths"], **opts)
            w = torch.randn(B, 4, 4, generator=torch.Generator().manual_seed(loss_seed), dtype=torch.float64).to(dtype)
            names = [k for k in INPUTS if k != "temperature" or soft_explicit]
            # two losses, so that a non-finite gradient is traced to the result it comes from (the
            # implicit mode returns the errors of its graph-free run: no gradient reaches them)
            losses = {"transform": (out.transform * w).sum(), "final_error": out.final_error.sum()}
            losses = {k: v for k, v in losses.items() if v.requires_grad}
            grads = {k: torch.autograd.grad(v, [leaves[n] for n in names], allow_unused=True, retain_graph=True)
                     for k, v in losses.items()}
        except Exception as err:  # noqa: BLE001 - classified by the caller
            if _refused_by_validation(err):
                raise Refused(f"{type(err).__name__}: {err}") from err
            raise
    result_ok = (torch.isfinite(out.transform).flatten(1).all(1) & torch.isfinite(out.errors).flatten(1).all(1)
                 & torch.isfinite(out.final_error)).tolist()
    grad_ok = {}  # "d transform / d source" -> per cloud
    for what, gs in grads.items():
        for k, g in zip(names, gs):
            grad_ok[f"d {what} / d {k}"] = [True] * B if g is None else torch.isfinite(g).reshape(B, -1).all(1).tolist()
    flagged, others = _ambiguous(caught)
    return dict(result_ok=result_ok, grad_ok=grad_ok, ambiguous=flagged, warnings=others)


# --------------------------------------------------------------------------------------------- the run
def _new_counts():
    return dict(runs=0, seconds=0.0, refused=0, nonfinite_result=0, nonfinite_grad=0, nonfinite_grad_by_input=Counter(),
                exceptions=Counter(), refusals=Counter(), ambiguous=0, warnings=Counter(), by_kind=Counter(),
                examples=[])


def _prefix(err):
    return f"{type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}"


def _record(counts, config, spec, kind, detail, max_examples=3):
    """Count a failure (or refusal) by the input's kind and keep the first examples (for --repro)."""
    for one in spec if isinstance(spec, list) else [spec]:
        counts["by_kind"][f"{kind}: {one['kind']}"] += 1
    if sum(1 for e in counts["examples"] if e["failure"] == kind) < max_examples:
        counts["examples"].append(dict(failure=kind, detail=detail, config=config, spec=spec))


def _tally(counts, config, specs, res):
    counts["runs"] += len(specs)
    counts["ambiguous"] += len(res["ambiguous"])
    counts["warnings"].update(res["warnings"])
    for b, spec in enumerate(specs):
        if not res["result_ok"][b]:
            counts["nonfinite_result"] += 1
            _record(counts, config, spec, "nonfinite_result", "")
        bad = [k for k, ok in res["grad_ok"].items() if not ok[b]]
        if bad:
            counts["nonfinite_grad"] += 1
            counts["nonfinite_grad_by_input"].update(bad)
            _record(counts, config, spec, "nonfinite_grad", ", ".join(bad))


def _format(err):
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))[-1500:]


def run_config(config, specs, counts):
    """Run one batch of a configuration and add it to ``counts``. A batch that raises is split in
    halves, recursively, so that each cloud that raises alone is found (and counted) and the
    others are counted from the half batches that pass. Returns whether the batch failed."""
    try:
        res = run_batch(config, specs)
    except Exception as batch_err:  # noqa: BLE001
        if len(specs) == 1:
            counts["runs"] += 1
            if isinstance(batch_err, Refused):
                counts["refused"] += 1
                counts["refusals"][str(batch_err)[:300]] += 1
                _record(counts, config, specs[0], "refused", str(batch_err)[:300])
            else:
                counts["exceptions"][_prefix(batch_err)] += 1
                _record(counts, config, specs[0], "exception", _prefix(batch_err) + "\n" + _format(batch_err))
            return True
        half = len(specs) // 2
        failed = [run_config(config, part, counts) for part in (specs[:half], specs[half:])]
        if not any(failed):
            # the batch raised but both halves pass (their clouds are already counted)
            if isinstance(batch_err, Refused):
                key = "[batch only] " + str(batch_err)[:300]
                counts["refusals"][key] += 1
                _record(counts, config, specs, "batch_only_refusal", key)
            else:
                key = "[batch only] " + _prefix(batch_err)
                counts["exceptions"][key] += 1
                _record(counts, config, specs, "batch_only_exception", key + "\n" + _format(batch_err))
        return True
    _tally(counts, config, specs, res)
    return False


def failures(counts):
    """Failures of a configuration's counts: non-finite results or gradients and exceptions."""
    return counts["nonfinite_result"] + counts["nonfinite_grad"] + sum(counts["exceptions"].values())


def run_stress(registrations=50_000, batch=64, seed=0, quick=False, progress=True, configs=None, budget=None):
    """Run the stress test: ``{config name: counts}``.

    Rounds of one batch of ``batch`` clouds per configuration, until ``registrations`` are done
    (with ``quick``, one round). ``budget`` (seconds) stops after the round running when it is
    spent; so does Ctrl-C (the counts so far are returned; ``counts[...]["runs"]`` says how many).
    """
    configs = configurations() if configs is None else configs
    rounds = 1 if quick else max(1, math.ceil(registrations / (batch * len(configs))))
    counts = {config_name(c): _new_counts() for c in configs}
    started = time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=rounds * len(configs), unit="batch", desc="stress", dynamic_ncols=True)
    try:
        for r in range(rounds):
            for i, config in enumerate(configs):
                rng = np.random.default_rng([seed, r, i])
                specs = [make_spec(rng) for _ in range(batch)]
                t = time.time()
                run_config(config, specs, counts[config_name(config)])
                counts[config_name(config)]["seconds"] += time.time() - t
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(failures=sum(failures(c) for c in counts.values()))
            if budget is not None and time.time() - started > budget:
                break
    except KeyboardInterrupt:
        print("interrupted: reporting the registrations done so far", file=sys.stderr)
    if bar is not None:
        bar.close()
    return counts


# --------------------------------------------------------------------------------------------- report
def table(counts):
    """The counts as a text table, one row per configuration, and the totals."""
    head = (f"{'configuration':58s} {'runs':>6s} {'refused':>7s} {'NaN res':>7s} {'NaN grad':>8s} {'except':>6s} "
            f"{'ambig':>6s} {'sec':>6s}")
    lines = [head, "-" * len(head)]
    total = Counter()
    for name, c in counts.items():
        exc = sum(c["exceptions"].values())
        lines.append(f"{name:58s} {c['runs']:6d} {c['refused']:7d} {c['nonfinite_result']:7d} "
                     f"{c['nonfinite_grad']:8d} {exc:6d} {c['ambiguous']:6d} {c['seconds']:6.1f}")
        total.update(runs=c["runs"], refused=c["refused"], res=c["nonfinite_result"], grad=c["nonfinite_grad"],
                     exc=exc, amb=c["ambiguous"], sec=c["seconds"])
    lines.append("-" * len(head))
    lines.append(f"{'total':58s} {total['runs']:6d} {total['refused']:7d} {total['res']:7d} {total['grad']:8d} "
                 f"{total['exc']:6d} {total['amb']:6d} {total['sec']:6.0f}")
    details = []
    for name, c in counts.items():
        for k, v in c["exceptions"].items():
            details.append(f"  {name}: {v} x {k}")
        for k, v in c["refusals"].items():
            details.append(f"  {name}: {v} refused: {k[:130]}")
        if c["by_kind"]:
            details.append(f"  {name}: by input kind {dict(c['by_kind'])}")
        if c["nonfinite_grad_by_input"]:
            details.append(f"  {name}: non-finite gradients w.r.t. {dict(c['nonfinite_grad_by_input'])}")
    if details:
        lines += ["", "details:"] + details
    return "\n".join(lines)


def _plain(counts):
    def value(k, v):
        return dict(v) if isinstance(v, Counter) else round(v, 2) if k == "seconds" else v

    return {name: {k: value(k, v) for k, v in c.items()} for name, c in counts.items()}


def machine_tag() -> str:
    from diffcp.provenance import _cpu_model

    name = f"cpu-{len(os.sched_getaffinity(0))}core-{_cpu_model()}"
    name = re.sub(r"\((r|tm)\)", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def repro(text):
    """Run one example of a results file (``{"config": ..., "spec": ...}``) and print what happens."""
    ex = json.loads(text)
    specs = ex["spec"] if isinstance(ex["spec"], list) else [ex["spec"]]
    print("config:", ex["config"])
    res = run_batch(ex["config"], specs)
    print("result finite:", res["result_ok"])
    print("gradients finite:", res["grad_ok"])
    print("ambiguous:", sorted(res["ambiguous"]), "other warnings:", dict(res["warnings"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small batch per configuration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--registrations", type=int, default=50_000, help="at least this many (full run)")
    parser.add_argument("--batch", type=int, default=None, help="clouds per call (64; 4 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch and numba threads")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: stop after the round of configurations running when they are spent")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--repro", default=None, help="JSON of one example from a results file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import numba

        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    if args.repro:
        repro(args.repro)
        return 0
    batch = args.batch or (4 if args.quick else 64)
    started = time.time()
    from diffcp.provenance import provenance

    # the code that runs is the code imported now: write_result records the commit at the end, which
    # may differ on a working tree that others edit during a long run
    code_at_start = provenance()["git"]
    counts = run_stress(args.registrations, batch=batch, seed=args.seed, quick=args.quick, budget=args.budget)
    print(table(counts))
    total = sum(c["runs"] for c in counts.values())
    fails = sum(failures(c) for c in counts.values())
    print(f"\n{total} registrations in {time.time() - started:.0f} s; {fails} failures, "
          f"{sum(c['refused'] for c in counts.values())} refused")
    if not args.no_write:
        from diffcp.provenance import write_result

        name = f"stress-{machine_tag()}" + ("-quick" if args.quick else "") + ".json"
        code_at_end = provenance()["git"]

        def library(git):  # the commit and the library files that differ from it
            return git["commit"], sorted(p for p in git.get("dirty_paths", []) if p.startswith("diffcp/"))

        data = dict(code_at_start=code_at_start,
                    library_changed_during_run=library(code_at_end) != library(code_at_start),
                    registrations=total, requested=args.registrations if not args.quick else total, failures=fails, refused=sum(c["refused"] for c in counts.values()),
                    seed=args.seed, batch=batch, threads=args.threads, max_iterations=MAX_ITERATIONS,
                    truncated_iterations=TRUNCATED, kinds=list(KINDS), pairings=list(PAIRINGS),
                    configurations=_plain(counts))
        path = write_result(HERE / "results" / name, data, command=" ".join(["python"] + sys.argv), started=started)
        print(f"wrote {path}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
