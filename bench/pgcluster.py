"""The benchmarks' throwaway PostgreSQL, and what its processes use.

``bench/run.py`` (the W rows on the postgresql store), ``bench/pg_bodies.py``
and ``bench/pg_driver.py`` start one PostgreSQL as the tests do: the
``PgCluster`` class of ``tests/pgserver.py``, imported from the source tree
rather than copied (that module uses the standard library only), so that
the benchmark runs the configuration the durability tests run: ``initdb``
and ``pg_ctl`` of Debian's ``postgresql`` package in a temporary folder, as
``nobody`` when run as root, a Unix socket, ``fsync = on`` and the default
``synchronous_commit`` (on).

The CPU and memory of the server are read from ``/proc``: the postmaster
is found as the parent of a connection's backend (``pg_backend_pid()``),
its tree holds every PostgreSQL process (backends, checkpointer, WAL
writer, autovacuum), and backends that ended are in the postmaster's
reaped-children times. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
try:
    from tests.pgserver import PgCluster, PgError, pg_bin
finally:
    sys.path.remove(str(ROOT))

__all__ = [
    "PgCluster",
    "PgError",
    "RssAnonPeak",
    "cluster",
    "parent_pid",
    "pg_bin",
    "process_cpu",
    "rss_anon",
    "tree_cpu",
    "tree_pids",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def cluster() -> Iterator[PgCluster]:
    """A started throwaway PostgreSQL, destroyed (stopped, folder removed) at the end."""
    if pg_bin() is None:
        raise PgError("PostgreSQL is not installed (make test-deps)")
    pg = PgCluster()
    try:
        pg.init().start()
        yield pg
    finally:
        pg.destroy()


def _stat(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat after the command name (state is [0])."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].split()


def parent_pid(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants (empty when ``root`` is gone)."""
    children: dict[int, list[int]] = defaultdict(list)
    alive = False
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat(int(name))
        if fields is None:
            continue
        alive = alive or int(name) == root
        children[int(fields[1])].append(int(name))
    if not alive:
        return []
    out = [root]
    for pid in out:  # grows while iterating: breadth first
        out.extend(children.get(pid, ()))
    return out


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (0.0 when it is gone)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK if fields else 0.0


def tree_cpu(root: int, pids: Sequence[int] | None = None) -> float:
    """CPU seconds of a tree, every process's reaped children included."""
    total = 0
    for pid in tree_pids(root) if pids is None else pids:
        fields = _stat(pid)
        if fields is not None:
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / CLK_TCK


def rss_anon(pid: int) -> int:
    """The process's private resident memory in bytes (RssAnon: shared buffers left out)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class RssAnonPeak:
    """The largest RssAnon of some processes, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pids: Sequence[int], interval: float = 0.02) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.peak: dict[int, int] = {pid: rss_anon(pid) for pid in self.pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-anon", daemon=True)

    def __enter__(self) -> RssAnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    def _sample(self) -> None:
        for pid in self.pids:
            self.peak[pid] = max(self.peak.get(pid, 0), rss_anon(pid))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
