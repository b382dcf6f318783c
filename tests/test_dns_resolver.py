"""ehlo.dns: lookups, caching and reverse names against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ehlo.dns import (
    DEFAULT_CACHE,
    DNSCache,
    DNSTempError,
    Resolver,
    peek_reverse_name,
    reverse_name,
)
from ehlo.dns import resolver as resolver_module

from .dnsserver import DNSServer

MAIL_V4 = "192.0.2.10"
MAIL_V6 = "2001:db8::10"
FORGED_V4 = "192.0.2.66"
TWO_NAMES_V4 = "192.0.2.77"

ZONE = {
    "mail.example.test": {"A": [MAIL_V4], "AAAA": ["2001:DB8:0:0::10"]},
    "other.example.test": {"A": ["198.51.100.1"]},
    "alias.example.test": {"CNAME": ["mail.example.test."]},
    "txt-only.example.test": {"TXT": ['"hello"']},
    DNSServer.reverse(MAIL_V4): {"PTR": ["Mail.Example.TEST."]},
    DNSServer.reverse(MAIL_V6): {"PTR": ["mail.example.test."]},
    # The PTR claims a name whose addresses do not include the client.
    DNSServer.reverse(FORGED_V4): {"PTR": ["other.example.test."]},
    DNSServer.reverse(TWO_NAMES_V4): {
        "PTR": ["other.example.test.", "two.example.test."],
    },
    "two.example.test": {"A": [TWO_NAMES_V4]},
}


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def server() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as srv:
        yield srv


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_resolver(server: DNSServer, clock: FakeClock, timeout: float = 2.0) -> Resolver:
    return Resolver([server.nameserver], timeout=timeout, cache=DNSCache(clock=clock))


# ------------------------------------------------------------------ lookups


async def test_ptr_lowercase_without_trailing_dot(server: DNSServer, clock: FakeClock) -> None:
    resolver = make_resolver(server, clock)
    assert await resolver.ptr(MAIL_V4) == ["mail.example.test"]
    assert await resolver.ptr(MAIL_V6) == ["mail.example.test"]
    assert server.count(DNSServer.reverse(MAIL_V4), "PTR") == 1


async def test_ptr_several_names_in_order(server: DNSServer, clock: FakeClock) -> None:
    resolver = make_resolver(server, clock)
    names = await resolver.ptr(TWO_NAMES_V4)
    assert sorted(names) == ["other.example.test", "two.example.test"]


async def test_ptr_nxdomain_and_bad_address(server: DNSServer, clock: FakeClock) -> None:
    resolver = make_resolver(server, clock)
    assert await resolver.ptr("203.0.113.9") == []
    with pytest.raises(ValueError):
        await resolver.ptr("not-an-ip")


async def test_addresses_a_then_aaaa(server: DNSServer, clock: FakeClock) -> None:
    resolver = make_resolver(server, clock)
    assert await resolver.addresses("mail.example.test") == [MAIL_V4, MAIL_V6]
    assert await resolver.addresses("MAIL.example.test.") == [MAIL_V4, MAIL_V6]
    assert await resolver.addresses("mail.example.test", version=4) == [MAIL_V4]
    assert await resolver.addresses("mail.example.test", version=6) == [MAIL_V6]
    assert await resolver.addresses("other.example.test") == ["198.51.100.1"]
    assert await resolver.addresses("alias.example.test") == [MAIL_V4, MAIL_V6]


async def test_addresses_nxdomain_nodata_and_invalid(server: DNSServer, clock: FakeClock) -> None:
    resolver = make_resolver(server, clock)
    assert await resolver.addresses("nowhere.example.test") == []
    assert await resolver.addresses("txt-only.example.test") == []
    assert await resolver.addresses("a" * 64 + ".example.test") == []  # label too long
    assert server.count("a" * 64 + ".example.test") == 0


async def test_truncated_udp_answer_retried_over_tcp(server: DNSServer, clock: FakeClock) -> None:
    server.set_behaviour("mail.example.test", "truncate")
    resolver = make_resolver(server, clock)
    assert await resolver.addresses("mail.example.test", version=4) == [MAIL_V4]
    transports = [q.transport for q in server.queries if q.name == "mail.example.test"]
    assert transports == ["udp", "tcp"]


# ------------------------------------------------------------------ caching


async def test_positive_answers_cached(server: DNSServer, clock: FakeClock) -> None:
    resolver = make_resolver(server, clock)
    first = await resolver.ptr(MAIL_V4)
    clock.advance(299)
    assert await resolver.ptr(MAIL_V4) == first
    assert await resolver.addresses("mail.example.test") == [MAIL_V4, MAIL_V6]
    assert await resolver.addresses("mail.example.test") == [MAIL_V4, MAIL_V6]
    assert server.count(DNSServer.reverse(MAIL_V4)) == 1
    assert server.count("mail.example.test") == 2  # one A, one AAAA


async def test_peek_answers_from_the_cache_only(server: DNSServer, clock: FakeClock) -> None:
    resolver = make_resolver(server, clock)
    assert resolver.peek("Mail.Example.Test.", "A") is None
    assert resolver.peek_ptr(MAIL_V4) is None
    assert server.count() == 0  # peeking never queries
    await resolver.lookup("mail.example.test", "A")
    await resolver.ptr(MAIL_V4)
    found = resolver.peek("Mail.Example.Test.", "a")
    assert found is not None and found.values == (MAIL_V4,)
    assert resolver.peek_ptr(MAIL_V4) == ["mail.example.test"]
    clock.advance(301)  # past the TTL: gone from the cache, still no query
    assert resolver.peek("mail.example.test", "A") is None
    assert server.count() == 2


async def test_peek_ptr_of_an_ipv4_mapped_address(server: DNSServer, clock: FakeClock) -> None:
    # As ptr() does: an IPv4-mapped IPv6 address is looked up as IPv4.
    resolver = make_resolver(server, clock)
    assert await resolver.ptr(f"::ffff:{MAIL_V4}") == ["mail.example.test"]
    assert resolver.peek_ptr(MAIL_V4) == ["mail.example.test"]
    assert resolver.peek_ptr(f"::ffff:{MAIL_V4}") == ["mail.example.test"]
    await resolver.ptr(MAIL_V6)
    assert resolver.peek_ptr(MAIL_V6.upper()) == ["mail.example.test"]
    assert resolver.peek_ptr("not an address") is None
    assert server.count() == 2


async def test_remaining_is_the_ttl_left(server: DNSServer, clock: FakeClock) -> None:
    resolver = make_resolver(server, clock)
    assert resolver.remaining("mail.example.test", "A") is None
    assert resolver.remaining_ptr(MAIL_V4) is None
    await resolver.lookup("mail.example.test", "A")
    await resolver.lookup("nx.example.test", "A")
    await resolver.ptr(MAIL_V4)
    assert resolver.remaining("Mail.Example.Test.", "a") == server.ttl
    assert resolver.remaining_ptr(MAIL_V4) == server.ttl
    assert resolver.remaining_ptr(f"::ffff:{MAIL_V4}") == server.ttl
    assert resolver.remaining("nx.example.test", "A") == server.negative_ttl  # RFC 2308
    clock.advance(100)
    assert resolver.remaining("mail.example.test", "A") == server.ttl - 100
    assert resolver.remaining("mail.example.test", "AAAA") is None  # never asked
    assert resolver.remaining("bad..name", "A") is None
    assert resolver.remaining_ptr("not an address") is None
    clock.advance(server.ttl)
    assert resolver.remaining("mail.example.test", "A") is None
    assert resolver.remaining_ptr(MAIL_V4) is None
    assert server.count() == 3  # remaining() never queries


async def test_negative_answers_cached(server: DNSServer, clock: FakeClock) -> None:
    resolver = make_resolver(server, clock)
    for _ in range(3):
        assert await resolver.ptr("203.0.113.9") == []
        assert await resolver.addresses("txt-only.example.test") == []
    assert server.count(DNSServer.reverse("203.0.113.9")) == 1
    assert server.count("txt-only.example.test") == 2  # A and AAAA, once each


async def test_ttl_expiry() -> None:
    clock = FakeClock()
    with DNSServer(ZONE, ttl=1, negative_ttl=1) as srv:
        resolver = make_resolver(srv, clock)
        await resolver.ptr(MAIL_V4)
        await resolver.ptr("203.0.113.9")
        clock.advance(0.5)
        await resolver.ptr(MAIL_V4)
        await resolver.ptr("203.0.113.9")
        assert len(srv.queries) == 2
        clock.advance(0.6)
        assert await resolver.ptr(MAIL_V4) == ["mail.example.test"]
        assert await resolver.ptr("203.0.113.9") == []
        assert len(srv.queries) == 4


async def test_negative_ttl_is_capped() -> None:
    clock = FakeClock()
    with DNSServer(ZONE, negative_ttl=1_000_000) as srv:
        resolver = make_resolver(srv, clock)
        await resolver.ptr("203.0.113.9")
        clock.advance(resolver_module.NEGATIVE_TTL_MAX - 1)
        await resolver.ptr("203.0.113.9")
        assert len(srv.queries) == 1
        clock.advance(2)
        await resolver.ptr("203.0.113.9")
        assert len(srv.queries) == 2


async def test_concurrent_lookups_share_one_query(server: DNSServer, clock: FakeClock) -> None:
    resolver = make_resolver(server, clock)
    results = await asyncio.gather(*(resolver.ptr(MAIL_V4) for _ in range(5)))
    assert results == [["mail.example.test"]] * 5
    assert len(server.queries) == 1


async def test_default_cache_shared_between_resolvers(server: DNSServer) -> None:
    DEFAULT_CACHE.clear()
    try:
        first, second = Resolver([server.nameserver]), Resolver([server.nameserver])
        assert first.cache is second.cache is DEFAULT_CACHE
        await first.ptr(MAIL_V4)
        await second.ptr(MAIL_V4)
        assert len(server.queries) == 1
    finally:
        DEFAULT_CACHE.clear()


def test_cache_lru_bound_and_ttl() -> None:
    clock = FakeClock()
    cache = DNSCache(max_entries=2, clock=clock, max_ttl=100)
    cache.put(("ns", "A", "a"), ("1",), 50)
    cache.put(("ns", "A", "b"), ("2",), 50)
    assert cache.get(("ns", "A", "a")) == ("1",)  # now most recently used
    cache.put(("ns", "A", "c"), (), 50)
    assert len(cache) == 2
    assert cache.get(("ns", "A", "b")) is None  # evicted
    assert cache.get(("ns", "A", "c")) == ()  # a cached negative answer
    cache.put(("ns", "A", "long"), ("3",), 10_000)  # capped at max_ttl
    clock.advance(100)
    assert cache.get(("ns", "A", "long")) is None
    cache.put(("ns", "A", "zero"), ("4",), 0)
    assert cache.get(("ns", "A", "zero")) is None


# ------------------------------------------------------------------ failures


async def test_timeout_is_temporary_and_quick(clock: FakeClock) -> None:
    with DNSServer(ZONE, default="drop") as srv:
        resolver = make_resolver(srv, clock, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(DNSTempError):
            await resolver.ptr(MAIL_V4)
        assert time.monotonic() - started < 1.5
        assert srv.count(DNSServer.reverse(MAIL_V4)) >= 1
        assert len(resolver.cache) == 0  # failures are not cached


async def test_servfail_is_temporary_and_not_cached(server: DNSServer, clock: FakeClock) -> None:
    server.set_behaviour("mail.example.test", "servfail")
    resolver = make_resolver(server, clock)
    for _ in range(2):
        with pytest.raises(DNSTempError):
            await resolver.addresses("mail.example.test", version=4)
    assert server.count("mail.example.test", "A") == 2


async def test_refused_and_no_server_are_temporary(server: DNSServer, clock: FakeClock) -> None:
    server.set_behaviour("mail.example.test", "refused")
    resolver = make_resolver(server, clock)
    with pytest.raises(DNSTempError):
        await resolver.addresses("mail.example.test")
    with pytest.raises(DNSTempError):
        await Resolver([], timeout=0.3, cache=DNSCache(clock=clock)).ptr(MAIL_V4)


# ------------------------------------------------------------------ reverse_name


async def test_reverse_name_forward_confirmed(server: DNSServer, clock: FakeClock) -> None:
    resolver = make_resolver(server, clock)
    assert await reverse_name(resolver, MAIL_V4, 2.0) == "mail.example.test"
    assert await reverse_name(resolver, MAIL_V6, 2.0) == "mail.example.test"
    assert await reverse_name(resolver, f"::ffff:{MAIL_V4}", 2.0) == "mail.example.test"
    # The first PTR name does not point back; the second does.
    assert await reverse_name(resolver, TWO_NAMES_V4, 2.0) == "two.example.test"
    # Only the client's own family is asked for.
    assert server.count("mail.example.test", "AAAA") == 1
    assert server.count("mail.example.test", "A") == 1


async def test_reverse_name_unconfirmed_or_missing(server: DNSServer, clock: FakeClock) -> None:
    resolver = make_resolver(server, clock)
    assert await reverse_name(resolver, FORGED_V4, 2.0) is None
    assert await reverse_name(resolver, "203.0.113.9", 2.0) is None
    assert await reverse_name(resolver, "garbage", 2.0) is None


async def test_reverse_name_failures_give_none(clock: FakeClock) -> None:
    with DNSServer(ZONE, default="drop") as srv:
        resolver = make_resolver(srv, clock, timeout=5.0)
        started = time.monotonic()
        assert await reverse_name(resolver, MAIL_V4, 0.3) is None
        assert time.monotonic() - started < 1.5
    with DNSServer(ZONE, default="servfail") as srv:
        assert await reverse_name(make_resolver(srv, clock), MAIL_V4, 2.0) is None


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"])
async def test_loopback_is_localhost_without_query(
    server: DNSServer, clock: FakeClock, ip: str
) -> None:
    resolver = make_resolver(server, clock)
    assert await reverse_name(resolver, ip, 2.0) == "localhost"
    assert server.queries == []


async def test_peek_reverse_name_from_the_cache_alone(server: DNSServer, clock: FakeClock) -> None:
    resolver = make_resolver(server, clock)
    ips = [MAIL_V4, MAIL_V6, TWO_NAMES_V4, FORGED_V4, "203.0.113.9"]
    # Nothing cached: a lookup is needed, and peeking asks nothing.
    for ip in ips:
        assert peek_reverse_name(resolver, ip) == (False, None)
    assert server.queries == []
    # Once reverse_name has looked, the cache alone gives its answer.
    for ip in ips:
        expected = await reverse_name(resolver, ip, 2.0)
        asked = len(server.queries)
        assert peek_reverse_name(resolver, ip) == (True, expected), ip
        assert len(server.queries) == asked
    assert peek_reverse_name(resolver, f"::ffff:{MAIL_V4}") == (True, "mail.example.test")
    # Loopback and malformed addresses need no cache.
    assert peek_reverse_name(resolver, "127.0.0.1") == (True, "localhost")
    assert peek_reverse_name(resolver, "garbage") == (True, None)
    # A name whose own answer is not cached: a lookup, not a guess.
    resolver.cache.clear()
    await resolver.ptr(MAIL_V4)
    assert peek_reverse_name(resolver, MAIL_V4) == (False, None)
    # The answers expire with their TTL (300 s here): a lookup again.
    await reverse_name(resolver, MAIL_V4, 2.0)
    assert peek_reverse_name(resolver, MAIL_V4) == (True, "mail.example.test")
    clock.advance(301)
    assert peek_reverse_name(resolver, MAIL_V4) == (False, None)


# ------------------------------------------------------------------ configuration


def test_nameserver_forms() -> None:
    resolver = Resolver(["127.0.0.1", "127.0.0.2:5353", "::1", "[::1]:5300"])
    assert resolver.nameservers == ["127.0.0.1:53", "127.0.0.2:5353", "[::1]:53", "[::1]:5300"]
    for bad in ["example.com", "127.0.0.1:x", "127.0.0.1:70000", "[::1]5300"]:
        with pytest.raises(ValueError):
            Resolver([bad])


def test_system_configuration_and_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search example.test\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n")
    monkeypatch.setattr(resolver_module, "_RESOLV_CONF", str(conf))
    assert Resolver().nameservers == ["192.0.2.53:53", "[2001:db8::53]:53"]
    conf.write_text("# no servers\n")
    assert Resolver().nameservers == ["127.0.0.1:53"]
    monkeypatch.setattr(resolver_module, "_RESOLV_CONF", str(tmp_path / "missing"))
    assert Resolver().nameservers == ["127.0.0.1:53"]
