"""The two kinds of protocol errors.

``LocalProtocolError``: the code driving a connection misused the API (sent
a reply when none was expected, fed data after close). It is a bug in ehlo or
in an embedding application, never the peer's fault.

``RemoteProtocolError``: the peer broke the protocol in a way the connection
cannot answer with a reply (used by the client side for malformed replies).
Server-side peer faults are answered with SMTP replies and reported as
:class:`~ehlo.protocol.Fault` events instead of exceptions.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of both error kinds."""


class LocalProtocolError(ProtocolError):
    """The connection object was used out of order by its owner."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that cannot be understood or answered."""
