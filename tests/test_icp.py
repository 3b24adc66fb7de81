"""The ICP loop: recovery, batching, Open3D parity, gradients in every backward mode, bad input."""

import importlib
import math
import warnings

import numpy as np
import pytest
import torch

import diffcp
from diffcp.geometry import make_transform, random_transform, rotation_error, transform_points
from shapes import sample

F64 = torch.float64


def _pair(shape="bumpy_sphere", n=400, batch=1, angle=0.25, shift=0.05, seed=0, dtype=F64):
    """Source clouds, targets = exactly transformed sources (normals too), and the transforms."""
    g = torch.Generator().manual_seed(seed)
    pts, nrm = sample(shape, n, seed=seed, dtype=dtype)
    src = pts.expand(batch, n, 3).clone()
    src_n = nrm.expand(batch, n, 3).clone()
    T = random_transform(batch, max_angle=angle, max_translation=shift, generator=g, dtype=dtype)
    tgt = transform_points(T, src)
    tgt_n = src_n @ T[:, :3, :3].transpose(-1, -2)
    perm = torch.randperm(n, generator=g)
    return src, src_n, tgt[:, perm], tgt_n[:, perm], T


# ---------------------------------------------------------------------------------------------
# recovery of a known transform
# ---------------------------------------------------------------------------------------------

SOLVER_METRICS = [
    ("procrustes", "point_to_point"),
    ("gauss_newton", "point_to_point"),
    ("gauss_newton", "point_to_plane"),
    ("gauss_newton", "symmetric"),
    ("levenberg_marquardt", "point_to_point"),
    ("levenberg_marquardt", "point_to_plane"),
    ("levenberg_marquardt", "symmetric"),
]


@pytest.mark.parametrize("solver,metric", SOLVER_METRICS)
def test_recovers_known_transform_every_solver(solver, metric):
    src, src_n, tgt, tgt_n, T = _pair(batch=3)
    out = diffcp.icp(src, tgt, source_normals=src_n, target_normals=tgt_n, solver=solver,
                     stopping=diffcp.Stopping(max_iterations=60, tolerance=1e-10),
                     metric=metric)
    assert out.transform.shape == (3, 4, 4) and out.converged.shape == (3,)
    assert rotation_error(out.rotation, T[:, :3, :3]).max() < 1e-5
    assert (out.translation - T[:, :3, 3]).abs().max() < 1e-7
    assert out.converged.all()
    assert out.final_error.max() < 1e-6


def test_one_procrustes_step_is_exact_once_correspondences_are_right():
    # a large motion, started close enough that every nearest neighbour is the true partner
    src, _, tgt, _, T = _pair(batch=2, angle=2.5, shift=1.0)
    init = diffcp.apply_twist(T, torch.full((2, 6), 1e-4, dtype=F64))
    out = diffcp.icp(src, tgt, init=init, stopping=diffcp.Stopping(max_iterations=1, tolerance=0))
    assert rotation_error(out.rotation, T[:, :3, :3]).max() < 1e-6
    assert (out.translation - T[:, :3, 3]).abs().max() < 1e-9


def test_float32_works_and_unbatched_input_gives_unbatched_output():
    src, _, tgt, _, T = _pair(batch=1, dtype=torch.float32)
    out = diffcp.icp(src[0], tgt[0])
    assert out.transform.shape == (4, 4) and out.transform.dtype == torch.float32
    assert out.converged.shape == () and out.errors.dim() == 1
    assert rotation_error(out.rotation, T[0, :3, :3]) < 1e-2


def test_errors_decrease_and_iterations_are_per_element():
    src, _, tgt, _, T = _pair(batch=2, angle=0.3)
    # element 1 starts at the answer: it converges at once while element 0 keeps iterating
    init = torch.stack([torch.eye(4, dtype=F64), T[1]])
    out = diffcp.icp(src, tgt, init=init, stopping=diffcp.Stopping(max_iterations=50, tolerance=1e-9))
    assert out.iterations[1] <= 2 < out.iterations[0]
    e = out.errors[0, : int(out.iterations[0])]
    assert (e[1:] <= e[:-1] + 1e-12).all()


def test_converged_elements_stop_changing():
    src, _, tgt, _, T = _pair(batch=2, angle=0.3)
    init = torch.stack([torch.eye(4, dtype=F64), T[1]])
    a = diffcp.icp(src, tgt, init=init, stopping=diffcp.Stopping(max_iterations=50, tolerance=1e-9))
    assert a.converged.all() and a.iterations[1] < a.iterations[0]
    # stopping right when element 1 converged gives bit-for-bit the same transform for it
    b = diffcp.icp(src, tgt, init=init, stopping=diffcp.Stopping(max_iterations=int(a.iterations[1]), tolerance=1e-9))
    assert torch.equal(a.transform[1], b.transform[1])
    assert not torch.equal(a.transform[0], b.transform[0])


# ---------------------------------------------------------------------------------------------
# batching, padding, order
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("correspondence", ["nn", "soft_nn"])
@pytest.mark.parametrize("solver,metric", [("procrustes", "point_to_point"), ("gauss_newton", "point_to_plane")])
def test_batch_equals_loop(correspondence, solver, metric):
    src, src_n, tgt, tgt_n, T = _pair(batch=3, angle=0.3, n=300)
    corr = diffcp.SoftNearestNeighbor(temperature=1e-3) if correspondence == "soft_nn" else "nn"
    kw = dict(correspondence=corr, solver=solver, metric=metric,
              stopping=diffcp.Stopping(max_iterations=8, tolerance=0))
    batched = diffcp.icp(src, tgt, source_normals=src_n, target_normals=tgt_n, **kw)
    for b in range(3):
        single = diffcp.icp(src[b], tgt[b], source_normals=src_n[b], target_normals=tgt_n[b], **kw)
        torch.testing.assert_close(batched.transform[b], single.transform, atol=1e-10, rtol=0)


def test_padded_batch_equals_unpadded():
    a = _pair("bumpy_sphere", n=300, angle=0.3, seed=1)
    b = _pair("torus", n=200, angle=0.3, seed=2)
    # pad cloud b (source 200 and target 200 points) to 300 with garbage far away
    pad = torch.full((1, 100, 3), 50.0, dtype=F64)
    src = torch.cat([a[0], torch.cat([b[0], pad], 1)])
    tgt = torch.cat([a[2], torch.cat([b[2], pad], 1)])
    lengths = torch.tensor([300, 200])
    out = diffcp.icp(src, tgt, source_lengths=lengths, target_lengths=lengths,
                     stopping=diffcp.Stopping(max_iterations=20, tolerance=0))
    ref_b = diffcp.icp(b[0], b[2], stopping=diffcp.Stopping(max_iterations=20, tolerance=0))
    ref_a = diffcp.icp(a[0], a[2], stopping=diffcp.Stopping(max_iterations=20, tolerance=0))
    torch.testing.assert_close(out.transform[1], ref_b.transform[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(out.transform[0], ref_a.transform[0], atol=1e-10, rtol=0)
    assert torch.isfinite(out.transform).all()


def test_invariant_to_point_order():
    src, _, tgt, _, _ = _pair(angle=0.3)
    g = torch.Generator().manual_seed(5)
    p, q = torch.randperm(src.shape[1], generator=g), torch.randperm(tgt.shape[1], generator=g)
    a = diffcp.icp(src, tgt, stopping=diffcp.Stopping(max_iterations=15, tolerance=0))
    b = diffcp.icp(src[:, p], tgt[:, q], stopping=diffcp.Stopping(max_iterations=15, tolerance=0))
    torch.testing.assert_close(a.transform, b.transform, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------
# parity with Open3D
# ---------------------------------------------------------------------------------------------

o3d = pytest.importorskip("open3d")
reg = o3d.pipelines.registration


def _o3d_cloud(points, normals=None):
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.numpy()))
    if normals is not None:
        pc.normals = o3d.utility.Vector3dVector(normals.numpy())
    return pc


# Shapes without a continuous symmetry: on a torus or a capsule the cost is flat along the axis of
# symmetry, and two solvers that parametrise the update differently (Open3D composes Euler angles,
# diffcp the exponential map) drift apart along that flat direction by a few hundredths of a degree.
@pytest.mark.parametrize("shape", ["bumpy_sphere", "bumpy_sphere_2", "box"])
@pytest.mark.parametrize("kind", ["point_to_point", "point_to_plane"])
def test_parity_with_open3d(shape, kind):
    g = torch.Generator().manual_seed(3)
    src, src_n = sample(shape, 800, seed=1)
    tgt_pts, tgt_n = sample(shape, 800, seed=2)  # a different sampling of the same surface
    T = random_transform(1, max_angle=0.35, max_translation=0.1, generator=g, dtype=F64)[0]
    tgt = tgt_pts @ T[:3, :3].T + T[:3, 3]
    tgt_n = tgt_n @ T[:3, :3].T
    iters = 60
    est = reg.TransformationEstimationPointToPoint() if kind == "point_to_point" else reg.TransformationEstimationPointToPlane()
    crit = reg.ICPConvergenceCriteria(relative_fitness=0.0, relative_rmse=0.0, max_iteration=iters)
    res = reg.registration_icp(_o3d_cloud(src), _o3d_cloud(tgt, tgt_n), 10.0, np.eye(4), est, crit)
    T_o3d = torch.as_tensor(np.array(res.transformation))  # a writable copy
    solver = "procrustes" if kind == "point_to_point" else "gauss_newton"
    out = diffcp.icp(src, tgt, target_normals=tgt_n, metric=kind, solver=solver,
                     stopping=diffcp.Stopping(max_iterations=iters, tolerance=0))
    if kind == "point_to_point":  # Procrustes does not depend on the frame: the same iterates
        assert rotation_error(out.rotation, T_o3d[:3, :3]) < 1e-3  # degrees
        assert (out.translation - T_o3d[:3, 3]).norm() < 1e-4
    else:
        # Open3D linearises about the origin of the caller's frame, diffcp about the clouds'
        # centroids (so that a rigid motion of the clouds cannot change the answer): the fixed points
        # of the two Gauss-Newton maps are the same, but the paths to them can end in neighbouring
        # correspondence sets (0.003 degrees apart on bumpy_sphere_2, equal on the others).
        assert rotation_error(out.rotation, T_o3d[:3, :3]) < 1e-2  # degrees
        assert (out.translation - T_o3d[:3, 3]).norm() < 1e-3
        assert float(out.inlier_rmse) == pytest.approx(res.inlier_rmse, rel=1e-4)
    if shape.startswith("bumpy") and kind == "point_to_plane":  # no symmetry, fast convergence: the truth
        assert rotation_error(out.rotation, T[:3, :3]) < 2.0


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------


def _small(n=10, seed=0):
    src, src_n, tgt, tgt_n, T = _pair("bumpy_sphere", n=n, angle=0.15, shift=0.05, seed=seed)
    return src, src_n, tgt, tgt_n


@pytest.mark.parametrize("solver,metric", SOLVER_METRICS)
def test_gradcheck_unrolled_icp_soft(solver, metric):
    src, src_n, tgt, tgt_n = _small(n=8)

    def f(s_head, t):
        s = torch.cat([s_head, src[:, 4:]], dim=1)
        solver_option = diffcp.LevenbergMarquardtSolver(iterations=2) if solver == "levenberg_marquardt" else solver
        out = diffcp.icp(s, t, source_normals=src_n, target_normals=tgt_n, metric=metric, solver=solver_option,
                         correspondence=diffcp.SoftNearestNeighbor(temperature=0.05),
                         stopping=diffcp.Stopping(max_iterations=3, tolerance=0))
        return out.transform[:, :3, :]

    assert torch.autograd.gradcheck(f, (src[:, :4].clone().requires_grad_(), tgt.clone().requires_grad_()))


def test_gradcheck_unrolled_icp_hard_nn_wrt_target_and_weights():
    src, src_n, tgt, tgt_n = _small(n=12)

    def f(t, tn):
        out = diffcp.icp(src, t, source_normals=src_n, target_normals=tn, metric="point_to_plane",
                         solver="gauss_newton", rejection=[diffcp.DistanceRejection(2.0, temperature=0.1)],
                         stopping=diffcp.Stopping(max_iterations=3, tolerance=0))
        return out.transform[:, :3, :]

    assert torch.autograd.gradcheck(f, (tgt.clone().requires_grad_(), tgt_n.clone().requires_grad_()))


def _fixed_point(mode, solver="procrustes", metric="point_to_point"):
    """ICP run to its fixed point, as a function of three of the target points (keeps gradcheck cheap)."""
    src, src_n, tgt, tgt_n = _small(n=10, seed=1)

    def f(head):
        t = torch.cat([head, tgt[:, 3:]], dim=1)
        backward = diffcp.TruncatedBackward(iterations=25) if mode == "truncated" else mode
        out = diffcp.icp(src, t, source_normals=src_n, target_normals=tgt_n, solver=solver, metric=metric,
                         correspondence=diffcp.SoftNearestNeighbor(temperature=0.05),
                         stopping=diffcp.Stopping(max_iterations=200, tolerance=1e-14), backward=backward)
        return out.transform[:, :3, :]

    return f, tgt[:, :3].clone().requires_grad_()


@pytest.mark.parametrize("mode", ["implicit", "truncated", "unroll"])
def test_backward_modes_match_finite_differences_at_the_fixed_point(mode):
    f, head = _fixed_point(mode)
    assert torch.autograd.gradcheck(f, (head,), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_implicit_gradient_gauss_newton_point_to_plane():
    f, head = _fixed_point("implicit", "gauss_newton", "point_to_plane")
    assert torch.autograd.gradcheck(f, (head,), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_implicit_gradient_of_lm_equals_that_of_gauss_newton():
    # Same fixed point, so the same implicit gradient. (LM's forward stops where its steps are
    # rejected at rounding level, which makes finite differences of it too noisy for gradcheck.)
    f_lm, head = _fixed_point("implicit", "levenberg_marquardt", "symmetric")
    f_gn, _ = _fixed_point("implicit", "gauss_newton", "symmetric")
    out_lm, out_gn = f_lm(head), f_gn(head)
    torch.testing.assert_close(out_lm, out_gn, atol=1e-9, rtol=0)
    w = torch.randn_like(out_lm)
    (g_lm,) = torch.autograd.grad((out_lm * w).sum(), head)
    (g_gn,) = torch.autograd.grad((out_gn * w).sum(), head)
    torch.testing.assert_close(g_lm, g_gn, atol=1e-7, rtol=1e-6)
    # and the implicit gradient agrees with a long unrolled one
    f_un, _ = _fixed_point("unroll", "gauss_newton", "symmetric")
    (g_un,) = torch.autograd.grad((f_un(head) * w).sum(), head)
    torch.testing.assert_close(g_gn, g_un, atol=1e-7, rtol=1e-5)


def test_init_gradient_zero_for_hard_procrustes_nonzero_for_soft():
    src, _, tgt, _ = _small(n=30)
    init = torch.eye(4, dtype=F64)[None].clone().requires_grad_()
    hard = diffcp.icp(src, tgt, init=init, stopping=diffcp.Stopping(max_iterations=5, tolerance=0))
    (g_hard,) = torch.autograd.grad(hard.transform.sum(), init)
    assert torch.equal(g_hard, torch.zeros_like(g_hard))
    soft = diffcp.icp(src, tgt, init=init, correspondence=diffcp.SoftNearestNeighbor(temperature=0.05),
                      stopping=diffcp.Stopping(max_iterations=5, tolerance=0))
    (g_soft,) = torch.autograd.grad(soft.transform.sum(), init)
    assert g_soft.abs().max() > 1e-3


def test_init_gradient_vanishes_at_convergence_for_gauss_newton():
    # zero-residual problem: at the solution the Gauss-Newton map has zero derivative
    # (the start is perturbed along the rotation manifold: a 4x4 init that is not a rigid motion
    # keeps its non-rigid part under the left-twist updates, so its gradient there is not zero)
    src, src_n, tgt, tgt_n = _small(n=300)
    xi = torch.zeros(1, 6, dtype=F64, requires_grad=True)
    init = diffcp.apply_twist(torch.eye(4, dtype=F64)[None], xi)
    out = diffcp.icp(src, tgt, init=init, target_normals=tgt_n, metric="point_to_plane", solver="gauss_newton",
                     stopping=diffcp.Stopping(max_iterations=30, tolerance=0))
    assert out.final_error.max() < 1e-10
    (g,) = torch.autograd.grad(out.transform[:, :3, :].sum(), xi)
    assert g.abs().max() < 1e-6
    # before convergence the start still matters
    init = diffcp.apply_twist(torch.eye(4, dtype=F64)[None], xi)
    early = diffcp.icp(src, tgt, init=init, target_normals=tgt_n, metric="point_to_plane", solver="gauss_newton",
                       stopping=diffcp.Stopping(max_iterations=1, tolerance=0))
    (g1,) = torch.autograd.grad(early.transform[:, :3, :].sum(), xi)
    assert g1.abs().max() > 1e-3


def test_truncated_mode_keeps_only_the_last_iterations():
    src, _, tgt, _ = _small(n=30)
    init = torch.eye(4, dtype=F64)[None].clone().requires_grad_()
    tgt = tgt.clone().requires_grad_()
    kw = dict(init=init, correspondence=diffcp.SoftNearestNeighbor(temperature=0.05),
              backward=diffcp.TruncatedBackward(iterations=3))
    out = diffcp.icp(src, tgt, stopping=diffcp.Stopping(max_iterations=10, tolerance=0), **kw)
    g_init, g_tgt = torch.autograd.grad(out.transform.sum(), (init, tgt), allow_unused=True)
    assert g_init is None and g_tgt.abs().max() > 0
    assert int(out.iterations[0]) == 10
    # keeping every iteration is the unrolled gradient
    full = diffcp.icp(src, tgt, stopping=diffcp.Stopping(max_iterations=3, tolerance=0), **kw)
    unrolled = diffcp.icp(src, tgt, init=init, correspondence=diffcp.SoftNearestNeighbor(temperature=0.05),
                          stopping=diffcp.Stopping(max_iterations=3, tolerance=0))
    g1 = torch.autograd.grad(full.transform.sum(), (init, tgt))
    g2 = torch.autograd.grad(unrolled.transform.sum(), (init, tgt))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_gradients_never_nan_on_symmetric_and_degenerate_shapes():
    cube = torch.tensor([[x, y, z] for x in (-1.0, 1.0) for y in (-1.0, 1.0) for z in (-1.0, 1.0)], dtype=F64)
    line = torch.linspace(0, 1, 10, dtype=F64)[:, None] * torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    dup = torch.zeros(5, 3, dtype=F64) + torch.tensor([0.3, 0.1, 0.2], dtype=F64)
    for cloud in (cube, line, torch.cat([dup, cube])):
        t = cloud.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = diffcp.icp(cloud, t, correspondence=diffcp.SoftNearestNeighbor(temperature=0.1),
                             stopping=diffcp.Stopping(max_iterations=4, tolerance=0))
        (g,) = torch.autograd.grad(out.transform.sum(), t)
        assert torch.isfinite(out.transform).all() and torch.isfinite(g).all()


def test_collinear_points_warn_about_ambiguity():
    line = torch.linspace(0, 1, 10, dtype=F64)[:, None] * torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    with pytest.warns(RuntimeWarning, match=r"ambiguous for batch elements \[0\]"):
        diffcp.icp(line, line + 0.01, stopping=diffcp.Stopping(max_iterations=3))


def test_point_to_plane_on_a_single_plane_warns_and_stays_finite():
    g = torch.Generator().manual_seed(0)
    plane = torch.cat([torch.rand(200, 2, generator=g, dtype=F64), torch.zeros(200, 1, dtype=F64)], 1)
    normals = torch.tensor([0.0, 0.0, 1.0], dtype=F64).expand(200, 3)
    with pytest.warns(RuntimeWarning, match="ambiguous"):
        out = diffcp.icp(plane, plane + torch.tensor([0.0, 0.0, 0.05], dtype=F64), target_normals=normals,
                         metric="point_to_plane", solver="gauss_newton", stopping=diffcp.Stopping(max_iterations=10))
    assert torch.isfinite(out.transform).all()
    assert abs(float(out.translation[2]) - 0.05) < 1e-9  # the determined part is right


def test_well_posed_problems_do_not_warn():
    src, src_n, tgt, tgt_n, _ = _pair(batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diffcp.icp(src, tgt, stopping=diffcp.Stopping(max_iterations=5))
        diffcp.icp(src, tgt, target_normals=tgt_n, metric="point_to_plane", solver="gauss_newton",
                   stopping=diffcp.Stopping(max_iterations=5))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

X = torch.rand(20, 3, dtype=F64)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(source=X.clone().index_fill_(0, torch.tensor([3]), float("nan"))), ValueError, "source contains NaN"),
        (dict(target=X.clone().index_fill_(0, torch.tensor([3]), float("inf"))), ValueError,
         "target contains NaN or Inf"),
        (dict(source=X[:0]), ValueError, "source must hold at least 3"),
        (dict(source=X[:2]), ValueError, "source must hold at least 3"),
        (dict(source=torch.rand(20, 2, dtype=F64)), ValueError, r"source must have shape \(N, 3\)"),
        (dict(source=X[None].expand(2, 20, 3)), ValueError, "batch sizes must match"),
        (dict(source=X[None].expand(2, 20, 3), target=X[None].expand(2, 20, 3),
              source_lengths=torch.tensor([20, 21])),
         ValueError, "source_lengths must lie in"),
        (dict(source=X[None], target=X[None], target_lengths=torch.tensor([1])), ValueError,
         "target_lengths must lie in"),
        (dict(source=torch.randint(0, 5, (20, 3))), TypeError, "source must have a floating-point dtype"),
        (dict(target=X.float()), TypeError, "target has dtype"),
        (dict(correspondence=lambda: diffcp.SoftNearestNeighbor(temperature=0.0)), ValueError,
         "SoftNearestNeighbor.temperature must be a finite positive"),
        (dict(correspondence=lambda: diffcp.SoftNearestNeighbor(temperature=-1.0)), ValueError, "temperature"),
        (dict(metric="point_to_plane", solver="gauss_newton"), ValueError, "target_normals are required"),
        (dict(metric="symmetric", solver="gauss_newton", target_normals=X), ValueError,
         "source_normals are required"),
        (dict(metric="point_to_plane"), ValueError, "solver='procrustes' solves the point_to_point"),
        (dict(correspondence="closest"), ValueError, "correspondence must be one of"),
        (dict(metric="plane"), ValueError, "metric must be one of"),
        (dict(solver="svd"), ValueError, "solver must be one of"),
        (dict(backward="adjoint"), ValueError, "backward must be one of"),
        (dict(stopping=lambda: diffcp.Stopping(max_iterations=0)), ValueError,
         r"Stopping.max_iterations must be an integer >= 1"),
        (dict(temperature=1e-3), TypeError, r"takes no argument 'temperature'; it belongs to an option"),
        (dict(init=torch.eye(3, dtype=F64)), ValueError, r"init must have shape \(4, 4\)"),
        (dict(rejection=lambda: [diffcp.NormalAngleRejection(270.0)]), ValueError,
         r"max_angle must lie in \(0, 180\]"),
        (dict(weighting=lambda: [diffcp.RobustKernel("l1")]), ValueError, "RobustKernel.kernel must be one of"),
        (dict(source=[[0.0, 0.0, 0.0]] * 5), TypeError, "source must be a torch.Tensor"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, error, match):
    args = dict(source=X, target=X + 0.1)
    args.update(kwargs)
    source, target = args.pop("source"), args.pop("target")
    with pytest.raises(error, match=match):  # options validate themselves when they are built
        diffcp.icp(source, target, **{k: v() if callable(v) else v for k, v in args.items()})


def test_projective_requires_intrinsics():
    with pytest.raises(ValueError, match="intrinsics"):
        diffcp.icp(X, torch.ones(8, 8, dtype=F64), correspondence="projective")


# ---------------------------------------------------------------------------------------------
# projective association end to end
# ---------------------------------------------------------------------------------------------


def _sphere_depth(H=48, W=48, f=40.0, center=(0.0, 0.0, 3.0), radius=1.0):
    """Depth map of a sphere seen by a pinhole camera at the origin looking along +z."""
    v, u = torch.meshgrid(torch.arange(H, dtype=F64), torch.arange(W, dtype=F64), indexing="ij")
    d = torch.stack([(u - W / 2) / f, (v - H / 2) / f, torch.ones_like(u)], -1)
    c = torch.tensor(center, dtype=F64)
    # solve |s d - c|^2 = r^2 for the ray parameter s (z = s since d_z = 1)
    a = (d * d).sum(-1)
    b = -2 * (d * c).sum(-1)
    cc = (c * c).sum() - radius**2
    disc = b * b - 4 * a * cc
    s = (-b - disc.clamp_min(0).sqrt()) / (2 * a)
    depth = torch.where(disc > 0, s, torch.zeros_like(s))
    K = torch.tensor([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]], dtype=F64)
    return depth, K


def test_projective_icp_recovers_small_motion():
    depth, K = _sphere_depth()
    pts, valid = diffcp.depth_to_points(depth[None], K[None])
    src = pts[0][valid[0]][::3]
    T = make_transform(diffcp.so3_exp(torch.tensor([0.0, 0.03, 0.02], dtype=F64)),
                       torch.tensor([0.02, -0.01, 0.0], dtype=F64))
    src_moved = transform_points(diffcp.invert_transform(T), src)  # the source seen before the motion
    out = diffcp.icp(src_moved, depth, correspondence=diffcp.ProjectiveAssociation(K), solver="gauss_newton",
                     stopping=diffcp.Stopping(max_iterations=30, tolerance=1e-9), metric="point_to_plane")
    # a sphere only fixes its centre: check the registered points lie on the sphere's surface
    moved = transform_points(out.transform, src_moved)
    r = (moved - torch.tensor([0.0, 0.0, 3.0], dtype=F64)).norm(dim=-1)
    assert (r - 1).abs().max() < 5e-3


# ---------------------------------------------------------------------------------------------
# the step options, end to end
# ---------------------------------------------------------------------------------------------


def _with_outliers(n=400, outliers=120, seed=0):
    """Target = transformed source plus uniform outliers far from the surface."""
    src, src_n, tgt, tgt_n, T = _pair(n=n, angle=0.2, shift=0.05, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    junk = (torch.rand(1, outliers, 3, generator=g, dtype=F64) - 0.5) * 6
    junk = junk[junk.norm(dim=-1) > 2.0][None]
    return src, torch.cat([tgt, junk], 1), torch.cat([src, junk[:, : src.shape[1] // 4]], 1), T


@pytest.mark.parametrize("options", [
    dict(rejection=[diffcp.DistanceRejection(0.3)]),
    dict(rejection=[diffcp.DistanceRejection(0.3, temperature=0.01)]),
    dict(weighting=[diffcp.DistanceWeights(0.5)]),
    dict(weighting=[diffcp.RobustKernel("tukey", 0.2)]),
])
def test_rejection_and_weighting_remove_source_outliers(options):
    # outliers in the source (points with no partner in the target) pull plain ICP away
    src, _, src_with_junk, T = _with_outliers()
    tgt = transform_points(T, src)
    plain = diffcp.icp(src_with_junk, tgt, stopping=diffcp.Stopping(max_iterations=40, tolerance=0))
    robust = diffcp.icp(src_with_junk, tgt, stopping=diffcp.Stopping(max_iterations=40, tolerance=0), **options)
    err_plain = rotation_error(plain.rotation, T[:, :3, :3]).item()
    err_robust = rotation_error(robust.rotation, T[:, :3, :3]).item()
    assert err_robust < 0.2 < err_plain


def test_source_mask_and_num_samples_select_points():
    src, _, tgt, _, T = _pair(n=400, angle=0.2)
    mask = torch.zeros(1, 400, dtype=torch.bool)
    mask[:, ::2] = True
    masked = diffcp.icp(src, tgt, source_mask=mask, stopping=diffcp.Stopping(max_iterations=10, tolerance=0))
    subset = diffcp.icp(src[:, ::2], tgt, stopping=diffcp.Stopping(max_iterations=10, tolerance=0))
    torch.testing.assert_close(masked.transform, subset.transform, atol=1e-12, rtol=0)
    a = diffcp.icp(src, tgt, selection=diffcp.RandomSelection(100, seed=0),
                   stopping=diffcp.Stopping(max_iterations=10))
    b = diffcp.icp(src, tgt, selection=diffcp.RandomSelection(100, seed=0),
                   stopping=diffcp.Stopping(max_iterations=10))
    assert torch.equal(a.transform, b.transform)
    assert rotation_error(a.rotation, T[:, :3, :3]).item() < 1e-4


def test_normal_weighting_and_angle_rejection_run_and_agree_on_clean_data():
    src, src_n, tgt, tgt_n, T = _pair(n=400, angle=0.2)
    out = diffcp.icp(src, tgt, source_normals=src_n, target_normals=tgt_n, solver="gauss_newton",
                     weighting=[diffcp.NormalWeights()], rejection=[diffcp.NormalAngleRejection(60.0)],
                     stopping=diffcp.Stopping(max_iterations=30), metric="point_to_plane")
    assert rotation_error(out.rotation, T[:, :3, :3]).item() < 1e-5


# ----------------------------------------------------------------------------------------------
# Fused CPU pass (hard NN, point-to-point, Procrustes, no autograd) against the general step


def _fused_problem(dtype, seed=21):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([700, 523, 611])
    src = torch.zeros(3, 700, 3, dtype=dtype)
    tgt = torch.full((3, 720, 3), 1e3, dtype=dtype)  # padding that would be nearest if used
    tlen = torch.tensor([720, 600, 655])
    T = random_transform(3, max_angle=0.25, max_translation=0.1, generator=g, dtype=dtype)
    for b in range(3):
        p, _ = sample("bumpy_sphere", int(tlen[b]), seed=b, dtype=dtype)
        x, _ = sample("bumpy_sphere", int(lengths[b]), seed=10 + b, dtype=dtype)
        tgt[b, : tlen[b]] = p
        R, t = T[b, :3, :3], T[b, :3, 3]
        src[b, : lengths[b]] = (x - t) @ R  # R^T (x - t): T maps source into target
        src[b, lengths[b]:] = 77.0
    return src, tgt, lengths, tlen


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_fused_pass_equals_the_general_step(dtype, atol):
    icp_module = importlib.import_module("diffcp.icp")  # the attribute diffcp.icp is the function

    src, tgt, lengths, tlen = _fused_problem(dtype)
    mask = torch.rand(3, 700, generator=torch.Generator().manual_seed(3)) > 0.2
    kwargs = dict(source_lengths=lengths, target_lengths=tlen,
                  stopping=diffcp.Stopping(max_iterations=12, tolerance=1e-7),
                  source_mask=mask)
    calls = []
    original = icp_module.run_point_to_point

    def spy(*args):
        out = original(*args)
        calls.append(out is not None)
        return out

    icp_module.run_point_to_point = spy
    try:
        with torch.no_grad():
            fused = diffcp.icp(src, tgt, correspondence=diffcp.NearestNeighbor(backend="grid"), **kwargs)
        used = list(calls)
        with torch.no_grad():
            general = diffcp.icp(src, tgt, correspondence=diffcp.NearestNeighbor(backend="tree"), **kwargs)
        assert calls == used  # the tree backend never takes the fused loop
    finally:
        icp_module.run_point_to_point = original
    assert used == [True]  # the grid run was the compiled loop
    torch.testing.assert_close(fused.transform, general.transform, rtol=0, atol=atol)
    torch.testing.assert_close(fused.errors, general.errors, rtol=1e-4 if dtype == torch.float32 else 1e-9,
                               atol=atol)
    assert torch.equal(fused.iterations, general.iterations)
    assert torch.equal(fused.converged, general.converged)
    assert fused.transform.dtype == dtype


def test_fused_pass_is_skipped_when_gradients_are_needed():
    icp_module = importlib.import_module("diffcp.icp")

    src, tgt, lengths, tlen = _fused_problem(torch.float64)
    tgt = tgt.clone().requires_grad_(True)
    calls = []
    original_step, original_loop = icp_module._fused_step, icp_module.run_point_to_point
    icp_module._fused_step = lambda p, T: calls.append("step") or original_step(p, T)
    icp_module.run_point_to_point = lambda *args: calls.append("loop") or original_loop(*args)
    try:
        out = diffcp.icp(src, tgt, source_lengths=lengths, target_lengths=tlen,
                         correspondence=diffcp.NearestNeighbor(backend="grid"),
                         stopping=diffcp.Stopping(max_iterations=5))
        out.translation.sum().backward()
        assert not calls  # unrolled with a graph: the general, differentiable step
        assert tgt.grad is not None and torch.isfinite(tgt.grad).all() and tgt.grad.abs().sum() > 0
        # implicit mode: the iterations before the fixed point carry no graph and are fused
        tgt.grad = None
        out = diffcp.icp(src, tgt, source_lengths=lengths, target_lengths=tlen,
                         correspondence=diffcp.NearestNeighbor(backend="grid"),
                         stopping=diffcp.Stopping(max_iterations=5), backward="implicit")
        assert calls == ["loop"]
        out.translation.sum().backward()
        assert torch.isfinite(tgt.grad).all() and tgt.grad.abs().sum() > 0
        # truncated mode: the first iterations are the compiled loop, the last ones keep a graph
        calls.clear()
        tgt.grad = None
        out = diffcp.icp(src, tgt, source_lengths=lengths, target_lengths=tlen,
                         correspondence=diffcp.NearestNeighbor(backend="grid"),
                         stopping=diffcp.Stopping(max_iterations=8), backward=diffcp.TruncatedBackward(iterations=3))
        assert calls == ["loop"]
        out.translation.sum().backward()
        assert torch.isfinite(tgt.grad).all() and tgt.grad.abs().sum() > 0
    finally:
        icp_module._fused_step, icp_module.run_point_to_point = original_step, original_loop


def test_auto_backends_pick_the_grid_and_the_certified_truncation_on_a_cpu():
    import diffcp.search.soft as soft_module

    src, tgt, lengths, tlen = _fused_problem(torch.float64)
    index = diffcp.NearestNeighborIndex(tgt, tlen)
    assert index.uses_grid(700)  # 3 x 700 x 720 pairs: above the matmul threshold
    soft_module.LAST_CERTIFIED_FRACTION = None
    normals = diffcp.estimate_normals(tgt, tlen)
    diffcp.soft_correspondences(src, tgt, 1e-3, target_normals=normals, source_lengths=lengths,
                                target_lengths=tlen)
    assert soft_module.LAST_CERTIFIED_FRACTION is not None  # "auto" took the truncated backend


def test_fused_pass_never_reuses_host_copies_of_another_source():
    g = torch.Generator().manual_seed(22)
    target = torch.rand(2, 500, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([500, 500])
    weights = torch.ones(2, 400, dtype=torch.float64)
    T = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    buffer = torch.rand(2, 400, 3, generator=g, dtype=torch.float64).numpy()
    index = diffcp.NearestNeighborIndex(target, backend="grid")
    first, _, _ = index.point_to_point_moments(torch.from_numpy(buffer), T, weights, torch.tensor([400, 400]))
    buffer[:] = buffer[:, ::-1] * 0.5  # new values in the same memory
    second, _, _ = index.point_to_point_moments(torch.from_numpy(buffer), T, weights, torch.tensor([400, 400]))
    fresh, _, _ = diffcp.NearestNeighborIndex(target, backend="grid").point_to_point_moments(
        torch.from_numpy(buffer.copy()), T, weights, torch.tensor([400, 400]))
    np.testing.assert_allclose(second, fresh, rtol=1e-12, atol=1e-12)
    assert not np.allclose(first, second)


def test_icp_with_scale_recovers_a_similarity_and_rigid_icp_reports_scale_one():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 120, 3, generator=g, dtype=torch.float64)
    T = diffcp.random_transform(3, max_angle=0.3, max_translation=0.1, generator=g, dtype=torch.float64)
    s = torch.tensor([0.8, 1.0, 1.25], dtype=torch.float64)
    R, t = T[:, :3, :3], T[:, :3, 3]
    y = s[:, None, None] * (x @ R.transpose(1, 2)) + t[:, None] + 5.0  # far from the origin too
    init = torch.eye(4, dtype=torch.float64).repeat(3, 1, 1)
    init[:, :3, 3] = 5.0  # a poor start lets a similarity collapse onto one target point (documented)
    out = diffcp.icp(x, y, solver=diffcp.ProcrustesSolver(scale=True), init=init,
                     stopping=diffcp.Stopping(max_iterations=50))
    torch.testing.assert_close(out.scale, s, atol=1e-9, rtol=0)
    torch.testing.assert_close(out.rotation, R, atol=1e-9, rtol=0)
    torch.testing.assert_close(out.transform[:, :3, :3], s[:, None, None] * R, atol=1e-9, rtol=0)
    torch.testing.assert_close(out.translation, t + 5.0, atol=1e-9, rtol=0)
    assert out.converged.all()
    rigid = diffcp.icp(x, diffcp.transform_points(T, x))
    assert (rigid.scale == 1).all() and rigid.scale.shape == (3,)
    # differentiable (unrolled), finite
    xs = x.clone().requires_grad_(True)
    out = diffcp.icp(xs, y, solver=diffcp.ProcrustesSolver(scale=True), init=init,
                     stopping=diffcp.Stopping(max_iterations=5))
    (gx,) = torch.autograd.grad(out.transform.sum() + out.scale.sum(), xs)
    assert torch.isfinite(gx).all()


def test_procrustes_scale_false_is_the_rigid_solver_and_the_layer_carries_the_scale():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 80, 3, generator=g, dtype=torch.float64)
    T = diffcp.random_transform(2, max_angle=0.3, max_translation=0.1, generator=g, dtype=torch.float64)
    y = diffcp.transform_points(T, x) + 0.01 * torch.randn(2, 80, 3, generator=g, dtype=torch.float64)
    default = diffcp.icp(x, y)
    explicit = diffcp.icp(x, y, solver=diffcp.ProcrustesSolver(scale=False))
    for a, b in zip(default, explicit):
        assert torch.equal(a, b)
    layer = diffcp.ICP(solver=diffcp.ProcrustesSolver(scale=True), stopping=diffcp.Stopping(max_iterations=20))
    out = layer(x, 1.2 * diffcp.transform_points(T, x))
    assert out.scale.shape == (2,) and torch.allclose(out.scale, torch.full((2,), 1.2, dtype=torch.float64), atol=1e-9)
    assert diffcp.ICP.from_dict(layer.settings.to_dict()).settings == layer.settings


def test_the_library_lists_exactly_these_solver_metric_pairs():
    assert list(diffcp.settings.SOLVER_METRICS) == SOLVER_METRICS
    for solver in ("procrustes", "gauss_newton", "levenberg_marquardt"):
        for metric in diffcp.settings.METRICS:
            if (solver, metric) in SOLVER_METRICS:
                diffcp.ICPSettings(solver=solver, metric=metric)
            else:
                with pytest.raises(ValueError, match="point_to_point"):
                    diffcp.ICPSettings(solver=solver, metric=metric)


@pytest.mark.parametrize("correspondence", ["nn", "soft_nn"])
def test_implicit_backward_gives_init_no_gradient_and_no_error(correspondence):
    """The fixed point does not depend on init: with only init requiring a gradient, the implicit
    mode returns the converged pose with no graph (it raised inside autograd for hard matches)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, generator=g, dtype=torch.float64)
    xi = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    init = diffcp.make_transform(diffcp.so3_exp(xi[:3]), xi[3:])
    out = diffcp.icp(x, x + 0.05, init=init, correspondence=correspondence, backward="implicit")
    torch.testing.assert_close(out.transform[:3, 3], torch.full((3,), 0.05, dtype=torch.float64), atol=1e-4, rtol=0)
    if out.transform.requires_grad:
        (grad,) = torch.autograd.grad(out.transform.sum(), xi, allow_unused=True)
        assert grad is None or torch.count_nonzero(grad) == 0
