"""The SQLite store's writer in a process of its own.

In the server's process, the writer thread and the event loop share one GIL:
every statement the writer runs gives the GIL up while SQLite works and must
take it back from a loop that may be busy for a whole switch interval (5 ms).
A batch of nine 4 KiB messages takes 0.1 ms of SQLite alone and 5 to 30 ms
beside a busy loop, and every session waiting for its 250 waits that long.
So ``SQLiteStore`` (``writer="process"``, the default) runs the very same
writer (:class:`~ehlo.storage.sqlite._WriterThread`'s batches, checks and
recovery) in a child process, and talks to it over a socket pair:

- the store sends each message as it is committed (its row, then its body of
  at most one chunk, raw, unless the body is a file) and at the end a stop;
- after each batch the child answers with the outcome of every commit in it
  (the queue id, or why it failed), the body octets executed so far (the
  store's backpressure) and its counters.

A commit's future is settled only from that answer, which the child sends
after ``COMMIT`` returned: a 250 still means the message is on disk.

Frames are a 4-octet big-endian length and a pickle (protocol 5) of a tuple;
both ends are this module, over a socket pair nobody else holds.

The child ignores SIGINT, SIGTERM and SIGHUP (a terminal's Ctrl-C reaches the
whole process group): it stops when the store says so or when the socket
closes (its parent is gone), after executing everything it has read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import pickle
import queue
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base import StoreError, StoreStats
from .sqlite import _Commit, _Op, _OwnerLock, _Stop, _WriterThread

_HEADER = struct.Struct(">I")
# How often, and how long, the hub tries to remove a dead worker's spool folder.
_ORPHAN_RETRY = 0.02
_ORPHAN_PATIENCE = 5.0
_READ_SIZE = 256 * 1024
# How long the child may take to open (or create) the database.
_START_TIMEOUT = 60.0


def _child_env() -> dict[str, str]:
    """The environment of a writer process: it imports this package from where we did."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _frame(message: tuple[Any, ...]) -> list[bytes]:
    payload = pickle.dumps(message, protocol=5)
    return [_HEADER.pack(len(payload)), payload]


class _Frames:
    """Splits a byte stream into decoded frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> tuple[Any, ...] | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        (size,) = _HEADER.unpack_from(buf)
        if len(buf) < 4 + size:
            return None
        message: tuple[Any, ...] = pickle.loads(memoryview(buf)[4 : 4 + size])
        del buf[: 4 + size]
        return message


# --- the child ------------------------------------------------------------------------


class _Channel:
    """The child's end: operations in (a queue-like ``get``), answers out.

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
        self._scratch = memoryview(bytearray(_READ_SIZE))

    def _fill(self, block: bool) -> bool:
        """Read what waits (waiting for something if ``block``); False if nothing came."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        try:
            n = self.sock.recv_into(self._scratch, _READ_SIZE, 0 if block else socket.MSG_DONTWAIT)
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

    def _next(self, block: bool) -> _Op | None:
        if len(self._buf) - self._pos < _HEADER.size:
            if self.closed:
                return _Stop()
            if not self._fill(block) and not block:
                return _Stop() if self.closed else None
        header = self._take(_HEADER.size)
        if header is None:
            return _Stop()
        (size,) = _HEADER.unpack(header)
        payload = self._take(size)
        if payload is None:
            return _Stop()
        message: tuple[Any, ...] = pickle.loads(payload)
        if message[0] != "commit":
            return _Stop()
        body = None
        if message[4]:  # its body follows, raw
            body = self._take(message[4])
            if body is None:
                return _Stop()
        # The reference travels where the thread keeps its future.
        return _Commit(message[1], body, None, message[2], message[3])  # type: ignore[arg-type]

    def get(self) -> _Op:
        op = self._next(block=True)
        assert op is not None
        return op  # _Stop at the socket's end: finish what was read, then stop

    def get_nowait(self) -> _Op:
        op = self._next(block=False)
        if op is None:
            raise queue.Empty
        return op

    def send(self, message: tuple[Any, ...]) -> None:
        if not self.closed:
            try:
                self.sock.sendall(b"".join(_frame(message)))
            except OSError:
                self.closed = True


class _ChildWriter(_WriterThread):
    """The writer's batches, run on the child's main thread, answering over the channel."""

    def __init__(self, path: Path, shared: bool, channel: _Channel) -> None:
        lock = _OwnerLock(path.with_name(path.name + ".locks"))
        super().__init__(path, lock, StoreStats(), shared)
        self.channel = channel
        self.ops = channel  # type: ignore[assignment]

    def _settle(self, outcomes: list[tuple[_Commit, str | BaseException]]) -> None:  # type: ignore[override]
        answers = [
            (op.future, None, str(out))
            if isinstance(out, BaseException)
            else (op.future, out, None)
            for op, out in outcomes
        ]
        self.channel.send(
            ("done", answers, self.done_bytes, self.stats.commits, self.stats.messages)
        )

    def _wake_drained(self) -> None:
        pass  # the store's side tracks the backlog from the answers


def _run(writer: _WriterThread) -> None:
    """Serve batches until told to stop, then let go of the database and the locks."""
    try:
        writer._serve()
    finally:
        try:
            if writer._conn is not None:
                writer._conn.close()
        finally:
            if writer._write_lock is not None:
                os.close(writer._write_lock)
            writer.lock.release()


def child_main(argv: list[str]) -> int:
    """``python -m ehlo.storage._sqlite_process DB SHARED FD``."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    path, shared, fd = Path(argv[0]), argv[1] == "1", int(argv[2])
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    channel = _Channel(sock)
    writer = _ChildWriter(path, shared, channel)
    try:
        writer._conn = writer._open()
    except BaseException as exc:  # reported to the store, which raises StoreError
        channel.send(("failed", str(exc) or type(exc).__name__))
        return 1
    channel.send(("ready", writer.lock.owner))
    _run(writer)
    channel.send(("stopped",))
    return 0


# --- the store's side -----------------------------------------------------------------


class _OwnerName:
    """What the store reads of the owner lock: the child holds the lock itself."""

    def __init__(self) -> None:
        self.owner = ""

    def release(self) -> None:
        pass


class WriterProcess(asyncio.Protocol):
    """The store's handle on the child: the same interface as the writer thread.

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
        self.lock = _OwnerName()
        self.ops = self  # ``ops.put(op)``, as with the thread's queue
        self.queued_bytes = 0
        self.done_bytes = 0
        self.broken: str | None = None
        self._frames = _Frames()
        self._out: list[bytes | bytearray] = []  # frames of this turn of the loop (see _send)
        self._flush_due = False
        self._transport: asyncio.Transport | None = None
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
                self._send(_frame(("spool", self.spool)))
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
            self.put(_Stop())
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

    def put(self, op: _Op) -> None:
        transport = self._transport
        if transport is None or self.broken is not None:
            if isinstance(op, _Commit) and not op.future.done():
                op.future.set_exception(self._error())
            return
        if isinstance(op, _Stop):
            self._send(_frame(("stop",)))
            return
        ref = next(self._refs)
        self._commits[ref] = op.future
        body = op.body
        self._send(_frame(("commit", op.row, ref, op.spool, len(body) if body else 0)), body)

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

    def wait_drained(self, low: int) -> asyncio.Future[None]:
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
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self._frames.feed(data)
        while (message := self._frames.next()) is not None:
            self._handle(message)

    def _handle(self, message: tuple[Any, ...]) -> None:
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
            self.lock.owner = message[1]
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


class _Link:
    """One worker's connection to the hub: its frames in, its answers out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.body: tuple[tuple[Any, ...], bytearray, int] | None = None  # a body being read
        self.inflight = 0  # commits read, not yet executed
        self.done_bytes = 0
        self.spool: str | None = None  # its store's spool folder
        self.stopping = False
        self.closed = False

    def send(self, message: tuple[Any, ...]) -> None:
        if self.closed:
            return
        data = b"".join(_frame(message))
        try:
            sent = self.sock.send(data)  # an answer is small: it nearly always fits at once
        except BlockingIOError:
            sent = 0
        except OSError:
            self.closed = True
            return
        if sent == len(data):
            return
        self.sock.setblocking(True)  # the worker is slow to read: wait for room
        try:
            self.sock.sendall(data[sent:])
        except OSError:
            self.closed = True
        finally:
            self.sock.setblocking(False)


class _Hub:
    """The writer's operations from every worker (``ehlo serve --workers N``).

    The supervisor starts it with a listening Unix socket before it forks
    the workers; each worker's store connects to it. Operations keep their
    order within a connection. A connection that ends without its stop
    message (its worker died) leaves nothing behind: a message reaches the
    hub whole, or not at all (the body it was sending is dropped). The hub
    stops once the supervisor's control socket has closed and every worker
    has said stop or gone.
    """

    def __init__(self, listener: socket.socket, control: socket.socket) -> None:
        self.listener = listener
        self.control = control
        self.selector = selectors.DefaultSelector()
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, None)
        self.selector.register(control, selectors.EVENT_READ, "control")
        self.ready: collections.deque[tuple[_Link, _Op]] = collections.deque()
        self.links: list[_Link] = []
        self.owner = ""
        self.control_open = True
        self.link_of: dict[int, _Link] = {}  # id(op) -> its link, for the batch
        # Spool folders of workers that died, to remove once their lock is
        # free (the kernel lets go of it as the process ends), until a deadline.
        self.orphans: list[tuple[str, float]] = []
        self.remove_spool: Callable[[str], bool] = lambda owner: True
        # Every link reads through it (see _Channel's scratch).
        self.scratch = memoryview(bytearray(_READ_SIZE))

    def get(self) -> _Op:
        while not self.ready:
            if not self.control_open and not self.links:
                return _Stop()
            self._poll(_ORPHAN_RETRY if self.orphans else None)
            if self.orphans:
                now = time.monotonic()
                self.orphans = [
                    (owner, until)
                    for owner, until in self.orphans
                    if not self.remove_spool(owner) and until > now
                ]
        return self._pop()

    def get_nowait(self) -> _Op:
        if not self.ready:
            self._poll(0)
        if not self.ready:
            raise queue.Empty
        return self._pop()

    def _pop(self) -> _Op:
        link, op = self.ready.popleft()
        self.link_of[id(op)] = link
        return op

    def _poll(self, timeout: float | None) -> None:
        for key, _ in self.selector.select(timeout):
            if key.data == "control":
                if not self.control.recv(1):  # the supervisor is done (or gone)
                    self.control_open = False
                    self.selector.unregister(self.control)
                    self.selector.unregister(self.listener)
                    self.listener.close()
            elif key.data is None:
                try:
                    sock, _ = self.listener.accept()
                except OSError:
                    continue
                sock.setblocking(False)
                link = _Link(sock)
                self.links.append(link)
                self.selector.register(sock, selectors.EVENT_READ, link)
                link.send(("ready", self.owner))
            else:
                self._read(key.data)

    def _read(self, link: _Link) -> None:
        try:
            if link.body is not None:
                message, data, got = link.body
                n = link.sock.recv_into(memoryview(data)[got:])
                if n:
                    got += n
                    link.body = (message, data, got)
                    if got == len(data):
                        link.body = None
                        self._body_done(link, message, data)
                    return
            else:
                scratch = self.scratch
                n = link.sock.recv_into(scratch, _READ_SIZE)
                if n:
                    link.buf += scratch[:n]
                    self._parse(link)
                    return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._gone(link)

    def _parse(self, link: _Link) -> None:
        buf = link.buf
        pos = 0
        while len(buf) - pos >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, pos)
            if len(buf) - pos - _HEADER.size < size:
                break
            start = pos + _HEADER.size
            message: tuple[Any, ...] = pickle.loads(memoryview(buf)[start : start + size])
            pos = start + size
            kind = message[0]
            if kind == "commit":
                length = message[4]
                if not length:
                    self._body_done(link, message, None)
                    continue
                body = bytearray(length)
                have = min(length, len(buf) - pos)
                body[:have] = memoryview(buf)[pos : pos + have]
                pos += have
                if have < length:
                    link.body = (message, body, have)
                    break  # the rest of the buffer was all body
                self._body_done(link, message, body)
            elif kind == "spool":
                link.spool = message[1]
            else:  # stop: answered once what it sent before is executed
                link.stopping = True
                self._finish(link)
        del buf[:pos]

    def _body_done(self, link: _Link, message: tuple[Any, ...], body: bytearray | None) -> None:
        """A commit frame and its body are in: the message joins the queue."""
        _, row, ref, spool, _ = message
        link.inflight += 1
        # The (link, reference) pair travels where the thread keeps its future.
        self.ready.append((link, _Commit(row, body, None, (link, ref), spool)))  # type: ignore[arg-type]

    def _gone(self, link: _Link) -> None:
        """The link ended: its worker stopped, or died mid-message."""
        if link in self.links:
            self.links.remove(link)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(link.sock)
        link.closed = True
        link.sock.close()
        if link.spool is not None and not link.stopping:
            # Bodies it was receiving (a worker that stops removes its own).
            self.orphans.append((link.spool, time.monotonic() + _ORPHAN_PATIENCE))

    def _finish(self, link: _Link) -> None:
        if link.stopping and link.inflight == 0 and not link.closed:
            link.send(("stopped",))
            self._gone(link)

    def executed(self, batch: list[_Commit], outcomes: list[tuple[_Commit, str | BaseException]],
                 commits: int, messages: int) -> None:
        """After a batch: answer each link that had operations in it."""
        answers: dict[int, tuple[_Link, list[tuple[int, str | None, str | None]]]] = {}
        for op in batch:
            link = self.link_of.pop(id(op), None)
            if link is None:
                continue
            link.inflight -= 1
            if op.body is not None:
                link.done_bytes += len(op.body)
            answers.setdefault(id(link), (link, []))
        for op, out in outcomes:
            tag: Any = op.future  # (link, reference): see _parse
            link, ref = tag
            entry = answers.setdefault(id(link), (link, []))[1]
            if isinstance(out, BaseException):
                entry.append((ref, None, str(out)))
            else:
                entry.append((ref, out, None))
        for link, items in answers.values():
            link.send(("done", items, link.done_bytes, commits, messages))
            self._finish(link)


class _HubWriter(_WriterThread):
    """The writer's batches over the hub's operations."""

    def __init__(self, path: Path, hub: _Hub) -> None:
        lock = _OwnerLock(path.with_name(path.name + ".locks"))
        super().__init__(path, lock, StoreStats(), shared=True)
        self.hub = hub
        self.ops = hub  # type: ignore[assignment]
        hub.remove_spool = self._remove_spool
        self._outcomes: list[tuple[_Commit, str | BaseException]] = []

    def _execute(self, batch: list[_Commit]) -> None:
        super()._execute(batch)
        outcomes, self._outcomes = self._outcomes, []
        self.hub.executed(batch, outcomes, self.stats.commits, self.stats.messages)

    def _settle(self, outcomes: list[tuple[_Commit, str | BaseException]]) -> None:  # type: ignore[override]
        self._outcomes = outcomes

    def _wake_drained(self) -> None:
        pass


def hub_main(argv: list[str]) -> int:
    """``python -m ehlo.storage._sqlite_process --hub DB LISTENER_FD CONTROL_FD``."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    path = Path(argv[0])
    listener = socket.socket(fileno=int(argv[1]))
    control = socket.socket(fileno=int(argv[2]))
    hub = _Hub(listener, control)
    writer = _HubWriter(path, hub)
    try:
        writer._conn = writer._open()
    except BaseException as exc:  # the supervisor prints it and does not start
        control.sendall(f"failed {exc}\n".encode())
        return 1
    hub.owner = writer.lock.owner
    control.sendall(b"ready\n")
    _run(writer)
    return 0


def start_hub(path: Path, timeout: float = _START_TIMEOUT) -> tuple[str, socket.socket, Any]:
    """In ``ehlo serve``'s supervisor, before forking: the hub's address, control, process.

    Closing the control socket tells the hub to stop once its workers are done.
    """
    name = f"\0ehlo-writer-{os.getpid()}-{os.urandom(6).hex()}"  # Linux abstract socket
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ours, theirs = socket.socketpair()
    try:
        listener.bind(name)
        listener.listen(64)
        process = subprocess.Popen(
            [sys.executable, "-m", __name__, "--hub", str(path),
             str(listener.fileno()), str(theirs.fileno())],
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
        sys.exit(hub_main(sys.argv[2:]))
    sys.exit(child_main(sys.argv[1:]))
