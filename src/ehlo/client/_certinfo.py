"""What a TLS handshake negotiated and who the server's certificate names.

This module owns :class:`TLSInfo` (protocol, cipher, subject, issuer, names,
expiry, whether the chain was verified, and whether it would have been),
reading it from a finished handshake (:func:`tls_info`) or a DER
certificate (:func:`describe_certificate`), and :func:`would_verify`: after
a handshake that did not verify (opportunistic TLS encrypts without
authenticating, RFC 7435), the chain the server sent is checked against the
same trust anchors and server name, so that a report can say whether it
would have verified and why not. ``cryptography`` is imported only when a
certificate is described or checked.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import ssl
import warnings
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.x509 import verification

__all__ = ["TLSInfo", "describe_certificate", "peer_chain", "tls_info", "would_verify"]


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
    # Whether the certificate is trusted for the server name: True when the
    # handshake verified it or the check after an unverified one passed,
    # False when that check failed (``verify_error`` says why), None when
    # nobody checked.
    trusted: bool | None = None
    verify_error: str | None = None

    @property
    def verdict(self) -> str:
        """One phrase for a transcript or report: verified, or why not."""
        if self.verified:
            return "verified"
        if self.trusted:
            return "not verified by the TLS policy; it would verify"
        if self.trusted is False:
            return f"not verified by the TLS policy; it would not verify: {self.verify_error}"
        return "not verified"

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.version,
            "cipher": self.cipher,
            "bits": self.bits,
            "verified": self.verified,
            "trusted": self.trusted,
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


def tls_info(
    ssl_object: ssl.SSLObject | None,
    verified: bool,
    *,
    trust: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> TLSInfo | None:
    """What a finished handshake negotiated, and the peer's certificate.

    When the handshake did not verify and ``trust`` (the context whose CA
    certificates a verifying handshake would use) and ``server_name`` are
    given, the chain is checked with :func:`would_verify`.
    """
    if ssl_object is None:
        return None
    trusted: bool | None = True if verified else None
    verify_error: str | None = None
    if not verified and trust is not None and server_name:
        verify_error = would_verify(
            peer_chain(ssl_object), server_name, trust.get_ca_certs(binary_form=True)
        )
        trusted = verify_error is None
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
        trusted=trusted,
        verify_error=verify_error,
    )


def peer_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The certificates the server sent, leaf first, DER (only the leaf when unknown)."""
    # Python 3.13 has SSLObject.get_unverified_chain; 3.11 and 3.12 have it
    # on the underlying _ssl object.
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    chain: list[bytes] = []
    if getter is not None:
        try:
            for cert in getter() or ():
                chain.append(cert if isinstance(cert, bytes) else cert.public_bytes(_DER))
        except (ssl.SSLError, ValueError, AttributeError):
            chain = []
    if not chain:
        leaf = ssl_object.getpeercert(binary_form=True)
        if leaf:
            chain.append(leaf)
    return chain


_DER = 2  # _ssl.ENCODING_DER: the format argument of _ssl.Certificate.public_bytes


def would_verify(
    chain: list[bytes],
    server_name: str,
    anchors: list[bytes],
    *,
    now: dt.datetime | None = None,
) -> str | None:
    """None when ``chain`` (DER, leaf first) is valid for ``server_name``; else why not.

    The check is ``cryptography``'s path validation (RFC 5280: signatures,
    validity, issuers that are CAs) and name matching (RFC 6125) against
    ``anchors`` (DER CA certificates: the verifying context's), with the
    extensions judged as loosely as OpenSSL judges them in a handshake, not
    by the CA/Browser Forum's stricter profile. The reason is a short
    phrase: self-signed, expired, issued for other names, or no trusted
    issuer.
    """
    from cryptography import x509
    from cryptography.x509 import verification

    if not chain:
        return "the server sent no certificate"
    when = now or dt.datetime.now(dt.UTC)
    with warnings.catch_warnings():
        # Old roots with negative serial numbers load with a deprecation warning.
        warnings.simplefilter("ignore")
        try:
            certs = [x509.load_der_x509_certificate(der) for der in chain]
        except ValueError:
            return "the server's certificate cannot be parsed"
        roots = []
        for der in anchors:
            try:
                roots.append(x509.load_der_x509_certificate(der))
            except ValueError:
                continue
    leaf, intermediates = certs[0], certs[1:]
    if when > leaf.not_valid_after_utc:
        return f"certificate has expired ({leaf.not_valid_after_utc:%Y-%m-%d})"
    if when < leaf.not_valid_before_utc:
        return f"certificate is not yet valid ({leaf.not_valid_before_utc:%Y-%m-%d})"
    if not roots:
        return "no trusted CA certificates to check it against"
    store = verification.Store(roots)

    def check(name: str) -> str | None:
        subject: verification.Subject
        try:
            subject = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            subject = x509.DNSName(name)
        builder = (
            verification.PolicyBuilder()
            .store(store)
            .time(when)
            .extension_policies(ca_policy=_ca_policy(), ee_policy=_ee_policy())
        )
        try:
            builder.build_server_verifier(subject).verify(leaf, intermediates)
        except verification.VerificationError as exc:
            return str(exc)
        return None

    detail = check(server_name.rstrip(".").lower())
    if detail is None:
        return None
    names = _names(leaf)
    if not names:
        return "certificate names no host (no subjectAltName)"
    # Would it verify for a name it carries? Then only the name is wrong.
    if check(names[0].replace("*", "x", 1)) is None:
        return f"certificate is for {', '.join(names)}, not {server_name}"
    if leaf.issuer == leaf.subject:
        return "self-signed certificate"
    if "with no interior errors" in detail:  # no path to an anchor, nothing else wrong
        return "no trusted CA issued it"
    return f"no trusted CA issued it ({detail})"


def _ca_policy() -> verification.ExtensionPolicy:
    """An issuer must be a CA (RFC 5280 section 4.2.1.9); other extensions as they come."""
    from cryptography import x509
    from cryptography.x509 import verification

    def is_ca(_policy: object, _cert: object, ext: x509.BasicConstraints | None) -> None:
        if ext is None or not ext.ca:
            raise ValueError("the issuer is not a CA certificate (basicConstraints)")

    return verification.ExtensionPolicy.permit_all().require_present(
        x509.BasicConstraints, verification.Criticality.AGNOSTIC, is_ca
    )


def _ee_policy() -> verification.ExtensionPolicy:
    """The server's certificate names its hosts in subjectAltName (RFC 6125 section 6.4.4)."""
    from cryptography import x509
    from cryptography.x509 import verification

    return verification.ExtensionPolicy.permit_all().require_present(
        x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
    )


def _names(cert: x509.Certificate) -> list[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = list(san.get_values_for_type(x509.DNSName))
    names.extend(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return names
