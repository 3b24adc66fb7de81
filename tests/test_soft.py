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
