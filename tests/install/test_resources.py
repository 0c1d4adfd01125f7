"""driverd/resources.py is the one source of data paths: everything it names exists, and no other module builds a
path from its own location (which would point into a checkout and break in a wheel)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from driverd import resources
from driverd.cli.schedule import DEFAULT_PROTOCOL, SCHEMA_PATH
from driverd.runtime import demo
from drivers.modbus.regmap import DEFAULT_MAP

from .wheel import ROOT

# A module locating files relative to itself: __file__, or climbing parents towards the checkout's config/.
LOCATING = re.compile(r"__file__|\.parents\[|\.parent\.parent|[\"']config[\"']\s*/|/\s*[\"']config[\"']")


def test_every_named_data_file_exists() -> None:
    paths = {name: value for name, value in vars(resources).items() if isinstance(value, Path)}
    assert len(paths) >= 10
    for name, path in paths.items():
        assert path.exists(), f"resources.{name}: {path} does not exist"
        assert resources.DATA_DIR in (path, *path.parents), name


def test_other_modules_use_resources() -> None:
    assert DEFAULT_MAP == resources.REGISTER_MAP
    assert DEFAULT_PROTOCOL == resources.PROTOCOL
    assert SCHEMA_PATH == resources.SCHEDULE_SCHEMA
    assert demo.DEMO_KEY == resources.DEMO_PRIVATE_KEY and demo.DEMO_TRUST == resources.DEMO_TRUST_DIR


def test_no_module_locates_files_relative_to_itself() -> None:
    offenders = []
    for top in ("driverd", "drivers", "simulators"):
        for py in sorted((ROOT / top).rglob("*.py")):
            if py == ROOT / "driverd" / "resources.py" or "__pycache__" in py.parts:
                continue
            for n, line in enumerate(py.read_text(encoding="utf-8").splitlines(), 1):
                if LOCATING.search(line.split("#", 1)[0]):
                    offenders.append(f"{py.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == [], "use driverd/resources.py for shipped data:\n" + "\n".join(offenders)


def test_the_repo_points_nowhere_outside_itself() -> None:
    """Project files cite docs/ (e.g. docs/clinical-basis.md), never a sibling directory of the checkout."""
    outside = re.compile(r"\.\./shared|/work/shared")
    skip_dirs = {".git", ".venv", "build", "dist", "var", "__pycache__", ".hypothesis", "node_modules"}
    offenders = []
    checked = 0
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.endswith((".egg-info", "_cache"))]
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix not in {".py", ".md", ".toml", ".json", ".service", ".conf", ".txt", ""} \
                    or path == Path(__file__).resolve():
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            checked += 1
            offenders += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(text.splitlines(), 1)
                          if outside.search(line)]
    assert checked > 100 and offenders == []
