"""Abuse resistance, over TCP: clients that talk early, pipeline without
permission, trickle, linger, flood, or try to make the server hold memory.

Each test drives a real server with a raw client that misbehaves in one way
and checks the exact reply and that the connection is dropped (or served)
as documented. The memory and idle-connection tests run ``ehlo serve`` in a
child process so its RSS can be read from /proc.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from ehlo.server import Server
from ehlo.server.abuse import (
    AuthGuard,
    SharedConnectionCounts,
    SharedCounters,
    SharedWindowCounter,
)
from ehlo.storage import open_store

from .helpers import (
    READ_TIMEOUT,
    Client,
    child_pids,
    codes,
    connect,
    free_port,
    queued_id,
    read_line,
    read_until_closed,
    require,
    sleep_until_older_than,
    wait_for_banner,
    wait_until,
)

Start = Callable[..., Awaitable[Server]]


# ------------------------------------------------------------ early talkers


async def test_early_talker_gets_554_and_is_dropped(
    start: Start, clients: list[Client]
) -> None:
    server = await start(greeting_delay=0.5)
    c = await connect(server, clients, banner=False)
    # RFC 5321 section 3.1: the client must wait for the 220 greeting.
    c.send(b"EHLO impatient.example\r\nMAIL FROM:<spam@example.net>\r\n")
    r = await c.reply()
    assert (r.code, r.text) == (554, "5.5.0 Protocol error: you talked before the greeting")
    await c.expect_eof()
    # A patient client gets the banner once the delay is over.
    began = time.monotonic()
    patient = await connect(server, clients, banner=False)
    assert (await patient.reply()).code == 220
    assert time.monotonic() - began >= 0.45
    await patient.ehlo()


# ------------------------------------------------------- pipelining abuse


async def test_pipelining_before_the_greeting_reply_rejected(
    start: Start, clients: list[Client]
) -> None:
    server = await start(pipelining_violation="reject")
    c = await connect(server, clients)
    # RFC 2920 section 3.1: EHLO may only end a group; PIPELINING is not yet known.
    c.send(b"EHLO bulk.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n")
    r = await c.reply()
    # With its enhanced code: the EHLO being answered offers ENHANCEDSTATUSCODES.
    assert (r.code, r.enhanced) == (554, "5.5.0"), r
    assert r.text.startswith("5.5.0 Protocol error: commands sent without waiting")
    await c.expect_eof()


async def test_unadvertised_pipelining_after_helo_rejected(
    start: Start, clients: list[Client]
) -> None:
    server = await start(pipelining_violation="reject")
    c = await connect(server, clients)
    assert (await c.cmd("HELO plain.example")).code == 250
    # HELO offers no extensions: PIPELINING was never advertised.
    c.send(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n")
    assert (await c.reply()).code == 554
    await c.expect_eof()


async def test_advertised_pipelining_is_fine_and_violations_are_recorded(
    start: Start, clients: list[Client]
) -> None:
    server = await start(pipelining_violation="reject")
    c = await connect(server, clients)
    await c.ehlo()
    c.send(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    assert codes([await c.reply() for _ in range(3)]) == [
        (250, "2.1.0"), (250, "2.1.5"), (354, None)]
    assert queued_id(await c.cmd(b"Subject: ok\r\n\r\nfine\r\n."))
    # In "record" mode the same violation is served and noted in the envelope.
    recorder = await start(pipelining_violation="record")
    c2 = await connect(recorder, clients)
    c2.send(b"EHLO bulk.example\r\nMAIL FROM:<a@example.net>\r\n")
    assert (await c2.reply()).code == 250
    assert (await c2.reply()).code == 250
    assert (await c2.cmd("RCPT TO:<b@example.org>")).code == 250
    assert (await c2.cmd("DATA")).code == 354
    qid = queued_id(await c2.cmd(b"Subject: noted\r\n\r\nx\r\n."))
    stored = recorder.store.get(qid)
    assert stored is not None and stored.envelope.extra["violations"] == ["pipelining"]


# ---------------------------------------------------------- rates and time


async def test_connection_rate_per_ip(start: Start, clients: list[Client]) -> None:
    server = await start(max_connection_rate=5)
    for _ in range(5):
        c = await connect(server, clients, banner=False)
        assert (await c.reply()).code == 220
        c.close()
    refused = await connect(server, clients, banner=False)
    r = await refused.reply()
    assert (r.code, r.enhanced) == (421, "4.7.0") and "per minute" in r.text
    await refused.expect_eof()
    other = await connect(server, clients, banner=False, source="127.0.0.3")
    assert (await other.reply()).code == 220


async def test_trickled_command_cannot_hold_the_session(
    start: Start, clients: list[Client]
) -> None:
    server = await start(command_timeout=0.6)
    c = await connect(server, clients)
    await c.ehlo()
    began = time.monotonic()
    # One byte every 0.15 s: the line never completes within the timeout. A
    # server that restarts its timer on every byte would wait forever.
    reply = None
    for byte in b"NOOP" + b"x" * 60:
        c.send(bytes([byte]))
        try:
            reply = await asyncio.wait_for(c.reply(), 0.15)
            break
        except TimeoutError:
            continue
    assert reply is not None, "the server kept waiting for the trickled line"
    assert (reply.code, reply.enhanced) == (421, "4.4.2")
    assert time.monotonic() - began < 3.0


async def test_session_time_cap(start: Start, clients: list[Client]) -> None:
    server = await start(max_session_time=1.0)
    c = await connect(server, clients)
    await c.ehlo()
    began = time.monotonic()
    while time.monotonic() - began < 5.0:
        r = await c.cmd("MAIL FROM:<a@example.net>")
        if r.code == 421:
            break
        assert r.code == 250
        assert (await c.cmd("RSET")).code == 250
        # Time itself is under test: commands keep coming while the cap runs out.
        await asyncio.sleep(0.1)
    assert codes([r]) == [(421, "4.4.2")]
    assert 0.9 <= time.monotonic() - began < 3.0


async def test_junk_command_limit(start: Start, clients: list[Client]) -> None:
    server = await start(max_junk_commands=5)
    c = await connect(server, clients)
    await c.ehlo()
    for verb in ("NOOP", "RSET", "VRFY x", "HELP", "NOOP"):
        assert (await c.cmd(verb)).code < 400
    assert codes([await c.cmd("NOOP")]) == [(421, "4.7.0")]
    await c.expect_eof()


async def test_ten_thousand_pipelined_commands_in_one_write(
    start: Start, clients: list[Client]
) -> None:
    server = await start(max_recipients=100)
    c = await connect(server, clients)
    await c.ehlo()
    assert (await c.cmd("MAIL FROM:<a@example.net>")).code == 250
    burst = b"".join(b"RCPT TO:<r%d@example.org>\r\n" % i for i in range(10_000))
    c.send(burst + b"RSET\r\n")
    await c.writer.drain()
    got = [await c.reply() for _ in range(10_001)]
    # RFC 5321 section 4.5.3.1.10: recipients beyond the limit get 452, in order.
    assert [r.code for r in got[:100]] == [250] * 100
    assert {(r.code, r.enhanced) for r in got[100:10_000]} == {(452, "4.5.3")}
    assert got[-1].code == 250
    assert (await c.cmd("NOOP")).code == 250


async def test_bdat_chunk_over_the_size_limit(start: Start, clients: list[Client]) -> None:
    server = await start(max_message_size=10_000)
    c = await connect(server, clients)
    await c.ehlo()
    assert (await c.cmd("MAIL FROM:<a@example.net>")).code == 250
    assert (await c.cmd("RCPT TO:<b@example.org>")).code == 250
    # RFC 3030 section 2: the chunk is read whole, then refused (RFC 1870: 552).
    c.send(b"BDAT 30000 LAST\r\n" + b"x" * 30_000)
    assert codes([await c.reply()]) == [(552, "5.3.4")]
    assert server.store.list() == []
    assert codes([await c.cmd("NOOP")]) == [(250, "2.0.0")]


# -------------------------------------------- memory and idle connections


class Serve:
    """``ehlo serve`` in a child process (null store unless told), with its RSS."""

    def __init__(
        self,
        tmp_path: Path,
        *args: str,
        total: int = 2000,
        per_ip: int = 2000,
        rate: int = 0,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.port = free_port()
        self.log = tmp_path / "serve.log"
        config = tmp_path / "ehlo.toml"
        config.write_text(
            f"max_connections = {total}\nmax_connections_per_ip = {per_ip}\n"
            f"limits_exempt = []\nmax_connection_rate = {rate}\n"
        )
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ehlo", "serve", "--listen", f"127.0.0.1:{self.port}",
                 "--data", str(tmp_path / "data"), "--no-reverse-dns", "--no-tls",
                 "--helo-policy", "off", "--config", str(config), "--log-level", "WARNING",
                 *args],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, preexec_fn=preexec,
            )
        wait_for_banner(self.port, self.proc, self.log, 20)

    def status(self, key: str) -> int:
        """A /proc/PID/status figure in KiB (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def run(*args: str, **limits: int) -> Serve:
        started.append(Serve(tmp_path, *args, **limits))
        return started[-1]

    yield run
    for proc in started:
        proc.stop()


def _greet(sock: socket.socket) -> None:
    sock.settimeout(10)
    assert sock.recv(1024).startswith(b"220")
    sock.sendall(b"EHLO attacker.example\r\n")
    data = b""
    while not data.endswith(b"250 CHUNKING\r\n"):
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk


def test_memory_stays_bounded_under_hostile_input(serve: Callable[..., Serve]) -> None:
    """A 50 MB line, endless headers, a huge BDAT and 10,000 pipelined commands."""
    server = serve("--store", "null")
    baseline = server.status("VmRSS")
    megabyte = b"A" * (1024 * 1024)

    # 1. 50 MB without CRLF as a command line: 500 5.5.2 once, the rest dropped.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        _greet(sock)
        for _ in range(50):
            sock.sendall(megabyte)
        sock.sendall(b"\r\nQUIT\r\n")
        out = read_until_closed(sock)
        assert out.startswith(b"500 5.5.2 Line too long\r\n"), out[:200]
        assert out.endswith(b"221 2.0.0 localhost closing connection\r\n"), out[-200:]

    # 2. Endless headers inside DATA (40 MB of header lines): refused as too
    # large after the end of data (RFC 1870 section 6.3), never held in memory.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        _greet(sock)
        sock.sendall(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        header_block = b"X-Header: " + b"h" * 80 + b"\r\n"
        chunk = header_block * (1024 * 1024 // len(header_block))
        for _ in range(40):
            sock.sendall(chunk)
        sock.sendall(b"\r\nbody\r\n.\r\nQUIT\r\n")
        out = read_until_closed(sock)
        assert b"552 5.3.4 Message size exceeds fixed maximum message size" in out, out[-300:]

    # 3. BDAT announcing 10^15 octets, then 30 MB of it: read and discarded.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        _greet(sock)
        sock.sendall(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n"
                     b"BDAT 1000000000000000 LAST\r\n")
        for _ in range(30):
            sock.sendall(megabyte)
        sock.shutdown(socket.SHUT_WR)
        out = read_until_closed(sock)
        assert out.count(b"250 ") >= 2, out

    # 4. 10,000 pipelined commands in one write, replies not read until the end.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        _greet(sock)
        burst = b"MAIL FROM:<a@example.net>\r\n" + b"".join(
            b"RCPT TO:<r%d@example.org>\r\n" % i for i in range(10_000)) + b"QUIT\r\n"
        sock.sendall(burst)
        out = read_until_closed(sock)
        assert out.count(b"\r\n") == 10_002, out[-200:]
        assert out.endswith(b"221 2.0.0 localhost closing connection\r\n")

    peak = server.status("VmHWM")
    growth_mib = (peak - baseline) / 1024
    print(f"hostile input: RSS {baseline / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB")
    # A server holding any of those inputs whole would grow by 30-50 MiB or more.
    assert growth_mib < 20, f"peak RSS grew by {growth_mib:.1f} MiB"
    assert server.stop() == 0


def test_idle_connections_do_not_starve_a_real_client(serve: Callable[..., Serve]) -> None:
    """1,000 connections sit idle after EHLO; a fresh client still gets its 250 quickly."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    require(hard >= 2500, f"needs 2,500 file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2500), hard))
    try:
        server = serve("--store", "sqlite", "--workers", "1")  # its RSS holds the connections
        before = server.status("VmRSS")
        idle: list[socket.socket] = []
        try:
            for i in range(1000):
                sock = socket.create_connection(
                    ("127.0.0.1", server.port), source_address=(f"127.0.1.{i % 200 + 1}", 0)
                )
                idle.append(sock)
                _greet(sock)
            held = server.status("VmRSS")
            began = time.monotonic()
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                client.ehlo("legit.example")
                refused = client.sendmail("a@example.net", ["b@example.org"],
                                          b"Subject: still served\r\n\r\nhello\r\n")
                code, _ = client.noop()
            elapsed = time.monotonic() - began
            assert refused == {} and code == 250
            assert elapsed < 1.0, f"the fresh transaction took {elapsed:.3f} s"
            per_connection_kib = (held - before) / 1000
            print(f"1,000 idle: {per_connection_kib:.2f} KiB each"
                  f" ({per_connection_kib * 10_000 / 1024:.1f} MiB for the default 10,000);"
                  f" fresh transaction {elapsed * 1000:.1f} ms")
            assert per_connection_kib < 20, per_connection_kib
            # Every idle connection is still open and answers.
            for sock in idle[::100]:
                sock.sendall(b"NOOP\r\n")
                assert sock.recv(100).startswith(b"250")
        finally:
            for sock in idle:
                sock.close()
        assert server.stop() == 0
        # Read as the CLI does: no writer started.
        assert len(open_store("sqlite", server.log.parent / "data").list()) == 1
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))




# ------------------------------------- connection limits across worker processes


def _open_and_greet(port: int, source: str = "127.0.0.1") -> tuple[socket.socket, bytes]:
    """A connection and its first reply line (220, or 421 when over a limit)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT,
                                    source_address=(source, 0))
    return sock, read_line(sock)[:3]


def _open_transaction(sock: socket.socket) -> None:
    """EHLO and MAIL on a greeted connection (raw, one reply line at a time)."""
    sock.sendall(b"EHLO busy.example\r\n")
    while not read_line(sock).startswith(b"250 "):
        pass
    sock.sendall(b"MAIL FROM:<a@example.net>\r\n")
    assert read_line(sock).startswith(b"250 ")


def _worker_pids(serve: Serve, count: int) -> list[int]:
    wait_until(lambda: len(child_pids(serve.proc.pid)) == count, f"{count} worker processes")
    return child_pids(serve.proc.pid)


@pytest.mark.needs(Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_per_ip_limit_holds_across_workers(serve: Callable[..., Serve]) -> None:
    # Each of two workers counting alone would let up to six of these in.
    server = serve("--workers", "2", "--store", "null", per_ip=3)
    socks = []
    try:
        answers = []
        for _ in range(8):
            sock, code = _open_and_greet(server.port)
            socks.append(sock)
            answers.append(code)
        assert answers.count(b"220") == 3 and answers.count(b"421") == 5, answers
        # A closed connection frees its place, whichever worker had it.
        for sock, code in zip(socks, answers, strict=True):
            if code == b"220":
                sock.close()
                break
        def admitted() -> bool:
            sock, code = _open_and_greet(server.port)
            socks.append(sock)
            return code == b"220"

        wait_until(admitted, "the freed place to admit a connection", 5, poll=0.05)
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.needs(Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_total_limit_holds_across_workers_and_a_restarted_worker_starts_at_zero(
    serve: Callable[..., Serve],
) -> None:
    server = serve("--workers", "2", "--store", "null", total=4)
    workers = _worker_pids(server, 2)
    # The supervisor's crash-loop guard is a span of time: only a wait gets past it.
    sleep_until_older_than(workers, 2.5)
    socks = []
    try:
        answers = []
        for n in range(8):  # from eight addresses: only the total limit applies
            sock, code = _open_and_greet(server.port, f"127.0.0.{n + 1}")
            socks.append(sock)
            answers.append(code)
            if code == b"220":
                _open_transaction(sock)  # not idle: never closed to admit another
        assert answers.count(b"220") == 4, answers
        # Both workers die with their connections; their restarted selves
        # must not inherit the dead ones' counts.
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        for sock in socks:
            sock.close()
        socks.clear()
        wait_until(
            lambda: len([p for p in child_pids(server.proc.pid) if p not in workers]) == 2,
            "the supervisor to restart both workers",
        )
        answers = []

        def answered() -> bool:
            try:
                sock, code = _open_and_greet(server.port, f"127.0.1.{len(answers) + 1}")
            except OSError:
                return False  # the new workers are still starting
            socks.append(sock)
            answers.append(code)
            return len(answers) == 4

        wait_until(answered, "four answers from the restarted workers", poll=0.05)
        assert answers == [b"220"] * 4
    finally:
        for sock in socks:
            sock.close()


def test_shared_counts_add_up_the_rows_of_every_worker() -> None:
    counts = SharedConnectionCounts(workers=2)
    counts.bind(0)
    counts.add("192.0.2.1")
    counts.add("192.0.2.1")
    counts.add("2001:db8::1")
    pid = os.fork()
    if pid == 0:  # another worker, in its own process
        try:
            counts.bind(1)
            counts.add("192.0.2.1")
            counts.add("198.51.100.7")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert counts.count("192.0.2.1") == 3
    assert counts.count("198.51.100.7") == 1
    assert counts.count("203.0.113.9") == 0
    assert counts.total() == 5
    counts.remove("192.0.2.1")
    assert counts.count("192.0.2.1") == 2 and counts.total() == 4
    counts.reset(1)  # worker 1 died: its connections went with it
    assert counts.count("192.0.2.1") == 1
    assert counts.count("198.51.100.7") == 0
    assert counts.count("2001:db8::1") == 1
    assert counts.total() == 2
    with pytest.raises(ValueError):
        counts.bind(2)


def test_shared_counts_never_count_too_few() -> None:
    # With few cells, addresses share them: counts may be too high, never too low,
    # and with the default size they are exact for a few hundred addresses.
    rng = random.Random(6)
    addresses = [f"10.0.{i // 250}.{i % 250}" for i in range(300)]
    for slots, exact in ((7, False), (1 << 16, True)):
        counts = SharedConnectionCounts(workers=3, slots=slots)
        truth: dict[tuple[int, str], int] = {}
        for _ in range(3000):
            row, ip = rng.randrange(3), rng.choice(addresses)
            counts.bind(row)
            if truth.get((row, ip)) and rng.random() < 0.4:
                counts.remove(ip)  # a connection this worker admitted closes
                truth[row, ip] -= 1
            else:
                counts.add(ip)
                truth[row, ip] = truth.get((row, ip), 0) + 1
        for ip in addresses:
            held = sum(truth.get((row, ip), 0) for row in range(3))
            assert counts.count(ip) >= held
            if exact:
                assert counts.count(ip) == held
        assert counts.total() == sum(truth.values())


@pytest.mark.needs(Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_connection_rate_holds_across_workers(serve: Callable[..., Serve]) -> None:
    # The rate windows follow the clock's minutes: wait (time itself) to stay in one.
    if time.monotonic() % 60 > 40:
        time.sleep(60.5 - time.monotonic() % 60)
    server = serve("--workers", "2", "--store", "null", rate=3)
    answers = []
    for _ in range(6):
        sock, code = _open_and_greet(server.port)
        sock.close()
        answers.append(code)
    # The first of the three allowed this minute was Serve's readiness check.
    assert answers == [b"220"] * 2 + [b"421"] * 4


def test_shared_window_counter_adds_up_workers_within_a_window() -> None:
    rate = SharedWindowCounter(workers=2, window=60.0)
    now = 6000.0  # the start of a window
    rate.bind(0)
    assert rate.hit("192.0.2.1", now) == 1
    assert rate.hit("192.0.2.1", now + 1) == 2
    pid = os.fork()
    if pid == 0:
        try:
            rate.bind(1)
            rate.hit("192.0.2.1", now + 2)
            rate.hit("198.51.100.7", now + 2)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert rate.count("192.0.2.1", now + 3) == 3
    assert rate.count("198.51.100.7", now + 3) == 1
    assert rate.count("192.0.2.1", now + 60) == 0  # the next window
    assert rate.hit("192.0.2.1", now + 61) == 1  # worker 0's cell starts again; worker 1's is stale
    rate.reset(0)
    assert rate.count("192.0.2.1", now + 61) == 0


def test_auth_lockout_counts_failures_of_every_worker() -> None:
    failures = SharedWindowCounter(workers=2, window=300.0)
    guard = AuthGuard(max_failures=3, lockout=300.0, delay=0.5, failures=failures)
    now = 3000.0
    failures.bind(0)
    assert guard.failed("192.0.2.1", now) == (0.5, False)
    pid = os.fork()
    if pid == 0:
        try:
            failures.bind(1)
            guard.failed("192.0.2.1", now + 1)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert not guard.locked("192.0.2.1", now + 2)
    assert guard.failed("192.0.2.1", now + 2) == (1.5, True)  # the third, wherever the others were
    assert guard.locked("192.0.2.1", now + 3)
    assert not guard.locked("192.0.2.1", now + 300)  # the next window


def test_shared_window_counter_never_counts_too_few() -> None:
    rng = random.Random(7)
    keys = [f"10.1.{i // 250}.{i % 250}" for i in range(300)]
    for slots, exact in ((5, False), (1 << 14, True)):
        rate = SharedWindowCounter(workers=3, window=10.0, slots=slots)
        truth: dict[tuple[int, str], int] = {}  # (window, key) -> events
        now = 0.0
        for _ in range(3000):
            now += rng.random() * 0.05
            rate.bind(rng.randrange(3))
            key = rng.choice(keys)
            rate.hit(key, now)
            window = int(now // 10)
            truth[window, key] = truth.get((window, key), 0) + 1
        window = int(now // 10)
        for key in keys:
            assert rate.count(key, now) >= truth.get((window, key), 0)
            if exact:
                assert rate.count(key, now) == truth.get((window, key), 0)


@pytest.mark.parametrize("lockout", [0.0, 0.001, 600.0])
def test_shared_counters_take_any_lockout_the_configuration_allows(lockout: float) -> None:
    shared = SharedCounters(workers=2, auth_lockout=lockout)
    shared.bind(1)
    guard = AuthGuard(max_failures=2, lockout=lockout, delay=0.0, failures=shared.auth_failures)
    now = 10.0**9  # a long uptime: window numbers beyond 32 bits wrap, never fail
    guard.failed("192.0.2.1", now)
    _, locked = guard.failed("192.0.2.1", now)
    assert locked is (lockout > 0)  # with 0 s, each failure's window is over at once
