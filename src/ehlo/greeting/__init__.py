"""Greeting verification: the HELO/EHLO name against DNS and the client's IP.

``SPECS`` is the table of checks (name, function, strict mode, DNS or
local, record-only) that every list of checks is derived from.
``run_checks`` runs the named checks and returns a ``GreetingReport`` (each
result with its reason and DNS evidence); ``GreetingPolicy`` turns a report
into accept, defer or reject; ``GreetingVerifier`` ties both to a resolver
and our own identity; ``authentication_results`` renders the RFC 8601
header. None of this needs the SMTP server, so the explain command (and a
future policy service) use it as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_loader
from ._names import (
    CHECKS,
    MODES,
    PRESETS,
    RECORD_ONLY,
    RESULTS,
    SPECS,
    STAGES,
    CheckSpec,
    Mode,
)

if TYPE_CHECKING:
    from ._checks import (
        CappedResolver,
        CheckResult,
        Greeting,
        GreetingNames,
        GreetingReport,
        QueryLimitError,
        run_checks,
        syntax_problem,
    )
    from ._policy import Decision, GreetingPolicy, preset_modes
    from ._verifier import GreetingVerifier
    from .authres import authentication_results

# The checks bring dnspython, pyspf and the PSL: loaded on first use of a
# name below, so that configuration can use the constants above without them.
_LAZY = {
    "CappedResolver": "_checks",
    "CheckResult": "_checks",
    "Greeting": "_checks",
    "GreetingNames": "_checks",
    "GreetingReport": "_checks",
    "QueryLimitError": "_checks",
    "run_checks": "_checks",
    "syntax_problem": "_checks",
    "Decision": "_policy",
    "GreetingPolicy": "_policy",
    "preset_modes": "_policy",
    "GreetingVerifier": "_verifier",
    "authentication_results": "authres",
}


__getattr__ = lazy_loader(__name__, _LAZY)

__all__ = [
    "CHECKS",
    "MODES",
    "PRESETS",
    "RECORD_ONLY",
    "RESULTS",
    "SPECS",
    "STAGES",
    "CappedResolver",
    "CheckResult",
    "CheckSpec",
    "Decision",
    "Greeting",
    "GreetingNames",
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
