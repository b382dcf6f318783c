"""``GET /metrics`` (and ``/api/v1/metrics``): the server's Prometheus metrics.

The text comes from ``WebContext.metrics``, a callable the server hands
over (``ehlo.server``'s ``Metrics.exposition``: with several workers, the
sum over all of them); without one, both paths answer 404 in the API's
JSON error shape.
"""

from __future__ import annotations

from aiohttp import web

from ._app import API, context
from ._errors import ApiError

__all__ = ["CONTENT_TYPE", "add_routes"]

# The text format prometheus_client's generate_latest writes (its
# CONTENT_TYPE_LATEST names version 1.0.0 from 0.22 on, for the same text).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def add_routes(app: web.Application) -> None:
    """Add this module's routes to app."""
    app.router.add_get("/metrics", metrics)
    app.router.add_get(f"{API}/metrics", metrics)


async def metrics(request: web.Request) -> web.Response:
    """The exposition text, or 404 when the server keeps no metrics."""
    render = context(request).metrics
    if render is None:
        raise ApiError(404, "this server keeps no metrics (metrics = false)")
    return web.Response(body=render(), headers={"Content-Type": CONTENT_TYPE})
