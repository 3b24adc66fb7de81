#!/usr/bin/env python3
"""Choose Procrustes' ``gradient_eps`` by measurement.

The rotation of :func:`diffcp.procrustes` is the polar factor of the cross-covariance ``M``; its
backward divides by sums ``s'_i + s'_j`` of signed singular values, clamped below
``gradient_eps * s_1``. The clamp only acts where the rotation is (nearly) ambiguous. Two
measurements, float64, every ``gradient_eps`` of the grid:

1. **Fit from a degenerate start** (what a learning pipeline meets): gradient descent on ``M`` to
   reach a target rotation, ``loss = |polar(M) - R*|^2``, started at matrices whose polar factor is
   ambiguous (a rank-one ``M``, and a ``M`` with ``s'_2 + s'_3 = 0``). A tiny clamp gives huge
   first steps that throw ``M`` far away; the final loss after a fixed budget is reported.
2. **Gradient accuracy** on matrices whose conditioning ``(s'_2 + s'_3) / s_1`` is ``r``: the
   relative error of the analytic gradient against central finite differences. The clamp biases
   the gradient where ``r < gradient_eps`` and leaves it exact elsewhere.

    python benchmarks/procrustes_gradient_eps.py   # about a minute; writes benchmarks/results/procrustes-gradient-eps.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffcp.geometry import random_rotation, so3_exp  # noqa: E402
from diffcp.minimize.procrustes import _PolarRotation  # noqa: E402
from diffcp.provenance import write_result  # noqa: E402

EPS_GRID = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)
F64 = torch.float64


def _degenerate_starts(n: int, g: torch.Generator) -> torch.Tensor:
    """Half rank-one matrices ``u v^T``, half ``U diag(1, 1, -1) V^T`` (``s'_2 + s'_3 = 0``)."""
    u, v = torch.randn(n, 3, 1, generator=g, dtype=F64), torch.randn(n, 1, 3, generator=g, dtype=F64)
    rank_one = u @ v
    U, V = random_rotation(n, generator=g, dtype=F64), random_rotation(n, generator=g, dtype=F64)
    mirrored = U @ torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=F64)) @ V.transpose(-1, -2)
    return torch.cat([rank_one[: n // 2], mirrored[n // 2:]])


def fit_from_degenerate(eps: float, n: int = 64, steps: int = 300, lr: float = 0.05, seed: int = 0):
    """Median and worst final loss of gradient descent from degenerate starts."""
    g = torch.Generator().manual_seed(seed)
    target = random_rotation(n, generator=g, dtype=F64)
    M = _degenerate_starts(n, g).requires_grad_()
    for _ in range(steps):
        loss = ((_PolarRotation.apply(M, eps) - target) ** 2).sum((-1, -2))
        (grad,) = torch.autograd.grad(loss.sum(), M)
        with torch.no_grad():
            M -= lr * grad
    final = ((_PolarRotation.apply(M.detach(), eps) - target) ** 2).sum((-1, -2))
    return float(final.median()), float(final.max())


def gradient_error(eps: float, r: float, n: int = 16, seed: int = 1, h: float = 1e-7):
    """Median relative error of the analytic gradient where ``(s'_2 + s'_3) / s_1 = r``."""
    g = torch.Generator().manual_seed(seed)
    U, V = random_rotation(n, generator=g, dtype=F64), random_rotation(n, generator=g, dtype=F64)
    s = torch.tensor([1.0, 0.5 + r / 2, -0.5 + r / 2], dtype=F64)  # s'_2 + s'_3 = r, det < 0 corrected
    M = (U * s) @ V.transpose(-1, -2)
    W = torch.randn(n, 3, 3, generator=g, dtype=F64)
    f = lambda X: (_PolarRotation.apply(X, eps) * W).sum((-1, -2))
    X = M.clone().requires_grad_()
    (grad,) = torch.autograd.grad(f(X).sum(), X)
    numeric = torch.zeros_like(M)
    for i in range(3):
        for j in range(3):
            E = torch.zeros_like(M)
            E[:, i, j] = h * r  # a step well inside the region where the polar factor is smooth
            numeric[:, i, j] = (f(M + E) - f(M - E)) / (2 * h * r)
    err = (grad - numeric).norm(dim=(-1, -2)) / numeric.norm(dim=(-1, -2))
    return float(err.median())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "procrustes-gradient-eps.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    ratios = (1e-1, 1e-2, 1e-3, 1e-4, 1e-6)
    rows = []
    print(f"{'gradient_eps':>12s} {'fit median':>11s} {'fit worst':>10s}  " + " ".join(f"err r={r:<6g}" for r in ratios))
    for eps in EPS_GRID:
        med, worst = fit_from_degenerate(eps)
        errors = {f"{r:g}": gradient_error(eps, r) for r in ratios}
        rows.append({"gradient_eps": eps, "fit_median_loss": med, "fit_worst_loss": worst, "gradient_rel_error": errors})
        print(f"{eps:12g} {med:11.2e} {worst:10.2e}  " + " ".join(f"{errors[f'{r:g}']:12.2e}" for r in ratios))
    write_result(args.out, {"rows": rows, "setup": {
        "fit": "gradient descent on M, lr 0.05, 300 steps, 64 starts (32 rank-one, 32 with s'_2 + s'_3 = 0), "
               "loss |polar(M) - R*|_F^2 to a random rotation",
        "gradient_error": "median relative error vs central differences, 16 matrices per ratio r = (s'_2 + s'_3) / s_1",
        "dtype": "float64"}}, command=["python", "benchmarks/procrustes_gradient_eps.py", *(argv or [])], started=started)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
