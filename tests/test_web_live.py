"""What is new, live: the store's mark (``Store.newer``), ``/api/v1/wait`` and ``/api/v1/events``.

The mark is tested on real stores (SQLite with its writer process, Maildir):
new messages come once, in order, even after the newest message is deleted
and its rowid given again. The HTTP endpoints are tested against a real
``ehlo serve`` subprocess with aiohttp as the client and smtplib sending
mail from a thread: ``wait`` answers soon after the 250 (measured from the
250 to the answer), times out with 408, and counts only what comes after
its point; the event stream is in order and resumes after ``Last-Event-ID``;
with two workers, the messages either worker stores appear.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import smtplib
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ehlo.storage import Store, open_store

from .helpers import child_pids, free_port, greets, wait_until
from .test_storage import deliver, make_envelope

TIMEOUT = 60.0


# --------------------------------------------------------------------------
# Store.newer: the cheap "what is new" of each store


@pytest.fixture(params=["sqlite", "maildir"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened = open_store(request.param, tmp_path / "data")
    await opened.start()
    yield opened
    await opened.close()


def _ids(messages: Any) -> list[str]:
    return [m.envelope.queue_id for m in messages]


async def test_newer_answers_what_came_since_the_mark_once_in_order(store: Store) -> None:
    before = await deliver(store, b"Subject: old\r\n\r\nx\r\n")
    new, mark = store.newer(None)
    assert new == []  # the first mark: what is there is not new
    first = await deliver(store, b"Subject: one\r\n\r\nx\r\n")
    second = await deliver(store, b"Subject: two\r\n\r\nx\r\n")
    new, mark = store.newer(mark)
    assert _ids(new) == [first, second]
    assert before not in _ids(new)
    again, mark = store.newer(mark)
    assert again == []


async def test_newer_sees_a_message_that_takes_the_rowid_of_a_deleted_newest(
    store: Store,
) -> None:
    for _ in range(3):
        await deliver(store, b"Subject: base\r\n\r\nx\r\n")
    newest = await deliver(store, b"Subject: newest\r\n\r\nx\r\n")
    _, mark = store.newer(None)
    assert store.delete([newest]) == [newest]
    # SQLite gives the next row the deleted one's rowid.
    replacement = await deliver(store, b"Subject: replacement\r\n\r\nx\r\n")
    new, mark = store.newer(mark)
    assert _ids(new) == [replacement]
    assert store.newer(mark)[0] == []


async def test_newer_after_every_message_was_deleted(store: Store) -> None:
    ids = [await deliver(store, b"Subject: a\r\n\r\nx\r\n") for _ in range(3)]
    _, mark = store.newer(None)
    assert len(store.delete(ids)) == 3
    fresh = await deliver(store, b"Subject: fresh\r\n\r\nx\r\n")
    new, _ = store.newer(mark)
    assert _ids(new) == [fresh]


async def test_newer_beyond_the_window_of_the_mark(store: Store) -> None:
    # More new messages than the mark keeps rows of (the SQLite mark keeps 64).
    _, mark = store.newer(None)
    sent = [
        await deliver(
            store,
            b"Subject: bulk\r\n\r\nx\r\n",
            make_envelope(received_at=dt.datetime.now(dt.UTC) + dt.timedelta(milliseconds=i)),
        )
        for i in range(80)
    ]
    new, mark = store.newer(mark)
    assert sorted(_ids(new)) == sorted(sent)
    one = await deliver(store, b"Subject: one more\r\n\r\nx\r\n")
    assert _ids(store.newer(mark)[0]) == [one]


# --------------------------------------------------------------------------
# A real ``ehlo serve`` with its web UI


class WebServer:
    """``ehlo serve --http 127.0.0.1:PORT`` in a subprocess, its stderr in a file."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.port = free_port()
        self.http_port = free_port()
        self.data = tmp_path / "data"
        self.log = tmp_path / f"serve-{self.port}.log"
        self._stderr = open(self.log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "ehlo", "serve",
                "--listen", f"127.0.0.1:{self.port}",
                "--http", f"127.0.0.1:{self.http_port}",
                "--data", str(self.data),
                "--hostname", "mx.test",
                "--no-reverse-dns", "--helo-policy", "off", "--no-tls",
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.http_port}"

    def stderr(self) -> str:
        self._stderr.flush()
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"ehlo serve exited: {self.stderr()}"
            return greets(self.port) and "web UI and API on" in self.stderr()

        wait_until(ready, lambda: f"ehlo serve with its web UI: {self.stderr()}", TIMEOUT)

    def send(self, subject: str, rcpt: str = "bob@example.net") -> float:
        """Send one message; the monotonic time its 250 arrived."""
        with smtplib.SMTP("127.0.0.1", self.port, "client.test", timeout=TIMEOUT) as client:
            client.sendmail(
                "alice@example.org", [rcpt], f"Subject: {subject}\r\n\r\nbody\r\n".encode()
            )
            return time.monotonic()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=TIMEOUT)
        self._stderr.close()


@contextlib.contextmanager
def web_server(tmp_path: Path, *args: str) -> Iterator[WebServer]:
    server = WebServer(tmp_path, *args)
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebServer]:
    with web_server(tmp_path, "--workers", "1") as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


# -- /api/v1/wait


async def test_wait_answers_soon_after_the_250(web: WebServer, http: aiohttp.ClientSession) -> None:
    delays = []
    for i in range(5):
        # The point is "now": wait until the server took the request (a
        # message sent before it would not count), then send.
        task = asyncio.ensure_future(
            http.get(f"{web.url}/api/v1/wait", params={"q": f"subject:m{i}", "timeout": "60"})
        )
        await asyncio.sleep(0.3)
        acked = await asyncio.to_thread(web.send, f"m{i}")
        response = await task
        answered = time.monotonic()
        assert response.status == 200, await response.text()
        body = await response.json()
        assert body["message"]["subject"] == f"m{i}"
        assert isinstance(body["seq"], int)
        delays.append(answered - acked)
    # The hub asks the store every 20 ms while someone waits.
    assert statistics.median(delays) < 0.2, delays
    print(f"wait after the 250: median {statistics.median(delays) * 1000:.1f} ms, {delays}")


async def test_wait_times_out_with_408_json(web: WebServer, http: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    response = await http.get(f"{web.url}/api/v1/wait", params={"timeout": "0.5"})
    assert response.status == 408
    assert time.monotonic() - started >= 0.5
    body = await response.json()
    assert body["error"]["status"] == 408
    assert "0.5 seconds" in body["error"]["message"]


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"timeout": "301"}, "timeout"),
        ({"timeout": "soon"}, "timeout"),
        ({"after": "yesterday"}, "after"),
        ({"after": "99999"}, "after"),
        ({"q": "nosuchop:x"}, "q"),
    ],
)
async def test_wait_bad_input_is_400_naming_it(
    web: WebServer, http: aiohttp.ClientSession, params: dict[str, str], says: str
) -> None:
    response = await http.get(f"{web.url}/api/v1/wait", params=params)
    assert response.status == 400
    body = await response.json()
    assert body["error"]["message"].startswith(says), body


async def test_wait_counts_only_what_comes_after_its_point(
    web: WebServer, http: aiohttp.ClientSession
) -> None:
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    await asyncio.to_thread(web.send, "earlier")
    # By default the point is the request: the message stored before is not it.
    response = await http.get(f"{web.url}/api/v1/wait", params={"timeout": "0.3"})
    assert response.status == 408
    # A time before it, or the sequence number 0, says otherwise.
    response = await http.get(
        f"{web.url}/api/v1/wait", params={"after": before.isoformat(), "timeout": "5"}
    )
    assert response.status == 200
    assert (await response.json())["message"]["subject"] == "earlier"
    response = await http.get(f"{web.url}/api/v1/wait", params={"after": "0", "timeout": "5"})
    assert response.status == 200
    first = await response.json()
    assert first["message"]["subject"] == "earlier"
    # After that one's number: the next matching message.
    task = asyncio.ensure_future(
        http.get(
            f"{web.url}/api/v1/wait",
            params={"after": str(first["seq"]), "q": "subject:target", "timeout": "30"},
        )
    )
    await asyncio.to_thread(web.send, "other")
    await asyncio.to_thread(web.send, "target")
    response = await task
    assert response.status == 200
    assert (await response.json())["message"]["subject"] == "target"


# -- /api/v1/events


class EventReader:
    """A Server-Sent Events client over an aiohttp response."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next event (comments and ``retry:`` skipped): id, event, data."""
        event: dict[str, Any] = {}
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.response.content.readline()
                assert raw, "the event stream ended"
                line = raw.decode().rstrip("\n")
                if not line:
                    if "event" in event:
                        return event
                    event = {}
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(": ")
                if name == "data":
                    event["data"] = json.loads(value)
                elif name in ("id", "event"):
                    event[name] = value


@contextlib.asynccontextmanager
async def events(
    http: aiohttp.ClientSession, url: str, **headers: str
) -> AsyncIterator[EventReader]:
    async with http.get(f"{url}/api/v1/events", headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        yield EventReader(response)


async def test_events_in_order_and_resumed_after_last_event_id(
    web: WebServer, http: aiohttp.ClientSession
) -> None:
    async with events(http, web.url) as stream:
        await asyncio.sleep(0.2)  # the stream is open before the mail comes
        for subject in ("one", "two", "three"):
            await asyncio.to_thread(web.send, subject)
        seen = [await stream.next() for _ in range(3)]
    assert [e["event"] for e in seen] == ["message.new"] * 3
    assert [e["data"]["subject"] for e in seen] == ["one", "two", "three"]
    seqs = [int(e["id"]) for e in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    # Resumed after the first: the two others, in order, and nothing again.
    async with events(http, web.url, **{"Last-Event-ID": str(seqs[0])}) as stream:
        again = [await stream.next() for _ in range(2)]
        assert [e["data"]["subject"] for e in again] == ["two", "three"]
        assert [int(e["id"]) for e in again] == seqs[1:]
        await asyncio.to_thread(web.send, "four")
        four = await stream.next()
        assert four["data"]["subject"] == "four"
        assert int(four["id"]) > seqs[-1]
    # ?after= does the same.
    response = await http.get(f"{web.url}/api/v1/events", params={"after": str(seqs[1])})
    async with response:
        stream = EventReader(response)
        assert (await stream.next())["data"]["subject"] == "three"


async def test_events_while_nobody_listened_come_whole_on_resume(
    web: WebServer, http: aiohttp.ClientSession
) -> None:
    # Nobody listens: the server notes only the new messages' ids.
    async with events(http, web.url) as stream:
        await asyncio.sleep(0.2)
        await asyncio.to_thread(web.send, "seen")
        first = await stream.next()
    for subject in ("unheard one", "unheard two", "deleted unheard"):
        await asyncio.to_thread(web.send, subject)
    listed = await (await http.get(f"{web.url}/api/v1/messages")).json()
    assert listed["messages"][0]["subject"] == "deleted unheard"
    await asyncio.sleep(1.2)  # past the slow poll: the hub numbered them unread
    gone = listed["messages"][0]["id"]
    async with http.delete(f"{web.url}/api/v1/messages/{gone}") as response:
        assert response.status == 200
    # Resumed: each message read whole now, the deleted one's arrival left
    # out and its deletion told.
    async with events(http, web.url, **{"Last-Event-ID": first["id"]}) as stream:
        later = [await stream.next() for _ in range(3)]
    assert [e["event"] for e in later] == ["message.new", "message.new", "message.deleted"]
    assert [e["data"]["subject"] for e in later[:2]] == ["unheard one", "unheard two"]
    assert all(e["data"]["rcpt_to"] == ["bob@example.net"] for e in later[:2])
    assert later[2]["data"] == {"ids": [gone]}
    seqs = [int(first["id"])] + [int(e["id"]) for e in later]
    assert seqs == sorted(seqs) and seqs[3] - seqs[2] == 2  # the deleted one's number skipped


async def test_events_from_an_unknown_point_start_with_a_reset(
    web: WebServer, http: aiohttp.ClientSession
) -> None:
    async with events(http, web.url, **{"Last-Event-ID": "123456"}) as stream:
        reset = await stream.next()
        assert reset["event"] == "reset"
        await asyncio.to_thread(web.send, "after the reset")
        event = await stream.next()
        assert event["event"] == "message.new"
        assert int(event["id"]) == reset["data"]["seq"] + 1


async def test_a_stopping_server_ends_the_event_stream(
    web: WebServer, http: aiohttp.ClientSession
) -> None:
    async with events(http, web.url) as stream:
        await asyncio.sleep(0.2)
        web.proc.terminate()
        async with asyncio.timeout(TIMEOUT):
            while await stream.response.content.readline():
                pass
    assert await asyncio.to_thread(web.proc.wait, TIMEOUT) == 0


# -- two workers


def _server_sockets(pid: int) -> set[str]:
    """The socket inodes process ``pid`` holds open."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = fd.readlink().as_posix()
            if target.startswith("socket:["):
                found.add(target[8:-1])
    return found


def _accepted_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the server side of the loopback connection from ``client_port``."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == (
            client_port
        ):
            return fields[9]
    return None


@pytest.mark.needs(Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
async def test_messages_stored_by_either_worker_appear(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    with web_server(tmp_path, "--workers", "2") as web:
        # Connections until each worker holds one (the kernel picks the worker).
        clients: dict[int, smtplib.SMTP] = {}
        for _ in range(200):
            client = smtplib.SMTP("127.0.0.1", web.port, "client.test", timeout=TIMEOUT)
            inode = _accepted_inode(web.port, client.sock.getsockname()[1])
            # The supervisor's children: the workers (and the SQLite writer).
            children = child_pids(web.proc.pid)
            owner = next((p for p in children if inode in _server_sockets(p)), None)
            if owner is not None and owner not in clients:
                clients[owner] = client
            else:
                client.close()
            if len(clients) == 2:
                break
        assert len(clients) == 2, "the kernel gave every connection to one worker"
        async with events(http, web.url) as stream:
            await asyncio.sleep(0.2)
            subjects = {}
            for pid, client in clients.items():
                subject = f"worker-{pid}"
                task = asyncio.ensure_future(
                    http.get(
                        f"{web.url}/api/v1/wait",
                        params={"q": f"subject:{subject}", "timeout": "60"},
                    )
                )
                await asyncio.sleep(0.2)
                await asyncio.to_thread(
                    client.sendmail,
                    "alice@example.org",
                    ["bob@example.net"],
                    f"Subject: {subject}\r\n\r\nbody\r\n".encode(),
                )
                client.quit()
                response = await task
                assert response.status == 200, await response.text()
                subjects[pid] = (await response.json())["message"]["subject"]
                assert subjects[pid] == subject
            seen = [(await stream.next())["data"]["subject"] for _ in range(2)]
        assert sorted(seen) == sorted(subjects.values())
