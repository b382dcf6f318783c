"""The message endpoints of the API: list and search, one message, its parts, delete.

Routes under ``/api/v1``:

- ``GET /messages?q=&limit=&before=``: newest first, a page of
  :func:`~ehlo.storage.list_json` items (with ``has_attachments`` when the
  store knows it), ``next`` (the cursor of the following page: the id of
  this page's last message, or null) and ``total`` (every message held);
- ``GET /messages/{id}``: :func:`~ehlo.storage.message_json` with the
  header fields, the MIME tree, the first plain text, ``has_html`` and the
  SMTP transcript;
- ``GET /messages/{id}/raw`` (the stored bytes), ``/parts/{n}`` (one part,
  decoded, as a download), ``/html`` (sanitised, under its own
  Content-Security-Policy), ``/text``;
- ``DELETE /messages/{id}``, ``DELETE /messages[?q=]``.

An id is checked against the syntax of queue ids (:mod:`ehlo.ids`) before
the store is asked: a malformed one is 400, an unknown one 404, and no id
ever becomes a path. Store calls run in a thread (``asyncio.to_thread``),
never on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from ..ids import is_queue_id
from ..storage import Query, StoredMessage, list_json, message_json
from ..storage.base import NoSuchMessage, StoreError
from . import _mime, live
from ._app import API, context
from ._errors import ApiError, json_response, query_number
from .search import parse_query

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "add_routes", "list_item", "transcript_lines"]

# Messages in a page unless ``limit`` says, and the most it may ask for.
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000

# The Content-Security-Policy of ``/html``: nothing loads but inline styles
# and data: images (and remote images when asked for); no script, ever.
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:{remote};"
    " base-uri 'none'; form-action 'none'; frame-ancestors 'self'; sandbox"
)


def add_routes(app: web.Application) -> None:
    """Add the message endpoints to ``app``."""
    app.router.add_get(f"{API}/messages", list_messages)
    app.router.add_delete(f"{API}/messages", delete_messages)
    app.router.add_get(f"{API}/messages/{{id}}", show_message)
    app.router.add_delete(f"{API}/messages/{{id}}", delete_message)
    app.router.add_get(f"{API}/messages/{{id}}/raw", raw_message)
    app.router.add_get(f"{API}/messages/{{id}}/parts/{{n}}", message_part)
    app.router.add_get(f"{API}/messages/{{id}}/html", message_html)
    app.router.add_get(f"{API}/messages/{{id}}/text", message_text)


def list_item(message: StoredMessage) -> dict[str, Any]:
    """A message as the list gives it: ``list_json`` and ``has_attachments`` when known."""
    item = list_json(message)
    if message.attachments is not None:
        item["has_attachments"] = message.attachments
    return item


def _query(request: web.Request) -> Query:
    """``q`` parsed (400 naming the bad term)."""
    try:
        return parse_query(request.query.get("q", ""))
    except ValueError as exc:
        raise ApiError(400, f"q: {exc}") from None


def _message_id(request: web.Request) -> str:
    """The ``{id}`` of the path, checked (400 when it cannot be a message id)."""
    queue_id = request.match_info["id"]
    if not is_queue_id(queue_id):
        raise ApiError(400, f"malformed message id {queue_id!r}")
    return queue_id


async def list_messages(request: web.Request) -> web.Response:
    """``GET /messages``: a page, newest first."""
    store = context(request).store
    query = _query(request)
    limit = int(query_number(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT))
    before = request.query.get("before")
    if before is not None and not is_queue_id(before):
        raise ApiError(400, f"before: malformed cursor {before!r}")
    # One more than the page: whether a next page exists.
    query = dataclasses.replace(query, limit=limit + 1, before=before or None)

    def read() -> tuple[list[StoredMessage], int]:
        return list(store.search(query)), store.count()

    try:
        found, total = await asyncio.to_thread(read)
    except NoSuchMessage:
        raise ApiError(400, f"before: no message with id {before!r} (deleted?)") from None
    page = found[:limit]
    more = len(found) > limit
    return json_response(
        {
            "messages": [list_item(message) for message in page],
            "next": page[-1].envelope.queue_id if more and page else None,
            "total": total,
        }
    )


async def _load(request: web.Request) -> tuple[StoredMessage, bytes]:
    """The message of the path and its bytes (404 when there is none)."""
    queue_id = _message_id(request)
    store = context(request).store

    def read() -> tuple[StoredMessage, bytes] | None:
        stored = store.get(queue_id)
        if stored is None:
            return None
        data = store.raw(queue_id)
        return None if data is None else (stored, data)

    found = await asyncio.to_thread(read)
    if found is None:
        raise ApiError(404, f"no message with id {queue_id!r}")
    return found


async def _parsed(request: web.Request) -> tuple[StoredMessage, bytes, list[_mime.Part]]:
    stored, data = await _load(request)
    found = await asyncio.to_thread(lambda: _mime.parts(_mime.parse(data)))
    return stored, data, found


async def show_message(request: web.Request) -> web.Response:
    """``GET /messages/{id}``: the envelope, header fields, MIME tree, text and transcript."""
    stored, data = await _load(request)

    def detail() -> dict[str, Any]:
        out = message_json(stored)
        if stored.attachments is not None:
            out["has_attachments"] = stored.attachments
        parsed = _mime.parse(data)
        found = _mime.parts(parsed)
        text_part = _mime.first(found, "text/plain")
        out["headers"] = _mime.headers(parsed)
        out["parts"] = [part.json() for part in found]
        out["text"] = _mime.part_text(text_part.message) if text_part is not None else None
        out["has_html"] = _mime.first(found, "text/html") is not None
        out["transcript"] = transcript_lines(stored.envelope.extra.get("transcript"))
        rest = out.get("extra")
        if isinstance(rest, dict) and "transcript" in rest:
            rest = {k: v for k, v in rest.items() if k != "transcript"}
            if rest:
                out["extra"] = rest
            else:
                del out["extra"]
        return out

    return json_response(await asyncio.to_thread(detail))


def transcript_lines(value: Any) -> list[dict[str, Any]] | None:
    """A stored transcript (a list of ``[t, dir, text]``, or JSON text of one) as
    TRANSCRIPT_LINE objects; None when there is none or it cannot be read."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, list):
        return None
    lines: list[dict[str, Any]] = []
    for entry in value:
        if isinstance(entry, dict):
            when, direction, text = entry.get("t"), entry.get("dir"), entry.get("text")
        elif isinstance(entry, list | tuple) and len(entry) == 3:
            when, direction, text = entry
        else:
            continue
        if not isinstance(when, int | float | str):
            continue
        try:
            seconds = round(float(when), 3)
        except ValueError:
            continue
        lines.append({"t": seconds, "dir": str(direction), "text": str(text)})
    return lines


async def raw_message(request: web.Request) -> web.Response:
    """``GET /messages/{id}/raw``: the stored bytes, exactly."""
    stored, data = await _load(request)
    response = web.Response(body=data, content_type="message/rfc822")
    if request.query.get("download") not in (None, "", "0"):
        name = f"{stored.envelope.queue_id}.eml"
        response.headers["Content-Disposition"] = _mime.content_disposition(name)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


async def message_part(request: web.Request) -> web.Response:
    """``GET /messages/{id}/parts/{n}``: one part, decoded, as a download."""
    text = request.match_info["n"]
    if not text.isdigit() or len(text) > 6:
        raise ApiError(400, f"part: expected a part number, got {text!r}")
    stored, _, found = await _parsed(request)
    n = int(text)
    if n >= len(found):
        raise ApiError(
            404, f"message {stored.envelope.queue_id!r} has no part {n} ({len(found)} parts)"
        )
    part = found[n]
    if part.container:
        raise ApiError(404, f"part {n} is a {part.type} container: its content is its parts")
    data = _mime.part_bytes(part.message)
    content_type = part.type
    if part.type.startswith("text/"):
        try:
            charset = part.message.get_content_charset()
        except Exception:
            charset = None
        if charset and charset.isascii() and charset.replace("-", "").replace("_", "").isalnum():
            content_type += f"; charset={charset}"
    extension = {"text/plain": ".txt", "text/html": ".html"}.get(part.type, ".bin")
    name = _mime.safe_filename(part.filename, f"{stored.envelope.queue_id}-part{n}{extension}")
    response = web.Response(body=data)
    response.headers["Content-Type"] = content_type
    response.headers["Content-Disposition"] = _mime.content_disposition(name)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response


async def message_html(request: web.Request) -> web.Response:
    """``GET /messages/{id}/html[?images=1]``: the first HTML part, sanitised."""
    images = request.query.get("images") not in (None, "", "0")
    stored, _, found = await _parsed(request)
    part = _mime.first(found, "text/html")
    if part is None:
        raise ApiError(404, f"message {stored.envelope.queue_id!r} has no HTML part")
    html = await asyncio.to_thread(
        lambda: _mime.html_document(
            _mime.sanitize_html(_mime.part_text(part.message), found, images)
        )
    )
    response = web.Response(text=html, content_type="text/html", charset="utf-8")
    response.headers["Content-Security-Policy"] = _CSP.format(
        remote=" http: https:" if images else ""
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


async def message_text(request: web.Request) -> web.Response:
    """``GET /messages/{id}/text``: the first plain text part (or the HTML's text)."""
    stored, _, found = await _parsed(request)
    part = _mime.first(found, "text/plain")
    if part is not None:
        text = _mime.part_text(part.message)
    else:
        html = _mime.first(found, "text/html")
        if html is None:
            raise ApiError(404, f"message {stored.envelope.queue_id!r} has no text part")
        text = await asyncio.to_thread(_mime.html_text, _mime.part_text(html.message))
    response = web.Response(text=text, content_type="text/plain", charset="utf-8")
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


async def delete_message(request: web.Request) -> web.Response:
    """``DELETE /messages/{id}``: ``{"deleted": 1}``, or 404."""
    queue_id = _message_id(request)
    store = context(request).store
    gone = await asyncio.to_thread(store.delete, [queue_id])
    if not gone:
        raise ApiError(404, f"no message with id {queue_id!r}")
    _deleted(request, gone)
    return json_response({"deleted": len(gone)})


async def delete_messages(request: web.Request) -> web.Response:
    """``DELETE /messages[?q=]``: what ``q`` selects (everything without it)."""
    query = _query(request)
    store = context(request).store

    def delete() -> Sequence[str]:
        ids = [message.envelope.queue_id for message in store.search(query)]
        return store.delete(ids) if ids else []

    try:
        gone = await asyncio.to_thread(delete)
    except StoreError as exc:
        raise ApiError(500, f"delete failed: {exc}") from None
    _deleted(request, gone)
    return json_response({"deleted": len(gone)})


def _deleted(request: web.Request, ids: Sequence[str]) -> None:
    """Tell the live events what was deleted."""
    if ids:
        live.hub(request.app).deleted(list(ids))
