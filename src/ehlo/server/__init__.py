"""The asyncio SMTP server: listeners, per-connection transport, sessions."""

from __future__ import annotations

from ._server import Server, ServerContext, connection_capacity, tls_contexts_for

__all__ = ["Server", "ServerContext", "connection_capacity", "tls_contexts_for"]
