"""The seam between a database store and the writer that performs its writes.

A store (:class:`~ehlo.storage.sqlite.SQLiteStore` today) streams bodies in
the event loop and, at commit, hands the writer the whole message: its row
(the ``messages`` columns, in order), its body when it fits in one chunk,
or the spool folder its body file was written to. It talks to the writer
only through :class:`WriterBackend`, which each host of the writer
implements: a thread of this process (:mod:`ehlo.storage._sqlite_thread`),
a child process (:mod:`ehlo.storage._sqlite_process`), or the hub that the
workers of ``ehlo serve --workers N`` share (the same store-side class,
connected to :mod:`ehlo.storage._sqlite_hub`).

What a backend must provide (a PostgreSQL writer follows the same seam):

- ``start()``: open the database and recover what dead owners left behind;
  raise :class:`~ehlo.storage.base.StoreError` (one line) if it cannot.
- ``put(row, body, spool)``: queue one whole message and return a future
  settled with its queue id only after the transaction that holds it is
  durable (a 250 follows from it), or with a ``StoreError``. It never
  blocks the event loop; a message is stored whole or not at all; several
  messages queued together share one commit (group commit); an id already
  stored fails that message alone.
- ``pending_bytes`` and ``drained(low)``: body octets queued and not yet
  executed, and a future settled once they are at most ``low`` (the
  network layer's backpressure; settled at once when the writer is gone,
  so nobody waits forever).
- ``broken``: None, or why no message can be written any more (the writer
  died); waiting and later commits then fail with a ``StoreError``.
- ``log(row, keep)``: queue one ended session for the session log (no
  answer, never blocking); the writer keeps the newest ``keep``.
- ``owner``: the writer's owner token (its lock file's name).
- ``stop()``: execute everything queued, then let go of the database.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

__all__ = ["WriterBackend"]


class WriterBackend(Protocol):
    """What a store needs of its writer, wherever that runs."""

    @property
    def owner(self) -> str:
        """The writer's owner token, once started."""
        ...

    @property
    def broken(self) -> str | None:
        """Why new messages cannot be written, or None."""
        ...

    @property
    def pending_bytes(self) -> int:
        """Body octets queued for the writer and not yet executed."""
        ...

    async def start(self) -> None:
        """Open the database; raise StoreError if it cannot be used."""
        ...

    def put(
        self, row: tuple[Any, ...], body: bytes | bytearray | None, spool: str | None
    ) -> asyncio.Future[str]:
        """Queue a whole message; its future is settled once it is durable (or failed)."""
        ...

    def log(self, row: tuple[Any, ...], keep: int) -> None:
        """Queue an ended session's row for the session log (fire and forget)."""
        ...

    def drained(self, low: int) -> asyncio.Future[None]:
        """A future settled once the backlog is at most ``low`` octets."""
        ...

    async def stop(self) -> None:
        """Execute everything queued, then close."""
        ...
