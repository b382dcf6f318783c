"""Two nodes on one PostgreSQL database share their AUTH users and abuse counters.

Two real servers (each in its own thread and event loop, as two nodes
would be) are configured with ``store = "postgresql"`` on one throwaway
database (tests/pgserver.py); their messages go to a null store of their
own, as these tests are about what the nodes share besides mail. Users are
added with ``ehlo users add --store URL`` or through one node's user
store; clients are smtplib (AUTH PLAIN after STARTTLS) and
raw sockets, each test from a loopback address of its own so that one
test's AUTH failures and connection counts leave the others alone.
"""

from __future__ import annotations

import base64
import io
import json
import smtplib
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from ehlo.auth import users as users_module
from ehlo.cli import main
from ehlo.storage import NullStore
from ehlo.storage._pg_conn import Database
from ehlo.storage._pg_schema import migrate

from .helpers import ThreadedServer, client_tls, make_config, read_line, wait_until
from .pgserver import PgCluster

PASSWORD = "correct horse battery staple"
# Users written here get cheap Argon2id parameters (the check reads them from
# the PHC string): logins take milliseconds, not the real cost's 64 MiB each.
CHEAP = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
RATE = 20  # max_connection_rate of both nodes
MAX_FAILURES = 3  # max_auth_failures of both nodes
# What the tests allow for "within about a second" on a loaded machine.
PROPAGATION_LIMIT = 10.0


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def auth(node: ThreadedServer, user: str, password: str, source: str) -> tuple[int, str]:
    """AUTH PLAIN after STARTTLS from ``source``: the reply's code and text."""
    client = smtplib.SMTP(node.host, node.port, timeout=60, source_address=(source, 0))
    try:
        client.ehlo("client.example")
        client.starttls(context=client_tls())
        client.ehlo("client.example")
        if not client.has_extn("auth"):
            return 0, "AUTH not offered"
        code, text = client.docmd("AUTH", f"PLAIN {plain(user, password)}")
        return code, text.decode()
    finally:
        client.close()


def banner(node: ThreadedServer, source: str) -> bytes:
    """The first reply line a new connection from ``source`` gets."""
    with socket.create_connection(
        (node.host, node.port), timeout=60, source_address=(source, 0)
    ) as sock:
        line = read_line(sock)
        if line.startswith(b"220"):
            sock.sendall(b"QUIT\r\n")
            read_line(sock)
        return line


def wait_for_user(node: ThreadedServer, name: str, known: bool, what: str) -> float:
    """Wait until ``node`` knows user ``name`` (or no longer does); the seconds it took.

    Asked of the node's cached users, not with AUTH: a refused login would
    count as a failure from the test's address.
    """
    assert node.server is not None and node.server.ctx is not None
    users = node.server.ctx.users
    assert users is not None
    started = time.monotonic()
    wait_until(lambda: (name in users) == known, what, timeout=PROPAGATION_LIMIT, poll=0.05)
    return time.monotonic() - started


def wait_for_reply(
    node: ThreadedServer, user: str, password: str, source: str, code: int, what: str
) -> float:
    """Repeat AUTH until it is answered ``code``; the seconds it took."""
    started = time.monotonic()
    wait_until(
        lambda: auth(node, user, password, source)[0] == code,
        what,
        timeout=PROPAGATION_LIMIT,
        poll=0.1,
    )
    return time.monotonic() - started


def sql(pg_cluster: PgCluster, database: str, statement: str) -> str:
    return pg_cluster.psql(database, statement).strip()


@pytest.fixture(scope="module")
def database(pg_cluster: PgCluster) -> str:
    """The nodes' database: the schema, and users alice and bob (written directly)."""
    if not pg_cluster.running:
        pg_cluster.start()
    name = pg_cluster.create_database()
    with Database(pg_cluster.url(name)).connect(autocommit=True) as conn:
        migrate(conn, "test")
        for user, password in (("alice", PASSWORD), ("bob", "bob's own password")):
            conn.execute(
                "INSERT INTO users (name, phc) VALUES (%s, %s)", (user, CHEAP.hash(password))
            )
    return name


@pytest.fixture(scope="module")
def nodes(
    pg_cluster: PgCluster, database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ThreadedServer, ThreadedServer]]:
    """Nodes A and B on the one database."""
    started: list[ThreadedServer] = []
    try:
        for index in range(2):
            config = make_config(
                tmp_path_factory.mktemp(f"node{index}"),
                store="postgresql",
                database_url=pg_cluster.url(database),
                max_connection_rate=RATE,
                max_auth_failures=MAX_FAILURES,
                auth_failure_delay=0.0,
            )
            started.append(ThreadedServer(config, store=NullStore()).start())
        yield started[0], started[1]
    finally:
        if not pg_cluster.running:
            pg_cluster.start()
        for node in started:
            node.stop()


def test_users_added_with_the_command_authenticate_on_both_nodes(
    pg_cluster: PgCluster,
    database: str,
    nodes: tuple[ThreadedServer, ThreadedServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, b = nodes
    source = "127.0.0.1"
    assert auth(a, "alice", PASSWORD, source)[0] == 235
    assert auth(b, "alice", PASSWORD, source)[0] == 235
    url = pg_cluster.url(database)
    stdin = io.TextIOWrapper(io.BytesIO(b"carol's password\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(users_module, "_hasher", lambda: CHEAP)
    assert main(["users", "add", "carol", "--store", url]) == 0
    assert capsys.readouterr().out.strip() == "user carol added"
    wait_for_user(b, "carol", True, "node B to know carol")
    wait_for_user(a, "carol", True, "node A to know carol")
    assert auth(b, "carol", "carol's password", source)[0] == 235
    assert auth(a, "carol", "carol's password", source)[0] == 235
    # The same table through a configuration file naming the database.
    config = tmp_path / "ehlo.toml"
    config.write_text(f'store = "postgresql"\ndatabase_url = "{url}"\n')
    capsys.readouterr()
    assert main(["users", "list", "--config", str(config), "--json"]) == 0
    assert {"alice", "carol"} <= set(json.loads(capsys.readouterr().out))
    assert sql(pg_cluster, database, "SELECT count(*) FROM users WHERE name = 'carol'") == "1"


def test_a_user_removed_on_one_node_is_refused_on_the_other(
    nodes: tuple[ThreadedServer, ThreadedServer],
) -> None:
    a, b = nodes
    source = "127.0.0.4"
    assert auth(b, "bob", "bob's own password", source)[0] == 235
    assert a.server is not None and a.server.ctx is not None and a.server.ctx.users is not None
    assert a.server.ctx.users.remove("bob")
    removed = time.monotonic()
    assert auth(a, "bob", "bob's own password", source)[0] == 535  # node A's own cache at once
    wait_for_user(b, "bob", False, "node B to forget bob")
    print(f"node B forgets bob {time.monotonic() - removed:.2f} s after node A removed him")
    assert auth(b, "bob", "bob's own password", source)[0] == 535


def test_an_auth_lockout_on_one_node_locks_the_address_out_of_the_other(
    nodes: tuple[ThreadedServer, ThreadedServer],
) -> None:
    a, b = nodes
    source = "127.0.0.2"
    assert auth(b, "alice", PASSWORD, source)[0] == 235
    for attempt in range(1, MAX_FAILURES + 1):
        code, text = auth(a, "alice", "a guess", source)
        # The failure that reaches max_auth_failures locks the address out: 421.
        assert code == (421 if attempt == MAX_FAILURES else 535), (attempt, code, text)
    locked = time.monotonic()
    # Node B never saw a failure from this address, and alice's password is right.
    took = wait_for_reply(b, "alice", PASSWORD, source, 421, "node B to lock the address out")
    print(
        f"node B refuses AUTH from the address {time.monotonic() - locked:.2f} s after the lockout"
    )
    assert took < PROPAGATION_LIMIT
    code, text = auth(b, "alice", PASSWORD, source)
    assert (code, text.split()[0]) == (421, "4.7.0"), text
    assert auth(b, "alice", PASSWORD, "127.0.0.1")[0] == 235  # only that address


def test_connection_rates_add_up_over_the_nodes(
    nodes: tuple[ThreadedServer, ThreadedServer],
) -> None:
    a, b = nodes
    source = "127.0.0.3"
    first = 12  # on node A, all below the rate of 20 a minute
    assert [banner(a, source)[:3] for _ in range(first)] == [b"220"] * first
    started = time.monotonic()

    def known_on_b() -> bool:
        assert b.server is not None and b.server.ctx is not None
        counter = b.server.ctx.connection_rate
        return bool(b.call(lambda: counter.count(source, time.monotonic()) >= first))

    wait_until(known_on_b, "node B to know node A's connections", timeout=PROPAGATION_LIMIT)
    print(f"node B counts node A's connections after {time.monotonic() - started:.2f} s")
    # Another 12 on node B: 8 more make the rate, the last 4 go over it.
    lines = [banner(b, source) for _ in range(12)]
    assert [line[:3] for line in lines] == [b"220"] * (RATE - first) + [b"421"] * 4, lines
    assert b"per minute" in lines[-1]


def test_database_down_connections_and_cached_users_go_on(
    pg_cluster: PgCluster,
    database: str,
    nodes: tuple[ThreadedServer, ThreadedServer],
) -> None:
    a, b = nodes
    source = "127.0.0.5"
    assert auth(b, "alice", PASSWORD, source)[0] == 235
    pg_cluster.stop("fast")
    try:
        started = time.monotonic()
        for node in (a, b, a, b):
            assert banner(node, source)[:3] == b"220"
        assert auth(a, "alice", PASSWORD, source)[0] == 235
        assert auth(b, "alice", PASSWORD, source)[0] == 235
        assert auth(b, "alice", "a wrong password", source)[0] == 535
        took = time.monotonic() - started
        print(f"4 connections and 3 logins with the database down: {took:.2f} s")
        assert took < PROPAGATION_LIMIT  # no login waited for the database
    finally:
        pg_cluster.start()
    # The connections counted meanwhile reach the database once it is back.
    wait_until(
        lambda: (
            sql(
                pg_cluster,
                database,
                f"SELECT coalesce(sum(count), 0) FROM abuse_counts WHERE key = '{source}'"
                " AND kind = 'connection_rate'",
            )
            == "8"
        ),
        "the counts of the outage in the database",
        timeout=60,
        poll=0.5,
    )


def test_users_command_errors_are_one_line(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    # A database without the schema: what to run, not a driver's traceback.
    assert main(["users", "list", "--store", pg_url]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ehlo: error: ") and "ehlo db migrate" in err, err
    assert len(err.splitlines()) == 1
    # A password on the command line is refused before anything connects.
    with_password = pg_url.replace("ehlo@", "ehlo:secret@")
    assert main(["users", "list", "--store", with_password]) == 2
    err = capsys.readouterr().err.strip()
    assert "password" in err and "secret" not in err and len(err.splitlines()) == 1, err
    assert main(["users", "list", "--store", "ftp://u:secret@x", "--json"]) == 2
    err = capsys.readouterr().err
    assert "or a postgresql:// URL, got a URL" in err and "secret" not in err, err
