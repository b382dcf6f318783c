"""The delivery scheduler: takes due queue entries and hands them on.

One :class:`Scheduler` runs per data folder (``ehlo serve`` runs it in one
process only), so no recipient is ever delivered by two processes at once.
Its loop:

1. At start, entries a crash left ``delivering`` are queued again: a
   delivery in flight at a crash is made again (at least once, never lost).
2. Due entries are read in windows (never the whole queue), marked
   ``delivering`` and grouped by next hop. Each next hop gets up to
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
import dataclasses
import logging
import random
import ssl
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from ..client import SMTPClient, Timeouts
from ..client._errors import (
    ConnectionFailed,
    MessageNotSupported,
    NoRoute,
    SMTPClientError,
    TLSFailed,
)
from ..client.routing import MailHost, Router
from ..dns import Resolver
from ..ids import new_queue_id
from ..policy import HookContext, Hooks
from ..protocol import Reply
from ..storage import Envelope, Store, StoreError
from ..storage.queue import Attempt, EntryUpdate, Queue, QueueEntry, QueueItem
from .mtasts import MTASTS
from .routes import NextHop, Routing, parse_next_hop

__all__ = ["DeliverySettings", "Scheduler"]

log = logging.getLogger("ehlo.delivery")

# Entries held in memory at most (loaded, not yet delivered).
WINDOW = 2000
# Messages a connection takes from its next hop's line before others get a turn.
PER_CONNECTION = 100
# Seconds an idle connection waits for more mail for its next hop.
IDLE_REUSE = 2.0
# Seconds between two looks at the queue when nothing is known to be due
# (``ehlo queue retry`` and new mail need no signal).
POLL = 1.0
# Seconds between housekeeping passes.
HOUSEKEEPING = 60.0
_TLS_MODES = {"none": "off", "may": "opportunistic", "encrypt": "encrypt", "verify": "verify"}


@dataclasses.dataclass(frozen=True, slots=True)
class DeliverySettings:
    """What the scheduler needs of the server's configuration."""

    hostname: str
    routing: Routing
    delivery_port: int = 25
    concurrency: int = 20
    per_destination: int = 4
    retry_min: float = 300.0
    retry_max: float = 4000.0
    max_lifetime: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0
    tls_policy: Mapping[str, str] = dataclasses.field(default_factory=dict)
    mta_sts: bool = True
    timeouts: Timeouts = dataclasses.field(default_factory=Timeouts)
    relay_login: tuple[str, str] | None = None  # at the smarthost
    # Where this server listens: a next hop here for a domain that is not
    # local is a loop (RFC 5321 section 5.1).
    own_addresses: frozenset[tuple[str, int]] = frozenset()
    ssl_context: ssl.SSLContext | None = None  # the CAs "verify" trusts


@dataclasses.dataclass(slots=True)
class _Job:
    """One message's entries for one next hop."""

    queue_id: str
    entries: list[QueueEntry]


@dataclasses.dataclass(slots=True)
class _Outcome:
    """What became of one recipient in one attempt."""

    state: str  # delivered | bounced | deferred
    reply: dict[str, Any]
    action: str | None = None  # the notice to send: failed, delivered, relayed


def _reply_dict(reply: Reply | None, host: str = "", text: str | None = None) -> dict[str, Any]:
    if reply is None:
        return {"code": 0, "enhanced": None, "text": text or "", "host": host}
    return {
        "code": reply.code,
        "enhanced": reply.enhanced,
        "text": "\n".join(reply.lines),
        "host": host,
    }


def _local(code: int, enhanced: str, text: str) -> dict[str, Any]:
    """A reply decided here (no server said it)."""
    return {"code": code, "enhanced": enhanced, "text": text, "host": ""}


def _wants(notify: str | None, what: str) -> bool:
    """RFC 3461 section 4.1: whether NOTIFY asks for ``what``; no NOTIFY means FAILURE
    (and DELAY, at the MTA's choice)."""
    if notify is None:
        return what in ("FAILURE", "DELAY")
    values = {v.strip().upper() for v in notify.split(",")}
    return what in values and "NEVER" not in values


class Scheduler:
    """Delivers what a store's queue holds; ``start`` it, ``stop`` it."""

    def __init__(
        self,
        store: Store,
        settings: DeliverySettings,
        resolver: Resolver,
        *,
        hooks: Hooks | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        mtasts: MTASTS | None = None,
    ) -> None:
        queue = store.queue
        if queue is None:
            raise StoreError(f"the {store.name} store keeps no outbound queue")
        self.store = store
        self.queue: Queue = queue
        self.settings = settings
        self.resolver = resolver
        self.hooks = hooks
        self.clock = clock
        self._rng = rng if rng is not None else random.Random()
        self.router = Router(resolver, port=settings.delivery_port, rng=self._rng)
        self.mtasts = mtasts
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._ready: dict[str, deque[_Job]] = defaultdict(deque)
        self._loaded: set[tuple[str, str]] = set()  # entries in memory
        self._connections: dict[str, int] = defaultdict(int)
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._down: dict[str, tuple[float, dict[str, Any]]] = {}  # next hop -> (until, why)
        self._housekept = 0.0
        # Counters (for tests and logs).
        self.attempts = 0
        self.connections_made = 0

    # --- life cycle --------------------------------------------------------------

    async def start(self) -> None:
        recovered = await asyncio.to_thread(self.queue.recover)
        if recovered:
            log.info(
                "delivery: %d recipients were in flight at the last stop; queued again",
                recovered,
                extra={"event": "queue_recovered", "count": recovered},
            )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ehlo-delivery")

    def wake(self) -> None:
        """Look at the queue now (new mail, a retry asked for)."""
        self._wake.set()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking work; deliveries under way get ``grace`` seconds, then are cut.

        A cut delivery stays ``delivering`` and is made again at the next start.
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
        if self.mtasts is not None:
            with contextlib.suppress(Exception):
                await self.mtasts.close()
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
                await self._turn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the scheduler must outlive any one failure
                log.error("delivery: %s", exc, extra={"event": "delivery_error", "error": str(exc)})
                await asyncio.sleep(POLL)
                continue
            wait = POLL
            with contextlib.suppress(StoreError):
                nxt = await asyncio.to_thread(self.queue.next_due)
                if nxt is not None:
                    wait = max(0.0, min(POLL, nxt - self.clock()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _turn(self) -> None:
        now = self.clock()
        if now - self._housekept >= HOUSEKEEPING:
            self._housekept = now
            await self._housekeeping(now)
        room = WINDOW - len(self._loaded)
        if room <= 0:
            return
        due = await asyncio.to_thread(self.queue.due, now, room + len(self._loaded))
        due = [e for e in due if e.key not in self._loaded]
        if not due:
            return
        await asyncio.to_thread(self.queue.claim, due)
        asked = [e for e in due if e.request == "bounce"]
        if asked:
            due = [e for e in due if e.request != "bounce"]
            await self._bounce_asked(asked)
        jobs: dict[tuple[str, str], _Job] = {}
        for entry in due:
            self._loaded.add(entry.key)
            job = jobs.get((entry.next_hop, entry.queue_id))
            if job is None:
                job = jobs[(entry.next_hop, entry.queue_id)] = _Job(entry.queue_id, [])
                self._ready[entry.next_hop].append(job)
            job.entries.append(entry)
        self._dispatch()

    async def _bounce_asked(self, entries: Sequence[QueueEntry]) -> None:
        """``ehlo queue bounce``: these recipients fail now, with a notice to the sender."""
        by_message: dict[str, list[QueueEntry]] = defaultdict(list)
        for entry in entries:
            by_message[entry.queue_id].append(entry)
        reply = _local(550, "5.0.0", "delivery cancelled by the administrator")
        for queue_id, group in by_message.items():
            session = _Session(self, group[0].next_hop)
            envelope, raw = await session._message(queue_id)
            outcomes = {e.recipient: _Outcome("bounced", dict(reply), "failed") for e in group}
            await self.finish(_Job(queue_id, group), outcomes, None, envelope, raw)
            await self.forget_delivered(queue_id, envelope)

    def _dispatch(self) -> None:
        """Start connections for next hops with work, within the limits."""
        settings = self.settings
        now = self.clock()
        for hop, jobs in list(self._ready.items()):
            if not jobs:
                del self._ready[hop]
                continue
            down = self._down.get(hop)
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

    def _take(self, hop: str) -> _Job | None:
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
                session = _Session(self, hop_text)
                try:
                    job = await session.run(job)
                finally:
                    await session.close()
        except Exception as exc:
            log.exception("delivery to %s failed: %s", hop_text, exc)
        finally:
            self._connections[hop_text] -= 1
            self._active -= 1
            if not self._stopping:
                self._dispatch()

    # --- outcomes ----------------------------------------------------------------

    def backoff(self, attempts: int) -> float:
        """Seconds until the next try after ``attempts`` tries (RFC 5321 section 4.5.4.1)."""
        s = self.settings
        delay: float = min(s.retry_max, s.retry_min * 2.0 ** min(max(0, attempts - 1), 30))
        return delay * self._rng.uniform(0.9, 1.1)

    async def finish(
        self,
        job: _Job,
        outcomes: Mapping[str, _Outcome],
        attempt: Attempt | None,
        envelope: Envelope | None,
        raw: bytes | None,
    ) -> None:
        """Record a message's outcomes at one next hop, log them, send notices."""
        now = self.clock()
        updates: list[EntryUpdate] = []
        failed, delayed, succeeded = [], [], []
        s = self.settings
        for entry in job.entries:
            outcome = outcomes.get(entry.recipient)
            self._loaded.discard(entry.key)
            if outcome is None:
                continue
            state, reply = outcome.state, outcome.reply
            next_attempt = now
            delay_notified = None
            if state == "deferred":
                if now - entry.created >= s.max_lifetime:
                    # RFC 5321 section 4.5.4.1: give up after the queue lifetime.
                    state = "bounced"
                    reply = {**reply, "expired": True}
                    outcome.action = "failed"
                else:
                    next_attempt = now + self.backoff(entry.attempts + 1)
                    if (
                        s.delay_warning > 0
                        and not entry.delay_notified
                        and now - entry.created >= s.delay_warning
                        and _wants(entry.notify, "DELAY")
                    ):
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
            if state == "bounced" and _wants(entry.notify, "FAILURE"):
                failed.append((entry, reply))
            elif state == "delivered" and outcome.action and _wants(entry.notify, "SUCCESS"):
                succeeded.append((entry, reply, outcome.action))
            self._log(entry, state, reply, attempt, now)
        await asyncio.to_thread(self.queue.record, updates, [attempt] if attempt else [])
        if envelope is None or raw is None:
            return
        if failed:
            await self.notify(envelope, raw, "failed", [(e, r, None) for e, r in failed])
        if delayed:
            await self.notify(envelope, raw, "delayed", delayed)
        if succeeded:
            await self.notify(envelope, raw, "success", [(e, r, a) for e, r, a in succeeded])

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

    # --- notices -------------------------------------------------------------------

    async def notify(
        self,
        envelope: Envelope,
        raw: bytes,
        kind: str,
        items: Sequence[tuple[QueueEntry, dict[str, Any], Any]],
    ) -> None:
        """Send one notice about ``items`` of one message to its sender."""
        from .notices import RecipientReport, build_notice

        sender = envelope.mail_from
        if not sender:
            # RFC 3461 section 6.1 / RFC 5321 section 4.5.5: never a notice to <>.
            log.info(
                "%s: no notice for a message from <> (%s)",
                envelope.queue_id,
                kind,
                extra={"event": "notice_suppressed", "queue_id": envelope.queue_id},
            )
            return
        now = datetime.fromtimestamp(self.clock(), UTC)
        reports = []
        for entry, reply, extra in items:
            code = reply.get("code")
            status = reply.get("enhanced")
            if kind == "failed":
                action = "failed"
                status = (
                    status
                    if status and status.startswith("5")
                    else ("4.4.7" if reply.get("expired") else "5.0.0")
                )
                if reply.get("expired"):
                    status = "4.4.7"
            elif kind == "delayed":
                action = "delayed"
                status = status if status and status.startswith("4") else "4.0.0"
            else:
                action = str(extra)
                status = status if status and status.startswith("2") else "2.0.0"
            text = str(reply.get("text", ""))
            diagnostic = f"{code} {status} {text}".strip() if code else None
            host = str(reply.get("host") or "")
            reports.append(
                RecipientReport(
                    final_recipient=entry.recipient,
                    action=action,
                    status=status,
                    original_recipient=_orcpt(entry.orcpt),
                    remote_mta=host.partition("[")[0] or None if host else None,
                    diagnostic=diagnostic or (text or None),
                    last_attempt=now,
                    will_retry_until=(
                        datetime.fromtimestamp(entry.created + self.settings.max_lifetime, UTC)
                        if kind == "delayed"
                        else None
                    ),
                )
            )
        ret = envelope.mail_params.get("RET")
        envid = envelope.mail_params.get("ENVID")
        notice = build_notice(
            reporting_mta=self.settings.hostname,
            sender=sender,
            recipients=reports,
            original=raw,
            ret=ret.upper() if ret else None,
            envelope_id=_xtext(envid) if envid else None,
            arrival=envelope.received_at,
            queue_id=envelope.queue_id,
            now=now,
            utf8=("SMTPUTF8" in {k.upper() for k in envelope.mail_params}) or None,
        )
        await self.submit_notice(sender, notice, original=envelope.queue_id)

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
        with contextlib.suppress(StoreError):
            await asyncio.to_thread(self.queue.expire_history, now - _history_seconds())

    async def forget_delivered(self, queue_id: str, envelope: Envelope | None) -> None:
        """A message kept only for the queue leaves the store once every entry is final."""
        if envelope is None or not envelope.extra.get("handed_on"):
            return
        done = await asyncio.to_thread(self.queue.finished_messages, [queue_id])
        if done:
            with contextlib.suppress(StoreError):
                await asyncio.to_thread(self.store.delete, done)


def _history_seconds() -> float:
    from ..storage.queue import HISTORY_SECONDS

    return HISTORY_SECONDS


def _xtext(text: str) -> str:
    """RFC 3461 section 4: xtext decoded (kept as it is when malformed)."""
    parts = text.split("+")
    out = [parts[0]]
    for part in parts[1:]:
        try:
            out.append(chr(int(part[:2], 16)) + part[2:])
        except ValueError:
            return text
    return "".join(out)


def _orcpt(value: str | None) -> str | None:
    if not value:
        return None
    kind, sep, rest = value.partition(";")
    if not sep:
        return None
    return f"{kind};{_xtext(rest)}"


class _Session:
    """One outbound session to one next hop (one host after another until one answers)."""

    def __init__(self, scheduler: Scheduler, hop_text: str) -> None:
        self.s = scheduler
        self.hop_text = hop_text
        self.client: SMTPClient | None = None
        self.where = ""
        self.lines: list[str] = []
        self.preamble = 0  # transcript lines of the session before the first transaction

    def _say(self, kind: str, text: str, tls: bool) -> None:
        mark = {"client": "C", "server": "S"}.get(kind, "*")
        self.lines.append(f"{mark}: {text}")

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.quit(), 10)
            client.close()

    async def run(self, job: _Job) -> _Job | None:
        """Deliver ``job`` and then more for this hop; the job left over, if any."""
        s = self.s
        try:
            hop = parse_next_hop(self.hop_text, s.settings.delivery_port)
        except ValueError as exc:
            await self._fail_all(job, _local(554, "5.4.4", f"bad next hop: {exc}"), bounce=True)
            return s._take(self.hop_text)
        hop, hooked = await self._hooked(hop, job)
        if hooked is None:
            return s._take(self.hop_text)
        job = hooked
        connected = await self._connect(hop, job)
        if not connected:
            return s._take(self.hop_text)
        count = 0
        current: _Job | None = job
        while current is not None and not s._stopping:
            if not await self._deliver(hop, current):
                return s._take(self.hop_text)  # the session broke: a new one for the rest
            count += 1
            if count >= PER_CONNECTION:
                return s._take(self.hop_text)
            current = s._take(self.hop_text)
            if current is None:
                deadline = time.monotonic() + IDLE_REUSE
                while current is None and time.monotonic() < deadline and not s._stopping:
                    s.wake()
                    await asyncio.sleep(0.1)
                    current = s._take(self.hop_text)
        return None

    async def _hooked(self, hop: NextHop, job: _Job) -> tuple[NextHop, _Job | None]:
        """The ``delivery`` hooks: a recipient refused, deferred, or sent elsewhere."""
        hooks = self.s.hooks
        if hooks is None or not hooks.has("delivery"):
            return hop, job
        keep: list[QueueEntry] = []
        outcomes: dict[str, _Outcome] = {}
        moved: list[EntryUpdate] = []
        for entry in job.entries:
            ctx = HookContext(
                stage="delivery",
                client_ip="",
                client_port=0,
                rcpt=entry.recipient,
                queue_id=entry.queue_id,
                next_hop=self.hop_text,
            )
            reply = await hooks.run(ctx)
            if reply is not None and reply.code >= 400:
                state = "bounced" if reply.code >= 500 else "deferred"
                outcomes[entry.recipient] = _Outcome(state, _reply_dict(reply, "policy"))
            elif ctx.next_hop and ctx.next_hop != self.hop_text:
                try:
                    parse_next_hop(ctx.next_hop)
                except ValueError:
                    outcomes[entry.recipient] = _Outcome(
                        "deferred",
                        _local(451, "4.3.5", f"bad next hop from a hook: {ctx.next_hop}"),
                    )
                    continue
                self.s._loaded.discard(entry.key)
                moved.append(
                    EntryUpdate(
                        entry.queue_id,
                        entry.recipient,
                        "queued",
                        self.s.clock(),
                        None,
                        attempted=False,
                    )
                )
                await asyncio.to_thread(
                    self.s.queue.set_next_hop, entry.queue_id, entry.recipient, ctx.next_hop
                )
            else:
                keep.append(entry)
        if outcomes:
            envelope, raw = await self._message(job.queue_id)
            await self.s.finish(
                _Job(job.queue_id, [e for e in job.entries if e.recipient in outcomes]),
                outcomes,
                None,
                envelope,
                raw,
            )
        if moved:
            await asyncio.to_thread(self.s.queue.record, moved)
            self.s.wake()
        return hop, (_Job(job.queue_id, keep) if keep else None)

    async def _message(self, queue_id: str) -> tuple[Envelope | None, bytes | None]:
        store = self.s.store

        def read() -> tuple[Envelope | None, bytes | None]:
            stored = store.get(queue_id)
            if stored is None:
                return None, None
            return stored.envelope, store.raw(queue_id)

        try:
            return await asyncio.to_thread(read)
        except StoreError:
            return None, None

    def _tls_mode(self, hop: NextHop, domain: str) -> str:
        policy = self.s.settings.tls_policy
        if hop.kind == "lmtp":
            return "off"
        level = policy.get(domain) or policy.get(hop.host.lower()) or "may"
        return _TLS_MODES.get(level, "opportunistic")

    async def _hosts(self, hop: NextHop, job: _Job) -> tuple[list[MailHost], str | None] | None:
        """The hosts to try and, under MTA-STS enforce, the policy's say; None when the
        job was decided already (no route)."""
        s = self.s
        if hop.kind != "mx":
            if hop.path is not None:
                return [MailHost(hop.path, 0, (hop.path,), 0)], None
            try:
                addresses = (
                    await s.resolver.addresses(hop.host) if not _is_ip(hop.host) else [hop.host]
                )
            except Exception as exc:
                await self._fail_all(job, _local(451, "4.4.3", f"DNS: {hop.host}: {exc}"))
                return None
            if not addresses:
                await self._fail_all(
                    job, _local(550, "5.4.4", f"{hop.host} has no address"), bounce=True
                )
                return None
            return [MailHost(hop.host, 0, tuple(addresses), hop.port)], None
        try:
            hosts = await s.router.route(hop.host)
        except NoRoute as exc:
            enhanced = "4.4.3" if exc.temporary else "5.1.2"
            code = 451 if exc.temporary else 550
            await self._fail_all(job, _local(code, enhanced, str(exc)), bounce=not exc.temporary)
            return None
        except Exception as exc:  # DNS trouble defers, never bounces
            await self._fail_all(job, _local(451, "4.4.3", f"DNS: {hop.host}: {exc}"))
            return None
        hosts = self._without_self(hosts)
        if not hosts:
            # RFC 5321 section 5.1: we are the best MX for a domain we do not serve.
            await self._fail_all(
                job, _local(554, "5.4.6", f"mail for {hop.host} loops back to myself"), bounce=True
            )
            return None
        sts_mode = None
        if s.mtasts is not None and s.settings.mta_sts:
            try:
                policy = await s.mtasts.policy(hop.host)
            except Exception as exc:
                policy = None
                log.warning("MTA-STS %s: %s", hop.host, exc)
            if policy is not None and policy.mode in ("enforce", "testing"):
                matching = [h for h in hosts if policy.matches(h.name)]
                if policy.mode == "testing":
                    if len(matching) != len(hosts):
                        log.info(
                            "MTA-STS testing %s: enforce would skip %s",
                            hop.host,
                            ", ".join(h.name for h in hosts if h not in matching),
                            extra={"event": "mta_sts_testing", "domain": hop.host},
                        )
                else:
                    if not matching:
                        await self._fail_all(
                            job,
                            _local(
                                451,
                                "4.7.5",
                                f"MTA-STS: no MX host of {hop.host} matches its policy",
                            ),
                        )
                        return None
                    hosts = matching
                    sts_mode = "enforce"
        return hosts, sts_mode

    def _without_self(self, hosts: list[MailHost]) -> list[MailHost]:
        own = self.s.settings.own_addresses
        name = self.s.settings.hostname.lower()
        mine = [
            h.preference
            for h in hosts
            if h.name.lower() == name or any((a, h.port) in own for a in h.addresses)
        ]
        if not mine:
            return hosts
        # RFC 5321 section 5.1: drop ourselves and every MX no better than us.
        best = min(mine)
        return [h for h in hosts if h.preference < best]

    async def _connect(self, hop: NextHop, job: _Job) -> bool:
        """Open a session to the first host that answers; False when none did (job decided)."""
        s = self.s
        domain = hop.host if hop.kind == "mx" else job.entries[0].recipient.rpartition("@")[2]
        found = await self._hosts(hop, job)
        if found is None:
            return False
        hosts, sts = found
        mode = "verify" if sts == "enforce" else self._tls_mode(hop, domain.lower())
        last: dict[str, Any] = _local(451, "4.4.1", "no host answered")
        for host in hosts:
            for address in host.addresses:
                where = (
                    f"{host.name}[unix]"
                    if hop.path is not None
                    else f"{host.name}[{address}]:{host.port}"
                )
                for tls in [mode, "off"] if mode == "opportunistic" else [mode]:
                    self.lines = []
                    client = self._client(hop, host, address, tls)
                    try:
                        s.connections_made += 1
                        await client.connect()
                        if (
                            hop.kind == "smtp"
                            and s.settings.relay_login is not None
                            and (self.hop_text == s.settings.routing.relay_host)
                        ):
                            await client.login(*s.settings.relay_login)
                    except TLSFailed as exc:
                        client.close()
                        last = _reply_dict(exc.reply, where, f"TLS: {exc}")
                        if last["code"] == 0:
                            last = _local(451, "4.7.5", f"{where}: TLS: {exc}")
                        continue  # opportunistic: once more without STARTTLS
                    except SMTPClientError as exc:
                        client.close()
                        last = _reply_dict(exc.reply, where, str(exc))
                        if last["code"] == 0:
                            last = _local(451, "4.4.1", f"{where}: {exc}")
                        elif last["code"] >= 500 and not isinstance(exc, ConnectionFailed):
                            break  # a 5xx banner: this host refuses us; try the next
                        break
                    except (OSError, TimeoutError) as exc:
                        client.close()
                        last = _local(451, "4.4.1", f"{where}: {exc or type(exc).__name__}")
                        break
                    self.client = client
                    self.where = where
                    self.preamble = len(self.lines)
                    s._down.pop(self.hop_text, None)
                    return True
        # RFC 5321 section 4.5.4.1: no host answered: wait before trying again.
        s._down[self.hop_text] = (s.clock() + min(s.settings.retry_min, 300.0), last)
        await self._fail_all(job, last)
        return False

    def _client(self, hop: NextHop, host: MailHost, address: str, tls: str) -> SMTPClient:
        s = self.s
        kwargs: dict[str, Any] = {}
        if hop.kind == "lmtp":
            kwargs["lmtp"] = True
        ssl_context = s.settings.ssl_context
        if tls == "verify" and ssl_context is None:
            ssl_context = ssl.create_default_context()
        return SMTPClient(
            f"unix:{hop.path}" if hop.path is not None else address,
            host.port,
            helo_name=s.settings.hostname,
            tls=tls,  # type: ignore[arg-type]
            ssl_context=ssl_context,
            tls_server_name=host.name,
            timeouts=s.settings.timeouts,
            transcript=self._say,
            allow_plaintext_auth=False,
            **kwargs,
        )

    async def _fail_all(self, job: _Job, reply: dict[str, Any], *, bounce: bool = False) -> None:
        """Every recipient of the job (and of the jobs waiting for this hop) gets ``reply``."""
        s = self.s
        jobs = [job]
        if not bounce:
            waiting = s._ready.pop(self.hop_text, deque())
            jobs.extend(waiting)
        for one in jobs:
            envelope, raw = await self._message(one.queue_id)
            state = "bounced" if bounce else "deferred"
            outcomes = {e.recipient: _Outcome(state, dict(reply)) for e in one.entries}
            attempt = Attempt(
                one.queue_id,
                s.clock(),
                self.hop_text,
                reply.get("host", ""),
                {r: o.reply for r, o in outcomes.items()},
                "\n".join(self.lines),
            )
            await s.finish(one, outcomes, attempt, envelope, raw)
            await s.forget_delivered(one.queue_id, envelope)

    async def _deliver(self, hop: NextHop, job: _Job) -> bool:
        """One message over the open session; False when the session broke."""
        s = self.s
        client = self.client
        assert client is not None
        envelope, raw = await self._message(job.queue_id)
        start = len(self.lines)
        if envelope is None or raw is None:
            # Deleted meanwhile (``ehlo messages delete``): nothing left to send.
            for e in job.entries:
                s._loaded.discard(e.key)
            await asyncio.to_thread(self.s.queue.remove, [job.queue_id])
            return True
        s.attempts += 1
        rcpts = [e.recipient for e in job.entries]
        ext = client.extensions
        dsn = "DSN" in ext
        mail_params: dict[str, str | None] = {}
        rcpt_params: dict[str, dict[str, str | None]] = {}
        if dsn:
            # RFC 3461 section 5.2.1: pass the DSN parameters on to a next hop that offers DSN.
            for key in ("RET", "ENVID"):
                value = envelope.mail_params.get(key)
                if value:
                    mail_params[key] = value
            for e in job.entries:
                params: dict[str, str | None] = {}
                if e.notify:
                    params["NOTIFY"] = e.notify
                if e.orcpt:
                    params["ORCPT"] = e.orcpt
                if params:
                    rcpt_params[e.recipient] = params
        smtputf8 = "SMTPUTF8" in {k.upper() for k in envelope.mail_params}
        outcomes: dict[str, _Outcome] = {}
        broke = False
        try:
            result = await client.send_message(
                envelope.mail_from,
                rcpts,
                raw,
                smtputf8=smtputf8 or None,
                mail_params=mail_params or None,
                rcpt_params=rcpt_params or None,
            )
        except MessageNotSupported as exc:
            text = str(exc)
            enhanced = "5.6.7" if "SMTPUTF8" in text else "5.3.4" if "SIZE" in text else "5.6.3"
            for r in rcpts:
                outcomes[r] = _Outcome("bounced", _local(554, enhanced, f"{self.where}: {text}"))
        except SMTPClientError as exc:
            refused = getattr(exc, "refused", None)
            if isinstance(refused, Mapping):
                for r in rcpts:
                    reply = refused.get(r)
                    outcomes[r] = self._judge(reply, str(exc))
            else:
                for r in rcpts:
                    outcomes[r] = self._judge(exc.reply, str(exc))
            broke = isinstance(exc, ConnectionFailed) or not client.connected
        except (OSError, TimeoutError) as exc:
            for r in rcpts:
                outcomes[r] = _Outcome("deferred", _local(451, "4.4.2", f"{self.where}: {exc}"))
            broke = True
        else:
            for r in rcpts:
                if r in result.refused:
                    outcomes[r] = self._judge(result.refused[r], "")
                elif r in result.failed:
                    outcomes[r] = self._judge(result.failed[r], "")
                elif r in result.delivered:
                    reply = result.delivered[r]
                    action = "delivered" if hop.kind == "lmtp" else (None if dsn else "relayed")
                    outcomes[r] = _Outcome("delivered", _reply_dict(reply, self.where), action)
                else:
                    outcomes[r] = _Outcome("deferred", _local(451, "4.4.2", "no reply"))
        transcript = "\n".join(self.lines[: self.preamble] + self.lines[start:])
        attempt = Attempt(
            job.queue_id,
            s.clock(),
            self.hop_text,
            self.where,
            {r: o.reply for r, o in outcomes.items()},
            transcript,
        )
        await s.finish(job, outcomes, attempt, envelope, raw)
        await s.forget_delivered(job.queue_id, envelope)
        return not broke and client.connected

    def _judge(self, reply: Reply | None, text: str) -> _Outcome:
        """A refusal's outcome: 5xx bounces, 4xx (or none) defers (RFC 5321 section 4.2.1)."""
        if reply is None:
            return _Outcome("deferred", _local(451, "4.4.2", f"{self.where}: {text}"))
        state = "bounced" if reply.code >= 500 else "deferred"
        action = "failed" if state == "bounced" else None
        return _Outcome(state, _reply_dict(reply, self.where), action)


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
