"""The sans-IO SMTP protocol core: bytes in, events out; replies in, bytes out.

Nothing here touches sockets, the event loop, DNS or disks. The public
surface is re-exported from this module; the private modules each own one
concern (``_reply``, ``_events``, ``_syntax``, ``_state``, ``_server``).
"""

from __future__ import annotations

from ._client import ClientConnection, ClientState, ServerExtensions
from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ._events import (
    NEED_DATA,
    PAUSED,
    Auth,
    AuthResponse,
    Bdat,
    Command,
    Data,
    DataChunk,
    DataEnd,
    Ehlo,
    Event,
    Fault,
    Helo,
    Help,
    Mail,
    Noop,
    Quit,
    Rcpt,
    Rset,
    StartTls,
    Vrfy,
)
from ._reply import Reply
from ._server import ServerConnection
from ._state import State, Transaction
from ._syntax import (
    SyntaxProblem,
    is_address_literal,
    is_domain,
    parse_address_literal,
    parse_params,
    parse_path,
)

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "Auth",
    "AuthResponse",
    "Bdat",
    "ClientConnection",
    "ClientState",
    "Command",
    "Data",
    "DataChunk",
    "DataEnd",
    "Ehlo",
    "Event",
    "Fault",
    "Helo",
    "Help",
    "LocalProtocolError",
    "Mail",
    "Noop",
    "ProtocolError",
    "Quit",
    "Rcpt",
    "RemoteProtocolError",
    "Reply",
    "Rset",
    "ServerConnection",
    "ServerExtensions",
    "StartTls",
    "State",
    "SyntaxProblem",
    "Transaction",
    "Vrfy",
    "is_address_literal",
    "is_domain",
    "parse_address_literal",
    "parse_params",
    "parse_path",
]
