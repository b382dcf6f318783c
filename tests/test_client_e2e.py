"""End to end: ehlo's client against real servers on loopback.

- ehlo's own server (in this test's loop, or in a thread for subprocesses):
  STARTTLS verified with a trustme CA, untrusted certificates, TLS modes,
  PIPELINING, DATA and BDAT, per-recipient results, refusals, checks made
  before sending, a 50 MB body with BDAT while the client's memory stays flat.
- aiosmtpd (PyPI): plain ESMTP without PIPELINING or CHUNKING, implicit TLS,
  AUTH PLAIN and LOGIN (success and failure), SCRAM-SHA-256 through a small
  server-side mechanism written here.
- Postfix's smtp-sink: ESMTP with PIPELINING, and ``-e`` (no ESMTP) to show
  the HELO fallback. Missing smtp-sink skips on a developer's machine and
  fails under CI.
- Raw loopback servers for what no real server does on purpose: silence,
  garbage, a 554 banner, a reply injected after the 220 to STARTTLS.
- MX, implicit MX and null MX through the real test DNS server and
  ``ehlo send`` without ``--server``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, AuthResult, Envelope, LoginPassword

from ehlo import Listen, Server, Verdict
from ehlo.client import (
    AuthFailed,
    ConnectionFailed,
    DataRefused,
    MessageNotSupported,
    RecipientsRefused,
    SenderRefused,
    ServiceRefused,
    SMTPClient,
    Timeouts,
    TLSFailed,
    TLSMode,
    client_ssl_context,
)

from .dnsserver import DNSServer
from .helpers import ThreadedServer, free_port, make_config, tool

pytestmark = pytest.mark.timeout(60)

TIMEOUTS = Timeouts.uniform(10.0)
RUNNER = "import sys; from ehlo.client.cli import main; sys.exit(main(sys.argv[1:]))"


# ----------------------------------------------------------------- helpers


@dataclasses.dataclass
class Pki:
    """A trustme CA and a certificate for localhost / 127.0.0.1 / ::1."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        return client_ssl_context(cafile=str(self.ca_file))


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    pki = Pki(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    ca.cert_pem.write_to_path(str(pki.ca_file))
    cert.private_key_pem.write_to_path(str(pki.key_file))
    cert.cert_chain_pems[0].write_to_path(str(pki.cert_file))
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Lines:
    """A transcript recorder."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, bool]] = []

    def __call__(self, kind: str, text: str, tls: bool) -> None:
        self.lines.append((kind, text, tls))

    def sent(self) -> list[str]:
        return [text for kind, text, _ in self.lines if kind == "send"]

    def text(self) -> str:
        return "\n".join(f"{kind} {text}" for kind, text, _ in self.lines)


def after_received(raw: bytes) -> bytes:
    """The stored message without the Received header ehlo's server prepends."""
    assert raw.startswith(b"Received: "), raw[:80]
    pos = 0
    while True:
        pos = raw.index(b"\r\n", pos) + 2
        if raw[pos : pos + 1] not in (b"\t", b" "):
            return raw[pos:]


@contextlib.asynccontextmanager
async def ehlo_server(folder: Path, **overrides: Any) -> AsyncIterator[Server]:
    """ehlo's server in this loop; ``hooks=`` go to the Server, the rest to the config."""
    hooks = overrides.pop("hooks", None)
    overrides.setdefault("reverse_dns", False)
    srv = Server(make_config(folder, **overrides), hooks=hooks)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(timeout=1.0)


def tls_overrides(pki: Pki) -> dict[str, Any]:
    return {"tls_cert": pki.cert_file, "tls_key": pki.key_file}


def client_for(srv: Server, **kwargs: Any) -> SMTPClient:
    host, port = srv.addresses[0]
    kwargs.setdefault("timeouts", TIMEOUTS)
    return SMTPClient(host, port, **kwargs)


class Recorder:
    """An aiosmtpd handler keeping every envelope."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 2.0.0 OK recorded"


USERS = {"alice": "s3cret pw"}


def authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and USERS.get(auth_data.login.decode()) == auth_data.password.decode()
    )
    # handled=False: aiosmtpd answers 535 itself (handled=True would send nothing).
    return AuthResult(success=ok, handled=False)


@contextlib.contextmanager
def aiosmtpd_server(handler: Any, **kwargs: Any) -> Iterator[Controller]:
    controller = Controller(
        handler, hostname="127.0.0.1", port=free_port(), ready_timeout=10.0, **kwargs
    )
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


def run_cli(
    *args: str, env: dict[str, str | None] | None = None, stdin: bytes | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """``ehlo send/probe`` through ehlo.client.cli.main in a child process.

    ``env`` adds variables to the environment (None removes one).
    """
    environ = {k: v for k, v in os.environ.items() if k != "EHLO_AUTH_PASSWORD"}
    for key, value in (env or {}).items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    return subprocess.run(
        [sys.executable, "-c", RUNNER, *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environ,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        check=False,
    )


BODY = b"Subject: hello\r\nFrom: <a@example.org>\r\n\r\n.starts with a dot\r\nline 2\r\n"


# ---------------------------------------------------- ehlo's own server


@pytest.mark.parametrize(
    ("pipelining", "chunking"),
    [(True, None), (True, False), (False, None), (False, False)],
    ids=["pipelined-bdat", "pipelined-data", "stepwise-bdat", "stepwise-data"],
)
async def test_ehlo_server_starttls_verified(
    tmp_path: Path, pki: Pki, pipelining: bool, chunking: bool | None
) -> None:
    lines = Lines()
    async with ehlo_server(tmp_path / "data", **tls_overrides(pki)) as srv:
        async with client_for(
            srv, ssl_context=pki.client_context(), pipelining=pipelining, chunking=chunking,
            transcript=lines, helo_name="client.example", tls="verify",
        ) as client:
            assert client.tls is not None and client.tls.verified
            assert client.tls.version in ("TLSv1.2", "TLSv1.3")
            assert "localhost" in client.tls.names
            result = await client.send_message(
                "a@example.org", ["b@example.net", "c@example.net"], BODY
            )
        assert set(result.accepted) == {"b@example.net", "c@example.net"}
        assert result.refused == {} and result.reply.code == 250
        assert result.chunked is (chunking is None)
        [stored] = srv.store.list()
        env = stored.envelope
        assert env.rcpt_to == ["b@example.net", "c@example.net"]
        assert env.greeting == "EHLO" and env.greeting_name == "client.example"
        assert env.tls is not None
        assert env.mail_params.get("SIZE") == str(len(BODY))
        raw = srv.store.raw(env.queue_id)
        assert raw is not None and after_received(raw) == BODY
    sent = lines.sent()
    assert sent.count("EHLO client.example") == 2  # again after the handshake
    assert "STARTTLS" in sent
    # Everything after STARTTLS went over TLS.
    after = lines.lines[[t for _, t, _ in lines.lines].index("STARTTLS") + 2 :]
    assert all(tls for kind, _, tls in after if kind in ("send", "recv"))


@pytest.mark.parametrize("mode", ["verify", "required"])
async def test_untrusted_certificate_refused_by_verify_unless_insecure(
    tmp_path: Path, mode: TLSMode
) -> None:
    # The server fixture's self-signed certificate is trusted by nobody.
    async with ehlo_server(tmp_path / "data") as srv:
        with pytest.raises(TLSFailed, match="not trusted") as info:
            async with client_for(srv, ssl_context=client_ssl_context(), tls=mode):
                pass
        assert info.value.temporary
        async with client_for(
            srv, ssl_context=client_ssl_context(verify=False), tls=mode
        ) as client:
            assert client.tls is not None and not client.tls.verified
            assert client.tls.trusted is False
            await client.send_message("a@example.org", ["b@example.net"], BODY)
        assert len(srv.store.list()) == 1


@pytest.mark.parametrize("mode", ["opportunistic", "encrypt"])
async def test_unverifying_modes_encrypt_and_report_the_verdict(
    tmp_path: Path, pki: Pki, mode: TLSMode
) -> None:
    # RFC 7435: encrypt without authenticating; say whether it would verify.
    async with ehlo_server(tmp_path / "self") as srv:
        lines = Lines()
        async with client_for(srv, tls=mode, transcript=lines) as client:
            assert client.tls is not None and not client.tls.verified
            assert client.tls.trusted is False
            assert client.tls.verify_error == "self-signed certificate"
            result = await client.send_message("a@example.org", ["b@example.net"], BODY)
        assert result.tls is client.tls
        [stored] = srv.store.list()
        assert stored.envelope.tls is not None
        assert any("it would not verify: self-signed certificate" in text
                   for kind, text, _ in lines.lines if kind == "info")
    async with ehlo_server(tmp_path / "ca", **tls_overrides(pki)) as srv:
        async with client_for(srv, tls=mode, ssl_context=pki.client_context()) as client:
            assert client.tls is not None and not client.tls.verified
            assert client.tls.trusted is True and client.tls.verify_error is None
        # The CA is trusted, but the certificate names localhost, not this name.
        async with client_for(
            srv, tls=mode, ssl_context=pki.client_context(), tls_server_name="mx.example.org"
        ) as client:
            assert client.tls is not None and client.tls.trusted is False
            assert client.tls.verify_error is not None
            assert client.tls.verify_error.startswith("certificate is for localhost, ")
            assert client.tls.verify_error.endswith(", not mx.example.org")


async def test_tls_modes(tmp_path: Path, pki: Pki) -> None:
    async with ehlo_server(tmp_path / "plain", tls=False) as plain:
        with pytest.raises(TLSFailed, match="STARTTLS is not offered"):
            await client_for(plain, tls="required").__aenter__()
        async with client_for(plain, tls="opportunistic") as client:
            assert client.tls is None and not client.conn.tls_active
            await client.send_message("a@example.org", ["b@example.net"], BODY)
    async with ehlo_server(tmp_path / "tls", **tls_overrides(pki)) as srv:
        lines = Lines()
        async with client_for(srv, tls="off", transcript=lines) as client:
            assert client.tls is None and "STARTTLS" in client.extensions
        assert "STARTTLS" not in lines.sent()
        async with client_for(srv, tls="required", ssl_context=pki.client_context()) as client:
            assert client.tls is not None and client.tls.verified


async def test_per_recipient_results(tmp_path: Path) -> None:
    async with ehlo_server(tmp_path / "data", tls=False, domains=("example.net",)) as srv:
        async with client_for(srv) as client:
            result = await client.send_message(
                "a@example.org", ["b@example.net", "x@elsewhere.test", "c@example.net"], BODY
            )
            assert list(result.accepted) == ["b@example.net", "c@example.net"]
            assert list(result.refused) == ["x@elsewhere.test"]
            assert result.refused["x@elsewhere.test"].is_permanent
            with pytest.raises(RecipientsRefused) as info:
                await client.send_message("a@example.org", ["y@elsewhere.test"], BODY)
            assert list(info.value.refused) == ["y@elsewhere.test"]
            assert info.value.reply is not None and info.value.reply.code >= 500
            # The session was reset and carries the next transaction.
            again = await client.send_message("a@example.org", ["d@example.net"], BODY)
            assert list(again.accepted) == ["d@example.net"]
        assert [m.envelope.rcpt_to for m in srv.store.list()] == [
            ["d@example.net"], ["b@example.net", "c@example.net"]
        ]


async def test_refusals_carry_the_reply(tmp_path: Path) -> None:
    async def reject_sender(ctx: Any) -> Verdict | None:
        if ctx.mail_from == "bad@x.test":
            return Verdict.reject("No mail from you", 550, "5.7.1")
        return None

    async def reject_data(ctx: Any) -> Verdict | None:
        if ctx.size and ctx.size > 100:
            return Verdict.reject("Content refused", 554, "5.6.0")
        return None

    hooks = {"mail": [reject_sender], "data": [reject_data]}
    async with ehlo_server(tmp_path / "data", tls=False, hooks=hooks) as srv:
        for chunking in (None, False):
            async with client_for(srv, chunking=chunking) as client:
                with pytest.raises(SenderRefused) as sender:
                    await client.send_message("bad@x.test", ["b@example.net"], BODY)
                assert sender.value.reply is not None and sender.value.reply.code == 550
                assert not sender.value.temporary
                with pytest.raises(DataRefused) as data:
                    await client.send_message("a@example.org", ["b@example.net"], BODY * 10)
                assert data.value.reply is not None and data.value.reply.enhanced == "5.6.0"
                ok = await client.send_message("a@example.org", ["b@example.net"], BODY)
                assert ok.reply.code == 250
        assert len(srv.store.list()) == 2


async def test_what_the_message_needs_is_checked_before_sending(tmp_path: Path) -> None:
    limits = {"eightbitmime": False, "smtputf8": False, "max_message_size": 2000}
    async with ehlo_server(tmp_path / "data", tls=False, **limits) as srv:
        lines = Lines()
        async with client_for(srv, transcript=lines) as client:
            with pytest.raises(MessageNotSupported, match="8BITMIME"):
                await client.send_message("a@example.org", ["b@example.net"], "\ncafé\n".encode())
            with pytest.raises(MessageNotSupported, match="SMTPUTF8"):
                await client.send_message("jörg@example.org", ["b@example.net"], b"\r\nhi\r\n")
            with pytest.raises(MessageNotSupported, match="at most 2000"):
                await client.send_message("a@example.org", ["b@example.net"], b"x\r\n" * 1000)
            with pytest.raises(MessageNotSupported, match="998"):
                await client.send_message("a@example.org", ["b@example.net"], b"y" * 1200)
            ok = await client.send_message("a@example.org", ["b@example.net"], b"\r\nok\r\n")
            assert ok.reply.code == 250
        assert sum(1 for text in lines.sent() if text.startswith("MAIL")) == 1


async def test_utf8_and_8bit_are_declared(tmp_path: Path) -> None:
    message = "From: <jörg@bücher.example>\r\nSubject: grüße\r\n\r\nbody ü\r\n".encode()
    async with ehlo_server(tmp_path / "data", tls=False) as srv:
        lines = Lines()
        async with client_for(srv, transcript=lines) as client:
            await client.send_message("jörg@bücher.example", ["zoë@example.net"], message)
        [stored] = srv.store.list()
        assert stored.envelope.mail_from == "jörg@bücher.example"
        assert stored.envelope.mail_params.get("BODY") == "8BITMIME"
        assert "SMTPUTF8" in stored.envelope.mail_params
    [mail] = [t for t in lines.sent() if t.startswith("MAIL")]
    assert mail.endswith("BODY=8BITMIME SMTPUTF8")


async def test_streaming_from_a_file_and_an_async_iterator(tmp_path: Path) -> None:
    path = tmp_path / "body.txt"
    path.write_bytes(b"Subject: file\n\n" + b"line of text\n" * 20000)

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(50):
            yield f"piece {i}\n".encode()

    async with ehlo_server(tmp_path / "data", tls=False) as srv:
        async with client_for(srv, chunk_size=64 * 1024) as client:
            with path.open("rb") as f:
                result = await client.send_message("a@example.org", ["b@example.net"], f)
            assert result.size == path.stat().st_size and result.chunked
            await client.send_message("a@example.org", ["b@example.net"], pieces())
        newest, oldest = srv.store.list()
        raw = srv.store.raw(oldest.envelope.queue_id)
        assert raw is not None
        assert after_received(raw) == path.read_bytes().replace(b"\n", b"\r\n")
        raw = srv.store.raw(newest.envelope.queue_id)
        assert raw is not None
        assert after_received(raw) == b"".join(f"piece {i}\r\n".encode() for i in range(50))


# -------------------------------------------------- misbehaving servers


@contextlib.asynccontextmanager
async def raw_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
) -> AsyncIterator[tuple[str, int]]:
    tasks: set[asyncio.Task[Any]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    try:
        yield "127.0.0.1", server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_silent_server_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with raw_server(silent) as (host, port):
        started = time.monotonic()
        with pytest.raises(ConnectionFailed, match="timeout: the banner did not come"):
            await SMTPClient(host, port, timeouts=Timeouts.uniform(0.3)).open()
        assert time.monotonic() - started < 5


async def test_garbage_and_closed_connections() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with raw_server(garbage) as (host, port):
        with pytest.raises(ConnectionFailed, match="malformed reply"):
            await SMTPClient(host, port, timeouts=TIMEOUTS).open()

    async def hangup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hello\r\n")
        await reader.readline()

    async with raw_server(hangup) as (host, port):
        client = SMTPClient(host, port, timeouts=TIMEOUTS, helo_name="c.example")
        await client.open()
        with pytest.raises(ConnectionFailed, match="closed the connection"):
            await client.greet()
    with pytest.raises(ConnectionFailed, match="cannot connect"):
        await SMTPClient("127.0.0.1", free_port(), timeouts=TIMEOUTS).open()


async def test_554_banner_is_a_refused_session() -> None:
    seen: list[bytes] = []

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"554 5.7.1 No SMTP service here\r\n")
        seen.append(await reader.readline())
        writer.write(b"221 2.0.0 Bye\r\n")
        await writer.drain()

    async with raw_server(refuse) as (host, port):
        with pytest.raises(ServiceRefused) as info:
            await SMTPClient(host, port, timeouts=TIMEOUTS).open()
        assert info.value.reply is not None and info.value.reply.code == 554
        assert not info.value.temporary
    assert seen == [b"QUIT\r\n"]  # RFC 5321 section 3.1: QUIT after a 554 banner


async def test_reply_injected_after_starttls_is_refused(pki: Pki) -> None:
    async def inject(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mitm ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-mitm\r\n250 STARTTLS\r\n")
        await reader.readline()
        writer.write(b"220 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n")
        await writer.drain()
        await writer.start_tls(pki.server_context())
        await reader.read()

    async with raw_server(inject) as (host, port):
        client = SMTPClient(
            host, port, ssl_context=pki.client_context(), timeouts=TIMEOUTS, helo_name="c.example"
        )
        with pytest.raises(TLSFailed, match="response injection"):
            await client.connect()


async def test_starttls_refused_opportunistic_goes_on_required_stops() -> None:
    async def no_tls_today(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 x ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-x\r\n250 STARTTLS\r\n")
            elif verb == b"STAR":
                writer.write(b"454 4.7.0 TLS not available due to temporary reason\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while (await reader.readline()) != b".\r\n":
                    pass
                writer.write(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    async with raw_server(no_tls_today) as (host, port):
        lines = Lines()
        async with SMTPClient(host, port, timeouts=TIMEOUTS, transcript=lines) as client:
            assert client.tls is None
            result = await client.send_message("a@example.org", ["b@example.net"], BODY)
            assert result.reply.code == 250
        assert "STARTTLS refused, going on without TLS" in lines.text()
        with pytest.raises(TLSFailed, match="refused STARTTLS") as info:
            await SMTPClient(host, port, timeouts=TIMEOUTS, tls="required").connect()
        assert info.value.reply is not None and info.value.reply.code == 454
        assert info.value.temporary


# ------------------------------------------------------------------ aiosmtpd


async def test_aiosmtpd_plain_esmtp() -> None:
    handler = Recorder()
    lines = Lines()
    with aiosmtpd_server(handler) as controller:
        client = SMTPClient(
            controller.hostname, controller.port, tls="off", timeouts=TIMEOUTS, transcript=lines
        )
        async with client:
            assert not client.conn.pipelining and "CHUNKING" not in client.extensions
            result = await client.send_message(
                "jörg@example.org", ["b@example.net", "zoë@example.net"],
                "Subject: ü\r\n\r\n.dot\r\nbody\r\n".encode(),
            )
        assert result.reply.text == "OK recorded" and not result.chunked
    [envelope] = handler.envelopes
    assert envelope.mail_from == "jörg@example.org"
    assert envelope.rcpt_tos == ["b@example.net", "zoë@example.net"]
    assert "SMTPUTF8" in envelope.mail_options and "BODY=8BITMIME" in envelope.mail_options
    assert envelope.original_content == "Subject: ü\r\n\r\n.dot\r\nbody\r\n".encode()
    assert "DATA" in lines.sent()


async def test_aiosmtpd_implicit_tls(pki: Pki) -> None:
    handler = Recorder()
    with aiosmtpd_server(handler, ssl_context=pki.server_context()) as controller:
        async with SMTPClient(
            controller.hostname, controller.port, tls="implicit",
            ssl_context=pki.client_context(), timeouts=TIMEOUTS,
        ) as client:
            assert client.tls is not None and client.tls.verified
            assert "STARTTLS" not in client.extensions
            await client.send_message("a@example.org", ["b@example.net"], BODY)
        # An untrusted implicit-TLS server is refused before any SMTP.
        with pytest.raises(TLSFailed, match="not trusted"):
            await SMTPClient(
                controller.hostname, controller.port, tls="implicit",
                ssl_context=client_ssl_context(), timeouts=TIMEOUTS,
            ).open()
    assert len(handler.envelopes) == 1


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_aiosmtpd_auth_over_starttls(pki: Pki, mechanism: str) -> None:
    handler = Recorder()
    lines = Lines()
    with aiosmtpd_server(
        handler, tls_context=pki.server_context(), authenticator=authenticator
    ) as controller:
        kwargs: dict[str, Any] = {
            "ssl_context": pki.client_context(), "timeouts": TIMEOUTS, "transcript": lines,
        }
        async with SMTPClient(controller.hostname, controller.port, **kwargs) as client:
            assert client.conn.tls_active
            reply = await client.login("alice", "s3cret pw", mechanism)
            assert reply.code == 235 and client.conn.authenticated
            await client.send_message("a@example.org", ["b@example.net"], BODY)
        async with SMTPClient(controller.hostname, controller.port, **kwargs) as client:
            with pytest.raises(AuthFailed) as info:
                await client.login("alice", "wrong", mechanism)
            assert info.value.reply is not None and info.value.reply.code == 535
    assert len(handler.envelopes) == 1
    transcript = lines.text()
    assert "s3cret" not in transcript and base64.b64encode(b"s3cret pw").decode() not in transcript
    assert base64.b64encode(b"\0alice\0s3cret pw").decode() not in transcript
    assert "<redacted>" in transcript


async def test_aiosmtpd_auth_needs_tls_unless_allowed() -> None:
    handler = Recorder()
    with aiosmtpd_server(
        handler, authenticator=authenticator, auth_require_tls=False
    ) as controller:
        async with SMTPClient(controller.hostname, controller.port, timeouts=TIMEOUTS) as client:
            with pytest.raises(AuthFailed, match="without TLS"):
                await client.login("alice", "s3cret pw")
        async with SMTPClient(
            controller.hostname, controller.port, timeouts=TIMEOUTS, allow_plaintext_auth=True
        ) as client:
            assert (await client.login("alice", "s3cret pw")).code == 235
            with pytest.raises(AuthFailed, match="CRAM-MD5"):
                await client.login("alice", "s3cret pw", "CRAM-MD5")


class ScramHandler(Recorder):
    """aiosmtpd plus a server side of SCRAM-SHA-256 (RFC 5802, RFC 7677), for one user."""

    def __init__(self, user: str, password: str) -> None:
        super().__init__()
        self.user = user
        self.salt = os.urandom(16)
        self.iterations = 4096
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), self.salt, self.iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        self.stored_key = hashlib.sha256(client_key).digest()
        self.server_key = hmac.digest(salted, b"Server Key", "sha256")

    async def auth_SCRAM__SHA__256(self, server: Any, args: list[str]) -> AuthResult:
        if len(args) < 2:
            return AuthResult(success=False, handled=False)
        first = base64.b64decode(args[1]).decode()
        assert first.startswith("n,,")
        bare = first[3:]
        attrs = dict(part.split("=", 1) for part in bare.split(","))
        nonce = attrs["r"] + base64.b64encode(os.urandom(12)).decode()
        server_first = (
            f"r={nonce},s={base64.b64encode(self.salt).decode()},i={self.iterations}"
        )
        response = await server.challenge_auth(server_first)
        if response is MISSING:
            return AuthResult(success=False, handled=True)
        without_proof, _, proof = response.decode().rpartition(",p=")
        message = f"{bare},{server_first},{without_proof}".encode()
        signature = hmac.digest(self.stored_key, message, "sha256")
        client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=True))
        if attrs["n"] != self.user or hashlib.sha256(client_key).digest() != self.stored_key:
            return AuthResult(success=False, handled=False)
        server_signature = hmac.digest(self.server_key, message, "sha256")
        final = await server.challenge_auth("v=" + base64.b64encode(server_signature).decode())
        if final is MISSING:
            return AuthResult(success=False, handled=True)
        return AuthResult(success=True, handled=False, auth_data=self.user)


async def test_aiosmtpd_scram_sha_256() -> None:
    handler = ScramHandler("alice", "pässword")
    with aiosmtpd_server(handler, auth_require_tls=False) as controller:
        kwargs: dict[str, Any] = {"timeouts": TIMEOUTS}
        async with SMTPClient(controller.hostname, controller.port, **kwargs) as client:
            assert "SCRAM-SHA-256" in client.extensions.auth_mechanisms
            # SCRAM sends no password: allowed without TLS, and preferred.
            reply = await client.login("alice", "pässword")
            assert reply.code == 235
            await client.send_message("a@example.org", ["b@example.net"], BODY)
        async with SMTPClient(controller.hostname, controller.port, **kwargs) as client:
            with pytest.raises(AuthFailed) as info:
                await client.login("alice", "wrong", "SCRAM-SHA-256")
            assert info.value.reply is not None and info.value.reply.code == 535
    assert len(handler.envelopes) == 1


# ----------------------------------------------------------------- smtp-sink


@dataclasses.dataclass
class Sink:
    port: int
    dump: Path

    def messages(self) -> list[str]:
        return [p.read_text(errors="replace") for p in sorted(self.dump.rglob("*")) if p.is_file()]


@pytest.fixture
def smtp_sink() -> Iterator[Callable[..., Sink]]:
    path = tool("smtp-sink")
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(*options: str) -> Sink:
        dump = Path(tempfile.mkdtemp(prefix="ehlo-sink-"))
        dump.chmod(0o777)  # smtp-sink writes as nobody when started by root
        port = free_port()
        cmd = [path, *options]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += ["-d", f"{dump}/%M.", f"127.0.0.1:{port}", "16"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append((proc, dump))
        deadline = time.monotonic() + 10.0
        while True:
            if proc.poll() is not None:
                assert proc.stderr is not None
                raise RuntimeError(f"smtp-sink exited: {proc.stderr.read().decode()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                    sock.settimeout(2.0)
                    if sock.recv(64).startswith(b"220"):
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        return Sink(port, dump)

    yield start
    for proc, dump in started:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(dump, ignore_errors=True)


async def _wait_for_dump(sink: Sink, count: int) -> list[str]:
    for _ in range(100):
        messages = sink.messages()
        if len(messages) >= count:
            return messages
        await asyncio.sleep(0.05)
    return sink.messages()


@pytest.mark.external
async def test_smtp_sink_without_esmtp_falls_back_to_helo(
    smtp_sink: Callable[..., Sink],
) -> None:
    sink = smtp_sink("-e")  # -e: do not announce ESMTP support
    lines = Lines()
    async with SMTPClient(
        "127.0.0.1", sink.port, timeouts=TIMEOUTS, transcript=lines, helo_name="c.example"
    ) as client:
        assert not client.esmtp and len(client.extensions) == 0
        result = await client.send_message("a@example.org", ["b@example.net"], BODY)
    assert result.reply.code == 250 and not result.chunked
    sent = lines.sent()
    assert sent[:2] == ["EHLO c.example", "HELO c.example"]
    assert "MAIL FROM:<a@example.org>" in sent  # no SIZE=: no parameters in a HELO session
    [dump] = await _wait_for_dump(sink, 1)
    assert "X-Client-Proto: SMTP" in dump and ".starts with a dot" in dump


@pytest.mark.external
async def test_smtp_sink_esmtp_pipelining(smtp_sink: Callable[..., Sink]) -> None:
    sink = smtp_sink()
    lines = Lines()
    async with SMTPClient(
        "127.0.0.1", sink.port, timeouts=TIMEOUTS, transcript=lines, helo_name="c.example"
    ) as client:
        assert client.conn.pipelining
        result = await client.send_message(
            "a@example.org", ["b@example.net", "c@example.net"], BODY
        )
    assert set(result.accepted) == {"b@example.net", "c@example.net"}
    [dump] = await _wait_for_dump(sink, 1)
    assert "X-Client-Proto: ESMTP" in dump
    assert "X-Rcpt-Args: <b@example.net>" in dump and "X-Rcpt-Args: <c@example.net>" in dump
    dialogue = [(k, t) for k, t, _ in lines.lines if k in ("send", "recv")]
    mail = next(i for i, (_, t) in enumerate(dialogue) if t.startswith("MAIL"))
    # RFC 2920: MAIL, RCPT, RCPT and DATA all sent before the first reply.
    assert [k for k, _ in dialogue[mail : mail + 4]] == ["send"] * 4
    assert dialogue[mail + 3] == ("send", "DATA")


# ----------------------------------------------------- 50 MB with BDAT


MEMORY_RUNNER = """
import sys, tracemalloc
import ehlo.client.cli
def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0
before = rss("VmRSS:")
tracemalloc.start()
rc = ehlo.client.cli.main(sys.argv[1:])
peak = tracemalloc.get_traced_memory()[1]
print(f"MEMORY peak={peak} rss_before={before} hwm={rss('VmHWM:')}", file=sys.stderr)
sys.exit(rc)
"""


@pytest.mark.slow
def test_50_mb_body_with_bdat_in_flat_memory(tmp_path: Path) -> None:
    body = tmp_path / "big.txt"
    line = b"0123456789" * 9 + b"abcdefg\r\n"  # 99 octets
    with body.open("wb") as f:
        block = line * (1 << 14)
        written = 0
        while written < 50 * 1024 * 1024:
            f.write(block)
            written += len(block)
    size = body.stat().st_size
    srv = ThreadedServer(
        make_config(tmp_path / "data", store="null", tls=False, reverse_dns=False,
                    max_message_size=0, max_text_line=0)
    ).start()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", MEMORY_RUNNER, "send", "--from", "a@example.org",
             "--to", "b@example.net", "--server", f"127.0.0.1:{srv.port}", "--body", str(body),
             "--bdat", "--timeout", "30", "--transcript"],
            capture_output=True, text=True, timeout=60, check=False,
        )
    finally:
        srv.stop()
    assert proc.returncode == 0, proc.stderr
    assert "BDAT" in proc.stdout and " LAST" in proc.stdout
    stats = dict(
        item.split("=") for item in proc.stderr.split("MEMORY ", 1)[1].split()
    )
    peak, before, hwm = int(stats["peak"]), int(stats["rss_before"]), int(stats["hwm"])
    # The body is 50 MB; the client never holds more than a few chunks of 1 MiB.
    assert size > 50_000_000
    assert peak < 12 * 1024 * 1024, f"traced peak {peak}"
    assert hwm - before < 24 * 1024 * 1024, f"RSS grew by {hwm - before}"
    print(f"50 MB via BDAT: traced peak {peak >> 10} KiB, RSS growth {(hwm - before) >> 10} KiB")


# ------------------------------------------------------------- MX routing


@pytest.fixture
def mx_world(
    tmp_path: Path,
) -> Iterator[tuple[DNSServer, int, dict[str, ThreadedServer]]]:
    """ehlo servers on 127.0.0.1 (accepts), .3 (defers MAIL), .4 (rejects MAIL), one port."""

    async def defer(ctx: Any) -> Verdict:
        return Verdict.defer("Busy, try the next one", 451, "4.3.2")

    async def reject(ctx: Any) -> Verdict:
        return Verdict.reject("Not here", 550, "5.7.1")

    servers: dict[str, ThreadedServer] = {}
    good = ThreadedServer(make_config(tmp_path / "good", tls=False, reverse_dns=False)).start()
    servers["good"] = good
    port = good.port
    try:
        for name, ip, hook in (("busy", "127.0.0.3", defer), ("bad", "127.0.0.4", reject)):
            config = make_config(tmp_path / name, tls=False, reverse_dns=False,
                                 listen=(Listen(ip, port),))
            servers[name] = ThreadedServer(config, hooks={"mail": [hook]}).start()
        zone = {
            "mx.example.test": {"MX": ["10 mx1.mx.example.test.", "20 mx2.mx.example.test."]},
            "mx1.mx.example.test": {"A": ["127.0.0.2"]},  # nothing listens there
            "mx2.mx.example.test": {"A": ["127.0.0.1"]},
            "implicit.example.test": {"A": ["127.0.0.1"]},
            "null.example.test": {"MX": ["0 ."]},
            "defer.example.test": {"MX": ["10 busy.example.test.", "20 good.example.test."]},
            "busy.example.test": {"A": ["127.0.0.3"]},
            "good.example.test": {"A": ["127.0.0.1"]},
            "reject.example.test": {"MX": ["10 bad.example.test.", "20 good.example.test."]},
            "bad.example.test": {"A": ["127.0.0.4"]},
            "noaddress.example.test": {"MX": ["10 nowhere.example.test."]},
        }
        with DNSServer(zone) as dns_server:
            yield dns_server, port, servers
    finally:
        for srv in servers.values():
            srv.stop()


def send_routed(dns_server: DNSServer, port: int, *rcpts: str) -> subprocess.CompletedProcess[str]:
    args = ["send", "--from", "a@example.org", "--dns-server", dns_server.nameserver,
            "--port", str(port), "--timeout", "5", "--transcript"]
    for rcpt in rcpts:
        args += ["--to", rcpt]
    return run_cli(*args)


def stored_rcpts(srv: ThreadedServer) -> list[list[str]]:
    assert srv.server is not None
    return [m.envelope.rcpt_to for m in srv.server.store.list()]


def test_mx_routing(mx_world: tuple[DNSServer, int, dict[str, ThreadedServer]]) -> None:
    dns_server, port, servers = mx_world
    proc = send_routed(
        dns_server, port, "user@mx.example.test", "user@implicit.example.test",
        "x@defer.example.test",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # MX by preference; the first host refuses the connection: the next one.
    assert f"Route: mx1.mx.example.test (MX 10) -> 127.0.0.2 port {port}" in out
    assert f"attempt via 127.0.0.2:{port} failed: cannot connect" in out
    assert f"delivered <user@mx.example.test> via 127.0.0.1:{port}" in out
    assert dns_server.count("mx.example.test", "MX") == 1
    # Implicit MX: no MX record, the domain's own address.
    assert "implicit.example.test (implicit MX) -> 127.0.0.1" in out
    assert f"delivered <user@implicit.example.test> via 127.0.0.1:{port}" in out
    # 4xx at the first MX: the next MX.
    assert f"attempt via 127.0.0.3:{port} failed" in out and "451 4.3.2" in out
    assert f"delivered <x@defer.example.test> via 127.0.0.1:{port}" in out
    assert sorted(stored_rcpts(servers["good"])) == [
        ["user@implicit.example.test"], ["user@mx.example.test"], ["x@defer.example.test"],
    ]
    assert stored_rcpts(servers["busy"]) == []
    assert servers["good"].server is not None
    for message in servers["good"].server.store.list():
        assert "SIZE" in message.envelope.mail_params  # declared on routed delivery too


def test_mx_failures(mx_world: tuple[DNSServer, int, dict[str, ThreadedServer]]) -> None:
    dns_server, port, servers = mx_world
    proc = send_routed(
        dns_server, port, "a@null.example.test", "b@missing.example.test",
        "c@noaddress.example.test",
    )
    assert proc.returncode == 9, proc.stderr
    # RFC 7505: a null MX means the domain takes no mail.
    assert "not delivered <a@null.example.test>: null.example.test accepts no mail (null MX" in (
        proc.stdout
    )
    assert "not delivered <b@missing.example.test>: missing.example.test: no such domain" in (
        proc.stdout
    )
    assert "noaddress.example.test: no MX host has an address" in proc.stdout
    assert proc.stderr.count("\n") == 1 and "null MX" in proc.stderr
    assert "(and 2 more)" in proc.stderr
    # A 5xx at the first MX is final: the second MX is not tried.
    proc = send_routed(dns_server, port, "user@reject.example.test", "ok@implicit.example.test")
    assert proc.returncode == 6, proc.stderr
    assert f"attempt via 127.0.0.4:{port}" not in proc.stdout  # the last attempt: the error
    assert "not delivered <user@reject.example.test>" in proc.stdout and "550 5.7.1" in proc.stdout
    assert stored_rcpts(servers["good"]) == [["ok@implicit.example.test"]]
    assert "Traceback" not in proc.stderr
