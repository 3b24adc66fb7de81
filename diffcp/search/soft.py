"""Soft nearest neighbours: a softmax over negative squared distances.

For every query ``q_i`` the soft match is ``p_hat_i = sum_j w_ij p_j`` with
``w_ij = softmax_j(-|q_i - p_j|^2 / T)`` over the valid points, and the same weights average
optional per-point ``values`` (e.g. target normals). ``T -> 0`` gives the hard nearest neighbour,
``T -> inf`` the centroid. Everything is differentiable in the query, the points, the values and
the temperature.

Three backends compute the same thing:

* ``"dense"``: the reference; materialises the ``(B, N, M)`` weights.
* ``"attention"``: O(N + M) memory through ``scaled_dot_product_attention``. Since
  ``-|q - p|^2 / T = (2 q.p - |p|^2) / T - |q|^2 / T`` and the last term is constant along a row,
  it cancels in the softmax; so with queries ``[2q/T, -1/T]``, keys ``[p, |p|^2]``, ``scale=1``
  and values ``[p, values]`` attention returns the soft match. Both clouds are first centred on
  the target centroid to keep ``|p|^2`` small. The backward recomputes the weights in tiles of
  query rows (bounded memory); measured on 2 CPU cores, N = M = 100,000 float32: peak RSS
  285 MiB forward, 450 MiB forward + backward (of which ~260 MiB is the torch runtime).
* ``"truncated"``: O(N k) time and memory, for the small temperatures ICP uses. Each query row
  gets a set of candidate points (not differentiable: indices); the softmax runs over them only,
  with logits ``-|q - p_idx|^2 / T`` recomputed from the gathered coordinates, so gradients reach
  the query, the points, the values and the temperature through the candidates (autograd through
  a gather: the backward is O(N k) too). Rows whose truncation is not certified (below) are
  computed exactly by the attention kernel, on a sub-batch of those rows only; if fewer than half
  the rows are certified, the whole call runs ``"attention"``.

  Certificate. For one query row with nearest squared distance ``d_1^2``, let every valid point
  outside the candidate set lie at squared distance ``>= rho^2``, and let ``M_b`` be the valid
  length of its cloud and ``m`` the number of candidates. With weights normalised to the largest
  one, ``w_j = exp(-(d_j^2 - d_1^2) / T) <= 1``, the kept mass is ``S_K >= 1`` and the dropped
  mass is

      S_out <= eps := (M_b - m) exp(-(rho^2 - d_1^2) / T).

  The exact match is ``(S_K p_K + S_out p_out) / (S_K + S_out)`` with ``p_K`` the truncated match
  and ``p_out`` the weighted mean of the dropped points, hence

      |p_hat - p_K| = S_out / (S_K + S_out) |p_out - p_K| <= eps * diam(cloud),

  and likewise ``<= eps * (spread of the values)`` for the values; every kept weight is off by a
  factor ``1 + S_out / S_K`` in ``[1, 1 + eps]``. A row is certified when
  ``eps <= truncation_tolerance`` (default: the dtype's machine epsilon, so the truncation error
  is below the rounding error of the exact result), tested in log space so nothing overflows; a
  row whose candidates are its whole cloud (``M_b = m``) is always certified. The candidates:

  - on a CPU with numba, the grid of :mod:`diffcp.search.grid` collects every point with
    ``d^2 < d_1^2 + T (log M_b - log tol)`` (each point outside weighs ``< tol / M_b``), keeping
    at most ``k``; a row whose candidates overflow ``k`` is certified with ``rho^2`` the nearest
    one left out. Only as many slots as the fullest row needs are gathered;
  - elsewhere (a GPU), the exact ``k`` nearest points (:func:`~diffcp.search.knn`), with
    ``rho = d_k`` and ``m = min(k, smallest valid cloud length)``.

  Padded query rows count as rows (``soft_nearest`` does not know which they are).
  :data:`LAST_TRUNCATION_CERTIFIED` (every row certified) and :data:`LAST_CERTIFIED_FRACTION`
  describe the last ``"truncated"`` call (diagnostics only). Deciding costs one host
  synchronisation.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks
from . import grid as _grid
from .grid import BatchGrid
from .nearest import gather_points, knn

__all__ = ["SoftMatch", "soft_nearest", "ATTENTION_MIN_PAIRS", "LAST_TRUNCATION_CERTIFIED", "LAST_CERTIFIED_FRACTION"]

BACKENDS = ("auto", "dense", "attention", "truncated")

# "auto" switches to the attention kernel above this many query-point pairs per cloud (on a GPU,
# or on a CPU without numba) ...
ATTENTION_MIN_PAIRS = 1_000_000
# ... and, on a CPU with numba, to the certified truncation from this many pairs per cloud.
TRUNCATED_MIN_PAIRS = 16_384

# Diagnostics of the last backend="truncated" call (None before any call): whether every row was
# certified (no row needed the exact fallback), and the fraction of rows certified.
LAST_TRUNCATION_CERTIFIED: Optional[bool] = None
LAST_CERTIFIED_FRACTION: Optional[float] = None


class SoftMatch(NamedTuple):
    """Result of :func:`soft_nearest`.

    Attributes:
        points: ``(B, N, 3)`` soft-matched points.
        values: ``(B, N, C)`` soft-averaged values, or ``None`` when no values were given.
    """

    points: Tensor
    values: Optional[Tensor]


def _temperature(temperature, batch: int, like: Tensor) -> Tensor:
    checks.check_positive("temperature", temperature)
    t = torch.as_tensor(temperature, dtype=like.dtype, device=like.device)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"temperature must be a number or a ({batch},) tensor, one per cloud; got shape {tuple(t.shape)}.")
    return t.reshape(-1, 1, 1).expand(batch, 1, 1)


def _dense(q: Tensor, p: Tensor, v: Tensor, valid: Tensor, t: Tensor) -> Tensor:
    sq = ((q[:, :, None, :] - p[:, None, :, :]) ** 2).sum(-1)  # (B, N, M)
    logits = (-sq / t).masked_fill(~valid[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


class _Attention(torch.autograd.Function):
    """Softmax attention with ``scale=1``: forward by SDPA's flash kernel, backward recomputed
    in tiles of query rows (SDPA's own CPU backward is ~100x slower than its forward)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, v: Tensor, valid: Tensor) -> Tensor:
        # Flash attention on the CPU needs 4-d inputs with equal last dimensions.
        width = max(a.shape[-1], v.shape[-1])
        pad = lambda x: F.pad(x, (0, width - x.shape[-1]))[:, None]
        out = F.scaled_dot_product_attention(pad(a), pad(b), pad(v), attn_mask=valid[:, None, None, :], scale=1.0)
        out = out[:, 0, :, : v.shape[-1]]
        ctx.save_for_backward(a, b, v, valid, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        a, b, v, valid, out = ctx.saved_tensors
        B, N, _ = a.shape
        M = b.shape[1]
        da, db, dv = torch.empty_like(a), torch.zeros_like(b), torch.zeros_like(v)
        rows = max(1, _TILE_ELEMENTS // max(1, B * M))
        bt, vt, mask = b.transpose(1, 2), v.transpose(1, 2), ~valid[:, None, :]
        for start in range(0, N, rows):
            sl = slice(start, start + rows)
            w = torch.softmax(torch.bmm(a[:, sl], bt).masked_fill_(mask, float("-inf")), dim=-1)  # (B, r, M)
            g = grad[:, sl]
            dv += torch.bmm(w.transpose(1, 2), g)
            # d logits = w * (g . v_j - g . out_i)
            ds = torch.bmm(g, vt).sub_((g * out[:, sl]).sum(-1, keepdim=True)).mul_(w)
            da[:, sl] = torch.bmm(ds, b)
            db += torch.bmm(ds.transpose(1, 2), a[:, sl])
        return da, db, dv, None


# Elements of one (B, rows, M) tile of weights in the attention backward.
_TILE_ELEMENTS = 2**22


def _attention(q: Tensor, p: Tensor, v: Tensor, valid: Tensor, t: Tensor) -> Tensor:
    a = torch.cat([2 * q / t, (-1 / t).expand(q.shape[:2] + (1,))], dim=-1)  # (B, N, 4)
    b = torch.cat([p, (p * p).sum(-1, keepdim=True)], dim=-1)  # (B, M, 4)
    return _Attention.apply(a, b, v, valid)


def _rows_to_front(mask: Tensor):
    """Per cloud, the indices of the rows where ``mask (B, N)`` is set, first: ``(order (B, R), slot
    valid (B, R))`` with ``R`` the largest count."""
    counts = mask.sum(1)
    R = int(counts.max())
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :R]
    return order, torch.arange(R, device=mask.device)[None, :] < counts[:, None]


def _knn_candidates(q: Tensor, p: Tensor, t: Tensor, lengths: Tensor, k: int, tol: float):
    """The exact ``k`` nearest points as candidates ``(B, N, k)`` and the certified rows ``(B, N)``:
    certified when ``(M_b - k) exp(-(d_k^2 - d_1^2) / T) <= tol`` (``k`` capped at the smallest
    valid cloud length)."""
    k = min(k, int(lengths.min()))
    index = knn(q.detach(), p.detach(), points_lengths=lengths, k=k).indices  # (B, N, k)
    with torch.no_grad():
        near = gather_points(p.detach(), index)
        s = ((q.detach()[:, :, None, :] - near) ** 2).sum(-1)
        gap = (s[..., -1] - s[..., 0]) / t.detach()[:, :, 0]  # (d_k^2 - d_1^2) / T, (B, N)
        log_count = (lengths - k).to(s.dtype).log()[:, None]  # -inf where the k set is the cloud
        certified = (log_count - gap) <= math.log(tol)
    return index, certified


def _softmax_padded(q: Tensor, v: Tensor, t: Tensor, index: Tensor) -> Tensor:
    """Softmax over the candidates ``index (B, N, K)`` of every row: ``(B, N, 3 + C)``."""
    gv = gather_points(v, index)  # (B, N, K, 3 + C); its first 3 columns are the candidate points
    diff = q[:, :, None, :] - gv[..., :3]
    w = torch.softmax((diff * diff).sum(-1).div(-t), dim=-1)  # t (B, 1, 1)
    return (w[..., None] * gv).sum(-2)


def _softmax_flat(q: Tensor, v: Tensor, t: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Softmax over a flat candidate list (query row ``rows[c]``, point row ``cols[c]``), with
    segment sums (``index_add``) instead of padded slots: ``(B, N, 3 + C)``."""
    B, N, _ = q.shape
    width = v.shape[-1]
    vc = v.reshape(-1, width).index_select(0, cols)  # (n_candidates, 3 + C)
    diff = q.reshape(-1, 3).index_select(0, rows) - vc[:, :3]
    sq = (diff * diff) @ torch.ones(3, 1, dtype=q.dtype, device=q.device)  # (n, 1): fast on a CPU
    with torch.no_grad():  # a per-row shift (the nearest candidate) leaves the softmax unchanged
        shift = torch.full((B * N,), float("inf"), dtype=q.dtype, device=q.device)
        shift = shift.scatter_reduce(0, rows, sq[:, 0].detach(), "amin")
    temp = t.reshape(B).repeat_interleave(N).index_select(0, rows)
    e = torch.exp((shift.index_select(0, rows) - sq[:, 0]) / temp)
    total = torch.zeros(B * N, dtype=q.dtype, device=q.device).index_add(0, rows, e)
    w = e / total.index_select(0, rows)
    out = torch.zeros(B * N, width, dtype=q.dtype, device=q.device).index_add(0, rows, w[:, None] * vc)
    return out.reshape(B, N, width)


_GRID_CACHE: list = []  # [(tensor weakref, key, BatchGrid)]: the last grid, reused while its cloud is unchanged


def _grid_for(points: Tensor, lengths: Tensor) -> BatchGrid:
    """The grid over ``points``, reused across calls on the same, unmodified tensor (ICP's target
    at every iteration): the same tensor object (held weakly, so a new tensor that happens to
    reuse the memory of a freed one is never mistaken for it), version, shape and lengths."""
    key = (points._version, tuple(points.shape), points.dtype, tuple(lengths.tolist()))
    if _GRID_CACHE:
        ref, old_key, grid = _GRID_CACHE[0]
        if ref() is points and old_key == key:
            return grid
    grid = BatchGrid(points, lengths)
    _GRID_CACHE[:] = [(weakref.ref(points), key, grid)]
    return grid


def _truncated(
    q: Tensor, p: Tensor, v: Tensor, valid: Tensor, t: Tensor, lengths: Tensor, k: int, tol: float,
    query: Tensor, points: Tensor,
) -> Tensor:
    """Softmax over certified candidates, row by row; uncertified rows exactly by attention.
    ``q, p`` are the centred ``query, points`` (the grid searches the original coordinates).
    Sets :data:`LAST_TRUNCATION_CERTIFIED` and :data:`LAST_CERTIFIED_FRACTION`."""
    global LAST_TRUNCATION_CERTIFIED, LAST_CERTIFIED_FRACTION
    B, N, _ = q.shape
    grid = q.device.type == "cpu" and _grid.AVAILABLE
    if grid:
        temps = t.detach().reshape(B).to(torch.float64).numpy()
        rows, cols, certified = _grid_for(points, lengths).soft_candidates(
            query, torch.full((B,), N, dtype=torch.int64), min(k, p.shape[1]), temps, tol)
    else:
        index, certified = _knn_candidates(q, p, t, lengths, k, tol)
    fraction = float(certified.sum()) / certified.numel()
    LAST_TRUNCATION_CERTIFIED = fraction == 1.0
    LAST_CERTIFIED_FRACTION = fraction
    if fraction < _MIN_CERTIFIED_FRACTION:
        return _attention(q, p, v, valid, t)
    out = _softmax_flat(q, v, t, rows, cols) if grid else _softmax_padded(q, v, t, index)
    if fraction < 1.0:
        rows, used = _rows_to_front(~certified)
        exact = _attention(q.gather(1, rows[..., None].expand(-1, -1, 3)), p, v, valid, t)
        b, r = used.nonzero(as_tuple=True)
        out = out.index_put((b, rows[b, r]), exact[b, r])
    return out


# Below this fraction of certified rows the whole call runs the attention backend instead.
_MIN_CERTIFIED_FRACTION = 0.5


def soft_nearest(
    query: Tensor,
    points: Tensor,
    temperature: Union[float, Tensor],
    points_lengths: Optional[Tensor] = None,
    values: Optional[Tensor] = None,
    backend: str = "auto",
    *,
    k: int = 32,
    truncation_tolerance: Optional[float] = None,
) -> SoftMatch:
    """Softmax-weighted average of the points (and values) near each query point.

    ``p_hat_i = sum_j softmax_j(-|q_i - p_j|^2 / T) p_j`` over the valid points ``j`` of the same
    cloud; ``values`` are averaged with the same weights. Padded points get weight 0; padded query
    rows (the caller knows which) hold finite values computed like any other row.

    Args:
        query: ``(B, N, 3)`` or ``(N, 3)``.
        points: ``(B, M, 3)`` or ``(M, 3)``, same dtype and device.
        temperature: ``T > 0`` in squared distance units, a number or a ``(B,)`` tensor (it may
            require grad).
        points_lengths: optional ``(B,)`` int64 valid point counts.
        values: optional ``(B, M, C)`` per-point values (e.g. normals) to average.
        backend: ``"dense"`` (materialises ``N x M``), ``"attention"`` (O(N + M) memory via
            ``scaled_dot_product_attention``), ``"truncated"`` (softmax over certified candidates,
            O(N k), uncertified rows by attention; see the module docstring) or ``"auto"``:
            truncated on a CPU with numba from ``TRUNCATED_MIN_PAIRS`` pairs per cloud, else
            attention when ``N * M > ATTENTION_MIN_PAIRS``, else dense.
        k: most candidates per query for ``"truncated"``; a positive integer, ignored by the
            other backends.
        truncation_tolerance: largest certified dropped weight relative to the largest weight
            (``eps`` in the module docstring), for ``"truncated"``; the result is then within
            ``tolerance * diameter`` of the exact match. Default: ``torch.finfo(dtype).eps``.

    Returns:
        :class:`SoftMatch` ``(points (B, N, 3), values (B, N, C) or None)``; unbatched if both
        clouds were.

    Example:
        >>> p = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
        >>> soft_nearest(torch.tensor([[0.5, 0.0, 0.0]]), p, temperature=1.0).points
        tensor([[0.5000, 0.0000, 0.0000]])
    """
    backend = checks.check_option("backend", backend, BACKENDS)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer (candidates per query); got {k!r}.")
    if truncation_tolerance is not None:
        checks.check_positive("truncation_tolerance", truncation_tolerance)
        if isinstance(truncation_tolerance, Tensor):
            truncation_tolerance = float(truncation_tolerance)
    query, q_unbatched = checks.as_batched_points("query", query)
    points, p_unbatched = checks.as_batched_points("points", points)
    checks.check_same_device(query=query, points=points, values=values)
    if query.dtype != points.dtype:
        raise TypeError(f"query has dtype {query.dtype} but points have dtype {points.dtype}; use one dtype.")
    B, N, _ = query.shape
    M = points.shape[1]
    if points.shape[0] != B:
        raise ValueError(f"query holds {B} clouds but points hold {points.shape[0]}; the batch sizes must match.")
    lengths = checks.check_lengths("points_lengths", points_lengths, B, M, points.device)
    t = _temperature(temperature, B, points)
    C = 0
    if values is not None:
        if not isinstance(values, Tensor):
            raise TypeError(f"values must be a torch.Tensor of shape (B, M, C); got {type(values).__name__}.")
        if values.dtype != points.dtype:
            raise TypeError(f"values has dtype {values.dtype} but points have dtype {points.dtype}; use one dtype.")
        if p_unbatched and values.dim() == 2:
            values = values[None]
        if values.dim() != 3 or values.shape[:2] != (B, M):
            raise ValueError(f"values must have shape ({B}, {M}, C), one row per point; got {tuple(values.shape)}.")
        C = values.shape[-1]

    valid = checks.lengths_mask(lengths, M)
    w = valid.to(points.dtype)[..., None]
    centre = (points * w).sum(1, keepdim=True) / lengths.to(points.dtype)[:, None, None]
    p = (points - centre) * w  # padding zeroed so it cannot overflow
    q = query - centre
    v = p if values is None else torch.cat([p, values], dim=-1)
    if backend == "auto":
        if points.device.type == "cpu" and _grid.AVAILABLE and N * M >= TRUNCATED_MIN_PAIRS:
            backend = "truncated"
        else:
            backend = "attention" if N * M > ATTENTION_MIN_PAIRS else "dense"
    if backend == "truncated":
        tol = truncation_tolerance if truncation_tolerance is not None else torch.finfo(points.dtype).eps
        out = _truncated(q, p, v, valid, t, lengths, k, float(tol), query, points)
    else:
        out = (_attention if backend == "attention" else _dense)(q, p, v, valid, t)
    matched = out[..., :3] + centre
    matched_values = out[..., 3:] if C else None
    if q_unbatched and p_unbatched:
        matched = matched[0]
        matched_values = matched_values[0] if C else None
    return SoftMatch(matched, matched_values)
