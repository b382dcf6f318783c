"""``ehlo queue``: the outbound queue of a real SQLite store, through the real command.

Each test fills a SQLite store in a temporary data folder through the
store's writer (messages whose ``Envelope.queue`` lists recipients to hand
on), moves entries through their states with the queue's own operations,
then runs ``ehlo queue ...`` as a subprocess and checks its output, its
exit status and the database. The last test runs ``ehlo serve`` relaying to
an aiosmtpd server that defers every recipient, and checks that ``ehlo
queue retry`` has the running server try again within seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ehlo.ids import new_queue_id
from ehlo.storage import Envelope, open_store
from ehlo.storage.queue import INSERT_QUEUE, Attempt, EntryUpdate, QueueItem, SQLiteQueue

from .dnsserver import DNSServer
from .helpers import free_port, wait_until
from .test_cli import ServerProcess, one_line_error, run

# The keys of each entry ``queue list --json`` prints, in order.
LIST_FIELDS = ["id", "recipient", "state", "attempts", "next_attempt", "last_reply", "next_hop"]
T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
HOP = "smtp:127.0.0.1:1"
LATER = time.time() + 86400.0  # a deferred entry's next attempt, far enough off
TRANSCRIPT = (
    "<- 220 sink.test ESMTP\n-> EHLO mx.test\n<- 250 sink.test\n"
    "-> MAIL FROM:<alice@local.test>\n<- 250 ok\n-> RCPT TO:<ann@remote.test>\n"
    "<- 451 4.3.0 try again later\n-> QUIT\n"
)


@dataclasses.dataclass
class Filled:
    """A data folder and the ids of what it holds (oldest message first)."""

    data: Path
    deferred: str  # two recipients, deferred after two attempts
    held: str
    delivering: str
    handed_on: str  # kept only to be handed on; queued
    local: str  # stored, nothing to hand on

    @property
    def db(self) -> Path:
        return self.data / "ehlo.sqlite3"

    def rows(self, queue_id: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db) as conn:
            return conn.execute(
                "SELECT recipient, state, attempts, next_attempt, request FROM queue"
                " WHERE queue_id = ? ORDER BY recipient",
                (queue_id,),
            ).fetchall()

    def stored(self, queue_id: str) -> bool:
        with sqlite3.connect(self.db) as conn:
            found = conn.execute("SELECT 1 FROM messages WHERE queue_id = ?", (queue_id,))
            return found.fetchone() is not None


def envelope(n: int, recipients: list[str], *, handed_on: bool = False) -> Envelope:
    return Envelope(
        queue_id=new_queue_id(),
        client_ip="127.0.0.1",
        client_port=40000 + n,
        greeting="EHLO",
        greeting_name="client.test",
        mail_from=f"sender{n}@local.test",
        mail_params={},
        rcpt_to=recipients,
        received_at=T0 + dt.timedelta(seconds=n),
        extra={"handed_on": True} if handed_on else {},
        queue=[QueueItem(r, HOP) for r in recipients if not r.endswith("@local.test")],
    )


async def _commit(data: Path, envelopes: list[Envelope]) -> None:
    store = open_store("sqlite", data, writer="thread")
    await store.start()
    try:
        for n, env in enumerate(envelopes):
            writer = store.begin(env)
            writer.write(f"Subject: message {n}\r\n\r\nbody {n}\r\n".encode())
            await writer.commit()
    finally:
        await store.close()


def fill(data: Path) -> Filled:
    envs = [
        envelope(0, ["ann@remote.test", "bob@remote.test"]),
        envelope(1, ["cat@other.test"]),
        envelope(2, ["dan@remote.test"]),
        envelope(3, ["eve@remote.test"], handed_on=True),
        envelope(4, ["fay@local.test"]),
    ]
    asyncio.run(_commit(data, envs))
    ids = [env.queue_id for env in envs]
    queue = SQLiteQueue(data / "ehlo.sqlite3")
    try:
        first = queue.entries(queue_ids=[ids[0]])
        reply = {"code": 451, "enhanced": "4.3.0", "text": "try again later", "host": "sink.test"}
        for n in range(2):  # two attempts, a second apart, oldest first
            queue.claim(first)
            queue.record(
                [EntryUpdate(e.queue_id, e.recipient, "deferred", LATER, reply) for e in first],
                [
                    Attempt(
                        ids[0],
                        T0.timestamp() + 60 + n,
                        HOP,
                        "sink.test[127.0.0.1]:1",
                        {e.recipient: reply for e in first},
                        TRANSCRIPT.replace("sink.test ESMTP", f"sink.test ESMTP try {n + 1}"),
                    )
                ],
            )
        assert queue.hold([ids[1]]) == 1
        queue.claim(queue.entries(queue_ids=[ids[2]]))
    finally:
        queue.close()
    return Filled(data, *ids)


@pytest.fixture
def filled(tmp_path: Path) -> Filled:
    return fill(tmp_path / "data")


def queue_cmd(filled: Filled, *args: str) -> subprocess.CompletedProcess[bytes]:
    return run("queue", *args, "--data", str(filled.data))


def list_json(filled: Filled, *args: str) -> list[dict[str, Any]]:
    result = queue_cmd(filled, "list", "--json", *args)
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert isinstance(listed, list)
    return listed


def keys(listed: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(item["id"], item["recipient"]) for item in listed]


# --------------------------------------------------------------------------
# list


def test_list_text_is_a_table_newest_message_first_with_counts(filled: Filled) -> None:
    result = queue_cmd(filled, "list")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    lines = result.stdout.decode().splitlines()
    assert lines[0].split() == [
        "ID", "STATE", "TRIES", "NEXT", "ATTEMPT", "(UTC)", "RECIPIENT", "NEXT", "HOP",
        "LAST", "REPLY",
    ]  # fmt: skip
    rows = [line.split() for line in lines[1:-1]]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        (filled.handed_on, "queued", "0"),
        (filled.delivering, "delivering", "0"),
        (filled.held, "held", "0"),
        (filled.deferred, "deferred", "2"),
        (filled.deferred, "deferred", "2"),
    ]
    deferred = lines[4]
    later = dt.datetime.fromtimestamp(LATER, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    assert later in deferred
    assert "<ann@remote.test>" in deferred and HOP in deferred
    assert deferred.endswith("451 4.3.0 try again later (sink.test)")
    assert " - " in lines[2]  # no next attempt while delivering
    assert lines[-1] == "-- 5 entries in the queue: 1 queued, 2 deferred, 1 delivering, 1 held"


def test_list_json_keys_and_values(filled: Filled) -> None:
    listed = list_json(filled)
    assert all(list(item) == LIST_FIELDS for item in listed)
    assert keys(listed) == [
        (filled.handed_on, "eve@remote.test"),
        (filled.delivering, "dan@remote.test"),
        (filled.held, "cat@other.test"),
        (filled.deferred, "ann@remote.test"),
        (filled.deferred, "bob@remote.test"),
    ]
    ann = listed[3]
    assert ann["state"] == "deferred" and ann["attempts"] == 2 and ann["next_hop"] == HOP
    assert dt.datetime.fromisoformat(ann["next_attempt"]).timestamp() == pytest.approx(LATER, 1)
    assert ann["last_reply"] == {
        "code": 451, "enhanced": "4.3.0", "text": "try again later", "host": "sink.test"
    }  # fmt: skip
    assert listed[2]["next_attempt"] is None and listed[2]["last_reply"] is None  # held

    result = queue_cmd(filled, "list", "--jsonl")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.decode().splitlines()] == listed


def test_list_filters_by_state_and_recipient(filled: Filled) -> None:
    assert keys(list_json(filled, "--state", "deferred")) == [
        (filled.deferred, "ann@remote.test"),
        (filled.deferred, "bob@remote.test"),
    ]
    assert keys(list_json(filled, "--state", "held")) == [(filled.held, "cat@other.test")]
    assert list_json(filled, "--state", "bounced") == []
    assert keys(list_json(filled, "--to", "BOB@Remote")) == [(filled.deferred, "bob@remote.test")]
    assert len(list_json(filled, "--to", "remote.test")) == 4
    assert list_json(filled, "--to", "remote.test", "--state", "held") == []
    result = queue_cmd(filled, "list", "--state", "lost")
    assert result.returncode == 2
    assert "invalid choice: 'lost'" in result.stderr.decode()


def test_paging_never_splits_a_message(filled: Filled) -> None:
    every = keys(list_json(filled, "--all"))
    assert len(every) == 5
    result = queue_cmd(filled, "list", "--limit", "2")
    assert result.returncode == 0
    assert len(result.stdout.decode().splitlines()) == 1 + 2 + 1
    assert (
        result.stderr.decode()
        == f"(first 2 entries shown; older ones: --before {filled.delivering}, or --all)\n"
    )
    # The page ends inside the oldest message: its other entry joins the page.
    page = keys(list_json(filled, "--limit", "2", "--before", filled.delivering))
    assert page == every[2:]
    result = queue_cmd(filled, "list", "--limit", "2", "--before", filled.delivering)
    assert result.returncode == 0 and result.stderr == b""  # nothing older
    seen: list[tuple[str, str]] = []
    before: list[str] = []
    for _ in range(10):
        page = keys(list_json(filled, "--limit", "1", *before))
        if not page:
            break
        seen += page
        before = ["--before", page[-1][0]]
    assert seen == every
    assert keys(list_json(filled, "--limit", "0")) == []


def test_list_before_an_unknown_id_is_one_line(filled: Filled) -> None:
    result = queue_cmd(filled, "list", "--before", "NOSUCHID")
    assert result.returncode == 1
    assert (
        one_line_error(result.stderr)
        == "ehlo: error: no queued message with id 'NOSUCHID' (--before)"
    )


# --------------------------------------------------------------------------
# show


def test_show_prints_envelope_entries_and_every_attempt(filled: Filled) -> None:
    result = queue_cmd(filled, "show", filled.deferred)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    lines = text.splitlines()
    assert lines[0] == f"id:          {filled.deferred}"
    assert "mail_from:   <sender0@local.test>" in lines
    assert f"received_at: {T0.isoformat()}" in lines
    assert "subject:     message 0" in lines
    assert any(line.startswith("size:        ") for line in lines)
    assert sum(1 for line in lines if line.startswith(filled.deferred)) == 2
    assert "2 attempts:" in lines
    first, second = text.index("attempt 1 at"), text.index("attempt 2 at")
    assert first < text.index("sink.test ESMTP try 1") < second < text.index("try 2")
    assert (
        "attempt 1 at 2026-03-01 12:01:00 UTC to smtp:127.0.0.1:1 via sink.test[127.0.0.1]:1"
        in text
    )
    assert "  <ann@remote.test>: 451 4.3.0 try again later (sink.test)" in lines
    assert "    -> RCPT TO:<ann@remote.test>" in lines

    result = queue_cmd(filled, "show", filled.deferred, "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["id"] == filled.deferred and shown["stored"] is True
    assert shown["mail_from"] == "sender0@local.test"
    assert [e["recipient"] for e in shown["entries"]] == ["ann@remote.test", "bob@remote.test"]
    assert [a["transcript"] for a in shown["attempts"]] == [
        TRANSCRIPT.replace("ESMTP", "ESMTP try 1"),
        TRANSCRIPT.replace("ESMTP", "ESMTP try 2"),
    ]
    assert shown["attempts"][0]["results"]["bob@remote.test"]["code"] == 451

    result = queue_cmd(filled, "show", filled.held)
    assert result.returncode == 0, result.stderr
    assert "0 attempts" in result.stdout.decode().splitlines()


def test_show_a_message_the_store_no_longer_holds(filled: Filled) -> None:
    queue = SQLiteQueue(filled.db)
    try:
        [entry] = queue.entries(queue_ids=[filled.handed_on])
        reply = {"code": 250, "enhanced": "2.0.0", "text": "ok", "host": "sink.test"}
        queue.record([EntryUpdate(filled.handed_on, entry.recipient, "delivered", 0.0, reply)])
    finally:
        queue.close()
    result = run("messages", "delete", filled.handed_on, "--data", str(filled.data))
    assert result.returncode == 0, result.stderr
    result = queue_cmd(filled, "show", filled.handed_on)  # the history stays
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[:2] == [f"id:          {filled.handed_on}", "message:     no longer in the store"]
    assert any(line.startswith(filled.handed_on) and " delivered " in line for line in lines)
    shown = json.loads(queue_cmd(filled, "show", filled.handed_on, "--json").stdout)
    assert shown["stored"] is False and shown["mail_from"] is None
    assert shown["entries"][0]["state"] == "delivered"


def test_show_unknown_or_local_only_id_is_one_line(filled: Filled) -> None:
    for queue_id in ("NOSUCHID", filled.local):
        result = queue_cmd(filled, "show", queue_id)
        assert result.returncode == 1
        assert (
            one_line_error(result.stderr) == f"ehlo: error: no queued message with id {queue_id!r}"
        )


# --------------------------------------------------------------------------
# The actions


def test_retry_makes_entries_due_now(filled: Filled) -> None:
    start = time.time()
    result = queue_cmd(filled, "retry", filled.deferred, filled.held)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"retried 2 entries\n"  # the held one is not queued or deferred
    assert all(start - 1 <= row[3] <= time.time() + 1 for row in filled.rows(filled.deferred))
    assert filled.rows(filled.held)[0][1] == "held"

    result = queue_cmd(filled, "retry", "--all")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"retried 3 entries\n"  # both deferred, and the queued one

    for args, message in (
        ((), "nothing to retry: give message ids or --all"),
        (("--all", filled.deferred), "give message ids or --all, not both"),
    ):
        result = queue_cmd(filled, "retry", *args)
        assert result.returncode == 1
        assert one_line_error(result.stderr) == f"ehlo: error: {message}"


def test_hold_and_release(filled: Filled) -> None:
    result = queue_cmd(filled, "hold", filled.deferred, filled.delivering)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"held 2 entries\n"  # not the one being delivered
    assert [row[1] for row in filled.rows(filled.deferred)] == ["held", "held"]
    assert filled.rows(filled.delivering)[0][1] == "delivering"
    assert keys(list_json(filled, "--state", "held"))[0] == (filled.held, "cat@other.test")

    start = time.time()
    result = queue_cmd(filled, "release", filled.deferred, filled.held, filled.handed_on)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"released 3 entries\n"
    for queue_id in (filled.deferred, filled.held):
        for row in filled.rows(queue_id):
            assert row[1] == "queued" and start - 1 <= row[3] <= time.time() + 1
    assert row[2] == 0  # attempts are kept: cat@ had none
    assert [row[2] for row in filled.rows(filled.deferred)] == [2, 2]


def test_delete_drops_entries_but_not_one_being_delivered(filled: Filled) -> None:
    result = queue_cmd(filled, "delete", filled.deferred, filled.handed_on, filled.delivering)
    assert result.returncode == 1
    assert result.stdout == b"deleted 3 entries\n"
    assert one_line_error(result.stderr) == (
        f"ehlo: error: left alone, being delivered now: {filled.delivering} <dan@remote.test>"
    )
    assert filled.rows(filled.deferred) == [] and filled.rows(filled.handed_on) == []
    assert filled.rows(filled.delivering)[0][1] == "delivering"
    # A message kept only to be handed on leaves the store; another one stays.
    assert not filled.stored(filled.handed_on)
    assert filled.stored(filled.deferred) and filled.stored(filled.delivering)
    result = run("messages", "show", filled.deferred, "--data", str(filled.data))
    assert result.returncode == 0, result.stderr


def test_bounce_asks_the_scheduler_but_not_for_one_being_delivered(filled: Filled) -> None:
    start = time.time()
    result = queue_cmd(filled, "bounce", filled.deferred, filled.held, filled.delivering)
    assert result.returncode == 1
    assert result.stdout == (
        b"3 entries to bounce: the server bounces them with a notice to the sender\n"
    )
    assert one_line_error(result.stderr) == (
        f"ehlo: error: left alone, being delivered now: {filled.delivering} <dan@remote.test>"
    )
    for queue_id in (filled.deferred, filled.held):
        for _rcpt, state, _attempts, due, request in filled.rows(queue_id):
            assert (state, request) == ("queued", "bounce")
            assert start - 1 <= due <= time.time() + 1
    assert filled.rows(filled.delivering)[0][1:] == ("delivering", 0, T0.timestamp() + 2, None)
    listed = queue_cmd(filled, "list", "--state", "queued").stdout.decode()
    assert "(to bounce) 451 4.3.0 try again later" in listed


@pytest.mark.parametrize("action", ["retry", "hold", "release", "delete", "bounce"])
def test_unknown_ids_are_named_in_one_line(filled: Filled, action: str) -> None:
    result = queue_cmd(filled, action, "NOSUCHID", filled.held, "OTHERID", filled.local)
    assert result.returncode == 1
    assert result.stdout.decode().split(" ", 1)[0] in {
        "retried", "held", "released", "deleted", "1", "0",
    }  # fmt: skip
    assert one_line_error(result.stderr) == (
        f"ehlo: error: no queued message with id 'NOSUCHID', 'OTHERID', {filled.local!r}"
    )


def test_actions_need_ids(filled: Filled) -> None:
    for action in ("hold", "release", "delete", "bounce"):
        result = queue_cmd(filled, action)
        assert result.returncode == 2
        assert "the following arguments are required: ID" in result.stderr.decode()
    result = run("queue")
    assert result.returncode == 2
    assert "choose list, show, retry, hold, release, delete or bounce" in result.stderr.decode()


# --------------------------------------------------------------------------
# Data folders without a queue


def test_a_data_folder_without_a_queue(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("queue", "list", "--data", str(empty))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"no entries\n-- the queue is empty\n"
    assert json.loads(run("queue", "list", "--json", "--data", str(empty)).stdout) == []
    assert not (empty / "ehlo.sqlite3").exists()  # listing writes nothing
    result = run("queue", "show", "NOSUCHID", "--data", str(empty))
    assert result.returncode == 1
    assert one_line_error(result.stderr) == "ehlo: error: no queued message with id 'NOSUCHID'"
    result = run("queue", "retry", "--all", "--data", str(empty))
    assert (result.returncode, result.stdout) == (0, b"retried 0 entries\n")

    local = tmp_path / "local"  # messages, none of them to hand on
    asyncio.run(_commit(local, [envelope(0, ["fay@local.test"])]))
    result = run("queue", "list", "--data", str(local))
    assert (result.returncode, result.stdout) == (0, b"no entries\n-- the queue is empty\n")

    result = run("queue", "list", "--data", str(tmp_path / "absent"))
    assert result.returncode == 1
    assert "does not exist" in one_line_error(result.stderr)
    assert not (tmp_path / "absent").exists()


def test_queue_list_imports_neither_the_server_nor_delivery(filled: Filled) -> None:
    script = (
        "import sys\n"
        "from ehlo.cli import main\n"
        f"assert main(['queue', 'list', '--data', {str(filled.data)!r}]) == 0\n"
        "loaded = [m for m in ('ehlo.server', 'ehlo.delivery', 'ehlo.client') if m in sys.modules]\n"  # noqa: E501
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------
# A running server


@pytest.mark.slow
def test_retry_reaches_a_running_server(tmp_path: Path) -> None:
    closed = free_port()  # the next hop: a loopback port nobody listens on
    config = tmp_path / "ehlo.toml"
    config.write_text(
        'domains = ["local.test"]\n'
        'relay_networks = ["127.0.0.0/8"]\n'
        "mta_sts = false\n"
        "retry_min = 3600\n"
        f'[routes]\n"remote.test" = "127.0.0.1:{closed}"\n'
    )
    # The scheduler's resolver asks the loopback DNS server (the route needs no lookup).
    dns = DNSServer({}).start()
    server = ServerProcess(tmp_path, "--config", str(config), "--dns-server", dns.nameserver)
    try:
        server.wait_ready()
        with server.smtp() as client:
            client.sendmail("alice@local.test", ["ann@remote.test"], b"Subject: hi\r\n\r\nhi\r\n")
        data = server.data

        def entry() -> dict[str, Any]:
            result = run("queue", "list", "--json", "--data", str(data))
            assert result.returncode == 0, result.stderr
            listed = json.loads(result.stdout)
            return listed[0] if listed else {}

        def due_in(item: dict[str, Any]) -> float:
            return dt.datetime.fromisoformat(item["next_attempt"]).timestamp() - time.time()

        wait_until(
            lambda: entry().get("state") == "deferred" and entry()["attempts"] == 1,
            "the first attempt deferred",
        )
        first = entry()
        assert first["last_reply"]["code"] == 451
        assert due_in(first) > 1000  # retry_min, with jitter
        result = run("queue", "retry", first["id"], "--data", str(data))
        assert (result.returncode, result.stdout) == (0, b"retried 1 entry\n")
        # The server takes the entry up again at once and tries the next hop,
        # though it refused a moment ago and is marked down: a retry asked for
        # by hand is an attempt now, not a wait for retry_min.
        wait_until(
            lambda: entry().get("state") == "deferred" and entry()["attempts"] == 2,
            "the entry attempted again after ehlo queue retry",
            timeout=15.0,
        )
        again = entry()
        assert again["last_reply"]["code"] == 451 and "refused" in again["last_reply"]["text"]
        shown = run("queue", "show", first["id"], "--data", str(data)).stdout.decode()
        assert "2 attempts:" in shown and f"127.0.0.1:{closed}" in shown
    except AssertionError:
        print(server.stderr())
        raise
    finally:
        server.close()
        dns.stop()


def test_list_reads_a_page_through_the_created_index(tmp_path: Path) -> None:
    # A large queue is listed a page at a time: each read of entries walks the
    # queue_created index (newest first) and stops after the page; the only
    # read of the whole table is the count per state of the closing line.
    data = tmp_path / "data"
    asyncio.run(_commit(data, []))
    now = time.time()
    with sqlite3.connect(data / "ehlo.sqlite3") as conn:
        conn.executemany(
            INSERT_QUEUE,
            [
                QueueItem(f"user{i}@remote.test", HOP).row(f"ID{i:08d}", now - 20000 + i)
                for i in range(20000)
            ],
        )
        conn.execute("UPDATE queue SET state = 'deferred', next_attempt = ?", (LATER,))
    # ehlo queue list in a child whose SQLite connections report each statement;
    # then the plan of each read of the queue table.
    script = (
        "import sqlite3, sys\n"
        "from ehlo.storage import _sqlite_db\n"
        "from ehlo.cli import main\n"
        "plain, seen = _sqlite_db.connect, []\n"
        "def connect(*args, **kwargs):\n"
        "    conn = plain(*args, **kwargs)\n"
        "    conn.set_trace_callback(seen.append)\n"
        "    return conn\n"
        "_sqlite_db.connect = connect\n"
        "code = main(sys.argv[2:])\n"
        "sys.stdout.flush()\n"
        "probe = sqlite3.connect(sys.argv[1])\n"
        "for sql in seen:\n"
        "    if sql.lstrip().upper().startswith('SELECT') and 'FROM queue' in sql:\n"
        "        plan = ' | '.join(r[-1] for r in probe.execute('EXPLAIN QUERY PLAN ' + sql))\n"
        "        by_id = 'queue_id IN (' in sql or 'ORDER BY' not in sql\n"
        "        kind = 'count' if 'count(' in sql else 'id' if by_id else 'page'\n"
        "        print('PLAN', kind, plan, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    db = str(data / "ehlo.sqlite3")
    for extra in ((), ("--before", "ID00019000")):
        command = ["queue", "list", "--limit", "50", *extra, "--data", str(data)]
        result = subprocess.run(
            [sys.executable, "-c", script, db, *command],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert len(result.stdout.splitlines()) == 1 + 50 + 1
        plans = [
            line.split(" ", 2)[1:]
            for line in result.stderr.splitlines()
            if line.startswith("PLAN ")
        ]
        assert [kind for kind, _ in plans if kind == "page"], plans
        for kind, plan in plans:
            if kind == "page":
                assert "USING INDEX queue_created" in plan, plans
            elif kind == "id":
                assert "USING INDEX sqlite_autoindex_queue_1 (queue_id=?)" in plan, plans
            else:  # the closing line's count per state
                assert kind == "count", plans
    # --all reads page after page (a thousand entries each), never one twice.
    result = run("queue", "list", "--all", "--jsonl", "--data", str(data))
    assert result.returncode == 0, result.stderr
    listed = [json.loads(line)["id"] for line in result.stdout.splitlines()]
    assert listed == [f"ID{i:08d}" for i in reversed(range(20000))]
