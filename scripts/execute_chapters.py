#!/usr/bin/env python
"""Re-execute the book's chapters in place, keeping their metadata (used by ``make notebooks``).

Usage (from anywhere):

    python scripts/execute_chapters.py                      # every book/[0-9][0-9]_*.ipynb
    python scripts/execute_chapters.py book/02_soft_correspondences.ipynb 04
    python scripts/execute_chapters.py --timeout 1200 --list

Each notebook runs in a fresh ``python3`` kernel with the working directory ``book/``. A cell
that raises stops the run: the error is printed, the notebook on disk is left untouched, and the
script exits with status 1 after trying the remaining chapters (``--fail-fast`` stops at once).
Set ``DIFFCP_FULL_SCALE=1`` to execute the full-scale experiments.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"


def find_chapters(names: List[str]) -> List[Path]:
    """Return the chapter notebooks to run: all of ``book/NN_*.ipynb``, or those matching ``names``.

    A name is a path to a notebook, a file name in ``book/``, or a chapter number prefix ("02").
    """
    chapters = sorted(p for p in BOOK.glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return chapters
    chosen = []
    for name in names:
        path = Path(name)
        if path.suffix == ".ipynb" and path.exists():
            chosen.append(path.resolve())
            continue
        matches = [p for p in chapters if p.name == name or p.stem == name or p.name.startswith(f"{name}_")]
        if not matches and (BOOK / name).exists():
            matches = [(BOOK / name).resolve()]
        if not matches:
            raise SystemExit(f"error: no chapter notebook matches {name!r} (looked in {BOOK}).")
        chosen.extend(matches)
    return list(dict.fromkeys(chosen))


def merge_streams(outputs):
    """Consecutive outputs of one stream (stdout or stderr) merged into one, so that the page
    shows one output box for a cell that printed in several pieces (nbval compares the same)."""
    merged = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if out.get("output_type") == "stream" and prev is not None \
                and prev.get("output_type") == "stream" and prev.get("name") == out.get("name"):
            prev["text"] += out["text"]
        else:
            merged.append(out)
    return merged


def execute(path: Path, timeout: int, kernel: str) -> Optional[str]:
    """Execute one notebook in place; return None on success or the error text."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel,
        resources={"metadata": {"path": str(BOOK)}},
        allow_errors=False,
        record_timing=False,
    )
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
        return str(err)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = merge_streams(cell.outputs)
    # Keep the notebook's own metadata (kernelspec, Colab and Jupytext settings); drop
    # volatile execution metadata nbclient may add.
    nbformat.validate(nb)
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, path)
    return None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapters", nargs="*", help="notebooks, file names in book/, or chapter numbers (default: all)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default 600)")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name (default python3)")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failing chapter")
    parser.add_argument("--list", action="store_true", help="only print the chapters that would run")
    args = parser.parse_args(argv)

    chapters = find_chapters(args.chapters)
    if not chapters:
        print(f"error: no chapter notebooks found in {BOOK}.", file=sys.stderr)
        return 1
    if args.list:
        print("\n".join(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in chapters))
        return 0
    # Executed for the book: the site serves plotly.js once (book/_ext/book_fixes.py), so figures
    # do not embed it; the kernels inherit this (and nbval's do too, see the Makefile).
    os.environ["DIFFCP_PLOTLYJS"] = "site"
    failed = []
    for path in chapters:
        start = time.time()
        print(f"executing {path.name} ...", flush=True)
        error = execute(path, args.timeout, args.kernel)
        if error is None:
            print(f"  ok ({time.time() - start:.1f} s)", flush=True)
            continue
        print(f"  FAILED: {path.name}\n{error}", file=sys.stderr, flush=True)
        failed.append(path.name)
        if args.fail_fast:
            break
    if failed:
        print(f"error: {len(failed)} chapter(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
