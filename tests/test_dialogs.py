"""Dialog scripts (``C:`` client lines, ``S:`` expected server lines) played twice:
in memory through the real transport and session objects, and over TCP.

Consecutive ``C:`` lines go out in one write (pipelining); ``S:`` lines are
matched with ``*`` as the only wildcard. ``\\n`` and ``\\r`` in a client line send a
bare LF or CR.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from ehlo import Server
from ehlo.policy import Hooks
from ehlo.server import ServerContext, tls_contexts_for
from ehlo.server._transport import SMTPServerProtocol
from ehlo.storage import open_store

from .helpers import Client, async_wait_until, make_config

DIALOGS = sorted((Path(__file__).parent / "dialogs").glob("*.dialog"))

Step = tuple[str, list[str]]


def load(path: Path) -> list[Step]:
    steps: list[Step] = []
    for raw in path.read_text("utf-8").splitlines():
        if raw.startswith("#") or not raw.strip():
            continue
        kind, _, text = raw.partition(":")
        text = text[1:] if text.startswith(" ") else text
        if kind == "C":
            text = text.replace("\\n", "\n").replace("\\r", "\r")
        if steps and steps[-1][0] == kind:
            steps[-1][1].append(text)
        else:
            steps.append((kind, [text]))
    return steps


def check(expected: list[str], got: list[str], where: str) -> None:
    assert len(got) == len(expected), (where, got)
    for pattern, line in zip(expected, got, strict=True):
        regex = ".*".join(re.escape(part) for part in pattern.split("*"))
        assert re.fullmatch(regex, line), f"{where}: {line!r} !~ {pattern!r}"


class MemoryTransport(asyncio.Transport):
    """Collects what the server writes; no socket underneath."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.9", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def read_lines(source: bytearray, count: int) -> list[str]:
    await async_wait_until(
        lambda: source.count(b"\r\n") >= count,
        lambda: f"{count} lines, have {bytes(source)!r}",
        timeout=10.0,
        poll=0.005,
    )
    lines = source.split(b"\r\n")[:count]
    del source[: sum(len(x) + 2 for x in lines)]
    return [x.decode("utf-8") for x in lines]


@pytest.mark.parametrize("path", DIALOGS, ids=[p.stem for p in DIALOGS])
async def test_dialog_in_memory(path: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, reverse_dns=False)
    store = open_store("sqlite", tmp_path)
    await store.start()
    ctx = ServerContext(config, store, Hooks(), tls_contexts_for(config))
    transport = MemoryTransport()
    proto = SMTPServerProtocol(ctx)
    proto.connection_made(transport)
    try:
        for kind, lines in load(path):
            if kind == "C":
                proto.data_received("".join(x + "\r\n" for x in lines).encode("utf-8"))
            else:
                check(lines, await read_lines(transport.out, len(lines)), path.name)
        # Nothing more is written: an absence, which only a wait can show.
        await asyncio.sleep(0.01)
        assert transport.out == b"", bytes(transport.out)
    finally:
        proto.connection_lost(None)
        await store.close()


@pytest.mark.parametrize("path", DIALOGS, ids=[p.stem for p in DIALOGS])
async def test_dialog_over_tcp(path: Path, tmp_path: Path) -> None:
    async with Server(make_config(tmp_path)) as server:
        c = await Client.connect(server, banner=False)
        try:
            for kind, lines in load(path):
                if kind == "C":
                    c.send("".join(x + "\r\n" for x in lines))
                    await c.writer.drain()
                else:
                    check(lines, [await c.replies.line() for _ in lines], path.name)
        finally:
            c.close()


async def test_smuggled_commands_stay_in_one_message(tmp_path: Path) -> None:
    path = Path(__file__).parent / "dialogs" / "smuggling.dialog"
    async with Server(make_config(tmp_path)) as server:
        c = await Client.connect(server, banner=False)
        for kind, lines in load(path):
            if kind == "C":
                c.send("".join(x + "\r\n" for x in lines))
            else:
                for _ in lines:
                    await c.replies.line()
        c.close()
        stored = server.store.list()
        assert len(stored) == 1
        raw = server.store.raw(stored[0].envelope.queue_id)
        assert raw is not None
        assert b"\r\n.\r\nMAIL FROM:<evil@example.com>\r\n.\r\nRCPT TO:<victim" in raw
