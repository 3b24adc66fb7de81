"""Exact k-NN: both backends against a naive reference, SciPy, padding, gradients, errors."""

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from diffcp.search import KNN, NearestNeighborIndex, knn
from diffcp.search.matmul import knn_indices_matmul

BACKENDS = ["grid", "tree", "matmul"]


def naive_knn(query, points, k):
    """Reference: full distance matrix from coordinate differences, float64, one cloud at a time."""
    out_d, out_i = [], []
    for q, p in zip(query.double(), points.double()):
        d = ((q[:, None, :] - p[None, :, :]) ** 2).sum(-1)
        dd, ii = d.sort(dim=-1)
        out_d.append(dd[:, :k])
        out_i.append(ii[:, :k])
    return torch.stack(out_d), torch.stack(out_i)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_naive(backend, dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 200, 3, generator=g, dtype=dtype)
    p = torch.randn(3, 300, 3, generator=g, dtype=dtype) * 2 + 5  # offset: tests the centring
    res = knn(q, p, k=5, backend=backend)
    assert isinstance(res, KNN)
    assert res.indices.dtype == torch.int64 and res.indices.shape == (3, 200, 5)
    assert res.sq_distances.dtype == dtype
    ref_d, ref_i = naive_knn(q, p, 5)
    assert torch.equal(res.indices, ref_i)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(res.sq_distances.double(), ref_d, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backends_identical_and_match_scipy(dtype):
    g = torch.Generator().manual_seed(1)
    q = torch.rand(4, 1000, 3, generator=g, dtype=dtype)
    p = torch.rand(4, 800, 3, generator=g, dtype=dtype)
    a = knn(q, p, k=3, backend="tree")
    b = knn(q, p, k=3, backend="matmul")
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.sq_distances, b.sq_distances, rtol=0, atol=0)
    # independent reference: SciPy, cloud by cloud
    for i in range(4):
        d, idx = cKDTree(p[i].double().numpy()).query(q[i].double().numpy(), k=3)
        assert np.array_equal(a.indices[i].numpy(), idx)
        np.testing.assert_allclose(a.sq_distances[i].double().numpy(), d**2, rtol=1e-5, atol=1e-7)


def test_auto_picks_a_correct_backend_for_small_and_large():
    g = torch.Generator().manual_seed(2)
    for n in (50, 1500):  # below and above MATMUL_CPU_MAX
        q = torch.rand(1, n, 3, generator=g, dtype=torch.float64)
        p = torch.rand(1, n, 3, generator=g, dtype=torch.float64)
        assert torch.equal(knn(q, p, k=2).indices, naive_knn(q, p, 2)[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_equals_unpadded(backend):
    g = torch.Generator().manual_seed(3)
    lq, lp = [30, 7, 50], [40, 12, 9]
    qs = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in lq]
    ps = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in lp]
    # padding filled with points that would be the nearest if they were not ignored
    Q = torch.zeros(3, 50, 3, dtype=torch.float64)
    P = torch.full((3, 40, 3), 0.0, dtype=torch.float64)
    for i in range(3):
        Q[i, : lq[i]] = qs[i]
        P[i, : lp[i]] = ps[i]
        P[i, lp[i]:] = qs[i][0]
    res = knn(Q, P, torch.tensor(lq), torch.tensor(lp), k=4, backend=backend)
    for i in range(3):
        one = knn(qs[i], ps[i], k=4, backend=backend)
        assert torch.equal(res.indices[i, : lq[i]], one.indices)
        torch.testing.assert_close(res.sq_distances[i, : lq[i]], one.sq_distances)
        assert (res.indices[i] < lp[i]).all()
        assert (res.indices[i, lq[i]:] == 0).all() and (res.sq_distances[i, lq[i]:] == 0).all()
    # huge (but finite) padding values must not overflow into NaN or be returned
    P_far = P.float().clone()
    for i in range(3):
        P_far[i, lp[i]:] = 3e37
    far = knn(Q.float(), P_far, torch.tensor(lq), torch.tensor(lp), k=4, backend=backend)
    assert torch.equal(far.indices, res.indices)


def test_tree_batch_offsets_with_far_queries():
    # clouds at the same place, queries far away: neighbours must still come from the own cloud
    g = torch.Generator().manual_seed(4)
    p = torch.rand(5, 100, 3, generator=g, dtype=torch.float64)
    q = torch.rand(5, 60, 3, generator=g, dtype=torch.float64) * 100 - 50
    index = NearestNeighborIndex(p, backend="tree")
    near = index.query(torch.rand(5, 60, 3, generator=g, dtype=torch.float64), k=2)  # builds the tree
    far = index.query(q, k=2)  # forces a wider spacing
    assert torch.equal(far.indices, naive_knn(q, p, 2)[1])
    assert near.indices.max() < 100


@pytest.mark.parametrize("backend,attribute", [("auto", "_grid"), ("grid", "_grid"), ("tree", "_tree")])
def test_index_reuses_its_structure_and_matches_knn(backend, attribute):
    g = torch.Generator().manual_seed(5)
    p = torch.rand(2, 1200, 3, generator=g)
    index = NearestNeighborIndex(p, backend=backend)
    q1, q2 = torch.rand(2, 1200, 3, generator=g), torch.rand(2, 1200, 3, generator=g)
    r1 = index.query(q1)
    built = getattr(index, attribute)
    assert built is not None  # auto picks the grid for this size on a CPU
    r2 = index.query(q2)
    assert getattr(index, attribute) is built
    assert torch.equal(r1.indices, knn(q1, p, backend="matmul").indices)
    assert torch.equal(r2.indices, knn(q2, p, backend="matmul").indices)


def test_matmul_tiling_does_not_change_the_result():
    g = torch.Generator().manual_seed(6)
    q = torch.rand(2, 97, 3, generator=g, dtype=torch.float64)
    p = torch.rand(2, 64, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([64, 33])
    full = knn_indices_matmul(q, p, lengths, 3, max_elements=10**9)
    for budget in (1, 128, 1000):
        assert torch.equal(knn_indices_matmul(q, p, lengths, 3, max_elements=budget), full)


def test_k_equals_length_uses_all_valid_points():
    q = torch.rand(2, 10, 3, dtype=torch.float64)
    p = torch.rand(2, 6, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 4])
    for backend in BACKENDS:
        idx = knn(q, p, points_lengths=lengths, k=4, backend=backend).indices
        assert (idx[1].sort(-1).values == torch.arange(4)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_sq_distances(backend):
    g = torch.Generator().manual_seed(7)
    q = torch.rand(2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.rand(2, 8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ql, pl = torch.tensor([6, 4]), torch.tensor([8, 5])
    f = lambda q, p: knn(q, p, ql, pl, k=2, backend=backend).sq_distances
    assert torch.autograd.gradcheck(f, (q, p))
    f(q, p).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(p.grad).all()
    assert (q.grad[1, 4:] == 0).all() and (p.grad[1, 5:] == 0).all()


def test_unbatched_input():
    q, p = torch.rand(20, 3), torch.rand(30, 3)
    res = knn(q, p, k=2)
    assert res.indices.shape == (20, 2) and res.sq_distances.shape == (20, 2)
    assert torch.equal(res.indices, naive_knn(q[None], p[None], 2)[1][0])


def test_bad_input():
    q, p = torch.rand(2, 10, 3), torch.rand(2, 5, 3)
    with pytest.raises(ValueError, match="k must be at most"):
        knn(q, p, k=6)
    with pytest.raises(ValueError, match="k must be at most"):
        knn(q, p, points_lengths=torch.tensor([5, 2]), k=3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        knn(q, p, k=0)
    with pytest.raises(ValueError, match="backend"):
        knn(q, p, backend="gpu")
    with pytest.raises(ValueError, match="shape"):
        knn(torch.rand(2, 10, 2), p)
    with pytest.raises(ValueError, match="batch sizes must match"):
        knn(torch.rand(3, 10, 3), p)
    with pytest.raises(TypeError, match="dtype"):
        knn(q.double(), p)
    with pytest.raises(TypeError, match="floating-point"):
        knn(q.long(), p.long())
    with pytest.raises(ValueError, match="query_lengths"):
        knn(q, p, query_lengths=torch.tensor([11, 3]))
    with pytest.raises(ValueError, match="NaN"):
        knn(q, p.masked_fill(torch.rand(2, 5, 3) > 0.5, float("nan")))


def test_warm_start_queries_equal_cold_queries_as_the_query_moves():
    # an ICP-like sequence: small moves (certified from the previous answer), then a jump far
    # away (the certificate fails and the grid answers), with padding on both sides
    g = torch.Generator().manual_seed(7)
    pts = torch.rand(3, 400, 3, generator=g, dtype=torch.float64)
    plen = torch.tensor([400, 250, 17])
    q = torch.rand(3, 300, 3, generator=g, dtype=torch.float64)
    qlen = torch.tensor([300, 120, 299])
    warm = NearestNeighborIndex(pts, plen, backend="grid", warm_start=True, warm_neighbors=8)
    cold = NearestNeighborIndex(pts, plen, backend="tree")
    fractions = []
    for step in range(6):
        move = 0.01 * torch.randn(q.shape, generator=g, dtype=torch.float64)
        q = q + (move if step != 3 else 5.0)  # step 3 jumps far: nothing is certified
        a, b = warm.query(q, qlen), cold.query(q, qlen)
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.sq_distances, b.sq_distances, rtol=0, atol=0)
        fractions.append(warm.certified_fraction)
    assert fractions[0] is None  # the first query has no previous answer: the grid answers
    assert fractions[3] == 0.0  # after the jump nothing is certified: every query went to the grid
    assert any(0.0 < f < 1.0 for f in fractions[1:3])  # both paths exercised on small moves
    # the fallback to the grid search is exercised at every step
    assert all(f < 1.0 for f in fractions[1:])
