"""The search language of ``q=``: its parser, and its meaning in both stores.

Five messages with known envelopes and bodies are written through the
store API into a SQLite store and a Maildir store; every operator, as
written and negated, must select the same messages from both (the SQLite
store in SQL, the Maildir store with ``Query.matches``), and the same
again through ``GET /api/v1/messages?q=``. Also: the parser's errors, the
attachment test over any split of the bytes, and the SQLite upgrade that
fills the new search columns of an older database.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import json
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from ehlo.ids import _PAIRS
from ehlo.storage import Envelope, Query, Store, open_store, sqlite_path
from ehlo.storage._query import AttachmentSniffer, has_attachment
from ehlo.storage._sqlite_db import SCHEMA_VERSION
from ehlo.storage.base import JSONText
from ehlo.web.search import parse_query

from .test_web_messages import API, api, get_json

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def checks(result: str) -> JSONText:
    return JSONText(json.dumps({"forward_match": {"result": result, "reason": "", "evidence": {}}}))


def id_at(when: dt.datetime, n: int) -> str:
    """A queue id of ``when`` (ids sort as the messages were received)."""
    value = int(when.timestamp() * 1000) << 32 | n
    return "".join(_PAIRS[value >> shift & 1023] for shift in range(70, -1, -10))


ATTACHED = (
    b"Subject: m1 report\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
    b"--B\r\nContent-Type: text/plain\r\n\r\nsee the attached invoice\r\n"
    b"--B\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment;"
    b' filename="a.pdf"\r\n\r\n%PDF\r\n--B--\r\n'
)
ENCODED = (
    b"Subject: m2 fruit\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n"
    + base64.encodebytes("a secret BANANA, épicée\n".encode())
)
FOLDED = (
    b"Subject: m4 folded\r\nContent-Type: multipart/mixed; boundary=C\r\n\r\n"
    b"--C\r\nContent-Type: image/gif\r\nContent-Disposition:\r\n attachment\r\n\r\nGIF89a\r\n"
    b"--C--\r\n"
)
# Message i: its envelope fields and its bytes (received i days after T0).
MESSAGES: list[tuple[dict[str, Any], bytes]] = [
    (
        dict(mail_from="alice@a.example", rcpt_to=["bob@b.example"], greeting="EHLO",
             greeting_name="mx.a.example", tls=True, auth="alice", checks="pass"),
        b"Subject: m0 greetings\r\n\r\nhello world, in plain text\r\n",
    ),
    (
        dict(mail_from="carol@c.example", rcpt_to=["dave@d.example"], greeting="HELO",
             greeting_name="laptop.local", tls=False, auth=None, checks="fail"),
        ATTACHED,
    ),
    (
        dict(mail_from="Alice@A.example", rcpt_to=["eve@e.example"], greeting="EHLO",
             greeting_name="MX.A.example", tls=False, auth=None, checks="fail"),
        ENCODED,
    ),
    (
        dict(mail_from="mallory@m.example", rcpt_to=["bob@b.example", "Dave@D.example"],
             greeting="EHLO", greeting_name="relay.m.example", tls=True, auth="Mallory",
             checks=None),
        b"Subject: Invoice 42\r\n\r\nnothing to see\r\n",
    ),
    (
        dict(mail_from="", rcpt_to=["bob@b.example"], greeting="HELO",
             greeting_name="[127.0.0.1]", tls=False, auth=None, checks=None),
        FOLDED,
    ),
]  # fmt: skip

# Each query and the messages it selects, newest first. A query of one term
# is also tried negated ("-" before it), which selects the other messages.
CASES = [
    ("from:alice", [2, 0]),
    ("to:dave", [3, 1]),
    ("subject:report", [1]),
    ("helo:mx.a", [2, 0]),
    ("greeting:helo", [4, 1]),
    ("greeting:EHLO", [3, 2, 0]),
    ("check:forward_match=fail", [2, 1]),
    ("check:forward_match=PASS", [0]),
    ("tls:yes", [3, 0]),
    ("tls:no", [4, 2, 1]),
    ("auth:mallory", [3]),
    ("auth:mall", []),
    ("after:2026-03-03", [4, 3, 2]),
    ("before:2026-03-03", [1, 0]),
    ("after:2026-03-02T12:00:00+02:00", [4, 3, 2]),
    ("has:attachment", [4, 1]),
    ("banana", [2]),
    ("épicée", [2]),
    ("invoice", [3, 1]),
    ('"hello world"', [0]),
    ("hello world", [0]),
    ("from:alice -tls:yes", [2]),
    ("-from:alice -to:bob", [1]),
    ("to:bob -greeting:helo has:attachment", []),
    ("to:bob -auth:alice -invoice", [4]),
    ('subject:"m1 report" invoice', [1]),
]
ALL = [4, 3, 2, 1, 0]


def with_negations() -> list[tuple[str, list[int]]]:
    """CASES, and each query of one term negated with the other messages."""
    out = []
    for q, expected in CASES:
        out.append((q, expected))
        if " " not in q or (q[0] == q[-1] == '"' and q.count('"') == 2):
            out.append(("-" + q, [i for i in ALL if i not in expected]))
    return out


def envelope(i: int) -> Envelope:
    fields = dict(MESSAGES[i][0])
    extra: dict[str, Any] = {}
    if fields.pop("auth"):
        extra["auth"] = {"user": MESSAGES[i][0]["auth"], "mechanism": "PLAIN"}
    result = fields.pop("checks")
    if result:
        extra["greeting_checks"] = checks(str(result))
    when = T0 + dt.timedelta(days=i)
    return Envelope(
        queue_id=id_at(when, i),
        client_ip="127.0.0.1",
        client_port=40000 + i,
        mail_from=str(fields["mail_from"]),
        mail_params={},
        rcpt_to=list(fields["rcpt_to"]),
        greeting=str(fields["greeting"]),
        greeting_name=str(fields["greeting_name"]),
        received_at=when,
        tls={"version": "TLSv1.3", "cipher": "X"} if fields["tls"] else None,
        extra=extra,
    )


async def fill(store: Store) -> None:
    await store.start()
    try:
        for i, (_, data) in enumerate(MESSAGES):
            writer = store.begin(envelope(i))
            for start in range(0, len(data), 13):  # in pieces, as a session writes
                writer.write(data[start : start + 13])
            await writer.commit()
    finally:
        await store.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Store]:
    """The messages in a store of each kind (written once, then only read)."""
    made = {}
    for kind in ("sqlite", "maildir"):
        store = open_store(kind, tmp_path_factory.mktemp(kind), writer="thread")
        asyncio.run(fill(store))
        made[kind] = store
    return made


def numbers(store: Store, query: Query) -> list[int]:
    by_id = {envelope(i).queue_id: i for i in range(len(MESSAGES))}
    return [by_id[m.envelope.queue_id] for m in store.search(query)]


@pytest.mark.parametrize(("q", "expected"), CASES, ids=[q for q, _ in CASES])
async def test_both_stores_agree(stores: dict[str, Store], q: str, expected: list[int]) -> None:
    # The query as written, and negated when it is one term.
    for text, selected in with_negations()[_position(q) : _position(q) + 2]:
        if text not in (q, "-" + q):
            break
        query = parse_query(text)
        assert numbers(stores["sqlite"], query) == selected, text
        assert numbers(stores["maildir"], query) == selected, text
        # The same with a limit and paging (words are tested after the SQL).
        if len(selected) >= 2:
            first = dataclasses.replace(query, limit=1)
            assert numbers(stores["sqlite"], first) == selected[:1]
            assert numbers(stores["maildir"], first) == selected[:1]
            rest = dataclasses.replace(query, before=envelope(selected[0]).queue_id)
            assert numbers(stores["sqlite"], rest) == selected[1:]
            assert numbers(stores["maildir"], rest) == selected[1:]
            newer = dataclasses.replace(query, after=envelope(selected[-1]).queue_id, limit=1)
            assert numbers(stores["sqlite"], newer) == selected[-2:-1]
            assert numbers(stores["maildir"], newer) == selected[-2:-1]


def _position(q: str) -> int:
    return [text for text, _ in with_negations()].index(q)


async def test_the_api_searches_the_same(stores: dict[str, Store]) -> None:
    by_id = {envelope(i).queue_id: i for i in range(len(MESSAGES))}
    for kind in ("sqlite", "maildir"):
        async with api(stores[kind]) as session:
            for q, expected in with_negations():
                page = await get_json(session, f"{API}/messages?q={urllib.parse.quote(q)}")
                assert [by_id[item["id"]] for item in page["messages"]] == expected, (kind, q)
                assert page["total"] == len(MESSAGES)
            listed = await get_json(session, f"{API}/messages")
            flags = {by_id[item["id"]]: item.get("has_attachments") for item in listed["messages"]}
            assert flags == {0: False, 1: True, 2: False, 3: False, 4: True}


async def test_deleting_by_a_query_with_words(tmp_path: Path) -> None:
    for kind in ("sqlite", "maildir"):
        store = open_store(kind, tmp_path / kind)
        await fill(store)
        assert store.delete_matching(parse_query("-has:attachment invoice")) == 1
        assert numbers(store, Query()) == [4, 2, 1, 0]
        assert store.delete_matching(parse_query("-from:alice")) == 2
        assert numbers(store, Query()) == [2, 0]


@pytest.mark.parametrize(
    ("q", "says"),
    [
        ("color:red", "unknown search operator 'color:'"),
        ("-Color:red", "unknown search operator 'color:'"),
        ("greeting:smtp", "greeting: expects helo or ehlo"),
        ("tls:maybe", "tls: expects yes or no"),
        ("has:wings", "has: expects attachment"),
        ("check:forward_match", "check: expects NAME=RESULT"),
        ("check:=fail", "check: expects NAME=RESULT"),
        ("after:yesterday", "after: expects an ISO date"),
        ("before:2026-13-01", "before: expects an ISO date"),
        ("from:", "from: needs a value"),
        ('subject:"open', "unterminated quote"),
        ('"a"b', "a space must follow the closing quote"),
        ("to:a to:b", "to: given twice"),
        ('""', "empty search term"),
        ("x" * 2001, "query too long"),
    ],
)
def test_bad_queries_name_the_problem(q: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_query(q)
    assert says in str(caught.value)


def test_terms_parse_to_fields() -> None:
    query = parse_query(
        'from:a@x to:"b c" subject:s helo:h greeting:EHLO check:spf=pass check:fcrdns=fail'
        ' tls:no auth:U after:2026-01-02 before:2026-01-03T04:05Z has:attachment w1 "w 2"'
        " -from:z - -x"
    )
    assert query.mail_from == "a@x" and query.rcpt_to == "b c" and query.subject == "s"
    assert query.helo == "h" and query.greeting == "EHLO" and query.tls is False
    assert query.checks == (("spf", "pass"), ("fcrdns", "fail"))
    assert query.auth == "U" and query.attachments is True
    assert query.since == dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    assert query.until == dt.datetime(2026, 1, 3, 4, 5, tzinfo=dt.UTC)
    assert query.words == ("w1", "w 2", "-")
    assert query.exclude == (Query(mail_from="z"), Query(words=("x",)))


@pytest.mark.parametrize("data", [ATTACHED, FOLDED, ENCODED, MESSAGES[0][1]])
def test_attachment_found_in_any_split(data: bytes) -> None:
    expected = has_attachment(data)
    assert expected == (data in (ATTACHED, FOLDED))
    for size in (1, 2, 7, 31, 64, 65, 200, len(data)):
        sniffer = AttachmentSniffer()
        for start in range(0, len(data), size):
            sniffer.feed(data[start : start + size])
        assert sniffer.found == expected, size
    # Not at the start of a line: not a field.
    head = b"Subject: x\r\nContent-Type: multipart/mixed; boundary=z\r\n\r\n"
    sniffer = AttachmentSniffer()
    for piece in (head + b"y" * 100, b"Content-Disposition: attachment\r\n"):
        sniffer.feed(piece)
    assert not sniffer.found
    assert not has_attachment(head + b"y" * 100 + b"Content-Disposition: attachment\r\n")
    # At the start of a line, but in a message that is not a multipart: text.
    plain = b"Subject: x\r\n\r\nContent-Disposition: attachment\r\n"
    assert not has_attachment(plain)
    assert has_attachment(head + b"Content-Disposition: attachment\r\n")
    assert has_attachment(b"Content-Disposition: ATTACHMENT; filename=x\r\n\r\nx")


async def test_an_older_sqlite_store_gains_the_new_columns(tmp_path: Path) -> None:
    # A store written before version 2: no helo or attachments in its search
    # table. The first reader upgrades it; the new filters then find its mail.
    store = open_store("sqlite", tmp_path, writer="thread")
    await fill(store)
    path = sqlite_path(tmp_path)
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE search DROP COLUMN helo")
        conn.execute("ALTER TABLE search DROP COLUMN attachments")
        conn.execute("PRAGMA user_version=1")
    older = open_store("sqlite", tmp_path)
    assert numbers(older, parse_query("helo:mx.a")) == [2, 0]
    assert numbers(older, parse_query("has:attachment")) == [4, 1]
    assert numbers(older, parse_query("-has:attachment")) == [3, 2, 0]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT count(*) FROM search").fetchone()[0] == len(MESSAGES)


def test_a_negated_sub_query_with_words_and_fields(stores: dict[str, Store]) -> None:
    # Not what q= makes, but a Query may say it: leave out what has the word
    # AND came over TLS (the words and the TLS test together, in Python).
    query = Query(exclude=(Query(words=("invoice",), tls=True),))
    assert numbers(stores["sqlite"], query) == [4, 2, 1, 0]
    assert numbers(stores["maildir"], query) == [4, 2, 1, 0]
    query = Query(words=("see",), exclude=(Query(words=("attached",), greeting="EHLO"),))
    assert numbers(stores["sqlite"], query) == [3, 1]
    assert numbers(stores["maildir"], query) == [3, 1]


async def test_large_bodies_are_searched_too(tmp_path: Path) -> None:
    # Larger than one SQLite chunk (a body file of its own): the attachment
    # is found in the pieces as they are written, the word read from the file.
    filler = b"filler line of a long text part\r\n" * 12_000  # about 400 KiB
    large = (
        b"Subject: large\r\nContent-Type: multipart/mixed; boundary=L\r\n\r\n"
        b"--L\r\nContent-Type: text/plain\r\n\r\n" + filler + b"needle at the end\r\n"
        b"--L\r\nContent-Type: text/csv\r\nContent-Disposition: attachment;"
        b" filename=big.csv\r\n\r\na,b\r\n--L--\r\n"
    )
    small = b"Subject: small\r\n\r\nno needle here? yes: needle\r\n"
    plain_large = b"Subject: plain large\r\n\r\n" + filler
    for kind in ("sqlite", "maildir"):
        store = open_store(kind, tmp_path / kind, writer="thread")
        await store.start()
        try:
            for n, data in enumerate((large, small, plain_large)):
                writer = store.begin(envelope(n))
                for start in range(0, len(data), 65536):
                    writer.write(data[start : start + 65536])
                await writer.commit()
        finally:
            await store.close()
        assert numbers(store, parse_query("has:attachment")) == [0], kind
        assert numbers(store, parse_query("needle")) == [1, 0], kind
        assert numbers(store, parse_query('"needle at the end"')) == [0], kind
        assert numbers(store, parse_query("filler -has:attachment")) == [2], kind
