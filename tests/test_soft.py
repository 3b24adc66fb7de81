"""Soft nearest neighbours: dense vs attention vs a naive loop, limits, padding, gradients."""

import pytest
import torch

from diffcp.search import SoftMatch, knn, soft_nearest

BACKENDS = ["dense", "attention"]


def naive_soft(query, points, temperature, values=None):
    """Reference: explicit softmax for one cloud, float64, no centring."""
    q, p = query.double(), points.double()
    d = ((q[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    w = torch.exp(-(d - d.min(1, keepdim=True).values) / temperature)
    w = w / w.sum(1, keepdim=True)
    return w @ p, (None if values is None else w @ values.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_naive(backend, dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 40, 3, generator=g, dtype=dtype) + 3
    p = torch.randn(2, 50, 3, generator=g, dtype=dtype) + 3
    vals = torch.randn(2, 50, 5, generator=g, dtype=dtype)
    out = soft_nearest(q, p, 0.05, values=vals, backend=backend)
    assert isinstance(out, SoftMatch) and out.points.dtype == dtype
    assert out.points.shape == (2, 40, 3) and out.values.shape == (2, 40, 5)
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    for i in range(2):
        rp, rv = naive_soft(q[i], p[i], 0.05, vals[i])
        torch.testing.assert_close(out.points[i].double(), rp, rtol=tol, atol=tol)
        torch.testing.assert_close(out.values[i].double(), rv, rtol=tol, atol=tol)
    assert soft_nearest(q, p, 0.05, backend=backend).values is None


def test_backends_agree_with_padding_and_per_cloud_temperature():
    g = torch.Generator().manual_seed(1)
    q = torch.rand(3, 64, 3, generator=g, dtype=torch.float64)
    p = torch.rand(3, 80, 3, generator=g, dtype=torch.float64)
    n = torch.randn(3, 80, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([80, 17, 50])
    t = torch.tensor([0.01, 0.1, 1.0], dtype=torch.float64)
    a = soft_nearest(q, p, t, lengths, values=n, backend="dense")
    b = soft_nearest(q, p, t, lengths, values=n, backend="attention")
    torch.testing.assert_close(a.points, b.points)
    torch.testing.assert_close(a.values, b.values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_equals_unpadded(backend):
    g = torch.Generator().manual_seed(2)
    p1 = torch.rand(30, 3, generator=g, dtype=torch.float64)
    q1 = torch.rand(20, 3, generator=g, dtype=torch.float64)
    P = torch.cat([p1, torch.full((10, 3), 1e3, dtype=torch.float64)])[None]  # huge padding
    P = torch.cat([P, torch.rand(1, 40, 3, generator=g, dtype=torch.float64)])
    Q = torch.cat([q1[None], torch.rand(1, 20, 3, generator=g, dtype=torch.float64)])
    out = soft_nearest(Q, P, 0.02, torch.tensor([30, 40]), backend=backend)
    ref = soft_nearest(q1, p1, 0.02, backend=backend)
    assert ref.points.shape == (20, 3)
    torch.testing.assert_close(out.points[0], ref.points)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_limits(backend):
    g = torch.Generator().manual_seed(3)
    q = torch.rand(2, 50, 3, generator=g, dtype=torch.float64)
    p = torch.rand(2, 60, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([60, 25])
    idx = knn(q, p, points_lengths=lengths).indices[..., 0]
    hard = p.gather(1, idx[..., None].expand(-1, -1, 3))
    cold = soft_nearest(q, p, 1e-7, lengths, backend=backend).points
    torch.testing.assert_close(cold, hard, rtol=0, atol=1e-9)
    hot = soft_nearest(q, p, 1e7, lengths, backend=backend).points
    centroid = torch.stack([p[0].mean(0), p[1, :25].mean(0)])[:, None, :].expand_as(hot)
    torch.testing.assert_close(hot, centroid, rtol=0, atol=1e-6)


def test_auto_uses_attention_when_large():
    g = torch.Generator().manual_seed(4)
    q = torch.rand(1, 1100, 3, generator=g)
    p = torch.rand(1, 1000, 3, generator=g)  # 1.1e6 pairs: attention
    auto = soft_nearest(q, p, 0.01).points
    torch.testing.assert_close(auto, soft_nearest(q, p, 0.01, backend="attention").points, rtol=0, atol=0)
    torch.testing.assert_close(auto, soft_nearest(q, p, 0.01, backend="dense").points, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    g = torch.Generator().manual_seed(5)
    q = torch.rand(2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.rand(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, 1, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.05, 0.2], dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 3])

    def f(q, p, v, t):
        out = soft_nearest(q, p, t, lengths, values=v, backend=backend)
        return out.points, out.values

    assert torch.autograd.gradcheck(f, (q, p, v, t))
    pts, vals = f(q, p, v, t)
    (pts.sum() + vals.sum()).backward()
    assert (p.grad[1, 3:] == 0).all() and (v.grad[1, 3:] == 0).all()


@pytest.mark.parametrize("tile", [None, 50])
def test_attention_gradient_equals_dense_gradient_float32(tile, monkeypatch):
    if tile is not None:  # several tiles of query rows in the attention backward
        monkeypatch.setattr("diffcp.search.soft._TILE_ELEMENTS", tile)
    g = torch.Generator().manual_seed(6)
    q0 = torch.rand(2, 30, 3, generator=g)
    p0 = torch.rand(2, 40, 3, generator=g)
    grads = []
    for backend in BACKENDS:
        q, p = q0.clone().requires_grad_(), p0.clone().requires_grad_()
        soft_nearest(q, p, 0.01, backend=backend).points.square().sum().backward()
        grads.append((q.grad, p.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-4)


def test_small_temperature_gradient_finite():
    q = torch.rand(1, 20, 3, dtype=torch.float64, requires_grad=True)
    p = torch.rand(1, 20, 3, dtype=torch.float64, requires_grad=True)
    for backend in BACKENDS:
        soft_nearest(q, p, 1e-9, backend=backend).points.sum().backward()
        assert torch.isfinite(q.grad).all() and torch.isfinite(p.grad).all()


def test_bad_input():
    q, p = torch.rand(2, 10, 3), torch.rand(2, 5, 3)
    for t in (0.0, -1.0, float("nan"), float("inf"), torch.tensor([0.1, 0.0])):
        with pytest.raises(ValueError, match="temperature"):
            soft_nearest(q, p, t)
    with pytest.raises(ValueError, match="temperature"):
        soft_nearest(q, p, torch.ones(3))
    with pytest.raises(TypeError, match="temperature"):
        soft_nearest(q, p, "hot")
    with pytest.raises(ValueError, match="backend"):
        soft_nearest(q, p, 1.0, backend="flash")
    with pytest.raises(ValueError, match="values must have shape"):
        soft_nearest(q, p, 1.0, values=torch.rand(2, 4, 3))
    with pytest.raises(TypeError, match="values has dtype"):
        soft_nearest(q, p, 1.0, values=torch.rand(2, 5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        soft_nearest(q, torch.rand(2, 5, 4), 1.0)
    with pytest.raises(ValueError, match="batch sizes must match"):
        soft_nearest(q, torch.rand(3, 5, 3), 1.0)
    with pytest.raises(ValueError, match="points_lengths"):
        soft_nearest(q, p, 1.0, points_lengths=torch.tensor([0, 5]))


# ----------------------------------------------------------------------------------------------
# backend="truncated": softmax over the k nearest points, certified, else attention


import math

import diffcp.search.grid as grid_module
import diffcp.search.soft as soft_module


@pytest.fixture(params=["grid", "knn"])
def candidates(request, monkeypatch):
    """Both ways of choosing truncation candidates: the grid's ring search (CPU with numba) and the
    exact k nearest neighbours (GPU, or a CPU without numba)."""
    if request.param == "knn":
        monkeypatch.setattr(grid_module, "AVAILABLE", False)
    return request.param


def _clustered(generator, batch, sites, per_site, spread, dtype=torch.float64):
    """Points in tight pairs/triples around well separated sites, and queries near the sites."""
    centres = torch.randn(batch, sites, 1, 3, generator=generator, dtype=dtype) * 5
    jitter = spread * torch.randn(batch, sites, per_site, 3, generator=generator, dtype=dtype)
    p = (centres + jitter).reshape(batch, -1, 3)
    pick = torch.randint(0, sites, (batch, 4), generator=generator)
    near = spread * torch.randn(batch, 4, 3, generator=generator, dtype=dtype)
    q = centres[torch.arange(batch)[:, None], pick, 0] + near
    return q, p


def test_truncated_equals_dense_small_temperature(candidates):
    g = torch.Generator().manual_seed(10)
    q = torch.rand(3, 70, 3, generator=g, dtype=torch.float64)
    p = torch.rand(3, 90, 3, generator=g, dtype=torch.float64)
    vals = torch.randn(3, 90, 4, generator=g, dtype=torch.float64)
    lengths = torch.tensor([90, 33, 61])
    t = torch.tensor([4e-4, 2e-4, 3e-4], dtype=torch.float64)
    soft_module.LAST_TRUNCATION_CERTIFIED = None
    out = soft_nearest(q, p, t, lengths, values=vals, backend="truncated", k=16)
    assert soft_module.LAST_TRUNCATION_CERTIFIED is True
    ref = soft_nearest(q, p, t, lengths, values=vals, backend="dense")
    torch.testing.assert_close(out.points, ref.points, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.values, ref.values, rtol=0, atol=1e-12)
    # the answer is not just the hard nearest neighbour: the soft weights matter at this T
    hard = p.gather(1, knn(q, p, points_lengths=lengths).indices.expand(-1, -1, 3))
    assert (out.points - hard).abs().max() > 1e-4
    # unbatched input, without values
    one = soft_nearest(q[0], p[0], 4e-4, backend="truncated", k=16)
    assert one.points.shape == (70, 3) and one.values is None and soft_module.LAST_TRUNCATION_CERTIFIED
    torch.testing.assert_close(one.points, ref.points[0], rtol=0, atol=1e-12)


def test_truncated_falls_back_at_large_temperature(candidates):
    g = torch.Generator().manual_seed(11)
    q = torch.rand(2, 40, 3, generator=g, dtype=torch.float64)
    p = torch.rand(2, 50, 3, generator=g, dtype=torch.float64)
    vals = torch.randn(2, 50, 2, generator=g, dtype=torch.float64)
    lengths = torch.tensor([50, 20])
    out = soft_nearest(q, p, 0.5, lengths, values=vals, backend="truncated", k=8)
    assert soft_module.LAST_TRUNCATION_CERTIFIED is False
    ref = soft_nearest(q, p, 0.5, lengths, values=vals, backend="dense")
    torch.testing.assert_close(out.points, ref.points, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.values, ref.values, rtol=0, atol=1e-12)
    att = soft_nearest(q, p, 0.5, lengths, values=vals, backend="attention")
    assert torch.equal(out.points, att.points)  # the fallback is the attention backend


def test_truncated_whole_cloud_is_always_certified(candidates):
    g = torch.Generator().manual_seed(12)
    q = torch.rand(2, 30, 3, generator=g, dtype=torch.float64)
    p = torch.rand(2, 12, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([12, 12])
    out = soft_nearest(q, p, 100.0, lengths, backend="truncated", k=500)  # k capped at 12
    assert soft_module.LAST_TRUNCATION_CERTIFIED is True
    ref = soft_nearest(q, p, 100.0, lengths, backend="dense").points
    torch.testing.assert_close(out.points, ref, rtol=0, atol=1e-12)
    out = soft_nearest(q, p, 100.0, torch.tensor([12, 5]), backend="truncated", k=500)
    ref = soft_nearest(q, p, 100.0, torch.tensor([12, 5]), backend="dense").points
    torch.testing.assert_close(out.points, ref, rtol=0, atol=1e-12)
    if candidates == "knn":
        # k is capped at the smallest cloud (5): the 12-point cloud's rows are not whole
        assert soft_module.LAST_TRUNCATION_CERTIFIED is False
        assert soft_module.LAST_CERTIFIED_FRACTION == 0.5
    else:
        # the grid keeps up to k candidates in every cloud: both clouds are whole
        assert soft_module.LAST_TRUNCATION_CERTIFIED is True


def test_truncated_certificate_threshold(monkeypatch):
    monkeypatch.setattr(grid_module, "AVAILABLE", False)  # the k-nearest certificate
    # query at 0 on a line of points at x = 0, 1, 2, 3, 4; k = 2: d1^2 = 0, dk^2 = 1, and
    # M_valid - k points are dropped, so the bound is (M_valid - k) exp(-1 / T).
    p = torch.tensor([[[float(i), 0.0, 0.0] for i in range(5)]], dtype=torch.float64)
    q = torch.zeros(1, 1, 3, dtype=torch.float64)
    tol = 1e-6
    t3 = 1 / math.log(3 / tol)  # bound == tol with 3 dropped points
    t2 = 1 / math.log(2 / tol)  # bound == tol with 2 dropped points (t2 > t3)
    cases = [(t3 * (1 - 1e-6), 5, True), (t3 * (1 + 1e-6), 5, False),
             (t3 * (1 + 1e-6), 4, True), (t2 * (1 - 1e-6), 4, True), (t2 * (1 + 1e-6), 4, False)]
    for t, length, expected in cases:
        soft_nearest(q, p, t, torch.tensor([length]), backend="truncated", k=2, truncation_tolerance=tol)
        assert soft_module.LAST_TRUNCATION_CERTIFIED is expected, (t, length)
    # the default tolerance is the dtype's epsilon: certified at T just below 1 / log(3 / eps)
    for dtype in (torch.float32, torch.float64):
        t_eps = 1 / math.log(3 / torch.finfo(dtype).eps)
        for factor, expected in ((0.999, True), (1.001, False)):
            soft_nearest(q.to(dtype), p.to(dtype), t_eps * factor, backend="truncated", k=2)
            assert soft_module.LAST_TRUNCATION_CERTIFIED is expected, (dtype, factor)


def test_truncation_error_within_bound(candidates):
    # A loose tolerance keeps the truncated result; its error must stay within the certified
    # bound times the diameter, with the bound computed here independently, row by row.
    g = torch.Generator().manual_seed(13)
    q = torch.rand(2, 60, 3, generator=g, dtype=torch.float64)
    p = torch.rand(2, 40, 3, generator=g, dtype=torch.float64)
    k, t = 6, 0.01
    tol = 1e300 if candidates == "knn" else 1e-2
    out = soft_nearest(q, p, t, backend="truncated", k=k, truncation_tolerance=tol).points
    ref = soft_nearest(q, p, t, backend="dense").points
    d2 = ((q[:, :, None] - p[:, None]) ** 2).sum(-1).sort(-1).values
    diam = torch.cdist(p, p).amax((1, 2))[:, None]
    err = (out - ref).norm(dim=-1)
    if candidates == "knn":
        assert soft_module.LAST_TRUNCATION_CERTIFIED is True
        bound = (40 - k) * torch.exp(-(d2[..., k - 1] - d2[..., 0]) / t)  # (B, N)
        assert (err <= bound * diam + 1e-14).all()
    else:
        # the grid keeps every point with d^2 < d_1^2 + T log(M / tol) (at most k): every dropped
        # point weighs < tol / M relative to the nearest, so the error is below tol * diameter
        assert soft_module.LAST_CERTIFIED_FRACTION > 0.5
        assert (err <= tol * diam + 1e-14).all()
    assert err.max() > 1e-6  # the truncation really drops something at this T (the test can fail)


def test_truncated_gradcheck(candidates):
    g = torch.Generator().manual_seed(14)
    q, p = _clustered(g, 2, sites=3, per_site=2, spread=0.15)
    q, p = q.requires_grad_(), p.requires_grad_()
    v = torch.randn(2, 6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.05, 0.1], dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 4])

    def f(q, p, v, t):
        out = soft_nearest(q, p, t, lengths, values=v, backend="truncated", k=3)
        assert soft_module.LAST_TRUNCATION_CERTIFIED is True
        return out.points, out.values

    assert torch.autograd.gradcheck(f, (q, p, v, t))
    pts, vals = f(q, p, v, t)
    (pts.sum() + vals.sum()).backward()
    assert (p.grad[1, 4:] == 0).all() and (v.grad[1, 4:] == 0).all()
    assert t.grad.abs().min() > 0  # the temperature gradient is not trivially zero


def test_truncated_gradient_equals_dense_gradient(candidates):
    g = torch.Generator().manual_seed(15)
    q0 = torch.rand(2, 50, 3, generator=g, dtype=torch.float64)
    p0 = torch.rand(2, 60, 3, generator=g, dtype=torch.float64)
    v0 = torch.randn(2, 60, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([60, 45])
    grads = []
    for backend in ("dense", "truncated"):
        q, p, v = (x.clone().requires_grad_() for x in (q0, p0, v0))
        t = torch.tensor([3e-4, 5e-4], dtype=torch.float64, requires_grad=True)
        out = soft_nearest(q, p, t, lengths, values=v, backend=backend, k=16)
        (out.points.square().sum() + out.values.sin().sum()).backward()
        grads.append((q.grad, p.grad, v.grad, t.grad))
    assert soft_module.LAST_TRUNCATION_CERTIFIED is True
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
    assert grads[0][3].abs().min() > 1e-3


def test_truncated_bad_arguments():
    q, p = torch.rand(2, 10, 3), torch.rand(2, 5, 3)
    for k in (0, -3, 2.0, True, "4", None):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            soft_nearest(q, p, 0.01, backend="truncated", k=k)
    for tol in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="truncation_tolerance"):
            soft_nearest(q, p, 0.01, backend="truncated", truncation_tolerance=tol)
    with pytest.raises(TypeError, match="truncation_tolerance"):
        soft_nearest(q, p, 0.01, backend="truncated", truncation_tolerance="small")


def test_truncation_never_reuses_a_grid_built_for_other_points():
    # A new tensor can live in the memory of an old one, with the same shape and version (here: two
    # tensors over one NumPy buffer): the cached grid must not be taken for the new points.
    g = torch.Generator().manual_seed(16)
    buffer = torch.rand(2, 400, 3, generator=g, dtype=torch.float64).numpy()
    q = torch.rand(2, 300, 3, generator=g, dtype=torch.float64)
    first = torch.from_numpy(buffer)
    soft_nearest(q, first, 1e-3, backend="truncated")
    buffer[:] = torch.rand(2, 400, 3, generator=g, dtype=torch.float64).numpy()
    second = torch.from_numpy(buffer)
    assert second.data_ptr() == first.data_ptr() and second._version == first._version
    out = soft_nearest(q, second, 1e-3, backend="truncated").points
    ref = soft_nearest(q, second, 1e-3, backend="dense").points
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
