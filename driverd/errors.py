"""Public re-export of the error hierarchy (defined in the pure core)."""

from driverd.core.errors import (
    AuditError,
    ConfigError,
    DriverdError,
    IllegalTransition,
    Problem,
    QuantityError,
    SignatureError,
    ValidationError,
)

__all__ = [
    "AuditError",
    "ConfigError",
    "DriverdError",
    "IllegalTransition",
    "Problem",
    "QuantityError",
    "SignatureError",
    "ValidationError",
]
