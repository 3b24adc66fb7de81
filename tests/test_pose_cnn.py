"""The pose CNN: 6D rotations, output convention, size, and that it can learn a pose."""

import pytest
import torch

from diffcp.geometry import random_rotation, rotation_error
from diffcp.models.pose_cnn import PoseCNN, rotation_from_6d, rotation_to_6d


def test_6d_round_trip_and_orthonormality():
    R = random_rotation(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(rotation_from_6d(rotation_to_6d(R)), R)
    x = torch.randn(100, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    Q = rotation_from_6d(x)
    torch.testing.assert_close(Q.transpose(-1, -2) @ Q, torch.eye(3, dtype=torch.float64).expand(100, 3, 3))
    torch.testing.assert_close(torch.linalg.det(Q), torch.ones(100, dtype=torch.float64))
    # Gram-Schmidt: the first column is a1's direction, the second lies in span(a1, a2)
    torch.testing.assert_close(Q[:, :, 0], x[:, :3] / x[:, :3].norm(dim=-1, keepdim=True))
    assert float((Q[:, :, 2] * x[:, 3:]).sum(-1).abs().max()) < 1e-12
    with pytest.raises(ValueError, match="x must be a tensor of shape"):
        rotation_from_6d(torch.zeros(3, 5))


def test_network_shape_size_and_identity_start():
    torch.manual_seed(0)
    net = PoseCNN()
    n = sum(p.numel() for p in net.parameters())
    assert 0.9e6 < n < 1.2e6
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and convs[0].in_channels == 2
    d = torch.rand(3, 128, 128) + 2.5
    T = net(d, d)
    assert T.shape == (3, 4, 4)
    torch.testing.assert_close(T[:, 3], torch.tensor([0.0, 0, 0, 1]).expand(3, 4))
    assert float(rotation_error(T.detach()[:, :3, :3], torch.eye(3).expand(3, 3, 3)).max()) < 5.0  # near identity
    with pytest.raises(ValueError, match="must have one shape"):
        net(d, d[:, :64])
    with pytest.raises(ValueError, match="source_depth must be a tensor of shape"):
        net(d[0], d[0])


def test_background_is_zero_and_gradients_flow():
    net = PoseCNN()
    d = torch.tensor([[0.0, 3.0]])
    assert net.encode(d).tolist() == [[0.0, 2.0]]
    src = torch.rand(2, 64, 64) + 2.5
    T = net(src, src.flip(-1))
    T[:, :3, 3].sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())


def test_learns_a_translation_from_shifted_blobs():
    """A few Adam steps on images of a square moved left or right: the sign of t_x is learnt."""
    torch.manual_seed(0)
    net = PoseCNN(width=8)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    src = torch.zeros(8, 32, 32)
    src[:, 12:20, 12:20] = 3.0
    shift = torch.tensor([-4, 4] * 4)
    tgt = torch.stack([src[i].roll(int(s), dims=-1) for i, s in enumerate(shift)])
    goal = shift.float() * 0.05
    for _ in range(60):
        opt.zero_grad()
        loss = (net(src, tgt)[:, 0, 3] - goal).square().mean()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05 * float(goal.square().mean())
