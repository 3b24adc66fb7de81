"""data_scripts/check_modelnet40.py accepts the real ModelNet40 subset and rejects broken copies."""

import importlib.util
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_modelnet40", ROOT / "data_scripts" / "check_modelnet40.py")
checker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checker)

FOLDER = checker.default_folder()
needs_data = pytest.mark.skipif(not FOLDER.exists(), reason=f"the ModelNet40 subset is not at {FOLDER}")


@needs_data
def test_real_subset_is_valid_but_not_full():
    assert checker.check(FOLDER) == []
    problems = checker.check(FOLDER, full=True)
    assert any("the full test split has 2468 objects" in p for p in problems)


@needs_data
@pytest.mark.parametrize("damage,expected", [
    ("labels", "labels must lie in [0, 40)"),
    ("nan", "NaN or Inf"),
    ("shape", "data must be (N, 2048, 3)"),
    ("missing", "is listed in test_files.txt but missing"),
])
def test_broken_copies_are_rejected(tmp_path, damage, expected):
    copy = tmp_path / "mn40"
    copy.mkdir()
    for name in ("shape_names.txt", "train_files.txt", "test_files.txt", "ply_data_test_0_id2file.json"):
        shutil.copy(FOLDER / name, copy / name)
    (copy / "train_files.txt").write_text("")  # only the test split in this copy
    with h5py.File(FOLDER / "ply_data_test0.h5", "r") as f:
        data, label = f["data"][:8], f["label"][:8]
    if damage == "labels":
        label = label.copy()
        label[0, 0] = 41
    if damage == "nan":
        data = data.copy()
        data[0, 0, 0] = np.nan
    if damage == "shape":
        data = data[:, :1024]
    if damage != "missing":
        with h5py.File(copy / "ply_data_test0.h5", "w") as f:
            f["data"], f["label"] = data, label
    problems = checker.check(copy)
    assert any(expected in p for p in problems), problems
    assert checker.main([str(copy)]) == 1
