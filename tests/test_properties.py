"""Properties of :func:`diffcp.icp` on random smooth shapes (hypothesis), for every correspondence x
metric x solver that makes sense:

1. rigid equivariance on both sides: source moved by ``A``, target by ``B`` (any rotation,
   translations up to 1e3 x the cloud's radius) and ``init`` by ``B init A^-1`` gives ``B T A^-1``,
   after one iteration (the iteration map) and after eight;
2. invariance to the order of the source and the target points;
3. a batch equals a loop over its clouds;
4. a padded batch (garbage, NaN and Inf included, in the padding rows) equals the unpadded clouds,
   and the padding rows get a zero, finite gradient;
5. float32 agrees with float64 (loosely) at the fixed point, on the clouds where both converged;
6. results and gradients (source, target, both normals, init, a tensor temperature) are finite in
   every backward mode, float32 and float64.

The shapes are random bumpy ellipsoids (three different axes and random low-frequency bumps, so no
symmetry: ICP is well posed and must not warn "ambiguous"); source and target sample the surface
independently (no point has an exact partner) and the target is moved by a random small motion.
Symmetric and degenerate inputs are the stress run's (``benchmarks/stress.py``, ``test_stress.py``).

Tolerances (rotation in radians, translation in units of the source cloud's RMS radius) are in
``TOL`` and stated per property and dtype. In float32, equivariance after eight iterations is also
allowed 10x the larger of two distances on the unmoved problem: float64 against float32, and
float64 against float64 on the moved float32 inputs moved back (the rounding that the offsets cost).
On sparse clouds the linearised steps can amplify rounding by 1e4 in eight iterations; these
distances show when it is the problem, not the motion, that is sensitive. Levenberg-Marquardt gets
looser tolerances where its accept/reject test decides: a step is accepted when the cost decreases,
which rounding decides for steps below ``sqrt(eps)`` of the radius.

Known failures are marked ``xfail(strict=True)`` with a reproduction in the reason (``XFAIL``,
``LM_*``); each is pinned by an explicit example, so that it does not depend on the random draws.

``DIFFCP_PROPERTY_EXAMPLES`` (default 2) sets the number of examples per test; every run is
deterministic (``derandomize=True``).
"""

import math
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

import diffcp
from diffcp.geometry import invert_transform, make_transform, so3_exp

F32, F64 = torch.float32, torch.float64
EXAMPLES = int(os.environ.get("DIFFCP_PROPERTY_EXAMPLES", "2"))
# no shrinking: a failing example is reported as drawn (shrinking ICP runs would take minutes; the
# minimal reproductions are written by hand)
PROPERTY = hsettings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
                     phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --------------------------------------------------------------------------------------------- combinations
SOLVER_METRICS = diffcp.settings.SOLVER_METRICS   # tests/test_icp.py checks it against an explicit list
# the explicit temperature is in squared distance units, relative to the RMS radius (about 0.6 here)
EXPLICIT_TEMPERATURE = 5e-3
CORRESPONDENCES = ["nn", "soft_default", "soft_explicit"]
COMBOS = [(c, s, m) for c in CORRESPONDENCES for s, m in SOLVER_METRICS]
IDS = [f"{c}-{s}-{m}" for c, s, m in COMBOS]


def _correspondence(name, temperature=None):
    if name == "nn":
        return "nn"
    if name == "soft_default":
        return "soft_nn"
    return diffcp.SoftNearestNeighbor(temperature=EXPLICIT_TEMPERATURE if temperature is None else temperature)


def _options(combo, iterations, tolerance=0.0, backward="unroll", temperature=None):
    corr, solver, metric = combo
    return dict(correspondence=_correspondence(corr, temperature), solver=solver, metric=metric,
                stopping=diffcp.Stopping(max_iterations=iterations, tolerance=tolerance), backward=backward)


# tolerances: (rotation in radians, translation / RMS radius), per property, dtype and solver kind
TOL = {
    # 1: after the same iterations; float32 loses 1e3 x radius x 6e-8 to the offsets
    ("equivariance", F64, "exact"): (1e-8, 1e-8),
    ("equivariance", F64, "lm"): (1e-6, 1e-6),
    ("equivariance", F32, "exact"): (2e-3, 2e-3),
    ("equivariance", F32, "lm"): (5e-3, 5e-3),
    # 2-4: the same sums in another order (or another grouping)
    ("reorder", F64, "exact"): (1e-9, 1e-9),
    ("reorder", F64, "lm"): (1e-6, 1e-6),
    ("reorder", F32, "exact"): (1e-4, 1e-4),
    ("reorder", F32, "lm"): (1e-3, 1e-3),
    # 5: float32 against float64, both run to convergence
    ("dtype", None, "exact"): (2e-3, 2e-3),
    ("dtype", None, "lm"): (5e-3, 5e-3),
}


def _tol(prop, dtype, combo):
    return TOL[(prop, dtype, "lm" if combo[1] == "levenberg_marquardt" else "exact")]


# --------------------------------------------------------------------------------------------- shapes
def _shape(seed):
    """A bumpy ellipsoid: axes (1, a, b) all different and 4 random low-frequency bumps."""
    rng = np.random.default_rng(seed)
    freqs = rng.normal(size=(4, 3))
    freqs *= rng.uniform(1.0, 3.0, (4, 1)) / np.linalg.norm(freqs, axis=1, keepdims=True)
    amps = rng.uniform(0.04, 0.12, 4)
    phases = rng.uniform(0, 2 * np.pi, 4)
    axes = np.array([1.0, rng.uniform(0.6, 0.8), rng.uniform(0.3, 0.45)])
    return freqs, amps, phases, axes


def _bumps(u, freqs, amps, phases):
    return 1 + (amps * torch.sin(u @ freqs.T + phases)).sum(-1)


def bumpy_surface(shape_seed, sample_seed, n):
    """``(points (n, 3), normals (n, 3))`` in float64 on the surface ``|x / axes| = r(u)``."""
    freqs, amps, phases, axes = (torch.as_tensor(a, dtype=F64) for a in _shape(shape_seed))
    rng = np.random.default_rng(sample_seed)
    u = torch.as_tensor(rng.normal(size=(n, 3)), dtype=F64)
    u = u / u.norm(dim=1, keepdim=True)
    x = axes * _bumps(u, freqs, amps, phases)[:, None] * u
    # outward normal: the gradient of the implicit function F(x) = |x / axes| - r(direction)
    x = x.detach().requires_grad_(True)
    q = x / axes
    rho = q.norm(dim=1)
    F = rho - _bumps(q / rho[:, None], freqs, amps, phases)
    (grad,) = torch.autograd.grad(F.sum(), x)
    return x.detach(), grad / grad.norm(dim=1, keepdim=True)


def _rotation(seed, max_angle=math.pi):
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=3)
    omega = axis / np.linalg.norm(axis) * rng.uniform(0, max_angle)
    return so3_exp(torch.as_tensor(omega, dtype=F64))


def _motion(seed, max_angle, translation):
    """A rigid motion ``(4, 4)`` float64: a rotation up to ``max_angle`` and a translation of the
    given length in a random direction."""
    rng = np.random.default_rng(seed + 1)
    d = rng.normal(size=3)
    t = torch.as_tensor(d / np.linalg.norm(d) * translation, dtype=F64)
    return make_transform(_rotation(seed, max_angle), t)


class Case:
    """Float64 (or cast) clouds ``(B, N, 3)``, normals, targets ``(B, M, 3)``, and the source
    clouds' RMS radii ``(B,)``; ``recipe`` rebuilds it (``make_case(...)``)."""

    def __init__(self, source, source_normals, target, target_normals, radius, recipe="?"):
        self.source, self.source_normals, self.target, self.target_normals = source, source_normals, target, target_normals
        self.radius, self.recipe = radius, recipe

    def __repr__(self):
        return self.recipe

    def to(self, dtype):
        return Case(*(x.to(dtype) for x in (self.source, self.source_normals, self.target, self.target_normals)),
                    self.radius, self.recipe)

    def kwargs(self):
        return dict(source_normals=self.source_normals, target_normals=self.target_normals)


def make_case(batch, n, m, seed, angle, shift):
    """``batch`` bumpy shapes, the source (``n`` points) and the target (``m`` points) sampled
    independently, the target moved by a motion up to ``angle`` radians and ``shift`` in length."""
    src, src_n, tgt, tgt_n = [], [], [], []
    for b in range(batch):
        s, sn = bumpy_surface(seed + b, seed + 1000 + b, n)
        t, tn = bumpy_surface(seed + b, seed + 2000 + b, m)
        T = _motion(seed + 3000 + b, angle, shift)
        src.append(s), src_n.append(sn)
        tgt.append(t @ T[:3, :3].T + T[:3, 3]), tgt_n.append(tn @ T[:3, :3].T)
    src = torch.stack(src)
    centred = src - src.mean(1, keepdim=True)
    radius = centred.pow(2).sum(-1).mean(-1).sqrt()
    return Case(src, torch.stack(src_n), torch.stack(tgt), torch.stack(tgt_n), radius,
                f"make_case({batch}, {n}, {m}, {seed}, {angle!r}, {shift!r})")


@st.composite
def cases(draw, batch=(1, 2), n=(20, 80), m=(20, 100)):
    """Arguments for :func:`make_case`: bumpy shapes, independently sampled source and target."""
    return make_case(draw(st.integers(*batch)), draw(st.integers(*n)), draw(st.integers(*m)),
                     draw(st.integers(0, 2**30)), draw(st.floats(0.0, 0.3)), draw(st.floats(0.0, 0.15)))


# --------------------------------------------------------------------------------------------- helpers
def _icp(case, combo, warn_is_error=True, **options):
    with warnings.catch_warnings():
        # the shapes have no symmetry: an "ambiguous" warning would be a false alarm (or a run away)
        warnings.filterwarnings("error" if warn_is_error else "ignore", message=".*ambiguous", category=RuntimeWarning)
        return diffcp.icp(case.source, case.target, **case.kwargs(), **options)


def _angle(R):
    """Angle in radians of ``R (..., 3, 3)``, accurate near 0 and for a float32 rotation in float64."""
    s = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    c = (R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.atan2(s.norm(dim=-1) / 2, c)


def _mismatch(T1, T2, radius):
    """``(rotation angle in radians, translation / radius)`` between transforms, per cloud."""
    D = torch.linalg.solve(T1.to(F64), T2.to(F64))
    return _angle(D[..., :3, :3]), D[..., :3, 3].norm(dim=-1) / radius


def _assert_close(T1, T2, radius, tol, what):
    """``tol``: (rotation, translation) tolerances, numbers or per cloud."""
    rot, trans = _mismatch(T1, T2, radius)
    assert torch.isfinite(T1).all() and torch.isfinite(T2).all(), f"{what}: non-finite transform"
    assert bool(((rot <= tol[0]) & (trans <= tol[1])).all()), (
        f"{what}: rotation differs by {rot.tolist()} rad (tolerance {tol[0]}), translation by "
        f"{trans.tolist()} x radius (tolerance {tol[1]})")


def _rotate(T, x):
    return x @ T[..., :3, :3].transpose(-1, -2)


def _move(T, x):
    return _rotate(T, x) + T[..., None, :3, 3]


# --------------------------------------------------------------------------------------------- 1: equivariance
# Known failures, each with a minimal reproduction (see the reasons). strict=True: a test that starts
# passing fails the run, so that its mark is removed with the fix.
LM_NOT_EQUIVARIANT = (
    "was a diffcp bug (fixed): Levenberg-Marquardt is not rigid-equivariant. It damps with Marquardt's diag(J^T W J), "
    "which depends on the orientation of the frame, so rotating the inputs changes its steps (most along "
    "the flat directions of the plane metrics) and it can end in another local minimum. Repro: "
    "c = make_case(1, 20, 20, 0, 0.0, 0.0); R = _motion(0, 3.0, 0.0)[None]; "
    "kw = dict(source_normals=c.source_normals, solver='levenberg_marquardt', metric='point_to_plane', "
    "stopping=diffcp.Stopping(max_iterations=1, tolerance=0)); "
    "a = diffcp.icp(c.source, c.target, target_normals=c.target_normals, **kw).transform; "
    "b = diffcp.icp(c.source, c.target @ R[:, :3, :3].mT, target_normals=c.target_normals @ R[:, :3, :3].mT, "
    "init=R, **kw).transform; (R @ a - b).abs().max()  # 1e-3; 4e-16 with solver='gauss_newton'")
LM_ROUNDING = (
    "was a diffcp bug (fixed): in float32, Levenberg-Marquardt's accept test (cost_new < cost) decides on rounding noise, "
    "so a batch and a loop over its clouds take different steps (1.3e-3 rad apart after 8 iterations; "
    "Gauss-Newton: 1.7e-6). Repro: c = make_case(3, 47, 34, 2443, 0.0, 0.11660547111247924).to(torch.float32); "
    "o = dict(correspondence=diffcp.SoftNearestNeighbor(temperature=5e-3), solver='levenberg_marquardt', "
    "metric='point_to_plane', stopping=diffcp.Stopping(max_iterations=8, tolerance=0)); "
    "a = diffcp.icp(c.source, c.target, **c.kwargs(), **o).transform[1]; "
    "b = diffcp.icp(c.source[1], c.target[1], source_normals=c.source_normals[1], "
    "target_normals=c.target_normals[1], **o).transform; (a - b).abs().max()  # 1e-3; 1.4e-6 with gauss_newton")
# LM_NOT_EQUIVARIANT was fixed by the rotation-invariant block damping (levenberg_marquardt.block_damping):
# the explicit example of the equivariance test below is its reproduction and now passes.
XFAIL = {}


def _params(test, dtypes=(None,)):
    """pytest params (combination, and dtype if given) with the known failures marked."""
    out = []
    for combo, cid in zip(COMBOS, IDS):
        for d in dtypes:
            name = None if d is None else {F64: "f64", F32: "f32"}[d]
            reason = XFAIL.get((test, cid, name))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(*combo, *(() if d is None else (d,)), marks=marks,
                                    id=cid if d is None else f"{cid}-{name}"))
    return out


@pytest.mark.parametrize("corr,solver,metric,dtype", _params("equivariance", (F64, F32)))
@PROPERTY
@given(case=cases(), motion_seed=st.integers(0, 2**30),
       log_offsets=st.tuples(st.floats(-3, 3), st.floats(-3, 3)))
@example(case=make_case(1, 20, 20, 1, 0.2, 0.1), motion_seed=3, log_offsets=(0.0, 0.0))  # see LM_NOT_EQUIVARIANT
def test_rigid_equivariance_on_both_sides(corr, solver, metric, dtype, case, motion_seed, log_offsets):
    combo = (corr, solver, metric)
    # translations from 0 to 1e3 x the radius, log-uniform
    a_shift, b_shift = (0.0 if e < -2.9 else 10**e for e in log_offsets)
    B = case.source.shape[0]
    A = torch.stack([_motion(motion_seed + 10 * b, math.pi, a_shift * float(case.radius[b])) for b in range(B)])
    Bm = torch.stack([_motion(motion_seed + 10 * b + 5, math.pi, b_shift * float(case.radius[b])) for b in range(B)])
    moved = Case(_move(A, case.source), _rotate(A, case.source_normals), _move(Bm, case.target),
                 _rotate(Bm, case.target_normals), case.radius)
    init = Bm @ invert_transform(A)
    if dtype == F32:
        # the moved float32 inputs moved back in float64: the original problem with the rounding that
        # the motion costs float32 (1e-4 of the radius at an offset of 1e3 radii)
        rounded = Case(_move(invert_transform(A), moved.source.to(F32).to(F64)),
                       _rotate(invert_transform(A), moved.source_normals.to(F32).to(F64)),
                       _move(invert_transform(Bm), moved.target.to(F32).to(F64)),
                       _rotate(invert_transform(Bm), moved.target_normals.to(F32).to(F64)), case.radius)
        rounded_init = torch.linalg.solve(Bm, init.to(F32).to(F64)) @ A
    # one iteration (the iteration map itself) and eight (what the rounding makes of it)
    for iterations in (1, 8):
        opts = _options(combo, iterations=iterations)
        ref = _icp(case.to(dtype), combo, **opts)
        out = _icp(moved.to(dtype), combo, init=init.to(dtype), **opts)
        back = torch.linalg.solve(Bm, out.transform.to(F64)) @ A  # should be ref.transform
        tol = _tol("equivariance", dtype, combo)
        if dtype == F32 and iterations > 1:
            # where the iterations amplify rounding (sparse clouds, unstable linearised steps), float32
            # cannot be equivariant beyond the problem's own sensitivity to float32 rounding: allowed
            # 10x the distance from float64 to the float32 run and to the rounded inputs
            ref64 = _icp(case, combo, **opts).transform
            gaps = [_mismatch(ref64, ref.transform, case.radius),
                    _mismatch(ref64, _icp(rounded, combo, init=rounded_init, **opts).transform, case.radius)]
            tol = tuple(t + 10 * torch.maximum(g1, g2) for t, g1, g2 in zip(tol, *gaps))
        _assert_close(ref.transform, back, case.radius, tol,
                      f"equivariance after {iterations} iterations ({dtype}, offsets {a_shift:.3g}, {b_shift:.3g} x radius)")


# --------------------------------------------------------------------------------------------- 2: order
@pytest.mark.parametrize("corr,solver,metric", COMBOS, ids=IDS)
@PROPERTY
@given(case=cases(), data=st.data())
def test_invariant_to_point_order(corr, solver, metric, case, data):
    combo = (corr, solver, metric)
    dtype = data.draw(st.sampled_from([F64, F32]), label="dtype")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**30), label="permutation seed"))
    p = torch.randperm(case.source.shape[1], generator=g)
    q = torch.randperm(case.target.shape[1], generator=g)
    shuffled = Case(case.source[:, p], case.source_normals[:, p], case.target[:, q], case.target_normals[:, q],
                    case.radius, case.recipe)
    opts = _options(combo, iterations=8)
    a = _icp(case.to(dtype), combo, **opts)
    b = _icp(shuffled.to(dtype), combo, **opts)
    _assert_close(a.transform, b.transform, case.radius, _tol("reorder", dtype, combo), f"point order ({dtype})")


# --------------------------------------------------------------------------------------------- 3: batch
@pytest.mark.parametrize("corr,solver,metric", COMBOS, ids=IDS)
@PROPERTY
@given(case=cases(batch=(2, 3)), dtype=st.sampled_from([F64, F32]))
def test_batch_equals_loop(corr, solver, metric, case, dtype):
    _check_batch_equals_loop((corr, solver, metric), case, dtype)


# LM_ROUNDING was fixed by the accept test on float64 costs with a tie band (levenberg_marquardt.not_worse)
def test_batch_equals_loop_levenberg_marquardt_float32():
    _check_batch_equals_loop(("soft_explicit", "levenberg_marquardt", "point_to_plane"),
                             make_case(3, 47, 34, 2443, 0.0, 0.11660547111247924), F32)


def _check_batch_equals_loop(combo, case, dtype):
    opts = _options(combo, iterations=8)
    c = case.to(dtype)
    batched = _icp(c, combo, **opts)
    for b in range(c.source.shape[0]):
        one = Case(c.source[b], c.source_normals[b], c.target[b], c.target_normals[b], case.radius[b])
        single = _icp(one, combo, **opts)
        _assert_close(batched.transform[b], single.transform, case.radius[b], _tol("reorder", dtype, combo),
                      f"batch element {b} against a loop ({dtype})")
        assert bool(batched.iterations[b] == single.iterations)


# --------------------------------------------------------------------------------------------- 4: padding
GARBAGE = ["nan", "inf", "huge", "copies", "zeros"]


def _pad(x, length, size, garbage):
    """``x (n, 3)`` (its first ``length`` rows) padded to ``size`` rows of garbage."""
    out = torch.empty(size, 3, dtype=x.dtype)
    out[:length] = x[:length]
    rest = size - length
    fill = {"nan": torch.full((rest, 3), float("nan")),
            "inf": torch.tensor([float("inf"), -float("inf"), float("nan")]).repeat(rest, 1),
            "huge": torch.full((rest, 3), 1e30),
            "copies": x[:1].repeat(rest, 1),
            "zeros": torch.zeros(rest, 3)}[garbage]
    out[length:] = fill.to(x.dtype)
    return out


@pytest.mark.parametrize("corr,solver,metric", COMBOS, ids=IDS)
@PROPERTY
@given(case=cases(batch=(2, 2)), data=st.data())
def test_padded_batch_equals_unpadded(corr, solver, metric, case, data):
    combo = (corr, solver, metric)
    dtype = data.draw(st.sampled_from([F64, F32]), label="dtype")
    garbage = data.draw(st.sampled_from(GARBAGE), label="garbage")
    c = case.to(dtype)
    n, m = c.source.shape[1], c.target.shape[1]
    # cloud 0 keeps every point, cloud 1 loses a random tail (at least 20 points stay)
    ls = [n, data.draw(st.integers(min(20, n), n), label="source length")]
    lt = [m, data.draw(st.integers(min(20, m), m), label="target length")]
    padded = Case(*(torch.stack([_pad(x[b], (ls if i < 2 else lt)[b], x.shape[1], garbage) for b in range(2)])
                    for i, x in enumerate((c.source, c.source_normals, c.target, c.target_normals))), case.radius)
    source = padded.source.clone().requires_grad_(True)
    opts = _options(combo, iterations=6)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ambiguous", category=RuntimeWarning)
        out = diffcp.icp(source, padded.target, **padded.kwargs(), source_lengths=torch.tensor(ls),
                         target_lengths=torch.tensor(lt), **opts)
    (grad,) = torch.autograd.grad(out.transform.sum(), source)
    assert torch.isfinite(grad).all(), f"non-finite gradient with {garbage} padding"
    assert (grad[1, ls[1]:] == 0).all(), "the padding rows got a gradient"
    for b in range(2):
        one = Case(c.source[b, :ls[b]], c.source_normals[b, :ls[b]], c.target[b, :lt[b]],
                   c.target_normals[b, :lt[b]], case.radius[b])
        ref = _icp(one, combo, **opts)
        _assert_close(out.transform[b].detach(), ref.transform, case.radius[b], _tol("reorder", dtype, combo),
                      f"padded element {b} ({garbage} padding, {dtype})")


# --------------------------------------------------------------------------------------------- 5: dtypes
# Compared at the fixed point (both runs converged: updates below 1e-6 in float64, 1e-5 in float32,
# within 50 iterations): where a run has not converged (on sparse clouds the
# linearised metrics can cycle between correspondence sets, hard or soft), the two runs follow
# chaotic paths and there is nothing to compare; such clouds are left out and an example with none
# left is discarded (hypothesis reports it if too many are).
@pytest.mark.parametrize("corr,solver,metric", COMBOS, ids=IDS)
@PROPERTY
@given(case=cases(batch=(2, 2), n=(30, 90), m=(30, 90)))
def test_float32_agrees_with_float64(corr, solver, metric, case):
    combo = (corr, solver, metric)
    # 50 iterations can end anywhere (see test_levenberg_marquardt_does_not_run_away): only the
    # converged clouds are compared, and a warning about the others is no failure here
    out64 = _icp(case, combo, warn_is_error=False, **_options(combo, iterations=50, tolerance=1e-6))
    out32 = _icp(case.to(F32), combo, warn_is_error=False, **_options(combo, iterations=50, tolerance=1e-5))
    assert out32.transform.dtype == F32 and torch.isfinite(out32.transform).all()
    done = out64.converged & out32.converged
    assume(bool(done.any()))
    _assert_close(out64.transform[done], out32.transform[done], case.radius[done], _tol("dtype", None, combo),
                  f"float32 vs float64 (converged clouds {done.nonzero().flatten().tolist()})")


LM_RUNS_AWAY = (
    "diffcp limitation, partly fixed: Levenberg-Marquardt point-to-plane ICP with soft correspondences wanders "
    "on a sparse, weakly constrained problem. Before the block damping and the rounding-tolerant accept test it "
    "ended 2.7e3 radii away (Marquardt's diag(J^T W J) left the flat directions undamped); now it stays within "
    "0.83 radii (and with initial_damping=0.1 within 1.03 radii, not 38, thanks to the trust region of the "
    "correspondences, levenberg_marquardt.TrustRegion), but its error still grows from 0.078 to 0.163 (2.09x, "
    "the test allows 2x; Gauss-Newton: 1.33x): LM minimises each fixed-correspondence problem to its end, and "
    "along the weak direction (smallest/largest curvature 2e-2) that end moves with every new set of soft "
    "matches, so the loop cycles at a larger error than one Gauss-Newton step per iteration. Repro: c = make_case(2, 30, 30, 0, 0.0, 0.0); "
    "out = diffcp.icp(c.source[1], c.target[1], source_normals=c.source_normals[1], "
    "target_normals=c.target_normals[1], correspondence='soft_nn', solver='levenberg_marquardt', "
    "metric='point_to_plane', stopping=diffcp.Stopping(max_iterations=50, tolerance=1e-6)); "
    "out.final_error / out.errors[0]  # 2.09; 1.33 with gauss_newton")


def test_levenberg_marquardt_stays_within_the_clouds_size():
    # the part of LM_RUNS_AWAY that is fixed: no longer thousands of radii away
    c = make_case(2, 30, 30, 0, 0.0, 0.0)
    combo = ("soft_default", "levenberg_marquardt", "point_to_plane")
    out = _icp(c, combo, warn_is_error=False, **_options(combo, iterations=50, tolerance=1e-6))
    assert bool((out.translation.norm(dim=-1) < c.radius).all()), out.translation.norm(dim=-1) / c.radius
    # a larger first damping slid 38 radii away before LM kept to the trust region of its correspondences
    opts = _options(combo, iterations=50, tolerance=1e-6)
    opts["solver"] = diffcp.LevenbergMarquardtSolver(initial_damping=0.1)
    out = _icp(c, combo, warn_is_error=False, **opts)
    assert bool((out.translation.norm(dim=-1) < 2 * c.radius).all()), out.translation.norm(dim=-1) / c.radius


@pytest.mark.xfail(strict=True, reason=LM_RUNS_AWAY)
def test_levenberg_marquardt_does_not_run_away():
    c = make_case(2, 30, 30, 0, 0.0, 0.0)
    combo = ("soft_default", "levenberg_marquardt", "point_to_plane")
    out = _icp(c, combo, warn_is_error=False, **_options(combo, iterations=50, tolerance=1e-6))
    # never farther than the clouds' size from the truth (the identity), nor worse than it started
    assert bool((out.translation.norm(dim=-1) < c.radius).all()), out.translation.norm(dim=-1) / c.radius
    assert bool((out.final_error <= 2 * out.errors[:, 0]).all()), (out.errors[:, 0], out.final_error)


# --------------------------------------------------------------------------------------------- 6: gradients
BACKWARDS = {"unroll": "unroll", "truncated": diffcp.TruncatedBackward(iterations=3), "implicit": "implicit"}


@pytest.mark.parametrize("backward", list(BACKWARDS))
@pytest.mark.parametrize("corr,solver,metric", COMBOS, ids=IDS)
@PROPERTY
@given(case=cases(), data=st.data())
def test_results_and_gradients_are_finite(corr, solver, metric, backward, case, data):
    combo = (corr, solver, metric)
    dtype = data.draw(st.sampled_from([F64, F32]), label="dtype")
    c = case.to(dtype)
    B = c.source.shape[0]
    inputs = {"source": c.source, "target": c.target, "source_normals": c.source_normals,
              "target_normals": c.target_normals,
              "init": _motion(data.draw(st.integers(0, 2**30), label="init seed"), 0.1, 0.05).to(dtype).repeat(B, 1, 1)}
    temperature = None
    if corr == "soft_explicit":
        inputs["temperature"] = temperature = torch.full((B,), EXPLICIT_TEMPERATURE, dtype=dtype) \
            if data.draw(st.booleans(), label="per-cloud temperature") else torch.tensor(EXPLICIT_TEMPERATURE, dtype=dtype)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    iterations = data.draw(st.integers(1, 8), label="iterations")
    opts = _options(combo, iterations=iterations, tolerance=data.draw(st.sampled_from([0.0, 1e-6]), label="tolerance"),
                    backward=BACKWARDS[backward], temperature=leaves.get("temperature", temperature))
    out = diffcp.icp(leaves["source"], leaves["target"], source_normals=leaves["source_normals"],
                     target_normals=leaves["target_normals"], init=leaves["init"], **opts)
    for name in ("transform", "errors", "final_error"):
        assert torch.isfinite(getattr(out, name)).all(), f"non-finite {name}"
    w = torch.randn(B, 4, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)
    loss = (out.transform * w).sum() + out.final_error.sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    bad = [k for k, g in zip(leaves, grads) if g is not None and not torch.isfinite(g).all()]
    assert not bad, f"non-finite gradients w.r.t. {bad}"
