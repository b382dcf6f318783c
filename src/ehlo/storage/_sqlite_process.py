"""The SQLite store's writer in a process of its own.

In the server's process, the writer thread and the event loop share one GIL:
every statement the writer runs gives the GIL up while SQLite works and must
take it back from a loop that may be busy for a whole switch interval (5 ms).
A batch of nine 4 KiB messages takes 0.1 ms of SQLite alone and 5 to 30 ms
beside a busy loop, and every session waiting for its 250 waits that long.
So ``SQLiteStore`` (``writer="process"``, the default) runs the very same
:class:`~ehlo.storage._batch.BatchWriter` in a child process, and talks to
it over a socket pair (the frames of :mod:`ehlo.storage._wire`):

- the store sends each message as it is committed (its row, then its body of
  at most one chunk, raw, unless the body is a file) and at the end a stop;
- after each batch the child answers with the outcome of every commit in it
  (the queue id, or why it failed), the body octets executed so far (the
  store's backpressure) and its counters.

A commit's future is settled only from that answer, which the child sends
after ``COMMIT`` returned: a 250 still means the message is on disk.

This module owns both ends: :class:`WriterProcess`, the store's
:class:`~ehlo.storage._backend.WriterBackend` (a child of its own, or a
connection to the hub of :mod:`ehlo.storage._sqlite_hub` that
:func:`start_hub` starts for ``ehlo serve --workers N``), and the child's
main function. ``python -m ehlo.storage._sqlite_process`` runs the child,
with ``--hub`` the hub.

The child ignores SIGINT, SIGTERM and SIGHUP (a terminal's Ctrl-C reaches the
whole process group): it stops when the store says so or when the socket
closes (its parent is gone), after executing everything it has read.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from . import _wire
from ._batch import BatchWriter, Commit, LoggedSession, Op, Outcome
from .base import StoreError, StoreStats

__all__ = ["WriterProcess", "child_main", "start_hub"]

# How long the child may take to open (or create) the database.
_START_TIMEOUT = 60.0


def _child_env() -> dict[str, str]:
    """The environment of a writer process: it imports this package from where we did."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


# --- the child ------------------------------------------------------------------------


class _Channel:
    """The child's end: commits in (an op source for the batch writer), answers out."""

    def __init__(self, sock: socket.socket) -> None:
        self.reader = _wire.BlockingReader(sock)

    def _op(self, received: _wire.Received) -> Op[int] | None:
        message, body = received
        if message[0] == "session":
            return LoggedSession(message[1], message[2])
        if message[0] != "commit":
            return None  # stop (or the socket's end)
        # The reference travels where the thread keeps its future.
        return Commit(message[1], body, message[3], message[2])

    def get(self) -> Op[int] | None:
        received = self.reader.read(block=True)
        assert received is not None
        return self._op(received)  # None at the socket's end: finish what was read, then stop

    def get_nowait(self) -> Op[int] | None:
        received = self.reader.read(block=False)
        if received is None:
            raise queue.Empty
        return self._op(received)

    def send(self, message: _wire.Message) -> None:
        self.reader.send(_wire.encode(message))


def child_main(argv: list[str]) -> int:
    """``python -m ehlo.storage._sqlite_process DB SHARED FD``."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    path, shared, fd = Path(argv[0]), argv[1] == "1", int(argv[2])
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    channel = _Channel(sock)
    writer = BatchWriter(path, shared=shared)
    try:
        writer.open()
    except BaseException as exc:  # reported to the store, which raises StoreError
        channel.send(("failed", str(exc) or type(exc).__name__))
        return 1
    channel.send(("ready", writer.owner))

    def settle(outcomes: list[tuple[Commit[int], Outcome]]) -> None:
        answers = [
            (op.tag, None, str(out)) if isinstance(out, BaseException) else (op.tag, out, None)
            for op, out in outcomes
        ]
        channel.reader.send(
            _wire.done(answers, writer.done_bytes, writer.stats.commits, writer.stats.messages)
        )

    try:
        writer.serve(channel, settle)
    finally:
        writer.close()
    channel.send(("stopped",))
    return 0


# --- the store's side -----------------------------------------------------------------


class WriterProcess(asyncio.Protocol):
    """The store's handle on the child (or on the hub): a :class:`WriterBackend`.

    With ``address``, the writer is a hub another process started
    (:func:`start_hub`): the store connects to it instead of starting a child.
    """

    def __init__(
        self,
        path: Path,
        stats: StoreStats,
        shared: bool,
        address: str | None = None,
        spool: str | None = None,
    ) -> None:
        self.path = path
        self.stats = stats
        self.shared = shared
        self.address = address
        self.spool = spool  # the store's spool folder, which a hub removes if it dies
        self.owner = ""  # the writer's owner token, from its "ready"
        self.queued_bytes = 0
        self.done_bytes = 0
        self.broken: str | None = None
        self._frames = _wire.Frames()
        self._out: list[bytes | bytearray] = []  # frames of this turn of the loop (see _send)
        self._flush_due = False
        self._transport: asyncio.WriteTransport | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._refs = itertools.count()
        self._commits: dict[int, asyncio.Future[str]] = {}
        self._drain_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._ready: asyncio.Future[None] | None = None
        self._stopped: asyncio.Future[None] | None = None

    @property
    def pending_bytes(self) -> int:
        """Body bytes sent but not yet executed."""
        return self.queued_bytes - self.done_bytes

    async def start(self) -> None:
        try:
            await self._start()
        except (OSError, TimeoutError) as exc:
            raise StoreError(f"sqlite store {self.path}: writer process: {exc}") from exc

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._stopped = loop.create_future()
        if self.address is not None:
            # Connected here: uvloop takes no abstract (NUL-led) socket names.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.address)
            except OSError:
                sock.close()
                raise
            sock.setblocking(False)
            await loop.create_unix_connection(lambda: self, sock=sock)
            if self.spool is not None:
                self._send(_wire.frame(("spool", self.spool)))
        else:
            await self._spawn(loop)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), _START_TIMEOUT)
        except TimeoutError:
            await self._kill()
            raise StoreError(
                f"sqlite store {self.path}: the writer process did not start"
                f" within {_START_TIMEOUT:g} s"
            ) from None
        except BaseException:
            await self._kill()
            raise

    async def _spawn(self, loop: asyncio.AbstractEventLoop) -> None:
        ours, theirs = socket.socketpair()
        for sock in (ours, theirs):  # room for a few 256 KiB chunks in flight
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        env = _child_env()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", __name__, str(self.path), "1" if self.shared else "0",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )  # fmt: skip
        finally:
            theirs.close()
        await loop.create_unix_connection(lambda: self, sock=ours)

    async def stop(self) -> None:
        """Execute everything sent so far, then let the child exit."""
        if self.broken is None and self._transport is not None:
            self._send(_wire.frame(_wire.STOP))
            self._flush()
        if self._stopped is not None:
            await asyncio.shield(self._stopped)
        if self._transport is not None:
            self._transport.close()
        if self._process is not None:
            await self._process.wait()

    async def _kill(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()

    def put(
        self, row: tuple[Any, ...], body: bytes | bytearray | None, spool: str | None
    ) -> asyncio.Future[str]:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if body is not None:
            self.queued_bytes += len(body)
        if self._transport is None or self.broken is not None:
            future.set_exception(self._error())
            return future
        ref = next(self._refs)
        self._commits[ref] = future
        self._send(_wire.commit(row, ref, spool, len(body) if body else 0), body)
        return future

    def log(self, row: tuple[Any, ...], keep: int) -> None:
        if self._transport is not None and self.broken is None:
            self._send(_wire.frame(("session", row, keep)))

    def _send(self, frame: list[bytes], body: bytes | bytearray | None = None) -> None:
        """Queue a frame and its body; what one turn of the loop queues leaves in one write."""
        out = self._out
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)
        out += frame
        if body:
            out.append(body)

    def _flush(self) -> None:
        self._flush_due = False
        out, self._out = self._out, []
        if out and self._transport is not None:
            self._transport.writelines(out)

    def drained(self, low: int) -> asyncio.Future[None]:
        """A future settled once the backlog is at most ``low``."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.pending_bytes <= low or self.broken is not None:
            future.set_result(None)
        else:
            self._drain_waiters.append((low, future))
        return future

    def _error(self) -> StoreError:
        return StoreError(f"sqlite store {self.path}: {self.broken or 'writer stopped'}")

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A socket's transport writes (uvloop's is no subclass of WriteTransport).
        self._transport = cast(asyncio.WriteTransport, transport)

    def data_received(self, data: bytes) -> None:
        self._frames.feed(data)
        while (message := self._frames.next()) is not None:
            self._handle(message)

    def _handle(self, message: _wire.Message) -> None:
        kind = message[0]
        if kind == "done":
            _, answers, done_bytes, commits, messages = message
            for ref, queue_id, error in answers:
                future = self._commits.pop(ref, None)
                if future is None or future.done():
                    continue  # the session was cancelled meanwhile
                if error is not None:
                    future.set_exception(StoreError(error))
                else:
                    future.set_result(queue_id)
            self.done_bytes = done_bytes
            self.stats.commits, self.stats.messages = commits, messages
            self._wake(force=False)
        elif kind == "ready":
            self.owner = message[1]
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        elif kind == "failed":
            self.broken = message[1]
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(StoreError(f"sqlite store {self.path}: {message[1]}"))
        elif kind == "stopped" and self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._stopped is not None and self._stopped.done():
            return
        if self.broken is None:
            self.broken = "the writer process exited"
        error = self._error()
        for future in self._commits.values():
            if not future.done():
                future.set_exception(error)
        self._commits.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)
        self._wake(force=True)

    def _wake(self, *, force: bool) -> None:
        if not self._drain_waiters:
            return
        pending = self.pending_bytes
        keep = []
        for low, future in self._drain_waiters:
            if future.done():
                continue
            if force or pending <= low:
                future.set_result(None)
            else:
                keep.append((low, future))
        self._drain_waiters = keep


# --- one writer for several worker processes ---------------------------------------


def start_hub(
    path: Path,
    timeout: float = _START_TIMEOUT,
    *,
    ids: tuple[int, int, Sequence[int]] | None = None,
) -> tuple[str, socket.socket, Any]:
    """In ``ehlo serve``'s supervisor, before forking: the hub's address, control, process.

    Closing the control socket tells the hub to stop once its workers are done.
    ``ids`` (uid, gid, groups): the hub switches to them before it opens the
    database (``ehlo serve --user``, started as root).
    """
    name = f"\0ehlo-writer-{os.getpid()}-{os.urandom(6).hex()}"  # Linux abstract socket
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ours, theirs = socket.socketpair()
    try:
        listener.bind(name)
        listener.listen(64)
        process = subprocess.Popen(
            [sys.executable, "-m", __name__, "--hub", str(path),
             str(listener.fileno()), str(theirs.fileno()),
             *([f"{ids[0]}:{ids[1]}:{','.join(map(str, ids[2]))}"] if ids else [])],
            pass_fds=(listener.fileno(), theirs.fileno()),
            stdin=subprocess.DEVNULL,
            env=_child_env(),
        )  # fmt: skip
    except BaseException:
        ours.close()
        raise
    finally:
        listener.close()
        theirs.close()
    ours.settimeout(timeout)
    try:
        with ours.makefile("rb") as answer:
            line = answer.readline().decode(errors="replace").strip()
    except OSError:
        line = ""
    ours.settimeout(None)
    if line != "ready":
        process.kill()
        process.wait()
        ours.close()
        reason = line.removeprefix("failed ") or "the writer process did not start"
        raise StoreError(f"sqlite store {path}: {reason}")
    return name, ours, process


if __name__ == "__main__":
    if sys.argv[1:2] == ["--hub"]:
        from ._sqlite_hub import hub_main

        sys.exit(hub_main(sys.argv[2:]))
    sys.exit(child_main(sys.argv[1:]))
