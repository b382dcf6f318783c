"""SMTP replies: a code, an optional RFC 3463 enhanced status code, text lines.

Rendering follows RFC 5321 section 4.2: ``code-text`` on every line but the
last, ``code SP text`` on the last. With ENHANCEDSTATUSCODES (RFC 2034
section 3) the enhanced code prefixes the text of every line.
"""

from __future__ import annotations

from collections.abc import Iterable


class Reply:
    """An SMTP reply. Immutable; renders to bytes with or without enhanced codes."""

    __slots__ = ("_plain", "_with_enhanced", "code", "enhanced", "lines")

    code: int
    enhanced: str | None
    lines: tuple[str, ...]
    _plain: bytes | None
    _with_enhanced: bytes | None

    def __init__(self, code: int, enhanced: str | None, lines: str | Iterable[str]) -> None:
        if not 200 <= code <= 599:
            raise ValueError(f"reply code out of range: {code}")
        if enhanced is not None:
            cls = enhanced.split(".", 1)[0]
            # RFC 3463 section 3.1: the class digit matches the reply class.
            if cls != str(code)[0] or cls not in ("2", "4", "5"):
                raise ValueError(f"enhanced code {enhanced} does not fit reply {code}")
        text = (lines,) if isinstance(lines, str) else tuple(lines)
        if not text:
            text = ("",)
        for line in text:
            if "\r" in line or "\n" in line:
                raise ValueError("reply text must not contain CR or LF")
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "enhanced", enhanced)
        object.__setattr__(self, "lines", text)
        object.__setattr__(self, "_plain", None)
        object.__setattr__(self, "_with_enhanced", None)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Reply is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reply):
            return NotImplemented
        return (self.code, self.enhanced, self.lines) == (other.code, other.enhanced, other.lines)

    def __hash__(self) -> int:
        return hash((self.code, self.enhanced, self.lines))

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.enhanced!r}, {self.lines!r})"

    def __str__(self) -> str:
        enh = f" {self.enhanced}" if self.enhanced else ""
        return f"{self.code}{enh} " + " / ".join(self.lines)

    @property
    def text(self) -> str:
        """All text lines joined by a space (for logs and exceptions)."""
        return " ".join(self.lines)

    @property
    def is_positive(self) -> bool:
        """2xx and 3xx replies."""
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        """4xx: try again later."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """5xx: do not repeat as is."""
        return self.code >= 500

    def render(self, enhanced: bool = True) -> bytes:
        """The reply on the wire. Cached: replies are often reused constants."""
        cached = self._with_enhanced if enhanced else self._plain
        if cached is not None:
            return cached
        prefix = f"{self.enhanced} " if enhanced and self.enhanced else ""
        code = str(self.code)
        last = len(self.lines) - 1
        out = "".join(
            f"{code}{' ' if i == last else '-'}{prefix}{line}\r\n"
            for i, line in enumerate(self.lines)
        )
        # Text is UTF-8 only when the caller put non-ASCII in it (RFC 6531 section 3.7.4).
        data = out.encode("utf-8", "replace")
        object.__setattr__(self, "_with_enhanced" if enhanced else "_plain", data)
        return data

    @classmethod
    def parse(cls, data: bytes) -> Reply:
        """Parse one complete rendered reply (all its lines, CRLF-terminated)."""
        lines = data.decode("utf-8", "replace").split("\r\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not lines:
            raise ValueError("empty reply")
        code = int(lines[0][:3])
        texts = [line[4:] for line in lines]
        enhanced = None
        first = texts[0].split(" ", 1)[0]
        parts = first.split(".")
        # RFC 3463 section 2: class "." 1*3digit "." 1*3digit, ASCII digits.
        if (
            len(parts) == 3
            and all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts)
            and len(parts[0]) == 1
            and parts[0] == str(code)[0]
        ):
            enhanced = first
            texts = [t[len(first) + 1 :] if t.startswith(first) else t for t in texts]
        return cls(code, enhanced, texts)
