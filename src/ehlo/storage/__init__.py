"""Message storage: the Store interface and its backends (sqlite, maildir, null)."""

from __future__ import annotations

from pathlib import Path

from .base import (
    Envelope,
    MessageWriter,
    Store,
    StoredMessage,
    StoreError,
    StoreStats,
    ensure_data_dir,
)
from .maildir import MaildirStore
from .null import NullStore
from .sqlite import SQLiteStore

__all__ = [
    "Envelope",
    "MaildirStore",
    "MessageWriter",
    "NullStore",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreStats",
    "StoredMessage",
    "ensure_data_dir",
    "open_store",
    "sqlite_path",
]


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
) -> Store:
    """The store of ``kind`` ("sqlite", "maildir" or "null") under ``data_dir``.

    Creates ``data_dir`` when needed (mode 0700; see :func:`ensure_data_dir`);
    the store still has to be started.
    ``shared``: several server processes write to it at once (``--workers``).
    ``writer`` ("process" or "thread") and ``writer_address`` (the writer
    several processes share): SQLite only, see :class:`SQLiteStore`.
    """
    if kind not in ("sqlite", "maildir", "null"):
        raise ValueError(f"unknown store kind {kind!r} (expected sqlite, maildir or null)")
    data_dir = Path(data_dir)
    ensure_data_dir(data_dir)
    if kind == "sqlite":
        return SQLiteStore(
            sqlite_path(data_dir), shared=shared, writer=writer, writer_address=writer_address
        )
    if kind == "maildir":
        return MaildirStore(data_dir / "maildir")
    return NullStore()
