"""The table of greeting checks (``ehlo.greeting.SPECS``): complete, and the one source.

Every list of checks (the names, the functions run, the presets, the
record-only checks, the local ones) is derived from the table; these tests
hold each row to what it declares, so that a row without a function or with
an impossible mode is caught here rather than becoming a ``temperror`` in a
session.
"""

from __future__ import annotations

import inspect

import pytest

from ehlo.dns import DNSCache, Resolver
from ehlo.greeting import (
    CHECKS,
    MODES,
    RECORD_ONLY,
    SPECS,
    CheckSpec,
    Greeting,
    GreetingPolicy,
    _checks,
    preset_modes,
    run_checks,
)

# The checks and their strict-preset modes as released: the table must keep them.
RELEASED_STRICT = {
    "syntax": "reject",
    "fqdn": "reject",
    "literal_match": "reject",
    "resolves": "reject",
    "forward_match": "reject",
    "iprev": "reject",
    "ptr_match": "record",
    "not_us": "reject",
    "spf_helo": "reject",
    "dynamic": "record",
    "consistent": "record",
}


def test_every_spec_is_complete() -> None:
    names = [spec.name for spec in SPECS]
    assert len(set(names)) == len(names), "a check is listed twice"
    for spec in SPECS:
        assert spec.name and spec.name.isidentifier(), spec
        function = getattr(_checks, spec.function, None)
        assert inspect.iscoroutinefunction(function), f"{spec.name}: no {spec.function}"
        assert spec.strict in MODES, spec
        assert isinstance(spec.dns, bool) and isinstance(spec.record_only, bool), spec
        if spec.record_only:
            assert spec.strict in ("off", "record"), f"{spec.name} is record-only"


def test_every_name_has_its_function() -> None:
    assert tuple(_checks.CHECK_FUNCTIONS) == CHECKS
    for spec in SPECS:
        assert _checks.CHECK_FUNCTIONS[spec.name] is getattr(_checks, spec.function)


def test_names_presets_and_record_only_come_from_the_table() -> None:
    assert tuple(RELEASED_STRICT) == CHECKS  # names and their order, as released
    assert preset_modes("strict") == RELEASED_STRICT
    assert preset_modes("strict") == {spec.name: spec.strict for spec in SPECS}
    assert preset_modes("record") == dict.fromkeys(CHECKS, "record")
    assert preset_modes("off") == dict.fromkeys(CHECKS, "off")
    assert frozenset(spec.name for spec in SPECS if spec.record_only) == RECORD_ONLY
    assert {"dynamic"} == RECORD_ONLY
    with pytest.raises(ValueError, match="recorded only"):
        GreetingPolicy.preset("record", modes={"dynamic": "reject"})


@pytest.mark.parametrize("function", ["check_nothing", "syntax_problem", "SPECS"])
def test_a_row_without_a_check_function_is_refused(function: str) -> None:
    spec = CheckSpec("nothing", function, strict="record", dns=False)
    with pytest.raises(
        LookupError, match=f"greeting check nothing: no check function '{function}'"
    ):
        _checks._function(spec)


async def test_local_checks_ask_no_dns() -> None:
    # Nothing answers on port 9: a check that asked would come back temperror.
    resolver = Resolver(["127.0.0.1:9"], 0.5, cache=DNSCache())
    local = [spec.name for spec in SPECS if not spec.dns]
    assert local == ["syntax", "fqdn", "literal_match", "not_us", "consistent"]
    for name in ("mail.example.org", "[192.0.2.1]", "localhost", "bad..name"):
        greeting = Greeting("EHLO", name, "192.0.2.1", ("mx.example.net",), ("192.0.2.25",))
        report = await run_checks(greeting, resolver, checks=local, timeout=5)
        assert list(report.results) == local
        assert not report.has_temperror, report.to_json()
    assert resolver.queries == 0


async def test_dns_checks_do_ask() -> None:
    resolver = Resolver(["127.0.0.1:9"], 0.5, cache=DNSCache())
    dns_checks = [spec.name for spec in SPECS if spec.dns]
    greeting = Greeting("EHLO", "mail.example.org", "192.0.2.1")
    report = await run_checks(greeting, resolver, checks=dns_checks, timeout=5)
    assert list(report.results) == dns_checks
    assert all(result.result == "temperror" for result in report.results.values())
