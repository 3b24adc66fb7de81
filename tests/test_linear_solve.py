"""Tests of diffcp.minimize.linear_solve.damped_solve: forward, transposed-LU backward, singular."""

import numpy as np
import pytest
import torch

from diffcp.minimize.linear_solve import damped_solve

D = torch.float64


def _lam(A, damping):
    n = A.shape[-1]
    d = max(damping, 64 * np.finfo(A.dtype).eps)
    return d * abs(np.trace(A)) / n + np.sqrt(np.finfo(A.dtype).tiny)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_numpy(dtype):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 6, 6, generator=g, dtype=D) + 6 * torch.eye(6, dtype=D)
    b = torch.randn(4, 6, generator=g, dtype=D)
    for damping in (1e-9, 1e-2, 0.5):
        x = damped_solve(A.to(dtype), b.to(dtype), damping)
        assert x.dtype == dtype
        for i in range(4):
            Ai = A[i].numpy().astype(np.float64)
            ref = np.linalg.solve(Ai + _lam(A[i].to(dtype).numpy(), damping) * np.eye(6), b[i].numpy())
            tol = 1e-4 if dtype == torch.float32 else 1e-11
            np.testing.assert_allclose(x[i].double().numpy(), ref, rtol=tol, atol=tol)


def test_scale_invariance():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(2, 6, 6, generator=g, dtype=D)
    A = A @ A.transpose(-1, -2)
    b = torch.randn(2, 6, generator=g, dtype=D)
    torch.testing.assert_close(damped_solve(1e4 * A, 1e4 * b, 1e-3), damped_solve(A, b, 1e-3))


def _inputs(seed, symmetric=False, n=6, B=2):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, n, n, generator=g, dtype=D) + n * torch.eye(n, dtype=D)
    if symmetric:
        A = (A + A.transpose(-1, -2)) / 2
    b = torch.randn(B, n, generator=g, dtype=D)
    return A.requires_grad_(), b.requires_grad_()


def test_gradcheck_non_symmetric():
    A, b = _inputs(2)
    assert (A - A.transpose(-1, -2)).abs().max() > 0.5
    for damping in (1e-9, 0.3):
        assert torch.autograd.gradcheck(lambda A, b: damped_solve(A, b, damping), (A, b))


def test_gradgradcheck():
    A, b = _inputs(3, n=4)
    assert torch.autograd.gradgradcheck(lambda A, b: damped_solve(A, b, 0.1), (A, b))


class _NaiveSolve(torch.autograd.Function):
    """DiffICP's defect: backward solves with A instead of A^T."""

    @staticmethod
    def forward(ctx, A, b):
        x = torch.linalg.solve(A, b)
        ctx.save_for_backward(A, x)
        return x

    @staticmethod
    def backward(ctx, gx):
        A, x = ctx.saved_tensors
        gb = torch.linalg.solve(A, gx)  # wrong: should be A^T
        return -gb[..., :, None] * x[..., None, :], gb


def test_naive_backward_fails_where_ours_passes():
    A, b = _inputs(4)
    assert torch.autograd.gradcheck(lambda A, b: damped_solve(A, b, 0.0), (A, b))
    assert not torch.autograd.gradcheck(_NaiveSolve.apply, (A, b), raise_exception=False)
    # on a symmetric matrix the naive backward happens to be right, which hid the defect
    As, bs = _inputs(5, symmetric=True)
    assert torch.autograd.gradcheck(_NaiveSolve.apply, (As, bs))


def test_gradient_matches_finite_difference_of_explicit_inverse():
    """Independent check: x = inv(M) b with autograd through torch.linalg.inv."""
    A, b = _inputs(6)
    x = damped_solve(A, b, 0.2)
    w = torch.randn_like(x)
    gA, gb = torch.autograd.grad((x * w).sum(), (A, b))
    A2, b2 = A.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    lam = 0.2 * torch.diagonal(A2, dim1=-2, dim2=-1).sum(-1).abs() / 6 + torch.finfo(D).tiny ** 0.5
    M = A2 + lam[:, None, None] * torch.eye(6, dtype=D)
    x2 = (torch.linalg.inv(M) @ b2[..., None])[..., 0]
    torch.testing.assert_close(x, x2)
    gA2, gb2 = torch.autograd.grad((x2 * w).sum(), (A2, b2))
    torch.testing.assert_close(gA, gA2)
    torch.testing.assert_close(gb, gb2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_singular_systems_stay_finite(dtype):
    g = torch.Generator().manual_seed(7)
    J = torch.randn(3, 20, 6, generator=g, dtype=D)
    J[0, :, 3:] = 0  # rank 3
    J[1] = J[1, :, :1] * torch.randn(1, 6, generator=g, dtype=D)  # rank 1
    A = (J.transpose(-1, -2) @ J).to(dtype)
    A[2] = 0  # all weights zero
    b = (J.transpose(-1, -2) @ torch.randn(3, 20, 1, generator=g, dtype=D))[..., 0].to(dtype)
    b[2] = 0
    A.requires_grad_()
    b.requires_grad_()
    x = damped_solve(A, b)
    assert torch.isfinite(x).all()
    assert x[2].abs().max() == 0
    # b lies in the range of A, so the damped solution still solves the system
    assert (A[:2] @ x[:2, :, None])[..., 0].sub(b[:2]).abs().max() < (1e-3 if dtype == torch.float32 else 1e-6)
    gA, gb = torch.autograd.grad(x[:2].square().sum(), (A, b))
    assert torch.isfinite(gA).all() and torch.isfinite(gb).all()


def test_errors():
    A, b = _inputs(8)
    with pytest.raises(ValueError, match="A must"):
        damped_solve(A[..., :5], b)
    with pytest.raises(ValueError, match="b must"):
        damped_solve(A, b[:, :5])
    with pytest.raises(TypeError, match="dtype"):
        damped_solve(A, b.float())
    with pytest.raises(ValueError, match="damping"):
        damped_solve(A, b, -1.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        damped_solve(A.detach().numpy(), b)
