"""The names of greeting verification: checks, results, modes, stages, presets.

Plain constants, so that configuration and the command line can validate
and list them without loading the checks (and dnspython with them).
"""

from __future__ import annotations

from typing import Literal

Result = Literal["pass", "fail", "none", "temperror", "permerror"]
RESULTS: tuple[Result, ...] = ("pass", "fail", "none", "temperror", "permerror")

CHECKS: tuple[str, ...] = (
    "syntax",
    "fqdn",
    "literal_match",
    "resolves",
    "forward_match",
    "iprev",
    "ptr_match",
    "not_us",
    "spf_helo",
    "dynamic",
    "consistent",
)
"""Every check, in the order they are reported and their verdicts weighed."""

Mode = Literal["off", "record", "defer", "reject"]
MODES: tuple[Mode, ...] = ("off", "record", "defer", "reject")
Stage = Literal["helo", "mail", "rcpt", "data"]
STAGES: tuple[Stage, ...] = ("helo", "mail", "rcpt", "data")
Preset = Literal["off", "record", "strict"]
PRESETS: tuple[Preset, ...] = ("off", "record", "strict")

# Checks whose result is information only: they never refuse.
RECORD_ONLY = frozenset({"dynamic"})
