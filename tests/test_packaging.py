"""The minimum versions that .ci/run installs are the lower bounds pyproject.toml declares."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lower_bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in ("test", "demo", "dask", "parquet"):
        requirements += project["optional-dependencies"][extra]
    bounds = {}
    for requirement in requirements:
        match = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([0-9][0-9.]*)", requirement)
        if match and match.group(1) != "numba_kd":
            bounds[match.group(1).lower()] = match.group(3)
    return bounds


def _pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "minimum-versions.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def _same_version(a: str, b: str) -> bool:
    def parts(v: str) -> list[int]:
        numbers = [int(x) for x in v.split(".")]
        while numbers and numbers[-1] == 0:
            numbers.pop()
        return numbers

    return parts(a) == parts(b)


def test_minimum_versions_are_the_declared_lower_bounds():
    bounds, pins = _lower_bounds(), _pinned()
    assert bounds, "no lower bounds found in pyproject.toml"
    assert set(bounds) == set(pins), sorted(set(bounds) ^ set(pins))
    for name, version in bounds.items():
        assert _same_version(pins[name], version), (name, pins[name], version)
