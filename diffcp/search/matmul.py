"""Exact k-nearest-neighbour search by matrix products, tiled over query rows.

Squared distances are expanded as ``|q|^2 - 2 q.p + |p|^2`` and evaluated with one
``torch.baddbmm`` per tile of query rows, so the peak extra memory is about ``max_elements``
distance entries whatever the cloud sizes. This is the fast exact search on a GPU and for tiny
problems on a CPU; larger CPU problems go to :mod:`diffcp.search.tree`.

Functions here take already validated ``(B, N, 3)`` tensors; the public entry point is
:func:`diffcp.search.knn`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["knn_indices_matmul"]

# Extra candidates re-ranked with exact differences, so that the cancellation error of the
# expanded distance (about eps * |p|^2) cannot swap two close neighbours.
_RERANK_EXTRA = 2


def knn_indices_matmul(
    query: Tensor,
    points: Tensor,
    points_lengths: Tensor,
    k: int,
    max_elements: Optional[int] = None,
) -> Tensor:
    """Indices of the ``k`` nearest valid points of every query row, nearest first.

    Args:
        query: ``(B, N, 3)``.
        points: ``(B, M, 3)``.
        points_lengths: ``(B,)`` int64; points at index ``>= points_lengths[b]`` are never returned.
            Must be ``>= k`` for every cloud.
        k: number of neighbours.
        max_elements: budget for one tile of the ``(B, rows, M)`` distance matrix (all clouds
            together); at least one query row is processed per tile. Default ``2**24`` on a GPU
            and ``2**20`` on a CPU (a tile that stays in cache is faster there).

    Returns:
        ``(B, N, k)`` int64 indices (not differentiable). Padded query rows are not special here:
        they get the neighbours of whatever coordinates they hold.
    """
    with torch.no_grad():
        B, N, _ = query.shape
        M = points.shape[1]
        # Centre on the valid points' centroid: the expansion loses precision in |p|^2.
        valid = torch.arange(M, device=points.device)[None, :] < points_lengths[:, None]
        w = valid.to(points.dtype)[..., None]
        centre = (points * w).sum(1, keepdim=True) / points_lengths.to(points.dtype)[:, None, None]
        p = (points - centre).masked_fill(~valid[..., None], 0.0)  # huge padding cannot overflow
        q = query - centre
        p_sq = (p * p).sum(-1)
        p_sq = p_sq.masked_fill(~valid, float("inf"))[:, None, :]  # (B, 1, M)
        p_t = p.transpose(1, 2)
        c = min(M, k + _RERANK_EXTRA)
        if max_elements is None:
            max_elements = 2**20 if query.device.type == "cpu" else 2**24
        rows = max(1, max_elements // max(1, B * M))
        out = torch.empty(B, N, k, dtype=torch.int64, device=query.device)
        for start in range(0, N, rows):
            q_tile = q[:, start : start + rows]
            # |q|^2 is constant along a row, so it does not change the ranking: leave it out.
            d = torch.baddbmm(p_sq, q_tile, p_t, alpha=-2.0)
            cand = d.topk(c, dim=-1, largest=False, sorted=False).indices  # (B, r, c)
            # Re-rank the candidates by exact differences.
            r = q_tile.shape[1]
            pc = p.gather(1, cand.reshape(B, r * c, 1).expand(-1, -1, 3)).reshape(B, r, c, 3)
            exact = ((q_tile[:, :, None, :] - pc) ** 2).sum(-1)
            exact = exact.masked_fill(~valid.gather(1, cand.reshape(B, r * c)).reshape(B, r, c), float("inf"))
            order = exact.topk(k, dim=-1, largest=False, sorted=True).indices
            out[:, start : start + rows] = cand.gather(-1, order)
        return out
