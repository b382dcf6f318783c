"""The extension base class and the facts an extension may look at.

The core knows service extensions only through this class: the verbs an
extension enables, the MAIL/RCPT parameters it owns, the SASL mechanisms it
accepts and what offering it changes in the session (enhanced status codes,
pipelining, UTF-8). The concrete extensions live in ``ehlo.extensions``; the
server hands the ones it offers to :class:`~ehlo.protocol.ServerConnection`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ._reply import Reply
from ._state import Transaction


@dataclasses.dataclass(frozen=True, slots=True)
class SessionFacts:
    """What decides whether an extension is offered in a session."""

    tls_active: bool


class Extension:
    """One service extension: advertised, enabling verbs, owning parameters."""

    keyword: ClassVar[str] = ""
    verbs: ClassVar[frozenset[str]] = frozenset()
    mail_params: ClassVar[frozenset[str]] = frozenset()
    rcpt_params: ClassVar[frozenset[str]] = frozenset()
    # What offering the extension changes in the rest of the session:
    # replies carry RFC 3463 codes (RFC 2034 section 3),
    enables_enhanced_codes: ClassVar[bool] = False
    # the client may send commands without waiting (RFC 2920 section 3.1),
    enables_pipelining: ClassVar[bool] = False
    # UTF-8 in the greeting name and in MAIL's parameters (RFC 6531).
    enables_utf8: ClassVar[bool] = False
    # The SASL mechanisms the AUTH verb accepts (RFC 4954 section 4).
    mechanisms: tuple[str, ...] = ()

    def ehlo_line(self) -> str:
        """The line in the EHLO reply (keyword and its parameters)."""
        return self.keyword

    def offered(self, facts: SessionFacts) -> bool:
        """Whether the extension is offered in a session with these facts."""
        return True

    def mail_param(self, name: str, value: str | None, tx: Transaction) -> Reply | None:
        """Check and record one MAIL parameter it owns; a Reply refuses the MAIL."""
        return None

    def rcpt_param(self, name: str, value: str | None, tx: Transaction) -> Reply | None:
        """Check and record one RCPT parameter it owns; a Reply refuses the RCPT."""
        return None
