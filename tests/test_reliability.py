"""Hard geometry and bad input: each defect found by trying diffcp as a new user would, as a
regression test for its class (far from the origin, rank-deficient implicit systems in float32,
non-rigid init, NaN in distances/normals/padding, dtypes, magnitudes, symmetric normal pairs,
damping), plus the behaviours that hand-made mutants of the library showed to be untested."""

import math
import warnings

import numpy as np
import pytest
import torch

import diffcp
from diffcp import settings as S
from diffcp.geometry import hat, random_transform, rotation_error, transform_points
from diffcp.icp import _ImplicitGradient
from shapes import sample

F64, F32 = torch.float64, torch.float32


def _pair(shape="bumpy_sphere", n=400, seed=0, angle=0.3, shift=0.1, dtype=F64):
    pts, nrm = sample(shape, n, seed=seed, dtype=dtype)
    T = random_transform(1, max_angle=angle, max_translation=shift, generator=torch.Generator().manual_seed(seed),
                         dtype=dtype)
    return pts[None], nrm[None], transform_points(T, pts[None]), (nrm @ T[0, :3, :3].T)[None], T


# ----------------------------------------------------------------------------- far from the origin
@pytest.mark.parametrize("solver,metric", [("gauss_newton", "point_to_plane"), ("gauss_newton", "symmetric"),
                                           ("levenberg_marquardt", "point_to_plane"), ("procrustes", "point_to_point"),
                                           ("levenberg_marquardt", "point_to_point")])
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-8), (F32, 2e-2)])
def test_a_rigid_motion_of_both_clouds_does_not_change_the_answer(solver, metric, dtype, tol):
    src, sn, tgt, tn, T = _pair(dtype=dtype)
    errors = []
    for offset in (0.0, 1e3, -3e3):  # 1e3 to 3e3 times the cloud's radius
        shift = torch.tensor([offset, -0.5 * offset, 0.25 * offset], dtype=dtype)
        out = diffcp.icp(src + shift, tgt + shift, source_normals=sn, target_normals=tn, metric=metric, solver=solver,
                         stopping=S.Stopping(max_iterations=60, tolerance=1e-9))
        assert bool(out.converged.all()) or dtype == F32
        # the motion between the shifted clouds is shift o T o shift^-1: same rotation
        errors.append(rotation_error(out.rotation, T[:, :3, :3]).item())
    assert max(errors) < tol, errors


def test_left_and_right_rigid_motions_compose():
    src, sn, tgt, tn, T = _pair(n=300, seed=3)
    g = torch.Generator().manual_seed(4)
    A = random_transform(1, max_angle=2.0, max_translation=500.0, generator=g, dtype=F64)
    Bm = random_transform(1, max_angle=2.0, max_translation=500.0, generator=g, dtype=F64)
    base = diffcp.icp(src, tgt, target_normals=tn, metric="point_to_plane", solver="gauss_newton",
                      stopping=S.Stopping(40, 1e-10))
    # the source moved by A and the target by B, started from the correspondingly moved guess
    init = Bm @ torch.eye(4, dtype=F64)[None] @ diffcp.invert_transform(A)
    moved = diffcp.icp(transform_points(A, src), transform_points(Bm, tgt), init=init,
                       target_normals=tn @ Bm[0, :3, :3].T, metric="point_to_plane", solver="gauss_newton",
                       stopping=S.Stopping(40, 1e-10))
    torch.testing.assert_close(moved.transform, Bm @ base.transform @ diffcp.invert_transform(A), atol=1e-8, rtol=0)


# ----------------------------------------------------------------------------- implicit backward, float32
def test_implicit_gradient_survives_an_exactly_rank_deficient_system_in_float32():
    for dtype in (F32, F64):
        A = torch.zeros(1, 6, 6, dtype=dtype)
        A[0, :2, :2] = 0.5  # rank one: float32 rounds a 1e-12 relative damping away next to it
        A[0, 2:, 2:] = torch.eye(4, dtype=dtype)
        z = torch.zeros(1, 6, dtype=dtype, requires_grad=True)
        _ImplicitGradient.apply(z, torch.eye(6, dtype=dtype)[None] - A).backward(torch.ones(1, 6, dtype=dtype))
        torch.testing.assert_close(z.grad, torch.ones(1, 6, dtype=dtype), atol=1e-3, rtol=0)


@pytest.mark.parametrize("metric", ["point_to_plane", "symmetric"])
def test_implicit_backward_on_a_planar_polygon_in_float32(metric):
    a = torch.arange(6) * math.pi / 3
    hexagon = torch.stack([a.cos(), a.sin(), torch.zeros(6)], -1)
    up = torch.tensor([0.0, 0.0, 1.0]).expand(6, 3)
    batch = torch.stack([hexagon, hexagon * 1.3])  # one more element: one bad one must not spoil the batch
    t = (batch + torch.tensor([0.01, 0.02, 0.03])).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # it is ambiguous, and says so
        out = diffcp.icp(batch, t, source_normals=up.expand(2, 6, 3), target_normals=up.expand(2, 6, 3),
                         metric=metric, solver="gauss_newton", backward="implicit")
    out.transform.sum().backward()
    assert torch.isfinite(out.transform).all() and torch.isfinite(t.grad).all()


# ----------------------------------------------------------------------------- init
@pytest.mark.parametrize("solver", ["procrustes", "gauss_newton", "levenberg_marquardt"])
@pytest.mark.parametrize("make", [lambda: torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=F64)),
                                  lambda: torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=F64)),
                                  lambda: torch.tensor([[1.0, 0.1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
                                                       dtype=F64)])
def test_a_non_rigid_init_is_refused(solver, make):
    src, sn, tgt, tn, _ = _pair(n=50)
    with pytest.raises(ValueError, match="init must hold rigid motions"):
        diffcp.icp(src, tgt, init=make(), target_normals=tn, solver=solver,
                   metric="point_to_point" if solver == "procrustes" else "point_to_plane")


# ----------------------------------------------------------------------------- NaN and zero values
def test_nan_or_infinite_distances_get_no_weight():
    sq = torch.tensor([[0.01, float("nan"), float("inf"), -1e-9]], requires_grad=True)
    for w in (diffcp.distance_weights(sq, 1.0), diffcp.reject_by_distance(sq, 0.5),
              diffcp.reject_by_distance(sq, 0.5, temperature=0.1)):
        assert w[0, 1] == 0 and w[0, 2] == 0 and w[0, 0] > 0.8 and w[0, 3] > 0.8
        if w.requires_grad:  # hard rejection is a step: no gradient
            (g,) = torch.autograd.grad(w.sum(), sq)
            assert torch.isfinite(g).all()
    r = torch.tensor([[0.5, float("nan"), float("inf")]])
    assert diffcp.robust_weights(r, "huber", 1.0).tolist() == [[1.0, 0.0, 0.0]]


def test_zero_or_nan_normals_get_no_weight():
    ns = torch.tensor([[[0.0, 0, 1], [0, 0, 0], [float("nan"), 0, 0], [0, 0, 1]]])
    nq = torch.tensor([[[0.0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0]]])
    for w in (diffcp.reject_by_normal_angle(ns, nq, 120.0), diffcp.reject_by_normal_angle(ns, nq, 180.0),
              diffcp.reject_by_normal_angle(ns, nq, 120.0, temperature=0.1), diffcp.normal_weights(ns, nq)):
        assert w[0, 0] > 0.5 and (w[0, 1:] == 0).all(), w


def test_nan_in_padding_is_ignored_as_the_contract_says():
    src, _, tgt, _, _ = _pair(n=100)
    pad = torch.full((1, 20, 3), float("nan"), dtype=F64)
    lengths = torch.tensor([100])
    stop = S.Stopping(max_iterations=10, tolerance=0)
    for corr in ("nn", S.SoftNearestNeighbor(temperature=1e-3)):
        padded = diffcp.icp(torch.cat([src, pad], 1), torch.cat([tgt, pad], 1), source_lengths=lengths,
                            target_lengths=lengths, correspondence=corr, stopping=stop)
        plain = diffcp.icp(src, tgt, correspondence=corr, stopping=stop)
        torch.testing.assert_close(padded.transform, plain.transform, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"source contains NaN or Inf values \(in points before its length\)"):
        diffcp.icp(torch.cat([src, pad], 1), torch.cat([tgt, pad], 1), source_lengths=torch.tensor([101]),
                   target_lengths=lengths)


# ----------------------------------------------------------------------------- dtypes, shapes, magnitudes
X = torch.rand(30, 3, dtype=F64)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(source=X.half(), target=X.half()), TypeError, r"source must have a floating-point dtype \(float32 or float64\)"),
    (dict(source=X.bfloat16(), target=X.bfloat16()), TypeError, r"source must have a floating-point dtype"),
    (dict(source=X.float(), target=X.float(), metric="point_to_plane", solver="gauss_newton", target_normals=X),
     TypeError, "target_normals has dtype torch.float64 but target has torch.float32"),
    (dict(metric="point_to_plane", solver="gauss_newton", target_normals=X.long()), TypeError,
     "target_normals must have a floating-point dtype"),
    (dict(source_mask=torch.ones(1, 29, dtype=torch.bool)), ValueError, r"source_mask must have shape \(1, 30\)"),
    (dict(source=X * 1e20, target=X.float() * 1e20), TypeError, "target has dtype"),
    (dict(source=X.float() * 1e20, target=X.float() * 1e20), ValueError, "source clouds .0. are spread over more than"),
    (dict(source=X.float() * 1e-25, target=X.float() * 1e-25), ValueError, "spread over less than"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(source=X, target=X + 0.01)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        diffcp.icp(args.pop("source"), args.pop("target"), **args)


def test_projective_nan_normal_map_names_target_normals():
    depth = torch.full((1, 8, 8), 2.0, dtype=F64)
    normals = torch.zeros(1, 8, 8, 3, dtype=F64)
    normals[..., 2] = -1
    normals[0, 3, 3] = float("nan")
    K = diffcp.intrinsics_matrix(10.0, 10.0, 4.0, 4.0, dtype=F64)
    with pytest.raises(ValueError, match=r"target_normals \(the normal map\) contains NaN"):
        diffcp.icp(X, depth, target_normals=normals, correspondence=S.ProjectiveAssociation(K))


@pytest.mark.parametrize("call,match", [
    (lambda: diffcp.rotation_error(2 * torch.eye(3), torch.eye(3)), "predicted must hold rotation matrices"),
    (lambda: diffcp.rotation_error(torch.eye(3), torch.diag(torch.tensor([1.0, 1, -1]))), "expected must hold rotation"),
    (lambda: diffcp.random_transform(2, max_angle=float("nan")), r"max_angle must be a finite number in \[0, 3.14159\]"),
    (lambda: diffcp.random_transform(2, max_translation=float("inf")), "max_translation must be a finite number"),
    (lambda: diffcp.random_rotation(-1), "batch_size must be a non-negative integer"),
    (lambda: diffcp.so3_exp(torch.zeros(2)), r"omega must have shape \(\.\.\., 3\)"),
    (lambda: diffcp.so3_exp(torch.zeros(3, dtype=torch.int64)), "omega must have a floating-point dtype"),
    (lambda: diffcp.transform_points(torch.eye(4), torch.zeros(5, 3, dtype=F64)), "points have dtype"),
    (lambda: diffcp.transform_points(torch.eye(3), torch.zeros(5, 3)), r"transform must have shape \(\.\.\., 4, 4\)"),
    (lambda: diffcp.make_transform(torch.eye(3), torch.zeros(2)), r"translation must have shape \(\.\.\., 3\)"),
])
def test_geometry_helpers_validate_their_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ----------------------------------------------------------------------------- parity with the peers
@pytest.mark.parametrize("solver", ["gauss_newton", "levenberg_marquardt"])
def test_symmetric_metric_orients_normal_pairs(solver):
    src, sn, tgt, tn, T = _pair(n=400, seed=1)
    tn = tn.clone()
    tn[:, ::2] *= -1  # every other target normal flipped, as estimated normals can be
    out = diffcp.icp(src, tgt, source_normals=sn, target_normals=tn, metric="symmetric", solver=solver,
                     stopping=S.Stopping(60, 1e-12))
    assert rotation_error(out.rotation, T[:, :3, :3]).item() < 1e-8
    assert (out.translation - T[:, :3, 3]).norm().item() < 1e-9


def test_a_well_posed_float32_step_is_not_damped_away():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(4, 6, 6, generator=g, dtype=F64)
    A = M @ M.transpose(-1, -2) + torch.diag(torch.tensor([1e-2, 1e-2, 1e-2, 1.0, 1.0, 1.0], dtype=F64))
    b = torch.randn(4, 6, generator=g, dtype=F64)
    exact = torch.linalg.solve(A, b)
    x32 = diffcp.damped_solve(A.float(), b.float(), damping=0.0).double()
    assert ((x32 - exact).norm(dim=-1) / exact.norm(dim=-1)).max() < 1e-4
    # a rank-deficient system still gets a finite answer and gradient in float32
    A0 = A.float().clone().requires_grad_()
    A_sing = A0 * torch.tensor([1.0, 1, 1, 1, 1, 0])[:, None] * torch.tensor([1.0, 1, 1, 1, 1, 0])
    x = diffcp.damped_solve(A_sing, b.float(), damping=0.0)
    x.sum().backward()
    assert torch.isfinite(x).all() and torch.isfinite(A0.grad).all()


# ----------------------------------------------------------------------------- what mutants showed untested
def test_soft_truncation_does_not_certify_many_small_dropped_weights():
    """5000 points, each just below the tolerance but together far above it, must not be dropped."""
    T, tol = 0.01, 1e-6
    s = math.sqrt(T * math.log(10 / tol))  # each far point weighs tol / 10 against the nearest
    g = torch.Generator().manual_seed(0)
    d = torch.randn(5000, 3, generator=g, dtype=F64).abs() + torch.tensor([3.0, 0, 0], dtype=F64)
    cap = s * d / d.norm(dim=-1, keepdim=True)  # a cap around +x: their mean is far from the origin
    points = torch.cat([torch.zeros(1, 3, dtype=F64), cap])[None]
    query = torch.zeros(1, 1, 3, dtype=F64)
    exact = diffcp.soft_nearest(query, points, T, backend="dense").points
    truncated = diffcp.soft_nearest(query, points, T, backend="truncated", k=4, truncation_tolerance=tol).points
    assert exact[0, 0, 0] > 1e-4  # the dropped mass matters here
    torch.testing.assert_close(truncated, exact, atol=1e-12, rtol=0)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_relative_tolerance_stops_at_the_same_iteration_at_any_scale(scale):
    src, _, tgt, _, _ = _pair(n=300, seed=2)
    stop = S.Stopping(max_iterations=100, tolerance=1e-5)
    unit = diffcp.icp(src, tgt, stopping=stop, correspondence=S.NearestNeighbor(backend="tree"))
    scaled = diffcp.icp(src * scale, tgt * scale, stopping=stop, correspondence=S.NearestNeighbor(backend="tree"))
    assert 2 < int(unit.iterations) < 100
    assert torch.equal(unit.iterations, scaled.iterations)
    torch.testing.assert_close(scaled.rotation, unit.rotation, atol=1e-9, rtol=0)


@pytest.mark.parametrize("metric", ["point_to_point", "point_to_plane"])
def test_levenberg_marquardt_at_an_exact_cost_tie(metric):
    src, sn, tgt, tn, T = _pair(n=60)
    # a perfect fit: every step ties with the cost 0 and must keep the transform
    lm = diffcp.levenberg_marquardt(metric, T, src, tgt, torch.ones(1, 60, dtype=F64), target_normals=tn,
                                    iterations=4)
    torch.testing.assert_close(lm.transform, T, atol=1e-12, rtol=0)
    # all-zero weights: cost 0 everywhere, nothing to move
    zero = diffcp.levenberg_marquardt(metric, T, src, tgt + 1.0, torch.zeros(1, 60, dtype=F64), target_normals=tn,
                                      iterations=4)
    assert torch.equal(zero.transform, T)
    # a tie is no increase (levenberg_marquardt.not_worse): every (zero) step is kept, so the damping
    # falls by the factor each time, and a float32 batch and a loop decide alike near convergence
    torch.testing.assert_close(zero.damping, torch.full((1,), 1e-3 / 10.0**4, dtype=F64), rtol=1e-12, atol=0)


def test_so3_exp_small_angle_branch_against_the_matrix_exponential():
    g = torch.Generator().manual_seed(0)
    axes = torch.randn(40, 3, generator=g, dtype=F64)
    axes = axes / axes.norm(dim=-1, keepdim=True)
    angles = torch.logspace(-9, math.log10(0.99e-3), 40, dtype=F64)[:, None]  # all below the branch point
    omega = axes * angles
    torch.testing.assert_close(diffcp.so3_exp(omega), torch.linalg.matrix_exp(hat(omega)), atol=1e-15, rtol=0)


# ----------------------------------------------------------------------------- Open3D's measures and criteria
def test_fitness_and_inlier_rmse_equal_open3ds_evaluate_registration():
    o3d = pytest.importorskip("open3d")
    src, _, tgt, _, T = _pair(n=300, seed=5)
    g = torch.Generator().manual_seed(6)
    junk = torch.rand(1, 60, 3, generator=g, dtype=F64) * 4 - 2  # outliers in the source
    src = torch.cat([src, junk], 1)
    out = diffcp.icp(src, tgt, rejection=[S.DistanceRejection(0.05)], stopping=S.Stopping(30, 1e-9))
    cloud = lambda x: o3d.geometry.PointCloud(o3d.utility.Vector3dVector(x[0].numpy()))
    ref = o3d.pipelines.registration.evaluate_registration(cloud(src), cloud(tgt), 0.05, out.transform[0].numpy())
    assert 0.5 < ref.fitness < 1.0
    assert float(out.fitness) == pytest.approx(ref.fitness, abs=1e-12)
    assert float(out.inlier_rmse) == pytest.approx(ref.inlier_rmse, rel=1e-9)
    plain = diffcp.icp(src[:, :300], tgt, stopping=S.Stopping(30, 1e-9))  # no outliers, no rejection
    assert float(plain.fitness) == 1.0 and float(plain.inlier_rmse) < 1e-6
    assert not out.fitness.requires_grad


@pytest.mark.parametrize("backend", ["grid", "tree"])  # the compiled loop and the general one
def test_relative_rmse_criterion_stops_when_the_error_settles(backend):
    src, _, tgt, _, _ = _pair(n=300, seed=7)
    tgt = tgt + 0.01 * torch.randn(tgt.shape, generator=torch.Generator().manual_seed(8), dtype=F64)  # noisy
    corr = S.NearestNeighbor(backend=backend)
    full = diffcp.icp(src, tgt, correspondence=corr, stopping=S.Stopping(60, tolerance=0.0))
    early = diffcp.icp(src, tgt, correspondence=corr, stopping=S.Stopping(60, tolerance=0.0, relative_rmse=1e-3))
    assert int(full.iterations) == 60 and 2 < int(early.iterations) < 60 and bool(early.converged)
    e = early.errors[0, : int(early.iterations)]
    assert (e[-2] - e[-1]).abs() <= 1e-3 * e[-2] and ((e[:-2] - e[1:-1]).abs() > 1e-3 * e[:-2]).all()
    other = diffcp.icp(src, tgt, correspondence=S.NearestNeighbor(backend="tree" if backend == "grid" else "grid"),
                       stopping=S.Stopping(60, tolerance=0.0, relative_rmse=1e-3))
    assert torch.equal(other.iterations, early.iterations)
