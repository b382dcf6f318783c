"""SCRAM-SHA-256 for the client (RFC 5802, RFC 7677), without channel binding.

This module owns the two client messages of the exchange and the check of
the server's signature: :func:`scram_client_first` and
:func:`scram_client_final`. User names and passwords go through SASLprep
(RFC 4013) first. No I/O: the client sends what these return.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from ..saslprep import saslprep

__all__ = ["sasl_prepare", "scram_client_final", "scram_client_first"]

# SCRAM: refuse iteration counts that would only burn CPU.
_SCRAM_MAX_ITERATIONS = 1_000_000


def sasl_prepare(text: str) -> str:
    """RFC 4013 SASLprep of a user name or password (ValueError when it is refused)."""
    try:
        return saslprep(text)
    except ValueError as exc:
        raise ValueError(f"SASLprep: the text {exc}") from None


def scram_client_first(user: str, nonce: str) -> str:
    """RFC 5802 section 7: the client-first-message (no channel binding: ``n,,``)."""
    name = sasl_prepare(user).replace("=", "=3D").replace(",", "=2C")
    return f"n,,n={name},r={nonce}"


def scram_client_final(client_first: str, server_first: str, password: str) -> tuple[str, bytes]:
    """RFC 5802 section 3 with SHA-256 (RFC 7677): the client-final-message and the
    server signature expected in the server-final-message."""
    attrs = dict(part.split("=", 1) for part in server_first.split(",") if "=" in part)
    if "m" in attrs:
        raise ValueError("SCRAM server asks for an unsupported extension (m=)")
    nonce, salt_b64, count = attrs.get("r", ""), attrs.get("s", ""), attrs.get("i", "")
    client_nonce = client_first.rsplit("r=", 1)[1]
    # RFC 5802 section 5.1: the server nonce starts with the client's.
    if not nonce.startswith(client_nonce) or len(nonce) <= len(client_nonce):
        raise ValueError("SCRAM server nonce does not extend the client nonce")
    if not count.isdigit() or not 0 < int(count) <= _SCRAM_MAX_ITERATIONS:
        raise ValueError(f"SCRAM iteration count out of range: {count!r}")
    salt = base64.b64decode(salt_b64, validate=True)
    salted = hashlib.pbkdf2_hmac("sha256", sasl_prepare(password).encode(), salt, int(count))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = f"c=biws,r={nonce}"  # biws = base64("n,,")
    auth_message = f"{client_first[3:]},{server_first},{without_proof}".encode()
    signature = hmac.digest(stored_key, auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    server_signature = hmac.digest(server_key, auth_message, "sha256")
    final = f"{without_proof},p={base64.b64encode(proof).decode()}"
    return final, server_signature
