"""The PostgreSQL store: several ehlo nodes on one database.

``PostgresStore(url)`` keeps everything a node keeps in one PostgreSQL
database (schema in ``_pg_schema``), so that any number of nodes share the
messages, the outbound queue, the users and the abuse counters:

- ``_pg_conn``: the URL, the pools, the one log line per outage;
- ``_pg_write``: the writer (bodies streamed as chunk rows; group commit:
  the messages finishing in one loop turn share one transaction, and the
  250 waits for its ``COMMIT``);
- ``_pg_read``: the reads (list, search, get, raw, newer, overview, the
  session log, deletes and retention), synchronous, on the pooled
  connections;
- ``_pg_listen``: ``LISTEN`` for the hints other nodes send with ``NOTIFY``;
- ``_pg_queue``: the outbound queue with leases (``FOR UPDATE SKIP LOCKED``);
- ``_pg_users``: the AUTH users (``ehlo.auth.UserStore`` reads them through
  :meth:`PostgresStore.users`);
- ``_pg_abuse``: the abuse counters and lockouts the nodes add up
  (:meth:`PostgresStore.abuse`, used by ``ehlo.server.abuse``).

The schema is created or migrated by ``start`` (and ``ehlo db migrate``),
never destructively.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from . import _pg_read as reads
from ._overview import Overview
from ._pg_abuse import PostgresAbuse
from ._pg_conn import Database, node_name
from ._pg_users import PostgresUsers
from ._query import Query, Retention
from .base import (
    DELETE_BATCH,
    SESSION_LOG_MAX,
    Envelope,
    MessageWriter,
    Store,
    StoredMessage,
    StoreStats,
)
from .queue import Queue


class PostgresStore(Store):
    """Messages, queue, users and counters in one PostgreSQL database."""

    name = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        retention: Retention | None = None,
        node: str | None = None,
        ehlo_version: str = "",
    ) -> None:
        self.db = Database(url)
        self.url = self.db.url
        self.node = node or node_name()
        self.retention = retention
        self.ehlo_version = ehlo_version
        self.stats = StoreStats()
        self._listeners: list[Callable[[str], None]] = []
        self._queue: Queue | None = None
        self._users: PostgresUsers | None = None

    # --- life cycle and writing (_pg_write) ----------------------------------------------

    def preflight(self) -> None:
        """Connect once and bring the schema up to date (before workers fork)."""
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def begin(self, envelope: Envelope) -> MessageWriter:
        raise NotImplementedError

    def log_session(self, record: dict[str, Any], keep: int = SESSION_LOG_MAX) -> None:
        raise NotImplementedError

    def add_listener(self, callback: Callable[[str], None]) -> None:
        self._listeners.append(callback)

    @property
    def queue(self) -> Queue:
        if self._queue is None:
            from ._pg_queue import PostgresQueue

            self._queue = PostgresQueue(self.db, self.node)
        return self._queue

    # --- what the nodes share besides mail (_pg_users, _pg_abuse) -------------------------

    def users(self) -> PostgresUsers:
        """The AUTH users' table, on this store's connections."""
        if self._users is None:
            self._users = PostgresUsers(self.db)
        return self._users

    def abuse(self) -> PostgresAbuse:
        """The shared abuse counters, on this store's connections."""
        return PostgresAbuse(self.db)

    # --- reads (_pg_read) -------------------------------------------------------------

    def sessions(self, limit: int = 50, before: str | None = None) -> list[dict[str, Any]]:
        with self.db.connection() as conn:
            return reads.sessions(conn, limit, before)

    def list(self, limit: int | None = None) -> Sequence[StoredMessage]:
        with self.db.connection() as conn:
            return reads.list_messages(conn, limit)

    def search(self, query: Query) -> Iterator[StoredMessage]:
        return reads.search(self.db, query)

    def overview(self, since: _dt.datetime) -> Overview:
        with self.db.connection() as conn:
            return reads.overview(conn, since)

    def delete(self, ids: Iterable[str]) -> Sequence[str]:
        with self.db.connection() as conn:
            return reads.delete(conn, list(ids))

    def delete_matching(self, query: Query) -> int:
        return reads.delete_matching(self.db, query)

    def prune(self, retention: Retention, limit: int = DELETE_BATCH) -> int:
        if not self.queue.housekeeper():
            return 0
        with self.db.connection() as conn:
            return reads.prune(conn, retention, limit)

    def newer(self, mark: object | None) -> tuple[Sequence[StoredMessage], object]:
        with self.db.connection() as conn:
            return reads.newer(conn, mark)

    def newer_ids(self, mark: object | None) -> tuple[Sequence[str], object]:
        with self.db.connection() as conn:
            return reads.newer_ids(conn, mark)

    def count(self) -> int:
        with self.db.connection() as conn:
            return reads.count(conn)

    def get(self, queue_id: str) -> StoredMessage | None:
        with self.db.connection() as conn:
            return reads.get(conn, queue_id)

    def raw(self, queue_id: str) -> bytes | None:
        with self.db.connection() as conn:
            return reads.raw(conn, queue_id)

    def read(self, queue_id: str) -> tuple[StoredMessage, bytes] | None:
        with self.db.connection() as conn:
            return reads.read(conn, queue_id)
