import doctest
import math

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

import diffcp.reject as reject_module
from diffcp.reject import reject_by_distance, reject_by_normal_angle


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def sample_normals(seed, n=200):
    g = torch.Generator().manual_seed(seed)
    ns = unit(torch.randn(2, n, 3, generator=g, dtype=torch.float64))
    nt = unit(torch.randn(2, n, 3, generator=g, dtype=torch.float64))
    return ns, nt


def angles_deg(ns, nt):
    # independent reference: the angle itself, from numpy's arccos
    dot = np.clip(np.einsum("bnk,bnk->bn", ns.numpy(), nt.numpy()), -1, 1)
    return np.degrees(np.arccos(dot))


def naive_weighted_kabsch(x, y, w):
    """Weighted least-squares rigid fit y ~ R x + t (numpy SVD), used to show that a constant
    weight rejects nothing."""
    w = w / w.sum()
    cx, cy = (w[:, None] * x).sum(0), (w[:, None] * y).sum(0)
    H = ((x - cx) * w[:, None]).T @ (y - cy)
    U, _, Vt = np.linalg.svd(H)
    D = np.diag([1, 1, np.sign(np.linalg.det(Vt.T @ U.T))])
    R = Vt.T @ D @ U.T
    return R, cy - R @ cx


def test_doctests():
    assert doctest.testmod(reject_module).failed == 0


# ---------------------------------------------------------------- distance
def test_hard_distance_matches_naive_including_boundary():
    g = torch.Generator().manual_seed(0)
    sq = torch.rand(3, 100, generator=g, dtype=torch.float64) * 4
    sq[0, 0] = 1.0  # exactly on the threshold: kept (d <= max_distance)
    w = reject_by_distance(sq, 1.0)
    ref = (np.sqrt(sq.numpy()) <= 1.0).astype(np.float64)
    assert w.dtype == torch.float64 and w[0, 0] == 1
    np.testing.assert_array_equal(w.numpy(), ref)
    sq.requires_grad_()
    assert not reject_by_distance(sq, 1.0).requires_grad  # hard mask: not differentiable


def test_soft_distance_formula_and_limits():
    g = torch.Generator().manual_seed(1)
    d = torch.rand(2, 300, generator=g, dtype=torch.float64) * 3
    sq = d * d
    soft = reject_by_distance(sq, 1.5, temperature=0.2)
    np.testing.assert_allclose(soft.numpy(), 1 / (1 + np.exp(-(1.5 - d.numpy()) / 0.2)), rtol=1e-12)
    hard = reject_by_distance(sq, 1.5)
    far = (d - 1.5).abs() > 1e-3
    cold = reject_by_distance(sq, 1.5, temperature=1e-6)
    assert torch.equal(cold[far], hard[far])
    hot = reject_by_distance(sq, 1.5, temperature=1e9)
    torch.testing.assert_close(hot, torch.full_like(hot, 0.5), rtol=0, atol=1e-8)


def test_soft_distance_gradcheck_and_zero_distance():
    g = torch.Generator().manual_seed(2)
    sq = (torch.rand(2, 7, generator=g, dtype=torch.float64) * 2 + 0.01).requires_grad_()
    md = torch.tensor([[0.8], [1.1]], dtype=torch.float64, requires_grad=True)
    temp = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, b, c: reject_by_distance(a, b, c), (sq, md, temp))
    zero = torch.zeros(1, 3, requires_grad=True)
    reject_by_distance(zero, 1.0, 0.1).sum().backward()
    assert torch.isfinite(zero.grad).all()


def test_constant_weight_rejects_nothing():
    # T -> inf gives w = 1/2 everywhere; a weighted least-squares fit is unchanged by a constant weight
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = x @ torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0].T
    y = y + 0.05 * torch.randn(60, 3, generator=g, dtype=torch.float64) + 1.0
    w = reject_by_distance(((y - x) ** 2).sum(-1)[None], 0.1, temperature=1e12)[0]
    R1, t1 = naive_weighted_kabsch(x.numpy(), y.numpy(), w.numpy())
    R0, t0 = naive_weighted_kabsch(x.numpy(), y.numpy(), np.ones(60))
    np.testing.assert_allclose(R1, R0, atol=1e-10)
    np.testing.assert_allclose(t1, t0, atol=1e-10)
    hard = reject_by_distance(((y - x) ** 2).sum(-1)[None], 1.5)[0].numpy()
    assert 0 < hard.sum() < 60  # while a real rejection changes the data the fit sees


def test_distance_valid_mask_and_float32():
    sq = torch.tensor([[0.5, float("nan"), 9.0]], requires_grad=True)
    valid = torch.tensor([[True, False, True]])
    for temperature in (0.0, 0.5):
        w = reject_by_distance(sq, 1.0, temperature, valid=valid)
        assert w.dtype == torch.float32 and w[0, 1] == 0 and torch.isfinite(w).all()
    reject_by_distance(sq, 1.0, 0.5, valid=valid).sum().backward()
    assert torch.isfinite(sq.grad).all() and sq.grad[0, 1] == 0


def test_distance_bad_arguments():
    sq = torch.ones(2, 3)
    with pytest.raises(ValueError, match="max_distance"):
        reject_by_distance(sq, -1.0)
    with pytest.raises(ValueError, match="temperature"):
        reject_by_distance(sq, 1.0, -0.1)
    with pytest.raises(ValueError, match="temperature"):
        reject_by_distance(sq, 1.0, float("inf"))
    with pytest.raises(ValueError, match="temperature"):
        reject_by_distance(sq, 1.0, torch.tensor([[0.0], [1.0]]))
    with pytest.raises(ValueError, match="valid"):
        reject_by_distance(sq, 1.0, valid=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="sq_distances"):
        reject_by_distance(sq.long(), 1.0)


# ---------------------------------------------------------------- normal angle
@pytest.mark.parametrize("max_angle", [10.0, 45.0, 90.0, 135.0])
def test_hard_normal_angle_matches_naive(max_angle):
    ns, nt = sample_normals(4)
    w = reject_by_normal_angle(ns, nt, max_angle)
    ang = angles_deg(ns, nt)
    far = np.abs(ang - max_angle) > 1e-6
    np.testing.assert_array_equal(w.numpy()[far], (ang <= max_angle).astype(np.float64)[far])


def test_normal_angle_180_keeps_everything():
    ns, nt = sample_normals(5)
    ns = torch.cat([ns, -nt[:, :1] * (1 + 1e-15)], dim=1)
    nt = torch.cat([nt, nt[:, :1]], dim=1)
    assert (reject_by_normal_angle(ns, nt, 180.0) == 1).all()


def test_soft_normal_angle_formula_limits_and_gradcheck():
    ns, nt = sample_normals(6)
    c = (ns * nt).sum(-1)
    cos_max = math.cos(math.radians(60.0))
    soft = reject_by_normal_angle(ns, nt, 60.0, temperature=0.05)
    torch.testing.assert_close(soft, 1 / (1 + torch.exp(-(c - cos_max) / 0.05)), rtol=1e-12, atol=1e-12)
    hard = reject_by_normal_angle(ns, nt, 60.0)
    far = (c - cos_max).abs() > 1e-4
    assert torch.equal(reject_by_normal_angle(ns, nt, 60.0, temperature=1e-7)[far], hard[far])
    hot = reject_by_normal_angle(ns, nt, 60.0, temperature=1e9)
    torch.testing.assert_close(hot, torch.full_like(hot, 0.5), rtol=0, atol=1e-8)
    a, b = ns[:, :6].clone().requires_grad_(), nt[:, :6].clone().requires_grad_()
    ang = torch.tensor(50.0, dtype=torch.float64, requires_grad=True)
    temp = torch.tensor([[0.2], [0.4]], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda p, q, m, t: reject_by_normal_angle(p, q, m, t), (a, b, ang, temp))


def test_normal_angle_valid_and_bad_arguments():
    n = torch.tensor([[[0.0, 0.0, 1.0], [float("nan"), 0.0, 0.0]]], requires_grad=True)
    w = reject_by_normal_angle(n, n.detach().nan_to_num(), 30.0, 0.1, valid=torch.tensor([[True, False]]))
    assert w[0, 1] == 0 and torch.isfinite(w).all()
    w.sum().backward()
    assert torch.isfinite(n.grad).all()
    z = torch.zeros(1, 4, 3)
    for bad in (0.0, -5.0, 190.0):
        with pytest.raises(ValueError, match="max_angle_deg"):
            reject_by_normal_angle(z, z, bad)
    with pytest.raises(ValueError, match="temperature"):
        reject_by_normal_angle(z, z, 30.0, -1.0)
    with pytest.raises(ValueError, match="target_normals"):
        reject_by_normal_angle(z, torch.zeros(1, 3, 3), 30.0)
    with pytest.raises(TypeError, match="max_angle_deg"):
        reject_by_normal_angle(z, z, "30")
