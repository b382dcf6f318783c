"""``ehlo messages list``, ``show ID`` and ``delete``: what a store holds.

The store is named by ``--data``/``--store``/``--config``; without
``--store``, the kind the data folder records (its ``store`` file) is
used, and an explicit ``--store`` of the other kind is a one-line error.
``--store postgresql://USER@HOST/DB`` (or ``postgresql`` with the
``database_url`` of ``--config``) reads the PostgreSQL store instead,
without a data folder; a database out of reach is one line, exit 1.
``list`` streams, newest first: a page of ``--limit`` messages (20 by
default, ``--all`` for every one), ``--before ID``/``--after ID`` for the
next and previous pages, and filters (sender, recipient, subject, time,
greeting verb, greeting check results, TLS, authenticated user); as one
text line per message, a JSON array (``--json``) or one JSON object per
line (``--jsonl``), with the fields :data:`LIST_FIELDS`. ``show`` prints
the envelope and the message (control characters escaped), ``--raw`` the
exact stored bytes, ``--json`` the whole envelope (greeting checks
included); ``--transcript`` adds the session's transcript (``+0.012 C EHLO
x`` lines after the summary; the ``transcript`` key with ``--json``).
``delete`` removes messages for good, by id, ``--all``, ``--before DATE``
or the list filters.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import load_config, read_config_file
from ..storage import list_json, message_json
from ..storage.base import TRANSCRIPT, transcript_json
from ._common import (
    STORE_LABELS,
    Failure,
    Listing,
    Parser,
    count,
    safe,
    store_options,
    store_overrides,
    text_output,
    usage,
)

if TYPE_CHECKING:
    from ..storage import Query, Store, StoredMessage

# ``messages list`` shows this many messages unless told otherwise.
DEFAULT_LIMIT = 20
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def add_messages_command(commands: Any) -> None:
    """Register ``messages`` (``list``, ``show``, ``delete``) on the ``ehlo`` parser."""
    messages = commands.add_parser(
        "messages",
        help="list, show or delete stored messages",
        description="List, show or delete the messages a store holds.",
    )
    actions = messages.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    listing = actions.add_parser(
        "list", help="list messages, newest first", description="List messages, newest first."
    )
    store_options(listing, kinds=("sqlite", "maildir"))
    form = listing.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="a JSON array of envelopes")
    form.add_argument("--jsonl", action="store_true", help="one JSON envelope per line")
    size = listing.add_mutually_exclusive_group()
    size.add_argument(
        "--limit", type=count, metavar="N", help=f"at most N messages (default {DEFAULT_LIMIT})"
    )
    size.add_argument("--all", action="store_true", help="every message selected")
    listing.add_argument("--before", metavar="ID", help="only messages older than message ID")
    listing.add_argument("--after", metavar="ID", help="only messages newer than message ID")
    _filter_options(listing)
    listing.set_defaults(func=_list)

    show = actions.add_parser(
        "show", help="show one message", description="Show one message and its envelope."
    )
    show.add_argument("id", metavar="ID", help="the message id (queue id)")
    store_options(show, kinds=("sqlite", "maildir"))
    form = show.add_mutually_exclusive_group()
    form.add_argument("--raw", action="store_true", help="the exact stored bytes")
    form.add_argument("--json", action="store_true", help="the envelope as JSON")
    show.add_argument(
        "--transcript",
        action="store_true",
        help="the session's transcript too (with --json: the transcript key)",
    )
    show.set_defaults(func=_show)

    delete = actions.add_parser(
        "delete",
        help="delete messages for good",
        description="Delete messages (and their body files) for good: by id, every one"
        " (--all), those received before a date, or those the filters select.",
    )
    delete.add_argument("ids", nargs="*", metavar="ID", help="message ids (queue ids)")
    store_options(delete, kinds=("sqlite", "maildir"))
    delete.add_argument("--all", action="store_true", help="every message (with the filters)")
    delete.add_argument(
        "--before", type=moment, metavar="DATE", help="messages received before DATE (or 2h, 3d)"
    )
    _filter_options(delete)
    delete.set_defaults(func=_delete)
    messages.set_defaults(func=lambda _args: usage(messages, "choose list, show or delete"))


def _filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="mail_from", metavar="TEXT", help="sender contains TEXT")
    parser.add_argument("--to", dest="rcpt_to", metavar="TEXT", help="a recipient contains TEXT")
    parser.add_argument("--subject", metavar="TEXT", help="subject contains TEXT")
    parser.add_argument(
        "--since",
        type=moment,
        metavar="WHEN",
        help="received at or after WHEN (ISO date or 2h, 3d)",
    )
    parser.add_argument(
        "--until", type=moment, metavar="WHEN", help="received before WHEN (ISO date or 2h, 3d)"
    )
    parser.add_argument("--greeting", choices=("helo", "ehlo"), help="greeted with HELO or EHLO")
    parser.add_argument(
        "--check",
        type=check_result,
        action="append",
        default=[],
        metavar="NAME=RESULT",
        help="a greeting check's result, e.g. forward_match=fail (repeatable)",
    )
    parser.add_argument("--tls", choices=("yes", "no"), help="received over TLS, or not")
    parser.add_argument("--auth", metavar="USER", help="authenticated as USER")


def moment(text: str) -> dt.datetime:
    """``--since``/``--until``/``--before``: an ISO date or time (UTC unless it says), or
    a time ago: a number and s, m, h, d or w (``90m``, ``2h``, ``3d``)."""
    found = _RELATIVE.fullmatch(text.strip())
    if found:
        ago = float(found.group(1)) * _UNITS[found.group(2)]
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=ago)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO date (2026-01-31, 2026-01-31T08:00) or an age (2h, 3d), got {text!r}"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def check_result(text: str) -> tuple[str, str]:
    name, sep, result = text.partition("=")
    if not sep or not name.strip() or not result.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=RESULT (forward_match=fail), got {text!r}")
    return name.strip(), result.strip()


def _query(args: argparse.Namespace, **paging: Any) -> Query:
    from ..storage import Query

    return Query(
        mail_from=args.mail_from,
        rcpt_to=args.rcpt_to,
        subject=args.subject,
        since=args.since,
        until=args.until,
        greeting=args.greeting.upper() if args.greeting else None,
        checks=tuple(args.check),
        tls=None if args.tls is None else args.tls == "yes",
        auth=args.auth,
        **paging,
    )


def _open_store(args: argparse.Namespace) -> Store:
    """The store named by --data/--store/--config, for reading."""
    from ..storage import open_store, stored_kind

    overrides = {"data_dir": args.data, **store_overrides(args.store)}
    config = load_config(args.config, overrides, labels=STORE_LABELS)
    if config.store == "postgresql" and config.database_url:
        return open_database_store(config.database_url)
    data = Path(config.data_dir)
    if not data.is_dir():
        raise Failure(f"data folder {data} does not exist (give it with --data DIR)")
    kind: str = config.store
    explicit = args.store is not None or (
        args.config is not None and "store" in read_config_file(args.config)
    )
    held = stored_kind(data)
    if not explicit and held is not None:
        kind = held  # the kind the folder records (``serve --store maildir`` wrote it)
    if kind == "null":
        raise Failure("the null store keeps no messages (choose --store sqlite or maildir)")
    return open_store(kind, data)


def open_database_store(url: str) -> Store:
    """The PostgreSQL store at ``url``, for the commands (no data folder needed).

    It connects once first, so that a database out of reach is one line
    naming libpq's reason (not a wait for a pooled connection); its pool
    is closed when the command ends.
    """
    import atexit

    from ..storage.postgres import PostgresStore

    store = PostgresStore(url)
    store.db.connect().close()
    atexit.register(store.db.close)
    return store


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _when(message: StoredMessage) -> str:
    moment = message.envelope.received_at
    if moment.utcoffset() is not None:
        moment = moment.astimezone(dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


# Text columns: fixed widths, so that each line is printed as soon as it is read.
_HEADER = ("ID", "RECEIVED (UTC)", "FROM", "TO", "SIZE", "SUBJECT")
_WIDTHS = (16, 19, 32, 32, 9)


def _line(cells: tuple[str, ...]) -> str:
    out = [
        cell.rjust(width) if i == 4 else cell.ljust(width)
        for i, (cell, width) in enumerate(zip(cells, _WIDTHS, strict=False))
    ]
    return "  ".join([*out, cells[-1]]).rstrip()


def _text_line(message: StoredMessage) -> str:
    env = message.envelope
    return _line(
        (
            safe(env.queue_id),
            _when(message),
            _clip(safe(f"<{env.mail_from}>"), _WIDTHS[2]),
            _clip(safe(", ".join(env.rcpt_to)), _WIDTHS[3]),
            str(message.size),
            _clip(safe(message.subject or ""), 60),
        )
    )


def _list(args: argparse.Namespace) -> int:
    store = _open_store(args)
    limit = None if args.all else (args.limit if args.limit is not None else DEFAULT_LIMIT)
    # One more than the page, to tell whether there is more.
    query = _query(
        args,
        limit=None if limit is None else limit + 1,
        before=args.before,
        after=args.after,
    )
    found: Iterator[StoredMessage] = store.search(query)
    if limit is not None and args.after is not None and args.before is None:
        # The page just newer than ``after``: the extra one is the newest, at the front.
        page = list(found)
        found = iter(page[1:] if len(page) > limit else page)
    listing = Listing(args, _line(_HEADER), list_json, _text_line)
    last = ""
    more = False
    for message in found:
        if limit is not None and listing.shown >= limit:
            more = True
            break
        listing.add(message)
        last = message.envelope.queue_id
    listing.end("no messages")
    if more and listing.mode == "text":
        sys.stdout.flush()
        print(
            f"(first {listing.shown} shown; older ones: --before {last}, or --all)",
            file=sys.stderr,
        )
    return 0


def _delete(args: argparse.Namespace) -> int:
    query = _query(args)
    if args.before is not None:
        until = args.before if query.until is None else min(args.before, query.until)
        query = dataclasses.replace(query, until=until)
    selective = query.filtered
    if args.ids and (args.all or selective):
        raise Failure("give message ids, or --all/--before/filters, not both")
    if not args.ids and not args.all and not selective:
        raise Failure("nothing to delete: give message ids, --all, --before DATE or a filter")
    store = _open_store(args)
    if args.ids:
        gone = set(store.delete(args.ids))
        missing = [queue_id for queue_id in dict.fromkeys(args.ids) if queue_id not in gone]
        print(f"deleted {len(gone)} message{'s' if len(gone) != 1 else ''}")
        if missing:
            raise Failure(f"no message with id {', '.join(repr(m) for m in missing)}")
        return 0
    deleted = store.delete_matching(query)
    print(f"deleted {deleted} message{'s' if deleted != 1 else ''}")
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
        ("size_received", "?" if message.size_received is None else str(message.size_received)),
        ("tls", f"{tls.get('version', '?')} {tls.get('cipher', '?')}" if tls else "none"),
        ("protocol", env.protocol),
        ("subject", message.subject or ""),
    ]
    return "\n".join(f"{name + ':':<13}{safe(value)}" for name, value in fields)


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
    text_output()
    if args.json:
        data = message_json(message, transcript=args.transcript)
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    text = raw.decode("utf-8", "replace").replace("\r\n", "\n")
    print(_summary(message))
    if args.transcript:
        print()
        lines = transcript_json(message.envelope.extra.get(TRANSCRIPT))
        if lines is None:
            print("(no transcript recorded)")
        for line in lines or ():
            print(safe(f"+{line['t']:.3f} {line['dir']} {line['text']}"))
    print()
    sys.stdout.write(safe(text, lines=True))
    if text and not text.endswith("\n"):
        sys.stdout.write("\n")
    return 0
