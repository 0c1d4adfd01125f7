"""The daemon config: the [control] limits (validated like every other key) and hostile config files (NUL bytes,
control characters, invalid UTF-8, deep nesting, huge files and strings) as ConfigErrors naming the key, and
`driverd run --config` exiting 1 with a clear message, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from driverd.cli.main import app
from driverd.core.errors import ConfigError
from driverd.core.toml_text import MAX_TOML_BYTES
from driverd.runtime.config import ControlSettings, load_config, parse_config

BASE = """[daemon]
protocol = "p.toml"
audit_dir = "audit"
trust_dir = "trust"
control_socket = "ctl.sock"
{daemon_extra}
{sections}
[[pumps]]
id = "bed-1"
url = "sim://bed-1"
"""


def config_text(daemon_extra: str = "", sections: str = "") -> bytes:
    return BASE.format(daemon_extra=daemon_extra, sections=sections).encode()


def problems(data: bytes) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, Path("/etc/driverd/driverd.toml"))
    assert all(len(str(p)) < 1000 for p in info.value.problems)  # never echoes a huge value
    return [(p.path, p.rule) for p in info.value.problems]


# ------------------------------------------------------------------------------------------------ [control]


def test_control_defaults_and_values() -> None:
    cfg = parse_config(config_text(), Path("/x/driverd.toml"))
    assert cfg.control == ControlSettings()
    cfg = parse_config(config_text(sections="[control]\nmax_connections = 32\nmax_connections_per_peer = 4\n"
                                            "read_timeout_s = 2.5\nrequest_timeout_s = 5\nrefusal_log_burst = 5\n"
                                            "max_schedule_bytes = 4096\n"), Path("/x/driverd.toml"))
    assert cfg.control.max_connections == 32 and cfg.control.max_connections_per_peer == 4
    assert cfg.control.read_timeout_s == 2.5 and cfg.control.request_timeout_s == 5.0
    assert cfg.control.refusal_log_burst == 5 and cfg.control.max_schedule_bytes == 4096
    assert cfg.control.max_request_bytes == ControlSettings().max_request_bytes


@pytest.mark.parametrize(("section", "expected"), [
    ("[control]\nmax_conections = 3\n", ("control.max_conections", "unknown-key")),
    ("[control]\nmax_connections = 1\n", ("control.max_connections", "range")),
    ("[control]\nmax_connections = 5000\n", ("control.max_connections", "range")),
    ("[control]\nmax_connections = 8.0\n", ("control.max_connections", "range")),
    ("[control]\nmax_connections = \"16\"\n", ("control.max_connections", "range")),
    ("[control]\nmax_connections = true\n", ("control.max_connections", "range")),
    ("[control]\nmax_request_bytes = 10\n", ("control.max_request_bytes", "range")),
    ("[control]\nmax_text_chars = 257\n", ("control.max_text_chars", "range")),
    ("[control]\nread_timeout_s = 0\n", ("control.read_timeout_s", "range")),
    ("[control]\nread_timeout_s = nan\n", ("control.read_timeout_s", "range")),
    ("[control]\nrequest_timeout_s = inf\n", ("control.request_timeout_s", "range")),
    ("[control]\nrefusal_log_per_minute = -1\n", ("control.refusal_log_per_minute", "range")),
    ("[control]\nmax_connections = 4\nmax_connections_per_peer = 8\n",
     ("control.max_connections_per_peer", "consistency")),
    ("[control]\nmax_request_bytes = 2048\nmax_schedule_bytes = 4096\n",
     ("control.max_schedule_bytes", "consistency")),
])
def test_malformed_control_section_names_the_key(section: str, expected: tuple[str, str]) -> None:
    assert expected in problems(config_text(sections=section))


def test_control_must_be_a_table() -> None:
    assert ("control", "type") in problems(b"control = 3\n" + config_text())


def test_control_limits_reach_the_server(tmp_path: Path) -> None:
    from driverd.runtime.control import ControlServer

    path = tmp_path / "driverd.toml"
    path.write_bytes(config_text(sections="[control]\nmax_connections = 9\nread_timeout_s = 3\n"))
    cfg = load_config(path)
    server = ControlServer(object(), cfg.control_socket, limits=cfg.control)  # type: ignore[arg-type]
    assert server.max_connections == 9 and server.read_timeout_s == 3.0
    assert server.limits == cfg.control


# ------------------------------------------------------------------------------------------------ hostile files


HOSTILE: dict[str, tuple[bytes, tuple[str, str]]] = {
    "nul-in-path": (config_text().replace(b'"audit"', b'"aud\\u0000it"'), ("daemon.audit_dir", "path")),
    "newline-in-socket-path": (config_text().replace(b'"ctl.sock"', b'"ctl\\n.sock"'),
                               ("daemon.control_socket", "path")),
    "huge-path": (config_text().replace(b'"p.toml"', b'"' + b"p" * 10_000 + b'"'), ("daemon.protocol", "path")),
    "nul-in-url": (config_text().replace(b'"sim://bed-1"', b'"sim://bed\\u0000-1"'), ("pumps[0].url", "format")),
    "huge-url": (config_text().replace(b'"sim://bed-1"', b'"sim://' + b"b" * 100_000 + b'"'),
                 ("pumps[0].url", "format")),
    "huge-pump-id": (config_text().replace(b'id = "bed-1"', b'id = "' + b"b" * 100_000 + b'"'),
                     ("pumps[0].id", "format")),
    "huge-unknown-key": (config_text(daemon_extra="k" * 100_000 + " = 1"), ("daemon.kkkk", "unknown-key")),
    "invalid-utf8": (config_text().replace(b'"audit"', b'"\xff\xfe"'), ("/", "encoding")),
    "deep-array": (b"a = " + b"[" * 100_000 + b"]" * 100_000, ("/", "toml")),
    "deep-inline-table": (b"a = " + b"{b=" * 100_000 + b"1" + b"}" * 100_000, ("/", "toml")),
    "too-large": (config_text() + b"#" + b"x" * MAX_TOML_BYTES, ("/", "size")),
    "huge-number": (config_text(daemon_extra="deadman_s = " + "9" * 5000), ("/", "toml")),
    "nul-bytes": (b"\x00" * 100, ("/", "toml")),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_config_is_a_config_error_naming_the_key(name: str) -> None:
    data, (path, rule) = HOSTILE[name]
    assert any(p.startswith(path) and r == rule for p, r in problems(data)), problems(data)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_run_with_a_hostile_config_exits_1_with_a_clear_message(name: str, tmp_path: Path,
                                                                capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "driverd.toml"
    path.write_bytes(HOSTILE[name][0])
    result = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err = capfd.readouterr().err + result.output
    assert "Traceback" not in err
    assert f"driverd: config {path}: {HOSTILE[name][1][0]}" in err


def test_config_path_with_a_nul_byte_or_missing_is_a_config_error(tmp_path: Path) -> None:
    for path in (Path("driverd\x00.toml"), tmp_path / "missing.toml", tmp_path):
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert [p.rule for p in info.value.problems] == ["readable"]


def test_run_with_a_config_path_that_cannot_be_read_exits_1(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


# ------------------------------------------------------------------------------------------------ fuzz


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_are_a_config_error(data: bytes) -> None:
    try:
        parse_config(data, Path("/x/driverd.toml"))
    except ConfigError as exc:
        assert exc.problems


def _toml_value() -> st.SearchStrategy[str]:
    texts = st.text(max_size=40).map(json.dumps)  # JSON string escapes are valid TOML basic strings
    scalars = st.one_of(
        texts, st.integers().map(str), st.floats().map(lambda f: repr(f).replace("inf", "inf").lower()),
        st.booleans().map(lambda b: "true" if b else "false"),
        st.sampled_from(['"\\u0000"', '"' + "x" * 5000 + '"', "1e999999999", "9" * 400, "nan", "-inf",
                         "[" * 200 + "]" * 200, '"\\n"', "{a = 1}", "1979-05-27T07:32:00Z"]),
    )
    return st.recursive(scalars, lambda c: st.lists(c, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
                        max_leaves=6)


KEYS = ["protocol", "audit_dir", "audit_key", "trust_dir", "control_socket", "socket_mode", "poll_period_s",
        "link_timeout_s", "deadman_s", "driver_timeout_s", "nonsense"]
CONTROL_KEYS = [*ControlSettings.__dataclass_fields__, "nonsense"]


@settings(max_examples=300, deadline=None)
@given(section=st.sampled_from(["daemon", "control"]), key_index=st.integers(0, 100), value=_toml_value())
def test_any_value_for_any_key_is_a_config_or_a_config_error(section: str, key_index: int, value: str) -> None:
    keys = KEYS if section == "daemon" else CONTROL_KEYS
    line = f"{keys[key_index % len(keys)]} = {value}"
    data = config_text(daemon_extra=line) if section == "daemon" else config_text(sections=f"[control]\n{line}\n")
    try:
        cfg: Any = parse_config(data, Path("/x/driverd.toml"))
    except ConfigError as exc:
        assert exc.problems
    else:
        assert cfg.control.max_connections >= cfg.control.max_connections_per_peer
