"""STARTTLS (RFC 3207): offered until TLS is active, then never again."""

from __future__ import annotations

from ..protocol import Extension, SessionFacts


class StartTlsExtension(Extension):
    """Advertise STARTTLS and enable its verb while the session is plaintext."""

    keyword = "STARTTLS"
    verbs = frozenset({"STARTTLS"})

    def offered(self, facts: SessionFacts) -> bool:
        # RFC 3207 section 4.2: STARTTLS is not offered after a successful handshake.
        return not facts.tls_active
