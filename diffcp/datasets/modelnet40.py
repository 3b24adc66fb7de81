"""ModelNet40 in the official ``modelnet40_ply_hdf5_2048`` layout (PointNet's h5 release).

The layout, read here exactly as the release ships it (and as DCP, RPM-Net and PRNet read it):

- ``shape_names.txt``: the 40 class names, one a line; a label ``l`` names ``shape_names[l]``;
- ``train_files.txt`` / ``test_files.txt``: the h5 files of each split, one a line (the release
  writes paths such as ``data/modelnet40_ply_hdf5_2048/ply_data_train0.h5``; only the file name
  counts, the file is looked up next to the listing);
- each ``ply_data_*.h5`` holds ``data`` ``(N, 2048, 3)`` float32 points on the unit sphere,
  ``normal`` ``(N, 2048, 3)`` float32 unit normals and ``label`` ``(N, 1)`` integers in [0, 40).

Where the folder comes from: the ``folder`` argument, else
``$DIFFCP_DATA/modelnet40_subset/modelnet40_ply_hdf5_2048``, else
``../shared/data/modelnet40_subset/modelnet40_ply_hdf5_2048`` next to the repository (the subset
that tests and CI read; see ``data_scripts/check_modelnet40.py``). A missing folder raises
``FileNotFoundError`` naming every place that was tried.

Splits: ``"test"`` is the official test split, never used for model selection. ``"val"`` is carved
deterministically from the official train split (per class, a seeded share of its objects);
``"train"`` is the rest, and ``"trainval"`` the whole official train split.

:func:`download_modelnet40` fetches the full official zip (2468 test / 9840 train objects),
verifies it and unpacks it atomically.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "ModelNet40", "load_modelnet40", "find_folder", "default_folder", "validation_rows", "check_layout",
    "download_modelnet40", "OFFICIAL_URL", "OFFICIAL_SHA256", "LAYOUT_NAME", "SPLITS",
]

LAYOUT_NAME = "modelnet40_ply_hdf5_2048"
SUBDIR = Path("modelnet40_subset") / LAYOUT_NAME
SPLITS = ("train", "val", "trainval", "test")
#: The historical address of the official zip (PointNet's release, as DCP's ``data.py`` fetches it).
OFFICIAL_URL = "https://shapenet.cs.stanford.edu/media/modelnet40_ply_hdf5_2048.zip"
#: The zip's sha256 is not known here (no copy of the official zip was available to hash, and no
#: trusted source lists it), so it is ``None``: a download is then verified by its size (against
#: the server's Content-Length), the zip's own CRC of every member, and the layout check of the
#: unpacked folder. Pass ``sha256=`` to :func:`download_modelnet40` once the hash is known.
OFFICIAL_SHA256: Optional[str] = None

PathLike = Union[str, os.PathLike]


class ModelNet40(NamedTuple):
    """One split of ModelNet40 (numpy arrays, as stored)."""

    points: np.ndarray  # (N, 2048, 3) float32
    normals: Optional[np.ndarray]  # (N, 2048, 3) float32, or None when the files hold no 'normal'
    labels: np.ndarray  # (N,) int64 in [0, 40)
    rows: np.ndarray  # (N,) int64: index of each object in the official split (see load_modelnet40)
    shape_names: Tuple[str, ...]  # the 40 class names
    folder: Path  # where the files were read


def default_folder() -> Path:
    """``$DIFFCP_DATA/modelnet40_subset/...`` if ``DIFFCP_DATA`` is set, else ``../shared/data/...``."""
    root = os.environ.get("DIFFCP_DATA")
    if root:
        return Path(root) / SUBDIR
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / SUBDIR


def find_folder(folder: Optional[PathLike] = None) -> Path:
    """The ModelNet40 folder to read: ``folder`` if given, else :func:`default_folder`.

    Raises:
        FileNotFoundError: the folder (or its ``shape_names.txt``) does not exist; the message
            says where it looked and how to get the data.
    """
    path = Path(folder) if folder is not None else default_folder()
    if not (path / "shape_names.txt").is_file():
        how = "the folder argument" if folder is not None else (
            "$DIFFCP_DATA/modelnet40_subset/" + LAYOUT_NAME if os.environ.get("DIFFCP_DATA")
            else "../shared/data/modelnet40_subset/" + LAYOUT_NAME + " next to the repository")
        raise FileNotFoundError(
            f"No ModelNet40 folder in the official {LAYOUT_NAME} layout at {path} (from {how}); "
            "pass folder=, set DIFFCP_DATA, or fetch the full dataset with "
            "python data_scripts/download_modelnet40.py.")
    return path


def _split_files(folder: Path, split: str) -> List[Path]:
    listing = folder / f"{split}_files.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} is missing; the {LAYOUT_NAME} layout lists each split's h5 files there.")
    names = [Path(line.strip()).name for line in listing.read_text().splitlines() if line.strip()]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} is listed in {listing.name} but missing from {folder}.")
    return [folder / n for n in names]


def _official_rows(path: Path, count: int, offset: int) -> np.ndarray:
    """Index in the official split of each row of ``path``.

    A subset names, in ``<stem>_<k>_official_rows.json``, the official file ``ply_data_<split>_<k>.h5``
    and row of each of its rows; the official files hold 2048 objects each but the last, so the
    index is ``2048 k + row``. Without that file the rows are the official ones, in order.
    """
    stem = path.stem
    digits = stem[len(stem.rstrip("0123456789")):]
    listing = path.with_name(f"{stem[: len(stem) - len(digits)]}_{digits}_official_rows.json")
    if not listing.is_file():
        return np.arange(offset, offset + count, dtype=np.int64)
    entries = json.loads(listing.read_text())
    if len(entries) != count:
        raise ValueError(f"{listing.name} lists {len(entries)} rows for the {count} objects of {path.name}.")
    files = [int(re.search(r"(\d+)\.h5$", name).group(1)) for name, _ in entries]
    return np.array([2048 * k + int(row) for k, (_, row) in zip(files, entries)], dtype=np.int64)


def _read_official(folder: Path, split: str):
    import h5py

    points, normals, labels, rows = [], [], [], []
    for path in _split_files(folder, split):
        with h5py.File(path, "r") as f:
            points.append(np.asarray(f["data"][:], dtype=np.float32))
            labels.append(np.asarray(f["label"][:], dtype=np.int64).reshape(-1))
            normals.append(np.asarray(f["normal"][:], dtype=np.float32) if "normal" in f else None)
        rows.append(_official_rows(path, len(labels[-1]), sum(len(l) for l in labels[:-1])))
    if not points:
        raise ValueError(f"{split}_files.txt in {folder} lists no h5 file.")
    has_normals = all(n is not None for n in normals)
    return (np.concatenate(points), np.concatenate(normals) if has_normals else None, np.concatenate(labels),
            np.concatenate(rows))


def validation_rows(labels: np.ndarray, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """Rows of the official train split held out for validation, sorted.

    Per class, ``round(fraction * n)`` of its ``n`` objects (at least one when ``n >= 2``), drawn
    with ``numpy.random.default_rng(seed)``: the same labels, fraction and seed always give the
    same rows, and every class with two or more objects is seen in both parts.

    Args:
        labels: ``(N,)`` integer labels of the official train split.
        fraction: share held out, in ``[0, 1)``.
        seed: seed of the draw.

    Example:
        >>> validation_rows(np.array([0, 0, 0, 0, 1, 1, 2]), fraction=0.25).tolist()
        [2, 5]
    """
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"fraction must lie in [0, 1); got {fraction!r}.")
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        count = int(round(fraction * len(rows)))
        if fraction > 0 and count == 0 and len(rows) >= 2:
            count = 1
        held.append(rng.permutation(rows)[:count])
    return np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)


def load_modelnet40(split: str = "test", folder: Optional[PathLike] = None, *, labels: Optional[Sequence[int]] = None,
                    val_fraction: float = 0.1, val_seed: int = 0) -> ModelNet40:
    """Read one split of ModelNet40 from the official h5 layout.

    Args:
        split: ``"train"`` (official train minus validation), ``"val"`` (see
            :func:`validation_rows`), ``"trainval"`` (the whole official train split) or
            ``"test"`` (the official test split).
        folder: the ``modelnet40_ply_hdf5_2048`` folder; None for :func:`default_folder`.
        labels: keep only objects with these labels (e.g. ``range(20)`` to train on the first 20
            categories); None keeps all. Applied after the validation split is carved, so the
            validation rows do not depend on it.
        val_fraction, val_seed: the validation split's share per class and seed.

    Returns:
        :class:`ModelNet40` with points ``(N, 2048, 3)``, normals or None, labels ``(N,)`` and
        ``rows``: each object's index in the official split (the official files concatenated in
        order: what DCP's test seeds ``np.random.seed(item)`` refer to). A subset such as the one
        in ``../shared/data`` names it in ``*_official_rows.json``; without that file an object's
        row is its position in the files.

    Raises:
        FileNotFoundError: no folder in the official layout (see :func:`find_folder`).
        ValueError: an unknown split.

    Example:
        >>> data = load_modelnet40("test")                          # doctest: +SKIP
        >>> data.points.shape[1:], data.shape_names[0]              # doctest: +SKIP
        ((2048, 3), 'airplane')
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}; got {split!r}.")
    path = find_folder(folder)
    names = tuple(n.strip() for n in (path / "shape_names.txt").read_text().splitlines() if n.strip())
    points, normals, label, official = _read_official(path, "test" if split == "test" else "train")
    rows = np.arange(len(label), dtype=np.int64)
    if split in ("train", "val"):
        held = np.zeros(len(label), dtype=bool)
        held[validation_rows(label, val_fraction, val_seed)] = True
        rows = rows[held] if split == "val" else rows[~held]
    if labels is not None:
        rows = rows[np.isin(label[rows], np.asarray(list(labels), dtype=np.int64))]
    return ModelNet40(points[rows], None if normals is None else normals[rows], label[rows], official[rows], names, path)


def check_layout(folder: PathLike) -> List[str]:
    """Problems that make ``folder`` unusable as the official layout (an empty list: usable).

    Checked: 40 class names; both split listings exist and every listed h5 exists and holds
    ``data`` ``(N, 2048, 3)`` and ``label`` ``(N, 1)`` in [0, 40). (``data_scripts/check_modelnet40.py``
    checks more, e.g. coordinates and normals.)
    """
    import h5py

    folder = Path(folder)
    names_file = folder / "shape_names.txt"
    if not names_file.is_file():
        return [f"{names_file} is missing."]
    problems = []
    if len([n for n in names_file.read_text().splitlines() if n.strip()]) != 40:
        problems.append("shape_names.txt must list 40 class names.")
    for split in ("train", "test"):
        try:
            files = _split_files(folder, split)
        except FileNotFoundError as err:
            problems.append(str(err))
            continue
        if not files:
            problems.append(f"{split}_files.txt lists no h5 file.")
        for path in files:
            try:
                with h5py.File(path, "r") as f:
                    shape, label = f["data"].shape, f["label"][:]
            except (OSError, KeyError) as err:
                problems.append(f"{path.name} is not a readable h5 file with 'data' and 'label': {err}.")
                continue
            if len(shape) != 3 or shape[1:] != (2048, 3) or label.shape != (shape[0], 1):
                problems.append(f"{path.name}: data must be (N, 2048, 3) and label (N, 1); got {shape} and {label.shape}.")
            elif label.size and (label.min() < 0 or label.max() >= 40):
                problems.append(f"{path.name}: labels must lie in [0, 40).")
    return problems


def _fetch(url: str, destination: Path, timeout: float) -> Tuple[int, Optional[int], str]:
    """Stream ``url`` into ``destination``; return (bytes read, Content-Length or None, sha256)."""
    digest, size = hashlib.sha256(), 0
    with urllib.request.urlopen(url, timeout=timeout) as response, open(destination, "wb") as out:
        declared = response.headers.get("Content-Length")
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return size, (int(declared) if declared is not None else None), digest.hexdigest()


def _verify_zip(path: Path, size: int, declared: Optional[int], digest: str, expected_size: Optional[int],
                sha256: Optional[str]) -> Optional[str]:
    """Why the downloaded zip is unusable, or None when it passes every check."""
    if declared is not None and size != declared:
        return f"received {size} bytes but the server announced {declared} (a partial download)"
    if expected_size is not None and size != expected_size:
        return f"received {size} bytes; expected {expected_size}"
    if sha256 is not None and digest != sha256.lower():
        return f"sha256 {digest} differs from the expected {sha256.lower()}"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as err:
        return f"not a valid zip file ({type(err).__name__}: {err})"
    if bad is not None:
        return f"zip member {bad} fails its CRC check (a corrupt download)"
    if f"{LAYOUT_NAME}/shape_names.txt" not in names:
        return f"the zip does not hold {LAYOUT_NAME}/shape_names.txt"
    return None


def _unpack(archive_path: Path, root: Path) -> Path:
    """Unpack into a temporary folder inside ``root``, check the layout, move it into place."""
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
    try:
        with zipfile.ZipFile(archive_path) as archive:
            for member in archive.namelist():  # refuse paths that would leave the staging folder
                target = (staging / member).resolve()
                if staging.resolve() not in target.parents and target != staging.resolve():
                    raise ValueError(f"the zip holds a path outside its folder: {member!r}.")
            archive.extractall(staging)
        problems = check_layout(staging / LAYOUT_NAME)
        if problems:
            raise ValueError("the unpacked folder is not in the official layout: " + "; ".join(problems[:3]))
        destination = root / LAYOUT_NAME
        if destination.exists():  # an earlier, broken copy (a valid one returned before downloading)
            shutil.rmtree(destination)
        os.replace(staging / LAYOUT_NAME, destination)  # atomic within one file system
        return destination
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_modelnet40(root: PathLike, *, url: str = OFFICIAL_URL, sha256: Optional[str] = OFFICIAL_SHA256,
                        size: Optional[int] = None, attempts: int = 3, timeout: float = 60.0,
                        force: bool = False) -> Path:
    """Download the official zip into ``root`` and unpack ``root/modelnet40_ply_hdf5_2048``.

    The zip goes to a temporary file in ``root`` and is verified before anything is unpacked:
    its byte count against the server's Content-Length (a partial download) and ``size`` if
    given, its sha256 if ``sha256`` is given (:data:`OFFICIAL_SHA256` is None: unknown), the CRC
    of every member, and the presence of the layout's ``shape_names.txt``. It is then unpacked
    into a temporary folder, the folder is checked by :func:`check_layout`, and moved into place
    with one ``os.replace``: ``root/modelnet40_ply_hdf5_2048`` is either absent or complete. A
    download that fails a check is deleted and fetched again, up to ``attempts`` times.

    Args:
        root: the folder to hold ``modelnet40_ply_hdf5_2048`` (created if needed).
        url: where to fetch the zip.
        sha256: expected hex digest of the zip, or None to skip that check.
        size: expected byte count of the zip, or None.
        attempts: downloads tried before giving up.
        timeout: seconds a connection may stall.
        force: download even when a folder passing :func:`check_layout` is already there (a
            folder failing it is always replaced).

    Returns:
        The path of the unpacked ``modelnet40_ply_hdf5_2048`` folder.

    Raises:
        RuntimeError: every attempt failed; the message lists why each one did.
    """
    if not isinstance(attempts, int) or attempts < 1:
        raise ValueError(f"attempts must be a positive integer; got {attempts!r}.")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    destination = root / LAYOUT_NAME
    if not force and destination.is_dir() and not check_layout(destination):
        return destination
    failures = []
    for attempt in range(1, attempts + 1):
        fd, name = tempfile.mkstemp(prefix=".download-", suffix=".zip", dir=root)
        os.close(fd)
        archive_path = Path(name)
        try:
            try:
                received, declared, digest = _fetch(url, archive_path, timeout)
                problem = _verify_zip(archive_path, received, declared, digest, size, sha256)
            except (OSError, http.client.HTTPException, urllib.error.URLError) as err:
                problem = f"the download failed ({type(err).__name__}: {err})"
            if problem is None:
                try:
                    return _unpack(archive_path, root)
                except (ValueError, OSError, zipfile.BadZipFile) as err:
                    problem = str(err)
            failures.append(f"attempt {attempt}: {problem}")
        finally:
            archive_path.unlink(missing_ok=True)
    raise RuntimeError(f"Could not download ModelNet40 from {url} into {root}: " + "; ".join(failures) + ".")
