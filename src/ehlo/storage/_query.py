"""What ``messages list`` and ``messages delete`` select: filters and paging.

This module owns :class:`Query` (filters on sender, recipients, subject,
time, greeting verb, greeting check results, TLS and the authenticated
user; paging by message id; a limit), its meaning for one message
(:meth:`Query.matches`, what the Maildir store applies while it scans its
envelopes) and :class:`Retention` (how many messages, and how old, a store
keeps while serving). The SQLite store turns a query into SQL over its
``search`` table (:mod:`ehlo.storage.sqlite`), with the same meaning.

Text filters are substrings, case-insensitive (``str.casefold``); the
authenticated user is matched whole, case-insensitive; ``since`` is
inclusive and ``until`` exclusive. Order is newest first:
``before=ID`` selects the messages listed after ``ID`` (older),
``after=ID`` those listed before it (newer).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import StoredMessage

__all__ = ["Query", "Retention"]


def _fold(text: str) -> str:
    return text.casefold()


@dataclasses.dataclass(frozen=True, slots=True)
class Query:
    """A selection of stored messages; every field left at its default selects all."""

    limit: int | None = None  # at most this many (the newest of the selection)
    before: str | None = None  # only messages older than this id
    after: str | None = None  # only messages newer than this id
    mail_from: str | None = None  # substring of the reverse-path
    rcpt_to: str | None = None  # substring of some recipient
    subject: str | None = None  # substring of the subject
    since: _dt.datetime | None = None  # received at or after
    until: _dt.datetime | None = None  # received before
    greeting: str | None = None  # "HELO" or "EHLO"
    checks: tuple[tuple[str, str], ...] = ()  # (check name, result), all must hold
    tls: bool | None = None  # received over TLS, or not
    auth: str | None = None  # the authenticated user

    @property
    def filtered(self) -> bool:
        """True when some filter other than paging and the limit is set."""
        return any(
            value is not None and value != ()
            for value in (
                self.mail_from,
                self.rcpt_to,
                self.subject,
                self.since,
                self.until,
                self.greeting,
                self.checks,
                self.tls,
                self.auth,
            )
        )

    def matches(self, message: StoredMessage) -> bool:
        """Whether ``message`` passes the filters (paging and the limit aside)."""
        env = message.envelope
        if self.mail_from is not None and _fold(self.mail_from) not in _fold(env.mail_from):
            return False
        if self.rcpt_to is not None:
            needle = _fold(self.rcpt_to)
            if not any(needle in _fold(rcpt) for rcpt in env.rcpt_to):
                return False
        if self.subject is not None and _fold(self.subject) not in _fold(message.subject or ""):
            return False
        when = env.received_at
        if when.tzinfo is None:
            when = when.replace(tzinfo=_dt.UTC)
        if self.since is not None and when < self.since:
            return False
        if self.until is not None and when >= self.until:
            return False
        if self.greeting is not None and env.greeting.upper() != self.greeting.upper():
            return False
        if self.tls is not None and bool(env.tls) != self.tls:
            return False
        if self.auth is not None:
            auth = env.extra.get("auth")
            user = auth.get("user") if isinstance(auth, dict) else None
            if not isinstance(user, str) or _fold(user) != _fold(self.auth):
                return False
        if self.checks:
            report = env.extra.get("greeting_checks")
            if isinstance(report, str):  # JSON text as the session stored it
                try:
                    report = json.loads(report)
                except ValueError:
                    return False
            if not isinstance(report, dict):
                return False
            for name, result in self.checks:
                entry = report.get(name)
                if not isinstance(entry, dict) or _fold(str(entry.get("result"))) != _fold(result):
                    return False
        return True


@dataclasses.dataclass(frozen=True, slots=True)
class Retention:
    """What a store keeps while serving: 0 means no limit."""

    keep_messages: int = 0  # the newest this many messages
    keep_days: float = 0.0  # messages received in the last this many days

    @property
    def active(self) -> bool:
        return self.keep_messages > 0 or self.keep_days > 0
