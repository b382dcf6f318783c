"""End to end over raw sockets: malformed, abusive and tricky input.

A real ``ehlo.Server`` runs in the test's event loop; the client is the raw
``tests.helpers.Client``, which writes exactly the bytes given and parses
replies itself (code, enhanced code, lines). Every read is bounded.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from ehlo import HookContext, Server

from .helpers import (
    READ_TIMEOUT,
    Client,
    ReplyReader,
    async_wait_until,
    client_tls,
    codes,
    connect,
    make_config,
    queued_id,
    transaction,
)
from .trace import message_of

pytestmark = pytest.mark.timeout(30)


def stored_body(server: Server, queue_id: str) -> bytes:
    raw = server.store.raw(queue_id)
    assert raw is not None, queue_id
    return message_of(raw)


# ----------------------------------------------------------- command errors


async def test_unknown_verb(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    r = await c.cmd("FOO bar")
    # Before EHLO no enhanced codes (RFC 2034 section 3: only once offered).
    assert (r.code, r.enhanced) == (500, None)
    await c.ehlo()
    assert codes([await c.cmd("XYZZY")]) == [(500, "5.5.2")]
    assert codes([await c.cmd("NOOP")]) == [(250, "2.0.0")]


async def test_mail_before_helo(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    assert codes([await c.cmd("MAIL FROM:<a@example.org>")]) == [(503, None)]
    assert codes([await c.cmd("RCPT TO:<b@example.net>")]) == [(503, None)]
    assert codes([await c.cmd("DATA")]) == [(503, None)]


async def test_rcpt_before_mail(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    await c.ehlo()
    assert codes([await c.cmd("RCPT TO:<b@example.net>")]) == [(503, "5.5.1")]


async def test_data_before_rcpt(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    await c.ehlo()
    assert codes([await c.cmd("DATA")]) == [(503, "5.5.1")]
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert codes([await c.cmd("DATA")]) == [(503, "5.5.1")]
    # The transaction is still open: a nested MAIL is refused, RCPT works.
    assert codes([await c.cmd("MAIL FROM:<a@example.org>")]) == [(503, "5.5.1")]
    assert codes([await c.cmd("RCPT TO:<b@example.net>")]) == [(250, "2.1.5")]
    assert (await c.cmd("DATA")).code == 354


async def test_helo_without_argument(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    assert codes([await c.cmd("HELO")]) == [(501, None)]
    assert codes([await c.cmd("EHLO")]) == [(501, None)]
    assert codes([await c.cmd("MAIL FROM:<a@example.org>")]) == [(503, None)]


async def test_helo_session_refuses_esmtp_parameters(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    assert (await c.cmd("HELO client.example")).code == 250
    assert codes([await c.cmd("MAIL FROM:<a@example.org> SIZE=10")]) == [(555, None)]
    assert codes([await c.cmd("MAIL FROM:<a@example.org> BODY=8BITMIME")]) == [(555, None)]
    r = await c.cmd("MAIL FROM:<a@example.org>")
    assert (r.code, r.enhanced) == (250, None)  # no enhanced codes after HELO
    assert (await c.cmd("RCPT TO:<b@example.net> NOTIFY=NEVER")).code == 555


async def test_bdat_after_helo(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    assert (await c.cmd("HELO client.example")).code == 250
    assert codes([await c.cmd("BDAT 0 LAST")]) == [(502, None)]
    await transaction(c)
    assert codes([await c.cmd("BDAT 0 LAST")]) == [(502, None)]
    assert (await c.cmd("DATA")).code == 354


async def test_expn_and_vrfy(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    await c.ehlo()
    assert codes([await c.cmd("EXPN staff")]) == [(502, "5.5.1")]
    assert codes([await c.cmd("VRFY postmaster")]) == [(252, "2.1.5")]
    assert codes([await c.cmd("VRFY")]) == [(501, "5.5.4")]
    assert codes([await c.cmd("HELP")]) == [(214, "2.0.0")]


async def test_huge_line_without_crlf(server: Server, clients: list[Client]) -> None:
    """2 MB without CRLF: one 500 5.5.2 at once, nothing buffered, session goes on."""
    c = await connect(server, clients)
    await c.ehlo()
    [proto] = server.ctx.connections  # type: ignore[union-attr]
    piece = b"A" * 65536
    c.send(b"NOOP " + piece[5:])
    await c.writer.drain()
    # The reply comes after the first 64 KiB: the server does not wait for a
    # line end that may never come.
    r = await c.reply()
    assert codes([r]) == [(500, "5.5.2")], r
    max_buffered = 0
    for _ in range(31):
        c.send(piece)
        await c.writer.drain()
        await asyncio.sleep(0)  # a turn of the loop (no time): the server reads the piece
        max_buffered = max(max_buffered, proto.conn.buffered)
    assert c.replies.pending == b""
    c.send(b"\r\nNOOP\r\n")
    await c.writer.drain()
    # Exactly one 500: the next reply is the NOOP's.
    assert codes([await c.reply()]) == [(250, "2.0.0")]
    # The rest of the 2 MB line was dropped as it arrived, not kept.
    assert max_buffered < 4096, max_buffered
    assert proto.conn.buffered == 0


async def test_long_command_line_with_crlf(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    await c.ehlo()
    assert codes([await c.cmd("NOOP " + "x" * 2000)]) == [(500, "5.5.2")]
    # RFC 5321 4.5.3.1.4: 512 octets with CRLF are fine for a plain command.
    assert codes([await c.cmd("NOOP " + "x" * 505)]) == [(250, "2.0.0")]
    assert codes([await c.cmd("NOOP " + "x" * 506)]) == [(500, "5.5.2")]


async def test_nul_byte_in_command(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    await c.ehlo()
    assert codes([await c.cmd(b"NOOP a\x00b")]) == [(500, "5.5.2")]
    assert codes([await c.cmd(b"MAIL FROM:<a\x00@example.org>")]) == [(500, "5.5.2")]
    assert codes([await c.cmd(b"NOOP")]) == [(250, "2.0.0")]


async def test_invalid_utf8_in_command(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    await c.ehlo()
    assert codes([await c.cmd(b"NOOP \xff\xfe")]) == [(500, "5.5.2")]
    assert codes([await c.cmd(b"MAIL FROM:<\xc3(@example.org> SMTPUTF8")]) == [(500, "5.5.2")]
    assert codes([await c.cmd(b"NOOP")]) == [(250, "2.0.0")]


# ------------------------------------------------------------------- smuggling


def unstuff_reference(sent: bytes) -> bytes:
    """What a message sent as ``sent`` (ending CRLF, before ".CRLF") must be stored as.

    Written from RFC 5321 alone: lines end in CRLF (section 2.3.8); a leading
    dot is removed (section 4.5.2); then every bare CR or LF becomes CRLF (the
    server's "normalize" mode).
    """
    assert sent.endswith(b"\r\n")
    out = []
    for line in sent[:-2].split(b"\r\n"):
        if line.startswith(b"."):
            line = line[1:]
        out.append(re.sub(rb"\r|\n", b"\r\n", line))
    return b"\r\n".join(out) + b"\r\n"


SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nSmuggled message\r\n"
SEQUENCES = {
    "LF.LF": b"\n.\n",
    "CR.CR": b"\r.\r",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
}


def smuggling_message(seq: bytes) -> bytes:
    return b"Subject: smuggling\r\n\r\nHello" + seq + SMUGGLED


async def send_in_pieces(c: Client, data: bytes, bytewise: bool) -> None:
    if not bytewise:
        c.send(data)
        await c.writer.drain()
        return
    for i in range(len(data)):
        c.send(data[i : i + 1])
        await c.writer.drain()
        await asyncio.sleep(0)  # a turn of the loop (no time): each byte a read of its own


@pytest.mark.parametrize("bytewise", [False, True], ids=["one-write", "bytewise"])
@pytest.mark.parametrize("seq", list(SEQUENCES), ids=list(SEQUENCES))
async def test_smuggling_stays_inside_the_message(
    server: Server, clients: list[Client], seq: str, bytewise: bool
) -> None:
    c = await connect(server, clients)
    await c.ehlo()
    await transaction(c)
    assert (await c.cmd("DATA")).code == 354
    message = smuggling_message(SEQUENCES[seq])
    await send_in_pieces(c, message + b".\r\n", bytewise)
    qid = queued_id(await c.reply())
    # Had the server ended DATA early, the smuggled MAIL, RCPT and DATA would
    # have been answered here before the reply to QUIT.
    assert codes([await c.cmd("QUIT")]) == [(221, "2.0.0")]
    await c.expect_eof()
    assert [m.envelope.queue_id for m in server.store.list()] == [qid]
    body = stored_body(server, qid)
    assert body == unstuff_reference(message)
    assert SMUGGLED in body
    # Normalised: no bare CR or LF is left.
    assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")
    envelope = server.store.list()[0].envelope
    assert (envelope.mail_from, envelope.rcpt_to) == ("a@example.org", ["b@example.net"])


@pytest.mark.parametrize("seq", list(SEQUENCES), ids=list(SEQUENCES))
async def test_smuggling_rejected_in_reject_mode(
    start: Callable[..., Awaitable[Server]], clients: list[Client], seq: str
) -> None:
    server = await start(bare_newline="reject")
    c = await connect(server, clients)
    await c.ehlo()
    await transaction(c)
    assert (await c.cmd("DATA")).code == 354
    c.send(smuggling_message(SEQUENCES[seq]) + b".\r\n")
    assert codes([await c.reply()]) == [(554, "5.6.0")]
    # Nothing smuggled was acted on: the next reply is the NOOP's.
    assert codes([await c.cmd("NOOP")]) == [(250, "2.0.0")]
    assert server.store.list() == []
    # The session goes on: a clean message is accepted.
    await transaction(c)
    assert (await c.cmd("DATA")).code == 354
    qid = queued_id(await c.cmd(b"Subject: ok\r\n\r\nclean\r\n."))
    assert stored_body(server, qid) == b"Subject: ok\r\n\r\nclean\r\n"
    assert len(server.store.list()) == 1


# ---------------------------------------------------------------------- STARTTLS


async def test_starttls_command_injection(server: Server, clients: list[Client]) -> None:
    """CVE-2011-0411: plaintext sent after STARTTLS is never acted on inside TLS."""
    c = await connect(server, clients)
    await c.ehlo()
    c.send(b"STARTTLS\r\nRSET\r\n")
    await c.writer.drain()
    assert codes([await c.reply()]) == [(220, "2.0.0")]
    # No plaintext answer to the injected RSET either.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(c.reader.read(1), 0.2)
    await asyncio.wait_for(c.writer.start_tls(client_tls()), READ_TIMEOUT)
    r = await c.cmd("EHLO again.example")
    assert r.code == 250
    assert r.lines[0].startswith("localhost Hello again.example"), r
    assert "STARTTLS" not in r.lines
    assert codes([await c.cmd("NOOP")]) == [(250, "2.0.0")]
    # The session knows nothing of the pre-TLS greeting: a transaction works and
    # is recorded as TLS.
    await transaction(c)
    assert (await c.cmd("DATA")).code == 354
    qid = queued_id(await c.cmd(b"Subject: tls\r\n\r\nx\r\n."))
    stored = server.store.get(qid)
    assert stored is not None
    assert stored.envelope.greeting_name == "again.example"
    assert stored.envelope.tls is not None
    assert stored.envelope.protocol == "ESMTPS"
    assert codes([await c.cmd("STARTTLS")]) == [(503, "5.5.1")]


class MemoryTLS:
    """A TLS client over raw stream I/O, so the test decides what shares a write."""

    def __init__(self, c: Client) -> None:
        self.c = c
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = client_tls().wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.replies = ReplyReader(self._read)

    async def handshake(self) -> bytes:
        """Run the handshake; return the client's last flight (not yet sent)."""
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    self.c.send(self.outgoing.read())
                data = await asyncio.wait_for(self.c.reader.read(65536), READ_TIMEOUT)
                assert data, "server closed during the handshake"
                self.incoming.write(data)
            else:
                return self.outgoing.read()

    def encrypt(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self.outgoing.read()

    async def _read(self) -> bytes:
        while True:
            try:
                return self.obj.read(65536)
            except ssl.SSLWantReadError:
                pass
            data = await self.c.reader.read(65536)
            if not data:
                return b""
            self.incoming.write(data)
            if self.outgoing.pending:  # e.g. key updates
                self.c.send(self.outgoing.read())


async def starttls_memory(server: Server, clients: list[Client]) -> tuple[Client, MemoryTLS]:
    c = await connect(server, clients)
    await c.ehlo()
    assert (await c.cmd("STARTTLS")).code == 220
    tls = MemoryTLS(c)
    return c, tls


async def test_starttls_data_after_client_finished(server: Server, clients: list[Client]) -> None:
    """Control for the test below: Finished first, EHLO a moment later."""
    c, tls = await starttls_memory(server, clients)
    finished = await tls.handshake()
    c.send(finished)
    await c.writer.drain()
    # The gap in time is the point: Finished and EHLO arrive in reads of their own.
    await asyncio.sleep(0.1)
    c.send(tls.encrypt(b"EHLO late.example\r\n"))
    r = await tls.replies.reply()
    assert r.code == 250 and r.lines[0].startswith("localhost Hello late.example")


async def test_starttls_data_with_client_finished(server: Server, clients: list[Client]) -> None:
    """The client's Finished and its first EHLO in one TCP write (TLS 1.3).

    Regression: asyncio's SSLProtocol hands such data to data_received() before
    loop.start_tls() returns; it used to be dropped as pre-TLS plaintext, and
    clients that greet right after the handshake (openssl s_client, aiosmtplib)
    hung.
    """
    c, tls = await starttls_memory(server, clients)
    finished = await tls.handshake()
    c.send(finished + tls.encrypt(b"EHLO quick.example\r\n"))
    await c.writer.drain()
    r = await tls.replies.reply(timeout=2.0)
    assert r.code == 250 and r.lines[0].startswith("localhost Hello quick.example")


# -------------------------------------------------------------------- pipelining


async def test_pipelined_group(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    c.send(
        "EHLO pipe.example\r\nMAIL FROM:<a@example.org>\r\n"
        "RCPT TO:<r1@example.net>\r\nRCPT TO:<r2@example.net>\r\nRCPT TO:<r3@example.net>\r\n"
        "DATA\r\n"
    )
    await c.writer.drain()
    replies = [await c.reply() for _ in range(6)]
    assert replies[0].code == 250 and "PIPELINING" in replies[0].lines
    assert codes(replies[1:]) == [
        (250, "2.1.0"),
        (250, "2.1.5"),
        (250, "2.1.5"),
        (250, "2.1.5"),
        (354, None),
    ]
    c.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
    await c.writer.drain()
    qid = queued_id(await c.reply())
    assert codes([await c.reply(), await c.reply()]) == [(250, "2.0.0"), (221, "2.0.0")]
    await c.expect_eof()
    stored = server.store.get(qid)
    assert stored is not None
    assert stored.envelope.rcpt_to == ["r1@example.net", "r2@example.net", "r3@example.net"]
    assert stored_body(server, qid) == b"Subject: pipelined\r\n\r\nbody\r\n"


async def test_pipelined_group_with_errors(server: Server, clients: list[Client]) -> None:
    # RFC 2920: each command gets its own reply, in order, errors included.
    c = await connect(server, clients)
    await c.ehlo()
    c.send(
        "MAIL FROM:<a@example.org>\r\nRCPT TO:<bad address>\r\nRCPT TO:<ok@example.net>\r\n"
        "BOGUS\r\nDATA\r\n"
    )
    replies = [await c.reply() for _ in range(5)]
    assert codes(replies) == [
        (250, "2.1.0"),
        (501, "5.1.3"),
        (250, "2.1.5"),
        (500, "5.5.2"),
        (354, None),
    ]


async def test_101_recipients(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    await c.ehlo()
    rcpts = [f"r{i}@example.net" for i in range(101)]
    c.send("MAIL FROM:<a@example.org>\r\n" + "".join(f"RCPT TO:<{r}>\r\n" for r in rcpts))
    await c.writer.drain()
    replies = [await c.reply() for _ in range(102)]
    assert codes(replies[:101]) == [(250, "2.1.0")] + [(250, "2.1.5")] * 100
    assert codes(replies[101:]) == [(452, "4.5.3")]
    assert (await c.cmd("DATA")).code == 354
    qid = queued_id(await c.cmd(b"Subject: many\r\n\r\nx\r\n."))
    stored = server.store.get(qid)
    assert stored is not None and stored.envelope.rcpt_to == rcpts[:100]


# ------------------------------------------------------------------------ sizes


async def test_size_parameter_too_big(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    await c.ehlo()
    assert codes([await c.cmd("MAIL FROM:<a@example.org> SIZE=99999999999999999999")]) == [
        (552, "5.3.4")
    ]
    assert codes([await c.cmd("MAIL FROM:<a@example.org> SIZE=999999999999999999999")]) == [
        (501, "5.5.4")
    ]
    assert codes([await c.cmd("MAIL FROM:<a@example.org> SIZE=1000")]) == [(250, "2.1.0")]


async def test_message_over_max_size(
    start: Callable[..., Awaitable[Server]], clients: list[Client]
) -> None:
    server = await start(max_message_size=10000)
    c = await connect(server, clients)
    r = await c.ehlo()
    assert "SIZE 10000" in r.lines
    assert codes([await c.cmd("MAIL FROM:<a@example.org> SIZE=10001")]) == [(552, "5.3.4")]
    await transaction(c)
    assert (await c.cmd("DATA")).code == 354
    big = b"Subject: big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 200  # > 10000
    c.send(big + b".\r\n")
    assert codes([await c.reply()]) == [(552, "5.3.4")]
    assert server.store.list() == []
    # The connection is still usable; exactly 10000 octets are accepted.
    assert codes([await c.cmd("NOOP")]) == [(250, "2.0.0")]
    assert (await c.cmd("MAIL FROM:<a@example.org> SIZE=10000")).code == 250
    assert (await c.cmd("RCPT TO:<b@example.net>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    exact = b"Subject: exact\r\n\r\n" + (b"y" * 98 + b"\r\n") * 99
    exact += b"z" * (10000 - len(exact) - 2) + b"\r\n"
    assert len(exact) == 10000
    qid = queued_id(await c.cmd(exact + b"."))
    assert stored_body(server, qid) == exact
    assert len(server.store.list()) == 1


def sized_body(size: int) -> bytes:
    """A message of exactly ``size`` octets whose lines all start with a dot."""
    head = b"Subject: dots\r\n\r\n"
    line = b"." + b"d" * 97 + b"\r\n"
    body = head + line * ((size - len(head)) // len(line))
    rest = size - len(body)
    assert rest >= 3
    return body + b"." + b"e" * (rest - 3) + b"\r\n"


async def test_size_limit_boundary(
    start: Callable[..., Awaitable[Server]], clients: list[Client]
) -> None:
    # RFC 1870 section 3: the size is the message's octets as received and
    # unstuffed (CRLFs counted, the final "." line not); a message of exactly
    # the limit passes, one octet more is refused, over DATA and over BDAT.
    limit = 10_000
    server = await start(max_message_size=limit)
    c = await connect(server, clients)
    assert f"SIZE {limit}" in (await c.ehlo()).lines
    # RFC 1870 section 6.1: a declared size above the limit is refused at MAIL.
    assert codes([await c.cmd(f"MAIL FROM:<a@example.org> SIZE={limit + 1}")]) == [(552, "5.3.4")]
    assert (await c.cmd(f"MAIL FROM:<a@example.org> SIZE={limit}")).code == 250
    assert (await c.cmd("RCPT TO:<b@example.net>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    exact = sized_body(limit)
    stuffed = exact.replace(b"\r\n.", b"\r\n..")
    assert len(exact) == limit and len(stuffed) > limit + 90  # the dots are not counted
    qid = queued_id(await c.cmd(stuffed + b"."))
    assert stored_body(server, qid) == exact
    # RFC 1870 section 6.3: one octet more is refused with 552, after the whole body.
    await transaction(c)
    assert (await c.cmd("DATA")).code == 354
    over = sized_body(limit + 1)
    c.send(over.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    assert codes([await c.reply()]) == [(552, "5.3.4")]
    await transaction(c)
    c.send(b"BDAT %d LAST\r\n" % limit + exact)
    bdat_id = queued_id(await c.reply())
    assert stored_body(server, bdat_id) == exact
    await transaction(c)
    c.send(b"BDAT %d LAST\r\n" % (limit + 1) + over)
    assert codes([await c.reply()]) == [(552, "5.3.4")]
    assert codes([await c.cmd("NOOP")]) == [(250, "2.0.0")]
    assert sorted(m.envelope.queue_id for m in server.store.list()) == sorted([qid, bdat_id])


async def test_text_line_too_long(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    await c.ehlo()
    ok = b"Subject: 998\r\n\r\n" + b"a" * 998 + b"\r\n"  # 1000 octets with CRLF
    await transaction(c)
    assert (await c.cmd("DATA")).code == 354
    qid = queued_id(await c.cmd(ok + b"."))
    await transaction(c)
    assert (await c.cmd("DATA")).code == 354
    c.send(b"Subject: 999\r\n\r\n" + b"a" * 999 + b"\r\nmore\r\n.\r\n")
    assert codes([await c.reply()]) == [(554, "5.6.0")]
    assert codes([await c.cmd("NOOP")]) == [(250, "2.0.0")]
    assert [m.envelope.queue_id for m in server.store.list()] == [qid]
    assert stored_body(server, qid) == ok


# ---------------------------------------------------------------- many errors


async def test_too_many_errors(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    await c.ehlo()
    c.send("BOGUS\r\n" * 25)
    await c.writer.drain()
    replies = [await c.reply() for _ in range(21)]
    assert codes(replies) == [(500, "5.5.2")] * 20 + [(421, "4.7.0")]
    await c.expect_eof()


# ----------------------------------------------------------------------- BDAT


async def test_bdat_equals_data(server: Server, clients: list[Client]) -> None:
    body = b"Subject: chunks\r\n\r\n.leading dot\r\nHello world\r\n..two\r\n"
    c = await connect(server, clients)
    await c.ehlo()
    await transaction(c)
    assert (await c.cmd("DATA")).code == 354
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    data_id = queued_id(await c.cmd(stuffed + b"."))

    await transaction(c)
    pieces = [body[:5], body[5:6], body[6:30], body[30:]]
    for piece in pieces:
        c.send(b"BDAT %d\r\n" % len(piece) + piece)
        assert codes([await c.reply()]) == [(250, "2.0.0")]
    bdat_id = queued_id(await c.cmd("BDAT 0 LAST"))
    assert stored_body(server, data_id) == body
    assert stored_body(server, bdat_id) == body
    stored = server.store.get(bdat_id)
    assert stored is not None and stored.envelope.protocol == "ESMTP"


async def test_bdat_is_not_transformed(server: Server, clients: list[Client]) -> None:
    # RFC 3030: chunks are taken as they are: no unstuffing, no end marker,
    # no CRLF normalisation.
    body = b"Subject: raw\r\n\r\n.dot\r\n.\r\nbare\nlf and bare\rcr\r\n\x00\xff\r\n"
    c = await connect(server, clients)
    await c.ehlo()
    await transaction(c)
    c.send(b"BDAT %d LAST\r\n" % len(body) + body)
    qid = queued_id(await c.reply())
    assert stored_body(server, qid) == body


async def test_bdat_out_of_sequence_swallows_chunk(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    await c.ehlo()
    # The chunk looks like a command; it must be read as data and dropped.
    c.send(b"BDAT 6\r\nQUIT\r\n")
    assert codes([await c.reply()]) == [(503, "5.5.1")]
    assert codes([await c.cmd("NOOP")]) == [(250, "2.0.0")]
    await transaction(c)
    c.send(b"BDAT 4 LAST\r\nabc\n")
    qid = queued_id(await c.reply())
    assert stored_body(server, qid) == b"abc\n"


# ------------------------------------------------------------- closing, limits


async def test_quit(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    await c.ehlo()
    assert codes([await c.cmd("QUIT")]) == [(221, "2.0.0")]
    await c.expect_eof()


async def test_connection_limit_per_ip(
    start: Callable[..., Awaitable[Server]], clients: list[Client]
) -> None:
    server = await start(max_connections_per_ip=2)
    first = await connect(server, clients)
    await connect(server, clients)
    third = await connect(server, clients, banner=False)
    r = await third.reply()
    assert r.code == 421
    assert "Too many connections" in r.text
    await third.expect_eof()
    # A slot frees up when a connection ends.
    assert (await first.cmd("QUIT")).code == 221
    await first.expect_eof()
    async def admitted() -> bool:
        c = await connect(server, clients, banner=False)
        return (await c.reply()).code == 220

    await async_wait_until(admitted, "a freed slot to admit a connection", poll=0.02)


async def test_connection_limit_enhanced_code(
    start: Callable[..., Awaitable[Server]], clients: list[Client]
) -> None:
    server = await start(max_connections_per_ip=1)
    await connect(server, clients)
    second = await connect(server, clients, banner=False)
    r = await second.reply()
    assert (r.code, r.enhanced) == (421, "4.7.0"), r


async def test_idle_timeout(start: Callable[..., Awaitable[Server]], clients: list[Client]) -> None:
    server = await start(command_timeout=0.3)
    c = await connect(server, clients)
    await c.ehlo()
    began = time.monotonic()
    r = await c.reply(timeout=5.0)
    waited = time.monotonic() - began
    assert (r.code, r.enhanced) == (421, "4.4.2")
    assert 0.25 <= waited < 3.0, waited
    await c.expect_eof()
    # Also before any greeting.
    c2 = await connect(server, clients)
    r = await c2.reply(timeout=5.0)
    assert r.code == 421
    await c2.expect_eof()


async def test_data_timeout_drops_message(
    start: Callable[..., Awaitable[Server]], clients: list[Client]
) -> None:
    server = await start(data_timeout=0.3)
    c = await connect(server, clients)
    await c.ehlo()
    await transaction(c)
    assert (await c.cmd("DATA")).code == 354
    c.send(b"Subject: never finished\r\n\r\npartial")
    r = await c.reply(timeout=5.0)
    assert (r.code, r.enhanced) == (421, "4.4.2")
    await c.expect_eof()
    assert server.store.list() == []


async def test_timeout_reply_without_enhancedstatuscodes(
    start: Callable[..., Awaitable[Server]], clients: list[Client]
) -> None:
    # With ENHANCEDSTATUSCODES switched off, no reply may carry an enhanced code.
    server = await start(command_timeout=0.3, enhancedstatuscodes=False)
    c = await connect(server, clients)
    r = await c.ehlo()
    assert "ENHANCEDSTATUSCODES" not in r.lines
    assert codes([await c.cmd("NOOP")]) == [(250, None)]
    r = await c.reply(timeout=5.0)
    assert (r.code, r.enhanced) == (421, None), r


async def test_half_close_after_pipelined_data(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    await c.ehlo()
    c.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
        b"Subject: half\r\n\r\nclosed\r\n.\r\nQUIT\r\n"
    )
    await c.writer.drain()
    assert c.writer.can_write_eof()
    c.writer.write_eof()  # shutdown(SHUT_WR)
    replies = [await c.reply() for _ in range(5)]
    assert codes(replies[:3]) == [(250, "2.1.0"), (250, "2.1.5"), (354, None)]
    qid = queued_id(replies[3])
    assert codes(replies[4:]) == [(221, "2.0.0")]
    await c.expect_eof()
    assert stored_body(server, qid) == b"Subject: half\r\n\r\nclosed\r\n"


# ------------------------------------------------------- UTF-8, greeting names


async def test_utf8_addresses_need_smtputf8(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    await c.ehlo()
    assert codes([await c.cmd("MAIL FROM:<用户@例子.测试>")]) == [(553, "5.6.7")]
    assert codes([await c.cmd("MAIL FROM:<用户@例子.测试> SMTPUTF8")]) == [(250, "2.1.0")]
    assert codes([await c.cmd("RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>")]) == [(250, "2.1.5")]
    assert (await c.cmd("DATA")).code == 354
    qid = queued_id(await c.cmd("Subject: ütf\r\n\r\n正文\r\n."))
    stored = server.store.get(qid)
    assert stored is not None
    assert stored.envelope.mail_from == "用户@例子.测试"
    assert stored.envelope.protocol == "UTF8SMTP"
    assert stored_body(server, qid) == "Subject: ütf\r\n\r\n正文\r\n".encode()
    # HELO sessions know no SMTPUTF8.
    c2 = await connect(server, clients)
    assert (await c2.cmd("HELO client.example")).code == 250
    assert codes([await c2.cmd("MAIL FROM:<用户@例子.测试> SMTPUTF8")]) == [(555, None)]


async def test_greeting_names(server: Server, clients: list[Client]) -> None:
    c = await connect(server, clients)
    assert codes([await c.cmd("HELO 例子.测试")]) == [(501, None)]
    r = await c.cmd("EHLO 例子.测试")
    assert r.code == 250 and r.lines[0] == "localhost Hello 例子.测试 [127.0.0.1]"
    # A name that is no domain is kept as the client said it, but the Received
    # header stays one well-formed token per field.
    r = await c.cmd("EHLO bad(name);by")
    assert r.code == 250
    await transaction(c)
    assert (await c.cmd("DATA")).code == 354
    qid = queued_id(await c.cmd("Subject: n\r\n\r\nx\r\n."))
    stored = server.store.get(qid)
    assert stored is not None and stored.envelope.greeting_name == "bad(name);by"
    raw = server.store.raw(qid)
    assert raw is not None
    first = raw.split(b"\r\n", 1)[0].decode()
    assert first == "Received: from [127.0.0.1] ([127.0.0.1] helo=bad?name??by)", first
    assert codes([await c.cmd("STARTTLS now")]) == [(501, "5.5.4")]
    c2 = await connect(server, clients)
    assert (await c2.cmd("HELO client.example")).code == 250
    assert codes([await c2.cmd("STARTTLS")]) == [(503, None)]


# --------------------------------------------------------------------- shutdown


async def test_graceful_stop(
    start: Callable[..., Awaitable[Server]], clients: list[Client]
) -> None:
    server = await start()
    host, port = server.addresses[0]
    idle = await connect(server, clients)
    await idle.ehlo()
    busy = await connect(server, clients)
    await busy.ehlo()
    await transaction(busy)
    assert (await busy.cmd("DATA")).code == 354
    busy.send(b"Subject: in flight\r\n\r\nfirst half ")
    await busy.writer.drain()
    stopping = asyncio.ensure_future(server.stop(timeout=5.0))
    # Idle sessions are told at once.
    assert codes([await idle.reply()]) == [(421, "4.3.2")]
    await idle.expect_eof()
    # No new connections.
    with pytest.raises(OSError):
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), READ_TIMEOUT)
        writer.close()
    # The message in progress may finish, then the session is closed.
    busy.send(b"second half\r\n.\r\n")
    qid = queued_id(await busy.reply())
    assert codes([await busy.reply()]) == [(421, "4.3.2")]
    await busy.expect_eof()
    await asyncio.wait_for(stopping, 10)
    assert stored_body(server, qid) == b"Subject: in flight\r\n\r\nfirst half second half\r\n"


# ---------------------------------------------------------------- backpressure


async def test_unread_replies_stop_reading(tmp_path: Path) -> None:
    """A client that pipelines and never reads its replies is eventually not read either.

    The kernel buffers are kept small on both sides so that "the client cannot
    send any more" means "the server stopped reading". A mail hook makes every
    MAIL reply asynchronous, as policy checks and commits are in real use.
    """
    processed = 0

    async def count(ctx: HookContext) -> None:
        nonlocal processed
        processed += 1

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    server = Server(
        make_config(tmp_path / "data", tls=False, reverse_dns=False),
        hooks={"mail": [count]},
        sockets=[listener],
    )
    await server.start()
    port = server.addresses[0][1]
    unit = b"MAIL FROM:<a@example.org>\r\n" + b"HELP\r\n" * 20 + b"RSET\r\n"
    total = 10000  # 1.5 MB in, about 30 MB of replies
    sock = socket.socket()

    def flood() -> int:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.settimeout(0.5)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"EHLO flood.example\r\n")
        sent = 0
        try:
            while sent < total:
                sock.sendall(unit * 100)
                sent += 100
        except OSError:  # blocked: the server stopped reading
            pass
        return sent

    try:
        sent = await asyncio.wait_for(asyncio.to_thread(flood), 20)
    finally:
        sock.close()
        await server.stop(timeout=1.0)
    assert sent < total, (sent, processed)
    assert processed < total // 2, (sent, processed)
