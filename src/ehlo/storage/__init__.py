"""Message storage: the Store interface and its backends (sqlite, maildir, null)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ._overview import Overview
from ._query import Query, Retention
from .base import (
    LIST_FIELDS,
    Envelope,
    MessageWriter,
    Store,
    StoredMessage,
    StoreError,
    StoreStats,
    create_private,
    ensure_data_dir,
    list_json,
    message_json,
)
from .maildir import MaildirStore
from .null import NullStore
from .sqlite import SQLiteStore

__all__ = [
    "LIST_FIELDS",
    "Envelope",
    "MaildirStore",
    "MessageWriter",
    "NullStore",
    "Overview",
    "Query",
    "Retention",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreStats",
    "StoredMessage",
    "ensure_data_dir",
    "list_json",
    "message_json",
    "open_store",
    "sqlite_path",
    "stored_kind",
]

# In the data folder: the kind of store it holds ("sqlite" or "maildir"),
# written when a store is first opened there.
KIND_FILE = "store"


def sqlite_path(data_dir: Path) -> Path:
    """The SQLite store's database file under ``data_dir``."""
    return Path(data_dir) / "ehlo.sqlite3"


def open_store(
    kind: str,
    data_dir: Path,
    *,
    shared: bool = False,
    writer: str = "process",
    writer_address: str | None = None,
    retention: Retention | None = None,
    database_url: str | None = None,
) -> Store:
    """The store of ``kind`` ("sqlite", "maildir", "null" or "postgresql") under ``data_dir``.

    Creates ``data_dir`` when needed (mode 0700; see :func:`ensure_data_dir`);
    the store still has to be started.
    ``shared``: several server processes write to it at once (``--workers``).
    ``writer`` ("process" or "thread") and ``writer_address`` (the writer
    several processes share): SQLite only, see :class:`SQLiteStore`.
    ``retention``: what the store keeps while serving (None: everything).
    ``database_url``: the PostgreSQL store's database (``kind`` "postgresql",
    whose data live there: ``data_dir`` keeps only the node's own files).

    The data folder records the kind of store it holds (its ``store``
    file); a folder that holds the other kind is refused with a
    :class:`StoreError` naming it.
    """
    if kind not in ("sqlite", "maildir", "null", "postgresql"):
        raise ValueError(
            f"unknown store kind {kind!r} (expected sqlite, maildir, null or postgresql)"
        )
    data_dir = Path(data_dir)
    ensure_data_dir(data_dir)
    if kind == "null":
        return NullStore()
    if kind == "postgresql":
        if not database_url:
            raise StoreError("the postgresql store needs a database URL (database_url)")
        from .postgres import PostgresStore

        # Only the node's own files: bodies waiting for their commit.
        return PostgresStore(database_url, retention=retention, spool_dir=data_dir / "spool")
    held = stored_kind(data_dir)
    if held is not None and held != kind:
        raise StoreError(
            f"data folder {data_dir} holds a {held} store, not {kind}"
            f" (use --store {held}, or another --data folder)"
        )
    if held is None:
        _record_kind(data_dir, kind)
    if kind == "sqlite":
        return SQLiteStore(
            sqlite_path(data_dir),
            shared=shared,
            writer=writer,
            writer_address=writer_address,
            retention=retention,
        )
    store = MaildirStore(data_dir / "maildir")
    store.retention = retention
    return store


def stored_kind(data_dir: Path) -> str | None:
    """The kind of store ``data_dir`` holds: its ``store`` file, else what is there.

    A folder written before the file existed is recognised by its contents
    (``ehlo.sqlite3``, or ``maildir/`` alone); None for a new folder.
    """
    data_dir = Path(data_dir)
    try:
        # Bytes decoded as UTF-8: no codec to import, which a server that has
        # switched users may no longer be able to read (ehlo serve --user).
        text = (data_dir / KIND_FILE).read_bytes().decode().strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    if text in ("sqlite", "maildir"):
        return text
    if sqlite_path(data_dir).exists():
        return "sqlite"
    if (data_dir / "maildir").is_dir():
        return "maildir"
    return None


def _record_kind(data_dir: Path, kind: str) -> None:
    """Write the ``store`` file (best effort: a read-only folder is only read)."""
    temp = data_dir / f".{KIND_FILE}.{os.getpid()}.tmp"
    try:
        fd = create_private(temp)
        try:
            os.write(fd, f"{kind}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, data_dir / KIND_FILE)
    except OSError:
        with contextlib.suppress(OSError):
            temp.unlink()
