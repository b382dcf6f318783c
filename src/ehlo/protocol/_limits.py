"""``ProtocolLimits``: what the protocol core enforces on its own.

The configuration (``ehlo.config``) fills it from defaults, TOML and the
command line and re-exports it; the core sees nothing else of the
configuration. The extension switches are read by
``ehlo.extensions.build_extensions``, never by the core itself.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

BareNewline = Literal["normalize", "reject"]
Nul = Literal["keep", "reject"]


@dataclasses.dataclass(frozen=True, slots=True)
class ProtocolLimits:
    """What the protocol core enforces on its own."""

    # RFC 5321 section 4.5.3.1.4: a command line is at most 512 octets with CRLF.
    max_command_line: int = 512
    # RFC 5321 section 4.5.3.1.6: a text line is at most 1000 octets with CRLF.
    # 0 turns the check off (lines are still streamed, never buffered whole).
    max_text_line: int = 1000
    # Largest message accepted, in octets (advertised as SIZE). 0: no limit.
    max_message_size: int = 25 * 1024 * 1024
    # RFC 5321 section 4.5.3.1.8: at least 100 recipients must be accepted.
    max_recipients: int = 100
    # 5xx replies in one session before it is closed with 421 4.7.0.
    max_errors: int = 20
    # Bare CR or LF inside DATA: "normalize" to CRLF, or "reject" with 5xx.
    bare_newline: BareNewline = "normalize"
    # NUL octets in a message body (RFC 5321 section 4.5.2 allows none in
    # text): "keep" them, or "reject" the message with 554 5.6.0 after its end.
    nul: Nul = "keep"
    # Extensions offered (each can be switched off).
    pipelining: bool = True
    chunking: bool = True
    smtputf8: bool = True
    eightbitmime: bool = True
    enhancedstatuscodes: bool = True
    # DSN (RFC 3461): RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT.
    dsn: bool = True
    # Offer STARTTLS (the transport must be able to start TLS).
    starttls: bool = False
    # SASL mechanisms offered by AUTH (RFC 4954); empty: no AUTH. The server
    # sets these when it has users to authenticate.
    auth_mechanisms: tuple[str, ...] = ()
    # Offer AUTH on connections without TLS (passwords in clear text).
    auth_plaintext: bool = False
