"""Routing at RCPT (ehlo.delivery.routes): the rules, pure, and their configuration keys."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ehlo.config import ConfigError, load_config
from ehlo.delivery.routes import NextHop, Routing, normalise_route, parse_next_hop

RELAY = Routing(
    domains=frozenset({"a.test"}),
    relay_networks=(ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")),
)


def test_catch_all_keeps_everything_and_relays_nothing() -> None:
    routing = Routing(relay_networks=(ipaddress.ip_network("0.0.0.0/0"),))
    assert routing.catch_all
    for address in ("bob@b.test", "postmaster", "x@a.test"):
        decision = routing.decide(address, authenticated=True, client_ip="192.0.2.1")
        assert decision.store and decision.next_hop is None and decision.refusal is None
    assert not routing.may_relay(authenticated=False, client_ip="192.0.2.1")


def test_local_domain_is_kept() -> None:
    decision = RELAY.decide("Bob@A.TEST", authenticated=False, client_ip="198.51.100.1")
    assert decision.store and decision.next_hop is None


def test_other_domains_are_refused_to_strangers() -> None:
    decision = RELAY.decide("bob@b.test", authenticated=False, client_ip="198.51.100.1")
    assert decision.refusal is not None
    assert (decision.refusal.code, decision.refusal.enhanced) == (550, "5.7.1")
    assert not decision.store and decision.next_hop is None


@pytest.mark.parametrize("ip", ["192.0.2.77", "2001:db8::5", "::ffff:192.0.2.9"])
def test_relay_networks_relay_to_the_mx(ip: str) -> None:
    decision = RELAY.decide("bob@B.test", authenticated=False, client_ip=ip)
    assert decision == decision.__class__(store=False, next_hop="mx:b.test")


def test_authenticated_sessions_relay() -> None:
    decision = RELAY.decide("bob@b.test", authenticated=True, client_ip="198.51.100.1")
    assert decision.next_hop == "mx:b.test" and not decision.store


def test_postmaster_is_always_accepted() -> None:
    # RFC 5321 section 4.5.1
    for address in ("postmaster", "Postmaster@elsewhere.test"):
        decision = RELAY.decide(address, authenticated=False, client_ip="198.51.100.1")
        assert decision.store and decision.refusal is None
    # A relay client's postmaster@other is relayed like any other address.
    relayed = RELAY.decide("postmaster@b.test", authenticated=True, client_ip="198.51.100.1")
    assert relayed.next_hop == "mx:b.test"


def test_smarthost_and_static_routes() -> None:
    routing = Routing(
        domains=frozenset({"a.test"}),
        relay_host="smtp:smart.test:587",
        routes={"c.test": "smtp:10.0.0.5:2525", "a.test": "lmtp:127.0.0.1:24"},
        keep_local=True,
    )
    assert routing.decide("x@b.test", authenticated=True, client_ip="").next_hop == (
        "smtp:smart.test:587"
    )
    assert routing.decide("x@c.test", authenticated=True, client_ip="").next_hop == (
        "smtp:10.0.0.5:2525"
    )
    local = routing.decide("x@a.test", authenticated=False, client_ip="198.51.100.1")
    assert local.next_hop == "lmtp:127.0.0.1:24" and local.store


def test_lmtp_for_local_domains() -> None:
    routing = Routing(domains=frozenset({"a.test"}), lmtp="lmtp:unix:/run/dovecot/lmtp")
    decision = routing.decide("x@a.test", authenticated=False, client_ip="198.51.100.1")
    assert decision.next_hop == "lmtp:unix:/run/dovecot/lmtp" and not decision.store


def test_submission_relays_everything_for_authenticated_users() -> None:
    routing = Routing(submission=True)
    assert not routing.catch_all
    assert routing.decide("x@b.test", authenticated=True, client_ip="").next_hop == "mx:b.test"


@pytest.mark.parametrize(
    ("text", "hop"),
    [
        ("mx:Example.ORG", NextHop("mx", "example.org", 2525)),
        ("smtp:mail.example.org:587", NextHop("smtp", "mail.example.org", 587)),
        ("smtp:[2001:db8::1]:25", NextHop("smtp", "2001:db8::1", 25)),
        ("lmtp:127.0.0.1:24", NextHop("lmtp", "127.0.0.1", 24)),
        ("lmtp:unix:/run/lmtp", NextHop("lmtp", path="/run/lmtp")),
    ],
)
def test_next_hops_parse_and_print_back(text: str, hop: NextHop) -> None:
    parsed = parse_next_hop(text, 2525)
    assert parsed == hop
    if hop.kind != "mx":
        assert str(parsed) == text


@pytest.mark.parametrize("text", ["", "mx:", "smtp:", "ftp:x:1", "smtp:unix:/x", "lmtp:unix:x",
                                  "smtp:host:99999", "smtp::25"])
def test_bad_next_hops(text: str) -> None:
    with pytest.raises(ValueError):
        parse_next_hop(text)


def test_routes_as_written_in_the_configuration() -> None:
    assert normalise_route("mx.example.org") == "smtp:mx.example.org:25"
    assert normalise_route("lmtp:unix:/x") == "lmtp:unix:/x"
    assert normalise_route("smtp:10.0.0.1:2525") == "smtp:10.0.0.1:2525"


def test_configuration_keys(tmp_path: Path) -> None:
    path = tmp_path / "ehlo.toml"
    path.write_text(
        'domains = ["a.test"]\nrelay_networks = ["192.0.2.0/24"]\nlmtp = "127.0.0.1:24"\n'
        'relay_host = "smart.test:587"\ndelivery_port = 2525\n'
        '[routes]\n"c.test" = "lmtp:unix:/run/lmtp"\n"D.test" = "10.0.0.1"\n'
        '[tls_policy]\n"b.test" = "verify"\n'
    )
    config = load_config(path)
    routing = config.routing()
    assert routing.lmtp == "lmtp:127.0.0.1:24"
    assert routing.relay_host == "smtp:smart.test:587"
    assert dict(routing.routes) == {"c.test": "lmtp:unix:/run/lmtp", "d.test": "smtp:10.0.0.1:25"}
    assert config.tls_policy == {"b.test": "verify"}
    settings = config.delivery_settings()
    assert settings.delivery_port == 2525 and settings.tls_policy == {"b.test": "verify"}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lmtp", "nohostport:x:y", "lmtp"),
        ("relay_host", "lmtp:x:24", "relay_host"),
        ("routes", {"c.test": 5}, "routes"),
        ("routes", {"not a domain": "x"}, "routes"),
        ("tls_policy", {"b.test": "sometimes"}, "tls_policy"),
        ("delivery_port", 0, "delivery_port"),
        ("relay_networks", ["300.0.0.0/8"], "relay_networks"),
    ],
)
def test_bad_configuration_is_one_line(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {key: value})
    assert message in str(info.value) and "\n" not in str(info.value)
