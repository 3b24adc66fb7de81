"""Body models: the shared interface, SMPL through smplx on a synthetic model file, anny offline."""

import math
import os
import pickle

import numpy as np
import pytest
import torch

from diffcp.bodies import load_body
from diffcp.bodies.anny import LOW_RESOLUTION, AnnyBody, default_cache_dir
from diffcp.geometry import so3_exp

smplx = pytest.importorskip("smplx")
from diffcp.bodies.smplx import ENV_VAR, SMPLBody  # noqa: E402

V_SMPL = 6890  # smplx's default vertex_ids index up to 6889


def _write_synthetic_smpl(folder, num_betas=10, seed=0):
    """A random model in SMPL's pickle format: the real file-reading path of smplx runs on it."""
    rng = np.random.default_rng(seed)
    parents = np.array([-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21])
    weights = rng.random((V_SMPL, 24))
    fields = {
        "v_template": rng.normal(size=(V_SMPL, 3)) * 0.3,
        "f": rng.integers(0, V_SMPL, size=(2000, 3)).astype(np.uint32),
        "shapedirs": rng.normal(size=(V_SMPL, 3, num_betas)) * 0.01,
        "posedirs": rng.normal(size=(V_SMPL, 3, 207)) * 0.001,
        "J_regressor": rng.dirichlet(np.ones(V_SMPL), size=24),
        "weights": weights / weights.sum(1, keepdims=True),
        "kintree_table": np.stack([parents, np.arange(24)]).astype(np.int64),
    }
    os.makedirs(folder / "smpl", exist_ok=True)
    with open(folder / "smpl" / "SMPL_NEUTRAL.pkl", "wb") as f:
        pickle.dump(fields, f)
    return fields


@pytest.fixture
def smpl_dir(tmp_path, monkeypatch):
    fields = _write_synthetic_smpl(tmp_path)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    return tmp_path, fields


def test_smpl_rest_pose_is_the_template(smpl_dir):
    _, fields = smpl_dir
    body = SMPLBody(dtype=torch.float64)  # folder from DIFFCP_SMPL_DIR
    assert (body.num_vertices, body.num_joints, body.num_shape_parameters) == (V_SMPL, 24, 10)
    assert body.faces.dtype == torch.int64 and body.faces.shape == (2000, 3)
    v = body.vertices()
    assert v.shape == (1, V_SMPL, 3)
    torch.testing.assert_close(v[0], torch.as_tensor(fields["v_template"]), atol=1e-6, rtol=0)


def test_smpl_shape_and_global_rotation(smpl_dir):
    folder, fields = smpl_dir
    body = load_body("smpl", model_dir=folder, dtype=torch.float64)
    betas = torch.zeros(2, 10, dtype=torch.float64)
    betas[1, 3] = 2.0
    shaped = fields["v_template"] + 2.0 * fields["shapedirs"][:, :, 3]
    pose = torch.zeros(2, 24, 3, dtype=torch.float64)
    pose[1, 0] = torch.tensor([0.0, 0.0, math.pi / 2])  # root turns 90 degrees about z
    v = body.vertices(pose, betas)
    root = torch.as_tensor(fields["J_regressor"][0] @ shaped)
    R = so3_exp(pose[1, 0])
    expected = (torch.as_tensor(shaped) - root) @ R.T + root
    torch.testing.assert_close(v[1], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(v[0], torch.as_tensor(fields["v_template"]), atol=1e-6, rtol=0)


def test_smpl_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match="registration"):
        SMPLBody()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SMPLBody(tmp_path / "missing")
    with pytest.raises(ValueError, match="model_type"):
        SMPLBody(tmp_path, model_type="mano")


def test_pose_and_shape_are_checked(smpl_dir):
    body = SMPLBody()
    with pytest.raises(ValueError, match="pose must have shape"):
        body.vertices(torch.zeros(1, 23, 3))
    with pytest.raises(ValueError, match="shape must have shape"):
        body.vertices(shape=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="same batch size"):
        body.vertices(torch.zeros(2, 24, 3), torch.zeros(3, 10))
    with pytest.raises(TypeError, match="pose must have a floating-point dtype"):
        body.vertices(torch.zeros(1, 24, 3, dtype=torch.int64))


def test_anny_refuses_downloading_topologies():
    with pytest.raises(ValueError, match="non-commercial"):
        AnnyBody(topology="smplx")
    with pytest.raises(ValueError, match="topology must be one of"):
        AnnyBody(topology="default")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("ANNY_CACHE_DIR", raising=False)
    monkeypatch.setenv("DIFFCP_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "anny"
    monkeypatch.setenv("ANNY_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"


@pytest.mark.slow
def test_anny_low_resolution_body():
    """Runs anny from its wheel (cold cache: 1-3 minutes once, then about a second)."""
    pytest.importorskip("anny")
    body = AnnyBody(topology=LOW_RESOLUTION)
    assert (body.num_vertices, body.faces.shape, body.num_joints, body.num_shape_parameters) == (1229, (2454, 3), 104, 6)
    assert body.shape_labels == ["gender", "age", "muscle", "weight", "height", "proportions"]
    pose = torch.zeros(2, 104, 3)
    pose[1, body.bone_labels.index("upperarm01.L")] = torch.tensor([0.0, 0.8, 0.0])
    shape = body.default_shape(2).requires_grad_(True)
    pose.requires_grad_(True)
    v = body.vertices(pose, shape)
    assert v.shape == (2, 1229, 3) and bool(torch.isfinite(v).all())
    height = v[0, :, 2].detach().max() - v[0, :, 2].detach().min()  # anny is z-up, in metres
    assert 1.4 < float(height) < 2.0
    moved = (v[1] - v[0]).detach().norm(dim=-1)
    assert float(moved.max()) > 0.05 and float(moved.median()) < 1e-4  # only the arm moves
    # the (B, J, 4, 4) form anny takes gives the same body
    T = torch.eye(4).repeat(2, 104, 1, 1)
    T[..., :3, :3] = so3_exp(pose.detach())
    torch.testing.assert_close(body.vertices(T, shape.detach()), v.detach())
    (v[1] ** 2).sum().backward()
    for g in (pose.grad, shape.grad):
        assert bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0


def test_smpl_body_is_placed_and_fitted_like_anny(smpl_dir):
    """The non-rigid fit runs on SMPL through smplx (a synthetic model file): joints in SMPL's order,
    unbounded betas, and a fit that lowers the energy (at the final temperature) of its start."""
    from diffcp.bodies.placed import SMPL_MEASURED_JOINTS, BodyParameters, PlacedBody
    from diffcp.nonrigid import BodyFitSettings, fit_body, mean_body_start, scan_energy

    body = SMPLBody(num_betas=4)
    placed = PlacedBody(body)
    assert placed.measured_joints == SMPL_MEASURED_JOINTS and placed.shape_bounds is None
    g = torch.Generator().manual_seed(0)
    truth = placed.rest(2, root=torch.tensor([[0.0, 0.0, 3.0], [0.2, 0.0, 3.5]]))
    truth = truth._replace(pose=0.2 * torch.randn(2, 12, 3, generator=g), shape=-0.5 * torch.ones(2, 4))
    mesh = placed.mesh(truth)
    assert mesh.vertices.shape == (2, V_SMPL, 3) and mesh.joints.shape == (2, 18, 3)
    assert torch.allclose(mesh.joints[:, 0], truth.root, atol=1e-5)  # pelvis = root
    pts, nrm = mesh.vertices[:, ::20], mesh.normals[:, ::20]
    start = truth._replace(pose=torch.zeros_like(truth.pose))
    settings = BodyFitSettings(iterations=4, rigid_iterations=1, pose_scales=(0.3,) * 12)
    fit = fit_body(placed, pts, nrm, start, settings)
    tau = settings.temperature[1]
    before = scan_energy(placed, start, pts, nrm, tau, settings)
    assert (fit.energies[-1] < before).all(), (fit.energies[-1], before)
    assert (fit.params.shape < 0).all()  # betas are not clamped to [0, 1]
    assert mean_body_start(placed, pts).rotation.shape == (2, 3, 3)
