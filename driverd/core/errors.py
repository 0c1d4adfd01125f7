"""The one error hierarchy. Every error driverd raises on purpose derives from DriverdError.

It lives in the pure core so the core can raise its own errors without importing the shell.
"""

from __future__ import annotations


class DriverdError(Exception):
    """Root of every deliberate driverd error."""


class ValidationError(DriverdError):
    """Bad input: carries every problem found (field path + rule), not just the first."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems) or "invalid input")


class Problem:
    """One validation failure: where (a JSON-pointer-like field path) and which rule it broke."""

    __slots__ = ("detail", "path", "rule")

    def __init__(self, path: str, rule: str, detail: str) -> None:
        self.path = path
        self.rule = rule
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.path or '/'}: {self.detail} [{self.rule}]"

    def __repr__(self) -> str:
        return f"Problem({self.path!r}, {self.rule!r}, {self.detail!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Problem) and (self.path, self.rule, self.detail) == (
            other.path,
            other.rule,
            other.detail,
        )

    def __hash__(self) -> int:
        return hash((self.path, self.rule, self.detail))

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "rule": self.rule, "detail": self.detail}


class QuantityError(ValidationError):
    """A number that is not an acceptable quantity (NaN, infinite, negative, absurd, wrong type)."""

    def __init__(self, path: str, rule: str, detail: str) -> None:
        super().__init__([Problem(path, rule, detail)])


class IllegalTransition(DriverdError):
    """An event that the course state machine does not accept in its current state."""

    def __init__(self, state: str, event: str, reason: str = "") -> None:
        self.state = state
        self.event = event
        self.reason = reason
        super().__init__(f"event {event!r} not allowed in state {state!r}" + (f": {reason}" if reason else ""))


class SignatureError(DriverdError):
    """A schedule signature that is missing, malformed, from an untrusted key, or does not verify."""


class AuditError(DriverdError):
    """The audit log cannot be written, or does not verify."""


class ConfigError(ValidationError):
    """A configuration or drug-library file that is malformed."""
