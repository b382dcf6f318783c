"""Asynchronous DNS lookups: PTR and address queries, a shared TTL cache, reverse names.

``Resolver`` is a small seam over dnspython's asyncio resolver that answers
with plain lists of strings, maps every temporary failure (timeout, SERVFAIL
or REFUSED from every server, no usable server) to ``DNSTempError`` and keeps
answers, positive and negative, in a ``DNSCache`` for as long as their TTL
allows. ``reverse_name`` gives a client's forward-confirmed reverse name;
``peek_reverse_name`` gives it from the cache alone, without a query or a task.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import logging
import time
from collections.abc import Callable

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

from .._cache import TTLCache
from .._net import format_hostport, parse_hostport

__all__ = [
    "DEFAULT_CACHE",
    "DNSCache",
    "DNSTempError",
    "Lookup",
    "Resolver",
    "loopback_name",
    "peek_reverse_name",
    "reverse_name",
]

log = logging.getLogger(__name__)

# Used when /etc/resolv.conf cannot be read or names no server (as glibc does).
FALLBACK_NAMESERVER = "127.0.0.1"
# RFC 2308: negative answers are cached for the SOA minimum (bounded by the
# SOA's own TTL); without an SOA, for this long.
NEGATIVE_TTL_DEFAULT = 300.0
# Upper bounds on how long answers are kept, whatever their TTL says.
NEGATIVE_TTL_MAX = 3600.0
POSITIVE_TTL_MAX = 86400.0
# PTR names tried for forward confirmation, at most (as SPF's ptr does).
MAX_PTR_NAMES = 10

_RESOLV_CONF = "/etc/resolv.conf"

CacheKey = tuple[str, str, str]
"""(nameservers, record type, lowercase query name)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Lookup:
    """One answered query: the records (as text) and the CNAME chain that led there.

    ``values`` is empty for NXDOMAIN (``nxdomain`` true) and for a name that
    exists without records of the type. ``cnames`` lists the aliases followed,
    first to last, so that evidence can show how a name was resolved.
    """

    name: str
    rdtype: str
    values: tuple[str, ...]
    cnames: tuple[str, ...] = ()
    nxdomain: bool = False

    def to_json(self) -> dict[str, object]:
        """The lookup as evidence: name, type, answers, aliases, NXDOMAIN."""
        out: dict[str, object] = {"name": self.name, "type": self.rdtype,
                                  "answers": list(self.values)}
        if self.cnames:
            out["cnames"] = list(self.cnames)
        if self.nxdomain:
            out["nxdomain"] = True
        return out


CacheValue = tuple[str, ...] | Lookup


class DNSTempError(Exception):
    """A lookup that failed for now: timeout, SERVFAIL/REFUSED, or no usable nameserver."""


class DNSCache(TTLCache[CacheKey, CacheValue]):
    """Answers by key until their TTL runs out; least recently used dropped beyond ``max_entries``.

    A ``TTLCache`` with the resolver's bounds: no answer is kept longer than
    ``max_ttl`` (a day). An empty tuple is a cached negative answer; ``get``
    returns ``None`` on a miss. ``clock`` (seconds, monotonic) is injectable
    for tests.
    """

    def __init__(
        self,
        max_entries: int = 10_000,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_ttl: float = POSITIVE_TTL_MAX,
    ) -> None:
        super().__init__(max_entries, max_ttl=max_ttl, clock=clock)


DEFAULT_CACHE = DNSCache()
"""The cache shared by every ``Resolver`` that is not given one of its own."""


def _parse_nameserver(text: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT``, ``[IPv6]`` or ``[IPv6]:PORT`` as (address, port)."""
    try:
        host, port = parse_hostport(text, 53)
    except ValueError as exc:
        raise ValueError(f"bad nameserver: {exc}") from None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad nameserver {text!r}: expected IP or IP:PORT") from None
    return str(address), port


def _system_resolver() -> dns.asyncresolver.Resolver:
    """A resolver configured from resolv.conf, or asking 127.0.0.1 when that fails."""
    try:
        resolver = dns.asyncresolver.Resolver(filename=_RESOLV_CONF)
        servers: list[str | dns.nameserver.Nameserver] = []
        for ns in resolver.nameservers:
            if isinstance(ns, str):
                port = resolver.nameserver_ports.get(ns, resolver.port)
                servers.append(dns.nameserver.Do53Nameserver(ns, port))
            else:
                servers.append(ns)
        resolver.nameservers = servers
        return resolver
    except (dns.resolver.NoResolverConfiguration, OSError, ValueError) as exc:
        log.warning(
            "cannot use %s (%s); asking the nameserver on %s",
            _RESOLV_CONF,
            exc,
            FALLBACK_NAMESERVER,
        )
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(FALLBACK_NAMESERVER, 53)]
    return resolver


def _describe_nameserver(ns: str | dns.nameserver.Nameserver) -> str:
    if isinstance(ns, dns.nameserver.AddressAndPortNameserver):
        return format_hostport(ns.address, ns.port)
    return str(ns)


def _negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308 negative TTL of an NXDOMAIN/NODATA response."""
    if isinstance(response, dns.message.QueryMessage):
        try:
            ttl = float(response.resolve_chaining().minimum_ttl)
        except dns.exception.DNSException:
            ttl = NEGATIVE_TTL_DEFAULT
    else:
        ttl = NEGATIVE_TTL_DEFAULT
    return min(ttl, NEGATIVE_TTL_MAX)


class Resolver:
    """Asynchronous PTR and address lookups with a shared TTL cache.

    ``nameservers``: ``"IP"`` or ``"IP:PORT"`` (``"[IPv6]:PORT"``) strings;
    ``None`` reads /etc/resolv.conf (falling back to 127.0.0.1 when it cannot
    be used). ``timeout`` bounds each lookup in seconds. Concurrent lookups of
    the same name share one query.
    """

    def __init__(
        self,
        nameservers: list[str] | None = None,
        timeout: float = 2.0,
        *,
        cache: DNSCache | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if nameservers is None:
            self._resolver = _system_resolver()
        else:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*_parse_nameserver(ns)) for ns in nameservers
            ]
        self._resolver.cache = None  # ours is used instead
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout
        self._resolver.retry_servfail = False
        self.timeout = timeout
        self.cache = cache if cache is not None else DEFAULT_CACHE
        self._identity = ",".join(self.nameservers)
        self._inflight: dict[CacheKey, asyncio.Task[Lookup]] = {}
        self.queries = 0  # lookups asked of this resolver (cache hits included)

    @property
    def nameservers(self) -> list[str]:
        """The servers asked, as ``IP:PORT`` (``[IPv6]:PORT``)."""
        return [_describe_nameserver(ns) for ns in self._resolver.nameservers]

    async def ptr(self, ip: str) -> list[str]:
        """Reverse names of ``ip``: lowercase, without the trailing dot; [] when there are none.

        Raises ``ValueError`` for a malformed address and ``DNSTempError`` when
        the lookup failed for now.
        """
        address = ipaddress.ip_address(ip)
        qname = dns.reversename.from_address(str(address))
        return list((await self._lookup(qname, dns.rdatatype.PTR)).values)

    async def addresses(self, name: str, *, version: int | None = None) -> list[str]:
        """IPv4 (A) then IPv6 (AAAA) addresses of ``name``; [] when there are none.

        ``version`` 4 or 6 asks for one family only. A name that is not valid
        in DNS has no addresses. Raises ``DNSTempError`` when a lookup failed
        for now.
        """
        if version not in (None, 4, 6):
            raise ValueError("version must be 4, 6 or None")
        try:
            qname = dns.name.from_text(name.strip())
        except dns.exception.DNSException:
            return []
        rdtypes = {
            None: (dns.rdatatype.A, dns.rdatatype.AAAA),
            4: (dns.rdatatype.A,),
            6: (dns.rdatatype.AAAA,),
        }[version]
        results = await asyncio.gather(*(self._lookup(qname, rdtype) for rdtype in rdtypes))
        return list(dict.fromkeys(value for result in results for value in result.values))

    def _cache_key(self, name: str, rdtype: str) -> CacheKey | None:
        """The cache key ``lookup`` uses for a plain ASCII name (None for other names)."""
        if not name.isascii() or "\\" in name:
            return None
        return (self._identity, rdtype.upper(), name.strip().lower().rstrip(".") + ".")

    def peek(self, name: str, rdtype: str) -> Lookup | None:
        """The cached answer for ``name`` and ``rdtype`` if there is one; never queries.

        Only plain ASCII names are looked up this way (others return None and
        go through ``lookup``), so that the key is the one ``lookup`` uses.
        """
        key = self._cache_key(name, rdtype)
        if key is None:
            return None
        cached = self.cache.get(key)
        return cached if isinstance(cached, Lookup) else None

    def peek_ptr(self, ip: str) -> list[str] | None:
        """The cached PTR names of ``ip``, if cached; never queries."""
        qname = _reverse_text(ip)
        if qname is None:
            return None
        found = self.peek(qname, "PTR")
        return None if found is None else list(found.values)

    def remaining(self, name: str, rdtype: str) -> float | None:
        """Seconds the cached answer for ``name`` and ``rdtype`` is still kept (its TTL left).

        ``None`` when no answer is cached (or ``name`` is not a DNS name); never queries.
        """
        key = self._cache_key(name, rdtype)
        if key is None:
            try:
                qname = dns.name.from_text(name.strip())
                kind = dns.rdatatype.to_text(dns.rdatatype.from_text(rdtype))
            except dns.exception.DNSException:
                return None
            key = (self._identity, kind, qname.to_text().lower())
        return self.cache.remaining(key)

    def remaining_ptr(self, ip: str) -> float | None:
        """As ``remaining``, for the PTR names of ``ip``."""
        qname = _reverse_text(ip)
        return None if qname is None else self.remaining(qname, "PTR")

    async def lookup(self, name: str, rdtype: str) -> Lookup:
        """Records of one type for ``name`` (A, AAAA, MX, TXT, PTR, CNAME ...).

        CNAMEs are followed; the chain is in the answer. Raises ``ValueError``
        for a name that is not valid in DNS and ``DNSTempError`` when the lookup
        failed for now.
        """
        try:
            qname = dns.name.from_text(name.strip())
        except dns.exception.DNSException as exc:
            raise ValueError(f"not a DNS name: {name!r} ({exc})") from None
        return await self._lookup(qname, dns.rdatatype.from_text(rdtype))

    async def _lookup(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> Lookup:
        self.queries += 1
        key = (self._identity, dns.rdatatype.to_text(rdtype), qname.to_text().lower())
        cached = self.cache.get(key)
        if isinstance(cached, Lookup):
            return cached
        task = self._inflight.get(key)
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            task = asyncio.ensure_future(self._query(key, qname, rdtype))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        # Shielded: a caller that gives up does not cancel the others' query.
        return await asyncio.shield(task)

    def _finished(self, key: CacheKey, task: asyncio.Task[Lookup]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved, even when every caller went away

    async def _query(
        self, key: CacheKey, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> Lookup:
        what = f"{key[2]} {key[1]}"
        name = qname.to_text(omit_final_dot=True).lower()
        kind = key[1]
        try:
            # dnspython bounds the lookup by its lifetime; this is a backstop.
            async with asyncio.timeout(self.timeout + 1.0):
                answer = await self._resolver.resolve(
                    qname, rdtype, search=False, raise_on_no_answer=False
                )
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.kwargs.get("responses") or {}
            ttl = _negative_ttl(next(iter(responses.values()), None))
            result = Lookup(name, kind, (), nxdomain=True)
            self.cache.put(key, result, ttl)
            return result
        except (dns.exception.Timeout, TimeoutError):
            raise DNSTempError(f"DNS timeout looking up {what}") from None
        except dns.resolver.NoNameservers as exc:
            raise DNSTempError(f"no nameserver answered {what}: {exc}") from None
        except dns.exception.DNSException as exc:
            raise DNSTempError(f"DNS lookup of {what} failed: {exc}") from None
        chain = answer.chaining_result
        cnames = tuple(
            rrset[0].target.to_text(omit_final_dot=True).lower()
            for rrset in chain.cnames
            if len(rrset)
        )
        if answer.rrset is None:
            values: tuple[str, ...] = ()
            ttl = min(float(chain.minimum_ttl), NEGATIVE_TTL_MAX)
        else:
            values = tuple(dict.fromkeys(_rdata_text(rdata) for rdata in answer.rrset))
            ttl = float(chain.minimum_ttl)
        result = Lookup(name, kind, values, cnames)
        self.cache.put(key, result, ttl)
        return result


@functools.lru_cache(maxsize=4096)
def _reverse_text(ip: str) -> str | None:
    """The reverse name ``ptr`` asks for ``ip`` (IPv4-mapped as IPv4), with the final dot."""
    # RFC 1035 section 3.5 (in-addr.arpa) and RFC 3596 section 2.5 (ip6.arpa).
    address = _address(ip)
    return None if address is None else address.reverse_pointer + "."


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``ip`` parsed, an IPv4-mapped IPv6 address as the IPv4 address; None if invalid."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _rdata_text(rdata: object) -> str:
    exchange = getattr(rdata, "exchange", None)
    if isinstance(exchange, dns.name.Name):  # MX: "preference exchange"
        return f"{getattr(rdata, 'preference', 0)} {exchange.to_text(omit_final_dot=True).lower()}"
    strings = getattr(rdata, "strings", None)
    if isinstance(strings, tuple):  # TXT: the character-strings joined (RFC 7208 3.3)
        return b"".join(strings).decode("utf-8", "replace")
    target = getattr(rdata, "target", None)
    if isinstance(target, dns.name.Name):
        return target.to_text(omit_final_dot=True).lower()
    address = getattr(rdata, "address", None)
    if isinstance(address, str):
        return str(ipaddress.ip_address(address))
    return str(rdata)


def loopback_name(ip: str) -> str | None:
    """``"localhost"`` for a loopback address (RFC 6761 section 6.3), else None."""
    address = _address(ip)
    return "localhost" if address is not None and address.is_loopback else None


async def reverse_name(resolver: Resolver, ip: str, timeout: float) -> str | None:
    """The client's forward-confirmed reverse name, or ``None``.

    That is the first PTR name of ``ip`` whose addresses include ``ip``.
    Loopback addresses are ``"localhost"`` without a query (RFC 6761 section
    6.3); IPv4-mapped IPv6 addresses are looked up as IPv4. ``None`` also when
    the lookups fail or take longer than ``timeout`` seconds in all.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "localhost"
    try:
        async with asyncio.timeout(timeout):
            names = (await resolver.ptr(str(address)))[:MAX_PTR_NAMES]
            results = await asyncio.gather(
                *(resolver.addresses(name, version=address.version) for name in names),
                return_exceptions=True,
            )
    except (DNSTempError, TimeoutError) as exc:
        log.debug("reverse name of %s: %s", address, exc or "timeout")
        return None
    for name, result in zip(names, results, strict=True):
        if isinstance(result, Exception) and not isinstance(result, DNSTempError):
            raise result
        if isinstance(result, BaseException):
            continue
        if any(ipaddress.ip_address(value) == address for value in result):
            return name
    return None


def peek_reverse_name(resolver: Resolver, ip: str) -> tuple[bool, str | None]:
    """``reverse_name`` from the cache alone: ``(True, name or None)``, or ``(False, None)``.

    True when every answer ``reverse_name`` would use is cached (or none is
    needed: loopback, a malformed address), so the name is known at once;
    False when a lookup is needed. Never queries and never awaits: the cost
    of a client whose answers are cached is a few dictionary lookups.
    """
    address = _address(ip)
    if address is None:
        return True, None
    if address.is_loopback:
        return True, "localhost"  # RFC 6761 section 6.3
    names = resolver.peek_ptr(str(address))
    if names is None:
        return False, None
    text = str(address)
    rdtype = "A" if address.version == 4 else "AAAA"
    # The first PTR name, in order, whose addresses include the client's (as
    # ``reverse_name`` decides); an uncached answer before it means a lookup.
    for name in names[:MAX_PTR_NAMES]:
        found = resolver.peek(name, rdtype)
        if found is None:
            return False, None
        if text in found.values:
            return True, name
    return True, None
