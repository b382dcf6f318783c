"""AUTH (RFC 4954): the SASL mechanisms offered and MAIL's AUTH= parameter.

The exchange itself (334 challenges, the client's response lines) is run by
the protocol core and the session; this module decides when AUTH is offered
and checks the AUTH= parameter's syntax.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..protocol import Extension, Reply, SessionFacts, Transaction

# RFC 3461 section 4: xtext = *( xchar / hexchar ); xchar is "!" to "~"
# except "+" and "="; hexchar is "+" followed by two upper-case hex digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+\Z")


class AuthExtension(Extension):
    """Advertise ``AUTH PLAIN LOGIN`` (over TLS unless plaintext is allowed)."""

    keyword = "AUTH"
    verbs = frozenset({"AUTH"})
    mail_params = frozenset({"AUTH"})

    def __init__(
        self,
        mechanisms: tuple[str, ...],
        plaintext: bool = False,
        available: Callable[[], bool] | None = None,
    ) -> None:
        self.mechanisms = tuple(m.upper() for m in mechanisms)
        self.plaintext = plaintext
        # Asked at each EHLO: whether anyone can authenticate (users exist).
        self.available = available

    def ehlo_line(self) -> str:
        return "AUTH " + " ".join(self.mechanisms)

    def offered(self, facts: SessionFacts) -> bool:
        # RFC 4954 section 14 / RFC 4616 section 6: passwords travel only
        # inside TLS unless the operator explicitly allows otherwise.
        if not (facts.tls_active or self.plaintext):
            return False
        return self.available is None or self.available()

    def mail_param(self, name: str, value: str | None, tx: Transaction) -> Reply | None:
        # RFC 4954 section 5: AUTH=<> or AUTH=xtext(mailbox); the value is
        # recorded with the other parameters, and trusted only from an
        # authenticated client.
        if value is None or (value != "<>" and not _XTEXT.match(value)):
            return Reply(501, "5.5.4", "Syntax: AUTH=<> or AUTH=xtext-encoded mailbox")
        return None
