"""What one node shares with the others on a PostgreSQL database, besides mail.

Several ``ehlo serve`` nodes on one database (``store = "postgresql"``)
share their AUTH users and their abuse counters (connections per address
per minute, failed AUTH attempts per address and per account, lockouts).
:class:`Cluster` owns this process's side of both:

- the users: a ``UserStore`` over the store's ``users`` table, cached in
  memory and read again in the background every :data:`USERS_EVERY`
  seconds, or at once after a ``users`` hint from the store's listener
  (``NOTIFY ehlo_users``), so that a login never waits on the database;
- the counters: each limit's counter is wrapped in a
  :class:`~ehlo.server.abuse.ClusterCounter`, and every
  :data:`EXCHANGE_EVERY` seconds one exchange adds this process's events to
  the shared counts and reads back the others' (``storage._pg_abuse``).

The database is only ever spoken to from one thread of the process's own
(a daemon thread: a database that hangs holds up neither the event loop
nor the process's exit). While it is away, connections and logins go on
with the local counts and the cached users; the exchanges retry quietly
(the store's connections log one line when the database goes away and
one when it is back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .abuse import ClusterCounter, EventCounter

if TYPE_CHECKING:
    from ..auth import UserStore
    from ..config import ServerConfig
    from ..storage import Store
    from ..storage._pg_abuse import PostgresAbuse
    from ..storage.postgres import PostgresStore

log = logging.getLogger("ehlo.server")

# Seconds between two exchanges of the abuse counts, and two reads of the users.
EXCHANGE_EVERY = 0.5
USERS_EVERY = 1.0
# Seconds between two deletions of the counts and locks that have ended.
SWEEP_EVERY = 30.0

T = TypeVar("T")


class _Worker:
    """One daemon thread that runs the database calls, one at a time."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Callable[..., None]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name="ehlo-cluster", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            func, done = job
            try:
                result: Any = func()
            except BaseException as exc:  # handed to the waiting task
                done(None, exc)
            else:
                done(result, None)

    async def run(self, func: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(future: asyncio.Future[T], result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def done(result: Any, error: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(settle, future, result, error)

        self._jobs.put((func, done))
        return await future

    def submit(self, func: Callable[[], object]) -> None:
        """Run ``func`` after the jobs before it, waiting for nothing (errors ignored)."""
        self._jobs.put((func, lambda result, error: None))

    def close(self) -> None:
        """End the thread once the jobs before have run."""
        self._jobs.put(None)


class Cluster:
    """This process's share of the users and the abuse counters of a node cluster."""

    def __init__(self, store: PostgresStore, *, owns_store: bool = False) -> None:
        self.store = store
        self._owns_store = owns_store
        self._abuse: PostgresAbuse = store.abuse()
        self.users: UserStore | None = None
        self.counters: list[ClusterCounter] = []
        self._wake_users = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._worker: _Worker | None = None
        self._failing: dict[str, str] = {}  # what -> the last error logged (said once)

    @classmethod
    def open(cls, config: ServerConfig, store: Store) -> Cluster | None:
        """The cluster of a server whose configuration names a PostgreSQL store.

        Uses the store's connections when it is that store; otherwise (an
        embedding program giving its own message store) connections of its own.
        """
        if config.store != "postgresql" or not config.database_url:
            return None
        from ..storage.postgres import PostgresStore

        if isinstance(store, PostgresStore):
            return cls(store)
        return cls(PostgresStore(config.database_url), owns_store=True)

    # ------------------------------------------------------------ what it shares

    def open_users(self) -> UserStore:
        """The users in the database, cached; read once now (a failure is logged)."""
        from ..auth import UserError, UserStore

        users = UserStore(table=self.store.users(), refresh_after=None)
        try:
            users.refresh()
        except UserError as exc:
            log.warning(
                "%s (AUTH knows no users until it can be read)",
                exc,
                extra={"event": "users_unreadable", "error": str(exc)},
            )
        self.users = users
        return users

    def counter(
        self, kind: str, local: EventCounter, limit: int, *, lock: bool = False
    ) -> EventCounter:
        """``local`` counting for the whole cluster (as it is when it cannot be)."""
        if limit < 1 or local.window <= 0:
            return local  # no limit, or a window that ends with each event
        counter = ClusterCounter(kind, local, limit, lock=lock)
        self.counters.append(counter)
        return counter

    def hint(self, topic: str) -> None:
        """The store's listener: another node changed the users (read them now)."""
        if topic == "users":
            self._wake_users.set()

    def wake_users(self) -> None:
        """Read the users again soon (SIGHUP)."""
        self._wake_users.set()

    # ------------------------------------------------------------ running

    async def start(self) -> None:
        self._worker = _Worker()
        self.store.add_listener(self._threadsafe_hint(asyncio.get_running_loop()))
        self._task = asyncio.ensure_future(self._run())

    def _threadsafe_hint(self, loop: asyncio.AbstractEventLoop) -> Callable[[str], None]:
        def hint(topic: str) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self.hint, topic)

        return hint

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        worker, self._worker = self._worker, None
        if worker is not None:
            if self._owns_store:
                worker.submit(self.store.db.close)  # after the call under way, if any
            worker.close()
        elif self._owns_store:
            self.store.db.close()  # never started: nothing else uses the connections

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_users = next_sweep = loop.time()
        while True:
            now = loop.time()
            if self.counters:
                await self._exchange()
                if now >= next_sweep:
                    next_sweep = now + SWEEP_EVERY
                    await self._call("sweep", self._sweep)
            if self.users is not None and (now >= next_users or self._wake_users.is_set()):
                self._wake_users.clear()
                next_users = now + USERS_EVERY
                await self._call("users", self.users.refresh)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake_users.wait(), EXCHANGE_EVERY)

    def _kinds(self) -> list[Any]:
        from ..storage._pg_abuse import AbuseKind
        from .abuse import CLUSTER_SLOTS

        return [AbuseKind(c.kind, c.slot_seconds, CLUSTER_SLOTS, c.near) for c in self.counters]

    def _sweep(self) -> None:
        self._abuse.sweep(self._kinds())

    async def _exchange(self) -> None:
        taken = {c.kind: c.take() for c in self.counters}
        counts = {kind: events for kind, (events, _) in taken.items()}
        locks = {kind: held for kind, (_, held) in taken.items()}
        kinds = self._kinds()
        ok, result = await self._call(
            "counters", lambda: self._abuse.exchange(kinds, counts, locks)
        )
        now = time.monotonic()
        for counter in self.counters:
            if ok and result is not None:
                counter.settle(
                    result.totals.get(counter.kind, {}), result.locks.get(counter.kind, {}), now
                )
            else:
                counter.restore(locks[counter.kind])

    async def _call(self, what: str, func: Callable[[], T]) -> tuple[bool, T | None]:
        """Run ``func`` in the worker thread; (True, its result), or (False, None) logged."""
        assert self._worker is not None
        try:
            result = await self._worker.run(func)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            text = " ".join(str(exc).split()) or type(exc).__name__
            if self._failing.get(what) != text:  # once, not once per second
                self._failing[what] = text
                log.warning(
                    "shared %s: %s (retrying; the local counts and the cached users"
                    " serve meanwhile)",
                    what,
                    text,
                    extra={"event": "cluster_sync_failed", "what": what, "error": text},
                )
            return False, None
        if self._failing.pop(what, None) is not None:
            log.info(
                "shared %s: in step again",
                what,
                extra={"event": "cluster_sync_ok", "what": what},
            )
        return True, result
