"""DSN (RFC 3461): delivery status notification requests on MAIL and RCPT.

The extension owns the MAIL parameters ``RET`` and ``ENVID`` and the RCPT
parameters ``NOTIFY`` and ``ORCPT``. It checks their syntax only; the values
stay as the client sent them (xtext still encoded): MAIL's in the
transaction's ``params``, each accepted recipient's in its
``rcpt_params`` entry, for whoever relays the message or writes a notice.

It also holds the xtext codec (RFC 3461 section 4) that those values use:
:func:`xtext_decode`, :func:`xtext_encode`, and :func:`parse_notify`.
"""

from __future__ import annotations

import re

from ..protocol import Extension, Reply, SyntaxProblem, Transaction, parse_path

__all__ = ["Dsn", "parse_notify", "xtext_decode", "xtext_encode"]

# RFC 3461 section 4.1: the notification conditions of a NOTIFY list.
NOTIFY_CONDITIONS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
# RFC 3461 section 4.3: what a failure notice returns of the message.
RET_VALUES = frozenset({"FULL", "HDRS"})
# RFC 3461 section 4.4: an ENVID value is at most 100 characters.
MAX_ENVID = 100
# RFC 3461 section 4.2: an ORCPT value is at most 500 characters.
MAX_ORCPT = 500

# RFC 3461 section 4: xchar is any printable ASCII character but "+" and "=";
# hexchar is "+" and two upper case hexadecimal digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
# RFC 5322 section 3.2.3: atext, the characters of an atom (addr-type).
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")
# RFC 6533 section 3: EmbeddedUnicodeChar, "\x{" HEXPOINT "}" (no leading zeros).
_EMBEDDED = re.compile(r"\\x\{([1-9A-Fa-f][0-9A-Fa-f]{0,5})\}")


def _xtext_octets(text: str) -> bytes:
    """The octets an xtext stands for; ValueError if ``text`` is not xtext."""
    if _XTEXT.fullmatch(text) is None:
        raise ValueError(f"not xtext: {text[:40]!r}")
    if "+" not in text:
        return text.encode("ascii")
    return _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), text).encode("latin-1")


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 xtext to the text it encodes (its octets read as UTF-8).

    ValueError when ``text`` is not xtext: a character outside 33..126, a
    plain "+" or "=", a "+" not followed by two upper case hexadecimal
    digits, or octets that are not UTF-8.
    """
    return _xtext_octets(text).decode("utf-8")


def xtext_encode(text: str) -> str:
    """Encode ``text`` (as UTF-8 octets) as RFC 3461 xtext."""
    # RFC 3461 section 4: "+", "=" and octets outside 33..126 become "+XX".
    return "".join(
        chr(octet) if 33 <= octet <= 126 and octet not in (0x2B, 0x3D) else f"+{octet:02X}"
        for octet in text.encode("utf-8")
    )


def parse_notify(value: str) -> frozenset[str]:
    """The conditions of a NOTIFY value, upper-cased; ValueError if malformed.

    RFC 3461 section 4.1: ``NEVER`` alone, or a comma-separated list of
    ``SUCCESS``, ``FAILURE`` and ``DELAY`` (in any letter case).
    """
    items = value.upper().split(",")
    if items == ["NEVER"]:
        return frozenset(items)
    # RFC 3461 section 4.1: NEVER must not be combined with other values.
    if "NEVER" in items:
        raise ValueError("NEVER must be the only NOTIFY value")
    for item in items:
        if item not in NOTIFY_CONDITIONS:
            raise ValueError(f"unknown NOTIFY value {item[:20]!r}")
    return frozenset(items)


def _utf8_address(text: str, utf8: bool) -> str:
    """The address a ``utf-8`` addr-type value stands for; ValueError if malformed.

    RFC 6533 section 3: utf-8-addr-xtext is QCHARs and ``\\x{HEXPOINT}``;
    utf-8-addr-unitext (only in an SMTPUTF8 transaction) adds UTF-8
    characters.
    """
    out: list[str] = []
    pos = 0
    for match in _EMBEDDED.finditer(text):
        out.append(text[pos : match.start()])
        point = int(match.group(1), 16)
        if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
            raise ValueError("\\x{...} is not a Unicode scalar value")
        out.append(chr(point))
        pos = match.end()
    out.append(text[pos:])
    for piece in out[::2]:  # the text between the embedded characters
        for ch in piece:
            if ch.isascii():
                # RFC 6533 section 3: QCHAR is printable ASCII but "+", "=" and "\".
                if not "!" <= ch <= "~" or ch in "+=\\":
                    raise ValueError(f"character {ch!r} must be written \\x{{{ord(ch):X}}}")
            elif not utf8:
                raise ValueError("non-ASCII characters need SMTPUTF8")
    return "".join(out)


def _is_address(address: str, utf8: bool) -> bool:
    try:
        parse_path(f"<{address}>", sender=False, utf8=utf8)
    except SyntaxProblem:
        return False
    return True


def _bad(text: str) -> Reply:
    return Reply(501, "5.5.4", text)


class Dsn(Extension):
    """Advertise DSN; check RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT."""

    keyword = "DSN"
    mail_params = frozenset({"RET", "ENVID"})
    rcpt_params = frozenset({"NOTIFY", "ORCPT"})

    def mail_param(self, name: str, value: str | None, tx: Transaction) -> Reply | None:
        if name == "RET":
            # RFC 3461 section 4.3: RET=FULL or RET=HDRS.
            if value is None or value.upper() not in RET_VALUES:
                return _bad("Syntax: RET=FULL or RET=HDRS")
            return None
        # RFC 3461 section 4.4: ENVID=xtext, at most 100 characters.
        if value is None:
            return _bad("Syntax: ENVID=<xtext>")
        if len(value) > MAX_ENVID:
            return _bad(f"ENVID longer than {MAX_ENVID} characters")
        try:
            _xtext_octets(value)
        except ValueError:
            return _bad("ENVID is not valid xtext")
        return None

    def rcpt_param(self, name: str, value: str | None, tx: Transaction) -> Reply | None:
        if name == "NOTIFY":
            if value is None:
                return _bad("Syntax: NOTIFY=NEVER or NOTIFY=SUCCESS,FAILURE,DELAY")
            try:
                parse_notify(value)
            except ValueError as exc:
                return _bad(f"Bad NOTIFY: {exc}")
            return None
        return self._orcpt(value, tx)

    @staticmethod
    def _orcpt(value: str | None, tx: Transaction) -> Reply | None:
        # RFC 3461 section 4.2: ORCPT=addr-type ";" xtext.
        if value is None or ";" not in value:
            return _bad("Syntax: ORCPT=addr-type;address")
        if len(value) > MAX_ORCPT:
            return _bad(f"ORCPT longer than {MAX_ORCPT} characters")
        addr_type, _, encoded = value.partition(";")
        if _ATOM.fullmatch(addr_type) is None:
            return _bad("ORCPT address type must be an atom")
        kind = addr_type.lower()
        if kind == "utf-8":
            # RFC 6533 section 3: the utf-8 address type and its encodings.
            try:
                address = _utf8_address(encoded, tx.smtputf8)
            except ValueError as exc:
                return _bad(f"Bad ORCPT utf-8 address: {exc}")
            if not _is_address(address, True):
                return _bad("ORCPT utf-8 value is not an address")
            return None
        if not encoded.isascii():
            # RFC 6533 section 3: UTF-8 addresses take the utf-8 address type.
            return _bad("ORCPT with non-ASCII characters needs the utf-8 address type")
        try:
            octets = _xtext_octets(encoded)
        except ValueError:
            return _bad("ORCPT address is not valid xtext")
        # RFC 3461 section 4.2: an rfc822 original recipient is an address.
        if kind == "rfc822" and not _is_address(octets.decode("utf-8", "replace"), tx.smtputf8):
            return _bad("ORCPT rfc822 value is not an address")
        return None
