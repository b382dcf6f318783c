"""A test zone for greeting verification, served by a real DNS server on loopback.

Every client of the greeting tests is on 127.0.0.0/8 (all of it is local, so
each case can connect from an address of its own). The zone gives each kind
of greeting name and client address the checks must tell apart:

- ``match_name(n)`` (``hN.good.test``): A ``127.0.0.N`` and an SPF record
  ``v=spf1 a -all``, for N in 1..60; the reverse name of ``127.0.0.N`` is a
  PTR back to it (forward-confirmed) unless N is one of the special
  addresses below;
- ``MISMATCH``: A records in 192.0.2.0/24 only;
- ``NXDOMAIN``: not in the zone; ``NO_RECORDS``: exists with a TXT record
  only; ``MX_ONLY``: an MX record and nothing else;
- ``CNAME_CHAIN``: two CNAME hops to ``match_name(CNAME_N)``;
- ``SPF_PASS`` / ``SPF_FAIL`` / ``SPF_SOFTFAIL``: SPF for the HELO identity
  giving pass, fail and softfail for any 127.0.0.0/8 client;
- ``SERVFAIL``: its server fails (SERVFAIL); ``DROPPED``: queries are never
  answered (a timeout: use a short ``dns_timeout``, e.g. ``DNS_TIMEOUT``);
- PTR cases: ``NOBACK_IP`` (its PTR name resolves elsewhere),
  ``NO_PTR_IP`` (no PTR at all), ``PTR_SERVFAIL_IP`` (the reverse lookup
  fails), ``SIBLING_IP`` (PTR ``SIBLING_PTR``, in the same registered domain
  as the greeting name ``SIBLING_NAME``), ``DYNAMIC_IP`` (PTR
  ``127-0-0-23.dyn.example.test``, forward-confirmed);
- ``V6_NAME``: AAAA ``::1`` (and ``::1`` has a PTR back to it).

Use the ``greeting_dns`` fixture (one server per test module) by importing it
into a test module, and ``make_resolver(server)`` for a resolver with a cache
of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ehlo.dns import DNSCache, Resolver

from .dnsserver import DNSServer, Zone

__all__ = [
    "BEHAVIOURS",
    "CNAME_CHAIN",
    "CNAME_HOPS",
    "CNAME_N",
    "DNS_TIMEOUT",
    "DROPPED",
    "DYNAMIC_IP",
    "DYNAMIC_PTR",
    "FIRST",
    "LAST",
    "MISMATCH",
    "MISMATCH_ADDRESSES",
    "MX_ONLY",
    "NOBACK_IP",
    "NOBACK_PTR",
    "NO_PTR_IP",
    "NO_RECORDS",
    "NXDOMAIN",
    "PTR_SERVFAIL_IP",
    "SERVFAIL",
    "SIBLING_IP",
    "SIBLING_NAME",
    "SIBLING_PTR",
    "SPF_FAIL",
    "SPF_PASS",
    "SPF_SOFTFAIL",
    "V6_NAME",
    "build_zone",
    "client_ip",
    "greeting_dns",
    "make_resolver",
    "match_name",
    "start_server",
]

# Seconds for one DNS lookup in tests: the DROPPED name costs this much.
DNS_TIMEOUT = 0.5

# Client addresses 127.0.0.FIRST ... 127.0.0.LAST have names that match them.
FIRST, LAST = 1, 60

MISMATCH = "mismatch.example.test"
MISMATCH_ADDRESSES = ("192.0.2.7", "192.0.2.8")
NXDOMAIN = "nx.example.test"
NO_RECORDS = "empty.example.test"
MX_ONLY = "mxonly.example.test"
CNAME_CHAIN = "alias.example.test"
CNAME_N = 30
CNAME_HOPS = ("hop.example.test", f"h{CNAME_N}.good.test")  # the chain, first to last
SPF_PASS = "spf-pass.example.test"
SPF_FAIL = "spf-fail.example.test"
SPF_SOFTFAIL = "spf-soft.example.test"
SERVFAIL = "servfail.example.test"
DROPPED = "slow.example.test"
V6_NAME = "v6.good.test"

NOBACK_IP = "127.0.0.11"
NOBACK_PTR = "noback.example.test"
NO_PTR_IP = "127.0.0.12"
PTR_SERVFAIL_IP = "127.0.0.13"
SIBLING_IP = "127.0.0.14"
SIBLING_PTR = "mx.sibling.test"
SIBLING_NAME = "mail.sibling.test"
DYNAMIC_IP = "127.0.0.23"
DYNAMIC_PTR = "127-0-0-23.dyn.example.test"

_SPECIAL_PTR = {NOBACK_IP, NO_PTR_IP, PTR_SERVFAIL_IP, SIBLING_IP, DYNAMIC_IP}


def client_ip(n: int) -> str:
    """``127.0.0.n``."""
    return f"127.0.0.{n}"


def match_name(n: int) -> str:
    """The name whose A record is ``127.0.0.n`` (and ``127.0.0.n``'s PTR name)."""
    return f"h{n}.good.test"


def _txt(text: str) -> list[str]:
    return [f'"{text}"']


def build_zone() -> Zone:
    """The zone described in the module docstring."""
    zone: Zone = {}
    for n in range(FIRST, LAST + 1):
        ip = client_ip(n)
        zone[match_name(n)] = {"A": [ip], "TXT": _txt("v=spf1 a -all")}
        if ip not in _SPECIAL_PTR:
            zone[DNSServer.reverse(ip)] = {"PTR": [match_name(n) + "."]}
    zone.update(
        {
            MISMATCH: {"A": list(MISMATCH_ADDRESSES)},
            NO_RECORDS: {"TXT": _txt("nothing but text here")},
            MX_ONLY: {"MX": [f"10 {match_name(2)}."]},
            CNAME_CHAIN: {"CNAME": [CNAME_HOPS[0] + "."]},
            CNAME_HOPS[0]: {"CNAME": [CNAME_HOPS[1] + "."]},
            SPF_PASS: {"TXT": _txt("v=spf1 ip4:127.0.0.0/8 -all"), "A": ["192.0.2.40"]},
            SPF_FAIL: {"TXT": _txt("v=spf1 ip4:192.0.2.0/24 -all"), "A": ["192.0.2.41"]},
            SPF_SOFTFAIL: {"TXT": _txt("v=spf1 ip4:192.0.2.0/24 ~all"), "A": ["192.0.2.42"]},
            V6_NAME: {"AAAA": ["::1"], "TXT": _txt("v=spf1 ip6:::1 -all")},
            DNSServer.reverse("::1"): {"PTR": [V6_NAME + "."]},
            # A PTR whose name resolves to another address.
            DNSServer.reverse(NOBACK_IP): {"PTR": [NOBACK_PTR + "."]},
            NOBACK_PTR: {"A": ["192.0.2.11"]},
            # NO_PTR_IP: no reverse record at all (NXDOMAIN).
            # A PTR in the same registered domain as a greeting name.
            DNSServer.reverse(SIBLING_IP): {"PTR": [SIBLING_PTR + "."]},
            SIBLING_PTR: {"A": [SIBLING_IP]},
            SIBLING_NAME: {"A": [SIBLING_IP]},
            # A dynamic-pool PTR, forward-confirmed.
            DNSServer.reverse(DYNAMIC_IP): {"PTR": [DYNAMIC_PTR + "."]},
            DYNAMIC_PTR: {"A": [DYNAMIC_IP]},
        }
    )
    return zone


BEHAVIOURS = {
    SERVFAIL: "servfail",
    DROPPED: "drop",
    DNSServer.reverse(PTR_SERVFAIL_IP): "servfail",
}


def start_server(ttl: int = 300) -> DNSServer:
    """A started server for the zone (stop it with ``.stop()``)."""
    return DNSServer(build_zone(), ttl=ttl, behaviours=dict(BEHAVIOURS)).start()  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def greeting_dns() -> Iterator[DNSServer]:
    """The zone served over UDP and TCP on a free loopback port, for one test module."""
    server = start_server()
    try:
        yield server
    finally:
        server.stop()


def make_resolver(server: DNSServer, timeout: float = DNS_TIMEOUT) -> Resolver:
    """A resolver asking ``server`` with a cache of its own (no answers from other tests)."""
    return Resolver([server.nameserver], timeout, cache=DNSCache())
