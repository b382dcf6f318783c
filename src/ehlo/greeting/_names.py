"""The names of greeting verification: the table of checks, results, modes, stages, presets.

Plain constants, so that configuration and the command line can validate
and list them without loading the checks (and dnspython with them).

``SPECS`` is the one table of checks: each row names a check, the function
in ``_checks`` that runs it, its mode under the ``strict`` preset, whether it
needs DNS and whether it is only ever recorded. ``CHECKS``, ``RECORD_ONLY``,
the presets and the functions run are all derived from it, and ``_checks``
resolves every row's function when it is loaded, so a row without a
function fails at once instead of being reported as a ``temperror``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Result = Literal["pass", "fail", "none", "temperror", "permerror"]
RESULTS: tuple[Result, ...] = ("pass", "fail", "none", "temperror", "permerror")

Mode = Literal["off", "record", "defer", "reject"]
MODES: tuple[Mode, ...] = ("off", "record", "defer", "reject")
Stage = Literal["helo", "mail", "rcpt", "data"]
STAGES: tuple[Stage, ...] = ("helo", "mail", "rcpt", "data")
Preset = Literal["off", "record", "strict"]
PRESETS: tuple[Preset, ...] = ("off", "record", "strict")


@dataclasses.dataclass(frozen=True, slots=True)
class CheckSpec:
    """One greeting check, as the table declares it."""

    # The check's name: in config ([greeting.checks]), reports and headers.
    name: str
    # The coroutine function in ``ehlo.greeting._checks`` that runs it.
    function: str
    # Its mode under the "strict" preset ("record" for the hints that are
    # too weak to refuse on, RFC 5321 section 4.1.4).
    strict: Mode
    # True when it needs DNS: it then runs under the timeout, concurrently
    # with the other DNS checks; a local check runs inline, first.
    dns: bool
    # True when it is information only and may never defer or reject.
    record_only: bool = False


SPECS: tuple[CheckSpec, ...] = (
    CheckSpec("syntax", "check_syntax", strict="reject", dns=False),
    CheckSpec("fqdn", "check_fqdn", strict="reject", dns=False),
    CheckSpec("literal_match", "check_literal_match", strict="reject", dns=False),
    CheckSpec("resolves", "check_resolves", strict="reject", dns=True),
    CheckSpec("forward_match", "check_forward_match", strict="reject", dns=True),
    CheckSpec("iprev", "check_iprev", strict="reject", dns=True),
    CheckSpec("ptr_match", "check_ptr_match", strict="record", dns=True),
    CheckSpec("not_us", "check_not_us", strict="reject", dns=False),
    CheckSpec("spf_helo", "check_spf_helo", strict="reject", dns=True),
    CheckSpec("dynamic", "check_dynamic", strict="record", dns=True, record_only=True),
    CheckSpec("consistent", "check_consistent", strict="record", dns=False),
)
"""Every check, in the order they are reported and their verdicts weighed."""

SPEC_BY_NAME: dict[str, CheckSpec] = {spec.name: spec for spec in SPECS}

CHECKS: tuple[str, ...] = tuple(spec.name for spec in SPECS)
"""Every check's name, in table order."""

# Checks whose result is information only: they never refuse.
RECORD_ONLY = frozenset(spec.name for spec in SPECS if spec.record_only)
