"""AUTH (RFC 4954) on ehlo's own server: where it is offered, what it accepts,
how it slows and locks out guessing, submission mode, and swaks as a real client.

Users are created with the real Argon2id store in the server's data folder;
every exchange goes over TCP on loopback, TLS included.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from ehlo.auth import UserStore
from ehlo.server import Server

from .helpers import Client, codes, connect, queued_id
from .test_e2e_tools import Target, envelope_args, swaks

PASSWORD = "correct horse battery staple"
Start = Callable[..., Awaitable[Server]]


@pytest.fixture(scope="module")
def users_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with users alice and bob (hashed once for the module)."""
    data = tmp_path_factory.mktemp("users")
    store = UserStore(data)
    store.add("alice", PASSWORD)
    store.add("bob", "hunter2 but longer")
    return data


def copy_users(users_dir: Path, tmp_path: Path, name: str = "data") -> Path:
    data = tmp_path / name
    data.mkdir(exist_ok=True)
    (data / "users").write_bytes((users_dir / "users").read_bytes())
    (data / "users").chmod(0o600)
    return data


def plain(user: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def auth_server(start: Start, users_dir: Path, tmp_path: Path, **overrides: object) -> Server:
    """A server whose data folder (the first one ``start`` uses) holds the users."""
    copy_users(users_dir, tmp_path, "data0")
    return await start(reverse_dns=False, **overrides)


async def test_auth_not_offered_before_tls_and_refused_with_538(
    start: Start, clients: list[Client], users_dir: Path, tmp_path: Path
) -> None:
    server = await auth_server(start, users_dir, tmp_path)
    c = await connect(server, clients)
    r = await c.ehlo()
    assert not any(line.startswith("AUTH") for line in r.lines), r
    # RFC 4954 section 6: 538 when the mechanism needs an encrypted channel.
    r = await c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")
    assert codes([r]) == [(538, "5.7.11")]
    await c.starttls()
    r = await c.ehlo()
    assert "AUTH PLAIN LOGIN" in r.lines, r
    assert codes([await c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")]) == [(235, "2.7.0")]


async def test_auth_plain_then_message_records_the_user(
    start: Start, clients: list[Client], users_dir: Path, tmp_path: Path
) -> None:
    server = await auth_server(start, users_dir, tmp_path)
    c = await connect(server, clients)
    await c.ehlo()
    await c.starttls()
    await c.ehlo()
    # PLAIN without an initial response: an empty 334 challenge first.
    r = await c.cmd("AUTH PLAIN")
    assert r.code == 334 and r.raw == b"334 \r\n", r
    assert codes([await c.cmd(plain("alice", PASSWORD))]) == [(235, "2.7.0")]
    # RFC 4954 section 4: no second AUTH in the session.
    assert codes([await c.cmd(f"AUTH PLAIN {plain('bob', 'x')}")]) == [(503, "5.5.1")]
    assert (await c.cmd("MAIL FROM:<alice@example.org> AUTH=alice+40example.org")).code == 250
    assert (await c.cmd("RCPT TO:<someone@example.net>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    qid = queued_id(await c.cmd(b"Subject: authenticated\r\n\r\nhello\r\n."))
    stored = server.store.get(qid)
    assert stored is not None
    assert stored.envelope.protocol == "ESMTPSA"  # RFC 3848
    assert stored.envelope.extra["auth"] == {"user": "alice", "mechanism": "PLAIN"}
    assert stored.envelope.mail_params == {"AUTH": "alice+40example.org"}
    raw = server.store.raw(qid)
    assert raw is not None
    header = raw.split(b"\r\n\r\n", 1)[0].decode()
    assert "(authenticated as alice)" in header
    assert "with ESMTPSA id" in header


async def test_auth_login_two_steps_and_failures(
    start: Start, clients: list[Client], users_dir: Path, tmp_path: Path
) -> None:
    server = await auth_server(start, users_dir, tmp_path, auth_failure_delay=0.0,
                               max_auth_failures=10)
    c = await connect(server, clients)
    await c.ehlo()
    await c.starttls()
    await c.ehlo()
    r = await c.cmd("AUTH LOGIN")
    assert (r.code, base64.b64decode(r.text)) == (334, b"Username:")
    r = await c.cmd(b64("bob"))
    assert (r.code, base64.b64decode(r.text)) == (334, b"Password:")
    # A wrong password: 535 5.7.8 (RFC 4954 section 6).
    assert codes([await c.cmd(b64("wrong"))]) == [(535, "5.7.8")]
    # "*" cancels (501), bad base64 is 501, an unknown mechanism 504.
    assert (await c.cmd("AUTH LOGIN")).code == 334
    assert codes([await c.cmd("*")]) == [(501, "5.0.0")]
    assert codes([await c.cmd("AUTH PLAIN !!!notbase64")]) == [(501, "5.5.2")]
    assert codes([await c.cmd("AUTH CRAM-MD5")]) == [(504, "5.5.4")]
    # Another user's authorization identity is refused even with the right password.
    r = await c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD, authzid='bob')}")
    assert codes([r]) == [(535, "5.7.8")]
    # Inside a transaction AUTH is out of sequence.
    assert (await c.cmd("MAIL FROM:<x@example.org>")).code == 250
    assert codes([await c.cmd("AUTH LOGIN")]) == [(503, "5.5.1")]
    assert (await c.cmd("RSET")).code == 250
    r = await c.cmd(f"AUTH LOGIN {b64('bob')}")  # initial response = user name
    assert (r.code, base64.b64decode(r.text)) == (334, b"Password:")
    assert codes([await c.cmd(b64("hunter2 but longer"))]) == [(235, "2.7.0")]


async def test_brute_force_is_slowed_then_locked_out(
    start: Start, clients: list[Client], users_dir: Path, tmp_path: Path
) -> None:
    delay = 0.2
    server = await auth_server(start, users_dir, tmp_path, auth_failure_delay=delay,
                               max_auth_failures=3, auth_lockout=60.0)
    c = await connect(server, clients)
    await c.ehlo()
    await c.starttls()
    await c.ehlo()
    began = time.monotonic()
    assert codes([await c.cmd(f"AUTH PLAIN {plain('alice', 'guess1')}")]) == [(535, "5.7.8")]
    first = time.monotonic() - began
    began = time.monotonic()
    assert codes([await c.cmd(f"AUTH PLAIN {plain('alice', 'guess2')}")]) == [(535, "5.7.8")]
    second = time.monotonic() - began
    # Each failure waits longer than the one before (delay x failures so far).
    assert first >= delay and second >= 2 * delay, (first, second)
    # The third failure from this address locks it out: 421 and the connection closes.
    r = await c.cmd(f"AUTH PLAIN {plain('alice', 'guess3')}")
    assert codes([r]) == [(421, "4.7.0")]
    await c.expect_eof()
    # A new connection from the same address: AUTH refused even with the right password.
    c2 = await connect(server, clients)
    await c2.ehlo()
    await c2.starttls()
    await c2.ehlo()
    r = await c2.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")
    assert codes([r]) == [(421, "4.7.0")]
    # Another client address is not locked out.
    c3 = await connect(server, clients, source="127.0.0.2")
    await c3.ehlo()
    await c3.starttls()
    await c3.ehlo()
    assert codes([await c3.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")]) == [(235, "2.7.0")]


async def test_submission_requires_auth_and_then_relays(
    start: Start, clients: list[Client], users_dir: Path, tmp_path: Path
) -> None:
    server = await auth_server(start, users_dir, tmp_path, submission=True,
                               domains=("example.org",))
    c = await connect(server, clients)
    await c.ehlo()
    # RFC 4954 section 6: 530 5.7.0 while authentication is required.
    assert codes([await c.cmd("MAIL FROM:<alice@example.org>")]) == [(530, "5.7.0")]
    await c.starttls()
    await c.ehlo()
    assert codes([await c.cmd("MAIL FROM:<alice@example.org>")]) == [(530, "5.7.0")]
    assert (await c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")).code == 235
    assert (await c.cmd("MAIL FROM:<alice@example.org>")).code == 250
    # Authenticated: any recipient domain (submission relays for its users).
    assert (await c.cmd("RCPT TO:<friend@elsewhere.example>")).code == 250


async def test_unauthenticated_client_cannot_relay(
    start: Start, clients: list[Client], users_dir: Path, tmp_path: Path
) -> None:
    server = await auth_server(start, users_dir, tmp_path, domains=("example.org",))
    c = await connect(server, clients)
    await c.ehlo()
    assert (await c.cmd("MAIL FROM:<a@example.net>")).code == 250
    assert codes([await c.cmd("RCPT TO:<friend@elsewhere.example>")]) == [(550, "5.7.1")]
    assert (await c.cmd("RCPT TO:<user@example.org>")).code == 250


async def test_auth_over_plaintext_only_when_allowed(
    start: Start, clients: list[Client], users_dir: Path, tmp_path: Path
) -> None:
    server = await auth_server(start, users_dir, tmp_path, auth_plaintext=True, tls=False)
    c = await connect(server, clients)
    r = await c.ehlo()
    assert "AUTH PLAIN LOGIN" in r.lines
    assert (await c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")).code == 235


async def test_no_users_no_auth(start: Start, clients: list[Client]) -> None:
    server = await start()
    c = await connect(server, clients)
    await c.ehlo()
    await c.starttls()
    r = await c.ehlo()
    assert not any(line.startswith("AUTH") for line in r.lines)
    assert codes([await c.cmd("AUTH PLAIN AGFAYg==")]) == [(502, "5.5.1")]


def test_swaks_tls_auth(
    threaded_server: Callable[..., object], users_dir: Path, tmp_path: Path
) -> None:
    srv = threaded_server(data_dir=copy_users(users_dir, tmp_path), reverse_dns=False,
                          auth_failure_delay=0.0)
    server = srv.server  # type: ignore[attr-defined]
    target = Target(srv.host, srv.port, server.store)  # type: ignore[attr-defined]
    for mechanism in ("PLAIN", "LOGIN"):
        t = swaks(target, *envelope_args(tmp_path), "--tls", "--auth", mechanism,
                  "--auth-user", "alice", "--auth-password", PASSWORD)
        assert t.returncode == 0, t.output
        stored = server.store.get(t.queue_id())
        assert stored is not None
        assert stored.envelope.extra["auth"]["user"] == "alice"
        assert stored.envelope.protocol == "ESMTPSA"
    bad = swaks(target, *envelope_args(tmp_path), "--tls", "--auth", "PLAIN",
                "--auth-user", "alice", "--auth-password", "not it")
    assert bad.returncode != 0
    assert any(text.startswith("535 5.7.8") for who, text in bad.lines if who == "S"), bad.output


async def test_user_added_while_running_gets_auth(
    start: Start, clients: list[Client], tmp_path: Path
) -> None:
    server = await start(reverse_dns=False, auth_failure_delay=0.0)
    c = await connect(server, clients)
    await c.ehlo()
    await c.starttls()
    r = await c.ehlo()
    assert not any(line.startswith("AUTH") for line in r.lines)
    # `ehlo users add` writes the users file of the running server's data folder.
    UserStore(tmp_path / "data0").add("carol", "a new password")
    r = await c.ehlo()
    assert "AUTH PLAIN LOGIN" in r.lines, r
    assert (await c.cmd(f"AUTH PLAIN {plain('carol', 'a new password')}")).code == 235
