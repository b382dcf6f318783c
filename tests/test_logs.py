"""The server's log as an operator reads it: real servers, real clients, both formats.

Each test captures the ``ehlo`` loggers through two handlers, one with the
text formatter and one with the JSON formatter (what ``ehlo serve --log-format``
installs), and reads what a session wrote: one session id and the client port
on every line, each refused command once, the message line's facts (all
recipients, TLS, AUTH, the greeting's checks). Also the replies whose text
was fixed with them (the greeting reply, the pipelining refusal) and the SPF
temporary error's detail.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ehlo import Server
from ehlo.config import GreetingConfig
from ehlo.dns import DNSCache, Resolver
from ehlo.greeting.spf import spf_helo
from ehlo.log import JSONFormatter, TextFormatter

from . import greeting_zone as zone
from .dnsserver import DNSServer
from .helpers import Client, make_config, queued_id
from .test_auth_limits import users_data
from .test_cli import serving
from .test_greeting_server import connect as connect_from
from .test_security_auth import plain

greeting_dns = zone.greeting_dns

BODY = "Subject: logs\r\n\r\nhello\r\n."


class Captured:
    """The lines the ``ehlo`` loggers wrote, as text lines and as JSON objects."""

    def __init__(self) -> None:
        self.text_stream = io.StringIO()
        self.json_stream = io.StringIO()

    def text(self) -> list[str]:
        return self.text_stream.getvalue().splitlines()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.json_stream.getvalue().splitlines()]

    def lines(self, word: str) -> list[str]:
        """Text lines whose message starts with ``word`` (after timestamp and level)."""
        return [line for line in self.text() if line.split(" ", 3)[2:3] == [word]]


@pytest.fixture
def logs() -> Iterator[Captured]:
    captured = Captured()
    handlers = []
    for stream, formatter in (
        (captured.text_stream, TextFormatter()),
        (captured.json_stream, JSONFormatter()),
    ):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        handlers.append(handler)
    logger = logging.getLogger("ehlo")
    level = logger.level
    logger.setLevel(logging.INFO)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield captured
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
        logger.setLevel(level)


def fields(line: str) -> dict[str, str]:
    """The ``key=value`` fields of a text line (quoted values unquoted)."""
    found = {}
    for match in re.finditer(r'(?:^| )([a-z_]+)=("(?:[^"\\]|\\.)*"|\S*)', line):
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        found[match.group(1)] = value
    return found


async def start(tmp_path: Path, **overrides: Any) -> Server:
    server = Server(make_config(tmp_path / "data", **overrides))
    await server.start()
    return server


# ----------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("overrides", "commands", "refused", "expected"),
    [
        # Relaying denied: a recipient outside the accepted domains.
        (
            {"domains": ("example.org",)},
            ["MAIL FROM:<a@example.net>"],
            "RCPT TO:<x@elsewhere.test>",
            {
                "cmd": "RCPT",
                "rcpt": "<x@elsewhere.test>",
                "from": "<a@example.net>",
                "reply": "550 5.7.1",
            },
        ),
        # Submission mode: MAIL before AUTH.
        (
            {"submission": True},
            [],
            "MAIL FROM:<a@example.net>",
            {"cmd": "MAIL", "from": "<a@example.net>", "reply": "530 5.7.0"},
        ),
        # require_tls: MAIL before STARTTLS.
        (
            {"require_tls": True},
            [],
            "MAIL FROM:<a@example.net>",
            {"cmd": "MAIL", "from": "<a@example.net>", "reply": "530 5.7.0"},
        ),
        # Answered by the protocol core: RCPT before MAIL.
        (
            {},
            [],
            "RCPT TO:<b@example.org>",
            {"cmd": "RCPT", "reply": "503 5.5.1", "fault": "command out of sequence"},
        ),
    ],
    ids=["relaying-denied", "submission-530", "require-tls-530", "core-503"],
)
async def test_a_refused_command_is_logged_once(
    tmp_path: Path,
    logs: Captured,
    overrides: dict[str, Any],
    commands: list[str],
    refused: str,
    expected: dict[str, str],
) -> None:
    server = await start(tmp_path, **overrides)
    try:
        c = await Client.connect(server)
        try:
            await c.ehlo()
            for command in commands:
                assert (await c.cmd(command)).code == 250
            r = await c.cmd(refused)
            assert f"{r.code} {r.enhanced}" == expected["reply"], r
            assert (await c.cmd("QUIT")).code == 221
        finally:
            c.close()
    finally:
        await server.stop(timeout=1.0)
    lines = logs.lines("refused")
    assert len(lines) == 1, logs.text()
    found = fields(lines[0])
    # The reply's code and enhanced code, as a client reads them, one logfmt value.
    found["reply"] = re.search(r' reply="(\d{3} \d\.\d+\.\d+)" ', lines[0]).group(1)  # type: ignore[union-attr]
    assert {key: found.get(key) for key in expected} == expected, lines[0]
    assert " INFO " in lines[0]
    [record] = [r for r in logs.records() if r.get("event") == "refused"]
    assert record["verb"] == expected["cmd"] and record["reply"].startswith(expected["reply"])
    assert record["session"] == found["session"]


async def test_a_violation_that_drops_the_client_is_logged_once(
    tmp_path: Path, logs: Captured
) -> None:
    server = await start(tmp_path, pipelining_violation="reject")
    try:
        c = await Client.connect(server)
        try:
            await c.ehlo()
            c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nNOOP\r\n")
            assert [(await c.reply()).code for _ in range(3)] == [250, 250, 554]
            await c.expect_eof()
        finally:
            c.close()
    finally:
        await server.stop(timeout=1.0)
    assert logs.lines("refused") == []  # the violation's own line says it
    [violation] = [line for line in logs.text() if "protocol violation" in line]
    [connect] = logs.lines("connect")
    assert fields(violation)["session"] == fields(connect)["session"], violation


# --------------------------------------------------------------- session ids


async def test_one_session_id_per_session_and_two_sessions_told_apart(
    tmp_path: Path, logs: Captured
) -> None:
    server = await start(tmp_path, domains=("example.org",))
    try:
        a = await Client.connect(server)
        b = await Client.connect(server)
        try:
            await a.ehlo("same.example")
            await b.ehlo("same.example")
            assert (await a.cmd("MAIL FROM:<a@example.org>")).code == 250
            assert (await b.cmd("MAIL FROM:<b@example.org>")).code == 250
            assert (await a.cmd("RCPT TO:<x@elsewhere.test>")).code == 550
            assert (await b.cmd("RCPT TO:<y@elsewhere.test>")).code == 550
            assert (await a.cmd("RCPT TO:<c@example.org>")).code == 250
            assert (await a.cmd("DATA")).code == 354
            queued_id(await a.cmd(BODY))
            assert (await a.cmd("QUIT")).code == 221
            assert (await b.cmd("QUIT")).code == 221
            await a.expect_eof()
            await b.expect_eof()
        finally:
            a.close()
            b.close()
        ports = {a.writer.get_extra_info("sockname")[1], b.writer.get_extra_info("sockname")[1]}
        # Both sessions' disconnect lines are in before the server stops.
        for _ in range(200):
            if len(logs.lines("disconnect")) == 2:
                break
            await asyncio.sleep(0.01)
    finally:
        await server.stop(timeout=1.0)

    # Text: every line of a session names it, and the client's port.
    session_lines = [
        line for line in logs.text() if line.split(" ", 3)[2] in
        ("connect", "greeting", "refused", "message", "disconnect")
    ]  # fmt: skip
    by_session: dict[str, list[str]] = {}
    for line in session_lines:
        assert line.split(" ")[3].startswith("session="), line  # the second field
        by_session.setdefault(fields(line)["session"], []).append(line)
    assert len(by_session) == 2, session_lines
    seen_ports = set()
    for lines in by_session.values():
        words = [line.split(" ", 3)[2] for line in lines]
        assert words[0] == "connect" and words[-1] == "disconnect", lines
        peers = {re.search(r" 127\.0\.0\.1:(\d+)", line).group(1) for line in lines}  # type: ignore[union-attr]
        assert len(peers) == 1, lines
        seen_ports |= {int(p) for p in peers}
    assert seen_ports == ports
    # The one that sent a message has its message line; both have one refusal.
    assert sorted(words.count("refused") for words in (
        [line.split(" ", 3)[2] for line in lines] for lines in by_session.values()
    )) == [1, 1]  # fmt: skip

    # JSON: the same sessions, with the client's port as a field of its own.
    records = [r for r in logs.records() if r.get("logger") == "ehlo.session"]
    assert records and all("session" in r and "client_port" in r for r in records), records
    json_sessions: dict[str, set[int]] = {}
    for record in records:
        json_sessions.setdefault(record["session"], set()).add(record["client_port"])
    assert set(json_sessions) == set(by_session)
    assert all(len(p) == 1 for p in json_sessions.values())
    assert set().union(*json_sessions.values()) == ports


# ------------------------------------------------------------- message line


async def test_message_line_has_tls_auth_and_every_recipient(
    tmp_path: Path, logs: Captured
) -> None:
    users_data(tmp_path, "data")
    server = await start(tmp_path)
    try:
        c = await Client.connect(server)
        try:
            await c.ehlo()
            await c.starttls()
            await c.ehlo()
            assert (await c.cmd(f"AUTH PLAIN {plain('alice', 'wrong')}")).code == 535
            assert (await c.cmd(f"AUTH PLAIN {plain('alice', 'pw')}")).code == 235
            assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
            for rcpt in ("b@example.org", "c@example.net", '"d e"@example.com'):
                assert (await c.cmd(f"RCPT TO:<{rcpt}>")).code == 250
            assert (await c.cmd("DATA")).code == 354
            queue_id = queued_id(await c.cmd(BODY))
            assert (await c.cmd("QUIT")).code == 221
        finally:
            c.close()
    finally:
        await server.stop(timeout=1.0)
    [line] = logs.lines("message")
    found = fields(line)
    assert found["session"] and queue_id in line.split(" ")
    assert found["to"] == '<b@example.org>,<c@example.net>,<"d e"@example.com>'
    assert found["rcpts"] == "3"
    assert found["tls"].startswith("TLSv1.")
    assert found["auth"] == "alice"
    assert found["from"] == "<a@example.org>"
    assert int(found["size"]) > 0
    [record] = [r for r in logs.records() if r.get("event") == "message"]
    assert record["queue_id"] == queue_id
    assert record["rcpt_to"] == ["b@example.org", "c@example.net", '"d e"@example.com']
    assert record["tls_version"] == found["tls"] and record["auth_user"] == "alice"
    # The failed AUTH is its own line, not a second "refused" one.
    assert logs.lines("refused") == []
    assert len([line for line in logs.lines("auth") if " failed" in line]) == 1


async def test_message_line_has_the_greeting_checks_in_record_mode(
    tmp_path: Path, logs: Captured, greeting_dns: DNSServer
) -> None:
    n = 5
    config = make_config(
        tmp_path / "data",
        dns_servers=(greeting_dns.nameserver,),
        dns_timeout=zone.DNS_TIMEOUT,
        greeting=GreetingConfig(policy="record"),
    )
    server = Server(config)
    await server.start()
    try:
        async with connect_from(server, zone.client_ip(n)) as c:
            assert (await c.last(f"EHLO {zone.MISMATCH}")).startswith("250 ")
            assert (await c.last("MAIL FROM:<a@example.org>")).startswith("250 ")
            assert (await c.last("RCPT TO:<b@example.org>")).startswith("250 ")
            assert (await c.data()).startswith("250 ")
    finally:
        await server.stop(timeout=1.0)
    [line] = logs.lines("message")
    found = fields(line)
    assert found["helo"] == zone.MISMATCH
    assert found["verdict"] == "accept"
    checks = dict(item.split(":") for item in found["checks"].split(","))
    assert checks["forward_match"] == "fail" and checks["iprev"] == "pass", line
    [record] = [r for r in logs.records() if r.get("event") == "message"]
    assert record["greeting_checks"] == checks and record["greeting_verdict"] == "accept"


async def test_no_helo_none_after_starttls(tmp_path: Path, logs: Captured) -> None:
    server = await start(tmp_path)
    try:
        c = await Client.connect(server)
        try:
            await c.ehlo()
            await c.starttls()
            # Before the greeting RFC 3207 asks for after TLS: no name yet.
            assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 503
            assert (await c.cmd("QUIT")).code == 221
        finally:
            c.close()
        for _ in range(200):
            if logs.lines("disconnect"):
                break
            await asyncio.sleep(0.01)
    finally:
        await server.stop(timeout=1.0)
    assert not [line for line in logs.text() if "None" in line], logs.text()
    [refused] = logs.lines("refused")
    assert fields(refused)["helo"] == "-"
    [disconnect] = logs.lines("disconnect")
    assert fields(disconnect)["helo"] == "-"


# ------------------------------------------------------------------ workers


def test_workers_ready_and_stopped_logged_once(tmp_path: Path) -> None:
    with serving(tmp_path, "--workers", "2", "--log-level", "debug") as server:
        # Both workers are serving (each says so at DEBUG), and the supervisor too.
        deadline = time.monotonic() + 15
        while server.stderr().count(" ready on ") < 3:
            assert time.monotonic() < deadline, server.stderr()
            time.sleep(0.05)
        assert server.stop(signal.SIGTERM) == 0
        lines = server.stderr().splitlines()
    ready = [line for line in lines if " INFO " in line and " ready on " in line]
    assert len(ready) == 1 and "2 workers" in ready[0], lines
    assert len([line for line in lines if " DEBUG " in line and " ready on " in line]) == 2
    assert len([line for line in lines if line.endswith(" INFO stopped")]) == 1, lines
    assert len([line for line in lines if " INFO listening on " in line]) == 0, lines
    stopping = [line for line in lines if " INFO SIGTERM received" in line]
    assert len(stopping) == 1, lines


# ------------------------------------------------------------------ replies


async def test_greeting_reply_names_the_address_once(tmp_path: Path) -> None:
    cases = [
        ("HELO [127.0.0.1]", "250 localhost Hello [127.0.0.1]"),
        ("EHLO [127.0.0.1]", "250-localhost Hello [127.0.0.1]"),
        # Another name, or another address, is followed by the client's address.
        ("HELO client.example", "250 localhost Hello client.example [127.0.0.1]"),
        ("HELO [127.0.0.2]", "250 localhost Hello [127.0.0.2] [127.0.0.1]"),
    ]
    server = await start(tmp_path)
    try:
        for greeting, expected in cases:
            c = await Client.connect(server)
            try:
                c.send(greeting + "\r\n")
                raw = await asyncio.wait_for(c.reader.readuntil(b"\r\n"), 5)
                assert raw.decode() == expected + "\r\n"
            finally:
                c.close()
    finally:
        await server.stop(timeout=1.0)


async def test_pipelined_greeting_refusal_has_its_enhanced_code(tmp_path: Path) -> None:
    cases = [
        ("EHLO client.example", "554 5.5.0 Protocol error"),  # the EHLO would offer them
        ("HELO client.example", "554 Protocol error"),  # no enhanced codes in a HELO session
    ]
    server = await start(tmp_path, pipelining_violation="reject")
    try:
        for greeting, expected in cases:
            c = await Client.connect(server)
            try:
                c.send(f"{greeting}\r\nMAIL FROM:<a@example.org>\r\n")
                raw = await asyncio.wait_for(c.reader.read(65536), 5)
                assert raw.decode().startswith(expected + ":"), raw
                await c.expect_eof()
            finally:
                c.close()
    finally:
        await server.stop(timeout=1.0)


async def test_spf_temperror_says_dns_once() -> None:
    with DNSServer({}, behaviours={"silent.test": "drop"}) as dns:
        resolver = Resolver([dns.nameserver], 0.3, cache=DNSCache())
        outcome = await spf_helo(resolver, "127.0.0.5", "silent.test")
    assert outcome.result == "temperror"
    assert "DNS timeout" in outcome.explanation
    assert "DNS DNS" not in outcome.explanation, outcome.explanation
