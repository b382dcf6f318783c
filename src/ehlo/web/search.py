"""The search language of ``q=``: parsed into a storage :class:`~ehlo.storage.Query`.

A query is terms separated by spaces; every term must hold. A term is a
bare word or a ``"quoted phrase"`` (found in the subject or the body,
case-insensitive), or ``operator:value`` (the value quoted when it holds
spaces: ``subject:"two words"``). A leading ``-`` negates any term.

Operators: ``from:`` and ``to:`` (substrings of the envelope's reverse-path
and of some recipient), ``subject:``, ``helo:`` (a substring of the greeting
name), ``greeting:helo|ehlo``, ``check:NAME=RESULT``, ``tls:yes|no``,
``auth:USER`` (the whole user name), ``after:DATE`` (received at or after)
and ``before:DATE`` (received before), a DATE being an ISO date or date and
time, UTC unless it says, and ``has:attachment``.

An unknown operator, a bad value, an operator given twice (``check:`` and
words aside) or an unterminated quote is a :class:`ValueError` whose
message names the term: the API answers it 400.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from typing import Any

from ..storage import Query

__all__ = ["OPERATORS", "parse_query"]

# Each operator and the Query field it sets.
OPERATORS = {
    "from": "mail_from",
    "to": "rcpt_to",
    "subject": "subject",
    "helo": "helo",
    "greeting": "greeting",
    "check": "checks",
    "tls": "tls",
    "auth": "auth",
    "after": "since",
    "before": "until",
    "has": "attachments",
}
# A query longer than this is refused (a bound on the work one request asks).
MAX_QUERY = 2000


def parse_query(text: str) -> Query:
    """``text`` as a Query; ValueError with a one-line reason when it is not valid."""
    if len(text) > MAX_QUERY:
        raise ValueError(f"query too long ({len(text)} characters, at most {MAX_QUERY})")
    fields: dict[str, Any] = {}
    words: list[str] = []
    checks: list[tuple[str, str]] = []
    excluded: list[Query] = []
    for negated, operator, value, term in _terms(text):
        if operator is None:
            if not value:
                raise ValueError(f"empty search term {term!r}")
            if negated:
                excluded.append(Query(words=(value,)))
            else:
                words.append(value)
            continue
        field, parsed = _operand(operator, value, term)
        if negated:
            excluded.append(_query({field: (parsed,) if field == "checks" else parsed}))
        elif field == "checks":
            checks.append(parsed)
        elif field in fields:
            raise ValueError(f"{operator}: given twice ({term!r})")
        else:
            fields[field] = parsed
    fields.update(words=tuple(words), checks=tuple(checks), exclude=tuple(excluded))
    return _query(fields)


def _query(fields: dict[str, Any]) -> Query:
    """A Query of these fields (named after its dataclass fields)."""
    return dataclasses.replace(Query(), **fields)


def _terms(text: str) -> list[tuple[bool, str | None, str, str]]:
    """The terms of ``text``: (negated, operator or None, value, the term as written)."""
    found: list[tuple[bool, str | None, str, str]] = []
    i, end = 0, len(text)
    while i < end:
        if text[i].isspace():
            i += 1
            continue
        start = i
        negated = text[i] == "-" and i + 1 < end and not text[i + 1].isspace()
        if negated:
            i += 1
        operator: str | None = None
        j = i
        while j < end and (text[j].isalnum() or text[j] == "_"):
            j += 1
        if j < end and text[j] == ":" and j > i:
            operator = text[i:j].lower()
            i = j + 1
        if i < end and text[i] == '"':
            close = text.find('"', i + 1)
            if close < 0:
                raise ValueError(f"unterminated quote in {text[start:]!r}")
            value = text[i + 1 : close]
            i = close + 1
            if i < end and not text[i].isspace():
                raise ValueError(f"a space must follow the closing quote in {text[start:]!r}")
        else:
            j = i
            while j < end and not text[j].isspace():
                j += 1
            value = text[i:j]
            i = j
        found.append((negated, operator, value, text[start:i]))
    return found


def _operand(operator: str, value: str, term: str) -> tuple[str, Any]:
    """The Query field of ``operator`` and its value parsed from ``value``."""
    field = OPERATORS.get(operator)
    if field is None:
        known = ", ".join(f"{name}:" for name in OPERATORS)
        raise ValueError(f"unknown search operator {operator + ':'!r} in {term!r} (known: {known})")
    if not value:
        raise ValueError(f"{operator}: needs a value ({term!r})")
    if operator in ("from", "to", "subject", "helo", "auth"):
        return field, value
    lowered = value.lower()
    if operator == "greeting":
        if lowered not in ("helo", "ehlo"):
            raise ValueError(f"greeting: expects helo or ehlo, not {value!r}")
        return field, lowered.upper()
    if operator == "tls":
        if lowered not in ("yes", "no"):
            raise ValueError(f"tls: expects yes or no, not {value!r}")
        return field, lowered == "yes"
    if operator == "has":
        if lowered not in ("attachment", "attachments"):
            raise ValueError(f"has: expects attachment, not {value!r}")
        return field, True
    if operator == "check":
        name, sep, result = value.partition("=")
        if not sep or not name or not result:
            raise ValueError(
                f"check: expects NAME=RESULT (check:forward_match=fail), not {value!r}"
            )
        return field, (name, result)
    return field, _moment(operator, value)


def _moment(operator: str, value: str) -> _dt.datetime:
    """An ISO date or date and time (UTC unless it says)."""
    try:
        when = _dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{operator}: expects an ISO date or time (2026-01-31, 2026-01-31T08:00Z),"
            f" not {value!r}"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=_dt.UTC)

