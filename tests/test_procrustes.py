"""Tests for diffcp.minimize.procrustes against independent references (numpy, SciPy, Open3D, FD)."""

import inspect
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from diffcp import checks
from diffcp.geometry import random_transform, so3_exp, split_transform
from diffcp.minimize.procrustes import (
    Procrustes,
    procrustes,
    procrustes_conditioning,
    procrustes_reference,
)

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pose(B, seed, dtype=F64):
    R, t = split_transform(random_transform(B, max_translation=2.0, generator=_gen(seed), dtype=dtype))
    return R, t


def _apply(R, t, x):
    return x @ R.transpose(-1, -2) + t[..., None, :]


def _umeyama_np(src, dst, w):
    """Naive weighted Kabsch/Umeyama (no scale) for one cloud, in numpy."""
    w = w / w.sum()
    ms, md = w @ src, w @ dst
    H = ((dst - md) * w[:, None]).T @ (src - ms)
    U, _, Vt = np.linalg.svd(H)
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    R = U @ D @ Vt
    return R, md - R @ ms


def _cost(R, t, src, dst, w):
    return float((w * ((src @ R.T + t - dst) ** 2).sum(-1)).sum())


# ---------------------------------------------------------------------------------------------
# symmetric shapes (repeated singular values of the cross-covariance)


def _cube():
    return torch.tensor([[x, y, z] for x in (-1.0, 1) for y in (-1.0, 1) for z in (-1.0, 1)], dtype=F64)


def _square():
    return torch.tensor([[1.0, 1, 0], [-1, 1, 0], [-1, -1, 0], [1, -1, 0]], dtype=F64)


def _hexagon():
    a = torch.arange(6, dtype=F64) * math.pi / 3
    return torch.stack([a.cos(), a.sin(), torch.zeros_like(a)], -1)


SHAPES = {"cube": _cube, "square": _square, "hexagon": _hexagon}


# ---------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (F64, 1e-12)])
def test_recovers_known_transform(dtype, tol):
    R0, t0 = _pose(5, 1, dtype)
    src = torch.randn(5, 40, 3, generator=_gen(2)).to(dtype)
    out = procrustes(src, _apply(R0, t0, src))
    assert isinstance(out, Procrustes)
    assert out.rotation.dtype == dtype and out.rotation.shape == (5, 3, 3) and out.translation.shape == (5, 3)
    assert torch.allclose(out.rotation, R0, atol=tol)
    assert torch.allclose(out.translation, t0, atol=5 * tol)
    # unbatched in -> unbatched out
    R1, t1 = procrustes(src[2], _apply(R0[2], t0[2], src[2]))
    assert R1.shape == (3, 3) and t1.shape == (3,)
    assert torch.allclose(R1, R0[2], atol=tol)


def test_padded_batch_equals_per_cloud():
    lengths = torch.tensor([7, 30, 19])
    src = torch.randn(3, 30, 3, generator=_gen(3), dtype=F64)
    R0, t0 = _pose(3, 4)
    dst = _apply(R0, t0, src) + 0.05 * torch.randn(3, 30, 3, generator=_gen(5), dtype=F64)
    w = torch.rand(3, 30, generator=_gen(6), dtype=F64)
    # garbage in the padding must not matter
    pad = torch.arange(30)[None, :] >= lengths[:, None]
    src = torch.where(pad[..., None], 1e3, src)
    dst = torch.where(pad[..., None], -7e2, dst)
    R, t = procrustes(src, dst, w, lengths)
    R1, t1 = procrustes(src, dst, None, lengths)
    for b, n in enumerate(lengths.tolist()):
        Rb, tb = procrustes(src[b, :n], dst[b, :n], w[b, :n])
        assert torch.allclose(R[b], Rb, atol=1e-12) and torch.allclose(t[b], tb, atol=1e-12)
        Rb, tb = procrustes(src[b, :n], dst[b, :n])
        assert torch.allclose(R1[b], Rb, atol=1e-12) and torch.allclose(t1[b], tb, atol=1e-12)
    # and the padding gets no gradient, real points do
    s = src.clone().requires_grad_()
    procrustes(s, dst, w, lengths).rotation.sum().backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[pad] == 0).all() and (s.grad[~pad] != 0).any()


def test_point_order_invariance():
    src = torch.randn(2, 25, 3, generator=_gen(7), dtype=F64)
    dst = torch.randn(2, 25, 3, generator=_gen(8), dtype=F64)
    w = torch.rand(2, 25, generator=_gen(9), dtype=F64)
    perm = torch.randperm(25, generator=_gen(10))
    a = procrustes(src, dst, w)
    b = procrustes(src[:, perm], dst[:, perm], w[:, perm])
    assert torch.allclose(a.rotation, b.rotation, atol=1e-12)
    assert torch.allclose(a.translation, b.translation, atol=1e-12)


def test_zero_weight_outliers_recover_inlier_transform():
    R0, t0 = _pose(2, 11)
    src = torch.randn(2, 50, 3, generator=_gen(12), dtype=F64)
    dst = _apply(R0, t0, src)
    outlier = torch.rand(2, 50, generator=_gen(13)) < 0.3
    dst = torch.where(outlier[..., None], 5 * torch.randn(2, 50, 3, generator=_gen(14), dtype=F64), dst)
    R_bad, _ = procrustes(src, dst)
    assert not torch.allclose(R_bad, R0, atol=1e-3)  # the outliers do matter
    R, t = procrustes(src, dst, (~outlier).to(F64))
    assert torch.allclose(R, R0, atol=1e-12) and torch.allclose(t, t0, atol=1e-12)


def test_matches_numpy_umeyama_and_scipy_with_noise():
    B, N = 4, 60
    R0, t0 = _pose(B, 15)
    src = torch.randn(B, N, 3, generator=_gen(16), dtype=F64)
    dst = _apply(R0, t0, src) + 0.3 * torch.randn(B, N, 3, generator=_gen(17), dtype=F64)
    w = torch.rand(B, N, generator=_gen(18), dtype=F64)
    R, t = procrustes(src, dst, w)
    for b in range(B):
        s, d, wb = src[b].numpy(), dst[b].numpy(), w[b].numpy()
        Rn, tn = _umeyama_np(s, d, wb)
        np.testing.assert_allclose(R[b].numpy(), Rn, atol=1e-12)
        np.testing.assert_allclose(t[b].numpy(), tn, atol=1e-12)
        # SciPy: align_vectors(a, b) finds C with a ~ C b (rotation only, so centre first)
        ms, md = wb @ s / wb.sum(), wb @ d / wb.sum()
        rot, _ = Rotation.align_vectors(d - md, s - ms, weights=wb)
        np.testing.assert_allclose(R[b].numpy(), rot.as_matrix(), atol=1e-10)


def test_matches_open3d():
    o3d = pytest.importorskip("open3d")
    R0, t0 = _pose(1, 19)
    src = torch.randn(80, 3, generator=_gen(20), dtype=F64)
    dst = _apply(R0[0], t0[0], src) + 0.2 * torch.randn(80, 3, generator=_gen(21), dtype=F64)
    pc_s = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(src.numpy()))
    pc_d = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(dst.numpy()))
    corres = o3d.utility.Vector2iVector(np.stack([np.arange(80), np.arange(80)], 1).astype(np.int32))
    T = o3d.pipelines.registration.TransformationEstimationPointToPoint().compute_transformation(pc_s, pc_d, corres)
    R, t = procrustes(src, dst)
    np.testing.assert_allclose(R.numpy(), T[:3, :3], atol=1e-9)
    np.testing.assert_allclose(t.numpy(), T[:3, 3], atol=1e-9)


def test_reflection_is_never_returned():
    # target = mirror image of a (non-planar) source: plain Kabsch returns a reflection
    src = torch.randn(2, 30, 3, generator=_gen(22), dtype=F64)
    mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=F64))
    R0, t0 = _pose(2, 23)
    dst = _apply(R0 @ mirror, t0, src) + 0.01 * torch.randn(2, 30, 3, generator=_gen(24), dtype=F64)
    R, t = procrustes(src, dst)
    assert torch.allclose(torch.linalg.det(R), torch.ones(2, dtype=F64), atol=1e-12)
    for b in range(2):
        s, d = src[b].numpy(), dst[b].numpy()
        H = (d - d.mean(0)).T @ (s - s.mean(0))
        U, _, Vt = np.linalg.svd(H)
        assert np.linalg.det(U @ Vt) < 0  # plain Kabsch would give det = -1 here
        rot, _ = Rotation.align_vectors(d - d.mean(0), s - s.mean(0))
        np.testing.assert_allclose(R[b].numpy(), rot.as_matrix(), atol=1e-10)
        # optimal among proper rotations: no small perturbation does better
        w = np.ones(30)
        best = _cost(R[b].numpy(), t[b].numpy(), s, d, w)
        for dR in Rotation.random(200, random_state=b).as_rotvec() * 0.05:
            Rp = Rotation.from_rotvec(dR).as_matrix() @ R[b].numpy()
            tp = d.mean(0) - Rp @ s.mean(0)
            assert _cost(Rp, tp, s, d, w) >= best - 1e-12
    # conditioning sees the mirrored configuration as worse than a proper one
    c_mirror = procrustes_conditioning(src, dst)
    c_proper = procrustes_conditioning(src, _apply(R0, t0, src))
    assert (c_mirror < c_proper).all()


def test_zero_total_weight_gives_identity_and_centroid_translation():
    src = torch.randn(2, 10, 3, generator=_gen(25), dtype=F64)
    dst = torch.randn(2, 10, 3, generator=_gen(26), dtype=F64)
    w = torch.rand(2, 10, generator=_gen(27), dtype=F64)
    w[1] = 0
    lengths = torch.tensor([10, 6])
    R, t = procrustes(src, dst, w, lengths)
    assert torch.allclose(R[1], torch.eye(3, dtype=F64))
    assert torch.allclose(t[1], dst[1, :6].mean(0) - src[1, :6].mean(0), atol=1e-14)
    assert torch.allclose(R[0], procrustes(src[0], dst[0], w[0]).rotation, atol=1e-12)
    s, ww = src.clone().requires_grad_(), w.clone().requires_grad_()
    probe = 1e3 * torch.randn(2, 3, 3, generator=_gen(50), dtype=F64)  # large: no 0 * inf anywhere
    (procrustes(s, dst, ww, lengths).rotation * probe).sum().backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(ww.grad).all()


# ---------------------------------------------------------------------------------------------
# gradients


def _gradcheck(fn, *inputs):
    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, raise_exception=False)


def test_gradcheck_random_data():
    src = torch.randn(2, 8, 3, generator=_gen(28), dtype=F64, requires_grad=True)
    R0, t0 = _pose(2, 29)
    dst = (_apply(R0, t0, src.detach()) + 0.3 * torch.randn(2, 8, 3, generator=_gen(30), dtype=F64)).requires_grad_()
    w = (torch.rand(2, 8, generator=_gen(31), dtype=F64) + 0.1).requires_grad_()
    assert _gradcheck(lambda s, d, w: tuple(procrustes(s, d, w)), src, dst, w)
    # padded, with lengths
    lengths = torch.tensor([8, 5])
    assert _gradcheck(lambda s, d, w: tuple(procrustes(s, d, w, lengths)), src, dst, w)


def test_gradcheck_reflection_case():
    src = torch.randn(7, 3, generator=_gen(32), dtype=F64, requires_grad=True)
    dst = (src.detach() * torch.tensor([1.0, -1.0, 1.0], dtype=F64)).requires_grad_()
    assert _gradcheck(lambda s, d: tuple(procrustes(s, d)), src, dst)


def test_custom_backward_matches_autograd_svd_on_generic_data():
    src = torch.randn(3, 12, 3, generator=_gen(33), dtype=F64, requires_grad=True)
    dst = torch.randn(3, 12, 3, generator=_gen(34), dtype=F64, requires_grad=True)
    w = torch.rand(3, 12, generator=_gen(35), dtype=F64, requires_grad=True)
    probe_R = torch.randn(3, 3, 3, generator=_gen(36), dtype=F64)
    probe_t = torch.randn(3, 3, generator=_gen(37), dtype=F64)
    grads = []
    for f in (procrustes, procrustes_reference):
        R, t = f(src, dst, w)
        grads.append(torch.autograd.grad((R * probe_R).sum() + (t * probe_t).sum(), (src, dst, w)))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_symmetric_shapes_stable_where_naive_fails(shape):
    s = SHAPES[shape]()
    R0, t0 = _pose(1, 38)
    d = _apply(R0[0], t0[0], s)
    w = torch.ones(len(s), dtype=F64)
    src, dst, ww = (x.clone().requires_grad_() for x in (s, d, w))

    ours = lambda s_, d_, w_: tuple(procrustes(s_, d_, w_))  # noqa: E731
    naive = lambda s_, d_, w_: tuple(procrustes_reference(s_, d_, w_))  # noqa: E731

    R, t = procrustes(s, d, w)
    assert torch.allclose(R, R0[0], atol=1e-12) and torch.allclose(t, t0[0], atol=1e-12)
    assert _gradcheck(ours, src, dst, ww)
    J = torch.autograd.functional.jacobian(ours, (src, dst, ww))
    assert all(torch.isfinite(j).all() for row in J for j in row)

    # the naive path is NaN/Inf, or finite but disagrees with finite differences
    Jn = torch.autograd.functional.jacobian(naive, (src, dst, ww))
    finite = all(torch.isfinite(j).all() for row in Jn for j in row)
    assert not finite or not _gradcheck(naive, src, dst, ww)


def test_gradient_finite_for_collinear_and_coincident_points():
    line = torch.linspace(-1, 1, 9, dtype=F64)[:, None] * torch.tensor([1.0, 2.0, -0.5], dtype=F64)
    R0, t0 = _pose(1, 39)
    cases = {
        "collinear": (line, _apply(R0[0], t0[0], line)),
        "coincident": (torch.full((6, 3), 0.7, dtype=F64), torch.full((6, 3), -0.2, dtype=F64)),
        "single point": (torch.tensor([[1.0, 2, 3]], dtype=F64), torch.tensor([[0.0, 1, 0]], dtype=F64)),
    }
    for name, (s, d) in cases.items():
        for dtype in (torch.float32, F64):
            src, dst = s.to(dtype).requires_grad_(), d.to(dtype).requires_grad_()
            w = torch.ones(len(s), dtype=dtype, requires_grad=True)
            R, t = procrustes(src, dst, w)
            assert torch.isfinite(R).all() and torch.isfinite(t).all(), name
            assert torch.allclose(torch.linalg.det(R), torch.ones((), dtype=dtype), atol=1e-5), name
            probe = torch.randn(3, 3, generator=_gen(51)).to(dtype)
            g = torch.autograd.grad((R * probe).sum() + t.sum(), (src, dst, w))
            assert all(torch.isfinite(x).all() for x in g), name
    # collinear: the rotation still maps the line onto the target line, t is consistent
    R, t = procrustes(line, _apply(R0[0], t0[0], line))
    assert torch.allclose(_apply(R, t, line), _apply(R0[0], t0[0], line), atol=1e-12)
    # a larger gradient_eps bounds the gradient more tightly
    src = line.clone().requires_grad_()
    dst = _apply(R0[0], t0[0], line) + 1e-9 * torch.randn(9, 3, generator=_gen(40), dtype=F64)
    g_small = torch.autograd.grad(procrustes(src, dst, gradient_eps=1e-12).rotation[0, 1], src)[0]
    g_big = torch.autograd.grad(procrustes(src, dst, gradient_eps=1e-2).rotation[0, 1], src)[0]
    assert g_big.abs().max() < g_small.abs().max()


def test_duplicated_points_match_doubled_weights_and_gradcheck():
    s = torch.randn(6, 3, generator=_gen(41), dtype=F64)
    d = torch.randn(6, 3, generator=_gen(42), dtype=F64)
    w = torch.rand(6, generator=_gen(43), dtype=F64) + 0.1
    dup = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    a = procrustes(s[dup], d[dup], w[dup])
    b = procrustes(s, d, w * torch.tensor([2, 2, 1, 1, 1, 1], dtype=F64))
    assert torch.allclose(a.rotation, b.rotation, atol=1e-12) and torch.allclose(a.translation, b.translation, atol=1e-12)
    src, dst = s[dup].clone().requires_grad_(), d[dup].clone().requires_grad_()
    assert _gradcheck(lambda x, y: tuple(procrustes(x, y)), src, dst)


# ---------------------------------------------------------------------------------------------
# diagnostics and validation


def test_conditioning_values():
    R0, t0 = _pose(1, 44)
    R0, t0 = R0[0], t0[0]
    cube, square = _cube(), _square()
    line = torch.linspace(0, 1, 5, dtype=F64)[:, None] * torch.tensor([1.0, 1.0, 0.0], dtype=F64)
    assert torch.allclose(procrustes_conditioning(cube, _apply(R0, t0, cube)), torch.tensor(2.0, dtype=F64))
    assert torch.allclose(procrustes_conditioning(square, _apply(R0, t0, square)), torch.tensor(1.0, dtype=F64))
    assert procrustes_conditioning(line, _apply(R0, t0, line)) < 1e-12
    # independent check on random data: numpy singular values with the reflection sign
    src = torch.randn(3, 20, 3, generator=_gen(45), dtype=F64)
    dst = torch.randn(3, 20, 3, generator=_gen(46), dtype=F64)
    c = procrustes_conditioning(src, dst)
    assert c.shape == (3,)
    for b in range(3):
        H = (dst[b] - dst[b].mean(0)).T.numpy() @ (src[b] - src[b].mean(0)).numpy()
        sv = np.linalg.svd(H, compute_uv=False)
        expected = (sv[1] + np.sign(np.linalg.det(H)) * sv[2]) / sv[0]
        assert abs(float(c[b]) - expected) < 1e-12
    w = torch.zeros(3, 20, dtype=F64)
    assert (procrustes_conditioning(src, dst, w) == 0).all()


def test_bad_inputs_raise():
    s = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="source"):
        procrustes(torch.randn(2, 5, 2), s)
    with pytest.raises(ValueError, match="target"):
        procrustes(s, torch.randn(2, 4, 3))
    with pytest.raises(TypeError, match="source"):
        procrustes(torch.ones(5, 3, dtype=torch.int64), s[0])
    with pytest.raises(TypeError, match="target"):
        procrustes(s, s.double())
    with pytest.raises(ValueError, match="weights"):
        procrustes(s, s, torch.ones(2, 4))
    with pytest.raises(ValueError, match="weights"):
        procrustes(s, s, -torch.ones(2, 5))
    with pytest.raises(TypeError, match="weights"):
        procrustes(s, s, torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="lengths"):
        procrustes(s, s, lengths=torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="gradient_eps"):
        procrustes(s, s, gradient_eps=-1.0)
    with pytest.raises(ValueError, match="source"):
        procrustes(torch.full((4, 3), float("nan")), torch.zeros(4, 3))


def test_checks_disabled_still_works():
    old = checks.ENABLED
    checks.ENABLED = False
    try:
        R0, t0 = _pose(1, 47)
        s = torch.randn(1, 10, 3, generator=_gen(48), dtype=F64)
        R, _ = procrustes(s, _apply(R0, t0, s))
        assert torch.allclose(R, R0, atol=1e-12)
    finally:
        checks.ENABLED = old


def test_rotation_matches_geometry_convention():
    # y = R x + t with R = exp(omega): a rotation of +90 degrees about z maps x to y
    src = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])
    R0 = so3_exp(torch.tensor([0.0, 0.0, math.pi / 2]))
    R, t = procrustes(src, src @ R0.T + 1.0)
    assert torch.allclose(R @ torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0]), atol=1e-6)
    assert torch.allclose(t, torch.ones(3), atol=1e-6)


def test_default_gradient_eps_lets_a_fit_leave_a_degenerate_start():
    """Gradient descent from rank-one or mirrored matrices (an ambiguous polar factor) converges
    with the default clamp and stalls with a tiny one (benchmarks/procrustes_gradient_eps.py)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "procrustes_gradient_eps.py"
    spec = importlib.util.spec_from_file_location("procrustes_gradient_eps", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    default = inspect.signature(procrustes).parameters["gradient_eps"].default
    median_default, _ = bench.fit_from_degenerate(default, n=16, steps=600)
    median_tiny, _ = bench.fit_from_degenerate(1e-8, n=16, steps=600)
    assert median_default < 0.1 < 1.0 < median_tiny


# ---------------------------------------------------------------------------------------------
# scale: the cross-covariance is normalised by the clouds' extent (no underflow, no overflow)


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e12])
def test_float32_gradient_at_any_scale_matches_float64(scale):
    src = torch.randn(30, 3, generator=_gen(5), dtype=F64)
    R0, t0 = _pose(1, 6)
    dst = _apply(R0[0], t0[0] * 0, src) + 0.01 * torch.randn(30, 3, generator=_gen(7), dtype=F64)
    grads = []
    for dtype in (torch.float32, F64):
        s = (src * scale).to(dtype).requires_grad_(True)
        R, _ = procrustes(s, (dst * scale).to(dtype))
        assert torch.allclose(R.double(), procrustes(src, dst).rotation, atol=1e-5)
        grads.append(torch.autograd.grad(R[0, 1] + R[2, 0], s)[0].double() * scale)
    assert torch.isfinite(grads[0]).all()
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-3 * grads[1].abs().max())


@pytest.mark.parametrize("collapsed", [0.0, 1e-30, 1e-13])
def test_gradient_finite_when_one_cloud_collapses_onto_a_point(collapsed):
    # every match the same point up to rounding (a soft match far colder than the cloud): the
    # rotation is ambiguous, its gradient bounded (not 1 / s_1 of rounding noise)
    for dtype in (torch.float32, F64):
        src = torch.randn(21, 3, generator=_gen(8), dtype=dtype).mul(1e-6).requires_grad_(True)
        dst = (1e-3 + collapsed * torch.randn(21, 3, generator=_gen(9), dtype=F64)).to(dtype).requires_grad_(True)
        R, t = procrustes(src, dst)
        g = torch.autograd.grad((R * torch.randn(3, 3, generator=_gen(10), dtype=dtype)).sum() + t.sum(), (src, dst))
        assert all(torch.isfinite(x).all() for x in g), (dtype, collapsed)


# ---------------------------------------------------------------------------------------------
# umeyama: the similarity y = s R x + t (PyTorch3D's estimate_scale=True)


def _umeyama_scale_np(src, dst, w):
    """From-scratch weighted Umeyama (1991) with scale for one cloud, in numpy."""
    w = w / w.sum()
    ms, md = w @ src, w @ dst
    a, b = src - ms, dst - md
    H = (b * w[:, None]).T @ a
    U, S, Vt = np.linalg.svd(H)
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    R = U @ D @ Vt
    s = np.trace(np.diag(S) @ D) / (w @ (a * a).sum(1))
    return R, md - s * R @ ms, s


def test_umeyama_recovers_a_known_similarity_padded_and_weighted():
    from diffcp.minimize.procrustes import umeyama
    R0, t0 = _pose(3, 11)
    s0 = torch.tensor([0.25, 1.0, 7.5], dtype=F64)
    src = torch.randn(3, 50, 3, generator=_gen(12), dtype=F64)
    dst = s0[:, None, None] * (src @ R0.transpose(-1, -2)) + t0[:, None]
    lengths = torch.tensor([50, 31, 7])
    w = torch.rand(3, 50, generator=_gen(13), dtype=F64)
    dst[1, 31:] = 1e6  # padding: ignored
    R, t, s = umeyama(src, dst, weights=w, lengths=lengths)
    assert R.shape == (3, 3, 3) and t.shape == (3, 3) and s.shape == (3,)
    torch.testing.assert_close(R, R0, atol=1e-12, rtol=0)
    torch.testing.assert_close(t, t0, atol=1e-11, rtol=0)
    torch.testing.assert_close(s, s0, atol=1e-12, rtol=0)
    # the rotation is the rigid solver's
    torch.testing.assert_close(R, procrustes(src, dst, weights=w, lengths=lengths).rotation)


def test_umeyama_matches_a_from_scratch_reference_with_noise():
    from diffcp.minimize.procrustes import umeyama
    src = torch.randn(2, 40, 3, generator=_gen(14), dtype=F64)
    dst = 2.0 * src.flip(-1) + 0.3 * torch.randn(2, 40, 3, generator=_gen(15), dtype=F64)
    dst[1] = dst[1] * torch.tensor([1.0, 1.0, -1.0], dtype=F64)  # mirrored: the best rotation, not a reflection
    w = torch.rand(2, 40, generator=_gen(16), dtype=F64)
    R, t, s = umeyama(src, dst, weights=w)
    for b in range(2):
        Rn, tn, sn = _umeyama_scale_np(src[b].numpy(), dst[b].numpy(), w[b].numpy())
        np.testing.assert_allclose(R[b].numpy(), Rn, atol=1e-12)
        np.testing.assert_allclose(t[b].numpy(), tn, atol=1e-12)
        np.testing.assert_allclose(float(s[b]), sn, rtol=1e-12)
        assert abs(float(torch.linalg.det(R[b])) - 1) < 1e-12


def test_umeyama_gradcheck_and_degenerate_scale():
    from diffcp.minimize.procrustes import umeyama
    src = torch.randn(2, 12, 3, generator=_gen(17), dtype=F64).requires_grad_(True)
    dst = (1.7 * src.detach() @ so3_exp(torch.tensor([0.2, -0.1, 0.4], dtype=F64)).T
           + 0.1 * torch.randn(2, 12, 3, generator=_gen(18), dtype=F64)).requires_grad_(True)
    w = torch.rand(2, 12, generator=_gen(19), dtype=F64).add(0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: umeyama(a, b, weights=c), (src, dst, w))
    # zero weight, or a source of one point: scale 1 (undefined), finite gradient
    one = torch.ones(1, 5, 3, dtype=F64).requires_grad_(True)
    out = umeyama(one, torch.randn(1, 5, 3, generator=_gen(20), dtype=F64))
    assert float(out.scale.detach()) == 1.0
    assert torch.isfinite(torch.autograd.grad(out.translation.sum() + out.scale.sum(), one)[0]).all()


def test_zero_weight_cloud_far_from_the_origin_next_to_others_is_finite():
    # the normalisation of a weightless cloud must not divide its coordinates by a tiny extent
    src = torch.randn(2, 10, 3, generator=_gen(21), dtype=F64) + 14.0
    w = torch.ones(2, 10, dtype=F64)
    w[1] = 0.0
    R, t = procrustes(src.requires_grad_(True), src.detach() + 1.0, weights=w)
    assert torch.isfinite(R).all() and torch.isfinite(t).all()
    assert torch.allclose(R[1], torch.eye(3, dtype=F64))
    assert torch.isfinite(torch.autograd.grad(R.sum() + t.sum(), src)[0]).all()
