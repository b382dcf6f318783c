"""The ``ehlo`` command line: the top-level parser, its commands, errors and exit codes.

This package owns the command-line surface. Each command group lives in
its own module and registers its parser here: ``serve`` (:mod:`.serve`:
options to configuration, then :func:`ehlo.server.supervisor.serve`),
``check-helo`` (:mod:`.check_helo`: what the greeting checks make of a
HELO/EHLO name, exit 0 whatever the verdict), ``messages list/show``
(:mod:`.messages`: what a store holds), ``queue list/show/retry/...``
(:mod:`.queue`: the outbound queue), ``config defaults/check``
(:mod:`.config`: every configuration key with its default and meaning, or
the settings a file makes), ``db status/migrate/import`` (:mod:`.db`: the
PostgreSQL store's database, and a SQLite data folder copied into it);
``users`` is registered by
:mod:`ehlo.auth.cli`, ``send`` and ``probe`` by :mod:`ehlo.client.cli`.
Every failure the user can cause reaches them as ONE line
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
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..config import ConfigError, load_config
from ..storage import StoreError, message_json
from ._common import Failure, Parser, usage
from .check_helo import add_check_helo_command
from .config import add_config_command
from .db import add_db_command
from .messages import add_messages_command
from .queue import add_queue_command
from .serve import add_serve_command

if TYPE_CHECKING:
    from ..auth import UserTable

__all__ = ["Failure", "build_parser", "main", "message_json"]

PROG = "ehlo"

# Commands that need neither the client nor the user database.
_SERVER_COMMANDS = frozenset({"serve", "check-helo", "messages", "queue", "config", "db"})


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``ehlo`` argument parser (exposed for documentation and tests).

    With ``command`` ("serve", "messages", ...), the parsers of the client
    and user commands are left out unless it is one of them, so that a
    server process does not load the SMTP client or the password hashing.
    """
    parser = Parser(
        prog=PROG,
        description="An ESMTP mail server that keeps what it receives.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    add_serve_command(commands)
    add_check_helo_command(commands)
    add_messages_command(commands)
    add_queue_command(commands)
    add_config_command(commands)
    add_db_command(commands)
    if command is None or command in ("send", "probe"):
        from ..client.cli import add_client_commands

        add_client_commands(commands)
    if command is None or command == "users":
        from ..auth.cli import add_users_command

        add_users_command(
            commands, config_data_dir=_config_data_dir, users_table=_users_table
        )
    parser.set_defaults(
        func=lambda _args: usage(
            parser,
            "choose a command: serve, check-helo, messages, queue, config, db, users, send,"
            " probe",
        )
    )
    return parser


def _config_data_dir(path: Path) -> Path:
    """The data folder a configuration file names (``ehlo users --config``)."""
    return load_config(path).data_dir


def _users_table(store: str | None, config: Path | None) -> UserTable | None:
    """The PostgreSQL users table ``ehlo users --store URL`` or ``--config FILE`` names.

    None when the users are in the data folder's file (``--store`` naming a
    file store, or a configuration whose store is not ``postgresql``).
    """
    from ._common import store_choice, store_kind

    if store is not None:
        try:  # never echo what may be a URL with a secret in it
            store_kind(("sqlite", "maildir", "null"))(store)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"--store: {exc}") from None
    kind, url = store_choice(store, config)
    if kind != "postgresql" or url is None:
        return None
    from ..storage.postgres import PostgresStore

    return PostgresStore(url).users()


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
