"""``ehlo db import``: a SQLite data folder copied into the PostgreSQL store.

What is copied: every message (its envelope columns as the SQLite store
keeps their JSON text, byte for byte; the search columns computed as the
writer computes them, :mod:`._pg_rows`), its body as chunk rows of at most
:data:`~._pg_schema.CHUNK_SIZE` octets, its queue entries and their
attempts; then the queue entries whose message the SQLite store no longer
holds (handed on, kept for their history) with their attempts; the session
log; the AUTH users the caller read from the folder's ``users`` file.

Streamed: the SQLite ``chunks`` rows are read one at a time and a body
file (the SQLite store keeps a body over 256 KiB in ``ehlo.sqlite3.bodies``)
in pieces of ``CHUNK_SIZE``, each written by ``COPY`` as it is read: a
large message is never held whole in memory.

Resumable: messages are copied in batches (:data:`BATCH` messages, fewer
when their bodies pass :data:`BATCH_BYTES`), one short transaction each;
the message rows are inserted with ``ON CONFLICT (queue_id) DO NOTHING``
and only the messages whose row went in get their chunks, queue entries
and attempts, in the same transaction. An import interrupted at any
moment (Ctrl-C, a crash, the database going away) is finished by running
it again: the messages already there are counted, not copied twice.
Queue entries of messages no longer stored (``ON CONFLICT`` on the
entry's key), sessions (an equal id and start already there) and users
(``ON CONFLICT`` on the name: a user already in the database keeps its
password) are resumable the same way. One import runs at a time (an
advisory lock).

The source is opened read-only (``mode=ro``), one read snapshot per batch;
it may be in use by a running SQLite server: what that server stores or
deletes meanwhile is seen by the batches that come after (run the import
again, with the server stopped, to take the last messages). A queue entry
the source shows ``delivering`` is imported ``queued``, as the SQLite
store's own start would make it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._pg_conn import Database, one_line
from ._pg_rows import INSERT_MESSAGE, MESSAGE_COLUMNS, message_values
from ._pg_schema import CHANNEL_MESSAGES, CHANNEL_QUEUE, CHANNEL_USERS, CHUNK_SIZE
from ._sqlite_db import COLUMNS, body_dir, connect
from .base import StoreError
from .queue import QUEUE_COLUMNS
from .sqlite import _message

if TYPE_CHECKING:
    import psycopg

# Messages per transaction, and the body octets after which a batch ends early.
BATCH = 200
BATCH_BYTES = 32 * 1024 * 1024
# Queue ids (of entries without a message) and sessions per transaction.
ROWS_BATCH = 1000
# The advisory lock one import holds (differs from _pg_schema's LOCK_* keys).
LOCK_IMPORT = 0x65686C6F_0101
# The ``node`` the imported rows are recorded with.
IMPORT_NODE = "import"

_INSERT_MESSAGE = INSERT_MESSAGE + " ON CONFLICT (queue_id) DO NOTHING RETURNING queue_id"
_INSERT_QUEUE = (
    f"INSERT INTO queue ({QUEUE_COLUMNS}) VALUES ({', '.join(['%s'] * 13)})"
    " ON CONFLICT (queue_id, recipient) DO NOTHING RETURNING queue_id"
)
_INSERT_ATTEMPT = (
    "INSERT INTO attempts (queue_id, at, next_hop, host, results, transcript, node)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s)"
)
_INSERT_SESSION = (
    "INSERT INTO sessions (id, node, started_at, ended_at, client_ip, record)"
    " SELECT %s, %s, %s, %s, %s, %s"
    " WHERE NOT EXISTS (SELECT 1 FROM sessions WHERE id = %s AND started_at = %s)"
    " RETURNING id"
)
_INSERT_USER = (
    "INSERT INTO users (name, phc) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING RETURNING name"
)
# Where the envelope's JSON text columns are in a messages row (copied as stored).
_TEXT_COLUMNS = {
    name: MESSAGE_COLUMNS.index(name) for name in ("mail_params", "rcpt_to", "tls", "extra")
}
# Where they are in a SQLite messages row (COLUMNS order).
_SQLITE_INDEX = {name.strip(): i for i, name in enumerate(COLUMNS.split(","))}


@dataclasses.dataclass
class ImportReport:
    """What an import did (so far: the progress callback sees it grow)."""

    imported: int = 0  # messages copied by this run
    already: int = 0  # messages the database held before
    vanished: int = 0  # messages deleted from the source while it was read
    octets: int = 0  # body octets copied
    queue_entries: int = 0  # queue entries copied (with or without their message)
    attempts: int = 0
    sessions: int = 0
    users: int = 0
    users_already: int = 0

    @property
    def messages(self) -> int:
        """Messages seen in the source so far."""
        return self.imported + self.already + self.vanished


def import_sqlite(
    source: Path,
    db: Database,
    *,
    users: Iterable[tuple[str, str]] = (),
    node: str = IMPORT_NODE,
    batch: int = BATCH,
    progress: Callable[[ImportReport], None] | None = None,
) -> ImportReport:
    """Copy the SQLite store at ``source`` (its ``ehlo.sqlite3``) into ``db``.

    ``users``: (name, PHC string) pairs to add. ``progress`` is called after
    each committed batch of messages. Raises :class:`StoreError` (one line)
    for a source that cannot be read or a database error; what was
    committed before stays, and a second run finishes the job.
    """
    path = Path(source)
    if not path.is_file():
        raise StoreError(f"no SQLite store at {path}")
    try:
        src = connect(path, read_only=True)
    except sqlite3.Error as exc:
        raise StoreError(f"sqlite store {path}: {exc}") from None
    report = ImportReport()
    try:
        conn = db.connect()
        try:
            _Import(src, path, conn, report, node=node, batch=max(1, batch)).run(users, progress)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite store {path}: {exc}") from None
        except _driver_errors() as exc:
            raise StoreError(f"postgresql: {one_line(exc)}") from None
        finally:
            with contextlib.suppress(Exception):
                conn.close()
    finally:
        src.close()
    return report


def _driver_errors() -> type[Exception]:
    import psycopg

    return psycopg.Error


class _Import:
    """One run of the import: the source's connection, the database's, the counts."""

    def __init__(
        self,
        src: sqlite3.Connection,
        path: Path,
        conn: psycopg.Connection[Any],
        report: ImportReport,
        *,
        node: str,
        batch: int,
    ) -> None:
        self.src, self.path, self.conn, self.report = src, path, conn, report
        self.node, self.batch = node, batch
        self.bodies = body_dir(path)
        tables = {
            name for (name,) in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if "messages" not in tables:
            raise StoreError(f"{path} is not an ehlo SQLite store (no messages table)")
        self.tables = tables
        columns = {row[1] for row in src.execute("PRAGMA table_info(messages)")}
        searched = (
            {row[1] for row in src.execute("PRAGMA table_info(search)")}
            if "search" in tables
            else set()
        )
        # Older stores (before size_received, the search table's attachments)
        # are read as they are: the source is never written to.
        wanted = ", ".join(
            f"m.{name}" if name in columns else "NULL"
            for name in (name.strip() for name in COLUMNS.split(","))
        )
        attachments = "s.attachments" if "attachments" in searched else "NULL"
        join = " LEFT JOIN search s ON s.queue_id = m.queue_id" if searched else ""
        self.select = (
            f"SELECT {wanted}, {attachments} FROM messages m{join}"
            " WHERE m.queue_id > ? ORDER BY m.queue_id LIMIT ?"
        )

    def run(
        self,
        users: Iterable[tuple[str, str]],
        progress: Callable[[ImportReport], None] | None,
    ) -> None:
        conn = self.conn
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_IMPORT,)).fetchone()
        conn.commit()
        if not row or not row[0]:
            raise StoreError("another ehlo db import is running on this database")
        last = ""
        while True:
            self.src.execute("BEGIN")  # one snapshot of the source per batch
            try:
                rows = self._next_rows(last)
                if rows:
                    self._copy_messages(rows)
            finally:
                self.src.execute("COMMIT")
            if not rows:
                break
            last = rows[-1][0]
            if progress is not None:
                progress(self.report)
        if "queue" in self.tables:
            self._copy_orphan_entries()
        if "sessions" in self.tables:
            self._copy_sessions()
        self._copy_users(users)
        with conn.transaction():  # a hint to the running nodes: look again
            if self.report.imported:
                conn.execute("SELECT pg_notify(%s, '')", (CHANNEL_MESSAGES,))
            if self.report.queue_entries:
                conn.execute("SELECT pg_notify(%s, '')", (CHANNEL_QUEUE,))
            if self.report.users:
                conn.execute("SELECT pg_notify(%s, '')", (CHANNEL_USERS,))

    # --- messages ------------------------------------------------------------------

    def _next_rows(self, last: str) -> list[tuple[Any, ...]]:
        """The next batch of message rows after queue id ``last``, cut at BATCH_BYTES."""
        rows = self.src.execute(self.select, (last, self.batch)).fetchall()
        taken, octets = [], 0
        for row in rows:
            taken.append(row)
            octets += int(row[_SQLITE_INDEX["size"]] or 0)
            if octets >= BATCH_BYTES:
                break
        return taken

    def _copy_messages(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """One batch in one transaction: the new message rows, then their bodies,
        entries and attempts; the rows already there are counted and left."""
        bodies: dict[str, _Body] = {}
        values = []
        for row in rows:
            queue_id = row[0]
            body = self._body(queue_id, int(row[_SQLITE_INDEX["size"]] or 0))
            if body is None:
                self.report.vanished += 1
                continue
            bodies[queue_id] = body
            values.append(self._message_row(row, body.count))
        conn = self.conn
        with conn.transaction(), conn.cursor() as cur:
            new = set(_returned(cur, _INSERT_MESSAGE, values))
            self.report.already += len(values) - len(new)
            if not new:
                return
            ordered = [queue_id for queue_id in bodies if queue_id in new]
            with cur.copy("COPY chunks (queue_id, seq, data) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text", "int4", "bytea"])
                for queue_id in ordered:
                    for seq, data in enumerate(bodies[queue_id].pieces()):
                        copy.write_row((queue_id, seq, data))
                        self.report.octets += len(data)
            self._copy_entries(cur, ordered)
            self.report.imported += len(new)

    def _message_row(self, row: tuple[Any, ...], chunks: int) -> tuple[Any, ...]:
        stored = _message(row)
        values = list(
            message_values(
                stored.envelope,
                size=stored.size,
                subject=stored.subject,
                attachments=stored.attachments,
                chunks=chunks,
                node=self.node,
            )
        )
        for name, at in _TEXT_COLUMNS.items():  # the JSON text as stored, byte for byte
            values[at] = row[_SQLITE_INDEX[name]]
        return tuple(values)

    def _body(self, queue_id: str, size: int) -> _Body | None:
        """Where a message's body is (chunk rows or a file); None: deleted meanwhile."""
        lengths = [
            int(n)
            for (n,) in self.src.execute(
                "SELECT length(data) FROM chunks WHERE queue_id = ? ORDER BY seq", (queue_id,)
            )
        ]
        if any(lengths) or not size:
            count = sum(math.ceil(n / CHUNK_SIZE) for n in lengths)
            return _Body(self.src, queue_id, None, count)
        file = self.bodies / queue_id
        try:
            length = os.stat(file).st_size
        except FileNotFoundError:
            if not self._still_stored(queue_id):
                return None
            raise StoreError(f"message {queue_id}: its body file {file} is missing") from None
        except OSError as exc:
            raise StoreError(f"message {queue_id}: body file: {exc}") from None
        if length != size:
            raise StoreError(
                f"message {queue_id}: its body file holds {length} octets, the store says {size}"
            )
        return _Body(self.src, queue_id, file, math.ceil(length / CHUNK_SIZE))

    def _still_stored(self, queue_id: str) -> bool:
        """Whether the source holds the message now (a fresh connection: a new snapshot)."""
        fresh = connect(self.path, read_only=True)
        try:
            found = fresh.execute("SELECT 1 FROM messages WHERE queue_id = ?", (queue_id,))
            return found.fetchone() is not None
        finally:
            fresh.close()

    # --- the queue ------------------------------------------------------------------

    def _copy_entries(self, cur: psycopg.Cursor[Any], queue_ids: Sequence[str]) -> None:
        """The queue entries of ``queue_ids`` not yet in the database, and the attempts
        of each message whose entries went in now."""
        if "queue" not in self.tables or not queue_ids:
            return
        marks = ", ".join("?" * len(queue_ids))
        rows = [
            _entry_row(row)
            for row in self.src.execute(
                f"SELECT {QUEUE_COLUMNS} FROM queue WHERE queue_id IN ({marks})"
                " ORDER BY queue_id, recipient",
                tuple(queue_ids),
            )
        ]
        if not rows:
            return
        returned = _returned(cur, _INSERT_QUEUE, rows)
        self.report.queue_entries += len(returned)
        new = sorted(set(returned))
        if not new or "attempts" not in self.tables:
            return
        marks = ", ".join("?" * len(new))
        attempts = [
            (*row, self.node)
            for row in self.src.execute(
                "SELECT queue_id, at, next_hop, host, results, transcript FROM attempts"
                f" WHERE queue_id IN ({marks}) ORDER BY queue_id, at",
                tuple(new),
            )
        ]
        if attempts:
            cur.executemany(_INSERT_ATTEMPT, attempts)
            self.report.attempts += len(attempts)

    def _copy_orphan_entries(self) -> None:
        """Queue entries whose message the source no longer holds (handed on)."""
        last = ""
        while True:
            ids = [
                queue_id
                for (queue_id,) in self.src.execute(
                    "SELECT DISTINCT queue_id FROM queue WHERE queue_id > ?"
                    " AND queue_id NOT IN (SELECT queue_id FROM messages)"
                    " ORDER BY queue_id LIMIT ?",
                    (last, ROWS_BATCH),
                )
            ]
            if not ids:
                return
            last = ids[-1]
            with self.conn.transaction(), self.conn.cursor() as cur:
                self._copy_entries(cur, ids)

    # --- the session log and the users ----------------------------------------------

    def _copy_sessions(self) -> None:
        last = 0
        while True:
            rows = self.src.execute(
                "SELECT seq, id, started_at, ended_at, client_ip, record FROM sessions"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (last, ROWS_BATCH),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            values = [
                (sid, self.node, started, ended, ip, record, sid, started)
                for _seq, sid, started, ended, ip, record in rows
            ]
            with self.conn.transaction(), self.conn.cursor() as cur:
                self.report.sessions += len(_returned(cur, _INSERT_SESSION, values))

    def _copy_users(self, users: Iterable[tuple[str, str]]) -> None:
        pairs = list(users)
        if not pairs:
            return
        with self.conn.transaction(), self.conn.cursor() as cur:
            added = len(_returned(cur, _INSERT_USER, pairs))
        self.report.users += added
        self.report.users_already += len(pairs) - added


@dataclasses.dataclass
class _Body:
    """A message body in the source: chunk rows (``file`` None) or a file."""

    src: sqlite3.Connection
    queue_id: str
    file: Path | None
    count: int  # the chunk rows it makes in the database

    def pieces(self) -> Iterator[bytes]:
        """The body in pieces of at most CHUNK_SIZE octets, read as they are written."""
        if self.file is None:
            cursor = self.src.execute(
                "SELECT data FROM chunks WHERE queue_id = ? ORDER BY seq", (self.queue_id,)
            )
            for (data,) in cursor:  # one row at a time
                view = memoryview(data)
                for start in range(0, len(view), CHUNK_SIZE):
                    yield bytes(view[start : start + CHUNK_SIZE])
            return
        try:
            with open(self.file, "rb") as body:
                while piece := body.read(CHUNK_SIZE):
                    yield piece
        except OSError as exc:
            raise StoreError(f"message {self.queue_id}: body file: {exc}") from None


def _entry_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A SQLite queue row as the database's: booleans, and ``delivering`` queued again
    (no node holds a lease on it)."""
    values = list(row)
    if values[3] == "delivering":
        values[3] = "queued"
    values[11] = bool(values[11])  # delay_notified
    return tuple(values)


def _returned(cur: psycopg.Cursor[Any], statement: str, rows: Sequence[Any]) -> list[Any]:
    """``executemany`` with RETURNING: the first column of every row returned."""
    if not rows:
        return []
    cur.executemany(statement, rows, returning=True)
    found: list[Any] = []
    while True:
        found.extend(row[0] for row in cur.fetchall())
        if not cur.nextset():
            return found
