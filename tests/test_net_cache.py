"""The shared helpers: ``ehlo._net`` (host names, ``host:port`` text) and ``ehlo._cache``.

Plain unit tests: these are pure functions and an in-memory structure, so
they are called directly, with a fake clock for the cache's time.
"""

from __future__ import annotations

import threading

import pytest

from ehlo._cache import TTLCache
from ehlo._net import format_hostport, is_hostname, parse_hostport


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ------------------------------------------------------------------ is_hostname


@pytest.mark.parametrize(
    "name",
    [
        "localhost",
        "mail.example.org",
        "mail.example.org.",  # one trailing dot: the root
        "xn--bcher-kva.example",
        "a-b.c-d.example",
        "123.example",
        "a" * 63 + ".example",
        ".".join(["a" * 63] * 3 + ["b" * 61]),  # 253 characters
    ],
)
def test_is_hostname_accepts_host_names(name: str) -> None:
    assert is_hostname(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "mail..example",
        "mail.example..",
        "-mail.example",
        "mail-.example",
        "mail_1.example",
        "mail example",
        "bücher.example",  # U-labels must be converted first
        "a" * 64 + ".example",
        ".".join(["a" * 63] * 3 + ["b" * 62]),  # 254 characters
        "[192.0.2.1]",
    ],
)
def test_is_hostname_refuses_other_text(name: str) -> None:
    assert not is_hostname(name)


def test_is_hostname_underscores_only_when_asked() -> None:
    assert not is_hostname("_spf.example.org")
    assert is_hostname("_spf.example.org", underscore=True)
    assert is_hostname("mail_1.example", underscore=True)
    assert not is_hostname("-_x.example", underscore=True)


# ------------------------------------------------------------------ parse_hostport


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("127.0.0.1:25", None, ("127.0.0.1", 25)),
        (" 127.0.0.1:25 ", None, ("127.0.0.1", 25)),
        ("[::1]:2525", None, ("::1", 2525)),
        ("[127.0.0.1]:25", None, ("127.0.0.1", 25)),
        ("mail.example.org:587", None, ("mail.example.org", 587)),
        (":25", None, ("", 25)),
        ("mail.example.org", 25, ("mail.example.org", 25)),
        ("192.0.2.53", 53, ("192.0.2.53", 53)),
        ("2001:db8::53", 53, ("2001:db8::53", 53)),
        ("[2001:db8::53]", 53, ("2001:db8::53", 53)),
        ("[2001:db8::53]:5353", 53, ("2001:db8::53", 5353)),
        ("::1", 0, ("::1", 0)),  # 0: "no port given", for callers that need to know
    ],
)
def test_parse_hostport_forms(text: str, default: int | None, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, default) == expected


@pytest.mark.parametrize(
    ("text", "default", "message"),
    [
        ("127.0.0.1", None, "expected HOST:PORT, got '127.0.0.1'"),
        ("[::1]", None, "expected [IPv6]:PORT, got '[::1]'"),
        ("[::1]25", 25, "expected [IPv6]:PORT, got '[::1]25'"),
        ("[::1:25", 25, "expected [IPv6]:PORT, got '[::1:25'"),
        ("[mail.example]:25", 25, "expected an IP address in brackets, got '[mail.example]:25'"),
        ("::1:25", None, "write IPv6 addresses as [ADDR]:PORT, got '::1:25'"),
        ("a:b:c", 25, "expected HOST[:PORT] or [IPv6]:PORT, got 'a:b:c'"),
        ("127.0.0.1:x", None, "port must be a number, got '127.0.0.1:x'"),
        ("127.0.0.1:", 25, "port must be a number, got '127.0.0.1:'"),
        ("127.0.0.1:65536", None, "port out of range in '127.0.0.1:65536'"),
        ("127.0.0.1:0", 25, "port out of range in '127.0.0.1:0'"),
        ("[::1]:-1", 25, "port out of range in '[::1]:-1'"),
    ],
)
def test_parse_hostport_errors_are_one_line(text: str, default: int | None, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_hostport(text, default)
    assert str(caught.value) == message


def test_parse_hostport_port_bounds_and_shown_text() -> None:
    assert parse_hostport("127.0.0.1:0", None, min_port=0) == ("127.0.0.1", 0)
    assert parse_hostport("127.0.0.1:65535", None) == ("127.0.0.1", 65535)
    with pytest.raises(ValueError, match=r"^port out of range in '127.0.0.1:70000,tls'$"):
        parse_hostport("127.0.0.1:70000", None, shown="127.0.0.1:70000,tls")


# ------------------------------------------------------------------ TTLCache


def test_ttl_cache_expires_each_entry_after_its_own_ttl() -> None:
    clock = FakeClock()
    cache: TTLCache[str, int] = TTLCache(10, clock=clock)
    cache.put("short", 1, 5)
    cache.put("long", 2, 50)
    cache.put("forever", 3)  # no ttl given, none by default: kept until evicted
    assert cache.remaining("short") == 5
    assert cache.remaining("forever") == float("inf")
    clock.advance(5)
    assert cache.get("short") is None
    assert cache.remaining("short") is None
    assert len(cache) == 2  # an expired entry is dropped when it is asked for
    assert cache.get("long") == 2
    assert cache.remaining("long") == 45
    clock.advance(10_000)
    assert cache.get("long") is None
    assert cache.get("forever") == 3


def test_ttl_cache_default_and_maximum_ttl() -> None:
    clock = FakeClock()
    cache: TTLCache[str, str] = TTLCache(10, ttl=60, max_ttl=100, clock=clock)
    cache.put("default", "a")
    cache.put("capped", "b", 10_000)
    assert cache.remaining("default") == 60
    assert cache.remaining("capped") == 100
    unbounded: TTLCache[str, str] = TTLCache(10, max_ttl=30, clock=clock)
    unbounded.put("x", "c")  # no ttl at all: the maximum still applies
    assert unbounded.remaining("x") == 30


def test_ttl_cache_zero_ttl_keeps_nothing_and_drops_the_old_value() -> None:
    cache: TTLCache[str, int] = TTLCache(10, clock=FakeClock())
    cache.put("k", 1, 30)
    cache.put("k", 2, 0)
    assert cache.get("k") is None
    cache.put("k", 3, -1)
    assert len(cache) == 0


def test_ttl_cache_evicts_the_least_recently_used() -> None:
    cache: TTLCache[str, int] = TTLCache(2, clock=FakeClock())
    cache.put("a", 1, 50)
    cache.put("b", 2, 50)
    assert cache.get("a") == 1  # now the most recently used
    cache.put("c", 3, 50)
    assert len(cache) == 2
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (1, 3)
    assert cache.peek("a") == 1  # peek does not make "a" the most recent ...
    cache.put("d", 4, 50)
    assert cache.get("a") is None  # ... so it went first
    cache.put("c", 30, 50)  # replacing makes an entry the most recent too
    cache.put("e", 5, 50)
    assert (cache.get("c"), cache.get("d"), cache.get("e")) == (30, None, 5)


def test_ttl_cache_peek_pop_prune_clear() -> None:
    clock = FakeClock()
    cache: TTLCache[str, int] = TTLCache(10, clock=clock)
    cache.put("old", 1, 5)
    cache.put("new", 2, 50)
    assert cache.pop("new") == 2
    assert cache.pop("new") is None
    cache.put("new", 2, 50)
    clock.advance(5)
    assert cache.peek("old") is None  # expired, though still held
    assert len(cache) == 2
    cache.prune()  # drops expired entries at the least recently used end
    assert len(cache) == 1
    assert cache.pop("old") is None
    cache.clear()
    assert len(cache) == 0 and cache.get("new") is None


def test_ttl_cache_prune_stops_at_the_first_fresh_entry() -> None:
    clock = FakeClock()
    cache: TTLCache[str, int] = TTLCache(10, clock=clock)
    cache.put("fresh", 1, 50)
    cache.put("stale", 2, 5)
    clock.advance(5)
    cache.prune()  # "fresh" is the least recently used and fresh: nothing goes
    assert len(cache) == 2
    assert cache.get("stale") is None
    assert len(cache) == 1


def test_ttl_cache_refuses_a_size_below_one() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        TTLCache[str, int](0)


def test_ttl_cache_threads_share_it_within_its_bound() -> None:
    cache: TTLCache[int, int] = TTLCache(64)
    errors: list[BaseException] = []

    def work(base: int) -> None:
        try:
            for i in range(2000):
                cache.put(base + i % 100, i, 60)
                cache.get(base + (i * 7) % 100)
                if i % 50 == 0:
                    cache.prune()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n * 1000,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert not any(thread.is_alive() for thread in threads)
    assert len(cache) <= 64


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("127.0.0.1", 25, "127.0.0.1:25"),
        ("::1", 2525, "[::1]:2525"),
        ("mx.example", 0, "mx.example:0"),
    ],
)
def test_format_hostport_round_trips(host: str, port: int, text: str) -> None:
    assert format_hostport(host, port) == text
    assert parse_hostport(text, None, min_port=0) == (host, port)


def test_the_caches_are_ttl_caches() -> None:
    from ehlo.dns import DNSCache, Resolver
    from ehlo.greeting import GreetingPolicy, GreetingVerifier, _checks
    from ehlo.server.abuse import Networks

    clock = FakeClock()
    dns_cache = DNSCache(max_entries=3, clock=clock, max_ttl=100)
    assert isinstance(dns_cache, TTLCache)
    dns_cache.put(("ns", "A", "a."), ("192.0.2.1",), 10_000)
    assert dns_cache.remaining(("ns", "A", "a.")) == 100  # a day at most by default
    resolver = Resolver(["127.0.0.1:9"], 0.5, cache=dns_cache)
    verifier = GreetingVerifier(GreetingPolicy(), resolver, clock=clock)
    assert isinstance(verifier._reports, TTLCache)
    assert isinstance(_checks._SPF_RESULTS, TTLCache)
    assert _checks._SPF_RESULTS.ttl == _checks.SPF_RESULT_TTL
    exempt = Networks(["192.0.2.0/24"])
    assert "192.0.2.7" in exempt and "198.51.100.7" not in exempt
    assert isinstance(exempt._cache, TTLCache)
    assert exempt._cache.get("192.0.2.7") is True
