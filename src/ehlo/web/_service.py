"""The HTTP service: the web application served in a running event loop.

:class:`HTTPService` serves :func:`~ehlo.web.build_app` with aiohttp's
``AppRunner`` and ``SockSite`` inside the loop that runs it (the SMTP
server's): no signal handling of its own, on a socket bound already (``ehlo
serve`` binds it before anything else, like the SMTP listeners) or on
HOST:PORT, with an optional TLS context (HTTPS). ``stop`` closes the
listener, ends the event streams and waits (briefly) for the requests in
progress. This module also answers ``/healthz`` and serves the OpenAPI
document (``openapi.json``, package data) at ``/api/v1/openapi.json``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from importlib import resources

from aiohttp import web

from .._net import format_hostport
from ..storage import StoreError
from ._app import API, WebContext, build_app, context
from ._errors import ApiError, json_response

__all__ = ["HTTPService", "add_routes", "bind"]

log = logging.getLogger("ehlo.web")

# Seconds requests in progress may take to finish when the service stops.
SHUTDOWN_TIMEOUT = 3.0


def bind(host: str, port: int) -> socket.socket:
    """A listening, non-blocking socket on ``host``:``port`` (an IPv6 one is v6-only)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=128)
    sock.setblocking(False)
    return sock


class HTTPService:
    """The web UI and API of ``ctx`` on ``sock`` (or ``host``:``port``), in the running loop."""

    def __init__(
        self,
        ctx: WebContext,
        *,
        sock: socket.socket | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.ctx = ctx
        self.app = build_app(ctx)
        self._sock = sock
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    @property
    def url(self) -> str:
        """``http://HOST:PORT/`` (https with TLS) once started."""
        if self.address is None:
            raise RuntimeError("the HTTP service is not started")
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://{format_hostport(*self.address)}/"

    async def start(self) -> None:
        """Listen and serve. OSError when ``host``:``port`` cannot be bound."""
        sock = self._sock if self._sock is not None else bind(self._host, self._port)
        # handler_cancellation: a client that goes away ends its event
        # stream or wait at once (it stops counting as a listener).
        runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            handler_cancellation=True,
        )
        await runner.setup()
        try:
            site = web.SockSite(runner, sock, ssl_context=self._ssl, backlog=128)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        name = sock.getsockname()
        self.address = (str(name[0]), int(name[1]))

    async def stop(self) -> None:
        """Stop listening, end the event streams and waits, let requests finish."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


# -- /healthz, /api/v1/openapi.json


def add_routes(app: web.Application) -> None:
    """``/healthz`` (and ``/api/v1/healthz``) and the OpenAPI document."""
    app.router.add_get("/healthz", healthz)
    app.router.add_get(f"{API}/healthz", healthz)
    app.router.add_get(f"{API}/openapi.json", openapi)


async def healthz(request: web.Request) -> web.Response:
    """``{"status": "ok"}`` when the store answers; 503 when it does not."""
    store = context(request).store
    try:
        await asyncio.to_thread(store.list, 1)
    except (StoreError, OSError) as exc:
        raise ApiError(503, f"the store does not answer: {exc}") from None
    return json_response({"status": "ok"})


@functools.cache
def openapi_document() -> bytes:
    """``openapi.json`` of the package, read once (while root can: see ``read_package_data``)."""
    return resources.files("ehlo.web").joinpath("openapi.json").read_bytes()


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of the API."""
    return web.Response(body=openapi_document(), content_type="application/json", charset="utf-8")
