"""The null store: accepts every message and keeps none of it.

For benchmarks: sessions take exactly the same path (begin, write, commit)
as with a real backend, minus the disk. Sizes and messages are counted in
``stats``; ``list`` is always empty.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from .base import Envelope, MessageWriter, Store, StoredMessage, StoreStats

__all__ = ["NullStore", "NullWriter"]


class NullWriter(MessageWriter):
    """Counts the bytes of one message and drops them."""

    __slots__ = ("_queue_id", "_size", "_stats")

    def __init__(self, queue_id: str, stats: StoreStats) -> None:
        self._queue_id = queue_id
        self._stats = stats
        self._size = 0

    @property
    def size(self) -> int:
        """Octets written (and discarded) so far."""
        return self._size

    def write(self, data: bytes) -> None:
        self._size += len(data)

    async def commit(self) -> str:
        return await self.start_commit()

    def start_commit(self) -> asyncio.Future[str]:
        self._stats.messages += 1
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        future.set_result(self._queue_id)
        return future

    def abort(self) -> None:
        pass


class NullStore(Store):
    """Discards messages; ``stats.messages`` counts them, ``stats.commits`` stays 0."""

    name = "null"

    def __init__(self) -> None:
        self.stats = StoreStats()

    def begin(self, envelope: Envelope) -> NullWriter:
        return NullWriter(envelope.queue_id, self.stats)

    def list(self, limit: int | None = None) -> Sequence[StoredMessage]:
        return ()

    def get(self, queue_id: str) -> StoredMessage | None:
        return None

    def raw(self, queue_id: str) -> bytes | None:
        return None
