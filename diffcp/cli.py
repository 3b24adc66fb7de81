"""The ``diffcp`` command line: register two point-cloud files by ICP.

``diffcp register SOURCE TARGET [options]`` (also ``python -m diffcp.cli register ...``) reads two
clouds (PLY, PCD, XYZ, XYZN, PTS through Open3D, or ``.npy`` arrays ``(N, 3)`` / ``(N, 6)`` with
normals), runs :func:`diffcp.icp` with the settings the options describe, prints the ``4 x 4``
transform that maps the source into the target (``y = R x + t``), the fitness and inlier RMSE as
Open3D's ``evaluate_registration`` reports them, the iterations and whether ICP converged, and can
write the transform as text (``numpy.loadtxt`` reads it) or print everything as one JSON object.

Every error the user can cause (a missing, unreadable, empty or non-finite cloud, a bad option
value, settings that diffcp refuses) is one line on stderr and exit status 2, never a traceback.
Open3D is optional: only the Open3D formats and ``--voxel`` need it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import torch

import diffcp
from diffcp.settings import (
    METRICS,
    DistanceRejection,
    GaussNewtonSolver,
    ICPSettings,
    LevenbergMarquardtSolver,
    NearestNeighbor,
    ProcrustesSolver,
    SoftNearestNeighbor,
    Stopping,
)

__all__ = ["main", "build_parser", "CLIError"]

PROG = "diffcp"
OPEN3D_FORMATS = (".ply", ".pcd", ".xyz", ".xyzn", ".pts")
FORMATS = OPEN3D_FORMATS + (".npy",)
CORRESPONDENCES = (NearestNeighbor.name, SoftNearestNeighbor.name)
SOLVERS = {s.name: s for s in (ProcrustesSolver, GaussNewtonSolver, LevenbergMarquardtSolver)}
DEFAULT_SPACING_FACTOR = 3.0

EPILOG = """\
examples:
  diffcp register scan.ply model.ply
      hard nearest neighbours, point-to-point, Procrustes; prints the 4x4 transform
      (source -> target), fitness, inlier RMSE, iterations and convergence
  diffcp register scan.pcd model.pcd --metric point_to_plane --max-distance 0.05 -o T.txt
      point-to-plane Gauss-Newton, pairs farther than 0.05 rejected; T.txt holds the
      transform (numpy.loadtxt("T.txt") reads it back)
  diffcp register a.xyz b.xyz --voxel 0.01 --metric symmetric --init guess.txt --json
      downsample both clouds, estimate normals, start from guess.txt; one JSON object
  diffcp register src.npy dst.npy --correspondence soft_nn --temperature 1e-4 --float64

Clouds: .ply .pcd .xyz .xyzn .pts (read with Open3D: pip install open3d, or open3d-cpu) and
.npy arrays of shape (N, 3), or (N, 6) with normals. Normals are estimated (PCA over
--normals-k neighbours) when the metric needs them and a file has none.
fitness = inlier pairs / source points and inlier_rmse = RMS distance of the inlier pairs, as
Open3D's evaluate_registration, at the final transform on the clouds as read, for the
distance --max-distance or, without it, 3 x the median nearest-neighbour spacing of the target.
Errors are one line on stderr with exit status 2.
"""


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


class _UsageError(CLIError):
    pass


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block) and never exit by itself."""

    def error(self, message):
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


# ----------------------------------------------------------------------------- option values
def _number(text: str, what: str, ok, kind=float):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}") from None
    if (kind is float and not math.isfinite(value)) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
    return value


def _positive(text: str) -> float:
    return _number(text, "a positive number", lambda v: v > 0)


def _non_negative(text: str) -> float:
    return _number(text, "a non-negative number", lambda v: v >= 0)


def _count(minimum: int):
    def parse(text: str) -> int:
        return _number(text, f"an integer >= {minimum}", lambda v: v >= minimum, kind=int)
    parse.__name__ = f"integer >= {minimum}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``diffcp`` argument parser (one sub-command, ``register``)."""
    parser = _Parser(prog=PROG, description="diffcp: differentiable, batched ICP in PyTorch, from the command line.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {diffcp.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    reg = commands.add_parser(
        "register", help="register SOURCE to TARGET by ICP; prints the transform source -> target",
        description="Register SOURCE to TARGET by ICP. The result maps the source into the target, y = R x + t.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    reg.add_argument("source", metavar="SOURCE", help="the cloud to move (" + " ".join(FORMATS) + ")")
    reg.add_argument("target", metavar="TARGET", help="the cloud to move it onto")

    ic = reg.add_argument_group("ICP (diffcp.ICPSettings)")
    ic.add_argument("--correspondence", choices=CORRESPONDENCES, default=NearestNeighbor.name,
                    help="hard nearest neighbour (nn, default) or soft nearest neighbour (soft_nn)")
    ic.add_argument("--temperature", type=_positive, metavar="T",
                    help="soft_nn temperature in squared distance units (default: 0.1 x the median "
                         "squared nearest-neighbour spacing of the target)")
    ic.add_argument("--metric", choices=METRICS, default="point_to_point", help="error metric (default point_to_point)")
    ic.add_argument("--solver", choices=tuple(SOLVERS), default=None,
                    help="default: procrustes for point_to_point, gauss_newton otherwise")
    ic.add_argument("--max-iterations", type=_count(1), default=Stopping().max_iterations, metavar="N",
                    help="upper bound on ICP iterations (default %(default)s)")
    ic.add_argument("--tolerance", type=_non_negative, default=Stopping().tolerance, metavar="TOL",
                    help="stop when an update rotates by less than TOL radians and translates by less than "
                         "TOL x the source's RMS radius (default %(default)s; 0 runs every iteration)")
    ic.add_argument("--max-distance", type=_positive, metavar="D",
                    help="reject pairs farther apart than D (hard diffcp.DistanceRejection); also the "
                         "distance for fitness and inlier RMSE")
    ic.add_argument("--init", metavar="FILE", help="initial 4x4 transform source -> target, as text (numpy.loadtxt)")
    ic.add_argument("--float64", action="store_true", help="compute in float64 (default float32)")

    data = reg.add_argument_group("data")
    data.add_argument("--voxel", type=_positive, metavar="SIZE",
                      help="downsample both clouds on a voxel grid of this size before ICP (needs Open3D)")
    data.add_argument("--normals-k", type=_count(3), default=16, metavar="K",
                      help="neighbours for normal estimation (diffcp.estimate_normals) when the metric needs "
                           "normals and a file has none (default %(default)s)")

    out = reg.add_argument_group("output")
    out.add_argument("-o", "--output", metavar="FILE", help="write the 4x4 transform as text (numpy.loadtxt reads it)")
    out.add_argument("--json", action="store_true", help="print one JSON object (transform, fitness, inlier_rmse, "
                                                         "iterations, converged, settings, ...) and nothing else")
    return parser


# ----------------------------------------------------------------------------- reading clouds
class Cloud(NamedTuple):
    points: np.ndarray  # (N, 3) float64
    normals: Optional[np.ndarray]  # (N, 3) float64 or None


def _open3d(why: str):
    try:
        import open3d
    except ImportError:
        raise CLIError(f"{why} needs the package open3d, which is not installed: pip install open3d "
                       "(or open3d-cpu)") from None
    return open3d


@contextlib.contextmanager
def _quiet():
    """Silence what Open3D's C++ code prints (its warnings go to stdout, RPly's to stderr): the CLI
    reports its own one-line errors and ``--json`` must print JSON only."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
                os.dup2(devnull, fd)
            except OSError:
                pass
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def read_cloud(path: str, role: str) -> Cloud:
    """Read a cloud file as float64 points (and normals when the file has them)."""
    label = f"{role} {path}"
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise CLIError(f"{label}: unknown format {ext or '(no extension)'!r}; expected one of {' '.join(FORMATS)}")
    if not os.path.exists(path):
        raise CLIError(f"{label}: no such file")
    if not os.path.isfile(path):
        raise CLIError(f"{label}: not a file")
    if not os.access(path, os.R_OK):
        raise CLIError(f"{label}: permission denied")
    if os.path.getsize(path) == 0:
        raise CLIError(f"{label}: the file is empty")
    if ext == ".npy":
        cloud = _read_npy(path, label)
    else:
        o3d = _open3d(f"reading {ext} files")
        with _quiet(), o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
            pcd = o3d.io.read_point_cloud(path, remove_nan_points=False, remove_infinite_points=False)
        points = np.asarray(pcd.points, dtype=np.float64).reshape(-1, 3)
        if len(points) == 0:
            raise CLIError(f"{label}: no points read; the file holds no points or is not a valid "
                           f"{ext[1:].upper()} file")
        normals = np.asarray(pcd.normals, dtype=np.float64).reshape(-1, 3) if pcd.has_normals() else None
        cloud = Cloud(points, normals)
    return _check_cloud(cloud, label)


def _read_npy(path: str, label: str) -> Cloud:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, OSError, EOFError, UnpicklingError, ...
        raise CLIError(f"{label}: not a readable .npy array ({_one_line(e)})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise CLIError(f"{label}: expected a numeric array of shape (N, 3) or (N, 6); got "
                       f"{getattr(array, 'dtype', type(array).__name__)}")
    if array.ndim != 2 or array.shape[1] not in (3, 6):
        raise CLIError(f"{label}: expected an array of shape (N, 3), or (N, 6) with normals; got {array.shape}")
    if len(array) == 0:
        raise CLIError(f"{label}: the array holds no points")
    array = array.astype(np.float64)
    return Cloud(array[:, :3], array[:, 3:] if array.shape[1] == 6 else None)


def _check_cloud(cloud: Cloud, label: str) -> Cloud:
    bad = ~np.isfinite(cloud.points).all(axis=1)
    if bad.any():
        raise CLIError(f"{label}: NaN or infinite coordinates in {int(bad.sum())} of {len(bad)} points "
                       f"(the first is point {int(np.argmax(bad))}, counting from 0)")
    normals = cloud.normals
    if normals is not None:
        if not np.isfinite(normals).all():
            raise CLIError(f"{label}: the normals contain NaN or infinite values")
        norm = np.linalg.norm(normals, axis=1, keepdims=True)
        normals = np.where(norm > 0, normals / np.where(norm > 0, norm, 1.0), 0.0)
    if len(cloud.points) < 3:
        raise CLIError(f"{label}: ICP needs at least 3 points; the file holds {len(cloud.points)}")
    return Cloud(cloud.points, normals)


def _downsample(cloud: Cloud, voxel: float, label: str) -> Cloud:
    o3d = _open3d("--voxel")
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(cloud.points))
    if cloud.normals is not None:
        pcd.normals = o3d.utility.Vector3dVector(cloud.normals)
    with _quiet():
        down = pcd.voxel_down_sample(voxel)
    points = np.asarray(down.points, dtype=np.float64).reshape(-1, 3)
    if len(points) < 3:
        raise CLIError(f"{label}: --voxel {voxel:g} leaves {len(points)} point(s), ICP needs at least 3; use a "
                       "smaller voxel")
    normals = None
    if cloud.normals is not None and down.has_normals():
        normals = np.asarray(down.normals, dtype=np.float64).reshape(-1, 3)
        norm = np.linalg.norm(normals, axis=1, keepdims=True)
        normals = np.where(norm > 0, normals / np.where(norm > 0, norm, 1.0), 0.0)
    return Cloud(points, normals)


def read_init(path: str) -> np.ndarray:
    """A ``4 x 4`` rigid transform from a text file, its rotation made exactly orthonormal."""
    if not os.path.isfile(path):
        raise CLIError(f"--init {path}: no such file")
    try:
        T = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except Exception as e:  # ValueError on bad numbers, OSError, ...
        raise CLIError(f"--init {path}: not a text matrix ({_one_line(e)})") from None
    if T.shape != (4, 4):
        raise CLIError(f"--init {path}: expected a 4x4 matrix; got shape {T.shape}")
    if not np.isfinite(T).all():
        raise CLIError(f"--init {path}: the matrix contains NaN or infinite values")
    R = T[:3, :3]
    if (np.abs(R.T @ R - np.eye(3)).max() > 1e-3 or np.linalg.det(R) <= 0
            or np.abs(T[3] - [0, 0, 0, 1]).max() > 1e-6):
        raise CLIError(f"--init {path}: not a rigid transform (the top-left 3x3 must be a rotation, the last row "
                       "0 0 0 1)")
    # Text files round their entries: project onto the rotations (polar factor), else diffcp's
    # rigidity check (to sqrt(eps) of the dtype) refuses a matrix written with a few decimals.
    T = T.copy()
    T[:3, :3] = _nearest_rotation(R)
    T[3] = [0.0, 0.0, 0.0, 1.0]
    return T


def _nearest_rotation(R: np.ndarray) -> np.ndarray:
    """The rotation nearest to a (nearly orthonormal) ``3 x 3`` matrix: its polar factor."""
    U, _, Vt = np.linalg.svd(R)
    return U @ Vt


# ----------------------------------------------------------------------------- settings and evaluation
def settings_from_args(args) -> ICPSettings:
    """The :class:`diffcp.ICPSettings` the options describe."""
    if args.temperature is not None and args.correspondence != SoftNearestNeighbor.name:
        raise CLIError("--temperature applies to --correspondence soft_nn only")
    if args.correspondence == SoftNearestNeighbor.name:
        correspondence = SoftNearestNeighbor(temperature=args.temperature)
    else:
        correspondence = NearestNeighbor()
    solver = args.solver or (ProcrustesSolver.name if args.metric == "point_to_point" else GaussNewtonSolver.name)
    rejection = [DistanceRejection(args.max_distance)] if args.max_distance is not None else []
    return ICPSettings(correspondence=correspondence, metric=args.metric, solver=SOLVERS[solver](),
                       rejection=rejection,
                       stopping=Stopping(max_iterations=args.max_iterations, tolerance=args.tolerance))


def median_spacing(points: torch.Tensor) -> float:
    """Median distance from each point to its nearest other point (positive spacings only)."""
    d = diffcp.knn(points, points, k=2).sq_distances[:, 1].sqrt()
    d = d[d > 0]
    if d.numel() == 0:
        raise CLIError("target: all points coincide; pass --max-distance")
    return float(d.median())


class Evaluation(NamedTuple):
    fitness: float
    inlier_rmse: float
    correspondences: int


def evaluate(source: torch.Tensor, target: torch.Tensor, transform: torch.Tensor, max_distance: float) -> Evaluation:
    """Open3D's ``evaluate_registration``: each moved source point paired with its nearest target
    point when it lies within ``max_distance``; fitness = pairs / source points, inlier RMSE = RMS
    distance of the pairs (0 without pairs)."""
    y = diffcp.transform_points(transform, source)
    d2 = diffcp.knn(y, target, k=1).sq_distances[:, 0]
    inliers = d2 <= max_distance ** 2
    n = int(inliers.sum())
    rmse = float(d2[inliers].mean().sqrt()) if n else 0.0
    return Evaluation(n / source.shape[0], rmse, n)


def _shift(T: np.ndarray, source_offset: np.ndarray, target_offset: np.ndarray) -> np.ndarray:
    """``x -> T(x + source_offset) - target_offset``: the transform between clouds moved by
    ``-source_offset`` and ``-target_offset``."""
    out = T.copy()
    out[:3, 3] = T[:3, 3] + T[:3, :3] @ source_offset - target_offset
    return out


# ----------------------------------------------------------------------------- the command
def register(args) -> dict:
    """Run ``diffcp register`` and return what it reports (the JSON object)."""
    settings = settings_from_args(args)
    if args.output is not None:  # fail before the work, not after it
        folder = os.path.dirname(os.path.abspath(args.output))
        if os.path.isdir(args.output) or not os.path.isdir(folder):
            raise CLIError(f"--output {args.output}: cannot write there (a folder, or its folder does not exist)")
    init = read_init(args.init) if args.init is not None else np.eye(4)
    source_in = read_cloud(args.source, "SOURCE")
    target_in = read_cloud(args.target, "TARGET")
    source, target = source_in, target_in
    if args.voxel is not None:
        source = _downsample(source, args.voxel, f"SOURCE {args.source}")
        target = _downsample(target, args.voxel, f"TARGET {args.target}")

    # Centre each cloud in float64 before casting, so that float32 keeps the detail of clouds far
    # from the origin (georeferenced scans); the transform is mapped back to the files' frames.
    dtype = torch.float64 if args.float64 else torch.float32
    c_s, c_t = source.points.mean(0), target.points.mean(0)
    src = torch.as_tensor(source.points - c_s, dtype=dtype)
    tgt = torch.as_tensor(target.points - c_t, dtype=dtype)
    normals = {}
    for role, cloud, pts, needed in (("source", source, src, settings.needs_source_normals),
                                     ("target", target, tgt, settings.needs_target_normals)):
        if not needed:
            normals[role] = None
        elif cloud.normals is not None:
            normals[role] = torch.as_tensor(cloud.normals, dtype=dtype)
        else:
            if args.normals_k > len(pts):
                raise CLIError(f"--normals-k {args.normals_k} exceeds the {len(pts)} points of the {role}")
            normals[role] = diffcp.estimate_normals(pts, k=args.normals_k)
    origin = {role: None if normals[role] is None else ("file" if cloud.normals is not None else "estimated")
              for role, cloud in (("source", source), ("target", target))}

    init_centred = torch.as_tensor(_shift(init, c_s, c_t), dtype=dtype)
    with torch.no_grad():
        result = diffcp.icp(src, tgt, settings, init=init_centred, source_normals=normals["source"],
                            target_normals=normals["target"])
    T = _shift(result.transform.double().numpy(), -c_s, -c_t)
    T[:3, :3] = _nearest_rotation(T[:3, :3])  # rigid to float64 rounding, not float32's
    T[3] = [0.0, 0.0, 0.0, 1.0]

    full_source = torch.as_tensor(source_in.points, dtype=torch.float64)
    full_target = torch.as_tensor(target_in.points, dtype=torch.float64)
    if args.max_distance is not None:
        max_distance, distance_from = args.max_distance, "--max-distance"
    else:
        spacing = median_spacing(full_target)
        max_distance = DEFAULT_SPACING_FACTOR * spacing
        distance_from = (f"{DEFAULT_SPACING_FACTOR:g} x the median nearest-neighbour spacing of the target "
                         f"({spacing:.6g})")
    ev = evaluate(full_source, full_target, torch.as_tensor(T), max_distance)

    if args.output is not None:
        _write_transform(args.output, T)
    return {
        "transform": T.tolist(),
        "fitness": ev.fitness,
        "inlier_rmse": ev.inlier_rmse,
        "iterations": int(result.iterations),
        "converged": bool(result.converged),
        "settings": settings.to_dict(),
        "max_correspondence_distance": max_distance,
        "max_correspondence_distance_from": distance_from,
        "correspondences": ev.correspondences,
        "final_error": float(result.final_error),
        "source": {"file": args.source, "points": len(source_in.points), "registered_points": len(source.points),
                   "normals": origin["source"]},
        "target": {"file": args.target, "points": len(target_in.points), "registered_points": len(target.points),
                   "normals": origin["target"]},
        "dtype": str(dtype).replace("torch.", ""),
        "voxel": args.voxel,
        "init": args.init,
        "output": args.output,
    }


def _format_matrix(T: np.ndarray, digits: int) -> List[str]:
    cells = [["%.*g" % (digits, v) for v in row] for row in T]
    width = max(len(c) for row in cells for c in row)
    return [" ".join(c.rjust(width) for c in row) for row in cells]


def _write_transform(path: str, T: np.ndarray) -> None:
    try:
        with open(path, "w") as f:
            f.write("\n".join(_format_matrix(T, 17)) + "\n")  # float64 exactly: rigid to its rounding
    except OSError as e:
        raise CLIError(f"--output {path}: cannot write ({e.strerror or _one_line(e)})") from None


def _report(out: dict) -> str:
    yes = "yes" if out["converged"] else "no"
    lines = [
        f"source {out['source']['file']} ({out['source']['points']} points) -> "
        f"target {out['target']['file']} ({out['target']['points']} points)",
    ]
    if out["voxel"] is not None:
        lines.append(f"voxel {out['voxel']:g}: registered {out['source']['registered_points']} -> "
                     f"{out['target']['registered_points']} points")
    for role in ("source", "target"):
        if out[role]["normals"] == "estimated":
            lines.append(f"{role} normals estimated (PCA, diffcp.estimate_normals)")
    lines.append("transform (source -> target, y = R x + t):")
    lines += ["  " + row for row in _format_matrix(np.asarray(out["transform"]), 10)]
    lines += [
        f"fitness {out['fitness']:.6f}  inlier_rmse {out['inlier_rmse']:.6g}  "
        f"({out['correspondences']} inlier pairs of {out['source']['points']} source points)",
        f"max correspondence distance {out['max_correspondence_distance']:.6g}: "
        f"{out['max_correspondence_distance_from']}",
        f"iterations {out['iterations']}  converged {yes}",
    ]
    if out["output"] is not None:
        lines.append(f"transform written to {out['output']}")
    return "\n".join(lines)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except CLIError as e:
        print(_one_line(e), file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = register(args)
    except CLIError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:  # diffcp names the argument and what it expected
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)):
            continue
        print(f"{PROG}: warning: {_one_line(w.message)}", file=sys.stderr)
    if args.json:
        print(json.dumps(out, allow_nan=False))
    else:
        print(_report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
