"""Hard-NN point-to-point ICP as one compiled loop on the CPU (inference and forward passes).

For the plainest and most common ICP (hard nearest neighbours, point-to-point, Procrustes, no
weighting or rejection) nothing in an iteration needs autograd, so when no gradient is asked for
the whole loop of :func:`diffcp.icp` runs here, on float64 host arrays, without a tensor per step:

1. one parallel pass per iteration moves the source, finds every exact nearest neighbour and sums
   the weighted moments Procrustes needs (:func:`diffcp.search.grid._fused_point_to_point`);
   queries that moved less than half their certified gap keep their neighbour without a search;
2. Procrustes from those moments, the determinant-corrected polar factor of the cross-covariance
   (:func:`_procrustes_moments`, the same maths as :func:`diffcp.minimize.procrustes_from_moments`);
3. the convergence test on the twist between successive transforms (:func:`_twist_norms`, as
   :func:`diffcp.geometry.twist_between`), and converged clouds are frozen and skipped.

Transforms are rounded to the caller's dtype after every update, as the general loop does, so
float32 runs follow the same path; the convergence test itself is evaluated in float64. The
results equal the general loop's (tests: to 1e-9 in float64, with padding and masks).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .geometry import _SMALL_ANGLE
from .minimize.linear_solve import _EPS_FLOOR
from .search.grid import _PLANE_SUMS, _njit

__all__ = ["run_point_to_point", "run_gauss_newton", "conditioning_point_to_point", "conditioning_gauss_newton",
           "point_to_point_diagnostics"]


@_njit()
def _procrustes_moments(partial, source_ref, target_ref, active, transform):
    """Procrustes from the chunk moments ``partial (B, chunks, 17)`` of the fused pass into
    ``transform (B, 4, 4)`` for the active clouds: ``R`` is the determinant-corrected polar factor
    of the weighted cross-covariance (identity where it vanishes), ``t = q_bar - R s_bar``. Every
    active cloud needs a positive weight sum."""
    B = partial.shape[0]
    m = np.empty(17)
    M = np.empty((3, 3))
    for b in range(B):
        if not active[b]:
            continue
        for v in range(17):
            m[v] = partial[b, :, v].sum()
        w = m[0]
        sb = m[1:4] / w
        qb = m[4:7] / w
        for i in range(3):
            for k in range(3):
                M[i, k] = m[7 + 3 * i + k] / w - qb[i] * sb[k]
        U, S, Vh = np.linalg.svd(M)
        if S[0] == 0.0:
            R = np.eye(3)
        else:
            if np.linalg.det(U @ Vh) < 0:
                U[:, 2] = -U[:, 2]
            R = U @ Vh
        s = sb + source_ref[b]
        q = qb + target_ref[b]
        for i in range(3):
            for k in range(3):
                transform[b, i, k] = R[i, k]
            transform[b, i, 3] = q[i] - (R[i, 0] * s[0] + R[i, 1] * s[1] + R[i, 2] * s[2])
            transform[b, 3, i] = 0.0
        transform[b, 3, 3] = 1.0


@_njit()
def _twist_norms(new, old, out):
    """``out[b] = (|omega|, |v|)`` of the twist taking ``old (B, 4, 4)`` to ``new``: ``exp(omega)
    = R_new R_old^T`` and ``v = t_new - exp(omega) t_old`` (the norms of
    :func:`diffcp.geometry.twist_between`, with the same small-angle series)."""
    B = new.shape[0]
    dR = np.empty((3, 3))
    for b in range(B):
        for i in range(3):
            for k in range(3):
                dR[i, k] = new[b, i, 0] * old[b, k, 0] + new[b, i, 1] * old[b, k, 1] + new[b, i, 2] * old[b, k, 2]
        cos = min(max((dR[0, 0] + dR[1, 1] + dR[2, 2] - 1.0) / 2.0, -1.0), 1.0)
        w0 = (dR[2, 1] - dR[1, 2]) / 2.0
        w1 = (dR[0, 2] - dR[2, 0]) / 2.0
        w2 = (dR[1, 0] - dR[0, 1]) / 2.0
        sin = math.sqrt(w0 * w0 + w1 * w1 + w2 * w2)
        theta = math.atan2(sin, cos)
        out[b, 0] = sin * (1.0 + theta * theta / 6.0) if theta < _SMALL_ANGLE else theta
        v2 = 0.0
        for i in range(3):
            vi = new[b, i, 3] - (dR[i, 0] * old[b, 0, 3] + dR[i, 1] * old[b, 1, 3] + dR[i, 2] * old[b, 2, 3])
            v2 += vi * vi
        out[b, 1] = math.sqrt(v2)


@_njit()
def _scale_blocks(A, g, sc):
    """In place, as :func:`diffcp.minimize.gauss_newton.twist_solve`: ``A <- S A S``, ``g <- S g``,
    ``sc <- diag(S)``, ``S = diag(sqrt(m_trans / m_rot) I_3, I_3)`` where the rotation block's mean
    diagonal ``m_rot`` exceeds the translation block's ``m_trans``, else the identity."""
    m_rot = (A[0, 0] + A[1, 1] + A[2, 2]) / 3.0
    m_trans = (A[3, 3] + A[4, 4] + A[5, 5]) / 3.0
    s_rot = math.sqrt(m_trans / m_rot) if (m_rot > m_trans and m_trans > 0) else 1.0
    for i in range(6):
        sc[i] = s_rot if i < 3 else 1.0
    for i in range(6):
        g[i] *= sc[i]
        for k in range(6):
            A[i, k] *= sc[i] * sc[k]


@_njit()
def _gauss_newton_update(partial, active, damping, weak_damping, floor, old, new):
    """One damped Gauss-Newton step from the sums ``partial (B, chunks, 32)`` of the plane pass,
    for the active clouds: ``xi = -S (S A S + lambda I)^{-1} S g`` with ``S`` the block scaling of
    :func:`diffcp.minimize.gauss_newton.twist_solve`, ``lambda = d |trace S A S| / 6 + floor``,
    ``d = damping``, or ``weak_damping`` where the damped matrix is (near) singular (as
    :func:`diffcp.minimize.damped_solve`), then ``new = apply_twist(old, xi)``: ``R <-
    exp(omega) R``, ``t <- exp(omega) t + v``."""
    B = partial.shape[0]
    m = np.empty(_PLANE_SUMS)
    A = np.empty((6, 6))
    g = np.empty(6)
    K = np.empty((3, 3))
    sc = np.empty(6)
    for b in range(B):
        if not active[b]:
            continue
        for v in range(_PLANE_SUMS):
            m[v] = partial[b, :, v].sum()
        v = 1
        for i in range(6):
            for k in range(i, 6):
                A[i, k] = m[v]
                A[k, i] = m[v]
                v += 1
            g[i] = m[22 + i]
        _scale_blocks(A, g, sc)
        trace = abs(A[0, 0] + A[1, 1] + A[2, 2] + A[3, 3] + A[4, 4] + A[5, 5])
        lam = damping * trace / 6.0 + floor
        for i in range(6):
            A[i, i] += lam
        if weak_damping > damping:
            ev = np.linalg.eigvalsh(A)
            if not ev[0] > weak_damping * ev[5]:
                for i in range(6):
                    A[i, i] += (weak_damping - damping) * trace / 6.0
        xi = -np.linalg.solve(A, g) * sc
        # Rodrigues, with the series of diffcp.geometry.so3_exp near zero
        w0, w1, w2 = xi[0], xi[1], xi[2]
        theta2 = w0 * w0 + w1 * w1 + w2 * w2
        if theta2 < _SMALL_ANGLE * _SMALL_ANGLE:
            a = 1.0 - theta2 / 6.0 + theta2 * theta2 / 120.0
            c = 0.5 - theta2 / 24.0 + theta2 * theta2 / 720.0
        else:
            theta = math.sqrt(theta2)
            a = math.sin(theta) / theta
            c = (1.0 - math.cos(theta)) / theta2
        K[0, 0], K[0, 1], K[0, 2] = 0.0, -w2, w1
        K[1, 0], K[1, 1], K[1, 2] = w2, 0.0, -w0
        K[2, 0], K[2, 1], K[2, 2] = -w1, w0, 0.0
        E = np.eye(3) + a * K + c * (K @ K)
        for i in range(3):
            for k in range(3):
                new[b, i, k] = E[i, 0] * old[b, 0, k] + E[i, 1] * old[b, 1, k] + E[i, 2] * old[b, 2, k]
            new[b, i, 3] = E[i, 0] * old[b, 0, 3] + E[i, 1] * old[b, 1, 3] + E[i, 2] * old[b, 2, 3] + xi[3 + i]
            new[b, 3, i] = 0.0
        new[b, 3, 3] = 1.0


@_njit()
def _advance(T, T_new, active, group, converged, count, errors, it, w_sum, r2_sum, tolerance, trans_tol, tiny,
             single, relative_rmse):
    """The bookkeeping of one iteration of the freezing loop for the clouds of ``group``: round the
    active clouds' new transforms to float32 when ``single``, test convergence on the twist between
    the old and the new transform (as :func:`_twist_norms`), record the cost at the old transform
    (frozen clouds repeat their last one), take the new transforms, count the iteration. Returns
    whether every cloud of the group has converged."""
    B = T.shape[0]
    norms = np.empty((1, 2))
    done = True
    for b in range(B):
        if not group[b]:
            continue
        if active[b]:
            if single:
                for i in range(4):
                    for k in range(4):
                        T_new[b, i, k] = np.float64(np.float32(T_new[b, i, k]))
            _twist_norms(T_new[b:b + 1], T[b:b + 1], norms)
            err = math.sqrt(r2_sum[b] / max(w_sum[b], tiny))
            errors[b, it] = np.float64(np.float32(err)) if single else err
            for i in range(4):
                for k in range(4):
                    T[b, i, k] = T_new[b, i, k]
            count[b] += 1
            if norms[0, 0] <= tolerance and norms[0, 1] <= trans_tol[b]:
                converged[b] = True
            elif relative_rmse > 0 and it > 0 and \
                    abs(errors[b, it - 1] - errors[b, it]) <= relative_rmse * errors[b, it - 1]:
                converged[b] = True
        elif it > 0:
            errors[b, it] = errors[b, it - 1]
        done = done and converged[b]
    return done


def _round_to(a: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """``a`` rounded to ``dtype`` (kept in float64), as ``tensor.to(dtype)`` would (round to nearest even)."""
    if dtype == torch.float64:
        return a
    if dtype == torch.float32:
        return a.astype(np.float32).astype(np.float64)
    return torch.from_numpy(a).to(dtype).double().numpy()


# Clouds are registered in groups whose working set (host copies, buffers, target points and their
# neighbour graph: about 72 N + 136 M bytes per cloud) stays within this many bytes, all iterations
# of one group before the next: every pass then finds its data in the cache. Clouds are independent,
# so the results do not depend on the grouping.
GROUP_BYTES = 8 * 2**20


def _group_size(B: int, N: int, M: int) -> int:
    return int(max(1, min(B, GROUP_BYTES // (72 * N + 136 * M))))


def _loop(pass_and_update, index, source, weights, init, iterations, tolerance, scale, relative_rmse):
    """The freezing loop of :func:`diffcp.icp` on float64 host arrays, group of clouds by group
    (:data:`GROUP_BYTES`); ``pass_and_update(T, warm, active, T_new)`` runs one fused pass, writes
    the updated transforms of the active clouds into ``T_new`` and returns ``(indices, weight sums
    (B,), weighted squared residual sums (B,))``."""
    dtype, device = source.dtype, source.device
    B, N = source.shape[:2]
    T = _round_to(init.detach().to(device="cpu", dtype=torch.float64).numpy().copy(), dtype)
    T_new = T.copy()
    trans_tol = tolerance * scale.detach().to(device="cpu", dtype=torch.float64).numpy()
    tiny = torch.finfo(dtype).tiny ** 0.5
    if dtype not in (torch.float32, torch.float64):
        return None  # the general loop rounds to other dtypes
    single = dtype == torch.float32
    converged = np.zeros(B, dtype=bool)
    count = np.zeros(B, dtype=np.int64)
    errors = np.zeros((B, iterations))
    columns = 0
    first_warm = None
    if index.warm_start and index._previous is not None and index._previous.shape == (B, N):
        first_warm = index._previous.cpu().numpy().copy()
    warm = first_warm
    step = _group_size(B, N, index.points.shape[1])
    for start in range(0, B, step):
        group = np.zeros(B, dtype=bool)
        group[start:start + step] = True
        warm = first_warm  # only a guess for this group's first pass
        last = -1
        for it in range(iterations):
            active = group & ~converged
            idx, w_sum, r2_sum = pass_and_update(T, warm, active, T_new)
            warm = idx if index.warm_start else None
            last = it
            if _advance(T, T_new, active, group, converged, count, errors, it, w_sum, r2_sum, tolerance, trans_tol,
                        tiny, single, float(relative_rmse)):
                break
        if last >= 0:
            errors[group, last + 1:] = errors[group, last][:, None]
        columns = max(columns, last + 1)
    if warm is not None:
        index._previous = torch.from_numpy(np.array(warm))
        index.certified_fraction = index._grid_index().certified_fraction
    to = dict(device=device)
    return (torch.from_numpy(T).to(dtype=dtype, **to), torch.from_numpy(converged).to(**to),
            torch.from_numpy(count).to(**to), torch.from_numpy(errors[:, :columns].copy()).to(dtype=dtype, **to))


def run_point_to_point(index, source: Tensor, weights: Tensor, source_lengths: Tensor, init: Tensor,
                       iterations: int, tolerance: float, scale: Tensor, relative_rmse: float = 0.0
                       ) -> Optional[Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The freezing ICP loop of :func:`diffcp.icp` for hard-NN point-to-point Procrustes, compiled.

    Args:
        index: the target's :class:`diffcp.search.NearestNeighborIndex` (grid backend).
        source: ``(B, N, 3)``; weights ``(B, N)`` (selection times padding); source_lengths ``(B,)``.
        init: ``(B, 4, 4)`` starting transforms; iterations, tolerance: as in :func:`diffcp.icp`;
        scale: ``(B,)`` cloud radii (the translation tolerance is ``tolerance * scale``).
        relative_rmse: a cloud also stops when its RMS error changes by at most this fraction.

    Returns:
        ``(T (B, 4, 4), converged (B,), count (B,), errors (B, iterations run))`` on the source's
        device and dtype, or None when a cloud has no weight (the general loop handles it).
    """
    if not bool((weights.detach().sum(1) > 0).all()):
        return None
    grid = index._grid_index()

    def pass_and_update(T, warm, active, T_new):
        partial, idx, source_ref, target_ref = grid.point_to_point_moments(
            source, T, weights, source_lengths, warm, index.warm_neighbors, active=active
        )
        _procrustes_moments(partial, source_ref, target_ref, active, T_new)
        moments = partial.sum(1)
        return idx, moments[:, 0], moments[:, 16]

    return _loop(pass_and_update, index, source, weights, init, iterations, tolerance, scale, relative_rmse)


def run_gauss_newton(index, source: Tensor, weights: Tensor, source_lengths: Tensor, target_normals: Tensor,
                     source_normals: Optional[Tensor], init: Tensor, iterations: int, tolerance: float,
                     scale: Tensor, damping: float, relative_rmse: float = 0.0
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The freezing ICP loop of :func:`diffcp.icp` for hard-NN point-to-plane (``source_normals``
    None) or symmetric ICP with one damped Gauss-Newton step per iteration (``solver="linear"``),
    compiled. ``target_normals``: ``(B, M, 3)`` of the index's points; ``source_normals``: ``(B, N,
    3)`` in the source frame; ``damping`` as in :func:`diffcp.minimize.damped_solve`. Other
    arguments and the result as :func:`run_point_to_point`."""
    grid = index._grid_index()
    weak = max(float(damping), _EPS_FLOOR * torch.finfo(source.dtype).eps)
    floor = torch.finfo(source.dtype).tiny ** 0.5

    def pass_and_update(T, warm, active, T_new):
        partial, idx = grid.plane_normal_equations(source, T, weights, source_lengths, target_normals, warm,
                                                   index.warm_neighbors, active=active, source_normals=source_normals)
        _gauss_newton_update(partial, active, float(damping), weak, floor, T, T_new)
        sums = partial.sum(1)
        return idx, sums[:, 0], sums[:, 28]

    return _loop(pass_and_update, index, source, weights, init, iterations, tolerance, scale, relative_rmse)


def conditioning_point_to_point(index, source: Tensor, transform: Tensor, weights: Tensor,
                                source_lengths: Tensor) -> Tensor:
    """:func:`diffcp.minimize.procrustes_conditioning` of the hard-NN matches at ``transform``,
    from one fused pass: ``(s'_2 + s'_3) / s_1`` of the weighted cross-covariance, ``(B,)``."""
    return point_to_point_diagnostics(index, source, transform, weights, source_lengths)[0]


def point_to_point_diagnostics(index, source: Tensor, transform: Tensor, weights: Tensor,
                               source_lengths: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """From one fused pass at ``transform``: the conditioning of :func:`conditioning_point_to_point`,
    the weight sums and the weighted sums of squared distances to the matches, each ``(B,)``."""
    grid = index._grid_index()
    warm = None
    if index.warm_start and index._previous is not None and index._previous.shape == tuple(source.shape[:2]):
        warm = index._previous.cpu().numpy()
    partial, _, _, _ = grid.point_to_point_moments(source, transform, weights, source_lengths, warm,
                                                   index.warm_neighbors)
    m = partial.sum(1)
    w = np.maximum(m[:, 0], np.finfo(np.float64).tiny)
    sb, qb = m[:, 1:4] / w[:, None], m[:, 4:7] / w[:, None]
    M = m[:, 7:16].reshape(-1, 3, 3) / w[:, None, None] - qb[:, :, None] * sb[:, None, :]
    U, S, Vh = np.linalg.svd(M)
    s3 = np.where(np.linalg.det(U @ Vh) < 0, -S[:, 2], S[:, 2])
    cond = np.where(S[:, 0] > 0, (S[:, 1] + s3) / np.where(S[:, 0] > 0, S[:, 0], 1.0), 0.0)
    return torch.from_numpy(cond), torch.from_numpy(m[:, 0].copy()), torch.from_numpy(m[:, 16].copy())


def conditioning_gauss_newton(index, source: Tensor, transform: Tensor, weights: Tensor, source_lengths: Tensor,
                              target_normals: Tensor, source_normals: Optional[Tensor], scale: Tensor) -> Tensor:
    """The conditioning that :func:`diffcp.icp` checks for Gauss-Newton metrics, from one plane
    pass at ``transform``: the eigenvalue ratio ``min / max`` of the normal matrix written about
    the weighted centroid ``c`` of the moved points, with the rotation block scaled by ``1 / scale``
    (``(B,)``). Centring changes each Jacobian row ``[rot, n]`` to ``[rot - c x n, n] = [rot, n] P``
    with ``P = [[I, 0], [hat(c), I]]``, so the centred matrix is ``P^T A P``."""
    grid = index._grid_index()
    warm = None
    if index.warm_start and index._previous is not None and index._previous.shape == tuple(source.shape[:2]):
        warm = index._previous.cpu().numpy()
    partial, _ = grid.plane_normal_equations(source, transform, weights, source_lengths, target_normals, warm,
                                             index.warm_neighbors, source_normals=source_normals)
    m = partial.sum(1)
    B = m.shape[0]
    A = np.zeros((B, 6, 6))
    iu = np.triu_indices(6)
    A[:, iu[0], iu[1]] = m[:, 1:22]
    A = A + np.triu(A, 1).transpose(0, 2, 1)
    tiny = np.finfo(np.float64).tiny
    c = m[:, 29:32] / np.maximum(m[:, :1], tiny)
    P = np.tile(np.eye(6), (B, 1, 1))
    P[:, 3, 1], P[:, 3, 2] = -c[:, 2], c[:, 1]
    P[:, 4, 0], P[:, 4, 2] = c[:, 2], -c[:, 0]
    P[:, 5, 0], P[:, 5, 1] = -c[:, 1], c[:, 0]
    A = P.transpose(0, 2, 1) @ A @ P
    s = scale.detach().to(device="cpu", dtype=torch.float64).numpy()
    d = np.concatenate([np.repeat(1 / s[:, None], 3, 1), np.ones((B, 3))], 1)
    ev = np.linalg.eigvalsh(A * d[:, :, None] * d[:, None, :])
    return torch.from_numpy(ev[:, 0] / np.maximum(ev[:, -1], tiny))
