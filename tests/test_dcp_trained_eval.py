"""diffcp.experiments.dcp_trained_eval: trained runs evaluated on the test split, merged into the
part-1 results file without touching its other sections."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffcp.datasets import modelnet40 as mn
from diffcp.experiments import dcp_train as dt
from diffcp.experiments import dcp_trained_eval as te
from diffcp.experiments import modelnet40_eval as ev

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not mn.default_folder().exists(), reason="the ModelNet40 subset is absent")

TINY = ["--protocol", "noise", "--model", "v1", "--init", "scratch", "--emb-dims", "32", "--icp-iterations", "3",
        "--epochs", "1", "--batch-size", "2", "--points", "128", "--max-train", "4", "--max-val", "2", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished tiny runs, trained alone and end to end (through main, so they hold result.json)."""
    root = tmp_path_factory.mktemp("runs")
    for icp in ("none", "end_to_end"):
        assert dt.main([*TINY, "--icp", icp, "--out", str(root / icp)]) == 0
    return root


def test_rows_and_the_test_time_layer(runs):
    settings, model, result = te.load_run(runs / "none")
    assert model.icp is None and not model.training
    layer = te.test_time_layer(settings, model)  # what an end-to-end run of the same settings uses
    e2e_settings, e2e_model, _ = te.load_run(runs / "end_to_end")
    assert layer.settings.to_dict() == e2e_model.icp.settings.to_dict()
    out = te.evaluate_run(settings, model, max_objects=3, log=lambda *_: None)
    assert out["pairs"] == 3
    assert set(out["test"]) == {"dcp", "dcp+icp_layer"} | {f"dcp+icp_{v}" for v in ev.REFINE_VARIANTS}
    assert set(out["released"]) == set(out["test"]) and out["released"] != out["test"]
    # the row "dcp" is the trained DCP: recompute it by hand on the same pairs
    from diffcp.datasets.protocols import RegistrationPairs, get_protocol
    from diffcp.metrics import registration_metrics

    data = mn.load_modelnet40("test")
    pairs = RegistrationPairs(data.points[:3], get_protocol("noise")._replace(num_points=128), item_seeds=data.rows[:3])
    source, target, R, t = (torch.stack(x) for x in zip(*(pairs[i] for i in range(3))))
    with torch.no_grad():
        T0, _ = model(source, target, use_icp=False)
    expected = registration_metrics(T0[:, :3, :3], T0[:, :3, 3], R, t).as_dict()
    assert out["test"]["dcp"]["rmse_r"] == pytest.approx(expected["rmse_r"], rel=1e-5)


def test_merge_keeps_the_other_sections_and_replaces_only_its_runs(runs, tmp_path):
    into = tmp_path / "modelnet40.json"
    into.write_text(json.dumps({"protocols": {"noise": {"dcp_v1": {"rmse_r": 1.0}}}, "provenance": {"x": 1}}))
    assert te.main([str(runs / "none"), "--into", str(into), "--max-objects", "2"]) == 0
    first = json.loads(into.read_text())
    assert first["protocols"] == {"noise": {"dcp_v1": {"rmse_r": 1.0}}} and first["provenance"] == {"x": 1}
    entry = first["trained"]["runs"]["noise/v1_scratch/none"]
    training = entry["training"]
    assert training["provenance"]["command"].startswith("python -m diffcp.experiments.dcp_train")
    assert training["epochs"] == 1 and training["train_objects"] == 4 and entry["pairs"] == 2
    assert training["weights_sha256"] == json.loads((runs / "none" / "result.json").read_text())["rank_weight_sha256"][0]
    assert "command" in first["trained"]["provenance"]
    assert entry["evaluation"]["command"].startswith("python -m diffcp.experiments.dcp_trained_eval")
    assert te.main([str(runs / "end_to_end"), "--into", str(into), "--max-objects", "2"]) == 0
    second = json.loads(into.read_text())
    assert set(second["trained"]["runs"]) == {"noise/v1_scratch/none", "noise/v1_scratch/end_to_end"}
    assert second["trained"]["runs"]["noise/v1_scratch/none"] == entry


def test_part_one_rewrite_keeps_the_trained_runs(runs, tmp_path):
    out = tmp_path / "modelnet40.json"
    assert te.main([str(runs / "none"), "--into", str(out), "--max-objects", "2"]) == 0
    assert ev.main(["--out", str(out), "--max-objects", "2", "--protocols", "clean", "--methods", "identity"]) == 0
    result = json.loads(out.read_text())
    assert "noise/v1_scratch/none" in result["trained"]["runs"] and "clean" in result["protocols"]


def test_an_unfinished_run_is_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="run_dir .* has no result.json"):
        te.load_run(tmp_path)


def test_exported_weights_load_plainly_and_match_their_sidecar(runs, tmp_path):
    import hashlib

    from diffcp.models.dcp import DCP

    path = te.export_weights(runs / "end_to_end", tmp_path)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sidecar["training_provenance"]["command"].startswith("python -m diffcp.experiments.dcp_train")
    assert sidecar["command"] == sidecar["training_provenance"]["command"]
    assert sidecar["commit"] == sidecar["training_provenance"]["git"]["commit"] and sidecar["date_utc"]
    assert "cores" in sidecar["machine"]
    dcp = DCP("dgcnn", "identity", emb_dims=32)
    dcp.load_state_dict(torch.load(path, weights_only=True))  # strict: every key, nothing else
    _, model, _ = te.load_run(runs / "end_to_end")
    assert all(torch.equal(v, model.dcp.state_dict()[k]) for k, v in dcp.state_dict().items())
