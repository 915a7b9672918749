"""environment.yml (conda) and pyproject.toml (pip) must name the same dependencies."""

from __future__ import annotations

import re
import tomllib

import yaml

# conda-forge names that differ from the PyPI names in pyproject.toml
CONDA_TO_PYPI = {"pytorch": "torch", "simpleitk": "simpleitk"}
CONDA_ONLY = {"python", "pip", "cpuonly"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject(repo_root):
    data = tomllib.loads((repo_root / "pyproject.toml").read_text())
    deps = {_name(d): d for d in data["project"]["dependencies"]}
    test = {_name(d): d for d in data["project"]["optional-dependencies"]["test"]}
    return deps, test


def _conda(repo_root):
    env = yaml.safe_load((repo_root / "environment.yml").read_text())
    names = {}
    for dep in env["dependencies"]:
        items = dep["pip"] if isinstance(dep, dict) else [dep]
        for item in items:
            if item.startswith("-e"):
                continue
            name = _name(item)
            names[CONDA_TO_PYPI.get(name, name)] = item
    return {k: v for k, v in names.items() if k not in CONDA_ONLY}


def test_same_dependency_names(repo_root):
    deps, test = _pyproject(repo_root)
    conda = _conda(repo_root)
    assert set(conda) == set(deps) | set(test)


def test_same_version_bounds(repo_root):
    deps, test = _pyproject(repo_root)
    conda = _conda(repo_root)

    def bounds(req: str) -> str:
        spec = req.split("#")[0].strip()
        return re.sub(r"\s+", "", spec[len(_name(spec)) :])

    for name, req in {**deps, **test}.items():
        assert bounds(conda[name]) == bounds(req), name


def test_constraints_pin_every_dependency(repo_root):
    pins = {
        _name(line): line
        for line in (repo_root / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    deps, test = _pyproject(repo_root)
    missing = sorted((set(deps) | set(test)) - set(pins))
    assert not missing, f"constraints.txt lacks pins for {missing}"
    assert pins["torch"].strip() == "torch==2.13.0"
