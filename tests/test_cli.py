"""The command line, end to end on real files: `diffcp register SOURCE TARGET [options]`.

Clouds are written to a temporary folder as PLY and PCD (with Open3D), XYZ and NPY; the command
runs through `python -m diffcp.cli` in a subprocess (a few runs: each pays the imports) and through
`main(argv)` in this process (the rest).
"""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

import diffcp
from diffcp.cli import main
from shapes import sample

o3d = pytest.importorskip("open3d")

ROOT = Path(__file__).resolve().parents[1]
N = 600
OFFSET = np.array([5.0, -3.0, 2.0])  # clouds away from the origin: the CLI's frames must be right


def rotation_error_deg(T, T_ref):
    """Angle of R^T R_ref in degrees (the matrices are projected onto rotations by scipy)."""
    return float(np.degrees(Rotation.from_matrix(np.asarray(T)[:3, :3].T @ np.asarray(T_ref)[:3, :3]).magnitude()))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A bumpy surface (no symmetry), the same points moved by a known transform (permuted), in
    every format; normals in the (N, 6) arrays; the transform written with 6 decimals."""
    folder = tmp_path_factory.mktemp("clouds")
    pts, nrm = sample("bumpy_sphere", N, seed=0)
    src, src_n = pts.numpy() + OFFSET, nrm.numpy()
    R = Rotation.from_euler("xyz", [0.1, -0.15, 0.2]).as_matrix()  # about 15 degrees about the centre
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, OFFSET - R @ OFFSET + [0.05, -0.02, 0.03]
    perm = np.random.default_rng(0).permutation(N)
    tgt, tgt_n = (src @ R.T + T[:3, 3])[perm], (src_n @ R.T)[perm]
    for name, p, n in (("src", src, src_n), ("tgt", tgt, tgt_n)):
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(p))
        assert o3d.io.write_point_cloud(str(folder / f"{name}.ply"), cloud)
        assert o3d.io.write_point_cloud(str(folder / f"{name}.pcd"), cloud)
        np.savetxt(folder / f"{name}.xyz", p)
        np.save(folder / f"{name}.npy", p)
        np.save(folder / f"{name}6.npy", np.hstack([p, n]))
    np.savetxt(folder / "T_true.txt", T, fmt="%.6f")  # rounded: the CLI must still accept it as rigid
    return folder, T, src, tgt


def run_main(argv, capfd):
    """``main(argv)`` in this process: ``(status, stdout, stderr)`` (file descriptors captured, so
    that what Open3D's C++ code might print counts too)."""
    status = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return status, out, err


def run_json(folder, argv, capfd):
    status, out, err = run_main(["register", *(folder / a if str(a).startswith(("src", "tgt")) else a for a in argv),
                                 "--json"], capfd)
    assert status == 0, err
    return json.loads(out)


def run_subprocess(args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "diffcp.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


# --------------------------------------------------------------------------- end to end, subprocess
def test_subprocess_recovers_transform_and_writes_a_numpy_readable_file(data):
    folder, T, _, _ = data
    proc = run_subprocess(["register", "src.ply", "tgt.ply", "--output", "T.txt"], cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    T_file = np.loadtxt(folder / "T.txt")
    assert T_file.shape == (4, 4)
    assert rotation_error_deg(T_file, T) < 1e-3
    assert np.abs(T_file[:3, 3] - T[:3, 3]).max() < 1e-4
    assert np.array_equal(T_file[3], [0, 0, 0, 1])
    assert np.abs(T_file[:3, :3].T @ T_file[:3, :3] - np.eye(3)).max() < 1e-12  # rigid in float64 too
    out = proc.stdout
    assert "fitness 1.000000" in out and "converged yes" in out and "inlier_rmse" in out
    assert "3 x the median nearest-neighbour spacing of the target" in out
    # the printed matrix is the written one
    start = out.index("y = R x + t):") + len("y = R x + t):")
    printed = np.array([row.split() for row in out[start:].strip().splitlines()[:4]], dtype=float)
    assert np.abs(printed - T_file).max() < 1e-8


def test_subprocess_json_is_one_object_with_the_keys(data):
    folder, T, _, _ = data
    proc = run_subprocess(["register", "src.pcd", "tgt.pcd", "--metric", "point_to_plane", "--json"], cwd=folder)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # stdout holds the JSON object and nothing else
    assert {"transform", "fitness", "inlier_rmse", "iterations", "converged", "settings"} <= set(out)
    assert rotation_error_deg(out["transform"], T) < 1e-3
    settings = diffcp.ICPSettings.from_dict(out["settings"])
    assert settings.metric == "point_to_plane" and isinstance(settings.solver, diffcp.GaussNewtonSolver)
    assert out["target"]["normals"] == "estimated" and out["source"]["normals"] is None


@pytest.mark.parametrize("argv,fragment", [
    (["register", "nan.xyz", "tgt.xyz"], "NaN or infinite coordinates in 1 of 4 points"),
    (["register", "src.xyz", "tgt.xyz", "--tolerance", "-1"], "argument --tolerance"),
])
def test_subprocess_errors_are_one_line_with_status_2(data, argv, fragment):
    folder = data[0]
    (folder / "nan.xyz").write_text("1 2 3\n4 5 nan\n7 8 9\n1 1 1\n")
    proc = run_subprocess(argv, cwd=folder)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and fragment in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_subprocess_help_shows_examples(data):
    proc = run_subprocess(["register", "--help"], cwd=data[0])
    assert proc.returncode == 0
    assert "examples:" in proc.stdout and "diffcp register scan.ply model.ply" in proc.stdout
    assert "--max-distance" in proc.stdout and "--normals-k" in proc.stdout


# --------------------------------------------------------------------------- main(argv): recovery
@pytest.mark.parametrize("source,target,options,normals", [
    ("src.ply", "tgt.ply", [], (None, None)),
    ("src.pcd", "tgt.pcd", ["--solver", "gauss_newton"], (None, None)),
    ("src.xyz", "tgt.xyz", ["--metric", "symmetric", "--solver", "levenberg_marquardt"], ("estimated", "estimated")),
    ("src6.npy", "tgt6.npy", ["--metric", "point_to_plane", "--float64"], (None, "file")),
    ("src.npy", "tgt.npy", ["--correspondence", "soft_nn", "--temperature", "1e-5"], (None, None)),
])
def test_recovers_a_known_transform_from_every_format(data, capfd, source, target, options, normals):
    folder, T, _, _ = data
    out = run_json(folder, [source, target, *options], capfd)
    assert rotation_error_deg(out["transform"], T) < 1e-3
    assert np.abs(np.array(out["transform"])[:3, 3] - T[:3, 3]).max() < 1e-4
    assert out["converged"] is True and 1 <= out["iterations"] <= 30
    assert (out["source"]["normals"], out["target"]["normals"]) == normals
    assert out["dtype"] == ("float64" if "--float64" in options else "float32")


def test_json_reports_fitness_rmse_and_settings_like_open3d(data, capfd):
    folder, T, src, tgt = data
    out = run_json(folder, ["src.npy", "tgt.npy", "--max-iterations", "40", "--tolerance", "1e-7"], capfd)
    assert {"transform", "fitness", "inlier_rmse", "iterations", "converged", "settings"} <= set(out)
    assert diffcp.ICPSettings.from_dict(out["settings"]) == diffcp.ICPSettings(
        stopping=diffcp.Stopping(max_iterations=40, tolerance=1e-7))
    assert out["fitness"] == 1.0 and out["correspondences"] == N and out["inlier_rmse"] < 1e-5
    # the default distance: 3 x the median nearest-neighbour spacing of the target, stated
    spacing = np.median(cKDTree(tgt).query(tgt, k=2)[0][:, 1])
    assert out["max_correspondence_distance"] == pytest.approx(3 * spacing, rel=1e-9)
    assert "median nearest-neighbour spacing" in out["max_correspondence_distance_from"]


def test_fitness_and_inlier_rmse_match_an_independent_evaluation(data, capfd):
    # one iteration from the identity leaves a poor fit: some pairs beyond the distance
    folder, _, src, tgt = data
    out = run_json(folder, ["src.npy", "tgt.npy", "--max-iterations", "1", "--max-distance", "0.08"], capfd)
    T = np.array(out["transform"])
    d, _ = cKDTree(tgt).query(src @ T[:3, :3].T + T[:3, 3])
    inliers = d <= 0.08
    assert 0 < inliers.sum() < N
    assert out["fitness"] == pytest.approx(inliers.mean(), abs=1e-12)
    assert out["inlier_rmse"] == pytest.approx(np.sqrt(np.mean(d[inliers] ** 2)), rel=1e-9)
    assert out["max_correspondence_distance"] == 0.08 and out["max_correspondence_distance_from"] == "--max-distance"
    assert out["settings"]["rejection"] == [{"type": "distance", "max_distance": 0.08, "temperature": 0.0,
                                             "learnable": False}]


def test_text_output_states_the_max_distance(data, capfd):
    folder = data[0]
    status, out, err = run_main(["register", folder / "src.npy", folder / "tgt.npy", "--max-distance", "0.25"], capfd)
    assert status == 0, err
    assert "max correspondence distance 0.25: --max-distance" in out
    assert "iterations" in out and "converged yes" in out and "fitness 1.000000" in out


def test_init_is_used(data, capfd):
    folder, T, _, _ = data
    one = ["src.npy", "tgt.npy", "--max-iterations", "1", "--float64"]  # float64: the rounded init must pass
    without = run_json(folder, one, capfd)
    assert rotation_error_deg(without["transform"], T) > 1.0  # one step from the identity is not enough
    with_init = run_json(folder, [*one, "--init", folder / "T_true.txt"], capfd)
    assert rotation_error_deg(with_init["transform"], T) < 1e-3
    assert with_init["iterations"] == 1


def test_output_file_holds_the_reported_transform(data, capfd, tmp_path):
    folder = data[0]
    out = run_json(folder, ["src.xyz", "tgt.xyz", "--float64", "--output", tmp_path / "T.txt"], capfd)
    assert np.array_equal(np.loadtxt(tmp_path / "T.txt"), np.array(out["transform"]))  # written exactly


def test_voxel_downsamples_both_clouds(data, capfd):
    folder, T, _, _ = data
    out = run_json(folder, ["src.ply", "tgt.ply", "--voxel", "0.05"], capfd)
    for role in ("source", "target"):
        assert 3 <= out[role]["registered_points"] < out[role]["points"] == N
    assert out["voxel"] == 0.05
    assert rotation_error_deg(out["transform"], T) < 0.5  # different samples: close, not exact


# --------------------------------------------------------------------------- main(argv): errors
ERRORS = [
    (["missing.ply", "tgt.ply"], "SOURCE missing.ply: no such file"),
    (["src.ply", "empty.xyz"], "TARGET empty.xyz: the file is empty"),
    (["garbage.ply", "tgt.ply"], "not a valid PLY file"),
    (["garbage.pcd", "tgt.ply"], "not a valid PCD file"),
    (["folder.ply", "tgt.ply"], "not a file"),
    (["nan.xyz", "tgt.xyz"], "NaN or infinite coordinates"),
    (["src.npy", "nan.npy"], "TARGET nan.npy: NaN or infinite coordinates"),
    (["src.npy", "wide.npy"], "shape (N, 3), or (N, 6) with normals; got (5, 4)"),
    (["src.npy", "text.npy"], "not a readable .npy array"),
    (["two.npy", "tgt.npy"], "at least 3 points"),
    (["src.txt", "tgt.npy"], "unknown format '.txt'"),
    (["src.npy", "tgt.npy", "--temperature", "-1"], "argument --temperature: expected a positive number"),
    (["src.npy", "tgt.npy", "--temperature", "1e-3"], "--temperature applies to --correspondence soft_nn only"),
    (["src.npy", "tgt.npy", "--metric", "plane"], "argument --metric: invalid choice"),
    (["src.npy", "tgt.npy", "--solver", "svd"], "argument --solver: invalid choice"),
    (["src.npy", "tgt.npy", "--max-iterations", "0"], "argument --max-iterations: expected an integer >= 1"),
    (["src.npy", "tgt.npy", "--max-iterations", "2.5"], "argument --max-iterations"),
    (["src.npy", "tgt.npy", "--tolerance", "abc"], "argument --tolerance"),
    (["src.npy", "tgt.npy", "--max-distance", "nan"], "argument --max-distance"),
    (["src.npy", "tgt.npy", "--voxel", "0"], "argument --voxel"),
    (["src.npy", "tgt.npy", "--normals-k", "2"], "argument --normals-k"),
    (["src.npy", "tgt.npy", "--bogus"], "unrecognized arguments: --bogus"),
    (["src.npy"], "required: TARGET"),
    # a ValueError of diffcp itself (ICPSettings), passed on as one line
    (["src.npy", "tgt.npy", "--metric", "point_to_plane", "--solver", "procrustes"],
     "solver='procrustes' solves the point_to_point metric in closed form only"),
    (["src.npy", "tgt.npy", "--metric", "point_to_plane", "--normals-k", "700"], "--normals-k 700 exceeds the 600"),
    (["src.npy", "tgt.npy", "--voxel", "100"], "--voxel 100 leaves 1 point(s)"),
    (["src.npy", "tgt.npy", "--init", "T33.txt"], "expected a 4x4 matrix; got shape (3, 3)"),
    (["src.npy", "tgt.npy", "--init", "scaled.txt"], "not a rigid transform"),
    (["src.npy", "tgt.npy", "--init", "letters.txt"], "not a text matrix"),
    (["src.npy", "tgt.npy", "--init", "nowhere.txt"], "--init nowhere.txt: no such file"),
    (["src.npy", "tgt.npy", "--output", "no/such/folder/T.txt"], "--output no/such/folder/T.txt: cannot write"),
]


@pytest.fixture(scope="module")
def bad_files(data):
    folder = data[0]
    (folder / "empty.xyz").write_text("")
    (folder / "garbage.ply").write_bytes(b"garbage\x00\x01")
    (folder / "garbage.pcd").write_text("hello\n")
    (folder / "folder.ply").mkdir(exist_ok=True)
    (folder / "nan.xyz").write_text("1 2 3\n4 5 nan\n7 8 9\n1 1 1\n")
    np.save(folder / "nan.npy", np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [np.nan, 0, 1.0]]))
    np.save(folder / "wide.npy", np.zeros((5, 4)))
    (folder / "text.npy").write_text("not an array\n")
    np.save(folder / "two.npy", np.zeros((2, 3)))
    np.savetxt(folder / "T33.txt", np.eye(3))
    np.savetxt(folder / "scaled.txt", np.diag([2.0, 1.0, 1.0, 1.0]))
    (folder / "letters.txt").write_text("a b c d\n")
    return folder


@pytest.mark.parametrize("argv,fragment", ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_errors_are_one_line_with_status_2(bad_files, capfd, monkeypatch, argv, fragment):
    monkeypatch.chdir(bad_files)
    status, out, err = run_main(["register", *argv], capfd)
    assert status == 2
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("diffcp"), err
    assert fragment in err, err
    assert out == ""


def test_missing_open3d_is_one_line_naming_it(bad_files, capfd, monkeypatch):
    monkeypatch.chdir(bad_files)
    monkeypatch.setitem(sys.modules, "open3d", None)  # import open3d raises ImportError
    for argv in (["src.ply", "tgt.npy"], ["src.npy", "tgt.npy", "--voxel", "0.05"]):
        status, out, err = run_main(["register", *argv], capfd)
        assert status == 2 and out == "" and len(err.splitlines()) == 1, err
        assert "open3d" in err and "not installed" in err
    status, out, err = run_main(["register", "src.npy", "tgt.npy", "--max-iterations", "2"], capfd)
    assert status == 0, err  # .npy needs no Open3D


# --------------------------------------------------------------------------- help and packaging
def test_help_exits_0_and_shows_examples(capfd):
    for argv in (["--help"], ["register", "--help"]):
        status, out, _ = run_main(argv, capfd)
        assert status == 0
        assert "examples:" in out and "diffcp register scan.pcd model.pcd --metric point_to_plane" in out


def test_console_script_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["diffcp"] == "diffcp.cli:main"
    assert project["name"] != "diffcp"  # "diffcp" on PyPI is an unrelated library
    module, _, name = project["scripts"]["diffcp"].partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is main
