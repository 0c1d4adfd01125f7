"""Pump drivers: one abstract base, URL-selected implementations found through entry points."""

from drivers.base import (
    AlarmKind,
    DriverError,
    DriverIOError,
    DriverOptions,
    DriverTimeout,
    Identity,
    ProtocolError,
    PumpAlarm,
    PumpDriver,
    PumpRejected,
    PumpState,
    PumpStatus,
)
from drivers.registry import open_driver
from drivers.url import DriverURL, parse_url

__all__ = [
    "AlarmKind",
    "DriverError",
    "DriverIOError",
    "DriverOptions",
    "DriverTimeout",
    "DriverURL",
    "Identity",
    "ProtocolError",
    "PumpAlarm",
    "PumpDriver",
    "PumpRejected",
    "PumpState",
    "PumpStatus",
    "open_driver",
    "parse_url",
]
