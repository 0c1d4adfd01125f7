"""Reading TOML text (daemon config, drug library, register maps) so that any input is a ConfigError.

tomllib alone lets some inputs escape as other exceptions: invalid UTF-8 (UnicodeDecodeError), deeply nested
arrays or inline tables (RecursionError) and integers of more than 4300 digits (a plain ValueError). The size
bound keeps a hostile file from costing more than a real configuration ever could.
"""

from __future__ import annotations

import tomllib
from typing import Any, Final

from driverd.core.errors import ConfigError, Problem

MAX_TOML_BYTES: Final = 1 << 20


def load_toml(data: bytes | str, source: str = "/") -> dict[str, Any]:
    """Parse TOML; anything unreadable raises ConfigError at `source` (rule `size`, `encoding` or `toml`)."""
    if len(data) > MAX_TOML_BYTES:
        raise ConfigError([Problem(source, "size", f"larger than {MAX_TOML_BYTES} bytes")])
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError([Problem(source, "encoding", f"not UTF-8 (byte offset {exc.start})")]) from None
    else:
        text = data
    try:
        return tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or an integer beyond Python's digit limit
        raise ConfigError([Problem(source, "toml", f"not valid TOML: {str(exc)[:300]}")]) from None
    except RecursionError:
        raise ConfigError([Problem(source, "toml", "not valid TOML: nested too deeply")]) from None
