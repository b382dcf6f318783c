"""Durability: a 250 means the message survives SIGKILL of the server.

``python -m ehlo serve`` runs as a child process; clients send with smtplib;
the server is killed with SIGKILL the moment an acknowledgement arrives.
The store is then opened again from the same data folder: every message that
got "250 ... queued as ID" must be there, byte-exact, and nothing torn may be
visible. Both backends (sqlite, maildir).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ehlo.storage import SQLiteStore, Store, open_store

from .helpers import SERVE_WITHOUT_DNS, free_port
from .trace import message_of

pytestmark = pytest.mark.timeout(90)

KINDS = ["sqlite", "maildir"]
QUEUED = re.compile(rb"queued as ([0-9A-Za-z]+)")
CLIENT_TIMEOUT = 10.0


class ServeProcess:
    """``ehlo serve`` in a child process, on a fixed port and data folder."""

    def __init__(self, data: Path, kind: str, log: Path) -> None:
        self.data = data
        self.kind = kind
        self.log = log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServeProcess:
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ehlo",
                    "serve",
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--data",
                    str(self.data),
                    "--store",
                    self.kind,
                    *SERVE_WITHOUT_DNS,
                    "--no-tls",
                ],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=self.data.parent,
                start_new_session=True,  # its own process group: the workers too
            )
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ehlo serve exited: {self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                    sock.settimeout(2.0)
                    if sock.recv(4).startswith(b"220"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"ehlo serve did not listen: {self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL to the supervisor and every worker: no shutdown code runs anywhere."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)

    def wait_dead(self) -> None:
        assert self.proc is not None
        self.proc.wait(10)
        assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[list[ServeProcess]]:
    """Started servers are appended here and stopped (if alive) at the end."""
    started: list[ServeProcess] = []
    yield started
    for proc in started:
        proc.stop()


def start_server(started: list[ServeProcess], data: Path, kind: str) -> ServeProcess:
    server = ServeProcess(data, kind, data.parent / f"serve-{len(started)}.log")
    started.append(server)
    return server.start()


def make_body(rng: random.Random, tag: str) -> bytes:
    """A message of random size (up to ~600 KB) with CRLF lines and no lone dots."""
    size = rng.choice([0, 10, 300, 5000, 70000, 600000])
    line = hashlib.sha256(tag.encode()).hexdigest().encode() * 2  # 128 octets
    lines = [line] * (size // 130)
    return (
        f"Subject: {tag}\r\nX-Tag: {tag}\r\n\r\n".encode()
        + b"".join(piece + b"\r\n" for piece in lines)
        + f"end of {tag}\r\n".encode()
    )


def send_one(client: smtplib.SMTP, tag: str, body: bytes) -> str:
    """One transaction; the queue id from the final 250."""
    code, _ = client.mail(f"{tag}@example.org")
    assert code == 250
    code, _ = client.rcpt("rcpt@example.net")
    assert code == 250
    code, reply = client.data(body)
    assert code == 250, reply
    found = QUEUED.search(reply)
    assert found, reply
    return found.group(1).decode()


def stored_message(store: Store, queue_id: str) -> bytes | None:
    raw = store.raw(queue_id)
    return None if raw is None else message_of(raw)


def check_store(kind: str, data: Path, acked: dict[str, bytes], attempted: dict[str, bytes]) -> int:
    """Every acknowledged message present byte-exact; everything listed complete.

    Returns how many messages the store lists.
    """
    store = open_store(kind, data)
    listed = store.list()
    ids = {m.envelope.queue_id for m in listed}
    missing = sorted(set(acked) - ids)
    assert not missing, f"acknowledged but lost after SIGKILL: {missing}"
    for queue_id, body in acked.items():
        assert stored_message(store, queue_id) == body, queue_id
        stored = store.get(queue_id)
        assert stored is not None
        assert stored.envelope.rcpt_to == ["rcpt@example.net"]
    # Committed but not yet acknowledged is allowed (the 250 was lost with
    # the process); a torn or foreign message is not.
    bodies = set(attempted.values())
    for m in listed:
        body = stored_message(store, m.envelope.queue_id)
        assert body in bodies, (m.envelope.queue_id, (body or b"")[:200])
        assert m.envelope.mail_from.split("@")[0] in attempted
    return len(listed)


async def restart_store(kind: str, data: Path, acked: dict[str, bytes]) -> None:
    """The store opens for writing after the crash and still holds everything."""
    store = open_store(kind, data)
    await store.start()
    try:
        ids = {m.envelope.queue_id for m in store.list()}
        assert set(acked) <= ids
        if isinstance(store, SQLiteStore):
            # The crashed server's unfinished bodies are gone; the files left are messages'.
            assert set(os.listdir(store.bodies)) - {".spool"} <= ids
            own = store._spool_name  # the crashed instances' spool folders are gone
            assert sorted(os.listdir(store.bodies / ".spool")) == sorted([own, f"{own}.lock"])
            assert os.listdir(store.bodies / ".spool" / own) == []
            pending = sqlite3.connect(store.path).execute("SELECT * FROM pending").fetchall()
            assert pending == []
    finally:
        await store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_right_after_ack(kind: str, tmp_path: Path, serve: list[ServeProcess]) -> None:
    data = tmp_path / "data"
    server = start_server(serve, data, kind)
    rng = random.Random(f"sequential-{kind}")
    kill_after = 8
    acked: dict[str, bytes] = {}
    attempted: dict[str, bytes] = {}
    with smtplib.SMTP(
        "127.0.0.1", server.port, local_hostname="durable.example", timeout=CLIENT_TIMEOUT
    ) as client:
        client.ehlo()
        for n in range(1, kill_after + 1):
            tag = f"seq{n}"
            body = make_body(rng, tag)
            attempted[tag] = body
            acked[send_one(client, tag, body)] = body
        # The 250 for message N is in: kill at once.
        server.kill()
    server.wait_dead()
    assert len(acked) == kill_after
    assert check_store(kind, data, acked, attempted) == kill_after
    asyncio.run(restart_store(kind, data, acked))
    # A new server on the same folder serves on, with everything still there.
    again = start_server(serve, data, kind)
    with smtplib.SMTP("127.0.0.1", again.port, timeout=CLIENT_TIMEOUT) as client:
        client.ehlo()
        tag = "after"
        body = make_body(rng, tag)
        attempted[tag] = body
        acked[send_one(client, tag, body)] = body
    again.stop()
    assert check_store(kind, data, acked, attempted) == kill_after + 1


@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_during_concurrent_sends(
    kind: str, tmp_path: Path, serve: list[ServeProcess]
) -> None:
    data = tmp_path / "data"
    server = start_server(serve, data, kind)
    threads_n, kill_at = 25, 150
    lock = threading.Lock()
    acked: dict[str, bytes] = {}
    attempted: dict[str, bytes] = {}
    killed = threading.Event()
    errors: list[BaseException] = []

    def client(index: int) -> None:
        rng = random.Random(f"concurrent-{kind}-{index}")
        try:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=CLIENT_TIMEOUT) as smtp:
                smtp.ehlo()
                for n in range(1000):
                    tag = f"t{index}m{n}"
                    body = make_body(rng, tag)
                    with lock:
                        attempted[tag] = body
                    queue_id = send_one(smtp, tag, body)
                    with lock:
                        acked[queue_id] = body
                        if len(acked) >= kill_at and not killed.is_set():
                            server.kill()
                            killed.set()
                    if killed.is_set():
                        return
        except (smtplib.SMTPException, OSError) as exc:
            if not killed.is_set():  # after the kill these are expected
                errors.append(exc)
        except BaseException as exc:  # reported in the test thread
            errors.append(exc)

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads_n)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 60
    while not killed.wait(0.05):
        assert any(w.is_alive() for w in workers), errors
        assert time.monotonic() < deadline, "the clients never reached the ack count"
    for worker in workers:
        worker.join(CLIENT_TIMEOUT + 5)
        assert not worker.is_alive()
    assert not errors, errors
    server.wait_dead()
    assert len(acked) >= kill_at
    listed = check_store(kind, data, acked, attempted)
    assert listed >= len(acked)
    asyncio.run(restart_store(kind, data, acked))
