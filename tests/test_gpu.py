"""The same results on a CUDA device as on the CPU (skipped, and reported as skipped, without one)."""

import pytest
import torch

import diffcp
from shapes import sample

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]

F64 = torch.float64


def _problem(batch=4, n=500, dtype=F64):
    g = torch.Generator().manual_seed(0)
    pts, nrm = sample("bumpy_sphere", n, dtype=dtype)
    src = pts.expand(batch, n, 3).contiguous()
    T = diffcp.random_transform(batch, max_angle=0.3, max_translation=0.05, generator=g, dtype=dtype)
    tgt = diffcp.transform_points(T, src)[:, torch.randperm(n, generator=g)]
    tgt_n = diffcp.estimate_normals(tgt, k=12, orient="outward")
    return src, tgt, tgt_n, T


def test_knn_matmul_on_gpu_equals_tree_on_cpu():
    q = torch.rand(3, 2000, 3, dtype=F64)
    p = torch.rand(3, 3000, 3, dtype=F64)
    cpu = diffcp.knn(q, p, k=4, backend="tree")
    gpu = diffcp.knn(q.cuda(), p.cuda(), k=4)  # "auto" picks matmul on CUDA
    assert torch.equal(cpu.indices, gpu.indices.cpu())
    torch.testing.assert_close(cpu.sq_distances, gpu.sq_distances.cpu())


def test_soft_attention_on_gpu_equals_dense_on_cpu():
    q = torch.rand(2, 700, 3, dtype=torch.float32)
    p = torch.rand(2, 900, 3, dtype=torch.float32)
    dense = diffcp.soft_nearest(q, p, 1e-2, backend="dense").points
    att = diffcp.soft_nearest(q.cuda(), p.cuda(), 1e-2, backend="attention").points
    torch.testing.assert_close(dense, att.cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("correspondence,solver,metric", [
    ("nn", "procrustes", "point_to_point"),
    ("nn", "gauss_newton", "point_to_plane"),
    ("soft_nn", "levenberg_marquardt", "point_to_plane"),
])
def test_icp_on_gpu_equals_cpu(correspondence, solver, metric):
    src, tgt, tgt_n, T = _problem()
    corr = diffcp.SoftNearestNeighbor(temperature=1e-3) if correspondence == "soft_nn" else "nn"
    kw = dict(correspondence=corr, solver=solver, metric=metric,
              stopping=diffcp.Stopping(max_iterations=20, tolerance=0))
    cpu = diffcp.icp(src, tgt, target_normals=tgt_n, **kw)
    gpu = diffcp.icp(src.cuda(), tgt.cuda(), target_normals=tgt_n.cuda(), **kw)
    assert gpu.transform.device.type == "cuda"
    torch.testing.assert_close(cpu.transform, gpu.transform.cpu(), atol=1e-8, rtol=0)


@pytest.mark.parametrize("backward", ["unroll", "implicit"])
def test_gradients_on_gpu_equal_cpu(backward):
    src, tgt, tgt_n, _ = _problem(batch=2, n=200)
    grads = []
    for device in ("cpu", "cuda"):
        t = tgt.to(device).requires_grad_()
        out = diffcp.icp(src.to(device), t, correspondence=diffcp.SoftNearestNeighbor(temperature=1e-2),
                         stopping=diffcp.Stopping(max_iterations=30, tolerance=1e-12), backward=backward)
        (g,) = torch.autograd.grad(out.translation.sum(), t)
        assert torch.isfinite(g).all()
        grads.append(g.cpu())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-8, rtol=1e-6)
