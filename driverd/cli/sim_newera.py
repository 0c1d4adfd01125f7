"""Placeholder: filled in by the simulator work."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this protocol's `sim` command to the group."""
