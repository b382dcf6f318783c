"""SIZE (RFC 1870): the declared maximum message size and MAIL SIZE=n."""

from __future__ import annotations

from ..protocol import Extension, Reply, Transaction


class Size(Extension):
    """Advertise ``SIZE n`` and check ``MAIL ... SIZE=n`` against it."""

    keyword = "SIZE"
    mail_params = frozenset({"SIZE"})

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def ehlo_line(self) -> str:
        # RFC 1870 section 4: "SIZE 0" (or no value) means no fixed limit.
        return f"SIZE {self.limit}"

    def mail_param(self, name: str, value: str | None, tx: Transaction) -> Reply | None:
        # RFC 1870 section 5: size-value ::= 1*20DIGIT
        if value is None or not value.isascii() or not value.isdigit() or len(value) > 20:
            return Reply(501, "5.5.4", "Syntax: SIZE=<number of octets>")
        declared = int(value)
        if self.limit and declared > self.limit:
            # RFC 1870 section 6.1: 552 when the declared size exceeds the fixed limit.
            return Reply(
                552, "5.3.4", f"Message size exceeds fixed maximum message size ({self.limit})"
            )
        tx.declared_size = declared
        return None
