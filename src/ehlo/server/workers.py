"""Several server processes on the same listeners (``ehlo serve --workers N``).

The parent binds every listening socket once, then forks N workers. Each
worker runs its own event loop and its own ``Server`` over the inherited
sockets; the kernel hands each new connection to one of the workers that are
waiting in ``accept``. The parent only supervises: it forwards SIGTERM and
SIGINT to the workers (each drains gracefully), restarts a worker that died
unexpectedly, tells its caller when another child ends (``ehlo serve``
replaces a dead shared SQLite writer, and the workers are restarted to use
it), and exits when all workers are gone. A worker whose supervisor
is killed outright gets SIGTERM from the kernel (Linux) and drains too, so no
server process outlives ``ehlo serve``.

The abuse limits hold for the whole server: the workers count open
connections, connection rates and AUTH failures in memory they share
(:class:`~ehlo.server.abuse.SharedCounters`; a restarted worker's open
connections start at zero).

Storage stays correct with several writers: with SQLite, ``ehlo serve``
starts one writer process before forking and every worker's store sends it
its operations (``ehlo.storage._sqlite_process``); Maildir names are unique
across processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence

from ..config import Listen

log = logging.getLogger("ehlo.server")

# A worker that dies this soon after starting is not restarted (a crash loop).
_MIN_UPTIME = 2.0


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 4 << 20, trim_threshold: int = 32 << 20) -> bool:
    """Have glibc's malloc reuse freed blocks of a few hundred KiB (True when it applies).

    A DATA block is a network read of up to 256 KiB, and checking it makes
    a few more of that size. By default glibc serves such blocks with
    ``mmap``, or gives the top of the heap back to the kernel when they are
    freed, so every new block takes fresh pages: page faults and zeroing on
    each read (most of the kernel time of a 10 MiB body: on W3 with the
    discard store, the machine's kernel time fell from 1.65 to 0.30 s per
    100 messages). With
    these thresholds, blocks below ``mmap_threshold`` come from the heap
    and up to ``trim_threshold`` octets of freed memory stay for reuse.
    ``ehlo serve`` calls this once, before forking its workers; a program
    embedding the server decides for itself. A no-op off glibc.
    """
    import ctypes
    import ctypes.util
    import platform

    name = ctypes.util.find_library("c")
    if not name or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(
        mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


def available_cores() -> int:
    """CPU cores this process may run on (the default number of workers)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _stop_with_parent(parent: int) -> None:
    """In a worker: SIGTERM when the supervisor dies, even by SIGKILL (Linux only)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # died before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def bind_listeners(listen: Sequence[Listen], backlog: int = 1024) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for ``listen`` (IPv6 sockets are v6-only)."""
    socks: list[socket.socket] = []
    try:
        for item in listen:
            infos = socket.getaddrinfo(
                item.host, item.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def run_workers(
    sockets: Sequence[socket.socket],
    workers: int,
    run_worker: Callable[[Sequence[socket.socket], int], int],
    before_spawn: Callable[[int], None] | None = None,
    on_other_exit: Callable[[int, int], str] | None = None,
) -> int:
    """Fork ``workers`` processes running ``run_worker(sockets, index)``; supervise them.

    ``before_spawn(index)`` runs in the supervisor before each fork (also
    before a restart). ``on_other_exit(pid, exit code)`` hears of any other
    child of the supervisor that ends while it serves, and answers
    ``"restart"`` (drain every worker and start it again), ``"stop"`` (stop
    the server: the exit status says it failed) or ``""``. Returns 0 when
    every worker stopped cleanly after a signal, 1 otherwise.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    children: dict[int, tuple[int, float]] = {}  # pid -> (index, started)
    recycling: set[int] = set()  # workers told to drain, to be started again
    stopping = False
    failed = False

    supervisor = os.getpid()

    def spawn(index: int) -> None:
        if before_spawn is not None:
            before_spawn(index)
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            # Until the worker's loop handles SIGHUP (reload), it must not kill it.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            _stop_with_parent(supervisor)
            code = 1
            try:
                code = run_worker(sockets, index)
            except BaseException:  # reported, never a traceback past the worker
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = (index, time.monotonic())

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:  # SIGHUP reloads; the others stop
            stopping = True
            # The kernel queues connections while any process holds a
            # listener open: let go of ours, as each worker does of its own,
            # so that new clients are refused while the workers drain.
            for sock in sockets:
                sock.close()
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {
        sig: signal.signal(sig, forward)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    try:
        for index in range(workers):
            spawn(index)
        log.info("started %d worker processes", workers,
                 extra={"event": "workers", "workers": workers})
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            code = os.waitstatus_to_exitcode(status)
            if pid not in children:
                action = on_other_exit(pid, code) if on_other_exit and not stopping else ""
                if action == "restart":
                    recycling.update(children)
                    for worker in children:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(worker, signal.SIGTERM)
                elif action == "stop":
                    failed = True
                    forward(signal.SIGTERM, None)
                continue
            index, started = children.pop(pid)
            if stopping:
                failed = failed or code != 0
                continue
            if pid in recycling:
                recycling.discard(pid)
                spawn(index)
                continue
            log.error("worker %d (pid %d) exited with %d", index, pid, code,
                      extra={"event": "worker_exit", "worker": index, "code": code})
            if time.monotonic() - started < _MIN_UPTIME:
                failed = True
                forward(signal.SIGTERM, None)
                continue
            spawn(index)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in sockets:
            sock.close()
    return 1 if failed else 0
