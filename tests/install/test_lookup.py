"""Where commands find the config and the control socket.

Config: `--config`, then $DRIVERD_CONFIG, then /etc/driverd/driverd.toml. Socket: `--socket`, then
$DRIVERD_SOCKET, then the config's control_socket. An empty variable counts as unset. The socket a command
chose shows in its "cannot reach driverd at <socket>" answer (no daemon listens in these tests) or, with a real
listener, in the request that arrives there.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import driverd
from driverd import resources
from driverd.cli.main import app

runner = CliRunner()
ETC = "/etc/driverd/driverd.toml"


def invoke(*args: str | Path, env: dict[str, str | None] | None = None) -> Result:
    base: dict[str, str | None] = {"DRIVERD_CONFIG": None, "DRIVERD_SOCKET": None}
    result = runner.invoke(app, [str(a) for a in args], env={**base, **(env or {})})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def config_with_socket(tmp_path: Path, name: str) -> Path:
    """A valid bench config whose control socket is <tmp_path>/<name>.sock."""
    text = resources.BENCH_CONFIG.read_text(encoding="utf-8")
    text = text.replace('"protocols/', f'"{resources.DATA_DIR}/protocols/').replace(
        '"keys/', f'"{resources.DATA_DIR}/keys/').replace('"../var/driverd.sock"', f'"{name}.sock"')
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def reached(result: Result) -> str:
    body = json.loads(result.stdout)
    assert body["ok"] is False and "cannot reach driverd" in body["error"]["message"], body
    return str(body["socket"])


# --- `--version` ---------------------------------------------------------------------------------------------


def test_version() -> None:
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout == f"driverd {driverd.__version__}\n"


# --- the config ----------------------------------------------------------------------------------------------


def test_config_flag_beats_the_environment(tmp_path: Path) -> None:
    flag, env = config_with_socket(tmp_path, "flag"), config_with_socket(tmp_path, "env")
    r = invoke("config", "check", "--json", "--config", flag, env={"DRIVERD_CONFIG": str(env)})
    assert json.loads(r.stdout)["config"] == str(flag)


def test_config_from_the_environment(tmp_path: Path) -> None:
    env = config_with_socket(tmp_path, "env")
    r = invoke("config", "check", "--json", env={"DRIVERD_CONFIG": str(env)})
    assert r.exit_code == 0 and json.loads(r.stdout)["config"] == str(env)


@pytest.mark.parametrize("value", [None, ""])
def test_config_defaults_to_etc(value: str | None) -> None:
    r = invoke("config", "check", "--json", env={"DRIVERD_CONFIG": value})
    body = json.loads(r.stdout)
    assert body["config"] == ETC
    if not Path(ETC).exists():
        assert r.exit_code == 1 and body["problems"][0]["detail"].startswith(ETC)


def test_status_finds_the_socket_through_the_config_in_the_environment(tmp_path: Path) -> None:
    env = config_with_socket(tmp_path, "env")
    assert reached(invoke("status", "--json", env={"DRIVERD_CONFIG": str(env)})) == str(tmp_path / "env.sock")
    flag = config_with_socket(tmp_path, "flag")
    r = invoke("status", "--json", "--config", flag, env={"DRIVERD_CONFIG": str(env)})
    assert reached(r) == str(tmp_path / "flag.sock")


# --- the socket ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    ["status"],
    ["course", "hold", "bed-1", "--by", "dr-x", "--reason", "test"],
    ["schedule", "push", str(resources.EXAMPLE_SIGNED_SCHEDULE)],
])
def test_socket_order(tmp_path: Path, command: list[str]) -> None:
    config = config_with_socket(tmp_path, "cfg")
    env_sock, flag_sock = str(tmp_path / "env.sock"), str(tmp_path / "flag.sock")
    # the config's control_socket
    assert reached(invoke(*command, "--json", "--config", config)) == str(tmp_path / "cfg.sock")
    # $DRIVERD_SOCKET beats the config (even one named by --config)
    r = invoke(*command, "--json", "--config", config, env={"DRIVERD_SOCKET": env_sock})
    assert reached(r) == env_sock
    # --socket beats both
    r = invoke(*command, "--json", "--config", config, "--socket", flag_sock, env={"DRIVERD_SOCKET": env_sock})
    assert reached(r) == flag_sock
    # an empty variable is unset
    assert reached(invoke(*command, "--json", "--config", config, env={"DRIVERD_SOCKET": ""})) == \
        str(tmp_path / "cfg.sock")


def test_socket_from_the_environment_needs_no_config(tmp_path: Path) -> None:
    """With $DRIVERD_SOCKET set, a missing config is not even read."""
    env_sock = str(tmp_path / "env.sock")
    r = invoke("status", "--json", "--config", tmp_path / "missing.toml", env={"DRIVERD_SOCKET": env_sock})
    assert reached(r) == env_sock


def test_the_chosen_socket_is_the_one_asked(tmp_path: Path) -> None:
    """A real listener at $DRIVERD_SOCKET receives the status request (not only an error message naming it)."""
    path = tmp_path / "d.sock"
    got: list[bytes] = []
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                got.append(conn.makefile("rb").readline())
                conn.sendall(json.dumps({"ok": True, "pumps": []}).encode() + b"\n")

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        r = invoke("status", "--json", env={"DRIVERD_SOCKET": str(path), "DRIVERD_CONFIG": str(tmp_path / "no")})
        t.join(timeout=30)
    assert got and json.loads(got[0])["op"] == "status"
    assert r.exit_code == 0, r.stdout


# --- `driverd run` -------------------------------------------------------------------------------------------


def run_daemon(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DRIVERD_")}
    return subprocess.run([sys.executable, "-m", "driverd.cli.main", "run", *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def test_run_reads_the_config_from_the_environment_and_the_flag_wins(tmp_path: Path) -> None:
    """A malformed config is refused (exit 1) naming the file the lookup chose; nothing starts."""
    env_cfg, flag_cfg = tmp_path / "env.toml", tmp_path / "flag.toml"
    env_cfg.write_text("[daemon\n", encoding="utf-8")
    flag_cfg.write_text("[daemon\n", encoding="utf-8")
    r = run_daemon(env={"DRIVERD_CONFIG": str(env_cfg)})
    assert r.returncode == 1 and f"config {env_cfg}" in r.stderr
    r = run_daemon("--config", str(flag_cfg), env={"DRIVERD_CONFIG": str(env_cfg)})
    assert r.returncode == 1 and f"config {flag_cfg}" in r.stderr and str(env_cfg) not in r.stderr
