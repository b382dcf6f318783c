"""``ehlo users``: add, remove and list the users of SMTP AUTH.

This module owns the ``users`` subcommand (its argparse definitions,
registered into the main ``ehlo`` parser by :func:`add_users_command`),
reading a new password and the messages and exit codes:

* ``ehlo users add NAME [--data DIR | --config FILE | --store URL]``: the
  password is asked twice on the terminal, or read from the first line of
  stdin when stdin is not a terminal; it is never taken from the command
  line;
* ``ehlo users remove NAME [--data DIR | --config FILE | --store URL]``;
* ``ehlo users list [--data DIR | --config FILE | --store URL] [--json]``.

The users file is in the data folder: ``--data``, else the ``data_dir`` of
the ``--config`` file (read by the function the ``ehlo`` command gives
:func:`add_users_command`, as this package sits below the configuration),
else ``./ehlo-data``. The users of nodes sharing a PostgreSQL database are
in its ``users`` table instead: ``--store postgresql://...``, or a
``--config`` file with ``store = "postgresql"``; the ``ehlo`` command gives
the function that opens that table (``users_table``), as this package does
not know the stores.

Exit status 0 on success, 1 for a failure (one line ``ehlo: error: ...``
on stderr, never a traceback), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from .users import UserError, UserStore, UserTable, check_name

__all__ = ["DEFAULT_DATA_DIR", "add_users_command", "run_users"]

PROG = "ehlo"
DEFAULT_DATA_DIR = "ehlo-data"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with the usage error kept to the usage line and one message."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# C0 and C1 control characters (but tab) would drive the terminal: show them escaped.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c != 0x09}


def _error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split()).translate(_CONTROLS)}", file=sys.stderr)


def _data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        metavar="DIR",
        type=Path,
        help="data folder holding the users file"
        f" (default: data_dir of --config, else ./{DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="TOML configuration file (its data_dir, or its database with store = \"postgresql\")",
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="the users table of a PostgreSQL database (postgresql://USER@HOST/DB,"
        " no password: libpq finds it) instead of the users file",
    )


# Opens the users table that ``--store`` or ``--config`` names: (store, config) -> table,
# or None when the users are in the file.
TableOpener = Callable[[str | None, Path | None], UserTable | None]


def add_users_command(
    subparsers: Any,
    *,
    config_data_dir: Callable[[Path], Path] | None = None,
    users_table: TableOpener | None = None,
) -> None:
    """Register ``users`` (``add``, ``remove``, ``list``) on the ``ehlo`` parser's subparsers.

    ``config_data_dir`` reads the data folder of a ``--config`` file (its
    errors reach the caller); without it, ``--config`` is refused.
    ``users_table`` opens the database table ``--store`` or ``--config``
    names (None: the users file); without it, ``--store`` is refused.
    """
    users = subparsers.add_parser(
        "users",
        help="add, remove or list the users of SMTP AUTH",
        description="Manage the users who may authenticate (SMTP AUTH) to the server. "
        "Changes take effect in a running server without a restart.",
    )
    actions = users.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)

    add = actions.add_parser(
        "add",
        help="add a user, or change their password",
        description="Add user NAME, or change their password. The password is asked twice "
        "on the terminal or, when stdin is not a terminal, read from its first line. "
        "It is never given on the command line.",
    )
    add.add_argument("name", metavar="NAME", help="the user name (1-64 of A-Za-z0-9._@+-)")
    _data_option(add)

    remove = actions.add_parser("remove", help="remove a user", description="Remove user NAME.")
    remove.add_argument("name", metavar="NAME", help="the user name")
    _data_option(remove)

    listing = actions.add_parser(
        "list", help="list the user names", description="List the user names, sorted."
    )
    _data_option(listing)
    listing.add_argument("--json", action="store_true", help="a JSON array of names")

    users.set_defaults(
        func=run_users,
        action=None,
        users_parser=users,
        config_data_dir=config_data_dir,
        users_table=users_table,
    )


def run_users(args: argparse.Namespace) -> int:
    """Run ``ehlo users ACTION``; return the exit status."""
    action: str | None = getattr(args, "action", None)
    if action is None:
        parser: argparse.ArgumentParser | None = getattr(args, "users_parser", None)
        if parser is not None:
            parser.print_usage(sys.stderr)
        _error("choose an action: add, remove, list")
        return EXIT_USAGE
    data: Path | None = args.data
    config: Path | None = getattr(args, "config", None)
    url: str | None = getattr(args, "store", None)
    table: UserTable | None = None
    open_table: TableOpener | None = getattr(args, "users_table", None)
    if url is not None and open_table is None:
        _error("--store is not available here: give the data folder with --data")
        return EXIT_USAGE
    if url is not None and data is not None:
        _error("--store and --data name two places for the users: give one")
        return EXIT_USAGE
    if open_table is not None and (url is not None or (config is not None and data is None)):
        table = open_table(url, config)
    if table is None and data is None and config is not None:
        read_data_dir: Callable[[Path], Path] | None = getattr(args, "config_data_dir", None)
        if read_data_dir is None:
            _error("--config is not available here: give the data folder with --data")
            return EXIT_USAGE
        data = read_data_dir(config)
    store = (
        UserStore(table=table)
        if table is not None
        else UserStore(data if data is not None else Path(DEFAULT_DATA_DIR))
    )
    try:
        return _run(store, args, action)
    finally:
        store.close()


def _run(store: UserStore, args: argparse.Namespace, action: str) -> int:
    try:
        if action == "add":
            password = _read_password(args.name)
            if store.add(args.name, password):
                print(f"user {args.name} added")
            else:
                print(f"password of {args.name} changed")
        elif action == "remove":
            if not store.remove(args.name):
                raise UserError(f"no user named {args.name} in {store.where}")
            print(f"user {args.name} removed")
        else:
            names = store.names()
            if args.json:
                print(json.dumps(names, indent=2))
            elif names:
                print("\n".join(names))
            else:
                print(f"no users in {store.where}")
    except (UserError, OSError) as exc:
        _error(str(exc))
        return EXIT_ERROR
    return EXIT_OK


def _read_password(name: str) -> str:
    """The new password: asked twice on the terminal, or stdin's first line."""
    check_name(name)  # say so before asking for a password
    if not sys.stdin.isatty():
        return _stdin_line()
    try:
        first = getpass.getpass(f"New password for {name}: ")
        second = getpass.getpass("Repeat the password: ")
    except EOFError:
        raise UserError("no password given") from None
    if first != second:
        raise UserError("the passwords do not match")
    return first


def _stdin_line() -> str:
    """The first line of stdin, without its line ending (CR LF or LF)."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream without bytes underneath (tests)
        return str(sys.stdin.readline()).rstrip("\r\n")
    raw = buffer.readline()
    try:
        return str(raw.decode("utf-8")).rstrip("\r\n")
    except UnicodeDecodeError:
        raise UserError("the password on stdin is not UTF-8") from None
