"""The transcript of one SMTP session: every line of the dialogue, timed from connect.

The protocol core tells a :class:`Transcript` each command line (``C``),
each reply it queues (``S``, the rendered bytes, split into lines only when
rendered) and the events it stands in for (``*``: message data elided, an
AUTH secret elided); the transport adds connect, TLS started and close.
Recording is one tuple appended per line; rendering to JSON text happens
once, when a message is stored or the session ends.

Three bounded lists are kept: the session's (for the session log), its
prologue (the lines outside any transaction: banner, greeting, STARTTLS,
AUTH) and the current transaction's (from MAIL). A stored message carries
the prologue and its own transaction, not the session's earlier ones. Each
list stops at :data:`MAX_LINES` lines or :data:`MAX_BYTES` octets with a
``transcript truncated`` event, so a client cannot make it grow.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

# A list of lines stops growing at this many lines or octets of text.
MAX_LINES = 500
MAX_BYTES = 64 * 1024
# The prologue is the lines outside transactions; its own bound.
MAX_PROLOGUE_LINES = 100
_TRUNCATED = "transcript truncated"
# Client lines (their first four letters) that end a transaction's lines.
_SESSION_VERBS = frozenset({"EHLO", "HELO", "STAR", "AUTH"})
_monotonic = time.monotonic

# A line as recorded: seconds since connect, "C" / "S" / "*", the text (or
# a rendered reply, bytes, which may hold several lines).
Line = tuple[float, str, "str | bytes"]

# A JSON string literal of a text (C-accelerated; UTF-8 kept).
_escape: Callable[[str], str] = json.encoder.encode_basestring


class _Part:
    """One bounded list of lines."""

    __slots__ = ("full", "lines", "max_lines", "size")

    def __init__(self, max_lines: int) -> None:
        self.lines: list[Line] = []
        self.size = 0
        self.full = False
        self.max_lines = max_lines

    def add(self, line: Line) -> None:
        if self.full:
            return
        self.size += len(line[2])
        if len(self.lines) >= self.max_lines or self.size > MAX_BYTES:
            self.full = True
            self.lines.append((line[0], "*", _TRUNCATED))
            return
        self.lines.append(line)


class Transcript:
    """The recorder of one session (see the module docstring)."""

    __slots__ = ("_prologue_json", "_start", "last_reply", "prologue", "session", "tx")

    def __init__(self, start: float) -> None:
        self._start = start  # time.monotonic() at connect
        self.session = _Part(MAX_LINES)
        self.prologue = _Part(MAX_PROLOGUE_LINES)
        self.tx: _Part | None = None  # the current transaction's lines, from its MAIL
        self.last_reply: bytes | str | None = None
        self._prologue_json: str | None = None  # the prologue rendered, while it holds

    def record(self, direction: str, text: str | bytes) -> None:
        """One line (the protocol core's :data:`~ehlo.protocol._server.Recorder`)."""
        line = (_monotonic() - self._start, direction, text)
        session = self.session
        if not session.full:
            session.add(line)
        if direction == "C":
            verb = text[:4].upper()
            if verb == "MAIL":
                self.tx = _Part(MAX_LINES - MAX_PROLOGUE_LINES)
            elif verb in _SESSION_VERBS:
                self.tx = None  # outside transactions again
        elif direction == "S":
            self.last_reply = text
        tx = self.tx
        if tx is not None:
            if not tx.full:
                tx.add(line)
        elif not self.prologue.full:
            self.prologue.add(line)
            self._prologue_json = None

    def event(self, text: str, *, session_level: bool = False) -> None:
        """An event of the transport (connect, TLS started, close)."""
        if session_level:
            self.tx = None
        self.record("*", text)

    def message_json(self) -> str:
        """The prologue and the current transaction, as the JSON text a message keeps."""
        prologue = self._prologue_json
        if prologue is None:
            prologue = self._prologue_json = _render(self.prologue.lines)
        tx = _render(self.tx.lines) if self.tx is not None else ""
        if not prologue or not tx:
            return f"[{prologue or tx}]"
        return f"[{prologue},{tx}]"

    def session_lines(self) -> list[list[Any]]:
        """The session's lines as JSON-ready ``[t, dir, text]`` lists."""
        return _lines(self.session.lines)

    def outcome(self) -> str:
        """The last reply line sent, or ``closed`` when none was."""
        reply = self.last_reply
        if not reply:
            return "closed"
        if isinstance(reply, bytes):
            reply = reply.decode("utf-8", "replace")
        return reply.rstrip("\r\n").rsplit("\r\n", 1)[-1]


def _lines(lines: list[Line]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for t, direction, text in lines:
        t = round(t, 3)
        if type(text) is bytes:
            # A reply: each of its lines separately.
            for part in text.decode("utf-8", "replace").split("\r\n"):
                if part:
                    out.append([t, direction, part])
        else:
            out.append([t, direction, text])
    return out


def _render(lines: list[Line]) -> str:
    """The lines as JSON array items (without the brackets), as ``_lines`` gives them.

    Written by hand (each text escaped by the json module's C encoder):
    this runs for every message stored.
    """
    out: list[str] = []
    append = out.append
    for t, direction, text in lines:
        stamp = f'[{t:.3f},"{direction}",'
        if isinstance(text, bytes):
            reply = text.decode("utf-8", "replace")
            if reply.count("\r\n") == 1:
                if len(reply) > 2:
                    append(stamp + _escape(reply[:-2]) + "]")
                continue
            for part in reply.split("\r\n"):
                if part:
                    append(stamp + _escape(part) + "]")
        else:
            append(stamp + _escape(text) + "]")
    return ",".join(out)
