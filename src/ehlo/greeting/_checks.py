"""The greeting checks: each looks at the HELO/EHLO name, the client IP and DNS.

Every check returns a :class:`CheckResult` with one of the results
``pass | fail | none | temperror | permerror``, a one-line reason a person can
read, and the evidence it used (the DNS answers). DNS trouble is a
``temperror``, never a crash and never a silent pass. The checks share the
lookups of one run (the name's addresses, the client's PTR names), so each
query is asked once per run; the resolver's cache shares answers between runs.

Nothing here knows about the SMTP server: ``run_checks`` can be called from
the explain command or a policy service as well.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .._cache import TTLCache
from ..dns import DNSTempError, Lookup, Resolver
from ..protocol import is_domain, parse_address_literal
from ._names import CHECKS, SPECS, CheckSpec, Result
from .dynamic import looks_dynamic
from .psl import registered_domain
from .spf import SpfOutcome, spf_helo

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 1035 section 2.3.4: labels of at most 63 octets, names of at most 255.
MAX_LABEL = 63
MAX_NAME = 255
# PTR names tried for forward confirmation, at most (RFC 7208 section 5.5 uses 10 too).
MAX_PTR_NAMES = 10


@dataclasses.dataclass(frozen=True, slots=True)
class CheckResult:
    """One check's outcome."""

    name: str
    result: Result
    reason: str
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``{"result": ..., "reason": ..., "evidence": ...}``."""
        return {"result": self.result, "reason": self.reason, "evidence": self.evidence}


@dataclasses.dataclass(frozen=True, slots=True)
class Greeting:
    """What the checks look at."""

    verb: str  # "HELO" or "EHLO"
    name: str
    client_ip: str
    our_names: tuple[str, ...] = ()
    our_addresses: tuple[str, ...] = ()
    previous_names: tuple[str, ...] = ()  # the session's first and latest earlier greeting


class GreetingNames:
    """The names a session greeted with, as far as the ``consistent`` check needs them.

    That is the first name and the latest one, never more: a client may
    greet any number of times (RFC 5321 section 4.1.4), and a record that
    grew with each greeting would let it grow the server (and each
    greeting's copy of the record) without bound. ``previous`` is what the
    next greeting's ``previous_names`` holds.
    """

    __slots__ = ("first", "latest")

    def __init__(self) -> None:
        self.first: str | None = None
        self.latest: str | None = None

    @property
    def previous(self) -> tuple[str, ...]:
        """The first and the latest name (once when they are the same); () before any."""
        first, latest = self.first, self.latest
        if first is None or latest is None:
            return ()
        return (first,) if latest == first else (first, latest)

    def add(self, name: str) -> None:
        """Record a greeting with ``name``."""
        if self.first is None:
            self.first = name
        self.latest = name


@dataclasses.dataclass(frozen=True, slots=True)
class GreetingReport:
    """All check results of one greeting.

    A report is not changed once made, so its derived forms (the JSON form,
    the Authentication-Results header per authserv-id) are computed once and
    kept on it: a report served from the verifier's cache costs nothing more
    per message. The structures returned share their inner objects with the
    report; treat them as read-only.
    """

    greeting: Greeting
    results: dict[str, CheckResult]
    queries: int = 0  # DNS lookups asked (cache hits included)
    _json: dict[str, Any] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )
    _headers: dict[str, bytes] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )
    _json_text: str | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )

    def __getitem__(self, check: str) -> CheckResult:
        return self.results[check]

    def to_json(self) -> dict[str, Any]:
        """``{check: {"result", "reason", "evidence"}}`` in check order."""
        cached = self._json
        if cached is None:
            cached = {name: self.results[name].to_json() for name in CHECKS if name in self.results}
            object.__setattr__(self, "_json", cached)
        return dict(cached)

    def json_text(self) -> str:
        """``to_json()`` serialised (compact, UTF-8 kept), computed once."""
        text = self._json_text
        if text is None:
            text = json.dumps(
                self.to_json(), ensure_ascii=False, separators=(",", ":"), default=str
            )
            object.__setattr__(self, "_json_text", text)
        return text

    def header(self, authserv_id: str, render: Callable[[GreetingReport, str], bytes]) -> bytes:
        """``render(self, authserv_id)``, computed once per authserv-id."""
        headers = self._headers
        if headers is None:
            headers = {}
            object.__setattr__(self, "_headers", headers)
        found = headers.get(authserv_id)
        if found is None:
            found = headers[authserv_id] = render(self, authserv_id)
        return found

    @property
    def has_temperror(self) -> bool:
        """True when some check could not be completed for now."""
        return any(r.result == "temperror" for r in self.results.values())

    @property
    def verified_ptr(self) -> str | None:
        """The forward-confirmed PTR name of the client, when iprev passed."""
        iprev = self.results.get("iprev")
        if iprev is None or iprev.result != "pass":
            return None
        names = iprev.evidence.get("confirmed") or []
        return str(names[0]) if names else None


class QueryLimitError(DNSTempError):
    """The per-session DNS query cap was reached."""


class CappedResolver:
    """A resolver view that allows at most ``limit`` lookups (cache hits count too).

    ``asked`` lists the lookups let through, in order: ``(name, rdtype)``, or
    ``(ip, None)`` for the PTR names of an address.
    """

    def __init__(self, resolver: Resolver, limit: int) -> None:
        self.resolver = resolver
        self.limit = limit
        self.used = 0
        self.asked: list[tuple[str, str | None]] = []

    def _spend(self, name: str, rdtype: str | None) -> None:
        if self.used >= self.limit:
            what = f"PTR {name}" if rdtype is None else f"{name} {rdtype}"
            raise QueryLimitError(f"DNS query limit of {self.limit} per session reached ({what})")
        self.used += 1
        self.asked.append((name, rdtype))

    async def lookup(self, name: str, rdtype: str) -> Lookup:
        """As ``Resolver.lookup``, counted against the cap."""
        self._spend(name, rdtype)
        return await self.resolver.lookup(name, rdtype)

    async def ptr(self, ip: str) -> list[str]:
        """As ``Resolver.ptr``, counted against the cap."""
        self._spend(ip, None)
        return await self.resolver.ptr(ip)

    def peek(self, name: str, rdtype: str) -> Lookup | None:
        """A cached answer (counted against the cap when there is one)."""
        found = self.resolver.peek(name, rdtype)
        if found is not None:
            self._spend(name, rdtype)
        return found

    def peek_ptr(self, ip: str) -> list[str] | None:
        """Cached PTR names (counted against the cap when there are some)."""
        found = self.resolver.peek_ptr(ip)
        if found is not None:
            self._spend(ip, None)
        return found

    def fresh_for(self, asked: Sequence[tuple[str, str | None]]) -> float:
        """Seconds every answer of ``asked`` stays in the resolver's cache (0: one is gone)."""
        left = float("inf")
        for name, rdtype in asked:
            if rdtype is None:
                remaining = self.resolver.remaining_ptr(name)
            else:
                remaining = self.resolver.remaining(name, rdtype)
            if remaining is None:
                return 0.0
            left = min(left, remaining)
        return left


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> IPAddress:
    # Parsed once per text: the same addresses come back run after run.
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _literal(name: str) -> IPAddress | str | None:
    """The address of an address-literal greeting, the general literal's text, or None."""
    if not name.startswith("["):
        return None
    try:
        return parse_address_literal(name)
    except ValueError:
        return None


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


def syntax_problem(name: str) -> str | None:
    """Why ``name`` is not an RFC 5321 Domain or address literal, or None."""
    if name.startswith("["):
        return None if _literal(name) is not None else "not a valid address literal"
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        # RFC 5321 section 4.1.3: an address must be written as a literal.
        return "a bare IP address; RFC 5321 requires an address literal like [192.0.2.1]"
    if len(name.encode("utf-8")) > MAX_NAME:
        return f"longer than {MAX_NAME} octets"
    labels = name.rstrip(".").split(".")
    for label in labels:
        if len(label.encode("utf-8")) > MAX_LABEL:
            return f"label {label[:20]!r}... longer than {MAX_LABEL} octets"
    if not is_domain(name, utf8=not name.isascii()):
        return "not a valid domain name (letters, digits and inner hyphens only)"
    return None


class _Run:
    """Shared state of one run of the checks: memoised lookups, the greeting."""

    def __init__(self, greeting: Greeting, resolver: CappedResolver) -> None:
        self.g = greeting
        self.resolver = resolver
        self.client = _ip(greeting.client_ip)
        self.literal = _literal(greeting.name)
        self.syntax_error = syntax_problem(greeting.name)
        self.is_domain = self.literal is None and self.syntax_error is None
        self.name = _norm(greeting.name)
        self._memo: dict[tuple[str, str], asyncio.Future[Lookup]] = {}
        self._ptr: asyncio.Future[list[str]] | None = None
        # When a kept SPF outcome used by this run is dropped (time.monotonic()).
        self.spf_expires: float | None = None

    def lookup(self, name: str, rdtype: str) -> Awaitable[Lookup]:
        key = (_norm(name), rdtype)
        fut = self._memo.get(key)
        if fut is None:
            cached = self.resolver.peek(name, rdtype)
            if cached is not None:
                # A warm cache needs no task: a finished future is enough.
                fut = asyncio.get_running_loop().create_future()
                fut.set_result(cached)
            else:
                fut = asyncio.ensure_future(self.resolver.lookup(name, rdtype))
            self._memo[key] = fut
        return fut if fut.done() else asyncio.shield(fut)

    def ptr(self) -> Awaitable[list[str]]:
        if self._ptr is None:
            cached = self.resolver.peek_ptr(str(self.client))
            if cached is not None:
                self._ptr = asyncio.get_running_loop().create_future()
                self._ptr.set_result(cached)
            else:
                self._ptr = asyncio.ensure_future(self.resolver.ptr(str(self.client)))
        return self._ptr if self._ptr.done() else asyncio.shield(self._ptr)

    def close(self) -> None:
        """The run is over (finished, timed out or cancelled): end and collect its lookups.

        A lookup nobody waits for any more (its check timed out, or the
        session moved on) is cancelled; the resolver's own query goes on and
        fills the cache. Every outcome is retrieved, so a lookup that fails
        after the run never surfaces as "Task exception was never retrieved".
        """
        futures: list[asyncio.Future[Any]] = [*self._memo.values()]
        if self._ptr is not None:
            futures.append(self._ptr)
        for fut in futures:
            if fut.done():
                _retrieve(fut)
            else:
                fut.cancel()
                fut.add_done_callback(_retrieve)

    async def addresses(self, name: str) -> tuple[list[IPAddress], list[Lookup]]:
        """A and AAAA of ``name`` (CNAMEs followed) and the lookups as evidence."""
        found = await asyncio.gather(self.lookup(name, "A"), self.lookup(name, "AAAA"))
        return [_ip(v) for lk in found for v in lk.values], list(found)

    async def confirmed_ptr(self) -> tuple[list[str], list[str], list[dict[str, Any]]]:
        """(PTR names, forward-confirmed names, evidence) for the client IP."""
        names = (await self.ptr())[:MAX_PTR_NAMES]
        results = await asyncio.gather(
            *(self.addresses(name) for name in names), return_exceptions=True
        )
        confirmed: list[str] = []
        evidence: list[dict[str, Any]] = []
        temp: BaseException | None = None
        for name, result in zip(names, results, strict=True):
            if isinstance(result, DNSTempError):
                temp = result
                evidence.append({"name": name, "error": str(result)})
                continue
            if isinstance(result, ValueError):
                evidence.append({"name": name, "error": "not a valid DNS name"})
                continue
            if isinstance(result, BaseException):
                raise result
            addresses, _lookups = result
            ok = self.client in addresses
            evidence.append(
                {"name": name, "addresses": [str(a) for a in addresses], "confirmed": ok}
            )
            if ok:
                confirmed.append(name)
        if not confirmed and temp is not None:
            raise temp
        return names, confirmed, evidence


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a finished lookup's outcome as seen (its error is in the report, if anywhere)."""
    if not fut.cancelled():
        fut.exception()


def _result(check: str, result: Result, reason: str, **evidence: Any) -> CheckResult:
    return CheckResult(check, result, reason, evidence)


async def check_syntax(run: _Run) -> CheckResult:
    """RFC 5321 Domain or address literal, label and length limits."""
    name = run.g.name
    if run.syntax_error is not None:
        return _result("syntax", "fail", f"is {run.syntax_error}")
    kind = "address literal" if run.literal is not None else "domain name"
    return _result("syntax", "pass", f"is a valid {kind}", name=name)


async def check_fqdn(run: _Run) -> CheckResult:
    """A fully qualified name: a dot, not a single label, not localhost from afar."""
    if run.literal is not None:
        return _result("fqdn", "none", "is an address literal, not a host name")
    if not run.is_domain:
        return _result("fqdn", "permerror", "is not a valid domain name")
    name = run.name
    if name in ("localhost", "localhost.localdomain") or name.endswith(".localhost"):
        # RFC 6761 section 6.3: localhost names only ever mean the loopback host.
        if run.client.is_loopback:
            return _result("fqdn", "pass", "is localhost, from a loopback client")
        return _result("fqdn", "fail", f"is localhost, but the client {run.client} is remote")
    if "." not in name:
        return _result("fqdn", "fail", "is a single label, not a fully qualified domain name")
    return _result("fqdn", "pass", "is fully qualified")


async def check_literal_match(run: _Run) -> CheckResult:
    """An address literal must be the client's own address."""
    literal = run.literal
    if literal is None:
        return _result("literal_match", "none", "is not an address literal")
    if isinstance(literal, str):
        return _result("literal_match", "permerror", "is a general address literal, not an IP")
    if _ip(str(literal)) == run.client:
        return _result("literal_match", "pass", "is the client's own address",
                       literal=str(literal), client_ip=str(run.client))
    return _result("literal_match", "fail", f"is not the client's address {run.client}",
                   literal=str(literal), client_ip=str(run.client))


async def check_resolves(run: _Run) -> CheckResult:
    """The name has A, AAAA or MX records."""
    if run.literal is not None:
        return _result("resolves", "none", "is an address literal (no DNS needed)")
    if not run.is_domain:
        return _result("resolves", "permerror", "is not a valid domain name")
    try:
        found = await asyncio.gather(
            run.lookup(run.name, "A"), run.lookup(run.name, "AAAA"), run.lookup(run.name, "MX")
        )
    except ValueError:
        return _result("resolves", "permerror", "is not a valid DNS name")
    except DNSTempError as exc:
        return _result("resolves", "temperror", f"could not be looked up: {exc}")
    evidence = [lk.to_json() for lk in found]
    kinds = [lk.rdtype for lk in found if lk.values]
    if kinds:
        return _result("resolves", "pass", f"has {'/'.join(kinds)} records", lookups=evidence)
    if all(lk.nxdomain for lk in found):
        return _result("resolves", "fail", "does not exist in DNS (NXDOMAIN)", lookups=evidence)
    return _result("resolves", "fail", "has no A, AAAA or MX records", lookups=evidence)


async def check_forward_match(run: _Run) -> CheckResult:
    """One of the name's A/AAAA addresses (CNAMEs followed) is the client IP."""
    if run.literal is not None:
        return _result("forward_match", "none", "is an address literal (see literal_match)")
    if not run.is_domain:
        return _result("forward_match", "permerror", "is not a valid domain name")
    try:
        addresses, lookups = await run.addresses(run.name)
    except ValueError:
        return _result("forward_match", "permerror", "is not a valid DNS name")
    except DNSTempError as exc:
        return _result("forward_match", "temperror", f"could not be looked up: {exc}")
    evidence = {"lookups": [lk.to_json() for lk in lookups], "client_ip": str(run.client)}
    chain = next((lk.cnames for lk in lookups if lk.cnames), ())
    via = f" via CNAME {' -> '.join(chain)}" if chain else ""
    if run.client in addresses:
        return _result("forward_match", "pass",
                       f"resolves to the client address {run.client}{via}", **evidence)
    if not addresses:
        what = "does not exist" if all(lk.nxdomain for lk in lookups) else "has no A/AAAA record"
        return _result("forward_match", "fail",
                       f"does not resolve to {run.client} (it {what})", **evidence)
    shown = ", ".join(str(a) for a in addresses[:4]) + (" ..." if len(addresses) > 4 else "")
    return _result("forward_match", "fail",
                   f"does not resolve to {run.client} (it resolves to {shown}{via})", **evidence)


async def check_iprev(run: _Run) -> CheckResult:
    """RFC 8601 section 3 iprev: a PTR name of the client IP resolves back to it."""
    try:
        names, confirmed, evidence = await run.confirmed_ptr()
    except DNSTempError as exc:
        return _result("iprev", "temperror",
                       f"came from {run.client}, whose PTR could not be looked up: {exc}",
                       client_ip=str(run.client))
    if confirmed:
        return _result("iprev", "pass",
                       f"came from {run.client}, whose PTR name {confirmed[0]} resolves back",
                       client_ip=str(run.client), ptr=names, confirmed=confirmed,
                       checks=evidence)
    if not names:
        # RFC 8601 section 2.7.3: no PTR data published is a permerror.
        return _result("iprev", "permerror", f"came from {run.client}, which has no PTR record",
                       client_ip=str(run.client), ptr=[])
    return _result("iprev", "fail",
                   f"came from {run.client}, whose PTR name {names[0]} does not resolve back",
                   client_ip=str(run.client), ptr=names, confirmed=[], checks=evidence)


async def check_ptr_match(run: _Run) -> CheckResult:
    """A confirmed PTR name equals the greeting name or shares its registered domain."""
    if run.literal is not None or not run.is_domain:
        return _result("ptr_match", "none", "is not a domain name")
    try:
        _, confirmed, _ = await run.confirmed_ptr()
    except DNSTempError as exc:
        return _result("ptr_match", "temperror", f"could not be compared: {exc}")
    if not confirmed:
        return _result("ptr_match", "none",
                       f"cannot be compared: {run.client} has no confirmed PTR name")
    for ptr in confirmed:
        if _norm(ptr) == run.name:
            return _result("ptr_match", "pass", "is the client's PTR name",
                           ptr=confirmed, match="exact")
    ours = registered_domain(run.name)
    for ptr in confirmed:
        theirs = registered_domain(ptr)
        if ours is not None and ours == theirs:
            return _result("ptr_match", "pass",
                           f"shares the registered domain {ours} with PTR name {ptr}",
                           ptr=confirmed, match="registered-domain", domain=ours)
    return _result("ptr_match", "fail",
                   f"does not match the client's PTR name {confirmed[0]}",
                   ptr=confirmed, registered_domain=ours)


async def check_not_us(run: _Run) -> CheckResult:
    """The name or literal is not one of ours, unless the client really is us."""
    ours_ips = {_ip(a) for a in run.g.our_addresses if _valid_ip(a)}
    client_is_us = run.client in ours_ips
    literal = run.literal
    if literal is not None and not isinstance(literal, str):
        claimed = _ip(str(literal))
        if claimed in ours_ips and not client_is_us:
            return _result("not_us", "fail", "is our own address (the client is not us)",
                           our_addresses=sorted(str(a) for a in ours_ips))
        return _result("not_us", "pass", "is not one of our addresses")
    if run.name in {_norm(n) for n in run.g.our_names} and not client_is_us:
        return _result("not_us", "fail", "is our own host name (the client is not us)",
                       our_names=list(run.g.our_names))
    return _result("not_us", "pass", "is not one of our names")


@functools.lru_cache(maxsize=256)
def _valid_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# SPF outcomes by (nameservers, client IP, HELO name), kept for a minute: far
# below the TTL of typical SPF records, so a change is seen soon enough.
SPF_RESULT_TTL = 60.0
_SPF_RESULTS_MAX = 10_000
_SPF_RESULTS: TTLCache[tuple[str, str, str], SpfOutcome] = TTLCache(
    _SPF_RESULTS_MAX, ttl=SPF_RESULT_TTL
)


async def check_spf_helo(run: _Run) -> CheckResult:
    """RFC 7208 section 2.3: SPF for the HELO identity."""
    if not run.is_domain:
        return _result("spf_helo", "none", "is not a domain name (SPF does not apply)")
    key = (",".join(run.resolver.resolver.nameservers), str(run.client), run.name)
    now = time.monotonic()
    cached = _SPF_RESULTS.get(key)
    left = _SPF_RESULTS.remaining(key) if cached is not None else None
    if cached is not None and left is not None:
        run.spf_expires, outcome = now + left, cached
    else:
        outcome = await spf_helo(run.resolver, str(run.client), run.name)  # type: ignore[arg-type]
        if outcome.result != "temperror":
            # A finished evaluation is kept briefly: SPF needs a worker thread
            # and several lookups, and a busy client greets many times a minute.
            run.spf_expires = now + SPF_RESULT_TTL
            _SPF_RESULTS.put(key, outcome, run.spf_expires - time.monotonic())
    evidence: dict[str, Any] = {"spf": outcome.result, "record": outcome.record,
                                "lookups": list(outcome.lookups)}
    # RFC 7208 section 8.5/8.4: softfail and neutral are not grounds to refuse.
    mapped: Result = {
        "pass": "pass", "fail": "fail", "softfail": "none", "neutral": "none", "none": "none",
        "temperror": "temperror", "permerror": "permerror",
    }.get(outcome.result, "temperror")  # type: ignore[assignment]
    reason = f"has SPF result {outcome.result} for {run.client}"
    if outcome.explanation:
        reason += f" ({outcome.explanation})"
    return _result("spf_helo", mapped, reason, **evidence)


async def check_dynamic(run: _Run) -> CheckResult:
    """The name or the client's PTR looks like a dynamic address pool (recorded only)."""
    candidates = [run.name] if run.is_domain else []
    ptr_error: DNSTempError | None = None
    try:
        candidates += list(await run.ptr())
    except DNSTempError as exc:
        ptr_error = exc  # the name alone may still tell; a pass may not be claimed
    for name in candidates:
        fragment = looks_dynamic(name, str(run.client))
        if fragment is not None:
            return _result("dynamic", "fail",
                           f"looks dynamic: {name} embeds the client address ({fragment})",
                           name=name, fragment=fragment)
    if ptr_error is not None:
        return _result("dynamic", "temperror",
                       f"could not be compared with the client's PTR names: {ptr_error}",
                       names=candidates)
    return _result("dynamic", "pass", "does not embed the client address", names=candidates)


async def check_consistent(run: _Run) -> CheckResult:
    """A repeated HELO/EHLO in one session names the same host."""
    previous = run.g.previous_names
    if not previous:
        return _result("consistent", "none", "is the first greeting of the session")
    changed = [p for p in previous if _norm(p) != run.name]
    if changed:
        return _result("consistent", "fail", f"differs from the earlier greeting {changed[-1]}",
                       previous=list(previous))
    return _result("consistent", "pass", "repeats the earlier greeting", previous=list(previous))


CheckFunction = Callable[[_Run], Awaitable[CheckResult]]


def _function(spec: CheckSpec) -> CheckFunction:
    """The function that runs ``spec``'s check; LookupError naming the row if there is none."""
    found = globals().get(spec.function)
    if not inspect.iscoroutinefunction(found):
        raise LookupError(f"greeting check {spec.name}: no check function {spec.function!r}")
    function: CheckFunction = found
    return function


# Built from the table when the module loads: a row without a function stops it here.
CHECK_FUNCTIONS: dict[str, CheckFunction] = {spec.name: _function(spec) for spec in SPECS}
_LOCAL_CHECKS = frozenset(spec.name for spec in SPECS if not spec.dns)


async def run_checks(
    greeting: Greeting,
    resolver: Resolver | CappedResolver,
    *,
    checks: Sequence[str] = CHECKS,
    max_queries: int = 50,
    timeout: float = 10.0,
) -> GreetingReport:
    """Run ``checks`` (all by default) concurrently and collect their results.

    ``max_queries`` caps the DNS lookups of this run; pass a ``CappedResolver``
    instead of a resolver to share one budget between runs (a session's).

    A check that exceeds ``timeout`` or hits the query cap is a ``temperror``;
    one that raises unexpectedly is a ``temperror`` too, with the error as its
    reason: a failing check never becomes a pass.
    """
    report, _ = await _run_checks(greeting, resolver, checks, max_queries, timeout, False)
    return report


async def run_checks_fresh_for(
    greeting: Greeting,
    resolver: Resolver | CappedResolver,
    *,
    checks: Sequence[str] = CHECKS,
    max_queries: int = 50,
    timeout: float = 10.0,
) -> tuple[GreetingReport, float]:
    """As ``run_checks``, with how long the report stays true, in seconds.

    That is as long as every DNS answer it used stays in the resolver's cache
    (their TTLs) and the SPF outcome it used is kept; 0 when one of them is
    not cached, and for a report with a ``temperror``.
    """
    return await _run_checks(greeting, resolver, checks, max_queries, timeout, True)


async def _run_checks(
    greeting: Greeting,
    resolver: Resolver | CappedResolver,
    checks: Sequence[str],
    max_queries: int,
    timeout: float,
    lifetime: bool,
) -> tuple[GreetingReport, float]:
    # A CappedResolver passed in carries a budget across runs (one per session).
    capped = resolver if isinstance(resolver, CappedResolver) else CappedResolver(
        resolver, max_queries
    )
    spent = capped.used
    first_asked = len(capped.asked)
    run = _Run(greeting, capped)
    names = [c for c in CHECKS if c in checks]

    async def one(name: str) -> CheckResult:
        try:
            if name in _LOCAL_CHECKS:
                # Never suspends, so a timeout could not interrupt it.
                return await CHECK_FUNCTIONS[name](run)
            async with asyncio.timeout(timeout):
                return await CHECK_FUNCTIONS[name](run)
        except TimeoutError:
            return _result(name, "temperror", f"could not be checked within {timeout:g}s")
        except DNSTempError as exc:
            return _result(name, "temperror", f"could not be looked up: {exc}")
        except Exception as exc:  # a bug must not turn into a pass
            return _result(name, "temperror",
                           f"could not be checked: {type(exc).__name__}: {exc}")

    try:
        # Checks that need no DNS run inline; the others run concurrently.
        inline = [await one(name) for name in names if name in _LOCAL_CHECKS]
        remote = await asyncio.gather(
            *(one(name) for name in names if name not in _LOCAL_CHECKS)
        )
    finally:
        run.close()  # also when cancelled: no lookup outlives its run uncollected
    by_name = {r.name: r for r in (*inline, *remote)}
    results = [by_name[name] for name in names]
    report = GreetingReport(greeting, {r.name: r for r in results}, capped.used - spent)
    if not lifetime or report.has_temperror:
        return report, 0.0
    fresh_for = capped.fresh_for(capped.asked[first_asked:])
    if run.spf_expires is not None:
        fresh_for = min(fresh_for, run.spf_expires - time.monotonic())
    return report, max(fresh_for, 0.0)
