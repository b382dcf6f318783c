"""``ehlo.client.compose``: the message ``ehlo send`` builds, as a library call.

Checked on the composed octets, parsed back with the ``email`` package:
long headers folded at 78 octets (RFC 5322 sections 2.1.1 and 2.2.3),
non-ASCII subjects and display names as encoded words (RFC 2047), UTF-8
addresses left as UTF-8 with SMTPUTF8 declared (RFC 6532), attachments in
base64 with the declared size exact, bodies from text, files and pipes, and
the errors for a bad header, a missing file and an over-long body line.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import os
import threading
from email.headerregistry import Address
from pathlib import Path

import pytest

from ehlo.client import MessageNotSupported
from ehlo.client.compose import (
    DEFAULT_BODY,
    ComposedMessage,
    ComposeError,
    UnreadableFile,
    compose_message,
)


def octets(message: ComposedMessage) -> bytes:
    return b"".join(message.chunks())


def header_lines(data: bytes) -> list[bytes]:
    return data[: data.index(b"\r\n\r\n")].split(b"\r\n")


def parse(data: bytes) -> email.message.EmailMessage:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def test_many_recipients_fold_between_addresses() -> None:
    rcpts = [f"recipient-{i:02d}@example.net" for i in range(60)]
    with compose_message(sender="a@example.org", to=rcpts, cc=rcpts[:30]) as message:
        data = octets(message)
    lines = header_lines(data)
    assert all(len(line) <= 78 for line in lines), max(lines, key=len)
    assert sum(1 for line in lines if line.startswith(b" ")) > 20  # continuation lines
    parsed = parse(data)
    assert [a.addr_spec for a in parsed["To"].addresses] == rcpts
    assert [a.addr_spec for a in parsed["Cc"].addresses] == rcpts[:30]
    assert data.isascii() and not message.smtputf8
    assert message.size == len(data)


def test_non_ascii_subject_and_display_names_are_encoded_words() -> None:
    subject = "Grüße aus Köln, " * 8 + "und ein langer Betreff"
    with compose_message(
        sender="a@example.org",
        to=[Address("Jörg Müller", addr_spec="joerg@example.net"), "b@example.net"],
        cc=[Address("Zoë, Ltd.", addr_spec="zoe@example.net")],
        subject=subject,
    ) as message:
        data = octets(message)
    assert data.isascii() and not message.smtputf8 and not message.eight_bit
    lines = header_lines(data)
    assert all(len(line) <= 78 for line in lines), max(lines, key=len)
    assert any(line.startswith(b"Subject: =?utf-8?") for line in lines)
    parsed = parse(data)
    assert parsed["Subject"] == subject
    first, second = parsed["To"].addresses
    assert (first.display_name, first.addr_spec) == ("Jörg Müller", "joerg@example.net")
    assert second.addr_spec == "b@example.net"
    [cc] = parsed["Cc"].addresses
    assert (cc.display_name, cc.addr_spec) == ("Zoë, Ltd.", "zoe@example.net")


def test_utf8_addresses_stay_utf8_and_ask_for_smtputf8() -> None:
    rcpts = [f"zoë-{i:02d}@example.net" for i in range(40)]
    with compose_message(sender="jörg@example.org", to=rcpts) as message:
        data = octets(message)
    assert message.smtputf8 and message.eight_bit  # RFC 6531 and 8BITMIME for the header
    assert "From: <jörg@example.org>\r\n".encode() in data
    assert "To: <zoë-00@example.net>, ".encode() in data  # UTF-8, not encoded words
    lines = header_lines(data)
    # Folded between addresses under SMTPUTF8 too (RFC 6532 keeps RFC 5322's limits).
    assert all(len(line.decode()) <= 78 for line in lines), max(lines, key=len)
    parsed = email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
    assert [a.addr_spec for a in parsed["To"].addresses] == rcpts


def test_defaults_and_headers_given() -> None:
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    long_value = " ".join(f"word{i}" for i in range(60))
    with compose_message(
        sender="",
        to=["postmaster"],
        date=when,
        message_id="<fixed@example.org>",
        headers=[
            ("X-Test", "yes"),
            ("Subject", "replaced"),
            ("X-Long", long_value),
            ("Reply-To", "nonsense without an address"),
        ],
    ) as message:
        data = octets(message)
    lines = header_lines(data)
    assert lines[:3] == [
        b"Date: Fri, 02 Jan 2026 03:04:05 +0000",
        b"From: <MAILER-DAEMON@localhost>",
        b"To: postmaster",
    ]
    assert b"Subject: replaced" in lines  # in the default's place, not appended
    assert lines.index(b"Subject: replaced") < lines.index(b"Message-ID: <fixed@example.org>")
    assert all(len(line) <= 78 for line in lines), max(lines, key=len)
    parsed = parse(data)
    assert parsed["X-Long"] == long_value and parsed["X-Test"] == "yes"
    assert b"Reply-To: nonsense without an address" in lines  # kept as given, not dropped
    assert parsed.get_content() == DEFAULT_BODY.decode()
    with compose_message(sender="a@example.org", to=["b@example.net"]) as message:
        parsed = parse(octets(message))
    assert parsed["Subject"].startswith("test ")
    assert parsed["Message-ID"].endswith("@example.org>") and parsed["Date"].datetime


def test_attachments_streamed_in_base64_with_the_size_declared(tmp_path: Path) -> None:
    blob = tmp_path / "données.bin"
    blob.write_bytes(os.urandom(200_000))
    text = tmp_path / "notes.txt"
    text.write_bytes(b"plain\r\n")
    body = "Grüße\nzwei Zeilen\n"
    with compose_message(
        sender="a@example.org", to=["b@example.net"], body=body, attachments=[blob, str(text)]
    ) as message:
        data = octets(message)
        again = octets(message)  # each delivery attempt reads it again
    assert data == again
    assert message.eight_bit and not message.smtputf8
    # The bare LFs of the body become CRLF on the wire: one octet each.
    assert message.size == len(data) + body.count("\n")
    parsed = parse(data)
    assert parsed.get_content_type() == "multipart/mixed"
    part, first, second = parsed.iter_parts()
    assert part.get_content() == body and part.get_content_charset() == "utf-8"
    assert first.get_filename() == "données.bin"
    assert first.get_content() == blob.read_bytes()
    assert second.get_filename() == "notes.txt" and second.get_content_type() == "text/plain"
    encoded = data[data.index(b"Content-Transfer-Encoding: base64") :]
    assert max(len(line) for line in encoded.split(b"\r\n")) <= 76  # RFC 2045 section 6.8


def test_body_from_a_file_and_from_a_pipe(tmp_path: Path) -> None:
    path = tmp_path / "body.txt"
    path.write_bytes(b"from a file\r\n")
    with compose_message(sender="a@example.org", to=["b@example.net"], body_file=path) as m:
        assert octets(m).endswith(b"\r\n\r\nfrom a file\r\n")
    assert m.body.closed  # the file it opened is closed with it
    read_fd, write_fd = os.pipe()
    payload = b"line\n" * 300_000  # larger than the pipe buffer and the 1 MiB spool

    def feed() -> None:
        with os.fdopen(write_fd, "wb") as w:
            w.write(payload)

    writer = threading.Thread(target=feed)
    writer.start()
    with os.fdopen(read_fd, "rb") as stream:
        with compose_message(sender="a@example.org", to=["b@example.net"], body_file=stream) as m:
            first, second = octets(m), octets(m)
        writer.join(timeout=30)
        assert not stream.closed  # the caller's stream stays the caller's
    assert first == second and first.endswith(payload)


def test_errors() -> None:
    with pytest.raises(ComposeError, match="field name"):
        compose_message(sender="a@example.org", to=["b@example.net"], headers=[("Bad Name", "x")])
    with pytest.raises(ComposeError, match="one line"):
        compose_message(sender="a@example.org", to=["b@example.net"], headers=[("X", "a\nb")])
    with pytest.raises(UnreadableFile) as info:
        compose_message(sender="a@example.org", to=["b@example.net"], body_file="/nonexistent")
    assert (info.value.role, info.value.name) == ("body", "/nonexistent")
    with pytest.raises(UnreadableFile) as info:
        compose_message(sender="a@example.org", to=["b@example.net"], attachments=["/nope"])
    assert info.value.role == "attachment"
    with pytest.raises(MessageNotSupported, match="998"):
        compose_message(sender="a@example.org", to=["b@example.net"], body="x" * 999 + "\n")
    with pytest.raises(ComposeError, match="not both"):
        compose_message(sender="a@example.org", to=["b@example.net"], body="x", body_file="y")


@pytest.mark.parametrize(
    "value",
    [
        "[\t]04_é/9 =€a8\t2x,1=?:2_54é?;@zü-é1-0€3\t<0x.,\tz>)/;.\\_>",
        '49"[x":-)-\\\\?1€@1;>€/é]"2./[(=[2yc/851=]b;5 "8x@2)_3@:3":xz-[ü_@üé b]6zé9',
    ],
)
def test_a_header_the_parser_fails_on_is_kept(value: str) -> None:
    # The email package raises on these address lists; the value is kept as text.
    message = compose_message(sender="a@example.org", to=["b@example.net"], headers=[("Cc", value)])
    with message:
        data = octets(message)
    lines = header_lines(data)
    assert all(len(line) <= 998 for line in lines)
    unfolded = email.message_from_string(data.decode(), policy=email.policy.compat32)["Cc"]
    assert " ".join(unfolded.split()) == " ".join(value.split())
