"""The session: turns protocol events into policy calls, store writes and replies.

A session never touches the socket. For each command event it returns a
:class:`Reply` at once when nothing needs waiting for, or an awaitable that
produces the reply (policy hooks, reverse DNS, the store's commit). The
transport sends that reply through the protocol core, which advances state.

With ``transcripts`` on, the session holds the
:class:`~ehlo.server._transcript.Transcript` its connection's core records
into: each message stored keeps the prologue and its own transaction
(``extra["transcript"]``), and when the session ends its record
(transcript, verdicts, messages) goes to the store's session log
(``session_log_max``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..ids import new_queue_id
from ..policy import HookContext
from ..protocol import (
    Auth,
    AuthResponse,
    Bdat,
    Command,
    Data,
    DataChunk,
    DataEnd,
    Ehlo,
    Event,
    Fault,
    Helo,
    Help,
    Mail,
    Noop,
    Quit,
    Rcpt,
    Reply,
    Rset,
    ServerConnection,
    StartTls,
    Transaction,
    Vrfy,
)
from ..storage import Envelope, MessageWriter, StoreError, StoreUnavailable
from ..storage.base import TRANSCRIPT, JSONText
from ..storage.queue import QueueItem
from ._hashing import VerifierBusy
from ._transcript import Transcript
from .abuse import client_key
from .authres_filter import AuthResFilter
from .received import protocol_keyword, received_header

if TYPE_CHECKING:
    from ..auth import Credentials, ServerMechanism
    from ..greeting import (
        CappedResolver,
        Decision,
        Greeting,
        GreetingNames,
        GreetingReport,
        GreetingVerifier,
    )
    from ._server import ServerContext

log = logging.getLogger("ehlo.session")

_OK = Reply(250, "2.0.0", "OK")
_RSET_OK = Reply(250, "2.0.0", "Reset OK")
_START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
# RFC 5321 section 3.5.3: 252 when the server cannot verify but will accept.
_VRFY = Reply(252, "2.1.5", "Cannot VRFY user, but will accept message and attempt delivery")
_TLS_GO = Reply(220, "2.0.0", "Ready to start TLS")
_TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available due to temporary reason")
_STORE_FAILED = Reply(451, "4.3.0", "Temporary storage failure, message not accepted; try again")
_NEED_TLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
# RFC 4954 section 6: 530 5.7.0 when authentication is required.
_NEED_AUTH = Reply(530, "5.7.0", "Authentication required")
_AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
_AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
_AUTH_LOCKED = Reply(421, "4.7.0", "Too many failed authentication attempts, try again later")
_AUTH_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure")
# RFC 4954 section 6: 454 4.7.0 for a temporary condition; the client keeps
# its password and tries again later. A password check that cannot start in
# time, and an account locked after failures from anywhere (its password is
# then not checked at all, so guessing it from many addresses gets nowhere).
_AUTH_BUSY = Reply(454, "4.7.0", "Temporary authentication failure, try again later")
_AUTH_ACCOUNT_LOCKED = Reply(
    454,
    "4.7.0",
    "Temporary authentication failure: too many failed attempts for this account, try again later",
)
_TOO_MANY_JUNK = Reply(421, "4.7.0", "Too many commands that move no mail, closing connection")
# A session's record in the session log names at most this many of its messages.
_MAX_LOGGED_IDS = 1000
_HELP = Reply(
    214,
    "2.0.0",
    [
        "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH",
        "See RFC 5321; this server is ehlo",
    ],
)


class Session:
    """Decisions for one connection; see the module docstring."""

    __slots__ = (
        "_checks",
        "_checks_input",
        "_dns_budget",
        "_greeted",
        "_greeting_names",
        "_headers",
        "_junk",
        "_last_refusal",
        "_log_fields",
        "_logged",
        "_rdns",
        "_sasl",
        "_store_failed",
        "auth_mechanism",
        "auth_user",
        "client_ip",
        "client_key",
        "client_name",
        "client_port",
        "conn",
        "ctx",
        "decision",
        "envelope",
        "first_greeting",
        "message_ids",
        "messages",
        "peer",
        "report",
        "session_id",
        "started",
        "tls",
        "transcript",
        "violations",
        "writer",
    )

    def __init__(
        self,
        ctx: ServerContext,
        conn: ServerConnection,
        client_ip: str,
        client_port: int,
    ) -> None:
        self.ctx = ctx
        self.conn = conn
        self.client_ip = client_ip
        self.client_key = client_key(client_ip)  # what the per-address limits count
        self.client_port = client_port
        self.tls: dict[str, str] | None = None
        self.client_name: str | None = None  # reverse DNS, once known
        self._rdns: asyncio.Future[str | None] | None = None
        self.writer: MessageWriter | None = None
        self.envelope: Envelope | None = None
        # The header section of the message being received, checked for
        # forged Authentication-Results fields before it is stored.
        self._headers: AuthResFilter | None = None
        self._store_failed = False
        # Greeting verification: the checks of the latest greeting, running
        # in the background (the greeting they look at, until they begin);
        # the first and the latest name greeted with.
        self._checks: asyncio.Task[GreetingReport] | None = None
        self._checks_input: Greeting | None = None
        self._greeting_names: GreetingNames | None = None
        self.report: GreetingReport | None = None
        self._dns_budget: CappedResolver | None = None
        self.decision: Decision | None = None
        self.started = time.monotonic()
        # HELO or EHLO: the session's first greeting (None before it).
        self.first_greeting: str | None = None
        self.messages = 0
        self.peer = f"{client_ip}:{client_port}"
        # One id on every log line of the session: two sessions from one
        # address (or one port reused later) are told apart.
        self.session_id = new_queue_id()
        self._log_fields: dict[str, Any] = {
            "session": self.session_id,
            "client_ip": client_ip,
            "client_port": client_port,
        }
        # The refusal whose log line its handler wrote itself (see ``refused``).
        self._logged: Reply | None = None
        # AUTH (RFC 4954): the exchange in progress, then who authenticated.
        self._sasl: ServerMechanism | None = None
        self.auth_user: str | None = None
        self.auth_mechanism: str | None = None
        self._junk = 0
        self.violations: list[str] = []  # each kind once: bounded however the client behaves
        # The session's dialogue, recorded by the protocol core as it goes.
        self.transcript: Transcript | None = None
        if ctx.config.transcripts:
            self.transcript = Transcript(self.started)
            conn.recorder = self.transcript.record
        self.message_ids: list[str] = []  # stored in this session (the session log's)
        self._greeted: Helo | Ehlo | None = None  # the latest HELO/EHLO, answered or not
        self._last_refusal: Reply | None = None

    # ------------------------------------------------------------- lifecycle

    def start_reverse_dns(self) -> None:
        """Start looking up the client's name; the Received header waits for it."""
        if not self.ctx.config.reverse_dns:
            return
        verifier = self.ctx.verifier
        if verifier is not None and verifier.applies_to(self.client_ip):
            return  # the iprev check finds (and confirms) the name; asking twice is waste
        found = self.ctx.reverse_name(self.client_ip)
        if isinstance(found, asyncio.Future):
            self._rdns = found  # a lookup: the first message waits for it, once
        else:
            self.client_name = found  # known already: messages wait for nothing

    def banner(self) -> Reply | Awaitable[Reply]:
        """The 220 greeting, or a refusal decided by connect hooks."""
        ready = self.ctx.banner
        if not self.ctx.hooks.has("connect"):
            return ready
        return self._connect_hooks(ready)

    async def _connect_hooks(self, ready: Reply) -> Reply:
        reply = await self.ctx.hooks.run(self._context("connect"))
        return ready if reply is None else reply

    def tls_started(self, info: dict[str, str]) -> None:
        """The handshake after STARTTLS completed."""
        self.tls = info
        if self.transcript is not None:
            self.transcript.event(
                f"TLS started {info.get('version', '?')} {info.get('cipher', '?')}",
                session_level=True,
            )
        self.auth_user = self.auth_mechanism = None
        self.abort_message()
        log.info(
            "tls session=%s %s %s %s",
            self.session_id,
            self.peer,
            info.get("version"),
            info.get("cipher"),
            extra={**self._log_fields, "event": "tls", **info},
        )

    def closed(self, reason: str) -> None:
        """The connection is gone; drop an unfinished message and pending lookups."""
        if self._drop_checks() and log.isEnabledFor(logging.DEBUG):
            log.debug("greeting checks session=%s %s cancelled: the session ended",
                      self.session_id, self.peer,
                      extra={**self._log_fields, "event": "greeting_cancelled"})
        rdns = self._rdns
        if rdns is not None and not rdns.done():
            rdns.cancel()  # nobody will read the name; its outcome is collected by the task
        if self.writer is not None:
            self.abort_message()
            reason += ", message in progress dropped"
        if self.transcript is not None:
            self.transcript.event(f"close: {reason}", session_level=True)
        keep = self.ctx.config.session_log_max
        if keep > 0:
            self.ctx.store.log_session(self._record(), keep)
        if not log.isEnabledFor(logging.INFO):
            return
        log.info(
            "disconnect session=%s %s helo=%s messages=%d duration=%.3fs reason=%s",
            self.session_id,
            self.peer,
            self.conn.greeting_name or "-",  # none yet, or none since STARTTLS
            self.messages,
            time.monotonic() - self.started,
            reason,
            extra={
                **self._log_fields,
                "event": "disconnect",
                "greeting_name": self.conn.greeting_name,
                "messages": self.messages,
                "reason": reason,
            },
        )

    def _record(self) -> dict[str, Any]:
        """The session as the session log keeps it (``GET /api/v1/sessions``)."""
        now = time.time()
        started = now - (time.monotonic() - self.started)
        conn = self.conn
        greeting, name = conn.greeting, conn.greeting_name
        if greeting is None and self._greeted is not None:
            greeting, name = self._greeted.verb, self._greeted.name  # refused, or before TLS
        report = self._collect_report()
        decision = self.decision
        transcript = self.transcript
        if transcript is not None:
            outcome = transcript.outcome()
        else:
            refusal = self._last_refusal
            outcome = str(refusal).splitlines()[-1] if refusal is not None else "closed"
        return {
            "id": self.session_id,
            "started_at": datetime.fromtimestamp(started, UTC).isoformat(),
            "ended_at": datetime.fromtimestamp(now, UTC).isoformat(),
            "client_ip": self.client_ip,
            "client_port": self.client_port,
            "greeting": greeting,
            "greeting_name": name,
            "tls": dict(self.tls) if self.tls else None,
            "auth": self.auth_user,
            "messages": list(self.message_ids),
            "outcome": outcome,
            "greeting_verdict": decision.to_json() if decision is not None else None,
            "greeting_checks": report.to_json() if report is not None else None,
            "transcript": transcript.session_lines() if transcript is not None else None,
        }

    def note_violation(self, kind: str, detail: str, action: str) -> bool:
        """Record a protocol violation under ``action`` (record, reject or off).

        True when the client is to be dropped.
        """
        if kind not in self.violations:
            self.violations.append(kind)
        if action == "off":
            return False
        log.warning(
            "protocol violation session=%s %s: %s (%s)"
            + (", dropping" if action == "reject" else ""),
            self.session_id,
            self.peer,
            kind,
            detail,
            extra={
                **self._log_fields,
                "event": "violation",
                "violation": kind,
                "detail": detail,
                "action": action,
            },
        )
        return action == "reject"

    def abort_message(self) -> None:
        """Forget the message being written, if any."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        self.envelope = None
        self._headers = None
        self._store_failed = False

    # --------------------------------------------------------------- dispatch

    def handle(self, event: Event) -> Reply | Awaitable[Reply | None] | Deferred | None:
        """The reply to ``event`` (or an awaitable of it); None when none is due."""
        kind = type(event)
        if kind is DataChunk:
            assert isinstance(event, DataChunk)
            self._write(event.data)
            return None
        handler = _DISPATCH.get(kind)
        if handler is None:
            return None
        result: Reply | Awaitable[Reply | None] | Deferred | None = handler(self, event)
        return result

    def _context(self, stage: str, **fields: object) -> HookContext:
        conn = self.conn
        tx = conn.transaction
        values: dict[str, Any] = {
            "greeting": conn.greeting,
            "greeting_name": conn.greeting_name,
            "mail_from": tx.mail_from if tx else None,
            "mail_params": dict(tx.params) if tx else {},
            "rcpt_to": list(tx.rcpts) if tx else [],
        }
        values.update(fields)
        return HookContext(
            stage=stage,  # type: ignore[arg-type]
            client_ip=self.client_ip,
            client_port=self.client_port,
            tls=self.tls,
            auth_user=self.auth_user,
            **values,
        )

    async def _with_hooks(self, context: HookContext, default: Reply) -> Reply:
        reply = await self.ctx.hooks.run(context)
        return default if reply is None else reply

    def _greeting(self, event: Helo | Ehlo) -> Reply | Awaitable[Reply]:
        # RFC 5321 section 4.1.4: a client may greet again (a reset), so the
        # repeat is answered as usual; but it moves no mail and starts the
        # checks again, so it counts as a junk command. The greeting that
        # RFC 3207 section 4.2 requires after TLS is the first of its state.
        if self.conn.greeting is not None and self._junk_limit():
            return _TOO_MANY_JUNK
        self._greeted = event
        self.abort_message()
        hostname = self.ctx.config.hostname
        # "<hostname> Hello <name> [<ip>]"; the address once when the name is
        # the client's own address literal (RFC 5321 section 4.1.3).
        if event.name.lower() in (f"[{self.client_ip}]", f"[ipv6:{self.client_ip}]"):
            first = f"{hostname} Hello {event.name}"
        else:
            first = f"{hostname} Hello {event.name} [{self.client_ip}]"
        if type(event) is Ehlo:
            reply = Reply(250, None, [first, *self.conn.extension_lines()])
        else:
            reply = Reply(250, None, first)
        if self.first_greeting is None:
            self.first_greeting = event.verb
            if self.ctx.metrics is not None:
                self.ctx.metrics.sessions[event.verb].inc()
        if log.isEnabledFor(logging.INFO):
            log.info(
                "greeting session=%s %s %s %s",
                self.session_id,
                self.peer,
                event.verb,
                event.name,
                extra={
                    **self._log_fields,
                    "event": "greeting",
                    "greeting": event.verb,
                    "greeting_name": event.name,
                },
            )
        self._start_checks(event)
        enforce = self._enforcing("helo")
        if self.ctx.hooks.has("helo") or enforce:
            ctx = self._context("helo", greeting=event.verb, greeting_name=event.name)
            return self._checked(ctx, reply, enforce)
        return reply

    # ------------------------------------------------------ greeting checks

    def _start_checks(self, event: Helo | Ehlo) -> None:
        """Begin verifying the greeting in the background (the reply does not wait)."""
        verifier = self.ctx.verifier
        if verifier is None or not verifier.applies_to(self.client_ip):
            return
        names = self._greeting_names
        if names is None:
            from ..greeting import GreetingNames  # loaded with the checks

            names = self._greeting_names = GreetingNames()
        greeting = verifier.greeting(event.verb, event.name, self.client_ip, names.previous)
        names.add(event.name)
        self.report = None
        self.decision = None
        if self._dns_budget is None:
            # An abuse limit: one DNS budget for the whole session, not per greeting.
            self._dns_budget = verifier.budget()
        task = self._checks
        waiting = task is not None and not task.done() and self._checks_input is not None
        self._checks_input = greeting
        if not waiting:
            # Checks that have begun look at an older greeting: they end, and
            # new ones begin. Checks that have not begun yet (greetings
            # pipelined in one read) take this greeting instead, so a burst
            # of greetings costs one task, not one each.
            self._drop_checks()
            self._checks = asyncio.get_running_loop().create_task(self._verify(verifier))

    async def _verify(self, verifier: GreetingVerifier) -> GreetingReport:
        """The checks of the latest greeting, from a kept report or a new run."""
        greeting, self._checks_input = self._checks_input, None
        assert greeting is not None
        report = await verifier.verify(greeting, self._dns_budget)
        if self.ctx.metrics is not None:
            self.ctx.metrics.checks({name: r.result for name, r in report.results.items()})
        return report

    def _drop_checks(self) -> bool:
        """Cancel the checks under way (their lookups end with them); True if some were."""
        task = self._checks
        if task is None:
            return False
        if task.done():
            if not task.cancelled():
                task.exception()  # collected, whoever else reads it
            return False
        task.cancel()
        return True

    def _enforcing(self, stage: str) -> bool:
        verifier = self.ctx.verifier
        return (
            self.auth_user is None  # an authenticated client is judged by its login
            and self._checks is not None
            and verifier is not None
            and verifier.policy.enforcing
            and verifier.policy.stage == stage
        )

    async def _await_report(self) -> GreetingReport | None:
        task = self._checks
        if task is None:
            return None
        if self.report is None or not task.done():
            try:
                self.report = await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise  # we were cancelled ourselves
                return None
            verifier = self.ctx.verifier
            assert verifier is not None
            self.decision = verifier.decide(self.report)
            if self.decision.action != "accept":
                log.info(
                    "greeting verdict session=%s %s %s %s: %s",
                    self.session_id,
                    self.peer,
                    self.decision.action,
                    self.decision.check,
                    self.decision.reply,
                    extra={
                        **self._log_fields,
                        "event": "greeting_verdict",
                        "greeting_name": self.report.greeting.name,
                        "action": self.decision.action,
                        "check": self.decision.check,
                        "reply": str(self.decision.reply),
                    },
                )
        return self.report

    def _collect_report(self) -> GreetingReport | None:
        """The report of finished checks (also when nothing awaited them), or None."""
        task = self._checks
        if task is None:
            return None
        if (
            self.report is None
            and task.done()
            and not task.cancelled()
            and task.exception() is None
        ):
            self.report = task.result()
            verifier = self.ctx.verifier
            assert verifier is not None
            self.decision = verifier.decide(self.report)
        return self.report

    async def _verdict(self) -> Reply | None:
        """The refusal the greeting policy gives now, or None."""
        await self._await_report()
        decision = self.decision
        if decision is None or decision.action == "accept":
            return None
        return decision.reply

    async def _checked(self, context: HookContext, default: Reply, enforce: bool) -> Reply:
        """The greeting policy's verdict (when it applies at this stage), then the hooks."""
        if enforce:
            refusal = await self._verdict()
            if refusal is not None:
                return refusal
        return await self._with_hooks(context, default)

    def _mail(self, event: Mail) -> Reply | Awaitable[Reply]:
        config = self.ctx.config
        if config.require_tls and self.tls is None:
            # RFC 3207 section 4: 530 until the client has issued STARTTLS.
            return _NEED_TLS
        if config.submission and self.auth_user is None:
            return _NEED_AUTH
        reply = Reply(250, "2.1.0", f"Sender <{event.address}> OK")
        enforce = self._enforcing("mail")
        if self.ctx.hooks.has("mail") or enforce:
            ctx = self._context("mail", mail_from=event.address, mail_params=dict(event.params))
            return self._checked(ctx, reply, enforce)
        return reply

    def _rcpt(self, event: Rcpt) -> Reply | Awaitable[Reply]:
        address = event.address
        routing = self.ctx.routing
        if not routing.catch_all:
            decision = routing.decide(
                address, authenticated=self.auth_user is not None, client_ip=self.client_ip
            )
            if decision.refusal is not None:
                return decision.refusal  # no open relay
        reply = Reply(250, "2.1.5", f"Recipient <{address}> OK")
        enforce = self._enforcing("rcpt")
        if self.ctx.hooks.has("rcpt") or enforce:
            ctx = self._context("rcpt", rcpt=address, rcpt_params=dict(event.params))
            return self._checked(ctx, reply, enforce)
        return reply

    def _waiting(self) -> bool:
        """True when the headers need an answer that is not in yet."""
        if self._checks is not None and not self._checks.done():
            return True
        return self._checks is None and self._rdns is not None and not self._rdns.done()

    def _data(self, event: Data) -> Reply | Awaitable[Reply]:
        if self._waiting():
            return self._data_after_lookups()
        return self._open_message(_START_DATA)

    async def _data_after_lookups(self) -> Reply:
        await self._await_lookups()
        return self._open_message(_START_DATA)

    async def _await_lookups(self) -> None:
        if self._checks is not None:
            await self._await_report()
        else:
            await self._await_rdns()

    def _bdat(self, event: Bdat) -> Awaitable[None] | None:
        if not event.first:
            return None
        # No reply is due until the chunk is read: open the message now, once
        # the answers its headers need are in (the chunk waits in the buffer).
        if self._waiting():
            return self._bdat_after_lookups()
        self._open_message(None)
        return None

    async def _bdat_after_lookups(self) -> None:
        await self._await_lookups()
        self._open_message(None)

    async def _await_rdns(self) -> None:
        fut = self._rdns
        if fut is None:
            return
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(fut), self.ctx.config.reverse_dns_timeout)
        self._collect_rdns()
        if self._rdns is fut:
            # Waited reverse_dns_timeout: the name stays unknown, and later
            # messages of the session do not wait again.
            self._rdns = None
            fut.cancel()

    def _collect_rdns(self) -> None:
        """Take the name once the lookup is done; the session then holds no future."""
        fut = self._rdns
        if fut is None or not fut.done():
            return
        self._rdns = None
        if not fut.cancelled() and fut.exception() is None:
            self.client_name = fut.result()

    def _open_message(self, reply: Reply | None) -> Reply:
        conn = self.conn
        tx = conn.transaction
        assert tx is not None
        self.abort_message()
        self._collect_rdns()
        report = self._collect_report()
        queue_id = new_queue_id()
        protocol = protocol_keyword(
            conn.esmtp, self.tls is not None, self.auth_user is not None, utf8=tx.smtputf8
        )
        now = time.time()
        envelope = Envelope(
            queue_id=queue_id,
            client_ip=self.client_ip,
            client_port=self.client_port,
            greeting=conn.greeting or "",
            greeting_name=conn.greeting_name or "",
            mail_from=tx.mail_from,
            mail_params=dict(tx.params),
            rcpt_to=list(tx.rcpts),
            received_at=datetime.fromtimestamp(now, UTC),
            tls=self.tls,
            protocol=protocol,
            server_name=self.ctx.config.hostname,
        )
        if self.auth_user is not None:
            envelope.extra["auth"] = {"user": self.auth_user, "mechanism": self.auth_mechanism}
        if not self.ctx.routing.catch_all:
            self._route(envelope, tx)
        if self.violations:
            envelope.extra["violations"] = list(dict.fromkeys(self.violations))
        if report is not None:
            envelope.extra["greeting_checks"] = JSONText(report.json_text())
            if self.decision is not None:
                envelope.extra["greeting_verdict"] = self.decision.to_json()
            # With the checks run, the header names the verified PTR name only.
            client_name = report.verified_ptr
        else:
            client_name = self.client_name
        header = received_header(
            greeting_name=envelope.greeting_name,
            client_ip=self.client_ip,
            client_name=client_name,
            server_name=self.ctx.config.hostname,
            protocol=protocol,
            queue_id=queue_id,
            recipient=tx.rcpts[0] if len(tx.rcpts) == 1 else None,
            tls=self.tls,
            auth_user=self.auth_user,
            now=now,
            utf8=tx.smtputf8,
        )
        if report is not None:
            from ..greeting import authentication_results  # loaded with the checks

            header += authentication_results(report, self.ctx.config.hostname)
        self.envelope = envelope
        self._headers = AuthResFilter(
            self.ctx.authserv_ids, remove=self.ctx.config.authres_forged == "remove"
        )
        try:
            self.writer = self.ctx.store.begin(envelope)
            self.writer.write(header)
        except StoreError as exc:
            log.error("store refused message session=%s %s from %s: %s", self.session_id,
                      queue_id, self.peer, exc, extra={**self._log_fields, "event": "store_error"})
            self._store_failed = True
            if self.writer is not None:
                self.writer.abort()
                self.writer = None
        if reply is not None and self._store_failed:
            self.envelope = None
            self._store_failed = False
            return _STORE_FAILED
        return reply if reply is not None else _OK

    def _route(self, envelope: Envelope, tx: Transaction) -> None:
        """The recipients to hand on, decided again as at RCPT (the rules are pure)."""
        routing = self.ctx.routing
        authenticated = self.auth_user is not None
        kept = False
        for index, rcpt in enumerate(tx.rcpts):
            decision = routing.decide(rcpt, authenticated=authenticated, client_ip=self.client_ip)
            kept = kept or decision.store
            params = tx.rcpt_params[index] if index < len(tx.rcpt_params) else {}
            notify = params.get("NOTIFY")
            hop = decision.next_hop
            if hop is None and notify is not None and "SUCCESS" in notify.upper():
                hop = "local"  # RFC 3461 section 4.1: a success notice for a stored copy
            if hop is not None:
                envelope.queue.append(QueueItem(rcpt, hop, notify, params.get("ORCPT")))
        if not kept:
            envelope.extra["handed_on"] = True  # removed from the store once delivered

    def _write(self, data: bytes) -> None:
        writer = self.writer
        if writer is None:
            return
        headers = self._headers
        if headers is not None and not headers.done:
            data = headers.feed(data)
            if not data:
                return
        try:
            writer.write(data)
        except StoreError as exc:
            log.error("store write failed session=%s %s: %s", self.session_id, self.peer, exc,
                      extra={**self._log_fields, "event": "store_error"})
            writer.abort()
            self.writer = None
            self._store_failed = True

    def _end_headers(self) -> int:
        """Store what the header filter still holds; note forged fields in the envelope.

        Returns how many Received fields the client's header section held.
        """
        headers = self._headers
        if headers is None:
            return 0
        self._headers = None
        if self.writer is not None:
            tail = headers.finish()
            if tail:
                self._write(tail)
        if headers.forged and self.envelope is not None:
            self.envelope.extra["authres_forged"] = headers.forged
        return headers.received

    def _too_many_hops(self, size: int, hops: int) -> Reply:
        """Refuse and drop a message that went through too many hops."""
        envelope = self.envelope
        self.abort_message()
        # RFC 5321 section 6.3: a message with too many Received fields is
        # likely looping; 5.4.6 is "routing loop detected" (RFC 3463).
        reply = Reply(554, "5.4.6", f"Too many hops ({hops} Received fields): mail loop?")
        if self.ctx.metrics is not None:
            self.ctx.metrics.limit("max_hops")
        self._log_outcome(envelope, size, reply)
        return reply

    def _data_end(self, event: DataEnd) -> Reply | Awaitable[Reply] | Deferred:
        if event.last:
            hops = self._end_headers()
            if hops > self.ctx.config.max_hops:
                return self._too_many_hops(event.size, hops)
        if not event.last:
            if self._store_failed:
                self.abort_message()
                return _STORE_FAILED
            return Reply(250, "2.0.0", f"{event.size} octets received")
        if self._enforcing("data") or self.ctx.hooks.has("data"):
            return self._finish(event.size)  # the policy's word first
        return self._commit(event.size)

    def _store_refusal(self, size: int) -> Reply | None:
        """451 when the store already failed this message (or never had it), else None."""
        if self.writer is None or self.envelope is None or self._store_failed:
            envelope = self.envelope
            self.abort_message()
            self._log_outcome(envelope, size, _STORE_FAILED)
            return _STORE_FAILED
        return None

    def _commit(self, size: int) -> Reply | Deferred:
        """Hand the message to the store: its refusal now, or the commit under way."""
        refusal = self._store_refusal(size)
        if refusal is not None:
            return refusal
        envelope, writer = self.envelope, self.writer
        assert envelope is not None and writer is not None
        # Stored and logged: what the client sent, and ``size``, what is stored.
        envelope.size_received, size = size, writer.size if writer.size is not None else size
        if self.transcript is not None:
            # The greeting, TLS and AUTH lines and this transaction's, up to
            # the end of its data (the 250 follows the commit).
            envelope.extra[TRANSCRIPT] = JSONText(self.transcript.message_json())
        started = time.monotonic()
        try:
            # RFC 5321 section 6.1: answer 250 only once the message is safe.
            future = writer.start_commit()
        except StoreError as exc:
            return self._committed(envelope, size, started, exc)
        except BaseException:
            writer.abort()
            raise
        if future.done() and not future.cancelled():
            return self._committed(envelope, size, started, future)  # nothing to wait for
        return Deferred(future, functools.partial(self._committed, envelope, size, started))

    def _committed(
        self,
        envelope: Envelope,
        size: int,
        started: float,
        outcome: asyncio.Future[str] | StoreError,
    ) -> Reply:
        """The reply to a finished commit (its future, or the error that stopped it).

        A future the store itself cancelled is a failed commit too: the
        message was not taken.
        """
        try:
            if isinstance(outcome, StoreError):
                raise outcome
            if outcome.cancelled():
                raise StoreError("the store cancelled the commit")
            queue_id = outcome.result()
        except StoreError as exc:
            # An outage is logged once by the store, not once per message.
            level = logging.DEBUG if isinstance(exc, StoreUnavailable) else logging.ERROR
            log.log(level, "commit failed session=%s %s: %s", self.session_id, envelope.queue_id,
                    exc, extra={**self._log_fields, "event": "store_error"})
            self.writer = None
            self.abort_message()
            self._log_outcome(envelope, size, _STORE_FAILED)
            return _STORE_FAILED
        self.writer = None
        self.envelope = None
        self.messages += 1
        if len(self.message_ids) < _MAX_LOGGED_IDS:
            self.message_ids.append(queue_id)
        metrics = self.ctx.metrics
        if metrics is not None:
            metrics.messages.inc()
            metrics.octets.inc(envelope.size_received or 0)
            metrics.commit_seconds.observe(time.monotonic() - started)
        if envelope.queue and self.ctx.scheduler is not None:
            self.ctx.scheduler.wake()  # mail to hand on
        if self.ctx.on_stored is not None:
            self._notify_stored(envelope)
        self._junk = 0
        reply = Reply(250, "2.0.0", f"OK: queued as {queue_id}")
        self._log_outcome(envelope, size, reply)
        return reply

    def _notify_stored(self, envelope: Envelope) -> None:
        """Tell the embedding program (``Server(on_stored=...)``) of a committed message."""
        assert self.ctx.on_stored is not None
        try:
            self.ctx.on_stored(envelope)
        except Exception:  # the message is safe: its 250 must still go out
            log.exception("on_stored failed session=%s %s", self.session_id, envelope.queue_id)

    async def _finish(self, size: int) -> Reply:
        """The policy's word on the message (greeting verdict, data hooks), then the commit."""
        refusal = self._store_refusal(size)
        if refusal is not None:
            return refusal
        envelope = self.envelope
        assert envelope is not None
        if self._enforcing("data"):
            refusal = await self._verdict()
            if refusal is not None:
                self.abort_message()
                self._log_outcome(envelope, size, refusal)
                return refusal
        if self.ctx.hooks.has("data"):
            ctx = self._context("data", queue_id=envelope.queue_id, size=size)
            refusal = await self.ctx.hooks.run(ctx)
            if refusal is not None and refusal.code >= 400:
                self.abort_message()
                self._log_outcome(envelope, size, refusal)
                return refusal
        result = self._commit(size)
        if isinstance(result, Reply):
            return result
        try:
            await asyncio.wait([result.future])  # any outcome, read by ``then``
        except asyncio.CancelledError:  # a deadline: nobody waits for the commit
            result.future.cancel()
            raise
        return result.then(result.future)

    def _log_outcome(self, envelope: Envelope | None, size: int, reply: Reply) -> None:
        if reply.code >= 400:
            self._logged = reply  # this line is the refusal's
        if not log.isEnabledFor(logging.INFO):
            return  # the fields below cost more than the check, once per message
        queue_id = envelope.queue_id if envelope else "-"
        outcome = "accepted" if reply.code < 400 else "refused"
        tx = self.conn.transaction
        mail_from = envelope.mail_from if envelope else (tx.mail_from if tx else "")
        rcpts = envelope.rcpt_to if envelope else (tx.rcpts if tx else [])
        tls = self.tls.get("version") if self.tls else None
        report, decision = self.report, self.decision
        checks: dict[str, str] = {}
        if report is not None:
            from ..greeting import CHECKS  # loaded with the checks

            results = report.results
            checks = {name: results[name].result for name in CHECKS if name in results}
        verdict = decision.action if decision is not None else None
        greeting_name = self.conn.greeting_name
        log.info(
            "message session=%s %s %s %s from=%s to=%s rcpts=%d size=%d tls=%s auth=%s"
            " helo=%s verdict=%s checks=%s reply=%d",
            self.session_id,
            queue_id,
            outcome,
            self.peer,
            f"<{mail_from}>",
            ",".join([f"<{rcpt}>" for rcpt in rcpts]) or "-",
            len(rcpts),
            size,
            tls or "-",
            self.auth_user or "-",
            greeting_name or "-",
            verdict or "-",
            ",".join([f"{name}:{result}" for name, result in checks.items()]) or "-",
            reply.code,
            extra={
                **self._log_fields,
                "event": "message",
                "queue_id": queue_id,
                "outcome": outcome,
                "greeting_name": greeting_name,
                "mail_from": mail_from,
                "rcpt_to": list(rcpts),
                "size": size,
                "tls_version": tls,
                "auth_user": self.auth_user,
                "greeting_verdict": verdict,
                "greeting_checks": checks,
                "reply": str(reply),
            },
        )

    def _fault(self, event: Fault) -> None:
        metrics = self.ctx.metrics
        if metrics is not None:
            metrics.fault(event.verb, event.reply.code)
            limit = _FAULT_LIMITS.get(event.reason)
            if limit is None and event.verb == "MAIL" and event.reply.code == 552:
                limit = "max_message_size"  # RFC 1870 section 6.1: a SIZE over the limit
            if limit is not None:
                metrics.limit(limit)
            if event.closing:
                metrics.limit("max_errors")
        if event.aborted:
            envelope = self.envelope
            self.abort_message()
            if envelope is not None:
                self._log_outcome(envelope, event.size, event.reply)
                self._logged = None  # the core sent this reply: nothing to skip later
                return  # the message line is this refusal's line
        self._log_refusal(event.verb or "-", event.reply, event.reason)

    def refused(self, event: object, reply: Reply) -> None:
        """Log ``reply`` (4xx or 5xx), the answer to ``event``, unless its handler did.

        The transport calls this for each refusal it sends; a handler that
        wrote its own line for a refusal (the message line, AUTH's) marks the
        reply in ``_logged``, so that each refusal is logged once.
        """
        self._last_refusal = reply
        metrics = self.ctx.metrics
        if metrics is not None:
            stage = _STAGES.get(type(event)) if event is not None else "connect"
            if stage is not None:
                metrics.refusal(stage, reply.code)
        logged, self._logged = self._logged, None
        if reply is logged:
            return
        # None: the connect hooks refused the banner.
        verb = event.verb if isinstance(event, Command) else "CONNECT"
        self._log_refusal(verb, reply, None, event)

    def _log_refusal(
        self, verb: str, reply: Reply, fault: str | None, event: object = None
    ) -> None:
        """One ``refused`` line: the command, its address, the reply and its codes."""
        if not log.isEnabledFor(logging.INFO):
            return
        fields = {**self._log_fields, "event": "refused", "verb": verb}
        message = "refused session=%s %s cmd=%s"
        args: list[Any] = [self.session_id, self.peer, verb]
        tx = self.conn.transaction
        if isinstance(event, Mail):
            message += " from=%s"
            args.append(f"<{event.address}>")
            fields["mail_from"] = event.address
        elif isinstance(event, Rcpt):
            message += " rcpt=%s from=%s"
            args += (f"<{event.address}>", f"<{tx.mail_from}>" if tx else "-")
            fields["rcpt"] = event.address
            fields["mail_from"] = tx.mail_from if tx else None
        # One value, quoted when it holds the enhanced code: reply="550 5.7.1".
        message += " reply=%s"
        args.append(f"{reply.code} {reply.enhanced}" if reply.enhanced else reply.code)
        if fault is not None:
            message += " fault=%s"
            args.append(fault)
            fields["fault"] = fault
        message += " helo=%s text=%s"
        args += (self.conn.greeting_name or "-", reply.text)
        fields["greeting_name"] = self.conn.greeting_name
        fields["reply"] = str(reply)
        log.info(message, *args, extra=fields)

    def _junk_limit(self) -> bool:
        """Count a command that moves no mail; True beyond the limit (Postfix's junk limit)."""
        self._junk += 1
        limit = self.ctx.config.max_junk_commands
        if limit > 0 and self._junk > limit:
            if self.ctx.metrics is not None:
                self.ctx.metrics.limit("max_junk_commands")
            return True
        return False

    def _rset(self, event: Rset) -> Reply:
        self.abort_message()
        return _TOO_MANY_JUNK if self._junk_limit() else _RSET_OK

    def _noop(self, event: Noop) -> Reply:
        return _TOO_MANY_JUNK if self._junk_limit() else _OK

    def _vrfy(self, event: Vrfy) -> Reply:
        return _TOO_MANY_JUNK if self._junk_limit() else _VRFY

    def _help(self, event: Help) -> Reply:
        return _TOO_MANY_JUNK if self._junk_limit() else _HELP

    # ------------------------------------------------------------------- AUTH

    def _auth(self, event: Auth) -> Reply | Awaitable[Reply]:
        from ..auth import new_mechanism

        if self.ctx.auth_guard.locked(self.client_key, time.monotonic()):
            self._count_auth(event.mechanism, "locked", "max_auth_failures")
            return _AUTH_LOCKED
        mechanism = new_mechanism(event.mechanism)
        if mechanism is None or self.ctx.users is None:
            return _AUTH_UNAVAILABLE
        self._sasl = mechanism
        return self._sasl_step(mechanism.start(event.initial))

    def _auth_response(self, event: AuthResponse) -> Reply | Awaitable[Reply]:
        mechanism = self._sasl
        if mechanism is None:
            return _AUTH_UNAVAILABLE
        return self._sasl_step(mechanism.step(event.line))

    def _sasl_step(self, result: object) -> Reply | Awaitable[Reply]:
        from ..auth import Challenge, Credentials, SaslFailure

        if isinstance(result, Challenge):
            # RFC 4954 section 4: 334 followed by the base64 challenge.
            return Reply(334, None, base64.b64encode(result.data).decode("ascii"))
        mechanism, self._sasl = self._sasl, None
        if isinstance(result, SaslFailure):
            if mechanism is not None:
                self._count_auth(mechanism.name, "aborted")
            return Reply(result.code, result.enhanced, result.text)
        assert isinstance(result, Credentials) and mechanism is not None
        return self._login(result, mechanism.name)

    async def _login(self, credentials: Credentials, mechanism: str) -> Reply:
        ctx = self.ctx
        name = credentials.username
        fields = {
            **self._log_fields,
            "event": "auth",
            "user": name,
            "mechanism": mechanism,
        }
        if ctx.account_guard.locked(name, time.monotonic()):
            log.info(
                "auth session=%s %s user=%s mechanism=%s refused: account locked out",
                self.session_id,
                self.peer,
                name,
                mechanism,
                extra={**fields, "outcome": "account_locked"},
            )
            self._logged = _AUTH_ACCOUNT_LOCKED
            self._count_auth(mechanism, "locked", "max_auth_failures_per_user")
            return _AUTH_ACCOUNT_LOCKED
        # RFC 4616 section 2: an authorization identity other than the
        # user's own is refused (ehlo has no proxy authorization).
        allowed = not credentials.authzid or credentials.authzid == name
        try:
            ok = allowed and await ctx.verify_password(name, credentials.password)
        except VerifierBusy as exc:
            log.warning(
                "auth session=%s %s user=%s mechanism=%s not checked (%s): try again later",
                self.session_id,
                self.peer,
                name,
                mechanism,
                exc,
                extra={**fields, "outcome": "busy"},
            )
            self._logged = _AUTH_BUSY
            self._count_auth(mechanism, "busy", "max_auth_queue")
            return _AUTH_BUSY
        if ok:
            self.auth_user, self.auth_mechanism = name, mechanism
            log.info(
                "auth session=%s %s user=%s mechanism=%s ok",
                self.session_id,
                self.peer,
                name,
                mechanism,
                extra={**fields, "outcome": "ok"},
            )
            self._count_auth(mechanism, "success")
            return _AUTH_OK
        now = time.monotonic()
        delay, locked = ctx.auth_guard.failed(self.client_key, now)
        log.warning(
            "auth session=%s %s user=%s mechanism=%s failed"
            + (", address locked out" if locked else ""),
            self.session_id,
            self.peer,
            name,
            mechanism,
            extra={**fields, "outcome": "locked" if locked else "failed"},
        )
        self._count_auth(mechanism, "failure", "max_auth_failures" if locked else None)
        if ctx.account_guard.failed(name, now):
            if ctx.metrics is not None:
                ctx.metrics.limit("max_auth_failures_per_user")
            guard = ctx.account_guard
            log.warning(
                "user %s locked out of AUTH: %d failed attempts within %gs session=%s",
                name,
                guard.max_failures,
                guard.window,
                self.session_id,
                extra={**self._log_fields, "event": "auth_account_locked", "user": name},
            )
        # Slow down guessing: each failure from this address waits longer.
        await asyncio.sleep(delay)
        refusal = self._logged = _AUTH_LOCKED if locked else _AUTH_FAILED  # logged above
        return refusal

    def _count_auth(self, mechanism: str, result: str, limit: str | None = None) -> None:
        """Count an AUTH exchange's end (ehlo.server._metrics), and the limit it reached."""
        metrics = self.ctx.metrics
        if metrics is None:
            return
        metrics.auth(mechanism, result)
        if limit is not None:
            metrics.limit(limit)

    def _quit(self, event: Quit) -> Reply:
        self.abort_message()
        return self.ctx.goodbye

    def _starttls(self, event: StartTls) -> Reply:
        if self.ctx.ssl_context is None:
            return _TLS_UNAVAILABLE
        self.abort_message()
        return _TLS_GO


class Deferred:
    """A reply that waits for a future only (a store's commit): no task needed.

    The transport calls ``then(future)`` once ``future`` is done, and sends
    what it returns.
    """

    __slots__ = ("future", "then")

    def __init__(
        self, future: asyncio.Future[Any], then: Callable[[asyncio.Future[Any]], Reply]
    ) -> None:
        self.future = future
        self.then = then


# The stage whose refusals a command's reply counts under (ehlo.server._metrics).
_STAGES: dict[type, str] = {Mail: "mail", Rcpt: "rcpt", Data: "data", Bdat: "data", DataEnd: "data"}
# The limit a fault of the protocol core reached, by its reason.
_FAULT_LIMITS = {
    "message too large": "max_message_size",
    "too many recipients": "max_recipients",
    "command line too long": "max_command_line",
    "AUTH response too long": "max_command_line",
    "text line too long": "max_text_line",
}

_Handler = Callable[[Session, Any], Reply | Awaitable[Reply | None] | Deferred | None]
_DISPATCH: dict[type[Event], _Handler] = {
    Helo: Session._greeting,
    Ehlo: Session._greeting,
    Mail: Session._mail,
    Rcpt: Session._rcpt,
    Data: Session._data,
    Bdat: Session._bdat,
    DataEnd: Session._data_end,
    Fault: Session._fault,
    Rset: Session._rset,
    Noop: Session._noop,
    Vrfy: Session._vrfy,
    Help: Session._help,
    Quit: Session._quit,
    StartTls: Session._starttls,
    Auth: Session._auth,
    AuthResponse: Session._auth_response,
}
