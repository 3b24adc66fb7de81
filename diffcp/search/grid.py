"""Exact nearest neighbours on the CPU: one uniform voxel grid per cloud, searched ring by ring.

Every cloud of a padded batch gets its own grid (cell edge ``h_b`` chosen from the cloud's extent
and size, so that a cloud of ``M`` points has at most about ``7 M`` cells whether it is a volume, a
surface or a line); the valid points of all clouds are sorted by cell into one array (a counting
sort, O(total points)). A query of cloud ``b`` is clamped into its cloud's grid box and the cells
around it are scanned in rings of growing Chebyshev radius ``r = 0, 1, 2, ...``. After ring ``r``
every unscanned point ``x`` satisfies

    |q - x|^2 >= D^2 + (r h_b + delta)^2,

where ``D`` is the distance from ``q`` to the grid box and ``delta`` the distance from the clamped
query to the nearest face of its own cell that has cells beyond it. So the search stops, exactly,
as soon as the ``k``-th best squared distance found is at most that bound. Distances are computed
in float64 and the bound carries a relative margin of ``1e-9`` cell edges against rounding.

ICP's queries move little between iterations: :func:`_fused_point_to_point` certifies the previous
answer from a precomputed neighbourhood, or keeps it unsearched when the query moved less than half
its certified gap to the second-nearest point, before it falls back to the grid.

The same scan also collects *certified soft candidates* (:func:`soft_candidates`): the nearest
points kept in ``k`` slots until the softmax weight of every point not kept is provably below a
tolerance (see :mod:`diffcp.search.soft`).

The kernels are compiled by numba (``cache=True``: the first call in a fresh environment compiles
for a few seconds, later processes load the cache) and run in parallel over query rows with
numba's threads (``numba.set_num_threads`` / ``NUMBA_NUM_THREADS``). Without numba
:data:`AVAILABLE` is False and :func:`diffcp.search.knn` falls back to SciPy's kd-tree.

Functions here take already validated ``(B, N, 3)`` tensors; the public entry points are
:func:`diffcp.search.knn`, :class:`diffcp.search.NearestNeighborIndex` and
:func:`diffcp.search.soft_nearest`.
"""

from __future__ import annotations

import math
import warnings
import weakref

import numpy as np
import torch
from torch import Tensor

try:  # numba is a dependency of diffcp; without it the tree backend serves the CPU
    import numba
except ImportError:  # pragma: no cover - exercised by monkeypatching AVAILABLE in the tests
    numba = None

__all__ = ["AVAILABLE", "BatchGrid"]

AVAILABLE = numba is not None

# Every bound that decides what may be skipped is loosened by a slack: _MARGIN cell edges, plus
# _ULPS units in the last place of the largest coordinate involved (the faces o + i h, and the
# differences p - q, are rounded at that scale: clouds far from the origin need it).
_MARGIN = 1e-9
_ULPS = 8 * 2.0 ** -52

# Cell edge in units of the "one point per cell" edge.
_CELL_SCALE = 1.5


def _njit(parallel: bool = False, inline: str = "never"):
    if numba is None:  # pragma: no cover
        return lambda f: f
    return numba.njit(cache=True, nogil=True, fastmath=False, parallel=parallel, inline=inline)


@_njit()
def _build(points, starts, scale):
    """Grids of the clouds ``points[starts[b]:starts[b+1]]`` (float64 ``(P, 3)``, every cloud non-empty)."""
    B = starts.shape[0] - 1
    P = points.shape[0]
    origin = np.empty((B, 3))
    edge = np.empty(B)
    dims = np.empty((B, 3), dtype=np.int64)
    cell_offset = np.zeros(B + 1, dtype=np.int64)
    for b in range(B):
        s, e = starts[b], starts[b + 1]
        m = e - s
        lo = points[s].copy()
        hi = points[s].copy()
        for i in range(s + 1, e):
            for d in range(3):
                lo[d] = min(lo[d], points[i, d])
                hi[d] = max(hi[d], points[i, d])
        ext = np.sort(hi - lo)[::-1]  # descending
        # about one cell per point for a volume, a surface or a line, whichever the cloud is
        h = max((ext[0] * ext[1] * ext[2] / m) ** (1.0 / 3.0), math.sqrt(ext[0] * ext[1] / m), ext[0] / m)
        h *= scale
        if not h > 0.0:  # every point identical
            h = 1.0
        edge[b] = h
        cells = 1
        for d in range(3):
            origin[b, d] = lo[d]
            dims[b, d] = int((hi[d] - lo[d]) / h) + 1
            cells *= dims[b, d]
        cell_offset[b + 1] = cell_offset[b] + cells
    total = cell_offset[B]
    cell_start = np.zeros(total + 1, dtype=np.int64)
    cell_of = np.empty(P, dtype=np.int64)
    for b in range(B):
        n0, n1, n2 = dims[b, 0], dims[b, 1], dims[b, 2]
        for i in range(starts[b], starts[b + 1]):
            c0 = min(int((points[i, 0] - origin[b, 0]) / edge[b]), n0 - 1)
            c1 = min(int((points[i, 1] - origin[b, 1]) / edge[b]), n1 - 1)
            c2 = min(int((points[i, 2] - origin[b, 2]) / edge[b]), n2 - 1)
            c = cell_offset[b] + (c0 * n1 + c1) * n2 + c2
            cell_of[i] = c
            cell_start[c + 1] += 1
    for c in range(total):
        cell_start[c + 1] += cell_start[c]
    fill = cell_start[:-1].copy()
    order = np.empty(P, dtype=np.int64)
    for i in range(P):
        c = cell_of[i]
        order[fill[c]] = i
        fill[c] += 1
    sorted_points = np.empty((P, 3))
    local = np.empty(P, dtype=np.int64)
    for b in range(B):  # sorted slots of cloud b: its cells' ranges, contiguous
        for j in range(cell_start[cell_offset[b]], cell_start[cell_offset[b + 1]]):
            i = order[j]
            sorted_points[j] = points[i]
            local[j] = i - starts[b]
    return origin, edge, dims, cell_offset, cell_start, sorted_points, local


@_njit(inline="always")
def _grow(r2, slack):
    """A squared radius widened by the rounding slack."""
    r = math.sqrt(r2) + slack
    return r * r


@_njit(inline="always")
def _gap2(x, lo, h, slack):
    """Squared distance from coordinate ``x`` to the slab ``[lo, lo + h]``, less the slack."""
    g = lo - x if x < lo else (x - lo - h if x > lo + h else 0.0)
    g -= slack
    return g * g if g > 0.0 else 0.0


# Query rows per parallel task.
_CHUNK = 256

# Empty arrays standing for "no warm start", "hard search" (no temperature) and "no graph".
_NO_WARM_I = np.zeros((0, 0), dtype=np.int64)
_NO_WARM_D = np.zeros((0, 0))
_NO_TEMPERATURE = np.zeros(0)
_NO_GRAPH = np.zeros((0, 0, 0), dtype=np.int64)
_NO_WARM_D3 = np.zeros((0, 0, 3))


@_njit()
def _search_rows(rows, queries, query_lengths, point_lengths, origin, edge, dims, cell_offset, cell_start,
                 pts, local, k, temperature, log_tol, warm_i, warm_d, idx, counts, certified):
    """Search the query rows ``rows`` (flat ``b * N + n``) of ``queries (B, N, 3)``; writes
    ``idx (B, N, k)``, ``counts (B, N)``, ``certified (B, N)``.

    Hard mode (``temperature`` empty): the ``k`` nearest points, nearest first. Soft mode
    (``temperature (B,)``): every point with ``d^2 < d_1^2 + spread`` is a candidate, with
    ``spread = T_b (log M_b - log_tol)``; the ``k`` nearest candidates are kept and the row is
    certified unless candidates that did not fit weigh too much. ``warm_i`` (empty, or ``(B, N)``
    guesses with squared distances ``warm_d``) seeds the search: it only prunes sooner.

    Cells are scanned in rings of growing Chebyshev radius ``r`` around the query's clamped cell.
    Before ring ``r >= 1`` every unscanned point is at squared distance
    ``>= D^2 + ((r - 1) h + delta)^2`` (``D``: distance to the grid box; ``delta``: from the clamped
    query to the nearest face of its cell that has cells beyond it), so the scan stops once that
    exceeds the search radius; inside a ring, slabs and cells farther than the radius are skipped.
    One function, no calls that pass arrays: the hot loop does no reference counting.
    """
    N = queries.shape[1]
    soft = temperature.shape[0] > 0
    has_warm = warm_i.shape[0] > 0
    best_d = np.empty(k)
    best_i = np.zeros(k, dtype=np.int64)
    for row in rows:
        b = row // N
        n = row - b * N
        if n >= query_lengths[b]:
            continue
        q0, q1, q2 = queries[b, n, 0], queries[b, n, 1], queries[b, n, 2]
        length = point_lengths[b]
        t = temperature[b] if soft else 0.0
        spread = max(t * (math.log(length) - log_tol), 0.0) if soft else 0.0
        kk = 1 if soft else min(k, length)
        h = edge[b]
        n0, n1, n2 = dims[b, 0], dims[b, 1], dims[b, 2]
        o0, o1, o2 = origin[b, 0], origin[b, 1], origin[b, 2]
        p0 = min(max(q0, o0), o0 + n0 * h)
        p1 = min(max(q1, o1), o1 + n1 * h)
        p2 = min(max(q2, o2), o2 + n2 * h)
        D2 = (q0 - p0) ** 2 + (q1 - p1) ** 2 + (q2 - p2) ** 2
        c0 = min(int((p0 - o0) / h), n0 - 1)
        c1 = min(int((p1 - o1) / h), n1 - 1)
        c2 = min(int((p2 - o2) / h), n2 - 1)
        delta = np.inf
        if c0 > 0:
            delta = min(delta, p0 - (o0 + c0 * h))
        if c0 < n0 - 1:
            delta = min(delta, o0 + (c0 + 1) * h - p0)
        if c1 > 0:
            delta = min(delta, p1 - (o1 + c1 * h))
        if c1 < n1 - 1:
            delta = min(delta, o1 + (c1 + 1) * h - p1)
        if c2 > 0:
            delta = min(delta, p2 - (o2 + c2 * h))
        if c2 < n2 - 1:
            delta = min(delta, o2 + (c2 + 1) * h - p2)
        delta = max(delta, 0.0)
        big = max(max(abs(q0), abs(q1)), abs(q2))
        big = max(big, max(max(abs(o0), abs(o1)), abs(o2)) + max(max(n0, n1), n2) * h)
        slack = _MARGIN * h + _ULPS * big
        rmax = max(max(c0, n0 - 1 - c0), max(max(c1, n1 - 1 - c1), max(c2, n2 - 1 - c2)))
        base = cell_offset[b]
        count = 0
        evicted = np.inf
        rad2 = np.inf
        seed = -1
        if has_warm:
            seed = warm_i[b, n]
            best_d[0] = warm_d[b, n]
            best_i[0] = seed
            count = 1
            rad2 = _grow(best_d[0] + spread if soft else best_d[0], slack)
        for r in range(rmax + 1):
            if r > 0 and rad2 < np.inf:
                reach = (r - 1) * h + delta - slack
                if reach > 0 and D2 + reach * reach > rad2:
                    break
            for i in range(max(c0 - r, 0), min(c0 + r, n0 - 1) + 1):
                g0 = _gap2(q0, o0 + i * h, h, slack)
                if g0 > rad2:
                    continue
                fi = abs(i - c0) == r
                for j in range(max(c1 - r, 0), min(c1 + r, n1 - 1) + 1):
                    g1 = g0 + _gap2(q1, o1 + j * h, h, slack)
                    if g1 > rad2:
                        continue
                    step = 1 if (fi or abs(j - c1) == r or r == 0) else 2 * r
                    for l in range(c2 - r, c2 + r + 1, step):
                        if l < 0 or l >= n2:
                            continue
                        if g1 + _gap2(q2, o2 + l * h, h, slack) > rad2:
                            continue
                        c = base + (i * n1 + j) * n2 + l
                        for s in range(cell_start[c], cell_start[c + 1]):
                            d = (pts[s, 0] - q0) ** 2 + (pts[s, 1] - q1) ** 2 + (pts[s, 2] - q2) ** 2
                            if d >= rad2:
                                continue
                            m = local[s]
                            if m == seed:
                                continue  # the seed is in the list already
                            # insert (d, m) into the sorted k best
                            if count < k:
                                pos = count
                                count += 1
                            elif d < best_d[k - 1]:
                                evicted = min(evicted, best_d[k - 1])
                                pos = k - 1
                            else:
                                evicted = min(evicted, d)
                                continue
                            while pos > 0 and best_d[pos - 1] > d:
                                best_d[pos] = best_d[pos - 1]
                                best_i[pos] = best_i[pos - 1]
                                pos -= 1
                            best_d[pos] = d
                            best_i[pos] = m
                            # the search radius shrinks as closer points turn up
                            if soft:
                                rad2 = _grow(best_d[0] + spread, slack)
                            elif count >= kk:
                                rad2 = _grow(best_d[kk - 1], slack)
        if soft:
            # candidates kept before the radius was known may lie beyond it: drop them (each
            # weighs < tol / M_b relative to the nearest, like every point never kept)
            while count > 1 and best_d[count - 1] >= best_d[0] + spread:
                count -= 1
        for j in range(count):
            idx[b, n, j] = best_i[j]
        for j in range(count, k):
            idx[b, n, j] = best_i[0]
        counts[b, n] = count
        if soft and evicted < np.inf:
            # candidates within the radius did not fit: certified only if the dropped ones, all
            # at squared distance >= evicted, weigh little enough
            certified[b, n] = evicted - best_d[0] >= t * (math.log(length - count) - log_tol)


@_njit(parallel=True)
def _query(rows, queries, query_lengths, point_lengths, origin, edge, dims, cell_offset, cell_start, pts, local,
           k, temperature, log_tol, warm_i, warm_d, idx, counts, certified):
    """:func:`_search_rows` over the flat query ``rows``, in parallel chunks."""
    tasks = (rows.shape[0] + _CHUNK - 1) // _CHUNK
    for task in numba.prange(tasks):
        chunk = rows[task * _CHUNK: min(rows.shape[0], (task + 1) * _CHUNK)]
        _search_rows(chunk, queries, query_lengths, point_lengths, origin, edge, dims, cell_offset, cell_start,
                     pts, local, k, temperature, log_tol, warm_i, warm_d, idx, counts, certified)


@_njit(inline="always")
def _certify_one(q0, q1, q2, b, j, points, graph, radius):
    """Warm-start certificate of one query from the guess ``j`` (see :func:`_warm_certify`):
    returns ``(index, squared distance, certified, gap)``. When certified, ``gap`` is a lower
    bound, in distance units and less the rounding slack, of ``|q - p| - |q - p_index|`` over every
    other point ``p`` (0 otherwise): the query may move by less than half of it and keep its
    nearest neighbour."""
    K = graph.shape[2]
    dj = (points[b, j, 0] - q0) ** 2 + (points[b, j, 1] - q1) ** 2 + (points[b, j, 2] - q2) ** 2
    ok = False
    gap = 0.0
    for _ in range(3):
        bj = j
        bd = dj
        sd = np.inf  # second best of {j} and its neighbours
        for s in range(K):
            m = graph[b, j, s]
            if m == j:
                continue
            d = (points[b, m, 0] - q0) ** 2 + (points[b, m, 1] - q1) ** 2 + (points[b, m, 2] - q2) ** 2
            if d < bd:
                sd = bd
                bd = d
                bj = m
            elif d < sd:
                sd = d
        rj = radius[b, j]
        big = max(max(abs(q0), abs(q1)), abs(q2))
        big = max(big, max(max(abs(points[b, j, 0]), abs(points[b, j, 1])), abs(points[b, j, 2])))
        if rj == np.inf:  # the neighbourhood is the whole cloud
            ok = True
            slack = _ULPS * big
            gap = math.sqrt(sd) - math.sqrt(bd) - 3 * slack
        else:
            slack = _ULPS * (big + rj) + _MARGIN * rj
            ok = math.sqrt(bd) + math.sqrt(dj) + 3 * slack < rj
            # every point outside the neighbourhood is at least rj - |q - p_j| from q
            gap = min(math.sqrt(sd), rj - math.sqrt(dj)) - math.sqrt(bd) - 3 * slack
        moved = bj != j
        j = bj
        dj = bd
        if ok or not moved:
            break
    if not ok or not gap > 0.0:
        gap = 0.0
    return j, dj, ok, gap


@_njit(parallel=True)
def _warm_certify(queries, query_lengths, warm, points, graph, radius, best_j, best_d2, certified):
    """Nearest neighbours certified from a guess per query (ICP: the previous iteration's answer).

    For a guess ``j`` with ``d_j = |q - p_j|``, the best ``b`` of ``p_j`` and its precomputed
    neighbours (all points within ``radius[j]`` of ``p_j``) is exact if ``d_b + d_j < radius[j]``:
    any closer point lies within ``d_b + d_j`` of ``p_j``. Otherwise the guess moves to ``b`` and
    the test is repeated (up to 3 steps). Writes the best point so far, its squared distance and
    whether it is certified; uncertified rows go to the grid search, seeded with it.
    """
    B, N = queries.shape[0], queries.shape[1]
    rows = B * N
    tasks = (rows + _CHUNK - 1) // _CHUNK
    for task in numba.prange(tasks):
        for row in range(task * _CHUNK, min(rows, (task + 1) * _CHUNK)):
            b = row // N
            n = row - b * N
            if n >= query_lengths[b]:
                continue
            j, dj, ok, _ = _certify_one(queries[b, n, 0], queries[b, n, 1], queries[b, n, 2], b, warm[b, n],
                                        points, graph, radius)
            best_j[b, n, 0] = j
            best_d2[b, n] = dj
            certified[b, n] = ok


@_njit(inline="always")
def _match_chunk(b, start, stop, source, rotation, translation, query_lengths, point_lengths, warm, gaps, use_gaps,
                 points, graph, radius, origin, edge, dims, cell_offset, cell_start, pts, local, moved, idx, seed_i,
                 seed_d, scratch_counts, scratch_certified):
    """The matching half of a fused pass over the rows ``start:stop`` of cloud ``b`` (see
    :func:`_fused_point_to_point`): writes ``moved`` and ``idx``; returns ``(settled, kept)``."""
    N = source.shape[1]
    has_warm = warm.shape[0] > 0
    rest = np.empty(_CHUNK, dtype=np.int64)
    n_rest = 0
    hits = 0
    kept = 0
    for n in range(start, stop):
        y0 = (rotation[b, 0, 0] * source[b, n, 0] + rotation[b, 0, 1] * source[b, n, 1]
              + rotation[b, 0, 2] * source[b, n, 2] + translation[b, 0])
        y1 = (rotation[b, 1, 0] * source[b, n, 0] + rotation[b, 1, 1] * source[b, n, 1]
              + rotation[b, 1, 2] * source[b, n, 2] + translation[b, 1])
        y2 = (rotation[b, 2, 0] * source[b, n, 0] + rotation[b, 2, 1] * source[b, n, 1]
              + rotation[b, 2, 2] * source[b, n, 2] + translation[b, 2])
        if use_gaps:
            g = gaps[b, n]
            if g > 0.0:
                e0 = y0 - moved[b, n, 0]
                e1 = y1 - moved[b, n, 1]
                e2 = y2 - moved[b, n, 2]
                big = max(max(abs(y0), abs(y1)), abs(y2))
                g -= 2.0 * math.sqrt(e0 * e0 + e1 * e1 + e2 * e2) + 3 * _ULPS * big
                if g > 0.0:
                    gaps[b, n] = g
                    moved[b, n, 0] = y0
                    moved[b, n, 1] = y1
                    moved[b, n, 2] = y2
                    idx[b, n, 0] = warm[b, n]
                    hits += 1
                    kept += 1
                    continue
        moved[b, n, 0] = y0
        moved[b, n, 1] = y1
        moved[b, n, 2] = y2
        gaps[b, n] = 0.0
        if has_warm:
            j, dj, ok, gap = _certify_one(y0, y1, y2, b, warm[b, n], points, graph, radius)
            if ok:
                idx[b, n, 0] = j
                gaps[b, n] = gap
                hits += 1
                continue
            seed_i[b, n] = j
            seed_d[b, n] = dj
        rest[n_rest] = b * N + n
        n_rest += 1
    if n_rest > 0:
        if has_warm:
            _search_rows(rest[:n_rest], moved, query_lengths, point_lengths, origin, edge, dims, cell_offset,
                         cell_start, pts, local, 1, _NO_TEMPERATURE, 0.0, seed_i, seed_d, idx, scratch_counts,
                         scratch_certified)
        else:
            _search_rows(rest[:n_rest], moved, query_lengths, point_lengths, origin, edge, dims, cell_offset,
                         cell_start, pts, local, 1, _NO_TEMPERATURE, 0.0, _NO_WARM_I, _NO_WARM_D, idx,
                         scratch_counts, scratch_certified)
    return hits, kept


@_njit(parallel=True)
def _fused_point_to_point(source, rotation, translation, weights, query_lengths, point_lengths, clouds, warm, gaps,
                          use_gaps, points, graph, radius, origin, edge, dims, cell_offset, cell_start, pts, local,
                          source_ref, target_ref, moved, idx, seed_i, seed_d, scratch_counts, scratch_certified,
                          partial, certified_rows, kept_rows):
    """One hard-NN point-to-point ICP pass in one parallel region, chunk by chunk of the clouds
    listed in ``clouds`` (int64 indices; the tasks are spread evenly over the threads): move the source (``moved = R x + t``), find every exact nearest
    neighbour into ``idx`` and add the pairs to the chunk's weighted moments ``partial[b, chunk]``
    (``[sum w, sum w x', sum w q', sum w q' x'^T`` row-major, ``sum w |y - q|^2]``, 17 values,
    with ``x' = x - source_ref[b]`` and ``q' = q - target_ref[b]``).

    Nearest neighbours, cheapest first:

    1. *kept*: with ``use_gaps``, ``moved`` holds each query's previous position, ``warm`` its
       exact nearest neighbour there and ``gaps`` a lower bound of how much farther every other
       point was. A query that moved by ``delta`` with ``2 delta < gap`` keeps its neighbour (its
       distance grew by at most ``delta``, every other one shrank by at most ``delta``), and its
       gap shrinks by ``2 delta``;
    2. *certified* from ``warm`` and its precomputed neighbours (:func:`_certify_one`), which
       also gives a fresh gap;
    3. else the grid search (seeded by step 2), and the gap is 0.

    ``certified_rows[b, chunk]`` counts the rows settled by steps 1 and 2, ``kept_rows[b, chunk]``
    those of step 1. The answer never
    depends on ``warm``; only the time does.
    """
    B, N = source.shape[0], source.shape[1]
    chunks = (N + _CHUNK - 1) // _CHUNK
    for task in numba.prange(clouds.shape[0] * chunks):
        b = clouds[task // chunks]
        chunk = task % chunks
        start = chunk * _CHUNK
        stop = min(query_lengths[b], start + _CHUNK)
        hits, kept = _match_chunk(b, start, stop, source, rotation, translation, query_lengths, point_lengths, warm,
                                  gaps, use_gaps, points, graph, radius, origin, edge, dims, cell_offset, cell_start,
                                  pts, local, moved, idx, seed_i, seed_d, scratch_counts, scratch_certified)
        certified_rows[b, chunk] = hits
        kept_rows[b, chunk] = kept
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = a16 = 0.0
        s0, s1, s2 = source_ref[b, 0], source_ref[b, 1], source_ref[b, 2]
        r0, r1, r2 = target_ref[b, 0], target_ref[b, 1], target_ref[b, 2]
        for n in range(start, stop):
            w = weights[b, n]
            if w == 0.0:
                continue
            j = idx[b, n, 0]
            x0 = source[b, n, 0] - s0
            x1 = source[b, n, 1] - s1
            x2 = source[b, n, 2] - s2
            q0 = points[b, j, 0] - r0
            q1 = points[b, j, 1] - r1
            q2 = points[b, j, 2] - r2
            a0 += w
            a1 += w * x0
            a2 += w * x1
            a3 += w * x2
            a4 += w * q0
            a5 += w * q1
            a6 += w * q2
            wq0 = w * q0
            wq1 = w * q1
            wq2 = w * q2
            a7 += wq0 * x0
            a8 += wq0 * x1
            a9 += wq0 * x2
            a10 += wq1 * x0
            a11 += wq1 * x1
            a12 += wq1 * x2
            a13 += wq2 * x0
            a14 += wq2 * x1
            a15 += wq2 * x2
            e0 = moved[b, n, 0] - points[b, j, 0]
            e1 = moved[b, n, 1] - points[b, j, 1]
            e2 = moved[b, n, 2] - points[b, j, 2]
            a16 += w * (e0 * e0 + e1 * e1 + e2 * e2)
        out = partial[b, chunk]
        out[0], out[1], out[2], out[3], out[4], out[5] = a0, a1, a2, a3, a4, a5
        out[6], out[7], out[8], out[9], out[10], out[11] = a6, a7, a8, a9, a10, a11
        out[12], out[13], out[14], out[15], out[16] = a12, a13, a14, a15, a16


# Layout of the plane passes' sums: weight, the upper triangle of J^T W J (row by row), J^T W r, W r^2,
# W y (the weighted sum of the moved points).
_PLANE_SUMS = 32


@_njit(parallel=True)
def _fused_plane(source, source_normals, target_normals, rotation, translation, weights, query_lengths, point_lengths,
                 clouds, warm, gaps, use_gaps, points, graph, radius, origin, edge, dims, cell_offset, cell_start, pts,
                 local, moved, idx, seed_i, seed_d, scratch_counts, scratch_certified, partial, certified_rows,
                 kept_rows):
    """One hard-NN pass of point-to-plane (``source_normals`` empty) or symmetric ICP: match as
    :func:`_fused_point_to_point` and add each pair's Gauss-Newton terms to ``partial[b, chunk]``
    (32 values: ``sum w``, the 21 entries ``A_ik, i <= k`` of ``A = sum w J^T J`` row by row,
    ``sum w J^T r``, ``sum w r^2`` and ``sum w y``), with the residual and Jacobian row of
    :mod:`diffcp.minimize.residuals`: ``d = y - q``, ``n = n_q`` (point-to-plane) or
    ``n_y + n_q`` with ``n_y = R n_s`` (symmetric), ``r = d . n``, ``J = [y x n (+ n_y x d), n]``."""
    B, N = source.shape[0], source.shape[1]
    chunks = (N + _CHUNK - 1) // _CHUNK
    symmetric = source_normals.shape[0] > 0
    for task in numba.prange(clouds.shape[0] * chunks):
        b = clouds[task // chunks]
        chunk = task % chunks
        start = chunk * _CHUNK
        stop = min(query_lengths[b], start + _CHUNK)
        hits, kept = _match_chunk(b, start, stop, source, rotation, translation, query_lengths, point_lengths, warm,
                                  gaps, use_gaps, points, graph, radius, origin, edge, dims, cell_offset, cell_start,
                                  pts, local, moved, idx, seed_i, seed_d, scratch_counts, scratch_certified)
        certified_rows[b, chunk] = hits
        kept_rows[b, chunk] = kept
        acc = np.zeros(_PLANE_SUMS)
        J = np.empty(6)
        for n in range(start, stop):
            w = weights[b, n]
            if w == 0.0:
                continue
            j = idx[b, n, 0]
            y0, y1, y2 = moved[b, n, 0], moved[b, n, 1], moved[b, n, 2]
            d0 = y0 - points[b, j, 0]
            d1 = y1 - points[b, j, 1]
            d2 = y2 - points[b, j, 2]
            n0, n1, n2 = target_normals[b, j, 0], target_normals[b, j, 1], target_normals[b, j, 2]
            if symmetric:
                m0 = (rotation[b, 0, 0] * source_normals[b, n, 0] + rotation[b, 0, 1] * source_normals[b, n, 1]
                      + rotation[b, 0, 2] * source_normals[b, n, 2])
                m1 = (rotation[b, 1, 0] * source_normals[b, n, 0] + rotation[b, 1, 1] * source_normals[b, n, 1]
                      + rotation[b, 1, 2] * source_normals[b, n, 2])
                m2 = (rotation[b, 2, 0] * source_normals[b, n, 0] + rotation[b, 2, 1] * source_normals[b, n, 1]
                      + rotation[b, 2, 2] * source_normals[b, n, 2])
                if m0 * n0 + m1 * n1 + m2 * n2 < 0.0:  # orient the pair (residuals.oriented_target_normals)
                    n0, n1, n2 = -n0, -n1, -n2
                n0 += m0
                n1 += m1
                n2 += m2
                J[0] = y1 * n2 - y2 * n1 + m1 * d2 - m2 * d1
                J[1] = y2 * n0 - y0 * n2 + m2 * d0 - m0 * d2
                J[2] = y0 * n1 - y1 * n0 + m0 * d1 - m1 * d0
            else:
                J[0] = y1 * n2 - y2 * n1
                J[1] = y2 * n0 - y0 * n2
                J[2] = y0 * n1 - y1 * n0
            J[3], J[4], J[5] = n0, n1, n2
            r = d0 * n0 + d1 * n1 + d2 * n2
            acc[0] += w
            v = 1
            for i in range(6):
                wj = w * J[i]
                for k in range(i, 6):
                    acc[v] += wj * J[k]
                    v += 1
                acc[22 + i] += wj * r
            acc[28] += w * r * r
            acc[29] += w * y0
            acc[30] += w * y1
            acc[31] += w * y2
        for v in range(_PLANE_SUMS):
            partial[b, chunk, v] = acc[v]


@_njit(parallel=True)
def _compact(idx, counts, offsets, M, rows, cols):
    """Flat candidate list of ``idx (B, N, k)`` with ``counts (B, N)`` (``offsets``: exclusive
    cumulative counts, flat): ``rows`` and ``cols`` get the query row ``b * N + n`` and the point
    row ``b * M + j`` of every kept candidate, row by row."""
    B, N = counts.shape
    for b in numba.prange(B):
        for n in range(N):
            c = offsets[b * N + n]
            for s in range(counts[b, n]):
                rows[c + s] = b * N + n
                cols[c + s] = b * M + idx[b, n, s]


_THREADS_LAUNCHED = False


def _launch_threads() -> None:
    """Start numba's thread pool once, quietly: where an older TBB is already loaded (Open3D ships
    one) numba warns that it skips its TBB layer and uses OpenMP, which concerns nobody here.

    Starting an OpenMP pool resets the OpenMP runtime that torch shares to numba's thread count:
    torch's own thread count (``torch.set_num_threads``) is restored afterwards, so that a process
    pinned to one thread stays on one (its reductions, and so its digits, would change otherwise).
    """
    global _THREADS_LAUNCHED
    if not _THREADS_LAUNCHED:
        torch_threads = torch.get_num_threads()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TBB.*")
            try:
                numba.np.ufunc.parallel._launch_threads()
            except AttributeError:  # pragma: no cover - a numba without that helper launches lazily
                pass
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
        _THREADS_LAUNCHED = True


def _host(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to(device="cpu", dtype=torch.float64).numpy())


class BatchGrid:
    """Uniform grids over every valid point of a padded batch ``points (B, M, 3)``.

    Args:
        points: ``(B, M, 3)``.
        lengths: ``(B,)`` int64 number of valid points of each cloud (each ``>= 1``).
    """

    def __init__(self, points: Tensor, lengths: Tensor):
        if not AVAILABLE:  # pragma: no cover
            raise ImportError("the grid backend needs numba: pip install numba (or use backend='tree').")
        _launch_threads()
        B, M, _ = points.shape
        self.device = points.device
        self.lengths = lengths.detach().cpu().numpy().astype(np.int64)
        valid = np.arange(M)[None, :] < self.lengths[:, None]
        flat = np.ascontiguousarray(_host(points)[valid])
        starts = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self._grid = _build(flat, starts, _CELL_SCALE)
        self._points = _host(points)
        self._graph = None  # (B, M, K) each point's K nearest (itself included)
        self._radius = None  # (B, M) the distance they cover
        self._reference = None  # (B, 3) centroid of each cloud's valid points
        self._source_cache = None  # host copies and buffers of the fused passes
        self._normals_cache = None  # host copy of the target normals of the plane passes
        self._soft_seed = None  # (B, N) nearest indices of the last soft_candidates call
        self._certified_fraction = None  # of the last warm query (diagnostics)
        self._last_pass = None  # (buffers, clouds) of the last warm fused pass, for the diagnostics

    def _build_graph(self, neighbors: int) -> None:
        """Each point's ``neighbors`` nearest (itself included) and the radius they cover."""
        B, M, _ = self._points.shape
        kk = int(min(neighbors, self.lengths.min()))
        graph = np.zeros((B, M, kk), dtype=np.int64)
        _query(np.flatnonzero(np.arange(M)[None, :] < self.lengths[:, None]), self._points, self.lengths,
               self.lengths, *self._grid, kk, _NO_TEMPERATURE, 0.0, _NO_WARM_I, _NO_WARM_D, graph,
               np.zeros((B, M), dtype=np.int64), np.ones((B, M), dtype=bool))
        far = np.take_along_axis(self._points, graph[..., -1:].repeat(3, -1), axis=1)
        radius = np.sqrt(((self._points - far) ** 2).sum(-1))
        # a cloud whose every point is in the set needs no certificate
        radius[self.lengths <= kk] = np.inf
        self._graph = graph
        self._radius = np.ascontiguousarray(radius)

    def _run(self, query: Tensor, query_lengths: Tensor, k: int, temperature: np.ndarray, log_tol: float):
        B, N, _ = query.shape
        ql = query_lengths.detach().cpu().numpy().astype(np.int64)
        idx = np.zeros((B, N, k), dtype=np.int64)
        counts = np.zeros((B, N), dtype=np.int64)
        certified = np.ones((B, N), dtype=bool)
        _query(np.arange(B * N), _host(query), ql, self.lengths, *self._grid, int(k), temperature, float(log_tol),
               _NO_WARM_I, _NO_WARM_D, idx, counts, certified)
        return idx, counts, certified

    def query(self, query: Tensor, query_lengths: Tensor, k: int) -> Tensor:
        """Indices ``(B, N, k)`` int64 (on the points' device) of the ``k`` nearest valid points,
        nearest first; padded query rows get index 0. ``k`` must not exceed any cloud's length."""
        idx, _, _ = self._run(query, query_lengths, k, _NO_TEMPERATURE, 0.0)
        return torch.from_numpy(idx).to(self.device)

    def _nearest_host(self, q: np.ndarray, ql: np.ndarray, warm, neighbors: int) -> np.ndarray:
        """Exact nearest indices ``(B, N, 1)`` of float64 host queries, warm-started when ``warm``
        (``(B, N)`` int64 guesses) is given; sets :attr:`certified_fraction`."""
        B, N, _ = q.shape
        out = np.zeros((B, N, 1), dtype=np.int64)
        if warm is None:
            _query(np.arange(B * N), q, ql, self.lengths, *self._grid, 1, _NO_TEMPERATURE, 0.0, _NO_WARM_I,
                   _NO_WARM_D, out, np.zeros((B, N), dtype=np.int64), np.ones((B, N), dtype=bool))
            return out
        if self._graph is None:
            self._build_graph(neighbors)
        best_d2 = np.zeros((B, N))
        certified = np.ones((B, N), dtype=bool)
        _warm_certify(q, ql, warm, self._points, self._graph, self._radius, out, best_d2, certified)
        rest = np.flatnonzero(~certified)  # padded rows are certified
        if rest.size:
            _query(rest, q, ql, self.lengths, *self._grid, 1, _NO_TEMPERATURE, 0.0, out[..., 0], best_d2, out,
                   np.zeros((B, N), dtype=np.int64), np.ones((B, N), dtype=bool))
        self._certified_fraction = 1.0 - rest.size / max(int(ql.sum()), 1)
        self._last_pass = None
        return out

    def warm_query(self, query: Tensor, query_lengths: Tensor, warm: Tensor, neighbors: int = 13) -> Tensor:
        """Exact nearest neighbours ``(B, N, 1)`` from guesses ``warm (B, N)`` (valid indices).

        Certified from each guess's ``neighbors`` nearest target points (a graph built on the
        first call), else searched in the grid; the answer does not depend on the guesses."""
        ql = query_lengths.detach().cpu().numpy().astype(np.int64)
        w = np.ascontiguousarray(warm.detach().cpu().numpy().astype(np.int64))
        return torch.from_numpy(self._nearest_host(_host(query), ql, w, neighbors)).to(self.device)

    def _source_state(self, source: Tensor, weights: Tensor, source_lengths: Tensor, source_normals):
        """Host copies of what stays fixed over an ICP run, and the buffers the passes write, for
        these very tensor objects (held weakly: a new tensor in the memory of a freed one is a
        different source), unmodified since."""
        B, N, _ = source.shape
        tensors = (source, weights, source_lengths, source_normals)
        key = tuple(None if t is None else t._version for t in tensors) + (tuple(source.shape),)
        cache = self._source_cache
        if (cache is None or cache["key"] != key
                or any((ref is None) != (t is None) or (ref is not None and ref() is not t)
                       for ref, t in zip(cache["refs"], tensors))):
            ql = source_lengths.detach().cpu().numpy().astype(np.int64)
            x = _host(source)
            valid = (np.arange(N)[None, :] < ql[:, None])[..., None]
            chunks = (N + _CHUNK - 1) // _CHUNK
            cache = dict(
                key=key, refs=tuple(None if t is None else weakref.ref(t) for t in tensors), ql=ql, x=x,
                w=_host(weights), normals=_NO_WARM_D3 if source_normals is None else _host(source_normals),
                source_ref=(x * valid).sum(1) / np.maximum(ql, 1)[:, None],
                moved=np.zeros((B, N, 3)), seed_i=np.zeros((B, N), dtype=np.int64), seed_d=np.zeros((B, N)),
                counts=np.zeros((B, N), dtype=np.int64), certified=np.ones((B, N), dtype=bool),
                partial={17: np.zeros((B, chunks, 17)), _PLANE_SUMS: np.zeros((B, chunks, _PLANE_SUMS))},
                hits=np.zeros((B, chunks), dtype=np.int64), kept=np.zeros((B, chunks), dtype=np.int64),
                gaps=np.zeros((B, N)), idx=np.zeros((B, N, 1), dtype=np.int64), gaps_valid=False,
            )
            cache["returned"] = cache["idx"][..., 0]  # the indices handed out: a view of idx
            self._source_cache = cache
        return cache

    def _fused(self, sums: int, source, transform, weights, source_lengths, warm, neighbors, active,
               source_normals=None, target_normals=None):
        B, N, _ = source.shape
        buf = self._source_state(source, weights, source_lengths, source_normals)
        ql = buf["ql"]
        if active is None:
            active = np.ones(B, dtype=bool)
        if warm is not None and self._graph is None:
            self._build_graph(neighbors)
        T = transform if isinstance(transform, np.ndarray) else _host(transform)
        idx, returned = buf["idx"], buf["returned"]
        # the gaps hold for the positions in "moved" and the neighbours in "idx": only when warm is
        # exactly the previous answer (the very array returned last time, or equal to it). The pass
        # reads each row's guess before it writes that row's answer, so warm may be that array.
        if warm is None:
            warm, use_gaps = _NO_WARM_I, False
        else:
            use_gaps = buf["gaps_valid"] and (warm is returned or np.array_equal(warm, returned))
            if warm is not returned:
                warm = np.ascontiguousarray(warm, dtype=np.int64)
        graph = self._graph if warm.shape[0] else _NO_GRAPH
        radius = self._radius if warm.shape[0] else _NO_WARM_D
        partial = buf["partial"][sums]
        clouds = np.flatnonzero(active)
        if clouds.size < B:
            idle = ~active
            partial[idle] = 0.0
            buf["hits"][idle] = 0
            buf["kept"][idle] = 0
        R, t = np.ascontiguousarray(T[:, :3, :3]), np.ascontiguousarray(T[:, :3, 3])
        match = (ql, self.lengths, clouds, warm, buf["gaps"], use_gaps, self._points, graph, radius, *self._grid)
        scratch = (buf["moved"], idx, buf["seed_i"], buf["seed_d"], buf["counts"], buf["certified"], partial,
                   buf["hits"], buf["kept"])
        if sums == 17:
            if self._reference is None:
                valid = np.arange(self._points.shape[1])[None, :] < self.lengths[:, None]
                self._reference = (self._points * valid[..., None]).sum(1) / self.lengths[:, None]
            _fused_point_to_point(buf["x"], R, t, buf["w"], *match, buf["source_ref"], self._reference, *scratch)
        else:
            _fused_plane(buf["x"], buf["normals"], self._host_normals(target_normals), R, t, buf["w"], *match,
                         *scratch)
        # a skipped cloud keeps its old positions, neighbours and gaps, which still agree
        buf["gaps_valid"] = True
        self._last_pass = (buf, clouds) if warm.shape[0] else None
        return partial, returned, buf

    @property
    def certified_fraction(self):
        """Fraction of the query rows of the last warm query or fused pass settled without a grid
        search (kept or certified); None before any warm query. Diagnostics."""
        if self._last_pass is not None:
            buf, clouds = self._last_pass
            rows = max(int(buf["ql"][clouds].sum()), 1)
            return float(buf["hits"][clouds].sum()) / rows
        return self._certified_fraction

    @property
    def kept_fraction(self):
        """Fraction of the query rows of the last warm fused pass that kept their neighbour without
        any search; None before any. Diagnostics."""
        if self._last_pass is None:
            return None
        buf, clouds = self._last_pass
        return float(buf["kept"][clouds].sum()) / max(int(buf["ql"][clouds].sum()), 1)

    def _host_normals(self, normals: Tensor) -> np.ndarray:
        """Host float64 copy of the target normals ``(B, M, 3)``, kept while the tensor is unmodified."""
        cache = self._normals_cache
        if cache is None or cache[0]() is not normals or cache[1] != normals._version:
            cache = (weakref.ref(normals), normals._version, _host(normals))
            self._normals_cache = cache
        return cache[2]

    def point_to_point_moments(self, source: Tensor, transform, weights: Tensor, source_lengths: Tensor,
                               warm, neighbors: int = 13, active=None):
        """One fused hard-NN point-to-point ICP pass (no autograd): move ``source`` by
        ``transform`` (``(B, 4, 4)``, a tensor or a float64 numpy array), match every point to its
        exact nearest neighbour (warm-started from ``warm``, ``(B, N)`` int64 numpy or None) and
        accumulate the weighted moments that Procrustes needs, in one parallel region; clouds with
        ``active[b]`` False (``(B,)`` bool numpy, default all) are skipped and their moments are 0.
        Returns ``(partial moments (B, chunks, 17) float64 numpy, indices (B, N) int64 numpy, source
        reference (B, 3), target reference (B, 3))``; see :func:`_fused_point_to_point` for the
        layout. The returned arrays are buffers that the next call overwrites.

        When ``warm`` equals the indices this grid returned for the same source on its previous
        call, queries that moved less than half their certified gap keep their neighbour without a
        search (ICP's late iterations); any other ``warm`` is only a guess to certify.
        """
        partial, idx, buf = self._fused(17, source, transform, weights, source_lengths, warm, neighbors, active)
        return partial, idx, buf["source_ref"], self._reference

    def plane_normal_equations(self, source: Tensor, transform, weights: Tensor, source_lengths: Tensor,
                               target_normals: Tensor, warm, neighbors: int = 13, active=None,
                               source_normals=None):
        """One fused hard-NN point-to-plane pass, or symmetric with ``source_normals`` (``(B, N,
        3)``, rotated by ``transform`` inside): match as :meth:`point_to_point_moments` and sum the
        weighted Gauss-Newton terms. Returns ``(partial sums (B, chunks, 32), indices (B, N))``
        (layout in :func:`_fused_plane`), buffers that the next call overwrites."""
        partial, idx, _ = self._fused(_PLANE_SUMS, source, transform, weights, source_lengths, warm, neighbors,
                                      active, source_normals, target_normals)
        return partial, idx

    def soft_candidates(self, query: Tensor, query_lengths: Tensor, k: int, temperature: np.ndarray,
                        tolerance: float):
        """Certified soft candidates as a flat list: ``(rows, cols, certified (B, N))``.

        ``rows`` and ``cols`` (int64, one entry per candidate, grouped by query row) hold the query
        row ``b * N + n`` and the point row ``b * M + j`` (``M`` the padded cloud length). For a
        certified row every valid point outside its candidates has softmax weight
        ``exp(-(d^2 - d_1^2) / T_b)`` summing to at most ``tolerance`` (relative to the nearest
        point's weight 1); at most ``k`` candidates are kept per row. Padded query rows get their
        cloud's candidates like any other row. Uncertified rows need an exact evaluation.

        The nearest candidates of the previous call with the same query shape seed the search
        (ICP's queries move little between iterations): only the time depends on them.
        """
        B, N, _ = query.shape
        t = np.ascontiguousarray(np.asarray(temperature, dtype=np.float64).reshape(-1))
        ql = query_lengths.detach().cpu().numpy().astype(np.int64)
        q = _host(query)
        warm_i, warm_d = _NO_WARM_I, _NO_WARM_D
        if self._soft_seed is not None and self._soft_seed.shape == (B, N):
            warm_i = self._soft_seed
            seeds = np.take_along_axis(self._points, warm_i[..., None].repeat(3, -1), axis=1)
            warm_d = ((seeds - q) ** 2).sum(-1)
        idx = np.zeros((B, N, k), dtype=np.int64)
        counts = np.zeros((B, N), dtype=np.int64)
        cert = np.ones((B, N), dtype=bool)
        _query(np.arange(B * N), q, ql, self.lengths, *self._grid, int(k), t, math.log(tolerance), warm_i, warm_d,
               idx, counts, cert)
        self._soft_seed = np.ascontiguousarray(idx[..., 0])
        offsets = np.zeros(B * N + 1, dtype=np.int64)
        np.cumsum(counts.reshape(-1), out=offsets[1:])
        rows = np.empty(offsets[-1], dtype=np.int64)
        cols = np.empty(offsets[-1], dtype=np.int64)
        _compact(idx, counts, offsets, self._points.shape[1], rows, cols)
        dev = self.device
        return torch.from_numpy(rows).to(dev), torch.from_numpy(cols).to(dev), torch.from_numpy(cert).to(dev)
