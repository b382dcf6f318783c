"""The API's answers for bad input: one JSON shape for every error.

Every error the API gives is ``{"error": {"status": N, "message": "..."}}``
with the HTTP status N; a handler raises :class:`ApiError` and the app's
middleware writes it. Nothing else reaches a client: an unexpected exception
is logged and answered 500 in the same shape, never as a traceback.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

__all__ = ["ApiError", "error_response", "json_response", "query_number"]


class ApiError(Exception):
    """An answer other than success: its HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def query_number(
    request: web.Request, name: str, default: float, low: float, high: float, *, whole: bool = True
) -> float:
    """The query parameter ``name`` as a number from ``low`` to ``high``
    (``default`` when absent or empty); a 400 naming it otherwise."""
    text = request.query.get(name, "").strip()
    if not text:
        return default
    kind = "a whole number" if whole else "a number"
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        raise ApiError(400, f"{name}: expected {kind}, got {text!r}") from None
    if not low <= value <= high:  # NaN too
        raise ApiError(400, f"{name}: expected {kind} from {low:g} to {high:g}, got {text!r}")
    return value


def error_response(status: int, message: str) -> web.Response:
    """The JSON body of an error with ``status``."""
    return json_response({"error": {"status": status, "message": message}}, status=status)


def json_response(data: Any, status: int = 200) -> web.Response:
    """``data`` as compact JSON (UTF-8, ``application/json``)."""
    return web.json_response(data, status=status, dumps=_dumps)


def _dumps(data: Any) -> str:
    import json

    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
