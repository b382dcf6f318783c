"""Host names and ``host:port`` text: the one validator and the one parser.

``is_hostname`` says whether a name is a DNS host name; ``parse_hostport``
splits ``HOST:PORT``, ``[IPv6]:PORT`` and a bare IPv6 address into a host and
a port, and ``format_hostport`` writes them back. Configuration, the
resolver and the greeting checks use these instead of their own copies.
The SMTP syntax of a greeting or mailbox domain (RFC 5321 section 4.1.2)
is the protocol core's business, not this module's.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = ["format_hostport", "is_hostname", "parse_hostport"]

# RFC 1123 section 2.1: letters, digits and hyphens, not at either end.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
# As above with underscores, which DNS names carry (_dmarc, _spf, SRV owners).
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")
# RFC 1035 section 2.3.4: a name of at most 255 octets on the wire, 253 as text.
MAX_NAME = 253


def is_hostname(name: str, *, underscore: bool = False) -> bool:
    """Whether ``name`` is a syntactically valid DNS host name (RFC 1123).

    One trailing dot is allowed. Labels are 1 to 63 letters, digits and
    hyphens (and underscores with ``underscore``), not starting or ending
    with a hyphen; the whole name is at most 253 characters. ASCII only:
    convert U-labels to A-labels first.
    """
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > MAX_NAME:
        return False
    label = _DNS_LABEL if underscore else _LABEL
    return all(label.match(part) for part in name.split("."))


def parse_hostport(
    text: str,
    default_port: int | None = None,
    *,
    min_port: int = 1,
    shown: str | None = None,
) -> tuple[str, int]:
    """``HOST:PORT``, ``[IP]:PORT``, ``HOST``, ``[IP]`` or a bare IPv6 address as (host, port).

    The host comes back as written (without brackets; empty for ``:PORT``):
    whether it must be an address, a name or ``localhost`` is the caller's
    rule. An address in brackets must be an IP address, and a host with more
    than one colon must be a bare IPv6 address. ``default_port`` is the port
    when none is written (it is not range-checked: 0 can stand for "none
    given"); ``None`` makes the port required. A written port must be an
    integer from ``min_port`` to 65535.

    Raises ``ValueError`` with a one-line message quoting ``shown`` (the
    text as the user wrote it; ``text`` by default).
    """
    quoted = repr(text if shown is None else shown)
    value = text.strip()
    port_text: str | None
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")) or (not rest and default_port is None):
            raise ValueError(f"expected [IPv6]:PORT, got {quoted}")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"expected an IP address in brackets, got {quoted}") from None
        port_text = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    elif ":" in value:
        if default_port is None:
            raise ValueError(f"write IPv6 addresses as [ADDR]:PORT, got {quoted}")
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise ValueError(f"expected HOST[:PORT] or [IPv6]:PORT, got {quoted}") from None
        host, port_text = value, None
    else:
        if default_port is None:
            raise ValueError(f"expected HOST:PORT, got {quoted}")
        host, port_text = value, None
    if port_text is None:
        return host, default_port if default_port is not None else 0
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port must be a number, got {quoted}") from None
    if not min_port <= port <= 65535:
        raise ValueError(f"port out of range in {quoted}")
    return host, port


def format_hostport(host: str, port: int) -> str:
    """``HOST:PORT``, with an IPv6 address in brackets (``[::1]:25``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
