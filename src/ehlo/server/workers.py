"""The parts of forked server processes (``ehlo serve --workers N``).

A :class:`~ehlo.server.supervisor.Supervisor` binds every listening socket
once (:func:`bind_listeners`), then forks its workers; each worker runs its
own event loop and its own ``Server`` over the inherited sockets, and the
kernel hands each new connection to one of the workers waiting in
``accept``. A worker whose supervisor is killed outright gets SIGTERM from
the kernel (Linux: :func:`stop_with_parent`) and drains, so no server
process outlives its supervisor. :func:`available_cores` is the default
number of workers; :func:`keep_freed_memory` tunes malloc before forking.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Sequence

from ..config import Listen

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


def stop_with_parent(parent: int) -> None:
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
