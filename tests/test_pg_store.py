"""The PostgreSQL store's write path and life cycle, on a throwaway PostgreSQL.

A real ``ehlo.Server`` with ``store = "postgresql"`` on a database of the
session's cluster (``tests/pgserver.py``), real SMTP clients (smtplib, raw
sockets), and the rows read back with SQL. One server serves the tests
that do not take the database away; the outage test has its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import smtplib
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ehlo.storage import Retention, StoreError, open_store
from ehlo.storage._pg_schema import CHANNEL_MESSAGES, CHUNK_SIZE, LATEST
from ehlo.storage.base import Envelope
from ehlo.storage.postgres import PostgresStore

from .helpers import (
    BlockingClient,
    ThreadedServer,
    async_wait_until,
    free_port,
    make_config,
    wait_until,
)
from .pgserver import PgCluster

LOCAL = "bob@local.test"
REMOTE = "carol@remote.test"


@dataclass
class Node:
    srv: ThreadedServer
    url: str
    data: Path

    @property
    def store(self) -> PostgresStore:
        assert self.srv.server is not None
        store = self.srv.server.store
        assert isinstance(store, PostgresStore)
        return store


def _config(data: Path, url: str) -> Any:
    return make_config(
        data,
        store="postgresql",
        database_url=url,
        tls=False,
        max_message_size=0,
        domains=("local.test",),
        relay_networks=("127.0.0.0/8",),
        relay_host="smart.test:587",
    )


@pytest.fixture(scope="module")
def node(pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One server on a database of its own, shared by the tests that leave the database up."""
    if not pg_cluster.running:
        pg_cluster.start()
    url = pg_cluster.url(pg_cluster.create_database())
    data = tmp_path_factory.mktemp("pgnode") / "data"
    srv = ThreadedServer(_config(data, url), delivery=False)
    srv.start()
    try:
        yield Node(srv, url, data)
    finally:
        srv.stop()


def rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def stored_body(url: str, queue_id: str) -> bytes:
    found = rows(url, "SELECT data FROM chunks WHERE queue_id = %s ORDER BY seq", (queue_id,))
    return b"".join(bytes(data) for (data,) in found)


def send(port: int, body: bytes, rcpts: tuple[str, ...] = (LOCAL,)) -> tuple[int, str]:
    """One message over smtplib; the reply to its data (code, text)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.example")
        client.mail("alice@example.org", ["BODY=8BITMIME"])
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(body)
        return code, text.decode()


def queued_id(reply: tuple[int, str]) -> str:
    assert reply[0] == 250, reply
    return reply[1].rsplit(" ", 1)[-1]


# ------------------------------------------------------------------- byte-exact rows


def test_messages_stored_byte_exact_with_envelope_queue_rows_sessions_and_notice(
    node: Node,
) -> None:
    with psycopg.connect(node.url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL_MESSAGES}")
        plain = (
            b"From: Alice <alice@example.org>\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\n"
            b"line one\r\n.dot line\r\n\r\nlast \xc3\xa9 line\r\n"
        )
        first = queued_id(send(node.srv.port, plain))
        notices = list(listener.notifies(timeout=20, stop_after=1))
    assert [(n.channel, n.payload) for n in notices] == [(CHANNEL_MESSAGES, first)]
    # A NUL in the Subject (PostgreSQL's text refuses it) and a relayed recipient.
    odd = b"Subject: a\x00b\r\n\r\nbody\r\n"
    second = queued_id(send(node.srv.port, odd, (LOCAL, REMOTE)))

    raw = stored_body(node.url, first)
    assert raw.startswith(b"Received: ") and raw.endswith(plain)
    ((size, chunks, subject, s_subject, mail_from, rcpt_to, params, node_name),) = rows(
        node.url,
        "SELECT size, chunks, subject, s_subject, mail_from, rcpt_to, mail_params, node"
        " FROM messages WHERE queue_id = %s",
        (first,),
    )
    assert (size, chunks) == (len(raw), 1)
    assert (subject, s_subject) == ("Grüße", "grüsse")  # case-folded
    assert mail_from == "alice@example.org"
    assert json.loads(rcpt_to) == [LOCAL]
    assert json.loads(params) == {"BODY": "8BITMIME"}
    assert node_name == node.store.node
    assert stored_body(node.url, second).endswith(odd)
    assert rows(node.url, "SELECT subject FROM messages WHERE queue_id = %s", (second,)) == [
        ("a\ufffdb",)
    ]

    # Only the relayed recipient is queued, in the message's own transaction.
    queued = rows(
        node.url,
        "SELECT queue_id, recipient, next_hop, state, attempts, delay_notified, lease_token,"
        " lease_until FROM queue ORDER BY queue_id",
    )
    assert queued == [(second, REMOTE, "smtp:smart.test:587", "queued", 0, False, None, None)]
    assert rows(node.url, "SELECT count(*) FROM staged") == [(0,)]

    # Each ended session is logged (fire and forget: soon after the QUIT).
    def logged() -> int:
        return int(rows(node.url, "SELECT count(*) FROM sessions")[0][0])

    wait_until(lambda: logged() >= 2, "the two sessions in the session log")
    ((record,),) = rows(node.url, "SELECT record FROM sessions ORDER BY seq LIMIT 1")
    assert json.loads(record)["client_ip"] == "127.0.0.1"


# ------------------------------------------------------------------------ group commit


def test_concurrent_messages_share_commits(node: Node) -> None:
    stats = node.store.stats
    commits, messages = stats.commits, stats.messages
    clients = 50
    start = threading.Barrier(clients)

    def one(n: int) -> tuple[int, str]:
        with smtplib.SMTP("127.0.0.1", node.srv.port, timeout=60) as client:
            client.ehlo("client.example")
            client.mail("alice@example.org")
            client.rcpt(LOCAL)
            start.wait(60)
            code, text = client.data(f"Subject: {n}\r\n\r\nbody {n}\r\n".encode())
            return code, text.decode()

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        replies = list(pool.map(one, range(clients)))
    ids = [queued_id(reply) for reply in replies]
    assert stats.messages - messages == clients
    assert stats.commits - commits < clients, (stats.commits - commits, clients)
    found = rows(node.url, "SELECT count(*) FROM messages WHERE queue_id = ANY(%s)", (ids,))
    assert found == [(clients,)]


def test_250_only_after_commit(node: Node) -> None:
    with psycopg.connect(node.url) as locker:
        locker.execute("LOCK TABLE messages IN EXCLUSIVE MODE")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            reply = pool.submit(send, node.srv.port, b"Subject: held\r\n\r\nheld\r\n")

            def waiting() -> bool:
                return bool(
                    rows(
                        node.url,
                        "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO messages%%'",
                    )
                )

            wait_until(waiting, "the commit waiting for the lock on messages")
            time.sleep(0.3)  # the commit stays blocked: no reply may come meanwhile
            assert not reply.done()
            locker.commit()  # the lock goes
            queue_id = queued_id(reply.result(timeout=60))
    assert rows(node.url, "SELECT count(*) FROM messages WHERE queue_id = %s", (queue_id,)) == [
        (1,)
    ]


# ---------------------------------------------------------------------- large bodies


def _stream_message(port: int, size: int) -> tuple[str, str]:
    """Send a body of ``size`` octets in 64 KiB writes (never built whole); id and sha256."""
    line = b"0123456789abcdef" * 6 + b"xyz\r\n"  # 101 octets
    block = line * 640  # 64,640 octets
    digest = hashlib.sha256()
    client = BlockingClient.open(port, timeout=60)
    try:
        assert client.cmd("EHLO client.example").code == 250
        assert client.cmd("MAIL FROM:<alice@example.org>").code == 250
        assert client.cmd(f"RCPT TO:<{LOCAL}>").code == 250
        assert client.cmd("DATA").code == 354
        head = b"Subject: large\r\n\r\n"
        client.send(head)
        digest.update(head)
        sent = len(head)
        while sent < size:
            piece = block[: size - sent]
            if not piece.endswith(b"\r\n"):
                piece = piece[:-2] + b"\r\n"
            client.send(piece)
            digest.update(piece)
            sent += len(piece)
        reply = client.cmd(".")
        assert reply.code == 250, reply
        return reply.text.rsplit(" ", 1)[-1], digest.hexdigest()
    finally:
        client.close()


def _vm(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.parametrize("size", [3 * 1024 * 1024, 10 * 1024 * 1024])
def test_large_body_as_chunk_rows_never_held_whole(node: Node, size: int) -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak RSS (VmHWM) counts from here
    rss = _vm("VmRSS:")
    tracemalloc.start()
    try:
        started = time.monotonic()
        queue_id, sent_digest = _stream_message(node.srv.port, size)
        seconds = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    grown = _vm("VmHWM:") - rss
    print(f"{size} octets: {seconds:.2f} s, peak traced {peak} octets, peak RSS +{grown} octets")
    # The node kept at most a few chunks in memory, never the body.
    assert peak < 3 * 1024 * 1024, peak
    ((stored, chunks),) = rows(
        node.url, "SELECT size, chunks FROM messages WHERE queue_id = %s", (queue_id,)
    )
    lengths = rows(
        node.url,
        "SELECT length(data) FROM chunks WHERE queue_id = %s ORDER BY seq",
        (queue_id,),
    )
    assert len(lengths) == chunks == -(-stored // CHUNK_SIZE)
    assert all(n == CHUNK_SIZE for (n,) in lengths[:-1]) and 0 < lengths[-1][0] <= CHUNK_SIZE
    # Byte-exact: ehlo's Received header, then what was sent (read a chunk at a time).
    prefix = stored - size
    digest = hashlib.sha256()
    skip = prefix
    with psycopg.connect(node.url) as conn:
        for seq in range(chunks):
            ((data,),) = conn.execute(
                "SELECT data FROM chunks WHERE queue_id = %s AND seq = %s", (queue_id, seq)
            ).fetchall()
            data = bytes(data)
            if seq == 0:
                assert data.startswith(b"Received: ")
            digest.update(data[skip:])
            skip = max(0, skip - len(data))
    assert digest.hexdigest() == sent_digest
    assert rows(node.url, "SELECT count(*) FROM staged") == [(0,)]
    # Nothing of it counts as backlog (bytes not yet in the database) any more.
    assert node.srv.call(lambda: node.store.backlog_bytes) == 0
    # The body waited in an unnamed file of the node's private spool folder.
    spool = node.data / "spool"
    assert spool.stat().st_mode & 0o777 == 0o700 and list(spool.iterdir()) == []


# ------------------------------------------------------------------------- outages


def test_database_outage_451_one_log_line_and_recovery(
    pg_cluster: PgCluster, pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    srv = ThreadedServer(_config(tmp_path / "data", pg_url), delivery=False).start()
    try:
        queued_id(send(srv.port, b"Subject: before\r\n\r\nbefore\r\n"))
        caplog.set_level(logging.INFO, logger="ehlo.storage")
        pg_cluster.stop("immediate")
        try:
            for n in range(3):
                # A new connection is still greeted; the message is refused, never a 250.
                code, text = send(srv.port, f"Subject: gap {n}\r\n\r\ngap\r\n".encode())
                assert (code, text.split(" ", 1)[0]) == (451, "4.3.0"), (code, text)
            down = [r for r in caplog.records if getattr(r, "event", "") == "database_down"]
            assert len(down) == 1, [r.getMessage() for r in down]
        finally:
            pg_cluster.start()
        # Back without a restart of the node: the next message is stored.
        after = queued_id(send(srv.port, b"Subject: after\r\n\r\nafter\r\n"))
        assert rows(pg_url, "SELECT subject FROM messages WHERE queue_id = %s", (after,)) == [
            ("after",)
        ]
        assert rows(pg_url, "SELECT count(*) FROM messages") == [(2,)]
        up = [r for r in caplog.records if getattr(r, "event", "") == "database_up"]
        assert len(up) == 1
    finally:
        srv.stop()


# ------------------------------------------------------------------- life cycle


def _envelope(queue_id: str) -> Envelope:
    import datetime as dt

    return Envelope(
        queue_id=queue_id,
        client_ip="127.0.0.1",
        client_port=1,
        greeting="EHLO",
        greeting_name="client.example",
        mail_from="a@example.org",
        mail_params={},
        rcpt_to=[LOCAL],
        received_at=dt.datetime.now(dt.UTC),
    )


async def test_schema_at_start_two_stores_at_once(pg_url: str, tmp_path: Path) -> None:
    assert rows(pg_url, "SELECT to_regclass('messages') IS NULL") == [(True,)]
    stores = [open_store("postgresql", tmp_path / f"data{n}", database_url=pg_url) for n in (1, 2)]
    with pytest.raises(StoreError, match="not open"):
        stores[0].begin(_envelope("A1"))
    await asyncio.gather(*(store.start() for store in stores))
    try:
        assert rows(pg_url, "SELECT version FROM ehlo_schema") == [(LATEST,)]
        # Each writes through its own pool; one transaction per message here.
        for n, store in enumerate(stores):
            writer = store.begin(_envelope(f"B{n}"))
            writer.write(b"Subject: x\r\n\r\nx\r\n")
            assert await writer.commit() == f"B{n}"
        # The same id again fails alone (451), and the store keeps working.
        writer = stores[0].begin(_envelope("B1"))
        writer.write(b"again\r\n")
        with pytest.raises(StoreError, match="B1"):
            await writer.commit()
        writer = stores[0].begin(_envelope("B2"))
        writer.write(b"then\r\n")
        assert await writer.commit() == "B2"
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    assert rows(pg_url, "SELECT queue_id FROM messages ORDER BY queue_id") == [
        ("B0",),
        ("B1",),
        ("B2",),
    ]


async def test_batch_refusing_one_message_session_log_and_orphans(
    pg_url: str, tmp_path: Path
) -> None:
    store = open_store("postgresql", tmp_path / "data", database_url=pg_url)
    assert isinstance(store, PostgresStore)
    await store.start()
    try:
        writer = store.begin(_envelope("C0"))
        writer.write(b"first\r\n")
        assert await writer.commit() == "C0"
        # Handed over in one loop turn: one transaction; the id already
        # stored fails alone, the others are stored.
        commits = store.stats.commits
        futures = []
        for queue_id in ("C1", "C0", "C2"):
            writer = store.begin(_envelope(queue_id))
            writer.write(f"{queue_id}\r\n".encode())
            futures.append(writer.start_commit())
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        assert outcomes[0] == "C1" and outcomes[2] == "C2"
        assert isinstance(outcomes[1], StoreError) and "C0" in str(outcomes[1])
        assert store.stats.commits == commits + 1
        assert stored_body(pg_url, "C0") == b"first\r\n"

        # The session log keeps the newest ``keep``, trimmed now and then.
        for n in range(100):
            store.log_session(
                {"id": f"S{n}", "started_at": "t", "ended_at": "t", "client_ip": "192.0.2.1"},
                keep=5,
            )
        await async_wait_until(
            lambda: rows(pg_url, "SELECT count(*) FROM sessions") == [(5,)],
            "the session log trimmed to 5",
        )
        kept = rows(pg_url, "SELECT id, node FROM sessions ORDER BY seq DESC")
        assert kept == [(f"S{n}", store.node) for n in range(99, 94, -1)]

        # A body staged by a node that died before its commit goes after an hour.
        with psycopg.connect(pg_url) as conn:
            for queue_id, age in (("OLD", "2 hours"), ("NEW", "1 minute")):
                conn.execute(
                    "INSERT INTO staged (queue_id, node, started_at)"
                    " VALUES (%s, 'gone:1', now() - %s::interval)",
                    (queue_id, age),
                )
                conn.execute(
                    "INSERT INTO chunks (queue_id, seq, data) VALUES (%s, 0, 'x')", (queue_id,)
                )
        store._orphans_due = 0.0  # housekeeping looked at start; it looks again now
        await asyncio.to_thread(store.prune, Retention())
        assert rows(pg_url, "SELECT queue_id FROM staged") == [("NEW",)]
        assert rows(pg_url, "SELECT DISTINCT queue_id FROM chunks ORDER BY 1") == [
            ("C0",),
            ("C1",),
            ("C2",),
            ("NEW",),
        ]
    finally:
        await store.close()


def test_unreachable_database_stops_the_start(tmp_path: Path) -> None:
    url = f"postgresql://ehlo@127.0.0.1:{free_port()}/nowhere"
    store = open_store("postgresql", tmp_path / "data", database_url=url)
    with pytest.raises(StoreError) as failed:
        store.preflight()
    assert "\n" not in str(failed.value) and str(failed.value).startswith("postgresql: ")
    with pytest.raises(StoreError):
        ThreadedServer(_config(tmp_path / "data", url), delivery=False).start()
