"""Names that look like a dynamic (residential, DHCP) address pool.

This module owns the ``dynamic`` heuristic: a host name built by an access
provider from the client's own address, such as ``192-0-2-7.dyn.example.net``
or ``c0000207.cust.example``. Such a name says the client is an end-user
connection rather than a mail server; the check is recorded only, never a
reason to refuse on its own.

Only the whole address counts: all four IPv4 octets (in order or reversed;
dotted, dashed or underscored, optionally zero-padded; concatenated and
zero-padded; or as eight hex digits), or all eight IPv6 groups (separated, as
32 hex digits, or the compressed form with ``-`` for ``:``). A name that
merely contains one octet (``mx7.example.org``) is not dynamic.
"""

from __future__ import annotations

import functools
import ipaddress
import re

__all__ = ["looks_dynamic"]

_SEP = r"[-._]"


def _octet(value: int) -> str:
    """An octet in decimal, with or without zero padding to three digits."""
    forms = {str(value), f"{value:02d}", f"{value:03d}"}
    return "(?:" + "|".join(sorted(forms, key=len, reverse=True)) + ")"


def _separated(parts: list[str]) -> str:
    """``parts`` joined by one separator used throughout."""
    pattern = parts[0] + "(?P<sep>" + _SEP + ")"
    return pattern + "(?P=sep)".join(parts[1:])


def _ipv4_patterns(address: ipaddress.IPv4Address) -> list[re.Pattern[str]]:
    octets = list(address.packed)
    forward = [_octet(o) for o in octets]
    digits = "".join(f"{o:03d}" for o in octets)
    digits_reversed = "".join(f"{o:03d}" for o in reversed(octets))
    hex_forward = address.packed.hex()
    hex_reversed = address.packed[::-1].hex()
    decimal = [
        _separated(forward),
        _separated(forward[::-1]),
        re.escape(digits),
        re.escape(digits_reversed),
    ]
    hexadecimal = [re.escape(hex_forward), re.escape(hex_reversed)]
    # Not part of a longer run of digits (decimal) or hex digits (hex).
    return [re.compile(rf"(?<![0-9]){p}(?![0-9])") for p in decimal] + [
        re.compile(rf"(?<![0-9a-f]){p}(?![0-9a-f])") for p in hexadecimal
    ]


def _group(value: int) -> str:
    """A 16-bit group in hex, with or without zero padding to four digits."""
    forms = {f"{value:x}", f"{value:04x}"}
    return "(?:" + "|".join(sorted(forms, key=len, reverse=True)) + ")"


def _ipv6_patterns(address: ipaddress.IPv6Address) -> list[re.Pattern[str]]:
    packed = address.packed
    groups = [int.from_bytes(packed[i : i + 2], "big") for i in range(0, 16, 2)]
    patterns = [_separated([_group(g) for g in groups]), re.escape(packed.hex())]
    compressed = str(address)
    # 2001:db8::7 as 2001-db8--7; not when too little is left (::1 as --1).
    if "::" in compressed and len([g for g in compressed.split(":") if g]) >= 3:
        patterns.append(re.escape(compressed.replace(":", "-")))
    return [re.compile(rf"(?<![0-9a-f]){p}(?![0-9a-f])") for p in patterns]


@functools.lru_cache(maxsize=1024)
def _patterns(ip: str) -> tuple[re.Pattern[str], ...]:
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return ()
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return tuple(_ipv4_patterns(address.ipv4_mapped))
        return tuple(_ipv6_patterns(address))
    return tuple(_ipv4_patterns(address))


def looks_dynamic(name: str, ip: str) -> str | None:
    """The part of ``name`` that spells out the whole of ``ip``, or None.

    ``looks_dynamic("192-0-2-7.dyn.example.net", "192.0.2.7")`` gives
    ``"192-0-2-7"``; ``looks_dynamic("mx7.example.org", "192.0.2.7")`` gives
    None. Case is ignored; a malformed ``ip`` gives None.
    """
    text = name.strip().lower()
    for pattern in _patterns(ip):
        match = pattern.search(text)
        if match is not None:
            return match.group(0)
    return None
