"""The outbound queue on PostgreSQL, shared by several nodes.

A real PostgreSQL (``pg_cluster``), one database for the module, emptied
before each test. Messages and their queue rows are inserted with SQL as
the store's writer inserts them (``_pg_rows`` and ``QueueItem.row``); each
"node" is a :class:`PostgresQueue` of its own (its own pool and lease
token), as each ``ehlo serve`` node has. The Queue contract is proven as
for the SQLite store (tests/test_storage_queue.py), then what several nodes
add: every entry taken once (``FOR UPDATE SKIP LOCKED``), leases that
expire and pass to another node (whose late outcome is then refused),
renewals that keep them, recovery that leaves live leases alone, one
housekeeper at a time, ``NOTIFY`` waking another node's scheduler through
its store's listener, two schedulers relaying to one next hop, each
message delivered once, and two servers doing the same from SMTP in.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from ehlo.delivery import scheduler as scheduler_module
from ehlo.delivery.routes import Routing
from ehlo.delivery.scheduler import DeliverySettings, Scheduler
from ehlo.dns import Resolver
from ehlo.storage import Envelope, StoreError
from ehlo.storage._pg_conn import Database
from ehlo.storage._pg_queue import PostgresQueue
from ehlo.storage._pg_rows import INSERT_MESSAGE, message_values
from ehlo.storage._pg_schema import CHANNEL_QUEUE, migrate
from ehlo.storage.postgres import PostgresStore
from ehlo.storage.queue import Attempt, EntryUpdate, QueueItem

from .pgserver import PgCluster
from .test_delivery_hops import SINK_IP, Hop
from .test_storage import make_envelope
from .test_storage_queue import queue_id_at, reply

BODY = b"Subject: out\r\n\r\nbody\r\n"


# ------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def module_url(pg_cluster: PgCluster) -> str:
    """One database with the schema for this module's tests (each empties it first)."""
    if not pg_cluster.running:  # a test before this one stopped it and failed
        pg_cluster.start()
    url = pg_cluster.url(pg_cluster.create_database())
    database = Database(url)
    conn = database.connect(autocommit=True)
    try:
        migrate(conn, "test")
    finally:
        conn.close()
    return url


@pytest.fixture
def pg_url(module_url: str) -> str:
    return module_url


@pytest.fixture
def db(pg_url: str) -> Iterator[Database]:
    """The module's database, emptied, and a pool of this process's."""
    database = Database(pg_url)
    with database.connection() as conn:
        conn.execute("TRUNCATE queue, attempts, messages, chunks")
    yield database
    database.close()


@pytest.fixture
def nodes(pg_url: str, db: Database) -> Iterator[Callable[..., PostgresQueue]]:
    """Make queues of further nodes on the test's database (each with its own pool)."""
    made: list[tuple[PostgresQueue, Database]] = []

    def node(name: str, lease: float = 300.0) -> PostgresQueue:
        other = Database(pg_url)
        queue = PostgresQueue(other, name, lease)
        made.append((queue, other))
        return queue

    yield node
    for queue, other in made:
        queue.close()
        other.close()


def insert(
    db: Database,
    *recipients: str,
    at: dt.datetime | None = None,
    notify: str | None = None,
    hop: str | None = None,
    body: bytes = BODY,
) -> str:
    """One message with queue entries for ``recipients``, as the writer commits it."""
    moment = at or dt.datetime.now(dt.UTC)
    items = [QueueItem(r, hop or f"mx:{r.rpartition('@')[2]}", notify=notify) for r in recipients]
    envelope = make_envelope(
        queue_id=queue_id_at(moment), rcpt_to=list(recipients), received_at=moment, queue=items
    )
    return commit(db, envelope, body)


def commit(db: Database, envelope: Envelope, body: bytes) -> str:
    values = message_values(
        envelope, size=len(body), subject="out", attachments=False, chunks=1, node="test"
    )
    now = envelope.received_at.timestamp()
    with db.connection() as conn:
        conn.execute(INSERT_MESSAGE, values)
        conn.execute(
            "INSERT INTO chunks (queue_id, seq, data) VALUES (%s, 0, %s)",
            (envelope.queue_id, body),
        )
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO queue (queue_id, recipient, next_hop, state, attempts,"
                " next_attempt, created, notify, orcpt, last_reply, updated, delay_notified,"
                " request) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    (*row[:11], bool(row[11]), row[12])
                    for row in (item.row(envelope.queue_id, now) for item in envelope.queue)
                ],
            )
    return envelope.queue_id


def states(queue: PostgresQueue, queue_id: str) -> dict[str, str]:
    return {e.recipient: e.state for e in queue.entries(queue_ids=[queue_id])}


def scalar(db: Database, sql: str, *params: Any) -> Any:
    with db.connection() as conn:
        row = conn.execute(sql, params).fetchone()
    return row[0] if row else None


def wait(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


# ------------------------------------------------------------ the Queue contract


def test_entries_due_claim_record_and_attempts(db: Database, nodes: Any) -> None:
    queue = nodes("a")
    before = time.time()
    queue_id = insert(db, "b@example.net", "a@example.org", "c@example.net", notify="FAILURE")
    found = queue.entries()
    assert [(e.recipient, e.state, e.attempts, e.notify) for e in found] == [
        ("a@example.org", "queued", 0, "FAILURE"),
        ("b@example.net", "queued", 0, "FAILURE"),
        ("c@example.net", "queued", 0, "FAILURE"),
    ]
    now = time.time()
    assert len(queue.due(now, 2)) == 2 and queue.due(before - 60, 10) == []
    next_due = queue.next_due()
    assert next_due is not None and next_due <= now
    assert queue.counts() == {"queued": 3}
    assert queue.pending([queue_id, "nosuchid"]) == {queue_id}
    queue.claim(queue.due(now, 10))
    assert queue.due(now + 1, 10) == [] and queue.counts() == {"delivering": 3}
    assert queue.next_due() is None
    first = Attempt(queue_id, now, "mx:example.net", "mx[192.0.2.1]:25", {}, "S: 220 first\n")
    queue.record(
        [
            EntryUpdate(queue_id, "a@example.org", "delivered", now, reply(250)),
            EntryUpdate(queue_id, "b@example.net", "deferred", now + 300, reply(451, "later")),
            EntryUpdate(queue_id, "c@example.net", "bounced", now, reply(550, "no")),
        ],
        [first],
    )
    assert states(queue, queue_id) == {
        "a@example.org": "delivered",
        "b@example.net": "deferred",
        "c@example.net": "bounced",
    }
    # Leaving "delivering" clears the lease's expiry.
    assert scalar(db, "SELECT count(*) FROM queue WHERE lease_until IS NOT NULL") == 0
    assert queue.due(now + 299, 10) == []
    [later] = queue.due(now + 300, 10)
    assert (later.attempts, later.last_reply) == (1, reply(451, "later"))
    assert queue.next_due() == pytest.approx(now + 300)
    second = Attempt(queue_id, now + 300, "mx:example.net", "", {"b": {"code": 0}}, "refused\n")
    queue.record(
        [EntryUpdate(queue_id, "b@example.net", "deferred", now + 900, None, delay_notified=True)],
        [second],
    )
    [entry] = queue.entries(queue_ids=[queue_id], state="deferred")
    assert entry.attempts == 2 and entry.last_reply == reply(451, "later") and entry.delay_notified
    assert [(a.at, a.host, a.transcript, a.results) for a in queue.attempts(queue_id)] == [
        (now, "mx[192.0.2.1]:25", "S: 220 first\n", {}),
        (now + 300, "", "refused\n", {"b": {"code": 0}}),
    ]
    assert scalar(db, "SELECT DISTINCT node FROM attempts") == "a"
    queue.record([EntryUpdate(queue_id, "b@example.net", "delivered", now, reply(250))])
    assert queue.finished_messages([queue_id, "nosuchid"]) == [queue_id]
    assert queue.pending([queue_id]) == set()
    assert queue.counts() == {"delivered": 2, "bounced": 1}


def test_entries_order_filters_and_paging(db: Database, nodes: Any) -> None:
    queue = nodes("a")
    t0 = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    ids = [
        insert(db, f"u{i}@example.net", f"Other{i}@Example.org", at=t0 + dt.timedelta(seconds=i))
        for i in range(4)
    ]
    assert [e.queue_id for e in queue.entries()] == [q for q in reversed(ids) for _ in range(2)]
    assert [e.recipient for e in queue.entries(queue_ids=[ids[0]])] == [
        "Other0@Example.org",
        "u0@example.net",
    ]
    assert [e.recipient for e in queue.entries(recipient="other2@EXAMPLE")] == [
        "Other2@Example.org"
    ]
    queue.hold([ids[1]])
    assert {e.queue_id for e in queue.entries(state="held")} == {ids[1]}
    assert [e.queue_id for e in queue.entries(state="queued", limit=3)] == [ids[3], ids[3], ids[2]]
    pages: list[list[str]] = []
    before: str | None = None
    for _ in range(10):
        page = queue.entries(limit=2, before=before)
        if not page:
            break
        pages.append([e.recipient for e in page])
        before = page[-1].queue_id
    assert pages == [[f"Other{i}@Example.org", f"u{i}@example.net"] for i in (3, 2, 1, 0)]
    assert queue.entries(before=ids[1], state="queued") == queue.entries(queue_ids=[ids[0]])
    assert queue.entries(queue_ids=[]) == []
    with pytest.raises(StoreError, match="no queued message"):
        queue.entries(before="nosuchid")


def test_retry_hold_release_remove_and_request_bounce(db: Database, nodes: Any) -> None:
    queue = nodes("a")
    now = time.time()
    a = insert(db, "a@example.net")
    b = insert(db, "b@example.net")
    c = insert(db, "c@example.net")
    assert len(queue.take(now + 1, 10)) == 3
    queue.record(
        [
            EntryUpdate(a, "a@example.net", "deferred", now + 3600, reply(421)),
            EntryUpdate(b, "b@example.net", "deferred", now + 3600, reply(421)),
        ]
    )
    assert queue.due(now + 1, 10) == []  # c is delivering
    assert queue.retry([a], now) == 1
    [retried] = queue.due(now, 10)
    assert (retried.queue_id, retried.request) == (a, "retry")
    assert queue.retry(None, now) == 2  # a and b; c is delivering
    assert queue.hold([a, c]) == 1  # not the one being delivered
    assert queue.hold([a]) == 0 and queue.retry([a], now) == 0
    assert [e.queue_id for e in queue.due(now, 10)] == [b]
    assert queue.release([a, b], now + 5) == 1
    [released] = queue.entries(queue_ids=[a])
    assert (released.state, released.next_attempt) == ("queued", now + 5)
    assert queue.remove([a, c]) == 1  # c is being delivered: it stays
    assert queue.entries(queue_ids=[a]) == [] and states(queue, c) == {
        "c@example.net": "delivering"
    }
    assert queue.remove([]) == 0 and queue.hold([]) == 0 and queue.release([], now) == 0
    # A bounce asked for: pending entries are queued now with the request.
    queue.hold([b])
    assert queue.request_bounce([b, c], now + 1) == 1  # c is delivering
    [asked] = queue.entries(queue_ids=[b])
    assert (asked.state, asked.next_attempt, asked.request) == ("queued", now + 1, "bounce")
    queue.record([EntryUpdate(b, "b@example.net", "bounced", now + 1, reply(0, "asked"))])
    [bounced] = queue.entries(queue_ids=[b])
    assert (bounced.state, bounced.request) == ("bounced", None)
    assert queue.counts() == {"bounced": 1, "delivering": 1}


def test_set_next_hop_and_expire_history(db: Database, nodes: Any) -> None:
    queue = nodes("a")
    now = time.time()
    done = insert(db, "a@example.net")
    busy = insert(db, "b@example.net", "c@example.net")
    queue.set_next_hop(busy, "c@example.net", "smtp:relay.example:2525")
    assert {e.recipient: e.next_hop for e in queue.entries(queue_ids=[busy])} == {
        "b@example.net": "mx:example.net",
        "c@example.net": "smtp:relay.example:2525",
    }
    for queue_id in (done, busy):
        queue.record(
            [
                EntryUpdate(queue_id, r, "delivered", now, reply(250))
                for r in ("a@example.net", "b@example.net")
            ],
            [Attempt(queue_id, now - 10, "mx:example.net", "mx:25", {}, "t\n")],
        )
    assert queue.expire_history(now - 3600) == 0
    assert queue.expire_history(time.time() + 1) == 2
    assert queue.entries(queue_ids=[done]) == [] and queue.attempts(done) == []
    assert states(queue, busy) == {"c@example.net": "queued"}
    assert len(queue.attempts(busy)) == 1  # still pending: kept for ``queue show``


def test_record_and_forget_removes_the_finished_messages_itself(db: Database, nodes: Any) -> None:
    queue = nodes("a")
    now = time.time()
    finished = insert(db, "a@example.net")
    waiting = insert(db, "b@example.net", "c@example.net")
    queue.take(now + 1, 10)
    assert (
        queue.record_and_forget(
            [
                EntryUpdate(finished, "a@example.net", "delivered", now, reply(250)),
                EntryUpdate(waiting, "b@example.net", "delivered", now, reply(250)),
            ],
            [Attempt(finished, now, "mx:example.net", "mx:25", {}, "t\n")],
            [finished, waiting, "nosuchid"],
        )
        == []
    )
    for table in ("messages", "chunks"):
        assert scalar(db, f"SELECT array_agg(queue_id) FROM {table}") == [waiting], table
    assert states(queue, finished) == {"a@example.net": "delivered"}  # the history stays
    assert len(queue.attempts(finished)) == 1


# ------------------------------------------------------------ several nodes


def test_two_nodes_take_500_due_entries_each_exactly_once(db: Database, nodes: Any) -> None:
    now = time.time()
    with db.connection() as conn, conn.cursor() as cursor:
        # One message of 500 recipients: the rows the writer would insert.
        envelope = make_envelope(queue=[], rcpt_to=["x@example.net"])
        conn.execute(
            INSERT_MESSAGE,
            message_values(envelope, size=1, subject=None, attachments=None, chunks=0, node="t"),
        )
        cursor.executemany(
            "INSERT INTO queue (queue_id, recipient, next_hop, state, attempts, next_attempt,"
            " created, updated, delay_notified) VALUES (%s, %s, 'mx:example.net', 'queued',"
            " 0, %s, %s, %s, false)",
            [(envelope.queue_id, f"u{i:03}@example.net", now - i, now, now) for i in range(500)],
        )
    a, b = nodes("a"), nodes("b")
    taken: dict[str, list[str]] = {"a": [], "b": []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run(name: str, queue: PostgresQueue) -> None:
        try:
            start.wait(30)
            for _ in range(200):
                got = queue.take(now + 1, 7)
                if not got:
                    break
                taken[name].extend(e.recipient for e in got)
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in (("a", a), ("b", b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    every = taken["a"] + taken["b"]
    assert len(every) == 500 and len(set(every)) == 500
    assert taken["a"] and taken["b"], "both nodes took some"
    assert a.counts() == {"delivering": 500}
    with db.connection() as conn:
        tokens = dict(
            conn.execute("SELECT lease_token, count(*) FROM queue GROUP BY lease_token").fetchall()
        )
    assert tokens == {a.token: len(taken["a"]), b.token: len(taken["b"])}


def test_an_expired_lease_passes_to_another_node_whose_outcome_alone_counts(
    db: Database, nodes: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "ehlo.storage")
    a, b = nodes("a", lease=2.0), nodes("b", lease=60.0)
    queue_id = insert(db, "x@example.net", "y@example.net")
    now = time.time()
    held = a.take(now + 1, 10)
    assert [(e.recipient, e.state) for e in held] == [
        ("x@example.net", "queued"),
        ("y@example.net", "queued"),
    ]
    assert b.take(now + 1, 10) == []  # A's lease is live
    assert a.renew(held) == 2
    # A stops renewing (dead, or cut off from the database): B takes them over.
    got: list[Any] = []
    wait(lambda: got.extend(b.take(time.time(), 10)) or got, "B to take the expired entries")
    assert sorted((e.recipient, e.state) for e in got) == [
        ("x@example.net", "queued"),
        ("y@example.net", "queued"),
    ]
    [over] = events(caplog, "queue_lease_taken_over")
    assert over.count == 2  # type: ignore[attr-defined]
    assert a.renew(held) == 0 and b.renew(got) == 2
    # A's late outcome changes nothing; B's is recorded.
    a.record(
        [EntryUpdate(queue_id, e.recipient, "delivered", now, reply(250)) for e in held],
        [Attempt(queue_id, now, "mx:example.net", "late", {}, "late\n")],
    )
    assert states(a, queue_id) == {"x@example.net": "delivering", "y@example.net": "delivering"}
    [lost] = events(caplog, "queue_lease_lost")
    assert lost.count == 2  # type: ignore[attr-defined]
    b.record([EntryUpdate(queue_id, "x@example.net", "deferred", now + 60, reply(421))])
    b.record([EntryUpdate(queue_id, "y@example.net", "delivered", now, reply(250))])
    assert states(a, queue_id) == {"x@example.net": "deferred", "y@example.net": "delivered"}
    # Still too late once B has finished: A's outcome never overwrites B's.
    a.record([EntryUpdate(queue_id, "x@example.net", "delivered", now, reply(250))])
    assert states(a, queue_id) == {"x@example.net": "deferred", "y@example.net": "delivered"}
    assert len(events(caplog, "queue_lease_lost")) == 2


def test_renewing_keeps_the_lease(
    db: Database, nodes: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "ehlo.storage")
    a, b = nodes("a", lease=2.0), nodes("b")
    insert(db, "x@example.net")
    held = a.take(time.time() + 1, 10)
    assert len(held) == 1
    deadline = time.monotonic() + 3.0  # longer than the lease
    while time.monotonic() < deadline:
        assert a.renew(held) == 1
        assert b.take(time.time() + 1, 10) == []
        time.sleep(0.4)
    assert scalar(db, "SELECT lease_token FROM queue") == a.token
    # Not renewed in time, A's own lease is A's to take again: no takeover.
    again: list[Any] = []
    wait(lambda: again.extend(a.take(time.time() + 1, 10)) or again, "A to take it again")
    assert [e.key for e in again] == [e.key for e in held]
    assert events(caplog, "queue_lease_taken_over") == []


def test_recover_leaves_live_leases_alone(db: Database, nodes: Any) -> None:
    a, b = nodes("a"), nodes("b")
    first = insert(db, "x@example.net", "y@example.net")
    insert(db, "z@example.net")
    assert len(a.take(time.time() + 1, 10)) == 3
    assert b.recover() == 0  # A is delivering them
    assert a.counts() == {"delivering": 3}
    with db.connection() as conn:  # A died: one lease ran out; one has none (an import)
        conn.execute(
            "UPDATE queue SET lease_until = 0 WHERE queue_id = %s AND recipient = %s",
            (first, "x@example.net"),
        )
        conn.execute(
            "UPDATE queue SET lease_until = NULL WHERE queue_id = %s AND recipient = %s",
            (first, "y@example.net"),
        )
    assert b.recover() == 2 and b.recover() == 0
    assert states(b, first) == {"x@example.net": "queued", "y@example.net": "queued"}
    assert a.counts() == {"delivering": 1, "queued": 2}


def test_one_housekeeper_at_a_time(db: Database, nodes: Any) -> None:
    a, b = nodes("a"), nodes("b")
    assert a.housekeeper() is True
    assert b.housekeeper() is False
    assert a.housekeeper() is True and b.housekeeper() is False
    a.close()  # A stops (or dies: its connection drops)
    wait(b.housekeeper, "B to become the housekeeper")
    assert a.housekeeper() is False
    assert b.housekeeper() is True


def test_changes_that_make_entries_due_notify_the_other_nodes(db: Database, nodes: Any) -> None:
    queue = nodes("a")
    a = insert(db, "a@example.net")
    listener = db.connect(autocommit=True)
    try:
        listener.execute(f"LISTEN {CHANNEL_QUEUE}")

        def heard() -> int:
            return sum(1 for _ in listener.notifies(timeout=0.2, stop_after=10))

        assert queue.hold([a]) == 1 and heard() == 0  # nothing became due
        assert queue.release([a], time.time()) == 1 and heard() == 1
        assert queue.retry([a], time.time()) == 1 and heard() == 1
        assert queue.request_bounce([a], time.time()) == 1 and heard() == 1
        queue.take(time.time() + 1, 10)
        assert heard() == 0
        queue.record([EntryUpdate(a, "a@example.net", "queued", time.time(), None, False)])
        assert heard() == 1
    finally:
        listener.close()


# ------------------------------------------------------------ schedulers on one database


def _no_resolver() -> Resolver:
    raise AssertionError("next hops here are addresses: nothing to look up")


@contextlib.asynccontextmanager
async def schedulers(
    pg_url: str, *names: str, lease: float = 300.0
) -> AsyncIterator[list[tuple[PostgresStore, Scheduler]]]:
    """A started store (its listener hears NOTIFY) and a scheduler on it, per node."""
    settings = DeliverySettings(hostname="relay.test", routing=Routing(), lease=lease)
    made: list[tuple[PostgresStore, Scheduler]] = []
    try:
        for name in names:
            store = PostgresStore(pg_url, node=name)
            await store.start()
            scheduler = Scheduler(store, settings, _no_resolver)
            made.append((store, scheduler))
            await scheduler.start()
        yield made
    finally:
        for store, scheduler in made:
            await scheduler.stop(grace=5)
            await store.close()


def relayed(db: Database, recipient: str, port: int) -> str:
    """One message to hand on to the next hop on ``port``; its queue id."""
    envelope = make_envelope(
        rcpt_to=[recipient], queue=[QueueItem(recipient, f"smtp:{SINK_IP}:{port}")]
    )
    return commit(db, envelope, BODY)


async def test_two_schedulers_deliver_each_message_once(db: Database, pg_url: str) -> None:
    sink = await Hop().start()

    def queued(numbers: range) -> None:
        for i in numbers:
            relayed(db, f"u{i}@sink.test", sink.port)

    try:
        queued(range(30))  # due when both start: both look at once
        async with schedulers(pg_url, "a", "b") as pair:
            queued(range(30, 60))  # and while they run
            queue = pair[0][0].queue
            for _ in range(600):
                if queue.counts() == {"delivered": 60}:
                    break
                await asyncio.sleep(0.05)
            assert queue.counts() == {"delivered": 60}
            rcpts = [line for line in sink.lines if line.upper().startswith("RCPT")]
            assert sorted(rcpts) == sorted(f"RCPT TO:<u{i}@sink.test>" for i in range(60))
            assert len(sink.messages) == 60
            with db.connection() as conn:
                by_node = dict(
                    conn.execute("SELECT node, count(*) FROM attempts GROUP BY node").fetchall()
                )
            assert sum(by_node.values()) == 60
    finally:
        await sink.stop()


async def test_a_notify_wakes_the_scheduler_of_another_node(
    db: Database, pg_url: str, nodes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduler_module, "POLL", 120.0)  # only the hint can wake it in time
    sink = await Hop().start()
    queue_id = relayed(db, "u@sink.test", sink.port)
    other = nodes("cli")  # ``ehlo queue`` on another machine
    assert other.hold([queue_id]) == 1
    try:
        async with schedulers(pg_url, "a"):
            await asyncio.sleep(0.5)  # the scheduler's first turn found nothing due
            assert other.release([queue_id], time.time()) == 1  # NOTIFY ehlo_queue
            for _ in range(400):
                if other.counts() == {"delivered": 1}:
                    break
                await asyncio.sleep(0.05)
            assert other.counts() == {"delivered": 1}
    finally:
        await sink.stop()


class _SlowReader:
    """A next hop's reader that takes ``delay`` seconds over the end of each message."""

    def __init__(self, reader: asyncio.StreamReader, delay: float) -> None:
        self.reader = reader
        self.delay = delay

    async def readline(self) -> bytes:
        line = await self.reader.readline()
        if line == b".\r\n":
            await asyncio.sleep(self.delay)
        return line

    async def read(self, n: int = -1) -> bytes:
        return await self.reader.read(n)


class _SlowHop(Hop):
    """A next hop that answers the end of the data after 3.5 seconds."""

    async def _dialogue(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await super()._dialogue(cast(asyncio.StreamReader, _SlowReader(reader, 3.5)), writer)


async def test_a_slow_delivery_keeps_its_lease(
    db: Database, pg_url: str, nodes: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "ehlo.storage")
    sink = await _SlowHop().start()
    other = nodes("b", lease=60.0)
    try:
        # A lease of 2 s, renewed every third of it, outlives a delivery of 3.5 s.
        async with schedulers(pg_url, "a", lease=2.0):
            relayed(db, "u@sink.test", sink.port)
            for _ in range(600):
                if other.counts() != {"queued": 1}:
                    break
                await asyncio.sleep(0.02)
            assert other.counts() == {"delivering": 1}  # A took it
            ends: list[float] = []
            for _ in range(600):
                if other.counts() == {"delivered": 1}:
                    break
                # Another node looking meanwhile finds nothing to take.
                assert other.take(time.time() + 1, 10) == []
                with db.connection() as conn:
                    row = conn.execute(
                        "SELECT lease_until, extract(epoch from clock_timestamp())::float8"
                        " FROM queue WHERE state = 'delivering'"
                    ).fetchone()
                if row is not None:
                    assert row[0] - row[1] <= 2.0  # delivery_lease's lease, not a default
                    ends.append(row[0])
                await asyncio.sleep(0.1)
            assert other.counts() == {"delivered": 1}
        assert len(set(ends)) >= 3, "renewed while delivering"
        assert len(sink.messages) == 1
        assert events(caplog, "queue_lease_taken_over") == []
    finally:
        await sink.stop()


# ------------------------------------------------------------ two servers on one database


async def test_two_servers_relay_each_message_once(
    db: Database, pg_url: str, tmp_path: Path
) -> None:
    from ehlo import Listen, Server
    from ehlo.client import SMTPClient

    from .helpers import make_config
    from .test_delivery_e2e import TIMEOUTS

    sink = await Hop().start()
    servers: list[Server] = []
    try:
        for name, ip in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
            config = make_config(
                tmp_path / name,
                listen=(Listen(ip, 0),),
                hostname=f"mx.{name}.test",
                store="postgresql",
                database_url=pg_url,
                tls=False,
                mta_sts=False,
                domains=("a.test",),
                relay_networks=("127.0.0.1/32",),
                relay_host=f"{SINK_IP}:{sink.port}",
            )
            server = Server(config)
            await server.start()
            servers.append(server)
        for i in range(20):  # each server takes half of them
            host, port = servers[i % 2].addresses[0]
            async with SMTPClient(host, port, timeouts=TIMEOUTS, tls="off") as client:
                await client.send_message("alice@a.test", [f"u{i}@sink.test"], BODY)
        queue = servers[0].store.queue
        assert queue is not None
        for _ in range(600):
            if queue.counts() == {"delivered": 20}:
                break
            await asyncio.sleep(0.05)
        assert queue.counts() == {"delivered": 20}
        rcpts = [line for line in sink.lines if line.upper().startswith("RCPT")]
        assert sorted(rcpts) == sorted(f"RCPT TO:<u{i}@sink.test>" for i in range(20))
        # Handed on, not kept: the messages and their bodies left with the last outcome.
        assert scalar(db, "SELECT count(*) FROM messages") == 0
        assert scalar(db, "SELECT count(*) FROM chunks") == 0
    finally:
        for server in servers:
            await server.stop(timeout=1.0)
        await sink.stop()
    # Each store's close let its housekeeping lock go.
    held = scalar(
        db,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database ="
        " (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    assert held == 0


async def test_a_database_away_is_one_log_line_of_the_scheduler(
    db: Database,
    pg_url: str,
    nodes: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(scheduler_module, "POLL", 0.05)
    caplog.set_level(logging.INFO, "ehlo.delivery")
    sink = await Hop().start()
    failures: list[float] = []

    def away(now: float, limit: int) -> list[Any]:
        failures.append(now)
        raise StoreError("postgresql: connection refused")

    try:
        async with schedulers(pg_url, "a") as [(store, _)]:
            queue = store.queue
            for outage in range(2):
                monkeypatch.setattr(queue, "take", away)
                failures.clear()
                for _ in range(400):
                    if len(failures) >= 5:
                        break
                    await asyncio.sleep(0.02)
                assert len(failures) >= 5
                # Every turn failed; the log says so once per outage.
                assert len(events(caplog, "delivery_error")) == outage + 1
                monkeypatch.undo()
                monkeypatch.setattr(scheduler_module, "POLL", 0.05)
                relayed(db, f"u{outage}@sink.test", sink.port)  # served once it is back
                for _ in range(400):
                    if len(sink.messages) == outage + 1:
                        break
                    await asyncio.sleep(0.05)
                assert len(sink.messages) == outage + 1
    finally:
        await sink.stop()
