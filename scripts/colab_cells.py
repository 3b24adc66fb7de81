#!/usr/bin/env python
"""Write (or check) the first code cell of every chapter: what it installs on Google Colab.

Usage:

    python scripts/colab_cells.py           # rewrite the install cell of every chapter
    python scripts/colab_cells.py --check   # exit 1 if a chapter's cell is not the generated one
    python scripts/colab_cells.py --needs   # print, per chapter, what its cell installs

On Colab (and only there) a chapter's install cell clones the repository at the book's release
and installs, from that clone, the library and exactly the packages the chapter imports that
Colab does not preinstall; then it moves to the clone's ``book/`` folder, so that the chapter
reads the same files (results of record, benchmark scripts) as on the machine that built the page.

One setting: the repository URL and the reference are ``repository.url`` and
``repository.branch`` of ``_config.yml``, which the book's launch buttons use too. The reference
is the release tag ``v<version>`` of ``pyproject.toml`` (``tests/test_colab.py`` checks that).

``tests/test_colab.py`` builds a fresh virtual environment holding only :data:`COLAB_PREINSTALLED`
and what one cell installs, and runs the chapters there without ``../shared``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
CLONE = "/content/diffcp"

# What Colab preinstalls that the chapters use, from googlecolab/backend-info, pip-freeze.txt at
# commit a72407924822ea377410b69f0a290150bcb5c9c2 (2026-08-19, "Upgrade to Python 3.13"):
# torch 2.11.0+cpu (CUDA builds on GPU runtimes), numpy 2.1.3, scipy 1.16.3, numba 0.61.2,
# matplotlib 3.10.0, plotly 5.24.1, h5py 3.16.0, tqdm 4.67.3, PyYAML 6.0.3, IPython 7.34.0,
# ipykernel 6.17.1, nbformat 5.11.1, nbclient 0.10.4 (and some 600 more not listed here).
COLAB_PREINSTALLED = (
    "torch", "numpy", "scipy", "numba", "matplotlib", "plotly", "h5py", "tqdm", "pyyaml",
    "ipython", "ipykernel", "nbformat", "nbclient",
)

# Third-party imports of the chapters that Colab does not have, by the distribution that
# provides them. A chapter importing a module listed in neither place is an error.
DISTRIBUTION_OF = {"open3d": "open3d-cpu", "trimesh": "trimesh", "anny": "anny"}
PREINSTALLED_MODULES = {"torch", "numpy", "scipy", "numba", "matplotlib", "plotly", "h5py", "tqdm",
                        "yaml", "IPython", "ipykernel", "nbformat", "nbclient", "diffcp"}
# Parts of diffcp that import an optional package when used.
NEEDS_OF_SUBMODULE = {"diffcp.bodies": ["anny"]}

IMPORT = re.compile(r"^\s*(?:import\s+([\w.]+)|from\s+([\w.]+)\s+import)", re.M)


def repository() -> Dict[str, str]:
    """``{"url": ..., "branch": ...}`` of ``_config.yml``'s repository section."""
    import yaml

    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]


def chapter_needs(nb) -> List[str]:
    """The distributions beyond Colab's that the chapter's code cells import (sorted)."""
    needs = set()
    for cell in nb.cells[2:]:                     # after the install and setup cells
        if cell.cell_type != "code":
            continue
        for match in IMPORT.finditer(cell.source):
            module = match.group(1) or match.group(2)
            top = module.split(".")[0]
            for prefix, extra in NEEDS_OF_SUBMODULE.items():
                if module == prefix or module.startswith(prefix + "."):
                    needs.update(DISTRIBUTION_OF[e] for e in extra)
            if top in DISTRIBUTION_OF:
                needs.add(DISTRIBUTION_OF[top])
            elif top not in PREINSTALLED_MODULES and top not in sys.stdlib_module_names:
                raise ValueError(f"a chapter imports {module!r}, which is neither preinstalled on "
                                 "Colab nor in DISTRIBUTION_OF of scripts/colab_cells.py.")
    return sorted(needs)


def install_cell(needs: List[str], url: str, ref: str) -> str:
    """The source of a chapter's first code cell."""
    return f'''\
# Colab only (elsewhere this cell does nothing): fetch the book's code at the release this page
# was built from, install diffcp and what this chapter needs beyond Colab's own packages.
import os, subprocess, sys
REPO, REF, NEEDS = "{url}", "{ref}", {needs!r}
if "google.colab" in sys.modules:
    if not os.path.isdir("{CLONE}"):
        subprocess.run(["git", "clone", "-q", "--depth", "1", "--branch", REF, REPO,
                        "{CLONE}"], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "{CLONE}", *NEEDS],
                       check=True)
    os.chdir("{CLONE}/book")'''


def chapters() -> List[Path]:
    return sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))


def sync(check: bool) -> int:
    """Rewrite (or compare) every chapter's install cell; return the number that differ."""
    import nbformat

    repo, differ = repository(), 0
    for path in chapters():
        nb = nbformat.read(path, as_version=4)
        cell = nb.cells[1]
        if cell.cell_type != "code" or "google.colab" not in cell.source:
            raise SystemExit(f"error: the second cell of {path.name} is not its Colab install cell.")
        wanted = install_cell(chapter_needs(nb), repo["url"], repo["branch"])
        tags = cell.metadata.get("tags", [])
        setup_tags = nb.cells[2].metadata.get("tags", [])
        if cell.source == wanted and "hide-input" in tags and "hide-input" in setup_tags:
            continue
        differ += 1
        print(f"{path.name}: install cell {'differs' if check else 'rewritten'}")
        if not check:
            cell.source = wanted
            for c in nb.cells[1:3]:
                c.metadata["tags"] = sorted(set(c.metadata.get("tags", [])) | {"hide-input"})
            nbformat.write(nb, path)
    return differ


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    parser.add_argument("--needs", action="store_true", help="print what each chapter installs")
    args = parser.parse_args(argv)
    if args.needs:
        import nbformat

        for path in chapters():
            print(path.name, chapter_needs(nbformat.read(path, as_version=4)))
        return 0
    differ = sync(check=args.check)
    return 1 if (args.check and differ) else 0


if __name__ == "__main__":
    sys.exit(main())
