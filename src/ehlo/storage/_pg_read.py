"""The PostgreSQL store's reads: list, search, get, raw, newer, overview, sessions, deletes.

Functions over a connection from ``Database.connection`` (or over the
``Database`` itself where a result is streamed in pages); the store's
methods call them.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator, Sequence
from typing import Any

from ._overview import Overview
from ._pg_conn import Database
from ._query import Query, Retention
from .base import StoredMessage


def list_messages(conn: Any, limit: int | None) -> Sequence[StoredMessage]:
    raise NotImplementedError


def search(db: Database, query: Query) -> Iterator[StoredMessage]:
    raise NotImplementedError


def overview(conn: Any, since: _dt.datetime) -> Overview:
    raise NotImplementedError


def delete(conn: Any, ids: list[str]) -> Sequence[str]:
    raise NotImplementedError


def delete_matching(db: Database, query: Query) -> int:
    raise NotImplementedError


def prune(conn: Any, retention: Retention, limit: int) -> int:
    raise NotImplementedError


def newer(conn: Any, mark: object | None) -> tuple[Sequence[StoredMessage], object]:
    raise NotImplementedError


def newer_ids(conn: Any, mark: object | None) -> tuple[Sequence[str], object]:
    raise NotImplementedError


def count(conn: Any) -> int:
    raise NotImplementedError


def get(conn: Any, queue_id: str) -> StoredMessage | None:
    raise NotImplementedError


def raw(conn: Any, queue_id: str) -> bytes | None:
    raise NotImplementedError


def read(conn: Any, queue_id: str) -> tuple[StoredMessage, bytes] | None:
    raise NotImplementedError


def sessions(conn: Any, limit: int, before: str | None) -> list[dict[str, Any]]:
    raise NotImplementedError
