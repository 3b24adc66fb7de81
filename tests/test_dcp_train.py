"""Experiment 2, part 2: training DCP (alone and through differentiable ICP) - the machinery.

Small on purpose: a few ModelNet40 subset objects, 128 points, batch 2-4, DCP-v1 built from scratch
with 32 embedding channels (the released weights need 512).
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import diffcp
from diffcp.experiments import dcp_train as dt
from diffcp.settings import ImplicitBackward, SoftNearestNeighbor, Stopping

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("step_seconds_median", "epoch_train_seconds", "val_seconds")

try:
    from diffcp.datasets.modelnet40 import find_folder

    find_folder()
    HAVE_DATA = True
except FileNotFoundError:  # pragma: no cover - the subset ships with the repository's shared data
    HAVE_DATA = False

pytestmark = pytest.mark.skipif(not HAVE_DATA, reason="the ModelNet40 subset is not available")


def small(**changes) -> dt.TrainSettings:
    base = dict(protocol="noise", model="v1", init="scratch", emb_dims=32, points=128, batch_size=2, epochs=2,
                max_train=4, max_val=2, icp="end_to_end", learn_temperature=True, icp_iterations=3, seed=0)
    base.update(changes)
    return dt.TrainSettings(**base)


def untimed(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- settings and data
def test_implicit_refused_end_to_end_with_a_reason():
    with pytest.raises(ValueError, match="no gradient"):
        small(icp_backward="implicit")
    small(icp="test_time", learn_temperature=False, icp_backward="implicit")  # fine: ICP only evaluates
    with pytest.raises(ValueError, match="learn_temperature"):
        small(icp="none")
    with pytest.raises(ValueError, match="released"):
        small(init="released")  # 32 channels cannot hold dcp_v1.t7


def test_defaults_follow_dcp():
    s = dt.TrainSettings(model="v2", epochs=250)
    assert s.init == "scratch" and s.lr == 1e-3 and s.weight_decay == 1e-4 and s.clip_norm is None
    assert s.milestones() == [75, 150, 200]
    e2e = dt.TrainSettings(model="v1", icp="end_to_end")
    assert e2e.init == "released" and e2e.lr == 1e-4 and e2e.clip_norm == 1.0


def test_training_pairs_fresh_per_epoch_and_reproducible():
    points = np.random.RandomState(0).rand(3, 2048, 3).astype(np.float32)
    for protocol in ("noise", "sampling", "partial"):
        s = small(protocol=protocol)
        a, b, c = (dt.training_pairs(points, s, e)[1] for e in (0, 0, 1))
        assert torch.equal(a.source, b.source) and torch.equal(a.rotation, b.rotation)
        assert not torch.equal(a.rotation, c.rotation)
        n = 90 if protocol == "partial" else 128  # ceil(0.7 x 128)
        assert a.source.shape == (n, 3) and a.target.shape == (n, 3)
    other_seed = dt.training_pairs(points, small(seed=1), 0)[1]
    assert not torch.equal(other_seed.rotation, a.rotation)


def test_dcp_loss_is_zero_at_the_truth_and_matches_its_definition():
    T = diffcp.random_transform(3, max_angle=0.5, max_translation=0.3, generator=torch.Generator().manual_seed(0))
    R, t = T[:, :3, :3], T[:, :3, 3]
    assert float(dt.dcp_loss(T, R, t)) < 1e-12
    other = diffcp.random_transform(3, generator=torch.Generator().manual_seed(1))
    expected = ((other[:, :3, :3].transpose(1, 2) @ R - torch.eye(3)) ** 2).mean() + ((other[:, :3, 3] - t) ** 2).mean()
    assert torch.allclose(dt.dcp_loss(other, R, t), expected)


# ----------------------------------------------------------------------------- gradients through ICP
def _one_batch(settings):
    model = dt.build_model(settings).train()
    points, _ = dt._objects(settings, "train")
    source, target, R, t = dt._stack(dt.training_pairs(points, settings, 0), range(settings.batch_size))
    return model, source, target, R, t


def test_end_to_end_gradient_reaches_dcp_through_icp_and_implicit_gives_none():
    dt.single_thread()
    settings = small()
    model, source, target, R, t = _one_batch(settings)
    T0, T = model(source, target)
    assert not torch.equal(T0, T)  # ICP moved DCP's answer
    loss = dt.dcp_loss(T, R, t)
    dcp_params = [p for p in model.dcp.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, dcp_params + [model.icp.log_temperatures["correspondence"]], allow_unused=True)
    assert all(g is not None for g in grads)
    assert sum(float(g.norm()) for g in grads[:-1]) > 0  # DCP's parameters
    assert float(grads[-1].abs()) > 0  # the learnable temperature
    unrolled = [g.clone() for g in grads[:-1]]

    # truncated with every iteration kept: the same gradient
    model.icp = dt.icp_layer(dataclasses.replace(settings, icp_backward="truncated"))
    grads = torch.autograd.grad(dt.dcp_loss(model(source, target)[1], R, t), dcp_params, allow_unused=True)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-10) for a, b in zip(grads, unrolled))

    # implicit: the fixed point does not depend on init, so DCP gets nothing
    model.icp = diffcp.ICP(correspondence=SoftNearestNeighbor(temperature=5e-4),
                           stopping=Stopping(max_iterations=settings.icp_iterations, tolerance=0.0),
                           backward=ImplicitBackward())
    loss = dt.dcp_loss(model(source, target)[1], R, t)
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, dcp_params, allow_unused=True)
        assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)


# ----------------------------------------------------------------------------- determinism, resume
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Two epochs in one call."""
    return dt.train(small(), tmp_path_factory.mktemp("straight"), progress=False)


def test_resume_after_a_kill_equals_the_straight_run(straight, tmp_path):
    first = dt.train(small(), tmp_path, progress=False, stop_after=1)  # "killed" after epoch 1
    assert len(first["history"]) == 1
    state = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and {"model", "optimizer", "scheduler", "rng", "history", "settings"} <= set(state)
    assert state["settings"]["icp_settings"]["correspondence"]["learnable"] is True
    torch.manual_seed(12345), np.random.seed(6789)  # the resume must not depend on the process's RNGs
    resumed = dt.train(small(), tmp_path, progress=False)  # a new process would do the same
    assert same_weights(resumed["model"], straight["model"])
    assert untimed(resumed["history"]) == untimed(straight["history"])
    assert resumed["best"]["epoch"] == straight["best"]["epoch"]
    assert torch.get_num_threads() == 1  # numba's thread pool did not reset torch's threads
    with pytest.raises(ValueError, match="other settings"):
        dt.train(small(seed=1), tmp_path, progress=False)


def test_one_thread_survives_the_first_icp_call():
    """numba's first parallel call sets the shared OpenMP runtime to numba's thread count; torch
    then ran on every core and its float32 reductions changed order between 'identical' runs.
    In a fresh process without NUMBA_NUM_THREADS, where numba's pool is not started yet."""
    code = ("import torch, diffcp\n"
            "from diffcp.experiments.dcp_train import single_thread\n"
            "single_thread()\n"
            "x = torch.randn(2, 128, 3, generator=torch.Generator().manual_seed(0))\n"
            "diffcp.icp(x, x + 0.01, correspondence='soft_nn', stopping=diffcp.Stopping(max_iterations=2, tolerance=0.0))\n"
            "diffcp.icp(x, x + 0.01)\n"
            "print('THREADS', torch.get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
    env["OMP_NUM_THREADS"] = "1"  # the case that went wrong: torch at 1, numba at its default (all cores)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "THREADS 1" in proc.stdout


def test_same_seed_same_weights_other_seed_other_weights(straight, tmp_path):
    again = dt.train(small(), tmp_path / "again", progress=False)
    assert same_weights(again["model"], straight["model"])
    assert untimed(again["history"]) == untimed(straight["history"])
    other = dt.train(small(seed=1, epochs=1), tmp_path / "other", progress=False)
    assert not same_weights(other["model"], straight["model"])


def test_test_time_mode_trains_dcp_alone_and_evaluates_with_icp(tmp_path):
    run = dt.train(small(icp="test_time", learn_temperature=False, epochs=1), tmp_path, progress=False)
    val = run["history"][0]["val"]
    assert set(val) == {"dcp", "dcp+icp"}
    assert run["history"][0]["val_selected_error_deg"] == val["dcp+icp"]["isotropic_r_deg"]
    assert "temperatures" not in run["history"][0]


# ----------------------------------------------------------------------------- DDP and the command line
@pytest.mark.slow
def test_torchrun_two_ranks_hold_identical_weights_and_write_the_result(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "diffcp.experiments.dcp_train", "--protocol", "partial", "--model", "v1", "--init", "scratch",
           "--emb-dims", "32", "--icp", "end_to_end", "--learn-temperature", "--icp-iterations", "3",
           "--epochs", "1", "--batch-size", "4", "--points", "128", "--max-train", "8", "--max-val", "3",
           "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    hashes = result["rank_weight_sha256"]
    assert result["world_size"] == 2 and len(hashes) == 2 and hashes[0] == hashes[1]
    assert result["history"][0]["steps"] == 2  # 8 objects: 4 a rank, 2 a step on each
    assert set(result["validation"]["last"]) == {"dcp", "dcp+icp"}
    assert result["settings"]["icp_settings"]["backward"]["type"] == "unroll"
    assert result["provenance"]["command"].startswith("torchrun")
    assert "torchrun" in result["full_scale"]["command"] and result["full_scale"]["expected"]["expected_hours_high"] > 0
    # the weights rank 0 checkpointed are the ones every rank holds
    model = dt.build_model(dt.TrainSettings(protocol="partial", init="scratch", emb_dims=32, icp="end_to_end",
                                            learn_temperature=True, icp_iterations=3, points=128, batch_size=4))
    model.load_state_dict(torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["model"])
    assert dt.weights_sha256(model) == hashes[0]
