"""The commands against the PostgreSQL store: ``--store postgresql://...`` and ``ehlo db``.

A SQLite data folder of 1,000 messages (20 of them over 256 KiB, kept in
body files; varied envelopes; queue entries in every state with their
attempts; a queue entry whose message was handed on and deleted; the
session log; two AUTH users) is filled once for the module through the
SQLite store itself, then ``ehlo db import`` (a real subprocess) copies it
into a throwaway PostgreSQL database (``pg_cluster`` of conftest), and the
tests compare what the database holds with SQL, byte for byte: every body
as its chunk rows concatenated, every envelope column as the SQLite store
keeps it. The import is interrupted by SIGKILL while it waits on a row
lock the test holds in the middle of its second batch, and run again.
A 48 MiB body is imported by a process that stays far below the body's
size. ``ehlo db status``/``migrate`` run on empty and current databases; a
URL holding a password and a database out of reach are each one line.
``ehlo messages list``/``show --raw`` and ``ehlo queue list`` answer from
the imported database as from the SQLite folder, and ``ehlo serve --store
postgresql://... --workers 2`` migrates a new database and stores there.
Most commands run in this process (``ehlo.cli.main``); the import that is
killed, the one that measures memory, and ``serve`` are subprocesses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ehlo.auth.users import UserStore
from ehlo.cli import main
from ehlo.ids import new_queue_id
from ehlo.storage import Envelope, open_store
from ehlo.storage._pg_rows import INSERT_MESSAGE, message_values
from ehlo.storage._pg_schema import CHUNK_SIZE, LATEST
from ehlo.storage.base import JSONText
from ehlo.storage.queue import Attempt, EntryUpdate, QueueItem, SQLiteQueue
from ehlo.storage.sqlite import _message

from .helpers import free_port, wait_until
from .pgserver import PgCluster
from .test_cli import HELO_MESSAGE, ehlo_cmd, one_line_error, serving
from .test_queue_cli import fill

psycopg = pytest.importorskip("psycopg")

MESSAGES = 1000
LARGE = 20  # bodies over CHUNK_SIZE (body files in the SQLite store)
T0 = dt.datetime(2026, 4, 1, 8, 0, 0, tzinfo=dt.UTC)
IMPORT_TIMEOUT = 120.0
ENVELOPE_TEXT = ("mail_params", "rcpt_to", "tls", "extra")
REPORT = JSONText('{"forward_match":{"result":"pass","names":["client.test"]}}')


@dataclasses.dataclass
class Source:
    """The SQLite data folder and what the test put in it."""

    data: Path
    ids: list[str]  # every message, sorted
    large: list[str]
    orphan: str  # a queue entry (delivered) whose message was deleted

    @property
    def db(self) -> Path:
        return self.data / "ehlo.sqlite3"

    def sqlite(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db) as conn:
            return conn.execute(sql, params).fetchall()


def _body(n: int, size: int) -> bytes:
    """A message of about ``size`` octets, every octet value in it."""
    head = f"Subject: message {n} \u00e9t\u00e9\r\nFrom: <s{n}@local.test>\r\n\r\n".encode()
    return head + random.Random(n).randbytes(max(size - len(head), 0))


def _envelope(n: int) -> Envelope:
    extra: dict[str, Any] = {"greeting_checks": REPORT} if n % 3 == 0 else {}
    if n % 7 == 0:
        extra["auth"] = {"user": f"User{n}", "mechanism": "PLAIN"}
    return Envelope(
        queue_id=new_queue_id(),
        client_ip=f"127.0.{n // 250}.{n % 250 + 1}",
        client_port=20000 + n,
        greeting="EHLO" if n % 2 else "HELO",
        greeting_name=f"Client{n}.Test",
        mail_from="" if n % 11 == 0 else f"S{n}@Local.Test",
        mail_params={"BODY": "8BITMIME", "SIZE": str(n)} if n % 5 == 0 else {},
        rcpt_to=[f"r{n}@x.test", f"Other{n}@Y.test"][: 1 + n % 2],
        received_at=T0 + dt.timedelta(seconds=n, microseconds=n * 7),
        tls={"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"} if n % 4 == 0 else None,
        protocol="ESMTPS" if n % 4 == 0 else "ESMTP",
        server_name="mx.test",
        extra=extra,
        size_received=None if n % 13 == 0 else 1000 + n,
    )


async def _fill_messages(data: Path, count: int) -> tuple[list[str], str]:
    """``count`` messages (the first LARGE of them large), and one handed on and deleted."""
    store = open_store("sqlite", data, writer="thread")
    await store.start()
    large = []
    try:
        for first in range(0, count, 100):
            writers = []
            for n in range(first, min(first + 100, count)):
                env = _envelope(n)
                size = CHUNK_SIZE + 1 + n * 37_000 if n < LARGE else 200 + n * 3
                if n < LARGE:
                    large.append(env.queue_id)
                writer = store.begin(env)
                writer.write(_body(n, size))
                writers.append(writer.commit())
            await asyncio.gather(*writers)
        gone = _envelope(count)
        gone.queue = [QueueItem("far@remote.test", "smtp:127.0.0.1:1")]
        writer = store.begin(gone)
        writer.write(b"Subject: handed on\r\n\r\nbye\r\n")
        await writer.commit()
        for n in range(3):
            store.log_session(
                {
                    "id": f"session{n}",
                    "started_at": f"2026-04-01T08:00:0{n}+00:00",
                    "ended_at": f"2026-04-01T08:00:1{n}+00:00",
                    "client_ip": "127.0.0.1",
                    "messages": n,
                }
            )
    finally:
        await store.close()
    return large, gone.queue_id


def _hand_on(data: Path, queue_id: str) -> None:
    """Deliver the entry of ``queue_id`` (one attempt), then delete its message."""
    queue = SQLiteQueue(data / "ehlo.sqlite3")
    try:
        entries = queue.entries(queue_ids=[queue_id])
        queue.claim(entries)
        reply = {"code": 250, "enhanced": "2.0.0", "text": "ok", "host": "sink.test"}
        queue.record(
            [EntryUpdate(e.queue_id, e.recipient, "delivered", 0.0, reply) for e in entries],
            [Attempt(queue_id, T0.timestamp(), "smtp:127.0.0.1:1", "sink.test", {}, "-> QUIT\n")],
        )
    finally:
        queue.close()
    store = open_store("sqlite", data)
    assert list(store.delete([queue_id])) == [queue_id]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    data = tmp_path_factory.mktemp("pgcli") / "data"
    fill(data)  # 5 messages: entries deferred (2 attempts), held, delivering, queued
    large, orphan = asyncio.run(_fill_messages(data, MESSAGES - 5))
    _hand_on(data, orphan)
    (data / "users").write_text(
        "# AUTH users\n"
        f"alice:$argon2id$v=19$m=65536,t=3,p=4${'A' * 22}${'B' * 43}\n"
        f"bob@local.test:$argon2id$v=19$m=65536,t=3,p=4${'C' * 22}${'D' * 43}\n"
    )
    assert UserStore(data).names() == ["alice", "bob@local.test"]
    with sqlite3.connect(data / "ehlo.sqlite3") as conn:
        ids = sorted(q for (q,) in conn.execute("SELECT queue_id FROM messages"))
    assert len(ids) == MESSAGES
    return Source(data, ids, large, orphan)


class Database:
    """A database of the test cluster, and SQL on it."""

    def __init__(self, cluster: PgCluster) -> None:
        self.name = cluster.create_database()
        self.url = cluster.url(self.name)

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(statement, params).fetchall()

    def one(self, statement: str, params: tuple[Any, ...] = ()) -> Any:
        return self.sql(statement, params)[0][0]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[bytes]:
    """``ehlo ARGS`` run in this process (the same ``main`` as the command)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.encode(), err.encode())


def db_import(source: Source, db: Database, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ehlo_cmd("db", "import", str(source.data), "--store", db.url, *args),
        capture_output=True, text=True, timeout=IMPORT_TIMEOUT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def imported(
    pg_cluster: PgCluster, source: Source
) -> tuple[Database, subprocess.CompletedProcess[str]]:
    """A database the whole folder was imported into, in one run, and that run."""
    db = Database(pg_cluster)
    return db, db_import(source, db, "--progress", "400")


# --------------------------------------------------------------------------
# ehlo db import


def test_import_copies_every_message_byte_for_byte(
    source: Source, imported: tuple[Database, subprocess.CompletedProcess[str]]
) -> None:
    db, done = imported
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.splitlines()[0].startswith(f"imported {MESSAGES} messages (")
    assert ", 0 already there" in done.stdout
    progress = [line for line in done.stderr.splitlines() if line.startswith("ehlo db import:")]
    assert len(progress) == 2, done.stderr  # after 400 and 800 messages
    assert db.one("SELECT count(*) FROM messages") == MESSAGES
    assert sorted(q for (q,) in db.sql("SELECT queue_id FROM messages")) == source.ids

    # Bodies: the chunk rows of each message, in order, are its stored bytes.
    store = open_store("sqlite", source.data)
    rows = db.sql(
        "SELECT m.queue_id, m.size, m.chunks, count(c.seq), max(length(c.data)),"
        " string_agg(c.data, ''::bytea ORDER BY c.seq)"
        " FROM messages m LEFT JOIN chunks c USING (queue_id) GROUP BY m.queue_id"
    )
    assert len(rows) == MESSAGES
    for queue_id, size, chunks, count, longest, body in rows:
        expected = store.raw(queue_id)
        assert expected is not None and len(expected) == size
        assert bytes(body or b"") == expected, queue_id
        assert chunks == count and (longest or 0) <= CHUNK_SIZE
        if queue_id in source.large:
            assert count == -(-size // CHUNK_SIZE) and count >= 2

    # Envelopes: every column as the SQLite store keeps it, and the search columns.
    columns = (
        "queue_id, received_at, client_ip, client_port, greeting, greeting_name, mail_from,"
        " mail_params, rcpt_to, tls, protocol, server_name, extra, size, subject, size_received"
    )
    theirs = {row[0]: row for row in source.sqlite(f"SELECT {columns} FROM messages")}
    attachments = dict(source.sqlite("SELECT queue_id, attachments FROM search"))
    mine = db.sql(f"SELECT {columns}, s_mail_from, s_auth, s_checks, attachments FROM messages")
    for row in mine:
        old = theirs[row[0]]
        assert row[1] == dt.datetime.fromisoformat(old[1])
        assert row[2:7] == old[2:7] and row[10:12] == old[10:12] and row[13:16] == old[13:16]
        for at in (7, 8, 9, 12):  # the JSON text, byte for byte
            assert row[at] == old[at]
        assert row[16] == old[6].casefold()
        expected = message_values(
            _message((*old, attachments[row[0]])).envelope,
            size=old[13], subject=old[14], attachments=None, chunks=0, node="",
        )  # fmt: skip
        assert (row[17], row[18]) == (expected[23], expected[24])  # s_auth, s_checks
        assert row[19] == (None if attachments[row[0]] is None else bool(attachments[row[0]]))
    assert any(r[17] for r in mine) and any(r[18] for r in mine)  # auth and checks were there


def test_import_copies_queue_attempts_sessions_and_users(
    source: Source, imported: tuple[Database, subprocess.CompletedProcess[str]]
) -> None:
    db, done = imported
    assert done.returncode == 0, done.stderr
    queue_columns = (
        "queue_id, recipient, next_hop, state, attempts, next_attempt, created, notify, orcpt,"
        " last_reply, updated, delay_notified, request"
    )
    theirs = sorted(source.sqlite(f"SELECT {queue_columns} FROM queue"))
    mine = sorted(db.sql(f"SELECT {queue_columns}, lease_token FROM queue"))
    assert len(mine) == len(theirs) == 6
    for old, new in zip(theirs, mine, strict=True):
        state = "queued" if old[3] == "delivering" else old[3]  # no lease held by anyone
        assert new[:13] == (*old[:3], state, *old[4:11], bool(old[11]), old[12])
        assert new[13] is None
    assert {row[3] for row in theirs} == {"deferred", "held", "delivering", "queued", "delivered"}
    assert source.orphan in {row[0] for row in mine}
    attempt_columns = "queue_id, at, next_hop, host, results, transcript"
    assert sorted(db.sql(f"SELECT {attempt_columns} FROM attempts")) == sorted(
        source.sqlite(f"SELECT {attempt_columns} FROM attempts")
    )
    assert db.one("SELECT count(*) FROM attempts") == 3
    sessions = source.sqlite("SELECT id, started_at, ended_at, client_ip, record FROM sessions")
    assert len(sessions) == 3
    assert db.sql(
        "SELECT id, started_at, ended_at, client_ip, record FROM sessions ORDER BY seq"
    ) == sorted(sessions)
    users = dict(
        line.split(":", 1)
        for line in (source.data / "users").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert dict(db.sql("SELECT name, phc FROM users")) == users
    assert len(users) == 2
    assert done.stdout.splitlines()[1] == "queue entries 6, attempts 3, sessions 3, users 2"


def test_an_interrupted_import_finishes_when_run_again(
    pg_cluster: PgCluster, source: Source, capsys: pytest.CaptureFixture[str]
) -> None:
    db = Database(pg_cluster)
    migrated = cli(capsys, "db", "migrate", "--store", db.url)
    assert migrated.returncode == 0, migrated.stderr
    # The test holds a row of the second batch (an uncommitted insert of the
    # same queue id): the import commits its first batch, says so, and waits.
    blocker = source.ids[250]
    old = source.sqlite("SELECT m.*, NULL FROM messages m WHERE queue_id = ?", (blocker,))[0]
    stored = _message(old)
    values = message_values(
        stored.envelope, size=stored.size, subject=stored.subject, attachments=None,
        chunks=0, node="test",
    )  # fmt: skip
    with psycopg.connect(db.url) as holder:
        holder.execute(INSERT_MESSAGE, values)
        proc = subprocess.Popen(
            ehlo_cmd("db", "import", str(source.data), "--store", db.url, "--progress", "1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            first = proc.stderr.readline()  # blocks until the first batch is committed
            assert first.startswith("ehlo db import: 200 messages: 200 imported"), first
            wait_until(
                lambda: db.one(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = 'ehlo db' AND wait_event_type = 'Lock'"
                ) == 1,
                timeout=60, what="the import waiting on the held row",
            )  # fmt: skip
            # A second import is refused while the first runs.
            second = cli(capsys, "db", "import", str(source.data), "--store", db.url)
            assert second.returncode == 1
            assert "another ehlo db import is running" in one_line_error(second.stderr)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        holder.rollback()
    wait_until(
        lambda: db.one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ehlo db'"
        ) == 0,
        timeout=60, what="the killed import's session to end",
    )  # fmt: skip
    assert db.one("SELECT count(*) FROM messages") == 200
    assert db.one("SELECT count(*) FROM chunks") == db.one("SELECT sum(chunks) FROM messages")

    again = cli(capsys, "db", "import", str(source.data), "--store", db.url, "--progress", "0")
    assert again.returncode == 0, again.stderr
    assert again.stderr == b""
    summary = again.stdout.decode().splitlines()[0]
    assert summary.startswith(f"imported {MESSAGES - 200} messages (")
    assert summary.endswith(", 200 already there")
    assert db.one("SELECT count(*) FROM messages") == MESSAGES
    assert db.one("SELECT count(DISTINCT queue_id) FROM messages") == MESSAGES
    assert db.one("SELECT count(*) FROM chunks") == db.one("SELECT sum(chunks) FROM messages")
    assert db.one("SELECT count(*) FROM queue") == 6
    assert db.one("SELECT count(*) FROM attempts") == 3

    third = cli(capsys, "db", "import", str(source.data), "--store", db.url)  # nothing left
    assert third.returncode == 0, third.stderr
    assert third.stdout.decode().splitlines() == [
        f"imported 0 messages (0 octets), {MESSAGES} already there",
        "queue entries 0, attempts 0, sessions 0, users 0 (2 already there)",
    ]
    assert db.one("SELECT count(*) FROM messages") == MESSAGES
    assert db.one("SELECT count(*) FROM sessions") == 3
    assert db.one("SELECT count(*) FROM attempts") == 3


def test_import_refuses_a_folder_without_a_sqlite_store(
    pg_cluster: PgCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = Database(pg_cluster)
    (tmp_path / "maildir").mkdir()
    for folder, says in (
        (tmp_path, "holds a maildir store"),
        (tmp_path / "nothing", "does not exist"),
    ):
        done = cli(capsys, "db", "import", str(folder), "--store", db.url)
        assert done.returncode == 1
        assert says in one_line_error(done.stderr)


# --------------------------------------------------------------------------
# ehlo db status and migrate


def test_status_and_migrate_on_an_empty_then_current_database(
    pg_cluster: PgCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = Database(pg_cluster)
    status = cli(capsys, "db", "status", "--store", db.url)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.decode().splitlines()
    assert (
        lines[0]
        == f"schema version:     none (latest {LATEST}): run ehlo db migrate, or start ehlo serve"
    )
    assert lines[1].startswith("server version:     ") and lines[2] == "synchronous_commit: on"
    assert len(lines) == 3

    first = cli(capsys, "db", "migrate", "--store", db.url)
    assert (first.returncode, first.stdout.decode()) == (0, f"schema version 0 -> {LATEST}\n")
    again = cli(capsys, "db", "migrate", "--store", db.url)
    assert (again.returncode, again.stdout.decode()) == (
        0,
        f"schema version {LATEST}: up to date\n",
    )
    assert db.one("SELECT count(*) FROM ehlo_schema") == LATEST

    # --store postgresql with the database_url of --config.
    config = tmp_path / "ehlo.toml"
    config.write_text(f'database_url = "{db.url}"\n')
    status = cli(capsys, "db", "status", "--json", "--store", "postgresql", "--config", str(config))
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert (info["schema_version"], info["latest_version"]) == (LATEST, LATEST)
    assert (info["messages"], info["queue"], info["users"]) == (0, {}, 0)
    text = cli(capsys, "db", "status", "--config", str(config.with_name("store.toml")))
    assert text.returncode == 2  # no such file: a configuration error


def test_status_counts_what_the_import_brought(
    imported: tuple[Database, subprocess.CompletedProcess[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    db, _done = imported
    status = cli(capsys, "db", "status", "--store", db.url)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.decode().splitlines()
    assert lines[0] == f"schema version:     {LATEST} (up to date)"
    assert lines[3:] == [
        f"messages:           {MESSAGES}",
        "queue:              2 queued, 2 deferred, 1 delivered, 1 held",
        "users:              2",
    ]


def test_db_without_a_database_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    done = cli(capsys, "db", "status", "--store", "sqlite")
    assert done.returncode == 2  # not a choice of ehlo db
    done = cli(capsys, "db", "status")
    assert done.returncode == 1
    assert "give --store postgresql://" in one_line_error(done.stderr)


# --------------------------------------------------------------------------
# --store postgresql://... in every command


STORE_COMMANDS = (
    ("messages", "list"),
    ("messages", "show", "x"),
    ("queue", "list"),
    ("db", "status"),
    ("db", "migrate"),
    ("serve", "--workers", "2", "--listen", "127.0.0.1:0"),
)


def _data(command: tuple[str, ...], folder: Path) -> tuple[str, ...]:
    """``--data FOLDER`` for the commands that have it (not ``ehlo db``)."""
    return () if command[0] == "db" else ("--data", str(folder))


@pytest.mark.parametrize("command", STORE_COMMANDS, ids=" ".join)
def test_a_url_with_a_password_is_refused_in_one_line(
    command: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for url in (
        "postgresql://ehlo:s3cr3tpw@127.0.0.1/ehlo",
        "postgres://ehlo@127.0.0.1/ehlo?password=s3cr3tpw",
    ):
        done = cli(capsys, *command, "--store", url, *_data(command, tmp_path))
        assert done.returncode == 2, done.stderr
        line = one_line_error(done.stderr)
        assert line.startswith("ehlo: error: --store: the ")
        assert "~/.pgpass" in line and "PGPASSWORD" in line
        assert b"s3cr3tpw" not in done.stderr + done.stdout
    # In a configuration file, the error names the key.
    config = tmp_path / "ehlo.toml"
    config.write_text('store = "postgresql"\ndatabase_url = "postgresql://u:s3cr3tpw@h/d"\n')
    done = cli(capsys, *command, "--config", str(config), *_data(command, tmp_path))
    assert done.returncode == 2
    assert one_line_error(done.stderr).startswith("ehlo: error: config key database_url: ")
    assert b"s3cr3tpw" not in done.stderr


@pytest.mark.parametrize("command", STORE_COMMANDS[:5], ids=" ".join)
def test_a_database_out_of_reach_is_one_line(
    command: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql://ehlo@127.0.0.1:{free_port()}/ehlo"
    started = time.monotonic()
    done = cli(capsys, *command, "--store", url, *_data(command, tmp_path))
    assert done.returncode == 1
    line = one_line_error(done.stderr)
    assert line.startswith("ehlo: error: postgresql: ") and "refused" in line, line
    assert time.monotonic() - started < 30


def test_help_texts_name_the_postgresql_store(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (("serve",), ("messages", "list"), ("queue", "list"), ("db", "import")):
        done = cli(capsys, *command, "--help")
        assert done.returncode == 0
        assert b"postgresql://USER@HOST/DB" in done.stdout, command
    top = cli(capsys, "--help")
    assert b"db" in top.stdout and b"PostgreSQL" in top.stdout


# --------------------------------------------------------------------------
# messages and queue, read from the database


def test_messages_and_queue_read_the_imported_database_as_the_sqlite_folder(
    source: Source,
    imported: tuple[Database, subprocess.CompletedProcess[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    db, _done = imported
    for command in (("messages", "list", "--jsonl", "--all"), ("messages", "list", "--to", "r9")):
        mine = cli(capsys, *command, "--store", db.url)
        theirs = cli(capsys, *command, "--data", str(source.data))
        assert mine.returncode == theirs.returncode == 0, mine.stderr
        assert (mine.stdout, mine.stderr) == (theirs.stdout, theirs.stderr)
        assert len(mine.stdout.splitlines()) >= 20 and b"Traceback" not in mine.stderr
    listed = json.loads(
        cli(capsys, "messages", "list", "--json", "--all", "--store", db.url).stdout
    )
    assert sorted(item["id"] for item in listed) == source.ids

    queued = cli(capsys, "queue", "list", "--json", "--all", "--store", db.url)
    assert queued.returncode == 0, queued.stderr
    was = json.loads(
        cli(capsys, "queue", "list", "--json", "--all", "--data", str(source.data)).stdout
    )
    now = json.loads(queued.stdout)
    assert len(now) == len(was) == 6
    for entry, old in zip(now, was, strict=True):
        if old["state"] == "delivering":  # queued again, due when it was due
            assert (entry.pop("state"), old.pop("state")) == ("queued", "delivering")
            assert entry.pop("next_attempt") is not None and old.pop("next_attempt") is None
        assert entry == old

    large = source.large[-1]  # the largest body, as the command prints it
    raw = subprocess.run(
        ehlo_cmd("messages", "show", large, "--raw", "--store", db.url),
        capture_output=True, timeout=IMPORT_TIMEOUT,
    )  # fmt: skip
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == open_store("sqlite", source.data).raw(large)
    assert len(raw.stdout) > 3 * CHUNK_SIZE


def test_messages_list_on_an_empty_database(
    pg_cluster: PgCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    db = Database(pg_cluster)
    assert cli(capsys, "db", "migrate", "--store", db.url).returncode == 0
    done = cli(capsys, "messages", "list", "--store", db.url)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"no messages\n", b"")
    done = cli(capsys, "messages", "show", "nosuchid", "--store", db.url)
    assert done.returncode == 1
    assert one_line_error(done.stderr) == "ehlo: error: no message with id 'nosuchid'"


def test_serve_with_workers_on_a_new_database(
    pg_cluster: PgCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = Database(pg_cluster)  # empty: the supervisor migrates it once, before forking
    with serving(tmp_path, "--store", db.url, "--workers", "2") as server:
        for n in range(4):
            with server.smtp() as client:
                client.sendmail(f"a{n}@example.org", ["b@example.net"], HELO_MESSAGE)
        assert server.stop() == 0
        assert "Traceback" not in server.stderr()
    assert db.one("SELECT count(*) FROM ehlo_schema") == LATEST
    listed = cli(capsys, "messages", "list", "--json", "--store", db.url)
    assert listed.returncode == 0, listed.stderr
    assert sorted(m["mail_from"] for m in json.loads(listed.stdout)) == [
        f"a{n}@example.org" for n in range(4)
    ]
    assert not (tmp_path / "data" / "ehlo.sqlite3").exists()  # nothing kept in the folder


async def _one_message(data: Path, size: int) -> str:
    store = open_store("sqlite", data, writer="thread")
    await store.start()
    try:
        env = _envelope(1)
        writer = store.begin(env)
        block = bytes(range(256)) * 256  # 64 KiB
        for _ in range(size // len(block)):
            writer.write(block)
        await writer.commit()
    finally:
        await store.close()
    return env.queue_id


def _peak_rss(pid: int) -> int:
    """The highest resident size of process ``pid`` (its ``VmHWM``, octets), read until
    it ends (the kernel resets it at exec, unlike the rusage of a forked child)."""
    peak = 0
    deadline = time.monotonic() + IMPORT_TIMEOUT
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return peak
        found = [line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")]
        if not found:  # a zombie: it has ended
            return peak
        peak = max(peak, int(found[0]) * 1024)
        time.sleep(0.02)
    return peak


def test_a_large_body_is_streamed_not_held(pg_cluster: PgCluster, tmp_path: Path) -> None:
    size = 48 * 1024 * 1024
    data = tmp_path / "data"
    queue_id = asyncio.run(_one_message(data, size))
    db = Database(pg_cluster)
    proc = subprocess.Popen(
        ehlo_cmd("db", "import", str(data), "--store", db.url),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        peak = _peak_rss(proc.pid)
        _out, err = proc.communicate(timeout=IMPORT_TIMEOUT)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The interpreter with ehlo and psycopg loaded is about 40 MiB; the body
    # held whole once would add 48 MiB more.
    assert 0 < peak < size + 30 * 1024 * 1024, peak
    rows = db.sql(
        "SELECT count(*), sum(length(data)), max(length(data)), md5(string_agg(data, ''::bytea"
        " ORDER BY seq)) FROM chunks WHERE queue_id = %s",
        (queue_id,),
    )
    body = (data / "ehlo.sqlite3.bodies" / queue_id).read_bytes()
    assert rows == [(size // CHUNK_SIZE, size, CHUNK_SIZE, hashlib.md5(body).hexdigest())]
