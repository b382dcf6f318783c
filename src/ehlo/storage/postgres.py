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
- ``_pg_queue``: the outbound queue with leases (``FOR UPDATE SKIP LOCKED``).

The schema is created or migrated by ``start`` (and ``ehlo db migrate``),
never destructively.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _pg_read as reads
from ._overview import Overview
from ._pg_conn import Database, node_name, one_line, require_driver
from ._pg_schema import CHANNEL_MESSAGES, CHANNEL_QUEUE, migrate
from ._query import Query, Retention
from .base import (
    DELETE_BATCH,
    SESSION_LOG_MAX,
    Envelope,
    MessageWriter,
    Store,
    StoredMessage,
    StoreError,
    StoreStats,
    check_writable,
    private_dir,
)
from .queue import Queue
from .sqlite import _encode

if TYPE_CHECKING:
    from ._pg_listen import Listener
    from ._pg_write import Committer

log = logging.getLogger("ehlo.storage")

# What a notice on each channel tells the store's listeners has changed.
_TOPICS = {CHANNEL_MESSAGES: "messages", CHANNEL_QUEUE: "queue"}
# Seconds between two looks for orphaned staged bodies (by the housekeeper).
ORPHAN_INTERVAL = 60.0


def _ehlo_version() -> str:
    """This ehlo's version, as the schema table records who applied a version."""
    import importlib.metadata

    try:
        return importlib.metadata.version("ehlo")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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
        spool_dir: Path | None = None,
    ) -> None:
        self.db = Database(url)
        self.url = self.db.url
        self.node = node or node_name()
        self.retention = retention
        self.ehlo_version = ehlo_version
        self.stats = StoreStats()
        self._listeners: list[Callable[[str], None]] = []
        self._queue: Queue | None = None
        # Where bodies larger than one chunk wait for their commit (None: the
        # system's temporary folder).
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self._committer: Committer | None = None
        self._listener: Listener | None = None
        self._orphans_due = 0.0  # when housekeeping next looks for orphaned bodies

    # --- life cycle and writing (_pg_write) ----------------------------------------------

    @property
    def backlog_bytes(self) -> int:
        """Body octets handed to a commit and not yet in the database."""
        committer = self._committer
        return committer.backlog if committer is not None else 0

    def drained(self, low: int) -> asyncio.Future[None]:
        committer = self._committer
        if committer is None:
            return super().drained(low)
        return committer.drained(low)

    def _migrate(self) -> None:
        """Connect once and bring the schema to the latest version (one StoreError line)."""
        require_driver()
        import psycopg

        conn = self.db.connect(autocommit=True)
        try:
            migrate(conn, self.ehlo_version or _ehlo_version())
        except psycopg.Error as exc:
            raise StoreError(f"postgresql: {one_line(exc)}") from None
        finally:
            conn.close()

    def _check_spool(self) -> None:
        folder = self.spool_dir
        if folder is None:
            return
        try:
            private_dir(folder)
        except OSError as exc:
            raise StoreError(f"cannot create {folder}: {exc.strerror or exc}") from None
        check_writable(folder)

    def preflight(self) -> None:
        """Connect once and bring the schema up to date (before workers fork)."""
        self._check_spool()
        self._migrate()
        self.db.close()

    async def start(self) -> None:
        """Migrate (each node may start first), open the writer's pool, listen, retain.

        A database that cannot be reached now is one StoreError line: the
        server does not start. Once started, an outage only fails commits.
        """
        if self._committer is not None:
            return
        self._check_spool()
        await asyncio.to_thread(self._migrate)
        from ._pg_listen import Listener
        from ._pg_write import Committer

        committer = Committer(self.db, self.node, self.stats)
        await committer.open()
        listener = Listener(self.url, self._notified)
        try:
            await listener.start()
        except BaseException:
            await committer.close()
            raise
        self._committer, self._listener = committer, listener
        self._start_retention()

    def _notified(self, channel: str, payload: str) -> None:
        """A notice from the database: tell the listeners which topic changed."""
        topic = _TOPICS.get(channel)
        if topic is None:
            return
        for callback in list(self._listeners):
            try:
                callback(topic)
            except Exception:  # a listener's fault is its own
                log.exception("postgresql: a listener failed on %s", channel)

    async def close(self) -> None:
        """Finish the commits under way, then close the listener and the pools."""
        await self._stop_retention()
        committer, self._committer = self._committer, None
        listener, self._listener = self._listener, None
        try:
            if committer is not None:
                await committer.close()
        finally:
            if listener is not None:
                with contextlib.suppress(Exception):
                    await listener.close()
            queue = self._queue
            if queue is not None:  # its housekeeping lock's connection
                await asyncio.to_thread(queue.close)
            await asyncio.to_thread(self.db.close)

    def begin(self, envelope: Envelope) -> MessageWriter:
        committer = self._committer
        if committer is None:
            raise StoreError("postgresql store is not open")
        committer.check_open()
        from ._pg_write import PostgresWriter

        return PostgresWriter(committer, envelope, self.spool_dir)

    def log_session(self, record: dict[str, Any], keep: int = SESSION_LOG_MAX) -> None:
        committer = self._committer
        if committer is None or keep <= 0:
            return
        row = (
            str(record["id"]),
            self.node,
            str(record["started_at"]),
            str(record["ended_at"]),
            str(record["client_ip"]),
            _encode(record),
        )
        committer.log(row, keep)

    def add_listener(self, callback: Callable[[str], None]) -> None:
        self._listeners.append(callback)

    @property
    def queue(self) -> Queue:
        if self._queue is None:
            from ._pg_queue import PostgresQueue

            self._queue = PostgresQueue(self.db, self.node)
        return self._queue

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
        """Housekeeping, on one node at a time: the orphaned staged bodies (now and
        then), then at most ``limit`` messages beyond ``retention``."""
        try:
            if not self.queue.housekeeper():
                return 0
            self._drop_orphans()
            if not retention.active:
                return 0
            with self.db.connection() as conn:
                return reads.prune(conn, retention, limit)
        except StoreError:
            if self.db.outage.down:
                return 0  # logged once as the outage; the next pass tries again
            raise

    def _drop_orphans(self) -> None:
        """Delete the bodies staged by a node that died before their commit."""
        now = time.monotonic()
        if now < self._orphans_due:
            return
        from ._pg_write import drop_orphans

        with self.db.connection() as conn:
            dropped = drop_orphans(conn)
        self._orphans_due = now + ORPHAN_INTERVAL
        if dropped:
            log.info(
                "postgresql: removed %d staged bodies whose message never came", dropped,
                extra={"event": "orphans_removed", "count": dropped},
            )

    def _start_retention(self) -> None:
        """Start the housekeeping loop; it runs even when every message is kept
        (the orphaned staged bodies), and prunes only under an active retention."""
        if self._retention_task is not None:
            return
        self._retention_stop = asyncio.Event()
        self._retention_task = asyncio.get_running_loop().create_task(
            self._retain(self.retention or Retention(), self._retention_stop),
            name="ehlo-retention-postgresql",
        )

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
