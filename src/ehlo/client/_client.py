"""The asyncio SMTP client over the sans-IO :class:`~ehlo.protocol.ClientConnection`.

This module owns the client's I/O: the TCP or Unix-socket connection (an
``asyncio.Protocol`` with write flow control), implicit TLS and the STARTTLS upgrade under a TLS
policy (:data:`TLS_MODES`: opportunistic TLS encrypts without
authenticating, RFC 7435; ``verify`` fails on an untrusted certificate), the
timeouts of RFC 5321 section 4.5.3.2, SASL authentication (PLAIN, LOGIN,
SCRAM-SHA-256: its messages come from ``_scram``), and
:meth:`SMTPClient.send_message`: one mail transaction with per-recipient
results, PIPELINING, SIZE, BODY=8BITMIME, SMTPUTF8, BDAT and the caller's DSN
parameters (RFC 3461), streaming the body (cut into chunks by ``_body``) from
bytes, a file or an iterator with flat memory. TLS details come from
``_certinfo``. With ``lmtp=True`` the same session speaks LMTP (RFC 2033):
LHLO, and one final reply per recipient after the data, so that each
recipient ends in :attr:`SendResult.delivered` or :attr:`SendResult.failed`.

What the message needs is checked before MAIL is sent: a server that does
not offer SMTPUTF8, 8BITMIME or a large enough SIZE gets no transaction at
all (:class:`MessageNotSupported`). Every command and reply can be reported
to a transcript callback, with AUTH secrets redacted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import ipaddress
import os
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal, Protocol, cast

from ..protocol import (
    NEED_DATA,
    ClientConnection,
    ClientState,
    LocalProtocolError,
    RemoteProtocolError,
    Reply,
    ServerExtensions,
)
from ..protocol._syntax import is_domain
from ._body import (
    MAX_TEXT_LINE,
    BodyScan,
    Message,
    message_chunks,
    scan_message,
    with_last,
)
from ._certinfo import TLSInfo, describe_certificate, tls_info
from ._errors import (
    AuthFailed,
    ConnectionFailed,
    DataRefused,
    MessageNotSupported,
    OptionNotSupported,
    RecipientsRefused,
    SenderRefused,
    ServiceRefused,
    SMTPClientError,
    TLSFailed,
)
from ._scram import sasl_prepare, scram_client_final, scram_client_first

__all__ = [
    "TLS_MODES",
    "Message",
    "SMTPClient",
    "SendResult",
    "TLSInfo",
    "TLSMode",
    "Timeouts",
    "Transcript",
    "client_ssl_context",
    "describe_certificate",
    "scram_client_final",
    "scram_client_first",
    "tls_info",
]

TLSMode = Literal["off", "opportunistic", "encrypt", "verify", "required", "implicit"]
# The TLS policies, after Postfix's smtp_tls_security_level (none, may,
# encrypt, verify): "off" never starts TLS; "opportunistic" (may) starts it
# when offered and does not verify; "encrypt" requires TLS and does not
# verify; "verify" requires TLS and a certificate trusted for the server
# name; "required" is the older name of "verify"; "implicit" is TLS from the
# first byte (RFC 8314), verified as "verify". Where a mode verifies, the
# ssl_context decides how (a CERT_NONE context does not).
TLS_MODES: tuple[TLSMode, ...] = (
    "off", "opportunistic", "encrypt", "verify", "required", "implicit",
)
# Modes that refuse to go on without TLS.
TLS_REQUIRED: frozenset[str] = frozenset({"encrypt", "verify", "required", "implicit"})
# Modes whose handshake uses ssl_context as given (verifying unless it is a
# CERT_NONE context); "off" is here for a caller that calls starttls() itself.
TLS_VERIFIED: frozenset[str] = frozenset({"verify", "required", "implicit", "off"})

# Read-side flow control: stop reading while this much is unparsed.
_MAX_UNPARSED = 1 << 20
# SASL mechanisms, most preferred first.
_MECHANISMS = ("SCRAM-SHA-256", "PLAIN", "LOGIN")
# A host of this form names a Unix-domain socket (``unix:/run/dovecot/lmtp``).
UNIX_PREFIX = "unix:"
# RFC 3461 section 4: the parameters of the DSN extension, on MAIL and on RCPT.
_DSN_MAIL_PARAMS = frozenset({"RET", "ENVID"})
_DSN_RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})


class Transcript(Protocol):
    """Receives the dialogue: ``kind`` is "info", "send", "recv" or "error"."""

    def __call__(self, kind: str, text: str, tls: bool) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds to wait, after RFC 5321 section 4.5.3.2 (its minimums are the defaults)."""

    connect: float = 30.0  # TCP connect (not in the RFC)
    tls: float = 60.0  # a TLS handshake (not in the RFC)
    banner: float = 300.0  # 4.5.3.2.1: initial 220 message, 5 minutes
    mail: float = 300.0  # 4.5.3.2.2: MAIL, 5 minutes
    rcpt: float = 300.0  # 4.5.3.2.3: RCPT, 5 minutes
    data_init: float = 120.0  # 4.5.3.2.4: DATA initiation, 2 minutes
    data_block: float = 180.0  # 4.5.3.2.5: each write of data, 3 minutes
    data_end: float = 600.0  # 4.5.3.2.6: the reply after the data, 10 minutes
    command: float = 300.0  # other commands (EHLO, RSET, AUTH ...)

    @classmethod
    def uniform(cls, seconds: float) -> Timeouts:
        """The same limit for every step (tests, impatient tools)."""
        return cls(*(seconds for _ in dataclasses.fields(cls)))


@dataclasses.dataclass(slots=True)
class SendResult:
    """The outcome of one transaction: the MAIL reply, each recipient's, the final reply.

    ``accepted`` and ``refused`` hold the replies to RCPT. ``delivered`` and
    ``failed`` hold the final outcome of each recipient accepted at RCPT: in
    SMTP the one reply after the data (``reply``) for all of them; in LMTP
    (RFC 2033 section 4.2) each recipient's own reply after the data, and
    ``reply`` is the first of them.
    """

    mail: Reply
    accepted: dict[str, Reply]
    refused: dict[str, Reply]
    reply: Reply
    size: int  # octets of the message as given (before CRLF and dot-stuffing)
    chunked: bool  # sent with BDAT
    tls: TLSInfo | None = None  # the session's TLS, if any
    delivered: dict[str, Reply] = dataclasses.field(default_factory=dict)  # final 2xx
    failed: dict[str, Reply] = dataclasses.field(default_factory=dict)  # final 4xx/5xx (LMTP)


def client_ssl_context(*, verify: bool = True, cafile: str | None = None) -> ssl.SSLContext:
    """A client TLS context: system CAs (and ``cafile``), or no verification at all."""
    context = ssl.create_default_context(cafile=cafile)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# ---------------------------------------------------------------- transport


class _Protocol(asyncio.Protocol):
    """Feeds received bytes to the connection; wakes the reader; write flow control."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.readable = asyncio.Event()
        self.lost: BaseException | None = None
        self.closed = False
        self._paused = False
        self._drain: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        if self.conn.buffered > _MAX_UNPARSED and self.transport is not None:
            self.transport.pause_reading()
        self.readable.set()

    def eof_received(self) -> bool:
        self.conn.receive_eof()
        self.readable.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = exc
        self.conn.receive_eof()
        self.readable.set()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("connection lost")
        if not self._paused:
            return
        self._drain = asyncio.get_running_loop().create_future()
        await self._drain
        if self.closed:
            raise ConnectionResetError("connection lost")


# ----------------------------------------------------------------- SASL


def _b64(data: bytes | str) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(reply: Reply) -> bytes:
    text = reply.text.strip()
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise AuthFailed("the server's AUTH challenge is not base64", reply) from None


# ------------------------------------------------------------------ helpers


def _default_helo_name() -> str:
    name = socket.getfqdn()
    return name if "." in name and is_domain(name) else ""


def _address_literal(ip: str) -> str:
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if address.version == 6:
        return f"[IPv6:{address.compressed}]"
    return f"[{address}]"


def _untrusted(peer: str, exc: ssl.SSLCertVerificationError) -> TLSFailed:
    reason = exc.verify_message or exc.reason or str(exc)
    error = TLSFailed(f"TLS certificate of {peer} not trusted: {reason}", temporary=True)
    error.verify_error = reason
    return error


def _dedupe(addresses: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(addresses))


def _split(outcomes: Iterable[tuple[str, Reply]]) -> tuple[dict[str, Reply], dict[str, Reply]]:
    """Recipients and their final replies: those delivered (2xx), those failed."""
    delivered: dict[str, Reply] = {}
    failed: dict[str, Reply] = {}
    for rcpt, reply in outcomes:
        (delivered if 200 <= reply.code < 300 else failed)[rcpt] = reply
    return delivered, failed


def _param_text(params: Mapping[str, str | None] | None) -> str:
    """ESMTP parameters as they follow a path on MAIL or RCPT (for the transcript)."""
    if not params:
        return ""
    return "".join(f" {k}" if v is None else f" {k}={v}" for k, v in params.items())


# ------------------------------------------------------------------- client


class SMTPClient:
    """One SMTP session with one server. Use ``async with SMTPClient(...) as client``.

    ``tls`` is one of :data:`TLS_MODES`: "opportunistic" (STARTTLS when
    offered, the certificate not verified: the default), "encrypt" (TLS
    required, not verified), "verify" or its older name "required" (TLS and
    a certificate trusted for the server name), "off", or "implicit" (TLS
    from the first byte, RFC 8314, verified). Where the mode verifies,
    certificates are checked against ``tls_server_name`` (default: ``host``)
    with ``ssl_context`` (a CERT_NONE context turns that off); where it does
    not, the handshake is not verified and ``tls`` (:class:`TLSInfo`) says
    whether the certificate would have verified with ``ssl_context``'s CAs,
    and why not. ``chunking``: None uses
    BDAT when offered, True requires it, False never uses it.
    ``pipelining=False`` never pipelines. ``helo_only`` greets with HELO.
    ``allow_plaintext_auth`` lets PLAIN and LOGIN run without TLS.

    ``lmtp=True`` speaks LMTP (RFC 2033) to a mailbox server: LHLO instead
    of EHLO (no HELO fallback), and one reply per recipient after the data.
    A ``host`` of the form ``unix:/path`` connects to that Unix-domain socket
    (``port`` and ``source_address`` are then unused, and a verifying TLS
    mode needs ``tls_server_name``).
    """

    def __init__(
        self,
        host: str,
        port: int = 25,
        *,
        helo_name: str | None = None,
        tls: TLSMode = "opportunistic",
        ssl_context: ssl.SSLContext | None = None,
        tls_server_name: str | None = None,
        timeouts: Timeouts | None = None,
        source_address: str | None = None,
        pipelining: bool = True,
        chunking: bool | None = None,
        helo_only: bool = False,
        allow_plaintext_auth: bool = False,
        transcript: Transcript | None = None,
        chunk_size: int = 1 << 20,
        lmtp: bool = False,
    ) -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}")
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self.socket_path: str | None = None
        if host.startswith(UNIX_PREFIX):
            self.socket_path = host[len(UNIX_PREFIX) :]
            if not self.socket_path:
                raise ValueError("a unix: host needs a socket path")
            if tls in TLS_VERIFIED and tls != "off" and not tls_server_name:
                raise ValueError(f"tls={tls} over a Unix socket needs tls_server_name")
        if lmtp and helo_only:
            raise ValueError("LMTP greets with LHLO only (helo_only does not apply)")
        self.host = host
        self.port = port
        self.helo_name = helo_name
        self.tls_mode: TLSMode = tls
        self.ssl_context = ssl_context
        self._unverified: ssl.SSLContext | None = None
        self.tls_server_name = tls_server_name
        self.timeouts = timeouts if timeouts is not None else Timeouts()
        self.source_address = source_address
        self.use_pipelining = pipelining
        self.chunking = chunking
        self.helo_only = helo_only
        self.allow_plaintext_auth = allow_plaintext_auth
        self.chunk_size = chunk_size
        self.lmtp = lmtp
        self._transcript = transcript
        self.conn = ClientConnection(tls_active=tls == "implicit", lmtp=lmtp)
        self.tls: TLSInfo | None = None
        self.greeting: Reply | None = None
        self._proto: _Protocol | None = None

    # ------------------------------------------------------------- queries

    @property
    def peer(self) -> str:
        if self.socket_path is not None:
            return self.host
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def banner(self) -> Reply | None:
        return self.conn.banner

    @property
    def extensions(self) -> ServerExtensions:
        return self.conn.extensions

    @property
    def esmtp(self) -> bool:
        return self.conn.esmtp

    @property
    def connected(self) -> bool:
        return self._proto is not None and not self._proto.closed

    # ---------------------------------------------------------- transcript

    def _say(self, kind: str, text: str) -> None:
        if self._transcript is not None:
            self._transcript(kind, text, self.conn.tls_active)

    def _sent(self, text: str) -> None:
        self._say("send", text)

    # ------------------------------------------------------------------ I/O

    async def _flush(self, timeout: float | None = None) -> None:
        data = self.conn.data_to_send()
        if not data:
            return
        proto = self._proto
        if proto is None or proto.transport is None or proto.closed:
            raise ConnectionFailed(f"connection to {self.peer} lost")
        try:
            proto.transport.write(data)
            async with asyncio.timeout(timeout or self.timeouts.data_block):
                await proto.drain()
        except TimeoutError:
            self._abort()
            raise ConnectionFailed(f"timeout writing to {self.peer}") from None
        except (OSError, RuntimeError) as exc:
            self._abort()
            raise ConnectionFailed(f"connection to {self.peer} lost: {exc}") from None

    def _timeout_for(self, verb: str) -> float:
        t = self.timeouts
        return {
            "BANNER": t.banner,
            "MAIL": t.mail,
            "RCPT": t.rcpt,
            "DATA": t.data_init,
            "BDAT": t.data_block,
            "DATA-END": t.data_end,
            "BDAT-LAST": t.data_end,
        }.get(verb, t.command)

    async def _reply(self) -> Reply:
        """The next reply (for the oldest command awaiting one)."""
        proto = self._proto
        if proto is None:
            raise ConnectionFailed("not connected")
        awaiting = self.conn.awaiting
        verb = awaiting[0] if awaiting else "?"
        timeout = self._timeout_for(verb)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        reply = self.conn.next_reply()
                    except RemoteProtocolError as exc:
                        self._abort()
                        raise ConnectionFailed(f"{self.peer}: {exc}") from None
                    if reply is not NEED_DATA:
                        break
                    proto.readable.clear()
                    if proto.transport is not None and not proto.closed:
                        proto.transport.resume_reading()
                    await proto.readable.wait()
        except TimeoutError:
            self._abort()
            what = "the banner" if verb == "BANNER" else f"the reply to {verb}"
            error = ConnectionFailed(
                f"timeout: {what} did not come from {self.peer} within {timeout:g}s"
            )
            error.no_banner = verb == "BANNER"
            raise error from None
        assert isinstance(reply, Reply)
        for line in reply.render(True).decode("utf-8", "replace").split("\r\n")[:-1]:
            self._say("recv", line)
        if reply.code == 421 and verb != "QUIT":
            self._abort()
            raise ServiceRefused(f"{self.peer} closed the session", reply)
        return reply

    async def _command(self, text: str | None = None) -> Reply:
        """Flush what the connection queued (one command) and await its reply."""
        if text is not None:
            self._sent(text)
        await self._flush(self.timeouts.command)
        return await self._reply()

    def _abort(self) -> None:
        proto = self._proto
        if proto is not None and proto.transport is not None:
            proto.transport.abort()

    def close(self) -> None:
        """Drop the connection at once (no QUIT)."""
        self._abort()

    # ----------------------------------------------------------- connecting

    def _context(self) -> ssl.SSLContext:
        """The trust: the caller's context, or the system's CAs, verifying."""
        if self.ssl_context is None:
            self.ssl_context = client_ssl_context()
        return self.ssl_context

    def _handshake_context(self) -> ssl.SSLContext:
        """The context of the handshake: the trust where the mode verifies, else none."""
        if self.tls_mode in TLS_VERIFIED:
            return self._context()
        if self._unverified is None:
            # RFC 7435 section 1.3: opportunistic security does not authenticate.
            self._unverified = client_ssl_context(verify=False)
        return self._unverified

    def _server_name(self) -> str | None:
        """The name TLS checks the certificate against (a Unix socket has none of its own)."""
        if self.tls_server_name:
            return self.tls_server_name
        return None if self.socket_path is not None else self.host

    def _tls_info(
        self, transport: asyncio.BaseTransport, context: ssl.SSLContext
    ) -> TLSInfo | None:
        return tls_info(
            transport.get_extra_info("ssl_object"),
            verified=context.verify_mode != ssl.CERT_NONE,
            trust=self._context(),
            server_name=self._server_name(),
        )

    async def open(self) -> Reply:
        """Connect (with TLS at once in implicit mode) and read the banner.

        Raises :class:`ConnectionFailed` or, for a banner other than 220,
        :class:`ServiceRefused` (after QUIT when the banner was 554).
        """
        loop = asyncio.get_running_loop()
        self._say("info", f"Trying {self.peer}...")
        implicit = self.tls_mode == "implicit"
        local = (self.source_address, 0) if self.source_address else None
        limit = self.timeouts.connect + (self.timeouts.tls if implicit else 0)
        context = self._handshake_context() if implicit else None
        try:
            async with asyncio.timeout(limit):
                if self.socket_path is not None:
                    transport, proto = await loop.create_unix_connection(
                        lambda: _Protocol(self.conn),
                        self.socket_path,
                        ssl=context,
                        server_hostname=self._server_name() if implicit else None,
                        ssl_handshake_timeout=self.timeouts.tls if implicit else None,
                    )
                else:
                    transport, proto = await loop.create_connection(
                        lambda: _Protocol(self.conn),
                        self.host,
                        self.port,
                        ssl=context,
                        server_hostname=self._server_name() if implicit else None,
                        ssl_handshake_timeout=self.timeouts.tls if implicit else None,
                        local_addr=local,
                    )
        except TimeoutError:
            raise ConnectionFailed(f"timeout connecting to {self.peer}") from None
        except ssl.SSLCertVerificationError as exc:
            raise _untrusted(self.peer, exc) from None
        except ssl.SSLError as exc:
            reason = exc.reason or str(exc)
            if reason == "WRONG_VERSION_NUMBER":
                reason += " (the server does not start with TLS: not an implicit-TLS port?)"
            raise TLSFailed(f"TLS with {self.peer} failed: {reason}", temporary=True) from None
        except ConnectionAbortedError as exc:
            if not implicit:
                raise ConnectionFailed(f"cannot connect to {self.peer}: {exc}") from None
            # asyncio's ssl_handshake_timeout: connected, but no TLS answer.
            raise TLSFailed(
                f"no TLS handshake with {self.peer} within {self.timeouts.tls:g}s"
                " (not an implicit-TLS port?)", temporary=True
            ) from None
        except OSError as exc:
            if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
                reason = exc.strerror or str(exc)
            else:
                reason = os.strerror(exc.errno).lower()  # asyncio's text names no cause
            raise ConnectionFailed(
                f"cannot connect to {self.peer}: {reason or type(exc).__name__}"
            ) from None
        self._proto = proto
        self._say("info", f"Connected to {self.peer}.")
        if implicit and context is not None:
            self.tls = self._tls_info(transport, context)
            self._say_tls()
        banner = await self._reply()
        if banner.code != 220:
            if self.conn.state is ClientState.REFUSED:
                await self.quit()
            self._abort()
            raise ServiceRefused(f"{self.peer} refused the session", banner)
        return banner

    def _say_tls(self) -> None:
        info = self.tls
        if info is None:
            return
        self._say("info", f"TLS started: {info.version}, cipher {info.cipher} ({info.bits} bits)")
        self._say("info", f"TLS peer certificate: {info.subject} ({info.verdict})")

    def _local_name(self) -> str:
        if self.helo_name:
            return self.helo_name
        name = _default_helo_name()
        if name:
            return name
        # RFC 5321 section 4.1.4: without a meaningful name, the address literal.
        proto = self._proto
        transport = proto.transport if proto is not None else None
        sock = transport.get_extra_info("sockname") if transport is not None else None
        ip = str(sock[0]) if sock else "127.0.0.1"
        return _address_literal(ip)

    async def ehlo(self) -> Reply:
        """Send EHLO and return the reply (the extension list is parsed on 250)."""
        name = self._local_name()
        self._greet_call(self.conn.ehlo, name)
        return await self._command(f"EHLO {name}")

    async def helo(self) -> Reply:
        """Send HELO and return the reply."""
        name = self._local_name()
        self._greet_call(self.conn.helo, name)
        return await self._command(f"HELO {name}")

    async def lhlo(self) -> Reply:
        """Send LHLO (an LMTP session, RFC 2033 section 4.1) and return the reply."""
        name = self._local_name()
        self._greet_call(self.conn.lhlo, name)
        return await self._command(f"LHLO {name}")

    def _greet_call(self, send: Callable[[str], None], name: str) -> None:
        try:
            send(name)
        except LocalProtocolError as exc:
            raise ValueError(str(exc)) from None

    async def greet(self) -> Reply:
        """EHLO, falling back to HELO on 500/502; or HELO alone with ``helo_only``.

        In LMTP, LHLO alone: RFC 2033 section 4.1 has no fallback.
        """
        if self.lmtp:
            reply = await self.lhlo()
        elif self.helo_only:
            reply = await self.helo()
        else:
            reply = await self.ehlo()
            if reply.code in (500, 502):
                # RFC 5321 section 3.2: a server without EHLO answers 500 or 502;
                # the client then uses HELO (and no service extensions).
                self._say("info", "EHLO not supported: falling back to HELO")
                reply = await self.helo()
        if reply.code != 250:
            await self._quit_quietly()
            raise ServiceRefused(f"{self.peer} refused the greeting", reply)
        self.greeting = reply
        return reply

    async def starttls(self) -> Reply:
        """STARTTLS, the handshake, then EHLO again (RFC 3207 section 4.2).

        Returns the new EHLO reply. Raises :class:`TLSFailed` when the server
        refuses (the session stays usable in plain text) or the handshake
        fails (the connection is closed).
        """
        self.conn.starttls()
        reply = await self._command("STARTTLS")
        if reply.code != 220:
            raise TLSFailed(f"{self.peer} refused STARTTLS", reply)
        proto = self._proto
        assert proto is not None and proto.transport is not None
        loop = asyncio.get_running_loop()
        context = self._handshake_context()
        try:
            transport = await loop.start_tls(
                proto.transport,
                proto,
                context,
                server_side=False,
                server_hostname=self._server_name(),
                ssl_handshake_timeout=self.timeouts.tls,
            )
        except ssl.SSLCertVerificationError as exc:
            self._abort()
            raise _untrusted(self.peer, exc) from None
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            self._abort()
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            raise TLSFailed(f"TLS handshake with {self.peer} failed: {reason}",
                            temporary=True) from None
        if transport is None:
            raise TLSFailed(f"TLS handshake with {self.peer} failed", temporary=True)
        proto.transport = transport
        self.conn.tls_started()
        self.tls = self._tls_info(transport, context)
        self._say_tls()
        if self.conn.discarded_after_starttls:
            # RFC 3207 section 4.2: nothing sent before the handshake counts;
            # data right after the 220 is a response injection attempt.
            self._abort()
            raise TLSFailed(
                f"{self.peer} sent {self.conn.discarded_after_starttls} octets after its 220"
                " to STARTTLS (response injection?)"
            )
        reply = await (self.lhlo() if self.lmtp else self.ehlo())
        if reply.code != 250:
            await self._quit_quietly()
            verb = "LHLO" if self.lmtp else "EHLO"
            raise ServiceRefused(f"{self.peer} refused {verb} after STARTTLS", reply)
        self.greeting = reply
        return reply

    async def connect(self) -> Reply:
        """Open, greet and apply the TLS mode; returns the last greeting reply."""
        await self.open()
        reply = await self.greet()
        mode = self.tls_mode
        if mode in ("off", "implicit"):
            return reply
        if self.conn.esmtp and "STARTTLS" in self.conn.extensions:
            try:
                return await self.starttls()
            except TLSFailed as exc:
                if mode in TLS_REQUIRED or not self.connected or exc.reply is None:
                    await self._quit_quietly()
                    raise
                # Opportunistic: a refused STARTTLS leaves a usable plain session.
                self._say("info", f"STARTTLS refused, going on without TLS: {exc.reply}")
                return reply
        if mode in TLS_REQUIRED:
            await self._quit_quietly()
            why = "it speaks only HELO" if not self.conn.esmtp else "STARTTLS is not offered"
            raise TLSFailed(f"TLS is required but {self.peer} cannot: {why}")
        return reply

    # ------------------------------------------------------------- AUTH

    async def login(self, user: str, password: str, mechanism: str | None = None) -> Reply:
        """Authenticate (RFC 4954) with SCRAM-SHA-256, PLAIN or LOGIN; returns the 235."""
        if not self.conn.esmtp or "AUTH" not in self.conn.extensions:
            raise AuthFailed(f"{self.peer} does not offer AUTH")
        offered = self.conn.extensions.auth_mechanisms
        if mechanism is not None:
            mech = mechanism.upper()
            if mech not in _MECHANISMS:
                raise AuthFailed(f"AUTH {mech} is not supported by ehlo")
            if mech not in offered:
                raise AuthFailed(f"{self.peer} does not offer AUTH {mech} ({' '.join(offered)})")
        else:
            usable = [m for m in _MECHANISMS if m in offered]
            if not usable:
                raise AuthFailed(
                    f"{self.peer} offers no AUTH mechanism ehlo supports ({' '.join(offered)})"
                )
            mech = usable[0]
        clear = mech in ("PLAIN", "LOGIN") and not self.conn.tls_active
        if clear and not self.allow_plaintext_auth:
            # RFC 4954 section 14: no clear-text passwords without TLS.
            raise AuthFailed(
                f"refusing AUTH {mech} without TLS (the password would travel in clear)"
            )
        try:
            if mech == "PLAIN":
                reply = await self._auth_plain(user, password)
            elif mech == "LOGIN":
                reply = await self._auth_login(user, password)
            else:
                reply = await self._auth_scram(user, password)
        except ValueError as exc:
            raise AuthFailed(f"AUTH {mech}: {exc}") from None
        if reply.code != 235:
            raise AuthFailed(f"{self.peer} refused AUTH {mech}", reply)
        return reply

    async def _auth_plain(self, user: str, password: str) -> Reply:
        # RFC 4616 section 2: message = [authzid] UTF8NUL authcid UTF8NUL passwd
        token = _b64(f"\0{sasl_prepare(user)}\0{sasl_prepare(password)}")
        self.conn.auth("PLAIN", token)
        reply = await self._command("AUTH PLAIN <redacted>")
        if reply.code == 334:  # a server that ignores initial responses asks again
            self.conn.auth_response(token)
            reply = await self._command("<redacted>")
        return reply

    async def _auth_login(self, user: str, password: str) -> Reply:
        self.conn.auth("LOGIN")
        reply = await self._command("AUTH LOGIN")
        for secret in (user, password):
            if reply.code != 334:
                return reply
            self.conn.auth_response(_b64(secret))
            reply = await self._command("<redacted>")
        return reply

    async def _auth_scram(self, user: str, password: str) -> Reply:
        nonce = base64.b64encode(os.urandom(24)).decode("ascii")
        first = scram_client_first(user, nonce)
        self.conn.auth("SCRAM-SHA-256", _b64(first))
        reply = await self._command("AUTH SCRAM-SHA-256 <redacted>")
        if reply.code != 334:
            return reply
        server_first = _unb64(reply).decode("utf-8", "replace")
        try:
            final, expected = scram_client_final(first, server_first, password)
        except ValueError:
            self.conn.auth_response("*")
            await self._command("*")
            raise
        self.conn.auth_response(_b64(final))
        reply = await self._command("<redacted>")
        if reply.code == 334:
            # RFC 4954 section 4: the server-final-message comes as a challenge.
            server_final = _unb64(reply).decode("utf-8", "replace")
            if not server_final.startswith("v=") or not hmac.compare_digest(
                base64.b64decode(server_final[2:] or "=", validate=False), expected
            ):
                self.conn.auth_response("*")
                await self._command("*")
                raise ValueError("the server's SCRAM signature is wrong (not the real server?)")
            self.conn.auth_response("")
            reply = await self._command("")
        return reply

    # --------------------------------------------------------- sending mail

    async def send_message(
        self,
        sender: str,
        recipients: Sequence[str],
        message: Message,
        *,
        size: int | None = None,
        eight_bit: bool | None = None,
        smtputf8: bool | None = None,
        mail_params: Mapping[str, str | None] | None = None,
        rcpt_params: Mapping[str, Mapping[str, str | None]] | None = None,
    ) -> SendResult:
        """One mail transaction; returns per-recipient results.

        Unknown facts (``size``, ``eight_bit``: any octet over 127,
        ``smtputf8``: UTF-8 addresses or headers) are found by reading the
        message once when it is bytes or a seekable file; for an iterator
        they default to unknown size, 7-bit, and UTF-8 only for addresses.
        ``mail_params`` are more MAIL parameters (``RET``, ``ENVID``) and
        ``rcpt_params`` more RCPT parameters per recipient (``NOTIFY``,
        ``ORCPT``), values already encoded (xtext); each needs the extension
        that defines it, and the DSN ones a server that offers DSN
        (:class:`OptionNotSupported` otherwise).
        Raises :class:`SenderRefused`, :class:`RecipientsRefused` (every
        recipient refused), :class:`DataRefused`, :class:`MessageNotSupported`
        or :class:`ConnectionFailed`; after a refusal the session is reset
        with RSET and stays usable. In LMTP a refusal after the data does not
        raise: that recipient is in :attr:`SendResult.failed`.
        """
        rcpts = _dedupe(recipients)
        if not rcpts:
            raise ValueError("no recipients")
        self._check_params(rcpts, mail_params, rcpt_params)
        scan = scan_message(message, self.chunk_size)
        if scan is not None:
            size = scan.size if size is None else size
            eight_bit = scan.eight_bit if eight_bit is None else eight_bit
        utf8_addresses = not sender.isascii() or any(not r.isascii() for r in rcpts)
        if smtputf8 is None:
            smtputf8 = utf8_addresses or (scan is not None and scan.utf8_headers)
        chunked = self._check_message(scan, size, bool(eight_bit), smtputf8)
        params: dict[str, str | None] = {}
        ext = self.conn.extensions
        if size is not None and "SIZE" in ext:
            params["SIZE"] = str(size)  # RFC 1870 section 6: declare the size
        if (eight_bit or smtputf8) and "8BITMIME" in ext:
            params["BODY"] = "8BITMIME"  # RFC 6152 section 3
        if smtputf8:
            params["SMTPUTF8"] = None  # RFC 6531 section 3.4
        for key, value in (mail_params or {}).items():
            if key.upper() in params:
                raise ValueError(f"MAIL parameter {key} is set by send_message itself")
            params[key] = value
        pipelined = self.use_pipelining and self.conn.pipelining
        try:
            return await self._transaction(
                sender, rcpts, params, rcpt_params or {}, message, pipelined, chunked
            )
        except LocalProtocolError as exc:
            raise ValueError(str(exc)) from None

    def _check_params(
        self,
        rcpts: list[str],
        mail_params: Mapping[str, str | None] | None,
        rcpt_params: Mapping[str, Mapping[str, str | None]] | None,
    ) -> None:
        """Refuse, before any transaction, DSN parameters to a server without DSN."""
        unknown = [r for r in rcpt_params or {} if r not in rcpts]
        if unknown:
            raise ValueError(f"rcpt_params names <{unknown[0]}>, which is not a recipient")
        used = sorted(
            {k.upper() for k in mail_params or {}} & _DSN_MAIL_PARAMS
            | {k.upper() for p in (rcpt_params or {}).values() for k in p} & _DSN_RCPT_PARAMS
        )
        if used and not (self.conn.esmtp and "DSN" in self.conn.extensions):
            # RFC 3461 section 4: the DSN parameters go only to a server that
            # offers DSN in its EHLO reply.
            raise OptionNotSupported(
                f"{' and '.join(used)} need DSN (RFC 3461) and {self.peer} does not offer it"
            )

    def _check_message(
        self, scan: BodyScan | None, size: int | None, eight_bit: bool, smtputf8: bool
    ) -> bool:
        """Refuse, before any transaction, what this server cannot take; choose BDAT."""
        ext = self.conn.extensions if self.conn.esmtp else ServerExtensions()
        if smtputf8 and "SMTPUTF8" not in ext:
            raise MessageNotSupported(
                f"the message needs SMTPUTF8 (UTF-8 addresses or headers, RFC 6531)"
                f" and {self.peer} does not offer it"
            )
        if eight_bit and "8BITMIME" not in ext:
            raise MessageNotSupported(
                f"the message has 8-bit data and {self.peer} does not offer 8BITMIME (RFC 6152)"
            )
        limit = ext.size
        if limit and size is not None and size > limit:
            # RFC 1870 section 6.1: do not send what exceeds the declared maximum.
            raise MessageNotSupported(
                f"the message is {size} octets and {self.peer} takes at most {limit} (SIZE)"
            )
        if scan is not None and scan.longest_line > MAX_TEXT_LINE:
            # RFC 5321 section 4.5.3.1.6: text lines are at most 998 octets + CRLF.
            raise MessageNotSupported(
                f"the message has a line of {scan.longest_line} octets; SMTP allows 998"
            )
        offered = "CHUNKING" in ext
        if self.chunking is True and not offered:
            # RFC 3030 section 2: BDAT only to a server that offers CHUNKING.
            raise OptionNotSupported(
                f"BDAT was asked for but {self.peer} does not offer CHUNKING (RFC 3030)"
            )
        return offered if self.chunking is None else self.chunking

    async def _transaction(
        self,
        sender: str,
        rcpts: list[str],
        params: dict[str, str | None],
        rcpt_params: Mapping[str, Mapping[str, str | None]],
        message: Message,
        pipelined: bool,
        chunked: bool,
    ) -> SendResult:
        conn = self.conn
        accepted: dict[str, Reply] = {}
        refused: dict[str, Reply] = {}
        mail_line = f"MAIL FROM:<{sender}>{_param_text(params)}"
        data_reply: Reply | None = None
        if pipelined:
            # RFC 2920 section 3.1: MAIL, every RCPT and DATA in one write.
            conn.mail(sender, params)
            self._sent(mail_line)
            for rcpt in rcpts:
                conn.rcpt(rcpt, rcpt_params.get(rcpt))
                self._sent(f"RCPT TO:<{rcpt}>{_param_text(rcpt_params.get(rcpt))}")
            if not chunked:
                conn.data()
                self._sent("DATA")
            await self._flush(self.timeouts.mail)
            mail_reply = await self._reply()
            for rcpt in rcpts:
                reply = await self._reply()
                (accepted if reply.code in (250, 251) else refused)[rcpt] = reply
            if not chunked:
                data_reply = await self._reply()
            if not mail_reply.is_positive or not accepted:
                if data_reply is not None and data_reply.code == 354:
                    # RFC 2920 section 3.1: DATA accepted anyway: end it with a lone dot.
                    conn.end_data()
                    await self._command("[no message data]")
                await self._reset()
                if not mail_reply.is_positive:
                    raise SenderRefused(f"{self.peer} refused the sender <{sender}>", mail_reply)
                raise RecipientsRefused(refused)
        else:
            conn.mail(sender, params)
            mail_reply = await self._command(mail_line)
            if not mail_reply.is_positive:
                await self._reset()
                raise SenderRefused(f"{self.peer} refused the sender <{sender}>", mail_reply)
            for rcpt in rcpts:
                conn.rcpt(rcpt, rcpt_params.get(rcpt))
                reply = await self._command(
                    f"RCPT TO:<{rcpt}>{_param_text(rcpt_params.get(rcpt))}"
                )
                (accepted if reply.code in (250, 251) else refused)[rcpt] = reply
            if not accepted:
                await self._reset()
                raise RecipientsRefused(refused)
            if not chunked:
                conn.data()
                data_reply = await self._command("DATA")
        if chunked:
            final, sent = await self._send_bdat(message)
        else:
            assert data_reply is not None
            if data_reply.code != 354:
                await self._reset()
                raise DataRefused(f"{self.peer} refused DATA", data_reply)
            final, sent = await self._send_data(message)
        if self.lmtp:
            # RFC 2033 section 4.2: after the data, one reply per recipient
            # accepted at RCPT, in the order of the RCPT commands.
            finals = [final]
            try:
                while len(finals) < len(accepted):
                    finals.append(await self._reply())
            except SMTPClientError as exc:
                # Those answered already are final: delivered must not be sent again.
                exc.delivered, exc.failed = _split(zip(accepted, finals, strict=False))
                raise
            delivered, failed = _split(zip(accepted, finals, strict=True))
            return SendResult(
                mail_reply, accepted, refused, final, sent, chunked, self.tls, delivered, failed
            )
        if not final.is_positive:
            raise DataRefused(f"{self.peer} refused the message", final)
        # RFC 5321 section 4.1.1.4: one reply after the data for every recipient.
        return SendResult(
            mail_reply, accepted, refused, final, sent, chunked, self.tls,
            dict.fromkeys(accepted, final),
        )

    async def _send_data(self, message: Message) -> tuple[Reply, int]:
        sent = 0
        async for chunk in message_chunks(message, self.chunk_size):
            self.conn.send_data(chunk)
            sent += len(chunk)
            await self._flush()
        self.conn.end_data()
        self._sent(f"[{sent} octets of message data, dot-stuffed]")
        self._sent(".")
        await self._flush()
        return await self._reply(), sent

    async def _send_bdat(self, message: Message) -> tuple[Reply, int]:
        sent = 0
        async for chunk, last in with_last(message_chunks(message, self.chunk_size)):
            size = self.conn.bdat(chunk, last)
            sent += len(chunk)
            self._sent(f"BDAT {size}{' LAST' if last else ''}  [{size} octets of message data]")
            await self._flush()
            reply = await self._reply()
            if not reply.is_positive:
                if not last:
                    await self._reset()
                    raise DataRefused(f"{self.peer} refused a BDAT chunk", reply)
                return reply, sent
            if last:
                return reply, sent
        raise AssertionError("unreachable: with_last always ends with a last chunk")

    async def _reset(self) -> None:
        """RSET after a refusal, so the session can carry another transaction."""
        if not self.connected or self.conn.state is ClientState.CLOSED:
            return
        with contextlib.suppress(SMTPClientError, LocalProtocolError):
            self.conn.rset()
            await self._command("RSET")

    # ----------------------------------------------------------------- end

    async def quit(self) -> Reply | None:
        """QUIT and close; the reply (None when the connection was already gone)."""
        reply: Reply | None = None
        if self.connected and self.conn.state is not ClientState.CLOSED:
            with contextlib.suppress(SMTPClientError, LocalProtocolError):
                self.conn.quit()
                self._sent("QUIT")
                await self._flush(self.timeouts.command)
                reply = await self._reply()
        self._close_transport()
        return reply

    async def _quit_quietly(self) -> None:
        with contextlib.suppress(SMTPClientError):
            await self.quit()

    def _close_transport(self) -> None:
        proto = self._proto
        if proto is not None and proto.transport is not None and not proto.closed:
            proto.transport.close()
        if proto is not None and proto.transport is not None:
            # Closing a TLS transport may wait for the peer; do not linger.
            loop = asyncio.get_running_loop()
            transport = proto.transport
            loop.call_later(1.0, transport.abort)

    async def __aenter__(self) -> SMTPClient:
        try:
            await self.connect()
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is None:
            await self.quit()
        else:
            await self._quit_quietly()
            self.close()
