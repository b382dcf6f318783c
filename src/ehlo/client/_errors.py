"""The client's typed exceptions: one class per failure class, each carrying the reply.

Every exception the client raises for a failed delivery is an
:class:`SMTPClientError`. ``reply`` is the server's reply that decided the
failure (``None`` when there was none: a refused connection, a timeout, a
check made before sending). ``temporary`` tells whether trying again later
(or at another MX) may succeed: 4xx replies and connection trouble are
temporary, 5xx replies are not (RFC 5321 section 4.2.1). In LMTP a failure
among the replies after the data leaves the recipients answered before it
in ``delivered`` and ``failed``: those outcomes are final.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from ..protocol import Reply

__all__ = [
    "AuthFailed",
    "ConnectionFailed",
    "DataRefused",
    "MessageNotSupported",
    "NoRoute",
    "OptionNotSupported",
    "RecipientsRefused",
    "SMTPClientError",
    "SenderRefused",
    "ServiceRefused",
    "TLSFailed",
]


class SMTPClientError(Exception):
    """Base class: a delivery step failed. ``reply`` is the deciding reply, if any."""

    # LMTP (RFC 2033 section 4.2): recipients whose own reply after the data
    # came before this failure; empty otherwise.
    delivered: Mapping[str, Reply] = MappingProxyType({})
    failed: Mapping[str, Reply] = MappingProxyType({})

    def __init__(
        self, message: str, reply: Reply | None = None, *, temporary: bool | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reply = reply
        if temporary is None:
            temporary = reply.is_transient if reply is not None else False
        self.temporary = temporary

    def __str__(self) -> str:
        if self.reply is None:
            return self.message
        return f"{self.message}: {self.reply}"


class ConnectionFailed(SMTPClientError):
    """No usable connection: refused, reset, timed out, or the server broke the protocol.

    ``no_banner`` is set when the connection was made but no banner came.
    """

    no_banner: bool = False

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message, reply, temporary=True)


class ServiceRefused(SMTPClientError):
    """The server refused the session: a banner other than 220, or the greeting refused."""


class TLSFailed(SMTPClientError):
    """TLS could not be set up: not offered when required, refused, or the handshake failed.

    ``verify_error`` says why the certificate was not trusted, when that was the reason.
    """

    verify_error: str | None = None


class AuthFailed(SMTPClientError):
    """Authentication was not possible or the server refused the credentials."""


class SenderRefused(SMTPClientError):
    """MAIL FROM was refused."""


class RecipientsRefused(SMTPClientError):
    """Every recipient was refused. ``refused`` maps each address to its reply."""

    def __init__(self, refused: Mapping[str, Reply]) -> None:
        self.refused = dict(refused)
        first = next(iter(self.refused.values()), None)
        temporary = bool(self.refused) and all(r.is_transient for r in self.refused.values())
        names = ", ".join(f"<{a}>" for a in self.refused)
        super().__init__(f"all recipients refused ({names})", first, temporary=temporary)


class DataRefused(SMTPClientError):
    """The message was refused: DATA, a BDAT chunk, or the reply after the data."""


class MessageNotSupported(SMTPClientError):
    """Found before sending: the server lacks what the message needs, or it is too large."""


class OptionNotSupported(MessageNotSupported):
    """Found before sending: the caller asked for what the server does not offer (BDAT)."""


class NoRoute(SMTPClientError):
    """No mail server for a domain: null MX (RFC 7505), no such domain, or DNS failure."""
