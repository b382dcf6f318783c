"""``GET /api/v1/overview``: what the store received in the last minutes, counted.

The page's overview charts read it: messages per minute (every minute of
the window, zeros included), HELO against EHLO, TLS or not, each greeting
check's results, and the client names that greeted most. The counting is
the store's (:meth:`ehlo.storage.Store.overview`, grouped in SQL for
SQLite), run in a thread so that the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
from typing import Any

from aiohttp import web

from ..storage import Overview
from ._app import API, context
from ._errors import json_response, query_number

__all__ = ["DEFAULT_MINUTES", "MAX_MINUTES", "add_routes", "overview_json"]

# The window when ``minutes`` is not given, and the longest one may ask for
# (a day: the answer lists every minute of it).
DEFAULT_MINUTES = 60
MAX_MINUTES = 1440
# A minute as the store's counts name it (UTC).
MINUTE = "%Y-%m-%dT%H:%M"


def add_routes(app: web.Application) -> None:
    """``GET /api/v1/overview``."""
    app.router.add_get(f"{API}/overview", overview)


async def overview(request: web.Request) -> web.Response:
    """The counts over the last ``minutes`` (default 60, whole minutes, the current one last)."""
    minutes = int(query_number(request, "minutes", DEFAULT_MINUTES, 1, MAX_MINUTES))
    ctx = context(request)
    now = _dt.datetime.fromtimestamp(ctx.clock(), _dt.UTC)
    since = now.replace(second=0, microsecond=0) - _dt.timedelta(minutes=minutes - 1)
    found = await asyncio.to_thread(ctx.store.overview, since)
    return json_response(overview_json(found, since, minutes))


def overview_json(found: Overview, since: _dt.datetime, minutes: int) -> dict[str, Any]:
    """The answer's JSON: ``per_minute`` has each of the ``minutes`` from ``since``."""
    per_minute = []
    for step in range(minutes):
        moment = since + _dt.timedelta(minutes=step)
        per_minute.append([moment.isoformat(), found.per_minute.get(moment.strftime(MINUTE), 0)])
    return {
        "minutes": minutes,
        "since": since.isoformat(),
        "total": found.total,
        "per_minute": per_minute,
        "greetings": {"HELO": 0, "EHLO": 0, **found.greetings},
        "tls": dict(found.tls),
        "checks": found.checks,
        "top_names": [[name, count] for name, count in found.top_names],
    }
