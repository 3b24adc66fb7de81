"""ICP as a layer: learnable temperatures, their gradients in every backward mode, and tensor or
per-cloud temperatures in the function form."""

import json

import pytest
import torch
from torch import nn

import diffcp
from diffcp import settings as S
from diffcp.geometry import random_transform, rotation_error, transform_points

from shapes import sample

F64 = torch.float64
MODES = ["unroll", "truncated", "implicit"]


def _pair(n=10, batch=1, seed=1, angle=0.15, shift=0.05):
    """Source clouds sampled on a bumpy sphere, targets = the moved sources, and the motions."""
    pts = torch.stack([sample("bumpy_sphere", n, seed=seed + b)[0] for b in range(batch)])
    g = torch.Generator().manual_seed(seed + 100)
    T = random_transform(batch, max_angle=angle, max_translation=shift, generator=g, dtype=F64)
    return pts, transform_points(T, pts), T


def _backward(mode):
    return S.TruncatedBackward(iterations=25) if mode == "truncated" else mode


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_soft_correspondence_temperature(mode):
    src, tgt, _ = _pair()

    def f(t):
        out = diffcp.icp(src, tgt, correspondence=S.SoftNearestNeighbor(temperature=t),
                         stopping=S.Stopping(max_iterations=200, tolerance=1e-14), backward=_backward(mode))
        return out.transform[:, :3, :]

    t = torch.tensor(0.05, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(f(t).sum(), t)
    assert g.abs() > 1e-4  # the temperature matters here
    assert torch.autograd.gradcheck(f, (t,), eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_soft_rejection_temperature(mode):
    src, tgt, _ = _pair(n=12)
    tn = diffcp.estimate_normals(tgt, k=6)

    def f(t):
        out = diffcp.icp(src, tgt, target_normals=tn, metric="point_to_plane", solver="gauss_newton",
                         correspondence=S.SoftNearestNeighbor(temperature=0.05),
                         rejection=[S.DistanceRejection(0.15, temperature=t)],
                         stopping=S.Stopping(max_iterations=200, tolerance=1e-14), backward=_backward(mode))
        return out.transform[:, :3, :]

    t = torch.tensor(0.02, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(f(t).sum(), t)
    assert g.abs() > 1e-6
    assert torch.autograd.gradcheck(f, (t,), eps=1e-7, atol=1e-5, rtol=1e-3)


def test_gradcheck_per_cloud_temperatures_unrolled():
    src, tgt, _ = _pair(n=10, batch=2)

    def f(t):
        out = diffcp.icp(src, tgt, correspondence=S.SoftNearestNeighbor(temperature=t),
                         stopping=S.Stopping(max_iterations=4, tolerance=0))
        return out.transform[:, :3, :]

    t = torch.tensor([0.05, 0.08], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (t,))
    # each cloud's result depends on its own temperature only
    jac = torch.autograd.functional.jacobian(f, t)  # (2, 3, 4, 2)
    assert jac[0, ..., 1].abs().max() == 0 and jac[1, ..., 0].abs().max() == 0
    assert jac[0, ..., 0].abs().max() > 0 and jac[1, ..., 1].abs().max() > 0


def test_tensor_temperature_keeps_its_gradient_in_the_function_form():
    src, tgt, _ = _pair(n=50)
    t = torch.tensor(1e-2, dtype=F64, requires_grad=True)
    out = diffcp.icp(src, tgt, correspondence=S.SoftNearestNeighbor(temperature=t))
    assert out.transform.requires_grad
    (g,) = torch.autograd.grad(out.translation.sum(), t)
    assert torch.isfinite(g) and g != 0


def test_per_cloud_temperatures_equal_a_loop_over_clouds():
    src, tgt, _ = _pair(n=60, batch=3)
    temps = torch.tensor([1e-3, 1e-2, 5e-2], dtype=F64)
    stop = S.Stopping(max_iterations=6, tolerance=0)
    batched = diffcp.icp(src, tgt, correspondence=S.SoftNearestNeighbor(temperature=temps), stopping=stop)
    for b in range(3):
        single = diffcp.icp(src[b], tgt[b], correspondence=S.SoftNearestNeighbor(temperature=float(temps[b])),
                            stopping=stop)
        torch.testing.assert_close(batched.transform[b], single.transform, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"a \(3,\) tensor, one per cloud"):
        diffcp.icp(src, tgt, correspondence=S.SoftNearestNeighbor(temperature=temps[:2]))


# ----------------------------------------------------------------------------- default temperature
def test_default_temperature_is_per_cloud_so_batch_equals_loop():
    src, tgt, _ = _pair(n=80, batch=2)
    tgt = tgt * torch.tensor([1.0, 10.0], dtype=F64)[:, None, None]  # very different spacings
    src = src * torch.tensor([1.0, 10.0], dtype=F64)[:, None, None]
    stop = S.Stopping(max_iterations=5, tolerance=0)
    batched = diffcp.icp(src, tgt, correspondence="soft_nn", stopping=stop)
    for b in range(2):
        single = diffcp.icp(src[b], tgt[b], correspondence="soft_nn", stopping=stop)
        torch.testing.assert_close(batched.transform[b], single.transform, atol=1e-10, rtol=0)


def test_default_temperature_survives_duplicated_points():
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0)).repeat_interleave(2, 0)
    out = diffcp.icp(x, x + torch.tensor([1.0, 0, 0]), correspondence="soft_nn")
    assert torch.isfinite(out.transform).all()
    one_point = torch.zeros(5, 3, dtype=F64)
    t = diffcp.problem.default_temperature(one_point[None] + torch.tensor([[[1.0, 2, 3]]], dtype=F64),
                                           torch.tensor([5]))
    assert torch.isfinite(t).all() and (t > 0).all()


# ----------------------------------------------------------------------------- the layer
class Registration(nn.Module):
    """A model with an ICP layer whose soft-correspondence temperature is learned."""

    def __init__(self, mode, temperature=0.5):
        super().__init__()
        self.icp = diffcp.ICP(correspondence=S.SoftNearestNeighbor(temperature=temperature, learnable=True),
                              stopping=S.Stopping(max_iterations=40, tolerance=1e-10), backward=_backward(mode))

    def forward(self, source, target):
        return self.icp(source, target).transform


@pytest.mark.parametrize("mode", MODES)
def test_a_model_learns_its_temperature_by_gradient_descent(mode):
    # too warm a temperature biases the match towards the centroid: lowering it lowers the loss
    src, tgt, T = _pair(n=100, batch=4, seed=3, angle=0.3, shift=0.1)
    model = Registration(mode).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.2)
    losses = []
    for _ in range(12):
        loss = ((model(src, tgt) - T) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    temperature = model.icp.temperatures()["correspondence"].detach().item()
    assert temperature < 0.5 * 0.5  # it moved, down
    assert losses[-1] < 0.3 * losses[0]


def test_layer_parameters_repr_and_state():
    layer = diffcp.ICP(correspondence=S.SoftNearestNeighbor(temperature=1e-2, learnable=True),
                       rejection=[S.DistanceRejection(0.1), S.DistanceRejection(0.3, temperature=1e-3, learnable=True)])
    assert sorted(dict(layer.named_parameters())) == ["log_temperatures.correspondence", "log_temperatures.rejection_1"]
    torch.testing.assert_close(layer.temperatures()["rejection_1"], torch.tensor(1e-3))
    text = repr(layer)
    assert "SoftNearestNeighbor(temperature=0.01, learnable=True" in text and "rejection_1=0.001" in text
    assert list(layer.state_dict()) == ["log_temperatures.correspondence", "log_temperatures.rejection_1"]
    # the settings name the ICP; the state holds what was learned
    again = diffcp.ICP.from_dict(json.loads(json.dumps(layer.settings.to_dict())))
    assert again.settings == layer.settings
    with torch.no_grad():
        layer.log_temperatures["correspondence"].fill_(-2.0)
    again.load_state_dict(layer.state_dict())
    torch.testing.assert_close(again.temperatures()["correspondence"], torch.tensor(-2.0).exp())


def test_layer_equals_the_function_and_follows_the_data_dtype():
    src, tgt, _ = _pair(n=60, batch=2)
    layer = diffcp.ICP(correspondence=S.SoftNearestNeighbor(temperature=1e-2, learnable=True),
                       stopping=S.Stopping(max_iterations=5, tolerance=0))
    a = layer(src, tgt)  # float32 parameter, float64 data: the temperature follows the data
    b = diffcp.icp(src, tgt, correspondence=S.SoftNearestNeighbor(temperature=float(torch.tensor(1e-2).log().exp())),
                   stopping=S.Stopping(max_iterations=5, tolerance=0))
    torch.testing.assert_close(a.transform, b.transform, atol=1e-12, rtol=0)
    assert a.transform.dtype == F64
    fixed = diffcp.ICP(stopping=S.Stopping(max_iterations=5))
    assert list(fixed.parameters()) == []
    with pytest.raises(TypeError, match="either settings or option keywords"):
        diffcp.ICP(S.ICPSettings(), metric="point_to_point")


def test_learnable_options_are_for_the_layer_only():
    src, tgt, _ = _pair(n=20)
    with pytest.raises(TypeError, match="takes a number as the initial temperature"):
        S.SoftNearestNeighbor(temperature=torch.tensor(1e-2), learnable=True)
    with pytest.raises(ValueError, match="learnable temperatures are parameters of diffcp.ICP"):
        diffcp.icp(src, tgt, correspondence=S.SoftNearestNeighbor(temperature=1e-2, learnable=True))
