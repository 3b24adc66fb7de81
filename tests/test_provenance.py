"""Tests of diffcp.provenance: the record's content and write_result's atomic, safe writes."""

import datetime as dt
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import pytest
import torch

from diffcp.provenance import provenance, write_result

ROOT = Path(__file__).resolve().parent.parent


def _git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_record_matches_independent_sources():
    rec = provenance()
    assert rec["git"]["commit"] == _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    assert rec["git"]["dirty"] == bool(status)
    # the changed tracked files are named (a changed chapter is not a changed library)
    expected = [line.split(None, 1)[-1] for line in status.splitlines()][:50] if status else []
    assert rec["git"]["dirty_paths"] == expected
    assert not any(p.startswith((" ", "M ", "?")) for p in rec["git"]["dirty_paths"])
    m = rec["machine"]
    assert m["cores"] == len(os.sched_getaffinity(0))
    with open("/proc/cpuinfo") as f:
        models = {line.split(":", 1)[1].strip() for line in f if line.startswith("model name")}
    assert m["cpu"] in models
    with open("/proc/meminfo") as f:
        kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    assert abs(m["ram_gb"] - kb / 2**20) < 0.2
    assert m["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    assert m["os"] == platform.platform()
    v = rec["versions"]
    assert v["python"] == platform.python_version() and v["torch"] == torch.__version__
    assert v["diffcp"] == "0.1.0"
    date = dt.datetime.fromisoformat(rec["date_utc"])
    assert date.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - date).total_seconds()) < 60
    assert "command" not in rec and "duration_s" not in rec
    json.dumps(rec)  # serialisable


def test_command_and_duration():
    rec = provenance(command=["python", "bench.py", "--n", "4"], started=time.time() - 2.5)
    assert rec["command"] == "python bench.py --n 4"
    assert 2.5 <= rec["duration_s"] < 10
    assert provenance(command="make all")["command"] == "make all"


def test_bad_arguments():
    with pytest.raises(TypeError, match="command"):
        provenance(command=3)
    with pytest.raises(TypeError, match="started"):
        provenance(started="now")
    with pytest.raises(TypeError, match="data"):
        write_result("x.json", [1, 2], "cmd")


def test_write_result_roundtrip_and_no_temp_left(tmp_path):
    path = tmp_path / "sub" / "result.json"
    out = write_result(path, {"rmse": 0.25, "rows": [1, 2]}, command="python run.py", started=time.time())
    assert out == path
    data = json.loads(path.read_text())
    assert data["rmse"] == 0.25 and data["rows"] == [1, 2]
    assert data["provenance"]["command"] == "python run.py"
    assert data["provenance"]["duration_s"] >= 0
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


def test_refuses_to_lose_data_and_keeps_old_file(tmp_path):
    path = tmp_path / "r.json"
    write_result(path, {"a": 1, "b": 2}, "first")
    before = path.read_text()
    with pytest.raises(ValueError, match="'b'"):
        write_result(path, {"a": 3}, "second")
    assert path.read_text() == before
    write_result(path, {"a": 3, "b": 4, "c": 5}, "third")  # a superset replaces it
    assert json.loads(path.read_text())["c"] == 5
    assert len(list(tmp_path.iterdir())) == 1


def test_failed_serialisation_leaves_old_file(tmp_path):
    path = tmp_path / "r.json"
    write_result(path, {"a": 1}, "first")
    before = path.read_text()
    with pytest.raises(ValueError, match="JSON"):
        write_result(path, {"a": float("nan")}, "second")
    with pytest.raises(ValueError, match="provenance"):
        write_result(path, {"a": 1, "provenance": {}}, "third")
    assert path.read_text() == before
    assert len(list(tmp_path.iterdir())) == 1


def test_replace_is_atomic(tmp_path, monkeypatch):
    """A crash during the write leaves the old file intact and no temporary file behind."""
    path = tmp_path / "r.json"
    write_result(path, {"a": 1}, "first")
    before = path.read_text()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_result(path, {"a": 2}, "second")
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
