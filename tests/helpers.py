"""Test helpers: raw SMTP clients, tool runners, config builders, waiting on conditions.

Everything a test file imports to talk to a server or to build one lives
here; ``conftest.py`` holds only the fixtures (and the DNS guard), which use
these helpers.

- Raw SMTP clients that write exactly the bytes given and parse replies
  themselves: :class:`Client` (asyncio streams, with STARTTLS) and
  :class:`BlockingClient` (a blocking socket, for tests that run a server in
  a thread or a subprocess), both reading :class:`Reply` objects; and the
  bare-socket readers :func:`read_line` and :func:`read_until_closed`.
- Tools and facilities: :func:`require` and :func:`tool` skip a test without
  them, or fail it when CI is set; :func:`ipv6_loopback`, :func:`free_port`.
- Config builders: :func:`make_config`, ``SERVE_WITHOUT_DNS`` for ``ehlo
  serve`` subprocesses, :class:`ThreadedServer` for blocking clients.
- :func:`wait_until` and :func:`async_wait_until`: bounded polling of a
  condition, instead of sleeping for a guessed time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ehlo import Listen, ProtocolLimits, Server, ServerConfig
from ehlo.config import GreetingConfig

READ_TIMEOUT = 5.0  # seconds: the longest any reply may take
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3}) ")


# ------------------------------------------------------------- waiting


Described = str | Callable[[], str]  # what is awaited, or how to say it at the time


def _describe(what: Described) -> str:
    return what if isinstance(what, str) else what()


def wait_until(
    condition: Callable[[], object], what: Described, timeout: float = 20.0, poll: float = 0.02
) -> None:
    """Poll ``condition()`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {_describe(what)}"
        time.sleep(poll)


async def async_wait_until(
    condition: Callable[[], object], what: Described, timeout: float = 20.0, poll: float = 0.01
) -> None:
    """:func:`wait_until` in an event loop, which runs while the condition is false.

    ``condition`` may be a coroutine function (a check that talks to a server).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {_describe(what)}"
        await asyncio.sleep(poll)


def child_pids(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc)."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def process_age(pid: int) -> float:
    """Seconds since process ``pid`` started, as the kernel counts them (Linux /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    start_ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22, starttime
    since_boot = float(Path("/proc/uptime").read_text().split()[0])
    return since_boot - start_ticks / os.sysconf("SC_CLK_TCK")


def sleep_until_older_than(pids: list[int], seconds: float) -> None:
    """Sleep until every process of ``pids`` has run ``seconds`` (a time span under test).

    Counted from each process's start, not from when a test first saw it: a
    process that took long to come up waits only what is left.
    """
    time.sleep(max(0.0, seconds - min(process_age(pid) for pid in pids)))


def greets(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server on ``port`` accepts a connection and sends a 220 banner."""
    try:
        with socket.create_connection((host, port), timeout=2.0) as sock:
            sock.settimeout(5.0)
            return sock.recv(4).startswith(b"220")
    except OSError:
        return False


def wait_for_banner(
    port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0
) -> None:
    """Wait until ``ehlo serve`` (``proc``, logging to ``log``) greets on ``port``.

    Fails at once, with the log, if the process exits first.
    """

    def ready() -> bool:
        assert proc.poll() is None, f"ehlo serve exited: {log.read_text()}"
        return greets(port)

    wait_until(ready, f"ehlo serve to greet on port {port}: {log}", timeout, poll=0.05)


# ------------------------------------------------------------- replies


@dataclasses.dataclass
class Reply:
    """One SMTP reply as read off the wire."""

    code: int
    enhanced: str | None
    lines: list[str]  # the text of each line, without code and separator
    raw: bytes

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def wire(self) -> list[str]:
        """Each line as sent, code and separator included, without CRLF."""
        return self.raw.decode("utf-8").split("\r\n")[:-1]

    @property
    def last(self) -> str:
        """The last line as sent (``250 2.0.0 OK ...``)."""
        return self.wire[-1]


def parse_reply(raw: bytes) -> Reply:
    """A complete reply (one or more CRLF-ended lines), checked for a well-formed shape."""
    lines = raw.decode("utf-8").split("\r\n")[:-1]
    code = int(lines[0][:3])
    for i, line in enumerate(lines):
        assert line[:3] == str(code), raw
        assert line[3:4] == ("-" if i < len(lines) - 1 else " "), raw
    texts = [line[4:] for line in lines]
    found = _ENHANCED.match(texts[0])
    enhanced = None
    if found:
        enhanced = found.group(0).strip()
        assert enhanced[0] == str(code)[0]
    return Reply(code, enhanced, texts, raw)


def reply_end(buf: bytes) -> int:
    """Where the first complete reply in ``buf`` ends (0 while it is incomplete)."""
    pos = 0
    while True:
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return 0
        if buf[pos + 3 : pos + 4] != b"-":
            return end + 2
        pos = end + 2


def codes(replies: list[Reply]) -> list[tuple[int, str | None]]:
    return [(r.code, r.enhanced) for r in replies]


def queued_id(r: Reply) -> str:
    """The queue id in a 250 reply to the end of a message."""
    assert r.code == 250, r
    found = re.search(r"queued as (\S+)", r.text)
    assert found, r
    return found.group(1)


def client_tls() -> ssl.SSLContext:
    """A client TLS context that accepts the server's self-signed certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ReplyReader:
    """Splits a byte stream into SMTP replies."""

    def __init__(self, read: Callable[[], Awaitable[bytes]]) -> None:
        self._read = read
        self._buf = b""

    async def reply(self, timeout: float = READ_TIMEOUT) -> Reply:
        async with asyncio.timeout(timeout):
            while True:
                end = reply_end(self._buf)
                if end:
                    raw, self._buf = self._buf[:end], self._buf[end:]
                    return parse_reply(raw)
                data = await self._read()
                if not data:
                    raise EOFError(f"connection closed; pending {self._buf!r}")
                self._buf += data

    async def line(self, timeout: float = READ_TIMEOUT) -> str:
        """One line, without its CRLF, whatever reply it belongs to."""
        async with asyncio.timeout(timeout):
            while (end := self._buf.find(b"\r\n")) < 0:
                data = await self._read()
                if not data:
                    raise EOFError(f"connection closed; pending {self._buf!r}")
                self._buf += data
        raw, self._buf = self._buf[:end], self._buf[end + 2 :]
        return raw.decode("utf-8")

    @property
    def pending(self) -> bytes:
        return self._buf


# ------------------------------------------------------------- raw clients


class Client:
    """A raw SMTP client over asyncio streams: exactly the bytes given, bounded reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.replies = ReplyReader(lambda: reader.read(65536))

    @classmethod
    async def open(
        cls, host: str, port: int, *, source: str | None = None, banner: bool = True
    ) -> Client:
        """Connect (from the address ``source`` when given); read the 220 banner unless told."""
        local = (source, 0) if source is not None else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=local), READ_TIMEOUT
        )
        client = cls(reader, writer)
        if banner:
            r = await client.reply()
            assert r.code == 220, r
        return client

    @classmethod
    async def connect(
        cls,
        server: Server,
        banner: bool = True,
        *,
        source: str | None = None,
        host: str | None = None,
    ) -> Client:
        """:meth:`open` to ``server``'s first listener (or its listener on ``host``)."""
        host, port = next(a for a in server.addresses if host is None or a[0] == host)
        return await cls.open(host, port, source=source, banner=banner)

    def send(self, data: bytes | str) -> None:
        self.writer.write(data.encode("utf-8") if isinstance(data, str) else data)

    async def reply(self, timeout: float = READ_TIMEOUT) -> Reply:
        return await self.replies.reply(timeout)

    async def cmd(self, line: bytes | str) -> Reply:
        """Send one line (CRLF added) and read its reply."""
        self.send((line.encode("utf-8") if isinstance(line, str) else line) + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def ehlo(self, name: str = "client.example") -> Reply:
        r = await self.cmd(f"EHLO {name}")
        assert r.code == 250, r
        return r

    async def starttls(self, ctx: ssl.SSLContext | None = None) -> None:
        """STARTTLS, then the handshake on this connection."""
        r = await self.cmd("STARTTLS")
        assert r.code == 220, r
        await asyncio.wait_for(self.writer.start_tls(ctx or client_tls()), READ_TIMEOUT)

    async def expect_eof(self, timeout: float = READ_TIMEOUT) -> None:
        """The server closes the connection (with nothing more to say)."""
        assert self.replies.pending == b""
        data = await asyncio.wait_for(self.reader.read(65536), timeout)
        assert data == b"", data

    def close(self) -> None:
        self.writer.close()


async def connect(
    server: Server, clients: list[Client], banner: bool = True, source: str | None = None
) -> Client:
    """A :class:`Client` to ``server``, closed at the end of the test (``clients`` fixture)."""
    client = await Client.connect(server, banner, source=source)
    clients.append(client)
    return client


async def transaction(c: Client, rcpts: tuple[str, ...] = ("b@example.net",)) -> None:
    """MAIL and RCPT (to each of ``rcpts``), each accepted, on a greeted connection."""
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    for rcpt in rcpts:
        assert (await c.cmd(f"RCPT TO:<{rcpt}>")).code == 250


class BlockingClient:
    """A raw SMTP client on a blocking socket: exactly the bytes given, bounded reads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    @classmethod
    def open(
        cls,
        port: int,
        *,
        host: str = "127.0.0.1",
        source: str | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = 10.0,
        banner: bool = True,
    ) -> BlockingClient:
        """Connect (with the TLS handshake first when ``tls`` is given) and read the banner."""
        address = (source, 0) if source is not None else None
        sock = socket.create_connection((host, port), timeout=timeout, source_address=address)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=server_hostname)
        client = cls(sock)
        if banner:
            r = client.reply()
            assert r.code == 220, r
        return client

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode("utf-8") if isinstance(data, str) else data)

    def reply(self) -> Reply:
        while not (end := reply_end(self.buf)):
            data = self.sock.recv(65536)
            assert data, f"connection closed; pending {self.buf!r}"
            self.buf += data
        raw, self.buf = self.buf[:end], self.buf[end:]
        return parse_reply(raw)

    def cmd(self, line: bytes | str) -> Reply:
        self.send((line.encode("utf-8") if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def starttls(
        self, ctx: ssl.SSLContext | None = None, server_hostname: str | None = None
    ) -> None:
        """STARTTLS, then the handshake on this socket."""
        r = self.cmd("STARTTLS")
        assert (r.code, r.enhanced) == (220, "2.0.0"), r
        assert self.buf == b""
        self.sock = (ctx or client_tls()).wrap_socket(self.sock, server_hostname=server_hostname)

    @property
    def tls(self) -> ssl.SSLSocket:
        assert isinstance(self.sock, ssl.SSLSocket)
        return self.sock

    def close(self) -> None:
        self.sock.close()


def read_line(sock: socket.socket) -> bytes:
    """One line (up to LF) without reading past it."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line


def read_until_closed(sock: socket.socket, limit: float = 20.0) -> bytes:
    """Everything the peer still sends until it closes (each read bounded by ``limit``)."""
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


# ------------------------------------------------------------- tools and facilities


def require(ok: bool, reason: str) -> None:
    """Skip a test whose tool or facility is missing here; under CI, fail it instead.

    A CI machine is set up to run every test: there a missing tool (strace,
    haproxy, smtp-source...) or facility (IPv6 loopback, /proc, file
    descriptors) is a broken setup, which a skip would hide.
    """
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI is set: the CI machine must provide it")
    pytest.skip(reason)


def tool(name: str) -> str:
    """The path of an external tool (swaks, openssl, smtp-source, postfix's tools...).

    Without it the test skips, or fails when CI is set.
    """
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed but CI is set: run `make test-deps`")
        pytest.skip(f"{name} is not installed (make test-deps installs it)")
    return path


def ipv6_loopback() -> bool:
    """Whether this machine can listen on ::1 (IPv6 tests skip otherwise)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------- config builders


# ``ehlo serve`` options for a subprocess that must not look anything up: no
# reverse DNS, no greeting checks; and no web UI (its default address,
# 127.0.0.1:8025, is one for the whole machine). Put first, so that a test's
# own ``--helo-policy ... --dns-server`` or ``--http HOST:PORT`` still wins.
SERVE_WITHOUT_DNS = ("--no-reverse-dns", "--helo-policy", "off", "--no-http")


# ``make_config`` overrides for a server with the SQLite writer ``ehlo serve``
# runs by default: a process of its own.
PRODUCTION_WRITER: dict[str, Any] = {"sqlite_writer": "process"}


def make_config(data_dir: Path, **overrides: Any) -> ServerConfig:
    """A test config: loopback port 0, data in ``data_dir``, no DNS lookups, overrides."""
    limits = overrides.pop("limits", None)
    limit_fields = {f.name for f in dataclasses.fields(ProtocolLimits)}
    limit_overrides = {k: overrides.pop(k) for k in list(overrides) if k in limit_fields}
    base_limits = limits if limits is not None else ProtocolLimits()
    if limit_overrides:
        base_limits = dataclasses.replace(base_limits, **limit_overrides)
    # No greeting checks and no reverse DNS unless a test asks for them (with
    # the loopback DNS server as ``dns_servers``): deterministic headers, and
    # never the machine's resolver.
    overrides.setdefault("greeting", GreetingConfig(policy="off"))
    overrides.setdefault("reverse_dns", False)
    # Tests connect from loopback, which the per-IP limits exempt by default:
    # no exemption here, so that a test's per-IP limit applies; no rate limit
    # unless a test asks (many tests open many connections quickly).
    overrides.setdefault("limits_exempt", ())
    overrides.setdefault("max_connection_rate", 0)
    # The SQLite writer in a thread of this process unless a test asks for
    # "process" (the default of ``ehlo serve``): a writer process is a Python
    # start-up (about half a second) for each server, and most tests here are
    # about the protocol, not where the commits run. The writer process keeps
    # its own tests (tests/test_storage.py's store fixture, its death and its
    # signals), every ``ehlo serve`` subprocess of the suite uses it, and the
    # modules about what a 250 means ask for it (PRODUCTION_WRITER).
    overrides.setdefault("sqlite_writer", "thread")
    return ServerConfig(
        listen=overrides.pop("listen", (Listen("127.0.0.1", 0),)),
        data_dir=data_dir,
        limits=base_limits,
        **overrides,
    )


class ThreadedServer:
    """A server running in its own thread and loop, for blocking clients (smtplib, swaks)."""

    def __init__(self, config: ServerConfig, **kwargs: Any) -> None:
        self.config = config
        self.kwargs = kwargs
        self.loop = asyncio.new_event_loop()
        self.server: Server | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = Server(self.config, **self.kwargs)
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> ThreadedServer:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    @property
    def host(self) -> str:
        assert self.server is not None
        return self.server.addresses[0][0]

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.addresses[0][1]

    def call(self, func: Callable[[], Any]) -> Any:
        """Run ``func`` in the server's loop thread and return its result."""
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            try:
                box.append(func())
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(10)
        return box[0] if box else None

    def stop(self) -> None:
        if self.server is not None and self.loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self.server.stop(timeout=1.0), self.loop)
            fut.result(15)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(15)
