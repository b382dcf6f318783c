"""The abuse counters the nodes share: tables ``abuse_counts`` and ``abuse_locks``.

Each node counts on its own (``ehlo.server.abuse``) and, about every half
second, hands this module what it counted since the last time; one short
transaction adds it to the shared counts and reads back what the node needs
to know of the others. Counts are kept per *slot*, a sixth of a kind's
window on the database's clock (``floor(epoch / slot_seconds)``), so that
the sum over a kind's last six slots is a sliding window that every node
means the same way whatever its own clock says. Rows with equal
``(kind, key, slot)`` add up (``INSERT ... ON CONFLICT DO UPDATE``); rows
are written in key order, so two nodes never wait on each other in a
cycle.

What a node reads back stays bounded: per kind, the keys whose sum reaches
``near`` (half the limit, say) or that the node just wrote, at most
:data:`MAX_ROWS` of them, and the locks still in force (an AUTH lockout
reached on one node: ``abuse_locks.until`` on the database's clock).
:meth:`PostgresAbuse.sweep` deletes the slots that left every window and
the locks that ended.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ._pg_conn import Database

__all__ = ["MAX_ROWS", "AbuseKind", "Exchanged", "PostgresAbuse"]

# Keys (and locks) one exchange reads back per kind, at most.
MAX_ROWS = 10_000


def _now(conn: Any) -> float:
    """The database's clock, in epoch seconds."""
    row = conn.execute("SELECT extract(epoch from clock_timestamp())::float8").fetchone()
    return float(row[0])


@dataclasses.dataclass(frozen=True)
class AbuseKind:
    """One kind of count: its name, its slots' length and number, what is near the limit."""

    name: str
    slot_seconds: float
    slots: int
    near: int

    def slot(self, now: float) -> int:
        return math.floor(now / self.slot_seconds)


@dataclasses.dataclass
class Exchanged:
    """What one exchange read back: totals by kind and key, locks' seconds left."""

    totals: dict[str, dict[str, int]]
    locks: dict[str, dict[str, float]]


class PostgresAbuse:
    """The shared abuse counts and locks in one database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def exchange(
        self,
        kinds: Sequence[AbuseKind],
        counts: Mapping[str, Mapping[str, int]],
        locks: Mapping[str, Mapping[str, float]],
    ) -> Exchanged:
        """Add ``counts`` (kind -> key -> events), write ``locks`` (kind -> key ->
        seconds), read back the totals and the locks in force. Raises StoreError.
        """
        totals: dict[str, dict[str, int]] = {}
        held: dict[str, dict[str, float]] = {}
        with self.db.connection() as conn:
            now = _now(conn)
            rows = sorted(
                (kind.name, key, kind.slot(now), n)
                for kind in kinds
                for key, n in counts.get(kind.name, {}).items()
                if n > 0
            )
            if rows:
                conn.execute(
                    "INSERT INTO abuse_counts (kind, key, slot, count)"
                    " SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::int[])"
                    " ON CONFLICT (kind, key, slot)"
                    " DO UPDATE SET count = abuse_counts.count + excluded.count",
                    [list(column) for column in zip(*rows, strict=True)],
                )
            new_locks = sorted(
                (name, key, now + seconds)
                for name, keys in locks.items()
                for key, seconds in keys.items()
            )
            if new_locks:
                conn.execute(
                    "INSERT INTO abuse_locks (kind, key, until)"
                    " SELECT * FROM unnest(%s::text[], %s::text[], %s::float8[])"
                    " ON CONFLICT (kind, key)"
                    " DO UPDATE SET until = greatest(abuse_locks.until, excluded.until)",
                    [list(column) for column in zip(*new_locks, strict=True)],
                )
            for kind in kinds:
                written = list(counts.get(kind.name, {}))
                totals[kind.name] = {
                    str(key): int(total)
                    for key, total in conn.execute(
                        "SELECT key, sum(count) FROM abuse_counts"
                        " WHERE kind = %s AND slot > %s GROUP BY key"
                        " HAVING sum(count) >= %s OR key = ANY(%s::text[]) LIMIT %s",
                        (kind.name, kind.slot(now) - kind.slots, kind.near, written, MAX_ROWS),
                    )
                }
                held[kind.name] = {}
            for name, key, left in conn.execute(
                "SELECT kind, key, until - %s FROM abuse_locks"
                " WHERE until > %s AND kind = ANY(%s::text[]) LIMIT %s",
                (now, now, [kind.name for kind in kinds], MAX_ROWS * max(1, len(kinds))),
            ):
                held.setdefault(str(name), {})[str(key)] = float(left)
        return Exchanged(totals, held)

    def sweep(self, kinds: Sequence[AbuseKind]) -> int:
        """Delete the slots older than every window and the ended locks; rows deleted."""
        deleted = 0
        with self.db.connection() as conn:
            now = _now(conn)
            for kind in kinds:
                deleted += conn.execute(
                    "DELETE FROM abuse_counts WHERE kind = %s AND slot <= %s",
                    (kind.name, kind.slot(now) - kind.slots),
                ).rowcount
            deleted += conn.execute("DELETE FROM abuse_locks WHERE until <= %s", (now,)).rowcount
        return deleted
