"""Storage backends: exact bytes, envelopes, subjects, group commit, crashes.

Everything runs against real files and real SQLite under ``tmp_path``; the
crash tests SIGKILL a child process that uses the store.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import json
import os
import queue
import random
import select
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ehlo.ids import new_queue_id
from ehlo.storage import (
    Envelope,
    MaildirStore,
    NullStore,
    Query,
    SQLiteStore,
    Store,
    StoreError,
    _wire,
    open_store,
)
from ehlo.storage._batch import BatchWriter, Commit
from ehlo.storage._sqlite_db import SCHEMA_VERSION, search_row
from ehlo.storage._sqlite_process import WriterProcess
from ehlo.storage.base import HeaderSniffer, JSONText, extract_subject
from ehlo.storage.sqlite import CHUNK_SIZE

KINDS = ["sqlite", "maildir"]
T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


def make_envelope(**changes: object) -> Envelope:
    fields: dict[str, object] = {
        "queue_id": new_queue_id(),
        "client_ip": "192.0.2.7",
        "client_port": 40123,
        "greeting": "EHLO",
        "greeting_name": "mx.example.org",
        "mail_from": "alice@example.org",
        "mail_params": {"SIZE": "1234", "BODY": "8BITMIME"},
        "rcpt_to": ["bob@example.net", "carol@example.net"],
        "received_at": dt.datetime.now(dt.UTC),
    }
    fields.update(changes)
    return Envelope(**fields)  # type: ignore[arg-type]


def pieces(data: bytes, sizes: tuple[int, ...] = (1, 7, 100, 4093, 65536)) -> list[bytes]:
    """``data`` cut at irregular places, as the network delivers it."""
    out, pos, i = [], 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        out.append(data[pos : pos + size])
        pos += size
        i += 1
    return out


async def deliver(store: Store, body: bytes, envelope: Envelope | None = None) -> str:
    writer = store.begin(envelope or make_envelope())
    for piece in pieces(body):
        writer.write(piece)
    return await writer.commit()


@pytest.fixture(params=[*KINDS, "sqlite-thread"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite-thread":  # the writer in a thread of this process
        opened: Store = SQLiteStore(tmp_path / "data" / "ehlo.sqlite3", writer="thread")
    else:
        opened = open_store(request.param, tmp_path / "data")
    await opened.start()
    yield opened
    await opened.close()


def spooled_files(store: SQLiteStore) -> list[str]:
    """Bodies in any spool folder (being received, or left by a crash)."""
    return sorted(
        str(p.relative_to(store.bodies))
        for p in (store.bodies / ".spool").rglob("*")
        if p.is_file() and p.suffix not in (".lock", ".new")
    )


def final_bodies(store: SQLiteStore) -> list[str]:
    """Body files under their final names."""
    return sorted(name for name in os.listdir(store.bodies) if name != ".spool")


def sqlite_rows(path: Path, query: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


# --- round trips -----------------------------------------------------------------


async def test_bytes_round_trip_exactly(store: Store) -> None:
    body = (
        b"Received: from mx.example.org\r\n"
        b"Subject: caf\xc3\xa9 \xff\r\n"
        b"\r\n" + bytes(range(256)) * 3 + b"\r\n.\r\n..dot\nbare lf\rbare cr\r\n\x00\x80\xfe"
    )
    queue_id = await deliver(store, body)
    assert store.raw(queue_id) == body
    stored = store.get(queue_id)
    assert stored is not None and stored.size == len(body)


async def test_empty_message(store: Store) -> None:
    queue_id = await deliver(store, b"")
    assert store.raw(queue_id) == b""
    stored = store.get(queue_id)
    assert stored is not None and stored.size == 0 and stored.subject is None


async def test_large_message_reassembled(store: Store, tmp_path: Path) -> None:
    body = b"Subject: big\r\n\r\n" + random.Random(1).randbytes(3 * 1024 * 1024 + 12345)
    queue_id = await deliver(store, body)
    assert store.raw(queue_id) == body
    stored = store.get(queue_id)
    assert stored is not None and stored.size == len(body) and stored.subject == "big"
    if isinstance(store, SQLiteStore):
        # Larger than one chunk: the body is a file of its own, not rows, for
        # its owner's eyes only.
        assert (store.bodies / queue_id).read_bytes() == body
        assert stat.S_IMODE((store.bodies / queue_id).stat().st_mode) == 0o600
        assert stat.S_IMODE(store.bodies.stat().st_mode) == 0o700
        assert sqlite_rows(store.path, f"SELECT * FROM chunks WHERE queue_id = '{queue_id}'") == []
        assert spooled_files(store) == []  # linked under its name, the spool name gone


@pytest.mark.parametrize("extra", [0, 1])
async def test_sqlite_one_chunk_is_a_row_one_more_octet_a_file(
    extra: int, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "ehlo.sqlite3")
    await store.start()
    body = random.Random(extra).randbytes(CHUNK_SIZE + extra)
    queue_id = await deliver(store, body)
    assert store.raw(queue_id) == body
    rows = sqlite_rows(store.path, f"SELECT length(data) FROM chunks WHERE queue_id = '{queue_id}'")
    assert rows == ([] if extra else [(CHUNK_SIZE,)])
    assert (store.bodies / queue_id).exists() is bool(extra)
    await store.close()


async def test_envelope_round_trip(store: Store) -> None:
    envelope = make_envelope(
        mail_from="",
        mail_params={"SMTPUTF8": None, "SIZE": "99"},
        rcpt_to=["j\u00f6rg@b\u00fccher.example"],
        tls={"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"},
        protocol="UTF8SMTPS",
        server_name="ehlo.test",
        extra={"verified": {"fcrdns": True}},
        received_at=dt.datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC),
    )
    queue_id = await deliver(store, b"Subject: hi\r\n\r\nbody\r\n", envelope)
    assert queue_id == envelope.queue_id
    stored = store.get(queue_id)
    assert stored is not None
    assert stored.envelope == envelope
    assert stored.subject == "hi"
    data = stored.envelope.to_json()
    for key in (
        "id",
        "received_at",
        "client_ip",
        "client_port",
        "greeting",
        "greeting_name",
        "mail_from",
        "mail_params",
        "rcpt_to",
        "tls",
        "protocol",
        "server_name",
        "extra",
    ):
        assert key in data
    assert data["id"] == queue_id and data["tls"]["version"] == "TLSv1.3"
    assert json.loads(json.dumps(data)) == data


async def test_extra_given_as_json_text_is_stored_as_its_value(store: Store) -> None:
    checks = {"syntax": {"result": "pass", "reason": "ok \u00e9", "evidence": {}}}
    envelope = make_envelope(
        extra={
            "greeting_checks": JSONText(json.dumps(checks, ensure_ascii=False)),
            "violations": ["pipelining"],
            "note": {"x": 1},
        }
    )
    queue_id = await deliver(store, b"Subject: j\r\n\r\nbody\r\n", envelope)
    stored = store.get(queue_id)
    assert stored is not None
    assert stored.envelope.extra == {
        "greeting_checks": checks, "violations": ["pipelining"], "note": {"x": 1}}
    data = envelope.to_json()
    assert data["greeting_checks"] == checks and data["extra"] == {"note": {"x": 1}}


async def test_envelope_completed_before_commit_is_stored(store: Store) -> None:
    envelope = make_envelope()
    writer = store.begin(envelope)
    writer.write(b"x\r\n")
    envelope.rcpt_to.append("late@example.net")
    envelope.extra["spf"] = "pass"
    queue_id = await writer.commit()
    stored = store.get(queue_id)
    assert stored is not None
    assert stored.envelope.rcpt_to[-1] == "late@example.net"
    assert stored.envelope.extra == {"spf": "pass"}


# --- subjects --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "subject"),
    [
        (b"Subject: plain words\r\n\r\n", "plain words"),
        (b"From: a\r\nSUBJECT:   spaced  \r\nTo: b\r\n\r\n", "spaced"),
        (b"Subject: folded\r\n  over\r\n\tlines\r\nTo: b\r\n\r\n", "folded  over\tlines"),
        (b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\n", "caf\u00e9"),
        (
            b"Subject: =?UTF-8?B?R3LDvMOfZQ==?= und =?iso-8859-1?q?T=FCr?=\n\n",
            "Gr\u00fc\u00dfe und T\u00fcr",
        ),
        (b"Subject: =?utf-8?q?a?= =?utf-8?q?b?=\r\n\r\n", "ab"),
        (b"Subject: raw \xc3\xa9t\xc3\xa9 =?utf-8?q?=C3=A9?=\r\n\r\n", "raw \u00e9t\u00e9 \u00e9"),
        (b"Subject: =?no-such-charset?q?x?=\r\n\r\n", "=?no-such-charset?q?x?="),
        (b"Subject: bad \xff bytes\r\n\r\n", "bad \ufffd bytes"),
        (b"From: a\r\n\r\nSubject: in the body\r\n", None),
        (b"\r\nSubject: no header section\r\n", None),
        (b"From: a\r\n\r\n", None),
        (b"Subject:\r\n\r\n", ""),
    ],
)
def test_extract_subject(head: bytes, subject: str | None) -> None:
    assert extract_subject(head) == subject


@pytest.mark.parametrize(
    "garbage",
    [
        b"Subject: =?utf-8?b?!!!?=",
        b"Subject: =?utf-8?x?abc?=",
        b"Subject: =?\r\n\r\n",
        b"\xff" * 99,
    ],
)
def test_extract_subject_never_raises(garbage: bytes) -> None:
    result = extract_subject(garbage)
    assert result is None or isinstance(result, str)


def test_header_sniffer_stops_at_blank_line_and_limit() -> None:
    sniffer = HeaderSniffer()
    for byte in b"From: a\r\nSubject: =?utf-8?q?one_byte_at_a_time?=\r\n\r\nSubject: no\r\n":
        sniffer.feed(bytes([byte]))
    assert sniffer.done and sniffer.subject() == "one byte at a time"

    huge = HeaderSniffer()
    huge.feed(b"X-Filler: " + b"a" * (70 * 1024) + b"\r\nSubject: too late\r\n\r\n")
    assert huge.done and huge.subject() is None


async def test_subject_stored_from_streamed_header(store: Store) -> None:
    head = b"Received: by test\r\nSubject: =?utf-8?b?w6lsw6hyZQ==?=\r\n\r\n"
    writer = store.begin(make_envelope())
    for byte in head:
        writer.write(bytes([byte]))
    writer.write(b"Subject: body line\r\n" * 10)
    queue_id = await writer.commit()
    stored = store.get(queue_id)
    assert stored is not None and stored.subject == "\u00e9l\u00e8re"
    assert store.list()[0].subject == "\u00e9l\u00e8re"


# --- abort, listing, group commit ------------------------------------------------------


async def test_abort_leaves_nothing_visible(store: Store) -> None:
    envelope = make_envelope()
    writer = store.begin(envelope)
    writer.write(random.Random(2).randbytes(1024 * 1024))
    writer.abort()
    writer.abort()  # twice is fine
    kept = await deliver(store, b"Subject: kept\r\n\r\n")
    assert [m.envelope.queue_id for m in store.list()] == [kept]
    assert store.get(envelope.queue_id) is None
    assert store.raw(envelope.queue_id) is None
    if isinstance(store, SQLiteStore):
        await store.close()
        assert sqlite_rows(store.path, "SELECT DISTINCT queue_id FROM chunks") == [(kept,)]
        assert sqlite_rows(store.path, "SELECT * FROM pending") == []
        assert final_bodies(store) == [] and spooled_files(store) == []  # the 1 MiB body's
        assert os.listdir(store.bodies / ".spool") == []  # and the spool folder and its lock
    if isinstance(store, MaildirStore):
        assert os.listdir(store.path / "tmp") == []


async def test_abort_after_commit_keeps_message(store: Store) -> None:
    body = random.Random(3).randbytes(700_000)
    writer = store.begin(make_envelope())
    writer.write(body)
    queue_id = await writer.commit()
    writer.abort()
    with pytest.raises(RuntimeError):
        writer.write(b"more")
    await deliver(store, b"x")  # the store has processed anything queued since
    assert store.raw(queue_id) == body


async def test_group_commit_shares_durability(store: Store) -> None:
    bodies = [f"Subject: n{i}\r\n\r\n{i}\r\n".encode() * (i + 1) for i in range(50)]
    ids = await asyncio.gather(*(deliver(store, body) for body in bodies))
    assert len(set(ids)) == 50
    stats = store.stats  # type: ignore[attr-defined]
    assert stats.messages == 50
    assert 1 <= stats.commits < 50
    assert {m.envelope.queue_id for m in store.list()} == set(ids)
    for queue_id, body in zip(ids, bodies, strict=True):
        assert store.raw(queue_id) == body


async def test_list_is_newest_first(store: Store) -> None:
    envelopes = [make_envelope(received_at=T0 + dt.timedelta(seconds=i)) for i in range(6)]
    order = [3, 0, 5, 1, 4, 2]  # commit order differs from receipt order
    for i in order:
        await deliver(store, f"Subject: m{i}\r\n\r\n".encode(), envelopes[i])
    newest = [e.queue_id for e in reversed(envelopes)]
    assert [m.envelope.queue_id for m in store.list()] == newest
    assert [m.envelope.queue_id for m in store.list(limit=2)] == newest[:2]
    assert [m.subject for m in store.list(limit=3)] == ["m5", "m4", "m3"]
    assert store.list(limit=0) == []
    assert store.get("0000000000000000") is None and store.raw("nope") is None


async def test_commit_after_close_is_refused(tmp_path: Path) -> None:
    for kind in KINDS:
        store = open_store(kind, tmp_path / kind)
        with pytest.raises(StoreError):
            store.begin(make_envelope())
        await store.start()
        writer = store.begin(make_envelope())
        writer.write(b"x" * 300_000)
        await store.close()
        with pytest.raises(StoreError):
            await writer.commit()


# --- SQLite specifics -------------------------------------------------------------


async def test_sqlite_reads_from_a_fresh_object_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "ehlo.sqlite3"
    assert SQLiteStore(path).list() == [] and SQLiteStore(path).raw("x") is None
    writer_store = SQLiteStore(path)
    await writer_store.start()
    queue_id = await deliver(writer_store, b"Subject: live\r\n\r\nhello")
    reader = SQLiteStore(path)  # as the CLI does, while the server runs
    assert reader.raw(queue_id) == b"Subject: live\r\n\r\nhello"
    await writer_store.close()
    assert not Path(f"{path}-wal").exists()  # checkpointed on close
    assert [m.subject for m in SQLiteStore(path).list()] == ["live"]
    mode = sqlite_rows(path, "PRAGMA journal_mode")[0][0]
    assert mode == "wal"


@pytest.mark.parametrize("shared", [False, True])
async def test_sqlite_two_instances_on_one_file(tmp_path: Path, shared: bool) -> None:
    path = tmp_path / "shared.sqlite3"
    first, second = SQLiteStore(path, shared=shared), SQLiteStore(path, shared=shared)
    await first.start()
    await second.start()
    rng = random.Random(4)
    bodies = [rng.randbytes(rng.randrange(1, 600_000)) for _ in range(40)]
    ids = await asyncio.gather(
        *(deliver(first if i % 2 else second, body) for i, body in enumerate(bodies))
    )
    await first.close()
    await second.close()
    reader = SQLiteStore(path)
    assert {m.envelope.queue_id for m in reader.list()} == set(ids)
    for queue_id, body in zip(ids, bodies, strict=True):
        assert reader.raw(queue_id) == body


async def test_sqlite_body_file_leaves_the_page_cache_once_synced(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "ehlo.sqlite3")
    await store.start()
    body = random.Random(7).randbytes(4 * 1024 * 1024)
    queue_id = await deliver(store, body)
    cached = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(store.bodies / queue_id)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert int(cached) < len(body) // 8  # written, synced, then its pages let go
    assert store.raw(queue_id) == body
    await store.close()


async def test_sqlite_start_keeps_the_spool_of_a_live_instance(tmp_path: Path) -> None:
    path = tmp_path / "ehlo.sqlite3"
    first = SQLiteStore(path)
    await first.start()
    body = random.Random(5).randbytes(2 * 1024 * 1024)
    writer = first.begin(make_envelope())
    writer.write(body)
    assert len(spooled_files(first)) == 1  # being received, no row yet
    second = SQLiteStore(path)
    await second.start()  # cleans orphans, but this one belongs to a live store
    queue_id = await writer.commit()
    assert second.raw(queue_id) == body
    await second.close()
    await first.close()


async def test_sqlite_start_removes_the_spool_of_a_dead_instance(tmp_path: Path) -> None:
    path = tmp_path / "ehlo.sqlite3"
    store = SQLiteStore(path)
    await store.start()
    kept = await deliver(store, bytes(CHUNK_SIZE + 10))
    live = SQLiteStore(path)
    await live.start()
    live_writer = live.begin(make_envelope())
    live_writer.write(bytes(CHUNK_SIZE + 20))
    await store.close()
    # As a store killed in mid-commit leaves it: a body half received, and
    # one already linked under its final name whose row was never committed.
    dead = store.bodies / ".spool" / "DEADOWNER"
    dead.mkdir()
    (dead / "HALF").write_bytes(b"x" * 10)
    (dead / "LINKED").write_bytes(b"y" * 10)
    os.link(dead / "LINKED", store.bodies / "LINKED")
    os.link(store.bodies / kept, dead / kept)  # committed: only the spool name goes
    await store.start()
    assert not dead.exists()
    assert final_bodies(store) == [kept]
    assert store.raw(kept) == bytes(CHUNK_SIZE + 10)
    assert len(spooled_files(store)) == 1  # the live instance's body, untouched
    assert store.raw(await live_writer.commit()) == bytes(CHUNK_SIZE + 20)
    await live.close()
    await store.close()


async def _waiting_for_lock(pid: int) -> None:
    """Return once process ``pid`` waits for a lock held by another (a "->" line in /proc/locks)."""
    deadline = asyncio.get_running_loop().time() + 10
    while not any(
        "->" in line and line.split()[-4] == str(pid)
        for line in Path("/proc/locks").read_text().splitlines()
    ):
        assert asyncio.get_running_loop().time() < deadline, Path("/proc/locks").read_text()
        await asyncio.sleep(0.01)


@pytest.mark.needs(Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
async def test_sqlite_backlog_grows_while_the_disk_is_busy(tmp_path: Path) -> None:
    path = tmp_path / "ehlo.sqlite3"
    # Shared: the writer takes the lock that serialises several processes' writers.
    store = SQLiteStore(path, shared=True)
    await store.start()
    blocker = os.open(path.with_name(path.name + ".writelock"), os.O_RDWR)
    fcntl.flock(blocker, fcntl.LOCK_EX)  # another process's writer is busy
    bodies = [random.Random(n).randbytes(200_000) for n in range(4)]
    commits = []
    for body in bodies:
        writer = store.begin(make_envelope())
        writer.write(body)
        commits.append(asyncio.ensure_future(writer.commit()))
    # The writer took the batch and waits for the lock (the kernel lists it as waiting).
    await _waiting_for_lock(_writer_pid(store))
    for _ in range(10):  # and any answer it sent meanwhile has been read
        await asyncio.sleep(0)
    assert store.backlog_bytes == 800_000
    assert not any(commit.done() for commit in commits)
    fcntl.flock(blocker, fcntl.LOCK_UN)
    os.close(blocker)
    ids = await asyncio.wait_for(asyncio.gather(*commits), 10)
    assert store.backlog_bytes == 0
    assert [store.raw(queue_id) for queue_id in ids] == bodies
    await store.close()


@pytest.mark.parametrize("loss", ["truncated", "deleted"])
async def test_sqlite_lost_body_file_fails_the_commit(loss: str, tmp_path: Path) -> None:
    path = tmp_path / "ehlo.sqlite3"
    store = SQLiteStore(path)
    await store.start()
    envelope = make_envelope()
    writer = store.begin(envelope)
    writer.write(bytes(600_000))
    (spooled,) = spooled_files(store)
    body_file = store.bodies / spooled
    if loss == "truncated":
        os.truncate(body_file, 300_000)
    else:
        body_file.unlink()
    with pytest.raises(StoreError, match="body file"):
        await writer.commit()
    assert store.get(envelope.queue_id) is None
    assert spooled_files(store) == [] and final_bodies(store) == []
    await store.close()


async def test_sqlite_duplicate_id_is_an_error_not_a_crash(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "ehlo.sqlite3")
    await store.start()
    envelope = make_envelope()
    await deliver(store, b"first", envelope)
    for body in (b"", b"short", bytes(700_000)):
        with pytest.raises(StoreError):
            await deliver(store, body, make_envelope(queue_id=envelope.queue_id))
        assert store.raw(envelope.queue_id) == b"first"
    assert final_bodies(store) == [] and spooled_files(store) == []  # the third one's file
    big = make_envelope()
    first_body = random.Random(6).randbytes(700_000)
    await deliver(store, first_body, big)
    with pytest.raises(StoreError, match="already stored"):  # never replaces its file
        await deliver(store, bytes(700_000), make_envelope(queue_id=big.queue_id))
    assert store.raw(big.queue_id) == first_body
    assert final_bodies(store) == [big.queue_id] and spooled_files(store) == []
    await deliver(store, b"x")  # still works
    await store.close()


@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_sqlite_duplicate_id_within_one_batch(writer: str, tmp_path: Path) -> None:
    # Committed in the same turn of the loop, the three messages reach the
    # writer together: the batch insert fails on the repeated id, and the
    # message-by-message path stores the first two and refuses the third.
    store = SQLiteStore(tmp_path / "ehlo.sqlite3", writer=writer)
    await store.start()
    twin, other = make_envelope(), make_envelope()
    futures = []
    for envelope, body in ((twin, b"first"), (other, b"other"), (twin, b"second")):
        message = store.begin(make_envelope(queue_id=envelope.queue_id))
        message.write(body)
        futures.append(message.start_commit())
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert outcomes[:2] == [twin.queue_id, other.queue_id]
    assert isinstance(outcomes[2], StoreError) and "already stored" in str(outcomes[2])
    assert store.raw(twin.queue_id) == b"first" and store.raw(other.queue_id) == b"other"
    assert store.stats.commits == 1 and store.stats.messages == 2
    await store.close()


async def test_sqlite_orphan_chunk_is_never_taken_over(tmp_path: Path) -> None:
    # A chunk row without its message (left by an earlier version's writer
    # that is still running) keeps its id: the new message is refused.
    store = SQLiteStore(tmp_path / "ehlo.sqlite3")
    await store.start()
    envelope = make_envelope()
    with sqlite3.connect(store.path) as db:
        db.execute("INSERT INTO chunks VALUES (?, 0, ?)", (envelope.queue_id, b"theirs"))
    with pytest.raises(StoreError, match="already stored"):
        await deliver(store, b"ours", envelope)
    assert store.get(envelope.queue_id) is None
    assert sqlite_rows(store.path, "SELECT data FROM chunks") == [(b"theirs",)]
    await deliver(store, b"x")  # the writer goes on
    await store.close()


async def test_unusable_location_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(StoreError):
        await SQLiteStore(blocker / "ehlo.sqlite3").start()
    with pytest.raises(StoreError):
        await MaildirStore(blocker / "maildir").start()
    not_a_db = tmp_path / "junk.sqlite3"
    not_a_db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        await SQLiteStore(not_a_db).start()
    with pytest.raises(StoreError):
        SQLiteStore(not_a_db).list()


# --- Maildir specifics --------------------------------------------------------------


async def test_maildir_layout_and_sidecar(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "maildir")
    await store.start()
    body = b"Subject: =?utf-8?q?M=C3=A4il?=\r\n\r\n\x00\xff8-bit\r\n"
    envelope = make_envelope()
    queue_id = await deliver(store, body, envelope)
    [name] = os.listdir(store.path / "new")
    assert queue_id in name and ":" not in name
    assert (store.path / "new" / name).read_bytes() == body
    assert os.listdir(store.path / "tmp") == []
    sidecars = [p for p in os.listdir(store.path / "ehlo-envelopes") if not p.startswith(".")]
    assert sidecars == [f"{queue_id}.json"]
    record = json.loads((store.path / "ehlo-envelopes" / sidecars[0]).read_text())
    assert record["id"] == queue_id and record["size"] == len(body)
    assert record["subject"] == "M\u00e4il" and record["rcpt_to"] == envelope.rcpt_to
    await store.close()


async def test_maildir_finds_messages_moved_to_cur(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "maildir")
    await store.start()
    body = b"Subject: seen\r\n\r\nread by an IMAP client\r\n"
    queue_id = await deliver(store, body)
    [name] = os.listdir(store.path / "new")
    os.rename(store.path / "new" / name, store.path / "cur" / f"{name}:2,S")
    stored = store.get(queue_id)
    assert stored is not None and stored.subject == "seen" and stored.size == len(body)
    assert store.raw(queue_id) == body
    assert [m.envelope.queue_id for m in store.list()] == [queue_id]
    await store.close()


async def test_maildir_lists_foreign_files_without_sidecar(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "maildir")
    await store.start()
    ours = await deliver(store, b"Subject: ours\r\n\r\n")
    foreign = store.path / "cur" / "1700000000.M1P2.otherhost:2,RS"
    foreign.write_bytes(b"Subject: from elsewhere\r\n\r\nhi\r\n")
    (store.path / "new" / "1600000000.M9.box").write_bytes(b"no header at all")
    # a corrupt sidecar must not hide its message either
    broken = await deliver(store, b"Subject: broken sidecar\r\n\r\n")
    (store.path / "ehlo-envelopes" / f"{broken}.json").write_text("{not json")
    listed = store.list()
    foreign_ids = ["1700000000.M1P2.otherhost", "1600000000.M9.box"]
    assert [m.envelope.queue_id for m in listed][-2:] == foreign_ids
    assert {m.envelope.queue_id for m in listed[:2]} == {ours, broken}
    by_id = {m.envelope.queue_id: m for m in listed}
    assert by_id[foreign_ids[0]].subject == "from elsewhere"
    assert by_id[foreign_ids[0]].envelope.received_at == dt.datetime.fromtimestamp(
        1700000000, dt.UTC
    )
    assert by_id[broken].subject == "broken sidecar"
    assert store.raw(foreign_ids[0]) == b"Subject: from elsewhere\r\n\r\nhi\r\n"
    await store.close()


async def test_maildir_abort_removes_tmp_file(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "maildir")
    await store.start()
    writer = store.begin(make_envelope())
    writer.write(bytes(500_000))
    assert len(os.listdir(store.path / "tmp")) == 1
    writer.abort()
    assert os.listdir(store.path / "tmp") == [] and store.list() == []
    await store.close()


# --- crashes and several processes ----------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, datetime, random, sys
    from pathlib import Path
    from ehlo.ids import new_queue_id
    from ehlo.storage import Envelope, open_store

    kind, data_dir, mode, seed = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])

    def envelope():
        return Envelope(
            queue_id=new_queue_id(), client_ip="198.51.100.1", client_port=1,
            greeting="EHLO", greeting_name="child", mail_from="a@b", mail_params={},
            rcpt_to=["c@d"], received_at=datetime.datetime.now(datetime.UTC),
        )

    async def main():
        store = open_store(kind, data_dir)
        await store.start()
        if mode == "many":
            async def one(i):
                writer = store.begin(envelope())
                writer.write(random.Random(seed * 1000 + i).randbytes(1000 + i * 9000))
                return await writer.commit()
            ids = await asyncio.gather(*(one(i) for i in range(40)))
            print(" ".join(ids), flush=True)
            await store.close()
            return
        writer = store.begin(envelope())
        body = random.Random(seed).randbytes(3 * 1024 * 1024)
        for pos in range(0, len(body), 65536):
            writer.write(body[pos : pos + 65536])
        if mode == "commit":
            print(await writer.commit(), flush=True)
        else:
            while store.backlog_bytes:
                await asyncio.sleep(0.001)
            print("written", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


def spawn(kind: str, data_dir: Path, mode: str, seed: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, kind, str(data_dir), mode, str(seed)],
        stdout=subprocess.PIPE,
        text=True,
    )


def kill_after_line(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    os.kill(child.pid, signal.SIGKILL)  # at once: no cleanup, no close()
    child.wait(10)
    assert child.returncode == -signal.SIGKILL
    return line


@pytest.mark.parametrize("kind", KINDS)
async def test_sigkill_right_after_commit_keeps_the_message(kind: str, tmp_path: Path) -> None:
    queue_id = kill_after_line(spawn(kind, tmp_path, "commit", 11))
    assert queue_id
    store = open_store(kind, tmp_path)
    await store.start()  # orphan cleanup must not touch it
    assert store.raw(queue_id) == random.Random(11).randbytes(3 * 1024 * 1024)
    stored = store.get(queue_id)
    assert stored is not None and stored.envelope.greeting_name == "child"
    await store.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_sigkill_while_writing_leaves_no_message(kind: str, tmp_path: Path) -> None:
    assert kill_after_line(spawn(kind, tmp_path, "hang", 12)) == "written"
    if kind == "sqlite":
        path = tmp_path / "ehlo.sqlite3"
        (orphan,) = spooled_files(SQLiteStore(path))  # the 3 MiB body, in the spool
        assert os.path.getsize(f"{path}.bodies/{orphan}") == 3 * 1024 * 1024
    store = open_store(kind, tmp_path)
    await store.start()
    assert store.list() == []
    if isinstance(store, SQLiteStore):
        assert spooled_files(store) == [] and final_bodies(store) == []
        own = store._spool_name  # only this instance's folder and lock are left
        assert sorted(os.listdir(store.bodies / ".spool")) == sorted([f"{own}.lock", own])
        assert os.listdir(f"{store.path}.locks") == [f"{store.owner}.lock"]
    await store.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_two_processes_write_one_store(kind: str, tmp_path: Path) -> None:
    children = [spawn(kind, tmp_path, "many", seed) for seed in (1, 2)]
    outputs = [child.communicate(timeout=60)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0]
    store = open_store(kind, tmp_path)
    listed = {m.envelope.queue_id for m in store.list()}
    for seed, output in zip((1, 2), outputs, strict=True):
        ids = output.split()
        assert len(ids) == 40
        for i, queue_id in enumerate(ids):
            assert store.raw(queue_id) == random.Random(seed * 1000 + i).randbytes(1000 + i * 9000)
        listed -= set(ids)
    assert listed == set()
    assert len(store.list()) == 80


# --- null store and open_store -------------------------------------------------------------


async def test_null_store_counts_and_discards() -> None:
    store = NullStore()
    await store.start()
    envelope = make_envelope()
    writer = store.begin(envelope)
    writer.write(b"a" * 10)
    writer.write(b"b" * 5)
    assert writer.size == 15
    assert await writer.commit() == envelope.queue_id
    assert store.stats.messages == 1 and store.stats.commits == 0
    assert list(store.list()) == [] and store.get(envelope.queue_id) is None
    assert store.raw(envelope.queue_id) is None and store.backlog_bytes == 0
    await store.close()


def test_open_store_kinds(tmp_path: Path) -> None:
    sqlite_store = open_store("sqlite", tmp_path / "a" / "b")
    assert isinstance(sqlite_store, SQLiteStore)
    assert sqlite_store.path == tmp_path / "a" / "b" / "ehlo.sqlite3"
    assert (tmp_path / "a" / "b").is_dir()
    maildir_store = open_store("maildir", tmp_path)
    assert isinstance(maildir_store, MaildirStore) and maildir_store.path == tmp_path / "maildir"
    assert isinstance(open_store("null", tmp_path), NullStore)
    with pytest.raises(ValueError, match="'mbox'"):
        open_store("mbox", tmp_path)


# --------------------------------------------------------------------------
# The SQLite writer in its own process


def _writer_pid(store: SQLiteStore) -> int:
    writer = store._writer
    assert isinstance(writer, WriterProcess)
    process = writer._process
    assert process is not None
    return process.pid


async def test_sqlite_writer_process_death_fails_commits_not_the_server(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "ehlo.sqlite3")
    await store.start()
    assert await deliver(store, b"Subject: before\r\n\r\nx\r\n")
    writer = store.begin(make_envelope())
    writer.write(b"Subject: lost\r\n\r\nx\r\n")
    os.kill(_writer_pid(store), signal.SIGKILL)
    with pytest.raises(StoreError, match="writer process exited"):
        await asyncio.wait_for(writer.commit(), 10)
    with pytest.raises(StoreError):
        store.begin(make_envelope())
    assert [m.subject for m in store.list()] == ["before"]
    await asyncio.wait_for(store.close(), 10)


async def _signals_taken(pid: int) -> None:
    """Return once no signal is pending for process ``pid`` (or it is gone)."""
    deadline = asyncio.get_running_loop().time() + 10
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines())
        except FileNotFoundError:
            return
        if fields["State"].startswith("Z") or (
            int(fields["SigPnd"], 16) == 0 and int(fields["ShdPnd"], 16) == 0
        ):
            return
        assert asyncio.get_running_loop().time() < deadline, fields
        await asyncio.sleep(0.01)


@pytest.mark.needs(Path("/proc/self/status").exists(), reason="needs Linux /proc")
async def test_sqlite_writer_process_ignores_terminal_signals(tmp_path: Path) -> None:
    # Ctrl-C reaches the whole process group: the server drains, its writer
    # must stay to store what the draining sessions still commit.
    store = SQLiteStore(tmp_path / "ehlo.sqlite3")
    await store.start()
    pid = _writer_pid(store)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        os.kill(pid, sig)
    await _signals_taken(pid)
    queue_id = await asyncio.wait_for(deliver(store, b"Subject: after\r\n\r\ny\r\n"), 10)
    assert store.raw(queue_id) == b"Subject: after\r\n\r\ny\r\n"
    await asyncio.wait_for(store.close(), 10)
    assert store.stats.messages == 1


async def test_sqlite_writer_process_reports_an_unusable_database(tmp_path: Path) -> None:
    not_a_db = tmp_path / "ehlo.sqlite3"
    not_a_db.write_bytes(b"this is not an SQLite database, not even its header" * 100)
    with pytest.raises(StoreError, match="not a database"):
        await asyncio.wait_for(SQLiteStore(not_a_db).start(), 30)


# --------------------------------------------------------------------------
# The batch writer on its own, and the frames between a store and its writer


def _row(envelope: Envelope, size: int) -> tuple[object, ...]:
    """A messages row as the store builds it (COLUMNS order, the search row, the queue rows)."""
    received_at = envelope.received_at.isoformat()
    return (
        envelope.queue_id, received_at, envelope.client_ip,
        envelope.client_port, envelope.greeting, envelope.greeting_name, envelope.mail_from,
        "{}", "[]", None, envelope.protocol, envelope.server_name, "{}", size, None, None,
        search_row(
            envelope.queue_id, received_at, envelope.mail_from, [], None, envelope.greeting,
            False, {},
        ),
        (),
    )  # fmt: skip


def test_batch_writer_needs_no_host(tmp_path: Path) -> None:
    # One batch: a message, one whose id is already stored, another message.
    # The batch falls back to message-by-message inserts: only the taken id
    # fails, the others are stored, and they share the fallback's COMMIT.
    path = tmp_path / "ehlo.sqlite3"
    writer = BatchWriter(path, shared=False)
    writer.open()
    first = make_envelope()
    done = writer.execute([Commit(_row(first, 5), b"first", None, "tag-0")])
    assert [(op.tag, out) for op, out in done] == [("tag-0", first.queue_id)]
    fresh, again, other = make_envelope(), make_envelope(queue_id=first.queue_id), make_envelope()
    batch = [
        Commit(_row(fresh, 5), b"fresh", None, 1),
        Commit(_row(again, 5), b"again", None, 2),
        Commit(_row(other, 5), bytearray(b"other"), None, 3),
    ]
    outcomes = writer.execute(batch)
    assert [op.tag for op, _ in outcomes] == [1, 2, 3]
    assert outcomes[0][1] == fresh.queue_id and outcomes[2][1] == other.queue_id
    assert isinstance(outcomes[1][1], StoreError) and "already stored" in str(outcomes[1][1])
    assert writer.stats.commits == 2 and writer.stats.messages == 3
    assert writer.done_bytes == 20
    store = SQLiteStore(path)
    stored = {first.queue_id, fresh.queue_id, other.queue_id}
    assert {m.envelope.queue_id for m in store.list()} == stored
    assert store.raw(first.queue_id) == b"first" and store.raw(other.queue_id) == b"other"
    assert os.listdir(path.with_name(path.name + ".locks")) == [f"{writer.owner}.lock"]
    writer.close()
    assert os.listdir(path.with_name(path.name + ".locks")) == []


def test_batch_writer_serve_batches_what_waits_and_stops(tmp_path: Path) -> None:
    # Everything queued before serve() starts is one batch: one COMMIT.
    writer = BatchWriter(tmp_path / "ehlo.sqlite3", shared=False)
    writer.open()
    ops: queue.SimpleQueue[Commit[int] | None] = queue.SimpleQueue()
    envelopes = [make_envelope() for _ in range(5)]
    for i, envelope in enumerate(envelopes):
        ops.put(Commit(_row(envelope, 1), b"x", None, i))
    ops.put(None)
    settled: list[list[tuple[int, object]]] = []
    writer.serve(ops, lambda outcomes: settled.append([(op.tag, out) for op, out in outcomes]))
    writer.close()
    assert settled == [[(i, e.queue_id) for i, e in enumerate(envelopes)]]
    assert writer.stats.commits == 1


def _wire_stream() -> tuple[bytes, list[tuple[tuple[object, ...], bytes | None]]]:
    """Frames a store sends (commits with bodies of several sizes, spool, stop)."""
    expected: list[tuple[tuple[object, ...], bytes | None]] = [(("spool", "owner-1"), None)]
    data = b"".join(_wire.frame(("spool", "owner-1")))
    for ref, size in enumerate([0, 1, 4093, 70_000, _wire.READ_SIZE + 3, 17]):
        body = random.randbytes(size)
        data += b"".join(_wire.commit(("row", ref), ref, None, size)) + body
        expected.append((("commit", ("row", ref), ref, None, size), body or None))
    data += b"".join(_wire.frame(_wire.STOP))
    expected.append((_wire.STOP, None))
    return data, expected


def _send_in_pieces(sock: socket.socket, data: bytes) -> None:
    for piece in pieces(data, (1, 3, 5000, 65536, 300_000, 2)):
        sock.sendall(piece)


def test_wire_blocking_reader_reads_frames_and_bodies_cut_anywhere() -> None:
    data, expected = _wire_stream()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        sender = threading.Thread(target=_send_in_pieces, args=(ours, data + data[:9]))
        sender.start()
        reader = _wire.BlockingReader(theirs)
        got = [reader.read(block=True) for _ in expected]
        sender.join()
        ours.shutdown(socket.SHUT_WR)
        # A frame cut short by the end of the stream reads as a stop.
        assert reader.read(block=True) == (_wire.STOP, None)
        assert reader.closed
    assert [(m, bytes(b) if b is not None else None) for m, b in got] == expected


def test_wire_stream_reader_reads_frames_and_bodies_cut_anywhere() -> None:
    data, expected = _wire_stream()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.setblocking(False)
        sender = threading.Thread(target=_send_in_pieces, args=(ours, data))
        sender.start()
        reader = _wire.StreamReader()
        scratch = memoryview(bytearray(_wire.READ_SIZE))
        got: list[tuple[tuple[object, ...], bytes | None]] = []
        deadline = time.monotonic() + 30
        while len(got) < len(expected):
            assert time.monotonic() < deadline, got
            select.select([theirs], [], [], 1.0)
            received = reader.receive(theirs, scratch)
            assert received is not None
            got += [(m, bytes(b) if b is not None else None) for m, b in received]
        sender.join()
        ours.close()
        select.select([theirs], [], [], 5.0)
        assert reader.receive(theirs, scratch) is None  # the end of the stream
    assert got == expected


# The messages table as versions before the search table wrote it.
_VERSION_0_SCHEMA = """
CREATE TABLE messages (
    queue_id TEXT PRIMARY KEY, received_at TEXT NOT NULL, client_ip TEXT NOT NULL,
    client_port INTEGER NOT NULL, greeting TEXT NOT NULL, greeting_name TEXT NOT NULL,
    mail_from TEXT NOT NULL, mail_params TEXT NOT NULL, rcpt_to TEXT NOT NULL, tls TEXT,
    protocol TEXT NOT NULL, server_name TEXT NOT NULL, extra TEXT NOT NULL,
    size INTEGER NOT NULL, subject TEXT
);
CREATE INDEX messages_received_at ON messages (received_at);
CREATE TABLE chunks (
    queue_id TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (queue_id, seq)
);
CREATE TABLE pending (queue_id TEXT PRIMARY KEY, owner TEXT NOT NULL);
"""


@pytest.mark.parametrize("opened_by", ["reader", "writer"])
async def test_an_older_database_is_upgraded_in_place(tmp_path: Path, opened_by: str) -> None:
    # A database without the search table and size_received: the first
    # reader (the command line) or writer (a server) upgrades it, and the
    # filters then find its messages; new messages join them.
    path = tmp_path / "ehlo.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(_VERSION_0_SCHEMA)
    report = json.dumps({"forward_match": {"result": "fail", "reason": "", "evidence": {}}})
    for n in range(3):
        conn.execute(
            "INSERT INTO messages VALUES (?, ?, '192.0.2.1', 25, ?, 'old.example', ?, '{}', ?,"
            " NULL, 'ESMTP', 'mx', ?, 10, ?)",
            (
                f"06H00000000000{n}A",
                f"2025-01-0{n + 1}T00:00:00.000000+00:00",
                "HELO" if n == 1 else "EHLO",
                f"Old{n}@Example.org",
                json.dumps([f"rcpt{n}@example.net"]),
                json.dumps({"greeting_checks": json.loads(report)} if n == 2 else {}),
                f"Subject {n}",
            ),
        )
        conn.execute("INSERT INTO chunks VALUES (?, 0, ?)", (f"06H00000000000{n}A", b"x" * 10))
    conn.commit()
    conn.close()
    store = SQLiteStore(path, writer="thread")
    if opened_by == "writer":
        await store.start()
        writer = store.begin(make_envelope(mail_from="new@example.org"))
        writer.write(b"Subject: new\r\n\r\nx\r\n")
        await writer.commit()
        await store.close()

    def subjects(**filters: Any) -> list[str | None]:
        return [m.subject for m in store.search(Query(**filters))]

    assert subjects(mail_from="OLD1@example") == ["Subject 1"]
    assert subjects(rcpt_to="rcpt2@") == ["Subject 2"]
    assert subjects(greeting="HELO") == ["Subject 1"]
    assert subjects(checks=(("forward_match", "fail"),)) == ["Subject 2"]
    assert subjects(subject="subject") == ["Subject 2", "Subject 1", "Subject 0"]
    assert [m.size_received for m in store.search(Query(subject="subject"))] == [None] * 3
    expected = 4 if opened_by == "writer" else 3
    assert len(list(store.search(Query()))) == expected
    with sqlite3.connect(path) as check:
        # Version 2: the search table's helo and attachments, the session log's table.
        assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert check.execute("SELECT count(*) FROM search").fetchone()[0] == expected
        assert check.execute("SELECT count(*) FROM sessions").fetchone()[0] == 0
    assert store.delete(["06H000000000000A"]) == ["06H000000000000A"]
    assert subjects(subject="subject") == ["Subject 2", "Subject 1"]
