"""Command syntax of RFC 5321 section 4.1.2, with the RFC 6531 UTF-8 extensions.

Pure functions over text: paths (reverse-path, forward-path, source routes),
mailboxes (dot-string and quoted local parts, domains, address literals) and
ESMTP parameters. Each failure raises :class:`SyntaxProblem` carrying the
reply the server should give, so that the connection answers it unchanged.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

from ._reply import Reply

_ALPHA_DIGIT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
# RFC 5322 section 3.2.3 atext, as used by RFC 5321 Atom.
_ATEXT = _ALPHA_DIGIT | frozenset("!#$%&'*+-/=?^_`{|}~")
_LDH = _ALPHA_DIGIT | frozenset("-")
_KEYWORD = _ALPHA_DIGIT | frozenset("-")

# RFC 5321 section 4.5.3.1.1-3: size limits of the parts of a path.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class SyntaxProblem(Exception):
    """A syntax error, with the reply that explains it."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def _bad(code: int, enhanced: str, text: str) -> SyntaxProblem:
    return SyntaxProblem(Reply(code, enhanced, text))


# Unicode categories that never belong in a name or an address: controls
# (C1 included), format characters, line and paragraph separators, private
# use, surrogates and unassigned code points, and non-ASCII spaces.
_NON_PRINTING = frozenset({"Cc", "Cf", "Zl", "Zp", "Zs", "Co", "Cs", "Cn"})


def is_printable_utf8(ch: str) -> bool:
    """True for a non-ASCII character that prints (RFC 5198 section 2: no controls)."""
    return ord(ch) >= 0x80 and unicodedata.category(ch) not in _NON_PRINTING


def _is_utf8_char(ch: str) -> bool:
    # RFC 6531 section 3.3: UTF8-non-ascii extends atext, qtext and sub-domain;
    # RFC 6530 section 10.1 (via RFC 5198): never line separators or controls.
    return is_printable_utf8(ch)


# Fast paths for the common all-ASCII case (the character loops below stay the
# reference for UTF-8 input).
_ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_ASCII_DOT_STRING = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_ASCII_DOMAIN = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


def is_dot_string(text: str, utf8: bool = False) -> bool:
    """RFC 5321 Dot-string: atoms of atext joined by single dots."""
    if not text:
        return False
    if text.isascii():
        return _ASCII_DOT_STRING.fullmatch(text) is not None
    for atom in text.split("."):
        if not atom:
            return False
        for ch in atom:
            if ch not in _ATEXT and not (utf8 and _is_utf8_char(ch)):
                return False
    return True


def quoted_string_end(text: str, utf8: bool = False) -> int:
    """Index just past the closing quote of a Quoted-string at ``text[0]``; -1 if none."""
    if not text.startswith('"'):
        return -1
    i = 1
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            # RFC 5321 quoted-pairSMTP = %d92 %d32-126
            if i + 1 >= n or not (32 <= ord(text[i + 1]) <= 126):
                return -1
            i += 2
            continue
        if ch == '"':
            return i + 1
        code = ord(ch)
        # qtextSMTP = %d32-33 / %d35-91 / %d93-126
        if not (32 <= code <= 126) and not (utf8 and is_printable_utf8(ch)):
            return -1
        i += 1
    return -1


def is_domain(text: str, utf8: bool = False) -> bool:
    """RFC 5321 Domain: sub-domains of letters, digits and inner hyphens."""
    if not text or len(text) > MAX_DOMAIN:
        return False
    if text.isascii():
        return _ASCII_DOMAIN.fullmatch(text) is not None
    for label in text.split("."):
        if not label or label[0] == "-" or label[-1] == "-":
            return False
        for ch in label:
            if ch not in _LDH and not (utf8 and _is_utf8_char(ch)):
                return False
    return True


_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")


def parse_address_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    """Parse ``[IPv4]``, ``[IPv6:...]`` or ``[tag:content]`` (RFC 5321 section 4.1.3).

    Returns the address, or the general literal's text; raises ValueError.
    """
    if len(text) < 3 or text[0] != "[" or text[-1] != "]":
        raise ValueError("not an address literal")
    inner = text[1:-1]
    if inner[:5].upper() == "IPV6:":
        body = inner[5:]
        # RFC 5321 section 4.1.3: IPv6-addr has hex digits, ":" and "." only
        # (Python's parser would also take a "%zone" suffix).
        if not body or any(c not in _IPV6_CHARS for c in body):
            raise ValueError("bad IPv6 address literal")
        return ipaddress.IPv6Address(body)
    if ":" in inner:
        tag, _, content = inner.partition(":")
        # General-address-literal = Standardized-tag ":" 1*dcontent
        if not tag or any(c not in _LDH for c in tag) or tag[-1] == "-" or not content:
            raise ValueError("bad general address literal")
        if any(not (33 <= ord(c) <= 90 or 94 <= ord(c) <= 126) for c in content):
            raise ValueError("bad general address literal")
        return inner
    parts = inner.split(".")
    # IPv4-address-literal = Snum 3("." Snum); Snum = 1*3DIGIT, 0 through 255
    if len(parts) != 4 or any(not p.isascii() or not p.isdigit() or len(p) > 3 for p in parts):
        raise ValueError("bad IPv4 address literal")
    if any(int(p) > 255 for p in parts):
        raise ValueError("bad IPv4 address literal")
    return ipaddress.IPv4Address(".".join(str(int(p)) for p in parts))


def is_address_literal(text: str) -> bool:
    """True for a well-formed RFC 5321 address literal."""
    try:
        parse_address_literal(text)
    except ValueError:
        return False
    return True


def parse_mailbox(text: str, utf8: bool, *, sender: bool) -> str:
    """Validate ``Local-part "@" (Domain / address-literal)``; return it unchanged."""
    enh = "5.1.7" if sender else "5.1.3"
    what = "sender" if sender else "recipient"
    if text.startswith('"'):
        end = quoted_string_end(text, utf8)
        if end < 0:
            raise _bad(501, enh, f"Bad {what} address syntax: unterminated quoted local part")
        local, rest = text[:end], text[end:]
        if not rest.startswith("@"):
            raise _bad(501, enh, f"Bad {what} address syntax: expected @ after the local part")
        domain = rest[1:]
    else:
        local, at, domain = text.partition("@")
        if not at:
            raise _bad(501, enh, f"Bad {what} address syntax: missing @domain")
        if not is_dot_string(local, utf8):
            raise _bad(501, enh, f"Bad {what} address syntax: invalid local part")
    if (len(local) if local.isascii() else len(local.encode("utf-8"))) > MAX_LOCAL_PART:
        # RFC 5321 section 4.5.3.1.1: local-part at most 64 octets.
        raise _bad(501, enh, f"Bad {what} address: local part longer than 64 octets")
    if domain.startswith("["):
        if not is_address_literal(domain):
            raise _bad(501, enh, f"Bad {what} address syntax: invalid address literal")
    elif not is_domain(domain, utf8):
        raise _bad(501, enh, f"Bad {what} address syntax: invalid domain")
    return text


def parse_path(text: str, *, sender: bool, utf8: bool) -> str:
    """Parse ``<[A-d-l:]Mailbox>`` (``<>`` too for a sender); return the mailbox.

    Source routes (A-d-l) are accepted and ignored (RFC 5321 section 4.1.1.3,
    appendix C). Returns "" for the null reverse-path.
    """
    enh = "5.1.7" if sender else "5.1.3"
    what = "sender" if sender else "recipient"
    if (len(text) if text.isascii() else len(text.encode("utf-8"))) > MAX_PATH:
        # RFC 5321 section 4.5.3.1.3: a path is at most 256 octets.
        raise _bad(501, enh, f"Bad {what} address: path longer than 256 octets")
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise _bad(501, "5.5.4", f"Syntax: {'MAIL FROM' if sender else 'RCPT TO'}:<address>")
    inner = text[1:-1]
    if not inner:
        if sender:
            return ""  # RFC 5321 section 4.5.5: the null reverse-path
        raise _bad(501, enh, "Bad recipient address syntax: empty address")
    if inner.startswith("@"):
        route, colon, mailbox = inner.partition(":")
        if not colon:
            raise _bad(501, enh, f"Bad {what} address syntax: source route without ':'")
        for hop in route.split(","):
            if not hop.startswith("@") or not is_domain(hop[1:], utf8):
                raise _bad(501, enh, f"Bad {what} address syntax: invalid source route")
        inner = mailbox
    if not sender and inner.lower() == "postmaster":
        # RFC 5321 section 4.1.1.3: "<Postmaster>" without a domain is valid.
        return inner
    return parse_mailbox(inner, utf8, sender=sender)


def _quoted_path_end(rest: str) -> int:
    """Index of the first '>' outside a quoted local part of ``<...``; -1 if none."""
    i = 1
    n = len(rest)
    while i < n:
        ch = rest[i]
        if ch == '"':
            j = i + 1
            while j < n and rest[j] != '"':
                j += 2 if rest[j] == "\\" else 1
            i = j + 1
            continue
        if ch == ">":
            return i
        i += 1
    return -1


def split_path(arg: str, prefix: str) -> tuple[str, str]:
    """Split ``FROM:<path> params`` into the path and the parameter text.

    The keyword is case-insensitive; a space after the colon is tolerated (a
    common client deviation that loses no information).
    """
    if arg[: len(prefix)].upper() != prefix:
        raise _bad(501, "5.5.4", f"Syntax: expected {prefix}<address>")
    rest = arg[len(prefix) :].lstrip(" ")
    if not rest.startswith("<"):
        path, _, params = rest.partition(" ")
        return path, params.strip(" ")
    # The path ends at the first '>' outside a quoted local part.
    end = rest.find(">") if '"' not in rest else _quoted_path_end(rest)
    if end < 0:
        raise _bad(501, "5.5.4", f"Syntax: {prefix}<address> is missing '>'")
    path, params = rest[: end + 1], rest[end + 1 :]
    if params and not params.startswith(" "):
        raise _bad(501, "5.5.4", "Syntax: expected a space before parameters")
    return path, params.strip(" ")


def _shown(keyword: str) -> str:
    """A parameter keyword as a reply quotes it: short enough that the line
    stays within 512 octets (RFC 5321 section 4.5.3.1.5)."""
    key = keyword.upper()
    return key if len(key) <= 40 else key[:40] + "..."


def parse_params(text: str, utf8: bool = False) -> dict[str, str | None]:
    """Parse ``esmtp-param *(SP esmtp-param)``; keywords upper-cased.

    RFC 5321 section 4.1.2: keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-"),
    value = 1*(%d33-60 / %d62-126); RFC 6531 section 3.3 adds UTF-8 to values.
    """
    params: dict[str, str | None] = {}
    if not text:
        return params
    for token in text.split(" "):
        if not token:
            continue  # several spaces in a row: tolerated
        keyword, eq, value = token.partition("=")
        if not keyword or keyword[0] == "-" or any(c not in _KEYWORD for c in keyword):
            raise _bad(501, "5.5.4", f"Bad parameter keyword: {keyword[:40]!r}")
        if eq:
            if not value:
                raise _bad(501, "5.5.4", f"Empty value for parameter {_shown(keyword)}")
            for ch in value:
                code = ord(ch)
                if not (33 <= code <= 126 and ch != "=") and not (utf8 and is_printable_utf8(ch)):
                    raise _bad(501, "5.5.4", f"Bad value for parameter {_shown(keyword)}")
        key = keyword.upper()
        if key in params:
            raise _bad(501, "5.5.4", f"Parameter {_shown(key)} given twice")
        params[key] = value if eq else None
    return params
