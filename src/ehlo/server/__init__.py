"""The asyncio SMTP server: listeners, per-connection transport, sessions, supervision."""

from __future__ import annotations

from ._server import Server, ServerContext, connection_capacity, tls_contexts_for
from .supervisor import StartError, Supervisor, serve

__all__ = [
    "Server",
    "ServerContext",
    "StartError",
    "Supervisor",
    "connection_capacity",
    "serve",
    "tls_contexts_for",
]
