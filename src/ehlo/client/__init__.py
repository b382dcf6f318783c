"""The SMTP client: an asyncio session over the sans-IO ``ClientConnection``, MX routing.

Send one message to one server::

    from ehlo.client import SMTPClient

    async with SMTPClient("mail.example.org", 25, tls="verify") as client:
        await client.login("user", "secret")
        result = await client.send_message("a@example.org", ["b@example.net"], message)
        print(result.accepted, result.refused)

or route by MX (RFC 5321 section 5.1) with :class:`Router` and :func:`deliver`.
The package owns: ``_client`` (connection, TLS, AUTH, transactions),
``_body`` (scanning a message and cutting it into chunks), ``_scram``
(SCRAM-SHA-256 messages), ``_certinfo`` (:class:`TLSInfo`, certificate
details), ``routing`` (MX, implicit MX, null MX, failover), ``_errors``
(exceptions that carry the reply), ``compose`` (building a message with
folded headers, the body streamed), ``probe`` (what a server offers, as a
report) and ``cli`` (``ehlo send`` and ``ehlo probe``: options, rendering,
exit codes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._client import (
    TLS_MODES,
    Message,
    SendResult,
    SMTPClient,
    Timeouts,
    TLSInfo,
    TLSMode,
    Transcript,
    client_ssl_context,
)
from ._errors import (
    AuthFailed,
    ConnectionFailed,
    DataRefused,
    MessageNotSupported,
    NoRoute,
    OptionNotSupported,
    RecipientsRefused,
    SenderRefused,
    ServiceRefused,
    SMTPClientError,
    TLSFailed,
)

if TYPE_CHECKING:
    from .routing import DeliveryResult, MailHost, Router, deliver, recipient_domain

# Routing brings dnspython (about 8 MiB): loaded on first use of one of its names.
_ROUTING = frozenset({"DeliveryResult", "MailHost", "Router", "deliver", "recipient_domain"})


def __getattr__(name: str) -> Any:
    if name in _ROUTING:
        from . import routing

        return getattr(routing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "TLS_MODES",
    "AuthFailed",
    "ConnectionFailed",
    "DataRefused",
    "DeliveryResult",
    "MailHost",
    "Message",
    "MessageNotSupported",
    "NoRoute",
    "OptionNotSupported",
    "RecipientsRefused",
    "Router",
    "SMTPClient",
    "SMTPClientError",
    "SendResult",
    "SenderRefused",
    "ServiceRefused",
    "TLSFailed",
    "TLSInfo",
    "TLSMode",
    "Timeouts",
    "Transcript",
    "client_ssl_context",
    "deliver",
    "recipient_domain",
]
