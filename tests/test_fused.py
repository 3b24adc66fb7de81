"""The compiled hard-NN point-to-point loop (:mod:`diffcp.fused`) and the kept-neighbour shortcut of
its pass (:func:`diffcp.search.grid._fused_point_to_point`): every piece against its reference."""

import math
import warnings

import numpy as np
import pytest
import torch

import diffcp
from diffcp import fused
from diffcp.geometry import make_transform, random_transform, so3_exp, twist_between
from diffcp.minimize.procrustes import procrustes_conditioning, procrustes_from_moments
from diffcp.search import grid as grid_module

pytestmark = pytest.mark.skipif(not grid_module.AVAILABLE, reason="the compiled loop needs numba")


def _brute_sq(y, target, tlen):
    """Exact squared nearest distances ``(B, N)`` by brute force over the valid target points."""
    d = torch.cdist(y, target) ** 2
    d = d.masked_fill(torch.arange(target.shape[1])[None, None, :] >= tlen[:, None, None], math.inf)
    return d.min(-1).values


def _walk(steps, seed):
    """Transforms of a random walk whose steps range from 1e-7 to 0.3 rad (and as many length units)."""
    g = torch.Generator().manual_seed(seed)
    T = torch.eye(4, dtype=torch.float64).expand(2, 4, 4).clone()
    out = []
    for i in range(steps):
        size = 10.0 ** (-7 + 6.5 * torch.rand((), generator=g).item())
        xi = torch.randn(2, 6, generator=g, dtype=torch.float64) * size
        T = make_transform(so3_exp(xi[:, :3]) @ T[:, :3, :3], T[:, :3, 3] + xi[:, 3:])
        out.append(T)
    return out


@pytest.mark.parametrize("cloud", ["random", "lattice"])
def test_kept_neighbours_stay_exact_along_a_random_walk(cloud):
    g = torch.Generator().manual_seed(5)
    if cloud == "random":
        target = torch.rand(2, 600, 3, generator=g, dtype=torch.float64)
        source = torch.rand(2, 500, 3, generator=g, dtype=torch.float64)
    else:  # ties everywhere: queries on the lattice's cell centres and faces are equidistant to several points
        ax = torch.arange(8, dtype=torch.float64) / 7
        lattice = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)[:500]
        target = torch.cat([lattice, torch.zeros(100, 3, dtype=torch.float64)])[None].repeat(2, 1, 1)
        source = (lattice[None] + 0.5 / 7).repeat(2, 1, 1)
    tlen, slen = torch.tensor([600, 451]), torch.tensor([500, 377])
    if cloud == "lattice":
        tlen = torch.tensor([500, 451])
    target[1, 451:] = -50.0  # padding that would be nearest if it were used
    weights = (torch.arange(500)[None] < slen[:, None]).double()
    grid = grid_module.BatchGrid(target, tlen)
    warm, kept = None, []
    for T in _walk(60, seed=6):
        _, idx, _, _ = grid.point_to_point_moments(source, T, weights, slen, warm)
        warm = idx
        if grid.kept_fraction is not None:
            kept.append(grid.kept_fraction)
        y = diffcp.geometry.transform_points(T, source)
        got = ((y - torch.gather(target, 1, torch.from_numpy(idx)[..., None].expand(-1, -1, 3))) ** 2).sum(-1)
        want = _brute_sq(y, target, tlen)
        valid = weights > 0
        torch.testing.assert_close(got[valid], want[valid], rtol=1e-12, atol=1e-14)
        assert (torch.from_numpy(idx) < tlen[:, None])[valid].all()  # never a padded point
    assert max(kept) > 0.5  # the shortcut was taken (small steps) ...
    assert min(kept) < 0.1  # ... and refused (large steps)


def test_a_query_crossing_a_voronoi_boundary_is_searched_again():
    target = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0], [5.0, 5, 5], [5.0, -5, 5]]], dtype=torch.float64)
    source = torch.tensor([[[0.49, 0.0, 0.0], [3.0, 3.0, 3.0], [-1.0, 0.0, 0.0]]], dtype=torch.float64)
    weights = torch.ones(1, 3, dtype=torch.float64)
    grid = grid_module.BatchGrid(target, torch.tensor([4]))
    slen = torch.tensor([3])
    eye = torch.eye(4, dtype=torch.float64)[None]
    _, idx, _, _ = grid.point_to_point_moments(source, eye, weights, slen, None)
    assert idx[0, 0] == 0
    for shift, expected in [(0.005, 0), (0.01, 0), (0.02, 1), (0.0, 0)]:  # 0.49 -> 0.495 -> 0.5 (a tie) -> 0.51
        T = eye.clone()
        T[0, 0, 3] = shift
        _, idx, _, _ = grid.point_to_point_moments(source, T, weights, slen, idx.copy())
        if shift != 0.01:  # at 0.5 both points are nearest
            assert idx[0, 0] == expected, shift
    assert grid.kept_fraction is not None


def test_warm_guesses_from_another_run_are_only_guesses():
    g = torch.Generator().manual_seed(8)
    target = torch.rand(2, 400, 3, generator=g, dtype=torch.float64)
    source = torch.rand(2, 300, 3, generator=g, dtype=torch.float64)
    weights = torch.ones(2, 300, dtype=torch.float64)
    slen, tlen = torch.tensor([300, 300]), torch.tensor([400, 400])
    grid = grid_module.BatchGrid(target, tlen)
    eye = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    _, idx, _, _ = grid.point_to_point_moments(source, eye, weights, slen, None)
    wrong = np.roll(idx, 7, axis=1).copy()  # valid indices, but not the previous answer: no shortcut
    T = random_transform(2, max_angle=1e-6, max_translation=1e-6, generator=g, dtype=torch.float64)
    _, got, _, _ = grid.point_to_point_moments(source, T, weights, slen, wrong)
    assert grid.kept_fraction == 0.0
    y = diffcp.geometry.transform_points(T, source)
    sq = ((y - torch.gather(target, 1, torch.from_numpy(got)[..., None].expand(-1, -1, 3))) ** 2).sum(-1)
    torch.testing.assert_close(sq, _brute_sq(y, target, tlen), rtol=1e-12, atol=1e-14)


def test_procrustes_from_moments_compiled_equals_the_torch_version():
    g = torch.Generator().manual_seed(9)
    B = 5
    x = torch.randn(B, 50, 3, generator=g, dtype=torch.float64)
    q = x @ so3_exp(torch.randn(B, 3, generator=g, dtype=torch.float64)).transpose(-1, -2) + 2.0
    q[1] = x[1] * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)  # mirrored: the determinant correction
    q[2] = 0.0  # the cross-covariance vanishes: identity
    w = torch.rand(B, 50, generator=g, dtype=torch.float64)
    sref, tref = torch.randn(B, 3, generator=g, dtype=torch.float64), torch.randn(B, 3, generator=g, dtype=torch.float64)
    xs, qs = x - sref[:, None], q - tref[:, None]
    moments = torch.cat([w.sum(1, keepdim=True), (w[..., None] * xs).sum(1), (w[..., None] * qs).sum(1),
                         torch.einsum("bn,bni,bnj->bij", w, qs, xs).reshape(B, 9), torch.zeros(B, 1, dtype=torch.float64)],
                        1)
    want = procrustes_from_moments(moments[:, 0], moments[:, 1:4], moments[:, 4:7], moments[:, 7:16].reshape(B, 3, 3),
                                   sref, tref)
    out = np.zeros((B, 4, 4))
    fused._procrustes_moments(moments.numpy()[:, None, :].copy(), sref.numpy(), tref.numpy(), np.ones(B, dtype=bool),
                              out)
    torch.testing.assert_close(torch.from_numpy(out), make_transform(*want), rtol=0, atol=1e-12)
    assert np.linalg.det(out[1, :3, :3]) == pytest.approx(1.0)
    skipped = np.full((B, 4, 4), 7.0)
    fused._procrustes_moments(moments.numpy()[:, None, :].copy(), sref.numpy(), tref.numpy(), np.zeros(B, dtype=bool),
                              skipped)
    assert (skipped == 7.0).all()  # inactive clouds are left alone


@pytest.mark.parametrize("angle", [0.0, 1e-9, 1e-4, 0.3, 2.0, math.pi - 1e-3, math.pi - 1e-8])
def test_twist_norms_equal_twist_between(angle):
    g = torch.Generator().manual_seed(10)
    axis = torch.nn.functional.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=-1)
    old = random_transform(4, generator=g, dtype=torch.float64)
    step = make_transform(so3_exp(axis * angle), torch.randn(4, 3, generator=g, dtype=torch.float64))
    new = step @ old
    want = twist_between(new, old)
    out = np.zeros((4, 2))
    fused._twist_norms(new.numpy(), old.numpy(), out)
    np.testing.assert_allclose(out[:, 0], want[:, :3].norm(dim=-1).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out[:, 1], want[:, 3:].norm(dim=-1).numpy(), rtol=1e-9, atol=1e-12)


def _grid_problem(B=4, N=600, seed=11):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(B, N, 3, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5],
                        dtype=torch.float64)
    T = random_transform(B, max_angle=0.15, max_translation=0.05, generator=g, dtype=torch.float64)
    source = diffcp.geometry.transform_points(diffcp.geometry.invert_transform(T), target[:, : N - 50])
    source = source + 0.003 * torch.randn(source.shape, generator=g, dtype=torch.float64)
    return source, target


@pytest.mark.parametrize("tolerance", [1e-3, 1e-5])
def test_compiled_loop_freezes_converged_clouds_like_the_general_loop(tolerance):
    source, target = _grid_problem()
    kwargs = dict(stopping=diffcp.Stopping(max_iterations=40, tolerance=tolerance))
    with torch.no_grad():
        fast = diffcp.icp(source, target, correspondence=diffcp.NearestNeighbor(backend="grid"), **kwargs)
        slow = diffcp.icp(source, target, correspondence=diffcp.NearestNeighbor(backend="tree"), **kwargs)
    assert len(set(fast.iterations.tolist())) > 1  # the clouds converged at different iterations
    assert torch.equal(fast.iterations, slow.iterations)
    assert torch.equal(fast.converged, slow.converged)
    torch.testing.assert_close(fast.transform, slow.transform, rtol=0, atol=1e-9)
    torch.testing.assert_close(fast.errors, slow.errors, rtol=1e-9, atol=1e-12)


def test_reusing_an_index_across_runs_keeps_the_answers_exact():
    source, target = _grid_problem(seed=12)
    index = diffcp.NearestNeighborIndex(target, backend="grid")
    lengths = torch.full((4,), source.shape[1])
    weights = torch.ones(source.shape[:2], dtype=torch.float64)
    scale = torch.ones(4, dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64).expand(4, 4, 4)
    first = fused.run_point_to_point(index, source, weights, lengths, eye, 15, 0.0, scale)
    init = random_transform(4, max_angle=0.05, max_translation=0.02, generator=torch.Generator().manual_seed(3),
                            dtype=torch.float64)
    again = fused.run_point_to_point(index, source, weights, lengths, init, 15, 0.0, scale)
    fresh = fused.run_point_to_point(diffcp.NearestNeighborIndex(target, backend="grid"), source, weights, lengths,
                                     init, 15, 0.0, scale)
    assert first is not None
    torch.testing.assert_close(again[0], fresh[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(again[3], fresh[3], rtol=0, atol=1e-12)


def test_compiled_conditioning_equals_procrustes_conditioning_and_warns_on_a_line():
    source, target = _grid_problem(seed=13)
    index = diffcp.NearestNeighborIndex(target, backend="grid")
    lengths = torch.full((4,), source.shape[1])
    weights = torch.ones(source.shape[:2], dtype=torch.float64)
    T = random_transform(4, max_angle=0.1, max_translation=0.1, generator=torch.Generator().manual_seed(4),
                         dtype=torch.float64)
    got = fused.conditioning_point_to_point(index, source, T, weights, lengths)
    y = diffcp.geometry.transform_points(T, source)
    matched = diffcp.knn(y, target, backend="tree")
    points = torch.gather(target, 1, matched.indices.expand(-1, -1, 3))
    torch.testing.assert_close(got, procrustes_conditioning(source, points), rtol=1e-9, atol=1e-12)

    t = torch.linspace(0, 1, 400, dtype=torch.float64)
    line = torch.stack([t, 2 * t, -t], -1)[None].repeat(2, 1, 1)
    with pytest.warns(RuntimeWarning, match="ambiguous for batch elements \\[0, 1\\]"):
        diffcp.icp(line, line + 0.01, correspondence=diffcp.NearestNeighbor(backend="grid"),
                   stopping=diffcp.Stopping(max_iterations=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diffcp.icp(source, target, correspondence=diffcp.NearestNeighbor(backend="grid"),
                   stopping=diffcp.Stopping(max_iterations=3))


def _plane_problem(dtype=torch.float64, seed=14):
    from shapes import sample

    g = torch.Generator().manual_seed(seed)
    tlen, slen = torch.tensor([720, 600, 655]), torch.tensor([700, 523, 611])
    tgt = torch.full((3, 720, 3), 1e3, dtype=dtype)  # padding that would be nearest if used
    tn = torch.zeros(3, 720, 3, dtype=dtype)
    src = torch.full((3, 700, 3), 77.0, dtype=dtype)
    sn = torch.zeros(3, 700, 3, dtype=dtype)
    T = random_transform(3, max_angle=0.25, max_translation=0.1, generator=g, dtype=dtype)
    for b in range(3):
        p, n = sample("bumpy_sphere", int(tlen[b]), seed=b, dtype=dtype)
        x, m = sample("bumpy_sphere", int(slen[b]), seed=10 + b, dtype=dtype)
        tgt[b, : tlen[b]], tn[b, : tlen[b]] = p, n
        R, t = T[b, :3, :3], T[b, :3, 3]
        src[b, : slen[b]], sn[b, : slen[b]] = (x - t) @ R, m @ R  # R^T (x - t): T maps source into target
    return src, sn, slen, tgt, tn, tlen


@pytest.mark.parametrize("metric", ["point_to_plane", "symmetric"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_compiled_gauss_newton_loop_equals_the_general_loop(metric, dtype, atol):
    import importlib

    icp_module = importlib.import_module("diffcp.icp")
    src, sn, slen, tgt, tn, tlen = _plane_problem(dtype)
    mask = torch.rand(3, 700, generator=torch.Generator().manual_seed(3)) > 0.2
    kwargs = dict(source_lengths=slen, target_lengths=tlen, target_normals=tn, metric=metric, solver="gauss_newton",
                  stopping=diffcp.Stopping(max_iterations=25, tolerance=1e-6), source_mask=mask)
    if metric == "symmetric":
        kwargs["source_normals"] = sn
    calls = []
    original = icp_module.run_gauss_newton
    icp_module.run_gauss_newton = lambda *args: calls.append(1) or original(*args)
    try:
        with torch.no_grad():
            fast = diffcp.icp(src, tgt, correspondence=diffcp.NearestNeighbor(backend="grid"), **kwargs)
            assert calls == [1]
            slow = diffcp.icp(src, tgt, correspondence=diffcp.NearestNeighbor(backend="tree"), **kwargs)
            assert calls == [1]
            with_lm = diffcp.icp(src, tgt, correspondence=diffcp.NearestNeighbor(backend="grid"), 
                              **{**kwargs, "solver": "levenberg_marquardt", "stopping": diffcp.Stopping(max_iterations=2)})
            assert calls == [1] and with_lm.iterations.max() == 2  # LM keeps the general loop
    finally:
        icp_module.run_gauss_newton = original
    if dtype == torch.float64:
        assert len(set(fast.iterations.tolist())) > 1  # the clouds converged at different iterations
    assert torch.equal(fast.iterations, slow.iterations)
    assert torch.equal(fast.converged, slow.converged)
    torch.testing.assert_close(fast.transform, slow.transform, rtol=0, atol=atol)
    torch.testing.assert_close(fast.errors, slow.errors, rtol=1e-4 if dtype == torch.float32 else 1e-9, atol=atol)
    assert fast.transform.dtype == dtype


def test_compiled_gauss_newton_loop_is_skipped_when_normals_need_gradients():
    import importlib

    icp_module = importlib.import_module("diffcp.icp")
    src, sn, slen, tgt, tn, tlen = _plane_problem()
    tn = tn.clone().requires_grad_(True)
    calls = []
    original = icp_module.run_gauss_newton
    icp_module.run_gauss_newton = lambda *args: calls.append(1) or original(*args)
    try:
        out = diffcp.icp(src, tgt, source_lengths=slen, target_lengths=tlen, target_normals=tn,
                         metric="point_to_plane", correspondence=diffcp.NearestNeighbor(backend="grid"),
                         solver="gauss_newton", stopping=diffcp.Stopping(max_iterations=4))
        assert not calls
        out.translation.sum().backward()
        assert tn.grad is not None and torch.isfinite(tn.grad).all() and tn.grad.abs().sum() > 0
        # implicit: the forward iterations carry no graph and are compiled
        tn.grad = None
        out = diffcp.icp(src, tgt, source_lengths=slen, target_lengths=tlen, target_normals=tn,
                         metric="point_to_plane", correspondence=diffcp.NearestNeighbor(backend="grid"),
                         solver="gauss_newton", stopping=diffcp.Stopping(max_iterations=4), backward="implicit")
        assert calls == [1]
        out.translation.sum().backward()
        assert torch.isfinite(tn.grad).all() and tn.grad.abs().sum() > 0
    finally:
        icp_module.run_gauss_newton = original


def test_target_normals_are_copied_again_when_modified_in_place():
    src, sn, slen, tgt, tn, tlen = _plane_problem()
    kwargs = dict(source_lengths=slen, target_lengths=tlen, metric="point_to_plane", solver="gauss_newton",
                  stopping=diffcp.Stopping(max_iterations=5), correspondence=diffcp.NearestNeighbor(backend="grid"))
    index = diffcp.NearestNeighborIndex(tgt, tlen, backend="grid")
    grid = index._grid_index()
    weights = (torch.arange(700)[None] < slen[:, None]).double()
    eye = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
    first, _ = grid.plane_normal_equations(src, eye, weights, slen, tn, None)
    first = first.copy()
    tn.mul_(2.0)  # same tensor, new values: r and J double
    second, _ = grid.plane_normal_equations(src, eye, weights, slen, tn, None)
    np.testing.assert_allclose(second[..., 22:28], 4 * first[..., 22:28], rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        diffcp.icp(src, tgt, target_normals=tn, **kwargs)


@pytest.mark.parametrize("metric", ["point_to_plane", "symmetric"])
def test_compiled_gauss_newton_conditioning_equals_the_general_one_and_warns_on_a_plane(metric):
    from diffcp.minimize.gauss_newton import normal_equations

    src, sn, slen, tgt, tn, tlen = _plane_problem(seed=15)
    index = diffcp.NearestNeighborIndex(tgt, tlen, backend="grid")
    weights = (torch.arange(700)[None] < slen[:, None]).double()
    T = random_transform(3, max_angle=0.1, max_translation=0.1, generator=torch.Generator().manual_seed(5),
                         dtype=torch.float64)
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    normals = sn if metric == "symmetric" else None
    got = fused.conditioning_gauss_newton(index, src, T, weights, slen, tn, normals, scale)
    # the general computation, as diffcp.icp does it without the compiled loop
    y = diffcp.geometry.transform_points(T, src)
    nn = diffcp.knn(y, tgt, slen, tlen, backend="tree").indices
    q, nq = (torch.gather(a, 1, nn.expand(-1, -1, 3)) for a in (tgt, tn))
    ny = diffcp.geometry.rotate_vectors(T[:, :3, :3], sn) if normals is not None else None
    c = (y * weights[..., None]).sum(1) / weights.sum(1)[:, None]
    A, _, _ = normal_equations(metric, y - c[:, None], q - c[:, None], weights, target_normals=nq, source_normals=ny)
    d = torch.cat([1 / scale[:, None].expand(-1, 3), torch.ones(3, 3, dtype=torch.float64)], 1)
    ev = torch.linalg.eigvalsh(A * d[:, :, None] * d[:, None, :])
    torch.testing.assert_close(got, ev[:, 0] / ev[:, -1], rtol=1e-7, atol=1e-12)

    g = torch.Generator().manual_seed(6)
    plane = torch.rand(2, 500, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1.0, 0.0],
                       dtype=torch.float64)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(2, 500, 3)
    extra = dict(source_normals=up) if metric == "symmetric" else {}
    with pytest.warns(RuntimeWarning, match="ambiguous for batch elements \\[0, 1\\]"):
        diffcp.icp(plane + 0.01, plane, target_normals=up, metric=metric,
                   correspondence=diffcp.NearestNeighbor(backend="grid"), solver="gauss_newton",
                   stopping=diffcp.Stopping(max_iterations=3), **extra)


@pytest.mark.parametrize("metric", ["point_to_point", "point_to_plane"])
def test_results_do_not_depend_on_the_grouping_of_clouds(monkeypatch, metric):
    src, sn, slen, tgt, tn, tlen = _plane_problem(seed=16)
    kwargs = dict(source_lengths=slen, target_lengths=tlen,
                  stopping=diffcp.Stopping(max_iterations=30, tolerance=1e-6),
                  correspondence=diffcp.NearestNeighbor(backend="grid"))
    if metric == "point_to_plane":
        kwargs.update(target_normals=tn, metric=metric, solver="gauss_newton")
    with torch.no_grad():
        monkeypatch.setattr(fused, "GROUP_BYTES", 1)  # one cloud at a time
        assert fused._group_size(3, 700, 720) == 1
        one = diffcp.icp(src, tgt, **kwargs)
        monkeypatch.setattr(fused, "GROUP_BYTES", 2**40)  # all at once
        assert fused._group_size(3, 700, 720) == 3
        together = diffcp.icp(src, tgt, **kwargs)
        slow = diffcp.icp(src, tgt, **{**kwargs, "correspondence": diffcp.NearestNeighbor(backend="tree")})
    assert len(set(together.iterations.tolist())) > 1  # frozen clouds repeat their last error
    for out in (one, slow):
        assert torch.equal(out.iterations, together.iterations)
        assert torch.equal(out.converged, together.converged)
        assert out.errors.shape == together.errors.shape
        torch.testing.assert_close(out.transform, together.transform, rtol=0, atol=1e-9)
        torch.testing.assert_close(out.errors, together.errors, rtol=1e-9, atol=1e-12)
