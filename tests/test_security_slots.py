"""Connection slots: idle connections must not lock real clients out.

At ``max_connections`` the connection idle longest outside a transaction is
closed with 421 4.4.2 to admit a newcomer; connections in a transaction are
never closed for it. Past ``stress_threshold`` of the limit, idle
connections time out after ``stress_timeout``. The file-descriptor limit is
raised to fit the connections, or the limit lowered with a warning. Real
servers on loopback, real clients bound to 127.0.x.y source addresses.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import resource
import smtplib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ehlo.server import Server
from ehlo.server.abuse import SharedCounters

from .helpers import (
    Client,
    ThreadedServer,
    async_wait_until,
    connect,
    make_config,
    read_line,
    read_until_closed,
    transaction,
)
from .test_security_abuse import Serve, Start

pytestmark = pytest.mark.timeout(120)

EVICTED = b"421 4.4.2 localhost Idle connection closed to admit another client\r\n"
TOO_MANY = b"421 4.7.0 Too many connections, try again later\r\n"


@pytest.fixture
def many_files() -> Iterator[None]:
    """This process may open as many files as its hard limit allows (restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2300:
        pytest.skip(f"needs 2,300 file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_silent_connections_at_the_limit_make_room_for_a_real_client(
    tmp_path: Path, many_files: None
) -> None:
    """1,000 silent connections from 100 addresses fill max_connections; a client still mails."""
    config = make_config(
        tmp_path / "data",
        max_connections=1000,
        max_connections_per_ip=10,
        stress_timeout=300.0,  # only eviction makes room here, however slow the machine
    )
    srv = ThreadedServer(config).start()
    silent: list[socket.socket] = []
    try:
        for n in range(1000):
            sock = socket.create_connection(
                (srv.host, srv.port), timeout=10, source_address=(f"127.0.2.{n // 10 + 1}", 0)
            )
            silent.append(sock)
            assert read_line(sock).startswith(b"220 "), n
        # The per-IP cap still holds for a newcomer: nothing is closed for it.
        with socket.create_connection(
            (srv.host, srv.port), timeout=10, source_address=("127.0.2.1", 0)
        ) as over:
            assert read_line(over) == b"421 4.7.0 Too many connections from your address," \
                b" try again later\r\n"
        began = time.monotonic()
        with smtplib.SMTP(srv.host, srv.port, timeout=10,
                          source_address=("127.0.3.1", 0)) as client:
            client.ehlo("legit.example")
            assert client.mail("a@example.net")[0] == 250
            assert client.rcpt("b@example.org")[0] == 250
            code, _ = client.data(b"Subject: served\r\n\r\nhello\r\n")
            elapsed = time.monotonic() - began
        assert code == 250
        assert elapsed < 1.0, f"the transaction took {elapsed:.3f} s"
        # The longest idle (the first one opened) made room, with 421 4.4.2.
        assert read_until_closed(silent[0], 10) == EVICTED
        ctx = srv.server.ctx if srv.server is not None else None
        assert ctx is not None
        assert srv.call(lambda: ctx.evictions) == 1
        print(f"1,000 silent connections: transaction in {elapsed * 1000:.1f} ms, 1 eviction")
    finally:
        for sock in silent:
            sock.close()
        srv.stop()


async def _in_transaction(server: Server, clients: list[Client], source: str) -> Client:
    client = await connect(server, clients, banner=False, source=source)
    assert (await client.reply()).code == 220
    await client.ehlo()
    await transaction(client)
    return client


async def _greeted(server: Server, clients: list[Client], source: str) -> Client:
    client = await connect(server, clients, banner=False, source=source)
    assert (await client.reply()).code == 220
    await client.ehlo()
    return client


async def test_connections_in_a_transaction_are_never_evicted(
    start: Start, clients: list[Client]
) -> None:
    server = await start(max_connections=4, max_connections_per_ip=10)
    ctx = server.ctx
    assert ctx is not None
    # Three transactions (one of them in DATA), opened before the idle one:
    # they have been idle longer, but they are not idle between transactions.
    mail = await _in_transaction(server, clients, "127.0.4.1")
    body = await _in_transaction(server, clients, "127.0.4.2")
    assert (await body.cmd("DATA")).code == 354
    body.send(b"Subject: slow\r\n\r\nhalf a body\r\n")
    await body.writer.drain()
    also = await _in_transaction(server, clients, "127.0.4.3")
    idle = await _greeted(server, clients, "127.0.4.4")

    newcomer = await connect(server, clients, banner=False, source="127.0.4.5")
    r = await newcomer.reply()
    assert r.code == 220, r
    r = await idle.reply()
    assert (r.code, r.enhanced, r.raw) == (421, "4.4.2", EVICTED), r
    await idle.expect_eof()
    assert ctx.evictions == 1

    await newcomer.ehlo()
    await transaction(newcomer)
    # Every slot now holds a transaction: the next client is refused as before.
    refused = await connect(server, clients, banner=False, source="127.0.4.6")
    r = await refused.reply()
    assert r.raw == TOO_MANY, r
    await refused.expect_eof()
    assert ctx.evictions == 1

    # The transactions were never disturbed.
    body.send(b".\r\n")
    assert (await body.reply()).code == 250
    for client in (mail, also, newcomer):
        assert (await client.cmd("DATA")).code == 354
        assert (await client.cmd("Subject: t\r\n\r\nbody\r\n.")).code == 250


async def test_stress_mode_shortens_the_idle_timeout(
    start: Start, clients: list[Client], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ehlo.server")
    server = await start(max_connections=10, stress_threshold=0.8, stress_timeout=1.0)
    ctx = server.ctx
    assert ctx is not None
    # 7 of 10 (below 80%): the normal command timeout (300 s) holds.
    calm = [await _greeted(server, clients, "127.0.5.1") for _ in range(7)]
    assert not ctx.stress
    with pytest.raises(TimeoutError):
        await calm[0].reply(timeout=2.5)
    for client in calm:
        assert (await client.cmd("NOOP")).code == 250
    # The 8th reaches the high-water mark: idle connections get the stress timeout.
    late = await _greeted(server, clients, "127.0.5.1")
    assert ctx.stress
    began = time.monotonic()
    # Time is under test: the others were active half a second later (more than one sweep of the
    # timeout checker, which runs every stress_timeout / 4), so the late one
    # is alone in being due first.
    await asyncio.sleep(0.5)
    for client in calm:
        assert (await client.cmd("NOOP")).code == 250
    r = await late.reply(timeout=15)
    waited = time.monotonic() - began
    assert (r.code, r.enhanced) == (421, "4.4.2"), r
    assert 0.8 < waited < 15, waited
    # 7 of 10 is the low-water mark (80% less the 10% hysteresis): stress mode ends.
    await async_wait_until(lambda: not ctx.stress, "the end of stress mode", 15, poll=0.05)
    # Normal timeouts again: the others outlive the stress timeout.
    with pytest.raises(TimeoutError):
        await calm[0].reply(timeout=2.5)
    for client in calm:
        assert (await client.cmd("NOOP")).code == 250
    messages = [r.getMessage() for r in caplog.records if r.name == "ehlo.server"]
    assert len([m for m in messages if m.startswith("stress mode:")]) == 1, messages
    assert len([m for m in messages if m.startswith("stress mode ended")]) == 1, messages


def _worker_counters(workers: int) -> list[SharedCounters]:
    """One SharedCounters per simulated worker: the same shared memory, its own row."""
    shared = SharedCounters(workers, 600.0)
    rows = []
    for index in range(workers):
        mine = copy.copy(shared)
        mine.connections = copy.copy(shared.connections)
        mine.connection_rate = copy.copy(shared.connection_rate)
        mine.auth_failures = copy.copy(shared.auth_failures)
        mine.bind(index)
        rows.append(mine)
    return rows


async def test_under_workers_only_a_worker_with_an_idle_connection_evicts(
    tmp_path: Path, clients: list[Client]
) -> None:
    """The limit is global; each worker closes only its own idle connections."""
    first_counts, second_counts = _worker_counters(2)
    config = make_config(tmp_path / "data", max_connections=4, store="null")
    first = Server(config, shared_counters=first_counts)
    second = Server(config, shared_counters=second_counts)
    await first.start()
    await second.start()
    try:
        idle = [await _greeted(first, clients, f"127.0.6.{n}") for n in (1, 2)]
        busy = [await _in_transaction(second, clients, f"127.0.6.{n}") for n in (3, 4)]
        assert first_counts.connections.total() == 4
        # The worker whose connections are all in a transaction refuses.
        refused = await connect(second, clients, banner=False, source="127.0.6.5")
        assert (await refused.reply()).raw == TOO_MANY
        # The worker with idle connections closes its longest idle one.
        admitted = await connect(first, clients, banner=False, source="127.0.6.6")
        assert (await admitted.reply()).code == 220
        assert (await idle[0].reply()).raw == EVICTED
        assert (await idle[1].cmd("NOOP")).code == 250
        assert first.ctx is not None and second.ctx is not None
        assert (first.ctx.evictions, second.ctx.evictions) == (1, 0)
        assert second_counts.connections.total() == 4
        for client in busy:
            assert (await client.cmd("RSET")).code == 250
    finally:
        await first.stop(timeout=1.0)
        await second.stop(timeout=1.0)


def _soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-files limit")


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(("hard", "workers"), [(4096, "1"), (512, "1"), (512, "2")])
def test_file_descriptor_limit_is_raised_or_the_connection_limit_lowered(
    tmp_path: Path, hard: int, workers: str, serve_with_limit: Callable[..., Serve]
) -> None:
    server = serve_with_limit(256, hard, "--workers", workers)
    log = server.log.read_text()
    if hard >= 1000 + 128:
        # Enough room below the hard limit: the soft limit is raised, no warning.
        assert _soft_nofile(server.proc.pid) == 1128
        assert "file descriptor limit" not in log, log
    else:
        # Too low even at the hard limit: one warning (not one per worker),
        # and the limit is what fits (512 minus the reserve of 128).
        assert _soft_nofile(server.proc.pid) == hard
        warnings = [line for line in log.splitlines() if "file descriptor limit" in line]
        assert len(warnings) == 1, log
        assert "allows about 384 connections" in warnings[0], warnings
        if workers != "1":
            return  # which worker closes which connection is the kernel's choice
        socks = []
        try:
            answers = []
            for n in range(386):  # two past the lowered limit
                sock = socket.create_connection(
                    ("127.0.0.1", server.port), timeout=10,
                    source_address=(f"127.0.7.{n % 200 + 1}", 0),
                )
                socks.append(sock)
                answers.append(read_line(sock)[:3])
            assert answers.count(b"220") == 386, answers[-5:]
            # Past 384 the connection idle longest made room (not an EMFILE).
            assert read_until_closed(socks[0], 10)[:9] == b"421 4.4.2"
        finally:
            for sock in socks:
                sock.close()


@pytest.fixture
def serve_with_limit(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    """``ehlo serve`` (max_connections = 1000) started under a given RLIMIT_NOFILE."""
    started: list[Serve] = []

    def run(soft: int, hard: int, *args: str) -> Serve:
        def limit() -> None:  # in the child: lowering a hard limit is for good
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        started.append(
            Serve(tmp_path, "--store", "null", *args, total=1000, per_ip=1000, preexec=limit)
        )
        return started[-1]

    yield run
    for proc in started:
        proc.stop()
