"""Exact k-nearest-neighbour search with one SciPy ``cKDTree`` over the whole batch.

No Python loop runs over the clouds: every cloud ``b`` is centred on its own bounding-box centre
and then shifted by ``b * spacing`` along x, with ``spacing`` so large that a query of cloud ``b``
is always nearer to every point of cloud ``b`` than to any point of another cloud. One tree holds
all valid points of all clouds; all valid queries go in one ``query(..., workers=-1)`` call
(float64, on the host), and the global indices are mapped back to per-cloud indices.

Functions here take already validated ``(B, N, 3)`` tensors; the public entry point is
:func:`diffcp.search.knn`.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

__all__ = ["BatchTree"]

# Below this many (query x k) rows one thread answers faster than starting SciPy's worker threads
# (2-core CPU: a call with workers=-1 costs ~5 ms of thread start-up).
_PARALLEL_MIN_QUERIES = 8192


def _host(x: Tensor) -> np.ndarray:
    return x.detach().to(device="cpu", dtype=torch.float64).numpy()


class BatchTree:
    """A kd-tree over every valid point of a padded batch ``points (B, M, 3)``.

    Args:
        points: ``(B, M, 3)``.
        lengths: ``(B,)`` int64 number of valid points of each cloud.
    """

    def __init__(self, points: Tensor, lengths: Tensor):
        B, M, _ = points.shape
        self.batch = B
        self.device = points.device
        lengths_np = lengths.detach().cpu().numpy()
        valid = np.arange(M)[None, :] < lengths_np[:, None]
        p = _host(points)
        # Per-cloud centre (bounding box of the valid points) and radius about it.
        big = np.finfo(np.float64).max
        lo = np.where(valid[..., None], p, big).min(1)
        hi = np.where(valid[..., None], p, -big).max(1)
        self.centre = (lo + hi) / 2  # (B, 3)
        local = p - self.centre[:, None, :]
        self.radius = float(np.sqrt((local**2).sum(-1))[valid].max(initial=0.0))
        self.starts = np.concatenate([[0], np.cumsum(lengths_np)[:-1]]).astype(np.int64)  # (B,)
        self._local = local[valid]  # (sum lengths, 3), row-major: cloud by cloud
        self._cloud = np.nonzero(valid)[0]
        self._build(reach=self.radius)

    def _build(self, reach: float) -> None:
        # A query within ``reach`` of its cloud's centre is within reach + radius of every own point
        # and further than spacing - reach - radius from any other cloud's point.
        self.reach = reach
        self.spacing = 2.0 * (reach + self.radius) * 1.5 + 1.0
        shifted = self._local.copy()
        shifted[:, 0] += self._cloud * self.spacing
        self.tree = cKDTree(shifted, balanced_tree=False, compact_nodes=False)

    def query(self, query: Tensor, query_lengths: Tensor, k: int) -> Tensor:
        """Indices ``(B, N, k)`` int64 (on the points' device) of the ``k`` nearest valid points.

        Padded query rows (index ``>= query_lengths[b]``) get index 0. Requires ``k`` to be at
        most the smallest cloud's length.
        """
        N = query.shape[1]
        qmask = np.arange(N)[None, :] < query_lengths.detach().cpu().numpy()[:, None]
        return self.query_mask(query, qmask, k)

    def query_mask(self, query: Tensor, qmask: np.ndarray, k: int) -> Tensor:
        """Like :meth:`query` for the query rows where the ``(B, N)`` bool array ``qmask`` is set."""
        B, N, _ = query.shape
        rows = np.nonzero(qmask.reshape(-1))[0]
        cloud = rows // N
        flat = query.detach().reshape(B * N, 3)
        q = flat[torch.from_numpy(rows).to(flat.device)].to(device="cpu", dtype=torch.float64).numpy()
        q -= self.centre[cloud]
        reach = float(np.sqrt((q**2).sum(-1)).max(initial=0.0))
        if reach > self.reach:
            self._build(reach=2.0 * reach)  # a far query: widen the spacing once
        q[:, 0] += cloud * self.spacing
        # worker threads are started per call: worth it for many queries only
        _, idx = self.tree.query(q, k=k, workers=-1 if len(q) * k > _PARALLEL_MIN_QUERIES else 1)
        idx = idx.reshape(-1, k) - self.starts[cloud][:, None]
        out = np.zeros((B * N, k), dtype=np.int64)
        out[rows] = idx
        return torch.from_numpy(out.reshape(B, N, k)).to(self.device)
