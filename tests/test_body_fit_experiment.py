"""Experiment 3 (non-rigid fitting): training alone and through the fit, resume, evaluation, the results file."""

import json

import pytest
import torch

from diffcp.experiments import body_fit
from diffcp.experiments.body_fit import TrainSettings, evaluate, load_network, summarise, train

anny = pytest.importorskip("anny")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from diffcp.bodies.anny import LOW_RESOLUTION, AnnyBody
    from diffcp.bodies.placed import PlacedBody
    from diffcp.datasets.body_scans import ScanSettings, generate_scans

    root = tmp_path_factory.mktemp("scans") / "d"
    settings = ScanSettings(image_size=64, num_points=96, min_valid_pixels=60)
    generate_scans(root, PlacedBody(AnnyBody(topology=LOW_RESOLUTION)), {"train": 8, "val": 3, "test": 6},
                   seed=1, settings=settings, command="test")
    return root


def _weights(run):
    return torch.load(run / "weights.pt", map_location="cpu", weights_only=True)


def test_a_killed_run_resumes_to_the_same_weights(data, tmp_path):
    settings = TrainSettings(epochs=2, batch_size=4)
    train(data, tmp_path / "whole", settings, progress=False)
    partial = train(data, tmp_path / "killed", settings, progress=False, stop_after=1)
    assert len(partial) == 1 and not (tmp_path / "killed" / "weights.pt").exists()
    history = train(data, tmp_path / "killed", settings, progress=False)
    assert len(history) == 2
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    run = json.loads((tmp_path / "whole" / "run.json").read_text())
    assert run["provenance"]["date_utc"] and run["history"][-1]["val_vertex_error_mm"] > 0
    with pytest.raises(ValueError, match="other settings"):
        train(data, tmp_path / "whole", TrainSettings(epochs=3, batch_size=4), progress=False)


def test_training_through_the_fit_moves_the_network(data, tmp_path):
    train(data, tmp_path / "alone", TrainSettings(epochs=1, batch_size=4), progress=False)
    e2e = TrainSettings(method="end_to_end", epochs=1, batch_size=4, fit_iterations=2, lr=1e-3,
                        init=str(tmp_path / "alone"))
    history = train(data, tmp_path / "e2e", e2e, progress=False)
    assert torch.isfinite(torch.tensor(history[0]["train_loss_m"])) and history[0]["grad_norm_median"] > 0
    a, b = _weights(tmp_path / "alone"), _weights(tmp_path / "e2e")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_evaluation_rows_and_summary(data, tmp_path):
    train(data, tmp_path / "alone", TrainSettings(epochs=1, batch_size=4), progress=False)
    net, info = load_network(tmp_path / "alone")
    assert info["settings"]["method"] == "alone"
    from diffcp.nonrigid import BodyFitSettings

    per_scan = evaluate(data, {"alone": net, "end_to_end": net}, BodyFitSettings(iterations=2), progress=False)
    assert set(per_scan) == set(body_fit.METHODS) | {"condition"}
    assert per_scan["condition"] == ["clean", "noise", "partial"] * 2
    # the same network and fit: the end-to-end row equals the test-time row
    assert per_scan["end_to_end_then_fit"] == per_scan["network_then_fit"]
    # the network row recomputed by hand
    from diffcp.datasets.body_scans import load_scans

    manifest, a = load_scans(data, "test")
    from diffcp.bodies.anny import LOW_RESOLUTION, AnnyBody
    from diffcp.bodies.placed import PlacedBody

    with torch.no_grad():
        mesh = PlacedBody(AnnyBody(topology=LOW_RESOLUTION)).mesh(net(a["depth"], torch.tensor(manifest["intrinsics"])))
    by_hand = (mesh.vertices - a["vertices"]).norm(dim=-1).mean(-1) * 1000
    assert per_scan["network"]["vertex_mm"] == pytest.approx(by_hand.tolist(), abs=0.01)
    table = summarise(per_scan)
    row = table["network"]["all"]
    assert row["count"] == 6 and row["vertex_mean_mm"] == pytest.approx(float(by_hand.mean()), abs=0.06)
    assert row["success"]["100mm"] == pytest.approx(float((by_hand < 100).double().mean()), abs=1e-3)
    assert table["network"]["noise"]["count"] == 2


def test_cli_writes_a_results_file_of_record(data, tmp_path, capsys):
    for name in ("a", "b"):
        body_fit.main(["train", "--data", str(data), "--out", str(tmp_path / name), "--epochs", "1", "--batch-size", "4",
                       "--no-progress"])
    out = tmp_path / "body_fit.json"
    body_fit.main(["evaluate", "--data", str(data), "--alone", str(tmp_path / "a"), "--end-to-end", str(tmp_path / "b"),
                   "--into", str(out), "--limit", "3", "--no-progress"])
    result = json.loads(out.read_text())
    assert result["provenance"]["command"].startswith("python -m diffcp.experiments.body_fit evaluate")
    assert result["runs"]["alone"]["weights_sha256"] and len(result["per_scan"]["network"]["vertex_mm"]) == 3
    assert {m["worse"] for m in result["margins"]} == {"network", "fit_mean_body", "fit_mean_body_best_of_4", "network_then_fit"}
    exported = body_fit.export_weights(tmp_path / "a", tmp_path / "w" / "net.pt")
    card = json.loads(exported.with_suffix(".json").read_text())
    import hashlib

    assert card["sha256"] == hashlib.sha256(exported.read_bytes()).hexdigest() and card["commit"] and card["machine"]
    again, _ = load_network(exported)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), load_network(tmp_path / "a")[0].state_dict().values()))
    with pytest.raises(FileNotFoundError, match="must be a finished run folder"):
        load_network(tmp_path)
    with pytest.raises(ValueError, match="method must be"):
        TrainSettings(method="joint")


def test_parts_evaluated_apart_merge_into_one_results_file(data, tmp_path):
    for name in ("a", "b"):
        body_fit.main(["train", "--data", str(data), "--out", str(tmp_path / name), "--epochs", "1", "--batch-size", "4",
                       "--no-progress"])
    common = ["evaluate", "--data", str(data), "--alone", str(tmp_path / "a"), "--end-to-end", str(tmp_path / "b"),
              "--limit", "3", "--no-progress"]
    body_fit.main(common[:5] + common[7:] + ["--methods", "network", "--part", str(tmp_path / "p1.json")])
    body_fit.main(common + ["--methods", "network_then_fit", "--part", str(tmp_path / "p2.json")])
    body_fit.main(["merge", str(tmp_path / "p1.json"), str(tmp_path / "p2.json"), "--into", str(tmp_path / "all.json")])
    merged = json.loads((tmp_path / "all.json").read_text())
    assert set(merged["per_scan"]) == {"condition", "network", "network_then_fit"}
    assert [m["worse"] for m in merged["margins"]] == ["network"]
    assert [p["methods"] for p in merged["parts"]] == [["network"], ["network_then_fit"]]
    other = json.loads((tmp_path / "p2.json").read_text())
    other["runs"]["alone"]["weights_sha256"] = "0" * 64
    (tmp_path / "p3.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"parts must share one runs\['alone'\]"):
        body_fit.main(["merge", str(tmp_path / "p1.json"), str(tmp_path / "p3.json"), "--into", str(tmp_path / "x.json")])
