"""What every request passes before a handler: the login, the origin check, safe headers.

- :func:`login` (when the context has a users file, ``ehlo serve
  --http-auth``): HTTP Basic (RFC 7617) against the users file, the
  Argon2id check run in a thread; a successful (user, password) pair is
  remembered for :data:`LOGIN_CACHE_SECONDS`, so the many requests of one
  page cost one hash. Without valid credentials: 401 with
  ``WWW-Authenticate: Basic realm="ehlo"``. ``/healthz`` stays open (it
  tells nothing but "ok").
- :func:`same_origin`: a request that changes something (DELETE, POST, PUT,
  PATCH) whose ``Origin`` is not this server's own, or that has no
  ``Origin`` but a ``Sec-Fetch-Site: cross-site``, is refused with 403: a
  page elsewhere cannot make the browser delete mail here.
- :func:`security_headers` (on every response, streams and files too):
  ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``,
  ``X-Frame-Options: SAMEORIGIN``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from ._errors import error_response

if TYPE_CHECKING:
    from ..auth.users import UserStore

__all__ = ["LOGIN_CACHE_SECONDS", "login", "same_origin", "security_headers"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

# Seconds a verified (user, password) pair is taken without hashing again.
LOGIN_CACHE_SECONDS = 60.0
# Pairs remembered at most (the oldest forgotten first).
_LOGIN_CACHE_SIZE = 256
# Paths open without a login.
_OPEN_PATHS = frozenset({"/healthz", "/api/v1/healthz"})
_CHANGING = frozenset({"DELETE", "POST", "PUT", "PATCH"})

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "SAMEORIGIN",
}


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the headers every answer carries (a handler's own win)."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


@web.middleware
async def same_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
    """403 for a state-changing request from another origin."""
    if request.method in _CHANGING:
        origin = request.headers.get("Origin")
        if origin is not None:
            own = f"{request.scheme}://{request.host}".lower()
            if origin.strip().lower().rstrip("/") != own:
                return error_response(403, f"cross-origin {request.method} refused")
        elif request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
            return error_response(403, f"cross-site {request.method} refused")
    return await handler(request)


def login(users: UserStore, clock: Callable[[], float] = time.monotonic) -> Middleware:
    """The HTTP Basic middleware over ``users``."""
    # sha256 of a per-process key, the user and the password -> when it expires.
    remembered: dict[bytes, float] = {}
    key = secrets.token_bytes(32)

    def refused() -> web.StreamResponse:
        response = error_response(401, "log in with a user of the users file (ehlo users add)")
        response.headers["WWW-Authenticate"] = 'Basic realm="ehlo", charset="UTF-8"'
        return response

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in _OPEN_PATHS:
            return await handler(request)
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic" or not encoded.strip():
            return refused()
        try:
            # RFC 7617 section 2.1: user-id ":" password, in UTF-8 here.
            text = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return refused()
        name, colon, password = text.partition(":")
        if not colon or not name:
            return refused()
        digest = hmac.new(key, f"{name}\0{password}".encode(), hashlib.sha256).digest()
        now = clock()
        until = remembered.get(digest)
        if until is None or until < now:
            remembered.pop(digest, None)
            if not await asyncio.to_thread(users.verify, name, password):
                return refused()
            if len(remembered) >= _LOGIN_CACHE_SIZE:
                remembered.pop(next(iter(remembered)))
            remembered[digest] = now + LOGIN_CACHE_SECONDS
        return await handler(request)

    return check
