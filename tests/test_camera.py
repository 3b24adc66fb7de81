"""Tests for diffcp.camera: pinhole projection, back-projection, depth -> points and normals."""

import numpy as np
import pytest
import torch

from diffcp import checks
from diffcp.camera import (
    backproject,
    depth_to_points,
    intrinsics_matrix,
    normals_from_depth,
    project,
    world_to_camera,
)
from diffcp.geometry import random_transform, transform_points


# ----------------------------------------------------------------------------- analytic renderers
def _rays(K, H, W):
    """Naive per-pixel rays K^-1 [u, v, 1] (z component 1), numpy (H, W, 3)."""
    Kinv = np.linalg.inv(K)
    rays = np.zeros((H, W, 3))
    for r in range(H):
        for c in range(W):
            rays[r, c] = Kinv @ np.array([c, r, 1.0])
    return rays


def render_sphere(K, pose, center, radius, H, W):
    """Z-depth of a sphere (world centre, radius) seen by a camera-to-world pose; 0 where missed."""
    R, t = pose[:3, :3], pose[:3, 3]
    c = R.T @ (center - t)
    d = _rays(K, H, W)
    a = (d * d).sum(-1)
    b = d @ c
    disc = b * b - a * (c @ c - radius**2)
    s = (b - np.sqrt(np.clip(disc, 0, None))) / a
    return np.where((disc > 0) & (s > 0), s, 0.0)


def render_plane(K, normal, offset, H, W):
    """Z-depth of the camera-frame plane n . x = offset."""
    d = _rays(K, H, W)
    return offset / (d @ normal)


def _K(fx=60.0, fy=55.0, cx=15.3, cy=11.7, skew=0.0, dtype=torch.float64):
    return intrinsics_matrix(fx, fy, cx, cy, skew, dtype=dtype)


# ----------------------------------------------------------------------------- intrinsics, project
def test_intrinsics_matrix_scalar_and_batched():
    K = intrinsics_matrix(500.0, 400.0, 320.0, 240.0, skew=2.0, dtype=torch.float64)
    assert torch.equal(K, torch.tensor([[500.0, 2.0, 320.0], [0.0, 400.0, 240.0], [0.0, 0.0, 1.0]], dtype=torch.float64))
    fx = torch.tensor([100.0, 200.0])
    Kb = intrinsics_matrix(fx, 150.0, 10.0, torch.tensor([5.0, 6.0]))
    assert Kb.shape == (2, 3, 3) and Kb.dtype == torch.float32
    assert Kb[1, 0, 0] == 200 and Kb[1, 1, 1] == 150 and Kb[1, 1, 2] == 6 and Kb[0, 2, 2] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_project_matches_naive_pinhole(dtype):
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(2, 50, 3, generator=g, dtype=torch.float64)
    pts[..., 2] = pts[..., 2].abs() + 0.5
    K = torch.stack([_K(), _K(80.0, 81.0, 3.0, 4.0, skew=1.5)])
    uv, z = project(pts.to(dtype), K.to(dtype))
    assert uv.dtype == dtype and uv.shape == (2, 50, 2) and z.shape == (2, 50)
    for b in range(2):
        h = pts[b].numpy() @ K[b].numpy().T
        np.testing.assert_allclose(uv[b].double().numpy(), h[:, :2] / h[:, 2:], rtol=1e-5 if dtype == torch.float32 else 1e-12)
        np.testing.assert_allclose(z[b].double().numpy(), pts[b, :, 2].numpy(), rtol=1e-6)


def test_project_unbatched_and_zero_depth_finite():
    uv, z = project(torch.tensor([[0.1, -0.2, 2.0], [1.0, 1.0, 0.0]]), intrinsics_matrix(100.0, 100.0, 50.0, 40.0))
    assert uv.shape == (2, 2) and torch.allclose(uv[0], torch.tensor([55.0, 30.0]))
    assert torch.isfinite(uv).all()


@pytest.mark.parametrize("skew", [0.0, 3.0])
def test_backproject_then_project_gives_pixel_centres(skew):
    g = torch.Generator().manual_seed(1)
    H, W = 7, 9
    depth = torch.rand(2, H, W, generator=g, dtype=torch.float64) * 3 + 0.5
    K = _K(skew=skew)
    pts = backproject(depth, K)
    assert pts.shape == (2, H, W, 3)
    uv, z = project(pts.reshape(2, -1, 3), K)
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    expected = torch.stack([cols, rows], -1).reshape(1, -1, 2).double().expand(2, -1, -1)
    torch.testing.assert_close(uv, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(z, depth.reshape(2, -1))


def test_backproject_invalid_depth_gives_zero_and_no_nan():
    depth = torch.tensor([[1.0, float("nan"), 0.0], [-2.0, float("inf"), 3.0]])
    pts = backproject(depth, intrinsics_matrix(10.0, 10.0, 1.0, 0.5))
    assert pts.shape == (2, 3, 3)
    assert torch.isfinite(pts).all()
    assert (pts[0, 1:] == 0).all() and (pts[1, :2] == 0).all()
    assert (pts[0, 0] != 0).any() and (pts[1, 2] != 0).any()


def test_world_to_camera_inverts_pose():
    pose = random_transform(3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = torch.randn(3, 10, 3, dtype=torch.float64)
    torch.testing.assert_close(world_to_camera(pose, transform_points(pose, x)), x)


# ----------------------------------------------------------------------------- depth_to_points
def test_depth_to_points_matches_open3d():
    o3d = pytest.importorskip("open3d")
    g = torch.Generator().manual_seed(3)
    H, W = 12, 16
    depth = torch.rand(H, W, generator=g) * 2 + 0.5
    depth[3, 4] = 0.0
    depth[7, 1] = 0.0
    pose = random_transform(1, generator=g, dtype=torch.float64)[0]
    fx, fy, cx, cy = 40.0, 42.0, 7.5, 5.5
    K = intrinsics_matrix(fx, fy, cx, cy)
    pts, valid = depth_to_points(depth[None], K, pose.float())
    intr = o3d.camera.PinholeCameraIntrinsic(W, H, fx, fy, cx, cy)
    extrinsic = np.linalg.inv(pose.numpy())  # Open3D takes world-to-camera
    pc = o3d.geometry.PointCloud.create_from_depth_image(
        o3d.geometry.Image(depth.numpy()), intr, extrinsic, depth_scale=1.0, depth_trunc=1e6, stride=1,
        project_valid_depth_only=True,
    )
    ref = np.asarray(pc.points)
    assert pts.shape == (1, H * W, 3) and valid.shape == (1, H * W)
    assert int(valid.sum()) == H * W - 2 == len(ref)
    np.testing.assert_allclose(pts[0][valid[0]].numpy(), ref, atol=1e-5)
    assert (pts[0][~valid[0]] == 0).all()


def test_depth_to_points_sphere_lies_on_sphere():
    H, W = 24, 32
    K = _K(60.0, 60.0, 15.5, 11.5)
    pose = random_transform(1, max_translation=0.5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)[0]
    center_cam = np.array([0.1, -0.05, 2.0])
    center = pose[:3, :3].numpy() @ center_cam + pose[:3, 3].numpy()
    depth = torch.from_numpy(render_sphere(K.numpy(), pose.numpy(), center, 0.6, H, W))
    pts, valid = depth_to_points(depth[None], K, pose)
    hit = depth.reshape(-1) > 0
    assert torch.equal(valid[0], hit) and 50 < int(hit.sum()) < H * W
    r = (pts[0][valid[0]] - torch.from_numpy(center)).norm(dim=-1)
    torch.testing.assert_close(r, torch.full_like(r, 0.6), atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- normals
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normals_of_plane_are_exact_and_face_camera(dtype):
    H, W = 10, 12
    K = _K(30.0, 32.0, 5.5, 4.5)
    n = np.array([0.3, -0.2, -1.0])
    n /= np.linalg.norm(n)
    depth = torch.from_numpy(render_plane(K.numpy(), n, -1.5, H, W)).to(dtype)  # n . x = -1.5: faces camera
    assert (depth > 0).all()
    normals = normals_from_depth(depth[None], K.to(dtype))
    assert normals.shape == (1, H, W, 3) and normals.dtype == dtype
    inner = normals[0, 1:-1, 1:-1]
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(inner, torch.from_numpy(n).to(dtype).expand_as(inner), atol=tol, rtol=0)
    # border pixels have no central difference: zero
    assert (normals[0, 0] == 0).all() and (normals[0, :, -1] == 0).all()
    # same plane seen from the back side (offset sign flipped -> depth negative) is not used here;
    # instead flip the plane normal: orientation must still face the camera
    depth2 = torch.from_numpy(render_plane(K.numpy(), -n, 1.5, H, W)).to(dtype)
    torch.testing.assert_close(normals_from_depth(depth2[None], K.to(dtype))[0, 1:-1, 1:-1], inner, atol=tol, rtol=0)


def test_normals_of_sphere_match_analytic_in_world():
    H, W = 48, 64
    K = _K(90.0, 90.0, 31.5, 23.5)
    pose = random_transform(1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)[0]
    center = pose[:3, :3].numpy() @ np.array([0.0, 0.0, 3.0]) + pose[:3, 3].numpy()
    depth = torch.from_numpy(render_sphere(K.numpy(), pose.numpy(), center, 1.0, H, W))
    normals = normals_from_depth(depth[None], K, pose)[0]
    pts, _ = depth_to_points(depth[None], K, pose)
    defined = normals.norm(dim=-1) > 0
    assert int(defined.sum()) > 0.4 * H * W
    # defined only where the pixel and its 4 neighbours hit the sphere
    hit = depth > 0
    inner = torch.zeros_like(hit)
    inner[1:-1, 1:-1] = hit[1:-1, 1:-1] & hit[2:, 1:-1] & hit[:-2, 1:-1] & hit[1:-1, 2:] & hit[1:-1, :-2]
    assert torch.equal(defined, inner)
    torch.testing.assert_close(normals[defined].norm(dim=-1), torch.ones(int(defined.sum()), dtype=torch.float64))
    analytic = (pts[0].reshape(H, W, 3)[defined] - torch.from_numpy(center))  # outward = towards camera here
    cos = (normals[defined] * analytic).sum(-1)  # |analytic| = 1
    assert cos.min() > 0.995, cos.min()
    assert cos.median() > 0.9999


def test_normals_with_holes_are_zero_and_gradients_finite():
    g = torch.Generator().manual_seed(6)
    depth = (torch.rand(1, 8, 9, generator=g, dtype=torch.float64) * 0.1 + 2).requires_grad_()
    holes = torch.zeros(1, 8, 9, dtype=torch.bool)
    holes[0, 4, 4] = True
    holes[0, 2, 6] = True
    d = torch.where(holes, torch.tensor(float("nan"), dtype=torch.float64), depth)
    d = torch.where(torch.arange(9) == 1, torch.zeros_like(d), d)  # a column of zeros
    n = normals_from_depth(d, _K())
    assert torch.isfinite(n).all()
    assert (n[0, 4, 3:6] == 0).all() and (n[0, 3:6, 4] == 0).all()  # hole and its 4-neighbours
    assert (n[0, :, :3] == 0).all()  # zero column and its neighbours
    assert (n[0, 6, 6].norm() - 1).abs() < 1e-12
    n.sum().backward()
    assert torch.isfinite(depth.grad).all()


# ----------------------------------------------------------------------------- gradients
def _req(*outs):
    """gradcheck silently skips outputs that do not require grad: make sure all of them do."""
    assert all(o.requires_grad for o in outs)
    return outs


def test_gradcheck_project_and_backproject():
    g = torch.Generator().manual_seed(7)
    pts = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    pts[..., 2] += 4
    # intrinsics as (fx, fy, cx, cy, skew) per batch entry, so gradcheck only perturbs real parameters
    params = torch.tensor([[60.0, 55.0, 15.3, 11.7, 0.0], [50.0, 52.0, 3.0, 2.0, 0.7]], dtype=torch.float64)

    def K_of(q):
        return intrinsics_matrix(*q.unbind(-1))

    assert torch.autograd.gradcheck(lambda p, q: _req(*project(p, K_of(q))), (pts.requires_grad_(), params.clone().requires_grad_()))
    depth = torch.rand(2, 3, 4, generator=g, dtype=torch.float64) + 1
    assert torch.autograd.gradcheck(
        lambda d, q: _req(backproject(d, K_of(q))), (depth.requires_grad_(), params.clone().requires_grad_())
    )


def test_gradcheck_depth_to_points_and_normals():
    g = torch.Generator().manual_seed(8)
    depth = torch.rand(2, 5, 6, generator=g, dtype=torch.float64) * 0.3 + 2
    depth[0, 2, 3] = -1.0  # a hole (far from the 0 threshold): gradients must stay correct around it
    pose = random_transform(2, generator=g, dtype=torch.float64)
    K = _K(20.0, 21.0, 2.5, 2.0)
    assert torch.autograd.gradcheck(
        lambda d, T: _req(depth_to_points(d, K, T)[0]), (depth.clone().requires_grad_(), pose.clone().requires_grad_())
    )
    assert torch.autograd.gradcheck(
        lambda d, T: _req(normals_from_depth(d, K, T)), (depth.clone().requires_grad_(), pose.clone().requires_grad_())
    )


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise():
    K = _K()
    depth = torch.ones(1, 4, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="depth"):
        backproject(torch.ones(1, 4, 5, dtype=torch.int64), K)
    with pytest.raises(ValueError, match="depth"):
        backproject(torch.ones(4), K)
    with pytest.raises(ValueError, match="intrinsics"):
        backproject(depth, torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="intrinsics"):
        backproject(depth, torch.stack([K, K]))
    bad = K.clone()
    bad[2, 0] = 0.5
    with pytest.raises(ValueError, match="pinhole"):
        backproject(depth, bad)
    bad = K.clone()
    bad[1, 1] = -1.0
    with pytest.raises(ValueError, match="focal"):
        project(torch.ones(1, 2, 3, dtype=torch.float64), bad)
    with pytest.raises(TypeError, match="intrinsics"):
        project(torch.ones(1, 2, 3), [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="points_cam"):
        project(torch.ones(1, 2, 4), K)
    with pytest.raises(ValueError, match="camera_pose"):
        depth_to_points(depth, K, torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="fx"):
        intrinsics_matrix(0.0, 1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="batch size"):
        intrinsics_matrix(torch.ones(2), torch.ones(3), 0.0, 0.0)
    with pytest.raises(TypeError, match="cy"):
        intrinsics_matrix(1.0, 1.0, 0.0, "0")


def test_checks_disabled_skips_value_checks():
    bad = _K().clone()
    bad[2, 0] = 0.5
    checks.ENABLED = False
    try:
        backproject(torch.ones(1, 2, 2, dtype=torch.float64), bad)
    finally:
        checks.ENABLED = True
