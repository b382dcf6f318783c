"""Server-side SASL mechanisms for SMTP AUTH (RFC 4954), sans-IO: PLAIN and LOGIN.

This module owns the exchange after ``AUTH <mechanism> [initial-response]``
up to the credentials: decoding the client's base64 lines, the challenges
to send, and the replies for a cancelled or malformed exchange. It does no
I/O and checks no password: the caller sends each :class:`Challenge` as a
``334`` line (base64-encoding its bytes), feeds each client line to
:meth:`ServerMechanism.step`, and verifies the :class:`Credentials` it
ends with (against :class:`ehlo.auth.UserStore`), refusing an
authorization identity other than the user's own.

Each call returns one of three things: a :class:`Challenge` (send it and
wait for the next line), :class:`Credentials` (the exchange is complete)
or a :class:`SaslFailure` (reply with it; the exchange is over).
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "CANCELLED",
    "INVALID_BASE64",
    "MECHANISMS",
    "Challenge",
    "Credentials",
    "LoginMechanism",
    "PlainMechanism",
    "SaslFailure",
    "ServerMechanism",
    "decode_response",
    "new_mechanism",
]


@dataclass(frozen=True)
class Credentials:
    """What the client authenticated with; the password is left out of ``repr``."""

    authzid: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Challenge:
    """A server challenge: raw bytes, sent base64-encoded in a ``334`` line."""

    data: bytes


@dataclass(frozen=True)
class SaslFailure:
    """The exchange failed: reply ``code enhanced text``."""

    code: int
    enhanced: str
    text: str


Step = Challenge | Credentials | SaslFailure

# RFC 4954 section 4: "*" cancels the exchange, answered with 501.
CANCELLED = SaslFailure(501, "5.0.0", "Authentication cancelled")
# RFC 4954 section 4: a response that cannot be base64-decoded is refused with 501 5.5.2.
INVALID_BASE64 = SaslFailure(501, "5.5.2", "Invalid base64 data")
MALFORMED_PLAIN = SaslFailure(501, "5.5.2", "Malformed PLAIN response")
PLAIN_TOO_LONG = SaslFailure(501, "5.5.2", "PLAIN response field longer than 255 octets")
MALFORMED_LOGIN = SaslFailure(501, "5.5.2", "Malformed LOGIN response")
FINISHED = SaslFailure(503, "5.5.1", "Authentication exchange already finished")

MECHANISMS: tuple[str, ...] = ("PLAIN", "LOGIN")

# RFC 4616 section 2: authzid, authcid and passwd are each at most 255 octets.
PLAIN_FIELD_OCTETS = 255


class ServerMechanism(Protocol):
    """One SASL exchange, server side."""

    name: str

    def start(self, initial: str | None) -> Step:
        """Begin, with the initial response as sent (base64, ``=`` or ``*``) or None."""
        ...

    def step(self, line: str) -> Step:
        """Go on with the client's next line as sent (base64 or ``*``)."""
        ...


def decode_response(line: str) -> bytes | SaslFailure:
    """A client response decoded: strict base64; ``=`` is empty, ``*`` cancels."""
    if line == "*":
        return CANCELLED  # RFC 4954 section 4
    if line == "=":
        return b""  # RFC 4954 section 4: "=" is an empty initial response
    try:
        return binascii.a2b_base64(line, strict_mode=True)
    except (binascii.Error, ValueError):
        return INVALID_BASE64


class _Mechanism:
    """What PLAIN and LOGIN share: one start, steps until a result other than a challenge."""

    name: str = ""
    # RFC 4954 section 4: sent (in a "334" line) when AUTH came without an initial response.
    first_challenge: bytes = b""

    def __init__(self) -> None:
        self._started = False
        self._done = False

    def start(self, initial: str | None) -> Step:
        if self._started or self._done:
            return FINISHED
        self._started = True
        if initial is None:
            return Challenge(self.first_challenge)
        return self.step(initial)

    def step(self, line: str) -> Step:
        if self._done:
            return FINISHED
        data = decode_response(line)
        result = data if isinstance(data, SaslFailure) else self._take(data)
        if not isinstance(result, Challenge):
            self._done = True  # credentials or a failure: the exchange is over
        return result

    def _take(self, data: bytes) -> Step:
        raise NotImplementedError


class PlainMechanism(_Mechanism):
    """PLAIN (RFC 4616): one message ``[authzid] NUL authcid NUL passwd`` in UTF-8."""

    name = "PLAIN"
    first_challenge = b""  # RFC 4954 section 4: an empty challenge ("334 ")

    def _take(self, data: bytes) -> Step:
        return _parse_plain(data)


def _parse_plain(message: bytes) -> Credentials | SaslFailure:
    # RFC 4616 section 2: message = [authzid] UTF8NUL authcid UTF8NUL passwd
    parts = message.split(b"\x00")
    if len(parts) != 3:
        return MALFORMED_PLAIN
    authzid, authcid, passwd = parts
    # RFC 4616 section 2: authcid and passwd are 1*SAFE (not empty).
    if not authcid or not passwd:
        return MALFORMED_PLAIN
    # RFC 4616 section 2: each field is up to 255 octets.
    if any(len(part) > PLAIN_FIELD_OCTETS for part in parts):
        return PLAIN_TOO_LONG
    try:
        # RFC 4616 section 2: the fields are UTF-8.
        return Credentials(
            authzid=authzid.decode("utf-8"),
            username=authcid.decode("utf-8"),
            password=passwd.decode("utf-8"),
        )
    except UnicodeDecodeError:
        return MALFORMED_PLAIN


class LoginMechanism(_Mechanism):
    """LOGIN (draft-murchison-sasl-login): ``Username:`` then ``Password:``.

    An initial response is the user name (draft-murchison-sasl-login section 2).
    """

    name = "LOGIN"
    first_challenge = b"Username:"

    def __init__(self) -> None:
        super().__init__()
        self._username: str | None = None

    def _take(self, data: bytes) -> Step:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return MALFORMED_LOGIN
        if self._username is None:
            self._username = text
            return Challenge(b"Password:")
        return Credentials(authzid="", username=self._username, password=text)


_MECHANISMS: dict[str, type[_Mechanism]] = {
    "PLAIN": PlainMechanism,
    "LOGIN": LoginMechanism,
}


def new_mechanism(name: str) -> ServerMechanism | None:
    """A fresh exchange for mechanism ``name`` (any case), or None if unknown."""
    factory = _MECHANISMS.get(name.upper())
    return factory() if factory is not None else None
