"""Message storage: the Store interface and its backends (sqlite, maildir, null)."""

from __future__ import annotations

from .base import Envelope, MessageWriter, Store, StoredMessage, StoreError

__all__ = ["Envelope", "MessageWriter", "Store", "StoreError", "StoredMessage"]
