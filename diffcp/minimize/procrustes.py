"""Weighted Procrustes (Kabsch; Umeyama with scale) with a gradient that survives symmetry.

Given matched points ``s_i -> q_i`` and weights ``w_i >= 0``, the rigid motion ``y = R x + t``
minimising ``sum_i w_i |R s_i + t - q_i|^2`` is found in closed form:

1. weighted centroids ``s_bar, q_bar``; centred points ``a_i = s_i - s_bar``, ``b_i = q_i - q_bar``;
2. cross-covariance ``M = sum_i w_i b_i a_i^T / sum_i w_i`` (target times source transposed; the
   cost is ``const - 2 trace(R^T M)``, so the best ``R`` is the rotation nearest to ``M``);
3. ``R`` is the determinant-corrected orthogonal polar factor of ``M``: with ``M = U S V^T``,
   ``R = U D V^T``, ``D = diag(1, 1, det(U V^T))``, so ``det R = +1`` even for mirrored data;
4. ``t = q_bar - R s_bar``.

:func:`umeyama` adds the scale of a similarity ``y = s R x + t``: ``s = trace(R^T M) / var(a)``,
``t = q_bar - s R s_bar``.

Step 3 is a custom :class:`torch.autograd.Function`. Autograd through ``torch.linalg.svd`` divides
by ``s_i^2 - s_j^2`` and is NaN/Inf whenever singular values repeat (a cube's corners, a square, any
regular polygon; pytorch issue #49886), although the polar factor itself is perfectly smooth there.
Our backward differentiates the polar factor directly and only divides by sums ``s'_i + s'_j`` of
signed singular values (see :class:`_PolarRotation`), which vanish only when the rotation is truly
ambiguous (collinear points); those sums are clamped so the gradient stays finite.

:func:`procrustes_reference` is the naive autograd-through-SVD version (same forward maths), kept
to demonstrate the failure; :func:`procrustes_conditioning` measures how well ``R`` is determined.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from diffcp import checks

__all__ = ["Procrustes", "Similarity", "procrustes", "procrustes_conditioning", "procrustes_from_moments", "umeyama"]


class Procrustes(NamedTuple):
    """Result of :func:`procrustes`: ``y = rotation @ x + translation`` maps source to target."""

    rotation: Tensor  # (B, 3, 3) or (3, 3)
    translation: Tensor  # (B, 3) or (3,)


class Similarity(NamedTuple):
    """Result of :func:`umeyama`: ``y = scale * rotation @ x + translation`` maps source to target."""

    rotation: Tensor  # (B, 3, 3) or (3, 3)
    translation: Tensor  # (B, 3) or (3,)
    scale: Tensor  # (B,) or ()


def _signed_svd(M: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``M = Ut diag(s') V^T`` with ``R = Ut V^T`` a rotation: ``Ut = U D``, ``s' = D s``.

    ``D = diag(1, 1, det(U V^T))``; since ``D^2 = I``, ``U S V^T = (U D)(D S) V^T``. The signed
    ``s'`` are sorted decreasingly and only ``s'_3`` can be negative.
    """
    U, S, Vh = torch.linalg.svd(M)
    det = torch.linalg.det(U @ Vh)
    d = torch.ones_like(S)
    d[..., 2] = torch.where(det < 0, -1.0, 1.0).to(S.dtype)
    return U * d[..., None, :], S * d, Vh.transpose(-1, -2)


class _PolarRotation(torch.autograd.Function):
    r"""Rotation nearest to ``M (B, 3, 3)`` with a backward that is stable at repeated singular values.

    Derivation (the book cites it). Write the signed SVD ``M = U' S' V^T`` (``U' = U D``,
    ``S' = diag(s')``, ``s' = D s``), so ``R = U' V^T`` and ``M = R P`` with the symmetric
    ``P = V S' V^T``. Differentiating ``M = R P``::

        dM = dR P + R dP,   dR = R Omega  (Omega antisymmetric, since R stays a rotation).

    Left-multiply by ``R^T``, conjugate by ``V`` and use ``R V = U'``::

        A := U'^T dM V = W S' + E,   W = V^T Omega V (antisymmetric),  E = V^T dP V (symmetric).

    The symmetric part ``E`` drops out of ``A - A^T = W S' + S' W``, i.e. entrywise
    ``A_ij - A_ji = W_ij (s'_i + s'_j)``. Hence::

        W_ij = (A_ij - A_ji) / (s'_i + s'_j),      dR = U' W V^T.

    Adjoint: for an incoming gradient ``G = dL/dR``,
    ``<G, dR> = <U'^T G V, W> =: <Gt, W>``. With ``K_ij = 1/(s'_i + s'_j)`` (symmetric, zero on the
    diagonal), ``<Gt, (A - A^T) o K> = <(Gt - Gt^T) o K, A>``, and ``<Y, U'^T dM V> = <U' Y V^T, dM>``::

        dL/dM = U' Y V^T,     Y = (Gt - Gt^T) o K.

    Only sums ``s'_i + s'_j`` appear (autograd through the SVD divides by ``s_i^2 - s_j^2``), so
    repeated singular values are harmless. The sums are ``>= 0``; the smallest, ``s'_2 + s'_3``,
    is zero only if the rotation is ambiguous (collinear or coincident points). Sums with
    ``|s'_i + s'_j| < eps * max(s_1, sqrt(eps_dtype))`` are replaced by that floor (sign kept) so
    the gradient stays finite. :func:`procrustes` passes ``M`` normalised by the clouds' extent
    (``|a_i|, |b_i| <= 1``), so ``s_1 < sqrt(eps_dtype)`` means that the cross-covariance is
    rounding noise next to the clouds (one cloud collapsed onto a point, e.g. every soft match the
    same blurred point): the rotation is then as ambiguous as for collinear points, and the floor
    keeps ``1 / den`` (and the gradient times it) far from the dtype's overflow, which a floor of
    ``eps * s_1`` alone did not (``s_1`` reached 3e-39 on a float32 cloud of one repeated point).
    When ``M = 0`` (``s_1 = 0``) the forward returns the identity and the gradient is zero.
    """

    @staticmethod
    def forward(ctx, M: Tensor, eps: float) -> Tensor:
        Ut, s, V = _signed_svd(M)
        zero = s[..., 0] == 0
        R = Ut @ V.transpose(-1, -2)
        eye = torch.eye(3, dtype=M.dtype, device=M.device)
        R = torch.where(zero[..., None, None], eye, R)
        ctx.save_for_backward(Ut, s, V, zero)
        ctx.eps = eps
        return R

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        Ut, s, V, zero = ctx.saved_tensors
        den = s[..., :, None] + s[..., None, :]
        finfo = torch.finfo(s.dtype)
        scale = s[..., 0].abs().clamp_min(finfo.eps ** 0.5)  # M is normalised: s_1 <= 3, see _prepare
        floor = (ctx.eps * scale).clamp_min(finfo.tiny)[..., None, None]
        den = torch.where(den.abs() < floor, torch.where(den < 0, -floor, floor), den)
        Gt = Ut.transpose(-1, -2) @ grad @ V
        Y = (Gt - Gt.transpose(-1, -2)) / den  # diagonal is exactly zero
        grad_M = Ut @ Y @ V.transpose(-1, -2)
        return torch.where(zero[..., None, None], torch.zeros_like(grad_M), grad_M), None


class _Moments(NamedTuple):
    cross: Tensor  # (B, 3, 3) M / r^2, r the larger extent of the two centred clouds
    source_var: Tensor  # (B,) sum_i w_i |a_i|^2 / (r^2 sum_i w_i), 0 without weight
    source_mean: Tensor  # (B, 3)
    target_mean: Tensor  # (B, 3)
    unbatched: bool


def _prepare(source, target, weights, lengths) -> _Moments:
    """Validate inputs; return the normalised weighted moments (see module docs and :class:`_Moments`)."""
    source, unbatched = checks.as_batched_points("source", source)
    target, unbatched_t = checks.as_batched_points("target", target)
    if unbatched != unbatched_t or source.shape != target.shape:
        raise ValueError(
            "target must have the shape of source (matched points, one per source point); got "
            f"source {tuple(source.shape[unbatched:])} and target {tuple(target.shape[unbatched_t:])}."
        )
    if source.dtype != target.dtype:
        raise TypeError(f"target must have the dtype of source ({source.dtype}); got {target.dtype}.")
    checks.check_same_device(source=source, target=target, weights=weights, lengths=lengths)
    B, N, _ = source.shape
    if unbatched and isinstance(lengths, Tensor) and lengths.dim() == 0:
        lengths = lengths[None]
    mask = checks.lengths_mask(checks.check_lengths("lengths", lengths, B, N, source.device), N)
    if weights is None:
        w = mask.to(source.dtype)
    else:
        if not isinstance(weights, Tensor):
            raise TypeError(f"weights must be a torch.Tensor of shape (B, N) or None; got {type(weights).__name__}.")
        if not weights.is_floating_point():
            raise TypeError(f"weights must have a floating-point dtype; got {weights.dtype}.")
        shape = tuple(weights.shape)
        if unbatched and weights.dim() == 1:
            weights = weights[None]
        if weights.shape != (B, N):
            expected = (N,) if unbatched else (B, N)
            raise ValueError(f"weights must have shape {expected}, one weight per point; got {shape}.")
        if checks.ENABLED and not bool((torch.isfinite(weights) & (weights >= 0)).all()):
            raise ValueError("weights must be finite and non-negative.")
        w = torch.where(mask, weights.to(source.dtype), torch.zeros((), dtype=source.dtype, device=source.device))
    total = w.sum(-1)
    has_weight = total > 0
    # zero total weight: unweighted centroids of the real points, identity rotation (M = 0)
    w_c = torch.where(has_weight[:, None], w, mask.to(w.dtype))
    w_n = w_c / w_c.sum(-1, keepdim=True)
    s_bar = (w_n[:, None, :] @ source)[:, 0]
    q_bar = (w_n[:, None, :] @ target)[:, 0]
    a = source - s_bar[:, None]
    b = target - q_bar[:, None]
    # Normalised by the larger extent r of the two centred clouds (largest |coordinate| of a weighted
    # point, no gradient): the rotation of M / r^2 is the rotation of M (and so is its gradient,
    # which is orthogonal to M), but M / r^2 is of order 1 for any scale and no coordinate is
    # squared, so nothing underflows for tiny clouds nor overflows for huge ones in float32.
    with torch.no_grad():
        used = (w_n * has_weight[:, None] > 0)[..., None]
        extent = torch.where(used, torch.maximum(a.abs(), b.abs()), torch.zeros((), dtype=a.dtype, device=a.device))
        r = extent.amax((1, 2))
        r = torch.where(r > 0, r, torch.ones_like(r))[:, None, None]  # no weight, or one point: M = 0 anyway
    a, b = a / r, b / r
    wa = (w_n * has_weight[:, None])[..., None]
    M = (b * wa).transpose(-1, -2) @ a
    return _Moments(M, (wa * a * a).sum((1, 2)), s_bar, q_bar, unbatched)


def _finish(R: Tensor, s_bar: Tensor, q_bar: Tensor, unbatched: bool) -> Procrustes:
    t = q_bar - (R @ s_bar[..., None])[..., 0]
    return Procrustes(R[0], t[0]) if unbatched else Procrustes(R, t)


def umeyama(
    source: Tensor,
    target: Tensor,
    weights: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    gradient_eps: float = 1e-2,
) -> Similarity:
    """Best similarity ``y = s R x + t`` (source to target) for matched points: weighted Umeyama.

    Minimises ``sum_i w_i |s R a_i + t - q_i|^2`` over rotations, scales ``s > 0`` and
    translations in closed form (Umeyama 1991, with weights): ``R`` is the rotation of
    :func:`procrustes` (the same cross-covariance ``M``, the same stable backward),
    ``s = trace(R^T M) / var`` with ``var = sum_i w_i |a_i|^2 / sum_i w_i`` the source's weighted
    variance about its centroid (``trace(R^T M)`` is the sum of the signed singular values, so a
    mirrored cloud gets the scale of the best rotation, not of the reflection), and
    ``t = q_bar - s R s_bar``. This is PyTorch3D's ``corresponding_points_alignment(...,
    estimate_scale=True)`` with weights. Differentiable w.r.t. ``source``, ``target``, ``weights``.

    Args:
        source, target, weights, lengths, gradient_eps: as in :func:`procrustes`.

    Returns:
        ``Similarity(rotation (B, 3, 3), translation (B, 3), scale (B,))``, unbatched if the input
        was. The scale is 1 where it is undefined: a cloud whose weights sum to zero or whose
        source has no extent (all its weighted points at one place).

    Example:
        >>> from diffcp.geometry import so3_exp
        >>> src = torch.tensor([[0., 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3]], dtype=torch.float64)
        >>> R0 = so3_exp(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
        >>> R, t, s = umeyama(src, 2.5 * src @ R0.T + 1.0)
        >>> torch.allclose(R, R0), round(float(s), 12), torch.allclose(t, torch.ones(3, dtype=torch.float64))
        (True, 2.5, True)
    """
    checks.check_positive("gradient_eps", gradient_eps, allow_zero=True)
    m = _prepare(source, target, weights, lengths)
    R = _PolarRotation.apply(m.cross, float(gradient_eps))
    fit = (R * m.cross).sum((-2, -1))  # trace(R^T M) / r^2
    var = m.source_var  # / r^2 as well
    defined = var > 0
    scale = torch.where(defined, fit / var.clamp_min(torch.finfo(var.dtype).tiny ** 0.5), torch.ones_like(var))
    sR = scale[:, None, None] * R
    t = m.target_mean - (sR @ m.source_mean[..., None])[..., 0]
    return Similarity(R[0], t[0], scale[0]) if m.unbatched else Similarity(R, t, scale)


def procrustes(
    source: Tensor,
    target: Tensor,
    weights: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    gradient_eps: float = 1e-2,
) -> Procrustes:
    """Best rigid motion ``y = R x + t`` (source to target) for matched points, in closed form.

    Minimises ``sum_i w_i |R s_i + t - q_i|^2`` over rotations (``det R = +1``, never a
    reflection) and translations. Differentiable w.r.t. ``source``, ``target`` and ``weights``;
    the rotation's backward is stable for symmetric shapes (see the module docstring).

    Args:
        source: ``(N, 3)`` or ``(B, N, 3)`` points ``s_i``.
        target: same shape, the matched points ``q_i``.
        weights: ``(N,)`` / ``(B, N)`` non-negative weights, or None for ones.
        lengths: ``(B,)`` int64 number of real points per cloud; the rest is padding (weight 0).
        gradient_eps: sums of signed singular values below ``gradient_eps * s_1`` are clamped in
            the backward, bounding the gradient by ``~1 / (gradient_eps s_1)`` where the rotation
            is (nearly) ambiguous (collinear points) and leaving it exact elsewhere. The default
            1e-2 was chosen by measurement (``benchmarks/procrustes_gradient_eps.py``): gradient
            descent from a degenerate start stalls for 1e-8 (median loss 4.0 after 2000 steps)
            and converges for 1e-2 (1e-13), while only matrices with ``(s'_2 + s'_3) / s_1 <
            1e-2``, nearly collinear data, get a clamped gradient.

    Returns:
        ``Procrustes(rotation (B, 3, 3), translation (B, 3))``, unbatched if the input was. A
        cloud whose weights sum to zero gets the identity rotation and the translation between
        the (unweighted) centroids of its real points. Nothing is ever NaN, and gradients stay
        finite even for collinear or coincident points (where the rotation is arbitrary).

    Example:
        >>> from diffcp.geometry import so3_exp
        >>> src = torch.tensor([[0., 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3]])
        >>> R0 = so3_exp(torch.tensor([0.1, 0.2, 0.3]))
        >>> R, t = procrustes(src, src @ R0.T + torch.tensor([1., 2, 3]))
        >>> torch.allclose(R, R0, atol=1e-5), torch.allclose(t, torch.tensor([1., 2, 3]), atol=1e-5)
        (True, True)
    """
    checks.check_positive("gradient_eps", gradient_eps, allow_zero=True)
    m = _prepare(source, target, weights, lengths)
    R = _PolarRotation.apply(m.cross, float(gradient_eps))
    return _finish(R, m.source_mean, m.target_mean, m.unbatched)


def procrustes_from_moments(weight_sum: Tensor, source_sum: Tensor, target_sum: Tensor, cross_sum: Tensor,
                            source_ref: Tensor, target_ref: Tensor) -> Procrustes:
    """:func:`procrustes` from accumulated weighted moments (no autograd: for fused CPU passes).

    With ``x' = x - source_ref`` and ``q' = q - target_ref`` (references near the clouds keep the
    uncentred sums accurate), the inputs are ``sum w`` ``(B,)``, ``sum w x'`` and ``sum w q'``
    ``(B, 3)``, and ``sum w q' x'^T`` ``(B, 3, 3)``. Every ``weight_sum`` must be positive. The
    rotation is the same determinant-corrected polar factor as in :func:`procrustes`.

    Example:
        >>> x = torch.tensor([[[0., 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3]]], dtype=torch.float64)
        >>> q = x + torch.tensor([1., 2, 3], dtype=torch.float64)
        >>> ref = torch.zeros(1, 3, dtype=torch.float64)
        >>> R, t = procrustes_from_moments(torch.tensor([4.0], dtype=torch.float64), x.sum(1), q.sum(1),
        ...                                q.transpose(1, 2) @ x, ref, ref)
        >>> torch.allclose(R, torch.eye(3, dtype=torch.float64)), torch.allclose(t, q[:, 0] - x[:, 0])
        (True, True)
    """
    with torch.no_grad():
        s_bar = source_sum / weight_sum[:, None]
        q_bar = target_sum / weight_sum[:, None]
        M = cross_sum / weight_sum[:, None, None] - q_bar[:, :, None] * s_bar[:, None, :]
        R = _PolarRotation.apply(M, 0.0)
        return _finish(R, s_bar + source_ref, q_bar + target_ref, False)


def procrustes_reference(
    source: Tensor, target: Tensor, weights: Optional[Tensor] = None, lengths: Optional[Tensor] = None
) -> Procrustes:
    """Same as :func:`procrustes` but differentiated by autograd through ``torch.linalg.svd``.

    For demonstrations and tests only: its gradient is NaN/Inf (or wrong) when singular values of
    the cross-covariance repeat, e.g. for a cube's corners, a square or a regular polygon.
    """
    M, _, s_bar, q_bar, unbatched = _prepare(source, target, weights, lengths)
    U, S, Vh = torch.linalg.svd(M)
    with torch.no_grad():
        d = torch.ones_like(S)
        d[..., 2] = torch.where(torch.linalg.det(U @ Vh) < 0, -1.0, 1.0).to(S.dtype)
    R = (U * d[..., None, :]) @ Vh
    return _finish(R, s_bar, q_bar, unbatched)


def procrustes_conditioning(
    source: Tensor, target: Tensor, weights: Optional[Tensor] = None, lengths: Optional[Tensor] = None
) -> Tensor:
    """How well the Procrustes rotation is determined: ``(s'_2 + s'_3) / s_1`` in ``[0, 2]``.

    ``s'`` are the signed singular values of the weighted cross-covariance (the third one carries
    the sign of the reflection correction). ``s'_2 + s'_3`` is the smallest denominator of the
    rotation's gradient; a value near 0 means the rotation is ill-determined (collinear or
    coincident points, or a mirrored, nearly planar cloud), so callers such as the ICP loop can warn.
    Not differentiable (returned detached).

    Args:
        source, target, weights, lengths: as in :func:`procrustes`.

    Returns:
        ``(B,)`` (``()`` for unbatched input); 0 where the cross-covariance vanishes.

    Example:
        >>> line = torch.tensor([[0., 0, 0], [1, 0, 0], [2, 0, 0]])
        >>> float(procrustes_conditioning(line, line)) < 1e-6
        True
    """
    with torch.no_grad():
        M, _, _, _, unbatched = _prepare(source, target, weights, lengths)
        _, s, _ = _signed_svd(M)
        s1 = s[..., 0]
        c = torch.where(s1 > 0, (s[..., 1] + s[..., 2]) / torch.where(s1 > 0, s1, torch.ones_like(s1)), torch.zeros_like(s1))
    return c[0] if unbatched else c
