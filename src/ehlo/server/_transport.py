"""The asyncio transport of one SMTP connection (``asyncio.Protocol``).

It feeds received bytes to the protocol core, hands events to the session,
sends the replies, and writes everything pending in one write per read (the
RFC 2920 flush rule). It owns flow control (reading pauses while a reply is
awaited and the input buffer is large), timeouts (checked by the server's
sweeper: a command must arrive whole within the command timeout however it
is trickled, and no session outlives ``max_session_time``), the banner (with
its optional delay and the early-talker rule), the TLS upgrade after
STARTTLS, and closing. It keeps the server's list of idle connections in
order (``ServerContext.idle``), from which the connection idle longest is
closed when a newcomer needs its slot.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, cast

from ..protocol import NEED_DATA, PAUSED, Reply, ServerConnection, State
from ._session import Deferred, Session
from .abuse import client_key

if TYPE_CHECKING:
    from ._server import ServerContext
    from .proxy import ProxyInfo

log = logging.getLogger("ehlo.session")

# Pause reading when this much input waits behind a pending reply.
_MAX_BUFFERED = 256 * 1024
# Pause reading message bodies while the store has this much left to write;
# read again once the writer is down to _STORE_LOW (it says when).
_STORE_HIGH = 2 * 1024 * 1024
_STORE_LOW = 512 * 1024
_TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
_SHUTDOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
_LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
_SESSION_TOO_LONG = Reply(421, "4.4.2", "Session time limit exceeded, closing connection")
# States in which a connection waits for a new transaction (or the greeting):
# it may be closed to admit another client, and times out sooner under stress.
_IDLE_STATES = frozenset({State.START, State.CONNECTED, State.GREETED, State.REFUSED})
# RFC 5321 section 3.1: the client waits for the greeting before it speaks.
_EARLY_TALKER = Reply(554, "5.5.0", "Protocol error: you talked before the greeting")
_PIPELINING = Reply(
    554, "5.5.0", "Protocol error: commands sent without waiting for replies (RFC 2920)"
)


class SMTPServerProtocol(asyncio.Protocol):
    """One accepted connection."""

    __slots__ = (
        "_banner_sent",
        "_busy",
        "_close_reason",
        "_closed",
        "_eof",
        "_event",
        "_idle_since",
        "_pauses",
        "_task",
        "_tls_early",
        "_violation_seen",
        "client_ip",
        "client_key",
        "conn",
        "ctx",
        "implicit_tls",
        "last_activity",
        "proxy",
        "session",
        "started",
        "transport",
    )

    def __init__(
        self,
        ctx: ServerContext,
        *,
        implicit_tls: bool = False,
        proxy: ProxyInfo | None = None,
    ) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.conn = ServerConnection(ctx.config.limits, ctx.extensions)
        self.session: Session | None = None
        self.client_ip = ""
        self.client_key = ""  # what the per-address limits count (abuse.client_key)
        self.implicit_tls = implicit_tls
        self.proxy = proxy
        self._banner_sent = False
        self._violation_seen = False
        self._busy = False  # a reply is being computed asynchronously
        self._eof = False
        self._tls_early: bytearray | None = None
        self._pauses: set[str] = set()
        self._closed = False
        self._close_reason = "client closed"
        self.started = self.last_activity = time.monotonic()
        self._idle_since: float | None = None  # last_activity when put in ctx.idle
        self._task: asyncio.Future[Any] | None = None  # a task, or a commit's future
        self._event: object = None  # the command whose reply is awaited (None: the banner)

    # --------------------------------------------------------------- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        via = ""
        if self.proxy is not None and self.proxy.source is not None:
            via = str(peer[0])
            peer = self.proxy.source  # the real client, named by a trusted proxy
        ip = str(peer[0])
        if ip.startswith("::ffff:") and "." in ip:
            ip = ip[7:]  # an IPv4 client on a dual-stack socket
        self.client_ip = ip
        self.client_key = client_key(ip)
        refusal = self.ctx.admit(self)
        if refusal is not None:
            # Over a connection limit: answer 421 and close (RFC 5321 section 3.1).
            self._closed = True
            self.conn.send(refusal)
            self.conn.data_to_send()
            # Postfix-style: the refusal carries its enhanced code (4.7.0).
            self.transport.write(refusal.render(True))
            self.transport.close()
            log.warning(
                "refused %s:%s: %s",
                ip,
                peer[1],
                refusal.text,
                extra={
                    "event": "refused",
                    "client_ip": ip,
                    "client_port": peer[1],
                    "reason": refusal.text,
                },
            )
            return
        session = Session(self.ctx, self.conn, ip, int(peer[1]))
        self.session = session
        if session.transcript is not None:
            session.transcript.event(
                f"connect from {ip} port {peer[1]}" + (f" via {via}" if via else "")
            )
        fields: dict[str, Any] = {
            "event": "connect",
            "session": session.session_id,
            "client_ip": ip,
            "client_port": int(peer[1]),
        }
        if via:
            fields["proxy"] = via
        if self.implicit_tls:
            self._implicit_tls(session, fields)
        if log.isEnabledFor(logging.INFO):
            message, args = "connect session=%s %s", [session.session_id, session.peer]
            if via:
                message += " via %s"
                args.append(via)
            if self.implicit_tls:
                message += " (TLS)"
            log.info(message, *args, extra=fields)
        session.start_reverse_dns()
        delay = self.ctx.config.greeting_delay
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._greet)
        else:
            self._greet()
        self._settle()

    def _implicit_tls(self, session: Session, fields: dict[str, Any]) -> None:
        """RFC 8314: the handshake is done before the banner; the session is TLS from the start."""
        from .tls import describe  # not at import time: it brings cryptography

        assert self.transport is not None
        ssl_object = self.transport.get_extra_info("ssl_object")
        info = describe(ssl_object) if ssl_object is not None else {}
        self.conn.tls_active = True
        session.tls = info
        fields.update(info)
        if session.transcript is not None:
            session.transcript.event(
                f"TLS started {info.get('version', '?')} {info.get('cipher', '?')}"
                " (implicit TLS)"
            )
        if self.ctx.metrics is not None:
            self.ctx.metrics.tls_ok(info.get("version"))

    def _greet(self) -> None:
        """Send the banner (or run the connect hooks that decide it)."""
        session = self.session
        if self._closed or session is None or self._banner_sent or self._busy:
            return
        if self.conn.buffered:
            self._refuse_early_talker()
            return
        banner = session.banner()
        if isinstance(banner, Reply):
            self._banner_sent = True
            self.conn.send(banner)
            self._flush()
        else:
            self._event = None
            self._run(banner)  # connect hooks decide; talking meanwhile is early too

    def _refuse_early_talker(self) -> None:
        if self.session is not None:
            self.session.note_violation("early talker", "sent data before the greeting", "reject")
        # Like the connection-limit refusals, with its enhanced code (Postfix-style).
        self._say_goodbye(_EARLY_TALKER, "talked before the greeting", enhanced=True)

    def data_received(self, data: bytes) -> None:
        if self._tls_early is not None:
            # Decrypted bytes that arrive before start_tls() has returned
            # (a client's EHLO right after its handshake): keep them for the
            # TLS session. Plaintext read before the upgrade never gets here.
            self._tls_early += data
            return
        conn = self.conn
        conn.receive_data(data)
        state = conn.state
        if state is State.DATA or state is State.BDAT:
            # RFC 5321 section 4.5.3.2.5: the data timeout runs between reads.
            self.last_activity = time.monotonic()
        elif state is State.START and not self._banner_sent:
            self._refuse_early_talker()
            return
        if not self._busy:
            self._process()
        if self._pauses or conn.buffered > _MAX_BUFFERED:
            self._check_input()
        state = conn.state
        if (
            (state is State.DATA or state is State.BDAT)
            and "store" not in self._pauses
            and self.ctx.store.backlog_bytes > _STORE_HIGH
        ):
            # The store's writer is behind: stop reading bodies until it catches up.
            self._pause("store")
            self.ctx.store.drained(_STORE_LOW).add_done_callback(self._store_caught_up)

    def _store_caught_up(self, _: object) -> None:
        if not self._closed:
            self._resume("store")

    def _check_input(self) -> None:
        # Input waiting behind a pending reply is bounded.
        if self.conn.buffered > _MAX_BUFFERED:
            self._pause("input")
        else:
            self._resume("input")

    def eof_received(self) -> bool | None:
        # Commands received before the EOF are still answered (a client may
        # pipeline DATA, the body and QUIT, then half-close); then close.
        self._eof = True
        if not self._busy:
            self._close_after_eof()
        # Keep the write side open to answer what is pending; asyncio's TLS
        # transport cannot half-close, so there the answer is False.
        transport = self.transport
        return transport is None or transport.get_extra_info("ssl_object") is None

    def _close_after_eof(self) -> None:
        self._flush()
        if self._closed or self.transport is None:
            return
        self._closed = True
        self.conn.receive_eof()
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._close_reason = f"connection lost: {exc}"
        self._closed = True
        # A reply being computed (a commit above all) is left to finish: a
        # message the client sent whole is kept even if the 250 cannot be
        # delivered (RFC 5321 section 6.1 prefers a duplicate to a loss).
        if self.session is not None:
            self.session.closed(self._close_reason)
            self.ctx.release(self)
        self.session = None

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its commands.
        self._pause("output")

    def resume_writing(self) -> None:
        self._resume("output")

    # ------------------------------------------------------------ processing

    def _pause(self, reason: str) -> None:
        """Stop reading for ``reason`` (input, output or store)."""
        if reason in self._pauses:
            return
        self._pauses.add(reason)
        if len(self._pauses) == 1 and self.transport is not None and not self._closed:
            self.transport.pause_reading()

    def _resume(self, reason: str) -> None:
        """Drop ``reason``; read again once no reason is left."""
        if reason not in self._pauses:
            return
        self._pauses.discard(reason)
        if not self._pauses and self.transport is not None and not self._closed:
            self.transport.resume_reading()

    def _process(self) -> None:
        self._drain()
        self._settle()

    def _settle(self) -> None:
        """Keep this connection's place in the server's idle list (longest idle first)."""
        idle = self.ctx.idle
        if self.evictable:
            if self._idle_since != self.last_activity:
                # Idle again, or active since it was listed: to the end of the list.
                idle.pop(self, None)
                idle[self] = None
                self._idle_since = self.last_activity
        elif self._idle_since is not None:
            idle.pop(self, None)
            self._idle_since = None

    def _drain(self) -> None:
        """Hand complete commands to the session and send what they get."""
        conn = self.conn
        session = self.session
        if session is None:
            return
        while True:
            event = conn.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            # A command arrived whole: the command timeout starts again from here.
            self.last_activity = time.monotonic()
            if conn.pipelining_violation is not None and not self._violation_seen:
                self._violation_seen = True
                action = self.ctx.config.pipelining_violation
                if session.note_violation("pipelining", conn.pipelining_violation, action):
                    # RFC 3463 (via RFC 2034): with its enhanced code once the
                    # extension is offered, or about to be (the EHLO not waited for).
                    enhanced = conn.enhanced or (
                        conn.pipelining_violation == "EHLO"
                        and any(ext.enables_enhanced_codes for ext in conn.offered_extensions())
                    )
                    self._say_goodbye(_PIPELINING, "pipelining violation", enhanced=enhanced)
                    return
            try:
                result = session.handle(event)  # type: ignore[arg-type]
            except Exception:
                # A bug must cost one reply, not the connection or the server.
                log.exception("session error session=%s %s on %r", session.session_id,
                              session.peer, event)
                result = _LOCAL_ERROR if conn.awaiting_reply is not None else None
            if result is None:
                if conn.state is State.CLOSED:
                    break
                continue
            if isinstance(result, Reply):
                conn.send(result)
                if result.code >= 400 and result is not _LOCAL_ERROR:
                    session.refused(event, result)
                if conn.state is State.TLS_PENDING:
                    self._flush()
                    self._start_tls()
                    return
                continue
            # Replies already decided leave now, so that a client that does
            # not read them fills the transport's buffer and gets paused.
            self._flush()
            self._event = event
            if type(result) is Deferred:
                self._defer(result)
            else:
                self._run(result)  # type: ignore[arg-type]
            return
        if self._eof:
            self._close_after_eof()
        else:
            self._flush()

    def _run(self, awaitable: Awaitable[Reply | None]) -> None:
        self._busy = True
        self._task = asyncio.ensure_future(self._complete(awaitable))

    async def _complete(self, awaitable: Awaitable[Reply | None]) -> None:
        try:
            reply = await awaitable
        except asyncio.CancelledError:
            raise
        except Exception:
            self._log_error()
            reply = _LOCAL_ERROR if self.conn.awaiting_reply is not None else None
        self._deliver(reply)

    def _log_error(self) -> None:
        session = self.session
        if session is None:
            log.exception("session error for %s", self.client_ip)
        else:
            log.exception("session error session=%s %s", session.session_id, session.peer)

    def _defer(self, deferred: Deferred) -> None:
        """Wait for a future without a task: its done callback delivers the reply."""
        self._busy = True
        self._task = deferred.future
        deferred.future.add_done_callback(functools.partial(self._deferred_done, deferred))

    def _deferred_done(self, deferred: Deferred, future: asyncio.Future[Any]) -> None:
        if future.cancelled() and self._closed:
            return  # cancelled by a timeout or the shutdown deadline, which replied
        reply: Reply | None
        try:
            reply = deferred.then(future)
        except Exception:
            self._log_error()
            reply = _LOCAL_ERROR if self.conn.awaiting_reply is not None else None
        self._deliver(reply)

    def _deliver(self, reply: Reply | None) -> None:
        """Send the reply an awaited event produced, then go on with the input."""
        self._busy = False
        self._task = None
        if self._closed:
            return
        self.last_activity = time.monotonic()  # the client's next command is due from now
        if reply is not None:
            # None: the event needed waiting for but takes no reply (BDAT's start).
            self._banner_sent = True
            self.conn.send(reply)
            session = self.session
            if reply.code >= 400 and reply is not _LOCAL_ERROR and session is not None:
                session.refused(self._event, reply)
        if self.conn.state is State.TLS_PENDING:
            self._flush()
            self._start_tls()
            return
        if self.ctx.draining and self.conn.transaction is None and not self.conn.closing:
            self._say_goodbye(_SHUTDOWN, "server shutting down")
            return
        self._process()
        self._check_input()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        transport = self.transport
        if transport is None or self._closed:
            return
        if data:
            transport.write(data)
        if self.conn.closing:
            self._closed = True
            self._close_reason = (
                "closed by server" if self._close_reason == "client closed" else self._close_reason
            )
            transport.close()

    # ------------------------------------------------------------------- TLS

    def _start_tls(self) -> None:
        self._busy = True
        self._task = asyncio.ensure_future(self._upgrade())

    async def _upgrade(self) -> None:
        transport = self.transport
        ssl_context = self.ctx.ssl_context
        assert transport is not None and ssl_context is not None
        loop = asyncio.get_running_loop()
        # From the start_tls() call on, the protocol only receives decrypted data.
        self._tls_early = bytearray()
        try:
            tls_transport = await loop.start_tls(
                transport,
                self,
                ssl_context,
                server_side=True,
                ssl_handshake_timeout=min(60.0, self.ctx.config.command_timeout),
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._close_reason = f"TLS handshake failed: {exc}"
            if self.ctx.metrics is not None:
                self.ctx.metrics.tls_failed.inc()
            self._busy = False
            self._task = None
            self._closed = True
            transport.abort()
            return
        self._busy = False
        self._task = None
        if tls_transport is None:
            self._closed = True
            return
        self.transport = tls_transport
        from .tls import describe  # not at import time: it brings cryptography

        ssl_object = tls_transport.get_extra_info("ssl_object")
        info = describe(ssl_object) if ssl_object is not None else {}
        if self.ctx.metrics is not None:
            self.ctx.metrics.tls_ok(info.get("version"))
        self.conn.tls_started()
        early, self._tls_early = self._tls_early, None
        if self.session is not None:
            self.session.tls_started(info)
        self.last_activity = time.monotonic()
        if early:
            self.conn.receive_data(bytes(early))
        self._process()

    # --------------------------------------------------------------- control

    @property
    def idle(self) -> bool:
        """No transaction open and no reply being computed."""
        return not self._busy and self.conn.transaction is None

    @property
    def evictable(self) -> bool:
        """Waiting for a transaction to start: not in MAIL/RCPT, DATA, BDAT, AUTH or TLS."""
        return (
            not self._busy
            and not self._closed
            and self.session is not None
            and self._tls_early is None
            and self.conn.transaction is None
            and self.conn.state in _IDLE_STATES
        )

    def timeout_due(self, now: float) -> bool:
        """True when the client has been silent for longer than allowed, or the session too long."""
        if self._closed:
            return False
        if now - self.started > self.ctx.config.max_session_time:
            return True
        if self._busy:
            return False
        config = self.ctx.config
        state = self.conn.state
        if state is State.DATA or state is State.BDAT:
            limit = config.data_timeout
        elif self.ctx.stress and self.evictable:
            # Stress mode: idle before or between transactions costs a slot others need.
            limit = min(config.stress_timeout, config.command_timeout)
        else:
            limit = config.command_timeout
        return now - self.last_activity > limit

    def close_for_timeout(self) -> None:
        """RFC 5321 section 4.5.3.2: give up on a silent client with 421."""
        metrics = self.ctx.metrics
        if time.monotonic() - self.started > self.ctx.config.max_session_time:
            if metrics is not None:
                metrics.limit("max_session_time")
            if self._task is not None and not self._task.done():
                self._task.cancel()
            self._busy = False
            self._say_goodbye(_SESSION_TOO_LONG, "session time limit")
            return
        if metrics is not None:
            metrics.limit(self._timeout_limit())
        self._say_goodbye(_TIMEOUT, "timeout (stress mode)" if self.ctx.stress else "timeout")

    def _timeout_limit(self) -> str:
        """The configuration key of the timeout that ran out (see ``timeout_due``)."""
        state = self.conn.state
        if state is State.DATA or state is State.BDAT:
            return "data_timeout"
        config = self.ctx.config
        if self.ctx.stress and self.evictable and config.stress_timeout < config.command_timeout:
            return "stress_timeout"
        return "command_timeout"

    def evict(self, reply: Reply) -> None:
        """Close this idle connection so that another client gets its slot."""
        # RFC 5321 section 3.8: the server may close a connection after a 421.
        # With its enhanced code even before EHLO, like the connection-limit refusals.
        self._say_goodbye(reply, "closed to admit another client", enhanced=True)

    def shutdown(self) -> None:
        """Server stopping: close now with 421 if idle; otherwise after the reply."""
        if self.idle:
            self._say_goodbye(_SHUTDOWN, "server shutting down")

    def force_close(self) -> None:
        """The shutdown deadline passed: 421 and close whatever is happening."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._busy = False
        self._say_goodbye(_SHUTDOWN, "server shutting down (deadline)")

    def _say_goodbye(self, reply: Reply, reason: str, enhanced: bool | None = None) -> None:
        if self._closed or self.transport is None:
            return
        self._close_reason = reason
        goodbye = reply.render(self.conn.enhanced if enhanced is None else enhanced)
        data = self.conn.data_to_send() + goodbye
        session = self.session
        if session is not None and session.transcript is not None:
            session.transcript.record("S", goodbye)  # sent past the protocol core
        self._closed = True
        self.conn.receive_eof()
        self.transport.write(data)
        self.transport.close()
