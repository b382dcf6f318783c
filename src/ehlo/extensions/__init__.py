"""SMTP service extensions, each declared once, all built from one table.

An :class:`Extension` names its EHLO keyword, the verbs it enables and the
MAIL/RCPT parameters it owns. The server connection builds its EHLO reply,
its verb table and its parameter table from the extensions offered in the
session, so an extension that is not offered cannot be used: its verb gets
502 and its parameters 555 (RFC 5321 section 4.1.1.11, RFC 1869).

Adding an extension takes its module, a switch in ``ProtocolLimits`` and one
row in :data:`EXTENSIONS`; the protocol core does not change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..protocol import Extension, ProtocolLimits, SessionFacts
from .auth import AuthExtension
from .chunking import Chunking
from .dsn import Dsn
from .eightbitmime import EightBitMime
from .enhancedstatuscodes import EnhancedStatusCodes
from .pipelining import Pipelining
from .size import Size
from .smtputf8 import SmtpUtf8
from .starttls import StartTlsExtension

__all__ = [
    "EXTENSIONS",
    "AuthExtension",
    "BuildContext",
    "Chunking",
    "Dsn",
    "EightBitMime",
    "EnhancedStatusCodes",
    "Extension",
    "Pipelining",
    "SessionFacts",
    "Size",
    "SmtpUtf8",
    "StartTlsExtension",
    "build_extensions",
]


@dataclasses.dataclass(frozen=True, slots=True)
class BuildContext:
    """What the server knows beyond ``ProtocolLimits`` when it builds extensions."""

    # Asked at each EHLO: whether anyone can authenticate (users exist).
    auth_available: Callable[[], bool] | None = None


Switch = Callable[[ProtocolLimits], bool]
Factory = Callable[[ProtocolLimits, BuildContext], Extension]

# One row per extension, in the order EHLO lists them: whether the limits
# switch it on, and how to build it from them.
EXTENSIONS: tuple[tuple[Switch, Factory], ...] = (
    (lambda lim: lim.pipelining, lambda lim, ctx: Pipelining()),
    # RFC 1870: SIZE is always offered ("SIZE 0" when there is no fixed limit).
    (lambda lim: True, lambda lim, ctx: Size(lim.max_message_size)),
    (lambda lim: lim.starttls, lambda lim, ctx: StartTlsExtension()),
    (
        lambda lim: bool(lim.auth_mechanisms),
        lambda lim, ctx: AuthExtension(lim.auth_mechanisms, lim.auth_plaintext, ctx.auth_available),
    ),
    (lambda lim: lim.enhancedstatuscodes, lambda lim, ctx: EnhancedStatusCodes()),
    (lambda lim: lim.eightbitmime, lambda lim, ctx: EightBitMime()),
    (lambda lim: lim.dsn, lambda lim, ctx: Dsn()),
    (lambda lim: lim.smtputf8, lambda lim, ctx: SmtpUtf8()),
    (lambda lim: lim.chunking, lambda lim, ctx: Chunking()),
)


def build_extensions(
    limits: ProtocolLimits, auth_available: Callable[[], bool] | None = None
) -> tuple[Extension, ...]:
    """The extensions enabled by configuration, in the order EHLO lists them.

    ``auth_available`` is asked at each EHLO whether AUTH can succeed (users
    exist); without it AUTH is offered whenever its mechanisms are configured.
    """
    ctx = BuildContext(auth_available)
    return tuple(build(limits, ctx) for switch, build in EXTENSIONS if switch(limits))
