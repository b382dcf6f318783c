"""Repeated greetings: bounded memory, counted as junk, and no stray DNS tasks.

A client may send EHLO again at any time (RFC 5321 section 4.1.4), and each
greeting starts the greeting checks in the background. These tests check
that a flood of greetings on one connection neither grows the server (an
``ehlo serve`` child process whose RSS is read from /proc) nor escapes the
junk-command limit, that a session greeting twice (STARTTLS) or leaving
while its lookups are pending against a DNS server that never answers
leaves no "Task exception was never retrieved" traceback in the log, and
that a session remembers only the first and the latest greeting name.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from ehlo import Server
from ehlo.dns import DNSCache, Resolver
from ehlo.greeting import run_checks
from ehlo.greeting._checks import Greeting

from . import greeting_zone as zone
from .dnsserver import DNSServer
from .helpers import READ_TIMEOUT, Client, client_tls, connect, free_port

greeting_dns = zone.greeting_dns

DEADLINE = 60.0  # seconds any one of these sessions may take, on the old code too
GROWTH_LIMIT_MIB = 20.0
# Past this growth the server is stopped at once: the test has failed, and a
# server growing by gigabytes must not take the machine down with it.
ABORT_MIB = 300.0
BATCH = 10_000
BATCHES = 4
SOURCE_N = 41  # the client's address 127.0.0.41, greeting with its own name


class ServeProcess:
    """``ehlo serve --workers 1`` in a child process: one worker, whose RSS is its own."""

    def __init__(self, tmp_path: Path, *args: str, config: str = "") -> None:
        self.port = free_port()
        self.log = tmp_path / f"serve-{self.port}.log"
        toml = tmp_path / f"ehlo-{self.port}.toml"
        toml.write_text(f"max_connection_rate = 0\nlimits_exempt = []\n{config}")
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ehlo",
                    "serve",
                    "--workers",
                    "1",
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--data",
                    str(tmp_path / "data"),
                    "--store",
                    "null",
                    "--hostname",
                    "mx.ehlo.test",
                    "--config",
                    str(toml),
                    *args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(4) == b"220 ":
                        return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise AssertionError(f"ehlo serve did not start: {self.text()}")

    def rss_mib(self) -> float:
        """The worker's resident memory (VmRSS) in MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise KeyError("VmRSS")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM and wait (the log is then complete)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(15)


@contextlib.contextmanager
def serving(tmp_path: Path, *args: str, config: str = "") -> Iterator[ServeProcess]:
    server = ServeProcess(tmp_path, *args, config=config)
    try:
        yield server
    finally:
        server.kill()


def checks_on(dns: str, timeout: str = "0.5") -> tuple[str, ...]:
    """Options for greeting checks (record policy) asking ``dns``, nothing trusted."""
    return (
        "--helo-policy",
        "record",
        "--dns-server",
        dns,
        "--dns-timeout",
        timeout,
        "--no-reverse-dns",
    )


class Flood:
    """One connection writing pipelined EHLOs while a thread reads every reply."""

    def __init__(self, port: int, name: str, batches: int, batch: int, then: bytes) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=DEADLINE, source_address=(zone.client_ip(SOURCE_N), 0)
        )
        self.received = bytearray()
        self.payload = f"EHLO {name}\r\n".encode() * batch
        self.batches = batches
        self.then = then
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer = threading.Thread(target=self._write, daemon=True)

    def start(self) -> Flood:
        self._reader.start()
        self._writer.start()
        return self

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(1 << 16):
                self.received += chunk

    def _write(self) -> None:
        # The server may close after its 421 while we still write: that ends the flood.
        with contextlib.suppress(OSError):
            for _ in range(self.batches):
                self.sock.sendall(self.payload)
            self.sock.sendall(self.then)

    @property
    def done(self) -> bool:
        return not self._reader.is_alive()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(10)
        self._writer.join(10)

    def lines(self) -> list[str]:
        return bytes(self.received).decode("utf-8", "replace").split("\r\n")


def warm_up(server: ServeProcess, name: str) -> None:
    """A few greeting sessions, so that the baseline has every code path loaded."""
    for _ in range(3):
        flood = Flood(server.port, name, 1, 50, b"QUIT\r\n").start()
        deadline = time.monotonic() + DEADLINE
        while not flood.done and time.monotonic() < deadline:
            time.sleep(0.02)
        flood.close()
        assert flood.lines()[-2].startswith("221 "), flood.lines()[-3:]


@pytest.mark.parametrize(
    ("config", "answered"),
    [
        ("", 101),  # max_junk_commands 100 by default: the first greeting and 100 more
        ("max_junk_commands = 0\n", BATCH * BATCHES),  # no limit: every greeting answered
    ],
    ids=["junk-limit", "no-limit"],
)
def test_forty_thousand_pipelined_ehlos_keep_the_worker_flat(
    tmp_path: Path, greeting_dns: DNSServer, config: str, answered: int
) -> None:
    name = zone.match_name(SOURCE_N)
    with serving(tmp_path, *checks_on(greeting_dns.nameserver), config=config) as server:
        warm_up(server, name)
        baseline = peak = server.rss_mib()
        flood = Flood(server.port, name, BATCHES, BATCH, b"QUIT\r\n").start()
        began = time.monotonic()
        try:
            while not flood.done:
                peak = max(peak, server.rss_mib())
                if peak - baseline > ABORT_MIB or time.monotonic() - began > DEADLINE:
                    server.kill()
                    break
                time.sleep(0.02)
        finally:
            flood.close()
        if server.proc.poll() is None:
            peak = max(peak, server.rss_mib())
        elapsed = time.monotonic() - began
        print(
            f"{BATCH * BATCHES} EHLOs: RSS {baseline:.1f} MiB before, "
            f"peak {peak:.1f} MiB, {elapsed:.1f} s"
        )
        growth = peak - baseline
        assert growth < GROWTH_LIMIT_MIB, f"RSS grew by {growth:.1f} MiB in {elapsed:.1f} s"
        lines = flood.lines()
        finals = [line for line in lines if line[:4] in ("250 ", "421 ", "221 ")]
        assert finals[:answered] == [finals[0]] * answered, finals[:3]
        assert finals[0].startswith("250 ")
        if answered < BATCH * BATCHES:
            # RFC 5321 section 4.1.4 allows the repeat, so it is answered 250; but
            # each one moves no mail, so the junk limit ends the session with 421.
            assert finals[answered:] == [
                "421 Too many commands that move no mail, closing connection"
            ], finals[answered - 1 :][:3]
        else:
            assert finals[answered:] == ["221 2.0.0 mx.ehlo.test closing connection"]
        assert "Traceback" not in server.text()


class SilentDNS:
    """A loopback UDP socket that reads queries and never answers them."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.received = 0
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received += 1
            self.last = time.monotonic()

    def wait_quiet(self, quiet: float, limit: float = DEADLINE) -> None:
        """Wait until no query came for ``quiet`` seconds (every lookup has given up)."""
        deadline = time.monotonic() + limit
        while time.monotonic() - self.last < quiet:
            assert time.monotonic() < deadline, "the server kept asking"
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def silent_dns() -> Iterator[SilentDNS]:
    server = SilentDNS()
    try:
        yield server
    finally:
        server.close()


def no_verify() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def starttls_session(port: int, source: str) -> None:
    """EHLO, STARTTLS, EHLO again (RFC 3207 section 4.2), QUIT: two greetings."""
    with smtplib.SMTP(
        "127.0.0.1", port, local_hostname="client.lost.test", timeout=15, source_address=(source, 0)
    ) as client:
        assert client.ehlo()[0] == 250
        assert client.starttls(context=no_verify())[0] == 220
        assert client.ehlo()[0] == 250


def leaving_session(port: int, source: str) -> None:
    """EHLO, then the client leaves at once, its greeting's lookups pending."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=15, source_address=(source, 0)
    ) as sock:
        assert sock.recv(1024).startswith(b"220 ")
        sock.sendall(b"EHLO client.lost.test\r\n")
        reply = b""
        while not reply.endswith(b"\r\n") or reply.split(b"\r\n")[-2][3:4] == b"-":
            chunk = sock.recv(4096)
            assert chunk, reply
            reply += chunk
        assert reply.startswith(b"250")


def test_pending_lookups_leave_no_traceback(tmp_path: Path, silent_dns: SilentDNS) -> None:
    sessions = 6
    with serving(tmp_path, *checks_on(silent_dns.nameserver), "--log-level", "DEBUG") as server:
        for n in range(sessions // 2):
            starttls_session(server.port, zone.client_ip(100 + n))
            leaving_session(server.port, zone.client_ip(110 + n))
        deadline = time.monotonic() + DEADLINE
        while server.text().count(" disconnect ") < sessions:
            assert time.monotonic() < deadline, server.text()
            time.sleep(0.05)
        assert silent_dns.received > 0  # the lookups were asked, and never answered
        # Every lookup gives up within the DNS timeout (0.5 s) and its backstop (1 s).
        silent_dns.wait_quiet(2.5)
        assert server.stop() == 0
        log = server.text()
    assert "Task exception was never retrieved" not in log, log
    assert "Task was destroyed but it is pending" not in log, log
    assert "Traceback" not in log, log
    # Besides the session's own events, at most one line about its lookups.
    usual = ("connect", "greeting", "tls", "disconnect")
    for n in range(sessions // 2):
        for source in (zone.client_ip(100 + n), zone.client_ip(110 + n)):
            own = re.compile(rf" ({'|'.join(usual)}) session=\S+ {re.escape(source)}:")
            other = [
                line for line in log.splitlines() if f"{source}:" in line and not own.search(line)
            ]
            assert len(other) <= 1, other


async def test_repeated_greetings_count_as_junk_but_not_the_one_after_tls(
    start: Callable[..., Awaitable[Server]], clients: list[Client]
) -> None:
    server = await start(max_junk_commands=3)
    c = await connect(server, clients)
    assert (await c.ehlo()).code == 250  # the first greeting: no junk
    # RFC 5321 section 4.1.4: greeting again is allowed (250), and counted.
    assert (await c.cmd("HELO again.example")).code == 250  # 1
    assert (await c.cmd("EHLO again.example")).code == 250  # 2
    assert (await c.cmd("STARTTLS")).code == 220
    await asyncio.wait_for(c.writer.start_tls(client_tls()), READ_TIMEOUT)
    # RFC 3207 section 4.2: the greeting after TLS is required, so not counted.
    assert (await c.cmd("EHLO tls.example")).code == 250
    assert (await c.cmd("NOOP")).code == 250  # 3
    r = await c.cmd("EHLO tls.example")  # 4: past the limit
    assert (r.code, r.text) == (421, "Too many commands that move no mail, closing connection")
    await c.expect_eof()


# ------------------------------------------------------------- unit level


def test_greeting_names_keep_the_first_and_the_latest_only() -> None:
    from ehlo.greeting import GreetingNames

    names = GreetingNames()
    assert names.previous == ()
    for n in range(10_000):
        names.add(f"h{n}.example.test")
    assert names.previous == ("h0.example.test", "h9999.example.test")
    assert len(GreetingNames.__slots__) == 2  # nothing that could grow
    again = GreetingNames()
    again.add("same.example.test")
    again.add("same.example.test")
    assert again.previous == ("same.example.test",)


@pytest.mark.parametrize(
    "greetings",
    [
        ["a.example.test"],
        ["a.example.test", "a.example.test"],
        ["a.example.test", "b.example.test"],
        ["a.example.test", "b.example.test", "a.example.test"],
        ["a.example.test", "A.Example.Test.", "a.example.test"],
        ["a.example.test", "b.example.test", "b.example.test"],
        ["a.example.test", "a.example.test", "b.example.test"],
    ],
)
async def test_consistent_check_same_as_with_every_name(greetings: list[str]) -> None:
    """For two or three greetings the first and the latest are every earlier name."""
    from ehlo.greeting import GreetingNames

    resolver = Resolver(["127.0.0.1:9"], 0.5, cache=DNSCache())  # never asked
    names = GreetingNames()
    for name in greetings[:-1]:
        names.add(name)
    last = greetings[-1]
    bounded = Greeting("EHLO", last, "192.0.2.1", previous_names=names.previous)
    every = Greeting("EHLO", last, "192.0.2.1", previous_names=tuple(greetings[:-1]))
    got = (await run_checks(bounded, resolver, checks=["consistent"]))["consistent"]
    want = (await run_checks(every, resolver, checks=["consistent"]))["consistent"]
    assert got.result == want.result
    assert got.reason == want.reason
    assert set(got.evidence.get("previous", [])) == set(want.evidence.get("previous", []))
