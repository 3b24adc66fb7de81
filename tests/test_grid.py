"""The voxel-grid backend (``backend="grid"``, :mod:`diffcp.search.grid`) against brute force.

Hard geometry (planes, lines, duplicates, one point, mixed scales, far queries, queries on cell
faces), padding, the warm start of :class:`NearestNeighborIndex`, agreement with the other
backends, bad input and the fallback without numba. The reference is ``naive_knn`` of
``test_search.py`` (float64 coordinate differences, one cloud at a time).
"""

import math

import numpy as np
import pytest
import torch

from diffcp.search import MATMUL_CPU_MAX, NearestNeighborIndex, knn
from diffcp.search import grid as grid_module
from diffcp.search.grid import BatchGrid
from test_search import naive_knn

KS = [1, 4, 17]
DTYPES = [torch.float32, torch.float64]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_cloud(shape, g, m, dtype=torch.float64):
    """``(m, 3)`` points of a given (possibly degenerate) shape, roughly inside the unit cube."""
    if shape == "volume":
        return torch.rand(m, 3, generator=g, dtype=dtype)
    if shape == "gaussian":
        return 0.3 * torch.randn(m, 3, generator=g, dtype=dtype) + 0.5
    if shape == "plane":  # z constant
        p = torch.rand(m, 3, generator=g, dtype=dtype)
        p[:, 2] = 0.25
        return p
    if shape == "slanted_plane":
        uv = torch.rand(m, 2, generator=g, dtype=dtype)
        a = torch.tensor([1.0, 1.0, 0.0], dtype=dtype) / math.sqrt(2)
        b = torch.tensor([0.0, 0.6, 0.8], dtype=dtype)
        return uv[:, :1] * a + uv[:, 1:] * b
    if shape == "axis_line":  # y and z constant
        p = torch.zeros(m, 3, dtype=dtype)
        p[:, 0] = torch.rand(m, generator=g, dtype=dtype)
        p[:, 1], p[:, 2] = 0.3, -0.2
        return p
    if shape == "diagonal_line":
        t = torch.rand(m, 1, generator=g, dtype=dtype)
        return t * torch.tensor([1.0, 2.0, -3.0], dtype=dtype) / 3 + 0.1
    raise ValueError(shape)


def assert_exact(res, query, points, query_lengths=None, points_lengths=None, k=1, ties=False):
    """``res`` (a KNN) is the exact k-NN of ``query`` in ``points``, cloud by cloud.

    Squared distances are compared in float64 (recomputed from the returned indices) against
    brute force; indices too unless ``ties`` (then only the distances, as exact ties may be
    broken either way). Indices must be valid and distinct; padded query rows get 0 and 0.
    """
    B, N, _ = query.shape
    M = points.shape[1]
    ql = [N] * B if query_lengths is None else [int(x) for x in query_lengths]
    pl = [M] * B if points_lengths is None else [int(x) for x in points_lengths]
    assert res.indices.shape == (B, N, k) and res.indices.dtype == torch.int64
    assert res.sq_distances.shape == (B, N, k) and res.sq_distances.dtype == query.dtype
    rtol = 1e-5 if query.dtype == torch.float32 else 1e-12
    for b in range(B):
        n, m = ql[b], pl[b]
        idx = res.indices[b, :n]
        assert ((idx >= 0) & (idx < m)).all(), f"cloud {b}: index outside the valid points"
        if k > 1:
            s = idx.sort(-1).values
            assert (s[:, 1:] != s[:, :-1]).all(), f"cloud {b}: a point returned twice in one row"
        ref_d, ref_i = naive_knn(query[b : b + 1, :n], points[b : b + 1, :m], k)
        got_d = ((query[b, :n, None, :].double() - points[b].double()[idx]) ** 2).sum(-1)
        torch.testing.assert_close(got_d, ref_d[0], rtol=1e-12, atol=0, msg=lambda s: f"cloud {b}: {s}")
        if not ties:
            assert torch.equal(idx, ref_i[0]), f"cloud {b}: indices differ from brute force"
        torch.testing.assert_close(res.sq_distances[b, :n].double(), ref_d[0], rtol=rtol, atol=0)
        assert (res.indices[b, n:] == 0).all() and (res.sq_distances[b, n:] == 0).all()
        assert torch.isfinite(res.sq_distances[b]).all()


# ------------------------------------------------------------------------------------------------
# 1. exactness on volumes and degenerate shapes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_random_volumes_exact(k, dtype):
    g = gen(10 + k)
    p = torch.stack([make_cloud("volume", g, 700, dtype), make_cloud("gaussian", g, 700, dtype)]) * 3 - 1
    q = torch.rand(2, 400, 3, generator=g, dtype=dtype) * 4 - 1.5  # inside and around the clouds
    res = knn(q, p, k=k, backend="grid")
    assert_exact(res, q, p, k=k)


@pytest.mark.parametrize("shape", ["plane", "slanted_plane", "axis_line", "diagonal_line"])
@pytest.mark.parametrize("k", KS)
def test_planes_and_lines_exact(shape, k):
    g = gen(20 + k)
    p = torch.stack([make_cloud(shape, g, 600) for _ in range(2)])
    q = torch.cat(
        [
            torch.rand(2, 200, 3, generator=g, dtype=torch.float64) * 1.6 - 0.3,  # around the cloud
            p[:, :100] + 1e-3 * torch.randn(2, 100, 3, generator=g, dtype=torch.float64),  # on it
        ],
        dim=1,
    )
    res = knn(q, p, k=k, backend="grid")
    assert_exact(res, q, p, k=k)


@pytest.mark.parametrize("k", KS)
def test_duplicated_points(k):
    g = gen(30 + k)
    # cloud 0: 40 distinct points, each repeated 15 times (ties everywhere); cloud 1: 580 copies
    # of one point plus 20 others; cloud 2: one point repeated 600 times (zero extent)
    base = torch.rand(40, 3, generator=g, dtype=torch.float64)
    c0 = base.repeat(15, 1)[torch.randperm(600, generator=g)]
    c1 = torch.cat([torch.full((580, 3), 0.5, dtype=torch.float64), torch.rand(20, 3, generator=g, dtype=torch.float64)])
    c1 = c1[torch.randperm(600, generator=g)]
    c2 = torch.full((600, 3), 0.25, dtype=torch.float64)
    p = torch.stack([c0, c1, c2])
    q = torch.cat([torch.rand(3, 150, 3, generator=g, dtype=torch.float64) * 1.4 - 0.2, p[:, :50]], dim=1)
    res = knn(q, p, k=k, backend="grid")
    assert_exact(res, q, p, k=k, ties=True)


def test_single_point_cloud():
    g = gen(40)
    p = torch.tensor([[[0.3, -0.2, 7.0]]], dtype=torch.float64)
    q = torch.cat([torch.randn(1, 50, 3, generator=g, dtype=torch.float64) * 1e3, p], dim=1)
    res = knn(q, p, k=1, backend="grid")
    assert_exact(res, q, p, k=1)
    assert (res.indices == 0).all() and res.sq_distances[0, -1, 0] == 0
    # in a padded batch with a larger cloud
    P = torch.zeros(2, 30, 3, dtype=torch.float64)
    P[0, 0] = p[0, 0]
    P[0, 1:] = 0.31  # padding right next to the queries
    P[1] = torch.rand(30, 3, generator=g, dtype=torch.float64)
    Q = torch.rand(2, 40, 3, generator=g, dtype=torch.float64)
    res = knn(Q, P, points_lengths=torch.tensor([1, 30]), k=1, backend="grid")
    assert_exact(res, Q, P, points_lengths=[1, 30], k=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_very_different_scales_in_one_batch(k, dtype):
    g = gen(50 + k)
    scales = torch.tensor([1e-3, 1e3, 1.0], dtype=dtype)[:, None, None]
    offsets = torch.tensor([[0.0, 0.0, 0.0], [2e3, -5e3, 1e3], [0.5, 0.5, 0.5]], dtype=dtype)[:, None, :]
    p = torch.rand(3, 500, 3, generator=g, dtype=dtype) * scales + offsets
    q = (torch.rand(3, 300, 3, generator=g, dtype=dtype) * 1.5 - 0.25) * scales + offsets
    res = knn(q, p, k=k, backend="grid")
    assert_exact(res, q, p, k=k)


# ------------------------------------------------------------------------------------------------
# 2. far queries, queries on cell faces and at data points


@pytest.mark.parametrize("shape", ["volume", "plane", "axis_line", "diagonal_line"])
@pytest.mark.parametrize("k", KS)
def test_queries_far_outside_the_bounding_box(shape, k):
    g = gen(60 + k)
    p = torch.stack([make_cloud(shape, g, 400), make_cloud(shape, g, 400) * 1e-2 + 3])
    size = torch.tensor([1.0, 1e-2], dtype=torch.float64)[:, None, None]
    centre = p.mean(1, keepdim=True)
    # directions: random, along the axes and along the diagonals, at 100 and 1000 cloud sizes
    axes = torch.cat([torch.eye(3), -torch.eye(3), torch.tensor([[1.0, 1, 1], [-1, 1, -1]]) / math.sqrt(3)]).double()
    rand = torch.randn(2, 40, 3, generator=g, dtype=torch.float64)
    dirs = torch.cat([rand / rand.norm(dim=-1, keepdim=True), axes.expand(2, -1, -1)], dim=1)
    dist = torch.tensor([100.0, 1000.0], dtype=torch.float64).repeat_interleave(dirs.shape[1] // 2 + 1)
    dist = dist[: dirs.shape[1]][None, :, None]
    q = centre + dirs * dist * size
    near = torch.rand(2, 20, 3, generator=g, dtype=torch.float64) * size + centre - size / 2
    q = torch.cat([q, near], dim=1)  # far and near queries in one batch
    res = knn(q, p, k=k, backend="grid")
    assert_exact(res, q, p, k=k)


def _grid_params(points, lengths):
    origin, edge, dims = BatchGrid(points, lengths)._grid[:3]
    return origin.copy(), edge.copy(), dims.copy()


@pytest.mark.parametrize("k", KS)
def test_points_and_queries_exactly_on_cell_faces(k):
    g = gen(70 + k)
    B, M = 2, 500
    p = torch.stack([make_cloud("volume", g, M), make_cloud("plane", g, M)])
    lengths = torch.tensor([M, M])
    origin, edge, dims = _grid_params(p, lengths)
    # snap most points down onto cell corners, faces and edges (keeping every axis' extreme
    # points, so the grid does not change), then query at the snapped points, at cell corners
    # and at points of cell faces
    o = torch.from_numpy(origin)[:, None, :]
    h = torch.from_numpy(edge)[:, None, None]
    cells = torch.floor((p - o) / h)
    on_grid = o + cells * h
    which = torch.rand(B, M, 3, generator=g) < 0.7  # snap each coordinate with probability 0.7
    snapped = torch.where(which, on_grid, p)
    for b in range(B):
        for d in range(3):
            for i in (p[b, :, d].argmin(), p[b, :, d].argmax()):
                snapped[b, i] = p[b, i]
    origin2, edge2, dims2 = _grid_params(snapped, lengths)
    assert np.array_equal(origin2, origin) and np.array_equal(edge2, edge) and np.array_equal(dims2, dims)
    n = torch.from_numpy(dims)[:, None, :].double()
    corners = o + torch.floor(torch.rand(B, 150, 3, generator=g, dtype=torch.float64) * (n + 1)) * h
    faces = corners.clone()
    faces[..., 0] += torch.rand(B, 150, generator=g, dtype=torch.float64) * h[..., 0]
    q = torch.cat([snapped[:, :100], corners, faces, o + n * h], dim=1)
    res = knn(q, snapped, k=k, backend="grid")
    assert_exact(res, q, snapped, k=k, ties=True)
    # queries exactly at distinct data points find them at distance 0
    res = knn(p[:, :100], p, k=k, backend="grid")
    assert (res.indices[..., 0] == torch.arange(100)).all() and (res.sq_distances[..., 0] == 0).all()
    assert_exact(res, p[:, :100], p, k=k)


def test_far_from_the_origin_query_next_to_a_cell_face(monkeypatch):
    # Georeferenced clouds (UTM: coordinates ~5e6 m, spacing ~5 cm) have a grid origin o much
    # larger than the cell edge h, so a cell face o + i*h computed in float64 is off by up to
    # half an ulp of o (~5e-10 m here), far more than the search's rounding margin (~1e-9 h,
    # ~5e-11 m). Here the true nearest point X (cell c-1) lies just below the face between cells
    # c-1 and c, the query q is in cell c, and a point A of cell c is farther than X by ~1e-10 m
    # (squared distances differ by ~2e-8 relative, far above float64 rounding): the gap from q
    # to slab c-1, computed as (q - fl(o + (c-1) h)) - h, must not exceed |q - X| and skip X.
    monkeypatch.setattr(grid_module, "_CELL_SCALE", 1.0)  # the construction below assumes h = extent / m
    o = 5_000_000.0
    u = float(np.spacing(o))
    m = 100
    # extent = K ulps with K = 70 mod 100, so that h / u = K / m has fractional part 0.7
    K = int(5.0 / u) // 100 * 100 + 70
    hi = o + K * u
    fill = [o + f * (hi - o) for f in np.linspace(0.0, 0.25, 49)] + [o + f * (hi - o) for f in np.linspace(0.75, 1.0, 49)]
    assert fill[0] == o and fill[-1] == hi
    points = torch.zeros(1, m, 3, dtype=torch.float64)
    points[0, 2:, 0] = torch.tensor(fill, dtype=torch.float64)
    points[0, :2, 0] = o + 2.5  # placeholders for X and A (same extent, same count)
    origin, edge, dims = _grid_params(points, torch.tensor([m]))
    h = float(edge[0])
    assert origin[0, 0] == o and h == (hi - o) / m

    def cell(x):
        return int((x - o) / h)

    # the face c (between cells c-1 and c) where the computed slab bound o + (c-1) h + h most
    # overestimates the distance to the last float64 value X of cell c-1
    best = None
    for c in range(30, 70):
        x = o + c * h
        while cell(x) >= c:
            x = float(np.nextafter(x, -np.inf))
        while cell(float(np.nextafter(x, np.inf))) < c:
            x = float(np.nextafter(x, np.inf))
        q = x + h / 3
        over = ((q - (o + (c - 1) * h)) - h) - (q - x)  # computed slab gap minus true distance
        if best is None or over > best[0]:
            best = (over, c, x, q)
    over, c, X, q = best
    assert over > 0.25 * u  # the construction works (a property of float64 rounding, not of diffcp)
    dx = q - X
    eta = math.sqrt(over * dx)  # A at distance sqrt(dx^2 + eta^2): farther than X by ~over / 2
    assert cell(X) == c - 1 and cell(q) == c and cell(q + dx) == c
    points[0, 0] = torch.tensor([X, 0.0, 0.0], dtype=torch.float64)
    points[0, 1] = torch.tensor([q + dx, eta, 0.0], dtype=torch.float64)
    assert np.array_equal(_grid_params(points, torch.tensor([m]))[1], edge)  # same grid
    query = torch.tensor([[[q, 0.0, 0.0]]], dtype=torch.float64)
    ref_d, ref_i = naive_knn(query, points, 2)
    assert ref_i[0, 0].tolist() == [0, 1] and ref_d[0, 0, 0] < ref_d[0, 0, 1]  # X strictly nearest
    for backend in ("tree", "matmul", "grid"):
        res = knn(query, points, k=1, backend=backend)
        assert res.indices.item() == 0, f"backend={backend} returned point {res.indices.item()}, not X"


# ------------------------------------------------------------------------------------------------
# 3. padding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_padding_is_ignored(k, dtype):
    g = gen(80 + k)
    lq, lp = [120, 9, 200, 1], [300, 17, 60, 250]
    B, N, M = 4, 200, 300
    Q = torch.zeros(B, N, 3, dtype=dtype)
    P = torch.zeros(B, M, 3, dtype=dtype)
    for b in range(B):
        Q[b, : lq[b]] = torch.rand(lq[b], 3, generator=g, dtype=dtype)
        P[b, : lp[b]] = torch.rand(lp[b], 3, generator=g, dtype=dtype) * 2 - 0.5
        # padding of the points: copies of the queries, which would be the nearest if not ignored
        P[b, lp[b]:] = Q[b, torch.arange(M - lp[b]) % lq[b]]
        Q[b, lq[b]:] = P[b, 0]  # padded queries at a data point
    ql, pl = torch.tensor(lq), torch.tensor(lp)
    res = knn(Q, P, ql, pl, k=k, backend="grid")
    assert_exact(res, Q, P, lq, lp, k=k)
    for b in range(B):  # a padded cloud answers like the same cloud unpadded
        one = knn(Q[b, : lq[b]], P[b, : lp[b]], k=k, backend="grid")
        assert torch.equal(res.indices[b, : lq[b]], one.indices)
    # huge finite padding (points and queries) must not overflow into NaN, nor be returned
    big = 3e37 if dtype == torch.float32 else 1e300
    P_far, Q_far = P.clone(), Q.clone()
    for b in range(B):
        P_far[b, lp[b]:] = big
        Q_far[b, lq[b]:] = -big
    far = knn(Q_far, P_far, ql, pl, k=k, backend="grid")
    assert torch.equal(far.indices, res.indices)
    assert torch.equal(far.sq_distances, res.sq_distances)
    assert_exact(far, Q_far, P_far, lq, lp, k=k)


# ------------------------------------------------------------------------------------------------
# 4. warm start


def _small_rigid_move(q, g, angle, shift):
    """Rotate ``q (B, N, 3)`` by ``angle`` about a random axis through its centroid and shift it."""
    x, y, z = (torch.randn(3, generator=g, dtype=torch.float64) / 3**0.5).tolist()
    n = math.sqrt(x * x + y * y + z * z)
    K = torch.tensor([[0, -z, y], [z, 0, -x], [-y, x, 0]], dtype=q.dtype) / n
    R = torch.eye(3, dtype=q.dtype) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K
    c = q.mean(1, keepdim=True)
    t = shift * torch.randn(3, generator=g, dtype=q.dtype)
    return (q - c) @ R.T + c + t


@pytest.mark.parametrize("shape", ["volume", "slanted_plane"])
def test_warm_start_equals_a_cold_tree_over_an_icp_sequence(shape):
    g = gen(90)
    B, M, N = 3, 800, 600
    pts = torch.stack([make_cloud(shape, g, M) for _ in range(B)])
    plen = torch.tensor([800, 500, 40])
    pts[1, 500:] = 0.5  # padding in the middle of the cloud
    q = pts[:, :N] + 0.02 * torch.randn(B, N, 3, generator=g, dtype=torch.float64)
    qlen = torch.tensor([600, 333, 600])
    q[1, 333:] = 1e6  # padded queries
    warm = NearestNeighborIndex(pts, plen, backend="grid", warm_start=True)
    cold = NearestNeighborIndex(pts, plen, backend="tree")
    assert warm.certified_fraction is None
    # (kind, rotation angle, shift): ICP-like small moves, a big jump, small moves again
    # (the jump moves every query 5 cloud sizes away, the next step brings them back)
    steps = [("small", 0.02, 0.01)] * 3 + [("tiny", 1e-4, 1e-5)] * 2 + [("jump", 0.0, 5.0), ("back", 0.0, -5.0)]
    steps += [("small", 0.02, 0.01), ("tiny", 1e-4, 1e-5), ("tiny", 1e-4, 1e-5)]
    for step, (kind, angle, shift) in enumerate(steps):
        if kind in ("jump", "back"):
            q = q + shift
        elif step > 0:
            q = _small_rigid_move(q, g, angle, shift)
        a, b = warm.query(q, qlen), cold.query(q, qlen)
        assert torch.equal(a.indices, b.indices), f"step {step} ({kind}): indices differ"
        torch.testing.assert_close(a.sq_distances, b.sq_distances, rtol=0, atol=0)
        if kind in ("jump", "back") or step in (0, len(steps) - 1):
            assert_exact(a, q, pts, qlen, plen, k=1)  # the tree itself against brute force
        f = warm.certified_fraction
        if step == 0:
            assert f is None, "the first query has no previous answer to warm start from"
            continue
        assert f is not None and 0.0 <= f <= 1.0
        if kind == "jump":
            assert f == 0.0, f"after a big jump nothing can be certified, got {f}"
        if kind == "tiny":
            assert f > 0.5, f"step {step}: tiny moves should certify most queries, got {f}"
        # k > 1 on the warm index: no warm start, still exact, and the warm state survives
        a4, b4 = warm.query(q, qlen, k=4), cold.query(q, qlen, k=4)
        assert torch.equal(a4.indices, b4.indices), f"step {step} ({kind}): k=4 indices differ"
        torch.testing.assert_close(a4.sq_distances, b4.sq_distances, rtol=0, atol=0)


def test_warm_start_with_ties_and_changing_query_sizes():
    # duplicated target points (ties: compare distances) and queries whose size changes
    g = gen(91)
    base = torch.rand(2, 150, 3, generator=g, dtype=torch.float64)
    pts = base.repeat(1, 4, 1)  # every point 4 times
    warm = NearestNeighborIndex(pts, backend="grid", warm_start=True, warm_neighbors=2)
    q = torch.rand(2, 300, 3, generator=g, dtype=torch.float64)
    for step in range(5):
        if step == 3:
            q = q[:, :170]  # a different query size: a cold query
        q = q + 1e-3 * torch.randn(q.shape, generator=g, dtype=torch.float64)
        res = warm.query(q)
        assert_exact(res, q, pts, k=1, ties=True)
        if step > 0 and step != 3:
            assert 0.0 <= warm.certified_fraction <= 1.0


def test_warm_start_unbatched_and_float32():
    g = gen(92)
    p = torch.rand(1000, 3, generator=g)
    q = torch.rand(700, 3, generator=g)
    warm = NearestNeighborIndex(p, backend="grid", warm_start=True)
    for _ in range(4):
        q = q + 1e-3 * torch.randn(q.shape, generator=g)
        res = warm.query(q)
        assert res.indices.shape == (700, 1) and res.sq_distances.dtype == torch.float32
        assert_exact(type(res)(res.sq_distances[None], res.indices[None]), q[None], p[None], k=1)
    assert warm.certified_fraction > 0.5


# ------------------------------------------------------------------------------------------------
# 5. agreement with the other backends


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 8])
def test_grid_agrees_with_tree_and_matmul(k, dtype):
    g = gen(100 + k)
    B, N, M = 3, 500, 700
    p = torch.randn(B, M, 3, generator=g, dtype=dtype) * torch.tensor([3.0, 1.0, 0.1], dtype=dtype) + 10
    q = torch.randn(B, N, 3, generator=g, dtype=dtype) * 2 + 10
    ql, pl = torch.tensor([500, 77, 311]), torch.tensor([700, 650, 8 if k == 8 else 1])
    results = {backend: knn(q, p, ql, pl, k=k, backend=backend) for backend in ("grid", "tree", "matmul")}
    for backend in ("tree", "matmul"):
        assert torch.equal(results["grid"].indices, results[backend].indices), backend
        torch.testing.assert_close(results["grid"].sq_distances, results[backend].sq_distances, rtol=0, atol=0)
    assert_exact(results["grid"], q, p, ql, pl, k=k)


# ------------------------------------------------------------------------------------------------
# 6. bad input


def test_bad_input():
    p = torch.rand(2, 5, 3)
    index = NearestNeighborIndex(p, torch.tensor([5, 3]), backend="grid")
    with pytest.raises(ValueError, match=r"\bk\b"):
        index.query(torch.rand(2, 4, 3), k=4)
    with pytest.raises(ValueError, match=r"\bk\b"):
        knn(torch.rand(2, 4, 3), p, k=6, backend="grid")
    assert index.query(torch.rand(2, 4, 3), k=3).indices.shape == (2, 4, 3)  # k = 3 is fine
    for bad in (1, 0, True, False, 2.0, None):
        with pytest.raises(ValueError, match="warm_neighbors"):
            NearestNeighborIndex(p, backend="grid", warm_start=True, warm_neighbors=bad)


# ------------------------------------------------------------------------------------------------
# 7. without numba


def test_without_numba(monkeypatch):
    g = gen(110)
    B, N, M = 1, 1000, 1000
    assert B * N * M >= MATMUL_CPU_MAX
    p = torch.rand(B, M, 3, generator=g, dtype=torch.float64)
    q = torch.rand(B, N, 3, generator=g, dtype=torch.float64)
    # with numba, auto picks the grid on this size
    index = NearestNeighborIndex(p)
    index.query(q)
    assert index._grid is not None and index._tree is None
    monkeypatch.setattr(grid_module, "AVAILABLE", False)
    with pytest.raises(ImportError, match="numba"):
        NearestNeighborIndex(p, backend="grid")
    with pytest.raises(ImportError, match="numba"):
        knn(q, p, backend="grid")
    index = NearestNeighborIndex(p, backend="auto")
    res = index.query(q, k=2)
    assert index._tree is not None and index._grid is None
    assert_exact(res, q, p, k=2)
    # warm start is only a hint: without the grid it is ignored
    index = NearestNeighborIndex(p, warm_start=True)
    for _ in range(2):
        res = index.query(q)
        assert_exact(res, q, p, k=1)
    assert index._grid is None


def test_warm_start_certifies_clouds_smaller_than_the_neighbourhood():
    # every point of a 5-point cloud is in every neighbourhood: the guess is always certified
    g = torch.Generator().manual_seed(99)
    pts = torch.rand(2, 5, 3, generator=g, dtype=torch.float64)
    q = torch.rand(2, 40, 3, generator=g, dtype=torch.float64)
    index = NearestNeighborIndex(pts, backend="grid", warm_start=True)
    index.query(q)
    out = index.query(q + 0.01)
    assert index.certified_fraction == 1.0
    assert torch.equal(out.indices, naive_knn(q + 0.01, pts, 1)[1])


def test_starting_numbas_thread_pool_keeps_torchs_thread_count():
    """numba's OpenMP pool resets the runtime torch shares: a process pinned to one torch thread
    must stay on one after its first ICP call (in a fresh process, where the pool starts)."""
    import subprocess
    import sys

    code = ("import torch, diffcp; torch.set_num_threads(1); "
            "x = torch.randn(2, 128, 3, generator=torch.Generator().manual_seed(0)); "
            "diffcp.icp(x, x + 0.01, correspondence='soft_nn'); diffcp.icp(x, x + 0.01); "
            "print(torch.get_num_threads())")
    env = {k: v for k, v in __import__("os").environ.items() if k != "NUMBA_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "1"
