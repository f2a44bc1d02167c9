"""environment.yml (for conda users) must list the same dependencies as pyproject.toml."""

from __future__ import annotations

import re
import tomllib

import yaml

from conftest import REPO


def _name(requirement: str) -> str:
    return re.split(r"[ <>=!~\[;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert "conda-forge" in env["channels"]
    conda_deps = [d for d in env["dependencies"] if isinstance(d, str)]
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml needs one pip section"
    pip_deps = pip_sections[0]
    assert any(d.startswith("python=3.11") for d in conda_deps)
    assert "pip" in conda_deps
    listed = {_name(d) for d in conda_deps if not d.startswith(("python", "pip"))}
    listed |= {_name(d) for d in pip_deps if not d.startswith("-")}
    assert listed == runtime, (
        f"environment.yml and pyproject.toml disagree: only in environment.yml {sorted(listed - runtime)}, "
        f"only in pyproject.toml {sorted(runtime - listed)}")
    assert any(d.startswith("-e") and "[dev]" in d for d in pip_deps), "pip section must install the package with its dev extra"


def test_torch_pins_agree():
    makefile = (REPO / "Makefile").read_text()
    env = (REPO / "environment.yml").read_text()
    for pin in re.findall(r"torch(?:vision)?==[\d.]+", makefile):
        assert pin in env, f"Makefile pins {pin} but environment.yml does not"
