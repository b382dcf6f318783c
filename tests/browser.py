"""A headless Chromium for the page's tests, and the web app over a real server.

:func:`browser` is a session-wide Selenium driver of Debian's ``chromium``
through its ``chromedriver`` (nothing downloaded; without them a test skips,
or fails when CI is set). :class:`WebServer` runs an ``ehlo.Server`` (real
SQLite store in a test folder) in a thread of its own, with the web
application (``ehlo.web.build_app``) over that server's store served by
aiohttp on 127.0.0.1 port 0 in the same event loop, so blocking clients
(smtplib, the driver) talk to both. :class:`HitCounter` is a small HTTP
server that counts the requests it gets: what a hostile message must never
reach. :func:`save_artifact` keeps a screenshot in the test's folder, and
under ``test-artifacts/`` at the top of the repository when ``EHLO_ARTIFACTS``
is set (CI keeps that folder).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from ehlo import ServerConfig
from ehlo.web import WebContext, build_app

from .helpers import ThreadedServer, require

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.remote.webdriver import WebDriver
except ImportError:  # pragma: no cover - selenium is a test dependency
    webdriver = None  # type: ignore[assignment]

__all__ = [
    "CHROMEDRIVER",
    "CHROMIUM",
    "HitCounter",
    "WebServer",
    "browser",
    "chromium_available",
    "make_driver",
    "save_artifact",
]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# The folder at the top of the repository that CI keeps (with EHLO_ARTIFACTS set).
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
# Seconds a blocking call into the server's loop may take.
LOOP_TIMEOUT = 60.0

T = TypeVar("T")


def chromium_available() -> bool:
    """Debian's chromium and chromium-driver, and selenium, are all here."""
    return webdriver is not None and CHROMIUM.exists() and CHROMEDRIVER.exists()


def make_driver(profile: Path, width: int = 1280, height: int = 900) -> WebDriver:
    """A headless Chromium with a profile folder of its own, ``width`` x ``height``."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--metrics-recording-only",
        "--force-color-profile=srgb",
        "--lang=en-GB",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    # A loaded machine: pages and scripts get time.
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    return driver


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """One headless Chromium for the whole session (each test opens its own page)."""
    require(
        chromium_available(),
        "chromium and chromium-driver (Debian) and selenium are needed for the page's tests",
    )
    driver = make_driver(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()


def save_artifact(driver: WebDriver, folder: Path, name: str) -> Path:
    """A screenshot of the window as ``folder/name.png`` (and under ``test-artifacts/``)."""
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot saved at {path}"
    if os.environ.get("EHLO_ARTIFACTS"):
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copyfile(path, ARTIFACTS / path.name)
    return path


class WebServer:
    """An ehlo server and the web app over its store, in one thread and event loop.

    ``middlewares`` go before the app's own (a test may hide an endpoint).
    """

    def __init__(self, config: ServerConfig, middlewares: list[Any] | None = None) -> None:
        self.smtp = ThreadedServer(config)
        self.middlewares = middlewares or []
        self._runner: web.AppRunner | None = None
        self.web_port = 0

    def start(self) -> WebServer:
        self.smtp.start()
        self.run(self._start_web())
        return self

    async def _start_web(self) -> None:
        assert self.smtp.server is not None
        app = build_app(WebContext(store=self.smtp.server.store), middlewares=self.middlewares)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.web_port = self._runner.addresses[0][1]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` in the server's loop; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.smtp.loop).result(LOOP_TIMEOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def smtp_port(self) -> int:
        return self.smtp.port

    def api(self, path: str) -> Any:
        """``GET /api/v1{path}`` as JSON (an HTTP error raises ``urllib.error.HTTPError``)."""
        with urllib.request.urlopen(f"{self.url}/api/v1{path}", timeout=30) as answer:
            return json.load(answer)

    def api_status(self, path: str) -> int:
        """The status of ``GET /api/v1{path}``."""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1{path}", timeout=30) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def stop(self) -> None:
        if self._runner is not None:
            self.run(self._runner.cleanup())
            self._runner = None
        self.smtp.stop()


class HitCounter:
    """An HTTP server on 127.0.0.1 that answers everything and counts each path asked."""

    def __init__(self, web_server: WebServer) -> None:
        self._server = web_server
        self.hits: collections.Counter[str] = collections.Counter()
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        if request.path.endswith(".css"):
            return web.Response(text="body { background: red; }", content_type="text/css")
        # A 1x1 GIF, whatever was asked.
        gif = bytes.fromhex(
            "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b"
        )
        return web.Response(body=gif, content_type="image/gif")

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> HitCounter:
        self._server.run(self._start())
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._runner is not None:
            self._server.run(self._runner.cleanup())
            self._runner = None
