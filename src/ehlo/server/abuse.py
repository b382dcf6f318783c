"""Per-client abuse accounting: connection rates, failed AUTH attempts, exemptions.

Counters live in fixed windows keyed by client IP, so memory stays
proportional to the clients seen within one window; the server's sweeper
prunes them. Nothing here does I/O or sleeps: the server and sessions ask
and act.
"""

from __future__ import annotations

import ipaddress
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
