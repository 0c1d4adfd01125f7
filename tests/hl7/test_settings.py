"""`[hl7]` in driverd.toml: off by default, strict, every error names the key and the rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from driverd.core.errors import ConfigError
from driverd.hl7.settings import Address, parse_address
from driverd.runtime.config import parse_config

BASE = """
[daemon]
protocol = "p.toml"
audit_dir = "audit"
trust_dir = "trusted"
control_socket = "ctl.sock"

[[pumps]]
id = "bed-1"
url = "sim://bed-1"
"""


def load(extra: str = "") -> object:
    return parse_config((BASE + extra).encode(), Path("/etc/driverd/driverd.toml"))


def problems(extra: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load(extra)
    return [(p.path, p.rule) for p in info.value.problems]


def test_off_unless_configured() -> None:
    assert load().hl7 is None  # type: ignore[attr-defined]


def test_a_full_section() -> None:
    cfg = load('[hl7]\norders_listen = "127.0.0.1:2575"\nobservations_to = "[::1]:6661"\n'
               'observation_period_s = 30\nsending_facility = "WARD-7"\nqueue_dir = "q"\n')
    h = cfg.hl7  # type: ignore[attr-defined]
    assert h.orders_listen == Address("127.0.0.1", 2575)
    assert h.observations_to == Address("::1", 6661) and str(h.observations_to) == "[::1]:6661"
    assert h.observation_period_s == 30.0 and h.sending_facility == "WARD-7"
    assert h.queue_dir == Path("/etc/driverd/q")


def test_the_queue_lives_next_to_the_audit_log_by_default() -> None:
    h = load('[hl7]\nobservations_to = "127.0.0.1:6661"\n').hl7  # type: ignore[attr-defined]
    assert h.queue_dir == Path("/etc/driverd/hl7") and h.orders_listen is None


@pytest.mark.parametrize(("line", "key", "rule"), [
    ('orders_listen = ":2575"', "hl7.orders_listen", "address"),  # no implicit "every interface"
    ('orders_listen = "127.0.0.1"', "hl7.orders_listen", "address"),
    ('orders_listen = "127.0.0.1:0"', "hl7.orders_listen", "address"),
    ('orders_listen = "127.0.0.1:65536"', "hl7.orders_listen", "address"),
    ('observations_to = "ho st:1"', "hl7.observations_to", "address"),
    ('observations_to = "[zz]:1"', "hl7.observations_to", "address"),
    ("observations_to = 6661", "hl7.observations_to", "address"),
    ("observation_period_s = 0", "hl7.observation_period_s", "range"),
    ("observation_period_s = true", "hl7.observation_period_s", "range"),
    ('observation_period_s = "60"', "hl7.observation_period_s", "range"),
    ("max_frame_bytes = 10", "hl7.max_frame_bytes", "range"),
    ("max_connections = 1.5", "hl7.max_connections", "range"),
    ('sending_application = "A|B"', "hl7.sending_application", "format"),
    ('sending_facility = ""', "hl7.sending_facility", "format"),
    ('receiving_application = "x^y"', "hl7.receiving_application", "format"),
    ('tls_ca = "a\\u0000b"', "hl7.tls_ca", "path"),
    ('tls_cert = "c.pem"', "hl7.tls_key", "consistency"),
    ("listen = 1", "hl7.listen", "unknown-key"),
])
def test_malformed_values_name_the_key_and_the_rule(line: str, key: str, rule: str) -> None:
    assert (key, rule) in problems(f"[hl7]\n{line}\n")


def test_not_a_table() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(('hl7 = "on"\n' + BASE).encode(), Path("/etc/driverd/driverd.toml"))
    assert ("hl7", "type") in [(p.path, p.rule) for p in info.value.problems]


@pytest.mark.parametrize("text", ["localhost:2575", "10.1.2.3:1", "[::1]:65535", "engine.ward-7.example:6661"])
def test_addresses(text: str) -> None:
    problems_: list = []
    assert parse_address(text, "k", problems_) is not None and not problems_


@pytest.mark.parametrize("mutual", [False, True])
def test_the_configured_tls_contexts_talk_to_each_other(tmp_path: Path, mutual: bool) -> None:
    """What `[hl7] tls_*` builds: the listener's context (our certificate; with tls_ca, client certificates
    required) and the sender's (verifying the engine with tls_ca; with tls_cert, presenting ours)."""
    import asyncio

    from hl7.mllp import open_hl7_connection

    from driverd.hl7.mllp import serve_orders
    from driverd.hl7.settings import Hl7Settings
    from tests.hl7.test_mllp import self_signed

    cert, key = self_signed(tmp_path)
    server_side = Hl7Settings(queue_dir=tmp_path, tls_cert=cert, tls_key=key, tls_ca=cert if mutual else None)
    client_side = Hl7Settings(queue_dir=tmp_path, tls_ca=cert, tls_cert=cert if mutual else None,
                              tls_key=key if mutual else None)
    assert server_side.server_ssl() is not None and client_side.client_ssl() is not None
    assert Hl7Settings(queue_dir=tmp_path).server_ssl() is None and Hl7Settings(queue_dir=tmp_path).client_ssl() is None

    async def echo(text: str, send: object) -> None:
        await send(text)  # type: ignore[operator]

    async def main() -> str:
        async with await serve_orders(echo, "127.0.0.1", 0, ssl_context=server_side.server_ssl()) as server:
            reader, writer = await open_hl7_connection("127.0.0.1", server.port, ssl=client_side.client_ssl())
            writer.writeblock(b"MSH|^~\\&|A|B|C|D|20260101||ACK|X1|P|2.6\r")
            await writer.drain()
            got = (await asyncio.wait_for(reader.readblock(), 30)).decode()
            writer.close()
            return got

    assert asyncio.run(main()).startswith("MSH|")
