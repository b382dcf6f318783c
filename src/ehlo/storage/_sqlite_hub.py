"""One SQLite writer for several worker processes (``ehlo serve --workers N``).

This module owns the hub: a process that runs a
:class:`~ehlo.storage._batch.BatchWriter` over the messages of every
worker's store. The supervisor starts it with a listening Unix socket
before it forks the workers
(:func:`ehlo.storage._sqlite_process.start_hub`); each worker's store
connects to it (:class:`~ehlo.storage._sqlite_process.WriterProcess` with
an address) and speaks :mod:`ehlo.storage._wire`.

Operations keep their order within a connection; a batch mixes every
worker's messages, so they share fsyncs. A connection that ends without its
stop message (its worker died) leaves nothing behind: a message reaches the
hub whole, or not at all (the body it was sending is dropped), and the
worker's spool folder is removed once the kernel has let go of its lock.
The hub stops once the supervisor's control socket has closed and every
worker has said stop or gone.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import selectors
import signal
import socket
import time
from pathlib import Path

from . import _wire
from ._batch import BatchWriter, Commit, LoggedSession, Op, Outcome

__all__ = ["hub_main"]

# How often, and how long, the hub tries to remove a dead worker's spool folder.
_ORPHAN_RETRY = 0.02
_ORPHAN_PATIENCE = 5.0


class _Link:
    """One worker's connection to the hub: its frames in, its answers out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = _wire.StreamReader()
        self.inflight = 0  # commits read, not yet executed
        self.done_bytes = 0
        self.spool: str | None = None  # its store's spool folder
        self.stopping = False
        self.closed = False

    def send(self, data: bytes) -> None:
        if self.closed:
            return
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


# A commit's way back: the link it came on and its reference there.
_Tag = tuple[_Link, int]


class _Hub:
    """The writer's operations from every worker (an op source for the batch writer)."""

    def __init__(
        self, listener: socket.socket, control: socket.socket, writer: BatchWriter
    ) -> None:
        self.listener = listener
        self.control = control
        self.writer = writer
        self.selector = selectors.DefaultSelector()
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, None)
        self.selector.register(control, selectors.EVENT_READ, "control")
        self.ready: collections.deque[Op[_Tag]] = collections.deque()
        self.links: list[_Link] = []
        self.control_open = True
        # Spool folders of workers that died, to remove once their lock is
        # free (the kernel lets go of it as the process ends), until a deadline.
        self.orphans: list[tuple[str, float]] = []
        # Every link reads through it (see _wire.BlockingReader's scratch).
        self.scratch = memoryview(bytearray(_wire.READ_SIZE))

    def get(self) -> Op[_Tag] | None:
        while not self.ready:
            if not self.control_open and not self.links:
                return None
            self._poll(_ORPHAN_RETRY if self.orphans else None)
            if self.orphans:
                now = time.monotonic()
                self.orphans = [
                    (owner, until)
                    for owner, until in self.orphans
                    if not self.writer.remove_spool(owner) and until > now
                ]
        return self.ready.popleft()

    def get_nowait(self) -> Op[_Tag] | None:
        if not self.ready:
            self._poll(0)
        if not self.ready:
            raise queue.Empty
        return self.ready.popleft()

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
                link.send(_wire.encode(("ready", self.writer.owner)))
            else:
                self._read(key.data)

    def _read(self, link: _Link) -> None:
        received = link.reader.receive(link.sock, self.scratch)
        if received is None:
            self._gone(link)
            return
        for message, body in received:
            kind = message[0]
            if kind == "commit":
                _, row, ref, spool, _ = message
                link.inflight += 1
                self.ready.append(Commit(row, body, spool, (link, ref)))
            elif kind == "session":
                self.ready.append(LoggedSession(message[1], message[2]))
            elif kind == "spool":
                link.spool = message[1]
            else:  # stop: answered once what it sent before is executed
                link.stopping = True
                self._finish(link)

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
            link.send(_wire.encode(("stopped",)))
            self._gone(link)

    def executed(self, outcomes: list[tuple[Commit[_Tag], Outcome]]) -> None:
        """After a batch: answer each link that had operations in it."""
        answers: dict[int, tuple[_Link, list[tuple[int, str | None, str | None]]]] = {}
        for op, out in outcomes:
            link, ref = op.tag
            link.inflight -= 1
            if op.body is not None:
                link.done_bytes += len(op.body)
            entry = answers.setdefault(id(link), (link, []))[1]
            if isinstance(out, BaseException):
                entry.append((ref, None, str(out)))
            else:
                entry.append((ref, out, None))
        stats = self.writer.stats
        for link, items in answers.values():
            link.send(_wire.done(items, link.done_bytes, stats.commits, stats.messages))
            self._finish(link)


def hub_main(argv: list[str]) -> int:
    """``python -m ehlo.storage._sqlite_process --hub DB LISTENER_FD CONTROL_FD [IDS]``.

    IDS (``UID:GID:GROUP,GROUP``): started as root, the hub switches to
    them before it opens the database, so that its files are that user's.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    path = Path(argv[0])
    listener = socket.socket(fileno=int(argv[1]))
    control = socket.socket(fileno=int(argv[2]))
    writer = BatchWriter(path, shared=True)
    hub = _Hub(listener, control, writer)
    try:
        if argv[3:] and os.getuid() == 0:  # UID:GID:GROUPS, from ``ehlo serve --user``
            uid, gid, groups = argv[3].split(":")
            os.setgroups([int(g) for g in groups.split(",") if g])
            os.setresgid(int(gid), int(gid), int(gid))
            os.setresuid(int(uid), int(uid), int(uid))
        writer.open()
    except BaseException as exc:  # the supervisor prints it and does not start
        control.sendall(f"failed {exc}\n".encode())
        return 1
    control.sendall(b"ready\n")
    try:
        writer.serve(hub, hub.executed)
    finally:
        writer.close()
    return 0
