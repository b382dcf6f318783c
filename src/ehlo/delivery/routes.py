"""Where a recipient goes, decided at RCPT: kept, handed on, or refused.

:class:`Routing` holds the operator's rules (local domains, the LMTP
server, relay networks, the smarthost, static routes) and answers
:meth:`Routing.decide` for each RCPT. The answer (a :class:`Decision`) is
stored with the message: the scheduler later delivers to the next hop
written then, so a configuration change does not move mail already queued.

Next hops are written as text, parsed by :func:`parse_next_hop`:

- ``mx:DOMAIN``: the domain's MX hosts by preference (RFC 5321 section 5.1);
- ``smtp:HOST:PORT``: one host (a smarthost, a static route);
- ``lmtp:HOST:PORT`` or ``lmtp:unix:/PATH``: an LMTP server (RFC 2033);
- ``local``: kept in the store, queued only for the success notice that
  ``NOTIFY=SUCCESS`` asks for (RFC 3461 section 4.1).

The rules, in order:

1. Without local domains and without submission, ehlo is a catch-all:
   every recipient is kept, nothing is ever relayed.
2. ``postmaster`` (bare), and ``postmaster@`` any domain for a client that
   may not relay, is local (RFC 5321 section 4.5.1).
3. A recipient in a local domain is local: kept in the store, or handed to
   the LMTP server when there is one (and kept too with ``keep_local``); a
   static route for a local domain wins over both.
4. Any other recipient is relayed only for an authenticated session or a
   client in a relay network: to its static route, else the smarthost, else
   its domain's MX hosts. Everyone else gets 550 5.7.1: never an open relay.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping

from .._net import format_hostport, parse_hostport
from ..protocol import Reply

__all__ = ["Decision", "NextHop", "Routing", "normalise_route", "parse_next_hop"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """What happens to one recipient."""

    store: bool  # kept in the store
    next_hop: str | None = None  # handed on there
    refusal: Reply | None = None  # refused with this reply


@dataclasses.dataclass(frozen=True, slots=True)
class NextHop:
    """A parsed next hop."""

    kind: str  # "mx", "smtp", "lmtp" or "local"
    host: str = ""  # the domain for "mx"
    port: int = 25
    path: str | None = None  # a Unix socket (LMTP)

    def __str__(self) -> str:
        if self.kind == "local":
            return "local"
        if self.kind == "mx":
            return f"mx:{self.host}"
        if self.path is not None:
            return f"{self.kind}:unix:{self.path}"
        return f"{self.kind}:{format_hostport(self.host, self.port)}"


def parse_next_hop(text: str, delivery_port: int = 25) -> NextHop:
    """``mx:DOMAIN``, ``smtp:HOST:PORT``, ``lmtp:HOST:PORT`` or ``lmtp:unix:/PATH``."""
    if text == "local":  # kept in the store; queued only for its success notice
        return NextHop("local")
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ValueError(f"bad next hop {text!r}")
    if kind == "mx":
        return NextHop("mx", rest.lower(), delivery_port)
    if kind not in ("smtp", "lmtp"):
        raise ValueError(f"bad next hop {text!r}")
    if rest.startswith("unix:"):
        path = rest[5:]
        if kind != "lmtp" or not path.startswith("/"):
            raise ValueError(f"bad next hop {text!r}")
        return NextHop("lmtp", path=path)
    host, port = parse_hostport(rest, 25 if kind == "smtp" else 24)
    if not host:
        raise ValueError(f"bad next hop {text!r}")
    return NextHop(kind, host, port)


def normalise_route(value: str) -> str:
    """A route as written in the configuration (``HOST[:PORT]``, ``lmtp:HOST:PORT``,
    ``lmtp:unix:/PATH``, ``smtp:HOST[:PORT]``) as a next hop (ValueError if malformed)."""
    text = value.strip()
    kind = "smtp"
    for prefix in ("lmtp:", "smtp:"):
        if text.startswith(prefix):
            kind, text = prefix[:-1], text[len(prefix) :]
            break
    return str(parse_next_hop(f"{kind}:{text}"))


def _domain_of(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain.lower().rstrip(".")


@dataclasses.dataclass(frozen=True, slots=True)
class Routing:
    """The operator's routing rules (see the module's docstring)."""

    domains: frozenset[str] = frozenset()
    submission: bool = False
    lmtp: str | None = None  # next hop of local recipients, "lmtp:..."
    keep_local: bool = False
    relay_networks: tuple[Network, ...] = ()
    relay_host: str | None = None  # next hop of relayed recipients, "smtp:HOST:PORT"
    routes: Mapping[str, str] = dataclasses.field(default_factory=dict)  # domain -> next hop

    @property
    def catch_all(self) -> bool:
        """True when every recipient is kept and nothing is ever relayed."""
        return not self.domains and not self.submission

    def may_relay(self, *, authenticated: bool, client_ip: str) -> bool:
        """Whether this client may address other domains."""
        if authenticated:
            return True
        if not self.relay_networks or self.catch_all:
            return False
        try:
            address = ipaddress.ip_address(client_ip.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.relay_networks)

    def is_local(self, address: str) -> bool:
        """True for a recipient in a local domain (or a bare postmaster)."""
        local, domain = _domain_of(address)
        return (not domain and local.lower() == "postmaster") or domain in self.domains

    def decide(self, address: str, *, authenticated: bool, client_ip: str) -> Decision:
        """The decision for ``RCPT TO:<address>``."""
        if self.catch_all:
            return Decision(store=True)
        local, domain = _domain_of(address)
        if not domain:
            # RFC 5321 section 4.5.1: <postmaster> without a domain is ours.
            return Decision(store=True)
        route = self.routes.get(domain)
        if domain in self.domains:
            if route is not None:
                return Decision(store=self.keep_local, next_hop=route)
            if self.lmtp is not None:
                return Decision(store=self.keep_local, next_hop=self.lmtp)
            return Decision(store=True)
        if self.may_relay(authenticated=authenticated, client_ip=client_ip):
            if route is None:
                route = self.relay_host if self.relay_host is not None else f"mx:{domain}"
            return Decision(store=False, next_hop=route)
        if local.lower() == "postmaster":
            # RFC 5321 section 4.5.1: postmaster must always be accepted.
            return Decision(store=True)
        return Decision(
            store=False,
            refusal=Reply(550, "5.7.1", f"Relaying denied: <{address}> is not a local domain"),
        )
