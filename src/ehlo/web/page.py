"""The web page: ``GET /`` and its assets under ``/static/``.

The page is a single-page application in plain JavaScript modules and CSS
(``static/``: no build step, nothing fetched from elsewhere); everything it
shows it reads from the JSON API. This module serves those files, read once
from the package when the routes are added: ``/`` is ``index.html``,
``/static/NAME`` one asset by its exact name (no folders, so no path can
leave the folder), with its type, an ETag (a matching ``If-None-Match`` is
answered 304) and ``Cache-Control: no-cache`` (the browser asks again, so a
new version is seen at once, and the ETag keeps that cheap).

Every answer carries a strict Content-Security-Policy: scripts, styles,
frames and requests from this origin only, no inline script or style, no
plugins, no ``<base>``, and the page may not be framed (a message's HTML
is shown in a sandboxed frame of its own, under a stricter policy of its
own: see ``messages``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import re

from aiohttp import web

__all__ = ["CSP", "add_routes"]

CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self';"
    " frame-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none';"
    " form-action 'self'; frame-ancestors 'none'"
)

# Headers of every answer of this module.
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}

# An asset's name: one file of the folder, of a type listed above.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class Asset:
    """One file of the page, held in memory."""

    __slots__ = ("body", "content_type", "etag")

    def __init__(self, name: str, body: bytes) -> None:
        self.body = body
        self.content_type = TYPES[name[name.rindex(".") :]]
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'

    def response(self, request: web.Request) -> web.Response:
        headers = {**HEADERS, "ETag": self.etag}
        if self.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=self.body, headers={**headers, "Content-Type": self.content_type})


@functools.cache
def load_assets() -> dict[str, Asset]:
    """The files of ``static/`` that the page serves, by name (read once)."""
    folder = importlib.resources.files(__package__ or "ehlo.web") / "static"
    found = {}
    for entry in folder.iterdir():
        name = entry.name
        suffix = name[name.rfind(".") :] if "." in name else ""
        if entry.is_file() and NAME.fullmatch(name) and suffix in TYPES:
            found[name] = Asset(name, entry.read_bytes())
    return found


def add_routes(app: web.Application) -> None:
    """``GET /`` (the page) and ``GET /static/{name}`` (its assets)."""
    assets = load_assets()

    async def index(request: web.Request) -> web.Response:
        return assets["index.html"].response(request)

    async def static(request: web.Request) -> web.Response:
        asset = assets.get(request.match_info["name"])
        if asset is None:
            raise web.HTTPNotFound(headers=HEADERS)
        return asset.response(request)

    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
