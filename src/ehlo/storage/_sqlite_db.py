"""The SQLite store's files: the schema, connections, paths and owner locks.

This module owns what the store (:mod:`ehlo.storage.sqlite`) and its batch
writer (:mod:`ehlo.storage._batch`) both need to know about the files on
disk: the schema and the ``messages`` columns, how a connection is opened
(busy timeout, read-only by URI), the database file created 0600 before
SQLite opens it, where body and spool files live, and the ``flock``-held
owner lock files that tell a sweeping writer which store instances and
writers are alive.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ..ids import new_queue_id
from .base import create_private, private_dir

# Whether lock files can be held with flock (not on Windows).
HAVE_FLOCK = sys.platform != "win32"
if HAVE_FLOCK:
    import fcntl

# In the bodies folder: one folder per store instance for the bodies it is receiving.
SPOOL = ".spool"
PAGE_SIZE = 16384
WAL_SIZE_LIMIT = 64 * 1024 * 1024
# Milliseconds a connection waits for another process's write lock.
BUSY_TIMEOUT_MS = 30_000

SCHEMA = """
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

COLUMNS = (
    "queue_id, received_at, client_ip, client_port, greeting, greeting_name, mail_from,"
    " mail_params, rcpt_to, tls, protocol, server_name, extra, size, subject"
)
INSERT_MESSAGE = f"INSERT INTO messages ({COLUMNS}) VALUES ({', '.join('?' * 15)})"
# Where a row's fields are (the row is a tuple in COLUMNS order).
ROW_QUEUE_ID = 0
ROW_SIZE = 13


def body_dir(path: Path) -> Path:
    """The directory of the body files of the database at ``path``."""
    return path.with_name(path.name + ".bodies")


def locks_dir(path: Path) -> Path:
    """The directory of the writers' owner lock files of the database at ``path``."""
    return path.with_name(path.name + ".locks")


def spooled_body(bodies: Path, spool: str, queue_id: str) -> Path:
    """Where the store instance owning spool folder ``spool`` receives a body."""
    return bodies / SPOOL / spool / queue_id


def private_database(path: Path) -> None:
    """Create the database file 0600 before SQLite does (it would make it 0644
    and its -wal and -shm files like it); narrow an existing one and those."""
    try:
        os.close(create_private(path))
    except FileExistsError:
        for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            with contextlib.suppress(FileNotFoundError, PermissionError):
                if os.stat(name).st_mode & 0o077:
                    os.chmod(name, 0o600)


def connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    if read_only:
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro",
            uri=True,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
    else:
        conn = sqlite3.connect(
            path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
        )
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


# --- owner locks: which store instances are alive -----------------------------


class OwnerLock:
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
            if HAVE_FLOCK:
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
            if HAVE_FLOCK:
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
