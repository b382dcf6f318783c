"""The verifier: runs the checks for a greeting under a policy, with our identity.

One ``GreetingVerifier`` serves a whole server (or the explain command): it
holds the policy, the shared resolver and our own names and addresses.
``start`` begins the checks for one greeting in the background and returns
the task, so the greeting reply is not delayed by DNS.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from ..dns import Resolver
from ._checks import CappedResolver, Greeting, GreetingReport, run_checks
from ._policy import Decision, GreetingPolicy


class GreetingVerifier:
    """Checks greetings for one server under one policy."""

    def __init__(
        self,
        policy: GreetingPolicy,
        resolver: Resolver,
        our_names: Iterable[str] = (),
        our_addresses: Iterable[str] = (),
    ) -> None:
        self.policy = policy
        self.resolver = resolver
        self.our_names = tuple(dict.fromkeys(n.lower().rstrip(".") for n in our_names if n))
        self.our_addresses = tuple(dict.fromkeys(our_addresses))

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

    async def verify(
        self, greeting: Greeting, budget: CappedResolver | None = None
    ) -> GreetingReport:
        """Run the enabled checks for ``greeting`` (within ``budget`` when given)."""
        return await run_checks(
            greeting,
            budget if budget is not None else self.resolver,
            checks=self.policy.enabled_checks,
            max_queries=self.policy.max_queries,
            timeout=self.policy.timeout,
        )

    def start(
        self, greeting: Greeting, budget: CappedResolver | None = None
    ) -> asyncio.Task[GreetingReport]:
        """Begin verifying in the background; await the task for the report."""
        return asyncio.ensure_future(self.verify(greeting, budget))

    def decide(self, report: GreetingReport) -> Decision:
        """The policy's decision for a report."""
        return self.policy.decide(report)
