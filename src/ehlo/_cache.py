"""The one in-memory cache: entries kept for a time to live, least recently used dropped.

``TTLCache`` is what the DNS answers, the greeting verifier's reports, the
SPF outcomes and the exempt-network lookups are kept in. Each entry has its
own time to live (a DNS TTL, a report's freshness) or the cache's default,
or none (kept until evicted); the cache holds at most ``max_entries`` and
drops the least recently used entry beyond that. Time comes from ``clock``
(seconds, monotonic), which tests replace. Every method takes a lock, so
threads (the SPF workers) may share a cache with the event loop.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["TTLCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_FOREVER = float("inf")


class TTLCache(Generic[K, V]):
    """Values by key until their time to live runs out, at most ``max_entries`` of them.

    ``ttl``: the time to live of an entry put without one (``None``: kept
    until evicted). ``max_ttl``: the longest any entry is kept, whatever it
    was put with. ``get`` on an expired entry drops it and answers ``None``,
    as for a missing one; ``None`` is therefore not a value worth caching.
    """

    def __init__(
        self,
        max_entries: int,
        *,
        ttl: float | None = None,
        max_ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.ttl = ttl
        self.max_ttl = max_ttl
        self._clock = clock
        # key -> (expires, value); the least recently used first.
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value for ``key`` (now the most recently used), or ``None`` if absent or expired."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if self._clock() >= entry[0]:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def peek(self, key: K) -> V | None:
        """As ``get``, without making the entry the most recently used or dropping it."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or self._clock() >= entry[0]:
            return None
        return entry[1]

    def remaining(self, key: K) -> float | None:
        """Seconds until the entry for ``key`` expires (``inf``: never); ``None`` if gone."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            return None
        left = entry[0] - self._clock()
        return left if left > 0 else None

    def put(self, key: K, value: V, ttl: float | None = None) -> None:
        """Keep ``value`` for ``ttl`` seconds (the cache's ``ttl`` when None).

        The time is capped at ``max_ttl``; 0 or less keeps nothing and drops
        what was kept for ``key``. Beyond ``max_entries``, the least recently
        used entries go.
        """
        if ttl is None:
            ttl = self.ttl
        with self._lock:
            if ttl is not None and ttl <= 0:
                self._entries.pop(key, None)
                return
            if self.max_ttl is not None:
                ttl = self.max_ttl if ttl is None else min(ttl, self.max_ttl)
            expires = _FOREVER if ttl is None else self._clock() + ttl
            self._entries[key] = (expires, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def pop(self, key: K) -> V | None:
        """Drop the entry for ``key``; its value if it was fresh, else ``None``."""
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is None or self._clock() >= entry[0]:
            return None
        return entry[1]

    def prune(self) -> None:
        """Drop expired entries from the least recently used end, up to the first fresh one.

        Cheap enough to call before each ``put``: an entry that is used stays
        at the other end, and one left alone past its time goes here.
        """
        with self._lock:
            now = self._clock()
            entries = self._entries
            while entries and next(iter(entries.values()))[0] <= now:
                entries.popitem(last=False)

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        """Entries held, the expired ones not yet dropped included."""
        return len(self._entries)
