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

from typing import TYPE_CHECKING

from ._lazy import lazy_loader

if TYPE_CHECKING:
    from .config import ConfigError, Listen, ServerConfig
    from .policy import Hook, HookContext, Hooks, Verdict
    from .protocol import ProtocolLimits, Reply
    from .server import Server
    from .storage import Envelope, MessageWriter, Store, StoredMessage, StoreError

__version__ = "0.1.0"

# Each public name and the module it comes from, imported on first use: a
# command such as ``ehlo messages list`` loads neither the server nor TLS.
_HOMES = {
    "ConfigError": "config",
    "Listen": "config",
    "ServerConfig": "config",
    "Hook": "policy",
    "HookContext": "policy",
    "Hooks": "policy",
    "Verdict": "policy",
    "ProtocolLimits": "protocol",
    "Reply": "protocol",
    "Server": "server",
    "Envelope": "storage",
    "MessageWriter": "storage",
    "Store": "storage",
    "StoredMessage": "storage",
    "StoreError": "storage",
}


# PEP 562: ``ehlo.Server`` and the other public names, loaded when first asked for.
__getattr__ = lazy_loader(__name__, _HOMES)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


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
