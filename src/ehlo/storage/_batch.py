"""The SQLite store's batch writer: one class, no threads, no sockets.

This module owns every write to the database: :class:`BatchWriter` opens the
read-write connection (WAL, ``synchronous=FULL``, the schema), recovers what
dead store instances left behind (their spool folders, the chunks that
earlier versions wrote ahead of their row), executes a batch of messages in
ONE transaction with ONE ``COMMIT`` (group commit), and returns each
message's outcome: its queue id, or the :class:`~ehlo.storage.base.StoreError`
saying why it was not stored. :meth:`BatchWriter.serve` takes operations from
a source until told to stop and hands each batch's outcomes to a callback.

The writer is *used* by three hosts, which differ only in where the
operations come from and where the outcomes go:

- :mod:`ehlo.storage._sqlite_thread`: a thread of the server's process
  (a queue in, the commit futures settled on their event loop out);
- :mod:`ehlo.storage._sqlite_process`: a child process of one store
  (frames from a socket pair in, answers on it out);
- :mod:`ehlo.storage._sqlite_hub`: one process for every worker of
  ``ehlo serve --workers N`` (frames from each worker's connection in,
  answers to each out).

Each :class:`Commit` carries a ``tag``, the host's way back to whoever waits
for it (a future, a reference number, a connection and a number); the
writer never looks at it.

Ended sessions for the session log (:class:`LoggedSession`) travel the same
way, without an answer: they are written in the transaction of the batch
they arrive with (a batch of sessions alone is one transaction too), and
the ``sessions`` table is trimmed to its size there.

Durability order, per batch: each spooled body is synced (its size checked)
and linked under its final name, the bodies folder is synced once, and only
then is the ``COMMIT`` that makes the rows visible issued; the outcomes are
returned after ``COMMIT`` returned. A batch without body files (the usual
case) is written with two ``executemany`` calls; one where an id is already
stored falls back to message-by-message inserts, so only that message fails.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from ._sqlite_db import (
    BUSY_TIMEOUT_MS,
    HAVE_FLOCK,
    INSERT_MESSAGE,
    INSERT_SEARCH,
    INSERT_SESSION,
    PAGE_SIZE,
    ROW_QUEUE,
    ROW_QUEUE_ID,
    ROW_SEARCH,
    ROW_SIZE,
    SPOOL,
    WAL_SIZE_LIMIT,
    OwnerLock,
    body_dir,
    connect,
    locks_dir,
    open_schema,
    private_database,
    spooled_body,
)
from .base import StoreError, StoreStats, check_writable, fsync_dir, private_dir
from .queue import INSERT_QUEUE

if HAVE_FLOCK:
    import fcntl

__all__ = [
    "BATCH_MAX_BYTES",
    "BATCH_MAX_OPS",
    "BatchWriter",
    "Commit",
    "LoggedSession",
    "OpSource",
    "Outcome",
]

# One transaction takes at most this much queued work, so a stream of large
# bodies cannot postpone the COMMIT that waiting sessions need.
BATCH_MAX_BYTES = 32 * 1024 * 1024
BATCH_MAX_OPS = 4096
_fdatasync = getattr(os, "fdatasync", os.fsync)
_fadvise = getattr(os, "posix_fadvise", None)

T = TypeVar("T")


@dataclass(slots=True)
class Commit(Generic[T]):
    """A whole message for the writer: its row and its body, written in one transaction."""

    row: tuple[Any, ...]  # the messages row, in COLUMNS order, then its search row
    body: bytes | bytearray | None  # at most one chunk of octets, its one chunk row
    spool: str | None  # or: the body is a file in this spool folder
    tag: T  # how the host answers whoever waits for this message


@dataclass(slots=True)
class LoggedSession:
    """An ended session for the session log; nobody waits for it."""

    row: tuple[Any, ...]  # (id, started_at, ended_at, client_ip, record JSON text)
    keep: int  # the newest this many sessions are kept (session_log_max)


# A message's outcome: its queue id, or why it was not stored.
Outcome = str | StoreError
# What a host hands the writer.
Op = Commit[T] | LoggedSession


class OpSource(Protocol[T]):
    """Where a host's operations come from: commits, sessions, and None to stop."""

    def get(self) -> Op[T] | None:
        """The next operation, waiting for one."""
        ...

    def get_nowait(self) -> Op[T] | None:
        """The next operation if one is waiting; raises :class:`queue.Empty` if not."""
        ...


class BatchWriter:
    """Owns the read-write connection; executes batches of messages."""

    def __init__(self, path: Path, *, shared: bool, stats: StoreStats | None = None) -> None:
        self.path = path
        self.bodies = body_dir(path)
        self.lock = OwnerLock(locks_dir(path))
        self.stats = stats if stats is not None else StoreStats()
        self.shared = shared
        # Body octets executed (the store's side counts what it queued).
        self.done_bytes = 0
        self._conn: sqlite3.Connection | None = None
        # With several writing processes (shared=True), serialises their write
        # transactions: a writer blocked here wakes the moment the other one is
        # done, where SQLite's own busy handler would sleep and poll (1, 2, 5,
        # 10... ms). Alone, it would only cost two GIL round trips per batch.
        self._write_lock: int | None = None
        # Body files linked under their final names in this batch: (spool name, final).
        self._linked: list[tuple[Path, Path]] = []

    @property
    def owner(self) -> str:
        """This writer's owner token (its lock file's name)."""
        return self.lock.owner

    # --- open, recover, close ------------------------------------------------------

    def open(self) -> None:
        """Open the database (creating it), recover what dead owners left, hold the lock."""
        # Every folder the writer writes to: the database's, the owner locks', the bodies'.
        check_writable(self.path.parent)
        for folder in (self.lock.directory, self.bodies):
            private_dir(folder)
            check_writable(folder)
        private_database(self.path)
        if HAVE_FLOCK and self.shared:
            self._write_lock = os.open(
                self.path.with_name(self.path.name + ".writelock"), os.O_RDWR | os.O_CREAT, 0o600
            )
        self.lock.acquire()
        conn = connect(self.path, read_only=False)
        try:
            # Larger pages suit 256 KiB blobs (fewer overflow pages); a no-op
            # on an existing database, so it must come before WAL is set.
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
            self._use_wal(conn)
            conn.execute("PRAGMA synchronous=FULL")
            # The writer only appends: a small page cache is enough (and bounds its memory).
            conn.execute("PRAGMA cache_size=-1024")
            # After a checkpoint, cut the WAL back to this size.
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            open_schema(conn)  # creates the tables, or upgrades an older database
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

    def close(self) -> None:
        """Close the connection, let go of the write lock file and the owner lock."""
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        finally:
            if self._write_lock is not None:
                os.close(self._write_lock)
                self._write_lock = None
            self.lock.release()

    @staticmethod
    def _use_wal(conn: sqlite3.Connection) -> None:
        """Switch to WAL; a fresh file opened by several processes at once may be busy."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
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
        spools = self.bodies / SPOOL
        private_dir(self.bodies)
        private_dir(spools)
        for folder in os.scandir(spools):
            if folder.is_dir(follow_symlinks=False):
                self.remove_spool(folder.name)

    def remove_spool(self, owner: str) -> bool:
        """Delete one spool folder if its store instance is gone (True once it is).

        A body the writer had already linked under its final name, but whose
        row never got committed, goes with it.
        """
        conn = self._conn
        assert conn is not None
        folder = self.bodies / SPOOL / owner
        with OwnerLock(folder.parent).dead(owner) as dead:  # asks, never acquires
            if not dead:
                return False
            with contextlib.suppress(OSError):
                for entry in os.scandir(folder):
                    final = self.bodies / entry.name
                    with contextlib.suppress(OSError):
                        if (
                            os.path.samefile(entry.path, final)
                            and conn.execute(
                                "SELECT 1 FROM messages WHERE queue_id = ?", (entry.name,)
                            ).fetchone()
                            is None
                        ):
                            final.unlink()
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                folder.rmdir()
        return True

    # --- batches -------------------------------------------------------------------

    def serve(
        self,
        source: OpSource[T],
        settle: Callable[[list[tuple[Commit[T], Outcome]]], None],
    ) -> None:
        """Execute batches from ``source`` until it says stop; ``settle`` each one's outcomes.

        A batch is every operation waiting (up to a cap), so concurrent
        sessions share one COMMIT and its fsync.
        """
        while True:
            op = source.get()
            batch: list[Commit[T]] = []
            sessions: list[LoggedSession] = []
            size = 0
            while op is not None:
                if type(op) is LoggedSession:
                    sessions.append(op)
                else:
                    assert isinstance(op, Commit)
                    batch.append(op)
                    if op.body is not None:
                        size += len(op.body)
                if len(batch) + len(sessions) >= BATCH_MAX_OPS or size >= BATCH_MAX_BYTES:
                    break
                try:
                    op = source.get_nowait()
                except queue.Empty:
                    break
            if batch or sessions:
                outcomes = self.execute(batch, sessions)
                if outcomes:
                    settle(outcomes)
            if op is None:
                return

    def execute(
        self, batch: list[Commit[T]], sessions: list[LoggedSession] | None = None
    ) -> list[tuple[Commit[T], Outcome]]:
        """Write a batch of messages (and logged sessions) in ONE transaction; each
        message's outcome, in order."""
        conn = self._conn
        assert conn is not None
        sessions = sessions or []
        body_bytes = sum(len(op.body) for op in batch if op.body is not None)
        if self._write_lock is not None:
            fcntl.flock(self._write_lock, fcntl.LOCK_EX)  # released below, after COMMIT
        try:
            outcomes = None
            if all(op.spool is None for op in batch):
                outcomes = self._write_batch(conn, batch, sessions)
            if outcomes is None:
                conn.execute("BEGIN IMMEDIATE")
                outcomes = [(op, self._insert_message(conn, op)) for op in batch]
                _log_sessions(conn, sessions)
                if self._linked:
                    # The new files' names, before the rows that point at them.
                    fsync_dir(self.bodies)
                conn.execute("COMMIT")
                for spooled, _ in self._linked:  # the final name stays
                    with contextlib.suppress(OSError):
                        spooled.unlink()
            if batch:
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
        return outcomes

    @staticmethod
    def _write_batch(
        conn: sqlite3.Connection, batch: list[Commit[T]], sessions: list[LoggedSession]
    ) -> list[tuple[Commit[T], Outcome]] | None:
        """Messages with their bodies in the batch (the common case), in four statements.

        Each ``execute`` gives the GIL up and takes it back, which costs a
        busy event loop dearly (in the thread writer); ``executemany`` keeps
        that to one per table. None after a constraint error (an id already
        stored): the batch is rolled back, for the message-by-message path
        to sort out.
        """
        chunks = [(op.row[ROW_QUEUE_ID], 0, op.body) for op in batch if op.body is not None]
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO chunks (queue_id, seq, data) VALUES (?, ?, ?)", chunks)
            conn.executemany(INSERT_MESSAGE, [op.row[:ROW_SEARCH] for op in batch])
            conn.executemany(INSERT_SEARCH, [op.row[ROW_SEARCH] for op in batch])
            queued = [row for op in batch for row in op.row[ROW_QUEUE]]
            if queued:  # the outbound entries, in the message's own transaction
                conn.executemany(INSERT_QUEUE, queued)
            _log_sessions(conn, sessions)
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK")
            return None
        conn.execute("COMMIT")
        return [(op, op.row[ROW_QUEUE_ID]) for op in batch]

    def _insert_message(self, conn: sqlite3.Connection, op: Commit[T]) -> Outcome:
        """Write one message (its body file placed first); its queue id, or why not."""
        queue_id: str = op.row[ROW_QUEUE_ID]
        taken = conn.execute("SELECT 1 FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
        if taken is not None:
            if op.spool is not None:
                with contextlib.suppress(OSError):
                    spooled_body(self.bodies, op.spool, queue_id).unlink()
            return StoreError(f"message {queue_id} is already stored")
        if op.spool is not None:
            problem = self._place_body(op.spool, queue_id, op.row[ROW_SIZE])
            if problem is not None:
                return StoreError(f"message {queue_id}: {problem}")
        elif op.body is not None:
            try:
                conn.execute(
                    "INSERT INTO chunks (queue_id, seq, data) VALUES (?, 0, ?)", (queue_id, op.body)
                )
            except sqlite3.IntegrityError:  # a chunk row without its message: not ours
                return StoreError(f"message {queue_id} is already stored")
        conn.execute(INSERT_MESSAGE, op.row[:ROW_SEARCH])
        conn.execute("DELETE FROM search WHERE queue_id = ?", (queue_id,))  # none, or a stray
        conn.execute(INSERT_SEARCH, op.row[ROW_SEARCH])
        if op.row[ROW_QUEUE]:
            conn.execute("DELETE FROM queue WHERE queue_id = ?", (queue_id,))  # none, or strays
            conn.executemany(INSERT_QUEUE, op.row[ROW_QUEUE])
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


def _log_sessions(conn: sqlite3.Connection, sessions: list[LoggedSession]) -> None:
    """Insert ended sessions, then trim the log to its size (in the caller's transaction)."""
    if not sessions:
        return
    conn.executemany(INSERT_SESSION, [op.row for op in sessions])
    keep = sessions[-1].keep
    # seq is the rowid: the oldest rows beyond ``keep`` go by one range delete.
    conn.execute(
        "DELETE FROM sessions WHERE seq <= (SELECT max(seq) FROM sessions) - ?", (max(keep, 0),)
    )
