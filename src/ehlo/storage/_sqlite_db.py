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
import json
import os
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from ..ids import new_queue_id
from ._query import has_attachment
from .base import create_private, private_dir
from .queue import QUEUE_SCHEMA

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
    subject       TEXT,
    size_received INTEGER
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
""" + QUEUE_SCHEMA

# The search table: one narrow row per message with what ``messages list``
# filters on, case-folded, so that a filtered page scans these rows (newest
# first, by the index) instead of the envelopes with their greeting reports.
SEARCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS search (
    queue_id    TEXT PRIMARY KEY,
    received_at TEXT NOT NULL,
    mail_from   TEXT NOT NULL,
    rcpt_to     TEXT NOT NULL,
    subject     TEXT NOT NULL,
    greeting    TEXT NOT NULL,
    tls         INTEGER NOT NULL,
    auth        TEXT,
    checks      TEXT NOT NULL,
    helo        TEXT NOT NULL DEFAULT '',
    attachments INTEGER
);
CREATE INDEX IF NOT EXISTS search_received_at ON search (received_at, queue_id);
"""
# The session log: one row per ended session (``record`` is its JSON), the
# newest ``session_log_max`` kept; ``seq`` orders them.
SESSIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    seq        INTEGER PRIMARY KEY,
    id         TEXT NOT NULL,
    started_at TEXT NOT NULL,
    ended_at   TEXT NOT NULL,
    client_ip  TEXT NOT NULL,
    record     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_id ON sessions (id);
"""
INSERT_SESSION = (
    "INSERT INTO sessions (id, started_at, ended_at, client_ip, record) VALUES (?, ?, ?, ?, ?)"
)
# PRAGMA user_version: 0 before the search table and ``size_received``, 1 with
# them, 2 with the search table's ``helo`` (the greeting name, case-folded) and
# ``attachments`` (1 when a part is an attachment, 0 when none; NULL: unknown)
# and the ``sessions`` table.
SCHEMA_VERSION = 2
SEARCH_COLUMNS = (
    "queue_id, received_at, mail_from, rcpt_to, subject, greeting, tls, auth, checks, helo,"
    " attachments"
)
INSERT_SEARCH = f"INSERT INTO search ({SEARCH_COLUMNS}) VALUES ({', '.join('?' * 11)})"

COLUMNS = (
    "queue_id, received_at, client_ip, client_port, greeting, greeting_name, mail_from,"
    " mail_params, rcpt_to, tls, protocol, server_name, extra, size, subject, size_received"
)
INSERT_MESSAGE = f"INSERT INTO messages ({COLUMNS}) VALUES ({', '.join('?' * 16)})"
# Where a row's fields are (the row is a tuple in COLUMNS order, followed by
# the message's ``search`` row as one more item: see :func:`search_row`, then
# its ``queue`` rows, a list, empty when nothing is to be handed on).
ROW_QUEUE_ID = 0
ROW_SIZE = 13
ROW_SEARCH = 16
ROW_QUEUE = 17


# Rows the upgrade reads from ``messages`` at a time.
_UPGRADE_BATCH = 1000
# Greeting reports seen lately (the verifier hands out the same text for one
# greeting) and their ``checks`` column.
_checks_cache: dict[str, str] = {}
_CHECKS_CACHE_SIZE = 256


def fold(text: str) -> str:
    """Text as the search table holds it and a filter looks for it."""
    return text.casefold()


def checks_text(report: Any) -> str:
    """The ``checks`` column of a greeting report: ``\nname=result\n...`` (or "")."""
    if report is None:
        return ""
    key = report if isinstance(report, str) else None
    if key is not None:
        found = _checks_cache.get(key)
        if found is not None:
            return found
    try:
        data = json.loads(report) if isinstance(report, str) else report
        pairs = [
            f"{name}={value.get('result', '')}"
            for name, value in data.items()
            if isinstance(value, dict)
        ]
    except (ValueError, AttributeError, TypeError):
        return ""
    text = fold("\n" + "\n".join(pairs) + "\n") if pairs else ""
    if key is not None:
        if len(_checks_cache) >= _CHECKS_CACHE_SIZE:
            _checks_cache.clear()
        _checks_cache[key] = text
    return text


def search_row(
    queue_id: str,
    received_at: str,
    mail_from: str,
    rcpt_to: Sequence[str],
    subject: str | None,
    greeting: str,
    tls: bool,
    extra: dict[str, Any],
    helo: str = "",
    attachments: bool | None = None,
) -> tuple[Any, ...]:
    """A message's row of the ``search`` table (``received_at`` as the messages row has it;
    ``helo`` the greeting name; ``attachments`` whether a part is one, None: not known)."""
    auth = extra.get("auth")
    user = auth.get("user") if isinstance(auth, dict) else None
    report = extra.get("greeting_checks")
    return (
        queue_id,
        received_at,
        fold(mail_from),
        fold("\n".join(rcpt_to)),
        fold(subject or ""),
        greeting.upper(),
        1 if tls else 0,
        fold(user) if isinstance(user, str) else None,
        checks_text(report),
        fold(helo),
        None if attachments is None else int(attachments),
    )


def upgrade(conn: sqlite3.Connection) -> None:
    """Bring the database to :data:`SCHEMA_VERSION`, in the caller's write transaction.

    Version 1 adds ``messages.size_received`` and fills the ``search`` table
    from the rows already stored (a thousand at a time). Version 2 adds the
    search table's ``helo`` and ``attachments`` and fills its rows again
    (reading each body once to look for an attachment), and the ``sessions``
    table. Nothing stored is changed or dropped.
    """
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version >= SCHEMA_VERSION:
        return
    _upgrade_search(conn)
    for statement in SESSIONS_SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _upgrade_search(conn: sqlite3.Connection) -> None:
    """``messages.size_received`` and the ``search`` table with ``helo`` and
    ``attachments`` (versions 1 and 2), its rows filled again."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
    if "size_received" not in columns:
        conn.execute("ALTER TABLE messages ADD COLUMN size_received INTEGER")
    for statement in SEARCH_SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    searched = {row[1] for row in conn.execute("PRAGMA table_info(search)")}
    if "helo" not in searched:
        conn.execute("ALTER TABLE search ADD COLUMN helo TEXT NOT NULL DEFAULT ''")
    if "attachments" not in searched:
        conn.execute("ALTER TABLE search ADD COLUMN attachments INTEGER")
    bodies = _bodies_of(conn)
    last = 0
    while True:
        rows = conn.execute(
            "SELECT rowid, queue_id, received_at, mail_from, rcpt_to, subject, greeting, tls,"
            " extra, greeting_name, size FROM messages WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (last, _UPGRADE_BATCH),
        ).fetchall()
        if not rows:
            break
        last = rows[-1][0]
        found = []
        for row in rows:
            _, queue_id, received_at, mail_from, rcpts, subject, greeting, tls, extra = row[:9]
            greeting_name, size = row[9], row[10]
            try:
                recipients = json.loads(rcpts)
                fields = json.loads(extra)
            except ValueError:
                recipients, fields = [], {}
            found.append(
                search_row(
                    queue_id,
                    received_at,
                    mail_from,
                    [str(r) for r in recipients] if isinstance(recipients, list) else [],
                    subject,
                    greeting,
                    bool(tls),
                    fields if isinstance(fields, dict) else {},
                    greeting_name,
                    _stored_attachments(conn, bodies, queue_id, size),
                )
            )
        conn.executemany(INSERT_SEARCH.replace("INSERT", "INSERT OR REPLACE", 1), found)


def _bodies_of(conn: sqlite3.Connection) -> Path | None:
    """The body files' folder of the database ``conn`` has open (None: in memory)."""
    for _, name, file in conn.execute("PRAGMA database_list"):
        if name == "main" and file:
            return body_dir(Path(file))
    return None


def _stored_attachments(
    conn: sqlite3.Connection, bodies: Path | None, queue_id: str, size: int
) -> bool | None:
    """Whether a stored message has an attachment (None: its body cannot be read)."""
    data = b"".join(
        bytes(chunk)
        for (chunk,) in conn.execute(
            "SELECT data FROM chunks WHERE queue_id = ? ORDER BY seq", (queue_id,)
        )
    )
    if not data and size:
        if bodies is None:
            return None
        try:
            data = (bodies / queue_id).read_bytes()
        except OSError:
            return None
    return has_attachment(data)


def open_schema(conn: sqlite3.Connection) -> None:
    """Create the tables of a new database, or upgrade an older one (one transaction)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        upgrade(conn)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


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
            check_same_thread=False,  # a long-lived one serves a thread pool, under a lock
        )
    else:
        conn = sqlite3.connect(
            path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
        )
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


def open_read_write(path: Path, *, synchronous: str, cache_kib: int) -> sqlite3.Connection:
    """A read-write connection to the database at ``path`` (created 0600), in WAL mode,
    its schema made current. ``synchronous``: "FULL" (a commit is durable when it
    returns) or "NORMAL" (it survives a killed process, not a power cut)."""
    private_database(path)
    conn = connect(path, read_only=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute(f"PRAGMA cache_size=-{cache_kib}")
        open_schema(conn)
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def write_turn(path: Path) -> Iterator[None]:
    """Take the lock the writers of ``--workers`` take around their transactions."""
    lock = path.with_name(path.name + ".writelock")
    if not HAVE_FLOCK or not lock.exists():
        yield
        return
    fd = os.open(lock, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


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
