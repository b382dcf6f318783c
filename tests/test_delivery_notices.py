"""Delivery status notifications: every notice parsed back with Python's ``email`` package.

The module is pure, so these tests call :func:`build_notice` directly and
read what it returns twice: as ``email`` parses it (structure, content types,
the per-recipient groups of ``message/delivery-status``), and as raw bytes
(the original embedded byte for byte, no line over 998 octets, no field a
remote reply could add). The notices the scheduler sends through a real
server are tested with the scheduler.
"""

from __future__ import annotations

import email
import email.message
import email.parser
import email.policy
import email.utils
import re
from datetime import UTC, datetime, timedelta

import pytest

from ehlo.delivery.notices import (
    MAX_LINE,
    QUEUE_ID_FIELD,
    RecipientReport,
    build_notice,
    header_section,
    needs_utf8,
    notice_subject,
)

MTA = "mx1.example.com"
SENDER = "alice@example.com"
ARRIVAL = datetime(2026, 12, 7, 9, 15, 30, tzinfo=UTC)
NOW = datetime(2026, 12, 7, 13, 20, 0, tzinfo=UTC)
HEADERS = (
    b"Received: from client.example.com ([192.0.2.7])\r\n"
    b"\tby mx1.example.com (ehlo) with ESMTP id 01JDQ3V9X2M7K4PA;\r\n"
    b"\tMon, 07 Dec 2026 09:15:30 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: quarterly figures\r\n"
    b"Message-ID: <q4@example.com>\r\n"
)
BODY = b"Hello Bob,\r\n\r\nthe figures are attached.\r\n"
ORIGINAL = HEADERS + b"\r\n" + BODY

FAILED = RecipientReport(
    final_recipient="bob@example.org",
    action="failed",
    status="5.1.1",
    original_recipient="rfc822;Bob@Example.org",
    remote_mta="mx.example.org",
    diagnostic="550 5.1.1 <bob@example.org>: no such user",
    last_attempt=NOW - timedelta(minutes=1),
)
DELAYED = RecipientReport(
    final_recipient="carol@example.net",
    action="delayed",
    status="4.4.1",
    remote_mta="mx.example.net",
    diagnostic="421 4.4.1 mx.example.net: try again later",
    last_attempt=NOW - timedelta(minutes=2),
    will_retry_until=ARRIVAL + timedelta(days=5),
)

# The fields RFC 3464 section 2.3 defines for a recipient group (plus none other here).
RECIPIENT_FIELDS = {
    "original-recipient",
    "final-recipient",
    "action",
    "status",
    "remote-mta",
    "diagnostic-code",
    "last-attempt-date",
    "final-log-id",
    "will-retry-until",
}


def notice(*recipients: RecipientReport, **kwargs: object) -> bytes:
    args: dict[str, object] = {
        "reporting_mta": MTA,
        "sender": SENDER,
        "original": ORIGINAL,
        "arrival": ARRIVAL,
        "now": NOW,
        "queue_id": "01JDQ3V9X2M7K4PA",
    }
    args.update(kwargs)
    return build_notice(recipients=list(recipients), **args)  # type: ignore[arg-type]


def parse(raw: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def parts_of(raw: bytes) -> list[email.message.EmailMessage]:
    return list(parse(raw).iter_parts())


def text_of(message: email.message.EmailMessage) -> str:
    """The human-readable first part's text."""
    content = next(message.iter_parts()).get_content()
    assert isinstance(content, str)
    return content


def raw_parts(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Each part's (header section, body) exactly as written, split at the boundary."""
    boundary = parse(raw).get_boundary()
    assert boundary
    delimiter = b"\r\n--" + boundary.encode("ascii")
    pieces = raw.split(delimiter)
    assert pieces[-1] == b"--\r\n", "the close delimiter ends the notice"
    parts = []
    for piece in pieces[1:-1]:
        assert piece.startswith(b"\r\n")
        headers, blank, body = piece[2:].partition(b"\r\n\r\n")
        assert blank
        parts.append((headers, body))
    return parts


def status_groups(raw: bytes) -> list[email.message.Message]:
    """The field groups of the delivery-status part, parsed from its raw body."""
    body = raw_parts(raw)[1][1]
    assert body.endswith(b"\r\n")
    blocks = body[:-2].split(b"\r\n\r\n")
    parser = email.parser.BytesHeaderParser(policy=email.policy.default)
    groups = [parser.parsebytes(block + b"\r\n\r\n") for block in blocks]
    for group in groups:
        assert not group.defects, group.defects
    return groups


def unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value)


def check_lines(raw: bytes, skip: bytes = b"") -> None:
    """Every line of ``raw`` (outside ``skip``) ends in CRLF and is at most 998 octets."""
    if skip:
        assert raw.count(skip) == 1
        raw = raw.replace(skip, b"")
    assert raw.endswith(b"\r\n")
    for line in raw[:-2].split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line, line
        assert len(line) <= MAX_LINE, len(line)


# --- structure --------------------------------------------------------------------------------


def test_failure_notice_has_the_three_parts_and_every_field() -> None:
    raw = notice(FAILED, envelope_id="QQ314159")
    message = parse(raw)
    for part in message.walk():
        assert not part.defects, (part.get_content_type(), part.defects)
    assert message["Content-Transfer-Encoding"] == "7bit"
    assert message["From"] == f"Mail Delivery System <MAILER-DAEMON@{MTA}>"
    assert message["To"].addresses[0].addr_spec == SENDER
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert email.utils.parsedate_to_datetime(message["Date"]) == NOW
    assert re.fullmatch(rf"<[^<>@\s]+@{re.escape(MTA)}>", message["Message-ID"])
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"

    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]

    text = parts[0].get_content()
    assert "bob@example.org" in text
    assert "550 5.1.1 <bob@example.org>: no such user" in text
    assert "mx.example.org" in text
    assert "01JDQ3V9X2M7K4PA" in text

    # email's own reading of message/delivery-status: one block per group.
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list) and len(blocks) == 2
    per_message, recipient = blocks
    assert per_message["Reporting-MTA"] == f"dns; {MTA}"
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVAL
    assert per_message[QUEUE_ID_FIELD] == "01JDQ3V9X2M7K4PA"
    assert recipient["Original-Recipient"] == "rfc822;Bob@Example.org"
    assert recipient["Final-Recipient"] == "rfc822; bob@example.org"
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "5.1.1"
    assert recipient["Remote-MTA"] == "dns; mx.example.org"
    assert recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.org>: no such user"
    last = email.utils.parsedate_to_datetime(recipient["Last-Attempt-Date"])
    assert last == NOW - timedelta(minutes=1)
    assert "Will-Retry-Until" not in recipient

    # The default return is the header section, exactly.
    assert raw_parts(raw)[2][1] == HEADERS
    check_lines(raw)


@pytest.mark.parametrize(
    ("action", "status", "subject"),
    [
        ("failed", "5.1.1", "Undelivered Mail Returned to Sender"),
        ("delayed", "4.4.1", "Delayed Mail (still being retried)"),
        ("delivered", "2.0.0", "Successful Mail Delivery Report"),
        ("relayed", "2.0.0", "Successful Mail Delivery Report"),
    ],
)
def test_each_action(action: str, status: str, subject: str) -> None:
    retry_until = ARRIVAL + timedelta(days=5)
    report = RecipientReport(
        final_recipient="dave@example.org",
        action=action,
        status=status,
        remote_mta="mx.example.org",
        diagnostic=f"{status[0]}50 {status} done",
        last_attempt=NOW,
        will_retry_until=retry_until,
    )
    raw = notice(report)
    message = parse(raw)
    assert message["Subject"] == subject
    assert message.get_content_type() == "multipart/report"
    per_message, group = status_groups(raw)
    assert "Reporting-MTA" in per_message and "Action" not in per_message
    assert group["Final-Recipient"] == "rfc822; dave@example.org"
    assert group["Action"] == action
    assert group["Status"] == status
    # RFC 3464 section 2.3.9: Will-Retry-Until belongs to delayed recipients only.
    if action == "delayed":
        assert email.utils.parsedate_to_datetime(group["Will-Retry-Until"]) == retry_until
    else:
        assert "Will-Retry-Until" not in group
    text = text_of(message)
    assert "dave@example.org" in text


def test_mixed_failed_and_delayed_is_a_failure_notice() -> None:
    raw = notice(DELAYED, FAILED)
    message = parse(raw)
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    _, first, second = status_groups(raw)
    assert (first["Final-Recipient"], first["Action"], first["Status"]) == (
        "rfc822; carol@example.net",
        "delayed",
        "4.4.1",
    )
    assert "Will-Retry-Until" in first
    assert (second["Final-Recipient"], second["Action"], second["Status"]) == (
        "rfc822; bob@example.org",
        "failed",
        "5.1.1",
    )
    assert "Will-Retry-Until" not in second
    text = text_of(message)
    assert "carol@example.net" in text and "bob@example.org" in text
    assert "try again later" in text and "no such user" in text


def test_notice_subject_by_kind() -> None:
    assert notice_subject(["delivered", "failed"]) == "Undelivered Mail Returned to Sender"
    assert notice_subject(["delayed", "relayed"]) == "Delayed Mail (still being retried)"
    assert notice_subject(["relayed", "delivered"]) == "Successful Mail Delivery Report"
    with pytest.raises(ValueError):
        notice_subject(["bounced"])
    with pytest.raises(ValueError):
        notice_subject([])


def test_envid_and_orcpt_only_when_given() -> None:
    bare = RecipientReport("bob@example.org", "failed", "5.1.1")
    raw = notice(bare, queue_id=None)
    per_message, group = status_groups(raw)
    assert "Original-Envelope-Id" not in per_message
    assert QUEUE_ID_FIELD not in per_message
    assert "Original-Recipient" not in group
    assert "Remote-MTA" not in group and "Diagnostic-Code" not in group
    assert "Last-Attempt-Date" not in group

    raw = notice(FAILED, envelope_id="order-4711@shop.example")
    per_message, group = status_groups(raw)
    assert per_message["Original-Envelope-Id"] == "order-4711@shop.example"
    # The ORCPT value as received, not the address ehlo delivered to.
    assert group["Original-Recipient"] == "rfc822;Bob@Example.org"
    assert group["Final-Recipient"] == "rfc822; bob@example.org"


def test_null_sender_gets_no_notice() -> None:
    with pytest.raises(ValueError):
        notice(FAILED, sender="")


def test_naive_datetimes_are_utc() -> None:
    naive = RecipientReport(
        "carol@example.net",
        "delayed",
        "4.4.1",
        last_attempt=datetime(2026, 12, 7, 13, 0),
        will_retry_until=datetime(2026, 12, 12, 9, 15, 30),
    )
    raw = notice(naive, arrival=datetime(2026, 12, 7, 9, 15, 30), now=datetime(2026, 12, 7, 13, 1))
    assert email.utils.parsedate_to_datetime(parse(raw)["Date"]) == datetime(
        2026, 12, 7, 13, 1, tzinfo=UTC
    )
    per_message, group = status_groups(raw)
    assert per_message["Arrival-Date"] == "Mon, 07 Dec 2026 09:15:30 +0000"
    assert group["Last-Attempt-Date"] == "Mon, 07 Dec 2026 13:00:00 +0000"
    assert group["Will-Retry-Until"] == "Sat, 12 Dec 2026 09:15:30 +0000"


def test_message_ids_are_unique() -> None:
    ids = {parse(notice(FAILED))["Message-ID"] for _ in range(20)}
    assert len(ids) == 20


# --- what is returned -------------------------------------------------------------------------


@pytest.mark.parametrize("ret", [None, "HDRS"])
def test_headers_returned_by_default_and_for_hdrs(ret: str | None) -> None:
    raw = notice(FAILED, ret=ret)
    parts = list(parse(raw).iter_parts())
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert raw_parts(raw)[2][1] == HEADERS
    assert BODY not in raw


@pytest.mark.parametrize("ret", ["FULL", "full"])
def test_ret_full_returns_the_whole_message_byte_exact(ret: str) -> None:
    raw = notice(FAILED, ret=ret)
    parts = list(parse(raw).iter_parts())
    assert parts[2].get_content_type() == "message/rfc822"
    returned = parts[2].get_payload()[0]
    assert returned["Subject"] == "quarterly figures"
    assert raw_parts(raw)[2][1] == ORIGINAL


def test_ret_full_in_a_delay_or_success_notice_returns_headers_only() -> None:
    # RFC 3461 section 6.2: the full message only with a failure.
    for report in (DELAYED, RecipientReport("bob@example.org", "delivered", "2.0.0")):
        raw = notice(report, ret="FULL")
        assert parts_of(raw)[2].get_content_type() == "text/rfc822-headers"
        assert raw_parts(raw)[2][1] == HEADERS


def test_ret_full_over_the_cap_returns_headers_and_says_so() -> None:
    big = HEADERS + b"\r\n" + b"x" * 70 + b"\r\n" + b"y" * 70 * 200 + b"\r\n"
    raw = notice(FAILED, ret="FULL", original=big, max_full=len(big) - 1)
    parts = list(parse(raw).iter_parts())
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert raw_parts(raw)[2][1] == HEADERS
    assert b"y" * 70 not in raw
    text = parts[0].get_content()
    assert str(len(big) - 1) in text and "header section" in text

    raw = notice(FAILED, ret="FULL", original=big, max_full=len(big))
    assert raw_parts(raw)[2][1] == big


def test_eight_bit_original_is_kept_byte_exact() -> None:
    # Latin-1 and raw high octets, not UTF-8: nothing may decode or re-encode them.
    body = b"Gr\xfc\xdfe aus K\xf6ln\r\n" + bytes(range(0x80, 0x100)) + b"\r\n"
    original = HEADERS + b"X-Note: caf\xe9\r\n\r\n" + body
    raw = notice(FAILED, ret="FULL", original=original)
    headers, content = raw_parts(raw)[2]
    assert content == original
    assert b"Content-Type: message/rfc822" in headers
    assert b"Content-Transfer-Encoding: 8bit" in headers
    assert parse(raw)["Content-Transfer-Encoding"] == "8bit"
    # Not UTF-8, so not the global types.
    assert b"message/delivery-status" in raw_parts(raw)[1][0]

    raw = notice(FAILED, original=original)
    assert raw_parts(raw)[2][1] == HEADERS + b"X-Note: caf\xe9\r\n"


def test_original_without_a_blank_line_is_all_headers() -> None:
    original = b"From: a@example.com\r\nSubject: no body"
    assert header_section(original) == original
    raw = notice(FAILED, original=original)
    assert raw_parts(raw)[2][1] == original
    assert header_section(b"\r\nonly a body\r\n") == b""
    # A stray bare LF still ends the header section: the body is not returned.
    assert header_section(b"Subject: x\r\nX-A: 1\n\nbody\r\n") == b"Subject: x\r\nX-A: 1\n"
    assert header_section(b"Subject: x\r\n\nbody\r\n") == b"Subject: x\r\n"
    assert header_section(b"\nbody\r\n") == b""
    raw = notice(FAILED, original=b"\r\nonly a body\r\n")
    assert raw_parts(raw)[2][1] == b""
    assert b"only a body" not in raw


# --- internationalized notices (RFC 6533) -----------------------------------------------------


def test_utf8_recipient_uses_the_global_types() -> None:
    report = RecipientReport(
        final_recipient="jörg@bücher.example",
        action="failed",
        status="5.1.1",
        original_recipient="utf-8;jörg@bücher.example",
        remote_mta="mx.xn--bcher-kva.example",
        diagnostic="550 5.1.1 unknown user jörg",
    )
    original = "From: Zoë <zoe@example.com>\r\nSubject: Grüße\r\n\r\nHallo\r\n".encode()
    assert needs_utf8(sender=SENDER, recipients=[report], original=ORIGINAL)
    raw = notice(report, ret="FULL", original=original)
    message = parse(raw)
    assert [p.get_content_type() for p in message.iter_parts()] == [
        "text/plain",
        "message/global-delivery-status",
        "message/global",
    ]
    _, group = status_groups(raw)
    assert group["Final-Recipient"] == "utf-8; jörg@bücher.example"
    assert group["Original-Recipient"] == "utf-8;jörg@bücher.example"
    assert group["Diagnostic-Code"] == "smtp; 550 5.1.1 unknown user jörg"
    assert raw_parts(raw)[2][1] == original
    assert "jörg@bücher.example" in text_of(message)

    raw = notice(report, original=original)
    parts = raw_parts(raw)
    assert b"Content-Type: message/global-headers" in parts[2][0]
    assert parts[2][1] == header_section(original)
    check_lines(raw)


def test_utf8_sender_or_headers_choose_the_global_types() -> None:
    ascii_report = RecipientReport("bob@example.org", "failed", "5.1.1")
    raw = notice(ascii_report, sender="zoë@example.com")
    # email reads 8-bit header bytes as escapes; the header section is UTF-8 text.
    header = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    assert header["To"].addresses[0].addr_spec == "zoë@example.com"
    assert "To: <zoë@example.com>\r\n".encode() in raw
    assert b"message/global-delivery-status" in raw_parts(raw)[1][0]
    raw = notice(ascii_report, original="Subject: Grüße\r\n\r\nx\r\n".encode())
    assert b"message/global-headers" in raw_parts(raw)[2][0]
    raw = notice(ascii_report)
    assert raw.isascii()
    assert b"message/delivery-status" in raw_parts(raw)[1][0]
    # SMTPUTF8 said so: the global types even for ASCII content.
    raw = notice(ascii_report, utf8=True)
    assert b"message/global-delivery-status" in raw_parts(raw)[1][0]


def test_utf8_address_in_an_ascii_notice_is_escaped() -> None:
    report = RecipientReport(
        "jörg+tag@bücher.example",
        "failed",
        "5.1.1",
        original_recipient="rfc822;jörg@bücher.example",
        diagnostic="550 5.1.1 kein Empfänger",
    )
    raw = notice(report, utf8=False)
    assert raw.isascii()
    assert b"message/delivery-status" in raw_parts(raw)[1][0]
    _, group = status_groups(raw)
    # RFC 6533 section 3: utf-8-addr-xtext, "+" escaped too.
    assert group["Final-Recipient"] == r"utf-8; j\x{F6}rg\x{2B}tag@b\x{FC}cher.example"
    assert group["Original-Recipient"] == r"utf-8;j\x{F6}rg@b\x{FC}cher.example"
    assert group["Diagnostic-Code"] == "smtp; 550 5.1.1 kein Empf?nger"


# --- safety -------------------------------------------------------------------------------------

EVIL = (
    "550-5.1.1 first line\r\n"
    "X-Injected: one\r\n"
    "\r\n"
    "550-5.1.1 after a blank line\n"
    "Final-Recipient: rfc822; mallory@example.net\r"
    "X-Injected: two\x00\x07\x1b[31m\x7f\x85"
    "X-Injected: three\u2028X-Injected: four\x0bX-Injected: five\x0c"
    "550 5.1.1 \tlast\x1c line\x9b\udcff"
)


def test_malicious_diagnostic_adds_no_field() -> None:
    report = RecipientReport(
        final_recipient="bob@example.org",
        action="failed",
        status="5.1.1",
        remote_mta="mx.example.org\r\nX-Injected: host",
        diagnostic=EVIL,
    )
    raw = notice(report, envelope_id="id\r\nX-Injected: envid")
    message = parse(raw)
    assert "X-Injected" not in message
    for part in message.iter_parts():
        assert "X-Injected" not in part
    per_message, group = status_groups(raw)
    assert "X-Injected" not in per_message
    assert {k.lower() for k in group} <= RECIPIENT_FIELDS
    assert group.get_all("Final-Recipient") == ["rfc822; bob@example.org"]
    diagnostic = unfold(str(group["Diagnostic-Code"]))
    assert diagnostic.startswith("smtp; 550-5.1.1 first line X-Injected: one 550-5.1.1 after")
    # A lone surrogate (text decoded with surrogateescape) is no character either.
    assert diagnostic.endswith(" 550 5.1.1 last line??")
    assert re.search(r"[\x00-\x1f\x7f-\x9f\u2028]", diagnostic) is None
    # The folded field: the reply's lines on continuation lines, nothing else.
    body = raw_parts(raw)[1][1]
    start = body.index(b"Diagnostic-Code:")
    field = body[start:]
    lines = field.split(b"\r\n")
    continuation = [line for line in lines[1:] if line[:1] == b" "]
    assert len(continuation) >= 4
    assert group["Remote-MTA"] == "dns; mx.example.org??X-Injected:?host"
    assert per_message["Original-Envelope-Id"] == "id??X-Injected: envid"
    check_lines(raw)


def test_malicious_addresses_add_no_field() -> None:
    report = RecipientReport(
        final_recipient="bob@example.org\r\nBcc: victim@example.net",
        action="failed",
        status="5.1.1",
        original_recipient="rfc822;bob@example.org\nX-Injected: orcpt",
    )
    raw = notice(
        report,
        sender="alice@example.com>\r\nBcc: victim@example.net",
        reporting_mta="mx1.example.com\r\nX-Injected: mta",
    )
    message = parse(raw)
    assert "Bcc" not in message and "X-Injected" not in message
    per_message, group = status_groups(raw)
    assert "Bcc" not in group and "X-Injected" not in group and "X-Injected" not in per_message
    assert group["Final-Recipient"] == "rfc822; bob@example.org??Bcc: victim@example.net"
    assert "?X-Injected: orcpt" in group["Original-Recipient"]
    check_lines(raw)


def test_multi_line_reply_is_one_folded_field() -> None:
    reply = "\n".join(
        [
            "550-5.7.1 The message was rejected because it failed the sender checks",
            "550-5.7.1 of the receiving domain; please read the policy at",
            "550 5.7.1 https://postmaster.example.org/policy for details.",
        ]
    )
    report = RecipientReport("bob@example.org", "failed", "5.7.1", diagnostic=reply)
    raw = notice(report)
    _, group = status_groups(raw)
    assert len(group.get_all("Diagnostic-Code")) == 1
    assert unfold(str(group["Diagnostic-Code"])) == "smtp; " + reply.replace("\n", " ")
    body = raw_parts(raw)[1][1]
    field = body[body.index(b"Diagnostic-Code:") :].split(b"\r\n")
    # Each reply line starts a continuation line.
    for line in reply.split("\n")[1:]:
        assert any(f.startswith(b" " + line[:9].encode()) for f in field)
    for line in field:
        assert len(line) <= 78 or b" " not in line.strip()


def test_no_line_over_998_octets() -> None:
    word = "x" * 5000
    wide = "é" * 3000  # 6,000 octets of UTF-8, cut between characters
    report = RecipientReport(
        final_recipient="bob@example.org",
        action="failed",
        status="5.1.1",
        remote_mta="mx." + "a" * 1500 + ".example",
        diagnostic=f"550 5.1.1 {word}\n550 5.1.1 {wide} and " + "more words " * 300,
    )
    for utf8 in (False, True):
        raw = notice(report, envelope_id="e" * 2000, utf8=utf8)
        check_lines(raw)
        message = parse(raw)
        assert message.get_content_type() == "multipart/report"
        _, group = status_groups(raw)
        diagnostic = unfold(str(group["Diagnostic-Code"]))
        # The long word is cut, not lost: only folding spaces were added.
        assert diagnostic.replace(" ", "").startswith("smtp;5505.1.1" + word)
        if utf8:
            assert wide in diagnostic.replace(" ", "")
        text = text_of(message)
        assert text.count("x") >= 5000


def test_an_unknown_status_gives_way_to_the_action_code() -> None:
    report = RecipientReport("bob@example.org", "failed", "5.1.1\r\nX-Injected: status")
    _, group = status_groups(notice(report))
    assert group["Status"] == "5.0.0"
    report = RecipientReport("bob@example.org", "delayed", "4.4.1000")
    _, group = status_groups(notice(report))
    assert group["Status"] == "4.0.0"


def test_a_diagnostic_that_is_no_smtp_reply_has_ehlo_type() -> None:
    report = RecipientReport(
        "bob@example.org",
        "delayed",
        "4.4.1",
        remote_mta="mx.example.org",
        diagnostic="connect to mx.example.org[192.0.2.25]:25: Connection refused",
    )
    _, group = status_groups(notice(report))
    assert group["Diagnostic-Code"] == (
        "X-Ehlo; connect to mx.example.org[192.0.2.25]:25: Connection refused"
    )


def test_boundary_does_not_occur_in_the_parts() -> None:
    raw = notice(FAILED, ret="FULL")
    boundary = parse(raw).get_boundary()
    assert boundary
    assert raw.count(b"--" + boundary.encode()) == 4  # three parts and the close
    assert boundary.encode() not in ORIGINAL


@pytest.mark.parametrize("utf8", [None, True, False])
def test_lone_surrogates_anywhere_become_question_marks(utf8: bool | None) -> None:
    # Text decoded with surrogateescape carries lone surrogates: never encodable.
    odd = "\udcff\ud800"
    report = RecipientReport(
        final_recipient=f"bob{odd}@example.org",
        action="failed",
        status="5.1.1",
        original_recipient=f"rfc822;bob{odd}@example.org",
        remote_mta=f"mx{odd}.example.org",
        diagnostic=f"550 5.1.1 {odd}",
    )
    raw = notice(
        report,
        sender=f"alice{odd}@example.com",
        reporting_mta=f"mx1{odd}.example.com",
        envelope_id=f"id{odd}",
        queue_id=f"01JDQ{odd}",
        utf8=utf8,
    )
    assert b"To: <alice??@example.com>\r\n" in raw
    _, group = status_groups(raw)
    assert group["Final-Recipient"] == "rfc822; bob??@example.org"
    assert group["Diagnostic-Code"] == "smtp; 550 5.1.1 ??"
    check_lines(raw)
