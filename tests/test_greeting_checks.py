"""Greeting checks (``run_checks``) against a real DNS server on loopback: every check's paths.

No SMTP here: each test builds a ``Greeting`` and runs some or all checks
through a ``Resolver`` asking the test zone of ``greeting_zone``. Each
resolver has a cache of its own, so no test sees another's answers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ehlo.dns import DNSCache, Resolver
from ehlo.greeting import (
    CHECKS,
    RESULTS,
    CappedResolver,
    Greeting,
    GreetingReport,
    run_checks,
)

from . import greeting_zone as zone
from .dnsserver import DNSServer

greeting_dns = zone.greeting_dns

OUR_NAME = "mx.ehlo.test"
OUR_IP = "127.0.0.1"


def greet(
    name: str,
    ip: str,
    *,
    verb: str = "EHLO",
    previous: tuple[str, ...] = (),
) -> Greeting:
    return Greeting(
        verb=verb,
        name=name,
        client_ip=ip,
        our_names=(OUR_NAME,),
        our_addresses=(OUR_IP, "::1"),
        previous_names=previous,
    )


async def check(
    server: DNSServer,
    name: str,
    ip: str,
    *checks: str,
    **kwargs: Any,
) -> GreetingReport:
    """Run ``checks`` (all when none named) for ``name`` from ``ip``."""
    resolver = kwargs.pop("resolver", None) or zone.make_resolver(server)
    previous = kwargs.pop("previous", ())
    return await run_checks(
        greet(name, ip, previous=previous), resolver, checks=checks or CHECKS, **kwargs
    )


def ip(n: int) -> str:
    return zone.client_ip(n)


# ----------------------------------------------------------------- report


async def test_all_checks_reported_in_order_with_known_results(greeting_dns: DNSServer) -> None:
    report = await check(greeting_dns, zone.match_name(5), ip(5))
    assert list(report.results) == list(CHECKS)
    assert list(report.to_json()) == list(CHECKS)
    for name, result in report.results.items():
        assert result.name == name
        assert result.result in RESULTS
        assert result.reason
    # The matching name, with a forward-confirmed PTR and SPF "a": everything passes.
    passing = {n for n, r in report.results.items() if r.result == "pass"}
    assert passing == set(CHECKS) - {"literal_match", "consistent"}
    assert report["literal_match"].result == "none"
    assert report["consistent"].result == "none"
    assert report.verified_ptr == zone.match_name(5)
    assert 0 < report.queries <= 10


async def test_checks_can_be_selected(greeting_dns: DNSServer) -> None:
    before = len(greeting_dns.queries)
    report = await check(greeting_dns, "no.such.name.test", ip(5), "syntax", "fqdn")
    assert set(report.results) == {"syntax", "fqdn"}
    assert report.queries == 0
    assert len(greeting_dns.queries) == before  # no DNS for checks that need none


# ------------------------------------------------------------------ syntax


@pytest.mark.parametrize(
    "name",
    [
        "mail.example.test",
        "a" * 63 + ".example.test",
        "[127.0.0.5]",
        "[IPv6:::1]",
        "[IPv6:2001:db8::7]",
    ],
)
async def test_syntax_pass(greeting_dns: DNSServer, name: str) -> None:
    result = (await check(greeting_dns, name, ip(5), "syntax"))["syntax"]
    assert result.result == "pass", result
    kind = "address literal" if name.startswith("[") else "domain name"
    assert result.reason == f"is a valid {kind}"
    assert result.evidence == {"name": name}


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("a" * 64 + ".example.test", "longer than 63 octets"),
        (".".join(["a" * 60] * 5), "longer than 255 octets"),
        ("127.0.0.5", "bare IP address"),
        ("::1", "bare IP address"),
        ("[127.0.0.300]", "not a valid address literal"),
        ("[IPv6:::zz]", "not a valid address literal"),
        ("mail_server.example.test", "not a valid domain name"),
        ("-mail.example.test", "not a valid domain name"),
        ("mail..example.test", "not a valid domain name"),
    ],
)
async def test_syntax_fail(greeting_dns: DNSServer, name: str, why: str) -> None:
    report = await check(greeting_dns, name, ip(5))
    result = report["syntax"]
    assert result.result == "fail", result
    assert why in result.reason
    # A name that is no domain is not looked up, and nothing about it passes.
    assert report["resolves"].result in ("permerror", "none")
    assert report["forward_match"].result in ("permerror", "none")
    assert report["spf_helo"].result == "none"


# -------------------------------------------------------------------- fqdn


@pytest.mark.parametrize(
    ("name", "client", "expected"),
    [
        ("mail.example.test", ip(5), "pass"),
        ("mailhost", ip(5), "fail"),
        ("localhost", ip(5), "pass"),  # loopback client: localhost is the truth
        ("localhost", "::1", "pass"),
        ("LOCALHOST", ip(5), "pass"),
        ("localhost", "192.0.2.9", "fail"),
        ("localhost.localdomain", "192.0.2.9", "fail"),
        ("mx.localhost", "192.0.2.9", "fail"),
        ("[127.0.0.5]", ip(5), "none"),
        ("127.0.0.5", ip(5), "permerror"),
    ],
)
async def test_fqdn(greeting_dns: DNSServer, name: str, client: str, expected: str) -> None:
    result = (await check(greeting_dns, name, client, "fqdn"))["fqdn"]
    assert result.result == expected, result
    if name == "mailhost":
        assert "single label" in result.reason
    if expected == "fail" and "localhost" in name:
        assert "remote" in result.reason and "192.0.2.9" in result.reason


# ----------------------------------------------------------- literal_match


@pytest.mark.parametrize(
    ("name", "client", "expected"),
    [
        ("[127.0.0.5]", ip(5), "pass"),
        ("[127.0.0.6]", ip(5), "fail"),
        ("[IPv6:::1]", "::1", "pass"),
        ("[IPv6:::1]", ip(5), "fail"),
        ("[127.0.0.5]", "::ffff:127.0.0.5", "pass"),  # an IPv4-mapped client is IPv4
        ("[IPv6:::ffff:127.0.0.5]", ip(5), "pass"),
        ("mail.example.test", ip(5), "none"),
    ],
)
async def test_literal_match(
    greeting_dns: DNSServer, name: str, client: str, expected: str
) -> None:
    result = (await check(greeting_dns, name, client, "literal_match"))["literal_match"]
    assert result.result == expected, result
    if expected == "fail":
        assert "is not the client's address" in result.reason
        assert result.evidence["literal"] != result.evidence["client_ip"]


# ---------------------------------------------------------------- resolves


@pytest.mark.parametrize(
    ("name", "kinds"),
    [
        (zone.match_name(5), "A"),
        (zone.MX_ONLY, "MX"),
        (zone.V6_NAME, "AAAA"),
        (zone.CNAME_CHAIN, "A"),
        (zone.MISMATCH, "A"),
    ],
)
async def test_resolves_pass(greeting_dns: DNSServer, name: str, kinds: str) -> None:
    result = (await check(greeting_dns, name, ip(5), "resolves"))["resolves"]
    assert result.result == "pass", result
    assert result.reason == f"has {kinds} records"
    types = [lk["type"] for lk in result.evidence["lookups"]]
    assert types == ["A", "AAAA", "MX"]


async def test_resolves_fail_nxdomain(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, zone.NXDOMAIN, ip(5), "resolves"))["resolves"]
    assert result.result == "fail"
    assert "NXDOMAIN" in result.reason
    assert all(lk["nxdomain"] for lk in result.evidence["lookups"])


async def test_resolves_fail_no_records(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, zone.NO_RECORDS, ip(5), "resolves"))["resolves"]
    assert result.result == "fail"
    assert result.reason == "has no A, AAAA or MX records"
    assert all(lk["answers"] == [] for lk in result.evidence["lookups"])
    assert not any(lk.get("nxdomain") for lk in result.evidence["lookups"])


@pytest.mark.parametrize("name", [zone.SERVFAIL, zone.DROPPED])
async def test_resolves_temperror(greeting_dns: DNSServer, name: str) -> None:
    result = (await check(greeting_dns, name, ip(5), "resolves"))["resolves"]
    assert result.result == "temperror", result
    assert "could not be looked up" in result.reason
    assert ("timeout" if name == zone.DROPPED else "SERVFAIL") in result.reason


async def test_resolves_literal_is_none(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, "[127.0.0.5]", ip(5), "resolves"))["resolves"]
    assert result.result == "none"


# ----------------------------------------------------------- forward_match


async def test_forward_match_pass(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, zone.match_name(7), ip(7), "forward_match"))[
        "forward_match"
    ]
    assert result.result == "pass"
    assert result.reason == "resolves to the client address 127.0.0.7"
    assert result.evidence["client_ip"] == ip(7)
    a = result.evidence["lookups"][0]
    assert a == {"name": zone.match_name(7), "type": "A", "answers": [ip(7)]}


async def test_forward_match_pass_ipv6(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, zone.V6_NAME, "::1", "forward_match"))["forward_match"]
    assert result.result == "pass"
    assert "::1" in result.reason


async def test_forward_match_mismatch_names_the_addresses(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, zone.MISMATCH, ip(7), "forward_match"))["forward_match"]
    assert result.result == "fail"
    # The order of records in an RRset is the server's.
    assert result.reason in {
        f"does not resolve to 127.0.0.7 (it resolves to {first}, {second})"
        for first, second in (zone.MISMATCH_ADDRESSES, zone.MISMATCH_ADDRESSES[::-1])
    }
    a = result.evidence["lookups"][0]
    assert a["type"] == "A" and sorted(a["answers"]) == list(zone.MISMATCH_ADDRESSES)
    assert result.evidence["client_ip"] == ip(7)


async def test_forward_match_follows_cname_chain(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, zone.CNAME_CHAIN, ip(zone.CNAME_N), "forward_match"))[
        "forward_match"
    ]
    assert result.result == "pass", result
    chain = " -> ".join(zone.CNAME_HOPS)
    assert result.reason == f"resolves to the client address {ip(zone.CNAME_N)} via CNAME {chain}"
    a = result.evidence["lookups"][0]
    assert a["name"] == zone.CNAME_CHAIN
    assert a["cnames"] == list(zone.CNAME_HOPS)
    assert a["answers"] == [ip(zone.CNAME_N)]


async def test_forward_match_cname_chain_to_other_address(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, zone.CNAME_CHAIN, ip(8), "forward_match"))["forward_match"]
    assert result.result == "fail"
    assert f"it resolves to {ip(zone.CNAME_N)} via CNAME" in result.reason


@pytest.mark.parametrize(
    ("name", "what"),
    [
        (zone.NXDOMAIN, "it does not exist"),
        (zone.NO_RECORDS, "it has no A/AAAA record"),
        (zone.MX_ONLY, "it has no A/AAAA record"),
    ],
)
async def test_forward_match_fail_without_addresses(
    greeting_dns: DNSServer, name: str, what: str
) -> None:
    result = (await check(greeting_dns, name, ip(7), "forward_match"))["forward_match"]
    assert result.result == "fail"
    assert result.reason == f"does not resolve to 127.0.0.7 ({what})"


async def test_forward_match_temperror_on_timeout(greeting_dns: DNSServer) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    result = (await check(greeting_dns, zone.DROPPED, ip(7), "forward_match"))["forward_match"]
    elapsed = loop.time() - start
    assert result.result == "temperror"
    assert "timeout" in result.reason
    # Bounded by the lookup timeout (A and AAAA asked together), not a multiple of it.
    assert elapsed < zone.DNS_TIMEOUT + 1.0


async def test_forward_match_temperror_on_servfail(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, zone.SERVFAIL, ip(7), "forward_match"))["forward_match"]
    assert result.result == "temperror"
    assert "SERVFAIL" in result.reason


async def test_overall_timeout_gives_temperror(greeting_dns: DNSServer) -> None:
    report = await check(greeting_dns, zone.DROPPED, ip(7), timeout=0.1)
    assert report["forward_match"].result == "temperror"
    assert report["forward_match"].reason == "could not be checked within 0.1s"
    assert report["syntax"].result == "pass"  # checks without DNS are unaffected


# ------------------------------------------------------------------- iprev


async def test_iprev_pass(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, "anything.example.test", ip(9), "iprev"))["iprev"]
    assert result.result == "pass"
    name = zone.match_name(9)
    assert result.reason == f"came from 127.0.0.9, whose PTR name {name} resolves back"
    assert result.evidence["ptr"] == [name]
    assert result.evidence["confirmed"] == [name]
    assert result.evidence["checks"] == [{"name": name, "addresses": [ip(9)], "confirmed": True}]


async def test_iprev_ptr_not_resolving_back_fails(greeting_dns: DNSServer) -> None:
    report = await check(greeting_dns, zone.match_name(11), zone.NOBACK_IP, "iprev")
    result = report["iprev"]
    assert result.result == "fail"
    assert result.reason == (
        f"came from {zone.NOBACK_IP}, whose PTR name {zone.NOBACK_PTR} does not resolve back"
    )
    assert result.evidence["ptr"] == [zone.NOBACK_PTR]
    assert result.evidence["confirmed"] == []
    assert result.evidence["checks"] == [
        {"name": zone.NOBACK_PTR, "addresses": ["192.0.2.11"], "confirmed": False}
    ]
    assert report.verified_ptr is None


async def test_iprev_without_ptr_is_not_pass(greeting_dns: DNSServer) -> None:
    report = await check(greeting_dns, zone.match_name(12), zone.NO_PTR_IP, "iprev")
    result = report["iprev"]
    assert result.result in ("fail", "permerror")
    assert result.reason == f"came from {zone.NO_PTR_IP}, which has no PTR record"
    assert result.evidence["ptr"] == []
    assert report.verified_ptr is None


async def test_iprev_without_ptr_is_permerror(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, zone.match_name(12), zone.NO_PTR_IP, "iprev"))["iprev"]
    assert result.result == "permerror"


async def test_iprev_temperror_when_ptr_lookup_fails(greeting_dns: DNSServer) -> None:
    report = await check(greeting_dns, zone.match_name(13), zone.PTR_SERVFAIL_IP, "iprev")
    assert report["iprev"].result == "temperror"
    assert "SERVFAIL" in report["iprev"].reason
    assert report.verified_ptr is None


async def test_iprev_ipv6(greeting_dns: DNSServer) -> None:
    report = await check(greeting_dns, "[IPv6:::1]", "::1", "iprev")
    assert report["iprev"].result == "pass"
    assert report.verified_ptr == zone.V6_NAME


# --------------------------------------------------------------- ptr_match


async def test_ptr_match_exact(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, "H9.Good.Test", ip(9), "ptr_match"))["ptr_match"]
    assert result.result == "pass"
    assert result.reason == "is the client's PTR name"
    assert result.evidence == {"ptr": [zone.match_name(9)], "match": "exact"}


async def test_ptr_match_same_registered_domain(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, zone.SIBLING_NAME, zone.SIBLING_IP, "ptr_match"))[
        "ptr_match"
    ]
    assert result.result == "pass"
    assert result.reason == (
        f"shares the registered domain sibling.test with PTR name {zone.SIBLING_PTR}"
    )
    assert result.evidence["match"] == "registered-domain"
    assert result.evidence["domain"] == "sibling.test"


async def test_ptr_match_different_domain_fails(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, zone.MISMATCH, ip(9), "ptr_match"))["ptr_match"]
    assert result.result == "fail"
    assert result.reason == f"does not match the client's PTR name {zone.match_name(9)}"
    assert result.evidence["registered_domain"] == "example.test"


async def test_ptr_match_none_without_confirmed_ptr(greeting_dns: DNSServer) -> None:
    for client in (zone.NOBACK_IP, zone.NO_PTR_IP):
        result = (await check(greeting_dns, zone.NOBACK_PTR, client, "ptr_match"))["ptr_match"]
        assert result.result == "none", (client, result)
        assert "no confirmed PTR name" in result.reason


async def test_ptr_match_temperror_and_literal(greeting_dns: DNSServer) -> None:
    report = await check(greeting_dns, zone.match_name(13), zone.PTR_SERVFAIL_IP, "ptr_match")
    assert report["ptr_match"].result == "temperror"
    literal = await check(greeting_dns, "[127.0.0.9]", ip(9), "ptr_match")
    assert literal["ptr_match"].result == "none"


# ------------------------------------------------------------------ not_us


@pytest.mark.parametrize(
    ("name", "client", "expected"),
    [
        (OUR_NAME, ip(5), "fail"),
        ("MX.EHLO.TEST.", ip(5), "fail"),
        (OUR_NAME, OUR_IP, "pass"),  # the client really is us
        ("[127.0.0.1]", ip(5), "fail"),
        ("[127.0.0.1]", OUR_IP, "pass"),
        ("[IPv6:::1]", ip(5), "fail"),
        ("[IPv6:::1]", "::1", "pass"),
        ("[127.0.0.5]", ip(5), "pass"),
        (zone.match_name(5), ip(5), "pass"),
    ],
)
async def test_not_us(greeting_dns: DNSServer, name: str, client: str, expected: str) -> None:
    result = (await check(greeting_dns, name, client, "not_us"))["not_us"]
    assert result.result == expected, result
    if expected == "fail":
        assert "the client is not us" in result.reason
        if name.startswith("["):
            assert OUR_IP in result.evidence["our_addresses"]
        else:
            assert result.evidence["our_names"] == [OUR_NAME]


# ---------------------------------------------------------------- spf_helo


async def test_spf_helo_pass(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, zone.SPF_PASS, ip(5), "spf_helo"))["spf_helo"]
    assert result.result == "pass"
    assert result.evidence["spf"] == "pass"
    assert result.evidence["record"] == "v=spf1 ip4:127.0.0.0/8 -all"
    assert result.reason.startswith("has SPF result pass for 127.0.0.5")
    assert any(line.startswith(f"{zone.SPF_PASS} TXT") for line in result.evidence["lookups"])


async def test_spf_helo_fail(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, zone.SPF_FAIL, ip(5), "spf_helo"))["spf_helo"]
    assert result.result == "fail"
    assert result.evidence["spf"] == "fail"
    assert "does not authorise 127.0.0.5" in result.reason
    assert "-all" in result.reason


async def test_spf_helo_softfail_is_none_with_raw_result(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, zone.SPF_SOFTFAIL, ip(5), "spf_helo"))["spf_helo"]
    assert result.result == "none"  # RFC 7208 section 8.5: no ground to refuse
    assert result.evidence["spf"] == "softfail"
    assert "softfail" in result.reason


async def test_spf_helo_via_a_mechanism_and_cname(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, zone.CNAME_CHAIN, ip(zone.CNAME_N), "spf_helo"))["spf_helo"]
    assert result.result == "pass"
    assert result.evidence["record"] == "v=spf1 a -all"


@pytest.mark.parametrize("name", [zone.SERVFAIL, zone.DROPPED])
async def test_spf_helo_temperror(greeting_dns: DNSServer, name: str) -> None:
    result = (await check(greeting_dns, name, ip(5), "spf_helo"))["spf_helo"]
    assert result.result == "temperror"
    assert result.evidence["spf"] == "temperror"
    assert any("temperror" in line for line in result.evidence["lookups"])


@pytest.mark.parametrize(
    ("name", "detail"),
    [
        (zone.MISMATCH, "publishes no SPF record"),
        (zone.NXDOMAIN, "NXDOMAIN"),
        ("[127.0.0.5]", "SPF does not apply"),
    ],
)
async def test_spf_helo_none(greeting_dns: DNSServer, name: str, detail: str) -> None:
    result = (await check(greeting_dns, name, ip(5), "spf_helo"))["spf_helo"]
    assert result.result == "none"
    assert detail in result.reason


# ----------------------------------------------------------------- dynamic


async def test_dynamic_ptr(greeting_dns: DNSServer) -> None:
    report = await check(greeting_dns, zone.match_name(23), zone.DYNAMIC_IP, "dynamic")
    result = report["dynamic"]
    assert result.result == "fail"
    assert result.evidence == {"name": zone.DYNAMIC_PTR, "fragment": "127-0-0-23"}
    assert zone.DYNAMIC_PTR in result.reason


async def test_dynamic_greeting_name(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, "c-127-0-0-5.pool.example.test", ip(5), "dynamic"))[
        "dynamic"
    ]
    assert result.result == "fail"
    assert result.evidence["fragment"] == "127-0-0-5"


async def test_dynamic_pass(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, zone.match_name(5), ip(5), "dynamic"))["dynamic"]
    assert result.result == "pass"
    assert zone.match_name(5) in result.evidence["names"]


async def test_dynamic_not_pass_when_ptr_lookup_fails(greeting_dns: DNSServer) -> None:
    result = (await check(greeting_dns, zone.match_name(13), zone.PTR_SERVFAIL_IP, "dynamic"))[
        "dynamic"
    ]
    assert result.result != "pass", result


# -------------------------------------------------------------- consistent


async def test_consistent(greeting_dns: DNSServer) -> None:
    name = zone.match_name(5)
    first = await check(greeting_dns, name, ip(5), "consistent")
    assert first["consistent"].result == "none"
    same = await check(greeting_dns, name, ip(5), "consistent", previous=("H5.good.test.",))
    assert same["consistent"].result == "pass"
    assert same["consistent"].evidence == {"previous": ["H5.good.test."]}
    other = await check(
        greeting_dns, name, ip(5), "consistent", previous=(name, "other.example.test")
    )
    assert other["consistent"].result == "fail"
    assert other["consistent"].reason == "differs from the earlier greeting other.example.test"


# ----------------------------------------------------------- the query cap


async def test_query_cap_turns_later_lookups_into_temperror(greeting_dns: DNSServer) -> None:
    report = await check(greeting_dns, zone.match_name(6), ip(6), max_queries=3)
    assert report.queries == 3
    limited = {n: r for n, r in report.results.items() if "limit" in r.reason}
    assert limited, report.to_json()
    for name, result in limited.items():
        assert result.result == "temperror", (name, result)
    # The PTR and the SPF record come after the name's own A/AAAA/MX: capped.
    for name in ("iprev", "ptr_match", "spf_helo"):
        assert report[name].result == "temperror", (name, report[name])
    assert report.verified_ptr is None
    tight = await check(greeting_dns, zone.match_name(6), ip(6), max_queries=1)
    assert tight.queries == 1
    assert tight["resolves"].result == "temperror"
    assert tight["forward_match"].result == "temperror"
    assert "DNS query limit of 1" in tight["forward_match"].reason
    none = await check(greeting_dns, zone.match_name(6), ip(6), max_queries=0)
    assert none.queries == 0
    for name in ("resolves", "forward_match", "iprev", "ptr_match", "spf_helo"):
        assert none[name].result == "temperror", (name, none[name])


@pytest.mark.parametrize(
    ("name", "client"),
    [
        (zone.match_name(6), ip(6)),
        (zone.MISMATCH, ip(6)),
        (zone.CNAME_CHAIN, ip(zone.CNAME_N)),
        (zone.SIBLING_NAME, zone.SIBLING_IP),
    ],
)
async def test_query_cap_never_changes_a_result_except_to_temperror(
    greeting_dns: DNSServer, name: str, client: str
) -> None:
    full = await check(greeting_dns, name, client)
    for cap in range(full.queries):
        capped = await check(greeting_dns, name, client, max_queries=cap)
        assert capped.queries <= cap
        for check_name in CHECKS:
            if check_name == "dynamic":
                continue  # see test_query_cap_dynamic_never_passes
            got, want = capped[check_name].result, full[check_name].result
            assert got in (want, "temperror"), (cap, check_name, got, want)


async def test_query_cap_dynamic_never_passes(greeting_dns: DNSServer) -> None:
    full = await check(greeting_dns, zone.match_name(23), zone.DYNAMIC_IP)
    assert full["dynamic"].result == "fail"
    capped = await check(greeting_dns, zone.match_name(23), zone.DYNAMIC_IP, max_queries=3)
    assert capped["dynamic"].result in ("fail", "temperror"), capped["dynamic"]


async def test_capped_resolver_shares_one_budget_between_runs(greeting_dns: DNSServer) -> None:
    budget = CappedResolver(zone.make_resolver(greeting_dns), 8)
    first = await run_checks(greet(zone.match_name(6), ip(6)), budget)
    assert 0 < first.queries < 8
    assert budget.used == first.queries
    assert not any("limit" in r.reason for r in first.results.values())
    second = await run_checks(greet(zone.MISMATCH, ip(6), previous=(zone.match_name(6),)), budget)
    assert budget.used == 8
    assert second.queries == 8 - first.queries  # the report counts its own lookups
    limited = [r for r in second.results.values() if "limit" in r.reason]
    assert limited and {r.result for r in limited} == {"temperror"}


# ------------------------------------------------------- the shared cache

# Tests that count queries give each lookup ample time: one timed out on a
# loaded machine is not cached and would be asked again.
COUNTING_TIMEOUT = 3.0


async def test_shared_cache_one_query_for_100_concurrent_runs(greeting_dns: DNSServer) -> None:
    name, client = zone.match_name(50), ip(50)
    resolver = zone.make_resolver(greeting_dns, COUNTING_TIMEOUT)
    greeting_dns.clear_queries()
    reports = await asyncio.gather(
        *(check(greeting_dns, name, client, resolver=resolver) for _ in range(100))
    )
    assert greeting_dns.count(name, "A") == 1
    assert greeting_dns.count(name, "TXT") == 1
    assert greeting_dns.count(DNSServer.reverse(client), "PTR") == 1
    for report in reports:
        assert report["forward_match"].result == "pass"
        assert report["spf_helo"].result == "pass"
        assert report.verified_ptr == name
    # Another session, another resolver on the same cache, within the TTL: no new query.
    again = Resolver([greeting_dns.nameserver], COUNTING_TIMEOUT, cache=resolver.cache)
    later = await check(greeting_dns, name, client, resolver=again)
    assert later["forward_match"].result == "pass"
    assert greeting_dns.count(name, "A") == 1
    assert greeting_dns.count(name) == len(
        {q.rdtype for q in greeting_dns.queries if q.name == name}
    )


async def test_shared_cache_keeps_negative_answers(greeting_dns: DNSServer) -> None:
    resolver = zone.make_resolver(greeting_dns, COUNTING_TIMEOUT)
    greeting_dns.clear_queries()
    reports = await asyncio.gather(
        *(
            check(greeting_dns, zone.NXDOMAIN, ip(51), "resolves", resolver=resolver)
            for _ in range(100)
        )
    )
    assert {r["resolves"].result for r in reports} == {"fail"}
    for rdtype in ("A", "AAAA", "MX"):
        assert greeting_dns.count(zone.NXDOMAIN, rdtype) == 1, rdtype


async def test_cache_expires_with_the_ttl(greeting_dns: DNSServer) -> None:
    now = [1000.0]
    cache = DNSCache(clock=lambda: now[0])
    resolver = Resolver([greeting_dns.nameserver], COUNTING_TIMEOUT, cache=cache)
    name, client = zone.match_name(52), ip(52)
    greeting_dns.clear_queries()
    await check(greeting_dns, name, client, "forward_match", resolver=resolver)
    now[0] += greeting_dns.ttl - 1
    await check(greeting_dns, name, client, "forward_match", resolver=resolver)
    assert greeting_dns.count(name, "A") == 1
    now[0] += 2  # past the TTL
    report = await check(greeting_dns, name, client, "forward_match", resolver=resolver)
    assert report["forward_match"].result == "pass"
    assert greeting_dns.count(name, "A") == 2


async def test_failures_are_not_cached(greeting_dns: DNSServer) -> None:
    resolver = zone.make_resolver(greeting_dns, COUNTING_TIMEOUT)
    greeting_dns.clear_queries()
    seen = 0
    for _ in (1, 2):
        report = await check(greeting_dns, zone.SERVFAIL, ip(53), "resolves", resolver=resolver)
        assert report["resolves"].result == "temperror"
        assert "SERVFAIL" in report["resolves"].reason
        # The check answers at the first failure; let its sibling lookups finish.
        for _ in range(200):
            if not resolver._inflight:
                break
            await asyncio.sleep(0.01)
        asked = greeting_dns.count(zone.SERVFAIL)
        assert asked > seen  # asked again each time: nothing was cached
        seen = asked
    assert len(resolver.cache) == 0
