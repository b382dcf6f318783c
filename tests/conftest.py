"""Shared fixtures: a real ehlo server on 127.0.0.1 with a real store.

Only fixtures and pytest hooks live here; the helpers they use (raw SMTP
clients, tool runners, config builders, waiting on conditions) are in
``tests/helpers.py``, where test files import them from. The names below
imported from there are re-exported for test files not yet switched over.

Also the guard that keeps the suite off the machine's own DNS resolver (see
``tests/dnsguard/sitecustomize.py``): active in this process and, through
``PYTHONPATH``, in every Python subprocess; a test during which any process
configured a resolver from /etc/resolv.conf fails.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from ehlo import Server

from .dnsguard.sitecustomize import GUARD_LOG_ENV, install
from .dovecot import Dovecot, dovecot_available, run_dovecot
from .helpers import (
    SERVE_WITHOUT_DNS,
    ThreadedServer,
    free_port,
    ipv6_loopback,
    make_config,
    require,
)
from .pgserver import PgCluster, PgError, pg_bin

__all__ = [
    "SERVE_WITHOUT_DNS",
    "ThreadedServer",
    "free_port",
    "ipv6_loopback",
    "make_config",
    "require",
]

DNS_GUARD_DIR = Path(__file__).parent / "dnsguard"
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


def _compile_sources() -> None:
    """Bytecode for the package and the tests' helpers, written once for the whole run.

    The suite starts hundreds of Python children (``ehlo serve``, ``ehlo
    messages``, ``ehlo send``, writer processes, and every child imports the DNS
    guard above). Where ``PYTHONDONTWRITEBYTECODE`` is set, none of them writes
    the bytecode it compiles, so each compiles every module it imports again: a
    fifth of a second or more of CPU per start. compileall writes it anyway;
    the children read it (a source changed later makes its file stale, and
    Python compiles that module as before). A folder it cannot write is left
    as it is.
    """
    import compileall

    import ehlo

    for folder in (Path(ehlo.__file__).parent, Path(__file__).parent):
        compileall.compile_dir(folder, quiet=2)


_compile_sources()


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


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """A running server (sqlite store, self-signed TLS) in this test's event loop."""
    srv = Server(make_config(tmp_path / "data"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(timeout=1.0)


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


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    """A real Dovecot LMTP server on loopback and a Unix socket (see ``tests/dovecot.py``)."""
    require(dovecot_available(), "dovecot and dovecot-lmtpd are not installed (make test-deps)")
    with run_dovecot() as server:
        yield server


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One throwaway PostgreSQL for the session (``tests/pgserver.py``), started on first use."""
    require(pg_bin() is not None, "PostgreSQL is not installed (make test-deps)")
    cluster = PgCluster()
    try:
        cluster.init().start()
    except PgError:
        cluster.destroy()
        raise
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A libpq URL of an empty database of this test's own (on the Unix socket)."""
    if not pg_cluster.running:  # a test before this one stopped it and failed
        pg_cluster.start()
    return pg_cluster.url(pg_cluster.create_database())
