"""The Received trace header (RFC 5321 section 4.4), built as raw bytes.

The header is prepended to the message as it arrives; the message itself is
never parsed or re-serialised. The protocol keyword in the ``with`` clause
follows RFC 3848 (SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA) and RFC 6531 section
3.7.3 (UTF8SMTP, UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA).
"""

from __future__ import annotations

import email.utils
import functools
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
    return text.translate(_UNSAFE)


@functools.lru_cache(maxsize=1024)
def _from_line(greeting_name: str, client_ip: str, client_name: str | None) -> str:
    """The header's first line (the same for every message of a session: cached)."""
    literal = f"[IPv6:{client_ip}]" if ":" in client_ip else f"[{client_ip}]"
    name = _clean(greeting_name)
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
) -> bytes:
    """One Received header, folded, CRLF-terminated."""
    lines = [_from_line(greeting_name, client_ip, client_name)]
    if auth_user is not None:
        # The authenticated identity, as a comment (RFC 5321 section 4.4 allows CFWS).
        lines.append(f"\t(authenticated as {_clean(auth_user)})")
    lines.append(f"\tby {_clean(server_name)} (ehlo) with {protocol} id {queue_id}")
    if tls:
        lines.append(
            f"\t(using {tls.get('version', '?')} with cipher {tls.get('cipher', '?')})"
        )
    date = rfc5322_date(now)
    if recipient is not None:
        lines.append(f"\tfor <{recipient}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
