"""``ehlo messages list`` and ``ehlo messages show ID``: what a store holds.

The store is named by ``--data``/``--store``/``--config`` (a folder written
by ``serve --store maildir`` is found without ``--store``). ``list`` prints
a table, newest first, or a JSON array; ``show`` prints the envelope and
the message (control characters escaped), ``--raw`` the exact stored bytes,
``--json`` the envelope.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import load_config, read_config_file
from ._common import Failure, Parser, count, safe, store_options, text_output, usage

if TYPE_CHECKING:
    from ..storage import Store, StoredMessage


def add_messages_command(commands: Any) -> None:
    """Register ``messages`` (``list``, ``show``) on the ``ehlo`` parser's subparsers."""
    messages = commands.add_parser(
        "messages",
        help="list or show stored messages",
        description="List or show the messages a store holds.",
    )
    actions = messages.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    listing = actions.add_parser(
        "list", help="list messages, newest first", description="List messages, newest first."
    )
    store_options(listing, kinds=("sqlite", "maildir"))
    listing.add_argument("--json", action="store_true", help="a JSON array of envelopes")
    listing.add_argument("--limit", type=count, metavar="N", help="at most N messages")
    listing.set_defaults(func=_list)

    show = actions.add_parser(
        "show", help="show one message", description="Show one message and its envelope."
    )
    show.add_argument("id", metavar="ID", help="the message id (queue id)")
    store_options(show, kinds=("sqlite", "maildir"))
    form = show.add_mutually_exclusive_group()
    form.add_argument("--raw", action="store_true", help="the exact stored bytes")
    form.add_argument("--json", action="store_true", help="the envelope as JSON")
    show.set_defaults(func=_show)
    messages.set_defaults(func=lambda _args: usage(messages, "choose list or show"))


def _open_store(args: argparse.Namespace) -> Store:
    """The store named by --data/--store/--config, for reading."""
    from ..storage import open_store

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
                safe(env.queue_id),
                _when(message),
                _clip(safe(f"<{env.mail_from}>"), 40),
                _clip(safe(rcpts), 40),
                str(message.size),
                _clip(safe(message.subject or ""), 60),
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


def _list(args: argparse.Namespace) -> int:
    store = _open_store(args)
    messages = store.list(limit=args.limit)
    text_output()
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
        print(json.dumps(message_json(message), indent=2, ensure_ascii=False))
        return 0
    text = raw.decode("utf-8", "replace").replace("\r\n", "\n")
    print(_summary(message))
    print()
    sys.stdout.write(safe(text, lines=True))
    if text and not text.endswith("\n"):
        sys.stdout.write("\n")
    return 0
