"""Where the data driverd ships lives: the one module that knows those paths.

The drug library, the Modbus register map, the schedule JSON Schema, the example schedules and configs and the
published demo keys are package data of `driverd.data` (the repo's config/ directory, mapped in pyproject.toml),
found with importlib.resources: a wheel install works without a checkout, and an editable install reads the
checkout's config/ through the same name.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Final

from driverd.errors import DriverdError

DATA_PACKAGE: Final = "driverd.data"


class DataMissing(DriverdError):
    """The package data cannot be found (a broken or stale install)."""


def data_dir() -> Path:
    """The directory holding driverd's shipped data files."""
    try:
        root = files(DATA_PACKAGE)
    except ModuleNotFoundError:
        raise DataMissing(f"package data {DATA_PACKAGE!r} is not installed: reinstall driverd "
                          "(pip install ., or pip install -e . in a checkout)") from None
    # pip installs wheels unpacked, so this is a real directory; a zipped install could not hand file paths to
    # the daemon, the drivers and the signing code, so it is refused here rather than half working.
    if not isinstance(root, Path) or not root.is_dir():
        raise DataMissing(f"package data {DATA_PACKAGE!r} is not a directory on disk ({root!r}); install driverd "
                          "unpacked (pip install)")
    return root


DATA_DIR: Final = data_dir()

#: The drug-library entry (hard limits) of the burst ketamine protocol: docs/clinical-basis.md explains each limit.
PROTOCOL: Final = DATA_DIR / "protocols" / "ketamine-burst.toml"
#: The Modbus register map the Modbus driver and simulator use unless a URL names another (`map=PATH`).
REGISTER_MAP: Final = DATA_DIR / "drivers" / "modbus-pump.toml"
#: The schedule JSON Schema (draft 2020-12).
SCHEDULE_SCHEMA: Final = DATA_DIR / "schemas" / "schedule.schema.json"
#: Example schedules: unsigned and signed with the demo key, with and without confirmation steps.
SCHEDULES_DIR: Final = DATA_DIR / "schedules"
EXAMPLE_SCHEDULE: Final = SCHEDULES_DIR / "example.json"
EXAMPLE_SIGNED_SCHEDULE: Final = SCHEDULES_DIR / "example.signed.json"
#: The published DEMO key pair and its trust store: demo and tests only, NOT FOR CLINICAL USE.
DEMO_KEY_DIR: Final = DATA_DIR / "keys" / "demo"
DEMO_PRIVATE_KEY: Final = DEMO_KEY_DIR / "demo-NOT-FOR-CLINICAL-USE.key"
DEMO_TRUST_DIR: Final = DEMO_KEY_DIR / "trusted"
#: The bench daemon config (two pumps on the protocol simulators) and the production-shaped example.
BENCH_CONFIG: Final = DATA_DIR / "driverd.toml"
EXAMPLE_CONFIG: Final = DATA_DIR / "driverd.example.toml"
