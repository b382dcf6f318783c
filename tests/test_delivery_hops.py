"""End to end: next hops that misbehave, TLS, MTA-STS, LMTP, AUTH, notices, the delivery hook.

Server A (the relay, on 127.0.0.2) hands mail on over loopback; the loopback
DNS server points each test domain's MX at the next hop under test, on
``delivery_port``:

- a small scripted SMTP server (:class:`Hop`) that stalls before its
  banner or after RCPT, answers garbage, closes mid-DATA, or offers DSN
  and records the RCPT lines it gets; Postfix's smtp-sink without ESMTP;
- another ehlo (B) with its self-signed certificate, with a certificate
  from a test CA (trustme), without STARTTLS, with a small SIZE, without
  SMTPUTF8;
- MTA-STS policies served over HTTPS from loopback (aiohttp, trustme);
- Dovecot's LMTP server and aiosmtpd's LMTP;
- the ``delivery`` hook stage (refuse, defer, another next hop).

Small ``delivery_timeout_scale`` and ``retry_min`` keep every test short;
every wait is on a condition.

DSN parameters reach A's queue through SMTP when A offers DSN; without the
DSN extension the tests store the message and its queue entries through
A's store, as a session would.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import logging
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP

from ehlo import Server
from ehlo.client import SMTPClient
from ehlo.client._errors import SMTPClientError
from ehlo.ids import new_queue_id
from ehlo.policy import HookContext, Hooks, Verdict
from ehlo.storage import Envelope
from ehlo.storage.queue import QueueEntry, QueueItem

from . import test_delivery_e2e as e2e
from .dnsserver import DNSServer
from .dovecot import Dovecot
from .helpers import client_tls, free_port
from .test_auth_limits import users_data

A_IP, B_IP, SINK_IP, OTHER_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
BODY = e2e.BODY
TIMEOUTS = e2e.TIMEOUTS
Start = e2e.Start

# The fixtures of the end-to-end tests: smtp-sink.
sink = e2e.sink
submit = e2e.submit
entries = e2e.entries
until = e2e.until
states = e2e.states
notices = e2e.notices
report_fields = e2e.report_fields

# Domains whose MX is the scripted hop (SINK_IP) or server B (B_IP).
HOP_DOMAINS = {"sink.test": SINK_IP, "b.test": B_IP, "c.test": B_IP, "other.test": OTHER_IP}
STS_DOMAINS = ("sts.test", "badsts.test", "testing.test")
STS_POLICIES = {
    # mx.sts.test is listed: enforce delivers there.
    "sts.test": "version: STSv1\r\nmode: enforce\r\nmx: mx.sts.test\r\nmax_age: 86400\r\n",
    # the MX of badsts.test is not listed: enforce defers.
    "badsts.test": "version: STSv1\r\nmode: enforce\r\nmx: mail.elsewhere.test\r\n"
    "max_age: 86400\r\n",
    # testing mode: only logs what enforce would do.
    "testing.test": "version: STSv1\r\nmode: testing\r\nmx: mail.elsewhere.test\r\n"
    "max_age: 86400\r\n",
}


def relay_options(dns: DNSServer, port: int, **extra: Any) -> dict[str, Any]:
    return e2e.relay_options(dns, port, **extra)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    records = e2e.zone(HOP_DOMAINS | dict.fromkeys(STS_DOMAINS, B_IP))
    for domain in STS_DOMAINS:
        records[f"_mta-sts.{domain}"] = {"TXT": ['"v=STSv1; id=one;"']}
        records[f"mta-sts.{domain}"] = {"A": ["127.0.0.1"]}
    with DNSServer(records, ttl=0, negative_ttl=0) as server:
        yield server


@pytest.fixture
def b_cert(ca: trustme.CA, tmp_path: Path) -> dict[str, Path]:
    """B's certificate from the test CA, for every MX name B stands for; the CA's file."""
    cert = ca.issue_cert(*(f"mx.{d}" for d in ("b.test", *STS_DOMAINS)))
    paths = {"tls_cert": tmp_path / "b-cert.pem", "tls_key": tmp_path / "b-key.pem"}
    cert.cert_chain_pems[0].write_to_path(str(paths["tls_cert"]))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(paths["tls_cert"]), append=True)
    cert.private_key_pem.write_to_path(str(paths["tls_key"]))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return {**paths, "ca": ca_file}


# Servers by name on their loopback address (MTA-STS off unless asked for).
start = e2e.start


async def start_b(start: Start, dns: DNSServer, **config: Any) -> tuple[Server, int]:
    port = free_port(B_IP)
    config.setdefault("domains", ("b.test", "c.test", *STS_DOMAINS))
    b = await start("b", B_IP, port, dns_servers=(dns.nameserver,), **config)
    return b, port


def only_entry(server: Server, queue_id: str) -> QueueEntry:
    [entry] = entries(server, queue_id)
    return entry


async def settled(server: Server, queue_id: str, state: str, what: str = "") -> QueueEntry:
    """The message's one entry once it is in ``state``."""
    found: QueueEntry = await until(
        lambda: next((e for e in entries(server, queue_id) if e.state == state), None),
        what=what or state,
    )
    return found


async def submit_dsn(
    server: Server,
    sender: str,
    rcpts: list[str],
    *,
    notify: str | None = None,
    orcpt: bool = False,
    body: bytes = BODY,
) -> str:
    """A message with DSN parameters per recipient (RFC 3461), queued at ``server``."""
    params: dict[str, dict[str, str | None]] = {}
    for rcpt in rcpts:
        one: dict[str, str | None] = {}
        if notify:
            one["NOTIFY"] = notify
        if orcpt:
            one["ORCPT"] = f"rfc822;{rcpt}"
        params[rcpt] = one
    host, port = server.addresses[0]
    async with SMTPClient(host, port, timeouts=TIMEOUTS, tls="off") as client:
        await client.ehlo()
        if "DSN" in client.extensions:
            result = await client.send_message(sender, rcpts, body, rcpt_params=params)
            return result.reply.text.rsplit(" ", 1)[-1]
    # Without the DSN extension: stored and queued as a session would.
    assert server.scheduler is not None
    routing = server.config.routing()
    envelope = Envelope(
        queue_id=new_queue_id(),
        client_ip="127.0.0.1",
        client_port=0,
        greeting="EHLO",
        greeting_name="client.test",
        mail_from=sender,
        mail_params={},
        rcpt_to=list(rcpts),
        received_at=datetime.now(UTC),
        protocol="ESMTP",
        server_name=server.config.hostname,
    )
    kept = False
    for rcpt in rcpts:
        decision = routing.decide(rcpt, authenticated=False, client_ip="127.0.0.1")
        assert decision.refusal is None, decision
        kept = kept or decision.store
        if decision.next_hop is not None:
            p = params[rcpt]
            envelope.queue.append(
                QueueItem(rcpt, decision.next_hop, p.get("NOTIFY"), p.get("ORCPT"))
            )
    if not kept:
        envelope.extra["handed_on"] = True
    writer = server.store.begin(envelope)
    writer.write(body)
    envelope.size_received = len(body)
    queue_id = await writer.start_commit()
    server.scheduler.wake()
    return queue_id


# ------------------------------------------------------------ a scripted next hop


class Hop:
    """A small SMTP server on SINK_IP that misbehaves on cue and records what it gets.

    ``mode``: ``ok``; ``refuse_rcpt`` (550 to every RCPT); ``silent``
    (accepts, never says a word); ``garbage`` (an HTTP answer instead of a
    banner); ``stall_data`` (answers up to RCPT, then nothing);
    ``close_mid_data`` (hangs up after the first line of data).
    """

    def __init__(self, mode: str = "ok", extensions: tuple[str, ...] = ("PIPELINING",)) -> None:
        self.mode = mode
        self.extensions = extensions
        self.lines: list[str] = []
        self.messages: list[bytes] = []
        self.connections = 0
        self.port = free_port(SINK_IP)
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Hop:
        self._server = await asyncio.start_server(self._serve, SINK_IP, self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            await self._dialogue(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _dialogue(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "silent":
            await reader.read()  # until the client gives up
            return
        if self.mode == "garbage":
            writer.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\n\r\n<h1>no</h1>\r\n"
            )
            await writer.drain()
            await reader.read()
            return
        writer.write(b"220 mx.sink.test ESMTP\r\n")
        for _ in range(1000):
            line = await reader.readline()
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            self.lines.append(text)
            verb = text[:4].upper()
            if verb == "EHLO":
                lines = ["mx.sink.test", *self.extensions]
                writer.write(
                    "".join(
                        f"250{'-' if i < len(lines) - 1 else ' '}{x}\r\n"
                        for i, x in enumerate(lines)
                    ).encode()
                )
            elif verb == "RCPT" and self.mode == "refuse_rcpt":
                writer.write(b"550 5.1.1 no such user here\r\n")
            elif verb == "DATA" and self.mode == "refuse_rcpt":
                # RFC 2920 section 3.1: DATA after no accepted recipient fails.
                writer.write(b"554 5.5.1 no valid recipients\r\n")
            elif verb in ("HELO", "MAIL", "RCPT", "RSET", "NOOP"):
                writer.write(b"250 2.0.0 OK\r\n")
            elif verb == "DATA":
                if self.mode == "stall_data":
                    await reader.read()
                    return
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                data = bytearray()
                while data != b".\r\n" and not data.endswith(b"\r\n.\r\n"):
                    chunk = await reader.readline()
                    if not chunk:
                        return
                    data += chunk
                    if self.mode == "close_mid_data":
                        return  # the finally clause hangs up
                self.messages.append(bytes(data))
                writer.write(b"250 2.0.0 queued as 1\r\n")
            elif verb == "QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"502 5.5.2 not here\r\n")
            await writer.drain()


@pytest.fixture
async def hops() -> AsyncIterator[list[Hop]]:
    started: list[Hop] = []
    yield started
    for hop in started:
        await hop.stop()


async def hop(
    hops: list[Hop], mode: str = "ok", extensions: tuple[str, ...] = ("PIPELINING",)
) -> Hop:
    h = await Hop(mode, extensions).start()
    hops.append(h)
    return h


# ------------------------------------------------------------ next hops that misbehave


# RFC 5321 section 4.5.3.2 timeouts, scaled: 300 s -> 1.5 s, DATA's 120 s -> 0.6 s.
STALL_SCALE = 0.005


async def test_a_silent_next_hop_is_deferred_not_awaited(
    start: Start, dns: DNSServer, hops: list[Hop]
) -> None:
    h = await hop(hops, "silent")
    a = await start("a", A_IP, **relay_options(dns, h.port, delivery_timeout_scale=STALL_SCALE))
    queue_id = await submit(a, "alice@a.test", ["bob@sink.test"])
    entry = await settled(a, queue_id, "deferred")
    assert entry.last_reply is not None and entry.last_reply["code"] // 100 == 4
    # RFC 5321 section 4.5.3.2.1: the banner's timeout (scaled), then a 4xx.
    text = entry.last_reply["text"]
    assert "timeout" in text and "banner" in text, entry.last_reply
    assert f"[{SINK_IP}]:{h.port}" in text
    assert notices(a) == []


async def test_a_next_hop_that_stops_answering_after_rcpt_is_deferred(
    start: Start, dns: DNSServer, hops: list[Hop]
) -> None:
    h = await hop(hops, "stall_data")
    a = await start("a", A_IP, **relay_options(dns, h.port, delivery_timeout_scale=STALL_SCALE))
    queue_id = await submit(a, "alice@a.test", ["bob@sink.test"])
    entry = await settled(a, queue_id, "deferred")
    assert entry.last_reply is not None and entry.last_reply["code"] // 100 == 4
    # RFC 5321 section 4.5.3.2.4: DATA's timeout (scaled), then a 4xx.
    text = entry.last_reply["text"]
    assert "timeout" in text and "DATA" in text, entry.last_reply
    assert any(line.startswith("RCPT TO:<bob@sink.test>") for line in h.lines)
    assert h.messages == []


async def test_a_next_hop_answering_garbage_is_deferred(
    start: Start, dns: DNSServer, hops: list[Hop]
) -> None:
    h = await hop(hops, "garbage")
    a = await start("a", A_IP, **relay_options(dns, h.port))
    queue_id = await submit(a, "alice@a.test", ["bob@sink.test"])
    entry = await settled(a, queue_id, "deferred")
    assert entry.last_reply is not None and entry.last_reply["code"] // 100 == 4
    assert f"[{SINK_IP}]:{h.port}" in entry.last_reply["text"]
    assert "malformed reply" in entry.last_reply["text"], entry.last_reply
    assert notices(a) == []


async def test_a_next_hop_closing_mid_data_is_deferred(
    start: Start, dns: DNSServer, hops: list[Hop]
) -> None:
    h = await hop(hops, "close_mid_data")
    a = await start("a", A_IP, **relay_options(dns, h.port))
    queue_id = await submit(a, "alice@a.test", ["bob@sink.test"])
    entry = await settled(a, queue_id, "deferred")
    assert entry.last_reply is not None and entry.last_reply["code"] // 100 == 4
    assert "closed the connection" in entry.last_reply["text"], entry.last_reply
    assert "DATA" in [line[:4] for line in h.lines] and h.messages == []
    # The message stays with A for the retry.
    assert a.store.get(queue_id) is not None
    assert notices(a) == []


async def test_a_next_hop_without_esmtp_gets_helo(start: Start, dns: DNSServer, sink: Any) -> None:
    port = free_port(SINK_IP)
    _, dump = sink(port, "-e")
    a = await start("a", A_IP, **relay_options(dns, port))
    queue_id = await submit(a, "alice@a.test", ["bob@sink.test"])
    await until(lambda: states(a, queue_id) == {"bob@sink.test": "delivered"}, what="delivered")
    queue = a.store.queue
    assert queue is not None
    [attempt] = queue.attempts(queue_id)
    assert "C: HELO mx.a.test" in attempt.transcript
    [message] = await until(lambda: e2e.dumped(dump), what="the dump")
    assert BODY.replace(b"\r\n", b"\n") in message.replace(b"\r\n", b"\n")


# --------------------------------------------------------------------------- TLS


def attempt_of(server: Server, queue_id: str) -> Any:
    queue = server.store.queue
    assert queue is not None
    return queue.attempts(queue_id)[-1]


async def test_tls_may_encrypts_to_a_self_signed_next_hop(start: Start, dns: DNSServer) -> None:
    b, port = await start_b(start, dns)
    a = await start("a", A_IP, **relay_options(dns, port))
    queue_id = await submit(a, "alice@a.test", ["bob@b.test"])
    await until(lambda: states(a, queue_id) == {"bob@b.test": "delivered"}, what="delivered")
    transcript = attempt_of(a, queue_id).transcript
    assert "C: STARTTLS" in transcript and "*: TLS started: TLSv1" in transcript
    [stored] = b.store.list()
    raw = b.store.raw(stored.envelope.queue_id)
    assert raw is not None and b"with ESMTPS" in raw.split(b"\r\n\r\n")[0]


async def test_tls_verify_defers_a_self_signed_certificate(start: Start, dns: DNSServer) -> None:
    b, port = await start_b(start, dns)
    a = await start("a", A_IP, **relay_options(dns, port, tls_policy={"b.test": "verify"}))
    queue_id = await submit(a, "alice@a.test", ["bob@b.test"])
    entry = await settled(a, queue_id, "deferred")
    assert entry.last_reply is not None and entry.last_reply["code"] // 100 == 4
    assert entry.last_reply["enhanced"] == "4.7.5"
    assert "certificate" in entry.last_reply["text"], entry.last_reply
    assert "self-signed" in entry.last_reply["text"], entry.last_reply
    assert b.store.list() == []


async def test_tls_verify_delivers_with_the_ca_that_signed_the_certificate(
    start: Start, dns: DNSServer, b_cert: dict[str, Path]
) -> None:
    b, port = await start_b(start, dns, tls_cert=b_cert["tls_cert"], tls_key=b_cert["tls_key"])
    a = await start(
        "a",
        A_IP,
        **relay_options(dns, port, tls_policy={"b.test": "verify"}, delivery_ca_file=b_cert["ca"]),
    )
    queue_id = await submit(a, "alice@a.test", ["bob@b.test"])
    await until(lambda: states(a, queue_id) == {"bob@b.test": "delivered"}, what="delivered")
    transcript = attempt_of(a, queue_id).transcript
    assert "C: STARTTLS" in transcript and "*: TLS started" in transcript
    assert len(b.store.list()) == 1


async def test_tls_encrypt_defers_a_next_hop_without_starttls(start: Start, dns: DNSServer) -> None:
    b, port = await start_b(start, dns, tls=False)
    a = await start("a", A_IP, **relay_options(dns, port, tls_policy={"b.test": "encrypt"}))
    queue_id = await submit(a, "alice@a.test", ["bob@b.test"])
    entry = await settled(a, queue_id, "deferred")
    assert entry.last_reply is not None and entry.last_reply["code"] // 100 == 4
    assert entry.last_reply["enhanced"] == "4.7.5"
    assert "STARTTLS is not offered" in entry.last_reply["text"], entry.last_reply
    assert b.store.list() == []


async def test_tls_none_never_starts_tls(start: Start, dns: DNSServer) -> None:
    b, port = await start_b(start, dns)
    a = await start("a", A_IP, **relay_options(dns, port, tls_policy={"b.test": "none"}))
    queue_id = await submit(a, "alice@a.test", ["bob@b.test"])
    await until(lambda: states(a, queue_id) == {"bob@b.test": "delivered"}, what="delivered")
    transcript = attempt_of(a, queue_id).transcript
    assert "STARTTLS" in transcript  # offered by B ...
    assert "C: STARTTLS" not in transcript and "TLS started" not in transcript  # ... not used
    [stored] = b.store.list()
    raw = b.store.raw(stored.envelope.queue_id)
    assert raw is not None and b"with ESMTPS" not in raw and b"with ESMTP" in raw


# ----------------------------------------------------------------- MTA-STS (RFC 8461)


class PolicySite:
    """An HTTPS server on 127.0.0.1 serving each ``mta-sts.<domain>``'s policy."""

    def __init__(self, ca: trustme.CA) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*(f"mta-sts.{d}" for d in STS_DOMAINS)).configure_cert(self.context)
        self.requests: list[str] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append(request.host)
        domain = request.host.partition(":")[0].removeprefix("mta-sts.")
        if request.path != "/.well-known/mta-sts.txt" or domain not in STS_POLICIES:
            return web.Response(status=404)
        return web.Response(body=STS_POLICIES[domain].encode(), content_type="text/plain")

    async def start(self) -> PolicySite:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.context).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def policies(ca: trustme.CA) -> AsyncIterator[PolicySite]:
    site = await PolicySite(ca).start()
    yield site
    await site.stop()


def sts_options(dns: DNSServer, port: int, site: PolicySite, ca_file: Path) -> dict[str, Any]:
    return relay_options(dns, port, mta_sts=True, mta_sts_port=site.port, delivery_ca_file=ca_file)


async def test_mta_sts_enforce_defers_an_mx_outside_the_policy(
    start: Start, dns: DNSServer, policies: PolicySite, b_cert: dict[str, Path]
) -> None:
    b, port = await start_b(start, dns, tls_cert=b_cert["tls_cert"], tls_key=b_cert["tls_key"])
    a = await start("a", A_IP, **sts_options(dns, port, policies, b_cert["ca"]))
    queue_id = await submit(a, "alice@a.test", ["bob@badsts.test"])
    entry = await settled(a, queue_id, "deferred")
    assert entry.last_reply is not None and entry.last_reply["code"] // 100 == 4
    assert "MTA-STS" in entry.last_reply["text"], entry.last_reply
    assert policies.requests == [f"mta-sts.badsts.test:{policies.port}"]
    assert b.store.list() == []


async def test_mta_sts_enforce_delivers_to_a_listed_mx_with_a_valid_certificate(
    start: Start, dns: DNSServer, policies: PolicySite, b_cert: dict[str, Path]
) -> None:
    b, port = await start_b(start, dns, tls_cert=b_cert["tls_cert"], tls_key=b_cert["tls_key"])
    a = await start("a", A_IP, **sts_options(dns, port, policies, b_cert["ca"]))
    queue_id = await submit(a, "alice@a.test", ["bob@sts.test"])
    await until(lambda: states(a, queue_id) == {"bob@sts.test": "delivered"}, what="delivered")
    assert "*: TLS started" in attempt_of(a, queue_id).transcript
    assert policies.requests == [f"mta-sts.sts.test:{policies.port}"]
    assert len(b.store.list()) == 1


async def test_mta_sts_enforce_defers_a_listed_mx_whose_certificate_fails(
    start: Start, dns: DNSServer, policies: PolicySite, b_cert: dict[str, Path]
) -> None:
    b, port = await start_b(start, dns)  # B's self-signed certificate
    a = await start("a", A_IP, **sts_options(dns, port, policies, b_cert["ca"]))
    queue_id = await submit(a, "alice@a.test", ["bob@sts.test"])
    entry = await settled(a, queue_id, "deferred")
    assert entry.last_reply is not None and entry.last_reply["code"] // 100 == 4
    assert entry.last_reply["enhanced"] == "4.7.5"
    assert "certificate" in entry.last_reply["text"], entry.last_reply
    assert "self-signed" in entry.last_reply["text"], entry.last_reply
    assert b.store.list() == []


async def test_mta_sts_testing_delivers_and_logs_what_enforce_would_do(
    start: Start,
    dns: DNSServer,
    policies: PolicySite,
    b_cert: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ehlo.delivery")
    b, port = await start_b(start, dns)
    a = await start("a", A_IP, **sts_options(dns, port, policies, b_cert["ca"]))
    queue_id = await submit(a, "alice@a.test", ["bob@testing.test"])
    await until(lambda: states(a, queue_id) == {"bob@testing.test": "delivered"}, what="delivered")
    assert len(b.store.list()) == 1
    logged = [r.getMessage() for r in caplog.records if "MTA-STS testing" in r.getMessage()]
    assert logged == ["MTA-STS testing testing.test: enforce would skip mx.testing.test"]


# ------------------------------------------------------------------------------ LMTP


@pytest.mark.parametrize("over", ["tcp", "unix"])
async def test_lmtp_to_dovecot_lands_in_the_maildir_and_leaves_the_store(
    start: Start, dns: DNSServer, dovecot: Dovecot, over: str
) -> None:
    where = f"{dovecot.host}:{dovecot.port}" if over == "tcp" else f"unix:{dovecot.socket_path}"
    a = await start("a", A_IP, **relay_options(dns, 25, lmtp=f"lmtp:{where}"))
    queue_id = await submit(a, "alice@a.test", ["bob@a.test"])
    await until(lambda: states(a, queue_id) == {"bob@a.test": "delivered"}, what="delivered")
    attempt = attempt_of(a, queue_id)
    assert ("[unix]" in attempt.host) == (over == "unix"), attempt.host
    assert "C: LHLO mx.a.test" in attempt.transcript
    [message] = dovecot.messages("bob")
    assert message.endswith(BODY)
    assert f"id {queue_id}".encode() in message  # A's Received field
    await until(lambda: a.store.get(queue_id) is None, what="the message gone from A's store")
    assert notices(a) == []


async def test_lmtp_keep_local_keeps_a_copy(start: Start, dns: DNSServer, dovecot: Dovecot) -> None:
    a = await start(
        "a",
        A_IP,
        **relay_options(dns, 25, lmtp=f"lmtp:{dovecot.host}:{dovecot.port}", keep_local=True),
    )
    queue_id = await submit(a, "alice@a.test", ["bob@a.test"])
    await until(lambda: states(a, queue_id) == {"bob@a.test": "delivered"}, what="delivered")
    [message] = dovecot.messages("bob")
    assert message.endswith(BODY)
    kept = a.store.raw(queue_id)
    assert kept is not None and kept.endswith(BODY)


class _SplitLMTP:
    """aiosmtpd's LMTP: after the data, 250 for bob and 550 for carol."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    @staticmethod
    def _reply(rcpt: str) -> str:
        if rcpt.startswith("carol"):
            return f"550 5.1.1 <{rcpt}> mailbox unavailable"
        return f"250 2.0.0 <{rcpt}> saved"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        *first, last = envelope.rcpt_tos
        for rcpt in first:
            await server.push(self._reply(rcpt))
        return self._reply(last)


class _LMTPController(Controller):
    def factory(self) -> LMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


async def test_lmtp_one_delivered_one_bounced_with_a_notice(start: Start, dns: DNSServer) -> None:
    handler = _SplitLMTP()
    controller = _LMTPController(
        handler, hostname=SINK_IP, port=free_port(SINK_IP), ready_timeout=10.0
    )
    controller.start()
    try:
        a = await start("a", A_IP, **relay_options(dns, 25, lmtp=f"{SINK_IP}:{controller.port}"))
        queue_id = await submit(a, "alice@a.test", ["bob@a.test", "carol@a.test"])
        await until(
            lambda: states(a, queue_id) == {"bob@a.test": "delivered", "carol@a.test": "bounced"},
            what="one delivered, one bounced",
        )
        # The notice is for a local sender: handed to the mailbox server too.
        original, to_sender = await until(
            lambda: handler.envelopes if len(handler.envelopes) >= 2 else None, what="the notice"
        )
        assert original.rcpt_tos == ["bob@a.test", "carol@a.test"]
        assert (to_sender.mail_from, to_sender.rcpt_tos) == ("<>", ["alice@a.test"])
        notice = email.message_from_bytes(to_sender.original_content, policy=email.policy.default)
        assert notice["Auto-Submitted"] == "auto-replied"
        [group] = report_fields(notice)  # type: ignore[arg-type]
        assert group["Final-Recipient"] == "rfc822; carol@a.test"
        assert group["Action"] == "failed" and group["Status"] == "5.1.1"
        assert "mailbox unavailable" in group["Diagnostic-Code"]
    finally:
        controller.stop()


async def test_a_smarthost_given_as_host_port_to_the_library(
    start: Start, dns: DNSServer, hops: list[Hop]
) -> None:
    h = await hop(hops)
    # HOST:PORT as in the configuration file, in a ServerConfig built directly.
    a = await start("a", A_IP, **relay_options(dns, 25, relay_host=f"{SINK_IP}:{h.port}"))
    queue_id = await submit(a, "alice@a.test", ["bob@nowhere.test"])
    await until(lambda: states(a, queue_id) == {"bob@nowhere.test": "delivered"}, what="relayed")
    assert only_entry(a, queue_id).next_hop == f"smtp:{SINK_IP}:{h.port}"
    [message] = h.messages
    assert message.endswith(BODY.replace(b"\r\n.", b"\r\n..") + b".\r\n")


# ------------------------------------------------------------------------------ AUTH


async def test_an_authenticated_client_relays_and_an_anonymous_one_does_not(
    start: Start, dns: DNSServer, tmp_path: Path
) -> None:
    b, port = await start_b(start, dns)
    users_data(tmp_path, "a")  # A's data folder: tmp_path / "a"
    a = await start("a", A_IP, **relay_options(dns, port, relay_networks=("10.0.0.0/8",)))
    host, a_port = a.addresses[0]
    async with SMTPClient(
        host, a_port, timeouts=TIMEOUTS, tls="encrypt", ssl_context=client_tls()
    ) as client:
        await client.login("alice", "pw")
        result = await client.send_message("alice@a.test", ["bob@b.test"], BODY)
    queue_id = result.reply.text.rsplit(" ", 1)[-1]
    stored = await until(lambda: b.store.list(), what="the message at B")
    raw = b.store.raw(stored[0].envelope.queue_id)
    assert raw is not None and raw.endswith(BODY)
    await until(lambda: states(a, queue_id) == {"bob@b.test": "delivered"}, what="delivered")
    # The same client without AUTH, outside the relay networks: no relay.
    async with SMTPClient(
        host, a_port, timeouts=TIMEOUTS, tls="encrypt", ssl_context=client_tls()
    ) as client:
        with pytest.raises(SMTPClientError) as info:
            await client.send_message("alice@a.test", ["bob@b.test"], BODY)
    reply = getattr(info.value, "refused", {}).get("bob@b.test")
    assert reply is not None and (reply.code, reply.enhanced) == (550, "5.7.1")
    assert len(b.store.list()) == 1


@pytest.mark.parametrize("password", ["pw", "wrong"])
async def test_a_smarthost_is_given_the_relay_login(
    start: Start, dns: DNSServer, tmp_path: Path, password: str
) -> None:
    # relay_auth_user with relay_password_file: AUTH at the smarthost (after
    # STARTTLS); a refused login defers, it never bounces.
    users_data(tmp_path, "b")  # B's data folder: tmp_path / "b"
    b, port = await start_b(start, dns)
    secret = tmp_path / "relay.pw"
    secret.write_text(password + "\n")
    a = await start(
        "a", A_IP, **relay_options(dns, port), relay_host=f"{B_IP}:{port}",
        relay_auth_user="alice", relay_password_file=secret,
    )
    queue_id = await submit(a, "alice@a.test", ["bob@b.test"])
    if password == "pw":
        stored = await until(lambda: b.store.list(), what="the message at B")
        assert stored[0].envelope.extra["auth"]["user"] == "alice"
        await until(lambda: states(a, queue_id) == {"bob@b.test": "delivered"}, what="sent")
    else:
        entry = await settled(a, queue_id, "deferred")
        assert entry.last_reply is not None and entry.last_reply["code"] == 535
        assert b.store.list() == []


# ------------------------------------------------------------ bounces by capability


async def test_a_message_over_the_next_hops_size_bounces_with_5_3_4(
    start: Start, dns: DNSServer
) -> None:
    b, port = await start_b(start, dns, max_message_size=100)
    a = await start("a", A_IP, **relay_options(dns, port))
    queue_id = await submit(a, "alice@a.test", ["bob@b.test"])
    entry = await settled(a, queue_id, "bounced")
    assert entry.last_reply is not None and entry.last_reply["enhanced"] == "5.3.4"
    [notice] = await until(lambda: notices(a), what="the notice")
    [group] = report_fields(notice)
    assert group["Action"] == "failed" and group["Status"] == "5.3.4"
    assert b.store.list() == []


async def test_an_smtputf8_address_to_a_host_without_smtputf8_bounces_with_5_6_7(
    start: Start, dns: DNSServer
) -> None:
    b, port = await start_b(start, dns, smtputf8=False)
    a = await start("a", A_IP, **relay_options(dns, port))
    host, a_port = a.addresses[0]
    async with SMTPClient(host, a_port, timeouts=TIMEOUTS, tls="off") as client:
        result = await client.send_message("alice@a.test", ["bøb@b.test"], BODY, smtputf8=True)
    queue_id = result.reply.text.rsplit(" ", 1)[-1]
    entry = await settled(a, queue_id, "bounced")
    assert entry.last_reply is not None and entry.last_reply["enhanced"] == "5.6.7"
    [notice] = await until(lambda: notices(a), what="the notice")
    # RFC 6533: the notice about an SMTPUTF8 message uses the global forms.
    status = list(notice.iter_parts())[1]
    assert status.get_content_type() == "message/global-delivery-status"
    body = status.as_bytes(policy=email.policy.SMTPUTF8)
    assert b"Action: failed" in body and b"Status: 5.6.7" in body
    assert "bøb@b.test".encode() in body
    assert b.store.list() == []


# --------------------------------------------------------------------------- notices


async def test_notify_success_to_a_hop_without_dsn_gives_a_relayed_notice(
    start: Start, dns: DNSServer, hops: list[Hop]
) -> None:
    h = await hop(hops)
    a = await start("a", A_IP, **relay_options(dns, h.port))
    queue_id = await submit_dsn(a, "alice@a.test", ["bob@sink.test"], notify="SUCCESS")
    await until(lambda: states(a, queue_id) == {"bob@sink.test": "delivered"}, what="delivered")
    [notice] = await until(lambda: notices(a), what="the success notice")
    [group] = report_fields(notice)
    assert group["Action"] == "relayed" and group["Status"].startswith("2.")
    assert group["Final-Recipient"] == "rfc822; bob@sink.test"
    # No DSN at the hop: nothing of it on the wire.
    assert [line for line in h.lines if "NOTIFY=" in line] == []


async def test_notify_success_to_a_hop_with_dsn_is_passed_on_without_a_notice(
    start: Start, dns: DNSServer, hops: list[Hop]
) -> None:
    h = await hop(hops, extensions=("PIPELINING", "DSN"))
    a = await start("a", A_IP, **relay_options(dns, h.port))
    queue_id = await submit_dsn(a, "alice@a.test", ["bob@sink.test"], notify="SUCCESS", orcpt=True)
    await until(lambda: states(a, queue_id) == {"bob@sink.test": "delivered"}, what="delivered")
    [rcpt] = [line for line in h.lines if line.upper().startswith("RCPT")]
    params = set(rcpt.split()[2:])
    assert params == {"NOTIFY=SUCCESS", "ORCPT=rfc822;bob@sink.test"}, rcpt
    assert len(h.messages) == 1
    # A's session is over (QUIT comes after the outcomes and their notices).
    await until(lambda: "QUIT" in h.lines, what="QUIT")
    assert notices(a) == []


async def test_notify_never_never_notifies(start: Start, dns: DNSServer, hops: list[Hop]) -> None:
    h = await hop(hops, "refuse_rcpt")
    a = await start("a", A_IP, **relay_options(dns, h.port))
    queue_id = await submit_dsn(a, "alice@a.test", ["bob@sink.test"], notify="NEVER")
    entry = await settled(a, queue_id, "bounced")
    assert entry.last_reply is not None and entry.last_reply["code"] == 550
    # A's session is over (QUIT comes after the outcomes and their notices).
    await until(lambda: "QUIT" in h.lines, what="QUIT")
    assert notices(a) == []


async def test_a_bounce_of_a_message_from_null_sender_gives_no_notice(
    start: Start, dns: DNSServer, sink: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ehlo.delivery")
    port = free_port(SINK_IP)
    sink(port, "-f", "rcpt")
    a = await start("a", A_IP, **relay_options(dns, port))
    queue_id = await submit(a, "", ["bob@sink.test"])
    await settled(a, queue_id, "bounced")
    await until(
        lambda: any(
            f"{queue_id}: no notice for a message from <>" in r.getMessage() for r in caplog.records
        ),
        what="the log line",
    )
    assert notices(a) == []


async def test_a_delay_notice_once_after_delay_warning(
    start: Start, dns: DNSServer, sink: Any
) -> None:
    port = free_port(SINK_IP)
    sink(port, "-r", "rcpt")
    skew = [0.0]
    a = await start(
        "a",
        A_IP,
        clock=lambda: time.time() + skew[0],
        **relay_options(dns, port, delay_warning=600.0, retry_min=0.2, retry_max=0.2),
    )
    queue_id = await submit(a, "alice@a.test", ["bob@sink.test"])
    await until(lambda: only_entry(a, queue_id).attempts >= 1, what="a first attempt")
    assert notices(a) == []  # deferred, but not for long yet
    skew[0] += 700.0  # past delay_warning
    assert a.scheduler is not None
    a.scheduler.wake()
    [notice] = await until(lambda: notices(a), what="the delay notice")
    [group] = report_fields(notice)
    assert group["Action"] == "delayed" and group["Status"].startswith("4.")
    assert "Will-Retry-Until" in group
    attempts = only_entry(a, queue_id).attempts
    await until(lambda: only_entry(a, queue_id).attempts >= attempts + 2, what="more retries")
    assert len(notices(a)) == 1  # only once
    assert only_entry(a, queue_id).state in ("deferred", "delivering")


async def test_a_notice_to_a_remote_sender_is_relayed_from_null(
    start: Start, dns: DNSServer, sink: Any
) -> None:
    b, b_port = await start_b(start, dns)
    port = b_port  # every MX on one port: smtp-sink on SINK_IP, B on B_IP
    sink(port, "-f", "rcpt")
    a = await start("a", A_IP, **relay_options(dns, port))
    queue_id = await submit(a, "alice@c.test", ["bob@sink.test"])
    await settled(a, queue_id, "bounced")
    stored = await until(lambda: b.store.list(), what="the notice at B")
    [message] = stored
    assert message.envelope.mail_from == "" and message.envelope.rcpt_to == ["alice@c.test"]
    raw = b.store.raw(message.envelope.queue_id)
    assert raw is not None
    notice = email.message_from_bytes(raw, policy=email.policy.default)
    [group] = report_fields(notice)  # type: ignore[arg-type]
    assert group["Final-Recipient"] == "rfc822; bob@sink.test" and group["Action"] == "failed"
    # At A the notice went through the queue, to c.test's MX.
    queue = a.store.queue
    assert queue is not None
    relayed = await until(
        lambda: [
            (e.next_hop, e.state)
            for e in queue.entries()
            if e.recipient == "alice@c.test" and e.state != "delivering"
        ],
        what="the notice's entry settled",
    )
    assert relayed == [("mx:c.test", "delivered")]


# ----------------------------------------------------------------- the delivery hook


async def test_a_delivery_hook_refuses_defers_and_reroutes(
    start: Start, dns: DNSServer, hops: list[Hop]
) -> None:
    h = await hop(hops)
    b, port = await start_b(start, dns)
    seen: list[tuple[str | None, str | None, str | None]] = []

    async def decide(ctx: HookContext) -> Verdict | None:
        seen.append((ctx.rcpt, ctx.queue_id, ctx.next_hop))
        local = (ctx.rcpt or "").partition("@")[0]
        if local == "refused":
            return Verdict.reject("not to this one")
        if local == "later":
            return Verdict.defer("not now")
        if local == "moved":
            ctx.next_hop = f"smtp:{SINK_IP}:{h.port}"
        return None

    hooks = Hooks({"delivery": [decide]})
    a = await start("a", A_IP, hooks=hooks, **relay_options(dns, port))
    queue_id = await submit(
        a, "alice@a.test", ["refused@b.test", "later@b.test", "moved@b.test", "kept@b.test"]
    )
    await until(
        lambda: (
            states(a, queue_id).get("moved@b.test") == "delivered"
            and states(a, queue_id).get("kept@b.test") == "delivered"
        ),
        what="moved and kept delivered",
    )
    fates = {e.recipient: e for e in entries(a, queue_id)}
    assert fates["refused@b.test"].state == "bounced"
    assert fates["later@b.test"].state in ("deferred", "delivering")
    refused, later = fates["refused@b.test"].last_reply, fates["later@b.test"].last_reply
    assert refused is not None and (refused["code"], refused["text"]) == (550, "not to this one")
    assert later is not None and (later["code"], later["text"]) == (450, "not now")
    assert fates["moved@b.test"].next_hop == f"smtp:{SINK_IP}:{h.port}"
    # The hook saw each recipient with its queue id and next hop.
    assert ("kept@b.test", queue_id, "mx:b.test") in seen
    # Rerouted: at the scripted hop, not at B; kept: at B only.
    assert [line for line in h.lines if line.startswith("RCPT")] == ["RCPT TO:<moved@b.test>"]
    [at_b] = b.store.list()
    assert at_b.envelope.rcpt_to == ["kept@b.test"]
    [notice] = await until(lambda: notices(a), what="the failure notice")
    assert [g["Final-Recipient"] for g in report_fields(notice)] == ["rfc822; refused@b.test"]
