"""The sans-IO SMTP protocol core: bytes in, events out; replies in, bytes out.

Nothing here touches sockets, the event loop, DNS or disks, and nothing here
imports any other part of ehlo: the package is the bottom layer (the import
contract in pyproject.toml checks it). The public surface is re-exported from
this module; the private modules each own one concern (``_reply``,
``_events``, ``_syntax``, ``_state``, ``_limits``, ``_extension``, ``_server``,
``_client``).
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
from ._extension import Extension, SessionFacts
from ._limits import ProtocolLimits
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
    "Extension",
    "Fault",
    "Helo",
    "Help",
    "LocalProtocolError",
    "Mail",
    "Noop",
    "ProtocolError",
    "ProtocolLimits",
    "Quit",
    "Rcpt",
    "RemoteProtocolError",
    "Reply",
    "Rset",
    "ServerConnection",
    "ServerExtensions",
    "SessionFacts",
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
