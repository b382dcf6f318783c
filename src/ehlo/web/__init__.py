"""See the mail: the HTTP API, the web page and the metrics over what ehlo holds.

``build_app(WebContext)`` is an aiohttp application: the JSON API under
``/api/v1`` (messages, search, wait, events, sessions), ``/metrics`` and
``/healthz``, and the page (``static/``). The server runs it in one process
(``ehlo serve --http``); it reads the store every worker writes. Nothing here
imports the server: what the app needs (the store, the users file, the
metrics text) is handed to it in a :class:`WebContext`.
"""

from __future__ import annotations

from ._app import WebContext, build_app

__all__ = ["WebContext", "build_app", "read_package_data"]


def read_package_data() -> None:
    """Read the page's files and the OpenAPI document now, once: a server
    that gives up root before it serves (``--user``) may not be allowed to
    read the Python installation afterwards."""
    from ._service import openapi_document
    from .page import load_assets

    load_assets()
    openapi_document()
