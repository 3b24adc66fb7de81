"""The z-buffer rasteriser: exact depths of planes, Open3D's ray caster, occlusion, gradients."""

import math

import numpy as np
import pytest
import torch

from diffcp.camera import depth_to_points, intrinsics_matrix
from diffcp.render import look_at, render_depth

trimesh = pytest.importorskip("trimesh")


def _camera(H=32, W=40, fov_deg=40.0, dtype=torch.float64):
    f = W / 2 / math.tan(math.radians(fov_deg) / 2)
    return intrinsics_matrix(f, f, (W - 1) / 2, (H - 1) / 2, dtype=dtype)


def _quad(z=2.0, half=5.0, dtype=torch.float64):
    v = torch.tensor([[-half, -half, z], [half, -half, z], [half, half, z], [-half, half, z]], dtype=dtype)
    return v, torch.tensor([[0, 1, 2], [0, 2, 3]])


def test_tilted_plane_depth_is_exact():
    """Perspective-correct depth: every pixel of a tilted plane back-projects onto the plane."""
    K = _camera()
    v, faces = _quad()
    R = torch.tensor([[1.0, 0, 0], [0, math.cos(0.5), -math.sin(0.5)], [0, math.sin(0.5), math.cos(0.5)]],
                     dtype=torch.float64)
    centre = torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64)
    v = (v - torch.tensor([0, 0, 2.0], dtype=torch.float64)) @ R.T + centre
    out = render_depth(v, faces, K, 32, 40)
    assert bool((out.depth > 0).all()) and bool((out.face_index >= 0).all())
    pts, valid = depth_to_points(out.depth, K)
    normal = R[:, 2]
    torch.testing.assert_close((pts[0] - centre) @ normal, torch.zeros(32 * 40, dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_nearest_face_wins_and_background_is_zero():
    K = _camera()
    far, faces = _quad(z=4.0)
    near, _ = _quad(z=2.0, half=0.3)
    out = render_depth(torch.cat([far, near]), torch.cat([faces, faces + 4]), K, 32, 40)
    assert float(out.depth[16, 20]) == pytest.approx(2.0) and int(out.face_index[16, 20]) >= 2
    assert float(out.depth[0, 0]) == pytest.approx(4.0) and int(out.face_index[0, 0]) < 2
    small, _ = _quad(z=2.0, half=0.3)
    empty = render_depth(small, faces, K, 32, 40)
    assert float(empty.depth[0, 0]) == 0.0 and int(empty.face_index[0, 0]) == -1
    # a face behind the camera is not drawn
    behind = render_depth(_quad(z=-2.0)[0], faces, K, 32, 40)
    assert float(behind.depth.abs().max()) == 0.0


def test_matches_open3d_raycasting():
    """Open3D's ray caster puts pixel centres at u + 0.5, so its principal point is shifted by 0.5."""
    o3d = pytest.importorskip("open3d")
    mesh = trimesh.creation.torus(0.6, 0.25, major_sections=48, minor_sections=24)
    H, W = 48, 64
    K = _camera(H, W, dtype=torch.float32)
    verts = torch.tensor(mesh.vertices, dtype=torch.float32)
    faces = torch.tensor(mesh.faces, dtype=torch.int64)
    pose = look_at(torch.tensor([[0.4, -2.2, 1.2]]), torch.zeros(3))
    ours = render_depth(verts[None], faces, K, H, W, pose).depth[0].numpy()

    scene = o3d.t.geometry.RaycastingScene()
    tm = o3d.t.geometry.TriangleMesh()
    tm.vertex.positions = o3d.core.Tensor(verts.numpy())
    tm.triangle.indices = o3d.core.Tensor(faces.numpy().astype(np.int32))
    scene.add_triangles(tm)
    K_o3d = K.double().clone()
    K_o3d[:2, 2] += 0.5
    extrinsic = torch.linalg.inv(pose[0].double())
    rays = scene.create_rays_pinhole(o3d.core.Tensor(K_o3d.numpy()), o3d.core.Tensor(extrinsic.numpy()), W, H)
    t_hit = scene.cast_rays(rays)["t_hit"].numpy()
    z_axis = pose[0, :3, 2].double().numpy()
    theirs = t_hit * (rays.numpy()[..., 3:] @ z_axis)  # ray length -> z-depth
    theirs[~np.isfinite(theirs)] = 0.0
    hit_ours, hit_theirs = ours > 0, theirs > 0
    assert hit_theirs.sum() > 500
    assert (hit_ours != hit_theirs).sum() <= 0.005 * hit_theirs.sum()  # silhouette pixels on an edge
    both = hit_ours & hit_theirs
    assert np.abs(ours[both] - theirs[both]).max() < 5e-5


def test_depth_gradients_are_finite_and_nonzero():
    K = _camera()
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    v = torch.tensor(mesh.vertices, dtype=torch.float64) + torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64)
    v.requires_grad_(True)
    out = render_depth(v, torch.tensor(mesh.faces), K, 32, 40)
    out.depth.sum().backward()
    assert bool(torch.isfinite(v.grad).all())
    seen = torch.zeros(v.shape[0], dtype=torch.bool)
    seen[torch.tensor(mesh.faces)[out.face_index[out.face_index >= 0]].unique()] = True
    assert float(v.grad[seen].abs().sum()) > 0
    assert float(v.grad[~seen].abs().sum()) == 0.0  # hidden vertices get no gradient
    # scaling the scene about the camera centre by s keeps every projection and scales every depth
    # by s, so d(sum of depths)/ds at s = 1, which is sum_v grad_v . v, is the sum of depths
    torch.testing.assert_close((v.grad * v.detach()).sum(), out.depth.detach().sum())


def test_gradcheck_tiny_mesh():
    K = torch.tensor([[8.0, 0, 3.5], [0, 8.0, 3.5], [0, 0, 1]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    base = torch.tensor([[-1.13, -0.97, 2.1], [1.07, -1.21, 2.6], [0.93, 1.11, 2.4], [-1.02, 1.19, 1.9]],
                        dtype=torch.float64)

    def depth(v):
        return render_depth(v, faces, K, 8, 8).depth

    assert int((depth(base) > 0).sum()) > 30
    torch.autograd.gradcheck(depth, (base.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


def test_batch_matches_single_renders_and_errors():
    K = _camera(dtype=torch.float32)
    mesh = trimesh.creation.box(extents=(0.6, 0.4, 0.3))
    v = torch.tensor(mesh.vertices, dtype=torch.float32)
    faces = torch.tensor(mesh.faces)
    eyes = torch.tensor([[0.0, -2.0, 0.5], [1.5, 1.0, -0.7]])
    poses = look_at(eyes, torch.zeros(3))
    batch = render_depth(v.expand(2, -1, -1), faces, K, 32, 40, poses).depth
    for i in range(2):
        torch.testing.assert_close(batch[i], render_depth(v, faces, K, 32, 40, poses[i]).depth)
    with pytest.raises(ValueError, match="faces must index"):
        render_depth(v, faces + 100, K, 32, 40)
    with pytest.raises(TypeError, match="faces must be an integer"):
        render_depth(v, faces.float(), K, 32, 40)
    with pytest.raises(ValueError, match="height must be a positive integer"):
        render_depth(v, faces, K, 0, 40)


def test_look_at_is_an_upright_opencv_camera():
    eyes = torch.tensor([[0.0, -3.0, 0.0], [2.0, 1.0, 0.5], [0.0, 0.0, 4.0]], dtype=torch.float64)
    centre = torch.tensor([0.0, 0.0, 0.2], dtype=torch.float64)
    pose = look_at(eyes, centre)
    R = pose[:, :3, :3]
    torch.testing.assert_close(R.transpose(1, 2) @ R, torch.eye(3, dtype=torch.float64).expand(3, 3, 3))
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(3, dtype=torch.float64))
    forward = (centre - eyes) / (centre - eyes).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(R[:, :, 2], forward)
    torch.testing.assert_close(pose[:, :3, 3], eyes)
    # image "down" (camera y) points as far down (-z) as the view direction allows
    assert bool((R[:2, 2, 1] < -0.8).all())
    # a point above the centre lands in the upper half of the image (v < cy)
    K = _camera()
    above = torch.tensor([[[0.0, 0.0, 0.8]]], dtype=torch.float64).expand(2, 1, 3)
    from diffcp.camera import project, world_to_camera
    uv, _ = project(world_to_camera(pose[:2], above), K)
    assert bool((uv[:, 0, 1] < K[1, 2]).all())
