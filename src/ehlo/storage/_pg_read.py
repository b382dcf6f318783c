"""The PostgreSQL store's reads: list, search, get, raw, newer, overview, sessions, deletes.

Functions over a connection from ``Database.connection`` (or over the
``Database`` itself where a result is streamed in pages); the store's
methods call them. Each answer equals the SQLite store's for the same
messages (:mod:`ehlo.storage.sqlite`):

- a query's filters are SQL over the ``s_*`` columns, case-folded at write
  time as the SQLite store's ``search`` table is; words of the body are
  tested in Python (:meth:`Query.matches` on :func:`body_text`), the
  candidates' bodies read only when a word is not in the subject;
- ``search`` streams newest first in pages, each page the rows just past
  the last one read by ``(received_at, queue_id)`` (the index
  ``messages_received_at``), never by OFFSET, and no connection is held
  between pages;
- bodies are read chunk row by chunk row (single-row mode, binary), never
  as one result holding a whole large body twice;
- ``newer`` marks with the database's snapshot: a message is new when its
  writing transaction (the ``xid`` column) was not yet committed at the
  mark's snapshot and is now, whichever node wrote it and however long
  that transaction ran (see :class:`SnapshotMark`);
- deletes take the messages' chunks and pending queue entries with them,
  a batch per transaction, and notify the other nodes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import itertools
import json
from collections.abc import Iterator, Sequence
from typing import Any

from ._overview import TOP_NAMES, Overview
from ._pg_conn import Database
from ._pg_schema import CHANNEL_MESSAGES
from ._query import Query, Retention, body_text
from ._sqlite_db import fold
from .base import DELETE_BATCH, Envelope, NoSuchMessage, StoredMessage, StoreError
from .queue import PENDING

# Rows ``search`` reads per page (envelopes carry greeting reports and
# transcripts: a page stays a few MiB at most)...
PAGE = 200
# ...and candidates per page when words of the body are looked for (each
# may read its body).
WORDS_PAGE = 50

# What a StoredMessage is read from, in this order (what _message takes).
_COLUMNS = (
    "queue_id, received_at, client_ip, client_port, greeting, greeting_name, mail_from,"
    " mail_params, rcpt_to, tls, protocol, server_name, extra, size, subject, size_received,"
    " attachments"
)
# The messages retention must keep: those with recipients still to hand on.
_PENDING = f"({', '.join(repr(state) for state in PENDING)})"
_UNQUEUED = (
    "NOT EXISTS (SELECT 1 FROM queue q WHERE q.queue_id = messages.queue_id"
    f" AND q.state IN {_PENDING})"
)


def _utc(moment: _dt.datetime) -> _dt.datetime:
    """``moment`` as an aware UTC time (a naive one is taken as UTC, as SQLite's store does)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=_dt.UTC)
    return moment.astimezone(_dt.UTC)


def _message(row: Sequence[Any]) -> StoredMessage:
    """A StoredMessage from a row of :data:`_COLUMNS`."""
    try:
        envelope = Envelope(
            queue_id=row[0],
            received_at=_utc(row[1]),
            client_ip=row[2],
            client_port=int(row[3]),
            greeting=row[4],
            greeting_name=row[5],
            mail_from=row[6],
            mail_params=json.loads(row[7]),
            rcpt_to=json.loads(row[8]),
            tls=json.loads(row[9]) if row[9] else None,
            protocol=row[10],
            server_name=row[11],
            extra=json.loads(row[12]),
            size_received=int(row[15]) if row[15] is not None else None,
        )
    except (TypeError, ValueError) as exc:
        raise StoreError(f"message {row[0]}: bad envelope row: {exc}") from None
    return StoredMessage(
        envelope=envelope,
        size=int(row[13]),
        subject=row[14],
        attachments=None if row[16] is None else bool(row[16]),
    )


def _one_snapshot(conn: Any) -> None:
    """Make the rest of the transaction read one snapshot (first statement only)."""
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")


# --- single messages ---------------------------------------------------------------


def count(conn: Any) -> int:
    return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])


def get(conn: Any, queue_id: str) -> StoredMessage | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM messages WHERE queue_id = %s", (queue_id,)
    ).fetchone()
    return _message(row) if row is not None else None


def _body(conn: Any, queue_id: str, size: int) -> bytes:
    """A stored body: its chunk rows in order, read one row at a time.

    Raises StoreError when they do not add up to the message's size (a
    body is committed whole with its row, so this is damage, not a race).
    """
    if not size:
        return b""
    with conn.cursor(binary=True) as cursor:  # bytea as it is stored, not as hex text
        pieces = [
            data
            for (data,) in cursor.stream(
                "SELECT data FROM chunks WHERE queue_id = %s ORDER BY seq", (queue_id,)
            )
        ]
    found = sum(len(piece) for piece in pieces)
    if found != size:
        raise StoreError(f"message {queue_id}: body: {found} octets stored, expected {size}")
    data = b"".join(pieces)
    pieces.clear()
    return data


def raw(conn: Any, queue_id: str) -> bytes | None:
    _one_snapshot(conn)
    row = conn.execute("SELECT size FROM messages WHERE queue_id = %s", (queue_id,)).fetchone()
    if row is None:
        return None
    return _body(conn, queue_id, int(row[0]))


def read(conn: Any, queue_id: str) -> tuple[StoredMessage, bytes] | None:
    _one_snapshot(conn)
    stored = get(conn, queue_id)
    if stored is None:
        return None
    return stored, _body(conn, queue_id, stored.size)


# --- queries -------------------------------------------------------------------------


def _conditions(query: Query) -> tuple[list[str], list[Any]]:
    """The SQL conditions (all must hold) of a query's filters, and their parameters.

    Words of the body are not among them (tested in Python); an excluded
    sub-query is ``NOT`` of its conditions, NULL counting as false.
    """
    where: list[str] = []
    params: list[Any] = []
    for needle, column in (
        (query.mail_from, "s_mail_from"),
        (query.rcpt_to, "s_rcpt_to"),
        (query.subject, "s_subject"),
        (query.helo, "s_helo"),
    ):
        if needle is not None:
            where.append(f"strpos({column}, %s) > 0")
            params.append(fold(needle))
    if query.since is not None:
        where.append("received_at >= %s")
        params.append(_utc(query.since))
    if query.until is not None:
        where.append("received_at < %s")
        params.append(_utc(query.until))
    if query.greeting is not None:
        where.append("upper(greeting) = %s")
        params.append(query.greeting.upper())
    if query.tls is not None:
        where.append("s_tls = %s")
        params.append(bool(query.tls))
    if query.auth is not None:
        where.append("s_auth = %s")
        params.append(fold(query.auth))
    for name, result in query.checks:
        where.append("strpos(s_checks, %s) > 0")
        params.append(fold(f"\n{name}={result}\n"))
    if query.attachments is not None:
        where.append("attachments" if query.attachments else "NOT coalesce(attachments, false)")
    for sub in query.exclude:
        if sub.needs_body:
            continue  # tested in Python, with the words
        conditions, values = _conditions(sub)
        where.append(f"NOT coalesce(({' AND '.join(conditions) or 'true'}), false)")
        params += values
    return where, params


def _bound(conn: Any, queue_id: str) -> tuple[_dt.datetime, str]:
    """The sort key of the message ``queue_id`` (a page bound); NoSuchMessage if none."""
    found = conn.execute(
        "SELECT received_at, queue_id FROM messages WHERE queue_id = %s", (queue_id,)
    ).fetchone()
    if found is None:
        raise NoSuchMessage(f"no message with id {queue_id!r}")
    return found[0], found[1]


@dataclasses.dataclass(slots=True)
class _Pages:
    """Where a query's scan is: its fixed conditions and the key of the last row read."""

    where: list[str]
    params: list[Any]
    ascending: bool
    last: tuple[_dt.datetime, str] | None = None  # (received_at, queue_id)
    end: tuple[str, list[Any]] | None = None  # the bound the scan goes towards

    def sql(self, columns: str, limit: int) -> tuple[str, list[Any]]:
        where, params = list(self.where), list(self.params)
        op, order = (">", "ASC") if self.ascending else ("<", "DESC")
        if self.last is not None:
            where.append(f"(received_at, queue_id) {op} (%s, %s)")
            params += list(self.last)
        sql = (
            f"SELECT {columns} FROM messages"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + f" ORDER BY received_at {order}, queue_id {order} LIMIT %s"
        )
        return sql, [*params, limit]


def _pages(conn: Any, query: Query, ascending: bool) -> _Pages:
    """The scan of ``query`` (its page bounds looked up), newest first or oldest first."""
    where, params = _conditions(query)
    start: tuple[_dt.datetime, str] | None = None
    for bound, op in ((query.before, "<"), (query.after, ">")):
        if bound is None:
            continue
        key = _bound(conn, bound)
        # The scan starts from one bound (its key is the first "last row");
        # the other is a condition.
        if (op == ">") == ascending:
            start = key
        else:
            where.append(f"(received_at, queue_id) {op} (%s, %s)")
            params += list(key)
    return _Pages(where, params, ascending, start)


def search(db: Database, query: Query) -> Iterator[StoredMessage]:
    """The selected messages, newest first, read a page at a time."""
    # The page just newer than ``after`` is read upwards, then turned round.
    reverse = query.limit is not None and query.after is not None and query.before is None
    found = _scan(db, query, ascending=reverse)
    if not reverse:
        yield from found
        return
    yield from list(found)[::-1]


def _scan(db: Database, query: Query, *, ascending: bool) -> Iterator[StoredMessage]:
    """The messages ``query`` selects (its limit counted), in the order asked."""
    left = query.limit
    if left is not None and left <= 0:
        with db.connection() as conn:  # the bounds must still name messages
            _pages(conn, query, ascending)
        return
    pages: _Pages | None = None
    while left is None or left > 0:
        with db.connection() as conn:
            if pages is None:
                pages = _pages(conn, query, ascending)
            if query.needs_body:
                picked, done = _words_page(conn, query, pages, left)
            else:
                size = PAGE if left is None else min(left, PAGE)
                sql, params = pages.sql(_COLUMNS, size)
                picked = [_message(row) for row in conn.execute(sql, params)]
                done = len(picked) < size
                if picked:
                    env = picked[-1].envelope
                    pages.last = (env.received_at, env.queue_id)
        yield from picked  # no connection held while the caller works
        if left is not None:
            left -= len(picked)
        if done:
            return


def _words_page(
    conn: Any, query: Query, pages: _Pages, left: int | None
) -> tuple[list[StoredMessage], bool]:
    """One page of candidates of a query with words of the body, tested in Python.

    With only words to test in Python (what ``q=`` makes) a candidate's
    envelope is read once its words match; otherwise it is tested whole.
    Returns the matches (at most ``left``) and whether the scan is over.
    """
    light = query.plain_words
    columns = "queue_id, received_at, s_subject, size" if light else f"{_COLUMNS}, s_subject"
    sql, params = pages.sql(columns, WORDS_PAGE)
    rows = conn.execute(sql, params).fetchall()
    picked: list[StoredMessage] = []
    for row in rows:
        pages.last = (row[1], row[0])
        queue_id = row[0]
        if light:
            size = int(row[3])
            text = functools.partial(_body_text, conn, queue_id, size)
            if not query.words_match(row[2], text):
                continue
            message = get(conn, queue_id)
            if message is None:
                continue
        else:
            message = _message(row)
            text = functools.partial(_body_text, conn, queue_id, message.size)
            if not query.matches(message, text):
                continue
        picked.append(message)
        if left is not None and len(picked) >= left:
            return picked, True
    return picked, len(rows) < WORDS_PAGE


def _body_text(conn: Any, queue_id: str, size: int) -> str:
    """The searchable text of a stored body ("" when it cannot be read)."""
    try:
        return body_text(_body(conn, queue_id, size))
    except StoreError:
        return ""


def list_messages(conn: Any, limit: int | None) -> Sequence[StoredMessage]:
    sql = f"SELECT {_COLUMNS} FROM messages ORDER BY received_at DESC, queue_id DESC"
    if limit is None:
        return [_message(row) for row in conn.execute(sql)]
    return [_message(row) for row in conn.execute(sql + " LIMIT %s", (max(limit, 0),))]


# --- what is new -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotMark:
    """Where ``newer`` stopped: the database's snapshot at that read (``xmin:xmax:xip``).

    A message row carries the id of the transaction that wrote it (the
    ``xid`` column). It was already seen when that transaction was
    committed at the mark's snapshot (``pg_visible_in_snapshot``); any
    other row visible now is new, including one whose transaction began
    before the mark and committed after it (a newest-row mark would miss
    it). Every such row's xid is at least the snapshot's ``xmin``, so only
    those rows are read (the index ``messages_xid``): when nothing is new,
    an empty range.
    """

    snapshot: str
    xmax: int  # the snapshot's xmax: a later mark never has a smaller one


def _xmax(snapshot: str) -> int:
    return int(snapshot.split(":")[1])


def _newer_rows(conn: Any, mark: object | None, columns: str) -> tuple[list[Any], SnapshotMark]:
    """The rows committed since ``mark`` (oldest first) and the mark of now.

    One statement: the snapshot it reads with is the snapshot it reports.
    """
    if not isinstance(mark, SnapshotMark):  # a mark from another store counts as none
        snapshot = str(conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0])
        return [], SnapshotMark(snapshot, _xmax(snapshot))
    rows = conn.execute(
        f"SELECT pg_current_snapshot()::text, m.* FROM (SELECT 1) one"
        f" LEFT JOIN LATERAL (SELECT seq, {columns} FROM messages"
        "  WHERE xid >= pg_snapshot_xmin(%s::pg_snapshot)"
        "  AND NOT pg_visible_in_snapshot(xid, %s::pg_snapshot)) m ON true"
        " ORDER BY m.seq",
        (mark.snapshot, mark.snapshot),
    ).fetchall()
    snapshot = str(rows[0][0])
    now = SnapshotMark(snapshot, _xmax(snapshot))
    if mark.xmax > now.xmax:  # the database went back (restored from a backup)
        return [], now
    return [row[2:] for row in rows if row[1] is not None], now


def newer(conn: Any, mark: object | None) -> tuple[Sequence[StoredMessage], object]:
    rows, now = _newer_rows(conn, mark, _COLUMNS)
    return [_message(row) for row in rows], now


def newer_ids(conn: Any, mark: object | None) -> tuple[Sequence[str], object]:
    rows, now = _newer_rows(conn, mark, "queue_id")
    return [str(row[0]) for row in rows], now


# --- the overview and the session log ---------------------------------------------------


def overview(conn: Any, since: _dt.datetime) -> Overview:
    """The overview in SQL: grouped counts over the window's rows, from one snapshot.

    The same groups as the SQLite store's: minutes (UTC), then greeting
    verb, TLS and the folded check results together, then the client
    names (lower case, most first, then by name as code points).
    """
    found = Overview()
    _one_snapshot(conn)
    start = _utc(since)
    for minute, n in conn.execute(
        "SELECT to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI'), count(*)"
        " FROM messages WHERE received_at >= %s GROUP BY 1",
        (start,),
    ):
        found.per_minute[minute] = int(n)
        found.total += int(n)
    if not found.total:
        return found
    for verb, tls, checks, n in conn.execute(
        "SELECT upper(greeting), s_tls, s_checks, count(*) FROM messages"
        " WHERE received_at >= %s GROUP BY 1, 2, 3",
        (start,),
    ):
        found.greetings[verb] = found.greetings.get(verb, 0) + int(n)
        found.tls["yes" if tls else "no"] += int(n)
        # "\nname=result\n..." (folded): one group per combination of results.
        for pair in checks.split("\n"):
            name, sep, result = pair.partition("=")
            if sep:
                found.add_check(name, result, int(n))
    found.top_names = [
        (name, int(n))
        for name, n in conn.execute(
            "SELECT lower(greeting_name) AS name, count(*) AS n FROM messages"
            " WHERE received_at >= %s GROUP BY 1"
            ' ORDER BY 2 DESC, lower(greeting_name) COLLATE "C" LIMIT %s',
            (start, TOP_NAMES),
        )
    ]
    return found


def sessions(conn: Any, limit: int, before: str | None) -> list[dict[str, Any]]:
    """Logged sessions, newest first (by ``seq``), older than the session ``before``."""
    if before is None:
        cursor = conn.execute(
            "SELECT record FROM sessions ORDER BY seq DESC LIMIT %s", (max(limit, 0),)
        )
    else:
        found = conn.execute("SELECT max(seq) FROM sessions WHERE id = %s", (before,)).fetchone()
        if found is None or found[0] is None:
            raise StoreError(f"no session with id {before!r}")
        cursor = conn.execute(
            "SELECT record FROM sessions WHERE seq < %s ORDER BY seq DESC LIMIT %s",
            (found[0], max(limit, 0)),
        )
    try:
        return [json.loads(record) for (record,) in cursor]
    except ValueError as exc:
        raise StoreError(f"postgresql: sessions: {exc}") from None


# --- deletes ---------------------------------------------------------------------------


def delete(conn: Any, ids: list[str]) -> Sequence[str]:
    """Delete messages (rows, chunks, pending queue entries) for good; the ids that were there.

    A batch of :data:`DELETE_BATCH` per transaction; each commit tells the
    other nodes (``NOTIFY ehlo_messages`` with an empty payload).
    """
    wanted = list(dict.fromkeys(ids))
    gone: set[str] = set()
    for start in range(0, len(wanted), DELETE_BATCH):
        batch = wanted[start : start + DELETE_BATCH]
        found = [
            row[0]
            for row in conn.execute(
                "DELETE FROM messages WHERE queue_id = ANY(%s) RETURNING queue_id", (batch,)
            )
        ]
        if found:
            # Only the chunks of messages that were there: those of a body
            # still being written belong to its writer.
            conn.execute("DELETE FROM chunks WHERE queue_id = ANY(%s)", (found,))
            # A deleted message is not handed on; what was done stays in the history.
            conn.execute(
                f"DELETE FROM queue WHERE queue_id = ANY(%s) AND state IN {_PENDING}", (found,)
            )
            conn.execute("SELECT pg_notify(%s, '')", (CHANNEL_MESSAGES,))
        conn.commit()
        gone.update(found)
    return [queue_id for queue_id in wanted if queue_id in gone]


def delete_matching(db: Database, query: Query) -> int:
    """Delete what ``query`` selects, oldest first, a batch at a time; how many.

    One scan: a batch is deleted as soon as it is gathered, and the scan
    goes on after its last row (newer mail arriving meanwhile is not in its
    way, and no candidate is tested twice).
    """
    deleted = 0
    found = (
        m.envelope.queue_id
        for m in _scan(db, dataclasses.replace(query, limit=None), ascending=True)
    )
    while True:
        batch = list(itertools.islice(found, DELETE_BATCH))
        if not batch:
            return deleted
        with db.connection() as conn:
            deleted += len(delete(conn, batch))


def prune(conn: Any, retention: Retention, limit: int) -> int:
    """Delete at most ``limit`` of the oldest messages beyond ``retention``; how many.

    As the SQLite store prunes: those received before ``keep_days`` (by
    the database's clock), then the oldest beyond ``keep_messages``; a
    message with recipients still to hand on is kept.
    """
    if not retention.active:
        return 0
    ids: list[str] = []
    if retention.keep_days > 0:
        ids = [
            row[0]
            for row in conn.execute(
                "SELECT queue_id FROM messages"
                " WHERE received_at < now() - make_interval(secs => %s)"
                f" AND {_UNQUEUED} ORDER BY received_at, queue_id LIMIT %s",
                (retention.keep_days * 86400.0, limit),
            )
        ]
    if retention.keep_messages > 0 and len(ids) < limit:
        total = count(conn)
        excess = min(total - retention.keep_messages, limit)
        if excess > 0:
            ids += [
                row[0]
                for row in conn.execute(
                    f"SELECT queue_id FROM messages WHERE {_UNQUEUED}"
                    " ORDER BY received_at, queue_id LIMIT %s",
                    (excess,),
                )
            ]
    return len(delete(conn, ids[: limit * 2]))
