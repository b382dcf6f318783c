"""Running the server until a signal: in this process, or in forked workers.

:func:`serve` is what ``ehlo serve`` calls, and what a program embedding
the server calls to get the same behaviour: it runs one :class:`Server`
in this process, or, with ``workers`` above one, a :class:`Supervisor`
that forks that many server processes on the same listeners.

Stopping: SIGTERM or SIGINT stops a server gracefully (new connections
are refused, transactions in progress have ``shutdown_timeout`` seconds to
finish, idle clients get 421); a second one during the stop closes every
connection at once; SIGHUP reloads the TLS certificates and the users.

Starting, in one process or many: every listening socket is bound first
(so that a port in use or refused is one line, and nothing is written
before the binds succeed), then the data folder, the store's folders and
the TLS pair are made and the certificates read, once (so that a problem
is one error, not one per worker); the supervisor raises the
file-descriptor limit once, then forks.

Started as root with ``user`` (``ehlo serve --user NAME``), the binds and
the reading of certificates and keys happen as root; the data folder is
made the user's (or refused when someone else owns it), the files in it
are made with the user's ids, the SQLite writer process is started and
switches to the user itself, then this process gives root up for good
before any worker is forked (``workers.drop_privileges``). Every process
then runs as the user; a SIGHUP reload reads the certificates as the user.
Started as root without ``user``, the server runs as root, with a warning.
Each worker runs its own event loop and its own ``Server`` over the
inherited sockets; the kernel hands each new connection to one of the
workers waiting in ``accept``. The supervisor forwards SIGTERM, SIGINT and
SIGHUP to the workers, restarts a worker that died unexpectedly, and exits
when all workers are gone. A worker dying within :data:`_MIN_UPTIME`
seconds of its start is a crash loop: the supervisor stops the server
instead (exit status 1) and leaves the restart to the service manager.

With the SQLite store (``sqlite_writer = "process"``, on Linux) the
supervisor starts one writer process before forking, and every worker's
store sends it its operations (``ehlo.storage._sqlite_hub``). If that
writer dies, another is started (at a new address) and every worker is
drained and started again to use it; a writer dying within
:data:`_WRITER_MIN_UPTIME` seconds of its start stops the server. Maildir
names are unique across processes: that store needs no such help.

The abuse limits hold for the whole server: the workers count open
connections, connection rates and AUTH failures in memory they share
(:class:`~ehlo.server.abuse.SharedCounters`; a restarted worker's open
connections start at zero).

The Prometheus metrics are summed over the workers: the supervisor makes
a private temporary folder (on ``/dev/shm`` when there is one, mode 0700)
and names it in ``PROMETHEUS_MULTIPROC_DIR`` before forking; each worker
counts in files of its own there, the counts of a worker that ended stay in
the sums, and the folder is removed when the server stops
(``ehlo.server._metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Listen, ServerConfig
from ..policy import Hook, Hooks
from ..storage import StoreError, open_store
from ._server import Server, connection_capacity, tls_contexts_for
from .abuse import SharedCounters
from .workers import (
    ListenError,
    RunAs,
    as_user,
    available_cores,
    bind_listeners,
    drop_privileges,
    preload,
    prepare_data_dir,
    run_as,
    stop_with_parent,
)

if TYPE_CHECKING:
    from .tls import TLSContexts

__all__ = ["StartError", "Supervisor", "run_server", "serve"]

log = logging.getLogger("ehlo.server")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
HooksArg = Hooks | Mapping[str, Iterable[Hook]] | None

# A worker that dies this soon after starting is not restarted (a crash loop).
_MIN_UPTIME = 2.0

# A shared writer that dies this soon after its start is not started again.
_WRITER_MIN_UPTIME = 3.0

# A second SIGTERM/SIGINT closes every connection at once, unless it comes
# this soon after the first (seconds).
_REPEAT_SIGNAL = 1.0
# SIGTERM/SIGINT that reached a worker before its event loop handled them.
_EARLY_SIGNALS: list[int] = []


def _early_stop(signum: int, frame: object) -> None:
    """A worker's handler until its loop takes over: keep the first stop, act on a second."""
    if _EARLY_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    _EARLY_SIGNALS.append(signum)


class StartError(Exception):
    """The server cannot start; the message is one line saying why."""


def serve(
    config: ServerConfig,
    workers: int | None = None,
    *,
    hooks: HooksArg = None,
    loop_factory: LoopFactory | None = None,
    loop_name: str = "asyncio",
) -> int:
    """Run the server until SIGTERM or SIGINT; return the exit status (0: a clean stop).

    ``workers`` server processes share the listeners (default:
    ``config.workers``, and when that is 0, one per CPU core); with one,
    the server runs in this process (under a supervisor when it switches
    to ``config.user`` and needs a SQLite writer process). ``loop_factory`` makes each event loop
    (e.g. ``uvloop.new_event_loop``; default: asyncio's), ``loop_name``
    names it in the log. Raises :class:`StartError` when the server cannot
    start. Call it from the main thread: it installs signal handlers.
    """
    count = workers if workers is not None else config.workers or available_cores()
    if count < 1:
        raise ValueError("workers must be at least 1")
    config = dataclasses.replace(config, workers=count)  # the store needs to know
    user = _user(config)
    # With one worker the server runs in this process, unless it gives up
    # root and needs a SQLite writer process: that one must be started
    # before (it is the supervisor's).
    if count == 1 and (user is None or not _shared_writer(config)):
        sockets, tls, http = _prepare(config, user)
        try:
            if user is not None:
                _give_up_root(config, user)
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                return runner.run(
                    run_server(config, loop_name, sockets, hooks=hooks, tls=tls, http=http)
                )
        finally:
            for sock in [*sockets, *([http] if http is not None else [])]:
                sock.close()
    supervisor = Supervisor(
        config, count, hooks=hooks, loop_factory=loop_factory, loop_name=loop_name
    )
    return supervisor.run()


def _shared_writer(config: ServerConfig) -> bool:
    """Whether a supervisor starts a SQLite writer process for its workers."""
    return (
        config.store == "sqlite"
        and config.sqlite_writer == "process"
        and sys.platform.startswith("linux")
    )


def _user(config: ServerConfig) -> RunAs | None:
    """The user to run as (``config.user``), or None; StartError for a user we cannot be."""
    try:
        return run_as(config.user)
    except ValueError as exc:
        raise StartError(str(exc)) from None


def _prepare(
    config: ServerConfig, user: RunAs | None, *, preflight: bool = False
) -> tuple[list[socket.socket], TLSContexts | None, socket.socket | None]:
    """Bind every listener, then make the data folder and TLS pair and read the keys.

    The binds come first: a port in use writes nothing (no self-signed
    pair). With ``user``, the data folder is made the user's and the files
    in it are made with the user's ids; the keys are read as root.
    ``preflight``: check the store's folders too (before forking workers).
    Also answers the web UI's socket (:func:`_bind_http`), or None.
    """
    from .tls import TLSConfigError, ensure_self_signed

    try:
        sockets = bind_listeners(config.listen)
    except ListenError as exc:
        raise StartError(str(exc)) from None
    try:
        http = _bind_http(config)
    except StartError:
        for sock in sockets:
            sock.close()
        raise
    if http is not None:
        sockets.append(http)  # closed with the listeners below if what follows fails
    try:
        data_dir = Path(config.data_dir)
        if user is not None:
            prepare_data_dir(data_dir, user)
        with as_user(user):
            if preflight:
                open_store(
                    config.store, data_dir, shared=True, database_url=config.database_url
                ).preflight()
            if user is not None and config.tls and config.tls_cert is None:
                ensure_self_signed(data_dir, config.hostname)  # the user's files
        tls = tls_contexts_for(config)  # keys only root may read: read now
    except (OSError, TLSConfigError, StoreError, ValueError) as exc:
        for sock in sockets:
            sock.close()
        raise _start_error(exc, config) from None
    if user is None and config.user is None and os.geteuid() == 0:
        log.warning(
            "running as root: give --user NAME (config key user) to serve as an"
            " unprivileged user once the listeners are bound",
            extra={"event": "root"},
        )
    if http is not None:
        sockets.pop()
    return sockets, tls, http


def _bind_http(config: ServerConfig) -> socket.socket | None:
    """The web UI's listening socket, bound now (before any worker is forked); or None.

    None with ``http_enabled`` off, and when the default address (``http``
    unset) cannot be bound: one warning, and SMTP serves without the web
    UI (a second server on one machine). An address the operator gave
    that cannot be bound, a web address beyond loopback without
    ``http_auth`` or ``http_insecure``, and ``http_auth`` without TLS are
    a :class:`StartError`.
    """
    from ..config import http_exposed
    from ._server import http_exposure_error

    if not config.http_enabled:
        return None
    address = config.http_address
    if http_exposed(address.host) and not (config.http_auth or config.http_insecure):
        raise StartError(http_exposure_error(address.host, address.port))
    if config.http_auth and not config.tls:
        raise StartError("--http-auth needs TLS for HTTPS: it cannot be combined with --no-tls")
    try:
        return bind_listeners([address], backlog=128)[0]
    except ListenError as exc:
        if config.http is not None:
            raise StartError(f"web UI: {exc}") from None
        log.warning(
            "web UI and API not started: %s (choose another address with --http HOST:PORT,"
            " or --no-http)",
            exc,
            extra={"event": "http_unavailable", "error": str(exc)},
        )
        return None


def _give_up_root(config: ServerConfig, user: RunAs) -> None:
    """Import what the server will need while root can read it, then become ``user``."""
    extra = []
    if config.greeting.active:
        extra.append("ehlo.greeting")
    if config.greeting.active or config.reverse_dns:
        extra.append("ehlo.dns")
    if not config.routing().catch_all:  # the delivery scheduler and its client
        extra += ["ehlo.dns", "ehlo.delivery", "ehlo.client"]
        if config.mta_sts:
            extra += ["aiohttp", "yarl", "multidict"]
    if config.http_enabled:  # the web UI (worker 0)
        extra += ["ehlo.web", "aiohttp", "yarl", "multidict"]
    if config.metrics:
        extra.append("prometheus_client")
    preload(*extra)
    if config.http_enabled:
        from ..web import read_package_data

        read_package_data()
    try:
        drop_privileges(user)
    except OSError as exc:
        raise StartError(f"--user {user.name}: {exc.strerror or exc}") from None


async def run_server(
    config: ServerConfig,
    loop_name: str = "asyncio",
    sockets: Sequence[socket.socket] | None = None,
    counts: SharedCounters | None = None,
    *,
    hooks: HooksArg = None,
    tls: TLSContexts | None = None,
    delivery: bool = True,
    http: socket.socket | None = None,
    metrics_dir: Path | None = None,
) -> int:
    """Serve in the running event loop until SIGTERM or SIGINT (graceful stop); return 0.

    The one server process of :func:`serve`, or one worker of a
    :class:`Supervisor` (over its ``sockets``, sharing ``counts`` and the
    metrics folder ``metrics_dir``; ``tls``: contexts loaded already, else
    loaded at start; ``http``: the web UI's socket when this process serves it).
    Raises :class:`StartError` when the server cannot start.
    """
    from .tls import TLSConfigError

    # A supervisor's worker (it shares the counts) logs its start and stop at DEBUG.
    level = logging.INFO if counts is None else logging.DEBUG
    loop = asyncio.get_running_loop()
    # ``delivery``: whether this process runs the delivery scheduler (one does).
    server = Server(
        config, sockets=sockets, shared_counters=counts, hooks=hooks, tls=tls,
        delivery=None if delivery else False, http=http, metrics_dir=metrics_dir,
    )
    stopping = asyncio.Event()
    signals: list[float] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if signals and now - signals[0] < _REPEAT_SIGNAL:
            # The same stop reaching a worker twice: from its supervisor and
            # from a service manager that signals the whole group (systemd).
            return
        signals.append(now)
        if len(signals) == 1:
            log.log(
                level,
                "%s received: stopping (transactions in progress have %gs to finish)",
                name,
                config.shutdown_timeout,
                extra={"event": "shutdown", "signal": name},
            )
            stopping.set()
            return
        log.warning(
            "%s received again: closing every connection now",
            name,
            extra={"event": "shutdown_forced", "signal": name},
        )
        ctx = server.ctx
        if ctx is not None:
            for proto in list(ctx.connections):
                proto.force_close()

    def on_hangup() -> None:
        log.info("SIGHUP received: reloading TLS certificates and users", extra={"event": "reload"})
        server.reload()

    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, int(sig))
            installed.append(sig)
    if _EARLY_SIGNALS:  # a worker told to stop while it was starting
        on_signal(_EARLY_SIGNALS.pop(0))
        _EARLY_SIGNALS.clear()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        installed.append(signal.SIGHUP)
    try:
        try:
            await server.start()
        except (OSError, TLSConfigError, StoreError, ValueError) as exc:
            raise _start_error(exc, config) from None
        # A worker's start and stop are the supervisor's to log (once).
        _log_ready(level, config, server.addresses, loop_name)
        await stopping.wait()
        await server.stop()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    return 0


def _log_ready(
    level: int,
    config: ServerConfig,
    addresses: Iterable[tuple[str, int]],
    loop_name: str,
    workers: int = 1,
) -> None:
    """The ``ready`` line: the server's, or (at DEBUG) one worker's."""
    from .. import __version__

    listening = ", ".join(str(Listen(host, port)) for host, port in addresses)
    log.log(
        level,
        "ehlo %s ready on %s (%sevent loop: %s, store: %s in %s)",
        __version__,
        listening,
        f"{workers} workers, " if workers > 1 else "",
        loop_name,
        config.store,
        config.data_dir,
        extra={
            "event": "ready",
            "addresses": listening,
            "workers": workers,
            "loop": loop_name,
            "store": config.store,
            "data_dir": str(config.data_dir),
        },
    )


def _start_error(exc: BaseException, config: ServerConfig) -> StartError:
    """The one line saying why the server could not start."""
    from .tls import TLSConfigError

    if isinstance(exc, TLSConfigError | StoreError | ListenError):
        return StartError(str(exc))
    if isinstance(exc, OSError):
        if exc.filename is not None:  # the data folder, not a socket
            return StartError(f"{exc.filename}: {exc.strerror or exc}")
        if len(config.listen) == 1 and exc.errno in (
            errno.EADDRINUSE,
            errno.EADDRNOTAVAIL,
            errno.EACCES,
        ):
            reason = os.strerror(exc.errno).lower()
            return StartError(f"cannot listen on {config.listen[0]}: {reason}")
        return StartError(f"cannot listen: {exc.strerror or exc}")
    return StartError(f"cannot start: {exc}")


class Supervisor:
    """``workers`` forked server processes on the same listeners, supervised until a signal.

    :meth:`run` binds, forks and supervises (see the module docstring);
    call it once, from the main thread of a process with no other children
    to wait for.
    """

    def __init__(
        self,
        config: ServerConfig,
        workers: int,
        *,
        hooks: HooksArg = None,
        loop_factory: LoopFactory | None = None,
        loop_name: str = "asyncio",
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.config = dataclasses.replace(config, workers=workers)
        self.workers = workers
        self._hooks = hooks
        self._loop_factory = loop_factory
        self._loop_name = loop_name
        self._sockets: list[socket.socket] = []
        # The web UI's socket, served by worker 0 (a restarted worker 0 too).
        self._http: socket.socket | None = None
        self._tls: TLSContexts | None = None
        self._writer: _SharedWriter | None = None
        self._counts: SharedCounters | None = None
        # The workers' Prometheus counters, summed at /metrics (ehlo.server._metrics).
        self._metrics_dir: Path | None = None
        self._children: dict[int, tuple[int, float]] = {}  # pid -> (index, started)
        self._recycling: set[int] = set()  # workers told to drain, to be started again
        self._stopping = False
        self._failed = False
        self._pid = 0  # the supervisor's, set by run()

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; 0 when every worker stopped cleanly, else 1.

        Raises :class:`StartError` when the server cannot start.
        """
        config = self.config
        user = _user(config)
        # The listeners, then the data folder (0700 when made here), the
        # store's folders, certificates (a self-signed pair made) once here,
        # so that a problem is one error line, not one per worker.
        self._sockets, self._tls, self._http = _prepare(config, user, preflight=True)
        if _shared_writer(config):
            # One SQLite writer for every worker: their messages share batches
            # and fsyncs, and no worker waits for another's write lock.
            from ..storage import sqlite_path

            ids = (user.uid, user.gid, user.groups) if user is not None else None
            self._writer = _SharedWriter(sqlite_path(Path(config.data_dir)), ids)
            try:
                self._writer.start()
            except (OSError, StoreError) as exc:
                self._close_sockets()
                raise _start_error(exc, config) from None
        # The abuse limits are for the whole server, not for each worker.
        self._counts = SharedCounters(self.workers, config.auth_lockout, config.auth_user_lockout)
        # Each worker may hold every connection: raise the file-descriptor limit
        # (or warn that it is too low) once here; the workers inherit the answer.
        connection_capacity(config.max_connections)
        if config.reverse_dns or config.greeting.active:
            # Imported once here, its pages shared by every forked worker.
            from .. import dns  # noqa: F401
        try:
            if config.metrics:
                self._metrics_dir = self._prepare_metrics(user)
            if user is not None:
                _give_up_root(config, user)  # before any worker exists
            return self._supervise()
        finally:
            if self._writer is not None:
                self._writer.stop(config.shutdown_timeout + 30)
            if self._metrics_dir is not None:
                from ._metrics import remove_directory

                remove_directory(self._metrics_dir)

    def _prepare_metrics(self, user: RunAs | None) -> Path:
        """The workers' metrics folder, new for this run (the sums start at zero)."""
        from ._metrics import prepare_directory

        try:
            with as_user(user):  # the workers' own, once root is given up
                path = prepare_directory()
        except OSError as exc:
            self._close_sockets()
            raise StartError(f"cannot make the metrics folder: {exc.strerror or exc}") from None
        log.debug(
            "metrics of the workers in %s", path,
            extra={"event": "metrics_dir", "path": str(path)},
        )
        return path

    # -- the supervising loop

    def _supervise(self) -> int:
        self._pid = os.getpid()
        previous = {
            sig: signal.signal(sig, self._forward)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        try:
            for index in range(self.workers):
                self._spawn(index)
            addresses = [sock.getsockname()[:2] for sock in self._sockets]
            _log_ready(logging.INFO, self.config, addresses, self._loop_name, self.workers)
            while self._children:
                try:
                    pid, status = os.wait()
                except ChildProcessError:
                    break
                except InterruptedError:
                    continue
                self._reaped(pid, os.waitstatus_to_exitcode(status))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._close_sockets()
        log.info("stopped", extra={"event": "stopped", "workers": self.workers})
        return 1 if self._failed else 0

    def _reaped(self, pid: int, code: int) -> None:
        """A child ended with exit status ``code``: restart, stop, or let it go."""
        if pid not in self._children:
            action = self._other_exit(pid, code) if not self._stopping else ""
            if action == "restart":
                self._recycling.update(self._children)
                for worker in self._children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker, signal.SIGTERM)
            elif action == "stop":
                self._failed = True
                self._forward(signal.SIGTERM, None)
            return
        index, started = self._children.pop(pid)
        if self._metrics_dir is not None:
            from ._metrics import process_dead

            process_dead(pid, self._metrics_dir)
        if self._stopping:
            self._failed = self._failed or code != 0
            return
        if pid in self._recycling:
            self._recycling.discard(pid)
            self._spawn(index)
            return
        log.error(
            "worker %d (pid %d) exited with %d",
            index,
            pid,
            code,
            extra={"event": "worker_exit", "worker": index, "code": code},
        )
        if time.monotonic() - started < _MIN_UPTIME:
            self._failed = True
            self._forward(signal.SIGTERM, None)
            return
        self._spawn(index)

    def _forward(self, signum: int, _frame: object) -> None:
        """The supervisor's signal handler: pass the signal on to every worker."""
        if signum != signal.SIGHUP:  # SIGHUP reloads; the others stop
            if not self._stopping and _frame is not None:  # a signal, not a crash loop
                name = signal.Signals(signum).name
                log.info("%s received: stopping", name, extra={"event": "shutdown", "signal": name})
            self._stopping = True
            # The kernel queues connections while any process holds a
            # listener open: let go of ours, as each worker does of its own,
            # so that new clients are refused while the workers drain.
            self._close_sockets()
        for pid in list(self._children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        if self._http is not None:
            self._http.close()

    def _spawn(self, index: int) -> None:
        if self._counts is not None:
            self._counts.reset(index)
        pid = os.fork()
        if pid == 0:  # the worker
            # A stop that comes while the worker starts is kept for its loop
            # (run_server), so that it still stops cleanly; a second one ends it.
            signal.signal(signal.SIGTERM, _early_stop)
            signal.signal(signal.SIGINT, _early_stop)
            # Until the worker's loop handles SIGHUP (reload), it must not kill it.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            stop_with_parent(self._pid)
            code = 1
            try:
                code = self._run_worker(index)
            except BaseException:  # reported, never a traceback past the worker
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        self._children[pid] = (index, time.monotonic())

    # -- in a worker

    def _run_worker(self, index: int) -> int:
        config = self.config
        if self._writer is not None:
            self._writer.forget_control()  # only the supervisor may tell the writer to stop
            config = dataclasses.replace(config, sqlite_writer_address=self._writer.address)
        if self._counts is not None:
            self._counts.bind(index)
        http = self._http if index == 0 else None
        if self._http is not None and index != 0:
            self._http.close()  # worker 0 serves it
        try:
            with asyncio.Runner(loop_factory=self._loop_factory) as runner:
                return runner.run(
                    run_server(
                        config,
                        f"{self._loop_name}, worker {index}",
                        self._sockets,
                        self._counts,
                        hooks=self._hooks,
                        tls=self._tls,
                        delivery=index == 0,  # one scheduler for all workers
                        http=http,  # one web UI for all workers
                        metrics_dir=self._metrics_dir,
                    )
                )
        except StartError as exc:  # e.g. the store cannot be opened: one line
            log.error(
                "worker %d cannot start: %s",
                index,
                exc,
                extra={"event": "worker_failed", "worker": index},
            )
            return 1

    # -- the shared SQLite writer

    def _other_exit(self, pid: int, code: int) -> str:
        """A child that is no worker ended: if it was the writer, start another.

        Answers ``"restart"`` (drain every worker and start it again),
        ``"stop"`` (stop the server: the exit status says it failed) or ``""``.
        """
        writer = self._writer
        if writer is None or not writer.is_process(pid):
            return ""
        if writer.uptime() < _WRITER_MIN_UPTIME:
            log.error(
                "the SQLite writer process (pid %d) exited with %d within %g s of its"
                " start: stopping",
                pid,
                code,
                _WRITER_MIN_UPTIME,
                extra={"event": "writer_exit", "code": code},
            )
            return "stop"  # a crash loop: leave it to the service manager (and the log)
        log.error(
            "the SQLite writer process (pid %d) exited with %d: starting another and"
            " restarting the workers",
            pid,
            code,
            extra={"event": "writer_exit", "code": code},
        )
        try:
            writer.start()
        except (OSError, StoreError) as exc:
            log.error(
                "cannot start the SQLite writer again: %s", exc, extra={"event": "writer_failed"}
            )
            return "stop"
        return "restart"


class _SharedWriter:
    """The SQLite writer process a :class:`Supervisor` starts for its workers.

    Started before the workers are forked; started again (at a new address,
    the workers restarted to use it) if it dies.
    """

    def __init__(self, path: Path, ids: tuple[int, int, tuple[int, ...]] | None = None) -> None:
        self.path = path
        self.ids = ids  # (uid, gid, groups) the writer switches to, started as root
        self.address = ""
        self._started = 0.0
        self._control: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from ..storage._sqlite_process import start_hub

        self.forget_control()
        self._started = time.monotonic()
        self.address, self._control, self._process = start_hub(self.path, ids=self.ids)

    def uptime(self) -> float:
        """Seconds since the current writer process was started."""
        return time.monotonic() - self._started

    def is_process(self, pid: int) -> bool:
        return self._process is not None and self._process.pid == pid

    def forget_control(self) -> None:
        """Close our end of the control socket (the writer stops once no end is open)."""
        if self._control is not None:
            self._control.close()
            self._control = None

    def stop(self, timeout: float) -> None:
        """Let the writer finish once every worker has let go; kill it after ``timeout``."""
        self.forget_control()
        process = self._process
        if process is None:
            return
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
