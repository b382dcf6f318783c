"""The outbound queue in PostgreSQL, shared by every node (tables ``queue`` and ``attempts``).

A node takes due recipients in one short transaction (``FOR UPDATE SKIP
LOCKED``), each under a lease (``lease_token``: this node's token;
``lease_until``: the database's clock), delivers without holding a row
lock, and records the outcome only where its token still holds the
lease. A dead node's leases expire and another node takes the entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ._pg_conn import Database
from .queue import Attempt, EntryUpdate, Queue, QueueEntry


class PostgresQueue(Queue):
    """The queue in the store's database."""

    def __init__(self, db: Database, node: str, lease: float = 300.0) -> None:
        self.db = db
        self.node = node
        self.lease = lease

    def due(self, now: float, limit: int) -> list[QueueEntry]:
        raise NotImplementedError

    def next_due(self) -> float | None:
        raise NotImplementedError

    def claim(self, entries: Sequence[QueueEntry]) -> None:
        raise NotImplementedError

    def record(self, updates: Sequence[EntryUpdate], attempts: Sequence[Attempt] = ()) -> None:
        raise NotImplementedError

    def set_next_hop(self, queue_id: str, recipient: str, next_hop: str) -> None:
        raise NotImplementedError

    def recover(self) -> int:
        raise NotImplementedError

    def entries(
        self,
        *,
        queue_ids: Sequence[str] | None = None,
        state: str | None = None,
        recipient: str | None = None,
        limit: int | None = None,
        before: str | None = None,
    ) -> list[QueueEntry]:
        raise NotImplementedError

    def attempts(self, queue_id: str) -> list[Attempt]:
        raise NotImplementedError

    def retry(self, ids: Sequence[str] | None, now: float) -> int:
        raise NotImplementedError

    def hold(self, ids: Sequence[str]) -> int:
        raise NotImplementedError

    def release(self, ids: Sequence[str], now: float) -> int:
        raise NotImplementedError

    def remove(self, ids: Sequence[str]) -> int:
        raise NotImplementedError

    def request_bounce(self, ids: Sequence[str], now: float) -> int:
        raise NotImplementedError

    def pending(self, ids: Iterable[str]) -> set[str]:
        raise NotImplementedError

    def counts(self) -> dict[str, int]:
        raise NotImplementedError

    def finished_messages(self, ids: Iterable[str]) -> list[str]:
        raise NotImplementedError

    def expire_history(self, before: float) -> int:
        raise NotImplementedError
