"""Policy: stages, verdicts and the hook pipeline a session consults.

A hook is ``async (context) -> Verdict | None`` registered for a stage
(connect, helo, mail, rcpt, data). Hooks run in registration order; the
first verdict decides, ``None`` passes to the next hook, and when every hook
passes the session's default reply stands. A hook that raises or times out
defers (4xx): a policy fault never turns into a permanent rejection.
"""

from __future__ import annotations

from ._hooks import (
    STAGES,
    Hook,
    HookContext,
    Hooks,
    Stage,
    Verdict,
)

__all__ = ["STAGES", "Hook", "HookContext", "Hooks", "Stage", "Verdict"]
