"""A test receiver for outbound HL7 (an integration engine's MLLP listener, reduced to what tests check).

It records every message it receives (the raw text, in arrival order), answers each with an AA ACK naming its
MSH-10 (python-hl7's `create_ack`), and can be told to take the next N messages without answering (the
connection is then closed, as an engine that crashed after reading would), or be stopped and started again on
the same port (an engine outage).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from typing import Any

import hl7
from hl7.mllp import start_hl7_server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def control_id(text: str) -> str:
    return str(hl7.parse(text).segment("MSH")[10])


def message_type(text: str) -> str:
    return str(hl7.parse(text).segment("MSH")[9])


@dataclass
class Receiver:
    port: int = field(default_factory=free_port)
    received: list[str] = field(default_factory=list)
    swallow: int = 0  # the next N messages are read but never ACKed (their connection is closed)
    server: Any = None
    _writers: list[Any] = field(default_factory=list)

    async def start(self) -> None:
        self.server = await start_hl7_server(self._client, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in self._writers:
                with contextlib.suppress(Exception):
                    w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 10)
            self.server = None
            self._writers.clear()

    async def _client(self, reader: Any, writer: Any) -> None:
        self._writers.append(writer)
        try:
            while True:
                text = (await reader.readblock()).decode("utf-8")
                self.received.append(text)
                if self.swallow > 0:
                    self.swallow -= 1
                    writer.close()
                    return
                # The ACK needs only the MSH (parsing whole messages would make this receiver the bottleneck).
                writer.writemessage(hl7.parse(text.split("\r", 1)[0]).create_ack("AA"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def control_ids(self) -> list[str]:
        return [control_id(t) for t in self.received]

    def unique(self) -> list[str]:
        """The received messages with repeats of an MSH-10 removed (the receiver's dedupe), in arrival order."""
        seen: set[str] = set()
        out = []
        for t in self.received:
            cid = control_id(t)
            if cid not in seen:
                seen.add(cid)
                out.append(t)
        return out
