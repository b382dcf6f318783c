"""``ehlo db status``, ``migrate`` and ``import DATA_DIR``: the PostgreSQL store's database.

The database is named by ``--store postgresql://USER@HOST/DB``, or by the
``database_url`` of ``--config`` (with ``store = "postgresql"``, or with
``--store postgresql``); a URL holding a password is refused in one line
(libpq reads it from ``~/.pgpass``, ``PGPASSFILE`` or ``PGPASSWORD``).

``status`` prints the schema version against the latest this ehlo knows,
the server's version and ``synchronous_commit``, and what the store holds
(messages, queue entries per state, users); ``--json`` the same as one
object. ``migrate`` applies the missing schema versions (never
destructively) and prints ``schema version A -> B`` or that it is up to
date. ``import DATA_DIR`` copies a SQLite data folder into the database
(:mod:`ehlo.storage._pg_import`: byte for byte, resumable, bodies
streamed), migrating the schema first; a progress line on stderr every
``--progress`` messages, a summary at the end. Interrupted (Ctrl-C), it
says how far it went and exits 130; run again, it finishes the job.

Exit status 0 on success, 1 for a runtime error (the database out of
reach, a source that cannot be read), 2 for a usage or configuration
error: one line ``ehlo: error: ...``, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import Failure, Parser, count, store_choice, store_kind, usage
from .queue import STATES

if TYPE_CHECKING:
    from ..storage._pg_conn import Database
    from ..storage._pg_import import ImportReport

# ``db import`` prints a progress line after each batch that brings this many more messages.
PROGRESS_EVERY = 1000


def add_db_command(commands: Any) -> None:
    """Register ``db`` (``status``, ``migrate``, ``import``) on the ``ehlo`` parser."""
    db = commands.add_parser(
        "db",
        help="the PostgreSQL store's database: status, migrate, import a SQLite folder",
        description="The database of the PostgreSQL store (--store postgresql://USER@HOST/DB,"
        " or database_url in --config): its schema and what it holds, migrating it, and"
        " importing a SQLite data folder into it.",
    )
    actions = db.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    status = actions.add_parser(
        "status",
        help="schema version, server settings and counts",
        description="Show the schema version against the latest this ehlo knows, the"
        " server's version and synchronous_commit, and how many messages, queue entries"
        " (per state) and users the database holds.",
    )
    _database_options(status)
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.set_defaults(func=_status)

    migrate = actions.add_parser(
        "migrate",
        help="bring the schema up to date",
        description="Apply the schema versions the database lacks (only adding tables,"
        " columns and indexes: a node still running the version before keeps working)."
        " ehlo serve does the same at start.",
    )
    _database_options(migrate)
    migrate.set_defaults(func=_migrate)

    copy = actions.add_parser(
        "import",
        help="copy a SQLite data folder into the database",
        description="Copy the SQLite store of DATA_DIR into the database, byte for byte:"
        " messages with their envelopes and bodies, queue entries with their attempts,"
        " the session log, and the users of DATA_DIR/users (a user the database already"
        " has keeps its password). The schema is migrated first. Each batch of messages"
        " is one transaction: an interrupted import is finished by running it again,"
        " without copying anything twice. The folder is only read; a SQLite server may"
        " still be using it (run the import again once it is stopped to take the last"
        " messages).",
    )
    copy.add_argument("source", metavar="DATA_DIR", type=Path, help="the SQLite data folder")
    _database_options(copy)
    copy.add_argument(
        "--progress",
        type=count,
        metavar="N",
        default=PROGRESS_EVERY,
        help=f"a progress line on stderr every N messages (default: {PROGRESS_EVERY}; 0: none)",
    )
    copy.set_defaults(func=_import)
    db.set_defaults(func=lambda _args: usage(db, "choose status, migrate or import"))


def _database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        type=store_kind(()),
        metavar="postgresql://USER@HOST/DB",
        help="the database (no password in it: libpq reads ~/.pgpass, PGPASSFILE or"
        " PGPASSWORD); postgresql alone, or none, takes database_url from --config",
    )
    parser.add_argument("--config", metavar="FILE", type=Path, help="TOML configuration file")


def _database(args: argparse.Namespace) -> Database:
    """The database of --store/--config; one line when there is none."""
    kind, url = store_choice(args.store, args.config)
    if kind != "postgresql" or url is None:
        raise Failure(
            "ehlo db works on the PostgreSQL store: give --store postgresql://USER@HOST/DB"
            ' or a --config with store = "postgresql" and database_url'
        )
    from ..storage._pg_conn import Database, require_driver

    require_driver()
    return Database(url, application="ehlo db")


def _status(args: argparse.Namespace) -> int:
    from ..storage._pg_conn import one_line
    from ..storage._pg_schema import status

    db = _database(args)
    conn = db.connect()
    try:
        info = status(conn)
    except _driver_error() as exc:
        raise Failure(f"postgresql: {one_line(exc)}") from None
    finally:
        conn.close()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    version, latest = info["schema_version"], info["latest_version"]
    if not version:
        schema = f"none (latest {latest}): run ehlo db migrate, or start ehlo serve"
    elif version < latest:
        schema = f"{version} (latest {latest}): run ehlo db migrate"
    elif version > latest:
        schema = f"{version}, newer than this ehlo knows ({latest})"
    else:
        schema = f"{version} (up to date)"
    lines = [
        ("schema version", schema),
        ("server version", info["server_version"]),
        ("synchronous_commit", info["synchronous_commit"]),
    ]
    if version:
        queue: dict[str, int] = info["queue"]
        lines += [
            ("messages", str(info["messages"])),
            (
                "queue",
                ", ".join(f"{queue[state]} {state}" for state in STATES if state in queue)
                or "empty",
            ),
            ("users", str(info["users"])),
        ]
    for name, value in lines:
        print(f"{name + ':':<20}{value}")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from .. import __version__
    from ..storage._pg_conn import one_line
    from ..storage._pg_schema import migrate

    db = _database(args)
    conn = db.connect(autocommit=True)
    try:
        before, after = migrate(conn, __version__)
    except _driver_error() as exc:
        raise Failure(f"postgresql: {one_line(exc)}") from None
    finally:
        conn.close()
    if before == after:
        print(f"schema version {after}: up to date")
    else:
        print(f"schema version {before} -> {after}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from .. import __version__
    from ..auth.users import UserError, read_users_file
    from ..storage import sqlite_path, stored_kind
    from ..storage._pg_conn import one_line
    from ..storage._pg_import import ImportReport, import_sqlite
    from ..storage._pg_schema import migrate

    source: Path = args.source
    if not source.is_dir():
        raise Failure(f"data folder {source} does not exist")
    held = stored_kind(source)
    if held != "sqlite":
        what = f"a {held} store" if held else "no store"
        raise Failure(f"data folder {source} holds {what}: ehlo db import reads a SQLite one")
    try:
        users = read_users_file(source / "users")
    except UserError as exc:
        raise Failure(str(exc)) from None
    db = _database(args)
    conn = db.connect(autocommit=True)
    try:
        migrate(conn, __version__)
    except _driver_error() as exc:
        raise Failure(f"postgresql: {one_line(exc)}") from None
    finally:
        conn.close()

    every = args.progress
    shown = [0]

    def progress(report: ImportReport) -> None:
        if every and report.messages - shown[0] >= every:
            shown[0] = report.messages
            print(f"ehlo db import: {_counts(report)}", file=sys.stderr, flush=True)

    report = ImportReport()
    try:
        report = import_sqlite(
            sqlite_path(source), db, users=sorted(users.items()), progress=progress
        )
    except KeyboardInterrupt:
        print(
            "ehlo db import: interrupted; what was copied stays: run it again to finish",
            file=sys.stderr,
            flush=True,
        )
        return 130
    print(
        f"imported {report.imported} message{'s' if report.imported != 1 else ''}"
        f" ({_octets(report.octets)}), {report.already} already there"
        + (f", {report.vanished} deleted from the source meanwhile" if report.vanished else "")
    )
    print(
        f"queue entries {report.queue_entries}, attempts {report.attempts},"
        f" sessions {report.sessions}, users {report.users}"
        + (f" ({report.users_already} already there)" if report.users_already else "")
    )
    return 0


def _counts(report: ImportReport) -> str:
    return (
        f"{report.messages} messages: {report.imported} imported ({_octets(report.octets)}),"
        f" {report.already} already there"
    )


def _octets(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} octets"


def _driver_error() -> type[Exception]:
    import psycopg

    return psycopg.Error
