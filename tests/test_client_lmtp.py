"""ehlo's client speaking LMTP (RFC 2033), passing DSN parameters, reporting each recipient.

- Dovecot's LMTP server (the Debian packages, run by ``tests/dovecot.py``)
  over TCP and over a Unix socket, with DATA and with BDAT: each recipient
  gets its own reply after the data and the message lands in its Maildir,
  byte-exact under the trace fields Dovecot puts on top.
- aiosmtpd's LMTP server answering 250 for one recipient and 550 for another
  after the data: one delivered, one failed, nothing raised.
- A raw loopback server that records the commands: the DSN parameters
  (RFC 3461) on MAIL and RCPT as given, refused before sending to a server
  without DSN; an LMTP server that refuses LHLO gets no HELO.
- ehlo's own server: a recipient refused at RCPT, two accepted, both
  delivered with the one reply after the data.
- The sans-IO connection: LHLO only, and as many replies awaited after the
  data as recipients were accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import Envelope

from ehlo import Server
from ehlo.client import (
    ConnectionFailed,
    OptionNotSupported,
    ServiceRefused,
    SMTPClient,
    SMTPClientError,
    Timeouts,
)
from ehlo.protocol import NEED_DATA, ClientConnection, LocalProtocolError, Reply

from .dovecot import Dovecot
from .helpers import free_port, make_config

pytestmark = pytest.mark.timeout(90)

TIMEOUTS = Timeouts.uniform(20.0)

# A message with what the transfer must keep: a leading dot (dot-stuffing),
# 8-bit text (BODY=8BITMIME), and lines enough for several BDAT chunks.
MESSAGE = (
    b"From: <alice@example.org>\r\n"
    b"To: <bob@example.org>, <carol@example.net>\r\n"
    b"Subject: LMTP test\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    + "caf\u00e9 au lait\r\n".encode()
    + b"".join(b"line %06d of the body, some text to fill it up\r\n" % i for i in range(3000))
)
# The trace fields Dovecot's LMTP server adds on top of a message it stores.
_TRACE_FIELD = re.compile(rb"(Return-Path|Delivered-To|Received):", re.IGNORECASE)


def dovecot_prefix(stored: bytes, original: bytes) -> bytes:
    """What Dovecot put before the original message; checked to be only trace fields."""
    assert stored.endswith(original), stored[:600]
    prefix = stored[: len(stored) - len(original)]
    lines = prefix.split(b"\r\n")
    assert lines[-1] == b"", prefix
    for line in lines[:-1]:
        # Each line opens a trace field or continues one (folded with a space or tab).
        assert _TRACE_FIELD.match(line) or line[:1] in (b" ", b"\t"), prefix
    return prefix


# --------------------------------------------------------------- Dovecot


@pytest.mark.parametrize("chunking", [None, False], ids=["bdat", "data"])
async def test_dovecot_over_tcp_one_reply_per_recipient(
    dovecot: Dovecot, chunking: bool | None
) -> None:
    recipients = ["bob@example.org", "carol@example.net"]
    client = SMTPClient(
        dovecot.host,
        dovecot.port,
        lmtp=True,
        chunking=chunking,
        chunk_size=32 * 1024,
        timeouts=TIMEOUTS,
        helo_name="client.example",
    )
    async with client:
        assert "PIPELINING" in client.extensions
        result = await client.send_message("alice@example.org", recipients, MESSAGE)
    assert result.chunked is (chunking is None)
    assert list(result.accepted) == recipients
    assert list(result.delivered) == recipients, dovecot.log
    assert result.failed == {} and result.refused == {}
    # Two replies, one per recipient, each naming its own recipient.
    bob, carol = result.delivered.values()
    assert bob is not carol
    assert bob.code == carol.code == 250
    assert "bob@example.org" in bob.text and "carol@example.net" in carol.text
    assert result.reply is bob
    for user in ("bob", "carol"):
        [stored] = dovecot.messages(user)
        prefix = dovecot_prefix(stored, MESSAGE)
        assert prefix.startswith(b"Return-Path: <alice@example.org>\r\n")


async def test_dovecot_over_a_unix_socket(dovecot: Dovecot) -> None:
    assert dovecot.socket_path is not None
    client = SMTPClient(
        f"unix:{dovecot.socket_path}", lmtp=True, timeouts=TIMEOUTS, helo_name="client.example"
    )
    assert client.peer == f"unix:{dovecot.socket_path}"
    async with client:
        first = await client.send_message(
            "alice@example.org", ["bob@example.org", "carol@example.net"], MESSAGE
        )
        # The same session carries a second transaction.
        second = await client.send_message("", ["dave@example.org"], b"Subject: 2\r\n\r\nx\r\n")
    assert list(first.delivered) == ["bob@example.org", "carol@example.net"]
    assert list(second.delivered) == ["dave@example.org"] and second.failed == {}
    for user in ("bob", "carol"):
        [stored] = dovecot.messages(user)
        dovecot_prefix(stored, MESSAGE)
    [bounce] = dovecot.messages("dave")
    assert dovecot_prefix(bounce, b"Subject: 2\r\n\r\nx\r\n").startswith(b"Return-Path: <>\r\n")


# --------------------------------------------------- aiosmtpd's LMTP


class SplitVerdict:
    """An aiosmtpd LMTP handler: after the data, 250 for some recipients and 550 for others."""

    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse
        self.envelopes: list[Envelope] = []

    def _reply(self, rcpt: str) -> str:
        if rcpt in self.refuse:
            return f"550 5.1.1 <{rcpt}> mailbox unavailable"
        return f"250 2.0.0 <{rcpt}> saved"

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        # RFC 2033 section 4.2: one reply per recipient; aiosmtpd sends the
        # returned one last, the others are pushed here first.
        self.envelopes.append(envelope)
        *first, last = envelope.rcpt_tos
        for rcpt in first:
            await server.push(self._reply(rcpt))
        return self._reply(last)


class LMTPController(Controller):
    def factory(self) -> LMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


@contextlib.contextmanager
def aiosmtpd_lmtp(handler: Any) -> Iterator[Controller]:
    controller = LMTPController(handler, hostname="127.0.0.1", port=free_port(), ready_timeout=10.0)
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


async def test_aiosmtpd_lmtp_delivered_and_failed_split() -> None:
    handler = SplitVerdict(refuse={"carol@example.net", "erin@example.net"})
    with aiosmtpd_lmtp(handler) as lmtp:
        client = SMTPClient(
            "127.0.0.1", lmtp.port, lmtp=True, timeouts=TIMEOUTS, helo_name="client.example"
        )
        async with client:
            result = await client.send_message(
                "alice@example.org", ["bob@example.org", "carol@example.net"], MESSAGE
            )
            # Every recipient refused after the data: still no exception.
            none = await client.send_message(
                "alice@example.org", ["erin@example.net", "carol@example.net"], MESSAGE
            )
    assert list(result.accepted) == ["bob@example.org", "carol@example.net"]
    assert list(result.delivered) == ["bob@example.org"]
    assert list(result.failed) == ["carol@example.net"]
    assert result.delivered["bob@example.org"].code == 250
    failed = result.failed["carol@example.net"]
    assert (failed.code, failed.enhanced) == (550, "5.1.1") and failed.is_permanent
    assert none.delivered == {} and list(none.failed) == ["erin@example.net", "carol@example.net"]
    assert len(handler.envelopes) == 2
    assert handler.envelopes[0].original_content == MESSAGE


# ------------------------------------------------ a recording server


class Recording:
    """A raw loopback ESMTP server that records every command line it reads.

    ``finals``: what it writes after the data instead of one 250, before it
    hangs up (a server that fails halfway through LMTP's replies).
    """

    def __init__(
        self, extensions: list[str], *, lmtp: bool = False, finals: bytes | None = None
    ) -> None:
        self.extensions = extensions
        self.lmtp = lmtp
        self.finals = finals
        self.commands: list[str] = []
        self.rcpts = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 recorder ready\r\n")
        await writer.drain()
        while line := await reader.readline():
            command = line.decode().rstrip("\r\n")
            self.commands.append(command)
            verb = command.split(" ", 1)[0].upper()
            if verb == ("LHLO" if self.lmtp else "EHLO") and self.extensions != ["refuse"]:
                lines = ["recorder", *self.extensions]
                writer.write(
                    "".join(
                        f"250{'-' if i < len(lines) - 1 else ' '}{t}\r\n"
                        for i, t in enumerate(lines)
                    ).encode()
                )
            elif verb in ("EHLO", "HELO", "LHLO"):
                writer.write(b"500 5.5.1 not this greeting\r\n")
            elif verb == "RCPT":
                self.rcpts += 1
                writer.write(b"250 2.1.5 OK\r\n")
            elif verb == "DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                while (await reader.readline()) != b".\r\n":
                    pass
                if self.finals is not None:
                    writer.write(self.finals)
                    await writer.drain()
                    return
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == "QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"250 2.0.0 OK\r\n")
            await writer.drain()


@contextlib.asynccontextmanager
async def recording_server(recorder: Recording) -> AsyncIterator[int]:
    tasks: set[asyncio.Task[Any]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await recorder(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


DSN_MAIL = {"RET": "HDRS", "ENVID": "x"}
DSN_RCPT = {"b@example.net": {"NOTIFY": "FAILURE", "ORCPT": "rfc822;b@x"}}


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "stepwise"])
async def test_dsn_parameters_reach_a_server_that_offers_dsn(pipelining: bool) -> None:
    recorder = Recording(["PIPELINING", "DSN", "ENHANCEDSTATUSCODES"])
    async with recording_server(recorder) as port:
        client = SMTPClient(
            "127.0.0.1",
            port,
            pipelining=pipelining,
            timeouts=TIMEOUTS,
            helo_name="client.example",
        )
        async with client:
            result = await client.send_message(
                "a@example.org",
                ["b@example.net", "c@example.net"],
                b"Subject: x\r\n\r\nx\r\n",
                mail_params=DSN_MAIL,
                rcpt_params=DSN_RCPT,
            )
    assert list(result.delivered) == ["b@example.net", "c@example.net"]
    assert recorder.commands[1:5] == [
        "MAIL FROM:<a@example.org> RET=HDRS ENVID=x",
        "RCPT TO:<b@example.net> NOTIFY=FAILURE ORCPT=rfc822;b@x",
        "RCPT TO:<c@example.net>",
        "DATA",
    ]


async def test_dsn_parameters_refused_before_sending_without_dsn() -> None:
    recorder = Recording(["PIPELINING", "ENHANCEDSTATUSCODES"])
    async with recording_server(recorder) as port:
        client = SMTPClient("127.0.0.1", port, timeouts=TIMEOUTS, helo_name="client.example")
        async with client:
            for mail_params, rcpt_params in ((DSN_MAIL, None), (None, DSN_RCPT)):
                with pytest.raises(OptionNotSupported, match="DSN"):
                    await client.send_message(
                        "a@example.org",
                        ["b@example.net"],
                        b"\r\nx\r\n",
                        mail_params=mail_params,
                        rcpt_params=rcpt_params,
                    )
            # The session is untouched and carries mail without the parameters.
            ok = await client.send_message("a@example.org", ["b@example.net"], b"\r\nx\r\n")
    assert list(ok.delivered) == ["b@example.net"]
    assert [c for c in recorder.commands if c.startswith("MAIL")] == ["MAIL FROM:<a@example.org>"]


async def test_lmtp_greets_with_lhlo_and_never_falls_back_to_helo() -> None:
    recorder = Recording(["refuse"], lmtp=True)
    async with recording_server(recorder) as port:
        client = SMTPClient(
            "127.0.0.1", port, lmtp=True, timeouts=TIMEOUTS, helo_name="client.example"
        )
        with pytest.raises(ServiceRefused, match="refused the greeting"):
            await client.connect()
    assert recorder.commands[0] == "LHLO client.example"
    assert not any(c.startswith(("HELO", "EHLO")) for c in recorder.commands)


@pytest.mark.parametrize(
    ("after", "error"),
    [(b"", ConnectionFailed), (b"421 4.3.0 shutting down\r\n", ServiceRefused)],
    ids=["hangup", "421"],
)
async def test_lmtp_failure_halfway_keeps_the_outcomes_already_given(
    after: bytes, error: type[SMTPClientError]
) -> None:
    finals = b"250 2.0.0 <b@x.example> saved\r\n550 5.1.1 <c@x.example> unknown\r\n" + after
    recorder = Recording(["PIPELINING", "ENHANCEDSTATUSCODES"], lmtp=True, finals=finals)
    rcpts = ["b@x.example", "c@x.example", "d@x.example"]
    async with recording_server(recorder) as port:
        client = SMTPClient(
            "127.0.0.1", port, lmtp=True, timeouts=TIMEOUTS, helo_name="client.example"
        )
        async with client:
            with pytest.raises(error) as info:
                await client.send_message("a@example.org", rcpts, b"Subject: x\r\n\r\nx\r\n")
    # b was delivered and c refused for good: only d's outcome is unknown.
    assert list(info.value.delivered) == ["b@x.example"]
    assert list(info.value.failed) == ["c@x.example"]
    assert info.value.failed["c@x.example"].code == 550


# ------------------------------------------------- ehlo's own server


async def test_smtp_per_recipient_outcomes(tmp_path: Path) -> None:
    srv = Server(make_config(tmp_path / "data", tls=False, domains=("example.net",)))
    await srv.start()
    try:
        host, port = srv.addresses[0]
        async with SMTPClient(host, port, timeouts=TIMEOUTS) as client:
            result = await client.send_message(
                "a@example.org", ["b@example.net", "x@elsewhere.test", "c@example.net"], MESSAGE
            )
    finally:
        await srv.stop(timeout=1.0)
    assert list(result.refused) == ["x@elsewhere.test"]
    assert list(result.delivered) == ["b@example.net", "c@example.net"]
    assert result.failed == {}
    # SMTP has one reply after the data: it is every accepted recipient's outcome.
    assert all(reply is result.reply for reply in result.delivered.values())
    assert result.reply.code == 250


# ------------------------------------------------------ sans-IO


def _feed(conn: ClientConnection, data: bytes) -> list[Reply]:
    conn.receive_data(data)
    replies = []
    while (reply := conn.next_reply()) is not NEED_DATA:
        assert isinstance(reply, Reply)
        replies.append(reply)
    return replies


@pytest.mark.parametrize("body", ["DATA", "BDAT"])
def test_sans_io_lmtp_awaits_one_reply_per_accepted_recipient(body: str) -> None:
    conn = ClientConnection(lmtp=True)
    _feed(conn, b"220 lmtp ready\r\n")
    for greet in (conn.ehlo, conn.helo):
        with pytest.raises(LocalProtocolError, match="LMTP"):
            greet("client.example")
    conn.lhlo("client.example")
    assert conn.data_to_send() == b"LHLO client.example\r\n"
    _feed(conn, b"250-lmtp\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
    assert conn.esmtp and conn.pipelining
    conn.mail("a@example.org")
    for rcpt in ("b@x.example", "c@x.example", "d@x.example"):
        conn.rcpt(rcpt)
    _feed(conn, b"250 OK\r\n250 OK\r\n550 no\r\n250 OK\r\n")
    assert conn.accepted_recipients == 2
    if body == "DATA":
        conn.data()
        _feed(conn, b"354 go\r\n")
        conn.send_data(b"Subject: x\r\n\r\nx\r\n")
        conn.end_data()
    else:
        conn.bdat(b"Subject: x\r\n\r\nx\r\n", last=True)
    verb = "DATA-END" if body == "DATA" else "BDAT-LAST"
    [first] = _feed(conn, b"250 2.0.0 <b@x.example> saved\r\n")
    assert first.code == 250
    # The second accepted recipient's reply is still due; nothing may be sent before it.
    assert conn.awaiting == (verb,)
    with pytest.raises(LocalProtocolError):
        conn.rset()
    [second] = _feed(conn, b"452 4.2.2 <d@x.example> over quota\r\n")
    assert second.code == 452
    assert not conn.awaiting and not conn.in_transaction
    conn.rset()


def test_sans_io_smtp_refuses_lhlo() -> None:
    conn = ClientConnection()
    _feed(conn, b"220 smtp ready\r\n")
    with pytest.raises(LocalProtocolError, match="SMTP"):
        conn.lhlo("client.example")


def test_unix_host_needs_a_path_and_a_tls_name_to_verify() -> None:
    with pytest.raises(ValueError, match="socket path"):
        SMTPClient("unix:")
    with pytest.raises(ValueError, match="tls_server_name"):
        SMTPClient("unix:/run/x", tls="verify")
    assert SMTPClient("unix:/run/x", tls="verify", tls_server_name="mx.example").socket_path == (
        "/run/x"
    )
