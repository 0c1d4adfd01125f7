"""`driverd config check`: a config and everything it names, checked without starting anything (like `nginx -t`).

Good configs exit 0 (warnings allowed); each problem is named by field and rule and exits 1; usage errors exit 2.
Nothing is created: no audit directory, no socket, no port.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from driverd import resources
from driverd.cli.main import app
from driverd.signing import generate_keypair

runner = CliRunner()


def check(*args: str | Path, env: dict[str, str | None] | None = None) -> Result:
    base: dict[str, str | None] = {"DRIVERD_CONFIG": None, "DRIVERD_SOCKET": None}
    result = runner.invoke(app, ["config", "check", *[str(a) for a in args]], env={**base, **(env or {})})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def check_json(config: Path) -> tuple[int, dict[str, Any]]:
    r = check("--config", config, "--json")
    return r.exit_code, json.loads(r.stdout)


def rules(findings: list[dict[str, str]]) -> set[tuple[str, str]]:
    return {(f["path"], f["rule"]) for f in findings}


def write_config(tmp_path: Path, *, daemon: dict[str, str] | None = None, pumps: str | None = None,
                 extra: str = "", name: str = "driverd.toml") -> Path:
    """A production config in tmp_path: its own trust store and audit key, loopback pumps."""
    keys = tmp_path / "keys"
    if not keys.exists():
        generate_keypair(keys, "ward")
        generate_keypair(keys, "audit")
        (tmp_path / "trusted").mkdir(mode=0o755)
        (tmp_path / "trusted" / "ward.pub").write_bytes((keys / "ward.pub").read_bytes())
    settings = {"protocol": str(resources.PROTOCOL), "trust_dir": "trusted", "audit_dir": "state/audit",
                "audit_key": "keys/audit.key", "control_socket": "run/driverd.sock", "mode": "production",
                **(daemon or {})}
    lines = ["[daemon]", *(f'{k} = "{v}"' for k, v in settings.items() if v is not None)]
    pumps = pumps if pumps is not None else ('[[pumps]]\nid = "bed-1"\nurl = "newera+socket://127.0.0.1:7001"\n'
                                             '[[pumps]]\nid = "bed-2"\nurl = "modbus+tcp://127.0.0.1:5020?unit=1"\n')
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n" + extra + "\n" + pumps, encoding="utf-8")
    return path


# --- good configs --------------------------------------------------------------------------------------------


def test_good_production_config_passes_clean(tmp_path: Path) -> None:
    code, body = check_json(write_config(tmp_path))
    assert code == 0, body
    assert body["ok"] is True and body["mode"] == "production"
    assert body["problems"] == [] and body["warnings"] == []
    fields = [c["field"] for c in body["checked"]]
    assert fields == ["config", "daemon.protocol", "daemon.trust_dir", "daemon.audit_key", "daemon.audit_dir",
                      "daemon.control_socket", "pumps[0].url", "pumps[1].url"]
    # Nothing was started or created.
    assert not (tmp_path / "state").exists() and not (tmp_path / "run").exists()


def test_good_config_text_output(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    r = check("--config", config)
    assert r.exit_code == 0
    assert "ok       daemon.protocol" in r.stdout
    assert "drug library ketamine-burst" in r.stdout
    assert r.stdout.rstrip().endswith("test is successful (0 error(s), 0 warning(s))")


def test_shipped_bench_config_passes_with_its_warnings(tmp_path: Path) -> None:
    """The shipped bench config trusts the published demo key and signs nothing: both are warnings, exit 0."""
    code, body = check_json(resources.BENCH_CONFIG)
    assert code == 0, body
    assert body["mode"] == "bench"
    assert rules(body["warnings"]) == {("daemon.trust_dir", "demo-key-trusted"),
                                       ("daemon.audit_key", "audit-unsigned")}
    assert "85ae298ab8d11af0" in body["warnings"][0]["detail"] + body["warnings"][1]["detail"]


def test_demo_key_trusted_in_production_is_a_loud_warning(tmp_path: Path) -> None:
    config = write_config(tmp_path, daemon={"trust_dir": str(resources.DEMO_TRUST_DIR)})
    r = check("--config", config)
    assert r.exit_code == 0  # the daemon starts with it too, warning; the check says so just as loudly
    assert "warning  daemon.trust_dir [demo-key-trusted]" in r.stdout
    assert "NOT FOR CLINICAL USE" in r.stdout


# --- the config file itself ----------------------------------------------------------------------------------


def test_missing_config_is_exit_1_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    r = check("--config", missing)
    assert r.exit_code == 1
    assert f"error    config [readable] {missing}: No such file or directory" in r.stdout
    code, body = check_json(missing)
    assert code == 1 and body["ok"] is False and body["config"] == str(missing)
    assert body["problems"] == [{"path": "config", "rule": "readable",
                                 "detail": f"{missing}: No such file or directory"}]


def test_config_that_is_a_directory(tmp_path: Path) -> None:
    code, body = check_json(tmp_path)
    assert code == 1 and rules(body["problems"]) == {("config", "readable")}


@pytest.mark.parametrize(("text", "expected"), [
    ("[daemon\nprotocol = 1", ("config", "toml")),
    ("x = ", ("config", "toml")),
    ("[pumps]\n", ("daemon", "required")),
    ('[daemon]\nprotocol = "p"\nbogus = 1\n', ("daemon.bogus", "unknown-key")),
    ('[daemon]\nprotocol = 5\n', ("daemon.protocol", "type")),
])
def test_malformed_config_names_field_and_rule(tmp_path: Path, text: str, expected: tuple[str, str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text, encoding="latin-1")
    code, body = check_json(config)
    assert code == 1
    assert expected in rules(body["problems"])
    assert body["checked"] == []


def test_non_utf8_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_bytes(b"[daemon]\nprotocol = \"\xff\"\n")
    code, body = check_json(config)
    assert code == 1 and ("config", "encoding") in rules(body["problems"])


# --- what the config names -----------------------------------------------------------------------------------


def test_unknown_driver_scheme(tmp_path: Path) -> None:
    config = write_config(tmp_path, pumps='[[pumps]]\nid = "bed-1"\nurl = "graseby+serial:///dev/ttyS0"\n')
    code, body = check_json(config)
    assert code == 1
    [problem] = body["problems"]
    assert (problem["path"], problem["rule"]) == ("pumps[0].url.scheme", "known-driver")
    assert "no driver 'graseby'" in problem["detail"] and "modbus" in problem["detail"]


@pytest.mark.parametrize(("url", "field", "rule"), [
    ("modbus+tcp://127.0.0.1:5020?unit=999", "pumps[0].url.unit", "range"),
    ("newera+socket://127.0.0.1:7001?bogus=1", "pumps[0].url.bogus", "unknown-parameter"),
    ("modbus+tcp://127.0.0.1:5020?bogus=1", "pumps[0].url.bogus", "unknown-parameter"),
    ("newera+carrier-pigeon://x", "pumps[0].url.transport", "enum"),
    ("sim://bed-1?x=1", "pumps[0].url.x", "unknown-parameter"),
    ("not-a-url", "pumps[0].url", "format"),
])
def test_bad_driver_url(tmp_path: Path, url: str, field: str, rule: str) -> None:
    config = write_config(tmp_path, pumps=f'[[pumps]]\nid = "bed-1"\nurl = "{url}"\n')
    code, body = check_json(config)
    assert code == 1
    assert (field, rule) in rules(body["problems"]), body["problems"]


def test_modbus_map_that_cannot_be_read(tmp_path: Path) -> None:
    url = f"modbus+tcp://127.0.0.1:5020?unit=1&map={tmp_path / 'missing-map.toml'}"
    code, body = check_json(write_config(tmp_path, pumps=f'[[pumps]]\nid = "bed-1"\nurl = "{url}"\n'))
    assert code == 1
    assert [p["path"] for p in body["problems"]] == ["pumps[0].url"]
    assert "missing-map.toml" in body["problems"][0]["detail"]


def test_missing_serial_device_is_a_warning(tmp_path: Path) -> None:
    device = tmp_path / "ttyUSB9"
    config = write_config(tmp_path, pumps=f'[[pumps]]\nid = "bed-1"\nurl = "newera+serial://{device}"\n')
    code, body = check_json(config)
    assert code == 0
    assert rules(body["warnings"]) == {("pumps[0].url", "device")}
    assert str(device) in body["warnings"][0]["detail"]


def test_missing_audit_key_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, daemon={"audit_key": "keys/nope.key"})
    code, body = check_json(config)
    assert code == 1
    [problem] = body["problems"]
    assert (problem["path"], problem["rule"]) == ("daemon.audit_key", "key")
    assert str(tmp_path / "keys" / "nope.key") in problem["detail"]


def test_audit_key_that_is_a_public_key(tmp_path: Path) -> None:
    code, body = check_json(write_config(tmp_path, daemon={"audit_key": "keys/audit.pub"}))
    assert code == 1 and ("daemon.audit_key", "key") in rules(body["problems"])


def test_no_audit_key_is_a_warning(tmp_path: Path) -> None:
    code, body = check_json(write_config(tmp_path, daemon={"audit_key": None}))
    assert code == 0 and rules(body["warnings"]) == {("daemon.audit_key", "audit-unsigned")}


def test_missing_protocol(tmp_path: Path) -> None:
    code, body = check_json(write_config(tmp_path, daemon={"protocol": "nope.toml"}))
    assert code == 1
    assert body["problems"] == [{"path": "daemon.protocol", "rule": "readable",
                                 "detail": f"{tmp_path / 'nope.toml'}: No such file or directory"}]


def test_malformed_protocol_names_its_fields(tmp_path: Path) -> None:
    bad = tmp_path / "lib.toml"
    bad.write_text(resources.PROTOCOL.read_text(encoding="utf-8").replace("[dose]", "[dosage]", 1),
                   encoding="utf-8")
    code, body = check_json(write_config(tmp_path, daemon={"protocol": "lib.toml"}))
    assert code == 1
    assert all(p["path"].startswith("daemon.protocol: ") for p in body["problems"])
    assert {("daemon.protocol: dosage", "unknown-key"), ("daemon.protocol: dose", "required")} <= \
        rules(body["problems"])


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "private-key-as-pub"])
def test_bad_trust_store(tmp_path: Path, case: str) -> None:
    trust = tmp_path / "t"
    if case != "missing":
        trust.mkdir()
    if case == "garbage":
        (trust / "x.pub").write_text("not a key\n", encoding="utf-8")
    config = write_config(tmp_path, daemon={"trust_dir": "t"})
    if case == "private-key-as-pub":
        (trust / "x.pub").write_bytes((tmp_path / "keys" / "ward.key").read_bytes())
    code, body = check_json(config)
    assert code == 1
    assert [p["path"] for p in body["problems"]] == ["daemon.trust_dir"]
    assert body["problems"][0]["rule"] == "trust-store"


def test_world_writable_trust_dir_fails_production_warns_bench(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    os.chmod(tmp_path / "trusted", 0o777)
    code, body = check_json(config)
    assert code == 1 and rules(body["problems"]) == {("daemon.trust_dir", "file-mode")}
    bench = write_config(tmp_path, daemon={"mode": "bench"}, name="bench.toml")
    code, body = check_json(bench)
    assert code == 0 and ("daemon.trust_dir", "file-mode") in rules(body["warnings"])


def test_group_readable_audit_key_fails_production(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    os.chmod(tmp_path / "keys" / "audit.key", 0o640)
    code, body = check_json(config)
    assert code == 1 and rules(body["problems"]) == {("daemon.audit_key", "file-mode")}


def test_audit_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("", encoding="utf-8")
    code, body = check_json(write_config(tmp_path))
    assert code == 1 and rules(body["problems"]) == {("daemon.audit_dir", "directory")}


def test_control_socket_path_taken_by_a_file(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "driverd.sock").write_text("", encoding="utf-8")
    code, body = check_json(write_config(tmp_path))
    assert code == 1 and rules(body["problems"]) == {("daemon.control_socket", "socket")}


def test_existing_socket_is_fine_and_untouched(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "driverd.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        code, body = check_json(write_config(tmp_path))
        assert code == 0, body
        assert path.is_socket()


def test_audit_dir_under_a_file_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("", encoding="utf-8")
    code, body = check_json(write_config(tmp_path, daemon={"audit_dir": "blocker/deeper/audit"}))
    assert code == 1 and rules(body["problems"]) == {("daemon.audit_dir", "directory")}
    assert f"{tmp_path / 'blocker'} is not a directory" in body["problems"][0]["detail"]


def test_hl7_tls_files(tmp_path: Path) -> None:
    extra = '[hl7]\nobservations_to = "127.0.0.1:6661"\ntls_ca = "ca.pem"\n'
    code, body = check_json(write_config(tmp_path, extra=extra))
    assert code == 1 and rules(body["problems"]) == {("hl7.tls_ca", "readable")}
    (tmp_path / "ca.pem").write_text("not a certificate\n", encoding="utf-8")
    code, body = check_json(write_config(tmp_path, extra=extra))
    assert code == 1 and rules(body["problems"]) == {("hl7.tls_ca", "tls")}


def test_every_problem_is_reported_not_only_the_first(tmp_path: Path) -> None:
    config = write_config(tmp_path, daemon={"protocol": "nope.toml", "audit_key": "keys/nope.key", "trust_dir": "t"},
                          pumps='[[pumps]]\nid = "bed-1"\nurl = "graseby+serial:///dev/ttyS0"\n')
    code, body = check_json(config)
    assert code == 1
    assert {p["path"] for p in body["problems"]} == {"daemon.protocol", "daemon.audit_key", "daemon.trust_dir",
                                                      "pumps[0].url.scheme"}
    r = check("--config", config)
    assert r.stdout.rstrip().endswith("test failed (4 error(s), 0 warning(s))")


# --- usage ---------------------------------------------------------------------------------------------------


def test_usage_errors_are_exit_2() -> None:
    assert check("--bogus").exit_code == 2
    assert check("--config").exit_code == 2  # the option needs a value
    assert runner.invoke(app, ["config"]).exit_code == 2  # no subcommand: help, usage


def test_data_dir_prints_the_shipped_data() -> None:
    r = runner.invoke(app, ["config", "data-dir"])
    assert r.exit_code == 0 and Path(r.stdout.strip()) == resources.DATA_DIR
    assert (Path(r.stdout.strip()) / "protocols" / "ketamine-burst.toml").is_file()
    body = json.loads(runner.invoke(app, ["config", "data-dir", "--json"]).stdout)
    assert body == {"ok": True, "data_dir": str(resources.DATA_DIR)}
