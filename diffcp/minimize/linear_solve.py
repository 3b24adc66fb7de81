"""Batched damped linear solve with a custom backward that reuses the LU factors."""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_positive

__all__ = ["damped_solve"]

# Where the system is (near) rank-deficient, the relative damping is raised to this many machine
# epsilons, so that it stays invertible in float32 (where the default 1e-9 is below the rounding
# error). Well-conditioned systems keep the damping asked for, so their solution is exact.
_EPS_FLOOR = 64.0


def _lambda(A: Tensor, d: Tensor) -> Tensor:
    """``lambda = d * |trace(A)| / n + sqrt(tiny)`` per system, ``d`` of shape ``A.shape[:-2]``."""
    n = A.shape[-1]
    trace = torch.diagonal(A, dim1=-2, dim2=-1).sum(-1)
    return d * trace.abs() / n + torch.finfo(A.dtype).tiny ** 0.5


def _shifted(A: Tensor, lam: Tensor) -> Tensor:
    return A + lam[..., None, None] * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)


def _relative_damping(A: Tensor, damping: float):
    """The relative damping per system and the LU factors of ``A + lambda I``: ``damping`` where
    that factorisation is well conditioned (smallest over largest pivot above ``64 eps``), else the
    floor ``max(damping, 64 eps)``."""
    floor = _EPS_FLOOR * torch.finfo(A.dtype).eps
    d = torch.full(A.shape[:-2], float(damping), dtype=A.dtype, device=A.device)
    LU, pivots, _ = torch.linalg.lu_factor_ex(_shifted(A, _lambda(A, d)))
    if damping < floor:
        u = torch.diagonal(LU, dim1=-2, dim2=-1).abs()
        weak = ~(u.amin(-1) > floor * u.amax(-1))  # NaN (a zero pivot) counts as weak
        if bool(weak.any()):
            d = torch.where(weak, torch.full_like(d, floor), d)
            LU, pivots = torch.linalg.lu_factor(_shifted(A, _lambda(A, d)))
    return d, LU, pivots


class _DampedSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A: Tensor, b: Tensor, damping: float) -> Tensor:
        d, LU, pivots = _relative_damping(A, damping)
        x = torch.linalg.lu_solve(LU, pivots, b[..., None])[..., 0]
        ctx.save_for_backward(A, LU, pivots, x, d)
        return x

    @staticmethod
    def backward(ctx, grad_x: Tensor):
        A, LU, pivots, x, d = ctx.saved_tensors
        if torch.is_grad_enabled():
            # double backward: rebuild M from A so that the graph reaches A
            grad_b = torch.linalg.solve(_shifted(A, _lambda(A, d)).transpose(-1, -2), grad_x)
        else:
            grad_b = torch.linalg.lu_solve(LU, pivots, grad_x[..., None], adjoint=True)[..., 0]
        grad_M = -grad_b[..., :, None] * x[..., None, :]
        # lambda depends on A through d * |trace(A)| / n
        n = A.shape[-1]
        trace = torch.diagonal(A, dim1=-2, dim2=-1).sum(-1)
        grad_lam = torch.diagonal(grad_M, dim1=-2, dim2=-1).sum(-1)
        coef = grad_lam * torch.sign(trace) * (d / n)
        grad_A = grad_M + coef[..., None, None] * torch.eye(n, dtype=A.dtype, device=A.device)
        return grad_A, grad_b, None


def damped_solve(A: Tensor, b: Tensor, damping: float = 1e-9) -> Tensor:
    """Solve ``(A + lambda I) x = b`` for a batch of square systems, differentiably.

    ``lambda = d * |trace(A)| / n + sqrt(tiny)`` with ``d = damping``, raised to ``64 eps`` for
    the systems whose damped matrix has a pivot below ``64 eps`` of the largest: relative to the
    mean diagonal, so scaling ``A`` and ``b`` together leaves ``x`` unchanged; exact (up to
    ``damping``) for well-posed systems, in float32 too; and never so small that a rank-deficient
    ``A`` (e.g. point-to-plane on collinear points) or an all-zero ``A`` (all weights 0) gives a
    non-finite ``x`` or gradient. ``A`` need not be symmetric.

    The forward factorises ``M = A + lambda I`` once (``torch.linalg.lu_factor``); the backward
    reuses the factors. Derivation: from ``M x = b``, ``dM x + M dx = db``, so
    ``dx = M^{-1} (db - dM x)``. For a loss ``L`` with ``g_x = dL/dx``,
    ``dL = g_x^T M^{-1} (db - dM x) = g_b^T db - g_b^T dM x`` where ``g_b = M^{-T} g_x``
    (an *adjoint* LU solve, ``lu_solve(..., adjoint=True)``). Hence ``g_b = M^{-T} g_x`` and
    ``g_M = -g_b x^T``; ``g_A = g_M + (d / n) sign(trace A) trace(g_M) I`` adds the path through
    ``lambda``. Using ``M^{-1}`` instead of ``M^{-T}`` (DiffICP's backward) is right only for
    symmetric ``M``. Double backward is supported (it re-solves with ``torch.linalg.solve``).

    Args:
        A: ``(B, n, n)`` system matrices (any leading batch shape).
        b: ``(B, n)`` right-hand sides.
        damping: relative Tikhonov damping ``d >= 0``.

    Returns:
        ``(B, n)`` solutions ``x``, dtype and device of ``A``.

    Example:
        >>> A = torch.tensor([[[2.0, 1.0], [0.0, 4.0]]]); b = torch.tensor([[3.0, 4.0]])
        >>> torch.allclose(damped_solve(A, b), torch.tensor([[1.0, 1.0]]), atol=1e-4)
        True
    """
    if not isinstance(A, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"A and b must be torch.Tensors; got {type(A).__name__} and {type(b).__name__}.")
    if not A.is_floating_point() or A.dtype != b.dtype:
        raise TypeError(f"A and b must share one floating-point dtype; got {A.dtype} and {b.dtype}.")
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must have shape (B, n, n), a batch of square matrices; got {tuple(A.shape)}.")
    if b.shape != A.shape[:-1]:
        raise ValueError(f"b must have shape {tuple(A.shape[:-1])} to match A {tuple(A.shape)}; got {tuple(b.shape)}.")
    if isinstance(damping, Tensor):
        raise TypeError("damping must be a Python number, not a tensor.")
    check_positive("damping", damping, allow_zero=True)
    return _DampedSolve.apply(A, b, float(damping))
