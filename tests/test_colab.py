"""The chapters as a Colab reader runs them.

Static checks (always): every chapter's first code cell is the one ``scripts/colab_cells.py``
generates from ``_config.yml`` (one repository URL, one pinned reference, shared with the launch
buttons), collapsed, and it installs what the chapter imports.

The Colab check (``DIFFCP_COLAB_TEST=1``, set by ``make test``; skipped and reported as skipped
otherwise) builds fresh virtual environments holding only what Colab preinstalls
(``COLAB_PREINSTALLED``, at this machine's versions) plus what one chapter's cell installs
(the library from a copy of this working tree, and the cell's ``NEEDS``), copies the working
tree where no ``../shared`` is beside it, and executes each chapter there: everything a chapter
needs must come from its cell, and its fallbacks must work without the shared data and weights.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import colab_cells  # noqa: E402

sys.path.pop(0)
nbformat = pytest.importorskip("nbformat")
COLAB_REQUIRED = os.environ.get("DIFFCP_COLAB_TEST") == "1"
CHAPTERS = colab_cells.chapters()


def _needs_of_cell(source):
    """The NEEDS list written in an install cell."""
    match = re.search(r"^REPO, REF, NEEDS = (.+)$", source, flags=re.M)
    assert match, "the install cell has no 'REPO, REF, NEEDS = ...' line"
    return ast.literal_eval(match.group(1))[2]


def test_install_cells_are_generated_from_the_one_setting():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "colab_cells.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_reference_is_the_release_tag_of_the_package():
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    repo = colab_cells.repository()
    assert repo["branch"] == f"v{version}"
    for path in CHAPTERS:
        text = path.read_text()
        assert "raw.githubusercontent.com" not in text and "@main" not in text, path.name


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem[:2])
def test_each_cell_installs_what_its_chapter_imports(path):
    nb = nbformat.read(path, as_version=4)
    needs = _needs_of_cell(nb.cells[1].source)
    assert needs == colab_cells.chapter_needs(nb)
    assert set(needs) <= set(colab_cells.DISTRIBUTION_OF.values())
    assert "hide-input" in nb.cells[1].metadata.get("tags", [])
    assert "hide-input" in nb.cells[2].metadata.get("tags", [])


def test_chapter_needs_rejects_an_unknown_import():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell(""),
                nbformat.v4.new_code_cell(""), nbformat.v4.new_code_cell("import pytorch3d.ops")]
    with pytest.raises(ValueError, match="pytorch3d"):
        colab_cells.chapter_needs(nb)
    nb.cells[3].source = "from diffcp.bodies import load_body\nimport trimesh"
    assert colab_cells.chapter_needs(nb) == ["anny", "trimesh"]


# --------------------------------------------------------------------------- the Colab run


def _pinned(dist):
    """``dist==version`` at this machine's version (local labels such as +cpu dropped)."""
    try:
        return f"{dist}=={metadata.version(dist).split('+')[0]}"
    except metadata.PackageNotFoundError:
        return dist


def _pip(python, *args):
    cmd = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


def _copy_tree(dest):
    """The working tree (tracked and untracked, not ignored files) copied to ``dest``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def colab(tmp_path_factory):
    """``(tree, python_for)``: a copy of the working tree without ``../shared`` beside it, and a
    function giving the interpreter of a fresh environment for a list of NEEDS."""
    if not COLAB_REQUIRED:
        pytest.skip("the Colab check runs with DIFFCP_COLAB_TEST=1 (make test sets it)")
    base = tmp_path_factory.mktemp("colab")
    tree = base / "content" / "diffcp"
    _copy_tree(tree)
    assert not (tree.parent / "shared").exists()
    envs = {}

    def python_for(needs):
        key = tuple(needs)
        if key not in envs:
            env = base / f"venv-{len(envs)}"
            if not envs:
                subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
                _pip(env / "bin" / "python", *map(_pinned, colab_cells.COLAB_PREINSTALLED), str(tree))
            else:   # a copy of the first environment (library and Colab's packages) + the needs
                shutil.copytree(next(iter(envs.values())).parent.parent, env, symlinks=True)
            if needs:
                _pip(env / "bin" / "python", *needs)
            envs[key] = env / "bin" / "python"
        return envs[key]

    python_for([])
    return tree, python_for


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem[:2])
def test_chapter_runs_in_a_colab_like_environment(colab, path):
    tree, python_for = colab
    nb = nbformat.read(path, as_version=4)
    python = python_for(_needs_of_cell(nb.cells[1].source))
    env = {k: v for k, v in os.environ.items()
           if k not in ("DIFFCP_DATA", "DIFFCP_WEIGHTS", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    spec = subprocess.run([str(python), "-c", "from jupyter_client.kernelspec import KernelSpecManager; "
                           "print(KernelSpecManager().get_kernel_spec('python3').argv[0])"],
                          env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert spec == "python" or Path(spec).parent == python.parent, f"the kernel would run {spec}"
    out = subprocess.run([str(python), str(tree / "scripts" / "execute_chapters.py"),
                          str(tree / "book" / path.name), "--timeout", "1200"],
                         cwd=tree, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{path.name} failed in the Colab-like environment:\n" \
                                f"{out.stdout[-6000:]}\n{out.stderr[-6000:]}"
