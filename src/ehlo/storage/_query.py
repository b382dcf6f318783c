"""What ``messages list`` and ``messages delete`` select: filters and paging.

This module owns :class:`Query` (filters on sender, recipients, subject,
time, greeting verb and name, greeting check results, TLS, the
authenticated user, attachments and words of the subject or body; negated
sub-queries; paging by message id; a limit), its meaning for one message
(:meth:`Query.matches`, what the Maildir store applies while it scans its
envelopes), the searchable text of a body (:func:`body_text`), the test
for an attachment at write time (:class:`AttachmentSniffer`) and
:class:`Retention` (how many messages, and how old, a store keeps while
serving). The SQLite store turns a query into SQL over its ``search``
table (:mod:`ehlo.storage.sqlite`), with the same meaning; words of the
body are tested in Python by both stores, on :func:`body_text`.

Text filters are substrings, case-insensitive (``str.casefold``); the
authenticated user is matched whole, case-insensitive; ``since`` is
inclusive and ``until`` exclusive. A message passes a query when it passes
every filter and none of the ``exclude`` sub-queries. Order is newest first:
``before=ID`` selects the messages listed after ``ID`` (older),
``after=ID`` those listed before it (newer).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import email
import email.policy
import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import StoredMessage

__all__ = ["AttachmentSniffer", "Query", "Retention", "body_text", "has_attachment"]


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
    helo: str | None = None  # substring of the greeting name
    attachments: bool | None = None  # has an attachment, or not (see has_attachment)
    words: tuple[str, ...] = ()  # each a substring of the subject or of the body text
    exclude: tuple[Query, ...] = ()  # a message matching any of these is left out

    @property
    def filtered(self) -> bool:
        """True when some filter other than paging and the limit is set."""
        return any(
            value is not None and value != ()
            for value in (
                self.helo,
                self.attachments,
                self.words,
                self.exclude,
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

    @property
    def needs_body(self) -> bool:
        """True when :meth:`matches` may read the body (words, here or excluded)."""
        return bool(self.words) or any(sub.needs_body for sub in self.exclude)

    @property
    def plain_words(self) -> bool:
        """True when the body is needed only for words: those of this query and
        of excluded sub-queries that are words alone (what ``q=`` makes)."""
        return all(
            not sub.needs_body or sub == Query(words=sub.words) for sub in self.exclude
        )

    def words_match(self, subject: str, body: Callable[[], str]) -> bool:
        """The words' part of :meth:`matches` alone (for a query with
        :attr:`plain_words`): ``subject`` case-folded, ``body`` as there."""
        text: list[str] = []

        def found(word: str) -> bool:
            needle = _fold(word)
            if needle in subject:
                return True
            if not text:
                text.append(body())
            return needle in text[0]

        if not all(found(word) for word in self.words):
            return False
        return not any(
            sub.words and all(found(word) for word in sub.words) for sub in self.exclude
        )

    def matches(self, message: StoredMessage, body: Callable[[], str] | None = None) -> bool:
        """Whether ``message`` passes the filters (paging and the limit aside).

        ``body``: gives the message's :func:`body_text`, called only when a
        word is not in the subject (without it, such a word does not match).
        """
        if not self._matches(message, body):
            return False
        return not any(sub.matches(message, body) for sub in self.exclude)

    def _matches(self, message: StoredMessage, body: Callable[[], str] | None) -> bool:
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
        if self.helo is not None and _fold(self.helo) not in _fold(env.greeting_name):
            return False
        if self.attachments is not None and bool(message.attachments) != self.attachments:
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
        if self.words:
            subject = _fold(message.subject or "")
            text: str | None = None
            for word in self.words:
                needle = _fold(word)
                if needle in subject:
                    continue
                if text is None:
                    text = body() if body is not None else ""
                if needle not in text:
                    return False
        return True


# Transfer encodings whose text only shows once decoded.
_ENCODED = re.compile(rb"(?i)content-transfer-encoding:[ \t]*(?:base64|quoted-printable)")


def body_text(data: bytes) -> str:
    """The text a word of a search is looked for in: the body, case-folded.

    The bytes after the header section, read as UTF-8; when some part is
    base64 or quoted-printable, the decoded text of the ``text/*`` parts as
    well. Never raises: broken MIME gives what could be read.
    """
    end = _body_start(data)
    encoded = _ENCODED.search(data) is not None
    if not encoded and data.isascii():
        return data[end:].lower().decode("ascii")  # what casefold gives for ASCII
    text = data[end:].decode("utf-8", "replace")
    if encoded:
        pieces = [text]
        try:
            parsed = email.message_from_bytes(data, policy=email.policy.compat32)
            for part in parsed.walk():
                if part.get_content_maintype() != "text":
                    continue
                payload = part.get_payload(decode=True)
                if isinstance(payload, bytes):
                    charset = part.get_content_charset() or "utf-8"
                    try:
                        pieces.append(payload.decode(charset, "replace"))
                    except LookupError:  # an unknown charset
                        pieces.append(payload.decode("utf-8", "replace"))
        except Exception:  # broken MIME: search what was read
            pass
        text = "\n".join(pieces)
    return _fold(text)


def _header_end(data: bytes | bytearray, start: int = 0) -> int:
    """Where the body starts (after the blank line ending the header section),
    looking from ``start``; -1 when the header section has not ended."""
    if start == 0 and data[:1] == b"\n":
        return 1  # no header section at all
    if start == 0 and data[:2] == b"\r\n":
        return 2
    crlf = data.find(b"\n\r\n", start)
    bare = data.find(b"\n\n", start, crlf + 3 if crlf >= 0 else len(data))
    if bare >= 0:
        return bare + 2
    return crlf + 3 if crlf >= 0 else -1


def _body_start(data: bytes | bytearray) -> int:
    end = _header_end(data)
    return end if end >= 0 else len(data)


# What has an attachment: the message given as one (its own Content-Disposition
# says "attachment"), or, when it is a multipart, a part whose Content-Disposition
# field (at the start of a line, folded or not) says so.
_ATTACHMENT = re.compile(rb"(?im)^content-disposition:[ \t]*(?:\r?\n[ \t]+)?attachment\b")
_MULTIPART = re.compile(rb"(?im)^content-type:[ \t]*(?:\r?\n[ \t]+)?multipart/")
# What every such field holds, looked for first (a plain search, no regex).
_MARKERS = (b"ttachment", b"TTACHMENT")
_MULTIPART_MARKERS = (b"ultipart", b"ULTIPART")
# Bytes of one piece kept to find a field split between two writes.
_OVERLAP = 64
# A header section is looked at up to this many octets.
_HEAD_LIMIT = 64 * 1024


def _field(pattern: re.Pattern[bytes], markers: tuple[bytes, ...], data: bytes) -> bool:
    if not any(marker in data for marker in markers):
        return False
    return pattern.search(data) is not None


def has_attachment(data: bytes | bytearray, head: bytes | None = None) -> bool:
    """Whether the message ``data`` is, or (a multipart) has a part given as, an attachment.

    Only the header section is searched unless it says multipart: a plain
    message (most mail) costs a look at its header fields. ``head``: the
    header section when the caller has it already (a writer's
    :class:`~ehlo.storage.base.HeaderSniffer`), ``data`` starting with it.
    """
    if head is None:
        end = _header_end(data[:_HEAD_LIMIT])
        end = end if end >= 0 else min(len(data), _HEAD_LIMIT)
        head = bytes(data[:end])
    else:
        end = len(head)
    # Plain searches first (this runs for every message stored).
    if (b"ttachment" in head or b"TTACHMENT" in head) and _ATTACHMENT.search(head):
        return True
    if not (b"ultipart" in head or b"ULTIPART" in head) or not _MULTIPART.search(head):
        return False
    return _field(_ATTACHMENT, _MARKERS, bytes(data[end:]))


class AttachmentSniffer:
    """:func:`has_attachment` over a message given in pieces (what a writer sees).

    Keeps the header section until it ends; then, for a multipart only, one
    plain search of each piece for the word (the regular expression runs
    only where it is).
    """

    __slots__ = ("_head", "_scan", "_tail", "found")

    def __init__(self) -> None:
        self._head = bytearray()
        self._scan: bool | None = None  # None: in the header section; False: nothing more
        self._tail: bytes | None = None  # the end of the body fed (None: none yet)
        self.found = False

    def feed(self, data: bytes | bytearray) -> None:
        """Look at the next bytes of the message."""
        if self.found or self._scan is False or not data:
            return
        if self._scan is None:
            head = self._head
            start = max(0, len(head) - 3)
            head += data
            end = _header_end(head, start)
            if end < 0:
                if len(head) < _HEAD_LIMIT:
                    return
                end = len(head)
            section, data = bytes(head[:end]), bytes(head[end:])
            self._head = bytearray()
            if _field(_ATTACHMENT, _MARKERS, section):
                self.found = True
                return
            self._scan = _field(_MULTIPART, _MULTIPART_MARKERS, section)
            if not self._scan or not data:
                return
        tail = self._tail or b""
        edge = tail + bytes(data[:_OVERLAP])
        if any(marker in data or marker in edge for marker in _MARKERS):
            for match in _ATTACHMENT.finditer(tail + bytes(data)):
                # "^" at the start of a kept tail is not the start of a line.
                if match.start() > 0 or self._tail is None:
                    self.found = True
                    break
        self._tail = (tail + bytes(data[-_OVERLAP:]))[-_OVERLAP:]


@dataclasses.dataclass(frozen=True, slots=True)
class Retention:
    """What a store keeps while serving: 0 means no limit."""

    keep_messages: int = 0  # the newest this many messages
    keep_days: float = 0.0  # messages received in the last this many days

    @property
    def active(self) -> bool:
        return self.keep_messages > 0 or self.keep_days > 0
