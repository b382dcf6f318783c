"""``ehlo messages`` at scale: filters, paging, streaming, delete, retention, sizes.

A store of 100,000 messages is generated once per test session through the
store API (:mod:`tests.messages_data`, which ``bench/messages.py`` shares);
the data follow simple rules of the message number, so every filter's
expected set is known. The command line runs as a subprocess
(``python -m ehlo``), its peak memory measured with ``os.wait4``. Retention,
deletes, sizes and the store kind use a real server and smtplib.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ehlo import storage
from ehlo.storage import Envelope, SQLiteStore, open_store

from .conftest import ThreadedServer
from .messages_data import BASE, envelope, generate, when

# The keys of ``messages list --json``, in order (the README lists them).
LIST_FIELDS = (
    "id", "received_at", "client_ip", "client_port", "greeting", "greeting_name", "mail_from",
    "mail_params", "rcpt_to", "tls", "protocol", "server_name", "auth", "greeting_verdict",
    "size", "size_received", "subject",
)  # fmt: skip
COMMAND = (sys.executable, "-m", "ehlo")
TOTAL = 100_000
TIMEOUT = 300


# Runs argv[2:] with its output into the file argv[1]; prints its peak RSS in KiB.
_PEAK_RSS = """
import os, subprocess, sys
with open(sys.argv[1], "wb") as sink:
    child = subprocess.Popen(sys.argv[2:], stdout=sink)
    _, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def ehlo(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "ehlo", *args], capture_output=True, timeout=TIMEOUT
    )


@pytest.fixture(scope="session")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    data = tmp_path_factory.mktemp("big") / "data"
    began = time.monotonic()
    generate(data, TOTAL)
    print(f"\ngenerated {TOTAL} messages in {time.monotonic() - began:.1f} s")
    yield data


def listed(data: Path, *args: str) -> list[dict[str, Any]]:
    result = ehlo("messages", "list", "--jsonl", "--data", str(data), *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def numbers(items: list[dict[str, Any]]) -> list[int]:
    """The message numbers, from the body-independent subject or the port and time."""
    out = []
    for item in items:
        moment = dt.datetime.fromisoformat(item["received_at"])
        out.append(int((moment - BASE).total_seconds()))
    return out


def newest_first(selected: list[int]) -> list[int]:
    return sorted(selected, reverse=True)


FILTERS: list[tuple[tuple[str, ...], Any]] = [
    (("--from", "SENDER42@"), lambda i: i % 100 == 42),
    (("--to", "special@RARE"), lambda i: i % 1000 == 0),
    (("--subject", "invoice äö"), lambda i: i % 997 == 0),
    (("--greeting", "helo"), lambda i: i % 10 == 3),
    (("--tls", "yes", "--from", "sender8@"), lambda i: i % 4 == 0 and i % 100 == 8),
    (("--tls", "no", "--to", "user7@"), lambda i: i % 4 != 0 and i % 50 == 7),
    (("--auth", "alice"), lambda i: i % 250 == 1),
    (("--check", "forward_match=fail"), lambda i: i % 2 == 0 and i % 333 == 5),
    (
        ("--since", when(50_000).isoformat(), "--until", when(50_300).isoformat()),
        lambda i: 50_000 <= i < 50_300,
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "rule"), FILTERS, ids=[" ".join(f[0]) for f in FILTERS])
def test_list_filters_select_exactly(big_store: Path, args: tuple[str, ...], rule: Any) -> None:
    expected = newest_first([i for i in range(TOTAL) if rule(i)])
    assert expected  # the rule selects something
    assert numbers(listed(big_store, "--all", *args)) == expected


@pytest.mark.slow
def test_list_limit_is_the_newest_first_and_text_is_one_line_each(big_store: Path) -> None:
    assert numbers(listed(big_store, "--limit", "50")) == list(range(TOTAL - 1, TOTAL - 51, -1))
    text = ehlo("messages", "list", "--data", str(big_store))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.decode().splitlines()
    assert len(lines) == 1 + 20  # the header and the default page
    assert f"Message {TOTAL - 1}" in lines[1]
    assert b"--before" in text.stderr  # how to see the next page
    array = ehlo("messages", "list", "--json", "--limit", "3", "--data", str(big_store))
    items = json.loads(array.stdout)
    assert [tuple(item) for item in items] == [LIST_FIELDS] * 3


@pytest.mark.slow
def test_paging_covers_all_without_overlap(big_store: Path) -> None:
    # The command line, over a filtered selection, both ways.
    expected = newest_first([i for i in range(TOTAL) if i % 10 == 3])
    pages: list[list[dict[str, Any]]] = []
    args = ["--greeting", "helo", "--limit", "3000"]
    while True:
        more = ["--before", pages[-1][-1]["id"]] if pages else []
        page = listed(big_store, *args, *more)
        if not page:
            break
        pages.append(page)
        assert len(pages) <= 10
    assert [len(p) for p in pages] == [3000, 3000, 3000, 1000]
    assert [n for page in pages for n in numbers(page)] == expected
    # And back: --after the oldest page's newest message gives the page before it.
    assert listed(big_store, *args, "--after", pages[-1][0]["id"]) == pages[-2]
    # The store API, over everything.
    store = SQLiteStore(big_store / "ehlo.sqlite3")
    seen: list[str] = []
    before = None
    for _ in range(30):
        ids = [m.envelope.queue_id for m in store.search(storage.Query(limit=7000, before=before))]
        if not ids:
            break
        seen += ids
        before = ids[-1]
    assert len(seen) == TOTAL == len(set(seen))


@pytest.mark.slow
def test_all_jsonl_streams_in_bounded_memory(big_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "all.jsonl"
    # A small parent runs the command and reports its peak RSS (os.wait4): a
    # child forked from pytest itself would count pytest's pages until exec.
    command = [*COMMAND, "messages", "list", "--all", "--jsonl", "--data", str(big_store)]
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(out), *command],
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    peak_mib = int(result.stdout) / 1024  # ru_maxrss is in KiB on Linux
    print(f"\nmessages list --all --jsonl: peak RSS {peak_mib:.1f} MiB")
    assert peak_mib < 150
    count = 0
    previous = TOTAL
    with open(out, "rb") as lines:
        for line in lines:
            item = json.loads(line)
            assert "greeting_checks" not in item
            moment = dt.datetime.fromisoformat(item["received_at"])
            number = int((moment - BASE).total_seconds())
            assert number == previous - 1
            previous = number
            count += 1
    assert count == TOTAL


# --- a server, smtplib, the command line -------------------------------------------


def send(server: ThreadedServer, subject_line: str, body: bytes = b"hello\r\n") -> None:
    with smtplib.SMTP(server.host, server.port, timeout=30) as client:
        message = f"Subject: {subject_line}\r\n\r\n".encode() + body
        client.sendmail("a@example.org", ["b@example.org"], message)


def store_ids(data: Path) -> list[str]:
    return [item["id"] for item in listed(data, "--all")]


def test_retention_keeps_the_newest_while_a_client_sends(threaded_server: Any) -> None:
    keep = 10
    server = threaded_server(keep_messages=keep)
    data = Path(server.config.data_dir)
    large = b"x" * 100 + b"\r\n"
    large_body = large * 4000  # 400 KiB: a body file of its own
    sent = 80
    with smtplib.SMTP(server.host, server.port, timeout=30) as client:
        for n in range(sent):
            body = large_body if n % 10 == 0 else b"small\r\n"
            message = f"Subject: m{n}\r\n\r\n".encode() + body
            assert client.sendmail("a@example.org", ["b@example.org"], message) == {}
    bodies = data / "ehlo.sqlite3.bodies"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        items = listed(data, "--all")
        if len(items) == keep:
            break
        time.sleep(0.2)
    newest = [f"m{n}" for n in range(sent - 1, sent - 1 - keep, -1)]
    assert [item["subject"] for item in items] == newest
    kept = {item["id"] for item in items}
    files = {p.name for p in bodies.iterdir() if p.is_file()}
    assert files <= kept  # the bodies of the deleted large messages are gone
    assert len(files) == 1  # m70's, the one large message kept


def store_messages(kind: str, data: Path, messages: Iterable[tuple[Envelope, bytes]]) -> None:
    """Commit each (envelope, message) to a ``kind`` store in ``data``, in order."""

    async def fill() -> None:
        store = open_store(kind, data)
        await store.start()
        try:
            for env, message in messages:
                writer = store.begin(env)
                writer.write(message)
                await writer.commit()
        finally:
            await store.close()

    asyncio.run(fill())


def dated(i: int, when: dt.datetime) -> Envelope:
    """The generator's envelope ``i``, received at ``when``."""
    env = envelope(i)
    env.received_at = when
    return env


@pytest.mark.parametrize("kind", ["sqlite", "maildir"])
def test_prune_by_count_and_age(tmp_path: Path, kind: str) -> None:
    data = tmp_path / "data"
    now = dt.datetime.now(dt.UTC)
    ages = (10, 5, 0.5, 0.1, 0)  # days

    store_messages(
        kind,
        data,
        (
            (dated(i, now - dt.timedelta(days=age)), f"Subject: age {age}\r\n\r\nx\r\n".encode())
            for i, age in enumerate(ages)
        ),
    )
    store = open_store(kind, data)
    ids = [m.envelope.queue_id for m in store.search(storage.Query())]
    assert len(ids) == len(ages)
    if kind == "sqlite":  # the Maildir store tells age by the file names (all made now)
        assert store.prune(storage.Retention(keep_days=1)) == 2
        assert [m.envelope.queue_id for m in store.search(storage.Query())] == ids[:3]
    assert store.prune(storage.Retention(keep_messages=2)) == (1 if kind == "sqlite" else 3)
    assert [m.envelope.queue_id for m in store.search(storage.Query())] == ids[:2]


@pytest.mark.parametrize("kind", ["sqlite", "maildir"])
def test_delete_by_id_before_and_all(tmp_path: Path, kind: str) -> None:
    data = tmp_path / "data"

    store_messages(
        kind,
        data,
        (
            (
                dated(i, dt.datetime(2025, 1, 1 + i, tzinfo=dt.UTC)),
                f"Subject: d{i}\r\n\r\n".encode() + (b"y" * (300 * 1024) if i == 1 else b"z\r\n"),
            )
            for i in range(6)
        ),
    )
    ids = store_ids(data)
    assert len(ids) == 6
    # By id, the newest, d5 (one unknown id: reported, exit 1, the others deleted).
    result = ehlo("messages", "delete", ids[0], "06H24STAB3WY3GF6", "--data", str(data))
    assert result.returncode == 1
    assert result.stdout == b"deleted 1 message\n"
    assert b"06H24STAB3WY3GF6" in result.stderr
    assert store_ids(data) == ids[1:]
    # Before a date: d0 and d1 (received on January 1 and 2) and d1's body file.
    result = ehlo("messages", "delete", "--before", "2025-01-03", "--data", str(data))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"deleted 2 messages\n"
    assert [item["subject"] for item in listed(data, "--all")] == ["d4", "d3", "d2"]
    if kind == "sqlite":
        assert [p for p in (data / "ehlo.sqlite3.bodies").iterdir() if p.is_file()] == []
    else:
        assert len(list((data / "maildir" / "ehlo-envelopes").iterdir())) == 3
    # Nothing named: a usage error, nothing deleted.
    assert ehlo("messages", "delete", "--data", str(data)).returncode == 1
    result = ehlo("messages", "delete", "--all", "--data", str(data))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"deleted 3 messages\n"
    assert store_ids(data) == []


def test_sizes_agree_in_list_show_and_log(
    threaded_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = threaded_server(max_message_size=20_000)
    data = Path(server.config.data_dir)
    body = b"..leading dot\r\n" + b"line\r\n" * 100
    with caplog.at_level(logging.INFO, logger="ehlo"):
        send(server, "sized", body)
        with smtplib.SMTP(server.host, server.port, timeout=30) as client:
            client.ehlo()
            client.mail("a@example.org")  # no SIZE=: the body itself is too large
            client.rcpt("b@example.org")
            code, _ = client.data(b"x" * 30_000 + b"\r\n")
            assert code == 552
        server.stop()
    [item] = listed(data, "--all")
    shown = ehlo("messages", "show", item["id"], "--json", "--data", str(data))
    assert shown.returncode == 0, shown.stderr
    show = json.loads(shown.stdout)
    raw = ehlo("messages", "show", item["id"], "--raw", "--data", str(data)).stdout
    sent = len(b"Subject: sized\r\n\r\n" + body)  # as given to smtplib, which dot-stuffs it
    assert item["size"] == show["size"] == len(raw)
    assert item["size_received"] == show["size_received"] == sent
    logged = [r.__dict__ for r in caplog.records if getattr(r, "event", "") == "message"]
    [accepted] = [r for r in logged if r["outcome"] == "accepted"]
    assert accepted["queue_id"] == item["id"]
    assert accepted["size"] == len(raw)
    assert f"size={len(raw)} " in accepted["message"]
    [over] = [r for r in logged if r["outcome"] == "refused"]
    assert over["size"] >= 30_000  # what was received, though none of it was stored


def test_store_kind_is_recorded_and_a_mismatch_named(tmp_path: Path) -> None:
    data = tmp_path / "data"

    store_messages("sqlite", data, [(envelope(1), b"Subject: kind\r\n\r\nx\r\n")])
    assert (data / "store").read_text() == "sqlite\n"
    result = ehlo("messages", "list", "--store", "maildir", "--data", str(data))
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1
    assert "holds a sqlite store, not maildir" in lines[0]
    # Without --store, the folder's own kind.
    assert [item["subject"] for item in listed(data, "--all")] == ["kind"]
    maildir = tmp_path / "mail"
    asyncio.run(_fill_maildir(maildir))
    assert (maildir / "store").read_text() == "maildir\n"
    assert [item["subject"] for item in listed(maildir, "--all")] == ["in a maildir"]
    result = ehlo("messages", "list", "--store", "sqlite", "--data", str(maildir))
    assert result.returncode == 1
    assert "holds a maildir store, not sqlite" in result.stderr.decode()


async def _fill_maildir(data: Path) -> None:
    store = open_store("maildir", data)
    await store.start()
    writer = store.begin(envelope(2))
    writer.write(b"Subject: in a maildir\r\n\r\nx\r\n")
    await writer.commit()
    await store.close()


@pytest.mark.parametrize("kind", ["sqlite", "maildir"])
def test_paging_is_the_same_for_both_stores(tmp_path: Path, kind: str) -> None:
    data = tmp_path / "data"

    store_messages(
        kind, data, ((envelope(i), f"Subject: p{i}\r\n\r\nx\r\n".encode()) for i in range(7))
    )
    store = open_store(kind, data)
    ids = [m.envelope.queue_id for m in store.search(storage.Query())]
    assert len(ids) == 7

    def page(**bounds: Any) -> list[str]:
        return [m.envelope.queue_id for m in store.search(storage.Query(limit=3, **bounds))]

    assert page() == ids[:3]
    assert page(before=ids[2]) == ids[3:6]
    assert page(before=ids[5]) == ids[6:]
    assert page(after=ids[6]) == ids[3:6]  # the page just newer, newest first
    assert page(after=ids[5], before=ids[1]) == ids[2:5]
    with pytest.raises(storage.StoreError, match="no message with id"):
        page(before="06H24STAB3WY3GF6")
