"""What a TLS handshake negotiated and who the server's certificate names.

This module owns :class:`TLSInfo` (protocol, cipher, subject, issuer, names,
expiry, whether the chain was verified) and reading it from a finished
handshake (:func:`tls_info`) or a DER certificate
(:func:`describe_certificate`). ``cryptography`` is imported only when a
certificate is described.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ssl
from typing import cast

__all__ = ["TLSInfo", "describe_certificate", "tls_info"]


@dataclasses.dataclass(frozen=True, slots=True)
class TLSInfo:
    """The TLS session: protocol, cipher, the server's certificate, verification."""

    version: str
    cipher: str
    bits: int
    verified: bool
    subject: str | None = None
    issuer: str | None = None
    names: tuple[str, ...] = ()
    not_after: dt.datetime | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.version,
            "cipher": self.cipher,
            "bits": self.bits,
            "verified": self.verified,
            "subject": self.subject,
            "issuer": self.issuer,
            "names": list(self.names),
            "not_after": self.not_after.isoformat() if self.not_after else None,
        }


def describe_certificate(der: bytes | None) -> dict[str, object]:
    """Subject, issuer, names and expiry of a DER certificate (empty when absent)."""
    if not der:
        return {}
    from cryptography import x509
    from cryptography.x509.oid import ExtensionOID

    cert = x509.load_der_x509_certificate(der)
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        pass
    else:
        value = cast(x509.SubjectAlternativeName, san.value)
        names.extend(value.get_values_for_type(x509.DNSName))
        names.extend(str(ip) for ip in value.get_values_for_type(x509.IPAddress))
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "names": tuple(names),
        "not_after": cert.not_valid_after_utc,
    }


def tls_info(ssl_object: ssl.SSLObject | None, verified: bool) -> TLSInfo | None:
    """What a finished handshake negotiated, and the peer's certificate."""
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher() or ("", "", 0)
    details = describe_certificate(ssl_object.getpeercert(binary_form=True))
    not_after = details.get("not_after")
    return TLSInfo(
        version=ssl_object.version() or "",
        cipher=cipher[0],
        bits=int(cipher[2] or 0),
        verified=verified,
        subject=cast("str | None", details.get("subject")),
        issuer=cast("str | None", details.get("issuer")),
        names=cast("tuple[str, ...]", details.get("names", ())),
        not_after=not_after if isinstance(not_after, dt.datetime) else None,
    )
