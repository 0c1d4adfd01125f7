"""systemd/driverd.service: required settings, `systemd-analyze verify` clean, `security` exposure <= 2.0,
and the figure recorded in docs/operations.md matches what systemd-analyze reports."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "driverd.service"
SYSUSERS = REPO / "systemd" / "driverd.sysusers.conf"
OPERATIONS = REPO / "docs" / "operations.md"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this machine")
MAX_EXPOSURE = 2.0


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def one(key: str) -> str:
    values = settings()[key]
    assert len(values) == 1, f"{key} set {len(values)} times"
    return values[0]


def test_unit_has_the_required_service_settings() -> None:
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("Restart") == "on-failure"
    assert re.fullmatch(r"\d+s", one("WatchdogSec"))
    assert int(one("StartLimitBurst")) >= 1 and int(one("StartLimitIntervalSec")) > 0
    assert one("User") == "driverd" and one("Group") == "driverd"
    assert one("ExecStart").endswith("driverd run --config /etc/driverd/driverd.toml")


def test_unit_hardening() -> None:
    s = settings()
    assert one("ProtectSystem") == "strict"
    assert one("NoNewPrivileges") == "yes"
    assert one("CapabilityBoundingSet") == ""  # no capabilities at all
    assert one("DevicePolicy") == "closed"
    allowed = {v.split()[0] for v in s["DeviceAllow"]}
    assert allowed == {"char-ttyUSB", "char-ttyACM", "char-ttyS"}  # serial ports only
    assert set(one("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    for key in ("ProtectHome", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
                "RestrictNamespaces", "RestrictSUIDSGID", "LockPersonality", "MemoryDenyWriteExecute"):
        assert one(key) == "yes", key
    assert one("RuntimeDirectory") == "driverd"  # /run/driverd holds the control socket


def test_example_config_paths_match_the_unit() -> None:
    text = (REPO / "config" / "driverd.example.toml").read_text(encoding="utf-8")
    assert 'control_socket = "/run/driverd/driverd.sock"' in text  # RuntimeDirectory=driverd
    assert 'audit_dir = "/var/lib/driverd/audit"' in text  # StateDirectory=driverd (writable under strict)
    assert "u driverd -" in SYSUSERS.read_text(encoding="utf-8")


def _unit_for_verify(tmp_path: Path) -> Path:
    """A copy whose ExecStart points at an executable that exists here (verify checks it; the real path
    /opt/driverd/bin/driverd exists only on an installed host)."""
    exe = Path(sys.executable).parent / "driverd"
    assert exe.exists(), exe
    text = UNIT.read_text(encoding="utf-8").replace("/opt/driverd/bin/driverd", str(exe))
    path = tmp_path / "driverd.service"
    path.write_text(text, encoding="utf-8")
    return path


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    assert ANALYZE is not None
    res = subprocess.run([ANALYZE, "verify", "--man=no", str(_unit_for_verify(tmp_path))],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr


def exposure() -> float:
    assert ANALYZE is not None
    res = subprocess.run([ANALYZE, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", str(UNIT)],
                         capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for driverd\.service: (\d+\.\d)", res.stdout)
    assert match, res.stdout + res.stderr
    assert res.returncode == 0, f"exposure above {MAX_EXPOSURE}: {match.group(1)}"
    return float(match.group(1))


@needs_analyze
def test_security_exposure_at_most_2() -> None:
    assert exposure() <= MAX_EXPOSURE


@needs_analyze
def test_operations_doc_records_the_measured_exposure() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    match = re.search(r"overall exposure level(?: of)? \**(\d+\.\d)", text, re.IGNORECASE)
    assert match, "docs/operations.md must record the systemd-analyze security figure"
    assert float(match.group(1)) == exposure()
