"""The framing between a store and a writer in another process.

This module owns the bytes on the socket between a store
(:class:`~ehlo.storage._sqlite_process.WriterProcess`) and its writer: a
child process (socket pair) or the hub that ``ehlo serve --workers N``
shares (Unix socket). Both ends are this package; nobody else holds the
sockets.

A frame is a 4-octet big-endian length and a pickle (protocol 5) of a tuple.
A commit's body of at most one chunk follows its frame raw (never pickled,
so it is not copied into one), its length in the frame. The messages:

store to writer
    ``("commit", row, ref, spool, body_length)`` then ``body_length``
    octets: one whole message (``ref`` numbers it for the answer);
    ``("session", row, keep)``: an ended session for the session log (no
    answer), the newest ``keep`` kept;
    ``("spool", name)``: the store's spool folder, which the hub removes if
    the connection ends without a stop (its worker died);
    ``("stop",)``: answer what came before, then close.
writer to store
    ``("ready", owner)`` or ``("failed", reason)``, once at the start;
    ``("done", [(ref, queue_id, error), ...], done_bytes, commits,
    messages)`` after each batch's ``COMMIT`` (``queue_id`` or ``error`` is
    None; ``done_bytes`` counts this connection's body octets executed);
    ``("stopped",)`` after the stop.

The end of the stream reads as a stop: a writer executes what it has read
whole and drops a message cut short.
"""

from __future__ import annotations

import pickle
import socket
import struct
from collections.abc import Sequence
from typing import Any

__all__ = [
    "HEADER",
    "STOP",
    "BlockingReader",
    "Frames",
    "Message",
    "StreamReader",
    "commit",
    "done",
    "encode",
    "frame",
]

HEADER = struct.Struct(">I")
# Octets a reader takes from its socket at once.
READ_SIZE = 256 * 1024

Message = tuple[Any, ...]
# A message read with the body that followed it (commits only).
Received = tuple[Message, bytearray | None]
STOP: Message = ("stop",)


def frame(message: Message) -> list[bytes]:
    """The frame of ``message``: its length and its pickle."""
    payload = pickle.dumps(message, protocol=5)
    return [HEADER.pack(len(payload)), payload]


def encode(message: Message) -> bytes:
    return b"".join(frame(message))


def commit(row: tuple[Any, ...], ref: Any, spool: str | None, body_length: int) -> list[bytes]:
    """The frame announcing a message; its body (if any) goes right behind it."""
    return frame(("commit", row, ref, spool, body_length))


def done(
    answers: Sequence[tuple[Any, str | None, str | None]],
    done_bytes: int,
    commits: int,
    messages: int,
) -> bytes:
    """The answer after a batch: each commit's (ref, queue id, error), then the counters."""
    return encode(("done", answers, done_bytes, commits, messages))


class Frames:
    """Splits a byte stream into decoded messages (the store's side: no bodies)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> Message | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        (size,) = HEADER.unpack_from(buf)
        if len(buf) < 4 + size:
            return None
        message: Message = pickle.loads(memoryview(buf)[4 : 4 + size])
        del buf[: 4 + size]
        return message


class BlockingReader:
    """Messages with their bodies from a blocking socket (a child writer's end).

    Small frames are parsed from one read buffer (a batch of them costs one
    ``recv``); a body longer than what is buffered is read straight into a
    buffer of its size, so no body is moved around inside a bigger one.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closed = False
        self._buf = bytearray()
        self._pos = 0
        # Reads land here first: recv() would allocate (mmap) and shrink a
        # 256 KiB buffer for every read, three system calls and fresh pages.
        self._scratch = memoryview(bytearray(READ_SIZE))

    def _fill(self, block: bool) -> bool:
        """Read what waits (waiting for something if ``block``); False if nothing came."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        try:
            n = self.sock.recv_into(self._scratch, READ_SIZE, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            n = 0
        if not n:
            self.closed = True
            return False
        self._buf += self._scratch[:n]
        return True

    def _take(self, size: int) -> bytearray | None:
        """The next ``size`` octets, waiting for them (None at the socket's end)."""
        while len(self._buf) - self._pos < size and size - (len(self._buf) - self._pos) < 65536:
            if not self._fill(block=True):
                return None
        start = self._pos
        have = min(size, len(self._buf) - start)
        out = bytearray(size)
        out[:have] = memoryview(self._buf)[start : start + have]
        self._pos = start + have
        view = memoryview(out)
        got = have
        while got < size:  # a big body: the rest straight from the socket
            try:
                n = self.sock.recv_into(view[got:], size - got, socket.MSG_WAITALL)
            except OSError:
                n = 0
            if n == 0:
                self.closed = True
                return None
            got += n
        return out

    def read(self, block: bool) -> Received | None:
        """The next message and its body; None if nothing waits (only when not ``block``).

        At the socket's end (or a message cut short by it): :data:`STOP`.
        """
        if len(self._buf) - self._pos < HEADER.size:
            if self.closed:
                return STOP, None
            if not self._fill(block) and not block:
                return (STOP, None) if self.closed else None
        header = self._take(HEADER.size)
        if header is None:
            return STOP, None
        (size,) = HEADER.unpack(header)
        payload = self._take(size)
        if payload is None:
            return STOP, None
        message: Message = pickle.loads(payload)
        if message[0] != "commit" or not message[4]:
            return message, None
        body = self._take(message[4])  # its body follows, raw
        if body is None:
            return STOP, None
        return message, body

    def send(self, data: bytes) -> None:
        if not self.closed:
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True


class StreamReader:
    """Messages with their bodies from a non-blocking socket (one of the hub's links).

    A body longer than what one read brought is read straight into a buffer
    of its size by the following reads.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._body: tuple[Message, bytearray, int] | None = None  # a body being read

    def receive(self, sock: socket.socket, scratch: memoryview) -> list[Received] | None:
        """Read once: the messages completed (maybe none), or None at the socket's end."""
        try:
            if self._body is not None:
                message, data, got = self._body
                n = sock.recv_into(memoryview(data)[got:])
                if n:
                    got += n
                    if got == len(data):
                        self._body = None
                        return [(message, data)]
                    self._body = (message, data, got)
                    return []
            else:
                n = sock.recv_into(scratch, len(scratch))
                if n:
                    self._buf += scratch[:n]
                    return self._parse()
        except BlockingIOError:
            return []
        except OSError:
            pass
        return None

    def _parse(self) -> list[Received]:
        buf = self._buf
        pos = 0
        out: list[Received] = []
        while len(buf) - pos >= HEADER.size:
            (size,) = HEADER.unpack_from(buf, pos)
            if len(buf) - pos - HEADER.size < size:
                break
            start = pos + HEADER.size
            message: Message = pickle.loads(memoryview(buf)[start : start + size])
            pos = start + size
            length = message[4] if message[0] == "commit" else 0
            if not length:
                out.append((message, None))
                continue
            body = bytearray(length)
            have = min(length, len(buf) - pos)
            body[:have] = memoryview(buf)[pos : pos + have]
            pos += have
            if have < length:
                self._body = (message, body, have)
                break  # the rest of the buffer was all body
            out.append((message, body))
        del buf[:pos]
        return out
