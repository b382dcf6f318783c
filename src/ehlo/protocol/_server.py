"""The server side of an SMTP connection, without any I/O.

Bytes go in with :meth:`ServerConnection.receive_data`; events come out of
:meth:`ServerConnection.next_event`; replies go in with
:meth:`ServerConnection.send`; bytes come out of
:meth:`ServerConnection.data_to_send`. One command at a time awaits its reply:
until it is sent, ``next_event`` answers ``PAUSED`` and later (pipelined)
commands wait in the buffer, so replies always leave in order.

The connection answers protocol faults itself (500, 501, 502, 503, 555,
lines too long, bodies too large, too many errors) and reports each as a
:class:`Fault` event. Everything else is the session's decision.

A :data:`Recorder` set as :attr:`ServerConnection.recorder` is told every
command line read (``"C"``) and every reply queued (``"S"``, the rendered
bytes), in order, with message bodies and AUTH secrets replaced by events
(``"*"``): the core is where lines are told apart from data. It keeps no
clock; the recorder stamps the lines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ._errors import LocalProtocolError
from ._events import (
    NEED_DATA,
    PAUSED,
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
    Rset,
    StartTls,
    Vrfy,
    _Sentinel,
)
from ._extension import Extension, SessionFacts
from ._limits import ProtocolLimits
from ._reply import Reply
from ._state import IN_TRANSACTION, State, Transaction, sequence_error
from ._syntax import (
    SyntaxProblem,
    _shown,
    is_printable_utf8,
    parse_params,
    parse_path,
    split_path,
)

# Verbs of RFC 5321 and common extensions that ehlo recognises but does not
# implement: 502 rather than 500 (RFC 5321 section 4.2.4).
_NOT_IMPLEMENTED = frozenset(
    {"EXPN", "TURN", "ETRN", "ATRN", "SEND", "SOML", "SAML", "XCLIENT", "XFORWARD"}
)
# Extra room on MAIL/RCPT lines for ESMTP parameters (RFC 5321 section
# 4.5.3.1.4 lets each extension raise the 512-octet limit).
_PARAM_ALLOWANCE = 512
# RFC 2920 section 3.1: these commands change state in ways the client must
# see first, so each may only end a group of pipelined commands.
_ENDS_GROUP = frozenset(
    {"HELO", "EHLO", "DATA", "VRFY", "EXPN", "TURN", "NOOP", "STARTTLS", "AUTH"}
)
# RFC 4954 section 4: AUTH command lines (with an initial response) and the
# client's SASL response lines may be up to 12288 octets.
_AUTH_LINE = 12288
# A partial DATA line longer than this is streamed out before its CRLF arrives.
_PARTIAL_FLUSH = 64 * 1024

_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
_UNRECOGNIZED = Reply(500, "5.5.2", "Command unrecognized")
_BAD_CHARS = Reply(500, "5.5.2", "Command contains invalid characters")
_BAD_UTF8 = Reply(500, "5.5.2", "Command is not valid UTF-8")
_TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing the connection")
_TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
_NON_ASCII = Reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
_TOO_LARGE = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
_BARE_NEWLINE = Reply(554, "5.6.0", "Message contains a bare CR or LF; lines must end with CRLF")
_TEXT_LINE_TOO_LONG = Reply(554, "5.6.0", "Message contains a line longer than allowed")
_NUL = Reply(554, "5.6.0", "Message contains a NUL octet")
# Which body problem the reply names when there are several.
_BODY_ERROR_RANK = {_TOO_LARGE: 0, _BARE_NEWLINE: 1, _NUL: 2, _TEXT_LINE_TOO_LONG: 3}
_TLS_ACTIVE = Reply(503, "5.5.1", "TLS is already active")
_EHLO_FIRST = Reply(503, "5.5.1", "Send EHLO first")
_AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
_AUTH_TWICE = Reply(503, "5.5.1", "Already authenticated")
_AUTH_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication type")
_AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")


# Told each line of the dialogue: ("C", command line), ("S", rendered reply
# bytes, one or more lines) or ("*", an event: elided data, an AUTH secret).
Recorder = Callable[[str, str | bytes], None]
_SECRET = "AUTH secret elided"


def _elided(size: int) -> str:
    return f"message data elided: {size} octets"


def _shown_line(raw: bytes) -> str:
    """A command line that could not be read, as text (control octets escaped)."""
    text = raw[:1024].decode("utf-8", "backslashreplace")
    return text.replace("\r", "\\r").replace("\x00", "\\x00")


_PLAIN_FACTS = SessionFacts(tls_active=False)
_TLS_FACTS = SessionFacts(tls_active=True)


class _Offer:
    """What a set of offered extensions means for the session (computed once per set)."""

    __slots__ = (
        "enhanced",
        "mail_params",
        "mechanisms",
        "pipelining",
        "rcpt_params",
        "utf8",
        "verbs",
    )

    def __init__(self, offered: tuple[Extension, ...]) -> None:
        verbs: set[str] = set()
        mail: dict[str, Extension] = {}
        rcpt: dict[str, Extension] = {}
        for ext in offered:
            verbs |= ext.verbs
            mail.update(dict.fromkeys(ext.mail_params, ext))
            rcpt.update(dict.fromkeys(ext.rcpt_params, ext))
        self.verbs = frozenset(verbs)
        self.mail_params = mail  # shared by the sessions: read only
        self.rcpt_params = rcpt
        # RFC 2034 section 3: enhanced codes once the extension was offered.
        self.enhanced = any(ext.enables_enhanced_codes for ext in offered)
        self.pipelining = any(ext.enables_pipelining for ext in offered)
        self.utf8 = any(ext.enables_utf8 for ext in offered)
        self.mechanisms = frozenset(m for ext in offered for m in ext.mechanisms)


# Offered extension sets seen so far (a server has a handful: with and without TLS, AUTH).
_OFFERS: dict[tuple[Extension, ...], _Offer] = {}


def _take(buf: bytearray, size: int, consumed: int | None = None) -> bytes:
    """The first ``size`` octets of ``buf`` as bytes (one copy), then drop ``consumed``."""
    data = bytes(memoryview(buf)[:size])  # a plain slice of a bytearray would copy twice
    del buf[: size if consumed is None else consumed]
    return data


def _no_args(verb: str) -> Reply:
    return Reply(501, "5.5.4", f"Syntax: {verb} takes no arguments")


def _not_offered(verb: str) -> Reply:
    return Reply(502, "5.5.1", f"{verb} is not offered in this session")


class ServerConnection:
    """One SMTP server session as a pure state machine (see module docstring)."""

    __slots__ = (
        "_at_line_start",
        "_bdat_last",
        "_bdat_refusal",
        "_bdat_remaining",
        "_bdat_return",
        "_body_error",
        "_body_reason",
        "_buf",
        "_data_ended",
        "_discard_line",
        "_enhanced",
        "_extensions",
        "_line_len",
        "_mail_params",
        "_mechanisms",
        "_out",
        "_pending",
        "_pipelining",
        "_proposed",
        "_rcpt_params",
        "_utf8",
        "_verbs",
        "authenticated",
        "discarded_after_starttls",
        "errors",
        "greeting",
        "greeting_name",
        "limits",
        "pipelining_violation",
        "recorder",
        "state",
        "tls_active",
        "transaction",
    )

    def __init__(
        self, limits: ProtocolLimits | None = None, extensions: Sequence[Extension] = ()
    ) -> None:
        """``extensions``: those the server may offer (``ehlo.extensions.build_extensions``).

        Without any, the connection speaks plain RFC 5321: EHLO lists nothing.
        """
        self.limits = limits if limits is not None else ProtocolLimits()
        self._extensions = tuple(extensions)
        self.state = State.START
        self.greeting: str | None = None  # "HELO" or "EHLO" once answered 250
        self.greeting_name: str | None = None
        self.tls_active = False
        self.authenticated = False  # 235 sent to an AUTH exchange (RFC 4954)
        self.transaction: Transaction | None = None
        self.errors = 0  # 5xx replies sent
        # The first command a client sent without waiting for its reply where
        # RFC 2920 does not allow it (no PIPELINING offered, or a command that
        # must end a group); None while the client behaves.
        self.pipelining_violation: str | None = None
        self.discarded_after_starttls = 0  # octets dropped after 220 to STARTTLS
        self.recorder: Recorder | None = None  # told the dialogue's lines (a transcript)
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._pending: Command | None = None
        self._proposed: Transaction | None = None
        self._enhanced = False
        self._verbs: frozenset[str] = frozenset()
        self._pipelining = False
        self._mail_params: dict[str, Extension] = {}
        self._mechanisms: frozenset[str] = frozenset()
        self._rcpt_params: dict[str, Extension] = {}
        self._utf8 = False
        self._discard_line = False
        # DATA / BDAT readers
        self._at_line_start = True
        self._line_len = 0
        self._body_error: Reply | None = None
        self._body_reason = ""
        self._data_ended = False
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_refusal: Reply | None = None
        self._bdat_return: State = State.GREETED

    # ------------------------------------------------------------------ output

    def data_to_send(self) -> bytes:
        """All replies queued since the last call, as one string of bytes."""
        if not self._out:
            return b""
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        return data

    @property
    def closing(self) -> bool:
        """True once 221 or 421 was queued: flush, then close the connection."""
        return self.state is State.CLOSED

    @property
    def awaiting_reply(self) -> Command | None:
        """The command that awaits a reply, if any."""
        return self._pending

    @property
    def enhanced(self) -> bool:
        """True once enhanced status codes were offered in this session (RFC 2034)."""
        return self._enhanced

    @property
    def esmtp(self) -> bool:
        """True in a session opened by EHLO."""
        return self.greeting == "EHLO"

    def offered_extensions(self) -> tuple[Extension, ...]:
        """The extensions an EHLO reply would advertise now."""
        facts = _TLS_FACTS if self.tls_active else _PLAIN_FACTS
        return tuple([ext for ext in self._extensions if ext.offered(facts)])

    def extension_lines(self) -> list[str]:
        """The extension lines of the EHLO reply (after the greeting line)."""
        return [ext.ehlo_line() for ext in self.offered_extensions()]

    def send(self, reply: Reply) -> None:
        """Answer the banner or the command awaiting a reply; advance the state."""
        state = self.state
        if state is State.CLOSED:
            raise LocalProtocolError("the connection is closed")
        pending = self._pending
        if pending is None:
            if state is not State.START:
                raise LocalProtocolError("no command awaits a reply")
            data = reply.render(False)
            self._out.append(data)
            if self.recorder is not None:
                self.recorder("S", data)
            if reply.code == 220:
                self.state = State.CONNECTED
            elif reply.code == 554:
                # RFC 5321 section 3.1: after a 554 banner, wait for QUIT.
                self.state = State.REFUSED
            else:
                self.state = State.CLOSED
            return
        self._pending = None
        is_greeting = type(pending) is Ehlo or type(pending) is Helo
        data = reply.render(self._enhanced and not is_greeting)
        self._out.append(data)
        if self.recorder is not None:
            self.recorder("S", data)
        code = reply.code
        if code == 421:
            # RFC 5321 section 3.8: 421 closes the transmission channel.
            self.state = State.CLOSED
            return
        if code >= 500:
            self.errors += 1
        positive = code < 400
        kind = type(pending)
        if kind is DataEnd:
            assert isinstance(pending, DataEnd)
            if positive and not pending.last:
                self.state = State.CHUNKING
            else:
                self.transaction = None
                self.state = State.GREETED
        elif kind is Mail:
            if positive:
                self.transaction = self._proposed
                self.state = State.MAIL
            self._proposed = None
        elif kind is Rcpt:
            if positive:
                assert isinstance(pending, Rcpt) and self.transaction is not None
                self.transaction.rcpts.append(pending.address)
                self.transaction.rcpt_params.append(pending.params)
                self.state = State.RCPT
        elif kind is Data:
            if code == 354:
                self._start_body()
                self.state = State.DATA
        elif is_greeting:
            if positive:
                assert isinstance(pending, (Helo, Ehlo))
                self._greet(pending)
        elif kind is Rset:
            if positive:
                self.transaction = None
                if self.state is not State.REFUSED:
                    self.state = State.GREETED if self.greeting else State.CONNECTED
        elif kind is Quit:
            if positive:
                self.state = State.CLOSED
        elif kind is Auth or kind is AuthResponse:
            if code == 334:
                # RFC 4954 section 4: the next line is a response, not a command.
                self.state = State.AUTH
            else:
                if code == 235:
                    self.authenticated = True
                self.state = State.GREETED
        elif kind is StartTls and code == 220:
            # RFC 3207 section 4.2 / CVE-2011-0411: nothing sent before the
            # handshake may be acted on after it.
            self.discarded_after_starttls += len(self._buf)
            self._buf.clear()
            self.state = State.TLS_PENDING
        if self.errors >= self.limits.max_errors > 0 and self.state is not State.CLOSED:
            self._emit(_TOO_MANY_ERRORS.render(self._enhanced))
            self.state = State.CLOSED

    def _emit(self, data: bytes) -> None:
        """Queue a reply the connection sends by itself (and record it)."""
        self._out.append(data)
        if self.recorder is not None:
            self.recorder("S", data)

    # ------------------------------------------------------------------- input

    def receive_data(self, data: bytes) -> None:
        """Add received bytes. Ignored once closed; dropped while TLS is pending."""
        if self.state is State.CLOSED:
            return
        if self.state is State.TLS_PENDING:
            self.discarded_after_starttls += len(data)
            return
        if self._discard_line:
            # Still inside an over-long command line: drop up to its end.
            nl = data.find(b"\n")
            if nl < 0:
                return
            self._discard_line = False
            data = data[nl + 1 :]
        self._buf += data

    @property
    def buffered(self) -> int:
        """Octets received but not yet turned into events."""
        return len(self._buf)

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS succeeded: forget the greeting.

        RFC 3207 section 4.2: the server discards knowledge obtained from the
        client before TLS; the client must greet again.
        """
        if self.state is not State.TLS_PENDING:
            raise LocalProtocolError("tls_started() without a 220 to STARTTLS")
        self.tls_active = True
        self.authenticated = False
        self.greeting = None
        self.greeting_name = None
        self.transaction = None
        self._set_offered(())
        self._buf.clear()
        self.state = State.CONNECTED

    def next_event(self) -> Event | _Sentinel:
        """The next event, ``NEED_DATA`` or ``PAUSED`` (see module docstring)."""
        if self._pending is not None:
            return PAUSED
        state = self.state
        if state is State.DATA:
            return self._next_data()
        if state is State.BDAT:
            return self._next_bdat()
        if state is State.AUTH:
            return self._next_auth_response()
        if state is State.START or state is State.CLOSED or state is State.TLS_PENDING:
            return PAUSED
        return self._next_command()

    # ---------------------------------------------------------------- commands

    def _fault(
        self, reply: Reply, reason: str, verb: str = "", aborted: bool = False, size: int = 0
    ) -> Fault:
        self._emit(reply.render(self._enhanced))
        if reply.code >= 500:
            self.errors += 1
        closing = False
        if self.errors >= self.limits.max_errors > 0:
            self._emit(_TOO_MANY_ERRORS.render(self._enhanced))
            self.state = State.CLOSED
            closing = True
        return Fault(reply, reason, verb, aborted, closing, size)

    def _next_command(self) -> Event | _Sentinel:
        buf = self._buf
        if not buf:
            return NEED_DATA  # the usual case right after a reply
        nl = buf.find(b"\n")
        limit = self.limits.max_command_line
        allowed = limit + (_PARAM_ALLOWANCE if self.greeting == "EHLO" else 0)
        if "AUTH" in self._verbs and buf[:5].upper() == b"AUTH ":
            allowed = max(allowed, _AUTH_LINE)
        if nl < 0:
            if len(buf) >= allowed:
                # RFC 5321 section 4.5.3.1.4: the line cannot fit; answer now
                # and drop the rest of it as it arrives.
                if self.recorder is not None:
                    self.recorder("*", f"command line too long: {len(buf)} octets and more")
                buf.clear()
                self._discard_line = True
                return self._fault(_LINE_TOO_LONG, "command line too long")
            return NEED_DATA
        raw = _take(buf, nl, nl + 1)
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        length = len(raw) + 2
        if length > allowed:
            if self.recorder is not None:
                self.recorder("*", f"command line too long: {length} octets")
            return self._fault(_LINE_TOO_LONG, "command line too long")
        if b"\r" in raw or b"\x00" in raw:
            if self.recorder is not None:
                self.recorder("C", _shown_line(raw))
            return self._fault(_BAD_CHARS, "CR or NUL inside a command line")
        try:
            line = raw.decode("ascii")
        except UnicodeDecodeError:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                if self.recorder is not None:
                    self.recorder("C", _shown_line(raw))
                return self._fault(_BAD_UTF8, "invalid UTF-8 in a command line")
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if self.recorder is not None:
            if verb == "AUTH" and " " in arg.strip(" \t"):
                # The initial response is a secret (RFC 4954 section 4): the
                # mechanism is kept, the response elided.
                self.recorder("C", f"{verb} {arg.split(' ', 1)[0]}")
                self.recorder("*", _SECRET)
            else:
                self.recorder("C", line)
        if length > limit and verb not in ("MAIL", "RCPT", "AUTH"):
            return self._fault(_LINE_TOO_LONG, "command line too long", verb)
        refusal = sequence_error(verb, self.state)
        if refusal is not None:
            if verb == "BDAT":
                return self._bdat_refused(arg, refusal)
            return self._fault(refusal, "command out of sequence", verb[:20])
        if (
            buf
            and self.pipelining_violation is None
            and verb != "QUIT"
            and verb != "BDAT"
            and (verb in _ENDS_GROUP or not self._pipelining)
        ):
            # More input already behind this command: the client did not wait.
            self.pipelining_violation = verb[:20]
        handler = _HANDLERS.get(verb)
        if handler is None:
            if verb in _NOT_IMPLEMENTED:
                return self._fault(_not_offered(verb), "command not implemented", verb)
            return self._fault(_UNRECOGNIZED, "unknown command", verb[:20])
        try:
            return handler(self, arg.rstrip(" \t"))
        except SyntaxProblem as problem:
            return self._fault(problem.reply, "syntax error", verb)

    def _greeting_name(self, verb: str, arg: str) -> str:
        # RFC 5321 section 4.1.1.1: "EHLO" SP ( Domain / address-literal ).
        # The name's validity is a policy question (greeting checks); the core
        # only needs one printable token.
        if not arg:
            raise SyntaxProblem(Reply(501, "5.5.4", f"Syntax: {verb} hostname"))
        if " " in arg or "\t" in arg:
            raise SyntaxProblem(Reply(501, "5.5.4", f"Syntax: {verb} hostname (one word)"))
        # (An ASCII name without space is printable exactly when it has no control
        # octet.) Unicode line separators (U+0085, U+2028, U+2029) and other
        # non-printing characters would end or hide lines in headers and logs.
        if (
            not arg.isprintable()
            if arg.isascii()
            else any(
                ord(c) < 33 or ord(c) == 127 or (ord(c) >= 0x80 and not is_printable_utf8(c))
                for c in arg
            )
        ):
            raise SyntaxProblem(
                Reply(501, "5.5.4", f"{verb} name contains non-printing or control characters")
            )
        if not arg.isascii() and (verb == "HELO" or not self._smtputf8_available()):
            raise SyntaxProblem(Reply(501, "5.5.4", f"{verb} name must be ASCII"))
        return arg

    def _smtputf8_available(self) -> bool:
        return any(ext.enables_utf8 for ext in self.offered_extensions())

    def _on_helo(self, arg: str) -> Event:
        self._pending = Helo(self._greeting_name("HELO", arg))
        return self._pending

    def _on_ehlo(self, arg: str) -> Event:
        self._pending = Ehlo(self._greeting_name("EHLO", arg))
        return self._pending

    def _greet(self, command: Helo | Ehlo) -> None:
        self.transaction = None
        self.greeting = command.verb
        self.greeting_name = command.name
        if self.state is not State.REFUSED:
            self.state = State.GREETED
        self._set_offered(self.offered_extensions() if command.verb == "EHLO" else ())

    def _set_offered(self, offered: tuple[Extension, ...]) -> None:
        offer = _OFFERS.get(offered)
        if offer is None:
            if len(_OFFERS) >= 256:
                _OFFERS.clear()  # servers built and dropped (tests, embedders): stay bounded
            offer = _OFFERS[offered] = _Offer(offered)
        self._verbs = offer.verbs
        self._mail_params = offer.mail_params
        self._rcpt_params = offer.rcpt_params
        self._enhanced = offer.enhanced
        self._pipelining = offer.pipelining
        self._utf8 = offer.utf8
        self._mechanisms = offer.mechanisms

    @staticmethod
    def _apply_params(
        verb: str, params: dict[str, str | None], owners: dict[str, Extension], tx: Transaction
    ) -> None:
        """Let the extension owning each parameter check and record it."""
        for name, value in params.items():
            owner = owners.get(name)
            if owner is None:
                # RFC 5321 section 4.1.1.11: 555 for unrecognised parameters.
                raise SyntaxProblem(
                    Reply(555, "5.5.4", f"{verb} parameter {_shown(name)} not recognized")
                )
            if verb == "MAIL FROM":
                refusal = owner.mail_param(name, value, tx)
            else:
                refusal = owner.rcpt_param(name, value, tx)
            if refusal is not None:
                raise SyntaxProblem(refusal)

    def _on_mail(self, arg: str) -> Event:
        path_text, param_text = split_path(arg, "FROM:")
        params = parse_params(param_text, utf8=self._utf8)
        tx = Transaction("", params)
        self._apply_params("MAIL FROM", params, self._mail_params, tx)
        if not path_text.isascii() and not tx.smtputf8:
            # RFC 6531 section 3.6: non-ASCII needs SMTPUTF8 on MAIL.
            raise SyntaxProblem(_NON_ASCII)
        tx.mail_from = parse_path(path_text, sender=True, utf8=tx.smtputf8)
        self._proposed = tx
        self._pending = Mail(tx.mail_from, params)
        return self._pending

    def _on_rcpt(self, arg: str) -> Event:
        tx = self.transaction
        assert tx is not None
        if len(tx.rcpts) >= self.limits.max_recipients:
            # RFC 5321 section 4.5.3.1.10: 452 when the recipient limit is reached.
            return self._fault(_TOO_MANY_RCPTS, "too many recipients", "RCPT")
        path_text, param_text = split_path(arg, "TO:")
        params = parse_params(param_text, utf8=tx.smtputf8)
        self._apply_params("RCPT TO", params, self._rcpt_params, tx)
        if not path_text.isascii() and not tx.smtputf8:
            raise SyntaxProblem(_NON_ASCII)
        address = parse_path(path_text, sender=False, utf8=tx.smtputf8)
        self._pending = Rcpt(address, params)
        return self._pending

    def _on_data(self, arg: str) -> Event:
        if arg:
            return self._fault(_no_args("DATA"), "syntax error", "DATA")
        self._pending = Data()
        return self._pending

    def _parse_bdat(self, arg: str) -> tuple[int, bool]:
        # RFC 3030 section 2: bdat-cmd ::= "BDAT" SP chunk-size [ SP end-marker ] CR LF
        parts = arg.split(" ")
        if not parts[0].isascii() or not parts[0].isdigit() or len(parts[0]) > 20:
            raise SyntaxProblem(Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]"))
        if len(parts) > 2 or (len(parts) == 2 and parts[1].upper() != "LAST"):
            raise SyntaxProblem(Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]"))
        return int(parts[0]), len(parts) == 2

    def _bdat_refused(self, arg: str, refusal: Reply) -> Event | _Sentinel:
        if "BDAT" not in self._verbs:
            return self._fault(_not_offered("BDAT"), "command not offered", "BDAT")
        try:
            size, _last = self._parse_bdat(arg)
        except SyntaxProblem as problem:
            return self._fault(problem.reply, "syntax error", "BDAT")
        # RFC 3030 section 2: the chunk is read and discarded even when refused.
        if self.recorder is not None:
            self.recorder("*", _elided(size))
        self._bdat_refusal = refusal
        self._bdat_return = self.state
        self._bdat_remaining = size
        self._bdat_last = False
        self._body_error = None
        self.state = State.BDAT
        return self._next_bdat()

    def _on_bdat(self, arg: str) -> Event | _Sentinel:
        if "BDAT" not in self._verbs:
            return self._fault(_not_offered("BDAT"), "command not offered", "BDAT")
        size, last = self._parse_bdat(arg)
        tx = self.transaction
        assert tx is not None
        first = not tx.chunked
        tx.chunked = True
        if first:
            self._body_error = None
        self._bdat_refusal = None
        self._bdat_remaining = size
        self._bdat_last = last
        self.state = State.BDAT
        if self.recorder is not None:
            self.recorder("*", _elided(size))
        return Bdat(size, last, first)

    def _on_rset(self, arg: str) -> Event:
        if arg:
            return self._fault(_no_args("RSET"), "syntax error", "RSET")
        self._pending = Rset()
        return self._pending

    def _on_noop(self, arg: str) -> Event:
        # RFC 5321 section 4.1.1.9: an argument is allowed and ignored.
        self._pending = Noop()
        return self._pending

    def _on_quit(self, arg: str) -> Event:
        if arg:
            return self._fault(_no_args("QUIT"), "syntax error", "QUIT")
        self._pending = Quit()
        return self._pending

    def _on_vrfy(self, arg: str) -> Event:
        if not arg:
            return self._fault(Reply(501, "5.5.4", "Syntax: VRFY address"), "syntax error", "VRFY")
        self._pending = Vrfy(arg)
        return self._pending

    def _on_help(self, arg: str) -> Event:
        self._pending = Help(arg)
        return self._pending

    def _on_auth(self, arg: str) -> Event:
        if "AUTH" not in self._verbs:
            if (
                self.greeting == "EHLO"
                and not self.tls_active
                and any("AUTH" in ext.verbs and ext.offered(_TLS_FACTS) for ext in self._extensions)
            ):
                # RFC 4954 section 6: 538 when the mechanism needs encryption.
                return self._fault(_AUTH_NEEDS_TLS, "AUTH before TLS", "AUTH")
            return self._fault(_not_offered("AUTH"), "command not offered", "AUTH")
        if self.authenticated:
            # RFC 4954 section 4: no AUTH after a successful one.
            return self._fault(_AUTH_TWICE, "AUTH after authentication", "AUTH")
        parts = arg.split(" ")
        mechanism = parts[0].upper()
        if not mechanism or len(parts) > 2 or (len(parts) == 2 and not parts[1]):
            return self._fault(_AUTH_SYNTAX, "syntax error", "AUTH")
        if mechanism not in self._mechanisms:
            # RFC 4954 section 4: 504 for a mechanism the server does not support.
            return self._fault(_AUTH_UNKNOWN, "unknown AUTH mechanism", "AUTH")
        self._pending = Auth(mechanism, parts[1] if len(parts) == 2 else None)
        return self._pending

    def _next_auth_response(self) -> Event | _Sentinel:
        """One SASL response line after a 334 (RFC 4954 section 4)."""
        buf = self._buf
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) >= _AUTH_LINE:
                buf.clear()
                self._discard_line = True
                self.state = State.GREETED
                return self._fault(_LINE_TOO_LONG, "AUTH response too long", "AUTH")
            return NEED_DATA
        raw = _take(buf, nl, nl + 1)
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if len(raw) + 2 > _AUTH_LINE:
            self.state = State.GREETED
            return self._fault(_LINE_TOO_LONG, "AUTH response too long", "AUTH")
        if self.recorder is not None:
            self.recorder("*", _SECRET)
        # Base64 and "*" are ASCII; anything else fails decoding in the mechanism.
        self._pending = AuthResponse(raw.decode("ascii", "replace").strip(" \t"))
        return self._pending

    def _on_starttls(self, arg: str) -> Event:
        if self.tls_active:
            return self._fault(_TLS_ACTIVE, "STARTTLS with TLS active", "STARTTLS")
        if not any("STARTTLS" in ext.verbs for ext in self._extensions):
            return self._fault(_not_offered("STARTTLS"), "command not offered", "STARTTLS")
        if self.greeting != "EHLO":
            # STARTTLS is only offered in an EHLO reply (RFC 3207 section 4).
            return self._fault(_EHLO_FIRST, "STARTTLS before EHLO", "STARTTLS")
        if arg:
            return self._fault(_no_args("STARTTLS"), "syntax error", "STARTTLS")
        self._pending = StartTls()
        return self._pending

    # -------------------------------------------------------------------- body

    def _start_body(self) -> None:
        self._at_line_start = True
        self._line_len = 0
        self._body_error = None
        self._data_ended = False

    def _body_fail(self, reply: Reply, reason: str) -> None:
        # One reply whatever the order the problems were found in (which
        # depends on how the stream was split): size, then bare newlines, then
        # NUL octets, then line length.
        current = self._body_error
        if current is None or _BODY_ERROR_RANK[reply] < _BODY_ERROR_RANK[current]:
            self._body_error = reply
            self._body_reason = reason

    def _next_data(self) -> Event | _Sentinel:
        """The DATA reader: dot-unstuffing, strict CRLF.CRLF end (RFC 5321 4.1.1.4)."""
        if self._data_ended:
            return self._finish_data()
        buf = self._buf
        while True:
            if not buf:
                return NEED_DATA
            if self._at_line_start and buf[0] == 0x2E:
                if len(buf) < 3 and (len(buf) == 1 or buf[1] == 0x0D):
                    return NEED_DATA  # may still become ".\r\n"
                if buf[1] == 0x0D and buf[2] == 0x0A:
                    # RFC 5321 section 4.1.1.4: only <CRLF>.<CRLF> ends the data.
                    del buf[:3]
                    return self._finish_data()
                # RFC 5321 section 4.5.2: drop the leading dot of a stuffed line.
                del buf[:1]
                self._at_line_start = False
                self._line_len += 1
                continue
            break
        # One scan finds both the first stuffed line and the end of the data,
        # which begins like one.
        # (Most big bodies are base64, without a single dot: memchr says so.)
        dot = buf.find(b"\r\n.") if b"." in buf else -1
        if dot >= 0:
            end = buf.find(b"\r\n.\r\n", dot)
            if end >= 0:
                chunk = _take(buf, end + 2, end + 5)
                self._data_ended = True
                event = self._emit_body(chunk, True, dot < end)
                return event if event is not None else self._finish_data()
        last = buf.rfind(b"\r\n")
        if last >= 0:
            chunk = _take(buf, last + 2)
            ends_line = True
        else:
            if len(buf) < _PARTIAL_FLUSH:
                return NEED_DATA
            # A long line without CRLF yet: stream it, keeping a final CR
            # that may be the first half of a CRLF.
            keep = 1 if buf[-1] == 0x0D else 0
            chunk = _take(buf, len(buf) - keep)
            ends_line = False
        # A dot behind the last CRLF is not in this block: the next one starts with it.
        event = self._emit_body(chunk, ends_line, 0 <= dot < last)
        return event if event is not None else self._next_data()

    def _emit_body(self, chunk: bytes, ends_line: bool, stuffed: bool) -> DataChunk | None:
        """Check and pass on one block of DATA; after a problem, keep checking, emit nothing."""
        self._at_line_start = ends_line
        limits = self.limits
        max_line = limits.max_text_line
        if self._body_error is not None:
            pass  # a line-length problem would no longer change the reply
        elif max_line and self._line_len + len(chunk) > max_line - 2:
            self._check_lines(chunk, max_line - 2)
        elif ends_line:
            self._line_len = 0
        else:
            self._line_len += len(chunk)
        if stuffed:
            chunk = chunk.replace(b"\r\n.", b"\r\n")
        # Every CR is followed by LF and every LF follows a CR exactly when
        # deleting the CRs and turning each LF into CRLF gives the block
        # back. Single-octet replaces run on memchr: four times cheaper than
        # counting CR, LF and CRLF.
        if (b"\r" in chunk or b"\n" in chunk) and chunk.replace(b"\r", b"").replace(
            b"\n", b"\r\n"
        ) != chunk:
            # RFC 5321 section 2.3.8: CR and LF only ever travel as CRLF.
            if limits.bare_newline == "reject":
                self._body_fail(_BARE_NEWLINE, "bare CR or LF in DATA")
                return self._count_body(chunk)
            chunk = b"\r\n".join(
                p.replace(b"\r", b"\n").replace(b"\n", b"\r\n") for p in chunk.split(b"\r\n")
            )
        return self._count_body(chunk)

    def _check_lines(self, chunk: bytes, most: int) -> None:
        """RFC 5321 section 4.5.3.1.6: a text line is at most 1000 octets with CRLF.

        Each step jumps to the last CRLF the current line may end at, so the
        loop runs about once per ``most`` octets, not once per line.
        """
        start = -self._line_len  # the current line began in an earlier block
        low = 0
        size = len(chunk)
        rfind = chunk.rfind
        while size - start > most:
            crlf = rfind(b"\r\n", low, start + most + 2)
            if crlf < 0:
                self._body_fail(_TEXT_LINE_TOO_LONG, "text line too long")
                return
            start = low = crlf + 2
        # What follows the block's last CRLF is the start of the next line.
        last = rfind(b"\r\n", low)
        self._line_len = size - (start if last < 0 else last + 2)

    def _count_body(self, chunk: bytes) -> DataChunk | None:
        tx = self.transaction
        assert tx is not None
        tx.size += len(chunk)
        if self.limits.nul == "reject" and b"\x00" in chunk:
            # RFC 5321 section 4.5.2: NUL is not allowed in text; refused
            # after the end of the data (DATA and BDAT alike).
            self._body_fail(_NUL, "NUL octet in the message")
        limit = self.limits.max_message_size
        if limit and tx.size > limit:
            # RFC 1870 section 6.3: swallow the rest, then answer 552.
            self._body_fail(_TOO_LARGE, "message too large")
        if self._body_error is not None:
            return None  # swallowing the rest of a refused body
        return DataChunk(chunk)

    def _finish_data(self) -> Event:
        self._data_ended = False
        tx = self.transaction
        assert tx is not None
        if self.recorder is not None:
            self.recorder("*", _elided(tx.size))
        if self._body_error is not None:
            error = self._body_error
            self._body_error = None
            self.transaction = None
            self.state = State.GREETED
            return self._fault(error, self._body_reason, "DATA", aborted=True, size=tx.size)
        self._pending = DataEnd(True, tx.size)
        return self._pending

    def _next_bdat(self) -> Event | _Sentinel:
        """The BDAT reader: exactly chunk-size octets, no transformation (RFC 3030)."""
        buf = self._buf
        while self._bdat_remaining:
            if not buf:
                return NEED_DATA
            take = min(len(buf), self._bdat_remaining)
            if take == len(buf):
                chunk = bytes(buf)
                buf.clear()
            else:
                chunk = _take(buf, take)
            self._bdat_remaining -= take
            if self._bdat_refusal is not None or self._body_error is not None:
                continue
            event = self._count_body(chunk)
            if event is not None:
                return event
        return self._finish_bdat()

    def _finish_bdat(self) -> Event:
        if self._bdat_refusal is not None:
            refusal = self._bdat_refusal
            self._bdat_refusal = None
            self.state = self._bdat_return
            return self._fault(refusal, "command out of sequence", "BDAT")
        tx = self.transaction
        assert tx is not None
        if self._body_error is not None:
            error = self._body_error
            self._body_error = None
            self.transaction = None
            self.state = State.GREETED
            return self._fault(error, self._body_reason, "BDAT", aborted=True, size=tx.size)
        self._pending = DataEnd(self._bdat_last, tx.size)
        return self._pending

    # ------------------------------------------------------------------- misc

    def receive_eof(self) -> bool:
        """The peer closed its side. Returns True if a transaction was open."""
        open_tx = self.state in IN_TRANSACTION
        self.state = State.CLOSED
        return open_tx


_HANDLERS = {
    "HELO": ServerConnection._on_helo,
    "EHLO": ServerConnection._on_ehlo,
    "MAIL": ServerConnection._on_mail,
    "RCPT": ServerConnection._on_rcpt,
    "DATA": ServerConnection._on_data,
    "BDAT": ServerConnection._on_bdat,
    "RSET": ServerConnection._on_rset,
    "NOOP": ServerConnection._on_noop,
    "QUIT": ServerConnection._on_quit,
    "VRFY": ServerConnection._on_vrfy,
    "HELP": ServerConnection._on_help,
    "STARTTLS": ServerConnection._on_starttls,
    "AUTH": ServerConnection._on_auth,
}
