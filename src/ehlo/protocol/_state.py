"""Session states, the transaction record, and the command sequencing table.

Rules enforced here (RFC 5321 section 4.1.4 and 3.3):

- MAIL needs a successful HELO/EHLO; a MAIL inside a transaction is refused.
- RCPT needs a successful MAIL; DATA and BDAT need a successful RCPT.
- DATA is refused once BDAT has started a transaction (RFC 3030 section 2).
- RSET, NOOP, HELP, VRFY and QUIT are valid in any state.
- A new HELO/EHLO or RSET clears the transaction (RFC 5321 section 4.1.4).

States advance only when a reply is sent (see ``ServerConnection.send``):
a 250 to MAIL opens the transaction, a 354 to DATA starts the body.
"""

from __future__ import annotations

import enum

from ._reply import Reply


class State(enum.Enum):
    """Where a server connection stands."""

    START = "start"  # the banner has not been sent yet
    CONNECTED = "connected"  # banner sent, no successful greeting
    GREETED = "greeted"  # HELO/EHLO done, no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading a DATA body
    BDAT = "bdat"  # reading a BDAT chunk
    CHUNKING = "chunking"  # between BDAT chunks of one transaction
    AUTH = "auth"  # 334 sent to AUTH: the next line is a SASL response
    TLS_PENDING = "tls-pending"  # 220 to STARTTLS sent, handshake not done
    REFUSED = "refused"  # 554 banner sent: only QUIT gets more than 503
    CLOSED = "closed"  # 221 or 421 sent


class Transaction:
    """The envelope being built by MAIL and RCPT, and its body progress."""

    __slots__ = ("body", "chunked", "declared_size", "mail_from", "params", "rcpt_params", "rcpts",
                 "size", "smtputf8")

    def __init__(self, mail_from: str, params: dict[str, str | None]) -> None:
        self.mail_from = mail_from
        self.params = params
        self.rcpts: list[str] = []
        # Each accepted recipient's RCPT parameters, at the same index as in rcpts.
        self.rcpt_params: list[dict[str, str | None]] = []
        self.smtputf8 = False  # RFC 6531: SMTPUTF8 given on MAIL
        self.body = "7BIT"  # RFC 6152 BODY= value
        self.declared_size: int | None = None  # RFC 1870 SIZE= value
        self.size = 0  # message octets received so far
        self.chunked = False  # BDAT used (RFC 3030)


_SEND_GREETING = Reply(503, "5.5.1", "Send HELO or EHLO first")
_NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command: a transaction is already open")
_NEED_MAIL = Reply(503, "5.5.1", "Need MAIL before RCPT")
_NEED_RCPT = Reply(503, "5.5.1", "Need RCPT before DATA")
_CHUNKING_DATA = Reply(503, "5.5.1", "DATA is not allowed after BDAT in the same transaction")
_MAIL_DURING_BDAT = Reply(503, "5.5.1", "Finish the BDAT transaction with BDAT LAST or RSET first")
_NEED_RCPT_BDAT = Reply(503, "5.5.1", "Need RCPT before BDAT")
_AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH is not permitted during a mail transaction")
_REFUSED = Reply(503, "5.5.1", "Service refused; only QUIT is accepted")

# verb -> {state in which it is refused: the reply}. States not listed are allowed.
SEQUENCE: dict[str, dict[State, Reply]] = {
    "MAIL": {
        State.CONNECTED: _SEND_GREETING,
        State.MAIL: _NESTED_MAIL,
        State.RCPT: _NESTED_MAIL,
        State.CHUNKING: _MAIL_DURING_BDAT,
    },
    "RCPT": {
        State.CONNECTED: _SEND_GREETING,
        State.GREETED: _NEED_MAIL,
        State.CHUNKING: _MAIL_DURING_BDAT,
    },
    "DATA": {
        State.CONNECTED: _SEND_GREETING,
        State.GREETED: _NEED_MAIL,
        State.MAIL: _NEED_RCPT,
        State.CHUNKING: _CHUNKING_DATA,
    },
    # RFC 4954 section 4: AUTH is not permitted during a mail transaction.
    "AUTH": {
        State.CONNECTED: _SEND_GREETING,
        State.MAIL: _AUTH_IN_TRANSACTION,
        State.RCPT: _AUTH_IN_TRANSACTION,
        State.CHUNKING: _AUTH_IN_TRANSACTION,
    },
    "BDAT": {
        State.CONNECTED: _SEND_GREETING,
        State.GREETED: _NEED_MAIL,
        State.MAIL: _NEED_RCPT_BDAT,
    },
}


def sequence_error(verb: str, state: State) -> Reply | None:
    """The 503 reply for ``verb`` in ``state``, or None when it is in sequence."""
    if state is State.REFUSED and verb != "QUIT":
        return _REFUSED
    rules = SEQUENCE.get(verb)
    if rules is None:
        return None
    return rules.get(state)


IN_TRANSACTION = frozenset({State.MAIL, State.RCPT, State.DATA, State.BDAT, State.CHUNKING})
