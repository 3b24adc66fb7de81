"""The CI slice of the stress run (``benchmarks/stress.py --quick``): one batch of 4 hard inputs
(symmetric, planar, collinear, duplicated, one repeated point, 3-5 points, scales 1e-6 to 1e4,
offsets up to 1e3 x the radius) for every dtype x correspondence x (solver, metric) x backward
mode, 504 registrations, in-process. Every result and gradient must be finite, nothing may raise
but diffcp's documented input validation, and that only rarely.

The slice runs once (a module fixture, about 15-25 s on 2 busy cores); each test checks one kind
of failure, so that a known failure (marked ``xfail(strict=True)`` with its reproduction) does not
hide the others. A failing cloud is re-run alone with
``python benchmarks/stress.py --repro '<{"config": ..., "spec": ...} from the message>'``.
"""

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_stress():
    spec = importlib.util.spec_from_file_location("diffcp_stress", ROOT / "benchmarks" / "stress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stress = _load_stress()


@pytest.fixture(scope="module")
def counts():
    return stress.run_stress(quick=True, batch=4, seed=0, progress=False)


def _examples(counts, failure, limit=3):
    out = []
    for c in counts.values():
        out += [json.dumps({"config": e["config"], "spec": e["spec"]}) + "  # " + e["detail"].splitlines()[0][:150]
                for e in c["examples"] if e["failure"] == failure]
    return "\n".join(out[:limit])


def test_the_slice_covers_every_configuration(counts):
    assert len(counts) == 2 * 3 * 7 * 3
    assert all(c["runs"] == 4 for c in counts.values())
    assert sum(c["runs"] for c in counts.values()) == 504


def test_results_are_finite(counts):
    bad = {k: c["nonfinite_result"] for k, c in counts.items() if c["nonfinite_result"]}
    assert not bad, f"non-finite results: {bad}\n{_examples(counts, 'nonfinite_result')}"


def _grad_failures(counts, result):
    bad = Counter()
    for name, c in counts.items():
        for key, n in c["nonfinite_grad_by_input"].items():
            if key.startswith(f"d {result} /"):
                bad[f"{name}: {key}"] += n
    return bad


def test_gradients_of_the_transform_are_finite(counts):
    bad = _grad_failures(counts, "transform")
    assert not bad, f"non-finite gradients: {dict(bad)}\n{_examples(counts, 'nonfinite_grad')}"


def test_gradients_of_the_final_error_are_finite(counts):
    bad = _grad_failures(counts, "final_error")
    assert not bad, f"non-finite gradients: {dict(bad)}\n{_examples(counts, 'nonfinite_grad')}"


def test_nothing_raises_but_input_validation(counts):
    bad = {f"{k}: {e}": n for k, c in counts.items() for e, n in c["exceptions"].items()}
    assert not bad, f"exceptions: {bad}\n{_examples(counts, 'exception')}\n{_examples(counts, 'batch_only_exception')}"


def test_refusals_are_rare(counts):
    runs = sum(c["runs"] for c in counts.values())
    refused = sum(c["refused"] for c in counts.values())
    batch_only = sum(n for c in counts.values() for k, n in c["refusals"].items() if k.startswith("[batch only]"))
    kinds = Counter()
    for c in counts.values():
        kinds.update({k: n for k, n in c["by_kind"].items() if "refus" in k})
    assert refused <= 0.01 * runs and batch_only == 0, (
        f"{refused} of {runs} registrations refused, {batch_only} batches refused that pass cloud by cloud; "
        f"by input kind: {dict(kinds)}\n{_examples(counts, 'refused')}")


def test_refusals_are_documented_input_errors(counts):
    # the only refusal these inputs can meet: a cloud too small or too large for its dtype to square
    for c in counts.values():
        for message in c["refusals"]:
            assert "beyond what torch.float" in message and "can square" in message, message
