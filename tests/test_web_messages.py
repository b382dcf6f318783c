"""The message endpoints of the HTTP API, over a real server's store.

A real server (in a thread, SQLite or Maildir on a temporary folder) takes
mail from smtplib; the API (``build_app`` over a store instance of its own,
as ``ehlo serve`` gives it) is served by aiohttp on 127.0.0.1 port 0 and
asked with ``aiohttp.ClientSession``. Large stores are written through the
store API (:mod:`tests.messages_data`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.message
import email.policy
import json
import smtplib
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ehlo.storage import Envelope, Store, list_json, open_store
from ehlo.web import WebContext, build_app, live

from .conftest import ThreadedServer, make_config
from .messages_data import generate

API = "/api/v1"


@contextlib.asynccontextmanager
async def api(store: Store, **context: Any) -> AsyncIterator[aiohttp.ClientSession]:
    """The web app over ``store`` on 127.0.0.1 port 0, and a client session for it."""
    app = build_app(WebContext(store=store, **context))
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", timeout=timeout) as session:
            session.web_app = app  # type: ignore[attr-defined]  # the live hub of deletions
            yield session
    finally:
        await runner.cleanup()


async def get_json(session: aiohttp.ClientSession, path: str, status: int = 200) -> Any:
    async with session.get(path) as response:
        body = await response.read()
        assert response.status == status, body[:500]
        assert response.content_type == "application/json"
        return json.loads(body)


async def assert_error(
    session: aiohttp.ClientSession, path: str, status: int, says: str, method: str = "GET"
) -> None:
    """The JSON error shape with ``status`` and a message containing ``says``."""
    async with session.request(method, path) as response:
        body = await response.read()
        assert response.status == status, (path, body[:500])
        assert response.content_type == "application/json"
    data = json.loads(body)
    assert set(data) == {"error"}
    assert data["error"]["status"] == status
    assert says in data["error"]["message"], data
    assert "Traceback" not in body.decode()


def send(port: int, message: bytes | email.message.EmailMessage, rcpts: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=60) as smtp:
        if isinstance(message, bytes):
            smtp.sendmail("sender@example.org", rcpts, message)
        else:
            smtp.send_message(message, "sender@example.org", rcpts)


@pytest.fixture
def smtp(threaded_server: Callable[..., ThreadedServer]) -> Iterator[ThreadedServer]:
    yield threaded_server()


def reader(server: ThreadedServer) -> Store:
    """A store instance of its own over the server's data (what the API is given)."""
    return open_store(server.config.store, Path(server.config.data_dir))


def rich_message() -> email.message.EmailMessage:
    """Plain text, HTML with a cid: image, and a PDF attachment with a non-ASCII name."""
    msg = email.message.EmailMessage()
    msg["From"] = "Sender <sender@example.org>"
    msg["To"] = "rcpt@example.net"
    msg["Subject"] = "Rapport =?x? ünïcode"
    msg.set_content("The plain text.\n")
    msg.add_alternative('<p>The <b>HTML</b> text.</p><img src="cid:logo@x">', subtype="html")
    html_part = msg.get_payload()[1]
    html_part.add_related(b"\x89PNG\r\n\x1a\nfake", "image", "png", cid="<logo@x>")
    msg.add_attachment(b"%PDF-1.4 binary \x00\xff", "application", "pdf", filename="rapport ü.pdf")
    return msg


async def sent(smtp: ThreadedServer, *messages: bytes | email.message.EmailMessage) -> None:
    for message in messages:
        await asyncio.to_thread(send, smtp.port, message, ["rcpt@example.net"])


async def test_list_and_detail(smtp: ThreadedServer) -> None:
    await sent(smtp, b"Subject: first\r\n\r\nplain body\r\n", rich_message())
    store = reader(smtp)
    async with api(store) as session:
        listing = await get_json(session, f"{API}/messages")
        assert listing["total"] == 2 and listing["next"] is None
        first, second = listing["messages"]
        assert second["subject"] == "first"
        assert first["subject"] == "Rapport =?x? ünïcode"
        stored = {m.envelope.queue_id: m for m in store.list()}
        for item in listing["messages"]:
            has = item["has_attachments"]
            assert item == {**list_json(stored[item["id"]]), "has_attachments": has}
        assert (first["has_attachments"], second["has_attachments"]) == (True, False)
        assert first["greeting_name"] == "client.example"

        detail = await get_json(session, f"{API}/messages/{first['id']}")
        assert detail["id"] == first["id"] and detail["rcpt_to"] == ["rcpt@example.net"]
        names = [name for name, _ in detail["headers"]]
        assert names[0] == "Received" and "Subject" in names
        assert ["Subject", "Rapport =?x? ünïcode"] in detail["headers"]
        parts = detail["parts"]
        assert [(p["index"], p["type"], p["depth"]) for p in parts] == [
            (0, "multipart/mixed", 0),
            (1, "multipart/alternative", 1),
            (2, "text/plain", 2),
            (3, "multipart/related", 2),
            (4, "text/html", 3),
            (5, "image/png", 3),
            (6, "application/pdf", 1),
        ]
        assert parts[5]["content_id"] == "logo@x"
        assert parts[6]["filename"] == "rapport ü.pdf"
        assert parts[6]["disposition"] == "attachment"
        assert parts[6]["size"] == len(b"%PDF-1.4 binary \x00\xff")
        assert detail["text"] == "The plain text.\n"
        assert detail["has_html"] is True
        # The session's dialogue up to this message's data, the body elided.
        lines = detail["transcript"]
        assert lines[0]["dir"] == "*" and lines[0]["text"].startswith("connect from 127.0.0.1")
        client = [line["text"].upper() for line in lines if line["dir"] == "C"]
        assert any(text.startswith("MAIL FROM:") for text in client)
        assert any(line["text"].startswith("message data elided:") for line in lines)
        assert "The plain text." not in json.dumps(lines)
        assert "greeting_checks" not in detail or isinstance(detail["greeting_checks"], dict)

        plain = await get_json(session, f"{API}/messages/{second['id']}")
        assert [p["type"] for p in plain["parts"]] == ["text/plain"]
        assert plain["text"] == "plain body\n"
        assert plain["has_html"] is False


async def test_raw_is_byte_exact(smtp: ThreadedServer) -> None:
    # 8-bit bytes, a line starting with a dot, a bare CR inside a line.
    body = b"Subject: raw\r\n\r\n\xc3\xa9t\xe9 8bit\r\n..dot\r\nend \xff\r\n"
    await sent(smtp, body)
    store = reader(smtp)
    (message,) = store.list()
    queue_id = message.envelope.queue_id
    async with api(store) as session:
        async with session.get(f"{API}/messages/{queue_id}/raw") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "message/rfc822"
            assert "Content-Disposition" not in response.headers
            data = await response.read()
        assert data == store.raw(queue_id)
        # smtplib stuffed the dots, the server took them off again.
        assert data.endswith(b"\xc3\xa9t\xe9 8bit\r\n..dot\r\nend \xff\r\n")
        async with session.get(f"{API}/messages/{queue_id}/raw?download=1") as response:
            assert response.status == 200
            disposition = response.headers["Content-Disposition"]
            assert disposition.startswith("attachment;") and f"{queue_id}.eml" in disposition
            assert await response.read() == data


async def test_attachment_downloads_with_its_name(smtp: ThreadedServer) -> None:
    msg = rich_message()
    msg.add_attachment(b"#!/bin/sh\n", "application", "x-sh", filename="../../etc/evil.sh")
    await sent(smtp, msg)
    store = reader(smtp)
    (message,) = store.list()
    base = f"{API}/messages/{message.envelope.queue_id}/parts"
    async with api(store) as session:
        async with session.get(f"{base}/6") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/pdf"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            disposition = response.headers["Content-Disposition"]
            assert await response.read() == b"%PDF-1.4 binary \x00\xff"
        assert disposition.startswith("attachment;")
        star = disposition.split("filename*=", 1)[1]
        assert star.startswith("UTF-8''")
        assert urllib.parse.unquote(star[len("UTF-8''") :]) == "rapport ü.pdf"
        async with session.get(f"{base}/7") as response:
            disposition = response.headers["Content-Disposition"]
            assert await response.read() == b"#!/bin/sh\n"
        assert "filename*=UTF-8''evil.sh" in disposition and "/" not in disposition
        async with session.get(f"{base}/2") as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            assert await response.read() == b"The plain text.\r\n"
        await assert_error(session, f"{base}/0", 404, "container")
        await assert_error(session, f"{base}/99", 404, "no part 99")
        await assert_error(session, f"{base}/x", 400, "part number")


HOSTILE = """\
<html><head><meta http-equiv="refresh" content="0;url=http://127.0.0.1:9/refresh">
<link rel="stylesheet" href="http://127.0.0.1:9/link.css"><base href="http://127.0.0.1:9/">
<style>@import url(http://127.0.0.1:9/import.css); body { background: url('http://127.0.0.1:9/bg') }
p { background: u\\72l(http://127.0.0.1:9/escaped) }</style></head>
<body onload="window.pwned=1"><script>window.pwned = 1</script>
<img src="x" onerror="window.pwned=1"><a href="javascript:window.pwned=1">click</a>
<a href="https://example.org/ok">fine link</a>
<p style="color: red; background-image: url(http://127.0.0.1:9/inline)">styled</p>
<img src="https://127.0.0.1:9/remote.png" alt="remote">
<img src="cid:logo@x" alt="inline">
<form action="http://127.0.0.1:9/form"><input name="a"></form>
<iframe src="http://127.0.0.1:9/frame"></iframe><svg onload="window.pwned=1"></svg>
</body></html>
"""


def hostile_message() -> email.message.EmailMessage:
    msg = email.message.EmailMessage()
    msg["Subject"] = "hostile"
    msg.set_content("text version\n")
    msg.add_alternative(HOSTILE, subtype="html")
    msg.get_payload()[1].add_related(b"\x89PNG fake", "image", "png", cid="<logo@x>")
    return msg


async def test_html_is_sanitised(smtp: ThreadedServer) -> None:
    await sent(smtp, hostile_message(), b"Subject: no html\r\n\r\njust text\r\n")
    store = reader(smtp)
    plain, hostile = store.list()
    path = f"{API}/messages/{hostile.envelope.queue_id}/html"
    async with api(store) as session:
        async with session.get(path) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            csp = response.headers["Content-Security-Policy"]
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            html = await response.text()
        for directive in ("default-src 'none'", "style-src 'unsafe-inline'", "img-src data:"):
            assert directive in csp
        assert "sandbox" in csp
        assert "http" not in csp and "script-src" not in csp
        lowered = html.lower()
        for banned in (
            "<script", "pwned", "onerror", "onload", "javascript:", "http-equiv", "<link",
            "<base", "<form", "<iframe", "@import", "127.0.0.1",
        ):  # fmt: skip
            assert banned not in lowered, (banned, html)
        assert 'href="https://example.org/ok"' in html
        assert "data:image/png;base64," in html  # the cid: image, inlined
        assert "styled" in html and "color: red" in html

        async with session.get(path + "?images=1") as response:
            csp = response.headers["Content-Security-Policy"]
            html = await response.text()
        assert "img-src data: http: https:" in csp and "sandbox" in csp
        assert 'src="https://127.0.0.1:9/remote.png"' in html
        assert "pwned" not in html and "javascript:" not in html

        await assert_error(
            session, f"{API}/messages/{plain.envelope.queue_id}/html", 404, "no HTML part"
        )


async def test_text_endpoint(smtp: ThreadedServer) -> None:
    html_only = (
        b"Subject: html only\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        b"<p>Hello &amp; <b>welcome</b></p><script>var x</script>\r\n"
    )
    image_only = b"Subject: image\r\nContent-Type: image/gif\r\n\r\nGIF89a\r\n"
    await sent(smtp, rich_message(), html_only, image_only)
    store = reader(smtp)
    image, html, rich = store.list()
    async with api(store) as session:
        async with session.get(f"{API}/messages/{rich.envelope.queue_id}/text") as response:
            assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
            assert await response.text() == "The plain text.\n"
        async with session.get(f"{API}/messages/{html.envelope.queue_id}/text") as response:
            assert response.status == 200
            text = await response.text()
        assert "Hello & welcome" in text and "<" not in text and "var x" not in text
        await assert_error(
            session, f"{API}/messages/{image.envelope.queue_id}/text", 404, "no text part"
        )


async def test_transcript_lines(tmp_path: Path) -> None:
    store = open_store("sqlite", tmp_path / "data", writer="thread")
    await store.start()
    lines = [
        [0.0, "*", "connect 127.0.0.1:4000"],
        [0.0012345, "S", "220 mx ESMTP"],
        [0.01, "C", "EHLO client.example"],
        [0.02, "S", "250-mx"],
        [0.02, "S", "250 SIZE"],
    ]
    try:
        for transcript in (lines, json.dumps(lines)):
            writer = store.begin(_envelope(extra={"transcript": transcript}))
            writer.write(b"Subject: t\r\n\r\nx\r\n")
            await writer.commit()
    finally:
        await store.close()
    async with api(store) as session:
        for message in store.list():
            detail = await get_json(session, f"{API}/messages/{message.envelope.queue_id}")
            assert detail["transcript"] == [
                {"t": 0.0, "dir": "*", "text": "connect 127.0.0.1:4000"},
                {"t": 0.001, "dir": "S", "text": "220 mx ESMTP"},
                {"t": 0.01, "dir": "C", "text": "EHLO client.example"},
                {"t": 0.02, "dir": "S", "text": "250-mx"},
                {"t": 0.02, "dir": "S", "text": "250 SIZE"},
            ]
            assert "transcript" not in detail.get("extra", {})


def _envelope(**changes: Any) -> Envelope:
    from ehlo.ids import new_queue_id

    fields: dict[str, Any] = {
        "queue_id": new_queue_id(),
        "client_ip": "127.0.0.1",
        "client_port": 40000,
        "greeting": "EHLO",
        "greeting_name": "client.example",
        "mail_from": "a@example.org",
        "mail_params": {},
        "rcpt_to": ["b@example.net"],
        "received_at": dt.datetime.now(dt.UTC),
    }
    fields.update(changes)
    return Envelope(**fields)


async def test_broken_mime_never_fails(smtp: ThreadedServer) -> None:
    broken = (
        b"Subject: =?unknown-charset?B?!!!?=\r\nFrom: =?utf-8?q?bad=ZZ?= <a@b>\r\n"
        b'To: \xff\xfe raw octets\r\nContent-Type: multipart/mixed; boundary="nope"\r\n\r\n'
        b"--wrong\r\nContent-Type: text/plain; charset=x-unknown\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n%%% not base64 %%%\r\n"
    )
    nested = b"Subject: deep\r\nContent-Type: multipart/mixed; boundary=a\r\n\r\n" + b"".join(
        f"--{c}\r\nContent-Type: multipart/mixed; boundary={c}{c}\r\n\r\n".encode()
        for c in "abcdefghij" * 8
    )
    await sent(smtp, broken, nested)
    store = reader(smtp)
    async with api(store) as session:
        for message in store.list():
            queue_id = message.envelope.queue_id
            detail = await get_json(session, f"{API}/messages/{queue_id}")
            assert detail["headers"] and detail["parts"]
            for tail in ("raw", "text", "html", "parts/0", "parts/1"):
                async with session.get(f"{API}/messages/{queue_id}/{tail}") as response:
                    assert response.status in (200, 404), (tail, await response.text())


async def test_paging_over_a_thousand_messages(tmp_path: Path) -> None:
    total = 1050
    await asyncio.to_thread(generate, tmp_path / "data", total)
    store = open_store("sqlite", tmp_path / "data")
    async with api(store) as session:
        seen: list[dict[str, Any]] = []
        cursor: str | None = None
        pages = 0
        while True:
            path = f"{API}/messages?limit=100" + (f"&before={cursor}" if cursor else "")
            page = await get_json(session, path)
            assert page["total"] == total
            seen += page["messages"]
            pages += 1
            cursor = page["next"]
            if cursor is None:
                break
            assert cursor == page["messages"][-1]["id"]
            assert pages < 20
        assert pages == 11 and len(seen) == total
        assert len({item["id"] for item in seen}) == total
        times = [item["received_at"] for item in seen]
        assert times == sorted(times, reverse=True)
        default = await get_json(session, f"{API}/messages")
        assert [m["id"] for m in default["messages"]] == [m["id"] for m in seen[:50]]

        # A filtered selection pages the same way: message i goes to user{i % 50}.
        found: list[str] = []
        cursor = None
        while True:
            q = urllib.parse.quote("to:user7@")
            path = f"{API}/messages?q={q}&limit=5" + (f"&before={cursor}" if cursor else "")
            page = await get_json(session, path)
            found += [item["id"] for item in page["messages"]]
            assert all(item["rcpt_to"][0] == "user7@dest.example" for item in page["messages"])
            cursor = page["next"]
            if cursor is None:
                break
        assert len(found) == len(set(found)) == total // 50


async def test_bad_requests_are_json(smtp: ThreadedServer) -> None:
    await sent(smtp, b"Subject: one\r\n\r\nx\r\n")
    store = reader(smtp)
    (message,) = store.list()
    queue_id = message.envelope.queue_id
    async with api(store) as session:
        for query, says in (
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=ten", "limit"),
            ("before=../../x", "before"),
            ("before=0000000000000000", "no message with id"),
            ("q=color:red", "unknown search operator 'color:'"),
            ("q=tls:maybe", "tls:"),
            ("q=after:yesterday", "after:"),
            ('q="open', "unterminated quote"),
        ):
            await assert_error(session, f"{API}/messages?{query}", 400, says)
        await assert_error(session, f"{API}/messages/0000000000000000", 404, "no message with id")
        await assert_error(session, f"{API}/messages/not-an-id", 400, "malformed message id")
        await assert_error(session, f"{API}/messages/{queue_id}/parts/5", 404, "no part 5")
        await assert_error(session, f"{API}/nothing/here", 404, "")
        await assert_error(
            session, f"{API}/messages/0000000000000000", 404, "no message", method="DELETE"
        )
        await assert_error(session, f"{API}/messages?q=has:wings", 400, "has:", method="DELETE")
        assert len(store.list()) == 1


@pytest.fixture(params=["sqlite", "maildir"])
def any_smtp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ThreadedServer]:
    """A server keeping its mail in each kind of store."""
    server = ThreadedServer(make_config(tmp_path / "data", store=request.param)).start()
    try:
        yield server
    finally:
        server.stop()


async def test_ids_cannot_reach_outside_the_store(any_smtp: ThreadedServer, tmp_path: Path) -> None:
    smtp = any_smtp
    await sent(smtp, b"Subject: inside\r\n\r\nx\r\n")
    # Files a path built from an id could reach: beside the store and above it.
    canary = b"Subject: canary\r\n\r\nOUTSIDE THE STORE\r\n"
    (tmp_path / "secret").write_bytes(canary)
    (tmp_path / "data" / "secret").write_bytes(canary)
    store = reader(smtp)
    async with api(store) as session:
        for bad in (
            "..", "../secret", "..%2Fsecret", "..%2F..%2Fsecret", "%2e%2e%2fsecret",
            "secret", "..%5Csecret", "0000000000000000%2F..%2F..%2Fsecret", "%00",
            "ZZZZZZZZZZZZZZZZ/../../secret", "." * 16, "0000000000000000.json",
        ):  # fmt: skip
            for tail in ("", "/raw", "/text", "/parts/0"):
                async with session.get(f"{API}/messages/{bad}{tail}") as response:
                    body = await response.read()
                    assert response.status in (400, 404), (bad, tail, response.status)
                    assert b"OUTSIDE" not in body
            async with session.delete(f"{API}/messages/{bad}") as response:
                assert response.status in (400, 404)
        await assert_error(session, f"{API}/messages/..%2Fsecret", 400, "malformed message id")
        # A well-formed id that names nothing: 404, for either store.
        await assert_error(session, f"{API}/messages/7ZZZZZZZZZZZZZZZ/raw", 404, "no message")
    assert (tmp_path / "secret").read_bytes() == canary
    assert [m.subject for m in store.list()] == ["inside"]


async def test_delete_one_by_query_and_all(smtp: ThreadedServer) -> None:
    await sent(
        smtp,
        b"Subject: keep me\r\n\r\nx\r\n",
        b"Subject: drop me\r\n\r\nx\r\n",
        b"Subject: drop me too\r\n\r\nx\r\n",
        b"Subject: last\r\n\r\nx\r\n",
    )
    store = reader(smtp)
    last, drop2, drop1, keep = store.list()
    async with api(store) as session:
        async with session.delete(f"{API}/messages/{last.envelope.queue_id}") as response:
            assert response.status == 200
            assert await response.json() == {"deleted": 1}
        await assert_error(
            session, f"{API}/messages/{last.envelope.queue_id}", 404, "no message", "DELETE"
        )
        q = urllib.parse.quote('subject:"drop me"')
        async with session.delete(f"{API}/messages?q={q}") as response:
            assert await response.json() == {"deleted": 2}
        assert [m.subject for m in store.list()] == ["keep me"]
        async with session.delete(f"{API}/messages") as response:
            assert await response.json() == {"deleted": 1}
        assert store.list() == []
        async with session.delete(f"{API}/messages") as response:
            assert await response.json() == {"deleted": 0}
        # The live events were told of each deletion, and of nothing else.
        told = [
            event.data["ids"]
            for event in live.hub(session.web_app).since(0)  # type: ignore[attr-defined]
            if event.name == "message.deleted"
        ]
    assert told[0] == [last.envelope.queue_id]
    assert sorted(told[1]) == sorted([drop1.envelope.queue_id, drop2.envelope.queue_id])
    assert told[2] == [keep.envelope.queue_id]
    assert len(told) == 3  # nothing deleted: nobody told
