"""Non-rigid ICP: fit the rigid placement, pose and shape of a body model to a depth scan.

The unknowns are the :class:`~diffcp.bodies.placed.BodyParameters` of ``B`` bodies. Each of the
``K`` iterations of :func:`fit_body` keeps the steps of ICP that survive a non-rigid model:

1. **correspond** (soft, as in chapter 2): each scan point ``s_i`` (normal ``n_i``) looks at its
   ``k`` nearest model vertices under the cost ``c_ij = |s_i - v_j|^2 + w_n |n_i - n_j|^2`` (the
   normal term keeps a point off the far side of a thin limb) and takes the softmax average
   ``m_i = sum_j a_ij v_j``, ``a_ij = softmax_j(-c_ij / tau_k)`` and the averaged normal ``n_i'``.
   ``tau_k`` falls geometrically from ``temperature[0]`` to ``temperature[1]`` (m^2);
2. **weight**: residual ``e_i = a (n_i' . (s_i - m_i))^2 + (1 - a) |s_i - m_i|^2`` (point-to-plane
   share ``a``), the Geman-McClure kernel ``rho(e) = (s^2 / 2) e / (s^2 + e)`` (the kernel of
   :func:`diffcp.weight.robust_weights`), soft rejection ``r_i = sigmoid((d_max - sqrt(e_i)) / T)``
   (:func:`diffcp.reject.reject_by_distance`);
3. **minimise the placement**: a weighted Procrustes from the matches to the scan, weights
   ``r_i (s^2 / (s^2 + e_i))^2`` (IRLS of the kernel); the body moves rigidly;
4. **minimise pose and shape** (after the first ``rigid_iterations``): one damped Gauss-Newton
   step on the same residuals plus the Gaussian prior, the Jacobian of the vertices from forward
   mode (:func:`pose_shape_jacobian`); or, with ``minimiser="adam"``, one Adam step on
   :func:`scan_energy`.

:func:`scan_energy` is ``mean_i r_i rho(e_i)`` plus ``model_to_scan`` times a robust pull of the
vertices facing the camera towards the scan, plus the prior. The Gauss-Newton and Procrustes steps
minimise its first and last terms; the model-to-scan term enters the recorded energies (used to
choose among starts) and the Adam step.

Every operation is differentiable: with ``differentiable=True`` the steps keep their graph, so a
loss on the fitted body reaches whatever produced ``init`` - a network trained *through* the fit.
Through Adam steps the gradient is exact; through Gauss-Newton steps the Jacobian is a constant of
the backward pass (its derivative would need second derivatives of the skinning).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .bodies.placed import BodyParameters, PlacedBody
from .geometry import so3_exp
from .minimize.procrustes import procrustes
from .reject import reject_by_distance

__all__ = ["BodyFitSettings", "BodyFit", "fit_body", "scan_energy", "mean_body_start", "upright_rotation",
           "vertex_error", "joint_error", "pose_shape_jacobian"]


@dataclasses.dataclass(frozen=True)
class BodyFitSettings:
    """Options of :func:`fit_body` (lengths in metres, temperatures in m^2)."""

    iterations: int = 10
    rigid_iterations: int = 5
    minimiser: str = "gauss_newton"
    damping: float = 0.1
    max_step: float = 0.3
    temperature: Tuple[float, float] = (0.05 ** 2, 0.01 ** 2)
    neighbours: int = 8
    normal_weight: float = 0.05 ** 2
    point_to_plane: float = 0.8
    robust_scale: float = 0.05
    reject_distance: float = 0.15
    reject_temperature: float = 0.02
    model_to_scan: float = 0.5
    pose_prior: float = 1e-5
    pose_scales: Tuple[float, ...] = (0.15, 0.15, 0.25, 0.25, 0.4, 0.4, 0.4, 0.4, 0.25, 0.25, 0.25, 0.25)
    shape_prior: float = 1e-5
    learning_rates: Tuple[float, float] = (0.1, 0.03)  # pose (rad), shape (phenotype units)
    gradient_floor: float = 1e-3

    def __post_init__(self):
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"iterations must be an integer >= 0; got {self.iterations!r}.")
        if not (len(self.temperature) == 2 and self.temperature[0] >= self.temperature[1] > 0):
            raise ValueError(f"temperature must be (start, end) with start >= end > 0 (m^2); got {self.temperature!r}.")
        if not (isinstance(self.neighbours, int) and self.neighbours >= 1):
            raise ValueError(f"neighbours must be a positive integer; got {self.neighbours!r}.")
        if self.minimiser not in ("gauss_newton", "adam"):
            raise ValueError(f"minimiser must be 'gauss_newton' or 'adam'; got {self.minimiser!r}.")
        if not 0 <= self.point_to_plane <= 1:
            raise ValueError(f"point_to_plane must lie in [0, 1]; got {self.point_to_plane!r}.")
        if isinstance(self.rigid_iterations, bool) or not isinstance(self.rigid_iterations, int) or self.rigid_iterations < 0:
            raise ValueError(f"rigid_iterations must be an integer >= 0; got {self.rigid_iterations!r}.")
        for name in ("damping", "model_to_scan", "pose_prior", "shape_prior"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}.")
        for name in ("robust_scale", "reject_distance", "reject_temperature", "max_step"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)!r}.")
        if len(self.learning_rates) != 2 or min(self.learning_rates) < 0:
            raise ValueError(f"learning_rates must be two numbers >= 0 (pose, shape); "
                             f"got {self.learning_rates!r}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BodyFitSettings":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class BodyFit(NamedTuple):
    """Result of :func:`fit_body`: the fitted parameters and the energy ``(B,)`` at each iteration
    ``(K + 1, B)`` (the last row is the energy of the result, at the final temperature)."""

    params: BodyParameters
    energies: Tensor


def _geman_mcclure(e: Tensor, scale: float) -> Tensor:
    s2 = scale * scale
    return 0.5 * s2 * e / (s2 + e)


class _Matches(NamedTuple):
    index: Tensor  # (B, P, k) the candidate vertices of each scan point
    soft: Tensor  # (B, P, k) their soft weights a_ij
    match: Tensor  # (B, P, 3) soft-matched model points m_i
    normal: Tensor  # (B, P, 3) their unit normals n_i'
    residual: Tensor  # (B, P) e_i
    keep: Tensor  # (B, P) soft-rejection weights r_i


def _soft_matches(v: Tensor, nv: Tensor, points: Tensor, normals: Tensor, temperature: float,
                  settings: "BodyFitSettings") -> _Matches:
    k = min(settings.neighbours, v.shape[1])
    with torch.no_grad():
        cost = torch.cdist(points, v).square() + settings.normal_weight * torch.cdist(normals, nv).square()
        idx = cost.topk(k, dim=-1, largest=False).indices  # (B, P, k)
    gather = lambda x: torch.gather(x[:, None].expand(-1, idx.shape[1], -1, -1), 2,  # noqa: E731
                                    idx[..., None].expand(-1, -1, -1, 3))
    vk, nk = gather(v), gather(nv)
    c = (points[:, :, None] - vk).square().sum(-1) + settings.normal_weight * (normals[:, :, None] - nk).square().sum(-1)
    a = torch.softmax(-c / temperature, dim=-1)[..., None]
    match, n_match = (a * vk).sum(2), (a * nk).sum(2)
    soft = a[..., 0]
    n_match = n_match / n_match.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    diff = points - match
    alpha = settings.point_to_plane
    e = alpha * (diff * n_match).sum(-1).square() + (1 - alpha) * diff.square().sum(-1)
    keep = reject_by_distance(e, settings.reject_distance, settings.reject_temperature)
    return _Matches(idx, soft, match, n_match, e, keep)


def _model_to_scan(v: Tensor, nv: Tensor, points: Tensor, temperature: float, settings: BodyFitSettings) -> Tensor:
    """``(B,)``: the robust distance of each model vertex that faces the camera (soft weight
    ``sigmoid(-n.v/|v| / 0.1)``) to its soft-nearest scan point, averaged over those vertices."""
    k = min(settings.neighbours, points.shape[1])
    with torch.no_grad():
        idx = torch.cdist(v, points).topk(k, dim=-1, largest=False).indices  # (B, V, k)
    pk = torch.gather(points[:, None].expand(-1, v.shape[1], -1, -1), 2, idx[..., None].expand(-1, -1, -1, 3))
    d2 = (v[:, :, None] - pk).square().sum(-1)
    near = (torch.softmax(-d2 / temperature, dim=-1) * d2).sum(-1)
    facing = torch.sigmoid(-(nv * v).sum(-1) / v.norm(dim=-1).clamp_min(1e-9) / 0.1)
    return (facing * _geman_mcclure(near, settings.robust_scale)).sum(-1) / facing.sum(-1).clamp_min(1e-9)


def scan_energy(placed: PlacedBody, params: BodyParameters, points: Tensor, normals: Tensor,
                temperature: float, settings: BodyFitSettings) -> Tensor:
    """The fit's energy ``(B,)`` of ``params`` against scans ``points``, ``normals`` ``(B, P, 3)``."""
    mesh = placed.mesh(params)
    m = _soft_matches(mesh.vertices, mesh.normals, points, normals, temperature, settings)
    data = (m.keep * _geman_mcclure(m.residual, settings.robust_scale)).mean(-1)
    if settings.model_to_scan > 0:
        data = data + settings.model_to_scan * _model_to_scan(mesh.vertices, mesh.normals, points, temperature, settings)
    scales = params.pose.new_tensor(settings.pose_scales)
    prior = settings.pose_prior * (params.pose / scales[:, None]).square().mean((-1, -2))
    mean = placed.body.default_shape(1).to(params.shape)
    prior = prior + settings.shape_prior * ((params.shape - mean) / placed.shape_scale).square().mean(-1)
    return data + prior


def _check_scan(points: Tensor, normals: Tensor, init: BodyParameters) -> None:
    if not isinstance(points, Tensor) or points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must be a tensor of shape (B, P, 3); got {getattr(points, 'shape', type(points).__name__)}.")
    if not isinstance(normals, Tensor) or normals.shape != points.shape:
        raise ValueError(f"normals must have the shape of points {tuple(points.shape)}; "
                         f"got {getattr(normals, 'shape', type(normals).__name__)}.")
    if not isinstance(init, BodyParameters) or init.root.shape != (points.shape[0], 3):
        raise ValueError(f"init must be BodyParameters for {points.shape[0]} bodies (root (B, 3)); "
                         f"got {getattr(getattr(init, 'root', None), 'shape', type(init).__name__)}.")


def _rigid_step(placed: PlacedBody, params: BodyParameters, points: Tensor, normals: Tensor, temperature: float,
                settings: BodyFitSettings) -> BodyParameters:
    """One rigid ICP step: soft matches, IRLS weights, closed-form Procrustes; the body moves rigidly."""
    mesh = placed.mesh(params)
    m = _soft_matches(mesh.vertices, mesh.normals, points, normals, temperature, settings)
    s2 = settings.robust_scale ** 2
    weights = m.keep * (s2 / (s2 + m.residual)) ** 2  # Geman-McClure's IRLS weight
    G = procrustes(m.match, points, weights)
    return params._replace(rotation=G.rotation @ params.rotation,
                           root=(G.rotation @ params.root[..., None])[..., 0] + G.translation)


def _temperatures(settings: BodyFitSettings) -> list:
    K, (t0, t1) = max(settings.iterations, 1), settings.temperature
    return [t0 * (t1 / t0) ** (k / max(K - 1, 1)) for k in range(K)]


def _flat(params: BodyParameters) -> Tensor:
    return torch.cat([params.pose.flatten(1), params.shape], dim=1)


def _unflat(params: BodyParameters, x: Tensor, bounds=None) -> BodyParameters:
    J = params.pose.shape[1]
    shape = x[:, 3 * J:] if bounds is None else x[:, 3 * J:].clamp(*bounds)
    return params._replace(pose=x[:, :3 * J].reshape(-1, J, 3), shape=shape)


def pose_shape_jacobian(placed: PlacedBody, params: BodyParameters) -> Tensor:
    """``(B, V, 3, D)``: the derivative of the camera-frame vertices with respect to the ``D = 3J + S``
    pose and shape parameters, by forward-mode differentiation (one tangent per parameter, as a
    batch of ``B * D`` bodies). Not differentiable itself (computed on detached parameters)."""
    params = params.detach()
    B, x = params.root.shape[0], _flat(params.detach())
    D = x.shape[1]
    repeat = BodyParameters(*(t.repeat_interleave(D, 0) for t in params))

    def vertices(xx):
        return placed.mesh(_unflat(repeat, xx, placed.shape_bounds)).vertices

    tangents = torch.eye(D, dtype=x.dtype, device=x.device).repeat(B, 1)
    with torch.no_grad():
        _, jv = torch.func.jvp(vertices, (x.repeat_interleave(D, 0),), (tangents,))
    return jv.reshape(B, D, -1, 3).permute(0, 2, 3, 1)


def _prior_terms(placed: PlacedBody, params: BodyParameters, settings: BodyFitSettings):
    """Gradient ``(B, D)`` and diagonal Hessian ``(D,)`` of the pose and shape prior of :func:`scan_energy`."""
    J, S = params.pose.shape[1], params.shape.shape[1]
    scales = params.pose.new_tensor(settings.pose_scales).repeat_interleave(3)
    hess = torch.cat([2 * settings.pose_prior / (3 * J) / scales ** 2,
                      params.shape.new_full((S,), 2 * settings.shape_prior / (S * placed.shape_scale ** 2))])
    mean = placed.body.default_shape(1).to(params.shape)
    return hess * torch.cat([params.pose.flatten(1), params.shape - mean], dim=1), hess


def _gauss_newton_step(placed: PlacedBody, params: BodyParameters, points: Tensor, normals: Tensor,
                       temperature: float, settings: BodyFitSettings) -> BodyParameters:
    """One damped Gauss-Newton step on pose and shape with the placement held fixed: the residuals
    of :func:`scan_energy`'s data term (point-to-plane and point-to-point, IRLS weights of the
    robust kernel times soft rejection), linearised through :func:`pose_shape_jacobian`. In a
    differentiable fit the Jacobian is a constant of the backward pass."""
    mesh = placed.mesh(params)
    m = _soft_matches(mesh.vertices, mesh.normals, points, normals, temperature, settings)
    jac = pose_shape_jacobian(placed, params)
    B, P, k = m.index.shape
    D = jac.shape[-1]
    jk = torch.gather(jac[:, None].expand(-1, P, -1, -1, -1), 2, m.index[..., None, None].expand(-1, -1, -1, 3, D))
    jm = (m.soft.detach()[..., None, None] * jk).sum(2)  # (B, P, 3, D): d m_i / d x
    alpha = settings.point_to_plane
    diff = points - m.match
    r = torch.cat([alpha ** 0.5 * (diff * m.normal).sum(-1, keepdim=True), (1 - alpha) ** 0.5 * diff], dim=-1)
    jr = -torch.cat([alpha ** 0.5 * (m.normal.detach()[..., None] * jm).sum(2, keepdim=True), (1 - alpha) ** 0.5 * jm], dim=2)
    s2 = settings.robust_scale ** 2
    w = m.keep * (s2 / (s2 + m.residual)) ** 2
    g_prior, h_prior = _prior_terms(placed, params, settings)
    H = torch.einsum("bp,bpcd,bpce->bde", w, jr, jr) / P + torch.diag_embed(h_prior.expand(B, -1))
    g = torch.einsum("bp,bpcd,bpc->bd", w, jr, r) / P + g_prior
    H = H + settings.damping * torch.diag_embed(torch.diagonal(H, dim1=-2, dim2=-1)) + 1e-9 * torch.eye(D, dtype=H.dtype, device=H.device)
    step = -torch.linalg.solve(H, g[..., None])[..., 0]
    return _unflat(params, _flat(params) + step.clamp(-settings.max_step, settings.max_step), placed.shape_bounds)


def fit_body(placed: PlacedBody, points: Tensor, normals: Tensor, init: BodyParameters,
             settings: BodyFitSettings = BodyFitSettings(), *, differentiable: bool = False) -> BodyFit:
    """Fit ``B`` bodies to scans ``points``, ``normals`` ``(B, P, 3)`` (camera frame) from ``init``.

    Each iteration is a rigid ICP step (soft matches, Procrustes) and then, after the first
    ``settings.rigid_iterations``, a step on pose and shape: damped Gauss-Newton
    (``settings.minimiser == "gauss_newton"``) or Adam on :func:`scan_energy` (``"adam"``). With
    ``differentiable=False`` the result is detached from ``init``; with ``True`` the unrolled
    steps keep their graph (memory grows with the iterations).

    Example: see chapter 12 (the body model needs anny's cache).
    """
    _check_scan(points, normals, init)
    taus = _temperatures(settings)
    params = init if differentiable else init.detach()
    if len(settings.pose_scales) != params.pose.shape[1]:
        raise ValueError(f"settings.pose_scales must hold one scale per posed joint ({params.pose.shape[1]}); "
                         f"got {len(settings.pose_scales)}.")
    adam = _AdamState(_flat(params), params.pose.shape[1], settings) if settings.minimiser == "adam" else None
    energies = []
    with torch.enable_grad():
        for k in range(settings.iterations):
            params = _rigid_step(placed, params, points, normals, taus[k], settings)
            params = params if differentiable else params.detach()
            if k >= settings.rigid_iterations and adam is None:
                params = _gauss_newton_step(placed, params, points, normals, taus[k], settings)
            elif k >= settings.rigid_iterations:
                params = adam.step(placed, params, points, normals, taus[k], k - settings.rigid_iterations, differentiable)
            params = params if differentiable else params.detach()
            with torch.no_grad():
                energies.append(scan_energy(placed, params, points, normals, taus[k], settings))
        with torch.no_grad():
            energies.append(scan_energy(placed, params, points, normals, taus[-1], settings))
    return BodyFit(params, torch.stack(energies))


class _AdamState:
    """Adam on pose and shape against :func:`scan_energy` (the first-order alternative)."""

    def __init__(self, x: Tensor, J: int, settings: BodyFitSettings):
        self.settings, self.m, self.v = settings, torch.zeros_like(x.detach()), torch.zeros_like(x.detach())
        self.lr = x.new_tensor([settings.learning_rates[0]] * (3 * J) + [settings.learning_rates[1]] * (x.shape[1] - 3 * J))

    def step(self, placed, params, points, normals, temperature, n, differentiable):
        s = self.settings
        x = _flat(params)
        # a fresh node (a clone) separates this step's unknowns from the rigid step's inputs
        x = x.clone() if (differentiable and x.requires_grad) else x.detach().requires_grad_(True)
        energy = scan_energy(placed, _unflat(params, x, placed.shape_bounds), points, normals, temperature, s)
        (g,) = torch.autograd.grad(energy.sum(), x, create_graph=differentiable)
        self.m, self.v = 0.9 * self.m + 0.1 * g, 0.999 * self.v + 0.001 * g * g
        m_hat, v_hat = self.m / (1 - 0.9 ** (n + 1)), self.v / (1 - 0.999 ** (n + 1))
        phase = n / max(s.iterations - s.rigid_iterations, 1)
        lr = self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * phase)))
        return _unflat(params, x - lr * m_hat / (v_hat + s.gradient_floor ** 2).sqrt(), placed.shape_bounds)


def upright_rotation(azimuth_deg: float = 0.0, dtype: torch.dtype = torch.float32, device=None,
                     up: Sequence[float] = (0.0, 0.0, 1.0), front: Sequence[float] = (0.0, -1.0, 0.0)) -> Tensor:
    """``(3, 3)``: a body whose model frame has ``up`` and faces ``front`` (default anny's: ``+z``,
    ``-y``) turned by ``azimuth_deg`` about its up axis, then stood upright in a camera frame (``y``
    down, ``+z`` forward), facing the camera."""
    u, f = torch.tensor(up, dtype=torch.float64), torch.tensor(front, dtype=torch.float64)
    model = torch.stack([u, f, torch.linalg.cross(u, f)], dim=1)
    camera = torch.tensor([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=torch.float64)  # columns: up, front, side
    turn = so3_exp(u * math.radians(azimuth_deg))
    return (camera @ model.T @ turn).to(dtype=dtype, device=device)


def mean_body_start(placed: PlacedBody, points: Tensor, azimuth_deg: float = 0.0, depth_offset: float = 0.1) -> BodyParameters:
    """The start of the fit without a network: the mean body in the rest pose, upright, turned by
    ``azimuth_deg``, its root at the scan's centroid pushed ``depth_offset`` metres away from the camera."""
    centroid = points.mean(1)
    root = centroid + depth_offset * centroid / centroid.norm(dim=-1, keepdim=True)
    B = points.shape[0]
    body = placed.body
    rot = upright_rotation(azimuth_deg, points.dtype, points.device, body.up_axis, body.front_axis).expand(B, 3, 3).clone()
    return placed.rest(B, rotation=rot, root=root)


def vertex_error(predicted: Tensor, expected: Tensor) -> Tensor:
    """Mean per-vertex Euclidean distance ``(B,)`` between ``(B, V, 3)`` meshes (the units of the input)."""
    return (predicted - expected).norm(dim=-1).mean(-1)


def joint_error(predicted: Tensor, expected: Tensor) -> Tensor:
    """Mean per-joint Euclidean distance ``(B,)`` between ``(B, M, 3)`` joint sets."""
    return (predicted - expected).norm(dim=-1).mean(-1)
