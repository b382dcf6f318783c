"""Per-client abuse accounting: connection rates, failed AUTH attempts, exemptions.

Counters live in fixed windows keyed by client IP, so memory stays
proportional to the clients seen within one window; the server's sweeper
prunes them. :class:`SharedConnectionCounts` holds the open connections of
several worker processes, so that the connection limits hold for the whole
server. Nothing here does I/O or sleeps: the server and sessions ask and act.
"""

from __future__ import annotations

import ipaddress
import mmap
import zlib
from collections.abc import Iterable

_MAX_CACHED = 4096


class Networks:
    """Membership of client IPs in a set of networks (cached per address)."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        self._cache: dict[str, bool] = {}

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, str) or not self._networks:
            return False
        known = self._cache.get(ip)
        if known is not None:
            return known
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        found = any(address in net for net in self._networks)
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[ip] = found
        return found


class WindowCounter:
    """Events per key within fixed windows of ``window`` seconds."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._counts: dict[str, tuple[float, int]] = {}

    def hit(self, key: str, now: float) -> int:
        """Count one event for ``key``; the number in the current window, this one included."""
        start, count = self._counts.get(key, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        count += 1
        self._counts[key] = (start, count)
        return count

    def count(self, key: str, now: float) -> int:
        """Events of ``key`` in its current window."""
        start, count = self._counts.get(key, (now, 0))
        return 0 if now - start >= self.window else count

    def prune(self, now: float) -> None:
        """Forget windows that have ended."""
        stale = [k for k, (start, _) in self._counts.items() if now - start >= self.window]
        for key in stale:
            del self._counts[key]

    def __len__(self) -> int:
        return len(self._counts)


class AuthGuard:
    """Failed AUTH attempts per client IP: growing delays, then a lockout.

    Each failure is answered after ``delay`` seconds times the number of
    failures in the window (at most ten times ``delay``); the
    ``max_failures``-th failure within ``lockout`` seconds locks the address
    out of AUTH until ``lockout`` seconds after its first failure.
    """

    def __init__(self, max_failures: int, lockout: float, delay: float) -> None:
        self.max_failures = max_failures
        self.delay = delay
        self._failures = WindowCounter(lockout)

    def locked(self, ip: str, now: float) -> bool:
        """True while ``ip`` is locked out of AUTH."""
        return self._failures.count(ip, now) >= self.max_failures

    def failed(self, ip: str, now: float) -> tuple[float, bool]:
        """Record a failure: (seconds to wait before answering, now locked out)."""
        count = self._failures.hit(ip, now)
        return self.delay * min(count, 10), count >= self.max_failures

    def prune(self, now: float) -> None:
        """Forget addresses whose window has ended."""
        self._failures.prune(now)


class SharedConnectionCounts:
    """Open connections of every worker process, in memory they share.

    ``ehlo serve --workers N`` makes one before forking; each worker calls
    :meth:`bind` with its index and counts only in its own row of an
    anonymous shared mapping, so there is no lock: every cell has one
    writer, and readers add up the rows. An address is counted in two hashed cells of
    ``slots``; its count is the smaller of the two sums, which over-counts
    only when both cells are shared with other open connections. The last
    cell of a row is the worker's total. The supervisor clears a row before
    it (re)starts that worker: a dead worker's connections died with it.
    """

    def __init__(self, workers: int, slots: int = 1 << 16) -> None:
        if workers < 1 or slots < 2:
            raise ValueError("SharedConnectionCounts needs a worker and two slots")
        self.workers = workers
        self.slots = slots
        self._width = slots + 1
        # Anonymous and MAP_SHARED: forked workers see the same pages.
        self._map = mmap.mmap(-1, workers * self._width * 4)
        self._cells = memoryview(self._map).cast("I")
        self._row = 0

    def bind(self, index: int) -> None:
        """In worker ``index``: count this process's connections in its row."""
        if not 0 <= index < self.workers:
            raise ValueError(f"no worker {index}")
        self._row = index * self._width

    def reset(self, index: int) -> None:
        """Forget worker ``index``'s connections (before it starts again)."""
        start = index * self._width
        self._cells[start : start + self._width] = memoryview(bytes(self._width * 4)).cast("I")

    def _pair(self, ip: str) -> tuple[int, int]:
        data = ip.encode()
        first = zlib.crc32(data) % self.slots
        second = zlib.crc32(data, 0x5BD1E995) % self.slots
        return first, second if second != first else (first + 1) % self.slots

    def add(self, ip: str) -> None:
        """One more open connection from ``ip`` in this worker."""
        cells, row = self._cells, self._row
        first, second = self._pair(ip)
        cells[row + first] += 1
        cells[row + second] += 1
        cells[row + self.slots] += 1

    def remove(self, ip: str) -> None:
        """A connection from ``ip`` that this worker counted with :meth:`add` closed."""
        cells, row = self._cells, self._row
        for cell in (*self._pair(ip), self.slots):
            if cells[row + cell]:
                cells[row + cell] -= 1

    def count(self, ip: str) -> int:
        """Open connections from ``ip`` in all workers (never fewer than there are)."""
        cells, width = self._cells, self._width
        first, second = self._pair(ip)
        rows = range(0, self.workers * width, width)
        return min(sum(cells[r + first] for r in rows), sum(cells[r + second] for r in rows))

    def total(self) -> int:
        """Open connections in all workers."""
        cells, width = self._cells, self._width
        return sum(cells[r + self.slots] for r in range(0, self.workers * width, width))
