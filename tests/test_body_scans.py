"""The body-scans dataset: what a scan holds, determinism, conditions, the format's guards."""

import json

import numpy as np
import pytest
import torch

from diffcp.datasets.body_scans import CONDITIONS, KEYS, ScanSettings, generate_scans, intrinsics, load_scans

anny = pytest.importorskip("anny")
SMALL = ScanSettings(image_size=64, num_points=128, min_valid_pixels=60)


@pytest.fixture(scope="module")
def placed():
    from diffcp.bodies.anny import LOW_RESOLUTION, AnnyBody
    from diffcp.bodies.placed import PlacedBody

    return PlacedBody(AnnyBody(topology=LOW_RESOLUTION))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, placed):
    root = tmp_path_factory.mktemp("scans") / "d"
    generate_scans(root, placed, {"train": 6, "test": 6}, seed=3, settings=SMALL, command="test")
    return root


def test_scans_hold_the_documented_arrays_and_truth(dataset, placed):
    manifest, a = load_scans(dataset, "test")
    assert set(a) == set(KEYS) and a["depth"].shape == (6, 64, 64) and a["points"].shape == (6, 128, 3)
    assert [CONDITIONS[int(c)] for c in a["condition"]] == ["clean", "noise", "partial"] * 2
    from diffcp.bodies.placed import BodyParameters

    mesh = placed.mesh(BodyParameters(a["rotation"], a["root"], a["pose"], a["shape"]))
    assert torch.allclose(mesh.vertices, a["vertices"], atol=1e-5) and torch.allclose(mesh.joints, a["joints"], atol=1e-5)
    # clean scan points lie on the body: within a few cm of a vertex of the low-resolution mesh
    near = torch.cdist(a["points"][0], a["vertices"][0]).amin(-1)
    assert near.median() < 0.04
    assert manifest["intrinsics"] == intrinsics(SMALL).tolist()
    R = a["rotation"]
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3).expand(6, 3, 3), atol=1e-5)


def test_noise_and_occluder_change_the_depth(dataset, placed):
    from diffcp.datasets.body_scans import _apply_condition

    _, a = load_scans(dataset, "test")
    clean = a["depth"][0]
    g = torch.Generator().manual_seed(0)
    noisy = _apply_condition(clean, 1, SMALL, g)
    valid = clean > 0
    assert (noisy[valid] - clean[valid]).std() > 0.5 * SMALL.noise_std and (noisy[~valid] == 0).all()
    cut = _apply_condition(clean, 2, SMALL, g)
    removed = (valid & (cut == 0)).sum() / valid.sum()
    assert 0.05 < float(removed) < 0.6


def test_generation_is_deterministic_and_splits_do_not_share_bodies(dataset, placed, tmp_path):
    again = tmp_path / "again"
    generate_scans(again, placed, {"test": 3}, seed=3, settings=SMALL)
    _, a = load_scans(dataset, "test")
    _, b = load_scans(again, "test")
    assert all(torch.equal(a[k][:3], b[k]) for k in KEYS)
    _, train = load_scans(dataset, "train")
    assert not torch.equal(train["pose"][:3], a["pose"][:3])


def test_existing_dataset_is_kept_and_tampering_is_detected(dataset, placed, tmp_path):
    with pytest.raises(FileExistsError, match="already exists"):
        generate_scans(dataset, placed, {"test": 1}, settings=SMALL)
    copy = tmp_path / "copy"
    generate_scans(copy, placed, {"test": 1}, seed=3, settings=SMALL)
    with open(copy / "test.npz", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="sha256"):
        load_scans(copy, "test")
    with pytest.raises(FileNotFoundError, match="split must be one of"):
        load_scans(copy, "val")
    with pytest.raises(FileNotFoundError, match="generate the scans first"):
        load_scans(tmp_path / "none", "test")
    with pytest.raises(ValueError, match="counts must map"):
        generate_scans(tmp_path / "bad", placed, {"test": 0}, settings=SMALL)
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["splits"]["test"]["count"] == 6 and manifest["provenance"]["machine"]["cores"]


def test_settings_round_trip_and_are_checked():
    assert ScanSettings.from_dict(json.loads(json.dumps(SMALL.to_dict()))) == SMALL
    with pytest.raises(ValueError, match="occluder_fraction"):
        ScanSettings(occluder_fraction=(0.5, 0.2))
    with pytest.raises(ValueError, match="image_size"):
        ScanSettings(image_size=4)
