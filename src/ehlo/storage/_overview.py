"""What a store received lately, in numbers: the overview the web page charts.

This module owns :class:`Overview` (messages per minute, HELO against EHLO,
TLS or not, each greeting check's results, the client names greeting most)
and :func:`overview_of`, which counts it from messages one at a time (what a
store without SQL does over ``search(Query(since=...))``). The SQLite store
counts the same in SQL over its ``search`` and ``messages`` rows
(:func:`ehlo.storage.sqlite.SQLiteStore.overview`), with the same meaning.

Minutes are UTC, ``YYYY-MM-DDTHH:MM``; client names are counted
case-insensitively (DNS names are) and shown lower case.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import StoredMessage

__all__ = ["TOP_NAMES", "Overview", "minute_of", "overview_of"]

# Client names listed by ``top_names``, at most.
TOP_NAMES = 10


def minute_of(moment: _dt.datetime) -> str:
    """The UTC minute of ``moment``: ``YYYY-MM-DDTHH:MM``."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.UTC)
    return moment.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M")


@dataclasses.dataclass(slots=True)
class Overview:
    """Counts over the messages received in a window of time."""

    total: int = 0
    per_minute: dict[str, int] = dataclasses.field(default_factory=dict)  # minute -> messages
    greetings: dict[str, int] = dataclasses.field(default_factory=dict)  # "HELO"/"EHLO" -> n
    tls: dict[str, int] = dataclasses.field(default_factory=lambda: {"yes": 0, "no": 0})
    # check -> result -> n
    checks: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    top_names: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # most first

    def add_checks(self, report: Any, count: int = 1) -> None:
        """Count ``count`` messages with the greeting report ``report`` (JSON text or dict)."""
        if isinstance(report, str):
            try:
                report = json.loads(report)
            except ValueError:
                return
        if not isinstance(report, dict):
            return
        for name, entry in report.items():
            if isinstance(entry, dict):
                self.add_check(str(name), str(entry.get("result", "")), count)

    def add_check(self, name: str, result: str, count: int = 1) -> None:
        """Count ``count`` messages whose check ``name`` gave ``result``."""
        results = self.checks.setdefault(name, {})
        results[result] = results.get(result, 0) + count


def top(names: Counter[str], limit: int = TOP_NAMES) -> list[tuple[str, int]]:
    """The ``limit`` most counted names, most first (then by name)."""
    return sorted(names.items(), key=lambda item: (-item[1], item[0]))[:limit]


def overview_of(messages: Iterable[StoredMessage], since: _dt.datetime) -> Overview:
    """The overview of ``messages`` received at or after ``since``."""
    found = Overview()
    names: Counter[str] = Counter()
    for message in messages:
        env = message.envelope
        when = env.received_at
        if when.tzinfo is None:
            when = when.replace(tzinfo=_dt.UTC)
        if when < since:
            continue
        found.total += 1
        minute = minute_of(when)
        found.per_minute[minute] = found.per_minute.get(minute, 0) + 1
        verb = env.greeting.upper()
        found.greetings[verb] = found.greetings.get(verb, 0) + 1
        found.tls["yes" if env.tls else "no"] += 1
        found.add_checks(env.extra.get("greeting_checks"))
        names[env.greeting_name.lower()] += 1
    found.top_names = top(names)
    return found
