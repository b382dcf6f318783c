"""Per-client abuse accounting: connection rates, failed AUTH attempts, exemptions.

Counters live in fixed windows keyed by client address (:func:`client_key`:
an IPv4 address, or an IPv6 client's /64 network) or, for failed AUTH
attempts per account, by a digest of the user name, so memory stays
proportional to the clients seen within one window; the server's sweeper
prunes them. :class:`SharedCounters` holds the counts of several worker
processes (open connections, connection rates, AUTH failures) in memory they
share, so that the limits hold for the whole server. :class:`ClusterCounter`
adds the counts of the other nodes on one PostgreSQL database: it answers
from memory, what this node counted plus what the others had counted at
the last exchange (``ehlo.server._cluster`` runs the exchanges, about
every half second, off the event loop). Nothing here does I/O or sleeps:
the server and sessions ask and act.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import mmap
import zlib
from collections.abc import Iterable
from typing import Protocol

from .._cache import TTLCache

_MAX_CACHED = 4096


@functools.lru_cache(maxsize=_MAX_CACHED)
def client_key(ip: str) -> str:
    """The key the per-address limits count ``ip`` under.

    An IPv4 address (and an IPv4-mapped IPv6 address) is its own key. An
    IPv6 client is counted by its /64 network (``2001:db8:1:2::/64``): one
    site or host usually holds a whole /64 (RFC 4291 section 2.5.1
    interface identifiers are 64 bits), so per-address limits would
    otherwise be one fresh address away.
    """
    if ":" not in ip:
        return ip
    try:
        address = ipaddress.IPv6Address(ip.partition("%")[0])
    except ValueError:
        return ip
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


def account_key(name: str) -> str:
    """The key failed AUTH attempts for user ``name`` are counted under (fixed size)."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=16)
    return f"user:{digest.hexdigest()}"


class Networks:
    """Membership of client IPs in a set of networks (cached per address)."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        self._cache: TTLCache[str, bool] = TTLCache(_MAX_CACHED)

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
        self._cache.put(ip, found)
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


class EventCounter(Protocol):
    """What the limits ask of a counter of events per key in a window."""

    window: float

    def hit(self, key: str, now: float) -> int: ...

    def count(self, key: str, now: float) -> int: ...

    def prune(self, now: float) -> None: ...


class AuthGuard:
    """Failed AUTH attempts per client IP: growing delays, then a lockout.

    Each failure is answered after ``delay`` seconds times the number of
    failures in the window (at most ten times ``delay``); the
    ``max_failures``-th failure within ``lockout`` seconds locks the address
    out of AUTH until ``lockout`` seconds after its first failure.
    """

    def __init__(
        self,
        max_failures: int,
        lockout: float,
        delay: float,
        failures: EventCounter | None = None,
    ) -> None:
        self.max_failures = max_failures
        self.delay = delay
        self._failures = failures if failures is not None else WindowCounter(lockout)

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


class AccountGuard:
    """Failed AUTH attempts per account, from every address together.

    The ``max_failures``-th failure for one user name within ``window``
    seconds locks that name out of AUTH until its window ends: many
    addresses cannot take turns guessing one password. Names are counted
    whether or not such a user exists (a lockout must not tell which do).
    ``max_failures`` 0: no limit.
    """

    def __init__(
        self,
        max_failures: int,
        window: float,
        failures: EventCounter | None = None,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self._failures = failures if failures is not None else WindowCounter(window)

    def locked(self, name: str, now: float) -> bool:
        """True while user ``name`` is locked out of AUTH."""
        if self.max_failures <= 0:
            return False
        return self._failures.count(account_key(name), now) >= self.max_failures

    def failed(self, name: str, now: float) -> bool:
        """Record a failure for ``name``; True when it is the one that locks the account."""
        if self.max_failures <= 0:
            return False
        key = account_key(name)
        # Compared with the count before: a shared count may grow by more than one.
        before = self._failures.count(key, now)
        return before < self.max_failures <= self._failures.hit(key, now)

    def prune(self, now: float) -> None:
        """Forget names whose window has ended."""
        self._failures.prune(now)


def _cells(key: str, slots: int) -> tuple[int, int]:
    """The two cells (of ``slots``) that count ``key`` in a shared table."""
    data = key.encode()
    first = zlib.crc32(data) % slots
    second = zlib.crc32(data, 0x5BD1E995) % slots
    return first, second if second != first else (first + 1) % slots


class _WorkerRows:
    """Tables of 32-bit counts in anonymous shared memory, one row per worker.

    Made before the fork (MAP_SHARED: every worker sees the same pages);
    each worker writes only its own row, so there is no lock.
    """

    def __init__(self, workers: int, width: int, tables: int) -> None:
        self.workers = workers
        self._width = width
        size = workers * width
        self._map = mmap.mmap(-1, size * tables * 4)
        cells = memoryview(self._map).cast("I")
        self._tables = [cells[i * size : (i + 1) * size] for i in range(tables)]
        self._row = 0  # where this process's row starts

    def bind(self, index: int) -> None:
        """In worker ``index``: count in its own row."""
        if not 0 <= index < self.workers:
            raise ValueError(f"no worker {index}")
        self._row = index * self._width

    def reset(self, index: int) -> None:
        """Zero worker ``index``'s row."""
        start = index * self._width
        zeros = memoryview(bytes(self._width * 4)).cast("I")
        for table in self._tables:
            table[start : start + self._width] = zeros


class SharedConnectionCounts(_WorkerRows):
    """Open connections of every worker process, in memory they share.

    ``ehlo serve --workers N`` makes one before forking; each worker calls
    :meth:`bind` with its index and counts only in its own row, and readers
    add up the rows. An address is counted in two hashed cells of
    ``slots``; its count is the smaller of the two sums, which over-counts
    only when both cells are shared with other open connections. The last
    cell of a row is the worker's total. The supervisor clears a row before
    it (re)starts that worker: a dead worker's connections died with it.
    """

    def __init__(self, workers: int, slots: int = 1 << 16) -> None:
        if workers < 1 or slots < 2:
            raise ValueError("SharedConnectionCounts needs a worker and two slots")
        super().__init__(workers, slots + 1, 1)
        self.slots = slots
        self._cells = self._tables[0]

    def _pair(self, ip: str) -> tuple[int, int]:
        return _cells(ip, self.slots)

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


class SharedWindowCounter(_WorkerRows):
    """:class:`WindowCounter`'s counts, shared by worker processes.

    Laid out like :class:`SharedConnectionCounts` (a row per worker, two
    hashed cells per key, the smaller sum) with a window number beside each
    count. Windows are aligned to the clock (a 60 s window starts on the
    minute, by the system-wide monotonic clock), so that every worker means
    the same one; a :class:`WindowCounter`'s window starts at its key's
    first event instead. Cells of an ended window are reused as they come.
    """

    def __init__(self, workers: int, window: float, slots: int = 1 << 14) -> None:
        if workers < 1 or slots < 2 or window <= 0:
            raise ValueError("SharedWindowCounter needs a worker, two slots and a window")
        super().__init__(workers, slots, 2)
        self.window = window
        self.slots = slots
        # The window number + 1 of each count (0: none yet), and the counts.
        self._epochs, self._counts = self._tables

    def _epoch(self, now: float) -> int:
        # Kept within 32 bits (0 means "none"): a wrap needs 4 billion windows.
        return int(now // self.window) % 0xFFFFFFFF + 1

    def hit(self, key: str, now: float) -> int:
        """Count one event for ``key``; the number in the current window, this one included."""
        epoch = self._epoch(now)
        epochs, counts, row = self._epochs, self._counts, self._row
        for cell in _cells(key, self.slots):
            index = row + cell
            if epochs[index] != epoch:
                counts[index] = 0  # before the window number: a reader never adds a stale count
                epochs[index] = epoch
            counts[index] += 1
        return self.count(key, now)

    def count(self, key: str, now: float) -> int:
        """Events of ``key`` in the current window, in every worker."""
        epoch = self._epoch(now)
        epochs, counts, slots = self._epochs, self._counts, self.slots
        rows = range(0, self.workers * slots, slots)
        return min(
            sum(counts[r + cell] for r in rows if epochs[r + cell] == epoch)
            for cell in _cells(key, slots)
        )

    def prune(self, now: float) -> None:
        """Nothing to do: a cell of an ended window is reused by the next event."""


class SharedCounters:
    """What ``ehlo serve --workers N`` shares between its workers' abuse limits.

    Made in the supervisor before it forks: the open connections (for
    ``max_connections`` and ``max_connections_per_ip``), the new connections
    per address per minute (``max_connection_rate``), the failed AUTH
    attempts per address (the lockout) and per account.
    """

    def __init__(self, workers: int, auth_lockout: float, auth_user_lockout: float = 600.0) -> None:
        self.connections = SharedConnectionCounts(workers)
        self.connection_rate = SharedWindowCounter(workers, 60.0)
        # A lockout of 0 s ends with each failure: nothing to share.
        self.auth_failures: WindowCounter | SharedWindowCounter = (
            SharedWindowCounter(workers, auth_lockout)
            if auth_lockout > 0
            else WindowCounter(auth_lockout)
        )
        self.account_failures = SharedWindowCounter(workers, auth_user_lockout)

    def bind(self, index: int) -> None:
        """In worker ``index``: count in its own rows."""
        self.connections.bind(index)
        self.connection_rate.bind(index)
        if isinstance(self.auth_failures, SharedWindowCounter):
            self.auth_failures.bind(index)
        self.account_failures.bind(index)

    def reset(self, index: int) -> None:
        """Before worker ``index`` (re)starts: its connections are gone.

        Its rates and AUTH failures (per address and per account) stay: a
        crash must not reset an abuser's count.
        """
        self.connections.reset(index)


# A cluster counter's window is cut into this many slots in the database;
# the sum over the last ones is a sliding window, the same on every node.
CLUSTER_SLOTS = 6
# Keys whose new events one process keeps for the next exchange, at most
# (an outage must not grow them without bound; the local count still holds).
_MAX_PENDING = 10_000


class ClusterCounter:
    """A local counter plus the other nodes' counts of the same ``kind``.

    Wraps this node's counter (a :class:`WindowCounter`, or the workers'
    :class:`SharedWindowCounter`) and answers at once, from memory: the
    larger of the local count and the cluster's total as last read back
    plus this process's events since. Each exchange (:meth:`take`, then
    :meth:`settle` with what the database answered, or :meth:`restore`
    when it could not be reached) hands on the events counted meanwhile.
    With ``lock``, the event that reaches ``limit`` locks the key for one
    ``window`` on every node (an AUTH lockout), whatever their own counts.
    A database that cannot be reached changes nothing here: the local
    counts keep their limits, and the events wait for the next exchange.
    """

    def __init__(self, kind: str, local: EventCounter, limit: int, *, lock: bool = False) -> None:
        if local.window <= 0 or limit < 1:
            raise ValueError("a cluster counter needs a window and a limit")
        self.kind = kind
        self.local = local
        self.window = local.window
        self.limit = limit
        self.lock = lock
        self._pending: dict[str, int] = {}  # events not handed on yet
        self._sending: dict[str, int] = {}  # events in the exchange under way
        self._totals: dict[str, int] = {}  # the cluster's, at the last exchange
        self._totals_at = 0.0
        self._locks: dict[str, float] = {}  # key -> end (the caller's clock)
        self._new_locks: dict[str, float] = {}  # key -> seconds, to write

    @property
    def slot_seconds(self) -> float:
        return self.window / CLUSTER_SLOTS

    @property
    def near(self) -> int:
        """Totals the exchange reads back for keys this node has not counted itself."""
        return max(1, self.limit // 2)

    def hit(self, key: str, now: float) -> int:
        """Count one event for ``key``; the number in the window, all nodes, this one included."""
        local = self.local.hit(key, now)
        pending = self._pending
        if key in pending or len(pending) < _MAX_PENDING:
            pending[key] = pending.get(key, 0) + 1
        total = self._total(key, now, local)
        if self.lock and total >= self.limit and self._locks.get(key, 0.0) <= now:
            self._locks[key] = now + self.window
            self._new_locks[key] = self.window
        return total

    def count(self, key: str, now: float) -> int:
        """Events of ``key`` in the window, on every node (as far as known)."""
        return self._total(key, now, self.local.count(key, now))

    def _total(self, key: str, now: float, local: int) -> int:
        shared = self._totals.get(key, 0) + self._sending.get(key, 0) + self._pending.get(key, 0)
        total = max(local, shared)
        if self.lock and self._locks.get(key, 0.0) > now:
            total = max(total, self.limit)
        return total

    def prune(self, now: float) -> None:
        """Forget ended windows and locks; totals too old to trust."""
        self.local.prune(now)
        for key in [k for k, end in self._locks.items() if end <= now]:
            del self._locks[key]
        if self._totals and now - self._totals_at >= self.window:
            self._totals = {}

    # ------------------------------------------------------------ exchanges

    def take(self) -> tuple[dict[str, int], dict[str, float]]:
        """The events and locks to hand on now (kept aside until settled or restored)."""
        self._sending, self._pending = self._pending, {}
        locks, self._new_locks = self._new_locks, {}
        return self._sending, locks

    def settle(self, totals: dict[str, int], locks: dict[str, float], now: float) -> None:
        """The exchange went through: the cluster's ``totals`` (they include what was
        sent) and the ``locks`` in force (seconds left), read at ``now``."""
        self._sending = {}
        self._totals, self._totals_at = totals, now
        for key, left in locks.items():
            end = now + left
            if self._locks.get(key, 0.0) < end:
                self._locks[key] = end

    def restore(self, locks: dict[str, float]) -> None:
        """The exchange failed: its events and ``locks`` go with the next one."""
        sending, self._sending = self._sending, {}
        pending = self._pending
        for key, n in sending.items():
            if key in pending or len(pending) < _MAX_PENDING:
                pending[key] = pending.get(key, 0) + n
        for key, seconds in locks.items():
            self._new_locks.setdefault(key, seconds)
