"""The message as data: the facts MAIL declares, and the chunks that carry it.

This module owns reading a message before and while it is sent:
:func:`scan_chunks` finds its size, whether it has 8-bit octets or UTF-8 in
its header section, the longest line, and the bare line feeds that grow by
one octet each on the wire; :func:`scan_message` does so for a message that
can be read twice; :func:`message_chunks` and :func:`with_last` cut any
:data:`Message` into the chunks DATA and BDAT send. No I/O but reading the
message itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import IO, cast

__all__ = [
    "MAX_TEXT_LINE",
    "BodyScan",
    "Message",
    "message_chunks",
    "scan_chunks",
    "scan_message",
    "with_last",
]

Message = bytes | bytearray | memoryview | IO[bytes] | Iterable[bytes] | AsyncIterable[bytes]
"""A message: bytes, a binary file (read in chunks), or an (async) iterator of chunks."""

# RFC 5321 section 4.5.3.1.6: a text line is at most 1000 octets with CRLF.
MAX_TEXT_LINE = 998


@dataclasses.dataclass(slots=True)
class BodyScan:
    """What a read of the message found."""

    size: int
    eight_bit: bool
    utf8_headers: bool
    longest_line: int
    bare_newlines: int  # LFs without CR: each grows by one octet on the wire


def _header_end(data: bytes) -> int:
    """Index of the empty line that ends the header section, or -1."""
    ends = [i for i in (data.find(b"\n\n"), data.find(b"\n\r\n")) if i >= 0]
    return min(ends) if ends else -1


def scan_chunks(chunks: Iterable[bytes]) -> BodyScan:
    """Size, 8-bit octets, UTF-8 in the header section, the longest line, bare LFs."""
    size = 0
    eight_bit = utf8_headers = False
    in_headers = True
    tail = b"\n"  # so that a message starting with an empty line has no header
    longest = 0
    bare = 0
    line = 0  # length of the line in progress
    for chunk in chunks:
        size += len(chunk)
        bare += chunk.count(b"\n") - chunk.count(b"\r\n")
        if in_headers:
            window = tail + chunk
            end = _header_end(window)
            head = window if end < 0 else window[:end]
            if not head.isascii():
                utf8_headers = True
            in_headers = end < 0
            tail = window[-2:]
        if not eight_bit and not chunk.isascii():
            eight_bit = True
        pieces = chunk.split(b"\n")
        if len(pieces) == 1:
            line += len(chunk)
        else:
            longest = max(longest, line + len(pieces[0].rstrip(b"\r")))
            if len(pieces) > 2:
                longest = max(longest, max(len(p.rstrip(b"\r")) for p in pieces[1:-1]))
            line = len(pieces[-1])
        longest = max(longest, line)
    return BodyScan(size, eight_bit, utf8_headers, longest, bare)


def _read_file(f: IO[bytes], chunk_size: int) -> Iterable[bytes]:
    while chunk := f.read(chunk_size):
        yield chunk


def scan_message(message: Message, chunk_size: int) -> BodyScan | None:
    """Size and content facts of a message that can be read twice; None otherwise."""
    if isinstance(message, bytes | bytearray | memoryview):
        data = bytes(message) if not isinstance(message, bytes) else message
        return scan_chunks(
            data[i : i + chunk_size] for i in range(0, max(len(data), 1), chunk_size)
        )
    read = getattr(message, "read", None)
    if read is None:
        return None
    f = cast(IO[bytes], message)
    try:
        if not f.seekable():
            return None
        start = f.tell()
    except (OSError, ValueError):
        return None
    try:
        return scan_chunks(_read_file(f, chunk_size))
    finally:
        f.seek(start)


async def message_chunks(message: Message, chunk_size: int) -> AsyncIterator[bytes]:
    """The message in chunks of at most ``chunk_size`` octets."""
    if isinstance(message, bytes | bytearray | memoryview):
        view = memoryview(message)
        for i in range(0, len(view), chunk_size):
            yield bytes(view[i : i + chunk_size])
        return
    if hasattr(message, "read"):
        f = cast(IO[bytes], message)
        while chunk := f.read(chunk_size):
            yield chunk
        return
    # Pieces of an iterator are gathered into chunks of chunk_size (so that a
    # small header piece does not cost a BDAT of its own) and split when larger.
    buf = bytearray()
    if isinstance(message, AsyncIterable):
        async for piece in message:
            buf += piece
            while len(buf) >= chunk_size:
                yield bytes(buf[:chunk_size])
                del buf[:chunk_size]
    else:
        for piece in message:
            buf += piece
            while len(buf) >= chunk_size:
                yield bytes(buf[:chunk_size])
                del buf[:chunk_size]
    if buf:
        yield bytes(buf)


async def with_last(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[bytes, bool]]:
    """Each chunk with a flag telling whether it is the last (an empty message: one b"")."""
    previous: bytes | None = None
    async for chunk in chunks:
        if not chunk:
            continue
        if previous is not None:
            yield previous, False
        previous = chunk
    yield (previous if previous is not None else b""), True
