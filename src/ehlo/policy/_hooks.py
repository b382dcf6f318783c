"""Hook registration, verdicts and the context handed to each hook."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Literal

from ..protocol import Reply

# "delivery" runs in the delivery scheduler, before each attempt for a recipient.
Stage = Literal["connect", "helo", "mail", "rcpt", "data", "delivery"]
STAGES: tuple[Stage, ...] = ("connect", "helo", "mail", "rcpt", "data", "delivery")

log = logging.getLogger("ehlo.policy")

# Default replies by stage for reject/defer verdicts given without a reply.
_REJECT = {
    "connect": Reply(554, "5.7.1", "Connection refused by policy"),
    "helo": Reply(550, "5.7.1", "Greeting refused by policy"),
    "mail": Reply(550, "5.7.1", "Sender refused by policy"),
    "rcpt": Reply(550, "5.7.1", "Recipient refused by policy"),
    "data": Reply(550, "5.7.1", "Message refused by policy"),
    "delivery": Reply(550, "5.7.1", "Delivery refused by policy"),
}
_DEFER = {
    "connect": Reply(421, "4.7.0", "Service temporarily unavailable, try again later"),
    "helo": Reply(450, "4.7.1", "Greeting deferred by policy, try again later"),
    "mail": Reply(450, "4.7.1", "Sender deferred by policy, try again later"),
    "rcpt": Reply(450, "4.7.1", "Recipient deferred by policy, try again later"),
    "data": Reply(451, "4.7.1", "Message deferred by policy, try again later"),
    "delivery": Reply(451, "4.7.1", "Delivery deferred by policy"),
}
_HOOK_FAILED = Reply(451, "4.3.0", "Temporary policy failure, try again later")
_HOOK_FAILED_CONNECT = Reply(421, "4.3.0", "Temporary policy failure, try again later")


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """A hook's decision: accept, reject or defer, optionally with its own reply."""

    action: Literal["accept", "reject", "defer"]
    reply: Reply | None = None

    @classmethod
    def accept(cls, reply: Reply | None = None) -> Verdict:
        """Accept now (skip later hooks), with the default or a given 2xx reply."""
        if reply is not None and reply.code >= 400:
            raise ValueError("an accept verdict needs a 2xx or 3xx reply")
        return cls("accept", reply)

    @classmethod
    def reject(cls, text: str | None = None, code: int = 550, enhanced: str = "5.7.1") -> Verdict:
        """Refuse permanently (5xx)."""
        if not 500 <= code <= 599:
            raise ValueError("a reject verdict needs a 5xx code")
        return cls("reject", Reply(code, enhanced, text) if text else None)

    @classmethod
    def defer(cls, text: str | None = None, code: int = 450, enhanced: str = "4.7.1") -> Verdict:
        """Refuse for now (4xx): the client tries again later."""
        if not 400 <= code <= 499:
            raise ValueError("a defer verdict needs a 4xx code")
        return cls("defer", Reply(code, enhanced, text) if text else None)

    def reply_for(self, stage: Stage) -> Reply | None:
        """The reply this verdict gives at ``stage`` (None: the default 2xx)."""
        if self.reply is not None:
            if stage == "connect" and self.action == "defer" and self.reply.code != 421:
                # At connect time only 421 or 554 can be sent (RFC 5321 section 3.1).
                return Reply(421, self.reply.enhanced and "4" + self.reply.enhanced[1:],
                             self.reply.lines)
            if stage == "connect" and self.action == "reject" and self.reply.code != 554:
                return Reply(554, self.reply.enhanced, self.reply.lines)
            return self.reply
        if self.action == "reject":
            return _REJECT[stage]
        if self.action == "defer":
            return _DEFER[stage]
        return None


@dataclasses.dataclass(slots=True)
class HookContext:
    """What a hook may look at. Fields not yet known are empty."""

    stage: Stage
    client_ip: str
    client_port: int
    tls: dict[str, str] | None = None
    auth_user: str | None = None  # the AUTH identity (RFC 4954), once authenticated
    greeting: str | None = None
    greeting_name: str | None = None
    mail_from: str | None = None
    mail_params: dict[str, str | None] = dataclasses.field(default_factory=dict)
    rcpt: str | None = None  # the recipient being decided (rcpt stage)
    rcpt_params: dict[str, str | None] = dataclasses.field(default_factory=dict)
    rcpt_to: list[str] = dataclasses.field(default_factory=list)  # accepted so far
    queue_id: str | None = None  # data stage
    size: int | None = None  # data stage: octets received
    # Delivery stage: where the recipient (``rcpt``) is about to go; a hook
    # may change it ("mx:DOMAIN", "smtp:HOST:PORT", "lmtp:HOST:PORT").
    next_hop: str | None = None


Hook = Callable[[HookContext], Awaitable[Verdict | None]]


class Hooks:
    """Hooks per stage, run in order; also usable without an SMTP server."""

    def __init__(
        self,
        hooks: Mapping[str, Iterable[Hook]] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.timeout = timeout
        self._by_stage: dict[str, list[Hook]] = {stage: [] for stage in STAGES}
        for stage, funcs in (hooks or {}).items():
            for func in funcs:
                self.register(stage, func)

    def register(self, stage: str, hook: Hook) -> None:
        """Add ``hook`` at the end of ``stage``'s list."""
        if stage not in self._by_stage:
            raise ValueError(f"unknown hook stage {stage!r}; expected one of {', '.join(STAGES)}")
        self._by_stage[stage].append(hook)

    def has(self, stage: str) -> bool:
        """True when at least one hook is registered for ``stage``."""
        return bool(self._by_stage[stage])

    async def run(self, context: HookContext) -> Reply | None:
        """The reply decided by the hooks of ``context.stage``, or None to proceed."""
        for hook in self._by_stage[context.stage]:
            try:
                verdict = await asyncio.wait_for(hook(context), self.timeout)
            except Exception:
                log.exception("hook %s failed at stage %s", getattr(hook, "__name__", hook),
                              context.stage)
                return _HOOK_FAILED_CONNECT if context.stage == "connect" else _HOOK_FAILED
            if verdict is None:
                continue
            return verdict.reply_for(context.stage)
        return None
