"""Transcripts: every session's dialogue, kept with each message and in the session log.

A real server on loopback with real clients (smtplib, swaks, raw sockets):
what a message's transcript holds (its session's greeting, TLS and AUTH
lines and its own transaction; bodies and AUTH secrets elided), the
session log (refused sessions, its cap, two worker processes), ``ehlo
messages show --transcript`` and ``GET /api/v1/sessions`` over aiohttp.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import smtplib
import sqlite3
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ehlo.auth import UserStore
from ehlo.server import Server
from ehlo.storage import Store, StoredMessage, list_json, message_json, sqlite_path
from ehlo.web import WebContext, build_app

from .helpers import Client, async_wait_until, client_tls, connect, tool
from .test_cli import run, serving

Start = Callable[..., Awaitable[Server]]
PASSWORD = "transcript-secret-Horse-42"
BODY_MARK = "BODYMARK-never-in-a-transcript"
MESSAGE = f"Subject: transcripts\r\n\r\n{BODY_MARK}\r\n".encode()


def lines_of(stored: StoredMessage) -> list[list[Any]]:
    value = stored.envelope.extra["transcript"]
    assert isinstance(value, list), value
    return value


def texts(lines: list[list[Any]], direction: str | None = None) -> list[str]:
    return [text for _, d, text in lines if direction is None or d == direction]


def no_verify() -> ssl.SSLContext:
    return client_tls()


async def send(port: int, *messages: tuple[str, str], tls: bool = False) -> None:
    """One smtplib session sending ``(recipient, subject)`` messages."""

    def run_client() -> None:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=30) as s:
            s.ehlo()
            if tls:
                s.starttls(context=no_verify())
                s.ehlo()
            for rcpt, subject in messages:
                body = f"Subject: {subject}\r\n\r\n{BODY_MARK} {subject}\r\n".encode()
                s.sendmail("a@example.org", [rcpt], body)

    await asyncio.to_thread(run_client)


async def sessions(store: Store, count: int, limit: int = 100) -> list[dict[str, Any]]:
    """The session log once it holds ``count`` sessions (written in the background)."""
    found: list[dict[str, Any]] = []

    def enough() -> bool:
        found[:] = store.sessions(limit)
        return len(found) >= count

    await async_wait_until(enough, f"{count} sessions in the log", timeout=60)
    return found


# ------------------------------------------------------------ the protocol core

DIALOGUE = (
    b"EHLO client.example\r\n"
    b"AUTH PLAIN c2VjcmV0\r\n"
    b"AUTH LOGIN\r\nc2VjcmV0\r\n"
    b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
    b"Subject: x\r\n\r\n" + BODY_MARK.encode() + b"\r\n.\r\n"
    b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
    b"BDAT 7 LAST\r\nsecret!"
    b"BOGUS \xff\r\n"
    b"QUIT\r\n"
)


def recorded(split: int) -> list[tuple[str, str | bytes]]:
    from .test_protocol_auth import AuthDriver, auth_limits

    driver = AuthDriver(auth_limits(auth_plaintext=True))
    lines: list[tuple[str, str | bytes]] = []
    driver.conn.recorder = lambda direction, text: lines.append((direction, text))
    driver.feed_split(DIALOGUE, split)
    return lines


def test_the_core_records_lines_and_elides_data_and_secrets() -> None:
    lines = recorded(len(DIALOGUE))
    client = [text for d, text in lines if d == "C"]
    assert client == [
        "EHLO client.example",
        "AUTH PLAIN",
        "AUTH LOGIN",
        "MAIL FROM:<a@example.org>",
        "RCPT TO:<b@example.net>",
        "DATA",
        "MAIL FROM:<a@example.org>",
        "RCPT TO:<b@example.net>",
        "BDAT 7 LAST",
        "BOGUS \\xff",
        "QUIT",
    ]
    events = [text for d, text in lines if d == "*"]
    body = len(b"Subject: x\r\n\r\n" + BODY_MARK.encode() + b"\r\n")
    assert events == [
        "AUTH secret elided",
        "AUTH secret elided",
        f"message data elided: {body} octets",
        "message data elided: 7 octets",
    ]
    replies = [text for d, text in lines if d == "S"]
    assert all(isinstance(r, bytes) for r in replies)
    assert replies[0].startswith(b"250-test\r\n") and replies[-1] == b"221 2.0.0 bye\r\n"
    assert b"".join(replies).count(b"\r\n") > len(replies)  # the EHLO reply: many lines
    assert any(r.startswith(b"500 ") for r in replies)  # the core's own replies too
    everything = repr(lines)
    assert "c2VjcmV0" not in everything and "secret!" not in everything
    assert BODY_MARK not in everything
    # However the bytes arrive, the same lines in the same order.
    assert recorded(1) == lines and recorded(7) == lines


# ------------------------------------------------------------ what is recorded


async def test_message_transcript_ehlo_lines_times_and_body_elided(start: Start) -> None:
    server = await start()
    await send(server.addresses[0][1], ("b@example.net", "one"))
    (stored,) = server.store.list()
    lines = lines_of(stored)
    # connect, the banner, the EHLO and each line of its multi-line reply
    assert lines[0][1:] == ["*", f"connect from 127.0.0.1 port {stored.envelope.client_port}"]
    assert lines[1][1] == "S" and lines[1][2].startswith("220 ")
    assert lines[2][1:] == ["C", "ehlo client.example"]
    ehlo_reply = [text for _, d, text in lines[3:] if d == "S"][:3]
    assert ehlo_reply[0].startswith("250-") and "Hello client.example" in ehlo_reply[0]
    assert "250-PIPELINING" in texts(lines, "S")
    assert any(text.startswith("250 ") for text in texts(lines, "S")[2:])
    # times from connect, 3 decimals, never going back
    times = [t for t, _, _ in lines]
    assert times == sorted(times) and all(round(t, 3) == t for t in times)
    # the transaction, the body elided with its size
    assert "mail FROM:<a@example.org> size=" in "\n".join(texts(lines, "C"))
    assert "rcpt TO:<b@example.net>" in texts(lines, "C")
    elided = [text for text in texts(lines, "*") if text.startswith("message data elided")]
    assert elided == [f"message data elided: {stored.size_received} octets"]
    assert BODY_MARK not in json.dumps(lines)
    # not in the list fields, nor in the envelope's JSON unless asked for
    assert "transcript" not in list_json(stored)
    assert "transcript" not in json.dumps(stored.envelope.to_json())
    assert "transcript" not in message_json(stored)
    shown = message_json(stored, transcript=True)["transcript"]
    assert shown[2] == {"t": lines[2][0], "dir": "C", "text": "ehlo client.example"}


async def test_each_message_keeps_its_own_transaction_only(start: Start) -> None:
    server = await start()
    await send(server.addresses[0][1], ("first@example.net", "one"), ("second@example.net", "two"))
    by_subject = {m.subject: lines_of(m) for m in server.store.list()}
    first, second = by_subject["one"], by_subject["two"]
    assert "rcpt TO:<first@example.net>" in texts(first, "C")
    assert "rcpt TO:<second@example.net>" not in texts(first, "C")
    assert "rcpt TO:<second@example.net>" in texts(second, "C")
    assert "rcpt TO:<first@example.net>" not in texts(second, "C")
    # The earlier message's final reply is not in the later one either.
    assert not any("queued as" in text for text in texts(second, "S"))
    # Both carry the session's prologue: the connect, banner and EHLO.
    assert texts(first)[:3] == texts(second)[:3]
    assert "ehlo client.example" in texts(second, "C")
    # The session log has the whole session, both transactions and both 250s.
    (logged,) = await sessions(server.store, 1)
    whole = [line[2] for line in logged["transcript"]]
    assert "rcpt TO:<first@example.net>" in whole and "rcpt TO:<second@example.net>" in whole
    assert sum("queued as" in text for text in whole) == 2
    assert sorted(logged["messages"]) == sorted(m.envelope.queue_id for m in server.store.list())
    assert logged["outcome"].startswith("221 ")
    assert whole[-1].startswith("close: ")


async def test_starttls_marked_with_version_and_cipher(start: Start) -> None:
    server = await start()
    await send(server.addresses[0][1], ("b@example.net", "tls"), tls=True)
    (stored,) = server.store.list()
    tls = stored.envelope.tls
    assert tls is not None
    lines = lines_of(stored)
    events = texts(lines, "*")
    assert f"TLS started {tls['version']} {tls['cipher']}" in events
    assert tls["version"].startswith("TLS")
    commands = texts(lines, "C")
    # the greeting before and after the handshake, then the transaction
    assert commands[:3] == ["ehlo client.example", "STARTTLS", "ehlo client.example"]
    assert "220 2.0.0 Ready to start TLS" in texts(lines, "S")
    start_index = [text for _, _, text in lines].index("STARTTLS")
    tls_index = [text for _, _, text in lines].index(events[1])
    assert start_index < tls_index


async def test_bdat_chunks_elided_each(start: Start, clients: list[Client]) -> None:
    server = await start()
    c = await connect(server, clients)
    await c.ehlo()
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert (await c.cmd("RCPT TO:<b@example.net>")).code == 250
    first = f"Subject: chunked\r\n\r\n{BODY_MARK}".encode()
    c.send(b"BDAT %d\r\n" % len(first) + first)
    assert (await c.reply()).code == 250
    c.send(b"BDAT 2 LAST\r\n\r\n")
    assert (await c.reply()).code == 250
    (stored,) = server.store.list()
    lines = lines_of(stored)
    assert texts(lines, "C")[-2:] == [f"BDAT {len(first)}", "BDAT 2 LAST"]
    assert [t for t in texts(lines, "*") if t.startswith("message data")] == [
        f"message data elided: {len(first)} octets",
        "message data elided: 2 octets",
    ]
    assert BODY_MARK not in json.dumps(lines)


async def test_transcript_is_bounded(start: Start, clients: list[Client]) -> None:
    server = await start(max_junk_commands=0, session_log_max=10)
    c = await connect(server, clients)
    await c.ehlo()
    for _ in range(600):
        c.send(b"NOOP " + b"x" * 100 + b"\r\n")
        assert (await c.reply()).code == 250
    assert (await c.cmd("QUIT")).code == 221
    (logged,) = await sessions(server.store, 1)
    transcript = logged["transcript"]
    assert 400 < len(transcript) <= 520
    assert transcript[-1][2] == "transcript truncated"
    assert len(json.dumps(transcript)) < 200 * 1024


async def test_transcripts_off(start: Start) -> None:
    server = await start(transcripts=False)
    await send(server.addresses[0][1], ("b@example.net", "quiet"))
    (stored,) = server.store.list()
    assert "transcript" not in stored.envelope.extra
    assert message_json(stored, transcript=True)["transcript"] is None
    (logged,) = await sessions(server.store, 1)
    assert logged["transcript"] is None and logged["messages"] == [stored.envelope.queue_id]


# ------------------------------------------------------------------ AUTH


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    data = tmp_path_factory.mktemp("users")
    UserStore(data).add("alice", PASSWORD)
    return (data / "users").read_bytes()


def secrets() -> list[bytes]:
    """The password as it could be found: plain, and as PLAIN and LOGIN send it."""
    plain = base64.b64encode(f"\0alice\0{PASSWORD}".encode())
    return [PASSWORD.encode(), plain, base64.b64encode(PASSWORD.encode())]


@pytest.mark.parametrize("kind", ["sqlite", "maildir"])
async def test_auth_secrets_never_stored(
    start: Start, tmp_path: Path, users_file: bytes, kind: str
) -> None:
    data = tmp_path / "data0"
    data.mkdir()
    (data / "users").write_bytes(users_file)
    (data / "users").chmod(0o600)
    server = await start(store=kind)
    port = server.addresses[0][1]

    def plain_with_initial_response() -> None:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=30) as s:
            s.starttls(context=no_verify())
            s.ehlo()
            s.login("alice", PASSWORD)  # AUTH PLAIN <initial response>
            s.sendmail("a@example.org", ["b@example.net"], MESSAGE)

    await asyncio.to_thread(plain_with_initial_response)
    # AUTH LOGIN with swaks: the user name and the password each on a line of their own.
    swaks = await asyncio.to_thread(
        run_swaks,
        tool("swaks"),
        port,
        "--tls",
        "--auth",
        "LOGIN",
        "--auth-user",
        "alice",
        "--auth-password",
        PASSWORD,
        "--from",
        "a@example.org",
        "--to",
        "c@example.net",
        "--body",
        BODY_MARK,
    )
    assert swaks.returncode == 0, swaks.stdout
    logged = await sessions(server.store, 2)
    stored = server.store.list()
    assert len(stored) == 2
    for message in stored:
        lines = lines_of(message)
        commands = texts(lines, "C")
        assert any(c in ("AUTH PLAIN", "AUTH LOGIN") for c in commands), commands
        assert "AUTH secret elided" in texts(lines, "*")
    login = next(m for m in stored if "AUTH LOGIN" in texts(lines_of(m), "C"))
    # the user name and the password lines: two secrets elided after the command
    assert texts(lines_of(login), "*").count("AUTH secret elided") == 2
    for record in logged:
        assert "AUTH secret elided" in [line[2] for line in record["transcript"]]
    await server.stop(timeout=5.0)  # everything written and closed
    every_byte = b"".join(
        path.read_bytes() for path in data.rglob("*") if path.is_file() and path.name != "users"
    )
    assert b"AUTH secret elided" in every_byte  # the transcripts are in there...
    for secret in secrets():
        assert secret not in every_byte  # ...the password in no form


def run_swaks(swaks: str, port: int, *args: str) -> Any:
    import subprocess

    return subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(port), "--timeout", "30", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


# ------------------------------------------------------------- the session log


async def test_refused_sessions_logged_and_capped(start: Start, clients: list[Client]) -> None:
    server = await start(domains=("example.net",), session_log_max=3)
    # 1: RCPT refused (no relay), then QUIT
    c = await connect(server, clients)
    await c.ehlo("relay.client.example")
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    refused = await c.cmd("RCPT TO:<someone@elsewhere.example>")
    assert refused.code >= 500
    assert (await c.cmd("QUIT")).code == 221
    (first,) = await sessions(server.store, 1)
    assert first["messages"] == [] and first["greeting"] == "EHLO"
    assert first["greeting_name"] == "relay.client.example"
    whole = [line[2] for line in first["transcript"]]
    assert "RCPT TO:<someone@elsewhere.example>" in whole
    assert any(text.startswith(f"{refused.code} ") for text in whole)
    # 2..5: a greeting then QUIT, each from its own connection
    for n in range(4):
        c = await connect(server, clients)
        await c.ehlo(f"quitter{n}.example")
        assert (await c.cmd("QUIT")).code == 221
        await c.expect_eof()

    def newest_is_last() -> bool:
        found = server.store.sessions(10)
        return bool(found) and found[0]["greeting_name"] == "quitter3.example"

    await async_wait_until(newest_is_last, "the last session in the log", timeout=60)
    logged = server.store.sessions(10)
    assert [s["greeting_name"] for s in logged] == [f"quitter{n}.example" for n in (3, 2, 1)]
    assert all(s["outcome"].startswith("221 ") for s in logged)
    # the table itself holds no more than the cap
    with sqlite3.connect(sqlite_path(server.config.data_dir)) as db:
        assert db.execute("SELECT count(*) FROM sessions").fetchone()[0] == 3
    # paging: before the newest
    assert [s["greeting_name"] for s in server.store.sessions(1, logged[0]["id"])] == [
        "quitter2.example"
    ]


@pytest.mark.parametrize("kind", ["sqlite", "maildir"])
def test_two_workers_write_one_session_log(tmp_path: Path, kind: str) -> None:
    count = 24
    with serving(tmp_path, "--workers", "2", "--store", kind, "--no-tls") as server:

        def session(n: int) -> None:
            with server.smtp() as client:
                assert client.ehlo(f"worker{n}.example")[0] == 250

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            list(pool.map(session, range(count)))
        assert server.stop() == 0
    every = _open_store(server.data, kind).sessions(limit=100)
    # (the readiness probes of ``serving`` connect and close without a greeting)
    found = [s for s in every if s["greeting"] is not None]
    names = sorted(s["greeting_name"] for s in found)
    assert names == sorted(f"worker{n}.example" for n in range(count)), names
    assert all(s["transcript"][0][2].startswith("connect from") for s in found)


def _open_store(data: Path, kind: str) -> Store:
    from ehlo.storage import open_store

    return open_store(kind, data)


# ------------------------------------------------------------------ the CLI


async def test_messages_show_transcript(start: Start) -> None:
    server = await start()
    await send(server.addresses[0][1], ("b@example.net", "cli"))
    (stored,) = server.store.list()
    queue_id = stored.envelope.queue_id
    data = str(server.config.data_dir)
    shown = await asyncio.to_thread(
        run, "messages", "show", queue_id, "--transcript", "--data", data
    )
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout.decode()
    assert "+0.000 * connect from 127.0.0.1" in text
    assert any(
        line.startswith("+0.") and " C ehlo client.example" in line for line in text.splitlines()
    )
    assert text.index(" C ehlo client.example") < text.index(BODY_MARK)  # before the message
    plain = await asyncio.to_thread(run, "messages", "show", queue_id, "--data", data)
    assert " C ehlo" not in plain.stdout.decode()
    as_json = await asyncio.to_thread(
        run, "messages", "show", queue_id, "--json", "--transcript", "--data", data
    )
    transcript = json.loads(as_json.stdout)["transcript"]
    assert transcript[2] == {"t": transcript[2]["t"], "dir": "C", "text": "ehlo client.example"}
    without = await asyncio.to_thread(run, "messages", "show", queue_id, "--json", "--data", data)
    assert "transcript" not in json.loads(without.stdout)
    listed = await asyncio.to_thread(run, "messages", "list", "--json", "--data", data)
    assert b"transcript" not in listed.stdout and b"ehlo client.example" not in listed.stdout


# ------------------------------------------------------------------ the API


@pytest.fixture
async def api() -> AsyncIterator[Callable[[Store], Awaitable[str]]]:
    """Serve ``build_app`` over a store on 127.0.0.1 port 0; its base URL."""
    runners: list[web.AppRunner] = []

    async def serve(store: Store) -> str:
        runner = web.AppRunner(build_app(WebContext(store=store)))
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr]
        return f"http://127.0.0.1:{sockets[0].getsockname()[1]}"

    yield serve
    for runner in runners:
        await runner.cleanup()


async def test_api_sessions(start: Start, clients: list[Client], api: Any) -> None:
    server = await start()
    await send(server.addresses[0][1], ("b@example.net", "api"))
    for n in range(3):
        c = await connect(server, clients)
        await c.ehlo(f"api{n}.example")
        assert (await c.cmd("QUIT")).code == 221
        await c.expect_eof()
    await sessions(server.store, 4)
    base = await api(server.store)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/api/v1/sessions", params={"limit": "2"}) as r:
            assert r.status == 200 and r.content_type == "application/json"
            page = await r.json()
        assert [s["greeting_name"] for s in page["sessions"]] == ["api2.example", "api1.example"]
        assert page["next"] == page["sessions"][-1]["id"]
        one = page["sessions"][0]
        for key in (
            "id", "started_at", "ended_at", "client_ip", "client_port", "greeting",
            "greeting_name", "tls", "auth", "messages", "outcome", "greeting_verdict",
            "greeting_checks", "transcript",
        ):  # fmt: skip
            assert key in one, key
        assert one["transcript"][0]["dir"] == "*" and isinstance(
            one["transcript"][0]["t"], float | int
        )
        async with http.get(
            f"{base}/api/v1/sessions", params={"limit": "2", "before": page["next"]}
        ) as r:
            rest = await r.json()
        assert [s["greeting_name"] for s in rest["sessions"]] == ["api0.example", "client.example"]
        assert rest["next"] is None
        stored = rest["sessions"][1]
        assert stored["messages"] == [m.envelope.queue_id for m in server.store.list()]
        for params, status in (
            ({"limit": "0"}, 400),
            ({"limit": "1001"}, 400),
            ({"limit": "many"}, 400),
            ({"before": "NOSUCHSESSION"}, 400),
        ):
            async with http.get(f"{base}/api/v1/sessions", params=params) as r:
                assert r.status == status, params
                body = await r.json()
            assert body["error"]["status"] == status and body["error"]["message"], body


def test_config_keys_and_serve_flag(tmp_path: Path) -> None:
    from ehlo.cli import build_parser
    from ehlo.cli.serve import _serve_config
    from ehlo.config import ConfigError, load_config

    defaults = load_config(None)
    assert defaults.transcripts is True and defaults.session_log_max == 10_000
    path = tmp_path / "ehlo.toml"
    path.write_text("transcripts = false\nsession_log_max = 0\n")
    loaded = load_config(path)
    assert loaded.transcripts is False and loaded.session_log_max == 0
    path.write_text("session_log_max = -1\n")
    with pytest.raises(ConfigError, match="session_log_max"):
        load_config(path)
    args = build_parser().parse_args(["serve", "--no-transcripts", "--data", str(tmp_path)])
    assert _serve_config(args).transcripts is False
    args = build_parser().parse_args(["serve", "--data", str(tmp_path)])
    assert _serve_config(args).transcripts is True
