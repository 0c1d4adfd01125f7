"""The CLI contract every command keeps (docs/operations.md, "The command line"): exit codes exactly 0/1/2, a
missing or malformed config is 1, usage errors are 2, --json everywhere with errors as one JSON object on stdout,
a closed stdout is not a failure, and every command and option says what it does."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import typer

from driverd.cli.main import app, run_cli

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "schedules" / "example.json"
SIGNED = REPO / "config" / "schedules" / "example.signed.json"
GOLDEN = REPO / "tests" / "audit" / "data" / "golden-log"
BOUND_S = 120.0


def leaf_commands() -> dict[str, Any]:
    """Every runnable command, by its path ("course stop")."""
    out: dict[str, Any] = {}

    def walk(cmd: Any, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
        else:
            out[" ".join(path)] = cmd

    walk(typer.main.get_command(app), [])
    return out


def groups() -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(cmd: Any, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            out[" ".join(path)] = cmd
            for name, sub in subs.items():
                walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return out


COMMANDS = leaf_commands()
CLINICIAN = ("hold", "resume", "escalate", "reduce", "taper", "stop", "ack-clock")


def call(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run_cli([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_list_is_what_this_file_covers() -> None:
    assert set(COMMANDS) == {
        "run", "status", "demo", "schedule validate", "schedule sign", "schedule push", "keys generate",
        "audit verify", "audit replay", "audit export", "audit report", "audit tail", "audit archive",
        "pump probe", "sim newera", "sim modbus", "sim harvard", "sim fault", "config check", "config data-dir",
        *(f"course {c}" for c in CLINICIAN), "course change-syringe", "hl7 listen", "hl7 send-test"}


# ------------------------------------------------------------------------------------------------ help


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_command_and_option_has_help_text(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    cmd = COMMANDS[path]
    assert (cmd.help or "").strip(), f"{path}: no help text"
    for param in cmd.params:
        if param.name == "help":
            continue
        assert (getattr(param, "help", None) or "").strip(), f"{path}: {param.opts or param.name} has no help"
    code, out, _ = call(capsys, *path.split(), "--help")
    assert code == 0 and "Usage" in out


@pytest.mark.parametrize("path", sorted(groups()))
def test_every_group_has_help_text(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    group = groups()[path]
    assert (group.help or "").strip(), f"{path or 'driverd'}: no help text"
    code, out, _ = call(capsys, *path.split(), "--help")
    assert code == 0 and "Usage" in out


def test_help_texts_say_what_the_commands_do(capsys: pytest.CaptureFixture[str]) -> None:
    """The texts named in issue 15: resume is not for a held course; reduce has examples; report --png."""
    resume = " ".join(COMMANDS["course resume"].help.split())
    assert "Not for a held course" in resume and "escalate" in resume
    reduce = COMMANDS["course reduce"].help
    assert "Examples" in reduce and "--dose 150" in reduce
    png = next(p for p in COMMANDS["audit report"].params if p.name == "png")
    assert "matplotlib" in png.help or "plot" in png.help


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_command_takes_json(path: str) -> None:
    assert any("--json" in p.opts for p in COMMANDS[path].params), path


# ------------------------------------------------------------------------------------------------ usage: 2


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_an_unknown_option_is_exit_2_and_json_under_json(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = call(capsys, *path.split(), "--no-such-option")
    assert code == 2
    assert "Traceback" not in out + err
    code, out, _ = call(capsys, *path.split(), "--no-such-option", "--json")
    assert code == 2
    body = json.loads(out)
    assert body["ok"] is False and body["error"]["code"] == "usage" and "--no-such-option" in body["error"]["message"]


@pytest.mark.parametrize("args", [
    ("course", "stop", "bed-1", "--reason", "x"),  # missing --by
    ("course", "reduce", "bed-1", "--by", "a", "--reason", "b", "--dose", "lots"),
    ("status", "--interval", "0"),
    ("status", "--tz", "Nowhere/Special"),
    ("status", "--count", "2"),  # --count without --watch
    ("audit", "tail", "/nonexistent/log"),
    ("sim", "newera"),  # neither --pty nor --tcp
    ("sim", "modbus", "--tcp", "0", "--units", "0"),
    ("sim", "harvard", "--tcp", "0", "--address", "100"),
    ("sim", "fault", "--control", "/nonexistent/sim.sock", "explode"),  # not a fault word
    ("schedule", "validate", "/nonexistent/schedule.json"),
    ("run", "--speed", "0"),
])
def test_usage_errors_are_exit_2_in_text_and_json(args: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = call(capsys, *args)
    assert code == 2, out + err
    assert "Traceback" not in out + err
    code, out, _ = call(capsys, *args, "--json")
    assert code == 2
    assert json.loads(out)["error"]["code"] == "usage"


def test_no_arguments_shows_help_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = call(capsys)
    assert code == 2 and "Usage" in out + err


# ------------------------------------------------------------------------------------------------ config: 1


def _config_commands(config: Path) -> list[tuple[str, ...]]:
    """Every command that reads a daemon config, pointed at `config`."""
    who = ("--by", "dr-a", "--reason", "test")
    return [
        ("status", "--config", str(config)),
        ("status", "--watch", "--count", "1", "--config", str(config)),
        ("schedule", "push", str(SIGNED), "--config", str(config)),
        *(("course", c, "bed-1", *who, "--config", str(config)) for c in CLINICIAN),
        ("course", "change-syringe", "bed-1", "--fill", "17", *who, "--config", str(config)),
    ]


def _protocol_commands(protocol: Path) -> list[tuple[str, ...]]:
    return [("schedule", "validate", str(EXAMPLE), "--protocol", str(protocol)),
            ("schedule", "sign", str(EXAMPLE), "--key", str(REPO / "config" / "keys" / "demo" /
                                                           "demo-NOT-FOR-CLINICAL-USE.key"),
             "--protocol", str(protocol))]


def _bad_configs(tmp_path: Path) -> dict[str, Path]:
    malformed = tmp_path / "malformed.toml"
    malformed.write_text("[daemon\nprotocol = 1\n", encoding="utf-8")
    invalid = tmp_path / "invalid.toml"
    invalid.write_text("[daemon]\npoll_period_s = -1\n", encoding="utf-8")
    return {"missing": tmp_path / "missing.toml", "malformed": malformed, "invalid": invalid}


@pytest.mark.parametrize("kind", ["missing", "malformed", "invalid"])
def test_a_missing_or_malformed_config_is_exit_1_in_every_command(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _bad_configs(tmp_path)[kind]
    commands = [*_config_commands(bad), *_protocol_commands(bad), ("run", "--config", str(bad))]
    for args in commands:
        code, out, err = call(capsys, *args, "--json")
        assert code == 1, (args, out, err)
        body = json.loads(out)
        assert body["ok"] is False and body["error"]["code"] == "config", (args, body)
        assert str(bad.name) in body["error"]["message"]
        if args[0] == "run":
            continue  # without --json, `run` reports through its operational log (tests/runtime/test_config_hostile)
        code, out, err = call(capsys, *args)
        assert code == 1, (args, out, err)
        assert "Traceback" not in out + err and bad.name in err


def test_a_missing_trust_store_is_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = call(capsys, "schedule", "validate", str(EXAMPLE), "--trust", str(tmp_path / "none"), "--json")
    assert code == 1 and json.loads(out)["error"]["code"] == "config"


def test_a_daemon_that_is_not_running_is_exit_1_with_a_json_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    sock = tmp_path / "none.sock"
    for args in (("status",), ("status", "--watch", "--count", "2"), ("course", "stop", "bed-1", "--by", "a",
                                                                      "--reason", "b")):
        code, out, _ = call(capsys, *args, "--socket", str(sock), "--json")
        assert code == 1
        assert json.loads(out)["error"] == {"code": "unreachable",
                                            "message": f"cannot reach driverd at {sock}: No such file or directory"}


def test_only_0_1_2_leave_driverd(capsys: pytest.CaptureFixture[str]) -> None:
    """An interrupt inside a command (typer turns it into exit 130) is reported as 1."""
    sub = typer.Typer()

    @sub.command()
    def boom() -> None:
        """Interrupted."""
        raise KeyboardInterrupt

    @sub.command()
    def other() -> None:
        """Another."""

    assert run_cli(["boom"], sub) == 1


# ------------------------------------------------------------------------------------------------ closed stdout


@pytest.mark.parametrize("args", [
    ("--help",),
    ("schedule", "validate", str(EXAMPLE), "--now", "2026-11-30T00:00:00Z"),
    ("schedule", "validate", str(EXAMPLE), "--now", "2026-11-30T00:00:00Z", "--json"),
    ("audit", "tail", str(GOLDEN), "-n", "100"),
    ("audit", "export", str(GOLDEN)),
    ("audit", "report", str(GOLDEN)),
    ("status", "--socket", "/nonexistent/driverd.sock", "--json"),
])
def test_a_closed_stdout_is_not_a_failure(args: tuple[str, ...]) -> None:
    """`driverd ... | head -1`: the reader is gone before driverd writes; exit 0, nothing on stderr about it."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # no reader at all: every write gets EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "driverd.cli.main", *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=BOUND_S, check=False)
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr and "Exception ignored" not in proc.stderr


# ------------------------------------------------------------------------------------------------ sim --json


@pytest.mark.parametrize("args", [("sim", "newera", "--tcp", "0"), ("sim", "modbus", "--tcp", "0", "--units", "1,2")])
def test_simulators_print_their_endpoint_as_json(args: tuple[str, ...]) -> None:
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "driverd.cli.main", *args, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
        first = json.loads(lines.get(timeout=BOUND_S))
        assert isinstance(first["port"], int) and first["port"] > 0
        urls = first["urls"] if "urls" in first else [first["url"]]
        assert all(f":{first['port']}" in u for u in urls) and len(urls) == (2 if args[1] == "modbus" else 1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=BOUND_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_simulator_error_is_json_under_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "faults.toml"
    bad.write_text('[[fault]]\nafter_requests = -1\nkind = "explode"\n', encoding="utf-8")
    for sim in ("newera", "modbus"):
        extra = ("--pty",) if sim == "newera" else ("--tcp", "0")
        code, out, _ = call(capsys, "sim", sim, *extra, "--faults", str(bad), "--json")
        assert code == 1
        assert json.loads(out)["ok"] is False


def test_the_daemon_keeps_its_audit_dead_exit_code() -> None:
    """3 is `driverd run`'s alone (audit log dead, pumps stopped: docs/safety.md CRA-3); any other command's odd
    code is reported as 1."""
    from driverd.runtime.service import EXIT_AUDIT_DEAD

    sub = typer.Typer()

    @sub.command("run")
    def run_() -> None:
        """The daemon."""
        raise typer.Exit(EXIT_AUDIT_DEAD)

    @sub.command("other")
    def other() -> None:
        """Not the daemon."""
        raise typer.Exit(EXIT_AUDIT_DEAD)

    assert run_cli(["run"], sub) == EXIT_AUDIT_DEAD == 3
    assert run_cli(["other"], sub) == 1
