"""Greeting verification: the HELO/EHLO name against DNS and the client's IP.

``run_checks`` runs the named checks and returns a ``GreetingReport`` (each
result with its reason and DNS evidence); ``GreetingPolicy`` turns a report
into accept, defer or reject; ``GreetingVerifier`` ties both to a resolver
and our own identity; ``authentication_results`` renders the RFC 8601
header. None of this needs the SMTP server, so the explain command (and a
future policy service) use it as it is.
"""

from __future__ import annotations

from ._checks import (
    CHECKS,
    RESULTS,
    CappedResolver,
    CheckResult,
    Greeting,
    GreetingReport,
    QueryLimitError,
    run_checks,
    syntax_problem,
)
from ._policy import (
    MODES,
    PRESETS,
    RECORD_ONLY,
    STAGES,
    Decision,
    GreetingPolicy,
    Mode,
    preset_modes,
)
from ._verifier import GreetingVerifier
from .authres import authentication_results

__all__ = [
    "CHECKS",
    "MODES",
    "PRESETS",
    "RECORD_ONLY",
    "RESULTS",
    "STAGES",
    "CappedResolver",
    "CheckResult",
    "Decision",
    "Greeting",
    "GreetingPolicy",
    "GreetingReport",
    "GreetingVerifier",
    "Mode",
    "QueryLimitError",
    "authentication_results",
    "preset_modes",
    "run_checks",
    "syntax_problem",
]
