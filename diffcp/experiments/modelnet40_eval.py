"""Experiment 2, part 1: registration on ModelNet40's test objects under every protocol.

    python -m diffcp.experiments.modelnet40_eval --out book/_data/modelnet40.json
        [--folder FOLDER] [--max-objects N] [--protocols clean noise ...] [--methods identity dcp_v1 ...]

For every protocol of :mod:`diffcp.datasets.protocols` (on the test split; ``"unseen"`` keeps the
test objects with labels >= 20) and every initialiser:

- ``identity``: no motion;
- ``fgr``: Open3D's Fast Global Registration on FPFH features (settings in :data:`FGR_SETTINGS`);
- ``pointnetlk``: learning3d's released PointNetLK (10 iterations);
- ``dcp_v1``: the authors' released DCP-v1 (trained on all 40 categories, so "unseen" is not
  unseen for it, and on clean pairs);

the figures of :func:`diffcp.metrics.registration_metrics` are recorded without ICP and after
diffcp ICP started from the initialiser's answer (``<method>+icp_hard``, ``<method>+icp_soft``;
``identity+icp_hard`` is plain ICP from the identity). Test pairs are fixed per item: each is
seeded with the object's index in the official test split, as DCP does. Written with
:func:`diffcp.provenance.write_result` (command, commit, machine, date); the layout is
``{"provenance", "settings", "protocols": {protocol: {method: metrics}}, "quoted", "timing"}``.

Every diffcp ICP call goes through :func:`refine`, with the settings of :data:`REFINE_SETTINGS`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from diffcp.datasets.modelnet40 import load_modelnet40
from diffcp.datasets.protocols import PROTOCOLS, RegistrationPairs, get_protocol, labels_for
from diffcp.geometry import make_transform
from diffcp.icp import icp
from diffcp.settings import DistanceRejection, ICPSettings
from diffcp.metrics import RECALL_THRESHOLDS, registration_metrics

__all__ = ["test_pairs", "refine", "REFINE_SETTINGS", "REFINE_VARIANTS", "FGR_SETTINGS", "METHODS", "evaluate", "main"]

#: Open3D FGR on FPFH (clouds of ~1024 points on the unit sphere, spacing ~0.05). Checked on 12
#: validation objects (train split, never test) over fpfh_radius {0.15, 0.25, 0.4} x
#: maximum_correspondence_distance {0.025, 0.05, 0.1}: these are among the best for "noise" (median
#: 0.9 deg) and "sampling" (~4.7 deg); no setting registers "partial" (median > 17 deg).
FGR_SETTINGS = {"normal_radius": 0.1, "normal_max_nn": 30, "fpfh_radius": 0.25, "fpfh_max_nn": 100,
                "maximum_correspondence_distance": 0.05, "iteration_number": 64, "seed": 0}
METHODS = ("identity", "fgr", "pointnetlk", "dcp_v1")
BATCH = 10

#: The ICP run after each method, as settings of record (written into the results file):
#: "hard" is diffcp's default ICP (exact nearest neighbours, point-to-point Procrustes, at most 30
#: iterations, relative tolerance 1e-6); "soft" uses soft nearest neighbours at the per-cloud default
#: temperature (0.1 x the target's median squared nearest-neighbour spacing); "hard_reject" is the
#: default ICP with Open3D's max-correspondence-distance habit: pairs farther apart than 0.1 (about
#: twice the point spacing of these unit-sphere clouds) are rejected, for partial overlap.
REFINE_SETTINGS = {
    "hard": ICPSettings(),
    "soft": ICPSettings(correspondence="soft_nn"),
    "hard_reject": ICPSettings(rejection=[DistanceRejection(0.1)]),
}
REFINE_VARIANTS = tuple(REFINE_SETTINGS)


def refine(source: Tensor, target: Tensor, init: Tensor, variant: str) -> Tensor:
    """diffcp ICP from ``init`` ``(B, 4, 4)`` with :data:`REFINE_SETTINGS` ``[variant]``: the refined
    transforms ``(B, 4, 4)`` (source -> target)."""
    if variant not in REFINE_SETTINGS:
        raise ValueError(f"variant must be one of {', '.join(map(repr, REFINE_SETTINGS))}; got {variant!r}.")
    return icp(source, target, REFINE_SETTINGS[variant], init=init).transform


def _identity(source: Tensor, target: Tensor) -> Tensor:
    return torch.eye(4, dtype=source.dtype).expand(len(source), 4, 4).clone()


def _fgr(source: Tensor, target: Tensor) -> Tensor:
    import open3d as o3d

    reg, s = o3d.pipelines.registration, FGR_SETTINGS

    def cloud_and_features(points):
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.double().numpy()))
        cloud.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=s["normal_radius"], max_nn=s["normal_max_nn"]))
        feats = reg.compute_fpfh_feature(cloud, o3d.geometry.KDTreeSearchParamHybrid(radius=s["fpfh_radius"], max_nn=s["fpfh_max_nn"]))
        return cloud, feats

    option = reg.FastGlobalRegistrationOption(maximum_correspondence_distance=s["maximum_correspondence_distance"],
                                              iteration_number=s["iteration_number"])
    out = []
    for x, y in zip(source, target):
        (cx, fx), (cy, fy) = cloud_and_features(x), cloud_and_features(y)
        # FGR samples its tuples at random: without a seed its answer changes from run to run (by
        # degrees on hard pairs). Seeded per pair, it depends on the pair alone, not on the batch.
        o3d.utility.random.seed(s["seed"])
        out.append(torch.tensor(np.array(reg.registration_fgr_based_on_feature_matching(cx, cy, fx, fy, option).transformation)))
    return torch.stack(out).to(source.dtype)


def _learned(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    from diffcp.models import load_dcp, load_pointnetlk

    if name == "dcp_v1":
        model = load_dcp("v1")

        def run(source, target):
            out = model(source, target)
            return make_transform(out.rotation, out.translation)
    else:
        model = load_pointnetlk()

        def run(source, target):
            return model(source, target, max_iterations=10).transform
    return run


def _warm_up() -> None:
    """Compile diffcp's numba kernels before anything is timed (the first call compiles for seconds)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1024, 3, generator=g)
    for variant in REFINE_VARIANTS:
        refine(x, x + 0.01, torch.eye(4).expand(2, 4, 4), variant)


def _metrics(T: Tensor, R: Tensor, t: Tensor) -> Dict[str, object]:
    return registration_metrics(T[:, :3, :3], T[:, :3, 3], R, t).as_dict()


def test_pairs(protocol, folder=None, max_objects: Optional[int] = None):
    """``(source, target, R, t)`` stacked: the protocol's pairs of the test split (its labels), each
    seeded with its object's row in the official test split, as DCP does; the first ``max_objects``."""
    data = load_modelnet40("test", folder, labels=labels_for(protocol, "test"))
    count = len(data.labels) if max_objects is None else min(max_objects, len(data.labels))
    pairs = RegistrationPairs(data.points[:count], protocol, item_seeds=data.rows[:count])
    return tuple(torch.stack(x) for x in zip(*(pairs[i] for i in range(count))))


def evaluate(protocol_name: str, methods: Sequence[str], folder=None, max_objects: Optional[int] = None,
             log=print) -> Dict[str, Dict]:
    """Metrics and seconds per pair of every method (and its ICP refinements) under one protocol."""
    source, target, R, t = test_pairs(get_protocol(protocol_name), folder, max_objects)
    count = len(source)
    results, timing = {}, {}
    for method in methods:
        initialise = {"identity": _identity, "fgr": _fgr}.get(method) or _learned(method)
        started = time.perf_counter()
        with torch.no_grad():
            T0 = torch.cat([initialise(source[i:i + BATCH], target[i:i + BATCH]) for i in range(0, count, BATCH)])
        timing[method] = (time.perf_counter() - started) / count
        results[method] = _metrics(T0, R, t)
        for variant in REFINE_VARIANTS:
            key, started = f"{method}+icp_{variant}", time.perf_counter()
            with torch.no_grad():
                T = torch.cat([refine(source[i:i + BATCH], target[i:i + BATCH], T0[i:i + BATCH], variant)
                               for i in range(0, count, BATCH)])
            timing[key] = (time.perf_counter() - started) / count
            results[key] = _metrics(T, R, t)
        log(f"{protocol_name:10s} {method:10s} rmse_r {results[method]['rmse_r']:8.3f} -> hard "
            f"{results[method + '+icp_hard']['rmse_r']:8.3f} / soft {results[method + '+icp_soft']['rmse_r']:8.3f} "
            f"/ hard+reject {results[method + '+icp_hard_reject']['rmse_r']:8.3f} "
            f"({count} pairs, {timing[method]:.3f} s/pair)")
    return {"metrics": results, "timing": timing, "pairs": count}


PAPER_TABLES = "DCP paper (Wang & Solomon, ICCV 2019), Tables 1-3, six metrics, full test set"
QUOTED = {
    "DCP paper (Wang & Solomon, ICCV 2019, arXiv:1905.03304), Table 5 ablation, clean, rotation MSE / RMSE / MAE (deg)": {
        "DGCNN+DCP-v2": [1.307329, 1.143385, 0.770573],
        "DGCNN+DCP-v1": [6.480572, 2.545697, 1.505548],
        "PointNet+DCP-v1": [17.008, 4.124, 2.800],
        "PointNet+DCP-v2": [49.863, 7.061, 4.485],
    },
    # Read from the ICCV 2019 camera-ready PDF (openaccess.thecvf.com, Wang_Deep_Closest_Point_..._ICCV_2019_paper.pdf):
    # full ModelNet40 test set; rotation errors in degrees of Euler angles, translation in unit-sphere units.
    PAPER_TABLES: {
        "clean": {"table": "Table 1, test on unseen point clouds", "rows": {
            "ICP": [894.897339, 29.914835, 23.544817, 0.084643, 0.290935, 0.248755],
            "Go-ICP": [140.477325, 11.852313, 2.588463, 0.000659, 0.025665, 0.007092],
            "FGR": [87.661491, 9.362772, 1.999290, 0.000194, 0.013939, 0.002839],
            "PointNetLK": [227.870331, 15.095374, 4.225304, 0.000487, 0.022065, 0.005404],
            "DCP-v1": [6.480572, 2.545697, 1.505548, 0.000003, 0.001763, 0.001451],
            "DCP-v2": [1.307329, 1.143385, 0.770573, 0.000003, 0.001786, 0.001195]}},
        "unseen": {"table": "Table 2, test on unseen categories", "rows": {
            "ICP": [892.601135, 29.876431, 23.626110, 0.086005, 0.293266, 0.251916],
            "Go-ICP": [192.258636, 13.865736, 2.914169, 0.000491, 0.022154, 0.006219],
            "FGR": [97.002747, 9.848997, 1.445460, 0.000182, 0.013503, 0.002231],
            "PointNetLK": [306.323975, 17.502113, 5.280545, 0.000784, 0.028007, 0.007203],
            "DCP-v1": [19.201385, 4.381938, 2.680408, 0.000025, 0.004950, 0.003597],
            "DCP-v2": [9.923701, 3.150191, 2.007210, 0.000025, 0.005039, 0.003703]}},
        "noise_dcp": {"table": "Table 3, test on objects with Gaussian noise", "rows": {
            "ICP": [882.564209, 29.707983, 23.557217, 0.084537, 0.290752, 0.249092],
            "Go-ICP": [131.182495, 11.453493, 2.534873, 0.000531, 0.023051, 0.004192],
            "FGR": [607.694885, 24.651468, 10.055918, 0.011876, 0.108977, 0.027393],
            "PointNetLK": [256.155548, 16.004860, 4.595617, 0.000465, 0.021558, 0.005652],
            "DCP-v1": [6.926589, 2.631841, 1.515879, 0.000003, 0.001801, 0.001697],
            "DCP-v2": [1.169384, 1.081380, 0.737479, 0.000002, 0.001500, 0.001053]}},
    },
    "Authors' code with dcp_v1.t7 on the 100 test airplanes of ../shared/data (shared/notes/REFERENCE.md)": {
        "rmse_r": 1.34, "median_geodesic_deg": 1.51, "rmse_t": 0.0030,
    },
}


def _kept_sections(path) -> Dict[str, object]:
    """Sections of an existing results file that this command does not produce (the trained runs of
    :mod:`diffcp.experiments.dcp_trained_eval`, with their own provenance): carried over unchanged."""
    import json
    from pathlib import Path

    if not Path(path).is_file():
        return {}
    old = json.loads(Path(path).read_text())
    return {k: old[k] for k in ("trained",) if k in old}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write (e.g. book/_data/modelnet40.json)")
    parser.add_argument("--folder", default=None, help="modelnet40_ply_hdf5_2048 folder (default: the subset)")
    parser.add_argument("--max-objects", type=int, default=None, help="first N test objects per protocol")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    _warm_up()
    protocols, timing, counts = {}, {}, {}
    for name in args.protocols:
        out = evaluate(name, args.methods, args.folder, args.max_objects)
        protocols[name], timing[name], counts[name] = out["metrics"], out["timing"], out["pairs"]
    settings = {
        "split": "test", "pairs_per_protocol": counts, "protocols": {n: get_protocol(n)._asdict() for n in args.protocols},
        "methods": list(args.methods), "icp_variants": {k: v.to_dict() for k, v in REFINE_SETTINGS.items()},
        "fgr": FGR_SETTINGS, "pointnetlk": {"max_iterations": 10, "weights": "pointnetlk_learning3d.t7"},
        "dcp_v1": {"weights": "dcp_v1.t7", "trained_on": "all 40 categories, clean"},
        "seeds": "each pair seeded with its object's index in the official test split (DCP's np.random.seed(item))",
        "recall_thresholds_deg_translation": [list(t) for t in RECALL_THRESHOLDS],
        "data_folder": str(args.folder) if args.folder else "subset (DIFFCP_DATA or ../shared/data)",
        "threads": args.threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    from diffcp.provenance import write_result

    data = {"settings": settings, "protocols": protocols, "quoted": QUOTED, "timing": timing}
    data.update(_kept_sections(args.out))
    write_result(args.out, data,
                 command=["python", "-m", "diffcp.experiments.modelnet40_eval", *(argv if argv is not None else sys.argv[1:])],
                 started=started)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
