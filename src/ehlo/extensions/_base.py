"""The extension base class and the facts an extension may look at."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..protocol._reply import Reply
from ..protocol._state import Transaction


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
