"""Exact k-nearest neighbours of padded, batched clouds, dispatched by hardware.

``backend="grid"`` (a voxel grid per cloud, compiled by numba, see :mod:`diffcp.search.grid`)
wins on a CPU for all but tiny problems; ``backend="matmul"`` (tiled matrix products) wins on a
GPU; ``backend="tree"`` (SciPy's cKDTree over the whole batch) is the reference on the host and
the CPU fallback without numba. ``"auto"`` picks the matrix products on CUDA and for tiny CPU
problems (``B * N * M`` below :data:`MATMUL_CPU_MAX`), the grid otherwise (the tree if numba is
missing). All backends return the same neighbours, up to exact ties.

Indices are not differentiable; the squared distances are recomputed from the gathered
coordinates, ``|q - p[idx]|^2``, so they are exact and differentiable in both clouds.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from .. import checks
from . import grid as _grid
from .grid import BatchGrid
from .matmul import knn_indices_matmul
from .tree import BatchTree

__all__ = ["KNN", "knn", "NearestNeighborIndex", "gather_points", "MATMUL_CPU_MAX"]

BACKENDS = ("auto", "grid", "tree", "matmul")

# Below this many query-point pairs (B * N * M), brute force beats building a tree on a 2-core CPU
# (measured, best of 15, k=1: 9e4 pairs matmul 0.40 ms vs tree 0.79 ms including the build;
# 4.9e5: 1.03 vs 1.16 ms; 1e6: 1.81 vs 1.47 ms; 2e6: 3.6 vs 1.7 ms; 1.6e7: 185 vs 5 ms).
MATMUL_CPU_MAX = 1_000_000


class KNN(NamedTuple):
    """Result of :func:`knn`.

    Attributes:
        sq_distances: ``(B, N, k)`` squared distances, nearest first; 0 for padded query rows.
        indices: ``(B, N, k)`` int64 indices into the points' cloud; 0 for padded query rows.
    """

    sq_distances: Tensor
    indices: Tensor


def gather_points(points: Tensor, indices: Tensor) -> Tensor:
    """``points (B, M, C)`` gathered at ``indices (B, N, k)`` -> ``(B, N, k, C)`` (differentiable)."""
    B, N, k = indices.shape
    C = points.shape[-1]
    flat = indices.reshape(B, N * k, 1).expand(-1, -1, C)
    return points.gather(1, flat).reshape(B, N, k, C)


class NearestNeighborIndex:
    """Exact nearest-neighbour index over a padded batch of clouds, built once, queried often.

    ICP builds one over the target and queries it with the moved source at every iteration. The
    grid or tree is built on the first query that needs it and then reused; with the matmul
    backend the index only stores the points. ``"auto"`` decides per query (see :func:`knn`).

    Warm start (``warm_start=True``; grid backend, ``k=1``): ICP's queries move little from one
    iteration to the next, so the previous answer ``j`` is a good guess. With ``r_j`` the distance
    from ``p_j`` to its ``warm_neighbors``-th nearest point of the target (precomputed once),
    ``d = |y - p_j|`` and ``d*`` the distance to the best of ``p_j`` and those neighbours, every
    point closer to ``y`` than that best candidate lies within ``d* + d`` of ``p_j``; so if
    ``d* + d < r_j`` the best candidate is the exact nearest neighbour of ``y``. Uncertified
    queries are searched in the grid. The answer does not depend on the warm start (distances are
    compared in float64), only the time does; other backends ignore it.

    Args:
        points: ``(B, M, 3)`` (or ``(M, 3)``) cloud(s) to search in.
        lengths: optional ``(B,)`` int64 valid point counts; padding is never returned.
        backend: ``"auto"``, ``"grid"``, ``"tree"`` or ``"matmul"``.
        warm_start: reuse the previous ``k=1`` answer as a certified guess (see above).
        warm_neighbors: size of each target point's precomputed neighbourhood (itself included).

    Example:
        >>> pts = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [5, 0, 0]]])
        >>> index = NearestNeighborIndex(pts)
        >>> index.query(torch.tensor([[[0.9, 0, 0]]]), k=2).indices.tolist()
        [[[1, 0]]]
    """

    def __init__(self, points: Tensor, lengths: Optional[Tensor] = None, backend: str = "auto",
                 warm_start: bool = False, warm_neighbors: int = 13):
        self.backend = checks.check_option("backend", backend, BACKENDS)
        if backend == "grid" and not _grid.AVAILABLE:
            raise ImportError("backend='grid' needs numba (pip install numba); use backend='tree' without it.")
        self.points, self._unbatched = checks.as_batched_points("points", points)
        B, M, _ = self.points.shape
        self.lengths = checks.check_lengths("lengths", lengths, B, M, self.points.device)
        self._min_length = int(self.lengths.min())
        self._tree: Optional[BatchTree] = None
        self._grid: Optional[BatchGrid] = None
        self.warm_start = bool(warm_start)
        if isinstance(warm_neighbors, bool) or not isinstance(warm_neighbors, int) or warm_neighbors < 2:
            raise ValueError(f"warm_neighbors must be an integer >= 2; got {warm_neighbors!r}.")
        self.warm_neighbors = warm_neighbors
        self._previous: Optional[Tensor] = None  # (B, N) last k=1 answer, for the warm start
        self.certified_fraction: Optional[float] = None  # of the last warm query (diagnostics)

    def _pick(self, n_query: int) -> str:
        if self.backend != "auto":
            return self.backend
        if self.points.device.type != "cpu":
            return "matmul"
        B, M, _ = self.points.shape
        if B * n_query * M < MATMUL_CPU_MAX:
            return "matmul"
        return "grid" if _grid.AVAILABLE else "tree"

    def _indices(self, query: Tensor, query_lengths: Tensor, k: int) -> Tensor:
        B, N, _ = query.shape
        backend = self._pick(N)
        if backend == "matmul":
            indices = knn_indices_matmul(query, self.points, self.lengths, k)
            return indices.masked_fill(~checks.lengths_mask(query_lengths, N)[..., None], 0)
        if backend == "tree":
            if self._tree is None:
                self._tree = BatchTree(self.points, self.lengths)
            return self._tree.query(query, query_lengths, k)
        if self._grid is None:
            self._grid = BatchGrid(self.points, self.lengths)
        warm = self.warm_start and k == 1
        if warm and self._previous is not None and self._previous.shape == (B, N):
            indices = self._grid.warm_query(query, query_lengths, self._previous, self.warm_neighbors)
            self.certified_fraction = self._grid.certified_fraction
        else:
            indices = self._grid.query(query, query_lengths, k)
        if warm:
            self._previous = indices[..., 0]
        return indices

    def uses_grid(self, n_query: int) -> bool:
        """Whether queries of ``n_query`` points per cloud go to the grid backend."""
        return self._pick(n_query) == "grid"

    def _grid_index(self) -> BatchGrid:
        """The grid over the points (built on first use)."""
        if self._grid is None:
            self._grid = BatchGrid(self.points, self.lengths)
        return self._grid

    def point_to_point_moments(self, source: Tensor, transform: Tensor, weights: Tensor, source_lengths: Tensor):
        """Fused CPU pass of hard-NN point-to-point ICP (grid backend, no autograd): the weighted
        moments of the pairs (moved source point, its exact nearest neighbour), warm-started like
        :meth:`query`. Returns ``(moments (B, 17), source reference (B, 3), target reference (B, 3))``
        as float64 numpy arrays (layout in :func:`diffcp.search.grid._fused_point_to_point`)."""
        grid = self._grid_index()
        B, N, _ = source.shape
        warm = None
        if self.warm_start and self._previous is not None and self._previous.shape == (B, N):
            warm = self._previous.cpu().numpy()
        partial, indices, source_ref, target_ref = grid.point_to_point_moments(
            source, transform, weights, source_lengths, warm, self.warm_neighbors
        )
        if self.warm_start:
            self._previous = torch.from_numpy(indices.copy())
        if warm is not None:
            self.certified_fraction = grid.certified_fraction
        return partial.sum(1), source_ref.copy(), target_ref.copy()

    def query(self, query: Tensor, query_lengths: Optional[Tensor] = None, k: int = 1) -> KNN:
        """The ``k`` nearest valid points of every query point.

        Args:
            query: ``(B, N, 3)`` (``(N, 3)`` if the index was built from an unbatched cloud).
            query_lengths: optional ``(B,)`` int64; padded query rows get index 0 and distance 0.
            k: number of neighbours, at most the smallest valid cloud length.

        Returns:
            :class:`KNN` with ``(B, N, k)`` tensors (``(N, k)`` for unbatched input), nearest first.
        """
        query, unbatched = checks.as_batched_points("query", query)
        checks.check_same_device(query=query, points=self.points)
        if query.dtype != self.points.dtype:
            raise TypeError(f"query has dtype {query.dtype} but points have dtype {self.points.dtype}; use one dtype.")
        B, N, _ = query.shape
        if B != self.points.shape[0]:
            raise ValueError(f"query holds {B} clouds but points hold {self.points.shape[0]}; the batch sizes must match.")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer; got {k!r}.")
        if k > self._min_length:
            raise ValueError(
                f"k must be at most the number of valid points in every cloud ({self._min_length}); got k={k}."
            )
        query_lengths = checks.check_lengths("query_lengths", query_lengths, B, N, query.device)
        indices = self._indices(query, query_lengths, k)
        matched = gather_points(self.points, indices)
        sq = ((query[:, :, None, :] - matched) ** 2).sum(-1)
        sq = sq.masked_fill(~checks.lengths_mask(query_lengths, N)[..., None], 0.0)
        if unbatched and self._unbatched:
            return KNN(sq[0], indices[0])
        return KNN(sq, indices)


def knn(
    query: Tensor,
    points: Tensor,
    query_lengths: Optional[Tensor] = None,
    points_lengths: Optional[Tensor] = None,
    k: int = 1,
    backend: str = "auto",
) -> KNN:
    """Exact ``k`` nearest neighbours in ``points`` of every point of ``query``, cloud by cloud.

    Points at index ``>= points_lengths[b]`` are never returned. Padded query rows (index
    ``>= query_lengths[b]``) get index 0 and squared distance 0. Indices are not differentiable;
    ``sq_distances = |q - points[idx]|^2`` is recomputed from the coordinates and is exact and
    differentiable in both clouds. Exact ties may be broken differently by the two backends.

    Args:
        query: ``(B, N, 3)`` or ``(N, 3)``.
        points: ``(B, M, 3)`` or ``(M, 3)``, same dtype and device.
        query_lengths: optional ``(B,)`` int64 valid query counts.
        points_lengths: optional ``(B,)`` int64 valid point counts.
        k: number of neighbours, ``1 <= k <= min(points_lengths)``.
        backend: ``"grid"`` (voxel grids compiled by numba, float64 on the host), ``"tree"``
            (SciPy cKDTree over the whole batch, float64 on the host), ``"matmul"`` (tiled
            ``|q|^2 - 2 q.p + |p|^2``), or ``"auto"``: matmul on CUDA or when
            ``B * N * M < MATMUL_CPU_MAX``, grid otherwise (tree without numba).

    Returns:
        :class:`KNN` ``(sq_distances (B, N, k), indices (B, N, k) int64)``, nearest first;
        ``(N, k)`` each when both clouds are unbatched.

    Example:
        >>> q = torch.tensor([[0.1, 0.0, 0.0], [2.2, 0.0, 0.0]])
        >>> p = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [9.0, 0.0, 0.0]])
        >>> knn(q, p).indices.tolist()
        [[0], [1]]
    """
    return NearestNeighborIndex(points, points_lengths, backend).query(query, query_lengths, k)
