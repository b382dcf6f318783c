"""The verifier's report cache: a repeated greeting is answered without running the checks.

Each test uses client addresses of its own (127.0.0.200 and up, outside the
greeting zone's) with a name ``cacheN.example.test`` added to the zone for
it (A ``127.0.0.N``, SPF ``a -all``, and a PTR back), so that no other test's
answers or SPF outcomes can be in play. Each resolver has a DNS cache of its
own; a test clears it to prove that a report came from the verifier's cache
(nothing is asked of the DNS server) rather than from cached DNS answers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import pytest

from ehlo.dns import DNSCache, Resolver
from ehlo.greeting import (
    CHECKS,
    CappedResolver,
    Greeting,
    GreetingPolicy,
    GreetingReport,
    GreetingVerifier,
    authentication_results,
    run_checks,
)
from ehlo.greeting._verifier import REPORT_TTL

from . import greeting_zone as zone
from .dnsserver import DNSServer

OUR_NAME = "mx.ehlo.test"
AUTHSERV_ID = OUR_NAME
TTL = 3600  # seconds: far longer than the report lifetime
# Ample time per lookup: one that timed out on a loaded machine is a temperror.
LOOKUP_TIMEOUT = 3.0


def name(n: int) -> str:
    return f"cache{n}.example.test"


def ip(n: int) -> str:
    return zone.client_ip(n)


def add_host(server: DNSServer, n: int) -> None:
    """``name(n)`` with A ``ip(n)`` and SPF ``a -all``, and the PTR of ``ip(n)`` back to it."""
    server.set_records(name(n), "A", [ip(n)])
    server.set_records(name(n), "TXT", ['"v=spf1 a -all"'])
    server.set_records(DNSServer.reverse(ip(n)), "PTR", [name(n) + "."])


@contextlib.contextmanager
def serving(ttl: int, hosts: range) -> Iterator[DNSServer]:
    """The greeting zone with answers of ``ttl`` seconds, plus ``name(n)`` for ``hosts``."""
    server = zone.start_server(ttl=ttl)
    for n in hosts:
        add_host(server, n)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cache_dns() -> Iterator[DNSServer]:
    """The greeting zone, plus ``name(n)`` for n in 200..229, with a long TTL."""
    with serving(TTL, range(200, 230)) as server:
        yield server


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    server: DNSServer,
    *,
    clock: Callable[[], float] = time.monotonic,
    dns_clock: Callable[[], float] = time.monotonic,
    policy: GreetingPolicy | None = None,
    report_ttl: float = REPORT_TTL,
    report_cache_size: int = 10_000,
) -> GreetingVerifier:
    """A verifier (record policy by default) asking ``server``, with a DNS cache of its own."""
    resolver = Resolver([server.nameserver], LOOKUP_TIMEOUT, cache=DNSCache(clock=dns_clock))
    return GreetingVerifier(
        policy if policy is not None else GreetingPolicy.preset("record"),
        resolver,
        our_names=(OUR_NAME,),
        our_addresses=("127.0.0.1",),
        report_ttl=report_ttl,
        report_cache_size=report_cache_size,
        clock=clock,
    )


async def first(
    verifier: GreetingVerifier, greeting_name: str, client: str, verb: str = "EHLO"
) -> GreetingReport:
    """The report of a session's first greeting (with a budget of its own)."""
    greeting = verifier.greeting(verb, greeting_name, client)
    return await verifier.start(greeting, verifier.budget())


def forget_dns(verifier: GreetingVerifier, server: DNSServer) -> None:
    """Empty the resolver's cache and the server's query log."""
    verifier.resolver.cache.clear()
    server.clear_queries()


# --------------------------------------------------------------- served again


async def test_repeated_first_greeting_asks_no_dns(cache_dns: DNSServer) -> None:
    n = 200
    verifier = make(cache_dns)
    report = await first(verifier, name(n), ip(n))
    assert report["forward_match"].result == "pass"
    assert report["iprev"].result == "pass"
    assert report["spf_helo"].result == "pass"
    assert not report.has_temperror
    forget_dns(verifier, cache_dns)

    budget = verifier.budget()
    task = verifier.start(verifier.greeting("EHLO", name(n), ip(n)), budget)
    again = await task
    assert again is report
    assert cache_dns.count() == 0  # nothing asked: the report came from the cache
    # The session's budget is charged as a run of the checks would charge it.
    assert budget.used == report.queries > 0


async def test_cached_report_is_the_report_a_new_run_makes(cache_dns: DNSServer) -> None:
    n = 201
    verifier = make(cache_dns)
    await first(verifier, name(n), ip(n))
    cached = await first(verifier, name(n), ip(n))
    greeting = verifier.greeting("EHLO", name(n), ip(n))
    fresh = await run_checks(greeting, make(cache_dns).resolver)
    assert cached.greeting == fresh.greeting
    assert cached.to_json() == fresh.to_json()
    assert list(cached.to_json()) == list(CHECKS)
    assert cached.results == fresh.results  # results, reasons and evidence
    assert authentication_results(cached, AUTHSERV_ID) == authentication_results(
        fresh, AUTHSERV_ID
    )
    assert verifier.decide(cached) == verifier.policy.decide(fresh)


async def test_other_address_name_or_verb_is_not_served_from_the_cache(
    cache_dns: DNSServer,
) -> None:
    n, m = 202, 203
    verifier = make(cache_dns)
    report = await first(verifier, name(n), ip(n))
    forget_dns(verifier, cache_dns)

    other_ip = await first(verifier, name(n), ip(m))
    assert other_ip is not report
    assert other_ip.greeting.client_ip == ip(m)
    assert other_ip["forward_match"].result == "fail"  # name(n) is ip(n), not ip(m)
    assert cache_dns.count(DNSServer.reverse(ip(m)), "PTR") == 1

    other_name = await first(verifier, name(m), ip(n))
    assert other_name is not report
    assert other_name.greeting.name == name(m)
    assert cache_dns.count(name(m), "A") == 1

    helo = await first(verifier, name(n), ip(n), verb="HELO")
    assert helo is not report
    assert helo.greeting.verb == "HELO"
    assert helo.to_json() == report.to_json()

    # Letter case is part of the greeting (the header and replies show it as sent).
    upper = await first(verifier, name(n).upper(), ip(n))
    assert upper is not report
    assert upper.greeting.name == name(n).upper()

    # Each is kept in its own right.
    assert await first(verifier, name(n), ip(m)) is other_ip
    assert await first(verifier, name(n), ip(n)) is report


async def test_our_identity_is_part_of_the_key(cache_dns: DNSServer) -> None:
    n = 204
    verifier = make(cache_dns)
    report = await first(verifier, name(n), ip(n))
    verifier.our_names = (name(n),)  # as when the server learns its names anew
    ours = await first(verifier, name(n), ip(n))
    assert ours is not report
    assert ours["not_us"].result == "fail"
    assert report["not_us"].result == "pass"


async def test_report_with_a_temperror_is_not_cached(cache_dns: DNSServer) -> None:
    verifier = make(cache_dns)
    cache_dns.clear_queries()
    report = await first(verifier, zone.SERVFAIL, ip(205))
    assert report["resolves"].result == "temperror"
    assert verifier.cached(report.greeting) is None
    asked = cache_dns.count(zone.SERVFAIL)
    assert asked > 0
    again = await first(verifier, zone.SERVFAIL, ip(205))
    assert again is not report
    assert again["resolves"].result == "temperror"
    assert cache_dns.count(zone.SERVFAIL) > asked  # the checks ran (and asked) again


async def test_report_over_the_query_limit_is_not_cached(cache_dns: DNSServer) -> None:
    # The answers it got are cached, but the checks that were refused lookups are temperrors.
    n = 220
    verifier = make(cache_dns, policy=GreetingPolicy.preset("record", max_queries=2))
    report = await first(verifier, name(n), ip(n))
    limited = [r for r in report.results.values() if "query limit" in r.reason]
    assert limited and {r.result for r in limited} == {"temperror"}
    assert verifier.cached(report.greeting) is None
    assert await first(verifier, name(n), ip(n)) is not report


async def test_failed_ptr_lookup_is_not_cached(cache_dns: DNSServer) -> None:
    # The PTR lookup fails: iprev is a temperror; the report is not kept.
    verifier = make(cache_dns)
    report = await first(verifier, zone.match_name(13), zone.PTR_SERVFAIL_IP)
    assert report["iprev"].result == "temperror"
    assert verifier.cached(report.greeting) is None


async def test_answers_without_ttl_are_not_cached() -> None:
    n = 206
    with serving(0, range(n, n + 1)) as server:
        verifier = make(server)
        report = await first(verifier, name(n), ip(n))
        assert report["forward_match"].result == "pass"
        # The A record may not be kept, so the report may not be either.
        assert verifier.cached(report.greeting) is None
        assert await first(verifier, name(n), ip(n)) is not report


# ------------------------------------------------------------------- lifetime


async def test_report_expires_after_the_report_ttl(cache_dns: DNSServer) -> None:
    n = 207
    clock = Clock()
    verifier = make(cache_dns, clock=clock)
    report = await first(verifier, name(n), ip(n))
    clock.now += REPORT_TTL - 1
    assert await first(verifier, name(n), ip(n)) is report
    clock.now += 2  # past the lifetime
    assert verifier.cached(report.greeting) is None
    later = await first(verifier, name(n), ip(n))
    assert later is not report
    assert later.to_json() == report.to_json()


async def test_report_lives_no_longer_than_its_dns_answers() -> None:
    n, ttl = 208, 20
    clock = Clock()
    with serving(ttl, range(n, n + 1)) as server:
        verifier = make(server, clock=clock, dns_clock=clock)
        report = await first(verifier, name(n), ip(n))
        clock.now += ttl - 1
        assert await first(verifier, name(n), ip(n)) is report
        server.clear_queries()
        clock.now += 2  # past the TTL of the answers, well within REPORT_TTL
        later = await first(verifier, name(n), ip(n))
        assert later is not report
        assert server.count(name(n), "A") == 1  # asked again


async def test_smaller_report_ttl(cache_dns: DNSServer) -> None:
    n = 209
    clock = Clock()
    verifier = make(cache_dns, clock=clock, report_ttl=5.0)
    report = await first(verifier, name(n), ip(n))
    clock.now += 4
    assert await first(verifier, name(n), ip(n)) is report
    clock.now += 2
    assert await first(verifier, name(n), ip(n)) is not report


async def test_least_recently_used_report_is_dropped(cache_dns: DNSServer) -> None:
    a, b, c = 210, 211, 212
    verifier = make(cache_dns, report_cache_size=2)
    ra = await first(verifier, name(a), ip(a))
    rb = await first(verifier, name(b), ip(b))
    assert await first(verifier, name(a), ip(a)) is ra  # a is now the most recent
    await first(verifier, name(c), ip(c))
    assert verifier.cached(rb.greeting) is None
    assert verifier.cached(ra.greeting) is ra


async def test_cache_can_be_turned_off(cache_dns: DNSServer) -> None:
    n = 213
    verifier = make(cache_dns, report_cache_size=0)
    report = await first(verifier, name(n), ip(n))
    assert verifier.cached(report.greeting) is None
    assert await first(verifier, name(n), ip(n)) is not report


async def test_another_policy_is_not_served_the_old_reports(cache_dns: DNSServer) -> None:
    n = 214
    verifier = make(cache_dns)
    report = await first(verifier, name(n), ip(n))
    verifier.policy = GreetingPolicy.preset("record", modes={"spf_helo": "off"})
    again = await first(verifier, name(n), ip(n))
    assert again is not report
    assert "spf_helo" not in again.results


# ----------------------------------------------------------- a session's greetings


async def test_repeated_greeting_in_a_session_computes_consistent(cache_dns: DNSServer) -> None:
    n, m = 215, 216
    verifier = make(cache_dns)
    budget = verifier.budget()
    hello = await verifier.start(verifier.greeting("EHLO", name(n), ip(n)), budget)
    assert hello["consistent"].result == "none"
    # EHLO again (as after STARTTLS), then with another name.
    same = await verifier.start(verifier.greeting("EHLO", name(n), ip(n), [name(n)]), budget)
    assert same["consistent"].result == "pass"
    assert same["consistent"].evidence == {"previous": [name(n)]}
    changed = await verifier.start(
        verifier.greeting("EHLO", name(m), ip(n), [name(n), name(n)]), budget
    )
    assert changed["consistent"].result == "fail"
    assert changed["consistent"].reason == f"differs from the earlier greeting {name(n)}"
    # Everything but consistent is what the first greeting found.
    for check in CHECKS:
        if check != "consistent":
            assert same[check] == hello[check], check

    # The next session: its first greeting is the first greeting's report, not a later one.
    forget_dns(verifier, cache_dns)
    budget = verifier.budget()
    assert await verifier.start(verifier.greeting("EHLO", name(n), ip(n)), budget) is hello
    again = await verifier.start(verifier.greeting("EHLO", name(n), ip(n), [name(n)]), budget)
    assert again is same
    assert again["consistent"].result == "pass"
    assert cache_dns.count() == 0
    # A different earlier name is another greeting: consistent fails.
    other = await verifier.start(verifier.greeting("EHLO", name(n), ip(n), [name(m)]), budget)
    assert other["consistent"].result == "fail"
    assert other["consistent"].evidence == {"previous": [name(m)]}


async def test_budget_too_small_for_the_cached_report_runs_the_checks(
    cache_dns: DNSServer,
) -> None:
    n = 217
    verifier = make(cache_dns)
    report = await first(verifier, name(n), ip(n))
    budget = CappedResolver(verifier.resolver, verifier.policy.max_queries)
    budget.used = budget.limit - 1  # earlier greetings spent nearly all of it
    greeting = verifier.greeting("EHLO", name(n), ip(n))
    capped = await verifier.start(greeting, budget)
    assert capped is not report
    assert any("query limit" in r.reason for r in capped.results.values())
    assert budget.used == budget.limit
    assert verifier.cached(greeting) is report  # the complete report stays


async def test_verify_uses_the_cache_too(cache_dns: DNSServer) -> None:
    n = 218
    verifier = make(cache_dns)
    greeting = verifier.greeting("EHLO", name(n), ip(n))
    report = await verifier.verify(greeting)
    same = Greeting("EHLO", name(n), ip(n), (OUR_NAME,), ("127.0.0.1",))
    assert same == greeting
    assert await verifier.verify(same) is report


# -------------------------------------------------------------- derived forms


async def test_json_and_header_are_computed_once(cache_dns: DNSServer) -> None:
    n = 219
    verifier = make(cache_dns)
    report = await first(verifier, name(n), ip(n))
    data = report.to_json()
    data["extra"] = {}  # the caller's own dict: the report is not changed
    assert "extra" not in report.to_json()
    assert report.to_json() == {c: report[c].to_json() for c in CHECKS}
    header = authentication_results(report, AUTHSERV_ID)
    assert authentication_results(report, AUTHSERV_ID) is header
    assert header.startswith(f"Authentication-Results: {AUTHSERV_ID};".encode())
    other = authentication_results(report, "other.example")
    assert other.startswith(b"Authentication-Results: other.example;")
    assert other.split(b";", 1)[1] == header.split(b";", 1)[1]
    decision = verifier.decide(report)
    assert verifier.decide(report) is decision
    assert decision.action == "accept"
