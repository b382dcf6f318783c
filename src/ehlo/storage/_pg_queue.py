"""The outbound queue in PostgreSQL, shared by every node (tables ``queue`` and ``attempts``).

A node takes due recipients in one short transaction (``FOR UPDATE SKIP
LOCKED``), each under a lease (``lease_token``: this node's token;
``lease_until``: the database's clock), delivers without holding a row
lock, and records the outcome only where its token still holds the
lease. A dead node's leases expire and another node takes the entries.

``lease_token`` names the node that last took (or recovered) an entry and
stays when the entry leaves ``delivering``; ``lease_until`` is set only
while it is ``delivering``. An outcome is recorded where the token is this
node's or no node ever took the entry: a node that finishes late, after
another took its entries over (and perhaps delivered them), changes
nothing. Housekeeping runs on the node holding a session-level advisory
lock (``LOCK_HOUSEKEEPING``) on a connection of its own. Changes that make
entries due send ``NOTIFY ehlo_queue`` so that the other nodes' schedulers
look now rather than at their next poll.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ._pg_conn import Database
from ._pg_schema import CHANNEL_MESSAGES, CHANNEL_QUEUE, LOCK_HOUSEKEEPING
from .base import StoreError
from .queue import QUEUE_COLUMNS, Attempt, EntryUpdate, Queue, QueueEntry, _attempt, _entry

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("ehlo.storage")

# The database's clock in epoch seconds (leases are compared with it only,
# never with a node's clock).
_DB_NOW = "extract(epoch from clock_timestamp())::float8"
_PENDING_SQL = "('queued', 'deferred', 'delivering', 'held')"
# Queue ids and recipients compare byte by byte, as SQLite compares them,
# whatever collation the database has.
_C = 'COLLATE "C"'
_QUEUE_COLUMNS_Q = ", ".join(f"q.{name.strip()}" for name in QUEUE_COLUMNS.split(","))


def _keys(entries: Iterable[QueueEntry]) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    recipients: list[str] = []
    for entry in entries:
        ids.append(entry.queue_id)
        recipients.append(entry.recipient)
    return ids, recipients


def _notify(conn: psycopg.Connection[Any], channel: str = CHANNEL_QUEUE) -> None:
    """A hint to the other nodes, sent when the transaction commits."""
    conn.execute("SELECT pg_notify(%s, '')", (channel,))


class PostgresQueue(Queue):
    """The queue in the store's database."""

    def __init__(self, db: Database, node: str, lease: float = 300.0) -> None:
        self.db = db
        self.node = node
        self.lease = lease
        # One token per instance (a node's process): leases taken before a
        # restart are another node's to the new process, and expire.
        self.token = f"{node}:{secrets.token_hex(8)}"
        self._keeper: psycopg.Connection[Any] | None = None
        self._keeper_lock = threading.Lock()

    def set_lease(self, seconds: float) -> None:
        self.lease = float(seconds)

    def close(self) -> None:
        """Close the housekeeping connection (its advisory lock goes with it)."""
        with self._keeper_lock:
            conn, self._keeper = self._keeper, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # --- the scheduler ------------------------------------------------------------

    def due(self, now: float, limit: int) -> list[QueueEntry]:
        with self.db.connection() as conn:
            rows = conn.execute(
                f"SELECT {QUEUE_COLUMNS} FROM queue WHERE state IN ('queued', 'deferred')"
                " AND next_attempt <= %s ORDER BY next_attempt LIMIT %s",
                (now, limit),
            ).fetchall()
        return [_entry(row) for row in rows]

    def next_due(self) -> float | None:
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT min(next_attempt) FROM queue WHERE state IN ('queued', 'deferred')"
            ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def claim(self, entries: Sequence[QueueEntry]) -> None:
        if not entries:
            return
        ids, recipients = _keys(entries)
        with self.db.connection() as conn:
            conn.execute(
                "UPDATE queue SET state = 'delivering', lease_token = %s,"
                f" lease_until = {_DB_NOW} + %s"
                " WHERE (queue_id, recipient) IN"
                " (SELECT * FROM unnest(%s::text[], %s::text[]))"
                " AND state IN ('queued', 'deferred')",
                (self.token, self.lease, ids, recipients),
            )

    def take(self, now: float, limit: int) -> list[QueueEntry]:
        """Due entries, and entries whose lease expired, claimed for this node at once.

        Rows another transaction has locked (another node taking them) are
        skipped, never waited for. An entry taken over from an expired lease
        comes back ``queued``: its delivery is made again (at least once).
        """
        if limit <= 0:
            return []
        with self.db.connection() as conn:
            rows = conn.execute(
                "UPDATE queue q SET state = 'delivering', lease_token = %s,"
                f" lease_until = {_DB_NOW} + %s"
                " FROM (SELECT queue_id, recipient, state, lease_token FROM queue"
                " WHERE (state IN ('queued', 'deferred') AND next_attempt <= %s)"
                " OR (state = 'delivering'"
                f" AND (lease_until IS NULL OR lease_until < {_DB_NOW}))"
                " ORDER BY next_attempt LIMIT %s FOR UPDATE SKIP LOCKED) old"
                " WHERE q.queue_id = old.queue_id AND q.recipient = old.recipient"
                f" RETURNING {_QUEUE_COLUMNS_Q}, old.state, old.lease_token",
                (self.token, self.lease, now, limit),
            ).fetchall()
        entries: list[QueueEntry] = []
        taken_over = 0
        for row in rows:
            entry = _entry(row)
            before, holder = row[-2], row[-1]
            if before == "delivering":
                # This node's own lease, run out before a renewal, is not a takeover.
                taken_over += holder != self.token
                before = "queued"
            entry.state = before
            entries.append(entry)
        entries.sort(key=lambda e: e.next_attempt)
        if taken_over:
            log.warning(
                "queue: %d recipients taken over from expired leases (a node stopped"
                " renewing them); delivered again",
                taken_over,
                extra={"event": "queue_lease_taken_over", "count": taken_over},
            )
        return entries

    def renew(self, entries: Sequence[QueueEntry]) -> int:
        if not entries:
            return 0
        ids, recipients = _keys(entries)
        with self.db.connection() as conn:
            cursor = conn.execute(
                f"UPDATE queue SET lease_until = {_DB_NOW} + %s"
                " WHERE (queue_id, recipient) IN"
                " (SELECT * FROM unnest(%s::text[], %s::text[]))"
                " AND state = 'delivering' AND lease_token = %s",
                (self.lease, ids, recipients, self.token),
            )
            return max(0, cursor.rowcount)

    def housekeeper(self) -> bool:
        """Whether this node holds the housekeeping lock (taking it when free).

        The lock belongs to a connection this queue keeps: held until that
        connection closes (this node stops or dies), then the next node to
        ask gets it. An unreachable database means no housekeeping here now.
        """
        import psycopg

        with self._keeper_lock:
            conn = self._keeper
            try:
                if conn is not None:
                    if not conn.closed and not conn.broken:
                        conn.execute("SELECT 1")  # still alive: the lock is still ours
                        return True
                    self._keeper = None
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = self.db.connect(autocommit=True)
                row = conn.execute(
                    "SELECT pg_try_advisory_lock(%s)", (LOCK_HOUSEKEEPING,)
                ).fetchone()
            except (psycopg.Error, StoreError):
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                self._keeper = None
                return False
            if row and row[0]:
                self._keeper = conn
                return True
            conn.close()
            return False

    def record(self, updates: Sequence[EntryUpdate], attempts: Sequence[Attempt] = ()) -> None:
        if not updates and not attempts:
            return
        with self.db.connection() as conn:
            self._apply(conn, updates, attempts)

    def _apply(
        self,
        conn: psycopg.Connection[Any],
        updates: Sequence[EntryUpdate],
        attempts: Sequence[Attempt],
    ) -> None:
        now = time.time()
        if updates:
            applied: set[tuple[str, str]] = set()
            with conn.cursor() as cursor:
                cursor.executemany(
                    "UPDATE queue SET state = %s, next_attempt = %s,"
                    " last_reply = coalesce(%s, last_reply), attempts = attempts + %s,"
                    " updated = %s, delay_notified = coalesce(%s, delay_notified),"
                    " request = CASE WHEN %s IN ('delivered', 'bounced') OR request = 'retry'"
                    " THEN NULL ELSE request END,"
                    " lease_until = CASE WHEN %s = 'delivering' THEN lease_until END"
                    " WHERE queue_id = %s AND recipient = %s"
                    " AND (lease_token IS NULL OR lease_token = %s)"
                    " RETURNING queue_id, recipient",
                    [
                        (
                            u.state,
                            u.next_attempt,
                            json.dumps(u.last_reply) if u.last_reply is not None else None,
                            1 if u.attempted else 0,
                            now,
                            u.delay_notified,
                            u.state,
                            u.state,
                            u.queue_id,
                            u.recipient,
                            self.token,
                        )
                        for u in updates
                    ],
                    returning=True,
                )
                while True:
                    applied.update((row[0], row[1]) for row in cursor.fetchall())
                    if not cursor.nextset():
                        break
            missed = [u for u in updates if (u.queue_id, u.recipient) not in applied]
            if missed:
                self._lost(conn, missed)
            if any(u.state == "queued" for u in updates if (u.queue_id, u.recipient) in applied):
                _notify(conn)  # back in the queue: any node may take them now
        if attempts:
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO attempts (queue_id, at, next_hop, host, results, transcript,"
                    " node) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    [
                        (
                            a.queue_id,
                            a.at,
                            a.next_hop,
                            a.host,
                            json.dumps(a.results),
                            a.transcript,
                            self.node,
                        )
                        for a in attempts
                    ],
                )

    def _lost(self, conn: psycopg.Connection[Any], missed: Sequence[EntryUpdate]) -> None:
        """Log the outcomes not recorded because another node holds their entries."""
        ids = [u.queue_id for u in missed]
        recipients = [u.recipient for u in missed]
        row = conn.execute(
            "SELECT count(*) FROM queue WHERE (queue_id, recipient) IN"
            " (SELECT * FROM unnest(%s::text[], %s::text[]))",
            (ids, recipients),
        ).fetchone()
        lost = int(row[0]) if row else 0
        if lost:
            log.warning(
                "queue: %d outcomes not recorded: another node took the recipients over"
                " after this node's lease expired",
                lost,
                extra={"event": "queue_lease_lost", "count": lost},
            )

    def set_next_hop(self, queue_id: str, recipient: str, next_hop: str) -> None:
        with self.db.connection() as conn:
            conn.execute(
                "UPDATE queue SET next_hop = %s WHERE queue_id = %s AND recipient = %s",
                (next_hop, queue_id, recipient),
            )

    def record_and_forget(
        self, updates: Sequence[EntryUpdate], attempts: Sequence[Attempt], forget: Iterable[str]
    ) -> list[str]:
        """One transaction records the outcomes and removes the messages kept only
        for the queue (rows and body chunks) once their entries are all final."""
        wanted = list(dict.fromkeys(forget))
        if not wanted:
            self.record(updates, attempts)
            return []
        with self.db.connection() as conn:
            self._apply(conn, updates, attempts)
            done = [
                row[0]
                for row in conn.execute(
                    "SELECT queue_id FROM queue WHERE queue_id = ANY(%s) GROUP BY queue_id"
                    f" HAVING bool_and(state NOT IN {_PENDING_SQL})",
                    (wanted,),
                )
            ]
            if done:
                for table in ("chunks", "messages"):
                    conn.execute(f"DELETE FROM {table} WHERE queue_id = ANY(%s)", (done,))
                _notify(conn, CHANNEL_MESSAGES)
        return []

    def recover(self) -> int:
        """Entries ``delivering`` whose lease expired (or that have none) are queued
        again; a live lease is another node's delivery under way and stays."""
        with self.db.connection() as conn:
            cursor = conn.execute(
                "UPDATE queue SET state = 'queued', lease_token = %s, lease_until = NULL"
                " WHERE state = 'delivering'"
                f" AND (lease_until IS NULL OR lease_until < {_DB_NOW})",
                (self.token,),
            )
            count = max(0, cursor.rowcount)
            if count:
                _notify(conn)
        return count

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
        where: list[str] = []
        params: list[Any] = []
        if queue_ids is not None:
            if not queue_ids:
                return []
            where.append("queue_id = ANY(%s)")
            params.append(list(queue_ids))
        if state is not None:
            where.append("state = %s")
            params.append(state)
        if recipient is not None:
            where.append("strpos(lower(recipient), %s) > 0")
            params.append(recipient.lower())
        with self.db.connection() as conn:
            if before is not None:
                row = conn.execute(
                    "SELECT created FROM queue WHERE queue_id = %s LIMIT 1", (before,)
                ).fetchone()
                if row is None:
                    raise StoreError(f"no queued message with id {before!r}")
                where.append(f"(created < %s OR (created = %s AND queue_id {_C} < %s))")
                params.extend((row[0], row[0], before))
            sql = f"SELECT {QUEUE_COLUMNS} FROM queue"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += f" ORDER BY created DESC, queue_id {_C} DESC, recipient {_C}"
            if limit is not None:
                sql += " LIMIT %s"
                params.append(limit)
            rows = conn.execute(sql, params).fetchall()
        return [_entry(row) for row in rows]

    def attempts(self, queue_id: str) -> list[Attempt]:
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT queue_id, at, next_hop, host, results, transcript FROM attempts"
                " WHERE queue_id = %s ORDER BY at, ctid",
                (queue_id,),
            ).fetchall()
        return [_attempt(row) for row in rows]

    def _update(
        self,
        sql: str,
        ids: Sequence[str] | None,
        params: tuple[Any, ...] = (),
        *,
        wake: bool = False,
    ) -> int:
        if ids is not None and not ids:
            return 0
        with self.db.connection() as conn:
            if ids is None:
                cursor = conn.execute(sql, params)
            else:
                cursor = conn.execute(f"{sql} AND queue_id = ANY(%s)", (*params, list(ids)))
            count = max(0, cursor.rowcount)
            if wake and count:
                _notify(conn)
        return count

    def retry(self, ids: Sequence[str] | None, now: float) -> int:
        # "retry": the scheduler tries now even a next hop it has marked down.
        return self._update(
            "UPDATE queue SET next_attempt = %s,"
            " request = CASE WHEN request = 'bounce' THEN request ELSE 'retry' END"
            " WHERE state IN ('queued', 'deferred')",
            ids,
            (now,),
            wake=True,
        )

    def hold(self, ids: Sequence[str]) -> int:
        return self._update(
            "UPDATE queue SET state = 'held' WHERE state IN ('queued', 'deferred')", ids
        )

    def release(self, ids: Sequence[str], now: float) -> int:
        return self._update(
            "UPDATE queue SET state = 'queued', next_attempt = %s WHERE state = 'held'",
            ids,
            (now,),
            wake=True,
        )

    def remove(self, ids: Sequence[str]) -> int:
        return self._update("DELETE FROM queue WHERE state <> 'delivering'", ids)

    def request_bounce(self, ids: Sequence[str], now: float) -> int:
        return self._update(
            "UPDATE queue SET request = 'bounce', state = 'queued', next_attempt = %s"
            " WHERE state IN ('queued', 'deferred', 'held')",
            ids,
            (now,),
            wake=True,
        )

    # --- the store and housekeeping ------------------------------------------------

    def pending(self, ids: Iterable[str]) -> set[str]:
        wanted = list(ids)
        if not wanted:
            return set()
        with self.db.connection() as conn:
            return {
                row[0]
                for row in conn.execute(
                    "SELECT DISTINCT queue_id FROM queue WHERE queue_id = ANY(%s)"
                    f" AND state IN {_PENDING_SQL}",
                    (wanted,),
                )
            }

    def finished_messages(self, ids: Iterable[str]) -> list[str]:
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return []
        with self.db.connection() as conn:
            found = {
                row[0]
                for row in conn.execute(
                    "SELECT queue_id FROM queue WHERE queue_id = ANY(%s) GROUP BY queue_id"
                    f" HAVING bool_and(state NOT IN {_PENDING_SQL})",
                    (wanted,),
                )
            }
        return [queue_id for queue_id in wanted if queue_id in found]

    def counts(self) -> dict[str, int]:
        with self.db.connection() as conn:
            return {
                state: int(n)
                for state, n in conn.execute("SELECT state, count(*) FROM queue GROUP BY state")
            }

    def expire_history(self, before: float) -> int:
        with self.db.connection() as conn:
            gone = conn.execute(
                "DELETE FROM queue WHERE state IN ('delivered', 'bounced') AND updated < %s",
                (before,),
            ).rowcount
            conn.execute(
                "DELETE FROM attempts WHERE at < %s AND queue_id NOT IN"
                f" (SELECT queue_id FROM queue WHERE state IN {_PENDING_SQL})",
                (before,),
            )
            return max(0, gone)
