"""The Received trace header (RFC 5321 section 4.4), built as raw bytes.

The header is prepended to the message as it arrives; the message itself is
never parsed or re-serialised. The protocol keyword in the ``with`` clause
follows RFC 3848 (SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA) and RFC 6531 section
3.7.3 (UTF8SMTP, UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA).
"""

from __future__ import annotations

import email.utils
import functools
import re
import time
from datetime import UTC, datetime

from ..protocol import is_address_literal, is_domain


def protocol_keyword(esmtp: bool, tls: bool, auth: bool = False, utf8: bool = False) -> str:
    """The RFC 3848 / RFC 6531 ``with`` keyword for a session."""
    if not esmtp:
        return "SMTP"
    base = "UTF8SMTP" if utf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if auth else "")


_date_cache: tuple[int, str] = (0, "")


def rfc5322_date(now: float | None = None) -> str:
    """``Sat, 28 Nov 2026 13:30:00 +0000``; cached per second."""
    global _date_cache
    seconds = int(time.time() if now is None else now)
    if _date_cache[0] != seconds:
        stamp = datetime.fromtimestamp(seconds, UTC)
        _date_cache = (seconds, email.utils.format_datetime(stamp))
    return _date_cache[1]


# Keep the header one token per field: no spaces, no controls, no comment delimiters.
_UNSAFE = str.maketrans({c: "?" for c in [*map(chr, range(33)), "\x7f", "(", ")", "\\", ";"]})


def _clean(text: str) -> str:
    text = text.translate(_UNSAFE)
    if text.isascii():
        return text
    # Unicode line separators and other non-printing characters never reach
    # the header raw (RFC 5322 section 2.2: a field body is one logical line).
    return "".join(c if c.isprintable() else "?" for c in text)


def _a_label(name: str) -> str | None:
    """``name`` with its U-labels as A-labels (IDNA); None when it has no such form."""
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return None


# Characters that make an address unfit for the ``for`` clause (a parser
# splitting the header at ";" or reading comments would be misled), and
# the ASCII controls, space and DEL.
_NOT_IN_FOR = re.compile(r'[\x00-\x20\x7f;()"\\<>,\[\]]')


def _plain_address(address: str, utf8: bool) -> bool:
    """True for an address the ``for`` clause can carry as it is."""
    local, at, domain = address.rpartition("@")
    if at and domain.startswith("[") and domain.endswith("]"):
        address = f"{local}@{domain[1:-1]}"  # an address literal's brackets are its own
    if _NOT_IN_FOR.search(address):
        return False
    # Non-ASCII only in a UTF-8 message (RFC 6532), and only printable.
    return address.isascii() or (utf8 and address.isprintable())


@functools.lru_cache(maxsize=1024)
def _from_line(greeting_name: str, client_ip: str, client_name: str | None) -> str:
    """The header's first line (the same for every message of a session: cached)."""
    literal = f"[IPv6:{client_ip}]" if ":" in client_ip else f"[{client_ip}]"
    # RFC 6531 section 3.7.1: the EHLO domain belongs in A-label form; a
    # client that sent U-labels is written as it should have said it.
    name = _clean(_a_label(greeting_name) or greeting_name.encode("ascii", "replace").decode())
    if not (is_domain(name, utf8=True) or is_address_literal(name)):
        # RFC 5321 section 4.4: From-domain must be a domain; keep what the
        # client said as a comment and use its address instead.
        tcp_info = f"{literal} helo={name}"
        name = literal
    else:
        tcp_info = f"{_clean(client_name) if client_name else 'unknown'} {literal}"
    return f"Received: from {name} ({tcp_info})"


def received_header(
    *,
    greeting_name: str,
    client_ip: str,
    client_name: str | None,
    server_name: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    tls: dict[str, str] | None = None,
    auth_user: str | None = None,
    now: float | None = None,
    utf8: bool = False,
) -> bytes:
    """One Received header, folded, CRLF-terminated.

    ``utf8``: the message travels under SMTPUTF8, so a UTF-8 recipient may
    appear in the ``for`` clause.
    """
    lines = [_from_line(greeting_name, client_ip, client_name)]
    if auth_user is not None:
        # The authenticated identity, as a comment (RFC 5321 section 4.4 allows CFWS).
        lines.append(f"\t(authenticated as {_clean(auth_user)})")
    lines.append(f"\tby {_clean(server_name)} (ehlo) with {protocol} id {queue_id}")
    if tls:
        lines.append(f"\t(using {tls.get('version', '?')} with cipher {tls.get('cipher', '?')})")
    date = rfc5322_date(now)
    # RFC 5321 section 4.4: the "for" clause is optional; it is left out for
    # a quoted local part or any character a parser could take for syntax
    # (";", comments, quotes, line breaks, non-ASCII outside SMTPUTF8), since
    # quoting it would still leave readers that split at the first ";" misled.
    if recipient is not None and _plain_address(recipient, utf8):
        lines.append(f"\tfor <{recipient}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
