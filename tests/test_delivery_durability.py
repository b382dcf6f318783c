"""Durability of delivery and connection reuse, with real processes and a counting sink.

The next hop is a counting sink: aiosmtpd in a thread of its own that
records each message's ``X-Seq`` header, every connection, how many are
open at once and the commands of each; it is a little slow per message
(so that deliveries are in flight) and may answer ``451`` to every RCPT.
Its domain, ``sink.test``, has an MX record in the loopback DNS server
(``tests/dnsserver.py``).

- SIGKILL of ``ehlo serve`` (its whole process group) with 500 messages
  queued and deliveries in flight; a new ``ehlo serve`` on the same data
  folder delivers the rest: every message reaches the sink, and the only
  duplicates are entries that were ``delivering`` at the kill.
- Deferred mail resumes on schedule after a graceful restart: not before
  its ``next_attempt``, with its attempt count kept.
- Reuse: 200 messages to one next hop take a handful of connections,
  several messages each, never more than ``delivery_per_destination`` at
  once.
- SIGTERM with deliveries in flight, then a restart: no recipient
  delivered is delivered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope as AioEnvelope

from ehlo import Listen, Server

from .dnsserver import DNSServer
from .helpers import PRODUCTION_WRITER, SERVE_WITHOUT_DNS, free_port, make_config, wait_until
from .test_delivery_e2e import relay_options, until, zone

pytestmark = pytest.mark.timeout(110)

SINK_IP = "127.0.0.6"
RELAY_IP = "127.0.0.5"
SEQ = re.compile(rb"^X-Seq: (\d+)\r?$", re.MULTILINE)
QUEUED = re.compile(rb"queued as ([0-9A-Za-z]+)")


def body(seq: int) -> bytes:
    return (
        f"From: <alice@a.test>\r\nTo: <r{seq}@sink.test>\r\nSubject: message {seq}\r\n"
        f"X-Seq: {seq}\r\n\r\nMessage number {seq}.\r\n"
    ).encode()


# --------------------------------------------------------------- the counting sink


class _SinkSMTP(AioSMTP):
    """aiosmtpd's session, telling the sink when a connection ends."""

    sink: CountingSink
    number: int | None = None  # set at EHLO: the connection's number at the sink

    def connection_lost(self, error: Exception | None) -> None:
        if self.number is not None:
            self.sink.closed(self.number)
        super().connection_lost(error)


class _SinkController(Controller):
    def __init__(self, sink: CountingSink, host: str, port: int) -> None:
        super().__init__(sink, hostname=host, port=port)
        self.sink = sink

    def factory(self) -> AioSMTP:
        smtp = _SinkSMTP(self.handler, **self.SMTP_kwargs)
        smtp.sink = self.sink
        return smtp


class CountingSink:
    """An SMTP next hop that counts what it is given (aiosmtpd's handler hooks).

    Connections are counted from their EHLO (the controller's own readiness
    probe says none). ``delay``: seconds each RCPT waits for its reply (the
    message is on its way, not yet here) and as long again between the
    data and its 250 (here, not yet acknowledged); ``refuse``: 451 to every
    RCPT.
    """

    def __init__(self, host: str, port: int, *, delay: float = 0.0, refuse: bool = False) -> None:
        self.host, self.port = host, port
        self.delay = delay
        self.refuse = refuse
        self._lock = threading.Lock()
        self.received: list[tuple[int, float]] = []  # (X-Seq, time) of each message's data
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.at_rcpt = 0  # sessions waiting for a RCPT reply now
        self.commands: dict[int, list[str]] = {}  # connection number -> MAIL, RSET, DATA
        self._controller = _SinkController(self, host, port)

    def start(self) -> CountingSink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    # --- what the tests read -------------------------------------------------------

    def seqs(self) -> list[int]:
        with self._lock:
            return [seq for seq, _ in self.received]

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def arrivals(self) -> dict[int, list[float]]:
        found: dict[int, list[float]] = {}
        with self._lock:
            for seq, at in self.received:
                found.setdefault(seq, []).append(at)
        return found

    # --- aiosmtpd's hooks (in the controller's thread) ----------------------------

    def closed(self, number: int) -> None:
        with self._lock:
            self.open -= 1

    async def handle_EHLO(
        self,
        server: _SinkSMTP,
        session: Any,
        envelope: AioEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if server.number is None:
            with self._lock:
                self.connections += 1
                server.number = self.connections
                self.commands[server.number] = []
                self.open += 1
                self.most_open = max(self.most_open, self.open)
        return responses

    def _note(self, server: _SinkSMTP, command: str) -> None:
        if server.number is not None:
            with self._lock:
                self.commands[server.number].append(command)

    async def handle_MAIL(
        self,
        server: _SinkSMTP,
        session: Any,
        envelope: AioEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        self._note(server, "MAIL")
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: _SinkSMTP,
        session: Any,
        envelope: AioEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        if self.refuse:
            return "451 4.3.2 not now, try again later"
        if self.delay:
            with self._lock:
                self.at_rcpt += 1
            try:
                await asyncio.sleep(self.delay)
            finally:
                with self._lock:
                    self.at_rcpt -= 1
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_RSET(self, server: _SinkSMTP, session: Any, envelope: AioEnvelope) -> str:
        self._note(server, "RSET")
        return "250 2.0.0 OK"

    async def handle_DATA(self, server: _SinkSMTP, session: Any, envelope: AioEnvelope) -> str:
        content = envelope.original_content or b""
        found = SEQ.search(content)
        assert found is not None, content[:200]
        self._note(server, "DATA")
        with self._lock:
            self.received.append((int(found.group(1)), time.time()))
        if self.delay:
            await asyncio.sleep(self.delay)
        return "250 2.0.0 OK"


@pytest.fixture
def counting_sink() -> Iterator[Callable[..., CountingSink]]:
    started: list[CountingSink] = []

    def run(**options: Any) -> CountingSink:
        sink = CountingSink(SINK_IP, free_port(SINK_IP), **options).start()
        started.append(sink)
        return sink

    yield run
    for sink in started:
        sink.stop()


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer(zone({"sink.test": SINK_IP})) as server:
        yield server


# --------------------------------------------------------------- the queue on disk


def queue_rows(data: Path) -> dict[str, tuple[str, int, float]]:
    """queue id -> (state, attempts, next_attempt), read from the SQLite store's database."""
    path = data / "ehlo.sqlite3"
    if not path.exists():
        return {}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    try:
        rows = conn.execute("SELECT queue_id, state, attempts, next_attempt FROM queue").fetchall()
    except sqlite3.OperationalError:  # the table is not made yet
        return {}
    finally:
        conn.close()
    return {row[0]: (row[1], int(row[2]), float(row[3])) for row in rows}


def states(data: Path) -> Counter[str]:
    return Counter(state for state, _, _ in queue_rows(data).values())


def submit(host: str, port: int, seqs: range, threads: int = 5) -> dict[str, int]:
    """One message per X-Seq from alice@a.test (one recipient each), over ``threads``
    connections at once; queue id -> X-Seq."""

    def send(part: range) -> dict[str, int]:
        got: dict[str, int] = {}
        with smtplib.SMTP(host, port, timeout=30.0) as client:
            client.ehlo("client.a.test")
            for seq in part:
                code, reply = client.mail("alice@a.test")
                assert code == 250, reply
                code, reply = client.rcpt(f"r{seq}@sink.test")
                assert code == 250, reply
                code, reply = client.data(body(seq))
                assert code == 250, reply
                found = QUEUED.search(reply)
                assert found is not None, reply
                got[found.group(1).decode()] = seq
        return got

    parts = [seqs[i::threads] for i in range(threads)]
    ids: dict[str, int] = {}
    with ThreadPoolExecutor(threads) as pool:
        for got in pool.map(send, parts):
            ids.update(got)
    assert sorted(ids.values()) == list(seqs)
    return ids


# --------------------------------------------------------------- ehlo serve


class Relay:
    """``ehlo serve`` relaying for 127.0.0.0/8 to ``sink.test``, in its own process group."""

    def __init__(self, data: Path, dns: DNSServer, sink: CountingSink) -> None:
        self.data = data
        self.port = free_port(RELAY_IP)
        self.config = data.parent / "relay.toml"
        self.config.write_text(
            "mta_sts = false\nretry_min = 1.0\nretry_max = 2.0\n"
            "delivery_timeout_scale = 0.05\ndelivery_connect_timeout = 5.0\ntls = false\n"
        )
        self.args = [
            "--listen", f"{RELAY_IP}:{self.port}", "--data", str(data),
            "--config", str(self.config), *SERVE_WITHOUT_DNS,
            "--domain", "a.test", "--relay-network", "127.0.0.0/8",
            "--delivery-port", str(sink.port), "--dns-server", dns.nameserver,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def log(self) -> Path:
        return self.data.parent / f"serve-{self.runs}.log"

    def start(self) -> Relay:
        self.runs += 1
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ehlo", "serve", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=self.data.parent,
                start_new_session=True,  # its own process group: the workers too
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        proc = self.proc
        assert proc is not None

        def ready() -> bool:
            assert proc.poll() is None, f"ehlo serve exited: {self.log.read_text()}"
            try:
                with socket.create_connection((RELAY_IP, self.port), timeout=2.0) as sock:
                    sock.settimeout(5.0)
                    return sock.recv(4).startswith(b"220")
            except OSError:
                return False

        wait_until(ready, f"ehlo serve to greet: {self.log}", timeout=30.0, poll=0.05)

    def kill(self) -> None:
        """SIGKILL to the supervisor and every worker: no shutdown code runs anywhere."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def submit(self, seqs: range) -> dict[str, int]:
        return submit(RELAY_IP, self.port, seqs)


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[Callable[[DNSServer, CountingSink], Relay]]:
    made: list[Relay] = []

    def make(dns: DNSServer, sink: CountingSink) -> Relay:
        relay = Relay(tmp_path / "data", dns, sink)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.close()


def test_sigkill_with_deliveries_in_flight_loses_nothing(
    dns: DNSServer,
    counting_sink: Callable[..., CountingSink],
    relays: Callable[[DNSServer, CountingSink], Relay],
) -> None:
    total = 500
    sink = counting_sink(delay=0.01)
    relay = relays(dns, sink).start()
    ids = relay.submit(range(total))
    # Some delivered, not all, and a message on its way: kill everything at once.
    wait_until(
        lambda: sink.count() >= 100 and sink.at_rcpt > 0,
        "100 messages at the sink and one more on its way",
        timeout=60.0,
    )
    relay.kill()
    at_kill = queue_rows(relay.data)
    assert len(at_kill) == total  # every accepted message has its queue entry
    in_flight = {ids[q] for q, (state, _, _) in at_kill.items() if state == "delivering"}
    delivered = {ids[q] for q, (state, _, _) in at_kill.items() if state == "delivered"}
    seen_at_kill = Counter(sink.seqs())
    assert delivered and len(delivered) < total, Counter(s for s, _, _ in at_kill.values())
    assert in_flight, "no delivery was in flight at the kill"
    # Everything the database calls delivered did reach the sink.
    assert delivered <= set(seen_at_kill)

    relay.start()
    wait_until(
        lambda: states(relay.data) == {"delivered": total},
        lambda: f"every entry delivered after the restart: {states(relay.data)}",
        timeout=60.0,
    )
    seen = Counter(sink.seqs())
    missing = set(range(total)) - set(seen)
    assert not missing, f"lost after SIGKILL: {sorted(missing)}"
    duplicates = {seq for seq, n in seen.items() if n > 1}
    assert duplicates <= in_flight, sorted(duplicates - in_flight)
    # Delivered before the kill: never again.
    assert all(seen[seq] == 1 for seq in delivered)
    recovered = f"{len(in_flight)} recipients were in flight at the last stop; queued again"
    assert recovered in relay.log.read_text()
    print(
        f"\n{len(delivered)} delivered and {len(in_flight)} delivering at the kill,"
        f" {len(duplicates)} delivered twice"
    )


def test_graceful_restart_never_delivers_twice(
    dns: DNSServer,
    counting_sink: Callable[..., CountingSink],
    relays: Callable[[DNSServer, CountingSink], Relay],
) -> None:
    total = 200
    sink = counting_sink(delay=0.01)
    relay = relays(dns, sink).start()
    ids = relay.submit(range(total))
    wait_until(lambda: sink.count() >= 20, "20 messages at the sink", timeout=60.0)
    # SIGTERM with deliveries under way: they finish, the rest waits in the queue.
    assert relay.terminate() == 0, relay.log.read_text()
    at_stop = queue_rows(relay.data)
    delivered = {ids[q] for q, (state, _, _) in at_stop.items() if state == "delivered"}
    assert delivered and len(delivered) < total, Counter(s for s, _, _ in at_stop.values())
    assert sorted(sink.seqs()) == sorted(delivered)  # what reached the sink, and only that
    # Deliveries under way finished within the grace; what was waiting is queued again.
    assert "delivering" not in {s for s, _, _ in at_stop.values()}, Counter(
        s for s, _, _ in at_stop.values()
    )

    relay.start()
    wait_until(
        lambda: states(relay.data) == {"delivered": total},
        lambda: f"every entry delivered after the restart: {states(relay.data)}",
        timeout=60.0,
    )
    assert sorted(sink.seqs()) == list(range(total)), Counter(sink.seqs()).most_common(3)


# --------------------------------------------------------------- in this test's loop


Start = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """In-loop relays on RELAY_IP; ``start(name, ...)`` twice reuses the data folder."""
    running: list[Server] = []

    async def run(name: str, **overrides: Any) -> Server:
        for server in list(running):  # the previous run on this folder stops first
            if Path(server.config.data_dir) == tmp_path / name:
                running.remove(server)
                await server.stop(timeout=5.0)
        config = make_config(
            tmp_path / name,
            listen=(Listen(RELAY_IP, 0),),
            hostname="mx.a.test",
            mta_sts=False,
            **{**PRODUCTION_WRITER, **overrides},  # the queue as ``ehlo serve`` writes it
        )
        server = Server(config)
        await server.start()
        running.append(server)
        return server

    yield run
    for server in running:
        await server.stop(timeout=1.0)


def server_rows(server: Server) -> dict[str, tuple[str, int, float]]:
    queue = server.store.queue
    assert queue is not None
    return {e.queue_id: (e.state, e.attempts, e.next_attempt) for e in queue.entries()}


async def test_deferred_mail_resumes_on_schedule_after_restart(
    start: Start, dns: DNSServer, counting_sink: Callable[..., CountingSink], tmp_path: Path
) -> None:
    sink = counting_sink(refuse=True)
    options = relay_options(dns, sink.port, retry_min=6.0, retry_max=6.0)
    a = await start("a", **options)
    ids = await asyncio.to_thread(submit, *a.addresses[0], range(5))
    await until(
        lambda: {s for s, n, _ in server_rows(a).values()} == {"deferred"},
        what="every entry deferred",
    )
    await a.stop(timeout=5.0)
    stopped_at = time.time()
    deferred = queue_rows(tmp_path / "a")
    assert len(deferred) == 5
    assert {state for state, _, _ in deferred.values()} == {"deferred"}
    assert all(attempts >= 1 for _, attempts, _ in deferred.values())
    # The delay is retry_min (6 s, with jitter): still ahead when the server is back.
    assert all(stopped_at < when for _, _, when in deferred.values()), (stopped_at, deferred)

    sink.refuse = False
    a = await start("a", **options)
    assert time.time() < min(when for _, _, when in deferred.values()), "restart too slow"
    await until(
        lambda: {s for s, _, _ in server_rows(a).values()} == {"delivered"},
        timeout=40.0,
        what="every entry delivered",
    )
    arrivals = sink.arrivals()
    assert sorted(arrivals) == [0, 1, 2, 3, 4]
    after = server_rows(a)
    for queue_id, (_, attempts, next_attempt) in deferred.items():
        [arrived] = arrivals[ids[queue_id]]
        assert arrived >= next_attempt, (queue_id, arrived, next_attempt)
        assert after[queue_id][1] == attempts + 1  # the count kept across the restart


async def test_connections_are_reused_within_the_per_destination_limit(
    start: Start, dns: DNSServer, counting_sink: Callable[..., CountingSink]
) -> None:
    total = 200
    sink = counting_sink(delay=0.005)  # slower than the senders: the line grows
    a = await start("a", **relay_options(dns, sink.port, delivery_per_destination=2))
    await asyncio.to_thread(submit, *a.addresses[0], range(total))
    await until(
        lambda: {s for s, _, _ in server_rows(a).values()} == {"delivered"},
        timeout=60.0,
        what="every entry delivered",
    )
    assert sorted(sink.seqs()) == list(range(total))
    # Fewer than one connection per 10 messages, never more than 2 at once.
    assert 1 <= sink.connections < total / 10, sink.connections
    assert sink.most_open <= 2, sink.most_open
    # Connections carried several messages, a new MAIL (or RSET) between them.
    per_connection = [c.count("DATA") for c in sink.commands.values()]
    assert sum(per_connection) == total
    assert max(per_connection) >= 10, per_connection
    for commands in sink.commands.values():
        assert commands.count("MAIL") == commands.count("DATA"), commands
    print(
        f"\n{total} messages over {sink.connections} connections"
        f" (at most {sink.most_open} at once): {per_connection}"
    )
