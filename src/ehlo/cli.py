"""The ``ehlo`` command line: ``serve``, ``messages list``, ``messages show``.

This module owns the command-line surface: argparse definitions, turning
options into ``load_config`` overrides, running the server on uvloop (when
installed) with SIGTERM/SIGINT handled as a graceful stop, and printing what
a store holds. Every failure the user can cause reaches them as ONE line
``ehlo: error: ...`` on stderr, never a traceback:

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
import datetime as dt
import errno
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from .config import ConfigError, Listen, ServerConfig, load_config, read_config_file
from .log import configure_logging
from .storage import StoreError

if TYPE_CHECKING:
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
    "log_format": "--log-format",
    "log_level": "--log-level",
}


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


def _store_options(parser: argparse.ArgumentParser, *, kinds: Sequence[str]) -> None:
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="data folder holding the store (default: ./ehlo-data)",
    )
    parser.add_argument("--store", choices=kinds, help="storage backend (default: sqlite)")
    parser.add_argument("--config", metavar="FILE", type=Path, help="TOML configuration file")


def build_parser() -> argparse.ArgumentParser:
    """The ``ehlo`` argument parser (exposed for documentation and tests)."""
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
        help="address to listen on, repeatable; [IPv6]:PORT (default: 127.0.0.1:2525)",
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
        "--no-reverse-dns",
        action="store_true",
        help="do not look up client names for the Received header",
    )
    serve.add_argument("--log-format", choices=("text", "json"), help="log lines on stderr")
    serve.add_argument(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="least severe level logged (default: INFO)",
    )
    serve.set_defaults(func=_serve)

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
    parser.set_defaults(func=lambda _args: _usage(parser, "choose a command: serve, messages"))
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
        "log_format": args.log_format,
        "log_level": args.log_level,
    }
    if args.tls_cert or args.tls_key:
        overrides["tls"] = True
    if args.no_tls:
        overrides["tls"] = False
    if args.no_reverse_dns:
        overrides["reverse_dns"] = False
    return load_config(args.config, overrides, labels=_SERVE_LABELS)


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
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_run_server(config, loop_name))


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


async def _run_server(config: ServerConfig, loop_name: str) -> int:
    from .server import Server
    from .server.tls import TLSConfigError

    loop = asyncio.get_running_loop()
    server = Server(config)
    stopping = asyncio.Event()
    signals: list[int] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        signals.append(signum)
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

    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, int(sig))
            installed.append(sig)
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
    parser = build_parser()
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
