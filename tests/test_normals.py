"""PCA normals: sphere, plane, Open3D, orientation, padding, gradients, errors."""

import numpy as np
import pytest
import torch

from diffcp.normals import estimate_normals, smallest_eigenvector


def fibonacci_sphere(n, radius=1.0, centre=(0.0, 0.0, 0.0), dtype=torch.float64):
    i = torch.arange(n, dtype=dtype) + 0.5
    phi = torch.acos(1 - 2 * i / n)
    theta = torch.pi * (1 + 5**0.5) * i
    x = torch.stack([torch.cos(theta) * torch.sin(phi), torch.sin(theta) * torch.sin(phi), torch.cos(phi)], -1)
    return x * radius + torch.tensor(centre, dtype=dtype)


def naive_normals(points, k):
    """Reference: loop over points, neighbours by sorting, SVD of the centred neighbourhood."""
    out = []
    for x in points.double():
        nb = points.double()[((points.double() - x) ** 2).sum(-1).argsort()[:k]]
        _, _, vh = torch.linalg.svd(nb - nb.mean(0))
        out.append(vh[-1])
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sphere_outward_radial(dtype):
    centre = (1.0, -2.0, 0.5)
    pts = fibonacci_sphere(800, 2.0, centre, dtype=dtype)
    n = estimate_normals(pts, k=12)
    assert n.dtype == dtype and n.shape == (800, 3)
    radial = (pts - torch.tensor(centre, dtype=dtype)) / 2.0
    assert ((n * radial).sum(-1) > 0.995).all()
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(800, dtype=dtype))


def test_viewpoint_orientation():
    pts = fibonacci_sphere(400)[None]
    inward = estimate_normals(pts, k=10, orient="viewpoint")  # origin is the centre: inward
    assert ((inward * pts).sum(-1) < -0.99).all()
    vp = torch.tensor([[0.0, 0.0, 10.0]], dtype=torch.float64)
    towards = estimate_normals(pts, k=10, orient="viewpoint", viewpoint=vp)
    assert (((vp[:, None] - pts) * towards).sum(-1) > 0).all()
    free = estimate_normals(pts, k=10, orient=None)
    assert ((free * inward).sum(-1).abs() > 1 - 1e-12).all()


def test_plane_and_naive_reference():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g, dtype=torch.float64) * 4
    R = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64)).Q
    pts = torch.cat([xy, torch.zeros(300, 1, dtype=torch.float64)], -1) @ R.T + 1.0
    n = estimate_normals(pts, k=8, orient="viewpoint", viewpoint=pts.mean(0) + 5 * R[:, 2])
    torch.testing.assert_close(n, R[:, 2].expand(300, 3))
    # curved, noisy surface against a naive SVD reference (up to sign)
    surf = torch.cat([xy, (xy[:, :1] ** 2 / 4 + torch.sin(xy[:, 1:]))], -1)
    n = estimate_normals(surf, k=10, orient=None)
    ref = naive_normals(surf, 10)
    assert ((n * ref).sum(-1).abs() > 1 - 1e-9).all()


def test_matches_open3d():
    o3d = pytest.importorskip("open3d")
    g = torch.Generator().manual_seed(1)
    uv = torch.rand(2000, 2, generator=g, dtype=torch.float64) * 2 - 1
    pts = torch.cat([uv, 0.3 * torch.sin(2 * uv[:, :1]) * torch.cos(3 * uv[:, 1:])], -1)
    pts = pts + 0.002 * torch.randn(2000, 3, generator=g, dtype=torch.float64)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts.numpy()))
    pcd.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(knn=16))
    ref = np.asarray(pcd.normals)
    n = estimate_normals(pts, k=16).numpy()
    cos = np.abs((n * ref).sum(-1))
    assert np.median(cos) > 1 - 1e-9 and cos.min() > 0.999


def test_padded_equals_unpadded_and_zero_padding():
    g = torch.Generator().manual_seed(2)
    a = fibonacci_sphere(200)
    b = fibonacci_sphere(120, 0.5, (3.0, 0.0, 0.0)) + 1e-3 * torch.randn(120, 3, generator=g, dtype=torch.float64)
    P = torch.zeros(2, 200, 3, dtype=torch.float64)
    P[0], P[1, :120] = a, b
    P[1, 120:] = b[:80] + 1e-4  # padding that would corrupt neighbourhoods if used
    lengths = torch.tensor([200, 120])
    n = estimate_normals(P, lengths, k=8)
    torch.testing.assert_close(n[0], estimate_normals(a, k=8))
    torch.testing.assert_close(n[1, :120], estimate_normals(b, k=8))
    assert (n[1, 120:] == 0).all()


def test_gradcheck_curved_patch_and_padding():
    g = torch.Generator().manual_seed(3)
    u, v = torch.meshgrid(torch.linspace(-1, 1, 4, dtype=torch.float64), torch.linspace(-1, 1, 3, dtype=torch.float64), indexing="ij")
    patch = torch.stack([u, 1.3 * v, 0.3 * u**2 + 0.5 * v**2 + 0.1 * u * v], -1).reshape(12, 3)
    patch = patch + 0.01 * torch.randn(12, 3, generator=g, dtype=torch.float64)
    P = torch.stack([patch, patch.flip(0) * 0.7]).requires_grad_()
    lengths = torch.tensor([12, 9])
    assert torch.autograd.gradcheck(lambda P: estimate_normals(P, lengths, k=5), (P,))
    estimate_normals(P, lengths, k=5).sum().backward()
    assert torch.isfinite(P.grad).all() and (P.grad[1, 9:] == 0).all()


def test_smallest_eigenvector_gradcheck_and_degenerate_gradient():
    g = torch.Generator().manual_seed(4)
    A = torch.randn(6, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def f(A):
        v = smallest_eigenvector(A @ A.transpose(-1, -2))
        return v * torch.sign(v[..., :1])  # fix the arbitrary sign

    assert torch.autograd.gradcheck(f, (A,))
    # repeated eigenvalues (a perfect grid plane): the gradient stays finite
    C = torch.diag(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)).requires_grad_()
    smallest_eigenvector(C).sum().backward()
    assert torch.isfinite(C.grad).all()


def test_bad_input():
    pts = torch.rand(2, 10, 3)
    with pytest.raises(ValueError, match="k must be at most"):
        estimate_normals(pts, k=11)
    with pytest.raises(ValueError, match="k must be at most"):
        estimate_normals(pts, torch.tensor([10, 5]), k=6)
    with pytest.raises(ValueError, match="at least 3"):
        estimate_normals(pts, k=2)
    with pytest.raises(ValueError, match="orient"):
        estimate_normals(pts, k=4, orient="inward")
    with pytest.raises(ValueError, match="viewpoint"):
        estimate_normals(pts, k=4, orient="viewpoint", viewpoint=torch.zeros(3, 3))
    with pytest.raises(TypeError, match="viewpoint"):
        estimate_normals(pts, k=4, orient="viewpoint", viewpoint=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        estimate_normals(torch.rand(10, 2), k=4)
    with pytest.raises(TypeError, match="floating-point"):
        estimate_normals(torch.ones(10, 3, dtype=torch.int64), k=4)
