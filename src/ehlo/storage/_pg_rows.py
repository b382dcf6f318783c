"""One message's row of the PostgreSQL ``messages`` table, and the statement that inserts it.

What the writer inserts and what ``ehlo db import`` copies, built in one
place: the envelope as JSON text (as the SQLite store keeps it, greeting
reports and transcript in ``extra``) and the search columns, case-folded
like the SQLite store's search table, so that the two stores answer a
query alike.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from ._sqlite_db import search_row
from .base import Envelope
from .sqlite import _dumps, _dumps_extra

MESSAGE_COLUMNS = (
    "queue_id", "node", "received_at", "client_ip", "client_port", "greeting",
    "greeting_name", "mail_from", "mail_params", "rcpt_to", "tls", "protocol",
    "server_name", "extra", "size", "subject", "size_received", "chunks",
    "s_mail_from", "s_rcpt_to", "s_subject", "s_helo", "s_tls", "s_auth", "s_checks",
    "attachments",
)
INSERT_MESSAGE = (
    f"INSERT INTO messages ({', '.join(MESSAGE_COLUMNS)})"
    f" VALUES ({', '.join(['%s'] * len(MESSAGE_COLUMNS))})"
)


def message_values(
    envelope: Envelope,
    *,
    size: int,
    subject: str | None,
    attachments: bool | None,
    chunks: int,
    node: str,
) -> tuple[Any, ...]:
    """The values of :data:`MESSAGE_COLUMNS` for one message of ``chunks`` body rows."""
    env = envelope
    received_at = env.received_at
    if received_at.tzinfo is None:
        received_at = received_at.replace(tzinfo=_dt.UTC)
    search = search_row(
        env.queue_id, "", env.mail_from, env.rcpt_to, subject, env.greeting, bool(env.tls),
        env.extra, env.greeting_name, attachments,
    )
    return (
        env.queue_id,
        node,
        received_at,
        env.client_ip,
        env.client_port,
        env.greeting,
        env.greeting_name,
        env.mail_from,
        _dumps(env.mail_params),
        _dumps(env.rcpt_to),
        _dumps(env.tls) if env.tls else None,
        env.protocol,
        env.server_name,
        _dumps_extra(env.extra),
        size,
        subject,
        env.size_received,
        chunks,
        search[2],  # s_mail_from
        search[3],  # s_rcpt_to
        search[4],  # s_subject
        search[9],  # s_helo
        bool(env.tls),
        search[7],  # s_auth
        search[8],  # s_checks
        attachments,
    )
