"""What is new, as it happens: the live hub, ``/api/v1/events`` (SSE) and ``/api/v1/wait``.

:class:`LiveHub` learns what is new in the store whichever worker wrote it:
it asks :meth:`ehlo.storage.Store.newer` (a cheap question: SQLite answers
from ``PRAGMA data_version`` and the search table's rowids) every
:data:`FAST_POLL` seconds while a client listens or waits, every
:data:`SLOW_POLL` otherwise, in a thread (the event loop never waits on the
disk), and at once when the store hints that messages changed
(:meth:`ehlo.storage.Store.add_listener`: PostgreSQL's ``NOTIFY`` from
whichever node stored one; the polling stays, since a hint can be lost).
Each new message becomes a ``message.new`` event with the next
sequence number; ``message.deleted`` comes from the API's DELETE handlers,
which call :meth:`LiveHub.deleted` (``hub(request.app).deleted(ids)``);
``queue.changed`` is published when the outbound queue's counts per state
change (polled every :data:`QUEUE_POLL` seconds). The last :data:`KEEP`
events are kept so that a client can resume after the one it saw last.

``GET /api/v1/events`` streams the events as Server-Sent Events (``id:``
is the sequence number; ``Last-Event-ID`` or ``?after=`` resumes; a
resume point older than what is kept gets a ``reset`` event; a comment
every :data:`HEARTBEAT` seconds keeps proxies from closing the stream).
``GET /api/v1/wait`` answers with the first message matching ``q`` stored
after a point (a sequence number, an ISO time, or the moment of the
request), or 408 after ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..storage import Query, Store, StoredMessage, StoreError, list_json
from ._app import API, CONTEXT, context
from ._errors import ApiError, json_response, query_number
from .search import parse_query

__all__ = ["LIVE", "Event", "LiveHub", "add_routes", "hub"]

log = logging.getLogger("ehlo.web")

# Seconds between questions to the store while someone listens or waits...
FAST_POLL = 0.02
# ...and while nobody does.
SLOW_POLL = 0.5
# Seconds between looks at the outbound queue's counts.
QUEUE_POLL = 1.0
# Events kept for clients that resume.
KEEP = 2000
# Seconds between heartbeat comments on an idle event stream.
HEARTBEAT = 15.0
# /wait: its default and largest timeout, in seconds.
WAIT_DEFAULT = 30.0
WAIT_MAX = 300.0


@dataclasses.dataclass(slots=True)
class Event:
    """One published event: its sequence number, name and JSON data.

    A ``message.new`` seen while nobody listened holds only its message's
    id (``data`` None) until :meth:`LiveHub.fill` reads the message.
    """

    seq: int
    name: str  # message.new, message.deleted, queue.changed
    data: Any
    message: StoredMessage | None = None  # the new message (message.new)
    queue_id: str | None = None  # the new message's id (message.new)


class LiveHub:
    """The events of one web application, numbered, with the latest kept."""

    def __init__(
        self,
        store: Store,
        *,
        fast: float = FAST_POLL,
        slow: float = SLOW_POLL,
        keep: int = KEEP,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.fast = fast
        self.slow = slow
        self.seq = 0
        self.events: collections.deque[Event] = collections.deque(maxlen=keep)
        self.closed = False
        self._clock = clock
        self._mark: object | None = None
        self._listeners = 0
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._poll_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._queue_counts: dict[str, int] | None = None
        self._queue_checked = 0.0
        self._hinted = False

    # -- running

    async def start(self) -> None:
        """Take the store's mark of now (what is there is not new) and start polling."""
        if self._task is not None:
            return
        self.closed = False
        await self.sync()
        if not self._hinted:
            # A store that hears other processes' writes (PostgreSQL's NOTIFY)
            # wakes the poll at once; the polling stays, since a hint can be lost.
            self.store.add_listener(self._hint)
            self._hinted = True
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ehlo-web-live")

    async def close(self) -> None:
        """Stop polling; every stream and wait ends now."""
        self.closed = True
        self._publish_wakeup()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _hint(self, topic: str) -> None:
        """The store's hint that something changed: a new message is asked for now."""
        if topic == "messages" and not self.closed:
            self._wake.set()

    async def _run(self) -> None:
        while not self.closed:
            interval = self.fast if self._listeners else self.slow
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self.sync()
                await self._check_queue()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a store hiccup must not end the live events
                log.warning("web: live events: %s", exc, extra={"event": "web_live_failed"})
                await asyncio.sleep(self.slow)

    async def sync(self) -> None:
        """Ask the store what is new now and publish it (one question at a time).

        While nobody listens or waits only the new ids are read (a busy
        server's worker 0 does not parse every message it stores); the
        messages are read by :meth:`fill` if a client later asks for them.
        """
        async with self._poll_lock:
            mark, before = self._mark, self.seq
            if self._listeners:
                messages, self._mark = await asyncio.to_thread(self.store.newer, mark)
                if mark is not None:
                    for message in messages:
                        self._append("message.new", list_json(message), message)
            else:
                ids, self._mark = await asyncio.to_thread(self.store.newer_ids, mark)
                if mark is not None:
                    for queue_id in ids:
                        self._append("message.new", None, queue_id=queue_id)
            if self.seq != before:
                self._publish_wakeup()

    async def fill(self, events: list[Event]) -> list[Event]:
        """``events`` with the messages of those that hold only an id read from
        the store; a message deleted since then drops its event."""
        missing = [e for e in events if e.name == "message.new" and e.data is None]
        if missing:
            store = self.store

            def read() -> None:
                for event in missing:
                    message = store.get(event.queue_id or "")
                    if message is not None:
                        event.message, event.data = message, list_json(message)

            await asyncio.to_thread(read)
        return [e for e in events if e.name != "message.new" or e.data is not None]

    async def _check_queue(self) -> None:
        now = self._clock()
        if now - self._queue_checked < QUEUE_POLL:
            return
        self._queue_checked = now
        queue = self.store.queue
        if queue is None:
            return
        try:
            counts = await asyncio.to_thread(queue.counts)
        except (StoreError, OSError) as exc:
            log.debug("web: queue counts: %s", exc)
            return
        if self._queue_counts is not None and counts != self._queue_counts:
            self._append("queue.changed", counts)
            self._publish_wakeup()
        self._queue_counts = counts

    # -- publishing

    def deleted(self, ids: list[str]) -> None:
        """Publish ``message.deleted`` for ``ids`` (the API's DELETE handlers call it)."""
        if ids:
            self._append("message.deleted", {"ids": list(ids)})
            self._publish_wakeup()

    def _append(
        self,
        name: str,
        data: Any,
        message: StoredMessage | None = None,
        queue_id: str | None = None,
    ) -> None:
        self.seq += 1
        if message is not None:
            queue_id = message.envelope.queue_id
        self.events.append(Event(self.seq, name, data, message, queue_id))

    def _publish_wakeup(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- reading

    @property
    def oldest(self) -> int:
        """The sequence number of the oldest event kept (seq + 1 when none is)."""
        return self.events[0].seq if self.events else self.seq + 1

    def since(self, after: int) -> list[Event]:
        """The kept events with a sequence number above ``after``, in order."""
        if after >= self.seq:
            return []
        skip = max(0, after - self.oldest + 1)
        return list(self.events)[skip:]

    @contextlib.asynccontextmanager
    async def listening(self) -> Any:
        """While inside, the store is asked often (a client is waiting for news)."""
        self._listeners += 1
        self._wake.set()
        try:
            yield
        finally:
            self._listeners -= 1

    async def changed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the next event; whether one came."""
        if self.closed:
            return False
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return not self.closed


LIVE: web.AppKey[LiveHub] = web.AppKey("ehlo_web_live", LiveHub)


def hub(app: web.Application) -> LiveHub:
    """The live hub of ``app`` (``hub(request.app).deleted(ids)`` after a DELETE)."""
    return app[LIVE]


def add_routes(app: web.Application) -> None:
    """The hub (started and stopped with the app), ``/events`` and ``/wait``."""

    async def start(app: web.Application) -> None:
        live = LiveHub(app[CONTEXT].store)
        app[LIVE] = live
        await live.start()

    async def stop(app: web.Application) -> None:
        if LIVE in app:
            await app[LIVE].close()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    app.router.add_get(f"{API}/events", events)
    app.router.add_get(f"{API}/wait", wait)


# -- GET /api/v1/events


def _seq(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, f"{what}: expected a sequence number, got {text!r}") from None
    if value < 0:
        raise ApiError(400, f"{what}: expected a sequence number, got {text!r}")
    return value


def _frame(event: Event) -> bytes:
    data = json.dumps(event.data, ensure_ascii=False, separators=(",", ":"))
    return f"id: {event.seq}\nevent: {event.name}\ndata: {data}\n\n".encode()


async def events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: every event after the resume point, then each as it comes."""
    live = hub(request.app)
    resume = request.headers.get("Last-Event-ID") or request.query.get("after")
    after = live.seq
    reset = False
    if resume is not None and resume.strip():
        label = "Last-Event-ID" if "Last-Event-ID" in request.headers else "after"
        after = _seq(resume.strip(), label)
        if after > live.seq or after < live.oldest - 1:
            reset, after = True, live.seq  # from another run of the server, or too old
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    try:
        # The client reconnects this long after a dropped stream (milliseconds).
        await response.write(b"retry: 1000\n\n")
        if reset:
            data = json.dumps({"seq": after})
            await response.write(f"id: {after}\nevent: reset\ndata: {data}\n\n".encode())
        async with live.listening():
            while not live.closed:
                pending = live.since(after)
                for event in await live.fill(pending):
                    await response.write(_frame(event))
                if pending:
                    after = pending[-1].seq
                quiet = not await live.changed(HEARTBEAT)
                if quiet and not live.closed and not live.since(after):
                    await response.write(b": heartbeat\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        return response
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response


# -- GET /api/v1/wait


def _moment(text: str) -> _dt.datetime:
    try:
        moment = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(
            400, f"after: expected a sequence number or an ISO date-time, got {text!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=_dt.UTC)


def _received(message: StoredMessage) -> _dt.datetime:
    when = message.envelope.received_at
    return when if when.tzinfo else when.replace(tzinfo=_dt.UTC)


async def wait(request: web.Request) -> web.Response:
    """The first message matching ``q`` stored after the point, or 408 at the timeout."""
    live = hub(request.app)
    try:
        query = parse_query(request.query.get("q", ""))
    except ValueError as exc:
        raise ApiError(400, f"q: {exc}") from None
    timeout = query_number(request, "timeout", WAIT_DEFAULT, 0, WAIT_MAX, whole=False)
    point = request.query.get("after", "").strip()
    since: _dt.datetime | None = None
    if point.isdigit():
        after = int(point)
        if after > live.seq or after < live.oldest - 1:
            raise ApiError(
                400,
                f"after: sequence {after} is not kept (events {live.oldest - 1}..{live.seq})",
            )
    else:
        # Whatever was committed before this request gets its number now:
        # only what comes later counts.
        await live.sync()
        after = live.seq
        if point:
            since = _moment(point)
            found = await asyncio.to_thread(_first_since, context(request).store, query, since)
            if found is not None:
                return json_response({"message": list_json(found), "seq": live.seq})
    deadline = asyncio.get_running_loop().time() + timeout
    async with live.listening():
        while True:
            pending = live.since(after)
            if pending:
                after = pending[-1].seq
            for event in await live.fill(pending):
                message = event.message
                if message is None or not query.matches(message):
                    continue
                if since is not None and _received(message) < since:
                    continue
                return json_response({"message": event.data, "seq": event.seq})
            left = deadline - asyncio.get_running_loop().time()
            if live.closed or left <= 0:
                break
            await live.changed(left)
    if live.closed:
        raise ApiError(503, "the server is stopping")
    raise ApiError(408, f"no matching message within {timeout:g} seconds")


def _first_since(store: Store, query: Query, since: _dt.datetime) -> StoredMessage | None:
    """The oldest message matching ``query`` received at or after ``since``."""
    bound = query.since if query.since is not None and query.since > since else since
    found: StoredMessage | None = None
    for message in store.search(dataclasses.replace(query, since=bound, limit=None)):
        found = message
    return found
