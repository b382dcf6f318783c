"""The outbound queue of the SQLite and Maildir stores: the same behaviour, proven for both.

Each test commits messages with queue items through the store's own writer
(a real store started under ``tmp_path``), then drives the store's
:class:`~ehlo.storage.queue.Queue` as the scheduler and ``ehlo queue`` do.
Crashes are simulated by leaving on disk what a killed writer leaves; a
second process is a real ``python -c`` child using the same folder.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from ehlo.ids import _ALPHABET
from ehlo.storage import MaildirStore, Retention, SQLiteStore, Store, StoreError, open_store
from ehlo.storage.maildir_queue import QUEUE_FOLDER, MaildirQueue
from ehlo.storage.queue import Attempt, EntryUpdate, Queue, QueueItem, SQLiteQueue

from .strace import SYNCS, Call, parse, strace_command
from .test_storage import deliver, make_envelope

KINDS = ["sqlite", "maildir"]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(kind: str, tmp_path: Path) -> AsyncIterator[Store]:
    opened = open_store(kind, tmp_path / "data")
    await opened.start()
    yield opened
    await opened.close()


def queue_of(store: Store) -> Queue:
    queue = store.queue
    assert queue is not None
    return queue


def queue_id_at(moment: dt.datetime) -> str:
    """A queue id made at ``moment`` (ids lead with their time: the Maildir store sorts by it)."""
    n = int(moment.timestamp() * 1000) << 32 | random.getrandbits(32)
    return "".join(_ALPHABET[n >> shift & 31] for shift in range(75, -1, -5))


async def queued(
    store: Store, *recipients: str, at: dt.datetime | None = None, notify: str | None = None
) -> str:
    """Commit one message whose ``recipients`` are to be handed on; its queue id."""
    envelope = make_envelope(
        queue_id=queue_id_at(at) if at is not None else queue_id_at(dt.datetime.now(dt.UTC)),
        rcpt_to=list(recipients),
        received_at=at or dt.datetime.now(dt.UTC),
        queue=[QueueItem(r, f"mx:{r.rpartition('@')[2]}", notify=notify) for r in recipients],
    )
    return await deliver(store, b"Subject: out\r\n\r\nbody\r\n", envelope)


def reply(code: int, text: str = "ok") -> dict[str, object]:
    return {"code": code, "enhanced": "", "text": text, "host": "mx.example.net", "address": ""}


def states(queue: Queue, queue_id: str) -> dict[str, str]:
    return {e.recipient: e.state for e in queue.entries(queue_ids=[queue_id])}


async def test_commit_writes_the_entries_with_the_message(store: Store) -> None:
    queue = queue_of(store)
    before = time.time()
    queue_id = await queued(store, "b@example.net", "a@example.org", notify="FAILURE")
    plain = await deliver(store, b"Subject: local\r\n\r\n")
    assert store.get(queue_id) is not None and store.get(plain) is not None
    found = queue.entries()
    assert [(e.queue_id, e.recipient, e.state, e.attempts) for e in found] == [
        (queue_id, "a@example.org", "queued", 0),
        (queue_id, "b@example.net", "queued", 0),
    ]
    assert {e.next_hop for e in found} == {"mx:example.org", "mx:example.net"}
    assert {e.notify for e in found} == {"FAILURE"}
    assert all(before - 1 <= e.next_attempt <= time.time() for e in found)
    assert sorted(e.recipient for e in queue.due(time.time(), 10)) == [
        "a@example.org",
        "b@example.net",
    ]
    assert queue.due(before - 60, 10) == []
    next_due = queue.next_due()
    assert next_due is not None and next_due <= time.time()
    assert queue.counts() == {"queued": 2}
    assert queue.pending([queue_id, plain]) == {queue_id}
    assert queue.finished_messages([queue_id, plain]) == []


async def test_claim_record_and_attempts(store: Store) -> None:
    queue = queue_of(store)
    queue_id = await queued(store, "a@example.net", "b@example.net", "c@example.net")
    now = time.time()
    due = queue.due(now, 2)
    assert len(due) == 2  # the limit holds
    queue.claim(queue.due(now, 10))
    assert queue.due(now + 1, 10) == [] and queue.counts() == {"delivering": 3}
    assert queue.next_due() is None
    first = Attempt(queue_id, now, "mx:example.net", "mx[192.0.2.1]:25", {}, "S: 220 first\n")
    queue.record(
        [
            EntryUpdate(queue_id, "a@example.net", "delivered", now, reply(250)),
            EntryUpdate(queue_id, "b@example.net", "deferred", now + 300, reply(451, "later")),
            EntryUpdate(queue_id, "c@example.net", "bounced", now, reply(550, "no")),
        ],
        [first],
    )
    assert states(queue, queue_id) == {
        "a@example.net": "delivered",
        "b@example.net": "deferred",
        "c@example.net": "bounced",
    }
    assert queue.due(now + 299, 10) == []
    [later] = queue.due(now + 300, 10)
    assert (later.recipient, later.attempts, later.last_reply) == (
        "b@example.net",
        1,
        reply(451, "later"),
    )
    assert queue.next_due() == pytest.approx(now + 300)
    # No reply given: the last one stays; delay_notified is set when given.
    second = Attempt(queue_id, now + 300, "mx:example.net", "", {"b": {"code": 0}}, "refused\n")
    queue.record(
        [EntryUpdate(queue_id, "b@example.net", "deferred", now + 900, None, delay_notified=True)],
        [second],
    )
    [entry] = queue.entries(queue_ids=[queue_id], state="deferred")
    assert entry.attempts == 2 and entry.last_reply == reply(451, "later") and entry.delay_notified
    assert [(a.at, a.host, a.transcript) for a in queue.attempts(queue_id)] == [
        (now, "mx[192.0.2.1]:25", "S: 220 first\n"),
        (now + 300, "", "refused\n"),
    ]
    assert queue.attempts(queue_id)[1].results == {"b": {"code": 0}}
    assert queue.counts() == {"delivered": 1, "deferred": 1, "bounced": 1}
    assert queue.pending([queue_id]) == {queue_id}
    queue.record([EntryUpdate(queue_id, "b@example.net", "delivered", now, reply(250))])
    assert queue.finished_messages([queue_id, "nosuchid"]) == [queue_id]
    assert queue.pending([queue_id]) == set()


async def test_recover_queues_what_a_crash_left_delivering(
    kind: str, store: Store, tmp_path: Path
) -> None:
    queue = queue_of(store)
    queue_id = await queued(store, "a@example.net", "b@example.net")
    queue.claim(queue.due(time.time(), 1))
    await store.close()
    reopened = open_store(kind, tmp_path / "data")  # another process, after the crash
    await reopened.start()
    try:
        again = queue_of(reopened)
        assert again.counts() == {"delivering": 1, "queued": 1}
        assert again.recover() == 1
        assert again.recover() == 0
        assert states(again, queue_id) == {"a@example.net": "queued", "b@example.net": "queued"}
        assert len(again.due(time.time(), 10)) == 2
    finally:
        await reopened.close()


async def test_entries_order_filters_and_paging(store: Store) -> None:
    queue = queue_of(store)
    t0 = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    ids = [
        await queued(
            store, f"u{i}@example.net", f"Other{i}@Example.org", at=t0 + dt.timedelta(seconds=i)
        )
        for i in range(4)
    ]
    newest_first = [e.queue_id for e in queue.entries()]
    assert newest_first == [q for q in reversed(ids) for _ in range(2)]
    assert [e.recipient for e in queue.entries(queue_ids=[ids[0]])] == [
        "Other0@Example.org",
        "u0@example.net",
    ]
    assert [e.recipient for e in queue.entries(recipient="other2@EXAMPLE")] == [
        "Other2@Example.org"
    ]
    queue.hold([ids[1]])
    assert {e.queue_id for e in queue.entries(state="held")} == {ids[1]}
    assert [e.queue_id for e in queue.entries(state="queued", limit=3)] == [ids[3], ids[3], ids[2]]
    # Pages of whole messages by "before": each page starts after the last id seen.
    pages: list[list[str]] = []
    before: str | None = None
    while True:
        page = queue.entries(limit=2, before=before)
        if not page:
            break
        pages.append([e.recipient for e in page])
        before = page[-1].queue_id
    assert pages == [[f"Other{i}@Example.org", f"u{i}@example.net"] for i in (3, 2, 1, 0)]
    assert queue.entries(before=ids[1], state="queued") == queue.entries(queue_ids=[ids[0]])
    # Read by another process (``ehlo queue list``): the same pages.
    fresh = SQLiteQueue(queue.path) if isinstance(queue, SQLiteQueue) else MaildirQueue(queue.path)
    for query in (
        {"limit": 3},
        {"limit": 2, "before": ids[2]},
        {"state": "held"},
        {"state": "queued", "limit": 1, "before": ids[3]},
        {"recipient": "U1@", "limit": 1},
        {"queue_ids": [ids[0], ids[2], "nosuchid"]},
        {},
    ):
        assert fresh.entries(**query) == queue.entries(**query), query  # type: ignore[arg-type]
    if isinstance(fresh, SQLiteQueue):
        fresh.close()
    assert queue.entries(queue_ids=[]) == []
    assert queue.entries(queue_ids=["nosuchid"]) == []
    with pytest.raises(StoreError, match="no queued message"):
        queue.entries(before="nosuchid")


async def test_retry_hold_release_remove(store: Store) -> None:
    queue = queue_of(store)
    now = time.time()
    a = await queued(store, "a@example.net")
    b = await queued(store, "b@example.net")
    c = await queued(store, "c@example.net")
    queue.claim(queue.due(now + 1, 10))
    queue.record(
        [
            EntryUpdate(a, "a@example.net", "deferred", now + 3600, reply(421)),
            EntryUpdate(b, "b@example.net", "deferred", now + 3600, reply(421)),
        ]
    )
    assert queue.due(now + 1, 10) == []  # c is delivering
    assert queue.retry([a], now) == 1
    assert [e.queue_id for e in queue.due(now, 10)] == [a]
    assert queue.retry(None, now) == 2  # a and b; c is delivering
    assert queue.hold([a, c]) == 1  # not the one being delivered
    assert queue.hold([a]) == 0 and queue.retry([a], now) == 0
    assert [e.queue_id for e in queue.due(now, 10)] == [b]
    assert queue.release([a, b], now + 5) == 1
    [released] = queue.entries(queue_ids=[a])
    assert (released.state, released.next_attempt) == ("queued", now + 5)
    assert queue.remove([a, c]) == 1  # c is being delivered: it stays
    assert queue.entries(queue_ids=[a]) == [] and states(queue, c) == {
        "c@example.net": "delivering"
    }
    assert queue.remove([]) == 0 and queue.hold([]) == 0 and queue.release([], now) == 0
    assert queue.counts() == {"deferred": 1, "delivering": 1}


async def test_request_bounce(store: Store) -> None:
    queue = queue_of(store)
    now = time.time()
    queue_id = await queued(store, "a@example.net", "b@example.net", "c@example.net")
    queue.record(
        [
            EntryUpdate(queue_id, "a@example.net", "delivered", now, reply(250)),
            EntryUpdate(queue_id, "b@example.net", "deferred", now + 3600, reply(421)),
        ]
    )
    queue.hold([queue_id])  # c is held; b too
    assert queue.request_bounce([queue_id], now + 1) == 2
    by_recipient = {e.recipient: e for e in queue.entries(queue_ids=[queue_id])}
    assert by_recipient["a@example.net"].request is None
    for name in ("b@example.net", "c@example.net"):
        entry = by_recipient[name]
        assert (entry.state, entry.next_attempt, entry.request) == ("queued", now + 1, "bounce")
    # A final state clears the request.
    queue.record([EntryUpdate(queue_id, "b@example.net", "bounced", now + 1, reply(0, "asked"))])
    [bounced] = queue.entries(queue_ids=[queue_id], state="bounced")
    assert bounced.request is None


async def test_expire_history(store: Store) -> None:
    queue = queue_of(store)
    now = time.time()
    done = await queued(store, "a@example.net")
    busy = await queued(store, "b@example.net", "c@example.net")
    for queue_id in (done, busy):
        queue.record(
            [
                EntryUpdate(queue_id, r, "delivered", now, reply(250))
                for r in ("a@example.net", "b@example.net")
            ],
            [Attempt(queue_id, now - 10, "mx:example.net", "mx:25", {}, "t\n")],
        )
    assert queue.expire_history(now - 3600) == 0  # nothing old enough
    assert queue.expire_history(time.time() + 1) == 2
    assert queue.entries(queue_ids=[done]) == []
    assert queue.attempts(done) == []  # finished: its attempts go too
    assert states(queue, busy) == {"c@example.net": "queued"}
    assert len(queue.attempts(busy)) == 1  # still pending: kept for ``queue show``
    assert queue.counts() == {"queued": 1}


async def test_retention_keeps_a_queued_message_until_its_entries_are_final(
    store: Store,
) -> None:
    queue = queue_of(store)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    relayed = await queued(store, "a@example.net", at=old)
    local = await deliver(
        store,
        b"Subject: old\r\n\r\n",
        make_envelope(queue_id=queue_id_at(old), received_at=old),
    )
    assert store.prune(Retention(keep_days=1)) == 1
    assert store.get(relayed) is not None and store.get(local) is None
    newer = await deliver(store, b"Subject: newer\r\n\r\n")
    # Over the count: the queued message counts, but it is the other one that goes.
    assert store.prune(Retention(keep_messages=1)) == 1
    assert store.get(relayed) is not None and store.get(newer) is None
    newest = await deliver(store, b"Subject: newest\r\n\r\n")
    queue.record([EntryUpdate(relayed, "a@example.net", "delivered", 0.0, reply(250))])
    assert store.prune(Retention(keep_messages=1)) == 1
    assert store.get(relayed) is None and store.get(newest) is not None
    assert states(queue, relayed) == {"a@example.net": "delivered"}  # the history stays


async def test_deleting_a_message_removes_its_pending_entries(store: Store) -> None:
    queue = queue_of(store)
    now = time.time()
    queue_id = await queued(store, "a@example.net", "b@example.net", "c@example.net")
    other = await queued(store, "d@example.net")
    queue.claim(queue.due(now + 1, 10))
    queue.record([EntryUpdate(queue_id, "a@example.net", "delivered", now, reply(250))])
    queue.record([EntryUpdate(queue_id, "b@example.net", "deferred", now + 60, reply(421))])
    assert store.delete([queue_id]) == [queue_id]
    assert states(queue, queue_id) == {"a@example.net": "delivered"}
    assert queue.pending([queue_id, other]) == {other}
    assert [e.queue_id for e in queue.due(now + 3600, 10)] == []  # other is delivering
    assert queue.counts() == {"delivered": 1, "delivering": 1}


async def test_maildir_entries_without_their_message_are_dropped_at_start(
    tmp_path: Path,
) -> None:
    # What a crash between the entries file and the rename into new/ leaves.
    store = MaildirStore(tmp_path / "maildir")
    await store.start()
    kept = await queued(store, "a@example.net")
    orphan = make_envelope().queue_id
    entries = json.loads((store.path / QUEUE_FOLDER / f"{kept}.json").read_bytes())
    entries["entries"][0]["queue_id"] = orphan
    (store.path / QUEUE_FOLDER / f"{orphan}.json").write_text(json.dumps(entries))
    (store.path / QUEUE_FOLDER / f".{orphan}.json.tmp").write_text("half")
    await store.close()
    reopened = MaildirStore(tmp_path / "maildir")
    await reopened.start()
    try:
        assert reopened.get(orphan) is None
        assert [e.queue_id for e in reopened.queue.due(time.time() + 1, 10)] == [kept]
        assert reopened.queue.entries(queue_ids=[orphan]) == []
        assert sorted(os.listdir(reopened.path / QUEUE_FOLDER)) == [".lock", f"{kept}.json"]
    finally:
        await reopened.close()


async def test_maildir_queue_files_are_private_and_written_before_the_message(
    tmp_path: Path,
) -> None:
    store = MaildirStore(tmp_path / "maildir")
    await store.start()
    folder = store.path / QUEUE_FOLDER
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    queue_id = await queued(store, "a@example.net")
    for name in os.listdir(folder):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    [message] = os.listdir(store.path / "new")
    # The entries file was in place (renamed) before the message was.
    entries_file = folder / f"{queue_id}.json"
    assert entries_file.stat().st_ctime_ns <= (store.path / "new" / message).stat().st_ctime_ns
    await store.close()


async def test_maildir_commit_that_fails_leaves_no_entries(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "maildir")
    await store.start()
    writer = store.begin(make_envelope(queue=[QueueItem("a@example.net", "mx:example.net")]))
    writer.write(b"Subject: x\r\n\r\n")
    os.rmdir(store.path / "new")  # the rename into new/ fails
    with pytest.raises(StoreError):
        await writer.commit()
    assert os.listdir(store.path / QUEUE_FOLDER) == [".lock"]
    assert store.queue.counts() == {}
    await store.close()


async def test_sqlite_entries_are_in_the_message_transaction(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "ehlo.sqlite3")
    await store.start()
    first = await queued(store, "a@example.net")
    # The same id again: the batch fails, and with it the second message's entries.
    again = make_envelope(
        queue_id=first,
        queue=[QueueItem("x@example.net", "mx:example.net")],
    )
    with pytest.raises(StoreError):
        await deliver(store, b"second", again)
    assert [e.recipient for e in store.queue.entries()] == ["a@example.net"]
    fresh = make_envelope(queue=[QueueItem("y@example.net", "mx:example.net")])
    writer = store.begin(fresh)
    writer.write(b"aborted")
    writer.abort()  # never committed: no entries either
    assert store.queue.entries(queue_ids=[fresh.queue_id]) == []
    await store.close()


async def test_maildir_due_reads_only_the_files_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MaildirStore(tmp_path / "maildir")
    await store.start()
    ids = [await queued(store, f"u{i}@example.net") for i in range(30)]
    queue = store.queue
    now = time.time()
    queue.record(
        [
            EntryUpdate(q, f"u{i}@example.net", "deferred", now + 3600, None)
            for i, q in enumerate(ids)
        ]
    )
    queue.retry(ids[:2], now)
    calls: list[Path] = []
    original = MaildirQueue._load

    def counting(path: Path) -> object:
        calls.append(path)
        return original(path)

    monkeypatch.setattr(MaildirQueue, "_load", staticmethod(counting))
    assert sorted(e.queue_id for e in queue.due(now, 10)) == sorted(ids[:2])
    assert len(calls) == 2  # the index says which two
    # Another process (its own index) changes one file: only that one is read again.
    other = MaildirQueue(store.path / QUEUE_FOLDER)
    assert other.retry([ids[5]], now) == 1
    calls.clear()
    assert len(queue.due(now, 10)) == 3
    assert len(calls) == 4  # the changed file, then the three due
    await store.close()


async def test_maildir_listing_without_the_index_survives_wrong_file_times(
    tmp_path: Path,
) -> None:
    # A listing in a fresh process orders files by mtime (the message's
    # arrival); a file copied without its times must not reorder the list.
    store = MaildirStore(tmp_path / "maildir")
    await store.start()
    t0 = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ids = [
        await queued(store, f"u{i}@example.net", at=t0 + dt.timedelta(seconds=i)) for i in range(3)
    ]
    folder = store.path / QUEUE_FOLDER
    assert [e.queue_id for e in MaildirQueue(folder).entries(limit=1)] == [ids[2]]
    os.utime(folder / f"{ids[0]}.json")  # now: newer than all of them
    assert [e.queue_id for e in MaildirQueue(folder).entries(limit=1)] == [ids[2]]
    assert [e.queue_id for e in MaildirQueue(folder).entries(before=ids[2])] == [ids[1], ids[0]]
    assert [e.queue_id for e in MaildirQueue(folder).entries(limit=2, before=ids[2])] == [
        ids[1],
        ids[0],
    ]
    assert [e.queue_id for e in MaildirQueue(folder).entries()] == ids[::-1]
    await store.close()


async def test_maildir_queue_files_root_writes_keep_the_folders_owner(tmp_path: Path) -> None:
    # ``ehlo queue hold`` run as root must not leave files the server cannot read.
    if os.geteuid() != 0:
        pytest.skip("only root writes files for another user")
    store = MaildirStore(tmp_path / "maildir")
    await store.start()
    queue_id = await queued(store, "a@example.net")
    folder = store.path / QUEUE_FOLDER
    os.chown(folder, 65534, 65534)
    os.unlink(folder / ".lock")
    assert MaildirQueue(folder).hold([queue_id]) == 1
    for name in (f"{queue_id}.json", ".lock"):
        info = (folder / name).stat()
        assert (info.st_uid, info.st_gid) == (65534, 65534), name
    await store.close()


async def test_maildir_set_next_hop(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "maildir")
    await store.start()
    queue_id = await queued(store, "a@example.net", "b@example.net")
    store.queue.set_next_hop(queue_id, "b@example.net", "smtp:relay.example:2525")
    store.queue.set_next_hop(queue_id, "nobody@example.net", "smtp:relay.example:2525")
    again = MaildirQueue(store.path / QUEUE_FOLDER)  # what another process reads
    assert {e.recipient: e.next_hop for e in again.entries(queue_ids=[queue_id])} == {
        "a@example.net": "mx:example.net",
        "b@example.net": "smtp:relay.example:2525",
    }
    await store.close()


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from ehlo.storage import open_store
    from ehlo.storage.queue import Attempt

    kind, data, queue_id, hold = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
    queue = open_store(kind, data).queue
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(40):
        queue.record([], [Attempt(queue_id, 2000.0 + i, "mx:child", "", {}, "child")])
        if i < len(hold):
            assert queue.hold([hold[i]]) == 1
    print("done", flush=True)
    """
)


async def test_a_second_process_updates_while_this_one_reads_and_writes(
    kind: str, store: Store, tmp_path: Path
) -> None:
    queue = queue_of(store)
    shared = await queued(store, "a@example.net")
    ids = [await queued(store, f"h{i}@example.net") for i in range(10)]
    assert len(queue.due(time.time(), 100)) == 11  # this process's view, before the child
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, kind, str(tmp_path / "data"), shared, *ids],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdin is not None and child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        child.stdin.write("go\n")
        child.stdin.flush()
        for i in range(40):  # the same message's attempts, written by both at once
            queue.record([], [Attempt(shared, 1000.0 + i, "mx:parent", "", {}, "parent")])
            counts = queue.counts()
            assert counts.get("queued", 0) + counts.get("held", 0) == 11, counts
        assert child.stdout.readline().strip() == "done"
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    hosts = [a.next_hop for a in queue.attempts(shared)]
    assert hosts == ["mx:parent"] * 40 + ["mx:child"] * 40  # none lost, oldest first
    assert queue.counts() == {"queued": 1, "held": 10}  # the child's holds are seen here
    assert [e.queue_id for e in queue.due(time.time(), 100)] == [shared]


TRACED_COMMIT = textwrap.dedent(
    """
    import asyncio, datetime, sys
    from pathlib import Path
    from ehlo.ids import new_queue_id
    from ehlo.storage import Envelope, MaildirStore
    from ehlo.storage.queue import QueueItem

    async def main():
        store = MaildirStore(Path(sys.argv[1]))
        await store.start()
        envelope = Envelope(
            queue_id=new_queue_id(), client_ip="198.51.100.1", client_port=1,
            greeting="EHLO", greeting_name="child", mail_from="a@b", mail_params={},
            rcpt_to=["c@example.net"], received_at=datetime.datetime.now(datetime.UTC),
            queue=[QueueItem("c@example.net", "mx:example.net")],
        )
        writer = store.begin(envelope)
        writer.write(b"Subject: traced\\r\\n\\r\\nbody\\r\\n")
        print(await writer.commit(), flush=True)
        await store.close()

    asyncio.run(main())
    """
)


def test_maildir_entries_are_durable_before_the_message_is_visible(tmp_path: Path) -> None:
    trace = tmp_path / "strace.txt"
    maildir = tmp_path / "maildir"
    done = subprocess.run(
        [*strace_command(str(trace)), sys.executable, "-c", TRACED_COMMIT, str(maildir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    queue_id = done.stdout.strip()
    calls = parse(trace.read_text())
    folder = str(maildir / QUEUE_FOLDER)

    def first(name: set[str] | frozenset[str], test: Callable[[Call], bool]) -> Call:
        found = [c for c in calls if c.name in name and test(c)]
        assert found, f"no {name} call found"
        return found[0]

    renames = {"rename", "renameat", "renameat2"}
    synced = first(SYNCS, lambda c: c.target == f"{folder}/.{queue_id}.json.tmp")
    placed = first(renames, lambda c: f"{folder}/{queue_id}.json" in c.paths)
    folder_synced = first(SYNCS, lambda c: c.target == folder and c.start > placed.end)
    visible = first(renames, lambda c: any("/new/" in p and queue_id in p for p in c.paths))
    assert synced.end <= placed.start
    assert placed.end <= folder_synced.start
    assert folder_synced.end <= visible.start
