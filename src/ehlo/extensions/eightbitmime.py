"""8BITMIME (RFC 6152): MAIL ... BODY=7BIT|8BITMIME."""

from __future__ import annotations

from ..protocol import Extension, Reply, Transaction


class EightBitMime(Extension):
    """Advertise 8BITMIME and accept the BODY parameter."""

    keyword = "8BITMIME"
    mail_params = frozenset({"BODY"})

    def mail_param(self, name: str, value: str | None, tx: Transaction) -> Reply | None:
        body = (value or "").upper()
        # RFC 6152 section 3: body-value ::= "7BIT" / "8BITMIME";
        # BINARYMIME belongs to RFC 3030 and is not offered.
        if body not in ("7BIT", "8BITMIME"):
            return Reply(501, "5.5.4", "Syntax: BODY=7BIT or BODY=8BITMIME")
        tx.body = body
        return None
