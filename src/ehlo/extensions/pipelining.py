"""PIPELINING (RFC 2920): the client may send commands without waiting.

The server side needs no parameter: replies are sent in order and all output
pending when the server would wait for input is flushed in one write
(RFC 2920 section 3.2), which the server's transport does after every read.
"""

from __future__ import annotations

from ..protocol import Extension


class Pipelining(Extension):
    """Advertise PIPELINING."""

    keyword = "PIPELINING"
    enables_pipelining = True
