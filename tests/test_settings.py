"""ICP settings as data: each option validates itself, carries only its own parameters, and the
whole settings object round-trips through a dict and JSON exactly."""

import dataclasses
import json

import pytest
import torch

import diffcp
from diffcp import settings as S

# every option class with a valid instance that sets every parameter away from its default
EXAMPLES = [
    S.NearestNeighbor(backend="tree"),
    S.SoftNearestNeighbor(temperature=2.5e-4, learnable=True, backend="dense"),
    S.ProjectiveAssociation([[500.0, 0, 64], [0, 500.0, 64], [0, 0, 1]], camera_pose=torch.eye(4), mode="bilinear"),
    S.ProcrustesSolver(),
    S.GaussNewtonSolver(damping=1e-7),
    S.LevenbergMarquardtSolver(iterations=3, initial_damping=1e-2, factor=4.0),
    S.DistanceWeights(0.25),
    S.NormalWeights(),
    S.RobustKernel("tukey", 0.1),
    S.DistanceRejection(0.2, temperature=1e-3, learnable=True),
    S.NormalAngleRejection(45.0, temperature=0.05),
    S.RandomSelection(500, seed=7),
    S.Stopping(max_iterations=12, tolerance=1e-9, relative_rmse=1e-4),
    S.UnrollBackward(),
    S.TruncatedBackward(iterations=4),
    S.ImplicitBackward(),
]

# parameters that belong to another step: passing them to these options must fail at construction
FOREIGN = {
    S.NearestNeighbor: ["temperature", "intrinsics", "mode"],
    S.SoftNearestNeighbor: ["intrinsics", "camera_pose", "max_distance"],
    S.ProjectiveAssociation: ["temperature", "backend"],
    S.ProcrustesSolver: ["damping", "iterations"],
    S.GaussNewtonSolver: ["iterations", "temperature"],
    S.LevenbergMarquardtSolver: ["temperature", "damping"],
    S.DistanceWeights: ["temperature", "kernel"],
    S.NormalWeights: ["max_distance", "temperature"],
    S.RobustKernel: ["temperature", "max_distance"],
    S.DistanceRejection: ["kernel", "max_angle"],
    S.NormalAngleRejection: ["max_distance", "kernel"],
    S.RandomSelection: ["max_iterations", "generator"],
    S.Stopping: ["iterations", "temperature"],
    S.UnrollBackward: ["iterations"],
    S.TruncatedBackward: ["truncate_iterations", "tolerance"],
    S.ImplicitBackward: ["iterations", "damping"],
}


def _required(cls):
    return {f.name: getattr(e, f.name) for e in EXAMPLES if type(e) is cls for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def test_every_option_is_listed():
    assert {type(e) for e in EXAMPLES} == set(FOREIGN)
    assert {type(e) for e in EXAMPLES} == {k for kinds in S._SLOTS.values() for k in kinds}


@pytest.mark.parametrize("cls,names", FOREIGN.items(), ids=lambda x: getattr(x, "__name__", ""))
def test_inapplicable_parameters_cannot_be_passed(cls, names):
    for name in names:
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
            cls(**_required(cls), **{name: 1})


@pytest.mark.parametrize("make,match", [
    (lambda: S.NearestNeighbor(backend="kdtree"), r"NearestNeighbor.backend must be one of"),
    (lambda: S.SoftNearestNeighbor(temperature=0.0), r"SoftNearestNeighbor.temperature must be a finite positive"),
    (lambda: S.SoftNearestNeighbor(temperature=float("nan")), r"temperature must be a finite positive"),
    (lambda: S.SoftNearestNeighbor(temperature="1e-3"), r"temperature must be a positive number; got str"),
    (lambda: S.SoftNearestNeighbor(learnable=True), r"learnable=True\) needs a positive initial temperature"),
    (lambda: S.SoftNearestNeighbor(temperature=torch.ones(2, 2)), r"shape \(\) or \(B,\)"),
    (lambda: S.SoftNearestNeighbor(temperature=torch.tensor([1.0, -1.0])), r"must hold finite positive values"),
    (lambda: S.SoftNearestNeighbor(temperature=1e-3, learnable=1), r"learnable must be True or False"),
    (lambda: S.ProjectiveAssociation(torch.eye(4)), r"intrinsics must be a finite \(3, 3\)"),
    (lambda: S.ProjectiveAssociation("K"), r"intrinsics must be a \(3, 3\) or \(B, 3, 3\) matrix"),
    (lambda: S.ProjectiveAssociation(torch.eye(3), mode="cubic"), r"mode must be one of"),
    (lambda: S.ProjectiveAssociation(torch.eye(3, requires_grad=True)), r"constant of the settings"),
    (lambda: S.GaussNewtonSolver(damping=-1.0), r"damping must be a finite non-negative"),
    (lambda: S.LevenbergMarquardtSolver(iterations=0), r"iterations must be an integer >= 1"),
    (lambda: S.LevenbergMarquardtSolver(factor=1.0), r"factor must be > 1"),
    (lambda: S.DistanceWeights(0.0), r"DistanceWeights.max_distance must be a finite positive"),
    (lambda: S.RobustKernel("l1"), r"RobustKernel.kernel must be one of"),
    (lambda: S.RobustKernel(scale=torch.tensor(1.0)), r"RobustKernel.scale must be a number; got a tensor"),
    (lambda: S.DistanceRejection(0.1, temperature=-1.0), r"DistanceRejection.temperature must be a finite non-negative"),
    (lambda: S.DistanceRejection(0.1, learnable=True), r"needs a positive initial temperature"),
    (lambda: S.NormalAngleRejection(181.0), r"max_angle must lie in \(0, 180\]"),
    (lambda: S.RandomSelection(2), r"num_samples must be an integer >= 3"),
    (lambda: S.RandomSelection(10, seed=1.5), r"seed must be an integer >= 0"),
    (lambda: S.Stopping(max_iterations=2.0), r"Stopping.max_iterations must be an integer >= 1"),
    (lambda: S.Stopping(tolerance=-1e-3), r"Stopping.tolerance must be a finite non-negative"),
    (lambda: S.TruncatedBackward(iterations=0), r"TruncatedBackward.iterations must be an integer >= 1"),
    (lambda: S.ICPSettings(metric="point_to_plane"), r"solver='procrustes' solves the point_to_point"),
    (lambda: S.ICPSettings(metric="plane"), r"metric must be one of"),
    (lambda: S.ICPSettings(correspondence="closest"), r"correspondence must be one of 'nn', 'soft_nn', 'projective'"),
    (lambda: S.ICPSettings(correspondence="projective"), r"missing 1 required positional argument: 'intrinsics'"),
    (lambda: S.ICPSettings(solver=S.NearestNeighbor()), r"solver must be one of"),
    (lambda: S.ICPSettings(rejection=S.DistanceWeights(0.1)), r"rejection must be one of"),
    (lambda: S.ICPSettings(weighting="distance"), r"missing 1 required positional argument: 'max_distance'"),
    (lambda: S.ICPSettings(weighting=5), r"weighting must be an option or a sequence of options"),
    (lambda: S.ICPSettings(stopping=30), r"stopping must be one of"),
])
def test_bad_values_raise_at_construction_naming_the_parameter(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_strings_are_shorthand_for_options_with_their_defaults():
    s = S.ICPSettings(correspondence="soft_nn", solver="levenberg_marquardt", metric="symmetric",
                      weighting="normal", backward="truncated")
    assert s.correspondence == S.SoftNearestNeighbor()
    assert s.solver == S.LevenbergMarquardtSolver()
    assert s.weighting == (S.NormalWeights(),)
    assert s.backward == S.TruncatedBackward(iterations=5)
    assert s == S.ICPSettings(correspondence=S.SoftNearestNeighbor(), solver=S.LevenbergMarquardtSolver(),
                              metric="symmetric", weighting=[S.NormalWeights()], backward=S.TruncatedBackward())


def test_settings_are_immutable_comparable_and_printable():
    s = S.ICPSettings(correspondence=S.SoftNearestNeighbor(temperature=1e-3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.metric = "symmetric"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.correspondence.temperature = 1.0
    assert s == S.ICPSettings(correspondence=S.SoftNearestNeighbor(temperature=1e-3))
    assert s != S.ICPSettings(correspondence=S.SoftNearestNeighbor(temperature=2e-3))
    assert "SoftNearestNeighbor(temperature=0.001" in repr(s)
    assert hash(s) == hash(S.ICPSettings(correspondence=S.SoftNearestNeighbor(temperature=1e-3)))


def _everything():
    return S.ICPSettings(
        correspondence=S.ProjectiveAssociation(torch.tensor([[[500.0, 0, 63.5], [0, 500.0, 63.5], [0, 0, 1]]] * 2),
                                               camera_pose=torch.eye(4, dtype=torch.float64), mode="bilinear"),
        metric="symmetric", solver=S.LevenbergMarquardtSolver(iterations=3, initial_damping=0.1 + 0.2),
        weighting=[S.DistanceWeights(1 / 3), S.NormalWeights(), S.RobustKernel("cauchy", 0.07)],
        rejection=[S.DistanceRejection(0.2, temperature=1e-3, learnable=True), S.NormalAngleRejection(30.0)],
        selection=S.RandomSelection(100, seed=3), stopping=S.Stopping(12, 1e-9), backward=S.ImplicitBackward(),
    )


@pytest.mark.parametrize("settings", [S.ICPSettings(), _everything(),
                                      S.ICPSettings(correspondence=S.SoftNearestNeighbor(temperature=0.1 + 0.2))])
def test_json_round_trip_is_exact(settings):
    data = settings.to_dict()
    text = json.dumps(data)
    back = S.ICPSettings.from_dict(json.loads(text))
    assert back == settings
    assert back.to_dict() == data and json.dumps(back.to_dict()) == text


def test_dict_form_is_plain_and_names_each_option():
    data = _everything().to_dict()
    assert data["correspondence"]["type"] == "projective" and data["solver"]["type"] == "levenberg_marquardt"
    assert [w["type"] for w in data["weighting"]] == ["distance", "normal", "robust"]
    assert data["selection"] == {"type": "random", "num_samples": 100, "seed": 3}
    assert isinstance(data["correspondence"]["intrinsics"], list)
    with pytest.raises(ValueError, match=r"unknown keys \['temperature'\]"):
        S.ICPSettings.from_dict({**data, "temperature": 1e-3})
    with pytest.raises(ValueError, match="solver has unknown type 'svd'"):
        S.ICPSettings.from_dict({**data, "solver": {"type": "svd"}})


def test_settings_holding_a_tensor_cannot_be_written_as_data():
    s = S.ICPSettings(correspondence=S.SoftNearestNeighbor(temperature=torch.tensor(1e-3)))
    with pytest.raises(TypeError, match="holding a tensor cannot be written as data"):
        s.to_dict()


def test_normals_needed_follow_from_the_settings():
    assert not S.ICPSettings().needs_target_normals
    assert S.ICPSettings(metric="point_to_plane", solver="gauss_newton").needs_target_normals
    assert not S.ICPSettings(metric="point_to_plane", solver="gauss_newton").needs_source_normals
    assert S.ICPSettings(rejection=[S.NormalAngleRejection(30.0)]).needs_source_normals


def test_icp_takes_either_settings_or_option_keywords():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = S.ICPSettings(stopping=S.Stopping(max_iterations=3))
    a = diffcp.icp(x, x + 0.01, s)
    b = diffcp.icp(x, x + 0.01, stopping=S.Stopping(max_iterations=3))
    assert torch.equal(a.transform, b.transform)
    with pytest.raises(TypeError, match="either settings or option keywords"):
        diffcp.icp(x, x, s, metric="point_to_point")
    with pytest.raises(TypeError, match="settings must be a diffcp.ICPSettings"):
        diffcp.icp(x, x, {"metric": "point_to_point"})
    with pytest.raises(TypeError, match=r"takes no argument 'max_iterations'; .*diffcp.Stopping"):
        diffcp.icp(x, x, max_iterations=3)
    with pytest.raises(TypeError, match=r"unexpected argument 'iters'"):
        diffcp.icp(x, x, iters=3)


def test_the_loop_reads_in_screens():
    """No function of the loop, the problem set-up, the settings or the layer exceeds 80 lines."""
    import ast
    from pathlib import Path

    root = Path(diffcp.__file__).parent
    long = []
    for name in ("icp.py", "problem.py", "settings.py", "layer.py"):
        for node in ast.walk(ast.parse((root / name).read_text())):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_procrustes_scale_option():
    import diffcp
    assert diffcp.ProcrustesSolver().scale is False
    s = diffcp.ICPSettings(solver=diffcp.ProcrustesSolver(scale=True))
    assert diffcp.ICPSettings.from_dict(s.to_dict()) == s
    assert s.to_dict()["solver"] == {"type": "procrustes", "scale": True}
    with pytest.raises(TypeError, match="ProcrustesSolver.scale must be True or False"):
        diffcp.ProcrustesSolver(scale=1)
    with pytest.raises(ValueError, match="scale=True.*implicit"):
        diffcp.ICPSettings(solver=diffcp.ProcrustesSolver(scale=True), backward="implicit")
    with pytest.raises(ValueError, match="point_to_point metric"):
        diffcp.ICPSettings(solver=diffcp.ProcrustesSolver(scale=True), metric="point_to_plane")
    with pytest.raises(TypeError):
        diffcp.GaussNewtonSolver(scale=True)
