"""``ehlo queue list``, ``show ID``, ``retry``, ``hold``, ``release``, ``delete``, ``bounce``.

The outbound queue of a store (:class:`ehlo.storage.queue.Queue`): one
entry per (message, recipient) to hand on. The store is named as for
``ehlo messages`` (``--data``/``--store``/``--config``), and so are the
output forms, paging and errors: ``list`` prints entries newest message
first, a page of ``--limit`` entries (20 by default, ``--all`` for every
one; a page never splits a message, so ``--before ID`` gives the next),
filtered by ``--state`` and ``--to``, as a text table ending with the
queue's counts per state, a JSON array (``--json``) or one JSON object per
line (``--jsonl``) with the keys :data:`LIST_FIELDS`. ``show`` prints a
message's envelope (while the store still holds it), its entries and every
attempt with its transcript, oldest first. The actions change entries and
print how many they changed; the running server's scheduler sees the change
at its next look at the queue (within about a second): ``retry`` makes
entries due now, ``hold`` keeps them until ``release``, ``delete`` drops
them without a notice, ``bounce`` has the scheduler bounce them with a
notice to the sender. An entry being delivered at that moment is left
alone by ``delete`` and ``bounce``, and the error line says so.

This module imports neither the server nor the delivery package: listing
a large queue loads the store and the queue's records only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ._common import Failure, Listing, Parser, count, safe, store_options, text_output, usage
from .messages import DEFAULT_LIMIT, _open_store

if TYPE_CHECKING:
    from ..storage import Store
    from ..storage.queue import Attempt, Queue, QueueEntry

# ``queue list --all`` reads the queue this many entries at a time.
ALL_PAGE = 1000
# The keys of each entry ``queue list --json``/``--jsonl`` prints, in order.
LIST_FIELDS = ("id", "recipient", "state", "attempts", "next_attempt", "last_reply", "next_hop")
# The states an entry can be in (as ehlo.storage.queue.STATES; kept here so
# that the parser does not import the store).
STATES = ("queued", "deferred", "delivering", "delivered", "bounced", "held")


def add_queue_command(commands: Any) -> None:
    """Register ``queue`` and its actions on the ``ehlo`` parser."""
    queue = commands.add_parser(
        "queue",
        help="list, show, retry, hold, release, delete or bounce outbound mail",
        description="The outbound queue: one entry per recipient a message is handed on to"
        " (relayed, or delivered by LMTP), in one of the states queued, deferred (waiting"
        " for its next attempt), delivering, delivered, bounced or held. Ids are message"
        " ids: an action on an id applies to each of that message's entries. A running"
        " server sees what the actions change within about a second.",
    )
    actions = queue.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)

    listing = actions.add_parser(
        "list",
        help="list queue entries, newest message first",
        description="List queue entries (one per recipient), newest message first: id,"
        " state, attempts so far, next attempt, recipient, next hop and the last reply"
        " (code, enhanced code, text, remote host); a last line counts the whole queue's"
        " entries per state. --json and --jsonl give the keys id, recipient, state,"
        " attempts, next_attempt, last_reply and next_hop.",
    )
    store_options(listing, kinds=("sqlite", "maildir"))
    form = listing.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="a JSON array of entries")
    form.add_argument("--jsonl", action="store_true", help="one JSON entry per line")
    size = listing.add_mutually_exclusive_group()
    size.add_argument(
        "--limit",
        type=count,
        metavar="N",
        help=f"about N entries: a page ends with its last message's entries"
        f" (default {DEFAULT_LIMIT})",
    )
    size.add_argument("--all", action="store_true", help="every entry selected")
    listing.add_argument(
        "--before", metavar="ID", help="only messages queued before message ID (the next page)"
    )
    listing.add_argument(
        "--state",
        choices=STATES,
        metavar="STATE",
        help=f"only entries in STATE: {', '.join(STATES)}",
    )
    listing.add_argument("--to", metavar="TEXT", help="the recipient contains TEXT")
    listing.set_defaults(func=_list)

    show = actions.add_parser(
        "show",
        help="show one message's entries and attempts",
        description="Show one queued message: its envelope (while the store holds it), each"
        " recipient's entry, and every attempt with its transcript, oldest first.",
    )
    show.add_argument("id", metavar="ID", help="the message id (queue id)")
    store_options(show, kinds=("sqlite", "maildir"))
    show.add_argument(
        "--json", action="store_true", help="the message, its entries and attempts as JSON"
    )
    show.set_defaults(func=_show)

    retry = actions.add_parser(
        "retry",
        help="try queued and deferred entries again now",
        description="Make the queued and deferred entries of these messages (or of every"
        " message, --all) due now; the running server takes them up within about a second"
        " (a next hop that just failed to answer is still given its pause).",
    )
    retry.add_argument("ids", nargs="*", metavar="ID", help="message ids (queue ids)")
    store_options(retry, kinds=("sqlite", "maildir"))
    retry.add_argument("--all", action="store_true", help="every queued and deferred entry")
    retry.set_defaults(func=_retry)

    for name, summary, description, func in (
        (
            "hold",
            "keep entries from being delivered",
            "Hold the queued and deferred entries of these messages: the server leaves"
            " them alone until they are released.",
            _hold,
        ),
        (
            "release",
            "deliver held entries again",
            "Queue the held entries of these messages again, due now (their attempts are"
            " kept; the queue lifetime still counts from when the message was queued).",
            _release,
        ),
        (
            "delete",
            "drop entries without a notice",
            "Drop the entries of these messages from the queue, without a notice to the"
            " sender; a message kept only to be handed on leaves the store too. An entry"
            " being delivered at that moment is left alone.",
            _delete,
        ),
        (
            "bounce",
            "bounce entries, with a notice to the sender",
            "Have the server bounce the queued, deferred and held entries of these messages"
            " now (550 5.0.0, cancelled by the administrator), with a failure notice to the"
            " sender unless the sender asked for none (NOTIFY). An entry being delivered at"
            " that moment is left alone.",
            _bounce,
        ),
    ):
        action = actions.add_parser(name, help=summary, description=description)
        action.add_argument("ids", nargs="+", metavar="ID", help="message ids (queue ids)")
        store_options(action, kinds=("sqlite", "maildir"))
        action.set_defaults(func=func)
    queue.set_defaults(
        func=lambda _args: usage(queue, "choose list, show, retry, hold, release, delete or bounce")
    )


# --------------------------------------------------------------------------
# Opening


def _open(args: argparse.Namespace) -> tuple[Store, Queue]:
    store = _open_store(args)
    queue = store.queue
    if queue is None:
        raise Failure(f"the {store.name} store keeps no outbound queue")
    return store, queue


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _entries(n: int) -> str:
    return f"{n} {'entry' if n == 1 else 'entries'}"


# --------------------------------------------------------------------------
# list


def list_json(entry: QueueEntry) -> dict[str, Any]:
    """An entry as ``queue list --json`` prints it: :data:`LIST_FIELDS`."""
    data = entry.to_json()
    return {key: data[key] for key in LIST_FIELDS}


def _utc(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def reply_text(reply: dict[str, Any] | None) -> str:
    """A last reply in one line: ``451 4.4.1 text (host)``."""
    if not reply:
        return ""
    code = reply.get("code") or 0
    words = [str(code) if code else "", str(reply.get("enhanced") or "")]
    words.append(" ".join(str(reply.get("text") or "").split()))
    host = reply.get("host")
    if host:
        words.append(f"({host})")
    return " ".join(w for w in words if w)


# Text columns: fixed widths, so that each line is printed as soon as it is read.
_HEADER = ("ID", "STATE", "TRIES", "NEXT ATTEMPT (UTC)", "RECIPIENT", "NEXT HOP", "LAST REPLY")
_WIDTHS = (16, 10, 5, 19, 32, 24)


def _line(cells: tuple[str, ...]) -> str:
    out = [
        cell.rjust(width) if i == 2 else cell.ljust(width)
        for i, (cell, width) in enumerate(zip(cells, _WIDTHS, strict=False))
    ]
    return "  ".join([*out, cells[-1]]).rstrip()


def _text_line(entry: QueueEntry) -> str:
    due = entry.state in ("queued", "deferred")
    return _line(
        (
            safe(entry.queue_id),
            entry.state,
            str(entry.attempts),
            _utc(entry.next_attempt) if due else "-",
            _clip(safe(f"<{entry.recipient}>"), _WIDTHS[4]),
            _clip(safe(entry.next_hop), _WIDTHS[5]),
            _clip(safe(_last(entry)), 80),
        )
    )


def _last(entry: QueueEntry) -> str:
    text = reply_text(entry.last_reply)
    return f"(to bounce) {text}".rstrip() if entry.request == "bounce" else text


def summary_line(counts: dict[str, int]) -> str:
    """The queue's size: ``-- 3 entries: 2 deferred, 1 held``."""
    total = sum(counts.values())
    if not total:
        return "-- the queue is empty"
    states = ", ".join(f"{counts[s]} {s}" for s in STATES if counts.get(s))
    return f"-- {_entries(total)} in the queue: {states}"


def _page(
    queue: Queue, args: argparse.Namespace, before: str | None, limit: int
) -> tuple[list[QueueEntry], bool]:
    """The entries of one page (of the messages older than ``before``), and
    whether older ones follow.

    One entry more than the page is read; when the page would end inside a
    message, the rest of that message's entries join it, so that ``--before``
    the last id shown starts the next page where this one ended.
    """
    wanted: dict[str, Any] = {"state": args.state, "recipient": args.to}
    found = queue.entries(**wanted, before=before, limit=limit + 1)
    if len(found) <= limit:
        return found, False
    page = found[:limit]
    if page and found[limit].queue_id == page[-1].queue_id:
        last = page[-1].queue_id
        shown = {entry.key for entry in page}
        page.extend(e for e in queue.entries(**wanted, queue_ids=[last]) if e.key not in shown)
        return page, bool(queue.entries(**wanted, before=last, limit=1))
    return page, True


def _every(queue: Queue, args: argparse.Namespace) -> Iterator[QueueEntry]:
    """Every entry selected (``--all``), read a page at a time: memory stays flat."""
    before = args.before
    while True:
        page, more = _page(queue, args, before, ALL_PAGE)
        yield from page
        if not more or not page:
            return
        before = page[-1].queue_id


def _list(args: argparse.Namespace) -> int:
    _store, queue = _open(args)
    if args.before is not None and not queue.entries(queue_ids=[args.before]):
        raise Failure(f"no queued message with id {args.before!r} (--before)")
    more = False
    found: Iterator[QueueEntry]
    if args.all:
        found = _every(queue, args)
    else:
        limit = args.limit if args.limit is not None else DEFAULT_LIMIT
        page, more = _page(queue, args, args.before, limit)
        found = iter(page)
    listing = Listing(args, _line(_HEADER), list_json, _text_line)
    last = ""
    for entry in found:
        listing.add(entry)
        last = entry.queue_id
    listing.end("no entries")
    if listing.mode == "text":
        sys.stdout.write(summary_line(queue.counts()) + "\n")
        if more:
            sys.stdout.flush()
            older = f"--before {last}, or --all" if last else "--limit N, or --all"
            shown = _entries(listing.shown)
            print(f"(first {shown} shown; older ones: {older})", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------
# show


def _attempt_text(number: int, attempt: Attempt) -> str:
    lines = [
        f"attempt {number} at {_utc(attempt.at)} UTC to {safe(attempt.next_hop)}"
        + (f" via {safe(attempt.host)}" if attempt.host else " (no connection)")
    ]
    for recipient, reply in attempt.results.items():
        lines.append(f"  <{safe(recipient)}>: {safe(reply_text(reply))}")
    transcript = attempt.transcript.replace("\r\n", "\n").rstrip("\n")
    if transcript:
        lines.append("  transcript:")
        lines.extend(f"    {safe(line)}" for line in transcript.split("\n"))
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> int:
    store, queue = _open(args)
    entries = queue.entries(queue_ids=[args.id])
    if not entries:
        raise Failure(f"no queued message with id {args.id!r}")
    attempts = queue.attempts(args.id)
    message = store.get(args.id)
    text_output()
    if args.json:
        data: dict[str, Any] = {
            "id": args.id,
            "stored": message is not None,
            "mail_from": message.envelope.mail_from if message else None,
            "received_at": message.envelope.received_at.isoformat() if message else None,
            "size": message.size if message else None,
            "subject": message.subject if message else None,
            "entries": [entry.to_json() for entry in entries],
            "attempts": [attempt.to_json() for attempt in attempts],
        }
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    fields = [("id", args.id)]
    if message is not None:
        env = message.envelope
        fields += [
            ("mail_from", f"<{env.mail_from}>"),
            ("received_at", env.received_at.isoformat()),
            ("size", str(message.size)),
            ("subject", message.subject or ""),
        ]
    else:
        fields.append(("message", "no longer in the store"))
    fields.append(("queued_at", _utc(min(entry.created for entry in entries)) + " UTC"))
    out = [f"{name + ':':<13}{safe(value)}" for name, value in fields]
    out += ["", _line(_HEADER), *(_text_line(entry) for entry in entries)]
    out += ["", _plural(len(attempts), "attempt") + (":" if attempts else "")]
    out += [_attempt_text(n, attempt) for n, attempt in enumerate(attempts, 1)]
    print("\n".join(out))
    return 0


# --------------------------------------------------------------------------
# The actions


def _known(queue: Queue, ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """The ids among ``ids`` that have entries (in order), and those that have none."""
    wanted = list(dict.fromkeys(ids))
    have: set[str] = set()
    for start in range(0, len(wanted), 500):
        have.update(
            entry.queue_id for entry in queue.entries(queue_ids=wanted[start : start + 500])
        )
    return [i for i in wanted if i in have], [i for i in wanted if i not in have]


def _act(
    args: argparse.Namespace,
    change: Callable[[Queue, list[str]], int],
    done: Callable[[int], str],
    *,
    busy: Callable[[QueueEntry], bool] | None = None,
    after: Callable[[Store, Queue, list[str]], None] | None = None,
) -> int:
    store, queue = _open(args)
    known, missing = _known(queue, args.ids)
    changed = change(queue, known) if known else 0
    print(done(changed))
    problems = []
    if missing:
        problems.append(f"no queued message with id {', '.join(repr(m) for m in missing)}")
    if busy is not None and known:
        left = [e for e in queue.entries(queue_ids=known) if busy(e)]
        if left:
            names = ", ".join(f"{e.queue_id} <{e.recipient}>" for e in left)
            problems.append(f"left alone, being delivered now: {safe(names)}")
    if after is not None and known:
        after(store, queue, known)
    if problems:
        raise Failure("; ".join(problems))
    return 0


def _retry(args: argparse.Namespace) -> int:
    if args.ids and args.all:
        raise Failure("give message ids or --all, not both")
    if not args.ids and not args.all:
        raise Failure("nothing to retry: give message ids or --all")
    if args.all:
        _store, queue = _open(args)
        changed = queue.retry(None, time.time())
        print(f"retried {_entries(changed)}")
        return 0
    return _act(
        args, lambda queue, ids: queue.retry(ids, time.time()), lambda n: f"retried {_entries(n)}"
    )


def _hold(args: argparse.Namespace) -> int:
    return _act(args, lambda queue, ids: queue.hold(ids), lambda n: f"held {_entries(n)}")


def _release(args: argparse.Namespace) -> int:
    return _act(
        args,
        lambda queue, ids: queue.release(ids, time.time()),
        lambda n: f"released {_entries(n)}",
    )


def _forget_handed_on(store: Store, queue: Queue, ids: list[str]) -> None:
    """A message kept only to be handed on leaves the store once nothing is pending."""
    gone = []
    pending = queue.pending(ids)
    for queue_id in ids:
        if queue_id in pending:
            continue
        message = store.get(queue_id)
        if message is not None and message.envelope.extra.get("handed_on"):
            gone.append(queue_id)
    if gone:
        store.delete(gone)


def _delete(args: argparse.Namespace) -> int:
    return _act(
        args,
        lambda queue, ids: queue.remove(ids),
        lambda n: f"deleted {_entries(n)}",
        busy=lambda entry: entry.state == "delivering",
        after=_forget_handed_on,
    )


def _bounce(args: argparse.Namespace) -> int:
    return _act(
        args,
        lambda queue, ids: queue.request_bounce(ids, time.time()),
        lambda n: f"{_entries(n)} to bounce: the server bounces them with a notice to the sender",
        busy=lambda entry: entry.state == "delivering" and entry.request != "bounce",
    )
