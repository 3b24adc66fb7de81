"""Tests for diffcp.correspond: nearest, soft and projective correspondences."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from scipy.special import softmax

from diffcp.camera import depth_to_points, intrinsics_matrix, normals_from_depth
from diffcp.correspond import (
    Correspondences,
    nearest_correspondences,
    projective_correspondences,
    soft_correspondences,
)
from diffcp.geometry import make_transform, random_transform
from diffcp.search import NearestNeighborIndex

F64 = torch.float64


# ----------------------------------------------------------------------------- scene helpers
def render_scene(K, H, W, sphere_cam=(0.1, -0.1, 2.0), radius=0.5, wall=3.0):
    """Z-depth of a sphere in front of a fronto-parallel wall, both given in the camera frame."""
    Kinv = np.linalg.inv(K)
    rays = np.stack(list(np.meshgrid(np.arange(W), np.arange(H), indexing="xy")) + [np.ones((H, W))], -1) @ Kinv.T
    c = np.asarray(sphere_cam)
    a = (rays * rays).sum(-1)
    b = rays @ c
    disc = b * b - a * (c @ c - radius**2)
    s = (b - np.sqrt(np.clip(disc, 0, None))) / a
    return np.where(disc > 0, s, wall)


def naive_projective(src, depth, K, pose, normal_map, mode):
    """Per-point loop reference of projective association (numpy, float64)."""
    B, N, _ = src.shape
    H, W = depth.shape[1:]
    pts = np.zeros((B, N, 3))
    nrm = np.zeros((B, N, 3))
    valid = np.zeros((B, N), bool)
    for b in range(B):
        R, t = pose[b, :3, :3], pose[b, :3, 3]
        Kinv = np.linalg.inv(K[b])

        def vertex(r, c):
            return R @ (depth[b, r, c] * (Kinv @ np.array([c, r, 1.0]))) + t

        for i in range(N):
            pc = R.T @ (src[b, i] - t)
            if pc[2] <= 1e-9:
                continue
            h = K[b] @ pc
            u, v = h[0] / h[2], h[1] / h[2]
            if mode == "nearest":
                c, r = math.floor(u + 0.5), math.floor(v + 0.5)
                if not (0 <= c < W and 0 <= r < H) or not depth[b, r, c] > 0:
                    continue
                pts[b, i], nrm[b, i], valid[b, i] = vertex(r, c), normal_map[b, r, c], True
            else:
                if not (0 <= u <= W - 1 and 0 <= v <= H - 1):
                    continue
                c0, r0 = min(math.floor(u), W - 2), min(math.floor(v), H - 2)
                au, av = u - c0, v - r0
                corners = [(r0, c0, (1 - au) * (1 - av)), (r0, c0 + 1, au * (1 - av)),
                           (r0 + 1, c0, (1 - au) * av), (r0 + 1, c0 + 1, au * av)]
                if not all(depth[b, r, c] > 0 for r, c, _ in corners):
                    continue
                pts[b, i] = sum(w * vertex(r, c) for r, c, w in corners)
                n = sum(w * normal_map[b, r, c] for r, c, w in corners)
                nrm[b, i] = n / np.linalg.norm(n) if np.linalg.norm(n) > 1e-8 else 0.0
                valid[b, i] = True
    return pts, nrm, valid


def _setup(B=2, H=20, W=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = torch.stack([intrinsics_matrix(30.0 + 5 * b, 28.0, (W - 1) / 2, (H - 1) / 2 + b, dtype=F64) for b in range(B)])
    pose = random_transform(B, generator=g, dtype=F64)
    depth = torch.stack([torch.from_numpy(render_scene(K[b].numpy(), H, W)) for b in range(B)])
    return g, K, pose, depth


def _assert_corr_close(c, pts, nrm, valid, atol=1e-9):
    assert torch.equal(c.valid, torch.from_numpy(valid))
    np.testing.assert_allclose(c.points.numpy(), pts, atol=atol)
    np.testing.assert_allclose(c.normals.numpy(), nrm, atol=atol)


def _outputs(c):
    """Differentiable outputs for gradcheck, which silently skips outputs that do not require grad."""
    outs = (c.points, c.normals, c.sq_distances)
    assert all(o.requires_grad for o in outs)
    return outs


# ----------------------------------------------------------------------------- projective
def test_projective_nearest_returns_surface_point_at_same_pixel():
    g, K, pose, depth = _setup()
    B, H, W = depth.shape
    verts, _ = depth_to_points(depth, K, pose)
    normals = normals_from_depth(depth, K, pose).reshape(B, H * W, 3)
    pix = torch.randint(0, H * W, (B, 60), generator=g)
    surface = torch.gather(verts, 1, pix[..., None].expand(-1, -1, 3))
    # nudge along the surface by far less than half a pixel
    source = surface + 1e-4 * torch.randn(surface.shape, generator=g, dtype=F64)
    c = projective_correspondences(source, depth, K, pose, mode="nearest")
    assert isinstance(c, Correspondences) and c.valid.all()
    torch.testing.assert_close(c.points, surface)
    torch.testing.assert_close(c.normals, torch.gather(normals, 1, pix[..., None].expand(-1, -1, 3)))
    torch.testing.assert_close(c.sq_distances, ((source - surface) ** 2).sum(-1))


def _random_sources(g, K, pose, depth, N=200):
    """Points whose pixels spread over and beyond the image, some behind the camera, world frame."""
    B, H, W = depth.shape
    uv = torch.rand(B, N, 2, generator=g, dtype=F64) * torch.tensor([W + 4.0, H + 4.0], dtype=F64) - 2
    z = torch.rand(B, N, generator=g, dtype=F64) * 3 + 0.5
    z[:, :10] = -z[:, :10]  # behind the camera
    rays = torch.cat([uv, torch.ones_like(uv[..., :1])], -1) @ torch.linalg.inv(K).transpose(-1, -2)
    cam = rays * z[..., None]
    return cam @ pose[:, :3, :3].transpose(-1, -2) + pose[:, None, :3, 3]


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_projective_matches_naive_reference(mode):
    g, K, pose, depth = _setup(seed=1)
    B, H, W = depth.shape
    depth[0, 5:8, 9:11] = 0.0  # holes
    depth[1, 12, 3] = float("nan")
    source = _random_sources(g, K, pose, depth)
    nmap = normals_from_depth(depth, K, pose)
    c = projective_correspondences(source, depth, K, pose, mode=mode)
    pts, nrm, valid = naive_projective(source.numpy(), depth.numpy(), K.numpy(), pose.numpy(), nmap.numpy(), mode)
    assert 50 < valid.sum() < valid.size - 50
    _assert_corr_close(c, pts, nrm, valid)
    np.testing.assert_allclose(c.sq_distances.numpy(), ((source.numpy() - pts) ** 2).sum(-1) * valid, atol=1e-9)
    assert (c.points[~c.valid] == 0).all() and (c.sq_distances[~c.valid] == 0).all()
    # an explicit normal map is used as given
    given = torch.nn.functional.normalize(torch.randn(B, H, W, 3, generator=g, dtype=F64), dim=-1)
    c2 = projective_correspondences(source, depth, K, pose, normal_map=given, mode=mode)
    pts, nrm, valid = naive_projective(source.numpy(), depth.numpy(), K.numpy(), pose.numpy(), given.numpy(), mode)
    _assert_corr_close(c2, pts, nrm, valid)


def test_projective_bilinear_equals_nearest_at_pixel_centres():
    g, K, pose, depth = _setup(seed=2)
    B, H, W = depth.shape
    verts, _ = depth_to_points(depth, K, pose)
    # every pixel, including the last row and column (bilinear uses the cell to the left/top there)
    c_near = projective_correspondences(verts, depth, K, pose, mode="nearest")
    c_bil = projective_correspondences(verts, depth, K, pose, mode="bilinear")
    assert c_near.valid.all() and c_bil.valid.all()
    torch.testing.assert_close(c_bil.points, c_near.points, atol=1e-9, rtol=0)
    torch.testing.assert_close(c_bil.normals, c_near.normals, atol=1e-6, rtol=0)
    torch.testing.assert_close(c_bil.sq_distances, c_near.sq_distances, atol=1e-12, rtol=0)


def test_projective_padding_unbatched_and_float32():
    g, K, pose, depth = _setup(B=1, seed=3)
    verts, _ = depth_to_points(depth, K, pose)
    source = verts[:, 100:110]
    c = projective_correspondences(source, depth, K, pose, mode="bilinear", source_lengths=torch.tensor([6]))
    assert c.valid[0, :6].all() and not c.valid[0, 6:].any()
    assert (c.points[0, 6:] == 0).all() and (c.normals[0, 6:] == 0).all()
    cu = projective_correspondences(source[0], depth[0], K[0], pose[0], mode="bilinear")
    assert cu.points.shape == (10, 3) and cu.valid.shape == (10,)
    torch.testing.assert_close(cu.points[:6], c.points[0, :6])
    c32 = projective_correspondences(source.float(), depth.float(), K.float(), pose.float(), mode="nearest")
    assert c32.points.dtype == torch.float32 and c32.valid.all()
    torch.testing.assert_close(c32.points.double(), source, atol=1e-4, rtol=0)


def test_projective_bilinear_gradcheck_source_and_depth():
    g = torch.Generator().manual_seed(4)
    H, W = 6, 7
    K = intrinsics_matrix(8.0, 9.0, 3.0, 2.5, dtype=F64)
    pose = random_transform(1, generator=g, dtype=F64)
    depth = 2 + 0.3 * torch.rand(1, H, W, generator=g, dtype=F64)
    # sub-pixel locations strictly inside cells (away from integer coordinates) and inside the
    # region where the normal map is defined
    uv = torch.tensor([[[2.3, 1.6], [3.7, 2.2], [4.4, 3.45], [1.55, 2.8]]], dtype=F64)
    z = torch.tensor([[1.8, 2.1, 2.4, 1.9]], dtype=F64)
    cam = torch.cat([uv, torch.ones_like(uv[..., :1])], -1) @ torch.linalg.inv(K).T * z[..., None]
    source = cam @ pose[:, :3, :3].transpose(-1, -2) + pose[:, None, :3, 3]

    def f(s, d):
        c = projective_correspondences(s, d, K, pose, mode="bilinear")
        assert c.valid.all()
        return _outputs(c)

    assert torch.autograd.gradcheck(f, (source.requires_grad_(), depth.requires_grad_()))

    def f_near(d):  # nearest mode: differentiable in the depth (and pose), not in the pixel choice
        c = projective_correspondences(source.detach(), d, K, pose, mode="nearest")
        return _outputs(c)

    assert torch.autograd.gradcheck(f_near, (depth,))


def test_projective_gradients_finite_for_invalid_points():
    g, K, pose, depth = _setup(B=1, H=8, W=9, seed=5)
    depth[0, 1, 1] = 0.0  # the last point projects to (u, v) = (1, 0.98): next to this hole
    cam = torch.tensor([[[0.0, 0.0, 0.0], [0.1, 0.1, -1.0], [1e3, 0.0, 1e-9], [50.0, 0.0, 1.0], [-0.1, -0.09, 1.0], [0.05, 0.05, 1.0]]], dtype=F64)
    source = (cam @ pose[:, :3, :3].transpose(-1, -2) + pose[:, None, :3, 3]).requires_grad_()
    depth.requires_grad_()
    for mode in ("nearest", "bilinear"):
        c = projective_correspondences(source, depth, K, pose, mode=mode)
        assert not c.valid[0, :5].any() and c.valid[0, 5]
        (c.points.sum() + c.normals.sum() + c.sq_distances.sum()).backward()
        assert torch.isfinite(source.grad).all() and torch.isfinite(depth.grad).all()
        assert (source.grad[0, :5] == 0).all() and (source.grad[0, 5] != 0).any()
        source.grad = depth.grad = None


def test_projective_bad_inputs():
    g, K, pose, depth = _setup(B=2, H=5, W=6, seed=6)
    src = torch.zeros(2, 3, 3, dtype=F64)
    with pytest.raises(ValueError, match="mode"):
        projective_correspondences(src, depth, K, pose, mode="linear")
    with pytest.raises(ValueError, match="depth"):
        projective_correspondences(src, torch.ones(3, 5, 6, dtype=F64), K, pose)
    with pytest.raises(ValueError, match="2 x 2"):
        projective_correspondences(src, depth[:, :1], K, pose, mode="bilinear")
    with pytest.raises(ValueError, match="normal_map"):
        projective_correspondences(src, depth, K, pose, normal_map=torch.zeros(2, 5, 6, dtype=F64))
    with pytest.raises(ValueError, match="camera_pose"):
        projective_correspondences(src, depth, K, pose[:1].expand(3, 4, 4))
    with pytest.raises(TypeError, match="intrinsics"):
        projective_correspondences(src, depth, None, pose)
    with pytest.raises(ValueError, match="source_lengths"):
        projective_correspondences(src, depth, K, pose, source_lengths=torch.tensor([1, 4]))


# ----------------------------------------------------------------------------- nearest
def _padded_clouds(g, B=3, N=40, M=50, dtype=F64):
    src = torch.randn(B, N, 3, generator=g, dtype=dtype)
    tgt = torch.randn(B, M, 3, generator=g, dtype=dtype)
    nrm = torch.nn.functional.normalize(torch.randn(B, M, 3, generator=g, dtype=dtype), dim=-1)
    src_len = torch.tensor([N, N - 7, 5][:B])
    tgt_len = torch.tensor([M, 11, M - 20][:B])
    return src, tgt, nrm, src_len, tgt_len


def test_nearest_matches_scipy_with_padding():
    g = torch.Generator().manual_seed(7)
    src, tgt, nrm, sl, tl = _padded_clouds(g)
    tgt[1, tl[1]:] = 0.0  # padding sitting right on the queries must never be returned
    c = nearest_correspondences(src, tgt, nrm, sl, tl)
    for b in range(3):
        n, m = int(sl[b]), int(tl[b])
        d, idx = cKDTree(tgt[b, :m].numpy()).query(src[b, :n].numpy())
        np.testing.assert_allclose(c.points[b, :n].numpy(), tgt[b, idx].numpy())
        np.testing.assert_allclose(c.normals[b, :n].numpy(), nrm[b, idx].numpy())
        np.testing.assert_allclose(c.sq_distances[b, :n].numpy(), d**2, rtol=1e-10)
        assert c.valid[b, :n].all() and not c.valid[b, n:].any()
        assert (c.points[b, n:] == 0).all() and (c.sq_distances[b, n:] == 0).all()
    # a prebuilt index gives the same answer; no normals -> None
    index = NearestNeighborIndex(tgt, tl)
    ci = nearest_correspondences(src, tgt, nrm, sl, tl, index=index)
    for a, b in zip(c, ci):
        assert torch.equal(a, b)
    assert nearest_correspondences(src, tgt, source_lengths=sl, target_lengths=tl).normals is None


def test_nearest_unbatched_float32():
    src = torch.tensor([[0.1, 0.0, 0.0], [0.9, 1.0, 0.0]])
    tgt = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    c = nearest_correspondences(src, tgt)
    assert c.points.shape == (2, 3) and c.points.dtype == torch.float32
    torch.testing.assert_close(c.points, tgt[:2])
    torch.testing.assert_close(c.sq_distances, torch.tensor([0.01, 0.01]))


def test_nearest_gradcheck_gathered_outputs():
    g = torch.Generator().manual_seed(8)
    src, tgt, nrm, _, _ = _padded_clouds(g, B=2, N=8, M=10)
    sl, tl = torch.tensor([8, 5]), torch.tensor([10, 6])

    def f(s, t, n):
        c = nearest_correspondences(s, t, n, sl, tl)
        return _outputs(c)

    # well-separated clouds: finite differences never change the nearest neighbour
    assert torch.autograd.gradcheck(f, (src.requires_grad_(), tgt.requires_grad_(), nrm.requires_grad_()))


# ----------------------------------------------------------------------------- soft
def naive_soft(src, tgt, nrm, sl, tl, T):
    """Dense numpy reference, cloud by cloud."""
    B, N, _ = src.shape
    pts, nr, sq = np.zeros((B, N, 3)), np.zeros((B, N, 3)), np.zeros((B, N))
    for b in range(B):
        n, m = int(sl[b]), int(tl[b])
        d2 = ((src[b, :n, None] - tgt[b, None, :m]) ** 2).sum(-1)
        w = softmax(-d2 / T, axis=-1)
        pts[b, :n] = w @ tgt[b, :m]
        avg = w @ nrm[b, :m]
        nr[b, :n] = avg / np.linalg.norm(avg, axis=-1, keepdims=True)
        sq[b, :n] = ((src[b, :n] - pts[b, :n]) ** 2).sum(-1)
    return pts, nr, sq


@pytest.mark.parametrize("backend", ["dense", "attention"])
def test_soft_matches_naive_reference(backend):
    g = torch.Generator().manual_seed(9)
    src, tgt, nrm, sl, tl = _padded_clouds(g)
    c = soft_correspondences(src, tgt, 0.3, nrm, sl, tl, backend=backend)
    pts, nr, sq = naive_soft(src.numpy(), tgt.numpy(), nrm.numpy(), sl, tl, 0.3)
    np.testing.assert_allclose(c.points.numpy(), pts, atol=1e-8)
    np.testing.assert_allclose(c.normals.numpy(), nr, atol=1e-8)
    np.testing.assert_allclose(c.sq_distances.numpy(), sq, atol=1e-8)
    assert torch.equal(c.valid, torch.arange(40)[None] < sl[:, None])
    torch.testing.assert_close(c.normals[c.valid].norm(dim=-1), torch.ones(int(sl.sum()), dtype=F64))


def test_soft_low_temperature_equals_nearest():
    g = torch.Generator().manual_seed(10)
    src, tgt, nrm, sl, tl = _padded_clouds(g)
    hard = nearest_correspondences(src, tgt, nrm, sl, tl)
    soft = soft_correspondences(src, tgt, 1e-6, nrm, sl, tl)
    torch.testing.assert_close(soft.points, hard.points, atol=1e-6, rtol=0)
    torch.testing.assert_close(soft.normals, hard.normals, atol=1e-6, rtol=0)


def test_soft_gradcheck_source_target_normals():
    g = torch.Generator().manual_seed(11)
    src, tgt, nrm, _, _ = _padded_clouds(g, B=2, N=4, M=5)
    sl, tl = torch.tensor([4, 3]), torch.tensor([5, 4])

    def f(s, t, n):
        c = soft_correspondences(s, t, 0.5, n, sl, tl)
        return _outputs(c)

    assert torch.autograd.gradcheck(f, (src.requires_grad_(), tgt.requires_grad_(), nrm.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_normal_renormalisation_never_nan(dtype):
    # a query halfway between two points with opposite normals: the average cancels exactly
    tgt = torch.tensor([[[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 9.0, 0.0]]], dtype=dtype, requires_grad=True)
    nrm = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]], dtype=dtype, requires_grad=True)
    src = torch.tensor([[[0.0, 0.0, 0.0], [1e-7, 0.0, 0.0], [0.9, 0.0, 0.0]]], dtype=dtype, requires_grad=True)
    c = soft_correspondences(src, tgt, 1.0, nrm)
    assert torch.isfinite(c.normals).all()
    assert (c.normals[0, 0] == 0).all()  # cancelled -> zero, not NaN
    torch.testing.assert_close(c.normals[0, 2].norm(), torch.tensor(1.0, dtype=dtype))
    (c.normals.sum() + c.points.sum() + c.sq_distances.sum()).backward()
    for t in (src, tgt, nrm):
        assert torch.isfinite(t.grad).all()


# ----------------------------------------------------------------------------- bad input
def test_nearest_and_soft_bad_inputs():
    g = torch.Generator().manual_seed(12)
    src, tgt, nrm, sl, tl = _padded_clouds(g, B=2)
    with pytest.raises(ValueError, match="source_t"):
        nearest_correspondences(src[:1], tgt)
    with pytest.raises(ValueError, match="target"):
        nearest_correspondences(src, tgt[..., :2])
    with pytest.raises(TypeError, match="dtype"):
        nearest_correspondences(src, tgt.float())
    with pytest.raises(ValueError, match="target_normals"):
        nearest_correspondences(src, tgt, nrm[:, :5])
    with pytest.raises(ValueError, match="target_lengths"):
        nearest_correspondences(src, tgt, target_lengths=torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="index"):
        nearest_correspondences(src, tgt, index="tree")
    with pytest.raises(ValueError, match="index"):
        nearest_correspondences(src, tgt, index=NearestNeighborIndex(tgt[:, :9]))
    with pytest.raises(ValueError, match="temperature"):
        soft_correspondences(src, tgt, 0.0)
    with pytest.raises(ValueError, match="backend"):
        soft_correspondences(src, tgt, 1.0, backend="flash")
    with pytest.raises(ValueError, match="source_t"):
        soft_correspondences(src * float("nan"), tgt, 1.0)


def test_pose_from_make_transform_is_accepted():
    # camera at the origin looking down +z, identity pose built with geometry.make_transform
    pose = make_transform(torch.eye(3, dtype=F64), torch.zeros(3, dtype=F64))
    K = intrinsics_matrix(2.0, 2.0, 1.0, 1.0, dtype=F64)
    c = projective_correspondences(torch.tensor([[0.0, 0.0, 1.5]], dtype=F64), torch.full((3, 3), 2.0, dtype=F64), K, pose)
    torch.testing.assert_close(c.points, torch.tensor([[0.0, 0.0, 2.0]], dtype=F64))
    torch.testing.assert_close(c.normals, torch.tensor([[0.0, 0.0, -1.0]], dtype=F64))
