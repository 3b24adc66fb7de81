#!/usr/bin/env python3
"""Check a ModelNet40 folder in the official ``modelnet40_ply_hdf5_2048`` layout (PointNet's h5 release).

Used on the ModelNet40 subset that tests and CI read from ``../shared/data`` (or ``$DIFFCP_DATA``)
and on a full download alike: the same checks hold for both, and ``--full`` additionally requires
the official object counts (9840 train / 2468 test).

    python data_scripts/check_modelnet40.py [FOLDER] [--full]

FOLDER defaults to ``$DIFFCP_DATA/modelnet40_subset/modelnet40_ply_hdf5_2048`` or
``../shared/data/modelnet40_subset/modelnet40_ply_hdf5_2048``. Exit status 0 when the folder is
valid; otherwise every problem is printed and the status is 1.

Checked: ``shape_names.txt`` holds 40 names; every file listed in ``train_files.txt`` and
``test_files.txt`` exists (matched by file name); each h5 holds ``data`` (N, 2048, 3) float32,
``label`` (N, 1) integers in [0, 40) and, when present, ``normal`` (N, 2048, 3) with unit rows;
coordinates are finite and inside the unit sphere (the release is normalised to it; 1% slack); the
``*_id2file.json`` lists, when present, have one entry per object whose class folder matches the
label's name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List

import numpy as np

FULL_COUNTS = {"train": 9840, "test": 2468}
SUBDIR = Path("modelnet40_subset") / "modelnet40_ply_hdf5_2048"


def default_folder() -> Path:
    """``$DIFFCP_DATA/...`` if set, else ``../shared/data/...`` next to the repository."""
    root = os.environ.get("DIFFCP_DATA")
    if root:
        return Path(root) / SUBDIR
    return Path(__file__).resolve().parents[2] / "shared" / "data" / SUBDIR


def check(folder: Path, full: bool = False) -> List[str]:
    """Every problem found in ``folder`` (an empty list means it is valid)."""
    import h5py

    problems: List[str] = []
    names_file = folder / "shape_names.txt"
    if not names_file.exists():
        return [f"{names_file} is missing."]
    names = [n.strip() for n in names_file.read_text().splitlines() if n.strip()]
    if len(names) != 40:
        problems.append(f"shape_names.txt must list 40 classes; it lists {len(names)}.")
    for split in ("train", "test"):
        listing = folder / f"{split}_files.txt"
        if not listing.exists():
            problems.append(f"{listing.name} is missing.")
            continue
        files = [Path(line.strip()).name for line in listing.read_text().splitlines() if line.strip()]
        if not files:
            problems.append(f"{listing.name} lists no h5 file.")
        total = 0
        for name in files:
            path = folder / name
            if not path.exists():
                problems.append(f"{name} is listed in {listing.name} but missing.")
                continue
            with h5py.File(path, "r") as f:
                if "data" not in f or "label" not in f:
                    problems.append(f"{name} must hold 'data' and 'label'; it holds {sorted(f.keys())}.")
                    continue
                data, label = f["data"][:], f["label"][:]
                normal = f["normal"][:] if "normal" in f else None
            n = data.shape[0]
            total += n
            if data.shape[1:] != (2048, 3) or data.dtype != np.float32:
                problems.append(f"{name}: data must be (N, 2048, 3) float32; got {data.shape} {data.dtype}.")
            if label.shape != (n, 1) or not np.issubdtype(label.dtype, np.integer):
                problems.append(f"{name}: label must be ({n}, 1) integers; got {label.shape} {label.dtype}.")
            elif label.min() < 0 or label.max() >= 40:
                problems.append(f"{name}: labels must lie in [0, 40); got [{label.min()}, {label.max()}].")
            if not np.isfinite(data).all():
                problems.append(f"{name}: data holds NaN or Inf values.")
            elif np.linalg.norm(data, axis=-1).max() > 1.01:
                problems.append(f"{name}: points must lie in the unit sphere; max radius {np.linalg.norm(data, axis=-1).max():.4f}.")
            if normal is not None:
                if normal.shape != data.shape:
                    problems.append(f"{name}: normal must have the shape of data; got {normal.shape}.")
                elif np.median(np.abs(np.linalg.norm(normal, axis=-1) - 1)) > 1e-3:
                    problems.append(f"{name}: normals must have unit length (median deviation above 1e-3).")
            stem = Path(name).stem  # ply_data_test0 -> ply_data_test_0_id2file.json
            digits = stem[len(stem.rstrip("0123456789")):]
            id2file = folder / f"{stem[: len(stem) - len(digits)]}_{digits}_id2file.json"
            if id2file.exists() and label.shape == (n, 1):
                entries = json.loads(id2file.read_text())
                if len(entries) != n:
                    problems.append(f"{id2file.name} has {len(entries)} entries for {n} objects.")
                else:
                    wrong = [e for e, l in zip(entries, label[:, 0]) if e.split("/")[0] != names[int(l)]]
                    if wrong:
                        problems.append(f"{id2file.name}: {len(wrong)} entries disagree with the labels, e.g. {wrong[0]}.")
        if full and total != FULL_COUNTS[split]:
            problems.append(f"the full {split} split has {FULL_COUNTS[split]} objects; found {total}.")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=None)
    parser.add_argument("--full", action="store_true", help="require the official object counts")
    args = parser.parse_args(argv)
    folder = args.folder or default_folder()
    problems = check(folder, full=args.full)
    for p in problems:
        print(f"problem: {p}")
    print(f"{folder}: {'valid' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
