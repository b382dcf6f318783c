"""ehlo.greeting.spf: SPF for HELO via pyspf over our resolver, against a real DNS server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import spf as pyspf  # type: ignore[import-untyped]

from ehlo.dns import DNSCache, Lookup, Resolver
from ehlo.greeting.spf import SpfOutcome, helo_domain, spf_helo

from .dnsserver import DNSServer

GOOD = "127.0.0.5"
OTHER = "127.0.0.6"


def txt(*strings: str) -> list[str]:
    """One TXT record made of ``strings`` (each a character-string)."""
    return [" ".join(f'"{s}"' for s in strings)]


# include chain: chain0 -> chain1 -> ... -> chain11, which authorises GOOD.
CHAIN = {
    f"chain{n}.test": {"TXT": txt(f"v=spf1 include:chain{n + 1}.test -all")} for n in range(11)
}
CHAIN["chain11.test"] = {"TXT": txt(f"v=spf1 ip4:{GOOD} -all")}

ZONE = {
    "pass.test": {"TXT": txt(f"v=spf1 ip4:{GOOD} -all"), "A": ["127.0.0.99"]},
    "soft.test": {"TXT": txt(f"v=spf1 ip4:{GOOD} ~all")},
    "neutral.test": {"TXT": txt("v=spf1 ?all")},
    "default.test": {"TXT": txt(f"v=spf1 ip4:{GOOD}")},  # nothing matches: neutral
    "other-txt.test": {"TXT": txt("google-site-verification=abc", "123")},
    "a-only.test": {"A": [GOOD]},
    "two.test": {"TXT": [*txt(f"v=spf1 ip4:{GOOD} -all"), *txt("v=spf1 -all")]},
    "syntax.test": {"TXT": txt("v=spf1 ip4:127.0.0.300 -all")},
    "unknown-mech.test": {"TXT": txt(f"v=spf1 ip4:{GOOD} frobnicate -all")},
    "split.test": {"TXT": txt(f"v=spf1 ip4:{GOOD}", " -all")},  # RFC 7208 3.3
    "amech.test": {"TXT": txt("v=spf1 a -all"), "A": ["127.0.0.7"]},
    "a6.test": {"TXT": txt("v=spf1 a -all"), "AAAA": ["::1"]},
    "ip6.test": {"TXT": txt("v=spf1 ip6:::1 -all")},
    "mxmech.test": {"TXT": txt("v=spf1 mx -all"), "MX": ["10 mx1.mxmech.test."]},
    "mx1.mxmech.test": {"A": ["127.0.0.8"]},
    "inc.test": {"TXT": txt("v=spf1 include:pass.test -all")},
    "redirect.test": {"TXT": txt("v=spf1 redirect=pass.test")},
    "alias.test": {"CNAME": ["pass.test."]},
    "exp.test": {"TXT": txt("v=spf1 -all exp=why.exp.test")},
    "why.exp.test": {"TXT": txt("Mail from %{i} is not welcome here")},
    "void.test": {"TXT": txt("v=spf1 a:n1.void.test a:n2.void.test a:n3.void.test -all")},
    "inc-none.test": {"TXT": txt("v=spf1 include:other-txt.test -all")},
    "inc-broken.test": {"TXT": txt("v=spf1 include:broken.test -all")},
    "many.test": {"TXT": txt("v=spf1 a:h1.many.test a:h2.many.test -all")},
    "h1.many.test": {"A": ["127.0.0.21"]},
    "h2.many.test": {"A": ["127.0.0.22"]},
    "ptrmech.test": {"TXT": txt("v=spf1 ptr -all")},
    "host.ptrmech.test": {"A": ["127.0.0.9"]},
    DNSServer.reverse("127.0.0.9"): {"PTR": ["host.ptrmech.test."]},
    "exists.test": {"TXT": txt("v=spf1 exists:%{i}.allow.exists.test -all")},
    "127.0.0.10.allow.exists.test": {"A": ["127.0.0.2"]},
    **CHAIN,
}


@pytest.fixture
def server() -> Iterator[DNSServer]:
    with DNSServer(ZONE, behaviours={"broken.test": "servfail", "silent.test": "drop"}) as srv:
        yield srv


def make_resolver(server: DNSServer, timeout: float = 0.5) -> Resolver:
    return Resolver([server.nameserver], timeout=timeout, cache=DNSCache())


@pytest.fixture
def resolver(server: DNSServer) -> Resolver:
    return make_resolver(server)


@pytest.fixture(autouse=True)
def no_pyspf_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyspf's own DNS driver must never be used: every query goes through our resolver."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"pyspf.DNSLookup called: {args}")

    monkeypatch.setattr(pyspf, "DNSLookup", refuse)


# ------------------------------------------------------------------ results


@pytest.mark.parametrize(
    ("helo", "ip", "result", "words"),
    [
        ("pass.test", GOOD, "pass", f"matched ip4:{GOOD}"),
        ("PASS.test.", GOOD, "pass", f"matched ip4:{GOOD}"),
        ("pass.test", OTHER, "fail", "matched -all"),
        ("soft.test", OTHER, "softfail", "matched ~all"),
        ("soft.test", GOOD, "pass", f"matched ip4:{GOOD}"),
        ("neutral.test", GOOD, "neutral", "matched ?all"),
        ("default.test", OTHER, "neutral", "no mechanism matched"),
        ("split.test", GOOD, "pass", f"matched ip4:{GOOD}"),
        ("split.test", OTHER, "fail", "matched -all"),
        ("redirect.test", GOOD, "pass", f"matched ip4:{GOOD}"),
        ("alias.test", GOOD, "pass", f"matched ip4:{GOOD}"),
        ("ip6.test", "::1", "pass", "matched ip6:::1"),
        ("ip6.test", GOOD, "fail", "matched -all"),
        ("pass.test", f"::ffff:{GOOD}", "pass", f"matched ip4:{GOOD}"),
    ],
)
async def test_results(resolver: Resolver, helo: str, ip: str, result: str, words: str) -> None:
    outcome = await spf_helo(resolver, ip, helo)
    assert outcome.result == result, outcome
    assert words in outcome.explanation


async def test_pass_outcome_in_full(resolver: Resolver) -> None:
    outcome = await spf_helo(resolver, GOOD, "pass.test")
    assert outcome == SpfOutcome(
        "pass",
        f"{GOOD} is authorised to use HELO pass.test (matched ip4:{GOOD})",
        f"v=spf1 ip4:{GOOD} -all",
        [f'pass.test TXT -> "v=spf1 ip4:{GOOD} -all"'],
    )
    assert outcome.to_json()["record"] == f"v=spf1 ip4:{GOOD} -all"


async def test_split_record_is_joined(resolver: Resolver) -> None:
    outcome = await spf_helo(resolver, GOOD, "split.test")
    assert outcome.record == f"v=spf1 ip4:{GOOD} -all"


async def test_cname_evidence(resolver: Resolver) -> None:
    outcome = await spf_helo(resolver, GOOD, "alias.test")
    assert outcome.lookups == [f'alias.test TXT -> CNAME pass.test -> "v=spf1 ip4:{GOOD} -all"']


async def test_domain_explanation_on_fail(resolver: Resolver) -> None:
    outcome = await spf_helo(resolver, OTHER, "exp.test")
    assert outcome.result == "fail"
    assert "matched -all" in outcome.explanation
    assert f'the domain explains: "Mail from {OTHER} is not welcome here"' in outcome.explanation


@pytest.mark.parametrize(
    ("helo", "words"),
    [
        ("other-txt.test", "publishes no SPF record"),
        ("a-only.test", "publishes no SPF record"),
        ("nowhere.test", "does not exist (NXDOMAIN)"),
    ],
)
async def test_none(resolver: Resolver, helo: str, words: str) -> None:
    outcome = await spf_helo(resolver, GOOD, helo)
    assert outcome.result == "none"
    assert words in outcome.explanation
    assert outcome.record is None
    assert len(outcome.lookups) == 1 and outcome.lookups[0].startswith(f"{helo} TXT -> ")


@pytest.mark.parametrize(
    "helo",
    [
        "[127.0.0.5]",
        "[IPv6:::1]",
        "127.0.0.5",
        "::1",
        "localhost",
        "example",
        "a..test",
        "-bad.test",
        "a" * 64 + ".test",
        "",
    ],
)
async def test_not_a_domain_is_none_without_dns(
    server: DNSServer, resolver: Resolver, helo: str
) -> None:
    outcome = await spf_helo(resolver, GOOD, helo)
    assert outcome.result == "none"
    assert "not a domain name" in outcome.explanation
    assert outcome.lookups == []
    assert server.queries == []


def test_helo_domain() -> None:
    assert helo_domain("Mail.Example.TEST.") == "mail.example.test"
    assert helo_domain("bücher.example") == "xn--bcher-kva.example"
    assert helo_domain("[192.0.2.1]") is None
    assert helo_domain("192.0.2.1") is None
    assert helo_domain("1.2.3.4.5") is None  # numeric top label
    assert helo_domain("single") is None


@pytest.mark.parametrize(
    ("helo", "words"),
    [
        ("two.test", "Two or more type TXT spf records found"),
        ("syntax.test", "Invalid IP4 address: ip4:127.0.0.300"),
        ("unknown-mech.test", "Unknown mechanism found: frobnicate"),
        ("void.test", "Void lookup limit of 2 exceeded"),
        ("inc-none.test", "No valid SPF record for included domain"),
        ("chain0.test", "Too many DNS lookups"),  # 11 includes
    ],
)
async def test_permerror(resolver: Resolver, helo: str, words: str) -> None:
    outcome = await spf_helo(resolver, GOOD, helo)
    assert outcome.result == "permerror", outcome
    assert words in outcome.explanation


async def test_ten_lookups_are_allowed(resolver: Resolver, server: DNSServer) -> None:
    # RFC 7208 4.6.4: chain1 -> chain11 is exactly 10 includes.
    outcome = await spf_helo(resolver, GOOD, "chain1.test")
    assert outcome.result == "pass"
    assert server.count("chain11.test", "TXT") == 1


async def test_permerror_keeps_the_record(resolver: Resolver) -> None:
    outcome = await spf_helo(resolver, GOOD, "syntax.test")
    assert outcome.record == "v=spf1 ip4:127.0.0.300 -all"
    two = await spf_helo(resolver, GOOD, "two.test")
    assert two.record is None  # RFC 7208 4.5: no single record was selected
    assert "v=spf1 -all" in two.lookups[0]


# ------------------------------------------------------------------ temperror


async def test_servfail_is_temperror(resolver: Resolver) -> None:
    outcome = await spf_helo(resolver, GOOD, "broken.test")
    assert outcome.result == "temperror"
    assert "SPF Temporary Error" in outcome.explanation
    assert outcome.lookups[0].startswith("broken.test TXT -> temperror")


async def test_servfail_in_include_is_temperror(resolver: Resolver) -> None:
    outcome = await spf_helo(resolver, GOOD, "inc-broken.test")
    assert outcome.result == "temperror"
    assert outcome.record == "v=spf1 include:broken.test -all"


async def test_dropped_query_is_temperror(resolver: Resolver) -> None:
    started = time.monotonic()
    outcome = await spf_helo(resolver, GOOD, "silent.test")
    assert outcome.result == "temperror"
    assert "timeout" in outcome.explanation.lower()
    assert time.monotonic() - started < 3


async def test_overall_timeout_is_temperror(server: DNSServer) -> None:
    # The resolver would wait 5 s; the evaluation may take only 0.3 s.
    resolver = make_resolver(server, timeout=5.0)
    started = time.monotonic()
    outcome = await spf_helo(resolver, GOOD, "silent.test", timeout=0.3)
    assert time.monotonic() - started < 1.5
    assert outcome.result == "temperror"
    assert "did not finish within 0.3 s" in outcome.explanation
    assert outcome.lookups == ["silent.test TXT -> no answer in time"]
    # The worker thread gives up too (its pending lookup is cancelled).
    deadline = time.monotonic() + 2
    while any(t.name.startswith("ehlo-spf") and _busy(t) for t in threading.enumerate()):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


def _busy(thread: threading.Thread) -> bool:
    frame = __import__("sys")._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == "_evaluate":
            return True
        frame = frame.f_back
    return False


async def test_resolver_error_is_temperror(resolver: Resolver) -> None:
    class Failing(Resolver):
        async def lookup(self, name: str, rdtype: str) -> Lookup:
            raise RuntimeError("query cap reached")

    failing = Failing(resolver.nameservers, timeout=0.5, cache=DNSCache())
    outcome = await spf_helo(failing, GOOD, "pass.test")
    assert outcome.result == "temperror"
    assert "query cap reached" in outcome.explanation


async def test_bad_client_ip_is_temperror(resolver: Resolver) -> None:
    outcome = await spf_helo(resolver, "not-an-ip", "pass.test")
    assert outcome.result == "temperror"


async def test_cancellation_propagates(resolver: Resolver) -> None:
    task = asyncio.ensure_future(spf_helo(resolver, GOOD, "silent.test"))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ------------------------------------------------------------------ mechanisms through our resolver


async def test_a_mechanism(resolver: Resolver, server: DNSServer) -> None:
    assert (await spf_helo(resolver, "127.0.0.7", "amech.test")).result == "pass"
    assert (await spf_helo(resolver, OTHER, "amech.test")).result == "fail"
    assert (await spf_helo(resolver, "::1", "a6.test")).result == "pass"
    assert server.count("amech.test", "A") == 1
    assert server.count("a6.test", "AAAA") == 1


async def test_mx_mechanism_and_shared_cache(resolver: Resolver, server: DNSServer) -> None:
    first = await spf_helo(resolver, "127.0.0.8", "mxmech.test")
    assert first.result == "pass"
    assert "matched mx" in first.explanation
    assert first.lookups == [
        'mxmech.test TXT -> "v=spf1 mx -all"',
        "mxmech.test MX -> 10 mx1.mxmech.test",
        "mx1.mxmech.test A -> 127.0.0.8",
    ]
    assert server.count("mxmech.test", "TXT") == 1
    assert server.count("mxmech.test", "MX") == 1
    assert server.count("mx1.mxmech.test", "A") == 1
    seen = len(server.queries)
    # Within the TTL a second evaluation (another client) is answered from the cache.
    second = await spf_helo(resolver, OTHER, "mxmech.test")
    assert second.result == "fail"
    assert len(server.queries) == seen
    assert second.lookups == first.lookups  # the evidence is the same


async def test_include_mechanism(resolver: Resolver, server: DNSServer) -> None:
    outcome = await spf_helo(resolver, GOOD, "inc.test")
    assert outcome.result == "pass"
    assert "matched include:pass.test" in outcome.explanation
    assert outcome.record == "v=spf1 include:pass.test -all"
    assert server.count("pass.test", "TXT") == 1
    assert (await spf_helo(resolver, OTHER, "inc.test")).result == "fail"
    assert server.count("pass.test", "TXT") == 1  # cached


async def test_ptr_and_exists_mechanisms(resolver: Resolver, server: DNSServer) -> None:
    assert (await spf_helo(resolver, "127.0.0.9", "ptrmech.test")).result == "pass"
    assert server.count(DNSServer.reverse("127.0.0.9"), "PTR") == 1
    assert server.count("host.ptrmech.test", "A") == 1
    assert (await spf_helo(resolver, "127.0.0.10", "exists.test")).result == "pass"
    assert (await spf_helo(resolver, "127.0.0.11", "exists.test")).result == "fail"
    assert server.count("127.0.0.11.allow.exists.test", "A") == 1


async def test_queries_use_the_resolver(resolver: Resolver) -> None:
    before = resolver.queries
    await spf_helo(resolver, "127.0.0.22", "many.test")
    assert resolver.queries - before == 3  # TXT, then A for h1 and h2


# ------------------------------------------------------------------ concurrency


async def test_concurrent_evaluations(resolver: Resolver) -> None:
    cases = [
        (GOOD, "pass.test", "pass"),
        (OTHER, "pass.test", "fail"),
        (OTHER, "soft.test", "softfail"),
        ("127.0.0.7", "amech.test", "pass"),
        ("127.0.0.8", "mxmech.test", "pass"),
        (OTHER, "mxmech.test", "fail"),
        ("127.0.0.21", "many.test", "pass"),
        (GOOD, "neutral.test", "neutral"),
        (GOOD, "broken.test", "temperror"),
        (GOOD, "two.test", "permerror"),
        (GOOD, "nowhere.test", "none"),
    ] * 3
    outcomes = await asyncio.gather(*(spf_helo(resolver, ip, helo) for ip, helo, _ in cases))
    assert [o.result for o in outcomes] == [expected for _, _, expected in cases]


async def test_concurrent_evaluations_on_separate_resolvers() -> None:
    zone_a = {"host.test": {"TXT": txt(f"v=spf1 ip4:{GOOD} -all")}}
    zone_b = {"host.test": {"TXT": txt(f"v=spf1 ip4:{OTHER} -all")}}
    with DNSServer(zone_a) as a, DNSServer(zone_b) as b:
        first, second = await asyncio.gather(
            spf_helo(make_resolver(a), GOOD, "host.test"),
            spf_helo(make_resolver(b), GOOD, "host.test"),
        )
    assert (first.result, second.result) == ("pass", "fail")
    assert first.record == f"v=spf1 ip4:{GOOD} -all"
    assert second.record == f"v=spf1 ip4:{OTHER} -all"
