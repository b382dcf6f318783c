"""The API's answers for bad input: one JSON shape for every error.

Every error the API gives is ``{"error": {"status": N, "message": "..."}}``
with the HTTP status N; a handler raises :class:`ApiError` and the app's
middleware writes it. Nothing else reaches a client: an unexpected exception
is logged and answered 500 in the same shape, never as a traceback.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

__all__ = ["ApiError", "error_response", "json_response"]


class ApiError(Exception):
    """An answer other than success: its HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> web.Response:
    """The JSON body of an error with ``status``."""
    return json_response({"error": {"status": status, "message": message}}, status=status)


def json_response(data: Any, status: int = 200) -> web.Response:
    """``data`` as compact JSON (UTF-8, ``application/json``)."""
    return web.json_response(data, status=status, dumps=_dumps)


def _dumps(data: Any) -> str:
    import json

    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
