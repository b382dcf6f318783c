"""ehlo: an ESMTP mail server and client.

The public surface for applications that embed the server::

    import ehlo

    async def only_example(ctx: ehlo.HookContext) -> ehlo.Verdict | None:
        if not (ctx.rcpt or "").endswith("@example.org"):
            return ehlo.Verdict.reject("Unknown recipient", 550, "5.1.1")
        return None

    server = ehlo.Server(ehlo.ServerConfig(), hooks={"rcpt": [only_example]})
"""

from __future__ import annotations

from .config import ConfigError, Listen, ServerConfig
from .policy import Hook, HookContext, Hooks, Verdict
from .protocol import ProtocolLimits, Reply
from .server import Server
from .storage import Envelope, MessageWriter, Store, StoredMessage, StoreError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Envelope",
    "Hook",
    "HookContext",
    "Hooks",
    "Listen",
    "MessageWriter",
    "ProtocolLimits",
    "Reply",
    "Server",
    "ServerConfig",
    "Store",
    "StoreError",
    "StoredMessage",
    "Verdict",
    "__version__",
]
