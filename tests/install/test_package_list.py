"""pyproject.toml lists its packages explicitly: a package added under driverd/, drivers/ or simulators/ and not
listed would be missing from the wheel (and work in a checkout), so this test names it."""

from __future__ import annotations

import tomllib
from pathlib import Path

from .wheel import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def python_packages() -> set[str]:
    """Every directory under the three roots that holds Python code, as a dotted name."""
    found: set[str] = set()
    for top in ("driverd", "drivers", "simulators"):
        for py in (ROOT / top).rglob("*.py"):
            if "__pycache__" in py.parts:
                continue
            found.add(".".join(py.parent.relative_to(ROOT).parts))
    return found


def test_every_package_is_listed() -> None:
    listed = set(SETUPTOOLS["packages"])
    missing = sorted(python_packages() - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_every_listed_package_exists() -> None:
    package_dir = SETUPTOOLS.get("package-dir", {})
    for name in SETUPTOOLS["packages"]:
        where = ROOT / package_dir[name] if name in package_dir else ROOT / Path(*name.split("."))
        assert (where / "__init__.py").is_file(), f"{name}: no {where}/__init__.py"


def test_every_python_package_has_an_init() -> None:
    """A directory of modules without __init__.py would be a namespace package: easy to leave out of a wheel."""
    assert [p for p in python_packages() if not (ROOT / Path(*p.split(".")) / "__init__.py").is_file()] == []


def test_config_is_the_package_data() -> None:
    assert SETUPTOOLS["package-dir"] == {"driverd.data": "config"}
    assert "driverd.data" in SETUPTOOLS["packages"]
