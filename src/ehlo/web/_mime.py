"""A stored message read for the API: its header fields, its MIME tree, its HTML made safe.

Parsing uses the standard :mod:`email` package (``email.policy.default``)
and never raises on broken MIME: a field that cannot be decoded is given as
it was sent, a part that cannot be decoded is given as its bytes. The MIME
tree is flattened depth-first (:func:`parts`; index 0 is the message
itself), which is what ``/parts/{n}`` counts.

:func:`sanitize_html` is the HTML of a message made safe to show: nh3 (the
ammonia sanitiser) keeps a list of harmless tags and attributes (no
script, no event handlers, no ``<meta>``, ``<link>``, ``<base>``,
``<form>``, no ``javascript:`` or other unknown URL schemes); CSS, in
``style`` attributes and ``<style>`` elements, loses ``@import`` and every
``url()`` that is not a ``data:`` image (remote ones are kept only when
images are asked for); ``cid:`` images become ``data:`` URLs of the
message's own parts, and remote images a placeholder unless asked for. The
HTTP answer adds its own Content-Security-Policy (``messages.py``).
"""

from __future__ import annotations

import base64
import dataclasses
import email
import email.message
import email.policy
import html as _html
import re
import unicodedata
import urllib.parse
from collections.abc import Iterator

import nh3

__all__ = [
    "Part",
    "content_disposition",
    "headers",
    "html_text",
    "parse",
    "part_bytes",
    "part_text",
    "parts",
    "safe_filename",
    "sanitize_html",
]

# The MIME tree is cut at this many parts and this depth (a message is bytes
# from anyone: its nesting must not cost unbounded work).
MAX_PARTS = 1000
MAX_DEPTH = 50
# ``cid:`` images inlined as data: URLs, in total at most this many octets.
MAX_INLINE = 8 * 1024 * 1024

Message = email.message.Message


@dataclasses.dataclass(slots=True)
class Part:
    """One node of a message's MIME tree, as ``"parts"`` lists it."""

    index: int
    type: str
    size: int  # octets of the decoded content (of its parts, for a multipart)
    filename: str | None
    disposition: str | None  # "attachment", "inline" or None
    content_id: str | None  # without its angle brackets
    depth: int
    message: Message = dataclasses.field(repr=False)

    @property
    def container(self) -> bool:
        """A multipart (or an attached message): its content is its parts."""
        return self.message.is_multipart()

    @property
    def attachment(self) -> bool:
        return self.disposition == "attachment"

    def json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "type": self.type,
            "size": self.size,
            "filename": self.filename,
            "disposition": self.disposition,
            "content_id": self.content_id,
            "depth": self.depth,
        }


def parse(data: bytes) -> Message:
    """The message ``data`` (the standard parser does not raise on broken MIME)."""
    return email.message_from_bytes(data, policy=email.policy.default)


def headers(message: Message) -> list[list[str]]:
    """The header fields in order, ``[name, decoded value]`` (as sent when undecodable)."""
    out: list[list[str]] = []
    policy = email.policy.default
    for name, raw in message.raw_items():
        try:
            value = str(policy.header_fetch_parse(name, raw))
        except Exception:  # any defect the header classes trip on: show what was sent
            value = _unfold(str(raw))
        out.append([name, value])
    return out


def _unfold(value: str) -> str:
    text = re.sub(r"\r?\n(?=[ \t])", "", value)
    # Undecodable octets come back from the parser as surrogates.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def parts(message: Message) -> list[Part]:
    """The MIME tree, depth-first (index 0 the message itself), at most MAX_PARTS."""
    found: list[Part] = []
    sizes: list[tuple[Part, list[Part]]] = []
    for node, depth in _walk(message, 0):
        if len(found) >= MAX_PARTS:
            break
        part = Part(
            index=len(found),
            type=_content_type(node),
            size=0 if node.is_multipart() else len(part_bytes(node)),
            filename=_filename(node),
            disposition=_disposition(node),
            content_id=_content_id(node),
            depth=depth,
            message=node,
        )
        found.append(part)
        if part.container:
            sizes.append((part, []))
    # A container's size: the sum of its leaves (listed after it, deeper).
    for part, _ in sizes:
        total = 0
        for later in found[part.index + 1 :]:
            if later.depth <= part.depth:
                break
            if not later.container:
                total += later.size
        part.size = total
    return found


def _walk(node: Message, depth: int) -> Iterator[tuple[Message, int]]:
    yield node, depth
    if depth >= MAX_DEPTH or not node.is_multipart():
        return
    payload = node.get_payload()
    if isinstance(payload, list):
        for child in payload:
            if isinstance(child, email.message.Message):
                yield from _walk(child, depth + 1)


def _content_type(node: Message) -> str:
    try:
        return node.get_content_type()
    except Exception:
        return "application/octet-stream"


def _filename(node: Message) -> str | None:
    try:
        name = node.get_filename()
    except Exception:
        return None
    return str(name) if name else None


def _disposition(node: Message) -> str | None:
    try:
        value = node.get_content_disposition()
    except Exception:
        return None
    return value if value in ("attachment", "inline") else None


def _content_id(node: Message) -> str | None:
    try:
        value = node.get("Content-ID")
    except Exception:
        return None
    if not value:
        return None
    text = str(value).strip()
    return text[1:-1].strip() if text.startswith("<") and text.endswith(">") else text


def part_bytes(node: Message) -> bytes:
    """The decoded content of a leaf (its transfer encoding undone; b"" for a multipart)."""
    if node.is_multipart():
        return b""
    try:
        payload = node.get_payload(decode=True)
    except Exception:
        payload = None
    if isinstance(payload, bytes):
        return payload
    raw = node.get_payload()
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape")
    return b""


def part_text(node: Message) -> str:
    """The content of a text part as text, in its charset (UTF-8 when unknown),
    its line ends as ``\n``."""
    data = part_bytes(node)
    try:
        charset = node.get_content_charset() or "utf-8"
    except Exception:
        charset = "utf-8"
    try:
        text = data.decode(charset, "replace")
    except LookupError:  # a charset Python does not know
        text = data.decode("utf-8", "replace")
    return text.replace("\r\n", "\n")


def first(found: list[Part], content_type: str) -> Part | None:
    """The first leaf of ``content_type`` that is not an attachment."""
    for part in found:
        if part.type == content_type and not part.container and not part.attachment:
            return part
    return None


# --- downloads -----------------------------------------------------------------


def safe_filename(name: str | None, fallback: str) -> str:
    """A file name safe to offer for saving: no folders, no control characters."""
    if not name:
        return fallback
    name = unicodedata.normalize("NFC", name)
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C")
    name = name.strip().lstrip(".").strip()
    if len(name) > 200:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: 200 - len(ext) - 1] + dot + ext) if dot and len(ext) <= 16 else name[:200]
    return name or fallback


def content_disposition(filename: str) -> str:
    """``attachment`` with ``filename`` (RFC 6266: an ASCII fallback and ``filename*``)."""
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\%;' else "_" for c in filename)
    quoted = urllib.parse.quote(filename, safe="")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quoted}"


# --- HTML ------------------------------------------------------------------------

# What the sanitiser keeps: its default tags and attributes, the presentational
# ones mail uses, ``style`` everywhere (cleaned below) and ``<style>``.
_TAGS = set(nh3.ALLOWED_TAGS) | {"style", "font", "tfoot"}
_TAGS -= {"meta", "link", "base", "form", "script", "iframe", "object", "embed"}
_ATTRIBUTES: dict[str, set[str]] = {
    tag: set(names) for tag, names in nh3.ALLOWED_ATTRIBUTES.items()
}
_ATTRIBUTES.setdefault("*", set()).update(
    {"style", "align", "valign", "width", "height", "bgcolor", "color", "border", "dir", "title"}
)
_ATTRIBUTES.setdefault("table", set()).update({"cellpadding", "cellspacing"})
_ATTRIBUTES.setdefault("font", set()).update({"face", "size"})
_URL_SCHEMES = {"http", "https", "mailto", "cid", "data"}
# What a link may point to (data: is only for images).
_LINK_SCHEMES = ("http:", "https:", "mailto:")
_DATA_IMAGE = re.compile(r"(?i)^data:image/[a-z0-9.+-]+[;,]")
# A small grey box shown in place of a remote image until images are asked for.
PLACEHOLDER = "data:image/svg+xml;base64," + base64.b64encode(
    b'<svg xmlns="http://www.w3.org/2000/svg" width="24" height="24">'
    b'<rect width="24" height="24" fill="#ddd"/></svg>'
).decode()

_CSS_ESCAPE = re.compile(r"\\([0-9a-fA-F]{1,6})[ \t\r\n\f]?|\\(.)", re.DOTALL)
_CSS_COMMENT = re.compile(r"/\*.*?(\*/|$)", re.DOTALL)
_CSS_IMPORT = re.compile(r"(?i)@import[^;]*(;|$)")
_CSS_URL = re.compile(r"(?i)url\(\s*(['\"]?)(.*?)\1\s*\)", re.DOTALL)
_CSS_DANGER = re.compile(
    r"(?i)(expression\s*\(|-moz-binding|behavior\s*:|image-set\s*\(|@font-face)"
)
_STYLE_ELEMENT = re.compile(r"(?is)(<style[^>]*>)(.*?)(</style\s*>)")


def clean_css(css: str, images: bool) -> str:
    """CSS without ``@import``, scripting constructs, and ``url()`` reaching out
    (only ``data:`` images, and with ``images`` http(s) ones, are kept)."""

    def unescape(match: re.Match[str]) -> str:
        if match.group(1):
            try:
                return chr(int(match.group(1), 16))
            except (ValueError, OverflowError):
                return ""
        return match.group(2)

    text = _CSS_ESCAPE.sub(unescape, css)
    text = _CSS_COMMENT.sub("", text)
    text = _CSS_IMPORT.sub("", text)
    text = _CSS_DANGER.sub("x-blocked(", text)

    def url(match: re.Match[str]) -> str:
        target = match.group(2).strip()
        if _DATA_IMAGE.match(target):
            return match.group(0)
        if images and re.match(r"(?i)^https?://", target):
            return match.group(0)
        return "url()"

    return _CSS_URL.sub(url, text)


def sanitize_html(source: str, found: list[Part], images: bool = False) -> str:
    """``source`` made safe to show (see the module's text); ``found`` the message's
    parts, for ``cid:`` images; ``images``: keep remote images and CSS URLs."""
    inline = _cid_urls(found)

    def attribute(tag: str, name: str, value: str) -> str | None:
        if name == "style":
            return clean_css(value, images)
        if name == "src":
            target = value.strip()
            if target[:4].lower() == "cid:":
                return inline.get(urllib.parse.unquote(target[4:]).strip("<>"), PLACEHOLDER)
            if _DATA_IMAGE.match(target):
                return target
            if re.match(r"(?i)^https?://", target):
                return target if images else PLACEHOLDER
            return None
        if name == "href":
            target = value.strip()
            return target if target.lower().startswith(_LINK_SCHEMES) else None
        return value

    cleaned = nh3.clean(
        source,
        tags=_TAGS,
        clean_content_tags={"script", "title", "head"} - _TAGS,
        attributes=_ATTRIBUTES,
        attribute_filter=attribute,
        url_schemes=_URL_SCHEMES,
        link_rel="noopener noreferrer",
    )
    return _STYLE_ELEMENT.sub(
        lambda m: m.group(1) + clean_css(m.group(2), images) + m.group(3), cleaned
    )


def _cid_urls(found: list[Part]) -> dict[str, str]:
    """``Content-ID`` -> data: URL of the message's image parts (MAX_INLINE in all)."""
    urls: dict[str, str] = {}
    budget = MAX_INLINE
    for part in found:
        if part.content_id is None or part.container or not part.type.startswith("image/"):
            continue
        data = part_bytes(part.message)
        if len(data) > budget:
            continue
        budget -= len(data)
        urls[part.content_id] = f"data:{part.type};base64,{base64.b64encode(data).decode()}"
    return urls


def html_document(body: str) -> str:
    """A sanitised fragment as a whole document (UTF-8)."""
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        '<meta name="referrer" content="no-referrer"></head>\n<body>'
        + body
        + "</body></html>\n"
    )


def html_text(source: str) -> str:
    """The text of an HTML body (tags dropped, entities decoded, blank runs squeezed)."""
    stripped = nh3.clean(source, tags=set(), clean_content_tags={"script", "style", "head"})
    text = _html.unescape(stripped)
    return re.sub(r"\n\s*\n+", "\n\n", text).strip() + "\n"
