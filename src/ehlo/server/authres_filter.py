"""Authentication-Results fields a client forged in our name (RFC 8601 section 5).

A receiver must not let a message claim results that this server's
authserv-id vouches for: an incoming ``Authentication-Results`` field whose
authserv-id is one of our names is renamed to
``X-Original-Authentication-Results`` (or removed, the operator's choice)
before the message is stored. Fields for other authserv-ids stay as they are.

Only the message's header section is looked at: everything up to the first
empty line, at most :data:`HEADER_SCAN_LIMIT` octets of it. The filter holds
the header section back until its end is seen, rewrites it, and from then on
passes the body through untouched, so large messages still stream.

While it holds the header section, the filter also counts its ``Received``
fields (``received``), which the session checks against ``max_hops``
(RFC 5321 section 6.3) without another pass over the message.
"""

from __future__ import annotations

import re

__all__ = ["HEADER_SCAN_LIMIT", "AuthResFilter", "authserv_id"]

# The header section is buffered up to this many octets; a longer one is
# scanned that far and the rest passes untouched.
HEADER_SCAN_LIMIT = 1024 * 1024

_RENAMED = b"X-Original-Authentication-Results"
# RFC 5322 section 3.6.8 (and 4.5.2's obsolete WSP before the colon): the field
# name, at the start of a line, in any letter case.
_FIELD = re.compile(rb"(?im)^authentication-results[ \t]*:")
_NAME = b"authentication-results"
# A Received field name (RFC 5322 section 3.6.7), found in the lower-cased
# header section: at its start, or after a line break. (A literal search on
# lower-cased octets is several times faster than a case-insensitive one.)
_RECEIVED_FIRST = re.compile(rb"received[ \t]*:")
_RECEIVED = re.compile(rb"\nreceived[ \t]*:")
# RFC 2045 section 5.1: tspecials end a token.
_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')


def _skip_cfws(text: str, i: int) -> int:
    """Index past folding white space and comments at ``text[i:]``; -1 if a comment never ends."""
    n = len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
        elif ch == "(":
            # RFC 5322 section 3.2.2: comments nest and may hold quoted-pairs.
            depth = 0
            while i < n:
                ch = text[i]
                if ch == "\\":
                    i += 2
                    continue
                if ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                i += 1
            else:
                return -1
        else:
            break
    return i


def authserv_id(value: str) -> str | None:
    """The authserv-id that opens an Authentication-Results field body, or None.

    RFC 8601 section 2.2: ``[CFWS] authserv-id`` where authserv-id is a value
    (an RFC 2045 token or a quoted-string); a version number and CFWS may follow.
    """
    i = _skip_cfws(value, 0)
    if i < 0 or i >= len(value):
        return None
    if value[i] == '"':
        out: list[str] = []
        i += 1
        while i < len(value):
            ch = value[i]
            if ch == "\\" and i + 1 < len(value):
                out.append(value[i + 1])
                i += 2
                continue
            if ch == '"':
                return "".join(out)
            if ch not in "\r\n":  # a folded quoted-string unfolds to its text
                out.append(ch)
            i += 1
        return None
    j = i
    while j < len(value) and 32 < ord(value[j]) != 127 and value[j] not in _TSPECIALS:
        j += 1
    return value[i:j] or None


def _header_end(buf: bytes | bytearray, start: int) -> int:
    """Offset of the empty line that ends the header section; -1 if not in ``buf``."""
    if buf[:1] == b"\n" or buf[:2] == b"\r\n":
        return 0
    crlf = buf.find(b"\n\r\n", start)
    lf = buf.find(b"\n\n", start, crlf + 1 if crlf >= 0 else len(buf))
    end = lf if lf >= 0 else crlf
    return end + 1 if end >= 0 else -1


def _count_received(head: bytes | bytearray) -> int:
    """How many Received fields the header section ``head`` holds."""
    low = head.lower()
    return len(_RECEIVED.findall(low)) + (_RECEIVED_FIRST.match(low) is not None)


def _normal(name: str) -> str:
    return name.lower().rstrip(".")


class AuthResFilter:
    """Rewrites forged Authentication-Results fields of one message as it streams.

    ``feed`` returns the octets to store now (empty while the header section
    is still being collected); ``finish`` returns what is left at the end of
    the message. ``forged`` counts the fields renamed or removed;
    ``received`` the Received fields of the header section, once passed on.
    """

    __slots__ = ("_buf", "_done", "_ids", "_remove", "_searched", "forged", "received")

    def __init__(self, our_ids: frozenset[str], *, remove: bool = False) -> None:
        self._ids = frozenset(_normal(name) for name in our_ids)
        self._remove = remove
        self._buf = bytearray()
        self._done = False
        self._searched = 0
        self.forged = 0
        self.received = 0

    @property
    def done(self) -> bool:
        """True once the header section has been passed on."""
        return self._done

    def feed(self, data: bytes) -> bytes:
        if self._done:
            return data
        buf = self._buf
        if not buf:
            # The usual case: the whole header section in the first block.
            end = _header_end(data, 0)
            if end >= 0:
                self._done = True
                self.received = _count_received(data[:end])
                if not self._ids or _FIELD.search(data, 0, end) is None:
                    return data  # nothing to rewrite: no copy
                return self._rewrite(data[:end], False) + data[end:]
        buf += data
        end = _header_end(buf, max(self._searched - 2, 0))
        self._searched = len(buf)
        if end < 0:
            if len(buf) < HEADER_SCAN_LIMIT:
                return b""
            # An over-long header section: rewrite the complete fields within
            # the limit; the last one may continue past it, so it stays.
            cut = buf.rfind(b"\n", 0, HEADER_SCAN_LIMIT) + 1
            return self._release(cut, last_open=True)
        return self._release(end, last_open=False)

    def finish(self) -> bytes:
        """The rest at the end of the message (all header section when no body)."""
        if self._done:
            return b""
        return self._release(len(self._buf), last_open=False)

    def _release(self, end: int, *, last_open: bool) -> bytes:
        head = bytes(self._buf[:end])
        rest = bytes(self._buf[end:])
        self._buf = bytearray()
        self._done = True
        self.received = _count_received(head)
        return self._rewrite(head, last_open) + rest

    def _rewrite(self, head: bytes, last_open: bool) -> bytes:
        if not self._ids or _FIELD.search(head) is None:
            return head  # the usual case: nothing to look at
        pieces = head.split(b"\n")
        lines = [line + b"\n" for line in pieces[:-1]]
        if pieces[-1]:
            lines.append(pieces[-1])
        # Fields: a line, then its continuation lines (starting with WSP).
        fields: list[list[bytes]] = []
        for line in lines:
            if fields and line[:1] in (b" ", b"\t"):
                fields[-1].append(line)
            else:
                fields.append([line])
        out: list[bytes] = []
        for index, field in enumerate(fields):
            if last_open and index == len(fields) - 1:
                out.extend(field)
                continue
            name, colon, _ = field[0].partition(b":")
            if not colon or name.rstrip(b" \t").lower() != _NAME:
                out.extend(field)
                continue
            body = b"".join(field)[len(name) + 1 :].decode("latin-1")
            claimed = authserv_id(body)
            if claimed is None:
                out.extend(field)
                continue
            claimed = claimed.encode("latin-1").decode("utf-8", "replace")
            if _normal(claimed) not in self._ids:
                out.extend(field)
                continue
            # RFC 8601 section 5: a field claiming our authserv-id that did
            # not come from us is removed or renamed before delivery.
            self.forged += 1
            if self._remove:
                continue
            out.append(_RENAMED + field[0][len(name) :])
            out.extend(field[1:])
        return b"".join(out)
