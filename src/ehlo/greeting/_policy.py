"""Greeting policy: what each check's result does to the session.

RFC 5321 section 4.1.4 lets a server verify the EHLO name against the client
address but forbids refusing mail only because that verification failed, so
the default mode of every check is ``record``: the results go into the
message's headers and envelope and nothing is refused. Refusing is the
operator's explicit choice, per check:

- ``off``: not run at all;
- ``record``: run and recorded, never refuses;
- ``defer``: a failure answers 450 4.7.1 (try later);
- ``reject``: a failure answers 550 5.7.1.

A ``temperror`` under ``defer`` or ``reject`` answers 451 4.7.1: a DNS
problem is never a permanent refusal. The verdict is applied at one stage
(helo, mail, rcpt or data; rcpt by default). Clients in trusted networks
skip the checks.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from ..protocol import Reply
from ._names import CHECKS, MODES, PRESETS, RECORD_ONLY, SPECS, STAGES, Mode, Preset, Stage

if TYPE_CHECKING:
    from ._checks import GreetingReport

__all__ = ["MODES", "PRESETS", "RECORD_ONLY", "STAGES", "Mode", "Preset", "Stage"]


def preset_modes(preset: str) -> dict[str, Mode]:
    """The per-check modes of a preset (off, record or strict)."""
    if preset == "off":
        return dict.fromkeys(CHECKS, "off")
    if preset == "record":
        return dict.fromkeys(CHECKS, "record")
    if preset == "strict":
        return {spec.name: spec.strict for spec in SPECS}
    raise ValueError(f"unknown greeting policy preset {preset!r}; expected off, record or strict")


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """What the policy makes of a report: accept, defer or reject, and why."""

    action: Literal["accept", "defer", "reject"]
    reply: Reply | None = None
    check: str | None = None  # the check that decided

    def to_json(self) -> dict[str, object]:
        """``{"action": ..., "reply": "550 5.7.1 ..." or None, "check": ...}``."""
        return {
            "action": self.action,
            "reply": str(self.reply) if self.reply is not None else None,
            "check": self.check,
        }


ACCEPT = Decision("accept")


@dataclasses.dataclass(frozen=True, slots=True)
class GreetingPolicy:
    """Modes per check, the stage, trusted networks and the DNS limits."""

    modes: Mapping[str, Mode] = dataclasses.field(
        default_factory=lambda: preset_modes("record")
    )
    stage: Stage = "rcpt"
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_queries: int = 50  # DNS lookups per session
    timeout: float = 10.0  # seconds for all checks of one greeting
    # Derived from the modes once (a policy does not change): asked per command.
    _enabled: tuple[str, ...] = dataclasses.field(
        default=(), init=False, repr=False, compare=False
    )
    _enforcing: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    @classmethod
    def preset(cls, name: str, **overrides: object) -> GreetingPolicy:
        """A policy from a preset, with per-check ``modes`` or other fields overridden."""
        modes = preset_modes(name)
        extra = overrides.pop("modes", None)
        if extra:
            modes.update(extra)  # type: ignore[call-overload]
        return cls(modes=modes, **overrides)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        for check, mode in self.modes.items():
            if check not in CHECKS:
                raise ValueError(f"unknown greeting check {check!r}")
            if mode not in MODES:
                raise ValueError(f"greeting check {check}: mode must be one of {MODES}")
            if check in RECORD_ONLY and mode in ("defer", "reject"):
                raise ValueError(f"greeting check {check} is recorded only (off or record)")
        if self.stage not in STAGES:
            raise ValueError(f"greeting policy stage must be one of {STAGES}")
        modes = [(c, self.mode(c)) for c in CHECKS]
        object.__setattr__(self, "_enabled", tuple(c for c, mode in modes if mode != "off"))
        object.__setattr__(
            self, "_enforcing", any(mode in ("defer", "reject") for _, mode in modes)
        )

    def mode(self, check: str) -> Mode:
        """The mode of ``check`` (record when not configured)."""
        return self.modes.get(check, "record")

    @property
    def enabled_checks(self) -> tuple[str, ...]:
        """Checks that run (mode other than off)."""
        return self._enabled

    @property
    def enforcing(self) -> bool:
        """True when some check can defer or reject."""
        return self._enforcing

    def trusted(self, client_ip: str) -> bool:
        """True when the client is in a trusted network (the checks are skipped)."""
        if not self.trusted_networks:
            return False
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        return any(address in net for net in self.trusted_networks
                   if net.version == address.version)

    def decide(self, report: GreetingReport) -> Decision:
        """Apply the modes to ``report``: the first refusing check decides.

        Permanent failures are weighed before temporary ones, so that a
        reject is not hidden behind a DNS hiccup of another check.
        """
        greeting = report.greeting
        deferred: Decision | None = None  # a failure under "defer": 450
        unsure: Decision | None = None  # a temperror under defer/reject: 451
        for check in CHECKS:
            mode = self.mode(check)
            result = report.results.get(check)
            if result is None or mode in ("off", "record"):
                continue
            if result.result in ("fail", "permerror"):
                text = f"{greeting.verb} name {greeting.name} {result.reason}"
                if mode == "reject":
                    return Decision("reject", Reply(550, "5.7.1", _clip(text)), check)
                if deferred is None:
                    deferred = Decision("defer", Reply(450, "4.7.1", _clip(text)), check)
            elif result.result == "temperror" and unsure is None:
                # A DNS failure is never a permanent refusal.
                text = (f"{greeting.verb} name {greeting.name} could not be verified now "
                        f"({check} {result.reason}); try again later")
                unsure = Decision("defer", Reply(451, "4.7.1", _clip(text)), check)
        return deferred or unsure or ACCEPT


def _clip(text: str, limit: int = 400) -> str:
    # RFC 5321 section 4.5.3.1.5: a reply line is at most 512 octets.
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
