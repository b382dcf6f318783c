"""Composing a message to send: headers built by ``email``, a body streamed after them.

This module owns building the message ``ehlo send`` sends, as a library call:
:func:`compose_message` takes the sender, the recipients, a subject, extra
headers, a body (text, a file path or a stream such as stdin) and attachments,
and returns a :class:`ComposedMessage` that streams the message again for each
delivery attempt, with the facts MAIL declares (size, 8-bit, SMTPUTF8).

The header section is built with the ``email`` package under
``email.policy.SMTP``, so a long header (60 recipients in ``To:``) is folded
(RFC 5322 section 2.2.3) and non-ASCII text in a subject or a display name is
written as encoded words (RFC 2047). The body and the attachments are never
read whole into memory: a body file is read in chunks (stdin is spooled, to
disk past 1 MiB, so it can be read twice), attachments are encoded in base64
as they are read.
"""

from __future__ import annotations

import binascii
import dataclasses
import datetime as dt
import email.headerregistry
import email.policy
import email.utils
import mimetypes
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

from ._body import MAX_TEXT_LINE, scan_chunks
from ._errors import MessageNotSupported

__all__ = [
    "DEFAULT_BODY",
    "Attachment",
    "ComposeError",
    "ComposedMessage",
    "UnreadableFile",
    "compose_message",
]

DEFAULT_BODY = b"This is a test message sent by ehlo send.\r\n"
_CHUNK = 1 << 20
# base64 lines of 76 characters (RFC 2045 section 6.8) from 57 octets each.
_B64_LINE_OCTETS = 57
_B64_READ = _B64_LINE_OCTETS * 1024
# Every name to an unstructured header: for values the registry cannot parse.
_UNSTRUCTURED = email.headerregistry.HeaderRegistry(use_default_map=False)


class ComposeError(ValueError):
    """What was given cannot make a message (a bad header name or value)."""


class UnreadableFile(ComposeError):
    """A body or attachment file that cannot be opened."""

    def __init__(self, role: str, name: str, reason: str) -> None:
        super().__init__(f"{role} {name}: {reason}")
        self.role = role  # "body" or "attachment"
        self.name = name  # the path as given
        self.reason = reason


@dataclasses.dataclass
class Attachment:
    """A file attached in base64, read as the message is sent."""

    path: Path
    size: int
    content_type: str


@dataclasses.dataclass
class ComposedMessage:
    """The composed message, streamed again for each delivery attempt.

    ``size`` (for MAIL SIZE=), ``eight_bit`` and ``smtputf8`` are what MAIL
    declares. Close it (or use ``with``) to close the body file it opened.
    """

    head: bytes
    body: IO[bytes]
    body_start: int
    attachments: list[Attachment]
    boundary: str
    size: int
    eight_bit: bool
    smtputf8: bool
    owns_body: bool = True

    def chunks(self) -> Iterator[bytes]:
        """The whole message, in chunks; the body and attachments read as they go."""
        self.body.seek(self.body_start)
        yield self.head
        if self.attachments:
            yield self._part_head("text/plain; charset=" + self._charset(), self._cte())
        while chunk := self.body.read(_CHUNK):
            yield chunk
        if not self.attachments:
            return
        yield b"\r\n"
        for attachment in self.attachments:
            yield self._attachment_head(attachment)
            with attachment.path.open("rb") as f:
                while data := f.read(_B64_READ):
                    yield _base64_lines(data)
            yield b"\r\n"
        yield f"--{self.boundary}--\r\n".encode("ascii")

    def close(self) -> None:
        """Close the body file, when this message opened it."""
        if self.owns_body:
            self.body.close()

    def __enter__(self) -> ComposedMessage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _charset(self) -> str:
        return "utf-8" if self.eight_bit else "us-ascii"

    def _cte(self) -> str:
        return "8bit" if self.eight_bit else "7bit"

    def _part_head(self, content_type: str, cte: str, extra: str = "") -> bytes:
        return (
            f"--{self.boundary}\r\nContent-Type: {content_type}\r\n"
            f"Content-Transfer-Encoding: {cte}\r\n{extra}\r\n"
        ).encode()

    def _attachment_head(self, attachment: Attachment) -> bytes:
        name = attachment.path.name
        if name.isascii() and '"' not in name and "\\" not in name:
            disposition = f'attachment; filename="{name}"'
        else:
            # RFC 2231 section 4: non-ASCII parameter values.
            disposition = "attachment; filename*=" + email.utils.encode_rfc2231(name, "utf-8")
        return self._part_head(
            attachment.content_type, "base64", f"Content-Disposition: {disposition}\r\n"
        )


def _base64_lines(data: bytes) -> bytes:
    """Base64 in lines of 76 characters, each ending with CRLF (RFC 2045 section 6.8)."""
    return b"".join(
        binascii.b2a_base64(data[i : i + _B64_LINE_OCTETS], newline=False) + b"\r\n"
        for i in range(0, len(data), _B64_LINE_OCTETS)
    )


def _base64_size(n: int) -> int:
    encoded = 4 * ((n + 2) // 3)
    lines = (n + _B64_LINE_OCTETS - 1) // _B64_LINE_OCTETS
    return encoded + 2 * lines


def _spool() -> IO[bytes]:
    """A file in memory up to 1 MiB, on disk beyond: the body can be read twice."""
    return tempfile.SpooledTemporaryFile(max_size=_CHUNK)


def _spooled(stream: IO[bytes]) -> IO[bytes]:
    spool = _spool()
    while chunk := stream.read(_CHUNK):
        spool.write(chunk)
    spool.seek(0)
    return spool


def _open_body(
    body: str | bytes | None, body_file: str | os.PathLike[str] | IO[bytes] | None
) -> tuple[IO[bytes], bool]:
    """The body as a seekable binary file, and whether it is ours to close."""
    if body is not None and body_file is not None:
        raise ComposeError("give the body as text or as a file, not both")
    if body_file is None:
        spool = _spool()
        spool.write(body.encode("utf-8") if isinstance(body, str) else (body or DEFAULT_BODY))
        spool.seek(0)
        return spool, True
    if not isinstance(body_file, str | os.PathLike):
        # A stream (stdin): spooled (to disk past 1 MiB) so it can be scanned and sent again.
        return (body_file, False) if _seekable(body_file) else (_spooled(body_file), True)
    try:
        f = open(body_file, "rb")  # noqa: SIM115 - closed by ComposedMessage.close
    except OSError as exc:
        raise UnreadableFile("body", os.fsdecode(body_file), exc.strerror or str(exc)) from None
    if not f.seekable():  # a pipe: spool it like stdin
        with f:
            return _spooled(f), True
    return f, True


def _seekable(stream: IO[bytes]) -> bool:
    try:
        return stream.seekable()
    except (OSError, ValueError):
        return False


def _attachment(name: str | os.PathLike[str]) -> Attachment:
    path = Path(name)
    try:
        size = path.stat().st_size
        with path.open("rb"):
            pass
    except OSError as exc:
        raise UnreadableFile("attachment", os.fsdecode(name), exc.strerror or str(exc)) from None
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return Attachment(path, size, content_type)


def _check_header(name: str, value: str) -> None:
    # RFC 5322 section 2.2: field-name = 1*(%d33-57 / %d59-126)
    if not name or any(not 33 <= ord(c) <= 126 or c == ":" for c in name):
        raise ComposeError(f"not a header field name: {name!r}")
    if any(c in value for c in "\r\n\0"):
        raise ComposeError(f"the value of {name} must be one line")


def _mailbox(address: str | email.headerregistry.Address) -> str:
    """A mailbox for From/To/Cc: ``<addr>``, ``Name <addr>``, or a bare local name."""
    if isinstance(address, email.headerregistry.Address):
        # Quoted when it must be; non-ASCII becomes encoded words when folded.
        return str(address) if address.display_name else f"<{address.addr_spec}>"
    return f"<{address}>" if "@" in address else address


def _fold(name: str, value: str, *, utf8: bool, structured: bool) -> str:
    """One header field, folded at 78 (RFC 5322 section 2.1.1) by ``email``.

    Non-ASCII text becomes encoded words (RFC 2047) unless ``utf8`` (SMTPUTF8,
    RFC 6532). A ``structured`` value goes through the header registry (an
    address list folds between addresses); one the registry cannot parse
    without defects (a free-form Date, a bare local part), or fails on, is
    folded as unstructured text instead, so nothing given is lost.
    """
    policy = email.policy.SMTPUTF8 if utf8 else email.policy.SMTP
    if structured:
        try:
            header = policy.header_factory(name, value)
            if not header.defects:
                return str(header.fold(policy=policy))
        except Exception:  # the parser fails on some malformed values
            pass
    try:
        return str(_UNSTRUCTURED(name, value).fold(policy=policy))
    except Exception:  # as given, unfolded, rather than no message at all
        return f"{name}: {value}\r\n"


def _default_subject() -> str:
    now = dt.datetime.now(dt.UTC).astimezone()
    return "test " + now.strftime("%a, %d %b %Y %H:%M:%S %z")


def compose_message(
    *,
    sender: str,
    to: Sequence[str | email.headerregistry.Address],
    cc: Sequence[str | email.headerregistry.Address] = (),
    subject: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: str | bytes | None = None,
    body_file: str | os.PathLike[str] | IO[bytes] | None = None,
    attachments: Iterable[str | os.PathLike[str]] = (),
    date: dt.datetime | None = None,
    message_id: str | None = None,
) -> ComposedMessage:
    """Compose a message; the body and attachments are read when it is sent.

    ``sender`` is the From address ('' for the null sender: From names
    MAILER-DAEMON). ``to`` and ``cc`` are addresses (or ``Address`` objects
    with a display name). ``subject`` defaults to "test DATE"; ``date`` to
    now; ``message_id`` to a random one at the sender's domain. ``headers``
    are added in order, each replacing a default header of the same name.
    The body is ``body`` (text or bytes), or ``body_file`` (a path, or a
    binary stream such as ``sys.stdin.buffer``), or a short default text.

    Raises :class:`ComposeError` for a bad header, :class:`UnreadableFile`
    for a file that cannot be opened, :class:`MessageNotSupported` for a body
    line over 998 octets.
    """
    extra = []
    for name, value in headers:
        name, value = name.strip(), value.strip()
        _check_header(name, value)
        extra.append((name, value))
    stream, owned = _open_body(body, body_file)
    try:
        attached = [_attachment(name) for name in attachments]
        start = stream.tell()
        scan = scan_chunks(iter(lambda: stream.read(_CHUNK), b""))
        stream.seek(start)
        if scan.longest_line > MAX_TEXT_LINE:
            # RFC 5321 section 4.5.3.1.6: text lines are at most 998 octets + CRLF.
            raise MessageNotSupported(
                f"the body has a line of {scan.longest_line} octets; SMTP allows 998"
                " (wrap it, or send the file with --attach)"
            )
    except BaseException:
        if owned:
            stream.close()
        raise
    eight_bit = scan.eight_bit
    domain = sender.rpartition("@")[2] if "@" in sender else "localhost"
    fields: dict[str, tuple[str, str, bool, bool]] = {}

    def put(name: str, value: str, *, utf8: bool = False, structured: bool = False) -> None:
        fields[name.lower()] = (name, value, utf8, structured)

    when = email.utils.format_datetime(date) if date is not None else None
    put("Date", when or email.utils.formatdate(localtime=True))
    sender_box = f"<{sender}>" if sender else f"<MAILER-DAEMON@{domain}>"
    put("From", sender_box, utf8=not sender.isascii(), structured=True)
    to_text = ", ".join(_mailbox(r) for r in to)
    put("To", to_text, utf8=not _addresses_ascii(to), structured=True)
    if cc:
        cc_text = ", ".join(_mailbox(r) for r in cc)
        put("Cc", cc_text, utf8=not _addresses_ascii(cc), structured=True)
    put("Subject", subject if subject is not None else _default_subject())
    if message_id is None:
        message_id = f"<{uuid.uuid4().hex}@{domain if domain.isascii() else 'ehlo.invalid'}>"
    put("Message-ID", message_id)
    put("MIME-Version", "1.0")
    boundary = f"=_ehlo_{uuid.uuid4().hex}"
    if attached:
        put("Content-Type", f'multipart/mixed; boundary="{boundary}"')
    else:
        put("Content-Type", f"text/plain; charset={'utf-8' if eight_bit else 'us-ascii'}")
        put("Content-Transfer-Encoding", "8bit" if eight_bit else "7bit")
    for name, value in extra:
        # replaces a default header of the same name; UTF-8 text stays UTF-8 (RFC 6532)
        put(name, value, utf8=not value.isascii(), structured=True)
    head = "".join(_fold(n, v, utf8=u, structured=st) for n, v, u, st in fields.values())
    head += "\r\n"
    if attached:
        head += "This is a multi-part message in MIME format.\r\n\r\n"
    head_bytes = head.encode("utf-8")
    utf8_headers = not head_bytes.isascii()
    addresses = [sender, *(_addr_spec(r) for r in (*to, *cc))]
    smtputf8 = utf8_headers or any(not a.isascii() for a in addresses)
    size = len(head_bytes) + scan.size + scan.bare_newlines
    message = ComposedMessage(
        head_bytes,
        stream,
        start,
        attached,
        boundary,
        0,
        eight_bit or utf8_headers,
        smtputf8,
        owned,
    )
    if attached:
        text_head = message._part_head("text/plain; charset=" + message._charset(), message._cte())
        size += len(text_head) + 2
        for attachment in attached:
            size += len(message._attachment_head(attachment))
            size += _base64_size(attachment.size) + 2
        size += len(boundary) + 6
    message.size = size
    return message


def _addr_spec(address: str | email.headerregistry.Address) -> str:
    if isinstance(address, email.headerregistry.Address):
        return address.addr_spec
    return address


def _addresses_ascii(addresses: Sequence[str | email.headerregistry.Address]) -> bool:
    return all(_addr_spec(a).isascii() for a in addresses)
