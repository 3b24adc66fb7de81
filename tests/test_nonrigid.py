"""Non-rigid fitting: the placed body, vertex normals, the fit's energy, its convergence and its gradient."""

import math

import pytest
import torch

from diffcp.bodies.placed import BodyParameters, PlacedBody, vertex_normals
from diffcp.geometry import so3_exp
from diffcp.nonrigid import (BodyFitSettings, fit_body, joint_error, mean_body_start, scan_energy,
                             upright_rotation, vertex_error)

anny = pytest.importorskip("anny")


@pytest.fixture(scope="module")
def placed():
    from diffcp.bodies.anny import LOW_RESOLUTION, AnnyBody

    return PlacedBody(AnnyBody(topology=LOW_RESOLUTION))


@pytest.fixture(scope="module")
def scans(placed):
    """Six scans (two per condition) from the dataset's own generator."""
    from diffcp.datasets.body_scans import ScanSettings, make_scan, scan_generator

    rows = [make_scan(placed, ScanSettings(), i % 3, scan_generator(7, "test", i)) for i in range(6)]
    return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}


def _truth(scans):
    return BodyParameters(scans["rotation"], scans["root"], scans["pose"], scans["shape"])


def test_vertex_normals_point_outwards_on_a_closed_mesh():
    trimesh = pytest.importorskip("trimesh")
    m = trimesh.creation.icosphere(subdivisions=2)
    v = torch.tensor(m.vertices, dtype=torch.float64)[None]
    n = vertex_normals(v, torch.tensor(m.faces))
    assert torch.allclose(n, v / v.norm(dim=-1, keepdim=True), atol=0.05)  # a sphere's normal is its radius


def test_placed_body_puts_the_root_where_asked_and_rotates_about_it(placed):
    R = so3_exp(torch.tensor([[0.3, -0.2, 1.0]]))
    params = placed.rest(1, rotation=R, root=torch.tensor([[0.1, 0.2, 3.0]]))
    mesh = placed.mesh(params)
    assert torch.allclose(mesh.joints[0, 0], params.root[0], atol=1e-5)  # measured joint 0 is the root
    base = placed.mesh(placed.rest(1))
    assert torch.allclose(mesh.vertices[0], base.vertices[0] @ R[0].T + params.root[0], atol=1e-5)
    assert torch.allclose(mesh.normals[0], base.normals[0] @ R[0].T, atol=1e-4)


def test_placed_body_rejects_unknown_joints_and_bad_pose(placed):
    with pytest.raises(ValueError, match="posed_joints"):
        PlacedBody(placed.body, posed_joints=("elbow",))
    with pytest.raises(ValueError, match="pose must have shape"):
        placed.model_frame(torch.zeros(1, 3, 3), placed.body.default_shape(1))


def test_upright_rotation_faces_the_camera(placed):
    mesh = placed.mesh(placed.rest(1, rotation=upright_rotation()[None], root=torch.tensor([[0.0, 0, 3]])))
    head, feet = mesh.joints[0, placed.measured_joints.index("head")], mesh.joints[0, placed.measured_joints.index("foot.L")]
    assert head[1] < feet[1] - 1.0  # image y points down: the head is above the feet
    # anny faces -y in its own frame: facing the camera, the front vertices are the near ones
    front = mesh.normals[0, :, 2] < -0.9
    assert mesh.vertices[0, front, 2].mean() < 3.0 < mesh.vertices[0, mesh.normals[0, :, 2] > 0.9, 2].mean()


def test_energy_is_lowest_near_the_truth(scans, placed):
    truth = _truth(scans)
    settings = BodyFitSettings()
    at_truth = scan_energy(placed, truth, scans["points"], scans["normals"], 1e-4, settings)
    moved = truth._replace(root=truth.root + torch.tensor([0.05, 0.0, 0.0]))
    bent = truth._replace(pose=truth.pose + 0.3)
    for other in (moved, bent):
        assert (scan_energy(placed, other, scans["points"], scans["normals"], 1e-4, settings) > at_truth).all()


def test_fit_stays_at_the_truth_and_recovers_from_a_perturbed_start(scans, placed):
    truth = _truth(scans)
    pts, nrm, verts = scans["points"], scans["normals"], scans["vertices"]
    stay = fit_body(placed, pts, nrm, truth)
    assert vertex_error(placed.mesh(stay.params).vertices, verts).max() < 0.03  # metres
    g = torch.Generator().manual_seed(0)
    axis = torch.randn(6, 3, generator=g)
    start = BodyParameters(so3_exp(0.17 * axis / axis.norm(dim=-1, keepdim=True)) @ truth.rotation,
                           truth.root + 0.05 * torch.randn(6, 3, generator=g), 0.5 * truth.pose,
                           torch.full_like(truth.shape, 0.5))
    before = vertex_error(placed.mesh(start).vertices, verts)
    fit = fit_body(placed, pts, nrm, start)
    after = vertex_error(placed.mesh(fit.params).vertices, verts)
    assert after.mean() < 0.75 * before.mean()
    assert (fit.energies[-1] < fit.energies[0]).all()
    assert joint_error(placed.mesh(fit.params).joints, scans["joints"]).mean() < joint_error(placed.mesh(start).joints, scans["joints"]).mean()


def test_mean_body_start_is_upright_at_the_scan(scans, placed):
    start = mean_body_start(placed, scans["points"], azimuth_deg=90.0)
    assert torch.allclose(start.rotation[0], upright_rotation(90.0))
    depth = scans["points"].mean(1).norm(dim=-1)
    assert torch.allclose(start.root.norm(dim=-1), depth + 0.1, atol=1e-5)
    assert (start.pose == 0).all() and (start.shape == 0.5).all()


@pytest.fixture(scope="module")
def double(scans):
    """The float64 body and the first scan in float64, for comparisons with finite differences."""
    from diffcp.bodies.anny import LOW_RESOLUTION, AnnyBody

    placed = PlacedBody(AnnyBody(topology=LOW_RESOLUTION, dtype=torch.float64))
    return placed, {k: scans[k][:1].double() for k in ("rotation", "root", "pose", "shape", "points", "normals", "vertices")}


def _gradient_and_differences(placed, s, settings, eps=1e-6):
    """d(vertex error after the fit)/d(start root) by autograd through the unrolled fit, and by
    central differences along each axis; the start is moved off the truth and half-posed."""

    def loss(root):
        start = BodyParameters(s["rotation"], root, 0.5 * s["pose"], s["shape"])
        fit = fit_body(placed, s["points"], s["normals"], start, settings, differentiable=True)
        return vertex_error(placed.mesh(fit.params).vertices, s["vertices"]).sum()

    root = (s["root"] + torch.tensor([[0.03, -0.02, 0.04]], dtype=torch.float64)).requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(root), root)
    fd = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for i in range(3):
            step = torch.zeros(1, 3, dtype=torch.float64)
            step[0, i] = eps
            fd[i] = (loss(root + step) - loss(root - step)) / (2 * eps)
    return grad[0], fd


def test_fit_is_differentiable_in_its_start_and_matches_finite_differences(double):
    """Through two Adam iterations the gradient is exact: it matches central differences in float64,
    with every vertex a candidate match (no top-k switch, a smooth map)."""
    placed, s = double
    settings = BodyFitSettings(iterations=2, rigid_iterations=0, minimiser="adam", neighbours=placed.body.num_vertices)
    grad, fd = _gradient_and_differences(placed, s, settings)
    assert torch.allclose(grad, fd, rtol=1e-3, atol=1e-6), (grad, fd)
    detached = fit_body(placed, s["points"], s["normals"],
                        BodyParameters(s["rotation"], s["root"].clone().requires_grad_(True), s["pose"], s["shape"]), settings)
    assert not detached.params.root.requires_grad


def test_settings_and_inputs_are_checked(scans, placed):
    with pytest.raises(ValueError, match="temperature"):
        BodyFitSettings(temperature=(1e-4, 1e-2))
    with pytest.raises(ValueError, match="learning_rates"):
        BodyFitSettings(learning_rates=(0.1,))
    assert BodyFitSettings.from_dict(BodyFitSettings().to_dict()) == BodyFitSettings()
    with pytest.raises(ValueError, match="minimiser"):
        BodyFitSettings(minimiser="lbfgs")
    with pytest.raises(ValueError, match="rigid_iterations"):
        BodyFitSettings(rigid_iterations=-1)
    with pytest.raises(ValueError, match="max_step"):
        BodyFitSettings(max_step=0.0)
    with pytest.raises(ValueError, match="pose_scales must hold one scale per posed joint"):
        fit_body(placed, scans["points"], scans["normals"], _truth(scans), BodyFitSettings(pose_scales=(0.1,)))
    with pytest.raises(ValueError, match="normals must have the shape of points"):
        fit_body(placed, scans["points"], scans["normals"][:, :10], _truth(scans))
    with pytest.raises(ValueError, match="init must be BodyParameters for 6 bodies"):
        fit_body(placed, scans["points"], scans["normals"], _truth(scans).index(slice(0, 2)))


def test_gauss_newton_backward_treats_the_jacobian_as_constant_and_stays_close(double):
    """Through Gauss-Newton steps the gradient is approximate (the Jacobian is a constant of the
    backward pass): it must point about the same way as central differences and be of their size."""
    placed, s = double
    settings = BodyFitSettings(iterations=2, rigid_iterations=1, neighbours=placed.body.num_vertices)
    grad, fd = _gradient_and_differences(placed, s, settings)
    cosine = float(grad @ fd / (grad.norm() * fd.norm()))
    assert cosine > 0.8 and 0.5 < float(grad.norm() / fd.norm()) < 2.0, (grad, fd)  # measured: 0.89, 0.77


def test_gauss_newton_recovers_more_pose_than_adam(scans, placed):
    truth = _truth(scans)
    start = truth._replace(pose=torch.zeros_like(truth.pose))
    errors = {}
    for minimiser in ("gauss_newton", "adam"):
        fit = fit_body(placed, scans["points"], scans["normals"], start, BodyFitSettings(minimiser=minimiser))
        errors[minimiser] = float(vertex_error(placed.mesh(fit.params).vertices, scans["vertices"]).mean())
    before = float(vertex_error(placed.mesh(start).vertices, scans["vertices"]).mean())
    assert errors["gauss_newton"] < 0.8 * errors["adam"] and errors["gauss_newton"] < 0.7 * before, (before, errors)
