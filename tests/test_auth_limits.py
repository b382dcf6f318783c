"""AUTH under load and attack: bounded password checks, per-account lockout, IPv6 /64 keys.

Real servers on loopback (in-process, and ``ehlo serve`` as a child
process for SIGTERM), real clients (raw sockets and aiosmtplib bound to
127.0.0.x source addresses), real Argon2id. A users file written with a
fixed PHC string (made once by an earlier version of ehlo) needs no hashing
to set up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiosmtplib
import pytest

from ehlo import Listen
from ehlo.auth import UserStore
from ehlo.server import Server, abuse

from .helpers import (
    SERVE_WITHOUT_DNS,
    Client,
    async_wait_until,
    codes,
    free_port,
    ipv6_loopback,
    wait_for_banner,
)
from .test_security_auth import plain

Start = Callable[..., Awaitable[Server]]

EHLO = Path(sys.executable).with_name("ehlo")

# Argon2id (RFC 9106 second recommended option) of "pw" and of BOB_PW.
ALICE_PHC = (
    "$argon2id$v=19$m=65536,t=3,p=4$Ln5Hbmu09bvekigVgeUzoA"
    "$kUIO1wLaXYAmP94AiW2eQ3RGibLpK9BFdvoGlFysz/Q"
)
BOB_PHC = (
    "$argon2id$v=19$m=65536,t=3,p=4$3Q3S0znNFetlazJa2RvDHg"
    "$OQGqvrDTuqNKtOIsNw6l1usJ0ksN5szhlnUIXdkm+Uw"
)
BOB_PW = "bob's pw"
USERS = f"alice:{ALICE_PHC}\nbob:{BOB_PHC}\n"
# And of CAROL_PW, for the third account of ``ehlo serve``.
CAROL_PHC = (
    "$argon2id$v=19$m=65536,t=3,p=4$krH8Vm7UBiUY+ztX7LMwqw"
    "$wfnf6SNwEhw1+IIZYSbvpnYQYU3LwQ84nSCdAthnpPw"
)
CAROL_PW = "carol is right"
SERVE_USERS = {"alice": "pw", "bob": BOB_PW, "carol": CAROL_PW}  # name: password


def users_data(tmp_path: Path, name: str = "data0") -> Path:
    data = tmp_path / name
    data.mkdir(parents=True, exist_ok=True)
    (data / "users").write_text(USERS)
    (data / "users").chmod(0o600)
    return data


class CountingStore(UserStore):
    """The real user store, counting password checks; ``gate`` (when set) holds them."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.started = 0
        self.gate: threading.Event | None = None
        self._lock = threading.Lock()

    def verify(self, name: str, password: str) -> bool:
        with self._lock:
            self.started += 1
        if self.gate is not None:
            self.gate.wait(60)  # bounded: the test opens it
        return super().verify(name, password)


async def client_from(server: Server, clients: list[Client], source: str) -> Client:
    """A raw client connected from ``source``, past STARTTLS and the second EHLO."""
    c = await Client.connect(server, source=source)
    clients.append(c)
    await c.ehlo()
    await c.starttls()
    await c.ehlo()
    return c


# --------------------------------------------------------------- IPv6 keys


def test_client_key_groups_ipv6_by_64() -> None:
    assert abuse.client_key("192.0.2.1") == "192.0.2.1"
    assert abuse.client_key("2001:db8:1:2::10") == "2001:db8:1:2::/64"
    assert abuse.client_key("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert abuse.client_key("2001:DB8:1:2:0:0:0:1") == "2001:db8:1:2::/64"
    assert abuse.client_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert abuse.client_key("::1") == "::/64"
    assert abuse.client_key("fe80::1%lo") == "fe80::/64"
    # IPv4-mapped IPv6: the IPv4 client itself, one address.
    assert abuse.client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert abuse.client_key("::ffff:192.0.2.8") == "192.0.2.8"
    assert abuse.client_key("not an address") == "not an address"


def need_ipv6() -> None:
    if not ipv6_loopback():
        if os.environ.get("CI"):
            pytest.fail("no IPv6 loopback (::1) but CI is set")
        pytest.skip("no IPv6 loopback (::1)")


async def proxied(server: Server, clients: list[Client], source: str) -> Client:
    """A connection through the ::1 PROXY listener, as client ``source``."""
    c = await Client.connect(server, banner=False)
    clients.append(c)
    c.send(f"PROXY TCP6 {source} ::1 40000 25\r\n")
    return c


async def test_ipv6_clients_share_the_per_ip_cap_by_64(start: Start, clients: list[Client]) -> None:
    need_ipv6()
    server = await start(
        listen=(Listen("::1", 0, proxy=True),),
        proxy_trusted=("::1/128",),
        max_connections_per_ip=2,
        reverse_dns=False,
    )
    for source in ("2001:db8:1:2::a", "2001:db8:1:2:ffff::b"):
        c = await proxied(server, clients, source)
        assert (await c.reply()).code == 220
    # A third address of the same /64: over the cap of that network.
    c = await proxied(server, clients, "2001:db8:1:2::c")
    assert codes([await c.reply()]) == [(421, "4.7.0")]
    # Another /64 and an IPv4 client are counted apart.
    for source in ("2001:db8:1:3::1", "::ffff:192.0.2.1"):
        c = await proxied(server, clients, source)
        assert (await c.reply()).code == 220


async def test_ipv6_auth_failures_count_by_64(
    start: Start, clients: list[Client], tmp_path: Path
) -> None:
    need_ipv6()
    users_data(tmp_path)
    server = await start(
        listen=(Listen("::1", 0, proxy=True),),
        proxy_trusted=("::1/128",),
        reverse_dns=False,
        tls=False,
        auth_plaintext=True,
        auth_failure_delay=0.0,
        max_auth_failures=2,
    )
    first = await proxied(server, clients, "2001:db8:5:6::1")
    assert (await first.reply()).code == 220
    await first.ehlo()
    assert codes([await first.cmd(f"AUTH PLAIN {plain('alice', 'guess1')}")]) == [(535, "5.7.8")]
    second = await proxied(server, clients, "2001:db8:5:6::2")
    assert (await second.reply()).code == 220
    await second.ehlo()
    # The second failure of the /64 locks it, whichever address it came from.
    r = await second.cmd(f"AUTH PLAIN {plain('alice', 'guess2')}")
    assert codes([r]) == [(421, "4.7.0")]
    third = await proxied(server, clients, "2001:db8:5:6::3")
    assert (await third.reply()).code == 220
    await third.ehlo()
    assert codes([await third.cmd(f"AUTH PLAIN {plain('alice', 'pw')}")]) == [(421, "4.7.0")]
    other = await proxied(server, clients, "2001:db8:5:7::1")
    assert (await other.reply()).code == 220
    await other.ehlo()
    assert codes([await other.cmd(f"AUTH PLAIN {plain('alice', 'pw')}")]) == [(235, "2.7.0")]


# -------------------------------------------------------- per-account lockout


def test_account_guard_counts_names_from_everywhere() -> None:
    guard = abuse.AccountGuard(max_failures=3, window=60.0)
    assert [guard.failed("alice", 10.0 + i) for i in range(4)] == [False, False, True, False]
    assert guard.locked("alice", 20.0)
    assert not guard.locked("Alice", 20.0)  # names are exact, like the users file
    assert not guard.locked("alice", 71.0)  # the window ended
    off = abuse.AccountGuard(max_failures=0, window=60.0)
    assert not off.failed("alice", 1.0) and not off.locked("alice", 1.0)


def test_account_failures_are_shared_by_workers() -> None:
    shared = abuse.SharedCounters(workers=2, auth_lockout=600.0, auth_user_lockout=600.0)
    guard = abuse.AccountGuard(max_failures=2, window=600.0, failures=shared.account_failures)
    now = 6000.0
    shared.bind(0)
    assert not guard.failed("alice", now)
    pid = os.fork()
    if pid == 0:
        try:
            shared.bind(1)
            guard.failed("alice", now + 1)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert guard.locked("alice", now + 2)
    assert not guard.locked("bob", now + 2)


async def test_account_lockout_across_addresses_skips_the_hash(
    start: Start, clients: list[Client], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = users_data(tmp_path)
    server = await start(reverse_dns=False, auth_failure_delay=0.0)  # the default limit: 10
    assert server.ctx is not None
    store = CountingStore(data)
    server.ctx.users = store
    caplog.set_level(logging.WARNING, "ehlo")
    for i in range(10):
        c = await client_from(server, clients, f"127.0.0.{21 + i}")
        r = await c.cmd(f"AUTH PLAIN {plain('alice', f'guess{i}')}")
        assert codes([r]) == [(535, "5.7.8")], i
    assert store.started == 10
    # The right password from a new address: refused, and no hash is computed.
    c = await client_from(server, clients, "127.0.0.31")
    r = await c.cmd(f"AUTH PLAIN {plain('alice', 'pw')}")
    assert codes([r]) == [(454, "4.7.0")]
    assert "too many failed attempts for this account" in r.text
    r = await c.cmd(f"AUTH PLAIN {plain('alice', 'guess again')}")
    assert codes([r]) == [(454, "4.7.0")]
    assert store.started == 10
    # Another account still logs in, from the same address.
    assert codes([await c.cmd(f"AUTH PLAIN {plain('bob', BOB_PW)}")]) == [(235, "2.7.0")]
    locks = [rec for rec in caplog.records if getattr(rec, "event", "") == "auth_account_locked"]
    assert len(locks) == 1 and locks[0].levelno == logging.WARNING
    assert "user alice locked out of AUTH" in locks[0].getMessage()


# ------------------------------------------------------ bounded verification


async def test_logins_beyond_the_pool_get_454_not_a_hang(
    start: Start, clients: list[Client], tmp_path: Path
) -> None:
    data = users_data(tmp_path)
    server = await start(
        reverse_dns=False, auth_failure_delay=0.0, max_auth_queue=2, auth_queue_timeout=1.0
    )
    assert server.ctx is not None
    store = CountingStore(data)
    store.gate = threading.Event()
    server.ctx.users = store
    pool = server.ctx.verifiers
    try:
        # Two checks hold both verification threads.
        running = [await client_from(server, clients, f"127.0.0.{41 + i}") for i in range(2)]
        running[0].send(f"AUTH PLAIN {plain('alice', 'pw')}\r\n")
        running[1].send(f"AUTH PLAIN {plain('alice', 'wrong')}\r\n")
        await async_wait_until(lambda: store.started == 2, "two checks running")
        # Two more wait for a thread; a fifth finds the queue full: 454 at once.
        waiting = [await client_from(server, clients, f"127.0.0.{43 + i}") for i in range(2)]
        for c in waiting:
            c.send(f"AUTH PLAIN {plain('bob', BOB_PW)}\r\n")
        await async_wait_until(lambda: pool.waiting == 2, "two logins queued")
        full = await client_from(server, clients, "127.0.0.45")
        r = await full.cmd(f"AUTH PLAIN {plain('bob', BOB_PW)}")
        assert codes([r]) == [(454, "4.7.0")] and "try again later" in r.text
        assert pool.waiting == 2
        # The queued ones get 454 when their deadline passes, the threads still held.
        for c in waiting:
            assert codes([await c.reply()]) == [(454, "4.7.0")]
        assert store.started == 2 and pool.waiting == 0
        store.gate.set()
        assert codes([await running[0].reply()]) == [(235, "2.7.0")]
        assert codes([await running[1].reply()]) == [(535, "5.7.8")]
        # Threads free again: a login goes through.
        assert codes([await full.cmd(f"AUTH PLAIN {plain('bob', BOB_PW)}")]) == [(235, "2.7.0")]
    finally:
        store.gate.set()


async def test_stop_is_not_held_by_password_checks(
    start: Start, clients: list[Client], tmp_path: Path
) -> None:
    data = users_data(tmp_path)
    server = await start(reverse_dns=False, auth_failure_delay=0.0, auth_queue_timeout=30.0)
    assert server.ctx is not None
    store = CountingStore(data)
    store.gate = threading.Event()
    server.ctx.users = store
    pool = server.ctx.verifiers
    try:
        busy = [await client_from(server, clients, f"127.0.0.{51 + i}") for i in range(4)]
        for c in busy:
            c.send(f"AUTH PLAIN {plain('alice', 'pw')}\r\n")
        await async_wait_until(
            lambda: store.started == 2 and pool.waiting == 2, "2 running, 2 queued"
        )
        began = time.monotonic()
        await asyncio.wait_for(server.stop(timeout=1.0), 15.0)
        assert time.monotonic() - began < 10.0
        # The queued logins were told to come back later; nobody was left hanging.
        replies = []
        for c in busy:
            try:
                replies.append((await c.reply(timeout=5.0)).code)
            except (ConnectionError, asyncio.IncompleteReadError):
                replies.append(0)
        assert replies.count(454) >= 2, replies
    finally:
        store.gate.set()


# --------------------------------------------- `ehlo serve`: the finding, end to end


def _tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def _login(port: int, source: str, user: str, password: str) -> int:
    """AUTH PLAIN over STARTTLS from ``source``: the reply code."""
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=port,
        source_address=(source, 0),
        start_tls=False,
        tls_context=_tls(),
        timeout=30,
    )
    await smtp.connect()
    try:
        await smtp.ehlo()
        await smtp.starttls()
        await smtp.ehlo()
        try:
            response = await smtp.auth_plain(user, password)
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code
        return response.code
    finally:
        smtp.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """``ehlo serve`` (defaults: one worker per core) with three users (``SERVE_USERS``).

    The users file is written with fixed PHC strings: no hashing to set up
    (``ehlo users add`` has its own tests).
    """
    assert EHLO.exists(), f"the ehlo console script is not installed at {EHLO}"
    data = users_data(tmp_path, "serve-data")
    with (data / "users").open("a") as users:
        users.write(f"carol:{CAROL_PHC}\n")
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(EHLO),
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--data",
                str(data),
                *SERVE_WITHOUT_DNS,
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        wait_for_banner(port, proc, log)
        yield proc, port, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_concurrent_wrong_logins_never_freeze_auth_or_shutdown(
    serve: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    proc, port, log = serve

    async def rounds() -> None:
        for n, (user, right) in enumerate(SERVE_USERS.items()):
            # Eight wrong passwords at once, from eight addresses, over STARTTLS.
            wrong = [_login(port, f"127.0.0.{11 + i}", user, f"guess {n} {i}") for i in range(8)]
            got = await asyncio.wait_for(asyncio.gather(*wrong), 40.0)
            assert set(got) <= {535, 454} and 535 in got, (n, got, log.read_text()[-2000:])
            # Then the right one from a fresh address: in well under 5 s.
            began = time.monotonic()
            code = await asyncio.wait_for(_login(port, f"127.0.0.{30 + n}", user, right), 5.0)
            assert code == 235, (n, code)
            assert time.monotonic() - began < 5.0
        # SIGTERM with checks in progress: a batch is under way (one has answered).
        # (An unknown user: checked against the dummy hash, never locked yet.)
        batch = [
            asyncio.ensure_future(_login(port, f"127.0.0.{11 + i}", "dave", f"late {i}"))
            for i in range(8)
        ]
        await asyncio.wait_for(asyncio.wait(batch, return_when=asyncio.FIRST_COMPLETED), 40.0)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*batch, return_exceptions=True), 40.0)
        exited = await asyncio.to_thread(proc.wait, 40.0)
        assert exited == 0, log.read_text()[-2000:]
        # The default shutdown_timeout is 30 s; with nothing else running it takes far less.
        assert time.monotonic() - began < 30.0

    asyncio.run(rounds())
    assert "Traceback" not in log.read_text()


def test_auth_limit_keys_in_the_configuration(tmp_path: Path) -> None:
    from ehlo.config import ConfigError, load_config

    path = tmp_path / "ehlo.toml"
    path.write_text(
        "max_auth_failures_per_user = 3\nauth_user_lockout = 60\n"
        "max_auth_queue = 0\nauth_queue_timeout = 2.5\n"
    )
    config = load_config(path)
    assert (config.max_auth_failures_per_user, config.auth_user_lockout) == (3, 60.0)
    assert (config.max_auth_queue, config.auth_queue_timeout) == (0, 2.5)
    defaults = load_config(None)
    assert (defaults.max_auth_failures_per_user, defaults.auth_user_lockout) == (10, 600.0)
    assert (defaults.max_auth_queue, defaults.auth_queue_timeout) == (32, 10.0)
    for key, bad in (
        ("max_auth_failures_per_user", -1),
        ("auth_user_lockout", 0),
        ("max_auth_queue", "many"),
        ("auth_queue_timeout", 0),
    ):
        with pytest.raises(ConfigError, match=key):
            load_config(None, {key: bad})


async def test_a_slot_is_free_only_when_its_thread_is_done() -> None:
    from ehlo.server._hashing import VerifierBusy, VerifierPool

    pool = VerifierPool(workers=1, max_waiting=1, timeout=5.0)
    gate = threading.Event()
    try:
        first = asyncio.ensure_future(pool.run(gate.wait, 30.0))
        await async_wait_until(lambda: pool.running == 1, "the first check running")
        first.cancel()  # the client hung up: its thread still runs
        with pytest.raises(asyncio.CancelledError):
            await first
        assert pool.running == 1
        second = asyncio.ensure_future(pool.run(lambda: "second"))
        await async_wait_until(lambda: pool.waiting == 1, "the second check queued")
        with pytest.raises(VerifierBusy):
            await pool.run(lambda: "third")  # the queue holds one
        gate.set()
        assert await asyncio.wait_for(second, 10.0) == "second"
        await async_wait_until(lambda: pool.running == 0, "the slot given back")
        pool.close()
        with pytest.raises(VerifierBusy):
            await pool.run(lambda: "after close")
    finally:
        gate.set()
        pool.close()
