"""A non-editable wheel works without the checkout: its file list carries the shipped data, and installed into a
venv outside the checkout it runs `--version`, `config data-dir`, `schedule validate` and `config check`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import driverd

from .wheel import ROOT, build_wheel, venv_borrowing_deps

pytestmark = pytest.mark.slow  # builds a wheel (about 10 s); still runs in CI


@contextlib.contextmanager
def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Path, bool]]:
    """A directory shared by every xdist worker of this run, under an exclusive lock: (path, already made)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's base, for every worker
    with (root / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = root / name
        done = (path / ".done").exists()
        path.mkdir(exist_ok=True)
        yield path, done
        (path / ".done").touch()


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per run, whichever worker gets here first."""
    with shared_dir(tmp_path_factory, "driverd-wheel") as (path, done):
        return next((path / "dist").glob("driverd-*.whl")) if done else build_wheel(path)


@pytest.fixture(scope="session")
def venv_bin(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    with shared_dir(tmp_path_factory, "driverd-wheel-venv") as (path, done):
        return path / "v" / "bin" if done else venv_borrowing_deps(wheel, path / "v")


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A working directory outside the checkout."""
    assert ROOT not in tmp_path.parents
    yield tmp_path


def installed(venv_bin: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "DRIVERD_"))}
    return subprocess.run([str(venv_bin / "driverd"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_wheel_lists_every_shipped_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [p.relative_to(ROOT / "config") for p in (ROOT / "config").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]
    assert shipped, "config/ is empty?"
    missing = [str(rel) for rel in shipped if f"driverd/data/{rel.as_posix()}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    for needed in ("protocols/ketamine-burst.toml", "drivers/modbus-pump.toml", "schemas/schedule.schema.json",
                   "schedules/example.json", "schedules/example.signed.json",
                   "keys/demo/demo-NOT-FOR-CLINICAL-USE.key", "keys/demo/trusted/demo-NOT-FOR-CLINICAL-USE.pub",
                   "driverd.toml", "driverd.example.toml"):
        assert f"driverd/data/{needed}" in names


def test_wheel_holds_every_module(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = [p.relative_to(ROOT).as_posix() for top in ("driverd", "drivers", "simulators")
               for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts]
    assert [m for m in modules if m not in names] == []
    entry_points = zipfile.ZipFile(wheel).read(f"driverd-{driverd.__version__}.dist-info/entry_points.txt").decode()
    assert "[driverd.drivers]" in entry_points and "driverd = driverd.cli.main:main" in entry_points


def test_installed_wheel_runs_version(venv_bin: Path, outside: Path) -> None:
    r = installed(venv_bin, outside, "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"driverd {driverd.__version__}\n"


def test_installed_wheel_reads_its_own_data(venv_bin: Path, outside: Path) -> None:
    r = installed(venv_bin, outside, "config", "data-dir", "--json")
    assert r.returncode == 0, r.stderr
    data = Path(json.loads(r.stdout)["data_dir"])
    assert venv_bin.parent in data.parents  # inside the venv's site-packages, not the checkout
    assert ROOT not in data.parents
    assert (data / "protocols" / "ketamine-burst.toml").read_bytes() == \
        (ROOT / "config" / "protocols" / "ketamine-burst.toml").read_bytes()


def test_installed_wheel_validates_a_shipped_example(venv_bin: Path, outside: Path) -> None:
    data = Path(installed(venv_bin, outside, "config", "data-dir").stdout.strip())
    r = installed(venv_bin, outside, "schedule", "validate", str(data / "schedules" / "example.signed.json"),
                  "--trust", str(data / "keys" / "demo" / "trusted"), "--now", "2026-11-22T12:00:00Z", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    body = json.loads(r.stdout)
    assert body["ok"] is True and body["signature"]["key_id"] == "85ae298ab8d11af0"
    # The default drug library (no --protocol) is the wheel's too: a malformed schedule is judged against it.
    bad = outside / "bad.json"
    bad.write_text("{", encoding="utf-8")
    assert installed(venv_bin, outside, "schedule", "validate", str(bad)).returncode == 1


def test_installed_wheel_checks_the_shipped_bench_config(venv_bin: Path, outside: Path) -> None:
    data = Path(installed(venv_bin, outside, "config", "data-dir").stdout.strip())
    r = installed(venv_bin, outside, "config", "check", "--config", str(data / "driverd.toml"), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    body = json.loads(r.stdout)
    assert body["ok"] is True
    assert {w["rule"] for w in body["warnings"]} == {"demo-key-trusted", "audit-unsigned"}
    assert [c["field"] for c in body["checked"] if c["field"].startswith("pumps")] == ["pumps[0].url",
                                                                                       "pumps[1].url"]


def test_installed_wheel_runs_a_simulator_and_probes_it(venv_bin: Path, outside: Path) -> None:
    """`sim modbus` and the Modbus driver both read the shipped register map: from the wheel, over loopback TCP."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "DRIVERD_"))}
    sim = subprocess.Popen([str(venv_bin / "driverd"), "sim", "modbus", "--tcp", "0"], cwd=outside, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sim.stdout is not None
        port = sim.stdout.readline().strip()
        url = sim.stdout.readline().strip()
        assert port.isdigit() and url == f"modbus+tcp://127.0.0.1:{port}?unit=1", (port, url, sim.stderr)
        r = installed(venv_bin, outside, "pump", "probe", url, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["ok"] is True
    finally:
        sim.terminate()
        sim.wait(timeout=60)
    assert sim.returncode == 0


def test_installed_wheel_runs_the_daemon(venv_bin: Path, outside: Path) -> None:
    """`driverd run` from the wheel, on the shipped drug library and demo trust store, answers `status` over its
    socket (found through $DRIVERD_CONFIG) and stops cleanly on SIGTERM."""
    data = Path(installed(venv_bin, outside, "config", "data-dir").stdout.strip())
    config = outside / "driverd.toml"
    config.write_text(
        f'[daemon]\nprotocol = "{data / "protocols" / "ketamine-burst.toml"}"\n'
        f'trust_dir = "{data / "keys" / "demo" / "trusted"}"\naudit_dir = "audit"\ncontrol_socket = "d.sock"\n'
        'mode = "bench"\npoll_period_s = 0.5\ndeadman_s = 0\n\n[[pumps]]\nid = "bed-1"\nurl = "sim://bed-1"\n',
        encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "DRIVERD_"))}
    env["DRIVERD_CONFIG"] = str(config)
    daemon = subprocess.Popen([str(venv_bin / "driverd"), "run", "--json"], cwd=outside, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert daemon.stderr is not None
        for line in daemon.stderr:  # the daemon logs JSON lines; ready once the socket listens
            if '"daemon_ready"' in line:
                break
        else:
            pytest.fail(f"daemon exited before ready: {daemon.wait()}")
        status = subprocess.run([str(venv_bin / "driverd"), "status", "--json"], cwd=outside, env=env,
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stdout + status.stderr
        assert [p["pump_id"] for p in json.loads(status.stdout)["pumps"]] == ["bed-1"]
    finally:
        daemon.terminate()
        daemon.communicate(timeout=60)  # drains the log so a full pipe cannot hold the daemon up
    assert daemon.returncode == 0
    assert (outside / "audit").is_dir()
