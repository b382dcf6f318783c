"""The client side of an SMTP connection, without any I/O.

Commands go in as method calls (:meth:`ClientConnection.ehlo`, ``mail``,
``rcpt``, ``data`` ...); the bytes to write come out of
:meth:`ClientConnection.data_to_send`. Received bytes go in with
:meth:`ClientConnection.receive_data`; complete replies, one
:class:`~ehlo.protocol.Reply` per (multi-line) reply, come out of
:meth:`ClientConnection.next_reply`. The verbs still awaiting a reply are in
:attr:`ClientConnection.awaiting`, oldest first, so the owner knows which
command each reply answers.

Rules enforced here (a misuse raises :class:`LocalProtocolError`, a peer that
breaks the protocol raises :class:`RemoteProtocolError`):

- Replies: ``code[-| ]text CRLF`` lines, one code per reply, at most
  ``max_line_length`` octets a line and ``max_lines`` lines a reply.
- Sequencing (RFC 5321 section 4.1.4): MAIL after a successful greeting,
  RCPT after MAIL, DATA or BDAT after at least one RCPT; STARTTLS and AUTH
  outside a transaction; only QUIT after a 554 banner.
- Waiting (RFC 2920 sections 3 and 3.1): without PIPELINING
  every command waits for the previous reply; with it only MAIL, RCPT, RSET
  and non-final BDAT may be followed by more commands before their replies.
- Parameters: ESMTP parameters only in an EHLO session and only those of
  offered extensions (RFC 5321 section 4.1.1.11, RFC 1869).
- The body: CR and LF travel only as CRLF (RFC 5321 section 2.3.8), a
  leading dot is doubled (section 4.5.2) and the data ends with CRLF . CRLF
  (section 4.1.1.4), streamed chunk by chunk.
- STARTTLS: bytes that arrive after the 220 and before the handshake are
  discarded, and everything learned before TLS is forgotten (RFC 3207
  section 4.2).
- LMTP (RFC 2033, ``lmtp=True``): the greeting is LHLO, never EHLO or HELO
  (section 4.1), and the end of the data (or ``BDAT ... LAST``) is answered
  with one reply per accepted recipient, in RCPT order (section 4.2): the
  first such reply puts the others in :attr:`ClientConnection.awaiting`.

State advances on the reply received, not on the command sent: a 250 to
EHLO greets, a 354 to DATA opens the body, a 220 to STARTTLS waits for
:meth:`ClientConnection.tls_started`.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping

from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import NEED_DATA, _Sentinel
from ._reply import Reply
from ._syntax import SyntaxProblem, is_address_literal, is_domain, parse_path

__all__ = ["ClientConnection", "ClientState", "ServerExtensions"]

# RFC 5321 section 4.5.3.1.5 sets 512 octets per reply line; servers exceed it
# in practice (long EHLO parameter lists), so the default hard limit is looser.
DEFAULT_MAX_REPLY_LINE = 4096
DEFAULT_MAX_REPLY_LINES = 256
# RFC 5321 section 4.5.3.1.4: a command line is at most 512 octets with CRLF.
MAX_COMMAND_LINE = 512
# Room for ESMTP parameters on MAIL and RCPT (RFC 5321 section 4.5.3.1.4 lets
# extensions raise the limit; the server side allows the same).
PARAM_ALLOWANCE = 512
# RFC 4954 section 4: AUTH lines (with an initial response) up to 12288 octets.
MAX_AUTH_LINE = 12288

# RFC 2920 section 3.1: these end a pipelined group; nothing may follow them
# before their reply. Everything else sent here (MAIL, RCPT, RSET, BDAT) may.
_GROUP_END = frozenset(
    {"EHLO", "HELO", "LHLO", "DATA", "DATA-END", "BDAT-LAST", "NOOP", "QUIT", "STARTTLS", "AUTH",
     "VRFY", "BANNER"}
)

# ESMTP parameters and the extension that must be offered to use them.
_MAIL_PARAM_EXTENSION = {
    "SIZE": "SIZE",  # RFC 1870
    "BODY": "8BITMIME",  # RFC 6152 (BODY=BINARYMIME: RFC 3030, checked below)
    "SMTPUTF8": "SMTPUTF8",  # RFC 6531
    "RET": "DSN",  # RFC 3461
    "ENVID": "DSN",
    "AUTH": "AUTH",  # RFC 4954 section 5
    "REQUIRETLS": "REQUIRETLS",  # RFC 8689
    "MT-PRIORITY": "MT-PRIORITY",  # RFC 6710
    "BY": "DELIVERBY",  # RFC 2852
    "HOLDFOR": "FUTURERELEASE",  # RFC 4865
    "HOLDUNTIL": "FUTURERELEASE",
}
_RCPT_PARAM_EXTENSION = {
    "NOTIFY": "DSN",  # RFC 3461
    "ORCPT": "DSN",
    "RRVS": "RRVS",  # RFC 7293
}

_CODE_LINE = re.compile(rb"[2-5][0-9][0-9]")
_ENHANCED = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}\Z")
# RFC 5321 section 4.1.1.1: ehlo-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-").
_EHLO_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
# RFC 4422 section 3.1: SASL mechanism names.
_SASL_NAME = re.compile(r"[A-Z0-9_-]{1,20}\Z")
_BASE64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


class ClientState(enum.Enum):
    """Where a client connection stands, as decided by the replies received."""

    BANNER = "banner"  # awaiting the server's greeting
    READY = "ready"  # 220 banner received, not greeted (again after STARTTLS)
    GREETED = "greeted"  # HELO or EHLO answered 250
    TLS_PENDING = "tls-pending"  # 220 to STARTTLS: the owner runs the handshake
    REFUSED = "refused"  # 554 banner: only QUIT (RFC 5321 section 3.1)
    CLOSED = "closed"  # 221, 421, or the connection ended


class ServerExtensions(Mapping[str, tuple[str, ...]]):
    """The service extensions of an EHLO reply: keyword (upper case) -> parameters.

    Parses every line after the first (RFC 5321 section 4.1.1.1:
    ``ehlo-line = ehlo-keyword *( SP ehlo-param )``), also the old
    ``AUTH=PLAIN LOGIN`` form. Lines that are not a valid keyword are ignored.
    """

    __slots__ = ("_items",)

    def __init__(self, lines: Iterable[str] = ()) -> None:
        items: dict[str, tuple[str, ...]] = {}
        for raw in lines:
            line = raw.strip()
            keyword, _, rest = line.partition(" ")
            if "=" in keyword:
                # Pre-RFC 2554 servers wrote "AUTH=LOGIN PLAIN".
                keyword, _, first = keyword.partition("=")
                rest = f"{first} {rest}"
            if not _EHLO_KEYWORD.match(keyword):
                continue
            params = tuple(p for p in rest.split(" ") if p)
            key = keyword.upper()
            if key in items:
                params = tuple(dict.fromkeys((*items[key], *params)))
            items[key] = params
        self._items = items

    @classmethod
    def from_reply(cls, reply: Reply) -> ServerExtensions:
        """The extensions of a 250 reply to EHLO (its first line is the greeting)."""
        return cls(reply.lines[1:])

    def __getitem__(self, key: str) -> tuple[str, ...]:
        return self._items[key.upper()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.upper() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"ServerExtensions({self._items!r})"

    @property
    def size(self) -> int | None:
        """RFC 1870: the declared maximum message size; 0 means no fixed limit.

        ``None`` when SIZE is not offered or its value is not a number.
        """
        params = self._items.get("SIZE")
        if params is None:
            return None
        if not params:
            return 0  # RFC 1870 section 4: SIZE without a value: no fixed maximum
        value = params[0]
        return int(value) if value.isascii() and value.isdigit() else None

    @property
    def auth_mechanisms(self) -> tuple[str, ...]:
        """RFC 4954 section 3: the SASL mechanisms offered, upper case."""
        return tuple(m.upper() for m in self._items.get("AUTH", ()))


class _Transaction:
    """What the client has sent of one mail transaction, updated by replies."""

    __slots__ = (
        "body", "data_open", "failed", "finals_due", "mail", "rcpts_ok", "rcpts_pending", "utf8",
    )

    def __init__(self, utf8: bool) -> None:
        self.mail: bool | None = None  # None: MAIL awaits its reply
        self.rcpts_ok = 0
        self.rcpts_pending = 0
        self.body: str | None = None  # "DATA" or "BDAT" once one was sent
        self.data_open = False  # 354 received, end of data not yet sent
        self.failed = False  # MAIL refused, or a BDAT chunk refused
        self.utf8 = utf8
        self.finals_due: int | None = None  # LMTP: replies after the data still due


class _BodyWriter:
    """Line-ending normalisation and (for DATA) dot-stuffing, across chunks."""

    __slots__ = ("at_line_start", "held_cr")

    def __init__(self) -> None:
        self.at_line_start = True
        self.held_cr = False  # a chunk ended in CR: is the next byte LF?

    def convert(self, data: bytes, *, stuff: bool) -> bytes:
        if self.held_cr:
            data = b"\r" + data
            self.held_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self.held_cr = True
        if not data:
            return b""
        # RFC 5321 section 2.3.8: CR and LF only ever travel as CRLF.
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        data = data.replace(b"\n", b"\r\n")
        if stuff:
            # RFC 5321 section 4.5.2: double a dot that starts a line.
            if self.at_line_start and data[:1] == b".":
                data = b"." + data
            if b"\n." in data:
                data = data.replace(b"\n.", b"\n..")
        self.at_line_start = data.endswith(b"\n")
        return data

    def finish(self) -> bytes:
        """The held CR (as CRLF) and a final CRLF when the last line lacks one."""
        tail = b""
        if self.held_cr:
            self.held_cr = False
            tail = b"\r\n"
        elif not self.at_line_start:
            # RFC 5321 section 4.1.1.4: the end-of-data dot is on a line of its own.
            tail = b"\r\n"
        self.at_line_start = True
        return tail


def _local(problem: str) -> LocalProtocolError:
    return LocalProtocolError(problem)


class ClientConnection:
    """One SMTP client session as a pure state machine (see the module docstring).

    ``tls_active`` is true for implicit TLS (RFC 8314): STARTTLS is then
    refused. ``lmtp`` speaks LMTP (RFC 2033) instead of SMTP.
    ``max_line_length`` and ``max_lines`` bound each reply.
    """

    def __init__(
        self,
        *,
        tls_active: bool = False,
        lmtp: bool = False,
        max_line_length: int = DEFAULT_MAX_REPLY_LINE,
        max_lines: int = DEFAULT_MAX_REPLY_LINES,
    ) -> None:
        if max_line_length < 512:
            # RFC 5321 section 4.5.3.1.5: 512-octet reply lines must be accepted.
            raise ValueError("max_line_length must be at least 512")
        if max_lines < 1:
            raise ValueError("max_lines must be at least 1")
        self.max_line_length = max_line_length
        self.max_lines = max_lines
        self.state = ClientState.BANNER
        self.tls_active = tls_active
        self.lmtp = lmtp
        self.esmtp = False  # greeted with EHLO or LHLO (and answered 250)
        self.extensions = ServerExtensions()
        self.authenticated = False
        self.banner: Reply | None = None
        self.discarded_after_starttls = 0  # octets dropped after 220 to STARTTLS
        self._awaiting: deque[str] = deque(["BANNER"])
        self._tx: _Transaction | None = None
        self._auth_step = False  # 334 received: an AUTH response line is due
        self._body = _BodyWriter()
        self._out: list[bytes] = []
        self._buf = bytearray()
        self._lines: list[str] = []
        self._code = ""
        self._eof = False

    # ---------------------------------------------------------------- queries

    @property
    def awaiting(self) -> tuple[str, ...]:
        """Verbs whose replies are due, oldest first ("BANNER", "EHLO", "DATA-END" ...)."""
        return tuple(self._awaiting)

    @property
    def pipelining(self) -> bool:
        """RFC 2920: PIPELINING was offered in this EHLO session."""
        return self.esmtp and "PIPELINING" in self.extensions

    @property
    def in_transaction(self) -> bool:
        """A MAIL was sent and the transaction has not ended (or failed)."""
        return self._tx is not None and not self._tx.failed

    @property
    def sending_body(self) -> bool:
        """DATA was answered 354 and the end of data has not been sent yet."""
        return self._tx is not None and self._tx.data_open

    @property
    def accepted_recipients(self) -> int:
        """Recipients of the current transaction answered 2xx so far."""
        return self._tx.rcpts_ok if self._tx is not None else 0

    @property
    def buffered(self) -> int:
        """Octets received but not yet parsed into replies."""
        return len(self._buf)

    @property
    def auth_challenge_pending(self) -> bool:
        """A 334 was received: send :meth:`auth_response` next."""
        return self._auth_step

    # ----------------------------------------------------------------- output

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, as one string of bytes."""
        if not self._out:
            return b""
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        return data

    def _begin(self, verb: str) -> None:
        """Check that a command may be sent now (state and pipelining)."""
        state = self.state
        if state is ClientState.CLOSED:
            raise _local("the connection is closed")
        if state is ClientState.TLS_PENDING:
            raise _local("STARTTLS was accepted: call tls_started() after the handshake")
        if state is ClientState.BANNER:
            raise _local("the server's banner has not been received")
        if state is ClientState.REFUSED and verb != "QUIT":
            # RFC 5321 section 3.1: after a 554 banner the client sends only QUIT.
            raise _local("the server refused the session (554): only QUIT may follow")
        if self._tx is not None and self._tx.data_open:
            raise _local(f"{verb} while sending the message body: call end_data() first")
        if self._auth_step:
            raise _local("the server awaits an AUTH response: call auth_response()")
        if self._awaiting:
            # RFC 2920 section 3.1: only some commands may be followed before
            # their reply, and only when PIPELINING was offered.
            blocking = [v for v in self._awaiting if v in _GROUP_END]
            if blocking:
                raise _local(f"{verb} cannot be sent before the reply to {blocking[0]}")
            if not self.pipelining:
                raise _local(
                    f"{verb} cannot be sent before the reply to {self._awaiting[0]}"
                    " (PIPELINING was not offered)"
                )

    def _line(self, verb: str, line: str, limit: int = MAX_COMMAND_LINE) -> None:
        data = line.encode("utf-8") + b"\r\n"
        if len(data) > limit:
            raise _local(f"{verb} line is {len(data)} octets, more than {limit}")
        if any(c in line for c in "\r\n\0"):
            raise _local(f"{verb} line contains CR, LF or NUL")
        self._out.append(data)
        self._awaiting.append(verb)

    # --------------------------------------------------------------- commands

    def ehlo(self, name: str) -> None:
        """``EHLO name``: name is a domain or an address literal (RFC 5321 section 4.1.1.1)."""
        self._greeting("EHLO", name)

    def helo(self, name: str) -> None:
        """``HELO name``: a plain SMTP session without extensions."""
        self._greeting("HELO", name)

    def lhlo(self, name: str) -> None:
        """``LHLO name``: the LMTP greeting (RFC 2033 section 4.1), with extensions as EHLO."""
        self._greeting("LHLO", name)

    def _greeting(self, verb: str, name: str) -> None:
        self._begin(verb)
        if self.lmtp != (verb == "LHLO"):
            # RFC 2033 section 4.1: LMTP greets with LHLO only, SMTP never does.
            raise _local(f"{verb} in an {'LMTP' if self.lmtp else 'SMTP'} session")
        # RFC 5321 section 4.1.1.1: "EHLO" SP ( Domain / address-literal ).
        if not name.isascii() or not (is_domain(name) or is_address_literal(name)):
            raise _local(f"{verb} needs a domain name or address literal, got {name!r}")
        self._line(verb, f"{verb} {name}")

    def mail(self, address: str, params: Mapping[str, str | None] | None = None) -> None:
        """``MAIL FROM:<address> [params]``; ``""`` is the null reverse-path."""
        self._begin("MAIL")
        if self.state is not ClientState.GREETED:
            # RFC 5321 section 4.1.4: MAIL needs a successful HELO or EHLO.
            raise _local("MAIL before a successful HELO or EHLO")
        if self._tx is not None and not self._tx.failed:
            # RFC 5321 section 4.1.4: no MAIL inside a transaction (RSET first).
            raise _local("MAIL inside a transaction: finish it or send RSET first")
        param_text, utf8 = self._params("MAIL", params or {}, _MAIL_PARAM_EXTENSION, False)
        path = self._path("MAIL", address, sender=True, utf8=utf8)
        line = f"MAIL FROM:{path}{param_text}"
        self._line("MAIL", line, self._line_limit(param_text))
        self._tx = _Transaction(utf8)

    def rcpt(self, address: str, params: Mapping[str, str | None] | None = None) -> None:
        """``RCPT TO:<address> [params]`` (``Postmaster`` alone is allowed)."""
        self._begin("RCPT")
        tx = self._tx
        if tx is None or tx.failed or tx.mail is False:
            # RFC 5321 section 4.1.4: RCPT needs a successful MAIL.
            raise _local("RCPT without a MAIL transaction")
        if tx.body is not None:
            raise _local("RCPT after DATA or BDAT")
        param_text, _ = self._params("RCPT", params or {}, _RCPT_PARAM_EXTENSION, tx.utf8)
        path = self._path("RCPT", address, sender=False, utf8=tx.utf8)
        self._line("RCPT", f"RCPT TO:{path}{param_text}", self._line_limit(param_text))
        tx.rcpts_pending += 1

    def _line_limit(self, param_text: str) -> int:
        return MAX_COMMAND_LINE + (PARAM_ALLOWANCE if param_text else 0)

    def _path(self, verb: str, address: str, *, sender: bool, utf8: bool) -> str:
        path = f"<{address}>"
        if not address.isascii() and not utf8:
            # RFC 6531 section 3.4: a UTF-8 address needs MAIL ... SMTPUTF8.
            raise _local(f"{verb}: a non-ASCII address needs the SMTPUTF8 parameter")
        try:
            parse_path(path, sender=sender, utf8=utf8)
        except SyntaxProblem as problem:
            raise _local(f"{verb}: {problem.reply.text}") from None
        return path

    def _params(
        self,
        verb: str,
        params: Mapping[str, str | None],
        owners: Mapping[str, str],
        utf8: bool,
    ) -> tuple[str, bool]:
        """The parameter text and whether SMTPUTF8 is in effect (given or inherited)."""
        if not params:
            return "", utf8
        if not self.esmtp:
            # RFC 5321 section 4.1.1.1: a HELO session has no service extensions.
            raise _local(f"{verb} parameters need an EHLO session")
        parts: list[str] = []
        for keyword, value in params.items():
            key = keyword.upper()
            # RFC 5321 section 4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
            if not _EHLO_KEYWORD.match(keyword):
                raise _local(f"{verb}: bad parameter keyword {keyword!r}")
            owner = owners.get(key)
            if key == "BODY" and (value or "").upper() == "BINARYMIME":
                owner = "BINARYMIME"  # RFC 3030 section 3
            if owner is not None and owner not in self.extensions:
                # RFC 1869: a parameter only with the extension that defines it.
                raise _local(f"{verb} parameter {key} needs {owner}, which was not offered")
            if key == "SMTPUTF8":
                utf8 = True
            if value is None:
                parts.append(f" {key}")
                continue
            # RFC 5321 section 4.1.2: esmtp-value = 1*(%d33-60 / %d62-126),
            # RFC 6531 section 3.3 adds UTF-8.
            if not value or any(
                not (33 <= ord(c) <= 126 and c != "=") and ord(c) < 0x80 for c in value
            ):
                raise _local(f"{verb}: bad value for parameter {key}")
            parts.append(f" {key}={value}")
        if not utf8 and any(not (v or "").isascii() for v in params.values()):
            raise _local(f"{verb}: non-ASCII parameter values need SMTPUTF8")
        return "".join(parts), utf8

    def data(self) -> None:
        """``DATA``; after its 354 send the body with :meth:`send_data` and :meth:`end_data`."""
        self._begin("DATA")
        tx = self._body_allowed("DATA")
        if tx.body is not None:
            # RFC 3030 section 2: DATA and BDAT are not mixed in one transaction.
            raise _local("DATA after BDAT in the same transaction")
        tx.body = "DATA"
        self._line("DATA", "DATA")

    def _body_allowed(self, verb: str) -> _Transaction:
        tx = self._tx
        if tx is None or tx.failed or tx.mail is False:
            raise _local(f"{verb} without a MAIL transaction")
        if tx.rcpts_ok == 0 and tx.rcpts_pending == 0:
            # RFC 5321 section 4.1.4: DATA needs at least one accepted RCPT.
            raise _local(f"{verb} without an accepted (or pending) recipient")
        return tx

    def send_data(self, chunk: bytes) -> None:
        """Part of the message body, any size: line endings made CRLF, dots stuffed."""
        tx = self._tx
        if tx is None or not tx.data_open:
            raise _local("message data before a 354 reply to DATA")
        data = self._body.convert(bytes(chunk), stuff=True)
        if data:
            self._out.append(data)

    def end_data(self) -> None:
        """End the body: a final CRLF when missing, then ``.`` CRLF (RFC 5321 section 4.1.1.4)."""
        tx = self._tx
        if tx is None or not tx.data_open:
            raise _local("end of data before a 354 reply to DATA")
        tx.data_open = False
        self._out.append(self._body.finish() + b".\r\n")
        self._body = _BodyWriter()
        self._awaiting.append("DATA-END")

    def bdat(self, chunk: bytes, last: bool = False) -> int:
        """``BDAT size [LAST]`` and the chunk (RFC 3030 section 2), line endings made CRLF.

        The last chunk gets a final CRLF when the message does not end with
        one, so that DATA and BDAT deliver the same bytes. Returns the size
        declared on the BDAT line.
        """
        verb = "BDAT-LAST" if last else "BDAT"
        self._begin(verb)
        if "CHUNKING" not in self.extensions or not self.esmtp:
            # RFC 3030 section 2: BDAT only when CHUNKING was offered.
            raise _local("BDAT needs CHUNKING, which was not offered")
        tx = self._body_allowed("BDAT")
        if tx.body == "DATA":
            raise _local("BDAT after DATA in the same transaction")
        tx.body = "BDAT"
        data = self._body.convert(bytes(chunk), stuff=False)
        if last:
            data += self._body.finish()
            self._body = _BodyWriter()
        self._out.append(f"BDAT {len(data)}{' LAST' if last else ''}\r\n".encode("ascii"))
        if data:
            self._out.append(data)
        self._awaiting.append(verb)
        return len(data)

    def rset(self) -> None:
        """``RSET``: abort the transaction (RFC 5321 section 4.1.1.5)."""
        self._begin("RSET")
        self._line("RSET", "RSET")
        self._tx = None
        self._body = _BodyWriter()

    def noop(self) -> None:
        """``NOOP`` (RFC 5321 section 4.1.1.9)."""
        self._begin("NOOP")
        self._line("NOOP", "NOOP")

    def vrfy(self, argument: str) -> None:
        """``VRFY argument`` (RFC 5321 section 4.1.1.6)."""
        self._begin("VRFY")
        if not argument:
            raise _local("VRFY needs an argument")
        self._line("VRFY", f"VRFY {argument}")

    def quit(self) -> None:
        """``QUIT`` (RFC 5321 section 4.1.1.10); the connection closes after the reply."""
        self._begin("QUIT")
        self._line("QUIT", "QUIT")

    def starttls(self) -> None:
        """``STARTTLS`` (RFC 3207); after its 220, hand over to TLS and call :meth:`tls_started`."""
        self._begin("STARTTLS")
        if self.tls_active:
            raise _local("TLS is already active")
        if self.state is not ClientState.GREETED or not self.esmtp:
            raise _local("STARTTLS needs a successful EHLO")
        if "STARTTLS" not in self.extensions:
            # RFC 3207 section 4: only when the EHLO reply offers it.
            raise _local("STARTTLS was not offered")
        if self._tx is not None and not self._tx.failed:
            raise _local("STARTTLS inside a mail transaction")
        self._line("STARTTLS", "STARTTLS")

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS succeeded: forget what was learned before.

        RFC 3207 section 4.2: the client discards the extension list and must
        greet again.
        """
        if self.state is not ClientState.TLS_PENDING:
            raise _local("tls_started() without a 220 reply to STARTTLS")
        self.tls_active = True
        self.state = ClientState.READY
        self.esmtp = False
        self.extensions = ServerExtensions()
        self.authenticated = False
        self._tx = None
        self._buf.clear()

    def auth(self, mechanism: str, initial_response: str | None = None) -> None:
        """``AUTH mechanism [initial-response]`` (RFC 4954 section 4).

        ``initial_response`` is already base64; ``""`` sends ``=`` (an empty
        initial response). Answer each 334 with :meth:`auth_response`.
        """
        self._begin("AUTH")
        mech = mechanism.upper()
        if self.state is not ClientState.GREETED or not self.esmtp:
            raise _local("AUTH needs a successful EHLO")
        if mech not in self.extensions.auth_mechanisms:
            raise _local(f"AUTH {mech} was not offered")
        if self.authenticated:
            # RFC 4954 section 4: no AUTH after a successful one.
            raise _local("already authenticated")
        if self._tx is not None and not self._tx.failed:
            # RFC 4954 section 4: AUTH is not permitted during a mail transaction.
            raise _local("AUTH inside a mail transaction")
        if not _SASL_NAME.match(mech):
            raise _local(f"bad SASL mechanism name {mechanism!r}")
        line = f"AUTH {mech}"
        if initial_response is not None:
            _check_base64(initial_response)
            line += f" {initial_response or '='}"
        self._line("AUTH", line, MAX_AUTH_LINE)

    def auth_response(self, response: str) -> None:
        """Answer a 334 challenge: base64 text, or ``*`` to cancel (RFC 4954 section 4)."""
        if not self._auth_step:
            raise _local("no AUTH challenge to answer")
        if response != "*":
            _check_base64(response)
        self._auth_step = False
        self._line("AUTH", response, MAX_AUTH_LINE)

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> None:
        """Add received bytes (dropped, and counted, while a TLS handshake is due)."""
        if self.state is ClientState.TLS_PENDING:
            self.discarded_after_starttls += len(data)
            return
        if self.state is ClientState.CLOSED and not self._awaiting:
            return
        self._buf += data

    def receive_eof(self) -> None:
        """The server closed its side."""
        self._eof = True

    def next_reply(self) -> Reply | _Sentinel:
        """The next complete reply, or ``NEED_DATA``.

        Raises :class:`RemoteProtocolError` for a malformed or endless reply,
        a reply nobody asked for (but 421), or an end of connection while a
        reply is due.
        """
        reply = self._read_reply()
        if reply is None:
            if self._eof and self._awaiting and self.state is not ClientState.CLOSED:
                verb = self._awaiting[0]
                self._awaiting.clear()
                self.state = ClientState.CLOSED
                raise RemoteProtocolError(f"the server closed the connection (awaiting {verb})")
            if self._eof:
                self.state = ClientState.CLOSED
            return NEED_DATA
        if not self._awaiting:
            if reply.code == 421:
                # RFC 5321 section 3.8: the server may close with 421 at any time.
                self.state = ClientState.CLOSED
                return reply
            raise RemoteProtocolError(f"unexpected reply with no command pending: {reply}")
        verb = self._awaiting.popleft()
        self._apply(verb, reply)
        return reply

    def _read_reply(self) -> Reply | None:
        buf = self._buf
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > self.max_line_length:
                    raise RemoteProtocolError(
                        f"reply line longer than {self.max_line_length} octets"
                    )
                return None
            if nl + 1 > self.max_line_length:
                raise RemoteProtocolError(f"reply line longer than {self.max_line_length} octets")
            raw = bytes(buf[:nl])
            del buf[: nl + 1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            code, last, text = self._parse_line(raw)
            if self._lines and code != self._code:
                # RFC 5321 section 4.2.1: every line of a reply has the same code.
                raise RemoteProtocolError(
                    f"multi-line reply changes its code from {self._code} to {code}"
                )
            self._code = code
            self._lines.append(text)
            if len(self._lines) > self.max_lines:
                raise RemoteProtocolError(f"reply longer than {self.max_lines} lines")
            if last:
                lines = self._lines
                self._lines = []
                self._code = ""
                return _make_reply(int(code), lines)

    @staticmethod
    def _parse_line(raw: bytes) -> tuple[str, bool, str]:
        # RFC 5321 section 4.2: Reply-line = *( Reply-code "-" [ textstring ] CRLF )
        #                                     Reply-code [ SP textstring ] CRLF
        if len(raw) < 3 or not _CODE_LINE.match(raw):
            raise RemoteProtocolError(f"malformed reply line: {raw[:80]!r}")
        sep = raw[3:4]
        if sep not in (b"", b" ", b"-"):
            raise RemoteProtocolError(f"malformed reply line: {raw[:80]!r}")
        if b"\r" in raw or b"\0" in raw:
            raise RemoteProtocolError(f"reply line contains CR or NUL: {raw[:80]!r}")
        # RFC 6531 section 3.7.4: reply text may be UTF-8; never fail on it.
        text = raw[4:].decode("utf-8", "replace")
        return raw[:3].decode("ascii"), sep != b"-", text

    def _apply(self, verb: str, reply: Reply) -> None:
        code = reply.code
        ok = 200 <= code < 300
        if code == 421 and verb != "QUIT":
            # RFC 5321 section 3.8: 421 closes the transmission channel.
            self.state = ClientState.CLOSED
            self._tx = None
            self._awaiting.clear()
            return
        tx = self._tx
        if verb == "BANNER":
            self.banner = reply
            if code == 220:
                self.state = ClientState.READY
            elif code == 554:
                # RFC 5321 section 3.1: 554 banner: wait for QUIT.
                self.state = ClientState.REFUSED
            else:
                self.state = ClientState.CLOSED
        elif verb in ("EHLO", "HELO", "LHLO"):
            if ok:
                self.state = ClientState.GREETED
                self.esmtp = verb != "HELO"
                self.extensions = (
                    ServerExtensions.from_reply(reply) if self.esmtp else ServerExtensions()
                )
                # RFC 5321 section 4.1.4: a greeting clears the transaction.
                self._tx = None
        elif verb == "MAIL":
            if tx is not None:
                tx.mail = ok
                tx.failed = not ok
        elif verb == "RCPT":
            if tx is not None:
                tx.rcpts_pending -= 1
                if ok:
                    tx.rcpts_ok += 1
        elif verb == "DATA":
            if tx is not None:
                if code == 354:
                    tx.data_open = True
                else:
                    tx.body = None  # DATA refused: the transaction is still open
        elif verb in ("DATA-END", "BDAT-LAST"):
            if self.lmtp and tx is not None:
                if tx.finals_due is None:
                    # RFC 2033 section 4.2: one reply per recipient accepted at
                    # RCPT (all of them are known by now), in RCPT order.
                    tx.finals_due = tx.rcpts_ok
                    self._awaiting.extendleft([verb] * (tx.rcpts_ok - 1))
                tx.finals_due -= 1
                if tx.finals_due > 0:
                    return
            # RFC 5321 section 4.1.1.4: the end of data ends the transaction either way.
            self._tx = None
        elif verb == "BDAT":
            if tx is not None and not ok:
                # RFC 3030 section 2: after a refused chunk send no more of them.
                tx.failed = True
        elif verb == "STARTTLS":
            if code == 220:
                # RFC 3207 section 4.2 / response injection: nothing received
                # before the handshake may be taken as coming from the server.
                self.discarded_after_starttls += len(self._buf)
                self._buf.clear()
                self.state = ClientState.TLS_PENDING
        elif verb == "AUTH":
            if code == 334:
                self._auth_step = True
            elif code == 235:
                self.authenticated = True
        elif verb == "QUIT":
            self.state = ClientState.CLOSED
            self._awaiting.clear()
        if self.state is ClientState.CLOSED:
            self._awaiting.clear()


def _make_reply(code: int, texts: list[str]) -> Reply:
    """A Reply, with the RFC 3463 enhanced code taken off every line that carries it."""
    first = texts[0].split(" ", 1)[0]
    enhanced: str | None = None
    match = _ENHANCED.match(first)
    # RFC 3463 section 3.1: the class digit equals the reply's first digit.
    if match and match.group(1) == str(code)[0]:
        enhanced = first
        texts = [
            t[len(first) + 1 :] if t.startswith(first + " ") else ("" if t == first else t)
            for t in texts
        ]
    return Reply(code, enhanced, texts)


def _check_base64(text: str) -> None:
    if any(c not in _BASE64_CHARS for c in text):
        raise _local("AUTH responses are base64 text")
