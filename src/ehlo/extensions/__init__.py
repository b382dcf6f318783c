"""SMTP service extensions, each declared once.

An :class:`Extension` names its EHLO keyword, the verbs it enables and the
MAIL/RCPT parameters it owns. The server connection builds its EHLO reply,
its verb table and its parameter table from the extensions offered in the
session, so an extension that is not offered cannot be used: its verb gets
502 and its parameters 555 (RFC 5321 section 4.1.1.11, RFC 1869).
"""

from __future__ import annotations

from ..config import ProtocolLimits
from ._base import Extension, SessionFacts
from .auth import AuthExtension
from .chunking import Chunking
from .eightbitmime import EightBitMime
from .enhancedstatuscodes import EnhancedStatusCodes
from .pipelining import Pipelining
from .size import Size
from .smtputf8 import SmtpUtf8
from .starttls import StartTlsExtension

__all__ = [
    "AuthExtension",
    "Chunking",
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


def build_extensions(limits: ProtocolLimits) -> tuple[Extension, ...]:
    """The extensions enabled by configuration, in the order EHLO lists them."""
    exts: list[Extension] = []
    if limits.pipelining:
        exts.append(Pipelining())
    exts.append(Size(limits.max_message_size))
    if limits.starttls:
        exts.append(StartTlsExtension())
    if limits.auth_mechanisms:
        exts.append(AuthExtension(limits.auth_mechanisms, limits.auth_plaintext))
    if limits.enhancedstatuscodes:
        exts.append(EnhancedStatusCodes())
    if limits.eightbitmime:
        exts.append(EightBitMime())
    if limits.smtputf8:
        exts.append(SmtpUtf8())
    if limits.chunking:
        exts.append(Chunking())
    return tuple(exts)
