"""Shared fixtures for the schedule tests: the real drug library, the example schedule, a fixed clock."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from driverd.core.protocol import ProtocolSpec, parse_protocol
from driverd.core.schedule_parse import load_json

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"
EXAMPLE = CONFIG / "schedules" / "example.json"
DEMO_KEY = CONFIG / "keys" / "demo" / "demo-NOT-FOR-CLINICAL-USE.key"
DEMO_TRUST = CONFIG / "keys" / "demo" / "trusted"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)  # after approval, before expiry of the examples


@pytest.fixture(scope="session")
def spec() -> ProtocolSpec:
    return parse_protocol((CONFIG / "protocols" / "ketamine-burst.toml").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def _example() -> dict[str, Any]:
    doc = load_json(EXAMPLE.read_bytes())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="session")
def make_doc(_example: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """A fresh deep copy of the valid example each call (tests mutate it)."""
    return lambda: copy.deepcopy(_example)


@pytest.fixture
def doc(make_doc: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    return make_doc()
