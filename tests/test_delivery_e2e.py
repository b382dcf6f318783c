"""End to end: ehlo relays mail to other servers on loopback, through a real DNS server.

Server A (the relay, on 127.0.0.2) takes mail from a relay network or an
authenticated session and hands it on; its next hops are found in the
loopback DNS server's MX records, on ``delivery_port``:

- server B, another ehlo (127.0.0.3): the message arrives byte-exact under
  A's Received field, and A's transcript is in the queue;
- aiosmtpd answering 250 to one recipient and 550 to another: one
  delivered, one bounced, one notice naming the second;
- Postfix's smtp-sink with soft rejects, then without (deferred, then
  delivered on retry), with hard rejects (a failure notice, parsed as a
  multipart/report), and disconnecting;
- a null MX, a domain without any route, a DNS server that fails, an MX
  that is A itself.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope as AioEnvelope

from ehlo import Server
from ehlo.client import SMTPClient, Timeouts
from ehlo.storage.queue import QueueEntry

from .dnsserver import DNSServer
from .helpers import free_port, greets, make_config, tool, wait_until

A_IP, B_IP, SINK_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4"
TIMEOUTS = Timeouts.uniform(10.0)
BODY = (
    b"From: Alice <alice@a.test>\r\nTo: Bob <bob@b.test>\r\nSubject: relayed\r\n"
    b"Message-ID: <1@a.test>\r\n\r\nHello Bob.\r\n.a line that starts with a dot\r\n"
)


def zone(port_ip: dict[str, str]) -> dict[str, dict[str, list[str]]]:
    """MX records: each domain's MX host and its address."""
    records: dict[str, dict[str, list[str]]] = {}
    for domain, ip in port_ip.items():
        records[domain] = {"MX": [f"10 mx.{domain}."]}
        records[f"mx.{domain}"] = {"A": [ip]}
    return records


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer(
        zone({"b.test": B_IP, "sink.test": SINK_IP, "loop.test": A_IP, "a.test": A_IP})
        | {
            "nullmx.test": {"MX": ["0 ."]},
            "mx.nowhere.test": {"A": ["127.0.0.9"]},
            "down.test": {"MX": ["10 mx.nowhere.test."]},
        },
        behaviours={"broken.test": "servfail"},
    ) as server:
        yield server


Start = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    servers: list[Server] = []

    async def run(name: str, ip: str, port: int = 0, *, clock: Any = None, hooks: Any = None,
                  **overrides: Any) -> Server:
        from ehlo import Listen

        overrides.setdefault("mta_sts", False)  # MTA-STS off unless asked for
        config = make_config(
            tmp_path / name, listen=(Listen(ip, port),), hostname=f"mx.{name}.test", **overrides
        )
        server = Server(config, clock=clock, hooks=hooks)
        await server.start()
        servers.append(server)
        return server

    yield run
    for server in servers:
        await server.stop(timeout=1.0)


async def submit(server: Server, sender: str, rcpts: list[str], body: bytes = BODY) -> str:
    """Send one message to ``server`` from 127.0.0.1; its queue id."""
    host, port = server.addresses[0]
    async with SMTPClient(host, port, timeouts=TIMEOUTS, tls="off") as client:
        result = await client.send_message(sender, rcpts, body)
    return result.reply.text.rsplit(" ", 1)[-1]


def relay_options(dns: DNSServer, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "domains": ("a.test",),
        "relay_networks": ("127.0.0.1/32",),
        "dns_servers": (dns.nameserver,),
        "delivery_port": port,
        "retry_min": 0.5,
        "retry_max": 1.0,
        "delivery_timeout_scale": 0.05,
        "delivery_connect_timeout": 3.0,
        **extra,
    }


def entries(server: Server, queue_id: str | None = None) -> list[QueueEntry]:
    queue = server.store.queue
    assert queue is not None
    return queue.entries(queue_ids=[queue_id] if queue_id else None)


async def until(check: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)


def states(server: Server, queue_id: str) -> dict[str, str]:
    return {e.recipient: e.state for e in entries(server, queue_id)}


def notices(server: Server) -> list[email.message.EmailMessage]:
    found = []
    for stored in server.store.list():
        if stored.envelope.mail_from == "" and stored.envelope.extra.get("notice_for"):
            raw = server.store.raw(stored.envelope.queue_id)
            assert raw is not None
            found.append(email.message_from_bytes(raw, policy=email.policy.default))
    return found  # type: ignore[return-value]


def report_fields(notice: email.message.EmailMessage) -> list[dict[str, str]]:
    """The per-recipient groups of a notice's message/delivery-status part."""
    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    parts = list(notice.iter_parts())
    status = parts[1]
    assert status.get_content_type() == "message/delivery-status"
    groups = [dict(block.items()) for block in status.get_payload()[1:]]  # type: ignore[union-attr]
    return groups


# ------------------------------------------------------------------ ehlo to ehlo


@pytest.mark.parametrize("store", ["sqlite", "maildir"])
async def test_relay_network_mail_reaches_b_byte_exact(
    start: Start, dns: DNSServer, store: str
) -> None:
    b_port = free_port(B_IP)
    b = await start("b", B_IP, b_port, domains=("b.test",), dns_servers=(dns.nameserver,))
    a = await start("a", A_IP, store=store, **relay_options(dns, b_port))
    queue_id = await submit(a, "alice@a.test", ["bob@b.test"])
    stored = await until(lambda: b.store.list(), what="the message at B")
    raw_b = b.store.raw(stored[0].envelope.queue_id)
    assert raw_b is not None
    # B's Received, then A's, then the message as the client sent it (dot-unstuffed).
    b_received, rest = raw_b.split(b"\r\nReceived: ", 1)
    assert b_received.startswith(b"Received: from mx.a.test (")
    a_received = rest[: rest.index(b"\r\nFrom: Alice")]
    assert b"by mx.a.test" in a_received and f"id {queue_id}".encode() in a_received
    assert raw_b.endswith(BODY)
    assert stored[0].envelope.mail_from == "alice@a.test"
    assert stored[0].envelope.rcpt_to == ["bob@b.test"]
    # A: the entry delivered, the attempt's transcript kept, the message gone from its store.
    await until(lambda: states(a, queue_id) == {"bob@b.test": "delivered"}, what="delivered")
    queue = a.store.queue
    assert queue is not None
    [attempt] = queue.attempts(queue_id)
    assert attempt.host == f"mx.b.test[{B_IP}]:{b_port}"
    assert "C: MAIL FROM:<alice@a.test>" in attempt.transcript
    assert "C: RCPT TO:<bob@b.test>" in attempt.transcript
    assert attempt.results["bob@b.test"]["code"] == 250
    await until(lambda: a.store.get(queue_id) is None, what="the relayed copy removed")


async def test_no_open_relay(start: Start, dns: DNSServer) -> None:
    a = await start("a", A_IP, **relay_options(dns, 25, relay_networks=("10.0.0.0/8",)))
    host, port = a.addresses[0]
    async with SMTPClient(host, port, timeouts=TIMEOUTS, tls="off") as client:
        with pytest.raises(Exception) as info:
            await client.send_message("x@elsewhere.test", ["bob@b.test"], BODY)
    reply = getattr(info.value, "refused", {}).get("bob@b.test")
    assert reply is not None and reply.code == 550 and reply.enhanced == "5.7.1"
    assert a.store.list() == []


async def test_catch_all_never_relays(start: Start, dns: DNSServer) -> None:
    a = await start("a", A_IP, dns_servers=(dns.nameserver,))
    await submit(a, "alice@a.test", ["bob@b.test"])
    assert a.scheduler is None
    assert a.store.queue is not None and a.store.queue.entries() == []
    assert [m.envelope.rcpt_to for m in a.store.list()] == [["bob@b.test"]]


# ------------------------------------------------------------- per-recipient fates


class _Picky:
    """aiosmtpd: 250 for bob, 550 for carol."""

    def __init__(self) -> None:
        self.messages: list[AioEnvelope] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: AioEnvelope,
                          address: str, options: list[str]) -> str:
        if address.startswith("carol"):
            return "550 5.1.1 <carol@sink.test>: no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: AioEnvelope) -> str:
        self.messages.append(envelope)
        return "250 OK stored"


async def test_one_delivered_one_bounced_one_notice(start: Start, dns: DNSServer) -> None:
    port = free_port(SINK_IP)
    handler = _Picky()
    controller = Controller(handler, hostname=SINK_IP, port=port)
    controller.start()
    try:
        a = await start("a", A_IP, **relay_options(dns, port))
        queue_id = await submit(a, "alice@a.test", ["bob@sink.test", "carol@sink.test"])
        await until(
            lambda: states(a, queue_id) == {"bob@sink.test": "delivered",
                                            "carol@sink.test": "bounced"},
            what="one delivered, one bounced",
        )
        assert len(handler.messages) == 1 and handler.messages[0].rcpt_tos == ["bob@sink.test"]
        [notice] = await until(lambda: notices(a), what="the notice")
        assert notice["To"] == "<alice@a.test>" or "alice@a.test" in str(notice["To"])
        assert notice["Auto-Submitted"] == "auto-replied"
        groups = report_fields(notice)
        assert [g["Final-Recipient"] for g in groups] == ["rfc822; carol@sink.test"]
        assert groups[0]["Action"] == "failed" and groups[0]["Status"] == "5.1.1"
        assert "no such user here" in groups[0]["Diagnostic-Code"]
        assert "bob@sink.test" not in notice.as_string().split("Content-Type: text/rfc822")[0]
    finally:
        controller.stop()


# ------------------------------------------------------------------- smtp-sink


@pytest.fixture
def sink() -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], Path]]]:
    path = tool("smtp-sink")
    started: list[subprocess.Popen[bytes]] = []
    dumps: list[Path] = []

    def run(port: int, *options: str) -> tuple[subprocess.Popen[bytes], Path]:
        dump = Path(tempfile.mkdtemp(prefix="ehlo-sink-"))
        dump.chmod(0o777)  # smtp-sink writes as nobody when started by root
        dumps.append(dump)
        cmd = [path, *options]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += ["-d", f"{dump}/%M.", f"{SINK_IP}:{port}", "64"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append(proc)

        wait_until(lambda: greets(port, SINK_IP), timeout=10.0, what="smtp-sink")
        return proc, dump

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(5)
    for dump in dumps:
        shutil.rmtree(dump, ignore_errors=True)


def dumped(dump: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(dump.rglob("*")) if p.is_file()]


async def test_soft_reject_is_deferred_then_delivered(start: Start, dns: DNSServer,
                                                      sink: Any) -> None:
    port = free_port(SINK_IP)
    proc, _ = sink(port, "-r", "rcpt")
    a = await start("a", A_IP, **relay_options(dns, port))
    queue_id = await submit(a, "alice@a.test", ["bob@sink.test"])
    await until(lambda: [e for e in entries(a, queue_id) if e.state == "deferred"],
                what="deferred")
    [entry] = entries(a, queue_id)
    assert entry.last_reply is not None and entry.last_reply["code"] // 100 == 4
    proc.terminate()
    proc.wait(5)
    _, dump = sink(port)
    await until(lambda: states(a, queue_id) == {"bob@sink.test": "delivered"}, what="retry")
    [message] = await until(lambda: dumped(dump), what="the dump")
    assert BODY.replace(b"\r\n", b"\n") in message.replace(b"\r\n", b"\n")
    assert entries(a, queue_id)[0].attempts >= 2
    assert notices(a) == []


async def test_hard_reject_bounces_with_a_valid_report(start: Start, dns: DNSServer,
                                                       sink: Any) -> None:
    port = free_port(SINK_IP)
    sink(port, "-f", "rcpt")
    a = await start("a", A_IP, **relay_options(dns, port))
    queue_id = await submit(a, "alice@a.test", ["bob@sink.test"])
    await until(lambda: states(a, queue_id) == {"bob@sink.test": "bounced"}, what="bounced")
    [notice] = await until(lambda: notices(a), what="the notice")
    assert notice.get_content_type() == "multipart/report"
    text, status, original = list(notice.iter_parts())
    assert status.get_content_type() == "message/delivery-status"
    assert text.get_content_type() == "text/plain"
    assert original.get_content_type() == "text/rfc822-headers"
    [group] = report_fields(notice)
    assert group["Action"] == "failed" and group["Status"].startswith("5.")
    assert group["Remote-MTA"] == "dns; mx.sink.test"


async def test_disconnect_defers(start: Start, dns: DNSServer, sink: Any) -> None:
    port = free_port(SINK_IP)
    sink(port, "-q", "data")
    a = await start("a", A_IP, **relay_options(dns, port))
    queue_id = await submit(a, "alice@a.test", ["bob@sink.test"])
    await until(lambda: [e for e in entries(a, queue_id) if e.state == "deferred"],
                what="deferred")
    assert notices(a) == []


# ---------------------------------------------------------------- routes that fail


async def test_null_mx_bounces_at_once(start: Start, dns: DNSServer) -> None:
    a = await start("a", A_IP, **relay_options(dns, 25))
    queue_id = await submit(a, "alice@a.test", ["bob@nullmx.test"])
    await until(lambda: states(a, queue_id) == {"bob@nullmx.test": "bounced"}, what="bounced")
    [entry] = entries(a, queue_id)
    assert entry.attempts == 1 and entry.last_reply is not None
    assert "null MX" in entry.last_reply["text"]
    [notice] = await until(lambda: notices(a), what="the notice")
    assert report_fields(notice)[0]["Status"].startswith("5.")


async def test_dns_failure_defers_never_bounces(start: Start, dns: DNSServer) -> None:
    a = await start("a", A_IP, **relay_options(dns, 25))
    queue_id = await submit(a, "alice@a.test", ["bob@broken.test"])
    await until(lambda: [e for e in entries(a, queue_id) if e.attempts >= 2], what="retries")
    assert {e.state for e in entries(a, queue_id)} <= {"deferred", "delivering"}
    assert notices(a) == []


async def test_unreachable_host_defers_and_expiry_bounces(start: Start, dns: DNSServer) -> None:
    skew = [0.0]
    a = await start("a", A_IP, clock=lambda: time.time() + skew[0],
                    **relay_options(dns, free_port("127.0.0.9"), max_queue_lifetime=3600.0))
    queue_id = await submit(a, "alice@a.test", ["bob@down.test"])
    await until(lambda: [e for e in entries(a, queue_id) if e.state == "deferred"],
                what="deferred")
    assert notices(a) == []
    skew[0] += 7200.0  # past the queue lifetime
    a.scheduler.wake()  # type: ignore[union-attr]
    await until(lambda: states(a, queue_id) == {"bob@down.test": "bounced"}, what="expired")
    [notice] = await until(lambda: notices(a), what="the notice")
    assert report_fields(notice)[0]["Status"] == "4.4.7"


async def test_mx_pointing_at_ourselves_bounces_as_a_loop(start: Start, dns: DNSServer) -> None:
    a_port = free_port(A_IP)
    a = await start("a", A_IP, a_port, **relay_options(dns, a_port))
    queue_id = await submit(a, "alice@a.test", ["bob@loop.test"])
    await until(lambda: states(a, queue_id) == {"bob@loop.test": "bounced"}, what="bounced")
    [entry] = entries(a, queue_id)
    assert entry.last_reply is not None and entry.last_reply["enhanced"] == "5.4.6"


async def test_success_notice_for_a_stored_recipient(start: Start, dns: DNSServer) -> None:
    # RFC 3461 section 4.1: NOTIFY=SUCCESS for a recipient ehlo keeps itself.
    a = await start("a", A_IP, **relay_options(dns, 25))
    host, port = a.addresses[0]
    async with SMTPClient(host, port, timeouts=TIMEOUTS, tls="off") as client:
        await client.send_message(
            "alice@a.test", ["bob@a.test", "carol@a.test"], BODY,
            rcpt_params={"bob@a.test": {"NOTIFY": "SUCCESS", "ORCPT": "rfc822;bob+2Bx@a.test"}},
        )
    [notice] = await until(lambda: notices(a), what="the success notice")
    assert notice["Subject"] == "Successful Mail Delivery Report"
    [group] = report_fields(notice)
    assert group["Final-Recipient"] == "rfc822; bob@a.test"
    assert group["Original-Recipient"] == "rfc822;bob+x@a.test"
    assert group["Action"] == "delivered" and group["Status"] == "2.0.0"
    stored = [m for m in a.store.list() if m.envelope.mail_from == "alice@a.test"]
    assert [m.envelope.rcpt_to for m in stored] == [["bob@a.test", "carol@a.test"]]
