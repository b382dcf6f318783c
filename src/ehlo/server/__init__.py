"""The asyncio SMTP server: listeners, per-connection transport, sessions."""

from __future__ import annotations

from ._server import Server, ServerContext

__all__ = ["Server", "ServerContext"]
