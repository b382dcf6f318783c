"""Shared fixtures: a real ehlo server on 127.0.0.1 with a real store.

Also the guard that keeps the suite off the machine's own DNS resolver (see
``tests/dnsguard/sitecustomize.py``): active in this process and, through
``PYTHONPATH``, in every Python subprocess; a test during which any process
configured a resolver from /etc/resolv.conf fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from ehlo import Listen, ProtocolLimits, Server, ServerConfig
from ehlo.config import GreetingConfig

from .dnsguard.sitecustomize import GUARD_LOG_ENV, install

DNS_GUARD_DIR = Path(__file__).parent / "dnsguard"
# ``ehlo serve`` options for a subprocess that must not look anything up: no
# reverse DNS, no greeting checks. Put first, so that a test's own
# ``--helo-policy ... --dns-server`` (the loopback DNS server) still wins.
SERVE_WITHOUT_DNS = ("--no-reverse-dns", "--helo-policy", "off")
_dns_offences: list[str] = []


def _start_dns_guard() -> tuple[Path, bool]:
    """Refuse the system resolver here and in subprocesses: their log file, made here?"""
    install(_dns_offences.append)
    made = not os.environ.get(GUARD_LOG_ENV)
    if made:
        handle, name = tempfile.mkstemp(prefix="ehlo-dns-guard-", suffix=".log")
        os.close(handle)
        os.environ[GUARD_LOG_ENV] = name
    paths = [str(DNS_GUARD_DIR), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return Path(os.environ[GUARD_LOG_ENV]), made


_DNS_GUARD_LOG, _DNS_GUARD_LOG_MADE = _start_dns_guard()
_dns_reported = 0


def dns_guard_offences() -> list[str]:
    """Uses of the system resolver so far: this process's, then the subprocesses'."""
    try:
        logged = _DNS_GUARD_LOG.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        logged = []
    return [*_dns_offences, *logged]


@pytest.fixture(autouse=True)
def no_system_dns() -> Iterator[None]:
    """Fail the test if it (or a process it started) configured the system resolver."""
    global _dns_reported
    before = len(dns_guard_offences())
    yield
    found = dns_guard_offences()[before:]
    _dns_reported += len(found)
    if found:
        pytest.fail(
            "the machine's DNS resolver was used; ask tests/dnsserver.py or turn lookups off:\n"
            + "\n".join(found),
            pytrace=False,
        )


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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "needs(ok, reason): the test needs a tool or facility; without it (ok false)"
        " it skips, or fails under CI",
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run for a use of the system resolver outside any test (a shared fixture)."""
    unreported = len(dns_guard_offences()) - _dns_reported
    if unreported > 0:
        print("\nthe machine's DNS resolver was used outside a test:", file=sys.stderr)
        for line in dns_guard_offences()[-unreported:]:
            print(line, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if _DNS_GUARD_LOG_MADE:
        _DNS_GUARD_LOG.unlink(missing_ok=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.needs(ok, reason=...)``: :func:`require` before the test's fixtures."""
    for mark in item.iter_markers(name="needs"):
        require(bool(mark.args[0]), str(mark.kwargs.get("reason", "a tool or facility missing")))


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
    return ServerConfig(
        listen=overrides.pop("listen", (Listen("127.0.0.1", 0),)),
        data_dir=data_dir,
        limits=base_limits,
        **overrides,
    )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """A running server (sqlite store, self-signed TLS) in this test's event loop."""
    srv = Server(make_config(tmp_path / "data"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(timeout=1.0)


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


@pytest.fixture
def threaded_server(tmp_path: Path) -> Iterator[Callable[..., ThreadedServer]]:
    """Start servers in background threads: ``threaded_server(**config_overrides)``."""
    started: list[ThreadedServer] = []

    def start(**overrides: Any) -> ThreadedServer:
        kwargs = {k: overrides.pop(k) for k in ("store", "hooks") if k in overrides}
        data = overrides.pop("data_dir", tmp_path / f"data{len(started)}")
        srv = ThreadedServer(make_config(data, **overrides), **kwargs).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    """Start in-loop servers with config overrides; all stopped at the end.

    The n-th server started keeps its data in ``tmp_path / f"data{n}"``.
    """
    servers: list[Server] = []

    async def run(**overrides: Any) -> Server:
        server = Server(make_config(tmp_path / f"data{len(servers)}", **overrides))
        await server.start()
        servers.append(server)
        return server

    yield run
    for server in servers:
        await server.stop(timeout=1.0)


class _Closable(Protocol):
    def close(self) -> None: ...


@pytest.fixture
async def clients() -> AsyncIterator[list[Any]]:
    """Clients to close at the end of a test (append them)."""
    opened: list[_Closable] = []
    yield opened
    for client in opened:
        client.close()
