"""The aiohttp application: what it is given, its routes, its error middleware.

:class:`WebContext` is everything the handlers read, kept in the app under
``CONTEXT``. :func:`build_app` makes the application: the error middleware
(:class:`~ehlo.web._errors.ApiError` and any other exception become the
JSON error shape; an unknown path under ``/api/`` is a JSON 404), then the
routes of the service (``/healthz``, the OpenAPI document) and of each
module (``messages``, ``live``, ``sessions``, ``metrics``, ``overview``,
``page``), each adding its own with ``add_routes(app)``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ._errors import ApiError, error_response

if TYPE_CHECKING:
    from ..auth.users import UserStore
    from ..storage import Store

__all__ = ["API", "CONTEXT", "WebContext", "build_app", "context"]

log = logging.getLogger("ehlo.web")

# Where the JSON API lives.
API = "/api/v1"


@dataclasses.dataclass(slots=True)
class WebContext:
    """What the web application reads: given by whoever runs it."""

    store: Store
    # The users file for HTTP Basic (None: no login asked).
    users: UserStore | None = None
    # The Prometheus text of the metrics (None: /metrics answers 404).
    metrics: Callable[[], bytes] | None = None
    # Wall clock (tests inject their own).
    clock: Callable[[], float] = time.time


CONTEXT: web.AppKey[WebContext] = web.AppKey("ehlo_web_context", WebContext)


def context(request: web.Request) -> WebContext:
    """The context of the app serving ``request``."""
    return request.app[CONTEXT]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as the JSON error shape; never a traceback."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400 or not request.path.startswith("/api/"):
            raise
        return error_response(exc.status, exc.reason)
    except Exception:
        log.exception("web: %s %s failed", request.method, request.path)
        return error_response(500, "internal error (logged by the server)")


def build_app(ctx: WebContext, *, middlewares: list[Any] | None = None) -> web.Application:
    """The application over ``ctx``.

    Before the handlers: the origin check and, when ``ctx.users`` is set,
    the HTTP Basic login (``_guard``); every response gets the security
    headers. The live hub (``live.hub(app)``) starts and stops with the app.
    """
    from . import _guard, _service, live, messages, metrics, overview, page, sessions

    guards: list[Any] = [_guard.same_origin]
    if ctx.users is not None:
        guards.append(_guard.login(ctx.users))
    app = web.Application(middlewares=[*guards, *(middlewares or []), errors])
    app.on_response_prepare.append(_guard.security_headers)
    app[CONTEXT] = ctx
    _service.add_routes(app)
    for module in (messages, live, sessions, metrics, overview, page):
        module.add_routes(app)
    return app
