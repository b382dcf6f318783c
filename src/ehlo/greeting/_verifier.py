"""The verifier: runs the checks for a greeting under a policy, with our identity.

One ``GreetingVerifier`` serves a whole server (or the explain command): it
holds the policy, the shared resolver and our own names and addresses.
``start`` begins the checks for one greeting in the background and returns
the task, so the greeting reply is not delayed by DNS.

Reports are kept for a while (``report_ttl``, 60 s by default, and never
longer than the DNS answers and the SPF outcome they were made from) and
served again for the same greeting: a client that connects many times a
minute greeting with the same name costs one run of the checks. A kept
report is the very report a new run would make: the key is the whole
greeting (verb, name, client address, our identity and the session's
first and latest earlier names, which the ``consistent`` check depends on),
and a report with a ``temperror`` is never kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from .._cache import TTLCache
from ..dns import Resolver
from ._checks import (
    CappedResolver,
    Greeting,
    GreetingReport,
    run_checks,
    run_checks_fresh_for,
)
from ._policy import Decision, GreetingPolicy

REPORT_TTL = 60.0
"""Seconds a report is served again at most (the SPF outcome's lifetime too)."""
REPORT_CACHE_SIZE = 1_000
"""Reports kept at most (about 12 KB each); the least recently used is dropped first."""

_Key = tuple[str, str, str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]


def _key(g: Greeting) -> _Key:
    """Every field of the greeting: the checks depend on each (a plain tuple hashes fastest)."""
    return (g.verb, g.name, g.client_ip, g.our_names, g.our_addresses, g.previous_names)


class GreetingVerifier:
    """Checks greetings for one server under one policy."""

    def __init__(
        self,
        policy: GreetingPolicy,
        resolver: Resolver,
        our_names: Iterable[str] = (),
        our_addresses: Iterable[str] = (),
        *,
        report_ttl: float = REPORT_TTL,
        report_cache_size: int = REPORT_CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.resolver = resolver
        self.our_names = tuple(dict.fromkeys(n.lower().rstrip(".") for n in our_names if n))
        self.our_addresses = tuple(dict.fromkeys(our_addresses))
        self.report_ttl = report_ttl
        self.report_cache_size = report_cache_size
        # _key(greeting) -> (policy, resolver, report, decision), each for its lifetime.
        self._reports: TTLCache[
            _Key, tuple[GreetingPolicy, Resolver, GreetingReport, Decision]
        ] = TTLCache(max(report_cache_size, 1), clock=clock)

    def applies_to(self, client_ip: str) -> bool:
        """False when no check runs for this client (policy off or trusted network)."""
        return bool(self.policy.enabled_checks) and not self.policy.trusted(client_ip)

    def greeting(
        self, verb: str, name: str, client_ip: str, previous: Iterable[str] = ()
    ) -> Greeting:
        """The input of the checks for one greeting."""
        return Greeting(
            verb=verb,
            name=name,
            client_ip=client_ip,
            our_names=self.our_names,
            our_addresses=self.our_addresses,
            previous_names=tuple(previous),
        )

    def budget(self) -> CappedResolver:
        """A DNS query budget for one session (``policy.max_queries`` lookups)."""
        return CappedResolver(self.resolver, self.policy.max_queries)

    def cached(
        self, greeting: Greeting, budget: CappedResolver | None = None
    ) -> GreetingReport | None:
        """The kept report for ``greeting`` while it is fresh, else None.

        A report served from here counts its lookups against ``budget`` as a
        new run would; when they no longer fit, None: a new run is due, and
        it reports the lookups past the limit as a ``temperror``.
        """
        key = _key(greeting)
        entry = self._reports.get(key)
        if entry is None:
            return None
        policy, resolver, report, _ = entry
        if policy is not self.policy or resolver is not self.resolver:
            self._reports.pop(key)
            return None
        if budget is not None:
            if budget.used + report.queries > budget.limit:
                return None
            budget.used += report.queries
        return report

    def _keep(
        self,
        report: GreetingReport,
        fresh_for: float,
        policy: GreetingPolicy,
        resolver: Resolver,
    ) -> None:
        """Keep ``report`` (made under ``policy`` with ``resolver``) for up to ``fresh_for``."""
        # RFC 1035 section 3.2.1: an answer may be used for its TTL only; so may a report.
        lifetime = min(self.report_ttl, fresh_for)
        if lifetime <= 0 or report.has_temperror:
            return
        if policy is not self.policy or resolver is not self.resolver:
            return  # replaced while the checks ran
        # Reports past their time are dropped from the least recently used end.
        self._reports.prune()
        entry = (policy, resolver, report, policy.decide(report))
        self._reports.put(_key(report.greeting), entry, lifetime)

    async def verify(
        self, greeting: Greeting, budget: CappedResolver | None = None
    ) -> GreetingReport:
        """Run the enabled checks for ``greeting`` (within ``budget`` when given)."""
        report = self.cached(greeting, budget)
        if report is not None:
            return report
        return await self._run(greeting, budget)

    async def _run(self, greeting: Greeting, budget: CappedResolver | None) -> GreetingReport:
        policy, resolver = self.policy, self.resolver
        asking = budget if budget is not None else resolver
        if self.report_cache_size <= 0 or self.report_ttl <= 0:
            return await run_checks(
                greeting,
                asking,
                checks=policy.enabled_checks,
                max_queries=policy.max_queries,
                timeout=policy.timeout,
            )
        report, fresh_for = await run_checks_fresh_for(
            greeting,
            asking,
            checks=policy.enabled_checks,
            max_queries=policy.max_queries,
            timeout=policy.timeout,
        )
        self._keep(report, fresh_for, policy, resolver)
        return report

    def start(
        self, greeting: Greeting, budget: CappedResolver | None = None
    ) -> asyncio.Task[GreetingReport]:
        """Begin verifying in the background; await the task for the report.

        A kept report (see ``cached``) runs no check: its task is done at its first step.
        """
        loop = asyncio.get_running_loop()
        report = self.cached(greeting, budget)
        if report is not None:
            return loop.create_task(_ready(report))
        return loop.create_task(self._run(greeting, budget))

    def decide(self, report: GreetingReport) -> Decision:
        """The policy's decision for a report."""
        entry = self._reports.peek(_key(report.greeting))
        if entry is not None and entry[2] is report and entry[0] is self.policy:
            return entry[3]
        return self.policy.decide(report)

    def clear(self) -> None:
        """Forget every kept report."""
        self._reports.clear()


async def _ready(report: GreetingReport) -> GreetingReport:
    return report

