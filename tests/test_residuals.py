"""Tests of diffcp.minimize.residuals: values, analytic Jacobians vs autograd, gradcheck, errors."""

import numpy as np
import pytest
import torch

from diffcp.geometry import apply_twist, random_transform, rotate_vectors, split_transform, transform_points
from diffcp.minimize.residuals import METRICS, residuals, residuals_and_jacobian, weighted_cost

D = torch.float64


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _data(B=2, N=7, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, N, 3, generator=g, dtype=dtype)
    q = torch.randn(B, N, 3, generator=g, dtype=dtype)
    ns = _unit(torch.randn(B, N, 3, generator=g, dtype=dtype))
    nq = _unit(torch.randn(B, N, 3, generator=g, dtype=dtype))
    return s, q, ns, nq


def _naive_residuals(metric, y, q, nq, ny):
    """Per-point numpy reference."""
    y, q = y.numpy(), q.numpy()
    out = []
    for b in range(y.shape[0]):
        rows = []
        for i in range(y.shape[1]):
            d = y[b, i] - q[b, i]
            if metric == "point_to_point":
                rows.append(d)
            elif metric == "point_to_plane":
                rows.append([np.dot(d, nq[b, i].numpy())])
            else:  # the target normal is flipped to face the source normal (as Open3D orients the pair)
                n_q = nq[b, i].numpy() * (1.0 if np.dot(ny[b, i].numpy(), nq[b, i].numpy()) >= 0 else -1.0)
                rows.append([np.dot(d, ny[b, i].numpy() + n_q)])
        out.append(rows)
    return np.asarray(out)


@pytest.mark.parametrize("metric", METRICS)
def test_residual_values_match_naive(metric):
    y, q, ny, nq = _data()
    r = residuals(metric, y, q, nq, ny)
    k = 3 if metric == "point_to_point" else 1
    assert r.shape == (2, 7, k)
    np.testing.assert_allclose(r.numpy(), _naive_residuals(metric, y, q, nq, ny), atol=1e-12)
    r2, J = residuals_and_jacobian(metric, y, q, nq, ny)
    assert J.shape == (2, 7, k, 6)
    torch.testing.assert_close(r2, r)


def _residual_of_pose(metric, T, s, q, ns, nq):
    y = transform_points(T, s)
    ny = rotate_vectors(split_transform(T)[0], ns)
    return residuals(metric, y, q, nq, ny)


@pytest.mark.parametrize("metric", METRICS)
def test_jacobian_matches_autograd_at_several_poses(metric):
    """Analytic J at pose T equals d/dxi residual(apply_twist(T, xi)) at xi = 0, for several T,
    including poses reached by random small twists."""
    s, q, ns, nq = _data(B=3, N=5, seed=1)
    g = torch.Generator().manual_seed(2)
    poses = [torch.eye(4, dtype=D).expand(3, 4, 4), random_transform(3, 3.0, 2.0, generator=g, dtype=D)]
    for _ in range(3):
        poses.append(apply_twist(poses[1], 0.1 * torch.randn(3, 6, generator=g, dtype=D)))
    for T in poses:
        y = transform_points(T, s)
        ny = rotate_vectors(split_transform(T)[0], ns)
        _, J = residuals_and_jacobian(metric, y, q, nq, ny)
        f = lambda xi: _residual_of_pose(metric, apply_twist(T, xi), s, q, ns, nq)
        Jad = torch.autograd.functional.jacobian(f, torch.zeros(3, 6, dtype=D))  # (B,N,k,B,6)
        Jad = torch.stack([Jad[b, :, :, b] for b in range(3)])
        torch.testing.assert_close(J, Jad, atol=1e-10, rtol=1e-10)
        # cross-batch blocks are zero
        Jfull = torch.autograd.functional.jacobian(f, torch.zeros(3, 6, dtype=D))
        assert Jfull[0, :, :, 1].abs().max() == 0


@pytest.mark.parametrize("metric", METRICS)
def test_jacobian_is_first_order_at_random_small_twist(metric):
    """J(T) predicts d residual/d xi at a small xi0 != 0 up to O(|xi0|), and the linear model
    r(T) + J xi has a second-order error."""
    s, q, ns, nq = _data(B=2, N=6, seed=3)
    T = random_transform(2, 2.0, 1.0, generator=torch.Generator().manual_seed(4), dtype=D)
    y = transform_points(T, s)
    r0, J = residuals_and_jacobian(metric, y, q, nq, rotate_vectors(split_transform(T)[0], ns))
    f = lambda xi: _residual_of_pose(metric, apply_twist(T, xi), s, q, ns, nq)
    direction = torch.randn(2, 6, generator=torch.Generator().manual_seed(5), dtype=D)
    errs = []
    for h in (1e-2, 1e-3):
        xi0 = h * direction
        Jad = torch.autograd.functional.jacobian(f, xi0)
        Jad = torch.stack([Jad[b, :, :, b] for b in range(2)])
        assert (Jad - J).abs().max() < 50 * h
        lin = r0 + torch.einsum("bnki,bi->bnk", J, xi0)
        errs.append((f(xi0) - lin).abs().max())
    assert errs[1] < errs[0] / 50  # quadratic: ratio ~100


@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_residuals_and_jacobian(metric):
    y, q, ny, nq = (t.requires_grad_() for t in _data(B=2, N=4, seed=6))

    def fn(y, q, ny, nq):
        return residuals_and_jacobian(metric, y, q, nq, ny)

    assert torch.autograd.gradcheck(fn, (y, q, ny, nq))


def test_symmetric_uses_rotated_source_normal():
    """The symmetric residual must move when only the source normal is rotated by the pose."""
    s, q, ns, nq = _data(B=1, N=5, seed=7)
    T = random_transform(1, 1.0, 0.0, generator=torch.Generator().manual_seed(8), dtype=D)
    y = transform_points(T, s)
    r_rot = residuals("symmetric", y, q, nq, rotate_vectors(split_transform(T)[0], ns))
    r_raw = residuals("symmetric", y, q, nq, ns)
    assert (r_rot - r_raw).abs().max() > 1e-3


def test_weighted_cost_matches_naive_and_handles_zero_weights():
    g = torch.Generator().manual_seed(9)
    r = torch.randn(3, 8, 3, generator=g, dtype=D)
    w = torch.rand(3, 8, generator=g, dtype=D)
    w[1] = 0.0
    c = weighted_cost(r, w)
    for b in range(3):
        num = sum(w[b, i].item() * float(r[b, i] @ r[b, i]) for i in range(8))
        den = max(w[b].sum().item(), 1e-300)
        assert abs(c[b].item() - num / den) < 1e-12
    assert c[1] == 0
    rr, ww = r.clone().requires_grad_(), w.clone().requires_grad_()
    weighted_cost(rr, ww).sum().backward()
    assert torch.isfinite(rr.grad).all() and torch.isfinite(ww.grad).all()
    inputs = (r[[0, 2]].clone().requires_grad_(), w[[0, 2]].clone().requires_grad_())
    assert torch.autograd.gradcheck(weighted_cost, inputs)


def test_float32_follows_input_dtype():
    y, q, ny, nq = (t.float() for t in _data())
    for metric in METRICS:
        r, J = residuals_and_jacobian(metric, y, q, nq, ny)
        assert r.dtype == J.dtype == torch.float32


def test_errors():
    y, q, ny, nq = _data()
    with pytest.raises(ValueError, match="metric"):
        residuals("plane", y, q, nq, ny)
    with pytest.raises(ValueError, match="target_normals"):
        residuals("point_to_plane", y, q)
    with pytest.raises(ValueError, match="source_normals"):
        residuals_and_jacobian("symmetric", y, q, nq)
    with pytest.raises(ValueError, match="q"):
        residuals("point_to_point", y, q[:, :3])
    with pytest.raises(ValueError, match="y"):
        residuals("point_to_point", y[0], q[0])
    with pytest.raises(TypeError, match="y"):
        residuals("point_to_point", y.long(), q)
    with pytest.raises(TypeError, match="q"):
        residuals("point_to_point", y, q.float())
    with pytest.raises(ValueError, match="weights"):
        weighted_cost(y, torch.ones(2, 3, dtype=D))
