"""Where mail for a domain goes, and delivering it there with failover.

:class:`Router` turns a recipient domain into an ordered list of
:class:`MailHost` (RFC 5321 section 5.1): MX records by preference, equal
preferences shuffled, each target's A and AAAA addresses; the implicit MX
(the domain's own addresses) when there is no MX record; and no route at all
for a null MX (RFC 7505) or a domain that does not exist. Address lookups go
through :class:`ehlo.dns.Resolver` (its TTL cache and nameserver options);
MX lookups use dnspython directly with the same nameservers and timeout.

:func:`deliver` sends one message to one domain's recipients, trying the
next address and the next MX after a connection failure or a 4xx reply and
stopping at the first 5xx (RFC 5321 section 5.1: "the SMTP client SHOULD try
at least two addresses" and then give up or queue).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import random
from collections.abc import Callable, Sequence
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from .._net import format_hostport, parse_hostport
from ..dns import DNSTempError, Resolver
from ..protocol._syntax import parse_address_literal
from ._client import Message, SendResult, SMTPClient
from ._errors import NoRoute, SMTPClientError

__all__ = ["DeliveryResult", "MailHost", "Router", "deliver", "recipient_domain"]

# RFC 5321 section 4.5.4.2: the SMTP port, specified by IANA as port 25.
SMTP_PORT = 25
SUBMISSIONS_PORT = 465  # RFC 8314 section 3.3: implicit TLS


@dataclasses.dataclass(frozen=True, slots=True)
class MailHost:
    """One place to deliver to: a host name (MX target), its addresses and port."""

    name: str
    preference: int
    addresses: tuple[str, ...]
    port: int
    implicit: bool = False  # the domain's own address (no MX record)

    def __str__(self) -> str:
        kind = "implicit MX" if self.implicit else f"MX {self.preference}"
        return f"{self.name} ({kind})"


@dataclasses.dataclass(slots=True)
class DeliveryResult:
    """One domain's outcome: the host that took the message, or the last error."""

    domain: str
    recipients: list[str]
    result: SendResult | None = None
    host: str | None = None
    error: SMTPClientError | None = None
    attempts: list[tuple[str, SMTPClientError]] = dataclasses.field(default_factory=list)


def recipient_domain(address: str) -> str:
    """The domain part of an address, lower case (``Postmaster`` has none: "")."""
    _, at, domain = address.rpartition("@")
    return domain.lower() if at else ""


def _split_nameserver(text: str) -> tuple[str, int] | None:
    """``IP:PORT`` or ``[IPv6]:PORT`` as given by ``Resolver.nameservers``; None otherwise."""
    try:
        host, port = parse_hostport(text)
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        return None


class Router:
    """MX routing over a :class:`ehlo.dns.Resolver`; ``port`` is where every route points.

    MX delivery goes to port 25; tests (and relays through an unusual port)
    pass another. ``rng`` shuffles MX hosts of equal
    preference (RFC 5321 section 5.1: they MUST be tried in random order).
    """

    def __init__(
        self,
        resolver: Resolver | None = None,
        *,
        port: int = SMTP_PORT,
        rng: random.Random | None = None,
    ) -> None:
        self.resolver = resolver if resolver is not None else Resolver()
        self.port = port
        self._rng = rng if rng is not None else random.Random()
        # The same nameservers as the address lookups (``--dns-server``).
        servers = [_split_nameserver(ns) for ns in self.resolver.nameservers]
        mx = dns.asyncresolver.Resolver(configure=False)
        mx.nameservers = [
            dns.nameserver.Do53Nameserver(host, port)
            for host, port in (s for s in servers if s is not None)
        ] or [dns.nameserver.Do53Nameserver("127.0.0.1", 53)]
        mx.timeout = self.resolver.timeout
        mx.lifetime = self.resolver.timeout
        mx.retry_servfail = False
        self._mx = mx

    async def mx(self, domain: str) -> list[tuple[int, str]] | None:
        """MX records as (preference, target); [] for none; None for NXDOMAIN."""
        try:
            answer = await self._mx.resolve(
                dns.name.from_text(domain), dns.rdatatype.MX, search=False,
                raise_on_no_answer=False,
            )
        except dns.resolver.NXDOMAIN:
            return None
        except dns.exception.Timeout:
            raise DNSTempError(f"DNS timeout looking up {domain} MX") from None
        except dns.resolver.NoNameservers as exc:
            raise DNSTempError(f"no nameserver answered {domain} MX: {exc}") from None
        except dns.exception.DNSException as exc:
            raise DNSTempError(f"DNS lookup of {domain} MX failed: {exc}") from None
        if answer.rrset is None:
            return []
        records: list[tuple[int, str]] = []
        for rdata in answer.rrset:
            rd: Any = rdata
            target = rd.exchange.to_text(omit_final_dot=True).lower()
            records.append((int(rd.preference), target or "."))
        return records

    async def route(self, domain: str) -> list[MailHost]:
        """The hosts to try for ``domain``, best first. Raises :class:`NoRoute`."""
        domain = domain.rstrip(".").lower()
        if domain.startswith("["):
            # RFC 5321 section 4.1.3: an address literal names the host itself.
            try:
                literal = parse_address_literal(domain)
            except ValueError:
                raise NoRoute(f"bad address literal {domain}") from None
            if not isinstance(literal, ipaddress.IPv4Address | ipaddress.IPv6Address):
                raise NoRoute(f"cannot deliver to the general address literal {domain}")
            return [MailHost(domain, 0, (str(literal),), self.port, implicit=True)]
        if not domain:
            raise NoRoute("no domain to route to")
        try:
            records = await self.mx(domain)
        except DNSTempError as exc:
            raise NoRoute(f"{domain}: {exc}", temporary=True) from None
        if records is None:
            raise NoRoute(f"{domain}: no such domain (NXDOMAIN)")
        if len(records) == 1 and records[0][1] in (".", ""):
            # RFC 7505 section 3: a single MX of "." (any preference): no mail.
            raise NoRoute(f"{domain} accepts no mail (null MX, RFC 7505)")
        records = [(pref, target) for pref, target in records if target not in (".", "")]
        if not records:
            # RFC 5321 section 5.1: no MX at all: the domain is its own implicit MX.
            addresses = await self._addresses(domain)
            if not addresses:
                raise NoRoute(f"{domain} has no MX and no address (A/AAAA) records")
            return [MailHost(domain, 0, tuple(addresses), self.port, implicit=True)]
        # RFC 5321 section 5.1: lowest preference first, equal ones in random order.
        self._rng.shuffle(records)
        records.sort(key=lambda record: record[0])
        results = await asyncio.gather(
            *(self._addresses(target) for _, target in records), return_exceptions=True
        )
        hosts: list[MailHost] = []
        temporary = False
        for (pref, target), found in zip(records, results, strict=True):
            if isinstance(found, DNSTempError):
                temporary = True
                continue
            if isinstance(found, BaseException):
                raise found
            if found:
                hosts.append(MailHost(target, pref, tuple(found), self.port))
        if not hosts:
            # RFC 5321 section 5.1: MX records but none usable is an error.
            raise NoRoute(
                f"{domain}: no MX host has an address", temporary=temporary
            )
        return hosts

    async def _addresses(self, name: str) -> list[str]:
        return await self.resolver.addresses(name)


async def deliver(
    router: Router,
    sender: str,
    recipients: Sequence[str],
    message: Message | Callable[[], Message],
    *,
    client: Callable[[str, int, str], SMTPClient],
    login: tuple[str, str] | None = None,
    mechanism: str | None = None,
    on_attempt: Callable[[MailHost, str], None] | None = None,
    on_failure: Callable[[str, SMTPClientError], None] | None = None,
    size: int | None = None,
    eight_bit: bool | None = None,
    smtputf8: bool | None = None,
) -> DeliveryResult:
    """Deliver to the recipients of ONE domain, trying its hosts in order.

    ``client(address, port, host_name)`` builds an unconnected client (the
    host name is what TLS verifies). ``login`` is (user, password), with
    ``mechanism`` chosen or the best one offered. ``message`` may be a factory, called
    once per attempt; a seekable file is rewound before each attempt.
    ``on_attempt`` and ``on_failure`` are told about each try; ``size``,
    ``eight_bit`` and ``smtputf8`` go to :meth:`SMTPClient.send_message`. A
    connection failure or a temporary (4xx) refusal moves on to the next
    address or host; a permanent one stops.
    """
    domains = {recipient_domain(r) for r in recipients}
    if len(domains) != 1:
        raise ValueError("deliver() takes the recipients of exactly one domain")
    domain = domains.pop()
    outcome = DeliveryResult(domain, list(recipients))
    try:
        hosts = await router.route(domain)
    except NoRoute as exc:
        outcome.error = exc
        return outcome
    start = _position(message)
    for host in hosts:
        for address in host.addresses:
            where = format_hostport(address, host.port)
            if on_attempt is not None:
                on_attempt(host, address)
            body = _rewind(message, start)
            smtp = client(address, host.port, host.name)
            try:
                async with smtp:
                    if login is not None:
                        await smtp.login(*login, mechanism=mechanism)
                    outcome.result = await smtp.send_message(
                        sender, recipients, body, size=size, eight_bit=eight_bit,
                        smtputf8=smtputf8,
                    )
                    outcome.host = where
                    outcome.error = None
                    return outcome
            except SMTPClientError as exc:
                outcome.attempts.append((where, exc))
                outcome.error = exc
                if on_failure is not None:
                    on_failure(where, exc)
                if not exc.temporary:
                    return outcome
    return outcome


def _position(message: object) -> int | None:
    tell = getattr(message, "tell", None)
    seekable = getattr(message, "seekable", None)
    if tell is None or seekable is None:
        return None
    try:
        return int(tell()) if seekable() else None
    except (OSError, ValueError):
        return None


def _rewind(message: Message | Callable[[], Message], start: int | None) -> Message:
    if callable(message) and not hasattr(message, "read"):
        return message()
    body = message
    if start is not None:
        body.seek(start)  # type: ignore[union-attr]
    return body  # type: ignore[return-value]
