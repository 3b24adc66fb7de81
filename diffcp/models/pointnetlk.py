"""PointNetLK (Aoki et al., CVPR 2019) as learning3d implements it, to run its released weights.

Inverse-compositional Lucas-Kanade on a global PointNet feature ``f(P) = max_i phi(p_i)``
(``phi`` = :class:`~diffcp.models.pointnet.PointNet` with biases, 1024 channels):

1. both clouds are centred on their means (the target ``q``, the source ``p``);
2. the 1024 x 6 Jacobian of ``f`` at the target is approximated by finite differences:
   column ``k`` is ``(f(q) - f(exp(-delta_k e_k) q)) / delta_k`` with the twist step
   ``delta = dt = 0.01`` (the checkpoint's ``dt``); twists are ``(omega, v)``, rotation first,
   mapped to SE(3) by the exponential map (:func:`se3_exp`);
3. ``pinv = (J^T J)^{-1} J^T``; then up to ``max_iterations`` times: ``r = f(T p) - f(q)``,
   ``xi = -pinv r``, ``T <- exp(xi) T``, stopping once every ``|xi| < xtol`` (1e-7);
4. the result undoes the centring: ``[I, mean(q)] T [I, -mean(p)]`` maps the source into the
   target. (learning3d composes the source side with the *target's* mean, ``[I, -mean(q)]``, which
   is right only when both means agree; the pose in between is the same. Checked against
   learning3d's code with the released weights on 6 clean ModelNet40 test pairs: on centred
   clouds the transforms agree to 2.4e-7; on DCP's pairs the rotations agree to 4e-7 while
   learning3d's translations are off by 0.29 to 0.63, ours by at most 0.006.)

BatchNorm always uses its running statistics here (learning3d switches the feature net to eval
inside the LK loop). Module names match learning3d's (``feature_model.conv1..5``,
``feature_model.bn1..5``, ``dt``), so ``pointnetlk_learning3d.t7`` loads with ``strict=True``.
learning3d trained it on ModelNet40 with twists of random norm up to 0.8 (rotation and
translation together).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from diffcp.geometry import hat, make_transform
from diffcp.models.checkpoints import read_state_dict, weights_path
from diffcp.models.pointnet import PointNet

__all__ = ["PointNetLK", "LKResult", "se3_exp", "load_pointnetlk"]


class LKResult(NamedTuple):
    """``target ~ transform @ source`` (homogeneous), and the iterations run."""

    transform: Tensor  # (B, 4, 4)
    iterations: int


def se3_exp(xi: Tensor) -> Tensor:
    """SE(3) exponential of twists ``(..., 6)`` = ``(omega, v)`` -> ``(..., 4, 4)``.

    ``R = I + A W + B W^2``, ``t = (I + B W + C W^2) v`` with ``W = hat(omega)``, ``th = |omega|``,
    ``A = sin th / th``, ``B = (1 - cos th) / th^2``, ``C = (th - sin th) / th^3`` (Taylor series
    near 0).

    Example:
        >>> T = se3_exp(torch.tensor([0., 0, 0, 1, 2, 3]))
        >>> T[:3, 3].tolist(), bool(torch.equal(T[:3, :3], torch.eye(3)))
        ([1.0, 2.0, 3.0], True)
    """
    omega, v = xi[..., :3], xi[..., 3:]
    th2 = (omega * omega).sum(-1)[..., None, None]
    th = th2.clamp_min(1e-24).sqrt()
    small = th2 < 1e-6
    A = torch.where(small, 1 - th2 / 6, torch.sin(th) / th)
    B = torch.where(small, 0.5 - th2 / 24, (1 - torch.cos(th)) / th2.clamp_min(1e-24))
    C = torch.where(small, 1.0 / 6 - th2 / 120, (th - torch.sin(th)) / (th2 * th).clamp_min(1e-24))
    W = hat(omega)
    W2 = W @ W
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device).expand_as(W)
    R = eye + A * W + B * W2
    t = ((eye + B * W + C * W2) @ v[..., None])[..., 0]
    return make_transform(R, t)


def _move(T: Tensor, points: Tensor) -> Tensor:
    return points @ T[..., :3, :3].transpose(-1, -2) + T[..., None, :3, 3]


class PointNetLK(nn.Module):
    """PointNetLK: ``forward(source (B, N, 3), target (B, M, 3)) -> LKResult``.

    Example:
        >>> net = PointNetLK(emb_dims=32).eval()
        >>> out = net(torch.randn(2, 64, 3), torch.randn(2, 64, 3), max_iterations=2)
        >>> tuple(out.transform.shape)
        (2, 4, 4)
    """

    def __init__(self, emb_dims: int = 1024, delta: float = 1e-2):
        super().__init__()
        self.feature_model = PointNet(emb_dims, bias=True)
        self.dt = nn.Parameter(torch.full((1, 6), float(delta)), requires_grad=False)

    def features(self, points: Tensor) -> Tensor:
        """Global features ``(B, K)`` of clouds ``(B, N, 3)`` (BatchNorm in eval mode)."""
        training = self.feature_model.training
        self.feature_model.eval()
        try:
            return self.feature_model(points.transpose(1, 2)).max(dim=-1).values
        finally:
            self.feature_model.train(training)

    def jacobian(self, target: Tensor, target_features: Tensor) -> Tensor:
        """Finite-difference Jacobian ``(B, K, 6)`` of the features at the (centred) target."""
        B, M, _ = target.shape
        steps = torch.diag_embed(self.dt.to(target).expand(B, 6))  # (B, 6, 6): one twist per column
        moved = _move(se3_exp(-steps), target[:, None])  # (B, 6, M, 3)
        f = self.features(moved.reshape(B * 6, M, 3)).view(B, 6, -1).transpose(1, 2)  # (B, K, 6)
        return (target_features[..., None] - f) / self.dt.to(target)[:, None, :]

    def forward(self, source: Tensor, target: Tensor, max_iterations: int = 10, xtol: float = 1e-7) -> LKResult:
        for name, x in (("source", source), ("target", target)):
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != 3:
                raise ValueError(f"{name} must be a tensor of shape (B, N, 3); got {getattr(x, 'shape', type(x))}.")
        source_mean, target_mean = source.mean(dim=1), target.mean(dim=1)
        p, q = source - source_mean[:, None], target - target_mean[:, None]
        f_q = self.features(q)
        J = self.jacobian(q, f_q)
        Jt = J.transpose(1, 2)
        pinv = torch.linalg.solve(Jt @ J, Jt)  # (B, 6, K)
        B = source.shape[0]
        T = torch.eye(4, dtype=source.dtype, device=source.device).expand(B, 4, 4).clone()
        iterations = 0
        for iterations in range(1, max_iterations + 1):
            r = self.features(_move(T, p)) - f_q
            xi = -(pinv @ r[..., None])[..., 0]
            if float(xi.detach().norm(dim=1).max()) < xtol:
                break
            T = se3_exp(xi) @ T
        eye = torch.eye(3, dtype=source.dtype, device=source.device).expand(B, 3, 3)
        return LKResult(make_transform(eye, target_mean) @ T @ make_transform(eye, -source_mean), iterations)


def load_pointnetlk(path: Optional[Union[str, os.PathLike]] = None) -> PointNetLK:
    """learning3d's released PointNetLK (``pointnetlk_learning3d.t7``) in an evaluating model."""
    model = PointNetLK()
    model.load_state_dict(read_state_dict(weights_path("pointnetlk_learning3d.t7", path)), strict=True)
    return model.eval()
