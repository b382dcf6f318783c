"""Server-side SASL for SMTP AUTH: PLAIN (RFC 4616) and LOGIN, sans-IO."""

from __future__ import annotations

import base64

import pytest

from ehlo.auth import (
    MECHANISMS,
    Challenge,
    Credentials,
    SaslFailure,
    decode_response,
    new_mechanism,
)
from ehlo.auth.sasl import LoginMechanism, PlainMechanism, ServerMechanism

CANCELLED = SaslFailure(501, "5.0.0", "Authentication cancelled")
BAD_BASE64 = SaslFailure(501, "5.5.2", "Invalid base64 data")
MALFORMED_PLAIN = SaslFailure(501, "5.5.2", "Malformed PLAIN response")


def b64(data: bytes | str) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def mechanism(name: str) -> ServerMechanism:
    mech = new_mechanism(name)
    assert mech is not None
    return mech


# --------------------------------------------------------------------------
# decode_response and the registry


@pytest.mark.parametrize(
    ("line", "result"),
    [
        ("dGVzdA==", b"test"),
        ("=", b""),
        ("", b""),
        ("*", CANCELLED),
        ("dGVzdA", BAD_BASE64),  # missing padding
        ("dGVz dA==", BAD_BASE64),
        ("dGVzdA==x", BAD_BASE64),
        ("!!!!", BAD_BASE64),
        ("d\u00e9ja", BAD_BASE64),  # not ASCII
    ],
)
def test_decode_response(line: str, result: bytes | SaslFailure) -> None:
    assert decode_response(line) == result


def test_mechanisms() -> None:
    assert MECHANISMS == ("PLAIN", "LOGIN")
    assert isinstance(new_mechanism("plain"), PlainMechanism)
    assert isinstance(new_mechanism("Login"), LoginMechanism)
    assert new_mechanism("CRAM-MD5") is None
    assert new_mechanism("") is None
    assert mechanism("PLAIN").name == "PLAIN" and mechanism("LOGIN").name == "LOGIN"
    assert new_mechanism("PLAIN") is not new_mechanism("PLAIN")  # one per exchange


def test_credentials_repr_hides_the_password() -> None:
    creds = Credentials("", "alice", "s3cret")
    assert "s3cret" not in repr(creds) and "alice" in repr(creds)


# --------------------------------------------------------------------------
# PLAIN


def test_plain_initial_response() -> None:
    result = mechanism("PLAIN").start(b64("\0alice\0s3cret"))
    assert result == Credentials(authzid="", username="alice", password="s3cret")


def test_plain_without_initial_response() -> None:
    mech = mechanism("PLAIN")
    assert mech.start(None) == Challenge(b"")
    assert mech.step(b64("\0alice\0s3cret")) == Credentials("", "alice", "s3cret")
    assert isinstance(mech.step(b64("\0alice\0s3cret")), SaslFailure)  # already finished


def test_plain_with_authzid_and_utf8() -> None:
    result = mechanism("PLAIN").start(b64("admin\0j\u00f6rg\0p\u00e4ss \u2168"))
    assert result == Credentials("admin", "j\u00f6rg", "p\u00e4ss \u2168")


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"alice",
        b"alice\0s3cret",  # one NUL
        b"\0alice\0s3cret\0",  # three
        b"\0\0s3cret",  # empty authcid
        b"\0alice\0",  # empty password
        b"\0al\xffice\0s3cret",  # not UTF-8
    ],
)
def test_plain_malformed(message: bytes) -> None:
    assert mechanism("PLAIN").start(b64(message) or "=") == MALFORMED_PLAIN


def test_plain_empty_initial_response() -> None:
    assert mechanism("PLAIN").start("=") == MALFORMED_PLAIN


@pytest.mark.parametrize(
    "message",
    [b"a" * 256 + b"\0alice\0pw", b"\0" + b"a" * 256 + b"\0pw", b"\0alice\0" + b"p" * 256],
)
def test_plain_fields_over_255_octets(message: bytes) -> None:
    result = mechanism("PLAIN").start(b64(message))
    assert isinstance(result, SaslFailure)
    assert (result.code, result.enhanced) == (501, "5.5.2")
    assert "255" in result.text


def test_plain_fields_of_255_octets() -> None:
    name, password = "n" * 255, "\u00e9" * 127 + "x"  # 255 octets in UTF-8
    result = mechanism("PLAIN").start(b64(f"{name}\0{name}\0{password}"))
    assert result == Credentials(name, name, password)


def test_plain_cancel_and_bad_base64() -> None:
    mech = mechanism("PLAIN")
    assert mech.start(None) == Challenge(b"")
    assert mech.step("*") == CANCELLED
    assert mechanism("PLAIN").start("*") == CANCELLED
    assert mechanism("PLAIN").start("not base64!") == BAD_BASE64
    mech = mechanism("PLAIN")
    mech.start(None)
    assert mech.step("AGFsaWNlAHMzY3JldA") == BAD_BASE64  # padding missing


# --------------------------------------------------------------------------
# LOGIN


def test_login_two_steps() -> None:
    mech = mechanism("LOGIN")
    assert mech.start(None) == Challenge(b"Username:")
    assert mech.step(b64("alice")) == Challenge(b"Password:")
    assert mech.step(b64("s3cret \u00e9")) == Credentials("", "alice", "s3cret \u00e9")
    assert isinstance(mech.step(b64("again")), SaslFailure)


def test_login_initial_response_is_the_username() -> None:
    mech = mechanism("LOGIN")
    assert mech.start(b64("alice")) == Challenge(b"Password:")
    assert mech.step(b64("s3cret")) == Credentials("", "alice", "s3cret")


@pytest.mark.parametrize("at", [0, 1])
def test_login_cancel(at: int) -> None:
    mech = mechanism("LOGIN")
    mech.start(None)
    if at:
        mech.step(b64("alice"))
    assert mech.step("*") == CANCELLED
    assert isinstance(mech.step(b64("x")), SaslFailure)  # the exchange is over


def test_login_bad_base64_and_utf8() -> None:
    mech = mechanism("LOGIN")
    assert mech.start("%%%") == BAD_BASE64
    mech = mechanism("LOGIN")
    mech.start(None)
    result = mech.step(b64(b"\xff\xfe"))
    assert isinstance(result, SaslFailure) and (result.code, result.enhanced) == (501, "5.5.2")


def test_login_empty_response() -> None:
    mech = mechanism("LOGIN")
    assert mech.start("=") == Challenge(b"Password:")
    assert mech.step("") == Credentials("", "", "")
