"""The three dependency lists (pyproject.toml, environment.yml, requirements-ci.txt) agree."""

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

# Different names of one package on different indexes count as the same dependency.
ALIASES = {"open3d-cpu": "open3d", "pytorch": "torch"}


def normalise(name):
    name = re.sub(r"[-_.]+", "-", name.strip().lower())
    return ALIASES.get(name, name)


def load_project():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def runtime_requirements():
    return [Requirement(r) for r in load_project()["dependencies"]]


def extra_requirements():
    extras = load_project().get("optional-dependencies", {})
    return [Requirement(r) for group in extras.values() for r in group]


def ci_requirements():
    reqs = {}
    for line in (ROOT / "requirements-ci.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            reqs[normalise(req.name)] = req
    return reqs


def conda_name(spec):
    """Package name of a conda match spec such as ``conda-forge::numpy>=1.22`` or ``scipy 1.11.*``."""
    spec = spec.split("::")[-1]
    return normalise(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1))


def environment_names():
    path = ROOT / "environment.yml"
    assert path.exists(), "environment.yml is missing at the repository root."
    return parse_environment(path.read_text())


def parse_environment(text):
    env = yaml.safe_load(text)
    assert isinstance(env, dict) and isinstance(env.get("dependencies"), list), (
        "environment.yml must have a 'dependencies' list."
    )
    names = set()
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            names.add(conda_name(dep))
        elif isinstance(dep, dict):
            for pip_spec in dep.get("pip", []):
                if not pip_spec.strip().startswith("-"):
                    names.add(normalise(Requirement(pip_spec).name))
    return names


def test_normalise():
    assert normalise("Open3D_CPU") == "open3d"
    assert normalise("sphinxcontrib.bibtex") == normalise("sphinxcontrib-bibtex")
    assert conda_name("conda-forge::PyTorch>=2.1") == "torch"
    assert conda_name("scipy 1.11.*") == "scipy"


def test_runtime_dependencies_in_requirements_ci():
    ci = ci_requirements()
    missing = [r.name for r in runtime_requirements() if normalise(r.name) not in ci]
    assert not missing, f"requirements-ci.txt lacks runtime dependencies {missing}."


def test_runtime_dependencies_in_environment_yml():
    names = environment_names()
    missing = [r.name for r in runtime_requirements() if normalise(r.name) not in names]
    assert not missing, f"environment.yml lacks runtime dependencies {missing}."


def test_optional_dependencies_in_both_lists():
    ci, env = ci_requirements(), environment_names()
    names = [r.name for r in extra_requirements()]
    assert [n for n in names if normalise(n) not in ci] == [], "requirements-ci.txt lacks optional dependencies."
    assert [n for n in names if normalise(n) not in env] == [], "environment.yml lacks optional dependencies."


def test_torch_pinned_in_ci_and_loose_in_pyproject():
    torch_ci = ci_requirements()["torch"]
    assert str(torch_ci.specifier) == "==2.13.0"
    (torch_rt,) = [r for r in runtime_requirements() if normalise(r.name) == "torch"]
    ops = {s.operator for s in torch_rt.specifier}
    assert ops == {">="}, f"pyproject should require torch loosely (>=), got {torch_rt.specifier}."


def test_ci_pins_satisfy_pyproject_bounds():
    ci = ci_requirements()
    for req in runtime_requirements():
        pins = [s.version for s in ci[normalise(req.name)].specifier if s.operator == "=="]
        for pin in pins:
            assert Version(pin) in req.specifier, f"requirements-ci.txt pins {req.name}=={pin}, outside {req.specifier}."


def test_environment_parser_reads_conda_and_pip_entries():
    text = "dependencies:\n  - python=3.11\n  - conda-forge::numpy>=1.22\n  - scipy 1.11.*\n  - pip\n  - pip:\n      - open3d-cpu==0.20.0\n      - -e .\n"
    assert parse_environment(text) == {"python", "numpy", "scipy", "pip", "open3d"}
