"""Delivery status notifications: RFC 3464 reports, built as complete messages.

This module owns the notices the delivery system sends back to a message's
envelope sender: a failure notice (permanent failures and expiry), a delay
notice (still being retried) and a success notice (``delivered``, or
``relayed`` to a next hop that does not speak DSN). :func:`build_notice`
takes what the queue knows about the original message and its recipients
and returns the notice as bytes with CRLF line ends, ready to be queued from
the null sender. It is pure: no I/O, no clock unless ``now`` is left out.

A notice is a ``multipart/report; report-type=delivery-status`` (RFC 6522)
with exactly three parts:

1. ``text/plain``: for people, naming each recipient, what happened and the
   remote server's reply;
2. ``message/delivery-status`` (RFC 3464): ``Reporting-MTA``,
   ``Original-Envelope-Id`` (ENVID), ``Arrival-Date`` and the queue id as the
   extension field ``X-Ehlo-Queue-Id``, then one group per recipient
   (``Original-Recipient`` from ORCPT, ``Final-Recipient``, ``Action``,
   ``Status``, ``Remote-MTA``, ``Diagnostic-Code``, ``Last-Attempt-Date``,
   ``Will-Retry-Until`` for delays);
3. the original: its header section as ``text/rfc822-headers`` (the default
   and ``RET=HDRS``), or the whole message as ``message/rfc822`` for
   ``RET=FULL`` in a failure notice up to ``max_full`` octets (a larger one
   returns its header section, and the text part says so).

Internationalized notices (RFC 6533): when the message travelled under
SMTPUTF8, or any address or the original's header section is not ASCII, the
parts become ``message/global-delivery-status`` and ``message/global-headers``
/ ``message/global``, non-ASCII addresses use the ``utf-8`` address type and
the notice's own header may carry UTF-8. In an ASCII notice (``utf8=False``)
a non-ASCII address is written in the ASCII form of the ``utf-8`` type
(``\\x{HEX}`` escapes) and other non-ASCII text as ``?``; only the To field
keeps a non-ASCII sender as it is, since no other form reaches it.

A ``Diagnostic-Code`` that starts with a reply code has the type ``smtp``;
ehlo's own words (a refused connection, a timeout) have ``X-Ehlo``. A status
that is not an RFC 3463 code gives way to the action's generic one (5.0.0,
4.0.0, 2.0.0). Misuse is a ``ValueError``: no recipients, an unknown action,
the null sender (mail from ``<>`` never gets a notice).

Everything that comes from outside (addresses from clients, replies and host
names from remote servers, the envelope id) is made safe before it is
written: no CR, LF or other control character ends up in a field (a remote
reply's lines become continuation lines of one ``Diagnostic-Code`` field,
other line breaks and controls become ``?``), and no line the notice writes
is longer than 998 octets. The original is embedded byte for byte, 8-bit
content included, never re-encoded (so its own lines stay as long as they
were); an original without a blank line is all header section.
"""

from __future__ import annotations

import dataclasses
import email.utils
import re
import secrets
import textwrap
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

__all__ = [
    "ACTIONS",
    "QUEUE_ID_FIELD",
    "RecipientReport",
    "build_notice",
    "header_section",
    "needs_utf8",
    "notice_kind",
    "notice_subject",
]

ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed"})

# The extension field (RFC 3464 section 2.4: "X-" names are private) carrying
# ehlo's queue id of the original, among the per-message fields.
QUEUE_ID_FIELD = "X-Ehlo-Queue-Id"

_SUBJECTS = {
    "failure": "Undelivered Mail Returned to Sender",
    "delay": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}

# RFC 5322 section 2.1.1: a line is at most 998 octets without its CRLF, and
# should be at most 78.
MAX_LINE = 998
_SOFT_LINE = 78
_TEXT_WIDTH = 76

# RFC 3463 section 2: class.subject.detail, each of at most three digits.
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_FALLBACK_STATUS = {"failed": "5.0.0", "delayed": "4.0.0", "delivered": "2.0.0", "relayed": "2.0.0"}
# An SMTP reply starts with its three-digit code (RFC 5321 section 4.2).
_SMTP_REPLY = re.compile(r"[2-5][0-9][0-9]([ -]|$)")
# A line end followed by an empty line; group 1 is the last header line's end.
_BLANK_LINE = re.compile(rb"(\r?\n)\r?\n")


@dataclasses.dataclass(frozen=True, slots=True)
class RecipientReport:
    """What happened to one recipient, as the notice reports it."""

    final_recipient: str  # the address ehlo tried to deliver to
    action: str  # "failed" | "delayed" | "delivered" | "relayed"
    status: str  # RFC 3463 code, e.g. "5.1.1", "4.4.1", "2.0.0"
    original_recipient: str | None = None  # ORCPT, xtext-decoded: "rfc822;bob@example.org"
    remote_mta: str | None = None  # the host that answered, e.g. "mx.example.org"
    diagnostic: str | None = None  # the remote reply as text, its lines joined by "\n"
    last_attempt: datetime | None = None
    will_retry_until: datetime | None = None  # reported for "delayed" only


def notice_kind(actions: Iterable[str]) -> str:
    """``"failure"``, ``"delay"`` or ``"success"`` for a notice about these actions.

    RFC 3461 section 5.2.8: one notice may report on several recipients; one
    that reports any failure is a failure notice, else any delay makes it a
    delay notice.
    """
    seen = set(actions)
    unknown = seen - ACTIONS
    if unknown:
        raise ValueError(f"unknown DSN action(s): {sorted(unknown)}")
    if not seen:
        raise ValueError("a notice needs at least one recipient")
    if "failed" in seen:
        return "failure"
    if "delayed" in seen:
        return "delay"
    return "success"


def notice_subject(actions: Iterable[str]) -> str:
    """The Subject of a notice about recipients with these actions."""
    return _SUBJECTS[notice_kind(actions)]


def header_section(original: bytes) -> bytes:
    """The original's header section, each field with its CRLF, without the blank line.

    An original without a blank line is all header section; one that starts
    with the blank line has an empty one. Lines end in CRLF as stored; a bare
    LF also ends a line here, so that a stray one cannot make the body pass
    for headers.
    """
    if original.startswith((b"\r\n", b"\n")):
        return b""
    # RFC 5322 section 2.1: the header section ends at the first empty line.
    blank = _BLANK_LINE.search(original)
    return original if blank is None else original[: blank.end(1)]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def needs_utf8(*, sender: str, recipients: Sequence[RecipientReport], original: bytes) -> bool:
    """True when a notice needs the RFC 6533 forms: a non-ASCII address or header section."""
    addresses = [sender]
    for report in recipients:
        addresses.append(report.final_recipient)
        if report.original_recipient is not None:
            addresses.append(report.original_recipient)
    if not all(a.isascii() for a in addresses):
        return True
    headers = header_section(original)
    # RFC 6532 section 3: UTF-8 in a header section; other 8-bit octets are
    # not UTF-8 and gain nothing from the global types.
    return not headers.isascii() and _is_utf8(headers)


# --- making outside text safe ---------------------------------------------------------------


def _clean(text: str, utf8: bool) -> str:
    """``text`` as one line: controls, line breaks and non-printing characters as ``?``.

    RFC 5322 section 2.2: a field body is one logical line of printable
    characters; without ``utf8`` (RFC 6532) only ASCII ones.
    """
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if c.isprintable() and (utf8 or c.isascii()) else "?" for c in text)


def _reply_lines(text: str, utf8: bool) -> list[str]:
    """A remote reply's lines, each made one clean line of single-spaced words."""
    lines = []
    # str.splitlines breaks at CR, LF, CRLF and the other line separators
    # (VT, FF, FS, GS, RS, NEL, U+2028, U+2029), so none survives in a line.
    for raw in text.splitlines():
        # Tabs become spaces, runs of spaces one space: a continuation line
        # is never only whitespace (RFC 5322 section 3.2.2).
        line = " ".join(_clean(raw.replace("\t", " "), utf8).split())
        if line:
            lines.append(line)
    return lines


def _xtext_address(address: str) -> str:
    """RFC 6533 section 3: the ASCII form of a ``utf-8`` address (utf-8-addr-xtext).

    Printable ASCII stays, except ``+``, ``=`` and ``\\``; every other character
    is ``\\x{HEX}`` with its code point in upper-case hex.
    """
    out = []
    for c in address:
        if "!" <= c <= "~" and c not in "+=\\":
            out.append(c)
        else:
            out.append(f"\\x{{{ord(c):02X}}}")
    return "".join(out)


def _address_field(address: str, utf8: bool) -> str:
    """``rfc822; ADDR``, or ``utf-8; ADDR`` for a non-ASCII address (RFC 6533 section 3)."""
    address = _clean(address, True).strip()
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {address}" if utf8 else f"utf-8; {_xtext_address(address)}"


def _original_recipient(value: str, utf8: bool) -> str:
    """The ORCPT value as received (RFC 3464 section 2.3.1), made safe."""
    value = _clean(value, True).strip()
    kind, semicolon, address = value.partition(";")
    if not semicolon:
        kind, address = "rfc822", value
    if utf8 or value.isascii():
        return f"{kind.strip()};{address}"
    # RFC 6533 section 3: without the global types, a non-ASCII address is
    # carried in the ASCII form of the utf-8 address type.
    return f"utf-8;{_xtext_address(address.strip())}"


def _host(name: str) -> str:
    """A host name for ``dns;`` fields and the Message-ID: ASCII (A-labels), one token."""
    name = name.strip()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            name = name.encode("ascii", "replace").decode("ascii")
    return "".join(c if "!" <= c <= "~" and c not in '<>()\\;",' else "?" for c in name)


def _date(when: datetime) -> str:
    """An RFC 5322 date-time; a naive datetime is taken as UTC."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return email.utils.format_datetime(when)


def _cut(line: str, limit: int) -> tuple[str, str]:
    """``line`` split so the head is at most ``limit`` octets, between characters."""
    data = line.encode("utf-8")
    end = limit
    while end > 0 and data[end] & 0xC0 == 0x80:  # not inside a UTF-8 sequence
        end -= 1
    return data[:end].decode("utf-8"), data[end:].decode("utf-8")


def _octets(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _field(name: str, values: Sequence[str]) -> list[str]:
    """``Name: value`` folded (RFC 5322 section 2.2.3), each further value on its own line.

    Values are clean, single-spaced lines. Lines break at spaces past 78
    octets; a word too long for 998 octets is cut, its rest on a
    continuation line.
    """
    out: list[str] = []
    line = f"{name}:"
    empty = True  # nothing after the colon yet: never fold there
    for value in values:
        new_value = True  # each value after the first starts a continuation line
        for word in value.split(" "):
            if not word:
                continue
            piece = " " + word
            if not empty and (new_value or _octets(line) + _octets(piece) > _SOFT_LINE):
                out.append(line)
                line = ""
            line += piece
            empty = new_value = False
            while _octets(line) > MAX_LINE:
                head, rest = _cut(line, MAX_LINE)
                out.append(head)
                line = " " + rest
    out.append(line)
    return out


# --- the parts ------------------------------------------------------------------------------

_ACTION_TEXT = {
    "failed": "delivery failed",
    "delayed": "not delivered yet, still being retried",
    "delivered": "delivered",
    "relayed": "relayed to a server that sends no delivery reports",
}

_INTRO = {
    "failure": (
        "Your message could not be delivered to one or more of its recipients. "
        "Each is listed below with the reason."
    ),
    "delay": (
        "Your message has not yet been delivered to one or more of its recipients. "
        "Nothing needs doing on your part: delivery is still being attempted, "
        "until the time given for each recipient below."
    ),
    "success": (
        "Your message was delivered, or handed on to a server that sends no "
        "delivery reports, for the recipients listed below."
    ),
}


def _wrap(text: str, indent: str = "", hang: str = "") -> list[str]:
    """``text`` as lines of at most 76 characters (so at most 304 octets)."""
    return textwrap.wrap(
        text,
        width=_TEXT_WIDTH,
        initial_indent=indent,
        subsequent_indent=indent + hang,
        break_on_hyphens=False,
    )


def _text_part(
    *,
    kind: str,
    reporting_mta: str,
    recipients: Sequence[RecipientReport],
    envelope_id: str | None,
    arrival: datetime,
    queue_id: str | None,
    returned: str,
    utf8: bool,
) -> str:
    lines = [f"This is the mail delivery system at {reporting_mta}.", ""]
    lines += _wrap(_INTRO[kind])
    lines.append("")
    if queue_id is not None:
        lines.append(f"Queue id: {_host(queue_id)}")
    lines.append(f"Arrival date: {_date(arrival)}")
    if envelope_id is not None:
        lines += _wrap(f"Envelope id: {_clean(envelope_id, utf8)}", hang="  ")
    for report in recipients:
        address = _clean(report.final_recipient, True).strip()
        if not (utf8 or address.isascii()):
            address = _xtext_address(address)
        lines.append("")
        lines += _wrap(f"<{address}>: {_ACTION_TEXT[report.action]} ({_status(report)})", hang="  ")
        if report.original_recipient is not None:
            original = _original_recipient(report.original_recipient, utf8)
            lines += _wrap(f"Originally addressed to: {original}", "    ", "  ")
        if report.remote_mta:
            lines += _wrap(f"Remote server: {_host(report.remote_mta)}", "    ", "  ")
        if report.diagnostic is not None:
            reply = _reply_lines(report.diagnostic, utf8)
            if reply:
                lines.append("    The server replied:")
                for line in reply:
                    lines += _wrap(line, "        ", "  ")
        if report.last_attempt is not None:
            lines.append(f"    Last attempt: {_date(report.last_attempt)}")
        if report.action == "delayed" and report.will_retry_until is not None:
            lines.append(f"    Will be retried until: {_date(report.will_retry_until)}")
    lines.append("")
    lines += _wrap(returned)
    return "\r\n".join(lines) + "\r\n"


def _status(report: RecipientReport) -> str:
    # RFC 3464 section 2.3.4: the status is an RFC 3463 code; one that is not
    # (it may come from a remote reply) gives way to the action's generic code.
    status = report.status.strip()
    return status if _STATUS.fullmatch(status) else _FALLBACK_STATUS[report.action]


def _status_part(
    *,
    reporting_mta: str,
    recipients: Sequence[RecipientReport],
    envelope_id: str | None,
    arrival: datetime,
    queue_id: str | None,
    utf8: bool,
) -> str:
    # RFC 3464 section 2.2: the per-message fields, in the grammar's order.
    lines: list[str] = []
    if envelope_id is not None:
        # RFC 3464 section 2.2.1: the ENVID, xtext-decoded.
        lines += _field("Original-Envelope-Id", [" ".join(_clean(envelope_id, utf8).split())])
    lines += _field("Reporting-MTA", [f"dns; {reporting_mta}"])
    lines += _field("Arrival-Date", [_date(arrival)])
    if queue_id is not None:
        lines += _field(QUEUE_ID_FIELD, [_host(queue_id)])
    for report in recipients:
        # RFC 3464 section 2.3: each recipient's group follows a blank line.
        lines.append("")
        if report.original_recipient is not None:
            # RFC 3461 section 6.3 / RFC 3464 section 2.3.1: ORCPT as given.
            lines += _field(
                "Original-Recipient", [_original_recipient(report.original_recipient, utf8)]
            )
        lines += _field("Final-Recipient", [_address_field(report.final_recipient, utf8)])
        lines += _field("Action", [report.action])
        lines += _field("Status", [_status(report)])
        remote = _host(report.remote_mta or "")
        if remote:
            lines += _field("Remote-MTA", [f"dns; {remote}"])
        if report.diagnostic is not None:
            reply = _reply_lines(report.diagnostic, utf8)
            if reply:
                # RFC 3464 section 2.3.6: "smtp" for an SMTP reply, every line
                # of a multi-line one folded into the one field; anything
                # else (a refused connection, a timeout) is ehlo's own text.
                kind = "smtp" if _SMTP_REPLY.match(reply[0]) else "X-Ehlo"
                lines += _field("Diagnostic-Code", [f"{kind}; {reply[0]}", *reply[1:]])
        if report.last_attempt is not None:
            lines += _field("Last-Attempt-Date", [_date(report.last_attempt)])
        if report.action == "delayed" and report.will_retry_until is not None:
            # RFC 3464 section 2.3.9: only for delayed recipients.
            lines += _field("Will-Retry-Until", [_date(report.will_retry_until)])
    return "\r\n".join(lines) + "\r\n"


def _part(headers: Sequence[str], body: bytes) -> bytes:
    return ("\r\n".join(headers) + "\r\n\r\n").encode("utf-8") + body


def _transfer_encoding(body: bytes) -> str:
    return "7bit" if body.isascii() else "8bit"


def build_notice(
    *,
    reporting_mta: str,
    sender: str,
    recipients: Sequence[RecipientReport],
    original: bytes,
    ret: str | None = None,
    envelope_id: str | None = None,
    arrival: datetime,
    queue_id: str | None = None,
    now: datetime | None = None,
    utf8: bool | None = None,
    max_full: int = 1_048_576,
) -> bytes:
    """The notice to ``sender`` about ``recipients`` of ``original``, as bytes with CRLF.

    ``reporting_mta``: this host's name. ``sender``: the original envelope
    sender, the notice's To (never empty: mail from ``<>`` gets no notice).
    ``original``: the message as stored, header section and body. ``ret``:
    ``"FULL"`` or ``"HDRS"`` (None: HDRS). ``envelope_id``: the ENVID,
    xtext-decoded. ``arrival``: when ehlo received the original.
    ``queue_id``: ehlo's id of the original, shown in the text part and as
    the ``X-Ehlo-Queue-Id`` per-message field. ``now``: the notice's Date
    (default: the current time). ``utf8``: use the RFC 6533 forms (None:
    when :func:`needs_utf8` says so). ``max_full``: a ``RET=FULL`` original
    larger than this is returned as its header section only.

    A notice with 8-bit content (an 8-bit original, or UTF-8 in global
    form) says ``Content-Transfer-Encoding: 8bit``; its sender needs
    8BITMIME (and SMTPUTF8 for UTF-8 addresses) from the next hop.
    """
    if not sender:
        raise ValueError("mail from the null sender gets no notice")
    kind = notice_kind(report.action for report in recipients)
    mta = _host(reporting_mta)
    if not mta:
        raise ValueError("reporting_mta must be a host name")
    if utf8 is None:
        utf8 = needs_utf8(sender=sender, recipients=recipients, original=original)
    when = now if now is not None else datetime.now(UTC)

    # RFC 3461 section 6.2: the full message for RET=FULL in a notice that
    # reports a failure, unless it is too large; otherwise only the headers.
    full = (ret or "").strip().upper() == "FULL" and kind == "failure"
    too_large = full and len(original) > max_full
    if full and not too_large:
        returned_body = original
        # RFC 6533 section 6 (message/global, RFC 6532 section 3.7).
        returned_type = "message/global" if utf8 else "message/rfc822"
        returned_text = "Your message is attached below."
        returned_what = "Returned message"
    else:
        returned_body = header_section(original)
        returned_type = "message/global-headers" if utf8 else "text/rfc822-headers"
        returned_text = "The header section of your message is attached below."
        returned_what = "Returned headers"
        if too_large:
            returned_text = (
                f"Your message is larger than the {max_full} octets returned in full, "
                "so only its header section is attached below."
            )

    text = _text_part(
        kind=kind,
        reporting_mta=mta,
        recipients=recipients,
        envelope_id=envelope_id,
        arrival=arrival,
        queue_id=queue_id,
        returned=returned_text,
        utf8=utf8,
    ).encode("utf-8")
    status = _status_part(
        reporting_mta=mta,
        recipients=recipients,
        envelope_id=envelope_id,
        arrival=arrival,
        queue_id=queue_id,
        utf8=utf8,
    ).encode("utf-8")

    charset = "us-ascii" if text.isascii() else "utf-8"
    # RFC 6533 section 6: message/global-delivery-status carries UTF-8.
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    parts = [
        _part(
            [
                f"Content-Type: text/plain; charset={charset}",
                "Content-Description: Notification",
                f"Content-Transfer-Encoding: {_transfer_encoding(text)}",
            ],
            text,
        ),
        _part(
            [
                f"Content-Type: {status_type}",
                "Content-Description: Delivery report",
                f"Content-Transfer-Encoding: {_transfer_encoding(status)}",
            ],
            status,
        ),
        # The original as it was received, byte for byte: 8-bit content is
        # declared (RFC 2046 section 5.2.1 allows 8bit for message/rfc822),
        # never re-encoded.
        _part(
            [
                f"Content-Type: {returned_type}",
                f"Content-Description: {returned_what}",
                f"Content-Transfer-Encoding: {_transfer_encoding(returned_body)}",
            ],
            returned_body,
        ),
    ]
    boundary = _boundary(parts)
    eight_bit = any(not part.isascii() for part in parts)

    header: list[str] = []
    header += _field("Date", [_date(when)])
    header += _field("From", [f"Mail Delivery System <MAILER-DAEMON@{mta}>"])
    header += _field("To", [f"<{_clean(sender, True).strip()}>"])
    header += _field("Subject", [_SUBJECTS[kind]])
    header += _field("Message-ID", [f"<{secrets.token_hex(16)}@{mta}>"])
    # RFC 3834 section 5: a notice is an automatic reply, not to be answered.
    header += _field("Auto-Submitted", ["auto-replied"])
    header += _field("MIME-Version", ["1.0"])
    # RFC 6522 section 3: multipart/report with its report-type.
    header += _field(
        "Content-Type",
        ["multipart/report; report-type=delivery-status;", f'boundary="{boundary}"'],
    )
    # RFC 2045 section 6.4: a multipart's encoding is that of its widest part.
    header += _field("Content-Transfer-Encoding", ["8bit" if eight_bit else "7bit"])

    delimiter = b"\r\n--" + boundary.encode("ascii")
    out = [("\r\n".join(header) + "\r\n").encode("utf-8")]
    out.append(b"\r\nThis is a MIME-encapsulated delivery status notification.\r\n")
    for part in parts:
        # RFC 2046 section 5.1.1: the CRLF before "--boundary" belongs to the
        # delimiter, so each part's body ends exactly where its content ends.
        out.append(delimiter + b"\r\n" + part)
    out.append(delimiter + b"--\r\n")
    return b"".join(out)


def _boundary(parts: Sequence[bytes]) -> str:
    """A boundary that occurs in no part (RFC 2046 section 5.1.1).

    "=_" cannot appear in quoted-printable text and the random part cannot be
    guessed by whoever wrote the original or a remote reply; still, each
    candidate is checked against the parts.
    """
    for _ in range(16):
        boundary = f"=_ehlo_dsn_{secrets.token_hex(12)}"
        token = boundary.encode("ascii")
        if not any(token in part for part in parts):
            return boundary
    raise RuntimeError("no boundary found that the parts do not contain")
