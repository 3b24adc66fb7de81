"""Exact k-nearest neighbours of padded, batched clouds, dispatched by hardware.

``backend="tree"`` (SciPy cKDTree, on the host) wins on a CPU for all but tiny problems;
``backend="matmul"`` (tiled matrix products) wins on a GPU. ``"auto"`` picks the tree on a CPU,
except when ``B * N * M`` is below :data:`MATMUL_CPU_MAX`, and the matrix products on CUDA.

Indices are not differentiable; the squared distances are recomputed from the gathered
coordinates, ``|q - p[idx]|^2``, so they are exact and differentiable in both clouds.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from .. import checks
from .matmul import knn_indices_matmul
from .tree import BatchTree

__all__ = ["KNN", "knn", "NearestNeighborIndex", "gather_points", "MATMUL_CPU_MAX"]

BACKENDS = ("auto", "tree", "matmul")

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

    ICP builds one over the target and queries it with the moved source at every iteration. With
    the tree backend the kd-tree is built on the first query that needs it and then reused; with
    the matmul backend the index only stores the points. ``"auto"`` decides per query (see
    :func:`knn`).

    Warm start (``warm_start=True``, tree backend, ``k=1``): ICP's queries move little from one
    iteration to the next, so the previous answer ``j`` is a good guess. With ``r_j`` the distance
    from ``p_j`` to its ``K``-th nearest neighbour in the target (precomputed once) and
    ``d = |y - p_j|`` and ``d*`` the distance to the best of ``p_j`` and its ``K`` neighbours, every
    point closer to ``y`` than that best candidate lies within ``d* + d`` of ``p_j``; so if
    ``d* + d < r_j`` the best candidate is the exact nearest neighbour of ``y``. Only the queries without the
    certificate go to the tree. The answer is the tree's up to ties at rounding level (distances
    are compared in the query's dtype); only the time changes.

    Args:
        points: ``(B, M, 3)`` (or ``(M, 3)``) cloud(s) to search in.
        lengths: optional ``(B,)`` int64 valid point counts; padding is never returned.
        backend: ``"auto"``, ``"tree"`` or ``"matmul"``.
        warm_start: reuse the previous query's answer as a certified guess (see above).
        warm_neighbors: ``K``, the size of each target point's precomputed neighbourhood.

    Example:
        >>> pts = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [5, 0, 0]]])
        >>> index = NearestNeighborIndex(pts)
        >>> index.query(torch.tensor([[[0.9, 0, 0]]]), k=2).indices.tolist()
        [[[1, 0]]]
    """

    def __init__(self, points: Tensor, lengths: Optional[Tensor] = None, backend: str = "auto",
                 warm_start: bool = False, warm_neighbors: int = 16):
        self.backend = checks.check_option("backend", backend, BACKENDS)
        self.points, self._unbatched = checks.as_batched_points("points", points)
        B, M, _ = self.points.shape
        self.lengths = checks.check_lengths("lengths", lengths, B, M, self.points.device)
        self._min_length = int(self.lengths.min())
        self._tree: Optional[BatchTree] = None
        self.warm_start = bool(warm_start)
        self.warm_neighbors = int(warm_neighbors)
        self._previous: Optional[Tensor] = None  # (B, N) last k=1 answer, for the warm start
        self._graph: Optional[Tensor] = None  # (B, M, K+1) each point's K+1 nearest (itself first)
        self._radius2: Optional[Tensor] = None  # (B, M) squared distance to the farthest of them
        self._planes: Optional[Tensor] = None
        self.certified_fraction: Optional[float] = None  # of the last warm query (diagnostics)

    def _build_graph(self) -> None:
        B, M, _ = self.points.shape
        kk = min(self.warm_neighbors + 1, self._min_length)
        graph = self._tree.query(self.points, self.lengths, kk)  # (B, M, kk), itself first
        points = self.points.detach()
        far = gather_points(points, graph[..., -1:])[:, :, 0]
        radius2 = ((points - far) ** 2).sum(-1)
        # a cloud whose every point is in the candidate set needs no certificate
        whole = (self.lengths <= kk)[:, None].expand(B, M)
        self._radius2 = torch.where(whole, torch.full_like(radius2, float("inf")), radius2)
        self._graph = graph
        self._planes = points.transpose(1, 2).contiguous()  # (B, 3, M): one gather per coordinate

    def _warm_query(self, query: Tensor, query_lengths: Tensor) -> Tensor:
        """Certified k=1 search from the previous answer; uncertified queries go to the tree."""
        if self._graph is None:
            self._build_graph()
        B, N, _ = query.shape
        kk = self._graph.shape[-1]
        j = self._previous  # (B, N)
        cand = self._graph.gather(1, j[..., None].expand(-1, -1, kk))  # (B, N, kk)
        near = self._planes.gather(2, cand.reshape(B, 1, N * kk).expand(-1, 3, -1)).reshape(B, 3, N, kk)
        d2 = ((query.detach().transpose(1, 2)[..., None] - near) ** 2).sum(1)  # (B, N, kk)
        d2_best, arg = d2.min(-1, keepdim=True)
        best = cand.gather(-1, arg)  # (B, N, 1)
        # Any point closer to y than the best candidate lies within d_best + d_j of p_j (candidate 0
        # is p_j itself); certified where that is inside p_j's neighbourhood, with a rounding margin.
        reach = d2_best[..., 0].sqrt() + d2[..., 0].sqrt()
        r2 = self._radius2.gather(1, j)
        qmask = checks.lengths_mask(query_lengths, N)
        eps = 64 * torch.finfo(query.dtype).eps
        certified = (reach * reach * (1 + eps) < r2 * (1 - eps)) | ~qmask
        self.certified_fraction = float((certified & qmask).sum()) / max(int(qmask.sum()), 1)
        if not bool(certified.all()):
            rest = (~certified).cpu().numpy()
            best = torch.where(certified[..., None], best, self._tree.query_mask(query, rest, 1))
        return best.masked_fill(~qmask[..., None], 0)

    def _pick(self, n_query: int) -> str:
        if self.backend != "auto":
            return self.backend
        if self.points.device.type != "cpu":
            return "matmul"
        B, M, _ = self.points.shape
        return "matmul" if B * n_query * M < MATMUL_CPU_MAX else "tree"

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

        if self._pick(N) == "tree":
            if self._tree is None:
                self._tree = BatchTree(self.points, self.lengths)
            warm = self.warm_start and k == 1
            if warm and self._previous is not None and self._previous.shape == (B, N):
                indices = self._warm_query(query, query_lengths)
            else:
                indices = self._tree.query(query, query_lengths, k)
            if warm:
                self._previous = indices[..., 0]
        else:
            indices = knn_indices_matmul(query, self.points, self.lengths, k)
            indices = indices.masked_fill(~checks.lengths_mask(query_lengths, N)[..., None], 0)

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
        backend: ``"tree"`` (SciPy cKDTree over the whole batch, float64 on the host),
            ``"matmul"`` (tiled ``|q|^2 - 2 q.p + |p|^2``), or ``"auto"``: matmul on CUDA or when
            ``B * N * M < MATMUL_CPU_MAX``, tree otherwise.

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
