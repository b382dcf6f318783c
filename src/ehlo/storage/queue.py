"""The outbound queue's records: one entry per (message, recipient) to hand on.

A message whose recipients are relayed, or delivered by LMTP, is stored
like any other (its body is the queue's body: it is never copied) and,
in the same commit, gets one :class:`QueueEntry` per such recipient. The
delivery scheduler (:mod:`ehlo.delivery`) takes the entries that are due,
records each attempt (:class:`Attempt`, with its transcript) and moves
each entry through its states:

``queued`` -> ``delivering`` -> ``delivered`` | ``bounced`` | ``deferred``
(-> ``delivering`` again when due); ``held`` until released.

This module owns those records and :class:`Queue`, the operations every
store's queue offers; :class:`SQLiteQueue` keeps them in tables of the
SQLite store's database (written by the store's writer in the message's
own transaction, so the 250 covers them). Times are Unix seconds.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .base import StoreError

__all__ = [
    "FINAL",
    "PENDING",
    "STATES",
    "Attempt",
    "EntryUpdate",
    "Queue",
    "QueueEntry",
    "QueueItem",
    "SQLiteQueue",
]

STATES = ("queued", "deferred", "delivering", "delivered", "bounced", "held")
# States whose entries still have work to do (and keep their message).
PENDING = ("queued", "deferred", "delivering", "held")
FINAL = ("delivered", "bounced")
# Seconds a finished entry (and its attempts) stays for ``ehlo queue show``.
HISTORY_SECONDS = 7 * 86400.0


@dataclasses.dataclass(frozen=True, slots=True)
class QueueItem:
    """A recipient to hand on, as the session decides it at RCPT."""

    recipient: str
    # "mx:DOMAIN", "smtp:HOST:PORT" or "lmtp:HOST:PORT" / "lmtp:unix:/PATH".
    next_hop: str
    notify: str | None = None  # RFC 3461 NOTIFY as given
    orcpt: str | None = None  # RFC 3461 ORCPT as given (addr-type;xtext)

    def row(self, queue_id: str, now: float) -> tuple[Any, ...]:
        """The ``queue`` row of a new entry (in ``QUEUE_COLUMNS`` order)."""
        return (
            queue_id,
            self.recipient,
            self.next_hop,
            "queued",
            0,
            now,
            now,
            self.notify,
            self.orcpt,
            None,
            now,
            0,
            None,
        )


@dataclasses.dataclass(slots=True)
class QueueEntry:
    """One recipient of one message, on its way out."""

    queue_id: str
    recipient: str
    next_hop: str
    state: str
    attempts: int
    next_attempt: float
    created: float
    notify: str | None = None
    orcpt: str | None = None
    # {"code", "enhanced", "text", "host", "address"} of the last reply (or
    # the local reason: "code" 0 when no server answered).
    last_reply: dict[str, Any] | None = None
    updated: float = 0.0
    delay_notified: bool = False
    # Asked by ``ehlo queue``: "bounce" (bounce now, with a notice) or
    # "retry" (try now, even a next hop marked down).
    request: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.queue_id, self.recipient)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.queue_id,
            "recipient": self.recipient,
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt": _iso(self.next_attempt)
            if self.state in ("queued", "deferred")
            else None,
            "created": _iso(self.created),
            "last_reply": self.last_reply,
            "next_hop": self.next_hop,
            "notify": self.notify,
            "orcpt": self.orcpt,
        }


@dataclasses.dataclass(slots=True)
class Attempt:
    """One delivery attempt of one message to one next hop."""

    queue_id: str
    at: float
    next_hop: str
    host: str  # "name[address]:port", or "" when no connection was made
    results: dict[str, dict[str, Any]]  # recipient -> its reply
    transcript: str

    def to_json(self) -> dict[str, Any]:
        return {
            "at": _iso(self.at),
            "next_hop": self.next_hop,
            "host": self.host,
            "results": self.results,
            "transcript": self.transcript,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class EntryUpdate:
    """What an attempt (or a decision without one) changes in an entry."""

    queue_id: str
    recipient: str
    state: str
    next_attempt: float
    last_reply: dict[str, Any] | None
    attempted: bool = True  # counts as an attempt
    delay_notified: bool | None = None  # set when a delay notice went out


def _iso(moment: float) -> str:
    import datetime as _dt

    return _dt.datetime.fromtimestamp(moment, _dt.UTC).isoformat(timespec="seconds")


class Queue(abc.ABC):
    """The outbound queue of one store: synchronous, short transactions.

    Ids are message queue ids: an operation on an id applies to every
    entry of that message (``recipients`` narrows it where offered).
    """

    @abc.abstractmethod
    def due(self, now: float, limit: int) -> list[QueueEntry]:
        """Up to ``limit`` entries queued or deferred whose time has come, oldest due first."""

    @abc.abstractmethod
    def next_due(self) -> float | None:
        """When the next queued or deferred entry is due (None: none waits)."""

    @abc.abstractmethod
    def claim(self, entries: Sequence[QueueEntry]) -> None:
        """Mark entries ``delivering`` (an attempt is under way)."""

    def take(self, now: float, limit: int) -> list[QueueEntry]:
        """Claim up to ``limit`` due entries for this node: ``due`` then ``claim``.

        A queue several nodes share does both in one short transaction, so
        that no two nodes take one entry, and holds each taken entry under a
        lease (:meth:`renew`) that another node may take over once expired.
        """
        entries = self.due(now, limit)
        if entries:
            self.claim(entries)
        return entries

    def close(self) -> None:  # noqa: B027
        """Release what the queue holds open beyond the store's own connections."""

    def set_lease(self, seconds: float) -> None:  # noqa: B027
        """How long this node's leases last from a take or a renewal (``delivery_lease``).

        A queue of one node has no leases: this does nothing.
        """

    def renew(self, entries: Sequence[QueueEntry]) -> int:
        """Extend this node's leases on entries it is delivering; how many it still holds.

        A queue of one node has no leases: it holds them all.
        """
        return len(entries)

    def housekeeper(self) -> bool:
        """Whether this node may do the queue's housekeeping now (expiry, notices
        of old entries, retention): one node at a time when several share it."""
        return True

    @abc.abstractmethod
    def record(self, updates: Sequence[EntryUpdate], attempts: Sequence[Attempt] = ()) -> None:
        """Apply updates and keep attempts, in one transaction."""

    def record_and_forget(
        self, updates: Sequence[EntryUpdate], attempts: Sequence[Attempt], forget: Iterable[str]
    ) -> list[str]:
        """``record``, then the ids among ``forget`` (messages kept only for the queue)
        whose entries are all final: the caller removes them from the store. A queue
        that lives in the store's own database removes them itself and answers []."""
        self.record(updates, attempts)
        return self.finished_messages(forget)

    @abc.abstractmethod
    def set_next_hop(self, queue_id: str, recipient: str, next_hop: str) -> None:
        """Send one entry elsewhere (a ``delivery`` hook's decision)."""

    @abc.abstractmethod
    def recover(self) -> int:
        """At start: entries left ``delivering`` by a crash are queued again; how many."""

    @abc.abstractmethod
    def entries(
        self,
        *,
        queue_ids: Sequence[str] | None = None,
        state: str | None = None,
        recipient: str | None = None,
        limit: int | None = None,
        before: str | None = None,
    ) -> list[QueueEntry]:
        """Entries, newest message first (``before``: only messages older than that id)."""

    @abc.abstractmethod
    def attempts(self, queue_id: str) -> list[Attempt]:
        """Every kept attempt for one message, oldest first."""

    @abc.abstractmethod
    def retry(self, ids: Sequence[str] | None, now: float) -> int:
        """Make queued/deferred entries due now, even for a next hop marked down
        (``None``: all); how many."""

    @abc.abstractmethod
    def hold(self, ids: Sequence[str]) -> int:
        """Hold pending entries (not ``delivering``); how many."""

    @abc.abstractmethod
    def release(self, ids: Sequence[str], now: float) -> int:
        """Queue held entries again, due now; how many."""

    @abc.abstractmethod
    def remove(self, ids: Sequence[str]) -> int:
        """Delete entries that are not ``delivering`` (no notice); how many."""

    @abc.abstractmethod
    def request_bounce(self, ids: Sequence[str], now: float) -> int:
        """Have the scheduler bounce pending entries now, with a notice; how many."""

    @abc.abstractmethod
    def pending(self, ids: Iterable[str]) -> set[str]:
        """The ids among ``ids`` whose message still has pending entries."""

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """Entries per state."""

    @abc.abstractmethod
    def finished_messages(self, ids: Iterable[str]) -> list[str]:
        """The ids among ``ids`` that have entries and none pending."""

    @abc.abstractmethod
    def expire_history(self, before: float) -> int:
        """Delete finished entries (and attempts) last changed before ``before``."""


QUEUE_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    queue_id       TEXT NOT NULL,
    recipient      TEXT NOT NULL,
    next_hop       TEXT NOT NULL,
    state          TEXT NOT NULL,
    attempts       INTEGER NOT NULL,
    next_attempt   REAL NOT NULL,
    created        REAL NOT NULL,
    notify         TEXT,
    orcpt          TEXT,
    last_reply     TEXT,
    updated        REAL NOT NULL,
    delay_notified INTEGER NOT NULL,
    request        TEXT,
    PRIMARY KEY (queue_id, recipient)
);
CREATE INDEX IF NOT EXISTS queue_due ON queue (next_attempt)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX IF NOT EXISTS queue_created ON queue (created, queue_id);
CREATE TABLE IF NOT EXISTS attempts (
    queue_id   TEXT NOT NULL,
    at         REAL NOT NULL,
    next_hop   TEXT NOT NULL,
    host       TEXT NOT NULL,
    results    TEXT NOT NULL,
    transcript TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_queue_id ON attempts (queue_id, at);
"""

QUEUE_COLUMNS = (
    "queue_id, recipient, next_hop, state, attempts, next_attempt, created, notify, orcpt,"
    " last_reply, updated, delay_notified, request"
)
INSERT_QUEUE = f"INSERT INTO queue ({QUEUE_COLUMNS}) VALUES ({', '.join('?' * 13)})"
_PENDING_SQL = "('queued', 'deferred', 'delivering', 'held')"


def _attempt(row: Sequence[Any]) -> Attempt:
    """An attempts row (queue_id, at, next_hop, host, results, transcript); PostgreSQL's too."""
    try:
        results = json.loads(row[4])
    except ValueError:
        results = {}
    return Attempt(row[0], float(row[1]), row[2], row[3], results, row[5])


def _entry(row: Sequence[Any]) -> QueueEntry:
    """A queue row (the columns of QUEUE_COLUMNS, in order) as an entry; PostgreSQL's too."""
    reply = None
    if row[9]:
        with contextlib.suppress(ValueError):
            reply = json.loads(row[9])
    return QueueEntry(
        queue_id=row[0],
        recipient=row[1],
        next_hop=row[2],
        state=row[3],
        attempts=int(row[4]),
        next_attempt=float(row[5]),
        created=float(row[6]),
        notify=row[7],
        orcpt=row[8],
        last_reply=reply,
        updated=float(row[10]),
        delay_notified=bool(row[11]),
        request=row[12],
    )


def _marks(items: Sequence[Any]) -> str:
    return ", ".join("?" * len(items))


class SQLiteQueue(Queue):
    """The queue in the SQLite store's database (tables ``queue`` and ``attempts``).

    Its own read-write connection, used from one thread at a time (a lock
    guards it); every write takes the writers' lock file first, like the
    store's deletes, so it queues behind the writer's batches.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def _connection(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            from ._sqlite_db import open_read_write

            try:
                # Queue updates survive a killed process once committed (WAL); an
                # outcome lost to a power cut only means an entry is tried again
                # (at least once), so they skip the fsync the messages pay.
                conn = open_read_write(self.path, synchronous="NORMAL", cache_kib=2048)
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"sqlite store {self.path}: {exc}") from exc
            self._conn = conn
        return conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._connection()
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite store {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken in turn with the store's writers."""
        from ._sqlite_db import write_turn

        with self._lock:
            try:
                conn = self._connection()
                with write_turn(self.path):
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        yield conn
                        conn.execute("COMMIT")
                    except BaseException:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                        raise
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"sqlite store {self.path}: {exc}") from exc

    # --- the scheduler ------------------------------------------------------------

    def due(self, now: float, limit: int) -> list[QueueEntry]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {QUEUE_COLUMNS} FROM queue WHERE state IN ('queued', 'deferred')"
                " AND next_attempt <= ? ORDER BY next_attempt LIMIT ?",
                (now, limit),
            ).fetchall()
        return [_entry(row) for row in rows]

    def next_due(self) -> float | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT min(next_attempt) FROM queue WHERE state IN ('queued', 'deferred')"
            ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def claim(self, entries: Sequence[QueueEntry]) -> None:
        if not entries:
            return
        with self._write() as conn:
            conn.executemany(
                "UPDATE queue SET state = 'delivering' WHERE queue_id = ? AND recipient = ?"
                " AND state IN ('queued', 'deferred')",
                [entry.key for entry in entries],
            )

    def record(self, updates: Sequence[EntryUpdate], attempts: Sequence[Attempt] = ()) -> None:
        if not updates and not attempts:
            return
        with self._write() as conn:
            self._apply(conn, updates, attempts)

    @staticmethod
    def _apply(
        conn: sqlite3.Connection, updates: Sequence[EntryUpdate], attempts: Sequence[Attempt]
    ) -> None:
        import time

        now = time.time()
        conn.executemany(
            "UPDATE queue SET state = ?, next_attempt = ?,"
            " last_reply = coalesce(?, last_reply), attempts = attempts + ?, updated = ?,"
            " delay_notified = coalesce(?, delay_notified),"
            " request = CASE WHEN ? IN ('delivered', 'bounced') OR request = 'retry'"
            " THEN NULL ELSE request END"
            " WHERE queue_id = ? AND recipient = ?",
            [
                (
                    u.state,
                    u.next_attempt,
                    json.dumps(u.last_reply) if u.last_reply is not None else None,
                    1 if u.attempted else 0,
                    now,
                    None if u.delay_notified is None else int(u.delay_notified),
                    u.state,
                    u.queue_id,
                    u.recipient,
                )
                for u in updates
            ],
        )
        conn.executemany(
            "INSERT INTO attempts (queue_id, at, next_hop, host, results, transcript)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                (a.queue_id, a.at, a.next_hop, a.host, json.dumps(a.results), a.transcript)
                for a in attempts
            ],
        )

    def set_next_hop(self, queue_id: str, recipient: str, next_hop: str) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE queue SET next_hop = ? WHERE queue_id = ? AND recipient = ?",
                (next_hop, queue_id, recipient),
            )

    def record_and_forget(
        self, updates: Sequence[EntryUpdate], attempts: Sequence[Attempt], forget: Iterable[str]
    ) -> list[str]:
        """One transaction (one WAL write, no fsync) records the outcomes and removes
        the messages kept only for the queue once their entries are all final; their
        body files, if any, go after it."""
        wanted = list(dict.fromkeys(forget))
        if not wanted:
            self.record(updates, attempts)
            return []
        gone: list[str] = []
        with self._write() as conn:
            self._apply(conn, updates, attempts)
            for start in range(0, len(wanted), 500):
                part = wanted[start : start + 500]
                marks = _marks(part)
                done = [
                    row[0]
                    for row in conn.execute(
                        f"SELECT queue_id FROM queue WHERE queue_id IN ({marks})"
                        f" GROUP BY queue_id HAVING sum(state IN {_PENDING_SQL}) = 0",
                        part,
                    )
                ]
                if not done:
                    continue
                marks = _marks(done)
                for table in ("chunks", "search", "messages"):
                    conn.execute(f"DELETE FROM {table} WHERE queue_id IN ({marks})", done)
                gone.extend(done)
        from ._sqlite_db import body_dir

        bodies = body_dir(self.path)
        for queue_id in gone:  # a body larger than one chunk is a file of its own
            with contextlib.suppress(OSError):
                os.unlink(bodies / queue_id)
        return []

    def recover(self) -> int:
        if not self.path.exists():
            return 0
        with self._write() as conn:
            cursor = conn.execute("UPDATE queue SET state = 'queued' WHERE state = 'delivering'")
            return cursor.rowcount

    # --- the command line -----------------------------------------------------------

    def entries(
        self,
        *,
        queue_ids: Sequence[str] | None = None,
        state: str | None = None,
        recipient: str | None = None,
        limit: int | None = None,
        before: str | None = None,
    ) -> list[QueueEntry]:
        if not self.path.exists():
            return []
        where: list[str] = []
        params: list[Any] = []
        if queue_ids is not None:
            if not queue_ids:
                return []
            where.append(f"queue_id IN ({_marks(queue_ids)})")
            params.extend(queue_ids)
        if state is not None:
            where.append("state = ?")
            params.append(state)
        if recipient is not None:
            where.append("instr(lower(recipient), ?) > 0")
            params.append(recipient.lower())
        with self._read() as conn:
            if before is not None:
                row = conn.execute(
                    "SELECT created FROM queue WHERE queue_id = ? LIMIT 1", (before,)
                ).fetchone()
                if row is None:
                    raise StoreError(f"no queued message with id {before!r}")
                where.append("(created < ? OR (created = ? AND queue_id < ?))")
                params.extend((row[0], row[0], before))
            sql = f"SELECT {QUEUE_COLUMNS} FROM queue"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY created DESC, queue_id DESC, recipient"
            if limit is not None:
                sql += " LIMIT ?"
                params.append(limit)
            rows = conn.execute(sql, params).fetchall()
        return [_entry(row) for row in rows]

    def attempts(self, queue_id: str) -> list[Attempt]:
        if not self.path.exists():
            return []
        with self._read() as conn:
            rows = conn.execute(
                "SELECT queue_id, at, next_hop, host, results, transcript FROM attempts"
                " WHERE queue_id = ? ORDER BY at, rowid",
                (queue_id,),
            ).fetchall()
        return [_attempt(row) for row in rows]

    def _update(self, sql: str, ids: Sequence[str] | None, params: tuple[Any, ...] = ()) -> int:
        if ids is not None and not ids:
            return 0
        if not self.path.exists():
            return 0
        with self._write() as conn:
            if ids is None:
                return conn.execute(sql, params).rowcount
            total = 0
            for start in range(0, len(ids), 500):
                part = list(ids[start : start + 500])
                total += conn.execute(
                    f"{sql} AND queue_id IN ({_marks(part)})", (*params, *part)
                ).rowcount
            return total

    def retry(self, ids: Sequence[str] | None, now: float) -> int:
        # "retry": the scheduler tries now even a next hop it has marked down.
        return self._update(
            "UPDATE queue SET next_attempt = ?,"
            " request = CASE WHEN request = 'bounce' THEN request ELSE 'retry' END"
            " WHERE state IN ('queued', 'deferred')",
            ids,
            (now,),
        )

    def hold(self, ids: Sequence[str]) -> int:
        return self._update(
            "UPDATE queue SET state = 'held' WHERE state IN ('queued', 'deferred')", ids
        )

    def release(self, ids: Sequence[str], now: float) -> int:
        return self._update(
            "UPDATE queue SET state = 'queued', next_attempt = ? WHERE state = 'held'", ids, (now,)
        )

    def remove(self, ids: Sequence[str]) -> int:
        return self._update("DELETE FROM queue WHERE state != 'delivering'", ids)

    def request_bounce(self, ids: Sequence[str], now: float) -> int:
        return self._update(
            "UPDATE queue SET request = 'bounce', state = 'queued', next_attempt = ?"
            " WHERE state IN ('queued', 'deferred', 'held')",
            ids,
            (now,),
        )

    # --- the store and housekeeping ------------------------------------------------

    def pending(self, ids: Iterable[str]) -> set[str]:
        wanted = list(ids)
        if not wanted or not self.path.exists():
            return set()
        found: set[str] = set()
        with self._read() as conn:
            for start in range(0, len(wanted), 500):
                part = wanted[start : start + 500]
                found.update(
                    row[0]
                    for row in conn.execute(
                        f"SELECT DISTINCT queue_id FROM queue WHERE queue_id IN ({_marks(part)})"
                        f" AND state IN {_PENDING_SQL}",
                        part,
                    )
                )
        return found

    def finished_messages(self, ids: Iterable[str]) -> list[str]:
        wanted = list(dict.fromkeys(ids))
        if not wanted or not self.path.exists():
            return []
        with self._read() as conn:
            done: list[str] = []
            for start in range(0, len(wanted), 500):
                part = wanted[start : start + 500]
                done.extend(
                    row[0]
                    for row in conn.execute(
                        f"SELECT queue_id FROM queue WHERE queue_id IN ({_marks(part)})"
                        f" GROUP BY queue_id HAVING sum(state IN {_PENDING_SQL}) = 0",
                        part,
                    )
                )
        return done

    def counts(self) -> dict[str, int]:
        if not self.path.exists():
            return {}
        with self._read() as conn:
            return dict(conn.execute("SELECT state, count(*) FROM queue GROUP BY state").fetchall())

    def expire_history(self, before: float) -> int:
        if not self.path.exists():
            return 0
        with self._write() as conn:
            gone = conn.execute(
                "DELETE FROM queue WHERE state IN ('delivered', 'bounced') AND updated < ?",
                (before,),
            ).rowcount
            conn.execute(
                "DELETE FROM attempts WHERE at < ? AND queue_id NOT IN"
                f" (SELECT queue_id FROM queue WHERE state IN {_PENDING_SQL})",
                (before,),
            )
            return gone
