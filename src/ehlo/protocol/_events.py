"""Events the server connection produces from the bytes it receives.

Command events (``Helo`` ... ``StartTls``) each await exactly one reply from
the owner of the connection. ``DataChunk`` carries message bytes (already
dot-unstuffed, with line endings normalised) and needs no reply; ``DataEnd``
closes a DATA body or a BDAT chunk and awaits the reply to it. ``Fault`` is
a protocol error that the connection has already answered by itself; it is
reported so that the session can log it and drop a transaction in progress.
"""

from __future__ import annotations

from ._reply import Reply


class Event:
    """Base class of all events."""

    __slots__ = ()

    def __repr__(self) -> str:
        names: tuple[str, ...] = self.__slots__
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in names)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        names: tuple[str, ...] = self.__slots__
        return all(getattr(self, k) == getattr(other, k) for k in names)

    __hash__ = None  # type: ignore[assignment]


class Command(Event):
    """A command that awaits one reply."""

    __slots__ = ()
    verb: str = ""


class Helo(Command):
    """``HELO domain`` (RFC 5321 section 4.1.1.1): a plain SMTP session."""

    __slots__ = ("name",)
    verb = "HELO"

    def __init__(self, name: str) -> None:
        self.name = name


class Ehlo(Command):
    """``EHLO domain`` or ``EHLO address-literal``: an ESMTP session."""

    __slots__ = ("name",)
    verb = "EHLO"

    def __init__(self, name: str) -> None:
        self.name = name


class Mail(Command):
    """``MAIL FROM:<reverse-path> [params]``; ``address`` is "" for ``<>``."""

    __slots__ = ("address", "params")
    verb = "MAIL"

    def __init__(self, address: str, params: dict[str, str | None]) -> None:
        self.address = address
        self.params = params


class Rcpt(Command):
    """``RCPT TO:<forward-path> [params]``; source routes already dropped."""

    __slots__ = ("address", "params")
    verb = "RCPT"

    def __init__(self, address: str, params: dict[str, str | None]) -> None:
        self.address = address
        self.params = params


class Data(Command):
    """``DATA``: reply 354 to receive the body, or refuse it."""

    __slots__ = ()
    verb = "DATA"


class Bdat(Event):
    """``BDAT size [LAST]`` (RFC 3030): the chunk follows at once, no reply yet.

    ``first`` is true for the first chunk of a transaction. The chunk's bytes
    arrive as ``DataChunk`` events, then a ``DataEnd`` awaits the reply.
    """

    __slots__ = ("first", "last", "size")
    verb = "BDAT"

    def __init__(self, size: int, last: bool, first: bool) -> None:
        self.size = size
        self.last = last
        self.first = first


class Rset(Command):
    """``RSET`` (RFC 5321 section 4.1.1.5)."""

    __slots__ = ()
    verb = "RSET"


class Noop(Command):
    """``NOOP [string]`` (RFC 5321 section 4.1.1.9)."""

    __slots__ = ()
    verb = "NOOP"


class Quit(Command):
    """``QUIT`` (RFC 5321 section 4.1.1.10)."""

    __slots__ = ()
    verb = "QUIT"


class Vrfy(Command):
    """``VRFY string`` (RFC 5321 section 4.1.1.6)."""

    __slots__ = ("argument",)
    verb = "VRFY"

    def __init__(self, argument: str) -> None:
        self.argument = argument


class Help(Command):
    """``HELP [string]`` (RFC 5321 section 4.1.1.8)."""

    __slots__ = ("argument",)
    verb = "HELP"

    def __init__(self, argument: str) -> None:
        self.argument = argument


class StartTls(Command):
    """``STARTTLS`` (RFC 3207): reply 220, then the transport starts TLS."""

    __slots__ = ()
    verb = "STARTTLS"


class Auth(Command):
    """``AUTH mechanism [initial-response]`` (RFC 4954 section 4).

    ``initial`` is the client's initial response as sent (base64, or "=" for
    an empty one), None when absent. A 334 reply continues the exchange: the
    next line the client sends arrives as an :class:`AuthResponse`.
    """

    __slots__ = ("initial", "mechanism")
    verb = "AUTH"

    def __init__(self, mechanism: str, initial: str | None = None) -> None:
        self.mechanism = mechanism
        self.initial = initial


class AuthResponse(Command):
    """One client line of an AUTH exchange (base64, or ``*`` to cancel)."""

    __slots__ = ("line",)
    verb = "AUTH"

    def __init__(self, line: str) -> None:
        self.line = line

    def __repr__(self) -> str:
        # Never print what may be a password.
        return f"AuthResponse(<{len(self.line)} characters>)"


class DataChunk(Event):
    """Message bytes, ready to store (dot-unstuffed, line endings normalised)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class DataEnd(Command):
    """The end of a DATA body (``last`` true) or of a BDAT chunk; awaits a reply.

    ``size`` is the number of message octets received so far in the
    transaction (for BDAT, all chunks up to this one).
    """

    __slots__ = ("last", "size")
    verb = "DATA-END"

    def __init__(self, last: bool, size: int) -> None:
        self.last = last
        self.size = size


class Fault(Event):
    """A protocol error the connection answered itself with ``reply``.

    ``verb`` names the offending command ("" when the line was unreadable);
    ``aborted`` is true when a transaction in progress was dropped (a body
    over the size limit, a bare newline in reject mode); ``closing`` is true
    when the reply was a 421 and the connection must now be closed;
    ``size`` is the octets of the dropped message received (swallowed ones
    included), 0 when none was dropped.
    """

    __slots__ = ("aborted", "closing", "reason", "reply", "size", "verb")

    def __init__(
        self,
        reply: Reply,
        reason: str,
        verb: str = "",
        aborted: bool = False,
        closing: bool = False,
        size: int = 0,
    ) -> None:
        self.reply = reply
        self.reason = reason
        self.verb = verb
        self.aborted = aborted
        self.closing = closing
        self.size = size


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
"""``next_event()``: no complete event in the buffer; feed more bytes."""

PAUSED = _Sentinel("PAUSED")
"""``next_event()``: a command awaits its reply, or the connection is closed
or switching to TLS; more input is not read until that is resolved."""
