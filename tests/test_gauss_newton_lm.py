"""Tests of diffcp.minimize.gauss_newton and diffcp.minimize.levenberg_marquardt.

References: known transforms from exact correspondences, Open3D 0.20 estimators, naive per-cloud
loops, finite differences (gradcheck)."""

import numpy as np
import open3d as o3d
import pytest
import torch

from diffcp.geometry import (
    apply_twist,
    random_transform,
    rotate_vectors,
    rotation_to_euler,
    split_transform,
    transform_points,
)
from diffcp.minimize.gauss_newton import gauss_newton_step, normal_equations
from diffcp.minimize.levenberg_marquardt import LMResult, levenberg_marquardt
from diffcp.minimize.residuals import METRICS, residuals, weighted_cost

D = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These systems are tiny (6x6, a few dozen rows): OpenMP threads only add spin-wait latency,
    which dominates on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _planes(B=2, N=60, K=5, seed=0, dtype=D):
    """Points on K random non-parallel planes with their exact (consistently oriented) normals."""
    g = torch.Generator().manual_seed(seed)
    n = torch.nn.functional.normalize(torch.randn(B, K, 3, generator=g, dtype=D), dim=-1)
    c = torch.randn(B, K, 3, generator=g, dtype=D)
    a = torch.nn.functional.normalize(torch.cross(n, torch.randn(B, K, 3, generator=g, dtype=D), dim=-1), dim=-1)
    b = torch.cross(n, a, dim=-1)
    k = torch.arange(N) % K
    uv = torch.rand(B, N, 2, generator=g, dtype=D) * 2 - 1
    p = c[:, k] + uv[..., :1] * a[:, k] + uv[..., 1:] * b[:, k]
    return p.to(dtype), n[:, k].to(dtype)


def _problem(B=2, N=60, seed=0, angle=0.4, trans=0.5, dtype=D):
    s, ns = _planes(B, N, seed=seed, dtype=dtype)
    T = random_transform(B, angle, trans, generator=torch.Generator().manual_seed(seed + 100), dtype=dtype)
    q = transform_points(T, s)
    nq = rotate_vectors(split_transform(T)[0], ns)
    return s, ns, q, nq, T


def _gn_solve(metric, s, ns, q, nq, w, iterations):
    T = torch.eye(4, dtype=s.dtype).expand(s.shape[0], 4, 4)
    for _ in range(iterations):
        y = transform_points(T, s)
        ny = rotate_vectors(split_transform(T)[0], ns)
        T = apply_twist(T, gauss_newton_step(metric, y, q, w, nq, ny))
    return T


@pytest.mark.parametrize("metric", METRICS)
def test_gauss_newton_recovers_known_transform(metric):
    s, ns, q, nq, T_true = _problem()
    w = torch.ones(s.shape[:2], dtype=D)
    T = _gn_solve(metric, s, ns, q, nq, w, 8)
    torch.testing.assert_close(T, T_true, atol=1e-10, rtol=0)


@pytest.mark.parametrize("metric", METRICS)
def test_levenberg_marquardt_recovers_known_transform(metric):
    s, ns, q, nq, T_true = _problem(seed=1)
    w = torch.ones(s.shape[:2], dtype=D)
    out = levenberg_marquardt(metric, torch.eye(4, dtype=D), s, q, w, ns, nq, iterations=15)
    assert isinstance(out, LMResult)
    torch.testing.assert_close(out.transform, T_true, atol=1e-9, rtol=0)
    assert out.cost.shape == (2,) and (out.cost < 1e-18).all()
    assert out.damping.shape == (2,)


def test_float32_recovery():
    s, ns, q, nq, T_true = _problem(seed=2, dtype=torch.float32)
    w = torch.ones(s.shape[:2])
    for metric in METRICS:
        T = _gn_solve(metric, s, ns, q, nq, w, 8)
        assert T.dtype == torch.float32
        assert (T - T_true).abs().max() < 1e-4
        out = levenberg_marquardt(metric, torch.eye(4), s, q, w, ns, nq, iterations=15)
        assert (out.transform - T_true).abs().max() < 1e-4


@pytest.mark.parametrize("metric", METRICS)
def test_gauss_newton_step_matches_naive_normal_equations(metric):
    """Independent reference: dense J stacked per cloud, solved with numpy lstsq."""
    s, ns, q, nq, _ = _problem(B=3, N=20, seed=3)
    q = q + 0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(0), dtype=D)
    w = torch.rand(s.shape[:2], generator=torch.Generator().manual_seed(1), dtype=D)
    xi = gauss_newton_step(metric, s, q, w, nq, ns, damping=0.0)
    eye = torch.eye(4, dtype=D)
    for b in range(3):
        sb, qb, nsb, nqb = s[b : b + 1], q[b : b + 1], ns[b : b + 1], nq[b : b + 1]

        def f(x):
            T = apply_twist(eye, x)[None]
            return residuals(metric, transform_points(T, sb), qb, nqb, rotate_vectors(T[:, :3, :3], nsb)).reshape(-1)

        J = torch.autograd.functional.jacobian(f, torch.zeros(6, dtype=D)).numpy()
        r = f(torch.zeros(6, dtype=D)).numpy()
        sw = np.repeat(np.sqrt(w[b].numpy()), r.size // 20)
        ref = np.linalg.lstsq(sw[:, None] * J, -sw * r, rcond=None)[0]
        np.testing.assert_allclose(xi[b].numpy(), ref, atol=1e-9)


@pytest.mark.parametrize("metric", METRICS)
def test_batch_equals_loop(metric):
    s, ns, q, nq, _ = _problem(B=3, N=30, seed=4)
    q = q + 0.02 * torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=D)
    w = torch.rand(s.shape[:2], generator=torch.Generator().manual_seed(3), dtype=D)
    T0 = random_transform(3, 0.1, 0.1, generator=torch.Generator().manual_seed(4), dtype=D)
    xi = gauss_newton_step(metric, s, q, w, nq, ns)
    out = levenberg_marquardt(metric, T0, s, q, w, ns, nq, iterations=4)
    for b in range(3):
        sl = slice(b, b + 1)
        torch.testing.assert_close(xi[sl], gauss_newton_step(metric, s[sl], q[sl], w[sl], nq[sl], ns[sl]))
        o = levenberg_marquardt(metric, T0[sl], s[sl], q[sl], w[sl], ns[sl], nq[sl], iterations=4)
        torch.testing.assert_close(out.transform[sl], o.transform)
        torch.testing.assert_close(out.cost[sl], o.cost)
        torch.testing.assert_close(out.damping[sl], o.damping)


@pytest.mark.parametrize("metric", METRICS)
def test_padding_with_zero_weight_is_ignored(metric):
    s, ns, q, nq, _ = _problem(B=2, N=30, seed=5)
    q = q + 0.02 * torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=D)
    w = torch.rand(s.shape[:2], generator=torch.Generator().manual_seed(6), dtype=D)
    g = torch.Generator().manual_seed(7)
    pad = lambda x, scale: torch.cat([x, scale * torch.randn(2, 10, 3, generator=g, dtype=D)], 1)
    sp, qp = pad(s, 100.0), pad(q, 100.0)
    nsp = torch.nn.functional.normalize(pad(ns, 1.0), dim=-1)
    nqp = torch.nn.functional.normalize(pad(nq, 1.0), dim=-1)
    wp = torch.cat([w, torch.zeros(2, 10, dtype=D)], 1)
    padded = gauss_newton_step(metric, sp, qp, wp, nqp, nsp)
    torch.testing.assert_close(padded, gauss_newton_step(metric, s, q, w, nq, ns))
    a = levenberg_marquardt(metric, torch.eye(4, dtype=D), sp, qp, wp, nsp, nqp, iterations=3)
    b = levenberg_marquardt(metric, torch.eye(4, dtype=D), s, q, w, ns, nq, iterations=3)
    torch.testing.assert_close(a.transform, b.transform)
    torch.testing.assert_close(a.cost, b.cost)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_singular_system_stays_finite(dtype):
    """All points on one line: point-to-plane and point-to-point are rank-deficient."""
    t = torch.linspace(-1, 1, 40, dtype=dtype)
    y = torch.stack([t, 2 * t + 1, 3 - t], -1).expand(2, 40, 3).clone()
    g = torch.Generator().manual_seed(8)
    q = (y + 0.1 * torch.randn(y.shape, generator=g, dtype=D).to(dtype)).requires_grad_()
    n = torch.nn.functional.normalize(torch.randn(y.shape, generator=g, dtype=D), dim=-1).to(dtype).requires_grad_()
    w = torch.ones(2, 40, dtype=dtype)
    w[1] = 0  # second cloud: every weight zero
    w.requires_grad_()
    y.requires_grad_()
    for metric in ("point_to_plane", "point_to_point"):
        A, _, _ = normal_equations(metric, y.double(), q.double(), w.double(), n.double())
        assert torch.linalg.matrix_rank(A[0]) < 6
        xi = gauss_newton_step(metric, y, q, w, n)
        assert torch.isfinite(xi).all() and xi[1].abs().max() == 0
        grads = torch.autograd.grad(xi[0].square().sum(), (y, q, n, w), allow_unused=True)
        assert all(gr is None or torch.isfinite(gr).all() for gr in grads)
        out = levenberg_marquardt(metric, torch.eye(4, dtype=dtype), y, q, w, None, n, iterations=3)
        assert torch.isfinite(out.transform).all() and torch.isfinite(out.cost).all()
        grads = torch.autograd.grad(out.transform.sum() + out.cost.sum(), (y, q, n, w), allow_unused=True)
        assert all(gr is None or torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_gauss_newton_step(metric):
    s, ns, q, nq, _ = _problem(B=2, N=8, seed=9)
    q = q + 0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(9), dtype=D)
    w = torch.rand(2, 8, generator=torch.Generator().manual_seed(10), dtype=D) + 0.1
    inputs = tuple(x.clone().requires_grad_() for x in (s, q, w, nq, ns))
    fn = lambda y, q, w, nq, ny: gauss_newton_step(metric, y, q, w, nq, ny)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_levenberg_marquardt(metric):
    s, ns, q, nq, _ = _problem(B=2, N=6, seed=11)
    q = q + 0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(11), dtype=D)
    w = torch.rand(2, 6, generator=torch.Generator().manual_seed(12), dtype=D) + 0.1
    T0 = random_transform(2, 0.05, 0.05, generator=torch.Generator().manual_seed(13), dtype=D)
    inputs = tuple(x.clone().requires_grad_() for x in (T0, s, q, w, ns, nq))

    def fn(T0, s, q, w, ns, nq):
        out = levenberg_marquardt(metric, T0, s, q, w, ns, nq, iterations=3)
        return out.transform, out.cost

    assert torch.autograd.gradcheck(fn, inputs)


def test_levenberg_marquardt_damping_schedule_and_monotone_cost():
    """A hard start (2.8 rad) where some candidate steps raise the cost: they must be rejected
    (cost never increases) and the damping must follow the accept/reject rule per cloud."""
    s, ns, q, nq, _ = _problem(B=2, N=30, seed=14, angle=2.8)
    q = q + 0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(14), dtype=D)
    w = torch.ones(2, 30, dtype=D)
    eye = torch.eye(4, dtype=D)
    outs = [
        levenberg_marquardt("symmetric", eye, s, q, w, ns, nq, iterations=i, initial_damping=1e-6, factor=4.0)
        for i in range(8)
    ]
    y0 = residuals("symmetric", s, q, nq, ns)
    torch.testing.assert_close(outs[0].cost, weighted_cost(y0, w))
    torch.testing.assert_close(outs[0].damping, torch.full((2,), 1e-6, dtype=D))
    n_accept = n_reject = 0
    for prev, cur in zip(outs, outs[1:]):
        assert (cur.cost <= prev.cost).all()
        accepted = cur.cost < prev.cost
        n_accept += int(accepted.sum())
        n_reject += int((~accepted).sum())
        torch.testing.assert_close(cur.damping, torch.where(accepted, prev.damping / 4.0, prev.damping * 4.0))
        # a rejected step leaves the transform unchanged
        assert torch.equal(cur.transform[~accepted], prev.transform[~accepted])
    assert n_accept > 0 and n_reject > 0


@pytest.mark.parametrize("metric", METRICS)
def test_levenberg_marquardt_step_uses_block_damping(metric):
    """One iteration = apply_twist(T0, xi) with (A + lambda D) xi = -g, D = diag(mean of the rotation
    block's diagonal x I3, mean of the translation block's diagonal x I3) (numpy reference)."""
    s, ns, q, nq, _ = _problem(B=2, N=30, seed=22)
    w = torch.rand(2, 30, generator=torch.Generator().manual_seed(22), dtype=D)
    T0 = torch.eye(4, dtype=D).expand(2, 4, 4)
    out = levenberg_marquardt(metric, T0, s, q, w, ns, nq, iterations=1, initial_damping=0.5)
    A, g, _ = normal_equations(metric, s, q, w, nq, ns)
    for b in range(2):
        An, gn = A[b].numpy(), g[b].numpy()
        d = np.diag(An)
        xi = -np.linalg.solve(An + 0.5 * np.diag(np.r_[np.full(3, d[:3].mean()), np.full(3, d[3:].mean())]), gn)
        expected = apply_twist(T0[b], torch.from_numpy(xi))
        torch.testing.assert_close(out.transform[b], expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(out.damping, torch.full((2,), 0.05, dtype=D))  # both accepted


@pytest.mark.parametrize("metric", METRICS)
def test_levenberg_marquardt_reaches_stationary_point_of_cost(metric):
    """Noisy correspondences: the returned cost is the weighted cost (with rotated source normals)
    at the returned pose, and that pose is a stationary point of it (autograd reference)."""
    s, ns, q, nq, T_true = _problem(B=2, N=40, seed=20)
    q = q + 0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(20), dtype=D)
    w = torch.rand(2, 40, generator=torch.Generator().manual_seed(21), dtype=D)
    out = levenberg_marquardt(metric, torch.eye(4, dtype=D), s, q, w, ns, nq, iterations=30)

    def cost(xi):
        T = apply_twist(out.transform, xi)
        y, ny = transform_points(T, s), rotate_vectors(split_transform(T)[0], ns)
        return weighted_cost(residuals(metric, y, q, nq, ny), w)

    xi0 = torch.zeros(2, 6, dtype=D, requires_grad=True)
    c = cost(xi0)
    torch.testing.assert_close(c.detach(), out.cost)
    (grad,) = torch.autograd.grad(c.sum(), xi0)
    assert grad.abs().max() < 1e-8
    assert (out.transform - T_true).abs().max() < 0.1  # and it is the nearby minimum


def test_errors():
    s, ns, q, nq, _ = _problem(B=1, N=10)
    w = torch.ones(1, 10, dtype=D)
    with pytest.raises(ValueError, match="metric"):
        gauss_newton_step("p2p", s, q, w)
    with pytest.raises(ValueError, match="weights"):
        gauss_newton_step("point_to_point", s, q, w[:, :5])
    with pytest.raises(ValueError, match="source_normals"):
        levenberg_marquardt("symmetric", torch.eye(4, dtype=D), s, q, w, None, nq)
    with pytest.raises(ValueError, match="transform"):
        levenberg_marquardt("point_to_point", torch.eye(3, dtype=D), s, q, w)
    with pytest.raises(ValueError, match="iterations"):
        levenberg_marquardt("point_to_point", torch.eye(4, dtype=D), s, q, w, iterations=-1)
    with pytest.raises(ValueError, match="factor"):
        levenberg_marquardt("point_to_point", torch.eye(4, dtype=D), s, q, w, factor=1.0)
    with pytest.raises(ValueError, match="initial_damping"):
        levenberg_marquardt("point_to_point", torch.eye(4, dtype=D), s, q, w, initial_damping=0.0)
    with pytest.raises(TypeError, match="transform"):
        levenberg_marquardt("point_to_point", torch.eye(4), s, q, w)


# --- Open3D 0.20 -------------------------------------------------------------------------------


def _pcd(points, normals):
    c = o3d.geometry.PointCloud()
    c.points = o3d.utility.Vector3dVector(points.numpy())
    c.normals = o3d.utility.Vector3dVector(normals.numpy())
    return c


def _identity_corres(n):
    return o3d.utility.Vector2iVector(np.stack([np.arange(n)] * 2, 1).astype(np.int32))


def test_point_to_plane_step_equals_open3d():
    """Open3D's point-to-plane estimator is one Gauss-Newton step with rows [y x n, n], returned as
    R = Rz(c) Ry(b) Rx(a), t = v: the same 6-vector as our twist."""
    s, ns, q, nq, _ = _problem(B=1, N=60, seed=15)
    q = q + 0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(15), dtype=D)
    est = o3d.pipelines.registration.TransformationEstimationPointToPlane()
    M = torch.from_numpy(est.compute_transformation(_pcd(s[0], ns[0]), _pcd(q[0], nq[0]), _identity_corres(60)))
    xo = torch.cat([rotation_to_euler(M[:3, :3], "zyx").flip(0), M[:3, 3]])
    xi = gauss_newton_step("point_to_plane", s, q, torch.ones(1, 60, dtype=D), nq, damping=0.0)[0]
    torch.testing.assert_close(xi, xo, atol=1e-10, rtol=0)


def test_symmetric_residual_equals_open3d_rmse():
    """Open3D's symmetric RMSE uses our residual d . (n_y + n_q) with the source normals rotated."""
    s, ns, q, nq, _ = _problem(B=1, N=60, seed=16)
    q = q + 0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(16), dtype=D)
    T = random_transform(1, 0.3, 0.3, generator=torch.Generator().manual_seed(17), dtype=D)
    y, ny = transform_points(T, s), rotate_vectors(split_transform(T)[0], ns)
    assert ((ny * nq).sum(-1) > 0).all()  # Open3D would flip n_y otherwise
    est = o3d.pipelines.registration.TransformationEstimationSymmetric()
    rmse = est.compute_rmse(_pcd(y[0], ny[0]), _pcd(q[0], nq[0]), _identity_corres(60))
    ours = residuals("symmetric", y, q, nq, ny).square().mean().sqrt().item()
    assert abs(rmse - ours) < 1e-12
    # the unrotated source normal (DiffICP's defect) gives a different value
    assert abs(rmse - residuals("symmetric", y, q, nq, ns).square().mean().sqrt().item()) > 1e-3


def test_symmetric_solution_equals_open3d():
    """Exact correspondences: Open3D's symmetric estimator (Rusinkiewicz's closed-form half-rotation
    linearisation) and our iterated symmetric Gauss-Newton / LM reach the same pose; from a small
    misalignment our single step agrees with Open3D's to second order."""
    s, ns, q, nq, T_true = _problem(B=1, N=60, seed=18)
    est = o3d.pipelines.registration.TransformationEstimationSymmetric()
    M = torch.from_numpy(est.compute_transformation(_pcd(s[0], ns[0]), _pcd(q[0], nq[0]), _identity_corres(60)))
    w = torch.ones(1, 60, dtype=D)
    T_gn = _gn_solve("symmetric", s, ns, q, nq, w, 8)[0]
    T_lm = levenberg_marquardt("symmetric", torch.eye(4, dtype=D), s, q, w, ns, nq, iterations=15).transform[0]
    torch.testing.assert_close(T_gn, M, atol=1e-10, rtol=0)
    torch.testing.assert_close(T_lm, M, atol=1e-9, rtol=0)
    torch.testing.assert_close(M, T_true[0], atol=1e-10, rtol=0)
    # one step from a perturbed start T0: both steps land on T_true up to O(eps^2)
    errs = []
    direction = torch.randn(1, 6, generator=torch.Generator().manual_seed(19), dtype=D)
    for eps in (1e-2, 1e-3):
        T0 = apply_twist(T_true, eps * direction)
        y, ny = transform_points(T0, s), rotate_vectors(split_transform(T0)[0], ns)
        step = torch.from_numpy(est.compute_transformation(_pcd(y[0], ny[0]), _pcd(q[0], nq[0]), _identity_corres(60)))
        T_o3d = step @ T0[0]
        T_ours = apply_twist(T0, gauss_newton_step("symmetric", y, q, w, nq, ny))[0]
        errs.append((T_ours - T_o3d).abs().max().item())
    assert errs[0] < 1e-2 and errs[1] < errs[0] / 30


def test_levenberg_marquardt_damping_is_invariant_under_rotations_of_the_frame():
    import diffcp
    from diffcp.minimize.levenberg_marquardt import block_damping
    g = torch.Generator().manual_seed(3)
    J = torch.randn(2, 40, 6, generator=g, dtype=torch.float64)
    A = J.transpose(1, 2) @ J
    Q = diffcp.random_rotation(2, generator=g, dtype=torch.float64)
    P = torch.zeros(2, 6, 6, dtype=torch.float64)
    P[:, :3, :3], P[:, 3:, 3:] = Q, Q
    D = block_damping(A)
    assert torch.allclose(block_damping(P @ A @ P.transpose(1, 2)), D)
    assert torch.allclose(P @ D @ P.transpose(1, 2), D)  # so the damped step rotates with the frame
    # Marquardt's diag(A) does not commute with P
    Dm = torch.diag_embed(torch.diagonal(A, dim1=-2, dim2=-1))
    assert not torch.allclose(P @ Dm @ P.transpose(1, 2), Dm)



def test_trust_region_of_the_correspondences():
    from diffcp.minimize.levenberg_marquardt import TrustRegion
    y0 = torch.zeros(2, 4, 3, dtype=D)
    q = y0.clone()
    q[..., 0] = 1.0  # every match 1 away: the region has radius 2 (RMS)
    w = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=D)
    region = TrustRegion(y0, q, w)
    moved = y0.clone()
    moved[0, :3, 1] = 1.99  # inside
    moved[0, 3] = float("nan")  # a weightless row is ignored
    moved[1, :, 2] = 2.01  # outside
    assert region.contains(moved).tolist() == [True, False]


@pytest.mark.parametrize("metric", METRICS)
def test_float32_step_far_from_the_origin_equals_float64(metric):
    """The rotation block of J^T W J is a squared length times the translation block: a cloud of
    radius 100 at 4e3 from the frame's origin makes it 1e7 times larger. The damping is relative to
    each block (twist_solve), so float32 takes the float64 step; a damping relative to the whole
    trace, raised to 64 eps in float32, shrank the translation 50-fold (ICP crawled from far
    starts). (Much farther, 1.8e4 away, the rotation about the far origin and the translation are
    too alike for float32 to tell apart at all.)"""
    s, ns, q, nq, _ = _problem(B=2, N=40, seed=31)
    far = torch.tensor([3e3, -3e3, 1e3], dtype=D)
    y, q = 100 * s + far, 100 * s + far + torch.tensor([30.0, -10.0, 20.0], dtype=D)
    w = torch.ones(2, 40, dtype=D)
    steps = [gauss_newton_step(metric, *(x.to(dt) for x in (y, q, w, nq, ns))).double() for dt in (torch.float32, D)]
    torch.testing.assert_close(steps[0][:, 3:], steps[1][:, 3:], rtol=2e-2, atol=0.0)
