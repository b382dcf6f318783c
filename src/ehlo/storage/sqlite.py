"""The SQLite message store (the default backend).

This module owns the database file (``data_dir/ehlo.sqlite3``), its schema,
the single writer that performs every write (its batches run in a child
process by default, see :mod:`ehlo.storage._sqlite_process`, or in a thread),
and the read-only queries used by the CLI.

Layout::

    messages(queue_id PRIMARY KEY, received_at, client_ip, ..., size, subject)
    chunks(queue_id, seq, data BLOB)      -- a body of at most 256 KiB, one row
    pending(queue_id PRIMARY KEY, owner)  -- earlier versions' chunks written ahead of their row
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
import concurrent.futures
import contextlib
import datetime as _dt
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..ids import new_queue_id
from .base import (
    Envelope,
    HeaderSniffer,
    JSONText,
    MessageWriter,
    Store,
    StoredMessage,
    StoreError,
    StoreStats,
    check_writable,
    create_private,
    fsync_dir,
    private_dir,
)

if TYPE_CHECKING:
    from ._sqlite_process import WriterProcess

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["CHUNK_SIZE", "SQLiteStore", "SQLiteWriter"]

# Body bytes gathered before a chunk is handed to the writer; a larger body
# is written to a file of its own.
CHUNK_SIZE = 256 * 1024
# A body file is written in pieces of at least this size (or a network read).
_FILE_WRITE_SIZE = 64 * 1024
# In the bodies folder: one folder per store instance for the bodies it is receiving.
_SPOOL = ".spool"
_fdatasync = getattr(os, "fdatasync", os.fsync)
_fadvise = getattr(os, "posix_fadvise", None)
# One transaction takes at most this much queued work, so a stream of large
# bodies cannot postpone the COMMIT that waiting sessions need.
_BATCH_MAX_BYTES = 32 * 1024 * 1024
_BATCH_MAX_OPS = 4096
_PAGE_SIZE = 16384
_WAL_SIZE_LIMIT = 64 * 1024 * 1024
# Milliseconds a connection waits for another process's write lock.
_BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id      TEXT PRIMARY KEY,
    received_at   TEXT NOT NULL,
    client_ip     TEXT NOT NULL,
    client_port   INTEGER NOT NULL,
    greeting      TEXT NOT NULL,
    greeting_name TEXT NOT NULL,
    mail_from     TEXT NOT NULL,
    mail_params   TEXT NOT NULL,
    rcpt_to       TEXT NOT NULL,
    tls           TEXT,
    protocol      TEXT NOT NULL,
    server_name   TEXT NOT NULL,
    extra         TEXT NOT NULL,
    size          INTEGER NOT NULL,
    subject       TEXT
);
CREATE INDEX IF NOT EXISTS messages_received_at ON messages (received_at);
CREATE TABLE IF NOT EXISTS chunks (
    queue_id TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    data     BLOB NOT NULL,
    PRIMARY KEY (queue_id, seq)
);
CREATE TABLE IF NOT EXISTS pending (
    queue_id TEXT PRIMARY KEY,
    owner    TEXT NOT NULL
);
"""

_COLUMNS = (
    "queue_id, received_at, client_ip, client_port, greeting, greeting_name, mail_from,"
    " mail_params, rcpt_to, tls, protocol, server_name, extra, size, subject"
)
_INSERT_MESSAGE = f"INSERT INTO messages ({_COLUMNS}) VALUES ({', '.join('?' * 15)})"


# --- operations queued for the writer ----------------------------------------


@dataclass(slots=True)
class _Commit:
    """A whole message for the writer: its row and its body, written in one transaction."""

    row: tuple[Any, ...]
    body: bytes | bytearray | None  # at most CHUNK_SIZE octets, its one chunk row (handed over)
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[str]
    spool: str | None = None  # or: the body is a file in this spool folder


@dataclass(slots=True)
class _Stop:
    done: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)


_Op = _Commit | _Stop


def body_dir(path: Path) -> Path:
    """The directory of the body files of the database at ``path``."""
    return path.with_name(path.name + ".bodies")


def spooled_body(bodies: Path, spool: str, queue_id: str) -> Path:
    """Where the store instance owning spool folder ``spool`` receives a body."""
    return bodies / _SPOOL / spool / queue_id


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


def _resolve(items: list[tuple[asyncio.Future[str], str | BaseException]]) -> None:
    """Runs on the event loop: settle the commit futures of one batch."""
    for future, outcome in items:
        if future.done():
            continue  # the session was cancelled meanwhile
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _settle_drained(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _private_database(path: Path) -> None:
    """Create the database file 0600 before SQLite does (it would make it 0644
    and its -wal and -shm files like it); narrow an existing one and those."""
    try:
        os.close(create_private(path))
    except FileExistsError:
        for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            with contextlib.suppress(FileNotFoundError, PermissionError):
                if os.stat(name).st_mode & 0o077:
                    os.chmod(name, 0o600)


def _connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    if read_only:
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro",
            uri=True,
            isolation_level=None,
            timeout=_BUSY_TIMEOUT_MS / 1000,
        )
    else:
        conn = sqlite3.connect(
            path, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000, check_same_thread=False
        )
    conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    return conn


# --- owner locks: which store instances are alive -----------------------------


class _OwnerLock:
    """An exclusive lock file held for as long as a store instance runs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.owner = new_queue_id()
        self._file: IO[bytes] | None = None

    def acquire(self) -> None:
        private_dir(self.directory)
        # Locked under a name nobody checks, then renamed: a lock file is
        # never seen unlocked (and taken for a dead owner's) by a sweep.
        fresh = self.directory / f".{self.owner}.new"
        handle = open(create_private(fresh), "wb")  # noqa: SIM115 - held open until release()
        try:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            fresh.rename(self.directory / f"{self.owner}.lock")
        except BaseException:
            handle.close()
            with contextlib.suppress(OSError):
                fresh.unlink()
            raise
        self._file = handle

    def release(self) -> None:
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            (self.directory / f"{self.owner}.lock").unlink()
        self._file.close()
        self._file = None

    @contextlib.contextmanager
    def dead(self, owner: str) -> Iterator[bool]:
        """Yield True when ``owner`` is gone (keeping its lock while inside)."""
        if owner == self.owner:
            yield False
            return
        path = self.directory / f"{owner}.lock"
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            yield True
            return
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False
                    return
            else:  # pragma: no cover - Windows: an open file cannot be removed
                handle.close()
                try:
                    path.unlink()
                except PermissionError:
                    yield False
                    return
            yield True
            with contextlib.suppress(OSError):
                path.unlink()
        finally:
            handle.close()

    def sweep(self) -> None:
        """Remove the lock files of store instances that are gone."""
        for path in self.directory.glob("*.lock"):
            with self.dead(path.stem):
                pass


# --- the writer thread ----------------------------------------------------------


class _WriterThread(threading.Thread):
    """Owns the read-write connection; executes queued operations in batches."""

    def __init__(self, path: Path, lock: _OwnerLock, stats: StoreStats, shared: bool) -> None:
        super().__init__(name=f"ehlo-sqlite-{path.name}", daemon=True)
        self.path = path
        self.bodies = body_dir(path)
        self.lock = lock
        self.stats = stats
        self.ops: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self.shared = shared
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        # Body bytes queued / executed. Each counter has a single writing thread.
        self.queued_bytes = 0
        self.done_bytes = 0
        self._conn: sqlite3.Connection | None = None
        # With several writing processes (shared=True), serialises their write
        # transactions: a writer blocked here wakes the moment the other one is
        # done, where SQLite's own busy handler would sleep and poll (1, 2, 5,
        # 10... ms). Alone, it would only cost two GIL round trips per batch.
        self._write_lock: int | None = None
        # Body files linked under their final names in this batch: (spool name, final).
        self._linked: list[tuple[Path, Path]] = []
        # Futures waiting for the backlog to drop to a level: (low, loop, future).
        self._drain_lock = threading.Lock()
        self._drain_waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    # Why new messages cannot be written (a writer process sets it when it dies).
    broken: str | None = None

    async def stop(self) -> None:
        """Execute everything queued, close the connection, let go of the owner lock."""
        stop = _Stop()
        self.ops.put(stop)
        await asyncio.wrap_future(stop.done)
        await asyncio.to_thread(self.join)
        self.lock.release()

    def wait_drained(self, low: int) -> asyncio.Future[None]:
        """A future settled (on the caller's loop) once the backlog is at most ``low``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._drain_lock:
            if self.pending_bytes <= low:
                future.set_result(None)
            else:
                self._drain_waiters.append((low, loop, future))
        return future

    def _wake_drained(self) -> None:
        """After a batch: settle the waiters whose level the backlog has reached."""
        if not self._drain_waiters:
            return
        with self._drain_lock:
            pending = self.pending_bytes
            ready = [w for w in self._drain_waiters if pending <= w[0]]
            self._drain_waiters = [w for w in self._drain_waiters if pending > w[0]]
        for _, loop, future in ready:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits
                loop.call_soon_threadsafe(_settle_drained, future)

    @property
    def pending_bytes(self) -> int:
        """Body bytes queued but not yet executed."""
        return self.queued_bytes - self.done_bytes

    def run(self) -> None:
        try:
            self._conn = self._open()
        except BaseException as exc:
            self.ready.set_exception(exc)
            return
        self.ready.set_result(None)
        try:
            self._serve()
        finally:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            if self._write_lock is not None:
                os.close(self._write_lock)

    def _open(self) -> sqlite3.Connection:
        # Every folder the writer writes to: the database's, the owner locks', the bodies'.
        check_writable(self.path.parent)
        for folder in (self.lock.directory, self.bodies):
            private_dir(folder)
            check_writable(folder)
        _private_database(self.path)
        if fcntl is not None and self.shared:
            self._write_lock = os.open(
                self.path.with_name(self.path.name + ".writelock"), os.O_RDWR | os.O_CREAT, 0o600
            )
        self.lock.acquire()
        conn = _connect(self.path, read_only=False)
        try:
            # Larger pages suit 256 KiB blobs (fewer overflow pages); a no-op
            # on an existing database, so it must come before WAL is set.
            conn.execute(f"PRAGMA page_size={_PAGE_SIZE}")
            self._use_wal(conn)
            conn.execute("PRAGMA synchronous=FULL")
            # The writer only appends: a small page cache is enough (and bounds its memory).
            conn.execute("PRAGMA cache_size=-1024")
            # After a checkpoint, cut the WAL back to this size.
            conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
            conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
            conn.execute("BEGIN IMMEDIATE")
            owners = [row[0] for row in conn.execute("SELECT DISTINCT owner FROM pending")]
            for owner in owners:
                with self.lock.dead(owner) as dead:
                    if dead:
                        self._drop_owner(conn, owner)
            conn.execute("COMMIT")
            self.lock.sweep()
            self._conn = conn  # the sweep reads with it
            self._sweep_spools()
        except BaseException:
            self._conn = None
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            self.lock.release()
            raise
        return conn

    @staticmethod
    def _use_wal(conn: sqlite3.Connection) -> None:
        """Switch to WAL; a fresh file opened by several processes at once may be busy."""
        deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
                continue
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot use WAL journal mode (got {mode})")
            return

    @staticmethod
    def _drop_owner(conn: sqlite3.Connection, owner: str) -> None:
        """Delete the orphan chunks left by a store instance that died."""
        conn.execute(
            "DELETE FROM chunks WHERE queue_id IN (SELECT queue_id FROM pending WHERE owner = ?)"
            " AND queue_id NOT IN (SELECT queue_id FROM messages)",
            (owner,),
        )
        conn.execute("DELETE FROM pending WHERE owner = ?", (owner,))

    def _sweep_spools(self) -> None:
        """Delete the spool folders of store instances that are gone."""
        spools = self.bodies / _SPOOL
        private_dir(self.bodies)
        private_dir(spools)
        for folder in os.scandir(spools):
            if folder.is_dir(follow_symlinks=False):
                self._remove_spool(folder.name)

    def _remove_spool(self, owner: str) -> bool:
        """Delete one spool folder if its store instance is gone (True once it is).

        A body the writer had already linked under its final name, but whose
        row never got committed, goes with it.
        """
        conn = self._conn
        assert conn is not None
        folder = self.bodies / _SPOOL / owner
        with _OwnerLock(folder.parent).dead(owner) as dead:  # asks, never acquires
            if not dead:
                return False
            with contextlib.suppress(OSError):
                for entry in os.scandir(folder):
                    final = self.bodies / entry.name
                    with contextlib.suppress(OSError):
                        if os.path.samefile(entry.path, final) and conn.execute(
                            "SELECT 1 FROM messages WHERE queue_id = ?", (entry.name,)
                        ).fetchone() is None:
                            final.unlink()
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                folder.rmdir()
        return True

    def _serve(self) -> None:
        ops = self.ops
        while True:
            op = ops.get()
            batch: list[_Commit] = []
            size = 0
            while isinstance(op, _Commit):
                batch.append(op)
                if op.body is not None:
                    size += len(op.body)
                if len(batch) >= _BATCH_MAX_OPS or size >= _BATCH_MAX_BYTES:
                    break
                try:
                    op = ops.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._execute(batch)
            if isinstance(op, _Stop):
                op.done.set_result(None)
                return

    def _execute(self, batch: list[_Commit]) -> None:
        """Write a batch of messages in ONE transaction; settle each commit's outcome."""
        conn = self._conn
        assert conn is not None
        body_bytes = sum(len(op.body) for op in batch if op.body is not None)
        if self._write_lock is not None:
            fcntl.flock(self._write_lock, fcntl.LOCK_EX)  # released below, after COMMIT
        try:
            outcomes = None
            if all(op.spool is None for op in batch):
                outcomes = self._write_batch(conn, batch)
            if outcomes is None:
                conn.execute("BEGIN IMMEDIATE")
                outcomes = [(op, self._insert_message(conn, op)) for op in batch]
                if self._linked:
                    # The new files' names, before the rows that point at them.
                    fsync_dir(self.bodies)
                conn.execute("COMMIT")
                for spooled, _ in self._linked:  # the final name stays
                    with contextlib.suppress(OSError):
                        spooled.unlink()
            self.stats.commits += 1
            self.stats.messages += sum(1 for _, out in outcomes if isinstance(out, str))
        except Exception as exc:  # sqlite3.Error, OSError, MemoryError...
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            for spooled, final in self._linked:
                for name in (final, spooled):
                    with contextlib.suppress(OSError):
                        name.unlink()
            error = StoreError(f"sqlite store {self.path}: {exc}")
            error.__cause__ = exc
            outcomes = [(op, error) for op in batch]  # nothing of the batch was written
        finally:
            self._linked = []
            if self._write_lock is not None:
                fcntl.flock(self._write_lock, fcntl.LOCK_UN)
            self.done_bytes += body_bytes
        self._settle(outcomes)
        self._wake_drained()

    @staticmethod
    def _write_batch(
        conn: sqlite3.Connection, batch: list[_Commit]
    ) -> list[tuple[_Commit, str | BaseException]] | None:
        """Messages with their bodies in the batch (the common case), in four statements.

        Each ``execute`` gives the GIL up and takes it back, which costs a
        busy event loop dearly (in the thread writer); ``executemany`` keeps
        that to one per table. None after a constraint error (an id already
        stored): the batch is rolled back, for the message-by-message path
        to sort out.
        """
        chunks = [(op.row[0], 0, op.body) for op in batch if op.body is not None]
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO chunks (queue_id, seq, data) VALUES (?, ?, ?)", chunks)
            conn.executemany(_INSERT_MESSAGE, [op.row for op in batch])
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK")
            return None
        conn.execute("COMMIT")
        return [(op, op.row[0]) for op in batch]

    def _insert_message(self, conn: sqlite3.Connection, op: _Commit) -> str | BaseException:
        """Write one message (its body file placed first); its queue id, or why not."""
        queue_id: str = op.row[0]
        taken = conn.execute("SELECT 1 FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
        if taken is not None:
            if op.spool is not None:
                with contextlib.suppress(OSError):
                    spooled_body(self.bodies, op.spool, queue_id).unlink()
            return StoreError(f"message {queue_id} is already stored")
        if op.spool is not None:
            problem = self._place_body(op.spool, queue_id, op.row[13])
            if problem is not None:
                return StoreError(f"message {queue_id}: {problem}")
        elif op.body is not None:
            try:
                conn.execute(
                    "INSERT INTO chunks (queue_id, seq, data) VALUES (?, 0, ?)", (queue_id, op.body)
                )
            except sqlite3.IntegrityError:  # a chunk row without its message: not ours
                return StoreError(f"message {queue_id} is already stored")
        conn.execute(_INSERT_MESSAGE, op.row)
        return queue_id

    def _place_body(self, spool: str, queue_id: str, size: int) -> str | None:
        """Sync a spooled body and link it under its final name; why not, or None.

        The spool name goes after the COMMIT (or with the final name if the
        batch fails); when this fails, it goes at once.
        """
        spooled = spooled_body(self.bodies, spool, queue_id)
        final = self.bodies / queue_id
        problem: str | None = None
        try:
            fd = os.open(spooled, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            return f"body file lost before commit: {exc}"
        try:
            found = os.fstat(fd).st_size
            if found != size:
                problem = f"body file has {found} octets, {size} were written"
            else:
                _fdatasync(fd)
                if _fadvise is not None:
                    # Written once and seldom read soon: its pages, clean now,
                    # go back for the next bodies instead of growing the cache.
                    _fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.link(spooled, final)  # never replaces: an existing name fails
        except FileExistsError:
            problem = "is already stored"
        except OSError as exc:
            problem = f"body file: {exc}"
        finally:
            os.close(fd)
        if problem is not None:
            with contextlib.suppress(OSError):
                spooled.unlink()
            return problem
        self._linked.append((spooled, final))
        return None

    @staticmethod
    def _settle(outcomes: list[tuple[_Commit, str | BaseException]]) -> None:
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Future[str], str | BaseException]]
        ] = {}
        for op, outcome in outcomes:
            by_loop.setdefault(op.loop, []).append((op.future, outcome))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits
                loop.call_soon_threadsafe(_resolve, items)


# --- the public classes -----------------------------------------------------------


class SQLiteWriter(MessageWriter):
    """One message being streamed into an :class:`SQLiteStore`."""

    __slots__ = (
        "_buffer", "_envelope", "_fd", "_head", "_size", "_state", "_store"
    )

    def __init__(self, store: SQLiteStore, envelope: Envelope) -> None:
        self._store = store
        self._envelope = envelope
        self._buffer = bytearray()
        self._head = HeaderSniffer()
        self._size = 0
        self._fd: int | None = None  # the body file, once the body outgrew CHUNK_SIZE
        self._state = "open"  # "open", then "done" once committed or aborted

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    def write(self, data: bytes) -> None:
        if self._state != "open":
            raise RuntimeError(f"message {self._envelope.queue_id} is no longer open")
        if not data:
            return
        self._size += len(data)
        head = self._head
        if not head.done:
            head.feed(data)
        buffer = self._buffer
        if self._fd is not None:
            if not buffer and len(data) >= _FILE_WRITE_SIZE:
                self._append(data)  # a network read or more: no copy on the way
                return
            buffer += data
            if len(buffer) >= _FILE_WRITE_SIZE:
                self._append(buffer)
                buffer.clear()
            return
        if len(buffer) + len(data) <= CHUNK_SIZE:
            buffer += data  # the common case: network-sized pieces
            return
        self._spill()
        self._append(data)

    def _spill(self) -> None:
        """The body outgrew one chunk: continue it in a file of its own."""
        queue_id = self._envelope.queue_id
        try:
            self._fd = os.open(
                self._store._spooled(queue_id),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                0o600,
            )
        except OSError as exc:
            raise StoreError(f"message {queue_id}: body file: {exc}") from exc
        buffer, self._buffer = self._buffer, bytearray()
        self._append(buffer)

    def _append(self, data: bytes | bytearray) -> None:
        """Write to the body file (the page cache; the writer syncs it at commit)."""
        fd = self._fd
        assert fd is not None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            raise StoreError(f"message {self._envelope.queue_id}: body file: {exc}") from exc

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
                if self._buffer:
                    self._append(self._buffer)
                    self._buffer.clear()
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
        row = (
            env.queue_id,
            _utc_text(env.received_at),
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
            self._head.subject(),
        )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._state = "done"
        # Nothing reaches the writer before this point, so an abort never has
        # anything to take back there. From here the writer owns the body
        # (a spooled one it links or removes).
        if body is not None:
            writer.queued_bytes += len(body)
        writer.ops.put(_Commit(row, body, loop, future, spool))
        return future

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
        self._writer: _WriterThread | WriterProcess | None = None
        # This instance's spool folder for the large bodies it receives, and
        # the lock that tells a sweeping writer it is alive.
        self._spool_lock: _OwnerLock | None = None
        self._spool_name = ""

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
        return writer.wait_drained(low)

    @property
    def owner(self) -> str | None:
        """The writer's owner token (its lock file name), once started."""
        writer = self._writer
        return writer.lock.owner if writer is not None else None

    def preflight(self) -> None:
        locks = self.path.with_name(self.path.name + ".locks")
        try:
            check_writable(self.path.parent)
            for folder in (self.bodies, self.bodies / _SPOOL, locks):
                if folder.is_dir():  # the others are made by start()
                    check_writable(folder)
        except StoreError as exc:
            raise StoreError(f"sqlite store {self.path}: {exc}") from None

    async def start(self) -> None:
        if self._writer is not None:
            return
        spool_lock = _OwnerLock(self.bodies / _SPOOL)
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

    async def _start_writer(self) -> None:
        if self.writer_kind == "process":
            from ._sqlite_process import WriterProcess

            process = WriterProcess(
                self.path, self.stats, self.shared, self.writer_address, self._spool_name
            )
            try:
                await process.start()
            except (OSError, TimeoutError) as exc:
                raise StoreError(f"sqlite store {self.path}: writer process: {exc}") from exc
            self._writer = process
            return
        lock = _OwnerLock(self.path.with_name(self.path.name + ".locks"))
        thread = _WriterThread(self.path, lock, self.stats, self.shared)
        thread.start()
        try:
            await asyncio.wrap_future(thread.ready)
        except (sqlite3.Error, OSError, StoreError) as exc:
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        self._writer = thread

    async def close(self) -> None:
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

    def _writer_or_error(self) -> _WriterThread | WriterProcess:
        writer = self._writer
        if writer is None:
            raise StoreError(f"sqlite store {self.path} is not open")
        if writer.broken is not None:
            raise StoreError(f"sqlite store {self.path}: {writer.broken}")
        return writer

    def begin(self, envelope: Envelope) -> SQLiteWriter:
        self._writer_or_error()
        return SQLiteWriter(self, envelope)

    # --- reads: short-lived read-only connections -------------------------------

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection | None]:
        """A read-only connection holding one snapshot, or None when there is no data."""
        if not self.path.exists():
            yield None
            return
        try:
            conn = _connect(self.path, read_only=True)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        try:
            conn.execute("BEGIN")
            schema = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
            ).fetchone()
            yield conn if schema is not None else None
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        finally:
            conn.close()

    def list(self, limit: int | None = None) -> Sequence[StoredMessage]:
        query = f"SELECT {_COLUMNS} FROM messages ORDER BY received_at DESC, queue_id DESC"
        params: tuple[int, ...] = ()
        if limit is not None:
            query += " LIMIT ?"
            params = (max(limit, 0),)
        return self._query(query, params)

    def get(self, queue_id: str) -> StoredMessage | None:
        found = self._query(f"SELECT {_COLUMNS} FROM messages WHERE queue_id = ?", (queue_id,))
        return found[0] if found else None

    def _query(self, query: str, params: tuple[Any, ...]) -> Sequence[StoredMessage]:
        with self._reader() as conn:
            if conn is None:
                return []
            return [_message(row) for row in conn.execute(query, params)]

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
        )
    except (TypeError, ValueError) as exc:
        raise StoreError(f"message {row[0]}: bad envelope row: {exc}") from exc
    return StoredMessage(envelope=envelope, size=int(row[13]), subject=row[14])
