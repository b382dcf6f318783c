"""The parts of forked server processes (``ehlo serve --workers N``).

A :class:`~ehlo.server.supervisor.Supervisor` binds every listening socket
once (:func:`bind_listeners`), then forks its workers; each worker runs its
own event loop and its own ``Server`` over the inherited sockets, and the
kernel hands each new connection to one of the workers waiting in
``accept``. A worker whose supervisor is killed outright gets SIGTERM from
the kernel (Linux: :func:`stop_with_parent`) and drains, so no server
process outlives its supervisor. :func:`available_cores` is the default
number of workers; :func:`keep_freed_memory` tunes malloc before forking.

Running as another user (``ehlo serve --user NAME``, started as root):
:func:`run_as` looks the user up, :func:`prepare_data_dir` makes the data
folder that user's, :func:`as_user` does file work with the user's
effective ids while root is still at hand, :func:`preload` imports what
the server processes need while root can still read it, and
:func:`drop_privileges` gives root up for good (groups, gid, uid; it then
checks that root cannot be regained).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib
import logging
import os
import pkgutil
import pwd
import signal
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

from .._net import format_hostport
from ..config import Listen

log = logging.getLogger("ehlo.server")

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


# Ports below this need root or CAP_NET_BIND_SERVICE (Linux's default
# net.ipv4.ip_unprivileged_port_start).
PRIVILEGED_PORTS = 1024


class ListenError(OSError):
    """A listener that cannot be bound; ``str()`` is one line naming it and why.

    ``ehlo: error: cannot listen on 127.0.0.1:2525: address already in use``,
    the same whatever the number of listeners or workers; a port below
    1024 refused to a user without the right to it adds what to do.
    """

    def __init__(self, listen: Listen, exc: OSError) -> None:
        code = exc.errno if exc.errno is not None else errno.EIO
        if exc.errno is None or isinstance(exc, socket.gaierror):  # no errno(3) text
            reason = (exc.strerror or str(exc)).lower()
        else:
            reason = os.strerror(code).lower()
        super().__init__(code, reason)
        self.listen = listen
        address = format_hostport(listen.host, listen.port)
        text = f"cannot listen on {address}: {reason}"
        if code == errno.EACCES and 0 < listen.port < PRIVILEGED_PORTS:
            text += (
                f" (port {listen.port} needs root: start as root with --user NAME,"
                " or grant CAP_NET_BIND_SERVICE (systemd: AmbientCapabilities="
                "CAP_NET_BIND_SERVICE), or listen on a port above 1023)"
            )
        self.text = text

    def __str__(self) -> str:
        return self.text


def bind_listeners(listen: Sequence[Listen], backlog: int = 1024) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for ``listen`` (IPv6 sockets are v6-only).

    Raises :class:`ListenError` naming the listener that cannot be bound.
    """
    socks: list[socket.socket] = []
    try:
        for item in listen:
            try:
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
            except OSError as exc:
                raise ListenError(item, exc) from None
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


# --------------------------------------------------------------------------
# Running as another user


@dataclasses.dataclass(frozen=True, slots=True)
class RunAs:
    """The user the server processes run as once the listeners are bound."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # every group of the user (initgroups), gid first


def run_as(name: str | None) -> RunAs | None:
    """The user to switch to for ``--user NAME``; None when there is nothing to switch.

    Raises ValueError (one line): an unknown user, ``root`` itself, or a
    process that is not root asked to become someone else. NAME being the
    user this process already runs as is no switch (None).
    """
    if name is None:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"--user {name}: no such user") from None
    if os.geteuid() != 0:
        if entry.pw_uid == os.geteuid():
            return None
        me = _user_name(os.geteuid())
        raise ValueError(
            f"--user {name}: only root can switch to another user (ehlo runs as {me})"
        )
    if entry.pw_uid == 0:
        raise ValueError(f"--user {name}: that is root; name an unprivileged user")
    groups = tuple(dict.fromkeys([entry.pw_gid, *os.getgrouplist(name, entry.pw_gid)]))
    return RunAs(name, entry.pw_uid, entry.pw_gid, groups)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def prepare_data_dir(path: Path, user: RunAs) -> None:
    """Make the data folder ``user``'s: create it (0700) when missing, else check its owner.

    A folder that exists and belongs to someone else is not changed behind
    the operator's back (it may be the wrong folder): OSError with the
    ``chown`` to run, as Postfix's ``postfix check`` names the queue
    folders whose owner is wrong.
    """
    from ..storage import ensure_data_dir

    if not path.exists():
        ensure_data_dir(path)  # missing parents as root's, as mkdir -p would
        os.chown(path, user.uid, user.gid)
        return
    owner = path.stat().st_uid
    if owner != user.uid:
        raise OSError(
            errno.EPERM,
            f"owned by {_user_name(owner)}, not {user.name}: run"
            f" `chown -R {user.name}: {path}` (or start without --user)",
            str(path),
        )


@contextlib.contextmanager
def as_user(user: RunAs | None) -> Iterator[None]:
    """Files made inside are ``user``'s (effective ids); root is back afterwards."""
    if user is None:
        yield
        return
    os.setegid(user.gid)
    os.seteuid(user.uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


# What the server processes may import after the switch: the user may be
# unable to read the Python installation (one under /root, say).
_PRELOAD_PACKAGES = ("ehlo.server", "ehlo.storage", "ehlo.auth", "ehlo.extensions", "ehlo.policy")
_PRELOAD_MODULES = (
    "ctypes", "ctypes.util", "fcntl", "platform", "encodings.idna", "uvloop",
)  # fmt: skip


def preload(*more: str) -> None:
    """Import, while root can read them, the modules the server processes use.

    ``more``: packages used by this configuration only (``ehlo.greeting``,
    ``ehlo.dns``). A module that cannot be imported here is left alone.
    """
    names: list[str] = list(_PRELOAD_MODULES)
    for package in (*_PRELOAD_PACKAGES, *more):
        try:
            module = importlib.import_module(package)
        except ImportError:
            continue
        names.extend(info.name for info in pkgutil.walk_packages(module.__path__, f"{package}."))
    for name in names:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def drop_privileges(user: RunAs) -> None:
    """Become ``user`` for good: its groups, its gid, its uid (in that order).

    Raises OSError if any step fails, or if root can be regained afterwards.
    """
    os.setgroups(list(user.groups))
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise OSError(errno.EPERM, f"still able to become root after switching to {user.name}")
    if os.getuid() != user.uid or os.getgid() != user.gid or os.geteuid() != user.uid:
        raise OSError(errno.EPERM, f"cannot switch to user {user.name}")
    log.info(
        "running as user %s (uid %d, gid %d)",
        user.name,
        user.uid,
        user.gid,
        extra={"event": "user", "user": user.name, "uid": user.uid, "gid": user.gid},
    )
