"""The SQLite message store (the default backend).

This module owns :class:`SQLiteStore` and :class:`SQLiteWriter`: streaming a
body in the event loop, handing each committed message to the writer, and
the read-only queries used by the CLI. The rest lives beside it, one concern
per module:

- :mod:`ehlo.storage._sqlite_db`: the schema, connections, paths, owner locks;
- :mod:`ehlo.storage._batch`: the single writer that performs every write
  (open, recover, a batch in one transaction, outcomes), with no threads;
- :mod:`ehlo.storage._backend`: :class:`~ehlo.storage._backend.WriterBackend`,
  all the store knows of where that writer runs;
- :mod:`ehlo.storage._sqlite_process` (the default: a child process, or the
  hub of :mod:`ehlo.storage._sqlite_hub` that ``--workers`` share) and
  :mod:`ehlo.storage._sqlite_thread` (``writer="thread"``): its hosts;
- :mod:`ehlo.storage._wire`: the frames between a store and a writer process.

Layout::

    messages(queue_id PRIMARY KEY, received_at, client_ip, ..., size, subject)
    chunks(queue_id, seq, data BLOB)      -- a body of at most 256 KiB, one row
    pending(queue_id PRIMARY KEY, owner)  -- earlier versions' chunks written ahead of their row
    sessions(seq PRIMARY KEY, id, ..., record)  -- the session log, newest session_log_max
    ehlo.sqlite3.bodies/<queue_id>        -- a larger body, in a file of its own
    ehlo.sqlite3.bodies/.spool/<owner>/   -- bodies being received by one store

Writing. A body is never held whole in memory: :meth:`SQLiteWriter.write`
gathers up to :data:`CHUNK_SIZE` bytes. A body that stays within that size
is queued for the writer as one chunk row when the message is committed. A
larger body goes to a file beside the database as it arrives (one write
per 64 KiB or per network read, from the event loop, like the Maildir
store): through SQLite it would be written twice, to the WAL and again at
checkpoint, and copied to the writer on the way. It is written in the
store instance's spool folder; at commit the writer syncs it, links it
under its final name, syncs the folder, and only then COMMITs the row that
makes it visible.
``commit`` queues the whole message (its envelope row, and its body unless
that is a file) and awaits a future. The writer takes every message queued
(up to a cap), writes them inside ONE transaction and issues ONE ``COMMIT``
(WAL; ``synchronous=FULL``, one fsync of the WAL), then resolves every commit
future of the batch. Concurrent sessions thus share
fsyncs (group commit); ``stats.commits`` counts the COMMITs, ``stats.messages``
the messages. A message's row and its chunk are written in the same
transaction: a message is there whole, or not at all.

The session log. :meth:`SQLiteStore.log_session` hands an ended session's
row to the same writer (no answer awaited); it is written with the batch it
arrives in, and the table trimmed there to the newest ``keep`` rows.

Backpressure. :attr:`SQLiteStore.backlog_bytes` is the number of body bytes
queued for the writer and not yet executed. The network layer stops
reading from clients while it is above a high-water mark and awaits
:meth:`SQLiteStore.drained`, which the writer settles after the batch
that brings the backlog down to the low-water mark.

Crashes and several processes. Body files written before a crash are
orphans (and so are chunks that earlier versions wrote ahead of their row,
recorded in ``pending`` with their writer as owner). Each writer holds an
exclusive ``flock`` on its own lock file (in ``<db>.locks/``); each store
instance holds one on its spool folder's lock file. ``start`` deletes the
pending chunks and the spool folders whose owner's lock is free (the
process died), never those of a live process sharing the database. WAL
plus a busy timeout let several server processes and the CLI use one file
at once.

Modes. The database file is created 0600 before SQLite opens it (SQLite
gives its ``-wal`` and ``-shm`` files the database file's mode), and an
existing one wider than that is narrowed, with its ``-wal`` and ``-shm``;
body, spool and lock files are 0600, their folders 0700. The writer and
the store check at start that every folder they write to is writable.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as _dt
import functools
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ._backend import WriterBackend
from ._overview import TOP_NAMES, Overview
from ._query import Query, Retention, body_text
from ._spool import CHUNK_SIZE, SpoolingWriter
from ._sqlite_db import (
    COLUMNS,
    SCHEMA_VERSION,
    SPOOL,
    OwnerLock,
    body_dir,
    connect,
    fold,
    locks_dir,
    open_read_write,
    search_row,
    spooled_body,
    write_turn,
)
from .base import (
    DELETE_BATCH,
    SESSION_LOG_MAX,
    Envelope,
    JSONText,
    NoSuchMessage,
    Store,
    StoredMessage,
    StoreError,
    StoreStats,
    check_writable,
    fsync_dir,
    private_dir,
)
from .queue import SQLiteQueue

__all__ = ["CHUNK_SIZE", "SQLiteStore", "SQLiteWriter", "body_dir", "spooled_body"]



def _utc_text(moment: _dt.datetime) -> str:
    """Fixed-width UTC ISO text, so that rows sort by time as text."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.UTC)
    return moment.astimezone(_dt.UTC).isoformat(timespec="microseconds")


# One encoder for every row: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


def _dumps(value: Any) -> str:
    if not value and (value == {} or value == []):
        return "{}" if isinstance(value, dict) else "[]"  # most messages: no parameters
    return _encode(value)


def _dumps_extra(extra: dict[str, Any]) -> str:
    """``_dumps(extra)``, with :class:`JSONText` values put in as they are."""
    ready = [(k, v) for k, v in extra.items() if isinstance(v, JSONText)]
    if not ready:
        return _dumps(extra)
    rest = _dumps({k: v for k, v in extra.items() if not isinstance(v, JSONText)})
    parts = [rest[1:-1]] if rest != "{}" else []
    parts += [f"{_dumps(k)}:{v}" for k, v in ready]
    return "{" + ",".join(parts) + "}"


# --- the public classes -----------------------------------------------------------


class SQLiteWriter(SpoolingWriter):
    """One message being streamed into an :class:`SQLiteStore`."""

    __slots__ = ("_store",)

    def __init__(self, store: SQLiteStore, envelope: Envelope) -> None:
        super().__init__(envelope)
        self._store = store

    def _open_spool(self) -> int:
        """The body file, named by the queue id: the writer links it at commit."""
        return os.open(
            self._store._spooled(self._envelope.queue_id),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
            0o600,
        )

    async def commit(self) -> str:
        return await self.start_commit()

    def start_commit(self) -> asyncio.Future[str]:
        if self._state != "open":
            raise RuntimeError(f"message {self._envelope.queue_id} is no longer open")
        writer = self._store._writer_or_error()
        spool = None
        body: bytearray | None = None  # a body of one chunk, handed to the writer with its row
        if self._fd is not None:
            spool = self._store._spool_name
            try:
                self._flush()
            except StoreError:
                self.abort()
                raise
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError as exc:
                self.abort()
                with contextlib.suppress(OSError):
                    self._store._spooled(self._envelope.queue_id).unlink()
                raise StoreError(f"message {self._envelope.queue_id}: body file: {exc}") from exc
        elif self._buffer:
            body, self._buffer = self._buffer, bytearray()  # handed over whole: no copy
        env = self._envelope
        received_at = _utc_text(env.received_at)
        queued_at = env.received_at.timestamp()
        subject = self._head.subject()
        attachments = self._attachments(body)
        row = (
            env.queue_id,
            received_at,
            env.client_ip,
            env.client_port,
            env.greeting,
            env.greeting_name,
            env.mail_from,
            _dumps(env.mail_params),
            _dumps(env.rcpt_to),
            _dumps(env.tls) if env.tls else None,
            env.protocol,
            env.server_name,
            _dumps_extra(env.extra),
            self._size,
            subject,
            env.size_received,
            search_row(
                env.queue_id,
                received_at,
                env.mail_from,
                env.rcpt_to,
                subject,
                env.greeting,
                bool(env.tls),
                env.extra,
                env.greeting_name,
                attachments,
            ),
            [item.row(env.queue_id, queued_at) for item in env.queue] if env.queue else (),
        )
        self._state = "done"
        # Nothing reaches the writer before this point, so an abort never has
        # anything to take back there. From here the writer owns the body
        # (a spooled one it links or removes).
        return writer.put(row, body, spool)

    def abort(self) -> None:
        if self._state != "open":
            return  # committed, committing or already aborted: nothing to undo
        self._state = "done"
        self._buffer = bytearray()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                self._store._spooled(self._envelope.queue_id).unlink()


class SQLiteStore(Store):
    """Messages in one SQLite database file (WAL, ``synchronous=FULL``).

    ``SQLiteStore(data_dir / "ehlo.sqlite3")``; ``await start()`` before
    ``begin``; ``list``/``get``/``raw`` work without ``start`` (from the CLI,
    while a server process writes).
    """

    name = "sqlite"

    def __init__(
        self,
        path: Path,
        *,
        shared: bool = False,
        writer: str = "process",
        writer_address: str | None = None,
        retention: Retention | None = None,
    ) -> None:
        if writer not in ("process", "thread"):
            raise ValueError(f"writer: expected 'process' or 'thread', got {writer!r}")
        self.path = Path(path)
        self.shared = shared
        # Where the writer runs: a child process (the default; see
        # ehlo.storage._sqlite_process) or a thread of this process; with
        # ``writer_address``, the writer another process runs for several
        # (``ehlo serve --workers``).
        self.writer_kind = writer
        self.writer_address = writer_address
        self.bodies = body_dir(self.path)
        self.stats = StoreStats()
        self._writer: WriterBackend | None = None
        # This instance's spool folder for the large bodies it receives, and
        # the lock that tells a sweeping writer it is alive.
        self._spool_lock: OwnerLock | None = None
        self._spool_name = ""
        # What retention keeps while serving (None: everything).
        self.retention = retention
        # The read-write connection of deletes (the CLI, retention), made on first use.
        self._rw: sqlite3.Connection | None = None
        self._rw_lock = threading.Lock()
        self._queue: SQLiteQueue | None = None
        # The read connection of ``read`` (delivery), made on first use.
        self._ro: sqlite3.Connection | None = None
        self._ro_lock = threading.Lock()
        # The read connection of ``newer`` (the web API's live events), made on first use.
        self._mark_conn: sqlite3.Connection | None = None
        self._mark_lock = threading.Lock()

    @property
    def backlog_bytes(self) -> int:
        """Body bytes queued for the writer but not yet executed."""
        writer = self._writer
        return writer.pending_bytes if writer is not None else 0

    def drained(self, low: int) -> asyncio.Future[None]:
        """A future done once the writer's backlog is at most ``low``."""
        writer = self._writer
        if writer is None:
            return super().drained(low)
        return writer.drained(low)

    @property
    def owner(self) -> str | None:
        """The writer's owner token (its lock file name), once started."""
        writer = self._writer
        return writer.owner if writer is not None else None

    def preflight(self) -> None:
        locks = locks_dir(self.path)
        try:
            check_writable(self.path.parent)
            for folder in (self.bodies, self.bodies / SPOOL, locks):
                if folder.is_dir():  # the others are made by start()
                    check_writable(folder)
        except StoreError as exc:
            raise StoreError(f"sqlite store {self.path}: {exc}") from None

    async def start(self) -> None:
        if self._writer is not None:
            return
        spool_lock = OwnerLock(self.bodies / SPOOL)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            check_writable(self.path.parent)
            private_dir(self.bodies)
            private_dir(spool_lock.directory)
            spool_lock.acquire()  # before the folder: a sweep never sees it unowned
            own = spool_lock.directory / spool_lock.owner
            private_dir(own)
            # Where this instance's large bodies are written, and linked at commit.
            for folder in (self.bodies, spool_lock.directory, own):
                check_writable(folder)
        except (OSError, StoreError) as exc:
            spool_lock.release()
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        self._spool_lock, self._spool_name = spool_lock, spool_lock.owner
        try:
            await self._start_writer()
        except BaseException:
            self._release_spool()
            raise
        self._start_retention()

    async def _start_writer(self) -> None:
        writer: WriterBackend
        if self.writer_kind == "process":
            from ._sqlite_process import WriterProcess

            writer = WriterProcess(
                self.path, self.stats, self.shared, self.writer_address, self._spool_name
            )
        else:
            from ._sqlite_thread import ThreadWriter

            writer = ThreadWriter(self.path, self.stats, self.shared)
        await writer.start()
        self._writer = writer

    async def close(self) -> None:
        await self._stop_retention()
        self._close_rw()
        with self._mark_lock:
            self._close_mark()
        if self._queue is not None:
            self._queue.close()
        writer = self._writer
        if writer is None:
            return
        self._writer = None
        try:
            await writer.stop()
        finally:
            self._release_spool()

    def _release_spool(self) -> None:
        """Remove this instance's spool folder (with what an abort left) and its lock."""
        lock, self._spool_lock = self._spool_lock, None
        if lock is None:
            return
        folder = lock.directory / lock.owner
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            folder.rmdir()
        lock.release()

    def _spooled(self, queue_id: str) -> Path:
        """Where this instance receives the body of ``queue_id``."""
        return spooled_body(self.bodies, self._spool_name, queue_id)

    def _writer_or_error(self) -> WriterBackend:
        writer = self._writer
        if writer is None:
            raise StoreError(f"sqlite store {self.path} is not open")
        if writer.broken is not None:
            raise StoreError(f"sqlite store {self.path}: {writer.broken}")
        return writer

    def begin(self, envelope: Envelope) -> SQLiteWriter:
        self._writer_or_error()
        return SQLiteWriter(self, envelope)

    def log_session(self, record: dict[str, Any], keep: int = SESSION_LOG_MAX) -> None:
        writer = self._writer
        if writer is None or writer.broken is not None or keep <= 0:
            return
        row = (
            str(record["id"]),
            str(record["started_at"]),
            str(record["ended_at"]),
            str(record["client_ip"]),
            _encode(record),
        )
        writer.log(row, keep)

    def sessions(self, limit: int = 50, before: str | None = None) -> list[dict[str, Any]]:
        with self._reader() as conn:
            if conn is None:
                return super().sessions(limit, before)
            try:
                if before is None:
                    cursor = conn.execute(
                        "SELECT record FROM sessions ORDER BY seq DESC LIMIT ?", (max(limit, 0),)
                    )
                else:
                    found = conn.execute(
                        "SELECT max(seq) FROM sessions WHERE id = ?", (before,)
                    ).fetchone()
                    if found is None or found[0] is None:
                        raise StoreError(f"no session with id {before!r}")
                    cursor = conn.execute(
                        "SELECT record FROM sessions WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                        (found[0], max(limit, 0)),
                    )
                return [json.loads(record) for (record,) in cursor]
            except (sqlite3.Error, ValueError) as exc:
                raise StoreError(f"sqlite store {self.path}: sessions: {exc}") from exc

    @property
    def queue(self) -> SQLiteQueue:
        """The outbound queue, in this database's ``queue`` and ``attempts`` tables."""
        found = self._queue
        if found is None:
            found = self._queue = SQLiteQueue(self.path)
        return found

    # --- reads: short-lived read-only connections -------------------------------

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection | None]:
        """A read-only connection holding one snapshot, or None when there is no data.

        A database of an earlier version is upgraded first (which needs
        write access, once).
        """
        if not self.path.exists():
            yield None
            return
        for attempt in (1, 2):
            try:
                conn = connect(self.path, read_only=True)
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite store {self.path}: {exc}") from exc
            try:
                conn.execute("BEGIN")
                schema = conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
                ).fetchone()
                if schema is not None and attempt == 1:
                    version = conn.execute("PRAGMA user_version").fetchone()[0]
                    if version < SCHEMA_VERSION:
                        conn.close()
                        self._upgrade()
                        continue
                yield conn if schema is not None else None
                return
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite store {self.path}: {exc}") from exc
            finally:
                conn.close()

    def _upgrade(self) -> None:
        """Upgrade the database in place (what a writer does when it opens it)."""
        with self._rw_lock:
            self._connection()

    def list(self, limit: int | None = None) -> Sequence[StoredMessage]:
        return list(self.search(Query(limit=limit)))

    def search(self, query: Query) -> Iterator[StoredMessage]:
        """The selected messages, newest first, streamed from one snapshot."""
        with self._reader() as conn:
            if conn is None:
                if query.before is not None or query.after is not None:
                    raise NoSuchMessage(f"no message with id {query.before or query.after!r}")
                return
            if query.needs_body:
                yield from self._search_words(conn, query)
                return
            sql, params, reverse = _select(conn, query)
            cursor = conn.execute(sql, params)
            if reverse:  # a bounded page, read oldest first
                yield from [_message(row) for row in cursor][::-1]
                return
            for row in cursor:
                yield _message(row)

    # --- what is new: one long-lived read connection ------------------------------

    def newer(self, mark: object | None) -> tuple[Sequence[StoredMessage], object]:
        """Messages committed since ``mark`` (by rowid of the search table), oldest first.

        ``PRAGMA data_version`` on a connection kept open tells, without
        reading a row, whether any other connection (any worker's writer)
        committed since the last call: then the answer is at once. Otherwise
        the new rows are those above the newest row of the mark that is
        still there. SQLite gives a new row the largest rowid plus one, so
        after the newest rows are deleted their rowids are given again: the
        mark keeps the (rowid, id) pairs of the newest :data:`_MARK_WINDOW`
        rows, and only a row that is still the same message counts as old.
        (Should every one of those rows be deleted between two calls while
        older ones stay, a message written in that moment below them is not
        seen; a store holding no more than the window is always exact.)
        """
        with self._mark_lock:
            try:
                ids, now, conn = self._newer(mark)
                return self._messages_of(conn, ids), now
            except sqlite3.Error as exc:
                self._close_mark()
                raise StoreError(f"sqlite store {self.path}: {exc}") from exc

    def newer_ids(self, mark: object | None) -> tuple[Sequence[str], object]:
        """:meth:`newer` without reading the messages' rows: the search rows' ids."""
        with self._mark_lock:
            try:
                ids, now, _ = self._newer(mark)
                return ids, now
            except sqlite3.Error as exc:
                self._close_mark()
                raise StoreError(f"sqlite store {self.path}: {exc}") from exc

    @staticmethod
    def _messages_of(
        conn: sqlite3.Connection | None, ids: Sequence[str]
    ) -> Sequence[StoredMessage]:
        """The messages of ``ids`` still there, in that order."""
        if conn is None or not ids:
            return []
        found: dict[str, StoredMessage] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for row in conn.execute(
                f"SELECT {COLUMNS} FROM messages WHERE queue_id IN ({marks})", chunk
            ):
                message = _message(row)
                found[message.envelope.queue_id] = message
        return [found[i] for i in ids if i in found]

    def _newer(
        self, mark: object | None
    ) -> tuple[Sequence[str], object, sqlite3.Connection | None]:
        """The new rows' ids, the mark of now, and the connection to read them with."""
        if not self.path.exists():
            return [], _RowMark(-1, (), True), None
        conn = self._mark_conn
        if conn is None:
            conn = self._mark_conn = connect(self.path, read_only=True)
        version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        if isinstance(mark, _RowMark) and mark.version == version:
            return [], mark, conn
        conn.execute("BEGIN")
        try:
            if conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'search'"
            ).fetchone() is None:
                return [], _RowMark(version, (), True), conn
            top = conn.execute(
                "SELECT rowid, queue_id FROM search ORDER BY rowid DESC LIMIT ?",
                (_MARK_WINDOW + 1,),
            ).fetchall()
            now = _RowMark(
                version, tuple((int(r), str(q)) for r, q in top[:_MARK_WINDOW]),
                len(top) <= _MARK_WINDOW,
            )
            if not isinstance(mark, _RowMark):
                return [], now, conn
            old = set(mark.top)
            low = 0 if mark.complete or not mark.top else mark.top[-1][0]
            rows = conn.execute(
                "SELECT rowid, queue_id FROM search WHERE rowid >= ? ORDER BY rowid", (low,)
            ).fetchall()
            kept = [int(r) for r, q in rows if (int(r), str(q)) in old]
            floor = max(kept) if kept else low - 1
            ids = [str(q) for r, q in rows if int(r) > floor and (int(r), str(q)) not in old]
            return ids, now, conn
        finally:
            conn.execute("COMMIT")

    def _close_mark(self) -> None:
        conn, self._mark_conn = self._mark_conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _search_words(self, conn: sqlite3.Connection, query: Query) -> Iterator[StoredMessage]:
        """A query with words of the body: the other filters in SQL, then each
        candidate's subject and body in turn (newest first) until the page is full.

        A candidate's envelope is read only once its words match (``q=`` makes
        such queries); any other query is tested whole on each candidate.
        """
        # The page just newer than ``after`` is read upwards, then turned round.
        reverse = query.limit is not None and query.after is not None and query.before is None
        light = query.plain_words
        sql, params, _ = _select(
            conn,
            dataclasses.replace(query, limit=None),
            oldest_first=reverse,
            ids_only=light,
            with_body=True,
        )
        picked: list[StoredMessage] = []
        for row in conn.execute(sql, params):
            if query.limit is not None and len(picked) >= query.limit:
                break
            queue_id, subject, size, data = row[0], row[-3], row[-2], row[-1]
            text = functools.partial(self._body_text, conn, queue_id, size, data)
            if light:
                if not query.words_match(subject, text):
                    continue
                found = conn.execute(
                    f"SELECT {_M_COLUMNS}, s.attachments FROM search s CROSS JOIN messages m"
                    " ON m.queue_id = s.queue_id WHERE s.queue_id = ?",
                    (queue_id,),
                ).fetchone()
                if found is None:
                    continue
                message = _message(found)
            else:
                message = _message(row)
                if not query.matches(message, text):
                    continue
            if not reverse:
                yield message
            picked.append(message)
        if reverse:
            yield from picked[::-1]

    def _body_text(
        self, conn: sqlite3.Connection, queue_id: str, size: int, first: bytes | None
    ) -> str:
        """The searchable text of a body: its one chunk, or its chunks, or its file."""
        data = bytes(first) if first is not None else b""
        if len(data) != size:
            data = b"".join(
                bytes(chunk)
                for (chunk,) in conn.execute(
                    "SELECT data FROM chunks WHERE queue_id = ? ORDER BY seq", (queue_id,)
                )
            )
        if not data and size:
            try:
                data = (self.bodies / queue_id).read_bytes()
            except OSError:
                return ""
        return body_text(data)

    def count(self) -> int:
        """How many messages the store holds (its search rows, by their index)."""
        with self._reader() as conn:
            if conn is None:
                return 0
            return int(conn.execute("SELECT count(*) FROM search").fetchone()[0])

    def get(self, queue_id: str) -> StoredMessage | None:
        found = self._query(
            f"SELECT {_M_COLUMNS}, s.attachments FROM messages m"
            " LEFT JOIN search s ON s.queue_id = m.queue_id WHERE m.queue_id = ?",
            (queue_id,),
        )
        return found[0] if found else None

    def overview(self, since: _dt.datetime) -> Overview:
        """The overview in SQL: grouped counts over the window's rows, from one snapshot.

        The minutes come from the ``received_at`` index alone; the rest is
        one grouped pass over the window's ``search`` rows and one over its
        ``messages`` rows (the client names). Python sees only the groups.
        A window holding most of the store is read as a plain scan of the
        table, which is cheaper than a lookup per index entry.
        """
        found = Overview()
        with self._reader() as conn:
            if conn is None:
                return found
            start = _utc_text(since)
            # The text is fixed-width UTC: its first 16 characters are the minute.
            for minute, count in conn.execute(
                "SELECT substr(received_at, 1, 16), count(*) FROM search"
                " WHERE received_at >= ? GROUP BY 1",
                (start,),
            ):
                found.per_minute[minute] = count
                found.total += count
            if not found.total:
                return found
            stored = conn.execute("SELECT count(*) FROM search").fetchone()[0]
            scan = " NOT INDEXED" if found.total * 2 > stored else ""
            for verb, tls, checks, count in conn.execute(
                f"SELECT greeting, tls, checks, count(*) FROM search{scan}"
                " WHERE received_at >= ? GROUP BY 1, 2, 3",
                (start,),
            ):
                found.greetings[verb] = found.greetings.get(verb, 0) + count
                found.tls["yes" if tls else "no"] += count
                # "\nname=result\n..." (folded): one group per combination of results.
                for pair in checks.split("\n"):
                    name, sep, result = pair.partition("=")
                    if sep:
                        found.add_check(name, result, count)
            found.top_names = [
                (name, count)
                for name, count in conn.execute(
                    "SELECT lower(greeting_name) AS name, count(*) AS n"
                    f" FROM messages{scan} WHERE received_at >= ?"
                    " GROUP BY name ORDER BY n DESC, name LIMIT ?",
                    (start, TOP_NAMES),
                )
            ]
        return found

    def _query(self, query: str, params: tuple[Any, ...]) -> Sequence[StoredMessage]:
        with self._reader() as conn:
            if conn is None:
                return []
            return [_message(row) for row in conn.execute(query, params)]

    # --- deletes: one read-write connection, short transactions ------------------

    def _connection(self) -> sqlite3.Connection:
        """The read-write connection (under ``_rw_lock``); the schema made current."""
        conn = self._rw
        if conn is None:
            try:
                # A delete is durable when it returns.
                conn = open_read_write(self.path, synchronous="FULL", cache_kib=1024)
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"sqlite store {self.path}: {exc}") from exc
            self._rw = conn
        return conn

    def _connection_ready(self) -> None:
        """The schema made current once (by the read-write connection)."""
        with self._rw_lock:
            self._connection()

    def _close_rw(self) -> None:
        with self._ro_lock:
            ro, self._ro = self._ro, None
            if ro is not None:
                with contextlib.suppress(sqlite3.Error):
                    ro.close()
        with self._rw_lock:
            conn, self._rw = self._rw, None
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def _write_turn(self) -> contextlib.AbstractContextManager[None]:
        """Take the lock the writers of ``--workers`` take around their transactions."""
        return write_turn(self.path)

    def delete(self, ids: Iterable[str]) -> Sequence[str]:
        """Delete messages (rows, chunks and body files) for good; the ids that were there."""
        wanted = list(dict.fromkeys(ids))
        if not wanted or not self.path.exists():
            return []
        gone: list[str] = []
        for start in range(0, len(wanted), DELETE_BATCH):
            gone.extend(self._delete_batch(wanted[start : start + DELETE_BATCH]))
        return gone

    def _delete_batch(self, ids: Sequence[str]) -> Sequence[str]:
        marks = ", ".join("?" * len(ids))
        with self._rw_lock:
            conn = self._connection()
            try:
                with self._write_turn():
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        found = [
                            row[0]
                            for row in conn.execute(
                                f"SELECT queue_id FROM messages WHERE queue_id IN ({marks})", ids
                            )
                        ]
                        for table in ("chunks", "search", "messages"):
                            conn.execute(f"DELETE FROM {table} WHERE queue_id IN ({marks})", ids)
                        # A deleted message is not handed on; what was done stays in the history.
                        conn.execute(
                            f"DELETE FROM queue WHERE queue_id IN ({marks})"
                            " AND state NOT IN ('delivered', 'bounced')",
                            ids,
                        )
                        conn.execute("COMMIT")  # synchronous=FULL: durable from here
                    except BaseException:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                        raise
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        removed = False
        for queue_id in found:  # a body larger than one chunk is a file of its own
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.bodies / queue_id)
                removed = True
        if removed:
            with contextlib.suppress(OSError):
                fsync_dir(self.bodies)
        return found

    def delete_matching(self, query: Query) -> int:
        if query.needs_body:  # words are tested in Python: select first, then delete
            return super().delete_matching(query)
        deleted = 0
        query = dataclasses.replace(query, limit=DELETE_BATCH)
        while True:
            # The oldest page first: a page keeps its place while newer mail arrives.
            with self._reader() as conn:
                if conn is None:
                    return deleted
                sql, params, _ = _select(conn, query, oldest_first=True, ids_only=True)
                ids = [row[0] for row in conn.execute(sql, params)]
            if not ids:
                return deleted
            gone = self.delete(ids)
            deleted += len(gone)
            if not gone:
                return deleted

    def prune(self, retention: Retention, limit: int = DELETE_BATCH) -> int:
        """Delete at most ``limit`` of the oldest messages beyond ``retention``.

        A message still in the outbound queue is kept until it is handed on.
        """
        if not retention.active or not self.path.exists():
            return 0
        with self._rw_lock:
            conn = self._connection()
            try:
                ids: list[str] = []
                if retention.keep_days > 0:
                    cutoff = _dt.datetime.now(_dt.UTC) - _dt.timedelta(days=retention.keep_days)
                    ids = [
                        row[0]
                        for row in conn.execute(
                            "SELECT queue_id FROM search WHERE received_at < ?"
                            f" AND queue_id NOT IN ({_QUEUED})"
                            " ORDER BY received_at, queue_id LIMIT ?",
                            (_utc_text(cutoff), limit),
                        )
                    ]
                if retention.keep_messages > 0 and len(ids) < limit:
                    total = conn.execute("SELECT count(*) FROM search").fetchone()[0]
                    excess = min(total - retention.keep_messages, limit)
                    if excess > 0:
                        ids += [
                            row[0]
                            for row in conn.execute(
                                "SELECT queue_id FROM search"
                                f" WHERE queue_id NOT IN ({_QUEUED})"
                                " ORDER BY received_at, queue_id LIMIT ?",
                                (excess,),
                            )
                        ]
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        return len(self.delete(ids[: limit * 2]))

    def read(self, queue_id: str) -> tuple[StoredMessage, bytes] | None:
        """The envelope and bytes in one snapshot of a long-lived read connection (no
        connection opened per message: the delivery scheduler reads every message; and
        not the deletes' connection, whose fsyncs it would wait for)."""
        with self._ro_lock:
            try:
                conn = self._ro
                if conn is None:
                    self._connection_ready()
                    conn = self._ro = connect(self.path, read_only=True)
                conn.execute("BEGIN")
                try:
                    row = conn.execute(
                        f"SELECT {COLUMNS} FROM messages WHERE queue_id = ?", (queue_id,)
                    ).fetchone()
                    chunks = conn.execute(
                        "SELECT data FROM chunks WHERE queue_id = ? ORDER BY seq", (queue_id,)
                    ).fetchall()
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        if row is None:
            return None
        stored = _message(row)
        data = b"".join(data for (data,) in chunks)
        if not data and stored.size:
            try:  # a body larger than one chunk is in its file
                data = (self.bodies / queue_id).read_bytes()
            except OSError as exc:
                raise StoreError(f"message {queue_id}: body file: {exc}") from exc
        return stored, data

    def raw(self, queue_id: str) -> bytes | None:
        with self._reader() as conn:
            if conn is None:
                return None
            row = conn.execute(
                "SELECT size FROM messages WHERE queue_id = ?", (queue_id,)
            ).fetchone()
            if row is None:
                return None
            cursor = conn.execute(
                "SELECT data FROM chunks WHERE queue_id = ? ORDER BY seq", (queue_id,)
            )
            data = b"".join(data for (data,) in cursor)
            if data or not row[0]:
                return data
        try:  # a body larger than one chunk is in its file
            return (self.bodies / queue_id).read_bytes()
        except OSError as exc:
            raise StoreError(f"message {queue_id}: body file: {exc}") from exc


# The messages retention must keep: those with recipients still to hand on.
_QUEUED = (
    "SELECT queue_id FROM queue WHERE state IN ('queued', 'deferred', 'delivering', 'held')"
)


# Rows of the search table, the newest, whose (rowid, id) a mark of ``newer`` keeps.
_MARK_WINDOW = 64


@dataclasses.dataclass(frozen=True, slots=True)
class _RowMark:
    """Where ``newer`` stopped: the database's data_version and its newest rows."""

    version: int
    top: tuple[tuple[int, str], ...]  # (rowid, queue_id), newest first
    complete: bool  # ``top`` held every row


def _message(row: tuple[Any, ...]) -> StoredMessage:
    try:
        envelope = Envelope(
            queue_id=row[0],
            received_at=_dt.datetime.fromisoformat(row[1]),
            client_ip=row[2],
            client_port=int(row[3]),
            greeting=row[4],
            greeting_name=row[5],
            mail_from=row[6],
            mail_params=json.loads(row[7]),
            rcpt_to=json.loads(row[8]),
            tls=json.loads(row[9]) if row[9] else None,
            protocol=row[10],
            server_name=row[11],
            extra=json.loads(row[12]),
            size_received=int(row[15]) if row[15] is not None else None,
        )
    except (TypeError, ValueError) as exc:
        raise StoreError(f"message {row[0]}: bad envelope row: {exc}") from exc
    attachments = row[16] if len(row) > 16 else None
    return StoredMessage(
        envelope=envelope,
        size=int(row[13]),
        subject=row[14],
        attachments=None if attachments is None else bool(attachments),
    )


_M_COLUMNS = ", ".join(f"m.{name.strip()}" for name in COLUMNS.split(","))


def _select(
    conn: sqlite3.Connection,
    query: Query,
    *,
    oldest_first: bool = False,
    ids_only: bool = False,
    with_body: bool = False,
) -> tuple[str, list[Any], bool]:
    """The SQL of a query over the search table: its text, parameters, and
    whether its rows come oldest first and must be reversed. ``with_body``:
    each row ends with the case-folded subject, the size and the first chunk."""
    where, params = _conditions(query)
    for bound, op in ((query.before, "<"), (query.after, ">")):
        if bound is None:
            continue
        found = conn.execute(
            "SELECT received_at, queue_id FROM search WHERE queue_id = ?", (bound,)
        ).fetchone()
        if found is None:
            raise NoSuchMessage(f"no message with id {bound!r}")
        where.append(f"(s.received_at, s.queue_id) {op} (?, ?)")
        params += list(found)
    reverse = (
        not oldest_first
        and query.limit is not None
        and query.after is not None
        and query.before is None
    )
    ascending = oldest_first or reverse
    order = "ASC" if ascending else "DESC"
    columns = "s.queue_id" if ids_only else f"{_M_COLUMNS}, s.attachments"
    joins = "" if ids_only else " CROSS JOIN messages m ON m.queue_id = s.queue_id"
    if with_body:
        columns += ", s.subject, m.size, c.data"
        joins = (
            " CROSS JOIN messages m ON m.queue_id = s.queue_id"
            " LEFT JOIN chunks c ON c.queue_id = s.queue_id AND c.seq = 0"
        )
    # CROSS JOIN: the search rows are scanned (newest first, by their index)
    # and each match looks its message up by key.
    sql = (
        f"SELECT {columns} FROM search s"
        + joins
        + (f" WHERE {' AND '.join(where)}" if where else "")
        + f" ORDER BY s.received_at {order}, s.queue_id {order}"
    )
    if query.limit is not None:
        sql += " LIMIT ?"
        params.append(max(query.limit, 0))
    return sql, params, reverse


def _conditions(query: Query) -> tuple[list[str], list[Any]]:
    """The SQL conditions (all must hold) of a query's filters, and their parameters.

    Words of the body are not among them (the caller tests them in Python);
    an excluded sub-query is ``NOT`` of its conditions, NULL counting as false.
    """
    where: list[str] = []
    params: list[Any] = []
    for needle, column in (
        (query.mail_from, "mail_from"),
        (query.rcpt_to, "rcpt_to"),
        (query.subject, "subject"),
        (query.helo, "helo"),
    ):
        if needle is not None:
            where.append(f"instr(s.{column}, ?) > 0")
            params.append(fold(needle))
    if query.since is not None:
        where.append("s.received_at >= ?")
        params.append(_utc_text(query.since))
    if query.until is not None:
        where.append("s.received_at < ?")
        params.append(_utc_text(query.until))
    if query.greeting is not None:
        where.append("s.greeting = ?")
        params.append(query.greeting.upper())
    if query.tls is not None:
        where.append("s.tls = ?")
        params.append(1 if query.tls else 0)
    if query.auth is not None:
        where.append("s.auth = ?")
        params.append(fold(query.auth))
    for name, result in query.checks:
        where.append("instr(s.checks, ?) > 0")
        params.append(fold(f"\n{name}={result}\n"))
    if query.attachments is not None:
        where.append("s.attachments = 1" if query.attachments else "coalesce(s.attachments, 0) = 0")
    for sub in query.exclude:
        if sub.needs_body:
            continue  # tested in Python, with the words
        conditions, values = _conditions(sub)
        where.append(f"NOT coalesce(({' AND '.join(conditions) or '1'}), 0)")
        params += values
    return where, params
