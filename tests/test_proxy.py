"""The PROXY protocol header (ehlo.server.proxy) and a real HAProxy sending it.

Hand-built v1 and v2 headers, valid and invalid, through ``parse_header``
(also split at every offset, and followed by more data); ``read_header`` over
TCP on loopback under asyncio and uvloop (never reading past the header,
timeouts, EOF); random bytes never raise anything but ``ProxyError``; and
HAProxy (tests/haproxy.py) relaying clients from 127.0.0.5 to a tiny backend
that reads the header with ``read_header``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import queue
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from ehlo.server.proxy import (
    MAX_V1_HEADER,
    MAX_V2_HEADER,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_UNIQUE_ID,
    V2_SIGNATURE,
    ProxyError,
    ProxyInfo,
    _crc32c,
    parse_header,
    read_header,
)

from .haproxy import HAProxyError, haproxy_available, haproxy_version, run_haproxy
from .helpers import ipv6_loopback, read_line

# ---------------------------------------------------------------------------------------
# Building headers


def v2(
    command: int = 1,
    family: int = 0x11,
    block: bytes = b"",
    *,
    version: int = 2,
    length: int | None = None,
) -> bytes:
    """A v2 header: signature, version/command, family, length, address block + TLVs."""
    size = len(block) if length is None else length
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", size) + block


def inet4(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A TCP over IPv4 address block."""
    return struct.pack(
        "!4s4sHH",
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
        sport,
        dport,
    )


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A TCP over IPv6 address block."""
    return struct.pack(
        "!16s16sHH",
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
        sport,
        dport,
    )


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def with_crc32c(header: bytes) -> bytes:
    """``header`` (ending in a zeroed CRC32C TLV) with its checksum filled in."""
    return header[:-4] + _crc32c(header).to_bytes(4, "big")


def info(
    version: int,
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    tlvs: dict[int, bytes] | None = None,
    command: str = "PROXY",
) -> ProxyInfo:
    return ProxyInfo(version, command, source, destination, tlvs or {})


LOCAL1 = info(1, None, None, command="LOCAL")
LOCAL2 = info(2, None, None, command="LOCAL")
FULL6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
UNIX_BLOCK = b"/run/a.sock".ljust(108, b"\x00") + b"/run/b.sock".ljust(108, b"\x00")
CRC_HEADER = with_crc32c(
    v2(block=inet4("10.0.0.1", "10.0.0.2", 1, 2) + tlv(PP2_TYPE_CRC32C, b"\x00" * 4))
)

# (id, header, expected): every header is complete and valid.
VALID: list[tuple[str, bytes, ProxyInfo]] = [
    (
        "v1-tcp4",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        info(1, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    ),
    (
        "v1-tcp4-longest",
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        info(1, ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
    ),
    (
        "v1-tcp4-zeroes",
        b"PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n",
        info(1, ("0.0.0.0", 0), ("10.0.0.1", 0)),
    ),
    (
        "v1-tcp6",
        b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 25\r\n",
        info(1, ("2001:db8::1", 1234), ("2001:db8::2", 25)),
    ),
    (
        "v1-tcp6-full-upper",
        b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:00A1 ::1 1 2\r\n",
        info(1, ("2001:db8::a1", 1), ("::1", 2)),
    ),
    (
        "v1-tcp6-longest",
        f"PROXY TCP6 {FULL6} {FULL6} 65535 65535\r\n".encode(),
        info(1, (FULL6, 65535), (FULL6, 65535)),
    ),
    (
        "v1-tcp6-mapped",
        b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:c000:208 40000 25\r\n",
        info(1, ("192.0.2.7", 40000), ("192.0.2.8", 25)),
    ),
    ("v1-unknown", b"PROXY UNKNOWN\r\n", LOCAL1),
    ("v1-unknown-addresses", b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n", LOCAL1),
    ("v1-unknown-garbage", b"PROXY UNKNOWN \x00\xff\r junk  \t\r\n", LOCAL1),
    (
        "v1-unknown-longest",
        f"PROXY UNKNOWN {FULL6} {FULL6} 65535 65535\r\n".encode(),
        LOCAL1,
    ),
    (
        "v2-tcp4",
        v2(block=inet4("192.0.2.1", "198.51.100.2", 40000, 25)),
        info(2, ("192.0.2.1", 40000), ("198.51.100.2", 25)),
    ),
    (
        "v2-tcp6",
        v2(family=0x21, block=inet6("2001:db8::1", "2001:db8::2", 65535, 0)),
        info(2, ("2001:db8::1", 65535), ("2001:db8::2", 0)),
    ),
    (
        "v2-tcp6-mapped",
        v2(family=0x21, block=inet6("::ffff:192.0.2.9", "::1", 5, 6)),
        info(2, ("192.0.2.9", 5), ("::1", 6)),
    ),
    (
        "v2-tlvs",
        v2(
            block=inet4("10.1.2.3", "10.4.5.6", 7, 8)
            + tlv(PP2_TYPE_ALPN, b"smtp")
            + tlv(PP2_TYPE_AUTHORITY, b"mx.example")
            + tlv(PP2_TYPE_UNIQUE_ID, b"")
            + tlv(0xE0, b"\x00\x01")
        ),
        info(
            2,
            ("10.1.2.3", 7),
            ("10.4.5.6", 8),
            {
                PP2_TYPE_ALPN: b"smtp",
                PP2_TYPE_AUTHORITY: b"mx.example",
                PP2_TYPE_UNIQUE_ID: b"",
                0xE0: b"\x00\x01",
            },
        ),
    ),
    (
        "v2-tlv-repeated-first-wins-noop-ignored",
        v2(
            block=inet4("10.0.0.1", "10.0.0.2", 1, 2)
            + tlv(PP2_TYPE_NOOP, b"")
            + tlv(PP2_TYPE_ALPN, b"first")
            + tlv(PP2_TYPE_NOOP, b"\x00" * 5)
            + tlv(PP2_TYPE_ALPN, b"second")
        ),
        info(2, ("10.0.0.1", 1), ("10.0.0.2", 2), {PP2_TYPE_ALPN: b"first"}),
    ),
    (
        "v2-crc32c",
        CRC_HEADER,
        info(2, ("10.0.0.1", 1), ("10.0.0.2", 2), {PP2_TYPE_CRC32C: CRC_HEADER[-4:]}),
    ),
    ("v2-local", v2(command=0, family=0x00), LOCAL2),
    (
        "v2-local-with-addresses",
        v2(command=0, family=0x11, block=inet4("10.0.0.1", "10.0.0.2", 1, 2)),
        LOCAL2,
    ),
    # proxy-protocol.txt 2.2: with LOCAL the family and the block are ignored.
    ("v2-local-family-ignored", v2(command=0, family=0x12, block=b"\xff" * 7), LOCAL2),
    ("v2-local-bad-family-ignored", v2(command=0, family=0x99, block=b""), LOCAL2),
    ("v2-unspec", v2(family=0x00), info(2, None, None)),
    (
        "v2-unspec-tlv",
        v2(family=0x00, block=tlv(PP2_TYPE_AUTHORITY, b"a.example")),
        info(2, None, None, {PP2_TYPE_AUTHORITY: b"a.example"}),
    ),
    ("v2-unix", v2(family=0x31, block=UNIX_BLOCK), info(2, None, None)),
    (
        "v2-longest-accepted",
        v2(block=inet4("10.0.0.1", "10.0.0.2", 1, 2) + tlv(0xE1, b"x" * (MAX_V2_HEADER - 31))),
        info(2, ("10.0.0.1", 1), ("10.0.0.2", 2), {0xE1: b"x" * (MAX_V2_HEADER - 31)}),
    ),
]
VALID_IDS = [case[0] for case in VALID]
VALID_BY_ID = {case[0]: case[1] for case in VALID}
FRAGMENTED = [
    "v1-tcp4", "v1-tcp6-longest", "v1-unknown", "v1-unknown-longest", "v2-tlvs", "v2-crc32c",
]

# (id, data, reason): each raises ProxyError with ``reason`` in its message.
INVALID: list[tuple[str, bytes, str]] = [
    # not a PROXY header at all
    ("smtp", b"EHLO client.example\r\n", "no PROXY header"),
    ("tls", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "no PROXY header"),
    ("http", b"GET / HTTP/1.1\r\n", "no PROXY header"),
    ("lowercase", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "no PROXY header"),
    ("no-space", b"PROXY\r\n", "no PROXY header"),
    ("tab", b"PROXY\tTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "no PROXY header"),
    ("first-byte", b"E", "no PROXY header"),
    ("v2-signature", b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x00", "bad PROXY v2 signature"),
    ("blank-lines", b"\r\n\r\nEHLO x\r\n", "bad PROXY v2 signature"),
    # v1 framing (proxy-protocol.txt 2.1)
    ("v1-too-long", b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "PROXY v1 header too long"),
    ("v1-no-crlf-in-107", b"PROXY TCP4 " + b"1" * 96, "PROXY v1 header too long"),
    ("v1-bare-lf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "not ended by CRLF"),
    ("v1-unknown-bare-lf", b"PROXY UNKNOWN\n", "not ended by CRLF"),
    ("v1-bare-cr", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\r\n", "bad PROXY v1 port"),
    ("v1-empty", b"PROXY \r\n", "bad PROXY v1 protocol"),
    ("v1-proto-lower", b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "bad PROXY v1 protocol"),
    ("v1-proto-udp", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "bad PROXY v1 protocol"),
    ("v1-unknownx", b"PROXY UNKNOWNX\r\n", "bad PROXY v1 protocol"),
    ("v1-two-spaces-first", b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "bad PROXY v1 protocol"),
    ("v1-no-fields", b"PROXY TCP4\r\n", "not 4 fields"),
    ("v1-no-fields-space", b"PROXY TCP4 \r\n", "not 4 fields"),
    ("v1-three-fields", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "not 4 fields"),
    ("v1-five-fields", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "not 4 fields"),
    ("v1-trailing-space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "not 4 fields"),
    ("v1-double-space", b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "not 4 fields"),
    ("v1-tab-separated", b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2 3\r\n", "bad PROXY v1 IPv4"),
    # v1 addresses (proxy-protocol.txt 2.1)
    ("v1-ipv4-heading-zero", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad PROXY v1 IPv4"),
    ("v1-ipv4-octal", b"PROXY TCP4 1.2.3.4 5.6.7.010 1 2\r\n", "bad PROXY v1 IPv4"),
    ("v1-ipv4-range", b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", "bad PROXY v1 IPv4"),
    ("v1-ipv4-short", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad PROXY v1 IPv4"),
    ("v1-ipv4-long", b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", "bad PROXY v1 IPv4"),
    ("v1-ipv4-empty-part", b"PROXY TCP4 1..3.4 5.6.7.8 1 2\r\n", "bad PROXY v1 IPv4"),
    ("v1-ipv4-name", b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", "bad PROXY v1 IPv4"),
    ("v1-ipv4-sign", b"PROXY TCP4 +1.2.3.4 5.6.7.8 1 2\r\n", "bad PROXY v1 IPv4"),
    ("v1-ipv4-in-tcp6", b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad PROXY v1 IPv6"),
    ("v1-ipv6-in-tcp4", b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad PROXY v1 IPv4"),
    ("v1-ipv4-arabic-digit", b"PROXY TCP4 \xd9\xa1.2.3.4 5.6.7.8 1 2\r\n", "bad PROXY v1 IPv4"),
    ("v1-ipv6-zone", b"PROXY TCP6 fe80::1%lo ::1 1 2\r\n", "bad PROXY v1 IPv6"),
    ("v1-ipv6-two-double", b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "bad PROXY v1 IPv6"),
    ("v1-ipv6-nine-groups", b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "bad PROXY v1 IPv6"),
    ("v1-ipv6-five-digits", b"PROXY TCP6 12345:: ::1 1 2\r\n", "bad PROXY v1 IPv6"),
    ("v1-ipv6-short", b"PROXY TCP6 1:2:3:4:5:6:7 ::1 1 2\r\n", "bad PROXY v1 IPv6"),
    ("v1-ipv6-brackets", b"PROXY TCP6 [::1] ::1 1 2\r\n", "bad PROXY v1 IPv6"),
    ("v1-ipv6-hex-g", b"PROXY TCP6 ::g ::1 1 2\r\n", "bad PROXY v1 IPv6"),
    # v1 ports (proxy-protocol.txt 2.1)
    ("v1-port-range", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad PROXY v1 port"),
    ("v1-port-huge", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999999\r\n", "bad PROXY v1 port"),
    ("v1-port-heading-zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad PROXY v1 port"),
    ("v1-port-zeroes", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n", "bad PROXY v1 port"),
    ("v1-port-negative", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad PROXY v1 port"),
    ("v1-port-plus", b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "bad PROXY v1 port"),
    ("v1-port-underscore", b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 2\r\n", "bad PROXY v1 port"),
    ("v1-port-hex", b"PROXY TCP4 1.2.3.4 5.6.7.8 0x19 2\r\n", "bad PROXY v1 port"),
    ("v1-port-name", b"PROXY TCP4 1.2.3.4 5.6.7.8 smtp 2\r\n", "bad PROXY v1 port"),
    ("v1-port-arabic", b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa2\xd9\xa5 2\r\n", "bad PROXY v1 port"),
    # v2 fixed part (proxy-protocol.txt 2.2)
    ("v2-version-1", v2(version=1), "bad PROXY v2 version"),
    ("v2-version-3", v2(version=3), "bad PROXY v2 version"),
    ("v2-version-0", v2(version=0), "bad PROXY v2 version"),
    ("v2-command-2", v2(command=2), "bad PROXY v2 command"),
    ("v2-command-f", v2(command=15), "bad PROXY v2 command"),
    ("v2-udp4", v2(family=0x12, block=inet4("1.2.3.4", "5.6.7.8", 1, 2)), "datagram"),
    ("v2-udp6", v2(family=0x22, block=inet6("::1", "::2", 1, 2)), "datagram"),
    ("v2-unix-dgram", v2(family=0x32, block=UNIX_BLOCK), "datagram"),
    ("v2-family-4", v2(family=0x41), "bad PROXY v2 address family"),
    ("v2-proto-3", v2(family=0x13), "bad PROXY v2 address family"),
    ("v2-inet-unspec", v2(family=0x10), "bad PROXY v2 address family"),
    ("v2-unspec-stream", v2(family=0x01), "bad PROXY v2 address family"),
    ("v2-ff", v2(family=0xFF), "bad PROXY v2 address family"),
    ("v2-too-long", v2(length=MAX_V2_HEADER - 15), "PROXY v2 header too long"),
    ("v2-longest-allowed-by-spec", v2(length=0xFFFF), "PROXY v2 header too long"),
    # v2 address block and TLVs (proxy-protocol.txt 2.2, 2.2.3)
    ("v2-tcp4-short", v2(block=inet4("1.2.3.4", "5.6.7.8", 1, 2)[:11]), "address block"),
    ("v2-tcp4-empty", v2(block=b""), "address block too short"),
    ("v2-tcp6-short", v2(family=0x21, block=inet4("1.2.3.4", "5.6.7.8", 1, 2)), "address block"),
    ("v2-unix-short", v2(family=0x31, block=UNIX_BLOCK[:-1]), "address block too short"),
    ("v2-tlv-1-byte", v2(block=inet4("1.2.3.4", "5.6.7.8", 1, 2) + b"\x01"), "truncated"),
    ("v2-tlv-2-bytes", v2(block=inet4("1.2.3.4", "5.6.7.8", 1, 2) + b"\x01\x00"), "truncated"),
    (
        "v2-tlv-overrun",
        v2(block=inet4("1.2.3.4", "5.6.7.8", 1, 2) + b"\x01\x00\x05abcd"),
        "TLV overruns",
    ),
    (
        "v2-tlv-overrun-after-good",
        v2(block=inet4("1.2.3.4", "5.6.7.8", 1, 2) + tlv(1, b"ok") + b"\x02\xff\xff"),
        "TLV overruns",
    ),
    ("v2-unspec-tlv-overrun", v2(family=0x00, block=b"\x02\x00\x09abc"), "TLV overruns"),
    ("v2-crc32c-mismatch", CRC_HEADER[:-1] + bytes([CRC_HEADER[-1] ^ 1]), "CRC32C checksum"),
    (
        "v2-crc32c-tampered",
        CRC_HEADER[:16] + inet4("10.0.0.9", "10.0.0.2", 1, 2) + CRC_HEADER[28:],
        "CRC32C checksum",
    ),
    (
        "v2-crc32c-length",
        v2(block=inet4("1.2.3.4", "5.6.7.8", 1, 2) + tlv(PP2_TYPE_CRC32C, b"\x00" * 3)),
        "CRC32C TLV length",
    ),
]
INVALID_IDS = [case[0] for case in INVALID]


# ---------------------------------------------------------------------------------------
# parse_header


@pytest.mark.parametrize(("header", "expected"), [c[1:] for c in VALID], ids=VALID_IDS)
def test_valid_header(header: bytes, expected: ProxyInfo) -> None:
    assert parse_header(header) == (expected, len(header))
    assert parse_header(bytearray(header)) == (expected, len(header))


@pytest.mark.parametrize(("header", "expected"), [c[1:] for c in VALID], ids=VALID_IDS)
def test_valid_header_followed_by_data(header: bytes, expected: ProxyInfo) -> None:
    for after in (b"\x16\x03\x01", b"EHLO x\r\n", b"\r\n", header, b"\n" * 200):
        assert parse_header(header + after) == (expected, len(header))


@pytest.mark.parametrize("header", [c[1] for c in VALID], ids=VALID_IDS)
def test_valid_header_split_at_every_offset(header: bytes) -> None:
    for cut in range(len(header)):
        assert parse_header(header[:cut]) is None, cut


@pytest.mark.parametrize(("data", "reason"), [c[1:] for c in INVALID], ids=INVALID_IDS)
def test_invalid_header(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyError, match=reason) as excinfo:
        parse_header(data)
    assert "\n" not in str(excinfo.value)
    # Whatever follows does not make it valid.
    with pytest.raises(ProxyError, match=reason):
        parse_header(data + b"PROXY UNKNOWN\r\n")


def test_proxy_error_is_value_error() -> None:
    assert issubclass(ProxyError, ValueError)


def test_v1_longest_lines_are_the_spec_lengths() -> None:
    # proxy-protocol.txt 2.1: 56, 104 and 107 characters.
    lengths = {case[0]: len(case[1]) for case in VALID}
    assert lengths["v1-tcp4-longest"] == 56
    assert lengths["v1-tcp6-longest"] == 104
    assert lengths["v1-unknown-longest"] == MAX_V1_HEADER == 107
    assert lengths["v1-unknown"] == 15


def test_v1_too_long_is_refused_without_waiting_for_more() -> None:
    # 106 octets without LF: still possible; 107: the CRLF can no longer come in time.
    assert parse_header(b"PROXY UNKNOWN " + b"x" * 92) is None
    with pytest.raises(ProxyError, match="too long"):
        parse_header(b"PROXY UNKNOWN " + b"x" * 93)
    # The line may end exactly at octet 107, not at 108.
    assert parse_header(b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n") == (LOCAL1, 107)


@pytest.mark.parametrize(
    ("prefix", "reason"),
    [
        (V2_SIGNATURE + b"\x11", "version"),
        (V2_SIGNATURE + b"\x23", "command"),
        (V2_SIGNATURE + b"\x21\x12", "datagram"),
        (V2_SIGNATURE + b"\x21\x44", "address family"),
        (V2_SIGNATURE + b"\x21\x11\x10\x00", "too long"),
        (b"\r\n\r\n\x00\r\nX", "bad PROXY v2 signature"),
        (b"X", "no PROXY header"),
        (b"PROXY\r", "no PROXY header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CRLF"),
    ],
)
def test_invalid_prefix_is_refused_at_once(prefix: bytes, reason: str) -> None:
    """Errors come as soon as the bytes show them, not once a whole header arrived."""
    with pytest.raises(ProxyError, match=reason):
        parse_header(prefix)


def test_empty_and_partial_signatures_need_more() -> None:
    assert parse_header(b"") is None
    for cut in range(1, 13):
        assert parse_header(V2_SIGNATURE[:cut]) is None
    for cut in range(1, 7):
        assert parse_header(b"PROXY "[:cut]) is None


def test_v2_local_length_is_skipped_whatever_it_is() -> None:
    # proxy-protocol.txt 2.2: receivers must not assume zero for LOCAL.
    header = v2(command=0, family=0x21, block=b"\x00" * 300)
    assert parse_header(header + b"next") == (LOCAL2, 316)


def test_crc32c_known_answer() -> None:
    # RFC 3720 B.4 / the usual check value of CRC-32C.
    assert _crc32c(b"123456789") == 0xE3069283
    assert _crc32c(b"\x00" * 32) == 0x8A9136AA


def test_proxy_info_is_frozen() -> None:
    header = parse_header(VALID[0][1])
    assert header is not None
    with pytest.raises(AttributeError):
        header[0].command = "LOCAL"  # type: ignore[misc]


ipv4s = st.ip_addresses(v=4)
ipv6s = st.ip_addresses(v=6)
ports = st.integers(min_value=0, max_value=65535)


def expected_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


address_pairs = st.tuples(ipv4s, ipv4s) | st.tuples(ipv6s, ipv6s)


@settings(max_examples=300, deadline=None)
@given(pair=address_pairs, sport=ports, dport=ports, v2_header=st.booleans())
def test_round_trip_addresses(
    pair: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]
    | tuple[ipaddress.IPv6Address, ipaddress.IPv6Address],
    sport: int,
    dport: int,
    v2_header: bool,
) -> None:
    src, dst = pair
    if v2_header:
        block = (inet4 if src.version == 4 else inet6)(str(src), str(dst), sport, dport)
        header = v2(family=0x11 if src.version == 4 else 0x21, block=block)
    else:
        text = src.exploded if sport % 2 else str(src)  # both IPv6 text forms
        header = f"PROXY TCP{src.version} {text} {dst} {sport} {dport}\r\n".encode()
    parsed = parse_header(header)
    assert parsed is not None
    got, consumed = parsed
    assert consumed == len(header)
    assert got.source == (expected_text(src), sport)
    assert got.destination == (expected_text(dst), dport)


@settings(max_examples=1000, deadline=None)
@given(
    prefix=st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE]),
    data=st.binary(max_size=300),
)
def test_arbitrary_bytes_only_raise_proxy_error(prefix: bytes, data: bytes) -> None:
    buf = prefix + data
    try:
        result = parse_header(buf)
    except ProxyError as exc:  # the only exception allowed through
        assert str(exc) and "\n" not in str(exc)
        return
    if result is not None:
        _, consumed = result
        assert 0 < consumed <= len(buf)
        # The same header alone parses the same.
        assert parse_header(buf[:consumed]) == result


# ---------------------------------------------------------------------------------------
# read_header over TCP on loopback


def _loop_factories() -> list[Any]:
    factories: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return factories
    return [*factories, pytest.param(uvloop.new_event_loop, id="uvloop")]


LoopFactory = Callable[[], asyncio.AbstractEventLoop]


@pytest.fixture(params=_loop_factories())
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine to completion in a fresh event loop of the parametrised kind."""
    factory: LoopFactory = request.param

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(coro)

    return runner


@contextlib.contextmanager
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(server side, client side) of a TCP connection on 127.0.0.1; server side non-blocking."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    server.setblocking(False)
    try:
        yield server, client
    finally:
        server.close()
        client.close()


def recv_exactly(sock: socket.socket, count: int, timeout: float = 5.0) -> bytes:
    sock.setblocking(True)
    sock.settimeout(timeout)
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def read(sock: socket.socket, timeout: float = 5.0) -> ProxyInfo:
    return await read_header(asyncio.get_running_loop(), sock, timeout)


@pytest.mark.parametrize(("header", "expected"), [c[1:] for c in VALID], ids=VALID_IDS)
def test_read_header_leaves_following_bytes(
    run: Callable[[Coroutine[Any, Any, Any]], Any], header: bytes, expected: ProxyInfo
) -> None:
    with tcp_pair() as (server, client):
        client.sendall(header + b"\x16\x03\x01")
        assert run(read(server)) == expected
        assert recv_exactly(server, 3) == b"\x16\x03\x01"


@pytest.mark.parametrize(
    "header",
    [VALID_BY_ID[name] for name in FRAGMENTED],
    ids=FRAGMENTED,
)
def test_read_header_fragmented(
    run: Callable[[Coroutine[Any, Any, Any]], Any], header: bytes
) -> None:
    """Byte by byte, the last byte sent together with what follows."""
    expected = parse_header(header)
    assert expected is not None

    async def scenario(server: socket.socket, client: socket.socket) -> ProxyInfo:
        async def feed() -> None:
            for i in range(len(header) - 1):
                client.send(header[i : i + 1])
                await asyncio.sleep(0.001)  # time between bytes: each in a read of its own
            client.send(header[-1:] + b"after")

        task = asyncio.create_task(feed())
        got = await read(server)
        await task
        return got

    with tcp_pair() as (server, client):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert run(scenario(server, client)) == expected[0]
        assert recv_exactly(server, 5) == b"after"


def test_read_header_times_out_on_a_silent_peer(
    run: Callable[[Coroutine[Any, Any, Any]], Any],
) -> None:
    with tcp_pair() as (server, _client):
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            run(read(server, timeout=0.2))
        assert 0.15 < time.monotonic() - start < 2.0


def test_read_header_timeout_is_overall(run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
    """A peer trickling bytes does not extend the deadline."""

    async def scenario(server: socket.socket, client: socket.socket) -> None:
        async def trickle() -> None:
            for byte in b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2":
                client.send(bytes([byte]))
                await asyncio.sleep(0.02)  # time is under test: the trickle outlasts the deadline

        task = asyncio.create_task(trickle())
        try:
            await read(server, timeout=0.3)
        finally:
            task.cancel()

    with tcp_pair() as (server, client):
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            run(scenario(server, client))
        assert time.monotonic() - start < 0.55


def test_read_header_times_out_inside_a_header(
    run: Callable[[Coroutine[Any, Any, Any]], Any],
) -> None:
    for partial in (b"PROXY TCP4 1.2.3.4 ", V2_SIGNATURE + b"\x21\x11\x00\x0c\x01"):
        with tcp_pair() as (server, client):
            client.sendall(partial)
            with pytest.raises(TimeoutError):
                run(read(server, timeout=0.2))


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        (b"", "closed before a PROXY header"),
        (b"PRO", "closed inside the PROXY header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", "closed inside the PROXY header"),
        (v2(block=inet4("1.2.3.4", "5.6.7.8", 1, 2))[:-1], "closed inside the PROXY header"),
    ],
)
def test_read_header_eof(
    run: Callable[[Coroutine[Any, Any, Any]], Any], sent: bytes, reason: str
) -> None:
    with tcp_pair() as (server, client):
        client.sendall(sent)
        client.shutdown(socket.SHUT_WR)
        with pytest.raises(ProxyError, match=reason):
            run(read(server))


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        (b"EHLO client.example\r\n", "no PROXY header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "bad PROXY v1 port"),
        (v2(version=1), "version"),
        # Refused from the fixed part: the announced 65535 octets are never awaited.
        (v2(length=0xFFFF), "too long"),
    ],
)
def test_read_header_invalid(
    run: Callable[[Coroutine[Any, Any, Any]], Any], sent: bytes, reason: str
) -> None:
    with tcp_pair() as (server, client):
        client.sendall(sent)  # and stays open: the error must not wait for more
        with pytest.raises(ProxyError, match=reason):
            run(read(server, timeout=5.0))


def test_read_header_refuses_a_short_non_header_at_once(
    run: Callable[[Coroutine[Any, Any, Any]], Any],
) -> None:
    """Fewer than 8 octets that cannot start a header: refused without waiting for more."""
    with tcp_pair() as (server, client):
        client.sendall(b"QUIT\r\n")
        with pytest.raises(ProxyError, match="no PROXY header"):
            run(read(server, timeout=5.0))


# ---------------------------------------------------------------------------------------
# A real HAProxy in front of a tiny backend


needs_haproxy = pytest.mark.needs(
    haproxy_available(),
    reason="haproxy is not installed (bash scripts/install-test-deps.sh installs it)",
)


Handler = Callable[[socket.socket, ProxyInfo], None]


def greet(conn: socket.socket, _info: ProxyInfo) -> None:
    conn.sendall(b"220 ok\r\n")


class Backend:
    """A TCP server on loopback that reads each connection's PROXY header with read_header.

    An asyncio loop in a thread accepts connections, awaits ``read_header``,
    records the result (or the exception) in ``results``, then runs ``handler``
    on the connection made blocking, and closes it.
    """

    def __init__(self, handler: Handler = greet, host: str = "127.0.0.1") -> None:
        self.handler = handler
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.results: queue.Queue[ProxyInfo | BaseException] = queue.Queue()
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Backend:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        def cancel() -> None:
            if self._task is not None:
                self._task.cancel()

        self._loop.call_soon_threadsafe(cancel)
        self._thread.join(timeout=5)
        self.listener.close()

    def result(self, timeout: float = 10.0) -> ProxyInfo:
        got = self.results.get(timeout=timeout)
        if isinstance(got, BaseException):
            raise got
        return got

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self._serve())
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)
        self._loop.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.listener)
            with conn:
                conn.setblocking(False)
                try:
                    got = await read_header(loop, conn, 5.0)
                except (ProxyError, TimeoutError, OSError) as exc:
                    self.results.put(exc)
                    continue
                self.results.put(got)
                conn.setblocking(True)
                conn.settimeout(10.0)
                try:
                    await asyncio.to_thread(self.handler, conn, got)
                except Exception as exc:
                    self.results.put(exc)


@needs_haproxy
@pytest.mark.external
def test_haproxy_version_is_reported() -> None:
    assert haproxy_version().startswith("HAProxy version ")


@needs_haproxy
@pytest.mark.external
@pytest.mark.parametrize("send_proxy", ["v1", "v2"])
def test_haproxy_sends_the_client_address(send_proxy: str) -> None:
    with Backend() as backend, run_haproxy(backend.address, send_proxy=send_proxy) as front:
        with socket.create_connection(front, timeout=10, source_address=("127.0.0.5", 0)) as c:
            client_port = c.getsockname()[1]
            # The backend greets first: HAProxy relays without waiting for the client.
            assert read_line(c) == b"220 ok\r\n"
            # When the backend closes, HAProxy closes the client connection.
            assert c.recv(100) == b""
        got = backend.result()
    assert got.version == (1 if send_proxy == "v1" else 2)
    assert got.command == "PROXY"
    assert got.source == ("127.0.0.5", client_port)
    assert got.destination == front
    assert got.tlvs == {}


@needs_haproxy
@pytest.mark.external
@pytest.mark.needs(ipv6_loopback(), reason="no IPv6 loopback (::1)")
@pytest.mark.parametrize("send_proxy", ["v1", "v2"])
def test_haproxy_over_ipv6(send_proxy: str) -> None:
    with (
        Backend(host="::1") as backend,
        run_haproxy(backend.address, send_proxy=send_proxy, listen_host="::1") as front,
    ):
        with socket.create_connection(front, timeout=10) as c:
            client_port = c.getsockname()[1]
            assert read_line(c) == b"220 ok\r\n"
        got = backend.result()
    assert got.source == ("::1", client_port)
    assert got.destination == front


@needs_haproxy
@pytest.mark.external
def test_haproxy_crc32c_tlv_is_verified() -> None:
    with (
        Backend() as backend,
        run_haproxy(backend.address, proxy_v2_options=("crc32c",)) as front,
    ):
        with socket.create_connection(front, timeout=10, source_address=("127.0.0.5", 0)) as c:
            client_port = c.getsockname()[1]
            assert read_line(c) == b"220 ok\r\n"
        got = backend.result()
    assert got.source == ("127.0.0.5", client_port)
    assert set(got.tlvs) == {PP2_TYPE_CRC32C}
    assert len(got.tlvs[PP2_TYPE_CRC32C]) == 4


@needs_haproxy
@pytest.mark.external
@pytest.mark.parametrize("send_proxy", ["v1", "v2"])
def test_haproxy_tls_passthrough_keeps_the_client_hello(send_proxy: str) -> None:
    """Implicit TLS behind HAProxy: the ClientHello after the header reaches TLS intact."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    def tls_greet(conn: socket.socket, _info: ProxyInfo) -> None:
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"220 ok\r\n")
            tls.recv(100)  # until the client closes

    with (
        Backend(tls_greet) as backend,
        run_haproxy(backend.address, send_proxy=send_proxy, tls_passthrough=True) as front,
    ):
        raw = socket.create_connection(front, timeout=10, source_address=("127.0.0.5", 0))
        client_port = raw.getsockname()[1]
        with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert read_line(tls) == b"220 ok\r\n"
        got = backend.result()
    assert got.source == ("127.0.0.5", client_port)


@needs_haproxy
@pytest.mark.external
def test_haproxy_serves_several_clients() -> None:
    with Backend() as backend, run_haproxy(backend.address) as front:
        ports = []
        for _ in range(3):
            with socket.create_connection(
                front, timeout=10, source_address=("127.0.0.5", 0)
            ) as c:
                ports.append(c.getsockname()[1])
                assert read_line(c) == b"220 ok\r\n"
        got = [backend.result() for _ in ports]
    assert [g.source for g in got] == [("127.0.0.5", p) for p in ports]


@needs_haproxy
@pytest.mark.external
def test_haproxy_is_stopped_on_exit() -> None:
    with Backend() as backend:
        with run_haproxy(backend.address) as front:
            pass
        with pytest.raises(OSError):
            socket.create_connection(front, timeout=2).close()


@needs_haproxy
@pytest.mark.external
def test_haproxy_refused_config_is_reported() -> None:
    with pytest.raises(HAProxyError, match=r"(?s)haproxy -c refused.*invalid port"):
        run_haproxy(("127.0.0.1", 70000)).__enter__()


def test_run_haproxy_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="send_proxy"):
        run_haproxy(("127.0.0.1", 25), send_proxy="v3").__enter__()
    with pytest.raises(ValueError, match="proxy_v2_options"):
        run_haproxy(("127.0.0.1", 25), send_proxy="v1", proxy_v2_options=("crc32c",)).__enter__()
