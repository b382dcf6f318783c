"""(skeleton) The search language of ``q=``: parsed into a storage Query."""

from __future__ import annotations

from ..storage import Query

__all__ = ["parse_query"]


def parse_query(text: str) -> Query:
    """``text`` as a Query; ValueError with a one-line reason when it is not valid."""
    fields: dict[str, str] = {}
    for word in text.split():
        key, sep, value = word.partition(":")
        if not sep or key not in ("from", "to", "subject"):
            raise ValueError(f"unknown search term {word!r}")
        fields[{"from": "mail_from", "to": "rcpt_to", "subject": "subject"}[key]] = value
    return Query(**fields)  # type: ignore[arg-type]
