"""``GET /api/v1/sessions``: the store's session log, newest first.

Each session is the record the server wrote when it ended (``id``,
``started_at``, ``ended_at``, the client, the greeting, TLS, AUTH user, the
ids of the messages it stored, its ``outcome``, the greeting verdict and
checks, and its ``transcript`` as ``{"t", "dir", "text"}`` lines). Paging
is by cursor: ``next`` is the id of the page's last session, given back as
``before``. The store is read in a thread; bad input is a 400 in the JSON
error shape.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ..storage import StoreError
from ..storage.base import transcript_json
from ._app import API, context
from ._errors import ApiError, json_response, query_number

__all__ = ["add_routes"]

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


def add_routes(app: web.Application) -> None:
    """Add ``GET /api/v1/sessions``."""
    app.router.add_get(f"{API}/sessions", list_sessions)


def _session(record: dict[str, Any]) -> dict[str, Any]:
    """A logged record as the API shows it: the transcript's lines as objects."""
    shown = dict(record)
    shown["transcript"] = transcript_json(record.get("transcript"))
    return shown


async def list_sessions(request: web.Request) -> web.Response:
    """``{"sessions": [SESSION...], "next": CURSOR|null}``."""
    limit = int(query_number(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT))
    before = request.query.get("before") or None
    store = context(request).store
    try:
        # One more than the page: whether there is a next page at all.
        found = await asyncio.to_thread(store.sessions, limit + 1, before)
    except StoreError as exc:
        if before is not None and "no session" in str(exc):
            raise ApiError(400, f"before: no session with id {before!r}") from None
        raise ApiError(503, f"the session log cannot be read: {exc}") from None
    page = found[:limit]
    cursor = page[-1].get("id") if len(found) > limit and page else None
    return json_response({"sessions": [_session(r) for r in page], "next": cursor})
