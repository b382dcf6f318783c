"""SMTPUTF8 (RFC 6531): UTF-8 in mailboxes, signalled by MAIL ... SMTPUTF8."""

from __future__ import annotations

from ..protocol import Extension, Reply, Transaction


class SmtpUtf8(Extension):
    """Advertise SMTPUTF8 and accept its MAIL parameter."""

    keyword = "SMTPUTF8"
    mail_params = frozenset({"SMTPUTF8"})
    enables_utf8 = True

    def mail_param(self, name: str, value: str | None, tx: Transaction) -> Reply | None:
        # RFC 6531 section 3.4: the SMTPUTF8 parameter has no value.
        if value is not None:
            return Reply(501, "5.5.4", "SMTPUTF8 takes no value")
        tx.smtputf8 = True
        return None
