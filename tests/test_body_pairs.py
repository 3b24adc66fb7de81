"""The body-pairs dataset: geometry of a pair, determinism, the on-disk format and its guards."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffcp.datasets.body_pairs import (
    BodyPairs,
    PairSettings,
    generate,
    intrinsics,
    load_manifest,
    make_pair,
)
from diffcp.geometry import invert_transform, rotation_angle, transform_points
from diffcp.render import render_depth

trimesh = pytest.importorskip("trimesh")
ROOT = Path(__file__).resolve().parents[1]
SMALL = PairSettings(image_size=48, num_points=256, min_valid_pixels=50)


@pytest.fixture(scope="module")
def mesh():
    """A capsule with a box on one side: a body-sized shape without symmetry to hide a motion."""
    body = trimesh.creation.capsule(height=1.2, radius=0.3, count=[16, 16])
    arm = trimesh.creation.box(extents=(0.5, 0.15, 0.15))
    arm.apply_translation((0.5, 0.0, 0.3))
    m = trimesh.util.concatenate([body, arm])
    return torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces, dtype=torch.int64), m


def _distance_to(m, pose, points):
    """Distances of camera-frame ``points`` to the mesh ``m`` seen from ``pose`` (Open3D)."""
    o3d = pytest.importorskip("open3d")
    world = transform_points(torch.as_tensor(pose)[None], torch.as_tensor(points, dtype=torch.float64)[None])[0]
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(np.asarray(m.vertices, np.float32)),
                        o3d.core.Tensor(np.asarray(m.faces, np.uint32)))
    return scene.compute_distance(o3d.core.Tensor(world.numpy().astype(np.float32))).numpy()


def test_pair_geometry(mesh):
    v, f, m = mesh
    p = make_pair(v, f, SMALL, torch.Generator().manual_seed(3))
    assert p.source_depth.shape == (48, 48) and p.source_points.shape == (256, 3)
    assert 2.5 - 1.0 < float(np.linalg.norm(p.camera_pose[:3, 3])) < 3.5 + 1.0
    # source points lie on the body, target points lie on the moved body
    d_src = _distance_to(m, p.camera_pose, p.source_points)
    back = transform_points(torch.as_tensor(p.transform).inverse()[None],
                            torch.as_tensor(p.target_points, dtype=torch.float64)[None])[0]
    d_tgt = _distance_to(m, p.camera_pose, back.numpy())
    d_wrong = _distance_to(m, p.camera_pose, p.target_points)
    assert np.median(d_wrong) > 1e-2  # the check can fail: unmoved target points are off the body
    assert d_src.max() < 1e-3 and d_tgt.max() < 1e-3
    # the recorded magnitudes are those of the transform and within the settings
    R = torch.as_tensor(p.transform[:3, :3])
    assert math.degrees(float(rotation_angle(R))) == pytest.approx(p.angle_deg, abs=1e-6)
    assert p.angle_deg <= SMALL.max_angle_deg and p.translation <= SMALL.max_translation
    moved = transform_points(torch.as_tensor(p.transform)[None], torch.as_tensor(p.source_points).double()[None])
    rms = float((moved[0] - torch.as_tensor(p.source_points).double()).square().sum(-1).mean().sqrt())
    assert rms == pytest.approx(p.initial_distance, rel=1e-6)
    # normals are unit and face the camera
    n = p.source_normals
    assert np.allclose(np.linalg.norm(n, axis=-1), 1, atol=1e-5)
    assert (np.einsum("ij,ij->i", n, p.source_points) < 0).mean() > 0.99


def test_pair_depth_is_the_render(mesh):
    v, f, m = mesh
    p = make_pair(v, f, SMALL, torch.Generator().manual_seed(4))
    cam = transform_points(invert_transform(torch.as_tensor(p.camera_pose)[None]), v[None].double()).float()
    depth = render_depth(cam, f, intrinsics(SMALL), 48, 48).depth[0]
    np.testing.assert_allclose(p.source_depth, depth.numpy(), atol=1e-5)
    moved = transform_points(torch.as_tensor(p.transform)[None], cam.double()).float()
    np.testing.assert_allclose(p.target_depth, render_depth(moved, f, intrinsics(SMALL), 48, 48).depth[0].numpy(),
                               atol=1e-5)


def test_few_pixels_sample_with_replacement_and_hopeless_views_raise(mesh):
    v, f, _ = mesh
    far = PairSettings(image_size=16, num_points=512, min_valid_pixels=4, distance=(6.0, 6.0))
    p = make_pair(v, f, far, torch.Generator().manual_seed(0))
    assert p.source_points.shape == (512, 3)
    assert len(np.unique(p.source_points, axis=0)) < 100  # fewer pixels than points: repeats
    tiny = PairSettings(image_size=16, min_valid_pixels=200, max_attempts=3)
    with pytest.raises(RuntimeError, match="valid pixels"):
        make_pair(v * 0.01, f, tiny, torch.Generator().manual_seed(0))


def test_generate_is_deterministic_atomic_and_guarded(mesh, tmp_path):
    v, f, _ = mesh
    counts = {"train": 5, "test": 3}
    a = generate(tmp_path / "a", v, f, counts, seed=7, settings=SMALL, shard_size=2, body_info={"model": "capsule"})
    b = generate(tmp_path / "b", v, f, counts, seed=7, settings=SMALL, shard_size=2, workers=2)
    sums = lambda m: [e["sha256"] for s in m["splits"].values() for e in s["shards"]]  # noqa: E731
    assert sums(a) == sums(b)  # worker count does not change the data
    c = generate(tmp_path / "c", v, f, counts, seed=8, settings=SMALL, shard_size=2)
    assert sums(a) != sums(c)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temporary folders left
    manifest = load_manifest(tmp_path / "a")
    assert manifest == json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 5 and len(manifest["splits"]["train"]["shards"]) == 3
    assert manifest["body"] == {"model": "capsule"} and manifest["generator_version"] >= 1
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate(tmp_path / "a", v, f, counts, seed=9, settings=SMALL)
    assert sums(load_manifest(tmp_path / "a")) == sums(a)
    generate(tmp_path / "a", v, f, counts, seed=8, settings=SMALL, shard_size=2, overwrite=True)
    assert sums(load_manifest(tmp_path / "a")) == sums(c)

    data = BodyPairs(tmp_path / "a", "train")
    assert len(data) == 5 and data[4]["source_depth"].shape == (48, 48)
    assert data.arrays["index"].tolist() == [0, 1, 2, 3, 4]
    assert data[0]["transform"].dtype == torch.float32
    with pytest.raises(ValueError, match="split 'val' is not in the dataset"):
        BodyPairs(tmp_path / "a", "val")
    shard = tmp_path / "a" / "train-0000.npz"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the data
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        BodyPairs(tmp_path / "a", "train")


def test_settings_and_counts_are_checked(mesh, tmp_path):
    v, f, _ = mesh
    with pytest.raises(ValueError, match="distance must be"):
        PairSettings(distance=(3.0, 2.0))
    with pytest.raises(ValueError, match="counts must be"):
        generate(tmp_path / "x", v, f, {"training": 3})
    with pytest.raises(ValueError, match="workers must be"):
        generate(tmp_path / "x", v, f, {"train": 3}, workers=0)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_manifest(tmp_path)


@pytest.mark.slow
def test_script_with_anny(tmp_path):
    pytest.importorskip("anny")
    spec = importlib.util.spec_from_file_location("gen", ROOT / "data_scripts" / "generate_body_pairs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    out = tmp_path / "pairs"
    args = ["--out", str(out), "--train", "3", "--val", "1", "--test", "2", "--topology", "notoes_collapse10pc",
            "--image-size", "64", "--num-points", "128", "--no-progress"]
    assert gen.main(args) == 0
    manifest = load_manifest(out)
    assert manifest["body"]["model"] == "anny-notoes_collapse10pc" and manifest["body"]["num_vertices"] == 1229
    assert len(BodyPairs(out, "test")) == 2
    assert gen.main(args) == 2  # refuses to overwrite
