"""A message body as it arrives, for the writers that keep small bodies in memory.

``SpoolingWriter`` is the part the SQLite and PostgreSQL writers share on
the per-byte path: the bytes gathered in memory up to ``CHUNK_SIZE`` (one
chunk row: most mail), beyond that written on to a body file in pieces of
at least ``FILE_WRITE_SIZE``; the header section sniffed for the subject,
the file's bytes for an attachment. Each store says where the body file is
(``_open_spool``) and what becomes of it at commit and abort.
"""

from __future__ import annotations

import abc
import os

from ._query import AttachmentSniffer, has_attachment
from .base import Envelope, HeaderSniffer, MessageWriter, StoreError

# Body bytes gathered in memory; a larger body goes to a file of its own.
CHUNK_SIZE = 256 * 1024
# A body file is written in pieces of at least this size (or a network read).
FILE_WRITE_SIZE = 64 * 1024


class SpoolingWriter(MessageWriter):
    """A message body in memory up to one chunk, then in a body file."""

    __slots__ = ("_attach", "_buffer", "_envelope", "_fd", "_head", "_size", "_state")

    def __init__(self, envelope: Envelope) -> None:
        self._envelope = envelope
        self._buffer = bytearray()
        self._head = HeaderSniffer()
        self._size = 0
        self._fd: int | None = None  # the body file, once the body outgrew CHUNK_SIZE
        # Looks for an attachment in what goes to the body file (a body of
        # one chunk is looked at once, at commit).
        self._attach: AttachmentSniffer | None = None
        self._state = "open"  # "open", then "done" once committed or aborted

    @abc.abstractmethod
    def _open_spool(self) -> int:
        """Open the body file for writing (the store's place for it); its descriptor."""

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    def write(self, data: bytes) -> None:
        if self._state != "open":
            raise RuntimeError(f"message {self._envelope.queue_id} is no longer open")
        if not data:
            return
        self._size += len(data)
        head = self._head
        if not head.done:
            head.feed(data)
        buffer = self._buffer
        if self._fd is not None:
            if not buffer and len(data) >= FILE_WRITE_SIZE:
                self._append(data)  # a network read or more: no copy on the way
                return
            buffer += data
            if len(buffer) >= FILE_WRITE_SIZE:
                self._append(buffer)
                buffer.clear()
            return
        if len(buffer) + len(data) <= CHUNK_SIZE:
            buffer += data  # the common case: network-sized pieces
            return
        self._spill()
        self._append(data)

    def _spill(self) -> None:
        """The body outgrew one chunk: continue it in a file of its own."""
        try:
            self._fd = self._open_spool()
        except OSError as exc:
            raise StoreError(f"message {self._envelope.queue_id}: body file: {exc}") from exc
        buffer, self._buffer = self._buffer, bytearray()
        self._append(buffer)

    def _append(self, data: bytes | bytearray) -> None:
        """Write to the body file (the page cache: the store syncs it when it commits)."""
        fd = self._fd
        assert fd is not None
        if self._attach is None:
            self._attach = AttachmentSniffer()
        self._attach.feed(data)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            raise StoreError(f"message {self._envelope.queue_id}: body file: {exc}") from exc

    def _flush(self) -> None:
        """At commit, a spooled body: what is still in memory onto the file."""
        if self._buffer:
            self._append(self._buffer)
            self._buffer = bytearray()

    def _attachments(self, body: bytes | bytearray | None) -> bool:
        """Whether a part is an attachment: the file's sniffer, or the body of one chunk."""
        if self._attach is not None:
            return self._attach.found
        return body is not None and has_attachment(body, self._head.head)
