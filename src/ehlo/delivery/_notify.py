"""The notice a message's outcomes call for, built from its queue entries.

:func:`build` turns entries and their last replies into the arguments of
:func:`ehlo.delivery.notices.build_notice`: the action and status per
recipient (a 4xx that outlived the queue lifetime is 4.4.7, RFC 3463),
the remote server and its reply, the original recipient (ORCPT) and the
envelope id (ENVID), xtext-decoded (RFC 3461 section 4).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ..extensions.dsn import xtext_decode
from ..storage import Envelope
from ..storage.queue import QueueEntry
from ._model import DeliverySettings
from .notices import RecipientReport, build_notice

log = logging.getLogger("ehlo.delivery")


def build(
    settings: DeliverySettings,
    now: datetime,
    envelope: Envelope,
    raw: bytes,
    kind: str,
    items: Sequence[tuple[QueueEntry, dict[str, Any], Any]],
) -> bytes | None:
    """The notice about ``items`` of one message to its sender (None: none is due)."""
    sender = envelope.mail_from
    if not sender:
        # RFC 3461 section 6.1 / RFC 5321 section 4.5.5: never a notice to <>.
        log.info(
            "%s: no notice for a message from <> (%s)",
            envelope.queue_id,
            kind,
            extra={"event": "notice_suppressed", "queue_id": envelope.queue_id},
        )
        return None
    reports = []
    for entry, reply, extra in items:
        code = reply.get("code")
        status = reply.get("enhanced")
        if kind == "failed":
            action = "failed"
            status = (
                status
                if status and status.startswith("5")
                else ("4.4.7" if reply.get("expired") else "5.0.0")
            )
            if reply.get("expired"):
                status = "4.4.7"
        elif kind == "delayed":
            action = "delayed"
            status = status if status and status.startswith("4") else "4.0.0"
        else:
            action = str(extra)
            status = status if status and status.startswith("2") else "2.0.0"
        text = str(reply.get("text", ""))
        diagnostic = f"{code} {status} {text}".strip() if code else None
        host = str(reply.get("host") or "")
        reports.append(
            RecipientReport(
                final_recipient=entry.recipient,
                action=action,
                status=status,
                original_recipient=_orcpt(entry.orcpt),
                remote_mta=host.partition("[")[0] or None if host else None,
                diagnostic=diagnostic or (text or None),
                last_attempt=now,
                will_retry_until=(
                    datetime.fromtimestamp(entry.created + settings.max_lifetime, UTC)
                    if kind == "delayed"
                    else None
                ),
            )
        )
    ret = envelope.mail_params.get("RET")
    envid = envelope.mail_params.get("ENVID")
    notice = build_notice(
        reporting_mta=settings.hostname,
        sender=sender,
        recipients=reports,
        original=raw,
        ret=ret.upper() if ret else None,
        envelope_id=_xtext(envid) if envid else None,
        arrival=envelope.received_at,
        queue_id=envelope.queue_id,
        now=now,
        utf8=("SMTPUTF8" in {k.upper() for k in envelope.mail_params}) or None,
    )
    return notice


def _xtext(text: str) -> str:
    """RFC 3461 section 4: xtext decoded (as it is when malformed; the server checked it)."""
    try:
        return xtext_decode(text)
    except ValueError:
        return text


def _orcpt(value: str | None) -> str | None:
    """RFC 3461 section 4.2: ``addr-type;xtext`` with its address decoded."""
    if not value:
        return None
    kind, sep, rest = value.partition(";")
    if not sep:
        return None
    return f"{kind};{_xtext(rest)}"
