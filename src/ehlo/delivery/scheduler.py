"""The delivery scheduler: takes due queue entries and hands them on.

One :class:`Scheduler` runs per data folder (``ehlo serve`` runs it in one
process only), so no recipient is ever delivered by two processes at once;
on a queue several nodes share (PostgreSQL), one runs per node and the
queue's leases keep them apart: each entry is taken by one node, under a
lease the scheduler renews every third of ``lease`` while it holds the
entry, and housekeeping runs only on the node the queue names
(``Queue.housekeeper``). Its loop:

1. At start, entries a crash left ``delivering`` are queued again: a
   delivery in flight at a crash is made again (at least once, never lost).
   (A shared queue leaves a live lease alone: that delivery is another
   node's; a dead node's entries are taken over once its leases expire.)
2. Due entries are taken in windows (never the whole queue), marked
   ``delivering`` (``Queue.take``) and grouped by next hop. The store's
   hints (``Store.add_listener``: another node queued mail) wake the loop;
   it polls as well, since a hint can be lost. Each next hop gets up to
   ``per_destination`` connections (``concurrency`` in all); a connection
   carries message after message for its next hop (RSET between refusals),
   each message with all its recipients there, and stays open briefly for
   more before QUIT.
3. Each attempt is recorded with its transcript; each recipient is
   ``delivered``, ``bounced`` (a 5xx, an expired lifetime, a next hop that
   cannot take the message) or ``deferred`` (a 4xx, no connection, a DNS
   failure) with a delay growing from ``retry_min`` to ``retry_max``
   (RFC 5321 section 4.5.4.1), with jitter. A next hop none of whose hosts
   answered is marked down for ``retry_min``: its entries wait instead of
   hammering it.
4. Notices (RFC 3464, :mod:`ehlo.delivery.notices`) go back to the sender
   from ``<>`` through the same store and queue.

The clock is injectable (``clock``): the tests move time instead of
waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from ..client.routing import Router
from ..dns import Resolver
from ..ids import new_queue_id
from ..policy import Hooks
from ..storage import Envelope, Store, StoreError
from ..storage.queue import HISTORY_SECONDS, Attempt, EntryUpdate, Queue, QueueEntry, QueueItem
from . import _notify
from ._model import DeliverySettings, Job, Outcome, local_reply, wants
from ._outbound import Session
from .mtasts import MTASTS

__all__ = ["DeliverySettings", "Scheduler"]

log = logging.getLogger("ehlo.delivery")

# Entries held in memory at most (loaded, not yet delivered).
WINDOW = 2000
# Seconds between two looks at the queue when nothing is known to be due
# (``ehlo queue retry`` and new mail need no signal).
POLL = 1.0
# Seconds a turn waits after a wake-up, so that one turn loads the mail of that while.
TURN_GAP = 0.02
# Seconds between housekeeping passes.
HOUSEKEEPING = 60.0


class Scheduler:
    """Delivers what a store's queue holds; ``start`` it, ``stop`` it."""

    def __init__(
        self,
        store: Store,
        settings: DeliverySettings,
        resolver: Resolver | Callable[[], Resolver],
        *,
        hooks: Hooks | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        mtasts: MTASTS | None = None,
    ) -> None:
        """``resolver``: the resolver, or how to make it when the first name is
        looked up (a server that relays nothing never makes one). ``mtasts``:
        the MTA-STS fetcher; by default one is made when a policy is first
        asked for, if ``settings.mta_sts``."""
        queue = store.queue
        if queue is None:
            raise StoreError(f"the {store.name} store keeps no outbound queue")
        self.store = store
        self.queue: Queue = queue
        self.settings = settings
        self._resolver = resolver
        self.hooks = hooks
        self.clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._router: Router | None = None
        self._mtasts = mtasts
        queue.set_lease(settings.lease)
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._ready: dict[str, deque[Job]] = defaultdict(deque)
        self._loaded: set[tuple[str, str]] = set()  # entries in memory
        # The loaded entries as taken (their leases are renewed while loaded).
        self._taken: dict[tuple[str, str], QueueEntry] = {}
        self._renewer: asyncio.Task[None] | None = None
        # A turn failed and was logged: the failures after it are not (a
        # database away fails every turn until it is back).
        self._failing = False
        self._connections: dict[str, int] = defaultdict(int)
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._down: dict[str, tuple[float, dict[str, Any]]] = {}  # next hop -> (until, why)
        self._housekept = 0.0
        self._full = False  # the window holds WINDOW entries
        # Messages being read ahead (queue id -> the read).
        self._prefetched: dict[str, asyncio.Future[tuple[Envelope | None, bytes | None]]] = {}
        # Outcomes waiting for the writer task (see _write).
        self._updates: list[EntryUpdate] = []
        self._attempts: list[Attempt] = []
        self._forget: set[str] = set()
        self._writer: asyncio.Task[None] | None = None
        # Counters (for tests and logs).
        self.attempts = 0
        self.connections_made = 0

    @property
    def resolver(self) -> Resolver:
        found = self._resolver
        if not isinstance(found, Resolver):
            found = self._resolver = found()
        return found

    @property
    def router(self) -> Router:
        """MX routing (RFC 5321 section 5.1) on ``delivery_port``, made on first use."""
        if self._router is None:
            port = self.settings.delivery_port
            self._router = Router(self.resolver, port=port, rng=self._rng)
        return self._router

    @property
    def mtasts(self) -> MTASTS | None:
        """The MTA-STS fetcher (None when ``mta_sts`` is off), made on first use."""
        if self._mtasts is None and self.settings.mta_sts:
            self._mtasts = MTASTS(
                self.resolver,
                port=self.settings.mta_sts_port,
                ssl_context=self.settings.ssl_context,
            )
        return self._mtasts

    # --- life cycle --------------------------------------------------------------

    async def start(self) -> None:
        recovered = await asyncio.to_thread(self.queue.recover)
        if recovered:
            log.info(
                "delivery: %d recipients were in flight at the last stop; queued again",
                recovered,
                extra={"event": "queue_recovered", "count": recovered},
            )
        loop = asyncio.get_running_loop()
        self.store.add_listener(self._hint)
        self._task = loop.create_task(self._run(), name="ehlo-delivery")
        self._renewer = loop.create_task(self._renewing(), name="ehlo-delivery-leases")

    def _hint(self, topic: str) -> None:
        """The store says another process changed the queue: look now."""
        if topic == "queue" and not self._stopping:
            self.wake()

    def wake(self) -> None:
        """Look at the queue now (new mail, a retry asked for)."""
        self._wake.set()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking work; deliveries under way get ``grace`` seconds, then are cut.

        A cut delivery stays ``delivering`` and is made again at the next start
        (on a shared queue, by whichever node takes it once its lease expired).
        """
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)
        for read in self._prefetched.values():
            read.cancel()
        self._prefetched.clear()
        await self.drain()
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        if self._mtasts is not None:
            with contextlib.suppress(Exception):
                await self._mtasts.close()
        # Loaded but never started: queued again, without an attempt counted.
        left = [e for jobs in self._ready.values() for job in jobs for e in job.entries]
        self._ready.clear()
        if left:
            with contextlib.suppress(StoreError):
                await asyncio.to_thread(
                    self.queue.record,
                    [
                        EntryUpdate(
                            e.queue_id, e.recipient, "queued", e.next_attempt, None, attempted=False
                        )
                        for e in left
                    ],
                )

    # --- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            try:
                full = await self._turn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the scheduler must outlive any one failure
                if not self._failing:
                    log.error(
                        "delivery: %s", exc, extra={"event": "delivery_error", "error": str(exc)}
                    )
                self._failing = True
                await asyncio.sleep(POLL)
                continue
            self._failing = False
            wait = POLL  # a full window: woken when half of it is done
            if not full:
                with contextlib.suppress(StoreError):
                    nxt = await asyncio.to_thread(self.queue.next_due)
                    if nxt is not None:
                        wait = max(0.0, min(POLL, nxt - self.clock()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            # The mail of a short while in one turn, not one turn per message.
            await asyncio.sleep(TURN_GAP)

    async def _turn(self) -> bool:
        """Load what is due into the window and start connections; True when it is full."""
        now = self.clock()
        if now - self._housekept >= HOUSEKEEPING:
            self._housekept = now
            if await asyncio.to_thread(self.queue.housekeeper):
                await self._housekeeping(now)
        room = WINDOW - len(self._loaded)
        if room <= 0:
            self._full = True
            return True
        due = await asyncio.to_thread(self.queue.take, now, room)
        due = [e for e in due if e.key not in self._loaded]
        if not due:
            return False
        asked = [e for e in due if e.request == "bounce"]
        if asked:
            due = [e for e in due if e.request != "bounce"]
            await self._bounce_asked(asked)
        jobs: dict[tuple[str, str], Job] = {}
        for entry in due:
            self._loaded.add(entry.key)
            self._taken[entry.key] = entry
            job = jobs.get((entry.next_hop, entry.queue_id))
            if job is None:
                job = jobs[(entry.next_hop, entry.queue_id)] = Job(entry.queue_id, [])
                self._ready[entry.next_hop].append(job)
            job.entries.append(entry)
        self._dispatch()
        self._full = len(self._loaded) >= WINDOW
        return self._full

    async def _renewing(self) -> None:
        """Renew the leases of the loaded entries every third of the lease, so that
        a slow delivery keeps them (a queue of one node holds them anyway)."""
        period = max(0.05, self.settings.lease / 3)
        failed = False  # logged once until a renewal succeeds
        while True:
            await asyncio.sleep(period)
            self._taken = {k: e for k, e in self._taken.items() if k in self._loaded}
            held = list(self._taken.values())
            if not held:
                continue
            try:
                kept = await asyncio.to_thread(self.queue.renew, held)
            except StoreError as exc:
                if not failed:
                    log.warning(
                        "delivery: renewing %d leases failed: %s",
                        len(held),
                        exc,
                        extra={"event": "queue_error", "error": str(exc)},
                    )
                failed = True
                continue
            failed = False
            if kept < len(held):
                # Loaded here but taken over by another node (this one could not
                # renew in time): its outcome here will not be recorded.
                log.warning(
                    "delivery: %d of %d leases lost to another node",
                    len(held) - kept,
                    len(held),
                    extra={"event": "queue_lease_lost", "count": len(held) - kept},
                )

    async def _bounce_asked(self, entries: Sequence[QueueEntry]) -> None:
        """``ehlo queue bounce``: these recipients fail now, with a notice to the sender."""
        by_message: dict[str, list[QueueEntry]] = defaultdict(list)
        for entry in entries:
            by_message[entry.queue_id].append(entry)
        reply = local_reply(550, "5.0.0", "delivery cancelled by the administrator")
        for queue_id, group in by_message.items():
            session = Session(self, group[0].next_hop)
            envelope, raw = await session._message(queue_id)
            outcomes = {e.recipient: Outcome("bounced", dict(reply), "failed") for e in group}
            await self.finish(Job(queue_id, group), outcomes, None, envelope, raw)

    def _dispatch(self) -> None:
        """Start connections for next hops with work, within the limits."""
        settings = self.settings
        now = self.clock()
        for hop, jobs in list(self._ready.items()):
            if not jobs:
                del self._ready[hop]
                continue
            down = self._down.get(hop)
            if down is not None and any(e.request == "retry" for j in jobs for e in j.entries):
                del self._down[hop]  # ehlo queue retry: try it now
                down = None
            if down is not None and down[0] > now and self._connections[hop] == 0:
                self._spawn(self._defer_down(hop, down))
                continue
            while (
                jobs
                and self._active < settings.concurrency
                and self._connections[hop] < min(settings.per_destination, len(jobs))
            ):
                self._connections[hop] += 1
                self._active += 1
                self._spawn(self._connection(hop))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _take(self, hop: str) -> Job | None:
        jobs = self._ready.get(hop)
        if not jobs:
            return None
        return jobs.popleft()

    async def _defer_down(self, hop: str, down: tuple[float, dict[str, Any]]) -> None:
        """Entries for a next hop marked down wait until it may be tried again."""
        until, why = down
        jobs = self._ready.pop(hop, deque())
        updates = []
        for job in jobs:
            read = self._prefetched.pop(job.queue_id, None)
            if read is not None:
                read.cancel()
            for e in job.entries:
                self._loaded.discard(e.key)
                updates.append(
                    EntryUpdate(
                        e.queue_id,
                        e.recipient,
                        "deferred",
                        until,
                        {**why, "text": f"{why['text']} (next hop down)"},
                        attempted=False,
                    )
                )
        await asyncio.to_thread(self.queue.record, updates)

    # --- one connection ----------------------------------------------------------

    async def _connection(self, hop_text: str) -> None:
        """Deliver jobs for one next hop over one session, while there are any."""
        try:
            job = self._take(hop_text)
            while job is not None and not self._stopping:
                session = Session(self, hop_text)
                try:
                    job = await session.run(job)
                finally:
                    await session.close()
            if job is not None:  # taken, not started: stop() queues it again
                self._ready[hop_text].appendleft(job)
        except Exception as exc:
            log.exception("delivery to %s failed: %s", hop_text, exc)
        finally:
            self._connections[hop_text] -= 1
            self._active -= 1
            if not self._stopping:
                self._dispatch()

    # --- reading messages ------------------------------------------------------------

    async def read_message(self, queue_id: str) -> tuple[Envelope | None, bytes | None]:
        """A message's envelope and bytes (read ahead when ``prefetch`` started it)."""
        task = self._prefetched.pop(queue_id, None)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(self._read, queue_id))
        try:
            return await task
        except StoreError as exc:
            log.warning(
                "%s: cannot read the message: %s",
                queue_id,
                exc,
                extra={"event": "queue_error", "queue_id": queue_id, "error": str(exc)},
            )
            return None, None

    def prefetch(self, hop: str) -> None:
        """Start reading the next message waiting for ``hop``."""
        jobs = self._ready.get(hop)
        if not jobs or len(self._prefetched) >= self.settings.concurrency:
            return
        queue_id = jobs[0].queue_id
        if queue_id not in self._prefetched:
            self._prefetched[queue_id] = asyncio.ensure_future(
                asyncio.to_thread(self._read, queue_id)
            )

    def _read(self, queue_id: str) -> tuple[Envelope | None, bytes | None]:
        found = self.store.read(queue_id)
        return (None, None) if found is None else (found[0].envelope, found[1])

    # --- outcomes ----------------------------------------------------------------

    def backoff(self, attempts: int) -> float:
        """Seconds until the next try after ``attempts`` tries (RFC 5321 section 4.5.4.1)."""
        s = self.settings
        delay: float = min(s.retry_max, s.retry_min * 2.0 ** min(max(0, attempts - 1), 30))
        return delay * self._rng.uniform(0.9, 1.1)

    async def finish(
        self,
        job: Job,
        outcomes: Mapping[str, Outcome],
        attempt: Attempt | None,
        envelope: Envelope | None,
        raw: bytes | None,
    ) -> None:
        """Record a message's outcomes at one next hop, log them, send notices."""
        now = self.clock()
        updates: list[EntryUpdate] = []
        failed, delayed, succeeded = [], [], []
        for entry in job.entries:
            outcome = outcomes.get(entry.recipient)
            self._loaded.discard(entry.key)
        if self._full and len(self._loaded) <= WINDOW // 2:
            self._full = False
            self.wake()  # room in the window: load more
        for entry in job.entries:
            outcome = outcomes.get(entry.recipient)
            if outcome is None:
                continue
            state, reply = outcome.state, outcome.reply
            next_attempt = now
            delay_notified = None
            if state == "deferred":
                if self._expired(entry, now):
                    # RFC 5321 section 4.5.4.1: give up after the queue lifetime.
                    state = "bounced"
                    reply = {**reply, "expired": True}
                    outcome.action = "failed"
                else:
                    next_attempt = now + self.backoff(entry.attempts + 1)
                    if self._delay_due(entry, now):
                        delayed.append((entry, reply, next_attempt))
                        delay_notified = True
            updates.append(
                EntryUpdate(
                    entry.queue_id,
                    entry.recipient,
                    state,
                    next_attempt,
                    reply,
                    attempted=attempt is not None,
                    delay_notified=delay_notified,
                )
            )
            if state == "bounced" and wants(entry.notify, "FAILURE"):
                failed.append((entry, reply))
            elif state == "delivered" and outcome.action and wants(entry.notify, "SUCCESS"):
                succeeded.append((entry, reply, outcome.action))
            self._log(entry, state, reply, attempt, now)
        forget = (
            envelope.queue_id if envelope is not None and envelope.extra.get("handed_on") else None
        )
        self._write(updates, attempt, forget)
        if envelope is None or raw is None:
            return
        if failed:
            await self.notify(envelope, raw, "failed", [(e, r, None) for e, r in failed])
        if delayed:
            await self.notify(envelope, raw, "delayed", delayed)
        if succeeded:
            await self.notify(envelope, raw, "success", [(e, r, a) for e, r, a in succeeded])

    def _expired(self, entry: QueueEntry, now: float) -> bool:
        return now - entry.created >= self.settings.max_lifetime

    def _delay_due(self, entry: QueueEntry, now: float) -> bool:
        """A delay notice is due (once, after ``delay_warning``, if NOTIFY allows)."""
        warning = self.settings.delay_warning
        return (
            warning > 0
            and not entry.delay_notified
            and now - entry.created >= warning
            and wants(entry.notify, "DELAY")
        )

    def deferral_needs_message(self, entries: Sequence[QueueEntry]) -> bool:
        """Whether deferring ``entries`` now may send a notice (expiry, a delay notice),
        for which the message must be read; a plain deferral needs only the entries."""
        now = self.clock()
        return any(self._expired(e, now) or self._delay_due(e, now) for e in entries)

    def _log(
        self,
        entry: QueueEntry,
        state: str,
        reply: dict[str, Any],
        attempt: Attempt | None,
        now: float,
    ) -> None:
        relay = reply.get("host") or (attempt.host if attempt else "") or "none"
        status = {"delivered": "sent", "deferred": "deferred", "bounced": "bounced"}[state]
        dsn = reply.get("enhanced") or (
            "2.0.0" if state == "delivered" else "4.0.0" if state == "deferred" else "5.0.0"
        )
        text = " ".join(str(reply.get("text", "")).split())
        code = reply.get("code")
        shown = f"{code} {dsn} {text}" if code else text
        log.info(
            "%s: to=<%s>, relay=%s, delay=%.1f, dsn=%s, status=%s (%s)",
            entry.queue_id,
            entry.recipient,
            relay,
            max(0.0, now - entry.created),
            dsn,
            status,
            shown,
            extra={
                "event": "delivery",
                "queue_id": entry.queue_id,
                "rcpt": entry.recipient,
                "relay": relay,
                "dsn": dsn,
                "status": status,
            },
        )

    async def notify(
        self,
        envelope: Envelope,
        raw: bytes,
        kind: str,
        items: Sequence[tuple[QueueEntry, dict[str, Any], Any]],
    ) -> None:
        """Send one notice about ``items`` of one message to its sender."""
        now = datetime.fromtimestamp(self.clock(), UTC)
        notice = _notify.build(self.settings, now, envelope, raw, kind, items)
        if notice is not None:
            await self.submit_notice(envelope.mail_from, notice, original=envelope.queue_id)

    async def submit_notice(self, recipient: str, message: bytes, *, original: str) -> str | None:
        """Store (and queue, when the sender is not local) a notice from ``<>``."""
        routing = self.settings.routing
        decision = routing.decide(recipient, authenticated=True, client_ip="127.0.0.1")
        queue_id = new_queue_id()
        envelope = Envelope(
            queue_id=queue_id,
            client_ip="127.0.0.1",
            client_port=0,
            greeting="",
            greeting_name=self.settings.hostname,
            mail_from="",
            mail_params={},
            rcpt_to=[recipient],
            received_at=datetime.fromtimestamp(self.clock(), UTC),
            protocol="LOCAL",
            server_name=self.settings.hostname,
            extra={"notice_for": original},
        )
        if decision.next_hop is not None:
            envelope.queue.append(QueueItem(recipient, decision.next_hop, "NEVER"))
            if not decision.store:
                envelope.extra["handed_on"] = True
        try:
            writer = self.store.begin(envelope)
            writer.write(message)
            envelope.size_received = len(message)
            queue_id = await writer.start_commit()
        except StoreError as exc:
            log.error(
                "%s: notice to <%s> not stored: %s",
                original,
                recipient,
                exc,
                extra={"event": "notice_failed", "queue_id": original},
            )
            return None
        log.info(
            "%s: sender notice %s to <%s>",
            original,
            queue_id,
            recipient,
            extra={"event": "notice", "queue_id": original, "notice_id": queue_id},
        )
        if envelope.queue:
            self.wake()
        return queue_id

    # --- housekeeping ---------------------------------------------------------------

    async def _housekeeping(self, now: float) -> None:
        """Expire the queue's history (on the node ``Queue.housekeeper`` names)."""
        with contextlib.suppress(StoreError):
            await asyncio.to_thread(self.queue.expire_history, now - HISTORY_SECONDS)

    # --- writing outcomes: many messages per transaction ------------------------------

    def _write(
        self, updates: list[EntryUpdate], attempt: Attempt | None, forget: str | None
    ) -> None:
        """Queue outcomes for the writer task, which records them in batches.

        Outcomes are not awaited: a crash before they are written leaves the
        entries ``delivering``, delivered again at the next start (at least
        once). A message kept only for the queue (``handed_on``) leaves the
        store once its entries are all final.
        """
        self._updates.extend(updates)
        if attempt is not None:
            self._attempts.append(attempt)
        if forget is not None:
            self._forget.add(forget)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        failed = False  # logged once until the outcomes are written
        while self._updates or self._attempts or self._forget:
            updates, self._updates = self._updates, []
            attempts, self._attempts = self._attempts, []
            forget, self._forget = self._forget, set()
            try:
                await asyncio.to_thread(self._write_batch, updates, attempts, forget)
            except StoreError as exc:
                if not failed:
                    log.error(
                        "delivery: recording %d outcomes failed: %s",
                        len(updates),
                        exc,
                        extra={"event": "queue_error", "error": str(exc)},
                    )
                failed = True
                await asyncio.sleep(POLL)
                self._updates[:0], self._attempts[:0] = updates, attempts
                self._forget |= forget
            else:
                failed = False

    def _write_batch(
        self, updates: list[EntryUpdate], attempts: list[Attempt], forget: set[str]
    ) -> None:
        done = self.queue.record_and_forget(updates, attempts, forget)
        if done:
            self.store.delete(done)

    async def drain(self) -> None:
        """Wait until every outcome so far is written."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
