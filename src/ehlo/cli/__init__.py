"""The ``ehlo`` command line: ``serve``, ``check-helo``, ``messages list``, ``messages show``.

This module owns the command-line surface: argparse definitions, turning
options into ``load_config`` overrides, running the server on uvloop (when
installed) with SIGTERM/SIGINT handled as a graceful stop, explaining what
the greeting checks make of a HELO/EHLO name (``check-helo``, exit 0 whatever
the verdict), and printing what a store holds. Every failure the user can
cause reaches them as ONE line ``ehlo: error: ...`` on stderr, never a
traceback:

* exit 2: a usage or configuration error (bad option, bad config key);
* exit 1: a runtime error (port in use, TLS files, the store, unknown id);
* exit 0: success, including a clean stop after SIGTERM or SIGINT.

A second SIGTERM/SIGINT during the graceful stop closes every connection at
once (421). Environment: ``EHLO_LOOP=asyncio`` runs on asyncio's own event
loop instead of uvloop; ``EHLO_DEBUG=1`` lets unexpected exceptions show
their traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import errno
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from .config import ConfigError, Listen, ServerConfig, load_config, read_config_file
from .log import configure_logging
from .storage import StoreError, open_store

if TYPE_CHECKING:
    from .greeting import CheckResult, Decision, GreetingPolicy, GreetingReport
    from .server.abuse import SharedCounters
    from .storage import Store, StoredMessage

__all__ = ["main"]

log = logging.getLogger("ehlo.cli")

PROG = "ehlo"

# Option -> config key, for error messages that name what the user typed.
_SERVE_LABELS = {
    "listen": "--listen",
    "data_dir": "--data",
    "store": "--store",
    "hostname": "--hostname",
    "domains": "--domain",
    "limits.max_message_size": "--max-size",
    "limits.max_recipients": "--max-recipients",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "sni_certificates": "--sni",
    "workers": "--workers",
    "greeting_delay": "--greeting-delay",
    "proxy_trusted": "--proxy-trusted",
    "log_format": "--log-format",
    "log_level": "--log-level",
}

# Greeting verification and DNS options, shared by ``serve`` and ``check-helo``.
_GREETING_LABELS = {
    "hostname": "--hostname",
    "dns_servers": "--dns-server",
    "dns_timeout": "--dns-timeout",
    "greeting.policy": "--helo-policy",
    "greeting.stage": "--helo-stage",
    "greeting.trusted_networks": "--trusted-network",
}


# Commands that need neither the client nor the user database.
_SERVER_COMMANDS = frozenset({"serve", "check-helo", "messages"})


class Failure(Exception):
    """A runtime error reported as one line with exit status 1."""


# --------------------------------------------------------------------------
# Argument parsing


class _Parser(argparse.ArgumentParser):
    """argparse with the usage error kept to the usage line and one message."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None


def _check_mode(text: str) -> tuple[str, str]:
    """``NAME=MODE`` of ``--helo-check`` (``forward-match`` is ``forward_match``)."""
    name, sep, mode = text.partition("=")
    name = name.strip().lower().replace("-", "_")
    if not sep or not name or not mode.strip():
        raise argparse.ArgumentTypeError(
            f"expected NAME=MODE such as forward_match=reject, got {text!r}"
        )
    return name, mode.strip().lower()


def _greeting_options(parser: argparse.ArgumentParser, *, stage: bool) -> None:
    """The greeting verification and DNS options (``--helo-*``, ``--dns-*``)."""
    from .greeting import CHECKS, MODES, PRESETS, STAGES

    parser.add_argument(
        "--helo-policy",
        choices=PRESETS,
        help="greeting checks: off, record (default: nothing is refused) or strict",
    )
    if stage:
        parser.add_argument(
            "--helo-stage",
            choices=STAGES,
            help="when the greeting verdict is applied (default: rcpt)",
        )
    parser.add_argument(
        "--helo-check",
        action="append",
        type=_check_mode,
        metavar="NAME=MODE",
        help=f"one check's mode ({'|'.join(MODES)}), repeatable; checks: {', '.join(CHECKS)}",
    )
    parser.add_argument(
        "--trusted-network",
        action="append",
        metavar="CIDR",
        help="clients in this network skip the greeting checks, repeatable",
    )
    parser.add_argument(
        "--dns-server",
        action="append",
        metavar="IP[:PORT]",
        help="DNS server to ask, repeatable; [IPv6]:PORT (default: the system's)",
    )
    parser.add_argument(
        "--dns-timeout", type=_seconds, metavar="SECONDS", help="longest wait for one DNS lookup"
    )


def _greeting_overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``load_config`` overrides and labels of the greeting and DNS options."""
    overrides: dict[str, Any] = {
        "dns_servers": args.dns_server,
        "dns_timeout": args.dns_timeout,
        "greeting.policy": args.helo_policy,
        "greeting.stage": getattr(args, "helo_stage", None),
        "greeting.trusted_networks": args.trusted_network,
    }
    labels = dict(_GREETING_LABELS)
    for name, mode in args.helo_check or ():
        overrides[f"greeting.checks.{name}"] = mode
        labels[f"greeting.checks.{name}"] = f"--helo-check {name}"
    return overrides, labels


def _store_options(parser: argparse.ArgumentParser, *, kinds: Sequence[str]) -> None:
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="data folder holding the store (default: ./ehlo-data)",
    )
    parser.add_argument("--store", choices=kinds, help="storage backend (default: sqlite)")
    parser.add_argument("--config", metavar="FILE", type=Path, help="TOML configuration file")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``ehlo`` argument parser (exposed for documentation and tests).

    With ``command`` ("serve", "messages", ...), the parsers of the client
    and user commands are left out unless it is one of them, so that a
    server process does not load the SMTP client or the password hashing.
    """
    parser = _Parser(
        prog=PROG,
        description="An ESMTP mail server that keeps what it receives.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    serve = commands.add_parser(
        "serve",
        help="run the SMTP server",
        description="Run the SMTP server until SIGTERM or SIGINT (graceful stop).",
    )
    serve.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="address to listen on, repeatable; [IPv6]:PORT (default: 127.0.0.1:2525);"
        " add ,proxy for a listener behind a proxy that sends the PROXY protocol",
    )
    serve.add_argument(
        "--listen-tls",
        action="append",
        metavar="HOST:PORT",
        help="implicit-TLS listener (RFC 8314, as on port 465), repeatable; added to --listen",
    )
    _store_options(serve, kinds=("sqlite", "maildir", "null"))
    serve.add_argument(
        "--domain",
        action="append",
        dest="domains",
        metavar="D",
        help="accept mail only for this domain, repeatable (default: any)",
    )
    serve.add_argument("--hostname", metavar="NAME", help="our name in banner and Received")
    serve.add_argument(
        "--max-size", type=_count, metavar="BYTES", help="largest message (0: no limit)"
    )
    serve.add_argument("--max-recipients", type=_count, metavar="N", help="recipients per message")
    serve.add_argument("--tls-cert", metavar="F", help="TLS certificate chain (PEM)")
    serve.add_argument("--tls-key", metavar="F", help="TLS private key (PEM)")
    serve.add_argument(
        "--no-tls", action="store_true", help="do not offer STARTTLS (no self-signed pair)"
    )
    serve.add_argument(
        "--sni",
        nargs=2,
        action="append",
        metavar=("CERT", "KEY"),
        help="another certificate and key, served to clients asking for its names (SNI);"
        " repeatable",
    )
    serve.add_argument(
        "--require-tls", action="store_true", help="refuse MAIL (530 5.7.0) before STARTTLS"
    )
    serve.add_argument(
        "--submission",
        action="store_true",
        help="submission server (port 587): AUTH required before MAIL; authenticated"
        " users may send to any domain",
    )
    serve.add_argument(
        "--auth-plaintext",
        action="store_true",
        help="offer AUTH without TLS too (passwords travel in clear text)",
    )
    serve.add_argument(
        "--no-auth", action="store_true", help="do not offer AUTH even when users exist"
    )
    serve.add_argument(
        "--greeting-delay",
        type=_seconds,
        metavar="SECONDS",
        help="wait before the banner; clients that talk first get 554 (default: 0)",
    )
    serve.add_argument(
        "--proxy-trusted",
        action="append",
        metavar="CIDR",
        help="proxies allowed on ,proxy listeners, repeatable (default: loopback)",
    )
    serve.add_argument(
        "--workers",
        type=_count,
        metavar="N",
        help="server processes sharing the listeners, each with its own event loop "
        "(default: 0, one per CPU core)",
    )
    serve.add_argument(
        "--no-reverse-dns",
        action="store_true",
        help="do not look up client names for the Received header",
    )
    _greeting_options(serve, stage=True)
    serve.add_argument("--log-format", choices=("text", "json"), help="log lines on stderr")
    serve.add_argument(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="least severe level logged (default: INFO)",
    )
    serve.set_defaults(func=_serve)

    check = commands.add_parser(
        "check-helo",
        help="explain what the greeting checks make of a HELO/EHLO name",
        description="Run the greeting checks for NAME sent from IP, as the server would, "
        "and explain each result and the verdict of the configured policy. "
        "Exits 0 whatever the verdict.",
    )
    check.add_argument("name", metavar="NAME", help="the HELO/EHLO name (or [address literal])")
    check.add_argument("ip", metavar="IP", help="the client's IP address")
    verb = check.add_mutually_exclusive_group()
    verb.add_argument(
        "--ehlo", dest="verb", action="store_const", const="EHLO", help="sent as EHLO (default)"
    )
    verb.add_argument("--helo", dest="verb", action="store_const", const="HELO", help="as HELO")
    check.add_argument("--config", metavar="FILE", type=Path, help="TOML configuration file")
    check.add_argument("--hostname", metavar="NAME", help="our host name (for the not_us check)")
    _greeting_options(check, stage=False)
    check.add_argument("--json", action="store_true", help="one JSON object")
    check.set_defaults(func=_check_helo, verb="EHLO")

    messages = commands.add_parser(
        "messages",
        help="list or show stored messages",
        description="List or show the messages a store holds.",
    )
    actions = messages.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    listing = actions.add_parser(
        "list", help="list messages, newest first", description="List messages, newest first."
    )
    _store_options(listing, kinds=("sqlite", "maildir"))
    listing.add_argument("--json", action="store_true", help="a JSON array of envelopes")
    listing.add_argument("--limit", type=_count, metavar="N", help="at most N messages")
    listing.set_defaults(func=_list)

    show = actions.add_parser(
        "show", help="show one message", description="Show one message and its envelope."
    )
    show.add_argument("id", metavar="ID", help="the message id (queue id)")
    _store_options(show, kinds=("sqlite", "maildir"))
    form = show.add_mutually_exclusive_group()
    form.add_argument("--raw", action="store_true", help="the exact stored bytes")
    form.add_argument("--json", action="store_true", help="the envelope as JSON")
    show.set_defaults(func=_show)
    messages.set_defaults(func=lambda _args: _usage(messages, "choose list or show"))
    if command is None or command in ("send", "probe"):
        from .client.cli import add_client_commands

        add_client_commands(commands)
    if command is None or command == "users":
        from .auth.cli import add_users_command

        add_users_command(commands)
    parser.set_defaults(
        func=lambda _args: _usage(
            parser, "choose a command: serve, check-helo, messages, users, send, probe"
        )
    )
    return parser


def _usage(parser: argparse.ArgumentParser, what: str) -> int:
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {what}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------
# ehlo serve


def _serve_config(args: argparse.Namespace) -> ServerConfig:
    if args.no_tls and (args.tls_cert or args.tls_key):
        raise ConfigError("--no-tls cannot be combined with --tls-cert or --tls-key")
    overrides: dict[str, Any] = {
        "listen": args.listen,
        "data_dir": args.data,
        "store": args.store,
        "hostname": args.hostname,
        "domains": args.domains,
        "limits.max_message_size": args.max_size,
        "limits.max_recipients": args.max_recipients,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "sni_certificates": args.sni,
        "workers": args.workers,
        "greeting_delay": args.greeting_delay,
        "proxy_trusted": args.proxy_trusted,
        "log_format": args.log_format,
        "log_level": args.log_level,
    }
    if args.tls_cert or args.tls_key:
        overrides["tls"] = True
    if args.no_tls:
        overrides["tls"] = False
    if args.no_reverse_dns:
        overrides["reverse_dns"] = False
    for flag, key in (
        ("require_tls", "require_tls"),
        ("submission", "submission"),
        ("auth_plaintext", "limits.auth_plaintext"),
    ):
        if getattr(args, flag):
            overrides[key] = True
    if args.no_auth:
        overrides["auth"] = False
    greeting, labels = _greeting_overrides(args)
    overrides.update(greeting)
    config = load_config(args.config, overrides, labels={**_SERVE_LABELS, **labels})
    if args.listen_tls:
        extra = [Listen.parse(text, option="--listen-tls") for text in args.listen_tls]
        extra = [dataclasses.replace(item, tls=True) for item in extra]
        config = dataclasses.replace(config, listen=tuple(dict.fromkeys([*config.listen, *extra])))
    if not config.tls and any(item.tls for item in config.listen):
        raise ConfigError("--listen-tls needs TLS: it cannot be combined with --no-tls")
    return config


def _loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """uvloop's loop factory when it is installed, else None (asyncio's own loop).

    ``EHLO_LOOP=asyncio`` forces asyncio's loop, ``EHLO_LOOP=uvloop`` requires uvloop.
    """
    choice = os.environ.get("EHLO_LOOP", "").strip().lower()
    if choice not in ("", "auto", "asyncio", "uvloop"):
        raise ConfigError(f"EHLO_LOOP: expected asyncio or uvloop, got {choice!r}")
    if choice == "asyncio":
        return None, "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise Failure("EHLO_LOOP=uvloop but uvloop is not installed") from None
        return None, "asyncio"
    version = getattr(uvloop, "__version__", "")
    return uvloop.new_event_loop, f"uvloop {version}".strip()


def _serve(args: argparse.Namespace) -> int:
    config = _serve_config(args)
    try:
        configure_logging(config.log_format, config.log_level)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    factory, loop_name = _loop_factory()
    from .server.workers import available_cores, keep_freed_memory

    keep_freed_memory()
    workers = config.workers or available_cores()
    config = dataclasses.replace(config, workers=workers)  # the store needs to know
    if workers == 1:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(_run_server(config, loop_name))
    return _serve_workers(config, workers, factory, loop_name)


def _serve_workers(
    config: ServerConfig,
    workers: int,
    factory: Callable[[], asyncio.AbstractEventLoop] | None,
    loop_name: str,
) -> int:
    """Bind once, fork ``workers`` server processes, supervise them until a signal."""
    from .server import connection_capacity, tls_contexts_for
    from .server.abuse import SharedCounters
    from .server.tls import TLSConfigError
    from .server.workers import bind_listeners, run_workers

    try:
        # The data folder (0700 when made here) before anything goes into it,
        # then the store's folders, certificates (a self-signed pair made)
        # once here, so that a problem is one error line, not one per worker.
        open_store(config.store, Path(config.data_dir), shared=True).preflight()
        tls_contexts_for(config)
        sockets = bind_listeners(config.listen)
    except (OSError, TLSConfigError, StoreError, ValueError) as exc:
        raise _start_failure(exc, config) from None

    writer: _SharedWriter | None = None
    if (
        config.store == "sqlite"
        and config.sqlite_writer == "process"
        and sys.platform.startswith("linux")
    ):
        # One SQLite writer for every worker: their messages share batches
        # and fsyncs, and no worker waits for another's write lock.
        from .storage import sqlite_path

        writer = _SharedWriter(sqlite_path(Path(config.data_dir)))
        try:
            writer.start()
        except (OSError, StoreError) as exc:
            for sock in sockets:
                sock.close()
            raise _start_failure(exc, config) from None

    # The abuse limits are for the whole server, not for each worker.
    counts = SharedCounters(workers, config.auth_lockout, config.auth_user_lockout)
    # Each worker may hold every connection: raise the file-descriptor limit
    # (or warn that it is too low) once here; the workers inherit the answer.
    connection_capacity(config.max_connections)

    def run_worker(socks: Sequence[socket.socket], index: int) -> int:
        worker_config = config
        if writer is not None:
            writer.forget_control()  # only the supervisor may tell the writer to stop
            worker_config = dataclasses.replace(config, sqlite_writer_address=writer.address)
        counts.bind(index)
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                return runner.run(
                    _run_server(worker_config, f"{loop_name}, worker {index}", socks, counts)
                )
        except Failure as exc:  # e.g. the store cannot be opened: one line
            log.error(
                "worker %d cannot start: %s",
                index,
                exc,
                extra={"event": "worker_failed", "worker": index},
            )
            return 1

    def other_exit(pid: int, code: int) -> str:
        """A child that is no worker ended: if it was the writer, start another."""
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

    try:
        return run_workers(
            sockets, workers, run_worker, before_spawn=counts.reset, on_other_exit=other_exit
        )
    finally:
        if writer is not None:
            writer.stop(config.shutdown_timeout + 30)


# A shared writer that dies this soon after its start is not started again.
_WRITER_MIN_UPTIME = 3.0


class _SharedWriter:
    """The SQLite writer process that ``ehlo serve --workers N`` starts for its workers.

    Started before the workers are forked; started again (at a new address,
    the workers restarted to use it) if it dies.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.address = ""
        self._started = 0.0
        self._control: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from .storage._sqlite_process import start_hub

        self.forget_control()
        self._started = time.monotonic()
        self.address, self._control, self._process = start_hub(self.path)

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


def _start_failure(exc: BaseException, config: ServerConfig) -> Failure:
    """The one line saying why the server could not start."""
    from .server.tls import TLSConfigError

    if isinstance(exc, TLSConfigError | StoreError):
        return Failure(str(exc))
    if isinstance(exc, OSError):
        if exc.filename is not None:  # the data folder, not a socket
            return Failure(f"{exc.filename}: {exc.strerror or exc}")
        if len(config.listen) == 1 and exc.errno in (
            errno.EADDRINUSE,
            errno.EADDRNOTAVAIL,
            errno.EACCES,
        ):
            reason = os.strerror(exc.errno).lower()
            return Failure(f"cannot listen on {config.listen[0]}: {reason}")
        return Failure(f"cannot listen: {exc.strerror or exc}")
    return Failure(f"cannot start: {exc}")


# A second SIGTERM/SIGINT closes every connection at once, unless it comes
# this soon after the first (seconds).
_REPEAT_SIGNAL = 1.0


async def _run_server(
    config: ServerConfig,
    loop_name: str,
    sockets: Sequence[socket.socket] | None = None,
    counts: SharedCounters | None = None,
) -> int:
    from .server import Server
    from .server.tls import TLSConfigError

    loop = asyncio.get_running_loop()
    server = Server(config, sockets=sockets, shared_counters=counts)
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
            log.info(
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
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        installed.append(signal.SIGHUP)
    try:
        try:
            await server.start()
        except (OSError, TLSConfigError, StoreError, ValueError) as exc:
            raise _start_failure(exc, config) from None
        addresses = ", ".join(str(Listen(host, port)) for host, port in server.addresses)
        log.info(
            "ehlo %s ready on %s (event loop: %s, store: %s in %s)",
            __version__,
            addresses,
            loop_name,
            config.store,
            config.data_dir,
            extra={
                "event": "ready",
                "addresses": addresses,
                "loop": loop_name,
                "store": config.store,
                "data_dir": str(config.data_dir),
            },
        )
        await stopping.wait()
        await server.stop()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    return 0


# --------------------------------------------------------------------------
# ehlo check-helo
#
# The same checks the server runs, on a name and an IP given on the command
# line, with the policy of the configuration (file and options). Every check
# runs, even those the policy switches off (their MODE says "off" and they
# weigh nothing in the verdict), so the table always shows the whole picture.

_PROBLEMS = ("fail", "temperror", "permerror")
_ANSI = {"green": "32", "red": "31", "yellow": "33", "dim": "2", "bold": "1"}
_RESULT_COLORS = {
    "pass": "green",
    "fail": "red",
    "permerror": "red",
    "temperror": "yellow",
    "none": "dim",
}
_ACTION_COLORS = {"accept": "green", "defer": "yellow", "reject": "red"}


def _client_ip(text: str) -> str:
    """The IP argument, normalised; a ConfigError (exit 2) when it is not an address."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ConfigError(f"IP: expected an IP address such as 192.0.2.7, got {text!r}") from None


def _check_helo(args: argparse.Namespace) -> int:
    """``ehlo check-helo NAME IP``: run every check, print the table or JSON; exit 0."""
    from .dns import Resolver
    from .greeting import CHECKS, Decision, GreetingVerifier, run_checks

    ip = _client_ip(args.ip)
    overrides, labels = _greeting_overrides(args)
    overrides["hostname"] = args.hostname
    config = load_config(args.config, overrides, labels=labels)
    policy = config.greeting.to_policy()
    try:
        resolver = Resolver(list(config.dns_servers) or None, timeout=config.dns_timeout)
    except ValueError as exc:
        raise ConfigError(f"--dns-server: {exc}") from None
    verifier = GreetingVerifier(policy, resolver, our_names=(config.hostname,))
    greeting = verifier.greeting(args.verb, args.name, ip)

    async def explain() -> GreetingReport:
        # Every check, also those the policy switches off: this is an explanation.
        return await run_checks(
            greeting,
            verifier.resolver,
            checks=CHECKS,
            max_queries=policy.max_queries,
            timeout=policy.timeout,
        )

    try:
        report = asyncio.run(explain())
    except OSError as exc:
        raise Failure(f"cannot run the checks: {exc.strerror or exc}") from None
    decision = verifier.decide(report)
    if not verifier.applies_to(ip):  # the server would not check this client at all
        decision = Decision("accept")
    _text_output()
    if args.json:
        print(
            json.dumps(
                {
                    "name": args.name,
                    "ip": ip,
                    "verb": args.verb,
                    "checks": report.to_json(),
                    "verdict": decision.to_json(),
                },
                indent=2,
                ensure_ascii=False,
            )
        )
        return 0
    color = _use_color()
    print(_explain(report, policy, decision, config, color=color))
    return 0


def _use_color() -> bool:
    """Color only for a terminal, and never when NO_COLOR is set (no-color.org)."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _paint(text: str, color: str | None, enabled: bool) -> str:
    if not enabled or color is None:
        return text
    return f"\x1b[{_ANSI[color]}m{text}\x1b[0m"


def _explain(
    report: GreetingReport,
    policy: GreetingPolicy,
    decision: Decision,
    config: ServerConfig,
    *,
    color: bool,
) -> str:
    """The table ``check-helo`` prints: a heading, one row per check, the verdict."""
    greeting = report.greeting
    dns = ", ".join(config.dns_servers) or "the system's"
    lines = [
        _paint(_safe(f"{greeting.verb} {greeting.name} from {greeting.client_ip}"), "bold", color)
        + f"  (policy {config.greeting.policy}, verdict at {policy.stage.upper()}, DNS {dns})",
        "",
    ]
    header = ("CHECK", "RESULT", "MODE", "REASON")
    widths = (max(len(c) for c in (*report.results, header[0])), len("TEMPERROR"), len("reject"))
    lines.append(
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)) + "  " + header[3]
    )
    shown_evidence: set[str] = set()  # a lookup shown once is not repeated below
    for result in report.results.values():
        shown = result.result.upper() if result.result in _PROBLEMS else result.result
        cells = [
            result.name.ljust(widths[0]),
            _paint(shown.ljust(widths[1]), _RESULT_COLORS.get(result.result), color),
            policy.mode(result.name).ljust(widths[2]),
            _safe(result.reason),
        ]
        lines.append("  ".join(cells).rstrip())
        if result.result in _PROBLEMS:
            for line in _evidence_lines(result):
                if line not in shown_evidence:
                    shown_evidence.add(line)
                    lines.append(f"  {_safe(line)}")
    lines.append("")
    lines.append(_verdict_line(report, policy, decision, config, color=color))
    return "\n".join(lines)


def _verdict_line(
    report: GreetingReport,
    policy: GreetingPolicy,
    decision: Decision,
    config: ServerConfig,
    *,
    color: bool,
) -> str:
    """``verdict: accept (why)`` or ``verdict: reject -> 550 5.7.1 ...``."""
    action = _paint(decision.action, _ACTION_COLORS[decision.action], color)
    ip = report.greeting.client_ip
    if decision.action != "accept":
        return f"verdict: {action} -> {_safe(str(decision.reply))}"
    preset = config.greeting.policy
    network = _trusted_network(policy, ip)
    if network is not None:
        why = f"{ip} is in the trusted network {network}: the server skips the checks"
    elif not policy.enabled_checks:
        why = f"policy {preset}: no check runs"
    elif not policy.enforcing:
        why = f"policy {preset}: nothing is refused"
    else:
        why = f"policy {preset}: no check that can refuse failed"
    return f"verdict: {action} ({why})"


def _trusted_network(policy: GreetingPolicy, ip: str) -> str | None:
    """The first trusted network holding ``ip``, or None."""
    address = ipaddress.ip_address(ip)
    for network in policy.trusted_networks:
        if network.version == address.version and address in network:
            return str(network)
    return None


def _lookup_line(lookup: dict[str, Any]) -> str:
    """``A mail.example.org -> 198.51.100.4 (via CNAME a.example -> b.example)``."""
    answers = lookup.get("answers") or []
    if answers:
        found = ", ".join(str(a) for a in answers)
    elif lookup.get("nxdomain"):
        found = "NXDOMAIN"
    else:
        found = "no records"
    line = f"{lookup.get('type', '?')} {lookup.get('name', '?')} -> {found}"
    cnames = lookup.get("cnames") or []
    if cnames:
        line += f" (via CNAME {' -> '.join(str(c) for c in cnames)})"
    return line


def _evidence_lines(result: CheckResult) -> list[str]:
    """The evidence of a failed check, one short line per fact."""
    lines: list[str] = []
    for key, value in result.evidence.items():
        if key in ("client_ip", "spf") or value in (None, [], {}, ""):
            continue  # the reason says these already
        if key == "lookups" and isinstance(value, list):
            for item in value:
                lines.append(_lookup_line(item) if isinstance(item, dict) else str(item))
        elif key == "checks" and isinstance(value, list):  # iprev: each PTR name's addresses
            for item in value:
                if not isinstance(item, dict):
                    lines.append(str(item))
                elif "error" in item:
                    lines.append(f"A/AAAA {item.get('name')} -> {item['error']}")
                else:
                    found = ", ".join(item.get("addresses") or []) or "no addresses"
                    mark = "confirmed" if item.get("confirmed") else "does not match"
                    lines.append(f"A/AAAA {item.get('name')} -> {found} ({mark})")
        elif key == "ptr" and isinstance(value, list):  # iprev, ptr_match: the PTR names
            names = ", ".join(str(v) for v in value)
            client = result.evidence.get("client_ip")
            lines.append(f"PTR {client} -> {names}" if client else f"confirmed PTR: {names}")
        elif isinstance(value, list):
            lines.append(f"{key}: {', '.join(str(v) for v in value)}")
        elif isinstance(value, dict):
            lines.append(f"{key}: {json.dumps(value, ensure_ascii=False, default=str)}")
        else:
            lines.append(f"{key}: {value}")
    return lines


# --------------------------------------------------------------------------
# ehlo messages


def _open_store(args: argparse.Namespace) -> Store:
    """The store named by --data/--store/--config, for reading."""
    from .storage import open_store

    labels = {"data_dir": "--data", "store": "--store"}
    config = load_config(args.config, {"data_dir": args.data, "store": args.store}, labels=labels)
    data = Path(config.data_dir)
    if not data.is_dir():
        raise Failure(f"data folder {data} does not exist (give it with --data DIR)")
    kind: str = config.store
    if kind == "null":
        raise Failure("the null store keeps no messages (choose --store sqlite or maildir)")
    explicit = args.store is not None or (
        args.config is not None and "store" in read_config_file(args.config)
    )
    if not explicit and not (data / "ehlo.sqlite3").exists() and (data / "maildir").is_dir():
        kind = "maildir"  # the folder was written by `serve --store maildir`
    return open_store(kind, data)


def message_json(message: StoredMessage) -> dict[str, Any]:
    """A stored message as ``messages --json`` prints it: envelope, size, subject."""
    data = message.envelope.to_json()
    data["size"] = message.size
    data["subject"] = message.subject
    return data


# C0 and C1 control characters (but tab) would drive the terminal: show them escaped.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c != 0x09}
_CONTROLS_KEEP_LINES = {c: v for c, v in _CONTROLS.items() if c != 0x0A}


def _safe(text: str, *, lines: bool = False) -> str:
    return text.translate(_CONTROLS_KEEP_LINES if lines else _CONTROLS)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _when(message: StoredMessage) -> str:
    moment = message.envelope.received_at
    if moment.utcoffset() is not None:
        moment = moment.astimezone(dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _table(messages: Sequence[StoredMessage]) -> str:
    header = ("ID", "RECEIVED (UTC)", "FROM", "TO", "SIZE", "SUBJECT")
    rows = [header]
    for message in messages:
        env = message.envelope
        rcpts = ", ".join(env.rcpt_to)
        rows.append(
            (
                _safe(env.queue_id),
                _when(message),
                _clip(_safe(f"<{env.mail_from}>"), 40),
                _clip(_safe(rcpts), 40),
                str(message.size),
                _clip(_safe(message.subject or ""), 60),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if i == 4 else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _text_output() -> None:
    # Subjects and bodies are whatever clients sent: never fail on encoding.
    if hasattr(sys.stdout, "reconfigure"):
        with contextlib.suppress(ValueError, OSError):
            sys.stdout.reconfigure(errors="replace")


def _list(args: argparse.Namespace) -> int:
    store = _open_store(args)
    messages = store.list(limit=args.limit)
    _text_output()
    if args.json:
        print(json.dumps([message_json(m) for m in messages], indent=2, ensure_ascii=False))
    elif not messages:
        print("no messages")
    else:
        print(_table(messages))
    return 0


def _summary(message: StoredMessage) -> str:
    env = message.envelope
    tls = env.tls
    fields = [
        ("id", env.queue_id),
        ("received_at", env.received_at.isoformat()),
        ("client", f"{env.client_ip} port {env.client_port}"),
        ("greeting", f"{env.greeting} {env.greeting_name}".strip()),
        ("mail_from", f"<{env.mail_from}>"),
        ("rcpt_to", ", ".join(f"<{r}>" for r in env.rcpt_to)),
        ("size", str(message.size)),
        ("tls", f"{tls.get('version', '?')} {tls.get('cipher', '?')}" if tls else "none"),
        ("protocol", env.protocol),
        ("subject", message.subject or ""),
    ]
    return "\n".join(f"{name + ':':<13}{_safe(value)}" for name, value in fields)


def _show(args: argparse.Namespace) -> int:
    store = _open_store(args)
    message = store.get(args.id)
    raw = store.raw(args.id) if message is not None and not args.json else b""
    if message is None or raw is None:
        raise Failure(f"no message with id {args.id!r}")
    if args.raw:
        sys.stdout.flush()
        sys.stdout.buffer.write(raw)
        sys.stdout.buffer.flush()
        return 0
    _text_output()
    if args.json:
        print(json.dumps(message_json(message), indent=2, ensure_ascii=False))
        return 0
    text = raw.decode("utf-8", "replace").replace("\r\n", "\n")
    print(_summary(message))
    print()
    sys.stdout.write(_safe(text, lines=True))
    if text and not text.endswith("\n"):
        sys.stdout.write("\n")
    return 0


# --------------------------------------------------------------------------
# Entry point


def _error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the ``ehlo`` command line; return the exit status."""
    words = sys.argv[1:] if argv is None else argv
    first = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(first if first in _SERVER_COMMANDS else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        _error(str(exc))
        return 2
    except (Failure, StoreError) as exc:
        _error(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `ehlo messages list | head`: the reader left; say nothing more.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        if os.environ.get("EHLO_DEBUG"):
            raise
        _error(f"unexpected {type(exc).__name__}: {exc} (EHLO_DEBUG=1 shows the traceback)")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
