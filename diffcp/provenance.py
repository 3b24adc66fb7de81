"""Provenance records for benchmark and experiment results.

Every number the book prints from a stored result carries a record of where it came from: the git
commit (and whether the tree had uncommitted changes), the machine (CPU, cores, memory, GPU), the
software versions, the UTC date and, optionally, how long the run took. ``write_result`` stores a
result as JSON with that record under the key ``"provenance"`` and replaces files atomically.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Mapping, Optional, Sequence, Union

__all__ = ["provenance", "write_result", "atomic_write"]

_REPO_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", *args], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _ram_bytes() -> Optional[int]:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _cpu_count() -> Optional[int]:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def provenance(command: Optional[Union[str, Sequence[str]]] = None, started: Optional[float] = None) -> Dict[str, Any]:
    """Describe the code, machine and software that produced a result.

    Args:
        command: the command line that produced the result, as a string or an argument list
            (stored as a string); ``None`` to omit it.
        started: a ``time.time()`` value taken when the run began; if given, the record holds
            ``duration_s``, the seconds elapsed since then.

    Returns:
        A JSON-serialisable dict with keys ``git`` (``commit``, ``dirty``; ``None`` outside a git
        checkout), ``machine`` (``cpu``, ``cores``, ``ram_gb``, ``gpu``, ``os``), ``versions``
        (``python``, ``torch``, ``diffcp``, ``numpy``), ``date_utc`` (ISO 8601), and optionally
        ``command`` and ``duration_s``.

    Example:
        >>> record = provenance(command="python bench.py", started=time.time())
        >>> sorted(record)[:3]
        ['command', 'date_utc', 'duration_s']
    """
    if command is not None and not isinstance(command, str):
        if not isinstance(command, Sequence) or not all(isinstance(c, str) for c in command):
            raise TypeError(f"command must be a string or a sequence of strings; got {type(command).__name__}.")
        command = " ".join(command)
    if started is not None and not isinstance(started, (int, float)):
        raise TypeError(f"started must be a time.time() value (a number); got {type(started).__name__}.")

    import numpy
    import torch

    import diffcp

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    ram = _ram_bytes()
    record: Dict[str, Any] = {
        "git": {
            "commit": commit,
            "dirty": (bool(status) if status is not None else None),
            # which tracked files differed from the commit (a changed chapter is not a changed library)
            "dirty_paths": [line.split(None, 1)[-1] for line in status.splitlines()][:50] if status else [],
        },
        "machine": {
            "cpu": _cpu_model(),
            "cores": _cpu_count(),
            "ram_gb": round(ram / 2**30, 1) if ram else None,
            "gpu": gpu,
            "os": platform.platform(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffcp": getattr(diffcp, "__version__", None) or _package_version("diffcp-icp"),
            "numpy": numpy.__version__,
        },
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if command is not None:
        record["command"] = command
    if started is not None:
        record["duration_s"] = round(time.time() - float(started), 3)
    return record


def _package_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def write_result(path: Union[str, os.PathLike], data: Mapping[str, Any], command: Optional[Union[str, Sequence[str]]] = None,
                 started: Optional[float] = None) -> Path:
    """Write ``data`` as JSON to ``path`` with a ``"provenance"`` key, atomically.

    The JSON is written to a temporary file in the same folder and moved over ``path`` with
    ``os.replace``, so a crash never leaves a half-written file and readers see either the old or
    the new result. An existing file is only replaced by a result holding at least its top-level
    keys: losing data silently is refused with ``ValueError`` (delete the file first to shrink it).

    Args:
        path: destination ``.json`` file; its folder is created if needed.
        data: a mapping of JSON-serialisable values; it must not have a ``"provenance"`` key.
        command: the command line that produced the result (see :func:`provenance`).
        started: ``time.time()`` at the start of the run, to record its duration.

    Returns:
        The path written, as a ``pathlib.Path``.

    Example:
        >>> import tempfile, os
        >>> p = write_result(os.path.join(tempfile.mkdtemp(), "r.json"), {"rmse": 0.5}, "demo")
        >>> json.loads(p.read_text())["rmse"]
        0.5
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"data must be a mapping (a dict) of JSON-serialisable values; got {type(data).__name__}.")
    if "provenance" in data:
        raise ValueError("data must not contain a 'provenance' key; write_result adds it.")
    path = Path(path)
    payload = dict(data)
    payload["provenance"] = provenance(command=command, started=started)
    try:
        text = json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"data must be JSON-serialisable without NaN or Inf; {err}.") from err

    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict):
            missing = sorted(set(old) - set(payload))
            if missing:
                raise ValueError(
                    f"path {str(path)!r} already holds a result with keys {missing} that the new data lacks; "
                    "refusing to overwrite it with less data (delete the file first)."
                )
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write(path: Union[str, os.PathLike], write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then move it over ``path``
    (``os.replace``): readers see the old file or the new one, never half of one, and a failure
    leaves the old file as it was. Used for results and training checkpoints alike.

    Example:
        >>> import tempfile, os
        >>> p = atomic_write(os.path.join(tempfile.mkdtemp(), "x.bin"), lambda f: f.write(b"ok"))
        >>> p.read_bytes()
        b'ok'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
