"""diffcp.datasets.modelnet40: reading the official layout, the splits, and the verified download."""

import hashlib
import http.server
import importlib.util
import io
import threading
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from diffcp.datasets import modelnet40 as mn

ROOT = Path(__file__).resolve().parents[1]
FOLDER = mn.default_folder()
needs_data = pytest.mark.skipif(not FOLDER.exists(), reason=f"the ModelNet40 subset is not at {FOLDER}")


# ---------------------------------------------------------------- reading the subset
@needs_data
def test_subset_splits_have_the_documented_sizes_and_shapes():
    test = mn.load_modelnet40("test")
    assert test.points.shape == (128, 2048, 3) and test.points.dtype == np.float32
    assert test.normals.shape == (128, 2048, 3)
    assert (test.labels == 0).sum() == 100 and test.shape_names[0] == "airplane"
    trainval = mn.load_modelnet40("trainval")
    assert len(trainval.labels) == 744


@needs_data
def test_official_rows_come_from_the_listing():
    test = mn.load_modelnet40("test")
    assert test.rows[:3].tolist() == [1, 11, 23]  # ply_data_test_0_official_rows.json
    assert len(np.unique(test.rows)) == 128 and test.rows.max() < 2468


@needs_data
def test_validation_is_carved_from_train_deterministically_and_disjointly():
    train, val, trainval = (mn.load_modelnet40(s) for s in ("train", "val", "trainval"))
    assert len(train.labels) + len(val.labels) == len(trainval.labels)
    assert not set(train.rows) & set(val.rows)
    assert set(train.rows) | set(val.rows) == set(trainval.rows)
    again = mn.load_modelnet40("val")
    assert np.array_equal(again.rows, val.rows) and np.array_equal(again.points, val.points)
    assert 0.08 < len(val.labels) / len(trainval.labels) < 0.14
    other = mn.load_modelnet40("val", val_seed=1)
    assert not np.array_equal(other.rows, val.rows)


@needs_data
def test_label_filter_keeps_only_the_named_categories():
    seen = mn.load_modelnet40("test", labels=range(20, 40))
    assert len(seen.labels) == 14 and (seen.labels >= 20).all()


def test_validation_rows_cover_every_class_with_two_objects():
    labels = np.repeat(np.arange(5), [1, 2, 10, 30, 7])
    rows = mn.validation_rows(labels, 0.1, seed=3)
    assert np.array_equal(rows, mn.validation_rows(labels, 0.1, seed=3))
    held = labels[rows]
    assert 0 not in held and set(held) == {1, 2, 3, 4}
    assert (held == 3).sum() == 3
    with pytest.raises(ValueError, match="fraction must lie in"):
        mn.validation_rows(labels, 1.0)


def test_missing_folder_raises_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pass folder=, set DIFFCP_DATA"):
        mn.load_modelnet40("test", tmp_path / "nowhere")
    monkeypatch.setenv("DIFFCP_DATA", str(tmp_path))
    assert mn.default_folder() == tmp_path / "modelnet40_subset" / "modelnet40_ply_hdf5_2048"
    with pytest.raises(FileNotFoundError, match=r"\$DIFFCP_DATA"):
        mn.load_modelnet40("test")
    with pytest.raises(ValueError, match="split must be one of"):
        mn.load_modelnet40("validation", tmp_path)


# ---------------------------------------------------------------- the download
def _layout_zip(objects=3) -> bytes:
    """A small zip in the official layout (random points on the unit sphere)."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        top = "modelnet40_ply_hdf5_2048/"
        archive.writestr(top + "shape_names.txt", "\n".join(f"class{i}" for i in range(40)) + "\n")
        for split in ("train", "test"):
            archive.writestr(top + f"{split}_files.txt", f"data/modelnet40_ply_hdf5_2048/ply_data_{split}0.h5\n")
            points = rng.normal(size=(objects, 2048, 3)).astype(np.float32)
            points /= np.linalg.norm(points, axis=-1, keepdims=True)
            h5 = io.BytesIO()
            with h5py.File(h5, "w") as f:
                f["data"], f["normal"] = points, points
                f["label"] = rng.integers(0, 40, size=(objects, 1)).astype(np.uint8)
            archive.writestr(top + f"ply_data_{split}0.h5", h5.getvalue())
    return buffer.getvalue()


GOOD = _layout_zip()
CORRUPT = GOOD[: len(GOOD) // 3] + bytes(b ^ 0xFF for b in GOOD[len(GOOD) // 3: len(GOOD) // 3 + 64]) + GOOD[len(GOOD) // 3 + 64:]


class _Handler(http.server.BaseHTTPRequestHandler):
    requests = {}

    def do_GET(self):  # noqa: N802 (the http.server API)
        count = self.requests[self.path] = self.requests.get(self.path, 0) + 1
        body, announced = {
            "/good.zip": (GOOD, len(GOOD)),
            "/corrupt.zip": (CORRUPT, len(CORRUPT)),
            "/short.zip": (GOOD[: len(GOOD) // 2], len(GOOD) // 2),  # truncated file, consistent header
            "/cut.zip": (GOOD[: len(GOOD) // 2], len(GOOD)),  # connection cut mid-transfer
            "/flaky.zip": (CORRUPT if count == 1 else GOOD, len(GOOD)),
        }.get(self.path, (b"", 0))
        if not announced:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _leftovers(root):
    return sorted(p.name for p in Path(root).iterdir() if p.name.startswith("."))


def test_good_zip_is_verified_unpacked_and_readable(server, tmp_path):
    folder = mn.download_modelnet40(tmp_path, url=server + "/good.zip", sha256=hashlib.sha256(GOOD).hexdigest())
    assert folder == tmp_path / "modelnet40_ply_hdf5_2048" and mn.check_layout(folder) == []
    assert mn.load_modelnet40("test", folder).points.shape == (3, 2048, 3)
    assert _leftovers(tmp_path) == []
    before = _Handler.requests.get("/good.zip")
    assert mn.download_modelnet40(tmp_path, url=server + "/good.zip") == folder  # valid: not fetched again
    assert _Handler.requests.get("/good.zip") == before


@pytest.mark.parametrize("path,reason", [
    ("/corrupt.zip", "CRC|not a valid zip"),
    ("/short.zip", "not a valid zip"),
    ("/cut.zip", "partial download|download failed"),
])
def test_broken_downloads_are_detected_removed_and_retried(server, tmp_path, path, reason):
    _Handler.requests.pop(path, None)
    with pytest.raises(RuntimeError, match=reason) as info:
        mn.download_modelnet40(tmp_path, url=server + path, attempts=2)
    assert "attempt 1" in str(info.value) and "attempt 2" in str(info.value)
    assert _Handler.requests[path] == 2
    assert not (tmp_path / "modelnet40_ply_hdf5_2048").exists() and _leftovers(tmp_path) == []


def test_wrong_sha256_is_refused(server, tmp_path):
    with pytest.raises(RuntimeError, match="sha256"):
        mn.download_modelnet40(tmp_path, url=server + "/good.zip", sha256="0" * 64, attempts=1)
    assert not (tmp_path / "modelnet40_ply_hdf5_2048").exists()


def test_a_corrupt_first_download_is_fetched_again(server, tmp_path):
    _Handler.requests.pop("/flaky.zip", None)
    folder = mn.download_modelnet40(tmp_path, url=server + "/flaky.zip", attempts=3)
    assert _Handler.requests["/flaky.zip"] == 2 and mn.check_layout(folder) == []
    assert _leftovers(tmp_path) == []


def test_a_broken_folder_is_replaced(server, tmp_path):
    (tmp_path / "modelnet40_ply_hdf5_2048").mkdir()
    (tmp_path / "modelnet40_ply_hdf5_2048" / "shape_names.txt").write_text("only one\n")
    folder = mn.download_modelnet40(tmp_path, url=server + "/good.zip")
    assert mn.check_layout(folder) == []


def test_command_line_wrapper(server, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("download_modelnet40", ROOT / "data_scripts" / "download_modelnet40.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(tmp_path), "--url", server + "/good.zip"]) == 0
    assert "ready" in capsys.readouterr().out
    assert cli.main([str(tmp_path / "b"), "--url", server + "/corrupt.zip", "--attempts", "1"]) == 1
