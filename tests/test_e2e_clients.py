"""End to end with real SMTP client libraries: smtplib and aiosmtplib.

Every test talks to a real ``ehlo.Server`` over loopback TCP, once per store
backend (sqlite, maildir) and once over IPv6 (``::1``, when available), and
reads every message back from ``server.store``. The stored bytes after the
Received header must equal what the client put on the wire after
dot-unstuffing; the expected bytes are computed here, independently of the
server: bodies already use CRLF so that neither client changes them.
"""

from __future__ import annotations

import asyncio
import copy
import email.generator
import email.message
import email.policy
import io
import re
import smtplib
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from ehlo import Listen, Server
from ehlo.storage import StoredMessage

from .helpers import ipv6_loopback, make_config, require
from .trace import split_trace

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 10.0
QUEUED = re.compile(r"queued as ([0-9A-Za-z]+)")


HAS_IPV6 = ipv6_loopback()


@pytest.fixture(
    params=[
        pytest.param(("sqlite", "127.0.0.1"), id="sqlite"),
        pytest.param(("maildir", "127.0.0.1"), id="maildir"),
        pytest.param(("sqlite", "::1"), id="sqlite-ipv6"),
    ]
)
async def srv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Server]:
    """A running server in this test's loop: store backend x address family."""
    store, host = request.param
    if host == "::1":
        require(HAS_IPV6, "no IPv6 loopback (::1) on this machine")
    server = Server(make_config(tmp_path / "data", store=store, listen=(Listen(host, 0),)))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(timeout=1.0)


def addr(server: Server) -> tuple[str, int]:
    host, port = server.addresses[0]
    return host, port


def unverified() -> ssl.SSLContext:
    """A client context that accepts the server's self-signed certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class RecordingSMTP(smtplib.SMTP):
    """smtplib.SMTP remembering the reply to each DATA (it carries the queue id)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.data_replies: list[tuple[int, bytes]] = []
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def data(self, msg: bytes | str) -> tuple[int, bytes]:
        code, text = super().data(msg)
        self.data_replies.append((code, text))
        return code, text


def smtp(server: Server) -> RecordingSMTP:
    host, port = addr(server)
    return RecordingSMTP(host, port, local_hostname="client.example", timeout=TIMEOUT)


def queue_id(reply_text: str | bytes) -> str:
    text = reply_text.decode() if isinstance(reply_text, bytes) else reply_text
    found = QUEUED.search(text)
    assert found, f"no queue id in {text!r}"
    return found.group(1)


def split_received(raw: bytes) -> tuple[list[bytes], bytes]:
    """The Received header lines and the message after the trace headers."""
    fields, message = split_trace(raw)
    return fields[0].split(b"\r\n"), message


def check_stored(
    server: Server,
    qid: str,
    body: bytes,
    *,
    greeting: str,
    greeting_name: str = "client.example",
    mail_from: str,
    rcpt_to: list[str],
    protocol: str,
    tls: bool = False,
) -> StoredMessage:
    """Assert the message ``qid`` is stored byte-exact with the right envelope."""
    stored = server.store.get(qid)
    assert stored is not None, f"message {qid} not in the store"
    raw = server.store.raw(qid)
    assert raw is not None
    header, message = split_received(raw)
    assert message == body
    assert stored.size == len(raw)
    env = stored.envelope
    assert env.queue_id == qid
    assert env.greeting == greeting
    assert env.greeting_name == greeting_name
    assert env.mail_from == mail_from
    assert env.rcpt_to == rcpt_to
    host = addr(server)[0]
    assert env.client_ip == host
    assert env.protocol == protocol
    text = b"\r\n".join(header).decode("utf-8")
    assert text.startswith(f"Received: from {greeting_name} ")
    literal = f"[IPv6:{host}]" if ":" in host else f"[{host}]"
    assert literal in header[0].decode()
    assert f" with {protocol} id {qid}" in text
    if len(rcpt_to) == 1:
        assert f"for <{rcpt_to[0]}>;" in text
    else:
        assert "for <" not in text
    if tls:
        assert env.tls is not None
        assert env.tls["version"] in ("TLSv1.2", "TLSv1.3")
        assert env.tls["cipher"]
        assert f"(using {env.tls['version']} with cipher {env.tls['cipher']})" in text
    else:
        assert env.tls is None
        assert "(using " not in text
    return stored


async def sent_and_stored(
    srv: Server,
    client: Callable[[], RecordingSMTP],
    body: bytes,
    *,
    greeting: str = "EHLO",
    mail_from: str = "a@example.org",
    rcpt_to: list[str] | None = None,
    protocol: str = "ESMTP",
    **expected: Any,
) -> StoredMessage:
    """Run the blocking ``client`` in a thread, then check its one message in the store."""
    s = await asyncio.to_thread(client)
    [(_, text)] = s.data_replies
    return check_stored(
        srv,
        queue_id(text),
        body,
        greeting=greeting,
        mail_from=mail_from,
        rcpt_to=rcpt_to if rcpt_to is not None else ["b@example.net"],
        protocol=protocol,
        **expected,
    )



def flatten(msg: email.message.EmailMessage, *, utf8: bool = False) -> bytes:
    """``msg`` as a client puts it on the wire: Bcc removed, CRLF line ends."""
    msg = copy.copy(msg)
    del msg["Bcc"]
    out = io.BytesIO()
    policy = msg.policy.clone(utf8=utf8) if utf8 else msg.policy
    email.generator.BytesGenerator(out, policy=policy).flatten(msg, linesep="\r\n")
    return out.getvalue()


# --------------------------------------------------------------------- smtplib


async def test_smtplib_helo_session(srv: Server) -> None:
    body = b"Subject: helo\r\nFrom: a@example.org\r\n\r\nPlain old SMTP.\r\n"

    def client() -> RecordingSMTP:
        with smtp(srv) as s:
            code, text = s.helo("client.example")
            assert code == 250
            assert b"Hello client.example" in text
            assert s.sendmail("a@example.org", ["b@example.net"], body) == {}
            return s

    s = await asyncio.to_thread(client)
    [(code, text)] = s.data_replies
    assert code == 250
    stored = check_stored(
        srv,
        queue_id(text),
        body,
        greeting="HELO",
        mail_from="a@example.org",
        rcpt_to=["b@example.net"],
        protocol="SMTP",
    )
    # HELO: no ESMTP parameters at all (smtplib sends no SIZE=).
    assert stored.envelope.mail_params == {}
    assert stored.subject == "helo"


async def test_smtplib_ehlo_session(srv: Server) -> None:
    body = b"Subject: ehlo\r\n\r\nExtended SMTP.\r\n"

    def client() -> RecordingSMTP:
        with smtp(srv) as s:
            code, _ = s.ehlo()
            assert code == 250
            for ext in (
                "pipelining",
                "size",
                "8bitmime",
                "smtputf8",
                "chunking",
                "enhancedstatuscodes",
                "starttls",
            ):
                assert s.has_extn(ext), ext
            assert s.sendmail("a@example.org", "b@example.net", body) == {}
            return s

    stored = await sent_and_stored(srv, client, body)
    assert stored.envelope.mail_params == {"SIZE": str(len(body))}


async def test_smtplib_starttls(srv: Server) -> None:
    body = b"Subject: tls\r\n\r\nSecret.\r\n"

    def client() -> RecordingSMTP:
        with smtp(srv) as s:
            s.ehlo()
            assert s.has_extn("starttls")
            code, _ = s.starttls(context=unverified())
            assert code == 220
            s.ehlo()
            # RFC 3207 section 4.2: STARTTLS is not offered again inside TLS.
            assert not s.has_extn("starttls")
            assert s.has_extn("size") and s.has_extn("pipelining")
            assert s.sock is not None
            assert isinstance(s.sock, ssl.SSLSocket)
            assert s.sendmail("a@example.org", ["b@example.net"], body) == {}
            return s

    await sent_and_stored(srv, client, body, protocol="ESMTPS", tls=True)


async def test_smtplib_smtputf8(srv: Server) -> None:
    sender = "用户@例子.测试"
    rcpt = "Empfänger@bücher.example"
    body = "Subject: Grüße\r\nFrom: 用户@例子.测试\r\n\r\nこんにちは世界 🌍\r\n".encode()

    def client() -> RecordingSMTP:
        with smtp(srv) as s:
            s.ehlo()
            assert s.has_extn("smtputf8")
            assert s.sendmail(sender, [rcpt], body, mail_options=["SMTPUTF8"]) == {}
            return s

    stored = await sent_and_stored(
        srv,
        client,
        body,
        mail_from=sender,
        rcpt_to=[rcpt],
        protocol="UTF8SMTP",
    )
    assert "SMTPUTF8" in stored.envelope.mail_params
    assert stored.subject == "Grüße"


async def test_smtplib_8bitmime(srv: Server) -> None:
    body = (
        b"Subject: latin-1\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        + bytes(range(0x80, 0x100))
        + b"\r\ncaf\xe9 na\xefve \xff\xfe\r\n"
    )

    def client() -> RecordingSMTP:
        with smtp(srv) as s:
            s.ehlo()
            assert s.has_extn("8bitmime")
            errs = s.sendmail(
                "a@example.org", ["b@example.net"], body, mail_options=["BODY=8BITMIME"]
            )
            assert errs == {}
            return s

    stored = await sent_and_stored(srv, client, body)
    assert stored.envelope.mail_params.get("BODY") == "8BITMIME"


async def test_smtplib_dot_stuffing(srv: Server) -> None:
    # Lines starting with "." (and a line that is just "." or "..") must come
    # back exactly: smtplib stuffs them, the server unstuffs them.
    body = (
        b".first line starts with a dot\r\n"
        b"Subject: dots\r\n\r\n"
        b".\r\n"
        b"..\r\n"
        b"...three\r\n"
        b". space\r\n"
        b"middle . dot\r\n"
        b".\r\n"
    )

    def client() -> RecordingSMTP:
        with smtp(srv) as s:
            assert s.sendmail("a@example.org", ["b@example.net"], body) == {}
            return s

    await sent_and_stored(srv, client, body)


async def test_smtplib_multiple_recipients(srv: Server) -> None:
    rcpts = [f"user{i}@example.net" for i in range(7)] + ["postmaster"]
    body = b"Subject: many\r\n\r\nTo many people.\r\n"

    def client() -> RecordingSMTP:
        with smtp(srv) as s:
            assert s.sendmail("", rcpts, body) == {}
            return s

    await sent_and_stored(srv, client, body, mail_from="", rcpt_to=rcpts)


async def test_smtplib_several_messages_one_connection(srv: Server) -> None:
    bodies = [f"Subject: n{i}\r\n\r\nMessage number {i}.\r\n".encode() * (i + 1) for i in range(5)]

    def client() -> RecordingSMTP:
        with smtp(srv) as s:
            for i, body in enumerate(bodies):
                assert s.sendmail(f"s{i}@example.org", [f"r{i}@example.net"], body) == {}
                if i == 2:
                    assert s.rset()[0] == 250
                    assert s.noop()[0] == 250
            return s

    s = await asyncio.to_thread(client)
    ids = [queue_id(text) for _, text in s.data_replies]
    assert len(set(ids)) == 5
    assert len(srv.store.list()) == 5
    for i, (qid, body) in enumerate(zip(ids, bodies, strict=True)):
        stored = check_stored(
            srv,
            qid,
            body,
            greeting="EHLO",
            mail_from=f"s{i}@example.org",
            rcpt_to=[f"r{i}@example.net"],
            protocol="ESMTP",
        )
        assert stored.envelope.client_port == srv.store.get(ids[0]).envelope.client_port  # type: ignore[union-attr]


async def test_smtplib_large_message(srv: Server) -> None:
    # 3 MB: streamed into the store in pieces, still byte-exact.
    line = bytes(range(0x21, 0x7F)) * 10  # 940 octets, under the 1000 limit
    body = b"Subject: large\r\n\r\n" + b"".join(
        (b"." if i % 7 == 0 else b"") + line[: 900 + i % 40] + b"\r\n" for i in range(3300)
    )
    assert len(body) > 3_000_000

    def client() -> RecordingSMTP:
        with smtp(srv) as s:
            assert s.sendmail("a@example.org", ["b@example.net"], body) == {}
            return s

    await sent_and_stored(srv, client, body)


async def test_smtplib_send_message(srv: Server) -> None:
    msg = email.message.EmailMessage()
    msg["From"] = "Alice <alice@example.org>"
    msg["To"] = "Bob <bob@example.net>, carol@example.net"
    msg["Cc"] = "dave@example.net"
    msg["Bcc"] = "eve@example.net"
    msg["Subject"] = "An EmailMessage"
    msg.set_content("Hello Bob,\n.dot line\nbye\n")
    msg.add_attachment(
        b"\x00\x01binary\xff" * 50,
        maintype="application",
        subtype="octet-stream",
        filename="blob.bin",
    )
    msg.set_boundary("==ehlo-test-boundary==")  # flattening is then deterministic
    expected = flatten(msg)
    assert b"Bcc" not in expected

    def client() -> RecordingSMTP:
        with smtp(srv) as s:
            assert s.send_message(msg) == {}
            return s

    s = await asyncio.to_thread(client)
    [(_, text)] = s.data_replies
    stored = check_stored(
        srv,
        queue_id(text),
        expected,
        greeting="EHLO",
        mail_from="alice@example.org",
        # smtplib collects To, then Bcc, then Cc.
        rcpt_to=["bob@example.net", "carol@example.net", "eve@example.net", "dave@example.net"],
        protocol="ESMTP",
    )
    assert stored.subject == "An EmailMessage"


# ------------------------------------------------------------------ aiosmtplib


def aclient(server: Server, **kwargs: object) -> aiosmtplib.SMTP:
    host, port = addr(server)
    options: dict[str, object] = {
        "hostname": host,
        "port": port,
        "local_hostname": "client.example",
        "timeout": TIMEOUT,
        "start_tls": False,
    }
    options.update(kwargs)
    return aiosmtplib.SMTP(**options)  # type: ignore[arg-type]


async def test_aiosmtplib_ehlo_and_sendmail(srv: Server) -> None:
    body = b"Subject: aio\r\n\r\nasync hello\r\n.leading dot\r\n"
    async with aclient(srv) as client:
        response = await client.ehlo()
        assert response.code == 250
        assert client.supports_extension("pipelining")
        errors, text = await client.sendmail("a@example.org", ["b@example.net"], body)
        assert errors == {}
        assert text.startswith("2.0.0 OK: queued as ")
    check_stored(
        srv,
        queue_id(text),
        body,
        greeting="EHLO",
        mail_from="a@example.org",
        rcpt_to=["b@example.net"],
        protocol="ESMTP",
    )


async def test_aiosmtplib_helo(srv: Server) -> None:
    body = b"Subject: aio helo\r\n\r\nno extensions\r\n"
    async with aclient(srv) as client:
        response = await client.helo()
        assert response.code == 250
        errors, text = await client.sendmail("a@example.org", ["b@example.net"], body)
        assert errors == {}
    check_stored(
        srv,
        queue_id(text),
        body,
        greeting="HELO",
        mail_from="a@example.org",
        rcpt_to=["b@example.net"],
        protocol="SMTP",
    )


async def test_aiosmtplib_starttls(srv: Server) -> None:
    body = b"Subject: aio tls\r\n\r\nover TLS\r\n"
    async with aclient(srv, validate_certs=False) as client:
        await client.ehlo()
        assert client.supports_extension("starttls")
        response = await client.starttls()
        assert response.code == 220
        await client.ehlo()
        assert not client.supports_extension("starttls")
        assert client.get_transport_info("ssl_object") is not None
        errors, text = await client.sendmail("a@example.org", ["b@example.net"], body)
        assert errors == {}
    check_stored(
        srv,
        queue_id(text),
        body,
        greeting="EHLO",
        mail_from="a@example.org",
        rcpt_to=["b@example.net"],
        protocol="ESMTPS",
        tls=True,
    )


async def test_aiosmtplib_smtputf8_over_tls(srv: Server) -> None:
    sender = "用户@例子.测试"
    body = "Subject: 你好\r\n\r\n中文正文\r\n".encode()
    async with aclient(srv, start_tls=True, validate_certs=False) as client:
        errors, text = await client.sendmail(
            sender, ["δοκιμή@παράδειγμα.δοκιμή"], body, mail_options=["SMTPUTF8"]
        )
        assert errors == {}
    check_stored(
        srv,
        queue_id(text),
        body,
        greeting="EHLO",
        mail_from=sender,
        rcpt_to=["δοκιμή@παράδειγμα.δοκιμή"],
        protocol="UTF8SMTPS",
        tls=True,
    )


async def test_aiosmtplib_send_message(srv: Server) -> None:
    msg = email.message.EmailMessage()
    msg["From"] = "alice@example.org"
    msg["To"] = "bob@example.net"
    msg["Bcc"] = "hidden@example.net"
    msg["Subject"] = "aiosmtplib send_message"
    msg.set_content("line one\n.line two starts with a dot\n")
    expected = flatten(msg)
    async with aclient(srv) as client:
        errors, text = await client.send_message(msg)
        assert errors == {}
    check_stored(
        srv,
        queue_id(text),
        expected,
        greeting="EHLO",
        mail_from="alice@example.org",
        rcpt_to=["bob@example.net", "hidden@example.net"],
        protocol="ESMTP",
    )


async def test_aiosmtplib_concurrent_sends(srv: Server) -> None:
    """Many sends in flight at once: queued on one connection, and over several.

    aiosmtplib 5 sends one command at a time (it has no RFC 2920 command
    pipelining); pipelined command groups are covered by test_e2e_raw and
    swaks --pipeline. Here several sendmail() calls are issued together on
    one connection (the client queues them) and several clients send at once.
    """

    def body(tag: str, i: int) -> bytes:
        return f"Subject: {tag}-{i}\r\n\r\nbody of {tag} {i}\r\n".encode()

    async with aclient(srv) as shared:
        results = await asyncio.gather(
            *(
                shared.sendmail(f"s{i}@example.org", [f"r{i}@example.net"], body("one", i))
                for i in range(6)
            )
        )
    sent = [(f"s{i}@example.org", body("one", i), text) for i, (_, text) in enumerate(results)]

    async def one_client(i: int) -> str:
        async with aclient(srv) as client:
            _, text = await client.sendmail(
                f"c{i}@example.org", [f"r{i}@example.net"], body("many", i)
            )
            return text

    texts = await asyncio.gather(*(one_client(i) for i in range(8)))
    sent += [(f"c{i}@example.org", body("many", i), text) for i, text in enumerate(texts)]

    ids = [queue_id(text) for _, _, text in sent]
    assert len(set(ids)) == len(sent) == 14
    assert {m.envelope.queue_id for m in srv.store.list()} == set(ids)
    for (sender, data, _), qid in zip(sent, ids, strict=True):
        idx = sender[1:].split("@")[0]
        check_stored(
            srv,
            qid,
            data,
            greeting="EHLO",
            mail_from=sender,
            rcpt_to=[f"r{idx}@example.net"],
            protocol="ESMTP",
        )
