"""Experiment 1's entry point on a tiny dataset: training, resume after a kill, evaluation record."""

import json

import pytest
import torch

from diffcp.datasets.body_pairs import PairSettings, generate
from diffcp.experiments import body_toy
from diffcp.experiments.body_toy import RefineSettings, TrainSettings, success_curves, train, transform_error

trimesh = pytest.importorskip("trimesh")
pytestmark = pytest.mark.filterwarnings("ignore:ICP. the transform is ambiguous")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    body = trimesh.creation.capsule(height=1.2, radius=0.3, count=[12, 12])
    arm = trimesh.creation.box(extents=(0.5, 0.15, 0.15))
    arm.apply_translation((0.5, 0.0, 0.3))
    m = trimesh.util.concatenate([body, arm])
    root = tmp_path_factory.mktemp("toy") / "pairs"
    settings = PairSettings(image_size=32, num_points=64, min_valid_pixels=20, max_angle_deg=20, max_translation=0.2)
    generate(root, torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces), {"train": 12, "val": 4,
             "test": 6}, seed=1, settings=settings, shard_size=8)
    return root


def _weights(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.mark.parametrize("method", ["cnn", "cnn_icp"])
def test_resume_after_a_kill_gives_the_same_weights(data, tmp_path, method):
    settings = TrainSettings(method=method, epochs=2, batch_size=4, icp=RefineSettings(3, 1), seed=5)
    straight = train(data, tmp_path / "straight", settings, progress=False)
    first = train(data, tmp_path / "resumed", settings, progress=False, stop_after=1)
    assert len(first.history) == 1
    resumed = train(data, tmp_path / "resumed", settings, progress=False)
    assert len(resumed.history) == 2
    assert torch.equal(_weights(straight.net), _weights(resumed.net))
    assert straight.history[1]["train_loss"] == resumed.history[1]["train_loss"]
    # and the training changed the network, with finite gradients
    fresh = train(data, tmp_path / "zero", TrainSettings(method=method, epochs=1, batch_size=4, icp=RefineSettings(3, 1),
                                                         seed=5), progress=False, stop_after=0)
    assert not torch.equal(_weights(fresh.net), _weights(straight.net))
    assert straight.history[0]["nonfinite_grads"] == 0 and straight.history[0]["grad_norm_max"] > 0
    # a checkpoint of other settings is not resumed silently
    with pytest.raises(ValueError, match="other settings"):
        train(data, tmp_path / "straight", TrainSettings(method=method, epochs=3, batch_size=4, seed=6),
              progress=False)


def test_end_to_end_gradient_reaches_the_network_through_icp(data):
    """Unrolled soft ICP passes a gradient to the CNN that predicts init (implicit would not)."""
    from diffcp.datasets.body_pairs import BodyPairs
    from diffcp.models.pose_cnn import PoseCNN

    batch = BodyPairs(data, "train").arrays
    torch.manual_seed(0)
    net = PoseCNN()
    T = body_toy.predict("cnn_icp", net, batch, RefineSettings(3, 1), differentiable=True)
    transform_error(T, batch["transform"], batch["source_points"]).mean().backward()
    g = net.head[-1].weight.grad
    assert g is not None and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0


def test_success_curves_and_error():
    G = torch.eye(4).repeat(2, 1, 1)
    G[1, :3, 3] = torch.tensor([0.0, 0.3, 0.4])
    assert transform_error(torch.eye(4).repeat(2, 1, 1), G, torch.randn(2, 10, 3)).tolist() == pytest.approx([0, 0.5],
                                                                                                             abs=1e-6)
    c = success_curves(torch.tensor([0.0, 0.06, 0.07, 2.0]), torch.tensor([0.01, 0.05, 0.2, 0.02]), [0, 0.05, 0.1],
                       [0.03, 0.3])
    assert c["initial_distance_bins"] == [[0.0, 0.05], [0.05, 0.1], [0.1, None]]
    assert c["n"] == [1, 2, 1] and c["success_3cm"] == [1.0, 0.0, 1.0] and c["success_30cm"] == [1.0, 1.0, 1.0]


def test_run_writes_the_record(data, tmp_path):
    out = tmp_path / "body_toy.json"
    argv = ["run", "--data", str(data), "--runs", str(tmp_path / "runs"), "--json", str(out), "--epochs", "1",
            "--batch-size", "6", "--train-icp-iterations", "2", "--train-reject-iterations", "1",
            "--test-icp-iterations", "3", "--test-reject-iterations", "1", "--no-progress"]
    assert body_toy.main(argv) == 0
    record = json.loads(out.read_text())
    assert set(record["curves"]) == {"cnn", "cnn_icp", "cnn_then_icp", "icp"}
    prov = record["provenance"]
    assert {"command", "git", "machine", "date_utc", "duration_s", "data_manifest"} <= set(prov)
    assert prov["data_manifest"]["counts"] == {"train": 12, "val": 4, "test": 6}
    for curve in record["curves"].values():
        assert sum(curve["n"]) == 6
        assert len(curve["success_3cm"]) == len(curve["success_30cm"]) == len(curve["initial_distance_bins"])
    assert record["settings"]["training"]["cnn_icp"]["settings"]["method"] == "cnn_icp"
    assert record["settings"]["evaluation"]["icp"]["reject_iterations"] == 1


def test_icp_variants_are_evaluated_and_recorded(data, tmp_path):
    """evaluate --icp-variants adds the six variant methods, with their ICP stages as settings data,
    and leaves the four methods of record exactly as they were."""
    runs = tmp_path / "runs"
    common = ["--data", str(data), "--runs", str(runs), "--test-icp-iterations", "3", "--test-reject-iterations", "1",
              "--no-progress"]
    assert body_toy.main(["train", "--epochs", "1", "--batch-size", "6", "--train-icp-iterations", "2",
                          "--train-reject-iterations", "1"] + common) == 0
    assert body_toy.main(["evaluate", "--json", str(tmp_path / "plain.json")] + common) == 0
    assert body_toy.main(["evaluate", "--json", str(tmp_path / "variants.json"), "--icp-variants"] + common) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())
    record = json.loads((tmp_path / "variants.json").read_text())
    assert list(record["curves"]) == list(body_toy.METHODS + body_toy.VARIANT_METHODS)
    for method in body_toy.METHODS:
        assert record["curves"][method] == plain["curves"][method]
    for method in body_toy.VARIANT_METHODS:
        assert sum(record["curves"][method]["n"]) == 6 and record["summary"][method]["n"] == 6
    assert "icp_variants" not in plain["settings"]["evaluation"]
    variants = record["settings"]["evaluation"]["icp_variants"]
    assert set(variants) == set(body_toy.VARIANTS)
    manifest = json.loads((data / "manifest.json").read_text())
    for name, entry in variants.items():
        assert entry["methods"] == [name, "cnn_then_" + name]
        assert [s["iterations"] for s in entry["stages"]] == [2, 1]
        for stage in entry["stages"]:
            settings = body_toy.ICPSettings.from_dict(stage["settings"])
            assert settings.metric == entry["metric"]
        if entry["correspondence"] == "projective":
            corr = stage["settings"]["correspondence"]
            assert corr["type"] == "projective" and corr["camera_pose"] is None and corr["mode"] == "nearest"
            assert corr["intrinsics"] == manifest["intrinsics"]


@pytest.fixture(scope="module")
def fine_pair():
    """One pair rendered finely enough (96 x 96 pixels) for projective association to be accurate."""
    from diffcp.datasets.body_pairs import intrinsics, make_pair

    m = trimesh.creation.capsule(height=1.2, radius=0.3, count=[24, 24])
    box = trimesh.creation.box(extents=(0.5, 0.15, 0.15))
    box.apply_translation((0.5, 0.0, 0.3))
    m = trimesh.util.concatenate([m, box])
    settings = PairSettings(image_size=96, num_points=300, max_angle_deg=15, max_translation=0.1)
    pair = make_pair(torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces), settings,
                     torch.Generator().manual_seed(5))
    batch = {k: torch.as_tensor(getattr(pair, k))[None].float() for k in
             ("source_depth", "target_depth", "source_points", "target_points", "target_normals", "transform")}
    return batch, intrinsics(settings)


def test_projective_icp_camera_and_convergence(fine_pair):
    """The target depth map is seen by the dataset's intrinsics with the identity pose: the target
    points project back onto their own pixels; projective point-to-plane ICP started at the true
    pose stays there, and from a small perturbation it returns to it."""
    from diffcp.camera import project

    batch, K = fine_pair
    G = batch["transform"]
    uv, z = project(batch["target_points"][0], K)
    pixel = uv.round().long()
    assert float((uv - pixel).abs().max()) < 1e-3
    assert torch.allclose(batch["target_depth"][0][pixel[:, 1], pixel[:, 0]], z, atol=1e-5)

    stages = body_toy.variant_stages(body_toy.VARIANTS["icp_projective"], RefineSettings(15, 10), K)
    x = batch["source_points"]
    at_truth = body_toy.refine_variant(batch, G, stages)
    assert float(transform_error(at_truth, G, x)) < 0.003
    twist = torch.tensor([[0.01, -0.005, 0.01, 0.02, 0.0, -0.02]])  # ~0.9 degree about the camera, 3 cm
    from diffcp.geometry import apply_twist

    start = apply_twist(G, twist)
    assert float(transform_error(start, G, x)) > 0.02
    assert float(transform_error(body_toy.refine_variant(batch, start, stages), G, x)) < 0.003
    with pytest.raises(ValueError, match="intrinsics"):
        body_toy.variant_stages(body_toy.VARIANTS["icp_projective"])


@pytest.mark.parametrize("method", ["icp_nn", "icp_nn_plane", "icp_projective"])
def test_hard_and_projective_variants_converge_from_nearby(fine_pair, method):
    """Every variant, started near the truth through predict's 'cnn_then_' path with a stand-in
    network, ends near it."""
    batch, K = fine_pair
    G = batch["transform"]
    from diffcp.geometry import apply_twist

    start = apply_twist(G, torch.tensor([[0.005, 0.01, -0.005, -0.01, 0.02, 0.0]]))
    T = body_toy.predict("cnn_then_" + method, lambda a, b: start, batch, RefineSettings(20, 10), intrinsics=K)
    assert float(transform_error(T, G, batch["source_points"])) < 0.01


def test_refine_rejection_removes_the_bias_of_partial_overlap():
    """Source points without a partner in the target pull plain ICP off; rejection drops them."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 200, 3, generator=g, dtype=torch.float64)
    extra = torch.rand(1, 60, 3, generator=g, dtype=torch.float64) + torch.tensor([1.3, 0.0, 0.0], dtype=torch.float64)
    T_true = torch.eye(4, dtype=torch.float64)[None].clone()
    T_true[0, :3, 3] = torch.tensor([0.02, -0.01, 0.015], dtype=torch.float64)
    source = torch.cat([x, extra], 1)  # the extra points are not in the target
    target = body_toy.transform_points(T_true, x)
    init = torch.eye(4, dtype=torch.float64)[None]
    plain = body_toy.refine(source, target, init, RefineSettings(10, 0, temperature=1e-6))
    rejecting = body_toy.refine(source, target, init, RefineSettings(10, 10, 0.05, temperature=1e-6))
    assert float(transform_error(plain, T_true, x)) > 0.05
    assert float(transform_error(rejecting, T_true, x)) < 1e-4
    with pytest.raises(ValueError, match="reject_iterations must be"):
        RefineSettings(iterations=3, reject_iterations=4)
