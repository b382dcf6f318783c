"""Durability ordering: every 250 is written after its message was synced.

A SIGKILL cannot show a missing fsync (the page cache outlives the killed
process; only a power loss loses it), nor an acknowledgement sent a moment
before the commit. So ``ehlo serve`` runs under ``strace -f`` (the
supervisor, its worker, the SQLite writer process and every thread), one
client sends messages one after another, and the trace is read back: for
each "250 ... queued as ID" written to the client's socket, the calls made
since the "354" of that transaction must contain, in this order and all
finished before the 250 was written:

- sqlite, body in the database: the WAL written, then the WAL synced
  (``synchronous=FULL``: the COMMIT is durable once its WAL frames are);
- sqlite, body in a file of its own: the body file written, then synced,
  linked under its final name, the bodies folder synced, and the WAL
  written and synced after that;
- maildir: the message file written, then synced; its envelope sidecar
  written, synced, renamed into place and ``ehlo-envelopes/`` synced; the
  message renamed into ``new/``; ``new/`` synced.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ehlo.storage import open_store

from .helpers import SERVE_WITHOUT_DNS, free_port
from .strace import SYNCS, WRITES, Call, parse, strace_command

pytestmark = pytest.mark.timeout(180)

QUEUED = re.compile(r"queued as ([0-9A-Za-z]+)")
SMALL = 3_000  # stored in the database (at most one 256 KiB chunk)
LARGE = 600_000  # stored in a file of its own


class TracedServe:
    """``ehlo serve`` (one worker) under strace, its calls recorded in a file."""

    def __init__(self, data: Path, kind: str) -> None:
        self.data = data
        self.kind = kind
        self.port = free_port()
        self.trace = data.parent / "strace.txt"
        self.log = data.parent / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> TracedServe:
        command = [
            *strace_command(str(self.trace)),
            sys.executable, "-m", "ehlo", "serve",
            "--listen", f"127.0.0.1:{self.port}", "--data", str(self.data),
            "--store", self.kind, "--workers", "1", *SERVE_WITHOUT_DNS, "--no-tls",
        ]  # fmt: skip
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=self.data.parent,
                start_new_session=True,  # strace and everything it traces: one group
            )
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ehlo serve under strace exited: {self.log.read_text()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as sock,
            ):
                sock.settimeout(10.0)
                if sock.recv(4).startswith(b"220"):
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"ehlo serve did not listen: {self.log.read_text()}")

    def stop(self) -> str:
        """Stop the server gracefully, let strace finish its output; the trace."""
        proc = self.proc
        assert proc is not None
        if proc.poll() is None:
            # SIGTERM to the traced server only: strace itself would detach and leave it running.
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            try:
                served = [int(pid) for pid in children.read_text().split()]
            except OSError:
                served = []
            if served:
                for pid in served:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        return self.trace.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[Callable[[str], TracedServe]]:
    started: list[TracedServe] = []

    def start(kind: str) -> TracedServe:
        server = TracedServe(tmp_path / "data", kind)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()


def make_body(tag: str, size: int) -> bytes:
    line = (tag.encode() * 100)[:98] + b"\r\n"
    return f"Subject: {tag}\r\n\r\n".encode() + line * (size // len(line))


def send_all(port: int, bodies: list[bytes]) -> tuple[int, list[str]]:
    """One connection, one message at a time: the client's port and the queue ids."""
    ids: list[str] = []
    with smtplib.SMTP("127.0.0.1", port, local_hostname="order.example", timeout=60) as client:
        client.ehlo()
        assert client.sock is not None
        client_port = int(client.sock.getsockname()[1])
        for n, body in enumerate(bodies):
            assert client.mail(f"m{n}@example.org")[0] == 250
            assert client.rcpt("rcpt@example.net")[0] == 250
            code, reply = client.data(body)
            assert code == 250, reply
            found = QUEUED.search(reply.decode())
            assert found, reply
            ids.append(found.group(1))
    return client_port, ids


class Timeline:
    """The calls of one trace, and the transactions of one client connection in it."""

    def __init__(self, calls: list[Call], client_port: int) -> None:
        self.calls = calls
        peer = f"->127.0.0.1:{client_port}]"
        self.replies = [
            c for c in calls if c.name in WRITES and peer in (c.target or "") and c.result
        ]

    def acks(self) -> dict[str, tuple[float, float]]:
        """Queue id -> (when its 354 was written, when its 250 was written)."""
        out: dict[str, tuple[float, float]] = {}
        go: float | None = None
        for reply in self.replies:
            if '"354 ' in reply.args:
                go = reply.start
            elif (found := QUEUED.search(reply.args)) and '"250 ' in reply.args:
                assert go is not None, f"a 250 without its 354: {reply}"
                out[found.group(1)] = (go, reply.start)
                go = None
        return out

    def last_write(self, path: Callable[[str], bool], lo: float, hi: float) -> Call | None:
        found = [
            c for c in self.calls
            if c.name in WRITES and c.target and path(c.target) and lo <= c.start <= hi
        ]  # fmt: skip
        return max(found, key=lambda c: c.end, default=None)

    def synced(self, path: Callable[[str], bool], after: float, hi: float) -> Call | None:
        """The first sync of a matching file entered after ``after`` and finished by ``hi``."""
        for c in self.calls:
            if c.name in SYNCS and c.target and path(c.target) and after <= c.start and c.end <= hi:
                return c
        return None

    def placed(self, dest: Callable[[str], bool], after: float, hi: float) -> Call | None:
        """The first rename or link onto a matching name between ``after`` and ``hi``."""
        for c in self.calls:
            if c.name.startswith(("rename", "link")) and after <= c.start and c.end <= hi:
                paths = c.paths
                if len(paths) >= 2 and dest(paths[-1]) and c.result == 0:
                    return c
        return None


def sqlite_problems(t: Timeline, queue_id: str, lo: float, hi: float, large: bool) -> list[str]:
    """What is missing or out of order between a message's 354 and its 250 (sqlite)."""
    problems: list[str] = []
    commit_after = lo
    if large:

        def body_file(p: str) -> bool:
            return p.endswith(f"/{queue_id}") and "ehlo.sqlite3.bodies/" in p

        written = t.last_write(body_file, lo, hi)
        if written is None:
            return [f"{queue_id}: no write of its body file before the 250"]
        synced = t.synced(body_file, written.end, hi)
        if synced is None:
            return [f"{queue_id}: body file not synced after its last write, before the 250"]
        linked = t.placed(lambda p: p.endswith(f"ehlo.sqlite3.bodies/{queue_id}"), synced.end, hi)
        if linked is None:
            return [f"{queue_id}: body file not linked under its name after its sync"]
        folder = t.synced(lambda p: p.endswith("/ehlo.sqlite3.bodies"), linked.end, hi)
        if folder is None:
            return [f"{queue_id}: bodies folder not synced after the link, before the 250"]
        commit_after = folder.end

    def wal(p: str) -> bool:
        return p.endswith("/ehlo.sqlite3-wal")

    written = t.last_write(wal, commit_after, hi)
    if written is None:
        problems.append(f"{queue_id}: no WAL write (its COMMIT) before the 250")
    elif t.synced(wal, written.end, hi) is None:
        problems.append(f"{queue_id}: WAL not synced after its COMMIT, before the 250")
    return problems


def in_folder(path: str, folder: str) -> bool:
    """Whether ``path`` names a file (not a dot file) right inside a folder named ``folder``."""
    parts = path.split("/")
    return len(parts) >= 2 and parts[-2] == folder and not parts[-1].startswith(".")


def maildir_problems(t: Timeline, queue_id: str, lo: float, hi: float) -> list[str]:
    """What is missing or out of order between a message's 354 and its 250 (maildir)."""

    def message(p: str) -> bool:
        return in_folder(p, "tmp") and f".{queue_id}." in p.rsplit("/", 1)[-1]

    written = t.last_write(message, lo, hi)
    if written is None:
        return [f"{queue_id}: no write of its message file before the 250"]
    synced = t.synced(message, written.end, hi)
    if synced is None:
        return [f"{queue_id}: message file not synced after its last write, before the 250"]

    def temp(p: str) -> bool:
        return p.endswith(f"/ehlo-envelopes/.{queue_id}.json.tmp")

    side = t.last_write(temp, lo, hi)
    if side is None:
        return [f"{queue_id}: no write of its envelope before the 250"]
    side_synced = t.synced(temp, side.end, hi)
    if side_synced is None:
        return [f"{queue_id}: envelope not synced before it was renamed"]
    renamed = t.placed(lambda p: p.endswith(f"/ehlo-envelopes/{queue_id}.json"),
                       side_synced.end, hi)  # fmt: skip
    if renamed is None:
        return [f"{queue_id}: envelope not renamed into place after its sync"]
    envelopes = t.synced(lambda p: p.endswith("/ehlo-envelopes"), renamed.end, hi)
    if envelopes is None:
        return [f"{queue_id}: ehlo-envelopes/ not synced after the rename, before the 250"]

    def published(p: str) -> bool:
        return in_folder(p, "new") and f".{queue_id}." in p.rsplit("/", 1)[-1]

    moved = t.placed(published, max(synced.end, envelopes.end), hi)
    if moved is None:
        return [f"{queue_id}: not renamed into new/ after its file and envelope were synced"]
    if t.synced(lambda p: p.endswith("/new"), moved.end, hi) is None:
        return [f"{queue_id}: new/ not synced after the rename, before the 250"]
    return []


def run_traced(traced: Callable[[str], TracedServe], kind: str, sizes: list[int]) -> None:
    server = traced(kind)
    bodies = [make_body(f"order{n}", size) for n, size in enumerate(sizes)]
    client_port, ids = send_all(server.port, bodies)
    calls = parse(server.stop())
    assert server.proc is not None and server.proc.returncode == 0, server.log.read_text()
    timeline = Timeline(calls, client_port)
    acks = timeline.acks()
    # The trace holds every acknowledgement the client got, and no other.
    assert sorted(acks) == sorted(ids), (acks, ids)
    problems: list[str] = []
    for queue_id, size in zip(ids, sizes, strict=True):
        lo, hi = acks[queue_id]
        if kind == "sqlite":
            problems += sqlite_problems(timeline, queue_id, lo, hi, large=size > SMALL)
        else:
            problems += maildir_problems(timeline, queue_id, lo, hi)
    assert not problems, "\n".join(problems)
    store = open_store(kind, server.data)
    assert all(store.raw(queue_id) is not None for queue_id in ids)


def test_sqlite_small_bodies_are_committed_and_synced_before_250(
    traced: Callable[[str], TracedServe],
) -> None:
    run_traced(traced, "sqlite", [SMALL] * 5)


def test_sqlite_body_files_are_synced_before_250(
    traced: Callable[[str], TracedServe],
) -> None:
    run_traced(traced, "sqlite", [LARGE, SMALL, LARGE, LARGE])


def test_maildir_messages_are_synced_before_250(
    traced: Callable[[str], TracedServe],
) -> None:
    run_traced(traced, "maildir", [SMALL, LARGE, SMALL, SMALL])
