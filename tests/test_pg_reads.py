"""The PostgreSQL store's reads against the SQLite store's, on the same messages.

The five messages of ``test_web_search`` (known envelopes and bodies) are
written into a SQLite store through its writer and into a throwaway
PostgreSQL database (``tests/pgserver.py``) as the PostgreSQL writer lays
them out: a ``messages`` row built by ``_pg_rows.message_values`` and the
body's chunk rows. Every read and every search operator, as written and
negated, with limits and paging both ways, must give the same answer from
both; the pages are made two rows long so that the keyset paging crosses
pages. Then, each on a database of its own: paging over equal receipt
times and a body of several chunks; ``newer`` over two transactions that
commit in the other order than they began (what a newest-row mark
misses); deletes (chunks and pending queue entries go with the message,
the other nodes are notified); retention keeping what is still queued;
the session log; the ``NOTIFY`` listener, also after its backend is
terminated; the web UI's live hub woken by the store's hint alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import pytest

from ehlo.storage import Envelope, Query, Store, open_store
from ehlo.storage import _pg_read as reads
from ehlo.storage._overview import overview_of
from ehlo.storage._pg_conn import Database
from ehlo.storage._pg_listen import CHANNELS, Listener
from ehlo.storage._pg_rows import INSERT_MESSAGE, message_values
from ehlo.storage._pg_schema import CHANNEL_MESSAGES, CHUNK_SIZE, migrate
from ehlo.storage._query import Retention, has_attachment
from ehlo.storage.base import HeaderSniffer, StoreError
from ehlo.storage.postgres import PostgresStore
from ehlo.web.live import LiveHub
from ehlo.web.search import parse_query

from .helpers import async_wait_until
from .pgserver import PgCluster
from .test_web_search import ALL, MESSAGES, T0, envelope, id_at, with_negations

SESSIONS = [
    {"id": f"S{i}", "started_at": f"2026-03-0{i + 1}T00:00:00+00:00",
     "ended_at": f"2026-03-0{i + 1}T00:00:01+00:00", "client_ip": "127.0.0.1", "n": i}
    for i in range(5)
]  # fmt: skip


def fresh_database(cluster: PgCluster) -> str:
    """A new database with the store's schema; its URL."""
    if not cluster.running:
        cluster.start()
    url = cluster.url(cluster.create_database())
    conn = Database(url).connect(autocommit=True)
    try:
        migrate(conn, "test")
    finally:
        conn.close()
    return url


@pytest.fixture(scope="module")
def scratch_url(pg_cluster: PgCluster) -> str:
    """One more database for the tests that write (each empties it first)."""
    return fresh_database(pg_cluster)


@pytest.fixture
def scratch(pg_cluster: PgCluster, scratch_url: str) -> Iterator[PostgresStore]:
    """A PostgreSQL store on the scratch database, emptied."""
    if not pg_cluster.running:
        pg_cluster.start()
    store = PostgresStore(scratch_url)
    with store.db.connection() as conn:
        conn.execute("TRUNCATE messages, chunks, queue, sessions")
    yield store
    store.db.close()


def put(conn: Any, env: Envelope, data: bytes, *, order: list[int] | None = None) -> None:
    """One committed message as the PostgreSQL writer lays it out (chunk rows in ``order``)."""
    head = HeaderSniffer()
    head.feed(data)
    pieces = [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]
    conn.execute(
        INSERT_MESSAGE,
        message_values(
            env,
            size=len(data),
            subject=head.subject(),
            attachments=has_attachment(data),
            chunks=len(pieces),
            node="test",
        ),
    )
    for seq in order if order is not None else range(len(pieces)):
        conn.execute(
            "INSERT INTO chunks (queue_id, seq, data) VALUES (%s, %s, %s)",
            (env.queue_id, seq, pieces[seq]),
        )


def plain(queue_id: str, when: dt.datetime, **changes: Any) -> Envelope:
    fields: dict[str, Any] = dict(
        queue_id=queue_id, client_ip="127.0.0.1", client_port=25000, mail_from="a@a.example",
        mail_params={}, rcpt_to=["b@b.example"], greeting="EHLO",
        greeting_name="client.example", received_at=when,
    )  # fmt: skip
    fields.update(changes)
    return Envelope(**fields)


async def _fill_sqlite(store: Store) -> None:
    await store.start()
    try:
        for i, (_, data) in enumerate(MESSAGES):
            writer = store.begin(envelope(i))
            writer.write(data)
            await writer.commit()
        for record in SESSIONS:
            store.log_session(record)
    finally:
        await store.close()


@pytest.fixture(scope="module")
def both(
    pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Store]]:
    """The messages in a SQLite store and in a PostgreSQL one (written once, then only read)."""
    sqlite = open_store("sqlite", tmp_path_factory.mktemp("sqlite"), writer="thread")
    asyncio.run(_fill_sqlite(sqlite))
    url = fresh_database(pg_cluster)
    pg = PostgresStore(url)
    with pg.db.connection() as conn:
        for i, (_, data) in enumerate(MESSAGES):
            put(conn, envelope(i), data)
        for record in SESSIONS:
            conn.execute(
                "INSERT INTO sessions (id, node, started_at, ended_at, client_ip, record)"
                " VALUES (%s, 'test', %s, %s, %s, %s)",
                (record["id"], record["started_at"], record["ended_at"], record["client_ip"],
                 json.dumps(record)),
            )  # fmt: skip
    yield {"sqlite": sqlite, "pg": pg}
    pg.db.close()


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short pages: five messages take two (three with words of the body)."""
    monkeypatch.setattr(reads, "PAGE", 3)
    monkeypatch.setattr(reads, "WORDS_PAGE", 2)


def numbers(store: Store, query: Query) -> list[int]:
    by_id = {envelope(i).queue_id: i for i in range(len(MESSAGES))}
    return [by_id[m.envelope.queue_id] for m in store.search(query)]


# --------------------------------------------------------------------------
# every query operator, as in the SQLite store


@pytest.mark.usefixtures("small_pages")
@pytest.mark.parametrize(("q", "expected"), with_negations(), ids=[q for q, _ in with_negations()])
def test_every_operator_selects_what_sqlite_selects(
    both: dict[str, Store], q: str, expected: list[int]
) -> None:
    query = parse_query(q)
    assert numbers(both["sqlite"], query) == expected  # the reference agrees with the case
    assert numbers(both["pg"], query) == expected
    for paged in (
        dataclasses.replace(query, limit=1),
        dataclasses.replace(query, before=envelope(ALL[1]).queue_id),
        dataclasses.replace(query, before=envelope(ALL[0]).queue_id, limit=2),
        dataclasses.replace(query, after=envelope(ALL[-1]).queue_id, limit=3),
        dataclasses.replace(
            query, after=envelope(ALL[-1]).queue_id, before=envelope(ALL[0]).queue_id
        ),
    ):
        assert numbers(both["pg"], paged) == numbers(both["sqlite"], paged), paged


@pytest.mark.usefixtures("small_pages")
def test_fields_of_a_query_the_language_does_not_write(both: dict[str, Store]) -> None:
    for query in (
        Query(since=T0 + dt.timedelta(days=1), until=T0 + dt.timedelta(days=3)),
        Query(since=(T0 + dt.timedelta(days=2)).replace(tzinfo=None)),  # naive: UTC
        Query(subject="M1", words=("INVOICE",)),
        Query(checks=(("forward_match", "fail"),), exclude=(Query(words=("banana",)),)),
        Query(rcpt_to="b.example\ndave"),  # across two recipients, as SQLite's column has it
        Query(exclude=(Query(words=("invoice",), tls=True),)),
        Query(words=("see",), exclude=(Query(words=("attached",), greeting="EHLO"),)),
        Query(words=("nowhere",)),
        Query(attachments=False, limit=1, after=envelope(0).queue_id),
        Query(limit=0),
        Query(after=envelope(ALL[-2]).queue_id),
        Query(words=("e",), after=envelope(ALL[-1]).queue_id, limit=2),
    ):
        assert numbers(both["pg"], query) == numbers(both["sqlite"], query), query


def test_unknown_page_bounds_are_refused_as_sqlite_refuses_them(both: dict[str, Store]) -> None:
    for query in (Query(before="0000000000000000"), Query(after="nope", limit=0),
                  Query(words=("x",), before="nope")):  # fmt: skip
        with pytest.raises(StoreError) as sqlite_error:
            list(both["sqlite"].search(query))
        with pytest.raises(StoreError) as pg_error:
            list(both["pg"].search(query))
        assert type(pg_error.value) is type(sqlite_error.value)
        assert str(pg_error.value) == str(sqlite_error.value)


# --------------------------------------------------------------------------
# the other reads


def test_list_get_raw_read_count_agree(both: dict[str, Store]) -> None:
    sqlite, pg = both["sqlite"], both["pg"]
    assert pg.list() == sqlite.list()
    assert pg.list(2) == sqlite.list(2)
    assert pg.list(0) == []
    assert pg.count() == sqlite.count() == len(MESSAGES)
    for i, (_, data) in enumerate(MESSAGES):
        queue_id = envelope(i).queue_id
        message = pg.get(queue_id)
        assert message == sqlite.get(queue_id)
        assert message is not None and message.envelope.received_at.tzinfo == dt.UTC
        assert message.envelope.received_at == envelope(i).received_at
        assert pg.raw(queue_id) == sqlite.raw(queue_id) == data
        assert pg.read(queue_id) == (message, data)
        # (SQLite's read, for delivery, leaves out the attachment flag.)
        from_sqlite = sqlite.read(queue_id)
        assert from_sqlite is not None and from_sqlite[0].envelope == message.envelope
    assert [m.attachments for m in pg.list()] == [True, False, False, True, False]
    assert pg.get("0000000000000000") is None
    assert pg.raw("0000000000000000") is None
    assert pg.read("0000000000000000") is None


def test_overview_equals_sqlite_and_the_generic_count(both: dict[str, Store]) -> None:
    for since in (T0 - dt.timedelta(days=1), T0 + dt.timedelta(days=2), T0 + dt.timedelta(days=9)):
        found = both["pg"].overview(since)
        assert found == both["sqlite"].overview(since)
        assert found == overview_of(both["sqlite"].search(Query(since=since)), since)
    whole = both["pg"].overview(T0)
    assert whole.total == 5
    assert ("mx.a.example", 2) in whole.top_names  # names counted case-insensitively
    assert whole.checks == {"forward_match": {"pass": 1, "fail": 2}}


def test_sessions_newest_first_and_paged(both: dict[str, Store]) -> None:
    sqlite, pg = both["sqlite"], both["pg"]
    assert [r["id"] for r in pg.sessions(2)] == ["S4", "S3"]
    assert pg.sessions(2) == sqlite.sessions(2)
    assert pg.sessions(2, before="S3") == sqlite.sessions(2, before="S3")
    assert [r["id"] for r in pg.sessions(10, before="S1")] == ["S0"]
    assert pg.sessions(50) == sqlite.sessions(50)
    with pytest.raises(StoreError, match="no session with id 'S9'"):
        pg.sessions(2, before="S9")


# --------------------------------------------------------------------------
# paging over equal times, bodies of several chunks


def test_keyset_pages_both_ways_over_equal_times_and_long_bodies(
    scratch: PostgresStore, small_pages: None
) -> None:
    store = scratch
    envelopes = []
    with store.db.connection() as conn:
        for n in range(9):
            when = T0 + dt.timedelta(seconds=n // 3)  # three messages per moment
            env = plain(id_at(when, 1000 - n), when)  # ids against the order of writing
            envelopes.append(env)
            put(conn, env, b"Subject: s\r\n\r\nx\r\n")
        big = plain(id_at(T0 - dt.timedelta(days=1), 1), T0 - dt.timedelta(days=1))
        body = b"Subject: big\r\n\r\n" + bytes(range(256)) * (2 * CHUNK_SIZE // 256 + 7)
        put(conn, big, body, order=[2, 0, 1])  # rows written in any order
    order = sorted(envelopes, key=lambda e: (e.received_at, e.queue_id), reverse=True)
    newest_first = [e.queue_id for e in order] + [big.queue_id]
    assert [m.envelope.queue_id for m in store.search(Query())] == newest_first
    # Down, a page of three at a time after the last one's id...
    seen: list[str] = []
    page = [m.envelope.queue_id for m in store.search(Query(limit=3))]
    while page:
        seen += page
        page = [m.envelope.queue_id for m in store.search(Query(limit=3, before=page[-1]))]
    assert seen == newest_first
    # ...and up, a page of three just newer than the first one's id.
    seen = [big.queue_id]
    page = [m.envelope.queue_id for m in store.search(Query(limit=3, after=seen[0]))]
    while page:
        seen = page + seen
        page = [m.envelope.queue_id for m in store.search(Query(limit=3, after=page[0]))]
    assert seen == newest_first
    assert store.raw(big.queue_id) == body
    found = store.read(big.queue_id)
    assert found is not None and found[1] == body and found[0].size == len(body)
    # A body whose chunk rows do not add up is an error, not a short body.
    with store.db.connection() as conn:
        conn.execute("DELETE FROM chunks WHERE queue_id = %s AND seq = 1", (big.queue_id,))
    with pytest.raises(StoreError, match="expected"):
        store.raw(big.queue_id)


# --------------------------------------------------------------------------
# newer: what committed since the mark, whatever order transactions began in


def test_newer_sees_a_transaction_that_began_first_and_committed_last(
    scratch: PostgresStore,
) -> None:
    store = scratch
    with store.db.connection() as conn:
        put(conn, plain("0" * 15 + "1", T0), b"x")
    assert store.newer(None)[0] == []
    assert store.newer_ids(None)[0] == []
    _, mark = store.newer(None)
    _, id_mark = store.newer_ids(None)
    first, second = "1" * 16, "2" * 16
    slow = store.db.connect()  # T1: writes first, commits last
    quick = store.db.connect()  # T2
    try:
        put(slow, plain(first, T0 + dt.timedelta(seconds=1)), b"one")
        put(quick, plain(second, T0 + dt.timedelta(seconds=2)), b"two")
        quick.commit()
        news, mark = store.newer(mark)
        ids, id_mark = store.newer_ids(id_mark)
        assert [m.envelope.queue_id for m in news] == [second] == list(ids)
        assert store.newer(mark)[0] == []  # asked again: nothing new
        slow.commit()
    finally:
        slow.close()
        quick.close()
    news, mark = store.newer(mark)
    ids, id_mark = store.newer_ids(id_mark)
    assert [m.envelope.queue_id for m in news] == [first] == list(ids)
    assert news[0].subject is None and news[0].size == 3
    assert store.newer(mark)[0] == [] and store.newer_ids(id_mark)[0] == []
    # A deleted message is not new; one written after it is.
    store.delete([first])
    with store.db.connection() as conn:
        put(conn, plain("3" * 16, T0), b"three")
    assert [m.envelope.queue_id for m in store.newer(mark)[0]] == ["3" * 16]
    # A mark of another store counts as none.
    assert store.newer(frozenset({"x"}))[0] == []
    assert store.newer_ids(object())[0] == []


# --------------------------------------------------------------------------
# deletes and retention


def _queue_row(queue_id: str, recipient: str, state: str) -> tuple[Any, ...]:
    return (queue_id, recipient, "mx:b.example", state, 0, 0.0, 0.0, 0.0, False)


def _add_queue(conn: Any, rows: list[tuple[Any, ...]]) -> None:
    for row in rows:
        conn.execute(
            "INSERT INTO queue (queue_id, recipient, next_hop, state, attempts, next_attempt,"
            " created, updated, delay_notified) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            row,
        )


def test_delete_takes_chunks_and_pending_entries_and_notifies(
    scratch: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reads, "DELETE_BATCH", 2)  # several transactions
    store = scratch
    listen = store.db.connect(autocommit=True)
    try:
        listen.execute(f"LISTEN {CHANNEL_MESSAGES}")
        ids = [id_at(T0 + dt.timedelta(minutes=n), n) for n in range(5)]
        with store.db.connection() as conn:
            for n, queue_id in enumerate(ids):
                body = b"Subject: s\r\n\r\n" + b"y" * CHUNK_SIZE  # two chunk rows
                put(conn, plain(queue_id, T0 + dt.timedelta(minutes=n)), body)
            _add_queue(conn, [
                _queue_row(ids[0], "a@x", "queued"), _queue_row(ids[0], "b@x", "delivering"),
                _queue_row(ids[0], "c@x", "delivered"), _queue_row(ids[1], "a@x", "held"),
                _queue_row(ids[4], "a@x", "deferred"),
            ])  # fmt: skip
            # The chunks of a body being written, its message not committed yet.
            conn.execute("INSERT INTO chunks VALUES ('ZZZZZZZZZZZZZZZZ', 0, 'x')")
        assert store.delete([ids[1], "ZZZZZZZZZZZZZZZZ", ids[0], ids[1], ids[2]]) == [
            ids[1],
            ids[0],
            ids[2],
        ]
        with store.db.connection() as conn:
            left = conn.execute("SELECT DISTINCT queue_id FROM chunks ORDER BY 1").fetchall()
            queued = conn.execute("SELECT queue_id, state FROM queue ORDER BY 1").fetchall()
        assert [r[0] for r in left] == [ids[3], ids[4], "ZZZZZZZZZZZZZZZZ"]
        assert queued == [(ids[0], "delivered"), (ids[4], "deferred")]  # the history stays
        notices = list(listen.notifies(timeout=5, stop_after=2))
        assert [(n.channel, n.payload) for n in notices] == [(CHANNEL_MESSAGES, "")] * 2
        assert store.delete([ids[0]]) == []
        assert store.count() == 2
        # By a query, in batches, oldest first; words read the bodies.
        assert store.delete_matching(Query(words=("nowhere",))) == 0
        assert store.delete_matching(Query(words=("yyy",))) == 2
        assert store.count() == 0
        assert store.queue is not None
    finally:
        listen.close()


def test_prune_keeps_what_is_queued_and_delete_matching_goes_in_batches(
    scratch: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reads, "DELETE_BATCH", 2)
    store = scratch
    now = dt.datetime.now(dt.UTC)
    # Message n received 10.5 - n days ago: 0 to 3 are older than 7 days.
    ids = [id_at(now - dt.timedelta(days=10 - n, hours=12), n) for n in range(8)]
    with store.db.connection() as conn:
        for n, queue_id in enumerate(ids):
            when = now - dt.timedelta(days=10 - n, hours=12)
            put(conn, plain(queue_id, when, greeting="HELO" if n % 2 else "EHLO"), b"z")
        _add_queue(conn, [
            _queue_row(ids[0], "a@x", "queued"), _queue_row(ids[1], "a@x", "delivered"),
            _queue_row(ids[5], "a@x", "held"),
        ])  # fmt: skip
    # Older than 7 days and not to be handed on: 1, 2 and 3 (0 is still queued).
    with store.db.connection() as conn:
        assert reads.prune(conn, Retention(keep_days=7), 10) == 3
        assert reads.prune(conn, Retention(keep_days=7), 10) == 0
    # The newest 3 kept, counting those still queued: 2 go, the oldest unqueued.
    with store.db.connection() as conn:
        assert reads.prune(conn, Retention(keep_messages=3), 10) == 2
        assert reads.prune(conn, Retention(), 10) == 0
    left = [m.envelope.queue_id for m in store.search(Query())]
    assert left == [ids[7], ids[5], ids[0]]
    # The limit holds.
    with store.db.connection() as conn:
        assert reads.prune(conn, Retention(keep_messages=1), 1) == 1
    assert store.delete_matching(Query(greeting="HELO")) == 1  # 5; 7 was pruned
    assert [m.envelope.queue_id for m in store.search(Query())] == [ids[0]]


# --------------------------------------------------------------------------
# LISTEN: notices, and after the connection is taken away


async def test_listener_hears_notices_and_comes_back_after_termination(
    pg_cluster: PgCluster, scratch_url: str
) -> None:
    url = scratch_url
    heard: list[tuple[str, str]] = []
    listener = Listener(url, lambda channel, payload: heard.append((channel, payload)))
    db = Database(url)
    await listener.start()
    try:

        def notify(channel: str, payload: str) -> None:
            with db.connection() as conn:
                conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

        await asyncio.to_thread(notify, CHANNEL_MESSAGES, "ABC")
        await asyncio.to_thread(notify, "ehlo_queue", "")
        await async_wait_until(lambda: len(heard) >= 2, "two notices", timeout=30)
        assert heard == [(CHANNEL_MESSAGES, "ABC"), ("ehlo_queue", "")]
        heard.clear()

        def terminate() -> int:
            with db.connection() as conn:
                row = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = 'ehlo-listen' AND datname = current_database()"
                ).fetchone()
                return int(row[0])

        assert await asyncio.to_thread(terminate) == 1
        # Back on a new connection: every channel is worth a look...
        await async_wait_until(lambda: len(heard) >= len(CHANNELS), "the reconnection", 30)
        assert heard == [(channel, "") for channel in CHANNELS]
        assert listener.connections == 2
        # ...and notices come again.
        await asyncio.to_thread(notify, CHANNEL_MESSAGES, "DEF")
        await async_wait_until(lambda: (CHANNEL_MESSAGES, "DEF") in heard, "a notice", 30)
    finally:
        await listener.close()
        db.close()
    assert not listener.connected
    with pytest.raises(StoreError, match=r"^postgresql: listen: "):
        await Listener(url.replace(f"port={pg_cluster.port}", "port=1"), print).start()


# --------------------------------------------------------------------------
# the web UI's live hub, woken by the store's hint


async def test_live_hub_asks_at_once_when_the_store_hints(scratch: PostgresStore) -> None:
    store = scratch
    # Polls a minute apart: only the hint can make the hub ask soon.
    hub = LiveHub(store, fast=60.0, slow=60.0, clock=lambda: 0.0)

    def hint(channel: str, payload: str) -> None:  # what the store does with a notice
        if channel == CHANNEL_MESSAGES:
            for callback in store._listeners:
                callback("messages")

    def write(queue_id: str) -> None:
        with store.db.connection() as conn:
            put(conn, plain(queue_id, T0), b"x")
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL_MESSAGES, queue_id))

    listener = Listener(store.url, hint)
    await listener.start()
    await hub.start()
    try:
        await asyncio.to_thread(write, "4" * 16)
        await async_wait_until(lambda: hub.seq >= 1, "the hub's event", timeout=30)
        assert [e.queue_id for e in hub.events] == ["4" * 16]
        await asyncio.to_thread(write, "5" * 16)
        await async_wait_until(lambda: hub.seq >= 2, "the second event", timeout=30)
        assert [e.queue_id for e in hub.events] == ["4" * 16, "5" * 16]
    finally:
        await hub.close()
        await listener.close()
