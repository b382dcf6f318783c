"""The SQLite store's writer in a thread of the server's process.

This module owns :class:`ThreadWriter`, the :class:`~ehlo.storage._backend.
WriterBackend` for ``sqlite_writer = "thread"``: a thread runs a
:class:`~ehlo.storage._batch.BatchWriter` over a queue of commits, settles
each batch's commit futures on their event loop after its ``COMMIT``, and
the backpressure waiters after the batch that brings the backlog down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import sqlite3
import threading
from pathlib import Path
from typing import Any

from ._batch import BatchWriter, Commit, LoggedSession, Outcome
from .base import StoreError, StoreStats

__all__ = ["ThreadWriter"]

# How a commit is answered: the future, and the loop it belongs to.
_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[str]"]


def _resolve(items: list[tuple[asyncio.Future[str], Outcome]]) -> None:
    """Runs on the event loop: settle the commit futures of one batch."""
    for future, outcome in items:
        if future.done():
            continue  # the session was cancelled meanwhile
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _settle_drained(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ThreadWriter:
    """A :class:`BatchWriter` run by a thread of this process."""

    def __init__(self, path: Path, stats: StoreStats, shared: bool) -> None:
        self.path = path
        self.writer = BatchWriter(path, shared=shared, stats=stats)
        self.broken: str | None = None
        # Body bytes queued (by the event loop) / executed (by the thread).
        self.queued_bytes = 0
        # The thread's operations: commits, logged sessions, and None to stop.
        self._ops: queue.SimpleQueue[Commit[_Waiter] | LoggedSession | None] = (
            queue.SimpleQueue()
        )
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, name=f"ehlo-sqlite-{path.name}", daemon=True
        )
        # Futures waiting for the backlog to drop to a level: (low, loop, future).
        self._drain_lock = threading.Lock()
        self._drain_waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def owner(self) -> str:
        return self.writer.owner

    @property
    def pending_bytes(self) -> int:
        """Body bytes queued but not yet executed."""
        return self.queued_bytes - self.writer.done_bytes

    async def start(self) -> None:
        self._thread.start()
        try:
            await asyncio.wrap_future(self._ready)
        except (sqlite3.Error, OSError, StoreError) as exc:
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc

    async def stop(self) -> None:
        """Execute everything queued, close the connection, let go of the owner lock."""
        self._ops.put(None)
        await asyncio.to_thread(self._thread.join)

    def put(
        self, row: tuple[Any, ...], body: bytes | bytearray | None, spool: str | None
    ) -> asyncio.Future[str]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        if body is not None:
            self.queued_bytes += len(body)
        self._ops.put(Commit(row, body, spool, (loop, future)))
        return future

    def log(self, row: tuple[Any, ...], keep: int) -> None:
        if self.broken is None:
            self._ops.put(LoggedSession(row, keep))

    def drained(self, low: int) -> asyncio.Future[None]:
        """A future settled (on the caller's loop) once the backlog is at most ``low``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._drain_lock:
            if self.pending_bytes <= low:
                future.set_result(None)
            else:
                self._drain_waiters.append((low, loop, future))
        return future

    # --- in the thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.writer.open()
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            self.writer.serve(self._ops, self._settle)
        finally:
            self.writer.close()

    def _settle(self, outcomes: list[tuple[Commit[_Waiter], Outcome]]) -> None:
        """After a batch: settle its commit futures, then the drained waiters."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[str], Outcome]]] = {}
        for op, outcome in outcomes:
            loop, future = op.tag
            by_loop.setdefault(loop, []).append((future, outcome))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits
                loop.call_soon_threadsafe(_resolve, items)
        self._wake_drained()

    def _wake_drained(self) -> None:
        """Settle the waiters whose level the backlog has reached."""
        if not self._drain_waiters:
            return
        with self._drain_lock:
            pending = self.pending_bytes
            ready = [w for w in self._drain_waiters if pending <= w[0]]
            self._drain_waiters = [w for w in self._drain_waiters if pending > w[0]]
        for _, loop, future in ready:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits
                loop.call_soon_threadsafe(_settle_drained, future)
