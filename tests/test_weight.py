import doctest
import math

import numpy as np
import open3d as o3d
import pytest
import torch
from torch.autograd import gradcheck

import diffcp.weight as weight_module
from diffcp.weight import distance_weights, normal_weights, robust_weights

KERNELS = ["huber", "tukey", "cauchy", "geman_mcclure"]


# Independent references: the losses rho(r; s) written out in plain Python floats.
def rho(kernel, r, s):
    r = abs(r)
    if kernel == "huber":
        return r * r / 2 if r <= s else s * (r - s / 2)
    if kernel == "tukey":
        return s * s / 6 * (1 - (1 - (r / s) ** 2) ** 3) if r <= s else s * s / 6
    if kernel == "cauchy":
        return s * s / 2 * math.log1p((r / s) ** 2)
    return s * s / 2 * (r / s) ** 2 / (1 + (r / s) ** 2)


def open3d_weight(kernel, r, s):
    reg = o3d.pipelines.registration
    if kernel == "huber":
        return reg.HuberLoss(s).weight(r)
    if kernel == "tukey":
        return reg.TukeyLoss(s).weight(r)
    if kernel == "cauchy":
        return reg.CauchyLoss(s).weight(r)
    return s * s * reg.GMLoss(s * s).weight(r)  # documented parametrisation difference


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_doctests():
    assert doctest.testmod(weight_module).failed == 0


# ---------------------------------------------------------------- distance_weights
def test_distance_weights_match_naive():
    g = torch.Generator().manual_seed(0)
    sq = torch.rand(3, 50, generator=g, dtype=torch.float64) * 4
    w = distance_weights(sq, 1.5)
    ref = np.clip(1 - np.sqrt(sq.numpy()) / 1.5, 0, 1)
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-12, atol=1e-12)
    per_cloud = torch.tensor([[0.5], [1.0], [2.0]], dtype=torch.float64)
    ref = np.clip(1 - np.sqrt(sq.numpy()) / per_cloud.numpy(), 0, 1)
    np.testing.assert_allclose(distance_weights(sq, per_cloud).numpy(), ref, rtol=1e-12, atol=1e-12)


def test_distance_weights_float32_and_gradients():
    sq = torch.tensor([[0.0, -1e-9, 0.3, 9.0]], requires_grad=True)
    w = distance_weights(sq, 1.0)
    assert w.dtype == torch.float32
    assert w[0, 1] == 1.0  # slightly negative rounds to distance 0
    w.sum().backward()
    assert torch.isfinite(sq.grad).all()
    assert sq.grad[0, 3] == 0  # beyond max_distance: flat
    assert sq.grad[0, 2] == pytest.approx(-0.5 / math.sqrt(0.3))


def test_distance_weights_gradcheck():
    g = torch.Generator().manual_seed(1)
    sq = (torch.rand(2, 6, generator=g, dtype=torch.float64) * 0.8 + 0.05).requires_grad_()
    md = torch.tensor([[1.0], [1.2]], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, b: distance_weights(a, b), (sq, md))


def test_distance_weights_valid_mask_ignores_garbage():
    sq = torch.tensor([[0.25, float("nan"), float("inf")]], requires_grad=True)
    valid = torch.tensor([[True, False, False]])
    w = distance_weights(sq, 1.0, valid=valid)
    assert torch.equal(w, torch.tensor([[0.5, 0.0, 0.0]]))
    w.sum().backward()
    assert torch.isfinite(sq.grad).all() and (sq.grad[0, 1:] == 0).all()


# ---------------------------------------------------------------- normal_weights
def test_normal_weights_match_naive_and_gradcheck():
    g = torch.Generator().manual_seed(2)
    ns = unit(torch.randn(2, 40, 3, generator=g, dtype=torch.float64))
    nt = unit(torch.randn(2, 40, 3, generator=g, dtype=torch.float64))
    w = normal_weights(ns, nt)
    ref = np.clip(np.einsum("bnk,bnk->bn", ns.numpy(), nt.numpy()), 0, 1)
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-12, atol=1e-12)
    keep = w > 0.05  # away from the clamp at 0
    ns_k, nt_k = ns[keep][None].requires_grad_(), nt[keep][None].requires_grad_()
    assert gradcheck(normal_weights, (ns_k, nt_k))


def test_normal_weights_padding_and_shapes():
    n = torch.tensor([[[0.0, 0.0, 1.0], [float("nan"), 0.0, 0.0]]], requires_grad=True)
    w = normal_weights(n, n.detach().nan_to_num(), valid=torch.tensor([[True, False]]))
    assert torch.equal(w, torch.tensor([[1.0, 0.0]]))
    w.sum().backward()
    assert torch.isfinite(n.grad).all()
    with pytest.raises(ValueError, match="target_normals"):
        normal_weights(torch.zeros(1, 4, 3), torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="source_normals"):
        normal_weights(torch.zeros(1, 4, 2), torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="valid"):
        normal_weights(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), valid=torch.ones(1, 5, dtype=torch.bool))


# ---------------------------------------------------------------- robust_weights
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_robust_weights_are_rho_prime_over_r(kernel, scale):
    # avoid exactly |r| = s, where Huber/Tukey have a kink
    rs = [x for x in np.linspace(-3 * scale, 3 * scale, 41) if abs(abs(x) - scale) > 1e-3 and x != 0]
    w = robust_weights(torch.tensor([rs], dtype=torch.float64), kernel, scale)[0]
    h = 1e-6 * scale
    for r, wi in zip(rs, w.tolist()):
        deriv = (rho(kernel, r + h, scale) - rho(kernel, r - h, scale)) / (2 * h)
        assert wi == pytest.approx(deriv / r, rel=1e-6, abs=1e-8), (kernel, r)
    w0 = robust_weights(torch.zeros(1, 1, dtype=torch.float64), kernel, scale)
    assert w0.item() == 1.0  # rho ~ r^2/2 near 0


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_robust_weights_match_open3d(kernel, scale):
    rs = np.linspace(0.0, 4 * scale, 33)
    w = robust_weights(torch.tensor(rs[None]), kernel, scale)[0].numpy()
    ref = np.array([open3d_weight(kernel, float(r), scale) for r in rs])
    np.testing.assert_allclose(w, ref, rtol=1e-9, atol=1e-12)
    # negative residuals: same weight (Open3D takes |r| only in some kernels; ours is even)
    np.testing.assert_allclose(robust_weights(torch.tensor(-rs[None]), kernel, scale)[0].numpy(), ref, rtol=1e-9)


@pytest.mark.parametrize("kernel", KERNELS)
def test_robust_weights_vector_residuals_use_norm(kernel):
    g = torch.Generator().manual_seed(3)
    r3 = torch.randn(2, 30, 3, generator=g, dtype=torch.float64)
    r3[0, 0] = 0.0
    w3 = robust_weights(r3, kernel, 0.9)
    w1 = robust_weights(r3.norm(dim=-1), kernel, 0.9)
    torch.testing.assert_close(w3, w1, rtol=1e-12, atol=1e-12)
    assert ((w3 >= 0) & (w3 <= 1)).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_robust_weights_gradcheck(kernel):
    g = torch.Generator().manual_seed(4)
    r3 = torch.randn(2, 5, 3, generator=g, dtype=torch.float64) * 0.5
    r3[0, 0] = 0.0  # zero residual: gradient must exist and be finite
    r3.requires_grad_()
    scale = torch.tensor([[1.3], [1.7]], dtype=torch.float64, requires_grad=True)
    norms = r3.detach().norm(dim=-1)
    assert ((norms - scale.detach()).abs() > 1e-3).all()  # away from the Huber/Tukey kinks
    assert gradcheck(lambda r, s: robust_weights(r, kernel, s), (r3, scale))
    r1 = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    assert gradcheck(lambda r: robust_weights(r, kernel, 0.8), (r1,))


def test_robust_weights_float32_padding_and_nan_free():
    r = torch.tensor([[0.0, 0.5, float("nan")], [3.0, 0.0, 1e20]], requires_grad=True)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    for kernel in KERNELS:
        w = robust_weights(r, kernel, 1.0, valid=valid)
        assert w.dtype == torch.float32 and w[0, 2] == 0
        (grad,) = torch.autograd.grad(w.sum(), r)
        assert torch.isfinite(grad).all(), kernel


def test_robust_weights_bad_arguments():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kernel"):
        robust_weights(r, "welsch")
    with pytest.raises(ValueError, match="scale"):
        robust_weights(r, "huber", -1.0)
    with pytest.raises(ValueError, match="scale"):
        robust_weights(r, "huber", 0.0)
    with pytest.raises(ValueError, match="scale"):
        robust_weights(r, "huber", torch.ones(3, 1))
    with pytest.raises(ValueError, match="residuals"):
        robust_weights(torch.zeros(1, 2, 3, 4), "huber")
    with pytest.raises(TypeError, match="residuals"):
        robust_weights(torch.zeros(2, 3, dtype=torch.int64), "huber")
    with pytest.raises(ValueError, match="max_distance"):
        distance_weights(r, -0.5)
    with pytest.raises(TypeError, match="valid"):
        distance_weights(r, 1.0, valid=torch.ones(2, 3))
