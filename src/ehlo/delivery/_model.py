"""What the delivery modules share: the settings, a message's entries for one next hop,
an outcome, and replies as the queue keeps them."""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Mapping
from typing import Any

from ..client import Timeouts
from ..protocol import Reply
from ..storage.queue import QueueEntry
from .routes import Routing


@dataclasses.dataclass(frozen=True, slots=True)
class DeliverySettings:
    """What the scheduler needs of the server's configuration."""

    hostname: str
    routing: Routing
    delivery_port: int = 25
    concurrency: int = 20
    per_destination: int = 4
    retry_min: float = 300.0
    retry_max: float = 4000.0
    max_lifetime: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0
    tls_policy: Mapping[str, str] = dataclasses.field(default_factory=dict)
    mta_sts: bool = True
    mta_sts_port: int = 443
    timeouts: Timeouts = dataclasses.field(default_factory=Timeouts)
    relay_login: tuple[str, str] | None = None  # at the smarthost
    # Where this server listens: a next hop here for a domain that is not
    # local is a loop (RFC 5321 section 5.1).
    own_addresses: frozenset[tuple[str, int]] = frozenset()
    ssl_context: ssl.SSLContext | None = None  # the CAs "verify" trusts
    # Seconds a node's claim on the entries it delivers lasts unless renewed
    # (a queue several nodes share: ``delivery_lease``); renewed every third.
    lease: float = 300.0


@dataclasses.dataclass(slots=True)
class Job:
    """One message's entries for one next hop."""

    queue_id: str
    entries: list[QueueEntry]


@dataclasses.dataclass(slots=True)
class Outcome:
    """What became of one recipient in one attempt."""

    state: str  # delivered | bounced | deferred
    reply: dict[str, Any]
    action: str | None = None  # the notice to send: failed, delivered, relayed


def reply_dict(reply: Reply | None, host: str = "", text: str | None = None) -> dict[str, Any]:
    if reply is None:
        return {"code": 0, "enhanced": None, "text": text or "", "host": host}
    return {
        "code": reply.code,
        "enhanced": reply.enhanced,
        "text": "\n".join(reply.lines),
        "host": host,
    }


def local_reply(code: int, enhanced: str, text: str) -> dict[str, Any]:
    """A reply decided here (no server said it)."""
    return {"code": code, "enhanced": enhanced, "text": text, "host": ""}


def wants(notify: str | None, what: str) -> bool:
    """RFC 3461 section 4.1: whether NOTIFY asks for ``what``; no NOTIFY means FAILURE
    (and DELAY, at the MTA's choice)."""
    if notify is None:
        return what in ("FAILURE", "DELAY")
    values = {v.strip().upper() for v in notify.split(",")}
    return what in values and "NEVER" not in values
