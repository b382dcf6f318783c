"""MTA-STS (RFC 8461): TXT discovery, HTTPS fetch, parsing, MX matching and the policy cache.

Real parts: the loopback DNS server of ``tests/dnsserver.py`` serves the
``_mta-sts`` TXT records and points ``mta-sts.<domain>`` at 127.0.0.1, where
an aiohttp HTTPS server with a certificate from a test CA (trustme) serves
the policy and counts the requests it gets. The clock is injected, so
``max_age`` runs out without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import trustme
from aiohttp import web

from ehlo.delivery.mtasts import (
    MAX_AGE_LIMIT,
    MAX_POLICY_SIZE,
    MTASTS,
    Policy,
    parse_policy,
    parse_txt,
)
from ehlo.dns import DNSCache, Resolver

from .dnsserver import DNSServer

DOMAIN = "example.test"
POLICY_HOST = f"mta-sts.{DOMAIN}"
TXT_NAME = f"_mta-sts.{DOMAIN}"
ENFORCE = (
    "version: STSv1\r\n"
    "mode: enforce\r\n"
    "mx: mail.example.test\r\n"
    "mx: *.mx.example.test\r\n"
    "max_age: 86400\r\n"
)


def txt(policy_id: str) -> str:
    """A TXT record value as the DNS server's zone takes it (one quoted string)."""
    return f'"v=STSv1; id={policy_id};"'


class Clock:
    """Wall-clock seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class PolicySite:
    """An HTTPS server on 127.0.0.1 answering every path as told, and logging each request."""

    def __init__(self, ca: trustme.CA, *names: str) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(self.context)
        self.status = 200
        self.content_type = "text/plain"
        self.body = ENFORCE.encode()
        self.headers: dict[str, str] = {}
        self.chunked = False
        self.stall: asyncio.Event | None = None
        self.requests: list[tuple[str, str]] = []  # (Host header, path)
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.host, request.path))
        if self.stall is not None:
            await self.stall.wait()
        if not self.chunked:
            return web.Response(
                status=self.status,
                body=self.body,
                content_type=self.content_type,
                headers=self.headers,
            )
        response = web.StreamResponse(status=self.status, headers=self.headers)
        response.content_type = self.content_type
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(self.body), 4096):
            await response.write(self.body[start : start + 4096])
        await response.write_eof()
        return response

    async def start(self) -> PolicySite:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.stall is not None:
            self.stall.set()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    # TTL 0: the resolver keeps no answer, so a changed record is seen at once.
    zone = {TXT_NAME: {"TXT": [txt("one")]}, POLICY_HOST: {"A": ["127.0.0.1"]}}
    with DNSServer(zone, ttl=0, negative_ttl=0) as server:
        yield server


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def sites(ca: trustme.CA) -> AsyncIterator[Callable[..., Any]]:
    started: list[PolicySite] = []

    async def start(*names: str) -> PolicySite:
        site = await PolicySite(ca, *(names or (POLICY_HOST,))).start()
        started.append(site)
        return site

    yield start
    for site in started:
        await site.stop()


@pytest.fixture
async def site(sites: Callable[..., Any]) -> PolicySite:
    result: PolicySite = await sites()
    return result


@pytest.fixture
async def mtasts(
    dns_server: DNSServer, site: PolicySite, client_context: ssl.SSLContext, clock: Clock
) -> AsyncIterator[MTASTS]:
    resolver = Resolver([dns_server.nameserver], cache=DNSCache())
    sts = MTASTS(resolver, port=site.port, ssl_context=client_context, clock=clock, timeout=5.0)
    yield sts
    await sts.close()


def fetch_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "ehlo.delivery" and r.levelno == logging.WARNING
    ]


# ------------------------------------------------- discovery, fetch, cache


async def test_enforce_policy_is_fetched_parsed_and_matched(
    mtasts: MTASTS, site: PolicySite, clock: Clock
) -> None:
    policy = await mtasts.policy("Example.TEST.")
    assert policy == Policy(
        domain=DOMAIN,
        id="one",
        mode="enforce",
        mx=("mail.example.test", "*.mx.example.test"),
        max_age=86400,
        fetched_at=clock.now,
    )
    assert site.requests == [(f"{POLICY_HOST}:{site.port}", "/.well-known/mta-sts.txt")]
    assert policy.matches("mail.example.test")
    assert policy.matches("MAIL.Example.Test.")
    assert policy.matches("a.mx.example.test")
    assert not policy.matches("a.b.mx.example.test")  # the wildcard is one label
    assert not policy.matches("mx.example.test")
    assert not policy.matches("mail.example.test.evil.test")
    assert not policy.matches("other.example.test")


async def test_a_cached_policy_with_the_same_id_is_not_fetched_again(
    mtasts: MTASTS, site: PolicySite, dns_server: DNSServer
) -> None:
    first = await mtasts.policy(DOMAIN)
    second = await mtasts.policy(DOMAIN)
    assert first is not None and second is first
    assert len(site.requests) == 1
    # The TXT record is asked each time: that is how a new id is noticed.
    assert dns_server.count(TXT_NAME, "TXT") == 2


async def test_a_new_id_in_the_txt_record_fetches_the_policy_again(
    mtasts: MTASTS, site: PolicySite, dns_server: DNSServer
) -> None:
    first = await mtasts.policy(DOMAIN)
    assert first is not None and first.mode == "enforce"
    site.body = ENFORCE.replace("mode: enforce", "mode: testing").encode()
    dns_server.set_records(TXT_NAME, "TXT", [txt("two")])
    second = await mtasts.policy(DOMAIN)
    assert second is not None and (second.id, second.mode) == ("two", "testing")
    assert len(site.requests) == 2
    assert await mtasts.policy(DOMAIN) is second
    assert len(site.requests) == 2


async def test_a_policy_expires_after_max_age(
    mtasts: MTASTS, site: PolicySite, clock: Clock
) -> None:
    site.body = ENFORCE.replace("max_age: 86400", "max_age: 600").encode()
    first = await mtasts.policy(DOMAIN)
    assert first is not None and first.max_age == 600
    clock.now += 599
    assert not first.expired(clock.now)
    assert await mtasts.policy(DOMAIN) is first
    assert len(site.requests) == 1
    clock.now += 1
    assert first.expired(clock.now)
    second = await mtasts.policy(DOMAIN)
    assert second is not None and second is not first and second.fetched_at == clock.now
    assert len(site.requests) == 2


async def test_concurrent_callers_share_one_fetch(mtasts: MTASTS, site: PolicySite) -> None:
    policies = await asyncio.gather(*(mtasts.policy(DOMAIN) for _ in range(5)))
    assert len({id(p) for p in policies}) == 1 and policies[0] is not None
    assert len(site.requests) == 1


async def test_the_policy_host_is_resolved_by_ehlos_resolver_only(
    mtasts: MTASTS, dns_server: DNSServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(host: Any, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"system resolver asked for {host!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "gethostbyname", refuse)
    assert await mtasts.policy(DOMAIN) is not None
    assert dns_server.count(POLICY_HOST, "A") == 1


# --------------------------------------------------- no (usable) policy


async def test_a_certificate_for_another_name_gives_no_policy_and_one_log_line(
    dns_server: DNSServer,
    sites: Callable[..., Any],
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ehlo.delivery")
    wrong: PolicySite = await sites("mail.example.test")
    sts = MTASTS(
        Resolver([dns_server.nameserver], cache=DNSCache()),
        port=wrong.port,
        ssl_context=client_context,
    )
    try:
        assert await sts.policy(DOMAIN) is None
        assert sts.cached(DOMAIN) is None
    finally:
        await sts.close()
    assert wrong.requests == []  # the handshake failed before any request
    [line] = fetch_failures(caplog)
    assert DOMAIN in line and "certificate" in line and POLICY_HOST in line, line


async def test_a_certificate_from_an_untrusted_ca_gives_no_policy(
    dns_server: DNSServer, site: PolicySite, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ehlo.delivery")
    other = ssl.create_default_context()
    trustme.CA().configure_trust(other)
    sts = MTASTS(
        Resolver([dns_server.nameserver], cache=DNSCache()), port=site.port, ssl_context=other
    )
    try:
        assert await sts.policy(DOMAIN) is None
    finally:
        await sts.close()
    [line] = fetch_failures(caplog)
    assert "certificate" in line, line


async def test_a_redirect_is_not_followed(
    mtasts: MTASTS, site: PolicySite, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ehlo.delivery")
    site.status = 301
    site.headers = {"Location": f"https://{POLICY_HOST}:{site.port}/moved.txt"}
    assert await mtasts.policy(DOMAIN) is None
    assert [path for _, path in site.requests] == ["/.well-known/mta-sts.txt"]
    [line] = fetch_failures(caplog)
    assert DOMAIN in line and "redirect" in line, line


OVERSIZED = (ENFORCE + "padding: " + "x" * MAX_POLICY_SIZE + "\r\n").encode()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"status": 404}, "HTTP status 404"),
        ({"status": 204}, "HTTP status 204"),
        ({"content_type": "text/html"}, "media type text/html"),
        ({"content_type": "application/octet-stream"}, "media type application/octet-stream"),
        ({"body": OVERSIZED}, "larger than 64 KiB"),
        ({"body": OVERSIZED, "chunked": True}, "larger than 64 KiB"),
        ({"body": ENFORCE.replace("STSv1", "STSv2").encode()}, "version 'STSv2'"),
        ({"body": ENFORCE.replace("mode: enforce", "mode: strict").encode()}, "mode 'strict'"),
        ({"body": b"version: STSv1\r\nmode: enforce\r\nmax_age: 60\r\n"}, "no mx field"),
        ({"body": b"\xff\xfe" + ENFORCE.encode()}, "not UTF-8"),
    ],
    ids=[
        "404",
        "204",
        "html",
        "octet-stream",
        "oversized",
        "oversized-chunked",
        "version",
        "mode",
        "no-mx",
        "not-utf8",
    ],
)
async def test_a_bad_answer_gives_no_policy(
    mtasts: MTASTS,
    site: PolicySite,
    caplog: pytest.LogCaptureFixture,
    change: dict[str, Any],
    reason: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="ehlo.delivery")
    for name, value in change.items():
        setattr(site, name, value)
    assert await mtasts.policy(DOMAIN) is None
    assert mtasts.cached(DOMAIN) is None
    assert len(site.requests) == 1
    [line] = fetch_failures(caplog)
    assert DOMAIN in line and reason in line, line


async def test_a_stalled_policy_server_gives_no_policy_within_the_timeout(
    dns_server: DNSServer,
    site: PolicySite,
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ehlo.delivery")
    site.stall = asyncio.Event()
    sts = MTASTS(
        Resolver([dns_server.nameserver], cache=DNSCache()),
        port=site.port,
        ssl_context=client_context,
        timeout=0.5,
    )
    try:
        async with asyncio.timeout(30):
            assert await sts.policy(DOMAIN) is None
    finally:
        await sts.close()
    [line] = fetch_failures(caplog)
    assert "no answer within 0.5 s" in line, line


async def test_no_txt_record_means_no_policy_and_no_fetch(
    mtasts: MTASTS, site: PolicySite, dns_server: DNSServer
) -> None:
    dns_server.set_records(TXT_NAME, "TXT", [])
    assert await mtasts.policy(DOMAIN) is None
    dns_server.remove(TXT_NAME)
    assert await mtasts.policy(DOMAIN) is None
    assert site.requests == []


async def test_two_sts_txt_records_mean_no_policy(
    mtasts: MTASTS, site: PolicySite, dns_server: DNSServer
) -> None:
    dns_server.set_records(TXT_NAME, "TXT", [txt("one"), txt("two")])
    assert await mtasts.policy(DOMAIN) is None
    assert site.requests == []


async def test_other_txt_records_beside_the_sts_one_are_ignored(
    mtasts: MTASTS, dns_server: DNSServer
) -> None:
    dns_server.set_records(TXT_NAME, "TXT", ['"v=spf1 -all"', txt("one")])
    policy = await mtasts.policy(DOMAIN)
    assert policy is not None and policy.id == "one"


async def test_an_address_literal_or_bad_name_has_no_policy(
    mtasts: MTASTS, dns_server: DNSServer
) -> None:
    for domain in ("[127.0.0.1]", "", "bad..name", "-x.test"):
        assert await mtasts.policy(domain) is None
    assert dns_server.queries == []


# ------------------------------------- failures keep an unexpired cached policy


async def test_a_txt_lookup_servfail_keeps_the_cached_policy(
    mtasts: MTASTS, site: PolicySite, dns_server: DNSServer
) -> None:
    cached = await mtasts.policy(DOMAIN)
    assert cached is not None
    dns_server.set_behaviour(TXT_NAME, "servfail")
    assert await mtasts.policy(DOMAIN) is cached
    assert len(site.requests) == 1
    # Without a cached policy, a failed lookup means none.
    dns_server.set_behaviour("_mta-sts.other.test", "servfail")
    assert await mtasts.policy("other.test") is None


async def test_a_txt_record_gone_keeps_the_cached_policy_until_it_expires(
    mtasts: MTASTS, site: PolicySite, dns_server: DNSServer, clock: Clock
) -> None:
    cached = await mtasts.policy(DOMAIN)
    assert cached is not None
    dns_server.remove(TXT_NAME)
    assert await mtasts.policy(DOMAIN) is cached
    clock.now += cached.max_age
    assert await mtasts.policy(DOMAIN) is None
    assert len(site.requests) == 1


async def test_a_failed_fetch_of_a_new_id_keeps_the_cached_policy(
    mtasts: MTASTS,
    site: PolicySite,
    dns_server: DNSServer,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ehlo.delivery")
    cached = await mtasts.policy(DOMAIN)
    assert cached is not None
    dns_server.set_records(TXT_NAME, "TXT", [txt("two")])
    site.status = 500
    assert await mtasts.policy(DOMAIN) is cached
    assert len(site.requests) == 2
    [line] = fetch_failures(caplog)
    assert "id two" in line and "cached policy (id one) still applies" in line, line
    site.status = 200
    assert await mtasts.policy(DOMAIN) is cached  # not tried again at once
    clock.now += mtasts.retry_after
    fresh = await mtasts.policy(DOMAIN)
    assert fresh is not None and fresh.id == "two"
    assert len(site.requests) == 3


async def test_a_failed_fetch_is_not_tried_again_before_retry_after(
    mtasts: MTASTS,
    site: PolicySite,
    dns_server: DNSServer,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ehlo.delivery")
    site.status = 503
    assert await mtasts.policy(DOMAIN) is None
    site.status = 200
    clock.now += mtasts.retry_after - 1
    assert await mtasts.policy(DOMAIN) is None
    assert (len(site.requests), mtasts.fetches, len(fetch_failures(caplog))) == (1, 1, 1)
    # A new id is fetched at once; the failed one again once retry_after has passed.
    dns_server.set_records(TXT_NAME, "TXT", [txt("two")])
    policy = await mtasts.policy(DOMAIN)
    assert policy is not None and policy.id == "two"
    dns_server.set_records(TXT_NAME, "TXT", [txt("one")])
    clock.now += 1
    policy = await mtasts.policy(DOMAIN)
    assert policy is not None and policy.id == "one"
    assert (len(site.requests), mtasts.fetches) == (3, 3)


async def test_max_age_zero_is_never_cached(mtasts: MTASTS, site: PolicySite) -> None:
    site.body = ENFORCE.replace("max_age: 86400", "max_age: 0").encode()
    assert (await mtasts.policy(DOMAIN)) is not None
    assert mtasts.cached(DOMAIN) is None
    assert (await mtasts.policy(DOMAIN)) is not None
    assert len(site.requests) == 2


# ------------------------------------------------------------ the parsers


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (["v=STSv1; id=20260101T000000Z;"], "20260101T000000Z"),
        (["v=STSv1; id=2026-01-01"], None),
        (["v=STSv1; id=abc123"], "abc123"),
        (["v=STSv1;id=abc123;"], "abc123"),
        (["v=STSv1 ;\tid=abc123 ; ext_1=x.y"], "abc123"),
        (["v=STSv1; ext=1; id=abc"], "abc"),
        (["v=STSv1; id=" + "a" * 32], "a" * 32),
        (["v=STSv1; id=" + "a" * 33], None),
        (["v=STSv1; id=ab-c"], None),
        (["v=STSv1; id="], None),
        (["v=STSv1"], None),
        (["v=STSv1;"], None),
        (["v=STSv1; ext=1"], None),  # no id
        (["v=STSv1; ID=abc"], None),  # field names are case-sensitive
        (["v=STSv1;; id=abc"], None),
        (["v=STSv1; id=abc; bad"], None),
        (["v=STSv1; id=abc; x=a=b"], None),
        (["id=abc; v=STSv1"], None),  # the version field comes first
        (["v=STSv10; id=abc"], None),
        (["v=spf1 -all", "v=STSv1; id=abc"], "abc"),
        (["v=STSv1; id=abc", "v=STSv1; id=def"], None),
        (["v=STSv1; id=abc", "v=STSv1; bad"], None),
        ([], None),
    ],
)
def test_parse_txt(records: list[str], expected: str | None) -> None:
    assert parse_txt(records) == expected


def test_parse_policy_reads_lf_and_crlf_lines_and_ignores_unknown_fields() -> None:
    text = (
        "version: STSv1\n"
        "mode:testing\r\n"
        "mx: Mail.Example.Test.\n"
        "mx:\t*.mx.example.test  \n"
        "mx: mail.example.test\n"
        "future_field: some value with spaces\n"
        "mode: none\n"  # a repeated field: the first counts
        "max_age: 9999999999\n"  # capped
    )
    policy = parse_policy(text, domain=DOMAIN, id="x", now=5.0)
    assert policy == Policy(
        DOMAIN, "x", "testing", ("mail.example.test", "*.mx.example.test"), MAX_AGE_LIMIT, 5.0
    )


def test_parse_policy_without_a_final_line_end_and_mode_none_without_mx() -> None:
    policy = parse_policy(
        "version: STSv1\nmode: none\nmax_age: 300", domain=DOMAIN, id="x", now=0.0
    )
    assert (policy.mode, policy.mx, policy.max_age) == ("none", (), 300)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no version field"),
        ("mode: enforce\nmx: a.test\nmax_age: 1\n", "no version field"),
        ("version: STSv1\nmx: a.test\nmax_age: 1\n", "no mode field"),
        ("version: STSv1\nmode: Enforce\nmx: a.test\nmax_age: 1\n", "mode 'Enforce'"),
        ("version: STSv1\nmode: enforce\nmx: a.test\n", "no max_age field"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n", "max_age '-1'"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 12345678901\n", "max_age"),
        ("version: STSv1\nmode: testing\nmax_age: 1\n", "no mx field"),
        ("version: STSv1\nmode: enforce\nmx: *\nmax_age: 1\n", "mx '*'"),
        ("version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 1\n", "mx 'a.*.test'"),
        ("version: STSv1\nmode: enforce\nmx: bü.test\nmax_age: 1\n", "mx 'bü.test'"),
        ("version: STSv1\nmode enforce\n", "line 2 is not"),
        ("version: STSv1\n mode: enforce\n", "line 2 is not"),
        ("version: STSv1\nmode: enforce\rmx: a.test\n", "line 2 is not"),
        ("version: STSv1\nx:\nmode: enforce\n", "line 2 is not"),
    ],
)
def test_parse_policy_refuses_invalid_policies(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)) as err:
        parse_policy(text, domain=DOMAIN, id="x", now=0.0)
    assert "\n" not in str(err.value)


def test_matches_is_exact_or_one_wildcard_label() -> None:
    policy = Policy(DOMAIN, "x", "enforce", ("mx1.example.test", "*.example.net"), 60, 0.0)
    assert policy.matches("MX1.example.test.")
    assert policy.matches("a.example.net")
    assert not policy.matches("example.net")
    assert not policy.matches(".example.net")
    assert not policy.matches("a.b.example.net")
    assert not policy.matches("mx1.example.test.other")
    assert not policy.matches("[192.0.2.1]")
    assert not policy.expired(59.9) and policy.expired(60.0)
