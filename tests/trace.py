"""Splitting the trace headers ehlo prepends from the message the client sent.

ehlo stores every message as a Received header, then (when greeting checks
ran) an Authentication-Results header, then exactly the client's bytes.
"""

from __future__ import annotations

TRACE_NAMES = (b"Received: ", b"Authentication-Results: ")


def split_trace(raw: bytes) -> tuple[list[bytes], bytes]:
    """The prepended header fields (each unfolded lines joined by CRLF) and the message.

    The first field must be our Received header; an Authentication-Results
    field may follow it. Continuation lines start with a tab.
    """
    assert raw.startswith(b"Received: "), raw[:80]
    fields: list[bytes] = []
    pos = 0
    while raw.startswith(TRACE_NAMES, pos) and len(fields) < 2:
        start = pos
        while True:
            pos = raw.index(b"\r\n", pos) + 2
            if raw[pos : pos + 1] != b"\t":
                break
        fields.append(raw[start : pos - 2])
        if not fields[-1].startswith(b"Received: ") or not raw.startswith(TRACE_NAMES[1], pos):
            break
    return fields, raw[pos:]


def message_of(raw: bytes) -> bytes:
    """The client's bytes: ``raw`` without the prepended trace headers."""
    return split_trace(raw)[1]
