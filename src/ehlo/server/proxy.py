"""The PROXY protocol header that a trusted proxy sends before the SMTP conversation.

A load balancer such as HAProxy that relays TCP connections can prepend a
header carrying the real client's address (HAProxy's "PROXY protocol",
versions 1 and 2, https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt;
section numbers in the comments below refer to that text). This module owns
parsing that header:

- ``parse_header`` decodes a header from the start of a buffer: ``None`` while
  more bytes are needed, ``(ProxyInfo, consumed)`` once it is complete, and a
  one-line ``ProxyError`` as soon as the bytes cannot be a valid header.
- ``read_header`` reads exactly the header's bytes from a connected socket and
  never one byte more: in SMTP the server speaks first, so whatever follows the
  header (nothing, or a TLS ClientHello on an implicit-TLS port) stays in the
  socket for the next reader.

Whether a listener expects the header is configuration, never guessed from the
data (section 5): a listener that expects it must refuse connections without it.

Version 2 headers may be up to 16 + 65535 octets long; headers longer than
``MAX_V2_HEADER`` (4096) octets are refused to bound the memory a connection can
make us hold. Real headers are far smaller: addresses take at most 216 octets
and the TLVs that proxies send (ALPN, authority, unique id, TLS details) a few
hundred more.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import struct
from dataclasses import dataclass, field

__all__ = [
    "MAX_V1_HEADER",
    "MAX_V2_HEADER",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V2_SIGNATURE",
    "ProxyError",
    "ProxyInfo",
    "parse_header",
    "read_header",
]

# proxy-protocol.txt 2.1: the longest v1 line ("PROXY UNKNOWN" + two full IPv6
# addresses and ports), CRLF included.
MAX_V1_HEADER = 107
# The longest v2 header accepted (the protocol allows 16 + 65535 octets).
MAX_V2_HEADER = 4096
# proxy-protocol.txt 2.2: the 12-octet signature that starts every v2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

# proxy-protocol.txt 2.2: registered TLV types (the values are passed on as they are).
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20

_V1_PREFIX = b"PROXY "
# proxy-protocol.txt 2.1: the shortest v1 line, "PROXY UNKNOWN\r\n".
_V1_MIN = 15
_V2_FIXED = 16
# Both versions' shortest headers exceed this many octets, so reading it first
# never reads past a header (proxy-protocol.txt 2.2: "8 or above" tells them apart).
_PROBE = 8
_CR = 0x0D

_V2_LOCAL = 0x0
_V2_PROXY = 0x1
_AF_UNSPEC = 0x00
_TCP4 = 0x11
_TCP6 = 0x21
_UNIX_STREAM = 0x31
# proxy-protocol.txt 2.2: address block sizes of the families we accept.
_ADDRESS_SIZE = {_AF_UNSPEC: 0, _TCP4: 12, _TCP6: 36, _UNIX_STREAM: 216}
# proxy-protocol.txt 2.2: UDP over IPv4/IPv6 and UNIX datagrams; not SMTP.
_DATAGRAM = frozenset({0x12, 0x22, 0x32})

# proxy-protocol.txt 2.1: exactly 4 decimal numbers, no heading zeroes (the
# range 0-255 is checked by ipaddress).
_V1_IPV4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
# proxy-protocol.txt 2.1: hex groups and colons (one "::"); ipaddress checks the
# form and the 128 bits. Dots allow the IPv4-mapped form; no "%zone".
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}")
# proxy-protocol.txt 2.1: a decimal port without heading zeroes.
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


class ProxyError(ValueError):
    """The bytes are not a valid PROXY protocol header (a one-line reason)."""


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """A decoded PROXY protocol header.

    ``command`` is ``"PROXY"`` when the header names the real client, else
    ``"LOCAL"`` (v2 LOCAL, v1 UNKNOWN): use the connection's own addresses.
    ``source`` and ``destination`` are ``(ip, port)`` with the ip as text
    (IPv4-mapped IPv6 addresses as IPv4), or ``None`` when the header carries
    no usable address (LOCAL, v1 UNKNOWN, AF_UNSPEC, AF_UNIX); then the
    connection's own addresses apply too. ``tlvs`` maps v2 TLV types to their
    values (the first of repeated types; no NOOP; empty for v1 and LOCAL).
    """

    version: int
    command: str
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: dict[int, bytes] = field(default_factory=dict)


def parse_header(data: bytes | bytearray) -> tuple[ProxyInfo, int] | None:
    """Decode the PROXY header at the start of ``data``.

    Returns ``None`` while ``data`` is a valid but incomplete beginning,
    ``(info, consumed)`` once the header is complete (bytes after ``consumed``
    are not looked at), and raises ``ProxyError`` as soon as ``data`` cannot
    start a valid header.
    """
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] == V2_SIGNATURE[:n]:
        if n < len(V2_SIGNATURE):
            return None
        return _parse_v2(data)
    n = min(len(data), len(_V1_PREFIX))
    if data[:n] == _V1_PREFIX[:n]:
        if n < len(_V1_PREFIX):
            return None
        return _parse_v1(data)
    # proxy-protocol.txt 2.2: anything else is not covered, drop the connection.
    if data[:4] == V2_SIGNATURE[:4]:
        raise ProxyError("bad PROXY v2 signature")
    raise ProxyError("no PROXY header")


async def read_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float
) -> ProxyInfo:
    """Read and decode the PROXY header from a connected non-blocking socket.

    Reads with ``loop.sock_recv`` exactly the header's bytes, never more, so
    that the data after it stays in the socket: first 8 octets (less than
    either version's shortest header), then for v2 the rest of the fixed part
    and the length it announces, for v1 up to the shortest line and then one or
    two octets at a time until CRLF (two only when the last octet is not CR).

    Raises ``ProxyError`` on invalid data or when the peer closes first,
    ``TimeoutError`` when the header is not complete within ``timeout``
    seconds overall; socket errors (``OSError``) propagate.
    """
    buf = bytearray()
    async with asyncio.timeout(timeout):
        while True:
            result = parse_header(buf)
            if result is not None:
                return result[0]
            chunk = await loop.sock_recv(sock, _safe_read_size(buf))
            if not chunk:
                if buf:
                    raise ProxyError("connection closed inside the PROXY header")
                raise ProxyError("connection closed before a PROXY header")
            buf += chunk


def _safe_read_size(buf: bytearray) -> int:
    """How many octets may be read without reading past a valid header.

    ``buf`` is an incomplete beginning that ``parse_header`` accepted.
    """
    n = len(buf)
    if n < _PROBE:
        return _PROBE - n
    if buf.startswith(V2_SIGNATURE[:_PROBE]):
        if n < _V2_FIXED:
            return _V2_FIXED - n
        return _V2_FIXED + int.from_bytes(buf[14:16], "big") - n
    if n < _V1_MIN:
        return _V1_MIN - n
    # A valid line ends at the first CRLF: after a CR it may end with the next
    # octet; otherwise at least two more octets ("\r\n") belong to it.
    return 1 if buf[-1] == _CR else 2


# -- version 1 ---------------------------------------------------------------------------


def _parse_v1(data: bytes | bytearray) -> tuple[ProxyInfo, int] | None:
    """Decode a v1 line; ``data`` starts with "PROXY "."""
    # proxy-protocol.txt 2.1: the line ends at CRLF within the first 107 octets.
    lf = data.find(b"\n", 0, MAX_V1_HEADER)
    if lf < 0:
        if len(data) >= MAX_V1_HEADER:
            raise ProxyError("PROXY v1 header too long")
        return None
    # proxy-protocol.txt 2.1: a single CR or LF must not end the line.
    if data[lf - 1] != _CR:
        raise ProxyError("PROXY v1 header not ended by CRLF")
    consumed = lf + 1
    line = bytes(data[len(_V1_PREFIX) : lf - 1])
    protocol, _, rest = line.partition(b" ")
    if protocol == b"UNKNOWN":
        # proxy-protocol.txt 2.1: the receiver must ignore the rest of an UNKNOWN
        # line and use the real connection's parameters.
        return ProxyInfo(1, "LOCAL", None, None, {}), consumed
    if protocol == b"TCP4":
        version = 4
    elif protocol == b"TCP6":
        version = 6
    else:
        # proxy-protocol.txt 2.1: only TCP4, TCP6 and UNKNOWN exist.
        raise ProxyError("bad PROXY v1 protocol")
    # proxy-protocol.txt 2.1: four fields separated by exactly one space.
    fields = rest.split(b" ")
    if len(fields) != 4:
        raise ProxyError("bad PROXY v1 header: not 4 fields separated by single spaces")
    source = _v1_address(fields[0], version)
    destination = _v1_address(fields[1], version)
    return (
        ProxyInfo(
            1,
            "PROXY",
            (source, _v1_port(fields[2])),
            (destination, _v1_port(fields[3])),
            {},
        ),
        consumed,
    )


def _v1_address(text: bytes, version: int) -> str:
    """A v1 address of the announced family, as normalised text."""
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    try:
        if version == 4:
            # proxy-protocol.txt 2.1: dotted quad in decimal, no heading zeroes.
            if not _V1_IPV4.fullmatch(text):
                raise ValueError(text)
            address = ipaddress.IPv4Address(text.decode("ascii"))
        else:
            # proxy-protocol.txt 2.1: IPv6 text form, exactly 128 bits.
            if not _V1_IPV6.fullmatch(text):
                raise ValueError(text)
            address = ipaddress.IPv6Address(text.decode("ascii"))
    except ValueError:
        raise ProxyError(f"bad PROXY v1 IPv{version} address") from None
    return _address_text(address)


def _v1_port(text: bytes) -> int:
    """A v1 port: decimal 0-65535 without heading zeroes."""
    # proxy-protocol.txt 2.1: decimal in [0..65535], no heading zeroes.
    if not _V1_PORT.fullmatch(text) or int(text) > 0xFFFF:
        raise ProxyError("bad PROXY v1 port")
    return int(text)


# -- version 2 ---------------------------------------------------------------------------


def _parse_v2(data: bytes | bytearray) -> tuple[ProxyInfo, int] | None:
    """Decode a v2 header; ``data`` starts with the 12-octet signature."""
    n = len(data)
    command = _V2_LOCAL
    if n > 12:
        # proxy-protocol.txt 2.2: the version nibble must be 2.
        if data[12] >> 4 != 2:
            raise ProxyError("bad PROXY v2 version")
        # proxy-protocol.txt 2.2: command 0 LOCAL or 1 PROXY; drop anything else.
        command = data[12] & 0x0F
        if command not in (_V2_LOCAL, _V2_PROXY):
            raise ProxyError("bad PROXY v2 command")
    # proxy-protocol.txt 2.2: with LOCAL the family is ignored.
    if n > 13 and command == _V2_PROXY:
        family = data[13]
        if family in _DATAGRAM:
            # proxy-protocol.txt 2.2: unsupported combinations fall back to UNSPEC,
            # which the receiver may reject; a datagram is no SMTP connection.
            raise ProxyError("PROXY v2 datagram transport not accepted")
        if family not in _ADDRESS_SIZE:
            # proxy-protocol.txt 2.2: other families and protocols must be rejected.
            raise ProxyError("bad PROXY v2 address family")
    if n < _V2_FIXED:
        return None
    # proxy-protocol.txt 2.2: the header is exactly 16 + this length octets.
    (length,) = struct.unpack_from("!H", data, 14)
    total = _V2_FIXED + length
    if total > MAX_V2_HEADER:
        raise ProxyError(f"PROXY v2 header too long ({total} octets, limit {MAX_V2_HEADER})")
    if n < total:
        return None
    if command == _V2_LOCAL:
        # proxy-protocol.txt 2.2: LOCAL uses the real endpoints and discards the
        # protocol block, whatever its length.
        return ProxyInfo(2, "LOCAL", None, None, {}), total
    header = bytes(data[:total])
    family = header[13]
    size = _ADDRESS_SIZE[family]
    if length < size:
        # proxy-protocol.txt 2.2: the length covers the family's address block.
        raise ProxyError("PROXY v2 address block too short")
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    block = header[_V2_FIXED : _V2_FIXED + size]
    if family == _TCP4:
        # proxy-protocol.txt 2.2: 4-octet addresses, then 2-octet ports.
        src, dst, sport, dport = struct.unpack("!4s4sHH", block)
        source = (_address_text(ipaddress.IPv4Address(src)), sport)
        destination = (_address_text(ipaddress.IPv4Address(dst)), dport)
    elif family == _TCP6:
        # proxy-protocol.txt 2.2: 16-octet addresses, then 2-octet ports.
        src, dst, sport, dport = struct.unpack("!16s16sHH", block)
        source = (_address_text(ipaddress.IPv6Address(src)), sport)
        destination = (_address_text(ipaddress.IPv6Address(dst)), dport)
    # AF_UNSPEC and AF_UNIX (proxy-protocol.txt 2.2): no IP address to report;
    # the connection's own addresses apply.
    tlvs = _parse_tlvs(header, _V2_FIXED + size)
    return ProxyInfo(2, "PROXY", source, destination, tlvs), total


def _parse_tlvs(header: bytes, offset: int) -> dict[int, bytes]:
    """The TLVs from ``offset`` to the end of ``header``, checking a CRC32C TLV."""
    tlvs: dict[int, bytes] = {}
    pos = offset
    end = len(header)
    while pos < end:
        # proxy-protocol.txt 2.2: type (1 octet), length (2 octets), value.
        if end - pos < 3:
            raise ProxyError("truncated PROXY v2 TLV")
        kind = header[pos]
        (size,) = struct.unpack_from("!H", header, pos + 1)
        start = pos + 3
        stop = start + size
        if stop > end:
            raise ProxyError("PROXY v2 TLV overruns the header")
        value = header[start:stop]
        if kind == PP2_TYPE_CRC32C:
            _check_crc32c(header, start, value)
        # proxy-protocol.txt 2.2.4: NOOP is padding, to be ignored.
        if kind != PP2_TYPE_NOOP:
            tlvs.setdefault(kind, value)
        pos = stop
    return tlvs


def _check_crc32c(header: bytes, start: int, value: bytes) -> None:
    """proxy-protocol.txt 2.2.3: verify the CRC32C TLV whose value is at ``start``."""
    if len(value) != 4:
        raise ProxyError("bad PROXY v2 CRC32C TLV length")
    # proxy-protocol.txt 2.2.3: the checksum of the header with this field zeroed.
    zeroed = header[:start] + b"\x00\x00\x00\x00" + header[start + 4 :]
    if _crc32c(zeroed) != int.from_bytes(value, "big"):
        raise ProxyError("PROXY v2 CRC32C checksum mismatch")


def _crc32c_table() -> tuple[int, ...]:
    """The byte table of CRC-32C (Castagnoli, reflected polynomial 0x82F63B78)."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def _crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (RFC 4960 appendix B)."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _address_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as text; an IPv4-mapped IPv6 address as its IPv4 form."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
