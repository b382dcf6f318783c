"""The web page in a real headless Chromium: list, live updates, tabs, hostile mail, 360 px.

Each test starts an ``ehlo.Server`` and the web application over its store
(:class:`tests.browser.WebServer`), and drives Debian's Chromium through
Selenium (:func:`tests.browser.browser`, one for the session). Mail comes in
through smtplib from 127.0.0.5 greeting as ``h5.good.test``, which the
loopback DNS server of :mod:`tests.greeting_zone` resolves back to that
address, so the greeting checks pass (``forward_match`` among them).

The page reads everything from the JSON API. The tests that need its
message endpoints (list, detail, html, text, raw, parts, delete) and its
live events check first that this tree serves them, and skip without them
(fail under CI, like a missing tool).
"""

from __future__ import annotations

import re
import smtplib
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

from ehlo import ServerConfig
from ehlo.config import GreetingConfig
from ehlo.web.page import CSP

from . import greeting_zone as zone
from .browser import HitCounter, WebServer, browser, save_artifact
from .dnsserver import DNSServer
from .helpers import make_config, require

greeting_dns = zone.greeting_dns
__all__ = ["browser", "greeting_dns"]

# The client of these tests: 127.0.0.N greeting as its forward-confirmed name.
N = 5
CLIENT_IP = zone.client_ip(N)
CLIENT_NAME = zone.match_name(N)
HOSTNAME = "mx.ehlo.test"
# Seconds a page may take to show what the API holds (a loaded machine).
WAIT = 30.0
# What the app's handlers are, for a middleware.
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The bound: a new message appears in the open page within 2 s of its 250.
LIVE = 2.0
ATTACHMENT = b"day,count\n2026-12-07,42\n"


def site_config(tmp_path: Path, dns: DNSServer) -> ServerConfig:
    """A server config whose greeting checks ask the test zone."""
    return make_config(
        tmp_path / "data",
        dns_servers=(dns.nameserver,),
        dns_timeout=zone.DNS_TIMEOUT,
        hostname=HOSTNAME,
        # Recorded, never refused; "syntax" enforced so that every check has
        # run before the message is stored, whatever the timing.
        greeting=GreetingConfig(policy="record", checks={"syntax": "reject"}),
    )


@pytest.fixture
def site(tmp_path: Path, greeting_dns: DNSServer) -> Iterator[WebServer]:
    """A server whose greeting checks ask the test zone, and the web app over its store."""
    server = WebServer(site_config(tmp_path, greeting_dns)).start()
    try:
        yield server
    finally:
        server.stop()


@web.middleware
async def no_events(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The app as a server without live events would be: /api/v1/events is not found."""
    if request.path == "/api/v1/events":
        return web.json_response({"error": {"status": 404, "message": "not found"}}, status=404)
    return await handler(request)


def require_api(site: WebServer, *, live: bool = False, sessions: bool = False) -> None:
    """Skip (fail under CI) when this tree does not serve the message API (or the others)."""
    require(site.api_status("/messages") == 200, "the message API (GET /api/v1/messages)")
    if sessions:
        require(site.api_status("/sessions") == 200, "the session log (GET /api/v1/sessions)")
    if live:
        require(site.api_status("/wait?timeout=0") != 404, "the live API (/api/v1/events)")


def send(
    site: WebServer,
    subject: str,
    *,
    text: str = "Hello in plain text.\n",
    html: str | None = None,
    attachment: bool = False,
    helo: bool = False,
    sender: str = "alice@example.org",
    to: str = "bob@example.net",
) -> None:
    """One message from 127.0.0.5 greeting as h5.good.test (EHLO, or HELO)."""
    message = EmailMessage()
    message["From"] = f"Alice <{sender}>"
    message["To"] = f"Bob <{to}>"
    message["Subject"] = subject
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    if attachment:
        message.add_attachment(ATTACHMENT, maintype="text", subtype="csv", filename="report.csv")
    with smtplib.SMTP(
        "127.0.0.1",
        site.smtp_port,
        local_hostname=CLIENT_NAME,
        source_address=(CLIENT_IP, 0),
        timeout=WAIT,
    ) as client:
        if helo:
            client.helo(CLIENT_NAME)
        client.send_message(message, from_addr=sender, to_addrs=[to])


def until(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = WAIT) -> Any:
    # The list is drawn anew as it changes: an element may go stale under a check.
    wait = WebDriverWait(
        driver, timeout, poll_frequency=0.05, ignored_exceptions=[StaleElementReferenceException]
    )
    return wait.until(condition)


def open_page(driver: WebDriver, site: WebServer, hash_: str = "#/") -> None:
    """The page at ``hash_``, with no read marks, its first list shown."""
    driver.get(f"{site.url}/{hash_}")
    driver.execute_script("localStorage.clear()")
    driver.get(f"{site.url}/{hash_}")
    until(driver, lambda d: d.find_element(By.ID, "counts").text.strip() != "")


def items(driver: WebDriver) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, "#messages .item")


def subjects(driver: WebDriver) -> list[str]:
    script = "return [...document.querySelectorAll('#messages .subject')].map(e => e.textContent)"
    return list(driver.execute_script(script))


def counts(driver: WebDriver) -> str:
    return str(driver.find_element(By.ID, "counts").text)


def mode(driver: WebDriver) -> str:
    """What the page shows: "list", "message" or "overview"."""
    return str(driver.find_element(By.TAG_NAME, "body").get_attribute("data-mode"))


def chosen(driver: WebDriver, name: str) -> bool:
    """Whether tab ``name`` is the selected one."""
    return driver.find_element(By.ID, f"tab-{name}").get_attribute("aria-selected") == "true"


def tab(driver: WebDriver, name: str) -> WebElement:
    """Select tab ``name`` (once the message is shown) and wait until its panel is filled."""
    until(driver, lambda d: d.find_elements(By.ID, f"tab-{name}"))
    driver.find_element(By.ID, f"tab-{name}").click()
    until(driver, lambda d: chosen(d, name))
    panel = driver.find_element(By.ID, "panel")
    until(driver, lambda d: panel.get_attribute("data-tab") == name and panel.text.strip() != "")
    return panel


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=WAIT) as answer:
        return bytes(answer.read())


# --- served under its policy (no browser needed) ---------------------------------------


def test_page_and_assets_served_under_a_strict_policy(site: WebServer) -> None:
    with urllib.request.urlopen(f"{site.url}/", timeout=WAIT) as answer:
        assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
        policy = answer.headers["Content-Security-Policy"]
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        index = answer.read().decode()
    assert policy == CSP
    directives = {part.strip() for part in policy.split(";")}
    for directive in (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "frame-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ):
        assert directive in directives
    # Nothing inline: every script and style is a file of /static/.
    assert not re.search(r"<script(?![^>]*\bsrc=)", index)
    assert "<style" not in index and " style=" not in index
    assert not re.search(r"\son[a-z]+=", index)
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', index)
    assert "/static/app.js" in assets and "/static/style.css" in assets
    # The modules the page imports, followed from app.js.
    seen: set[str] = set()
    queue = ["/static/app.js"]
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        text = fetch(site.url + path).decode()
        queue += [f"/static/{name}" for name in re.findall(r'from "\./([\w.-]+)"', text)]
    modules = ("dom", "smtp", "charts", "api", "sessions")
    assert {f"/static/{name}.js" for name in modules} <= seen
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for path in sorted(seen | set(assets)):
        request = urllib.request.Request(site.url + path)
        with urllib.request.urlopen(request, timeout=WAIT) as answer:
            assert answer.headers["Content-Type"].startswith(types[Path(path).suffix]), path
            assert answer.headers["Content-Security-Policy"] == CSP
            etag = answer.headers["ETag"]
        # Asked again with its ETag: 304, nothing sent.
        again = urllib.request.Request(site.url + path, headers={"If-None-Match": etag})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(again, timeout=WAIT)
        assert info.value.code == 304
    for bad in ("/static/nope.js", "/static/..%2Fpage.py", "/static/.keep", "/static/index.htm"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(site.url + bad, timeout=WAIT)
        assert info.value.code == 404, bad


# --- the list, live, and a message's tabs ------------------------------------------------


def test_new_message_appears_live_and_each_tab_shows_it(
    browser: WebDriver, site: WebServer, tmp_path: Path
) -> None:
    require_api(site, live=True)
    driver = browser
    open_page(driver, site)
    until(driver, lambda d: "0 messages" in counts(d))
    # Live events connected before the message is sent: it then comes by them.
    until(driver, lambda d: d.find_element(By.ID, "live").text == "● live")
    driver.execute_script("window.notReloaded = true")
    send(
        site,
        "Quarterly report",
        html="<p>Hello in <b>HTML</b>.</p>",
        attachment=True,
    )
    until(driver, lambda d: subjects(d) == ["Quarterly report"], timeout=LIVE)
    assert driver.execute_script("return window.notReloaded") is True
    item = items(driver)[0]
    assert "unread" in (item.get_attribute("class") or "")
    assert counts(driver) == "1 message, 1 unread"
    assert item.find_element(By.CSS_SELECTOR, ".badge").text == "EHLO"
    assert "alice@example.org" in item.text and "bob@example.net" in item.text
    save_artifact(driver, tmp_path, "list")

    message_id = item.get_attribute("data-id")
    item.click()
    until(driver, lambda d: d.find_elements(By.ID, "panel"))
    assert driver.current_url.endswith(f"#/messages/{message_id}")
    until(driver, lambda d: counts(d) == "1 message, 0 unread")
    assert "unread" not in (items(driver)[0].get_attribute("class") or "")
    assert driver.find_element(By.CSS_SELECTOR, ".view-subject").text == "Quarterly report"

    # HTML: a sandboxed frame without scripts, showing the sanitised part.
    tab(driver, "html")
    frame = driver.find_element(By.ID, "html-frame")
    sandbox = frame.get_attribute("sandbox") or ""
    assert "allow-scripts" not in sandbox and "allow-same-origin" not in sandbox
    assert (frame.get_attribute("src") or "").endswith(f"/api/v1/messages/{message_id}/html")
    driver.switch_to.frame(frame)
    until(driver, lambda d: "Hello in HTML." in d.find_element(By.TAG_NAME, "body").text)
    driver.switch_to.default_content()

    assert "Hello in plain text." in tab(driver, "text").text
    headers = tab(driver, "headers")
    rows = {
        row.find_element(By.TAG_NAME, "th").text: row.find_element(By.TAG_NAME, "td").text
        for row in headers.find_elements(By.CSS_SELECTOR, "tr")
    }
    assert rows["Subject"] == "Quarterly report"
    assert rows["From"] == "Alice <alice@example.org>"
    raw = tab(driver, "raw")
    until(driver, lambda d: "Subject: Quarterly report" in raw.text)
    download = driver.find_element(By.ID, "raw-download").get_attribute("href") or ""
    assert download.endswith(f"/api/v1/messages/{message_id}/raw?download=1")
    attachments = tab(driver, "attachments")
    row = attachments.find_element(By.CSS_SELECTOR, "tr.attachment")
    assert "report.csv" in row.text and "text/csv" in row.text
    link = row.find_element(By.LINK_TEXT, "Download").get_attribute("href") or ""
    assert re.search(rf"/api/v1/messages/{message_id}/parts/\d+$", link)
    assert fetch(link) == ATTACHMENT

    # SMTP: the greeting, what was offered, the checks as chips, the transcript.
    smtp = tab(driver, "smtp")
    assert smtp.find_element(By.CSS_SELECTOR, ".facts .badge").text == "EHLO"
    assert smtp.find_element(By.CSS_SELECTOR, ".greeting-name").text == CLIENT_NAME
    forward = smtp.find_element(By.CSS_SELECTOR, 'tr[data-check="forward_match"]')
    chip = forward.find_element(By.CSS_SELECTOR, ".chip")
    assert chip.text == "pass" and "r-pass" in (chip.get_attribute("class") or "")
    assert CLIENT_IP in forward.text  # the DNS answer behind the pass
    greeting_line = smtp.find_element(By.CSS_SELECTOR, ".transcript tr.t-greeting")
    assert greeting_line.text.lower().endswith(f"ehlo {CLIENT_NAME}")  # as smtplib wrote it
    offered = [e.text for e in smtp.find_elements(By.CSS_SELECTOR, ".chip.ext")]
    assert "PIPELINING" in offered
    save_artifact(driver, tmp_path, "message-smtp")

    # Tabs replace the history entry; back returns to the list.
    driver.back()
    until(driver, lambda d: mode(d) == "list")
    driver.forward()
    until(driver, lambda d: d.find_elements(By.ID, "panel"))


def test_without_live_events_the_list_polls(
    browser: WebDriver, tmp_path: Path, greeting_dns: DNSServer
) -> None:
    server = WebServer(site_config(tmp_path, greeting_dns), middlewares=[no_events]).start()
    try:
        require_api(server)
        driver = browser
        open_page(driver, server)
        until(driver, lambda d: d.find_element(By.ID, "live").text == "○ polling")
        driver.execute_script("window.notReloaded = true")
        send(server, "Polled in")
        # The list asks again every 3 s while there are no events.
        until(driver, lambda d: subjects(d) == ["Polled in"])
        assert driver.execute_script("return window.notReloaded") is True
        assert counts(driver) == "1 message, 1 unread"
        # Deleted elsewhere (here: through the API): gone from the list too.
        request = urllib.request.Request(f"{server.url}/api/v1/messages", method="DELETE")
        with urllib.request.urlopen(request, timeout=WAIT) as answer:
            assert answer.status == 200
        until(driver, lambda d: subjects(d) == [] and counts(d) == "0 messages, 0 unread")
    finally:
        server.stop()


def test_hostile_html_runs_nothing_and_fetches_nothing(
    browser: WebDriver, site: WebServer, tmp_path: Path
) -> None:
    require_api(site)
    counter = HitCounter(site).start()
    try:
        _hostile(browser, site, counter)
    finally:
        counter.stop()


def _hostile(driver: WebDriver, site: WebServer, counter: HitCounter) -> None:
    remote = counter.url
    html = f"""<html><head>
<meta http-equiv="refresh" content="0;url={remote}/refresh">
<link rel="stylesheet" href="{remote}/x.css">
<style>body {{ background: url({remote}/css) }}</style>
</head><body>
<p id="hostile">Hostile message</p>
<script>window.top.pwned = 1; window.pwned = 1;</script>
<img src="x" onerror="window.top.pwned = 1; window.pwned = 1">
<a href="javascript:window.top.pwned=1">click</a>
<div style="background: url({remote}/inline-css)">styled</div>
<img src="{remote}/img" alt="remote">
</body></html>"""
    send(site, "Hostile", html=html)
    open_page(driver, site)
    until(driver, lambda d: subjects(d) == ["Hostile"])
    items(driver)[0].click()
    tab(driver, "html")
    frame = driver.find_element(By.ID, "html-frame")
    driver.switch_to.frame(frame)
    until(driver, lambda d: "Hostile message" in d.find_element(By.TAG_NAME, "body").text)
    # Time for a refresh, an error handler or a stylesheet to act.
    time.sleep(2.0)
    assert "Hostile message" in driver.find_element(By.TAG_NAME, "body").text  # not refreshed away
    assert driver.execute_script("return typeof window.pwned") == "undefined"
    driver.switch_to.default_content()
    assert driver.execute_script("return typeof window.pwned") == "undefined"
    assert sum(counter.hits.values()) == 0, dict(counter.hits)

    # The /html address opened on its own is just as inert (its own CSP and sandbox).
    html_url = frame.get_attribute("src")
    page = driver.current_window_handle
    driver.switch_to.new_window("tab")
    try:
        driver.get(str(html_url))
        until(driver, lambda d: "Hostile message" in d.find_element(By.TAG_NAME, "body").text)
        time.sleep(2.0)
        assert "Hostile message" in driver.find_element(By.TAG_NAME, "body").text
        assert driver.execute_script("return typeof window.pwned") == "undefined"
    finally:
        driver.close()
        driver.switch_to.window(page)
    assert sum(counter.hits.values()) == 0, dict(counter.hits)

    # Asked for: the remote image loads (so the counter does see requests),
    # and still no stylesheet, refresh or script.
    driver.find_element(By.ID, "remote-images").click()
    until(driver, lambda d: counter.hits["/img"] >= 1)
    driver.switch_to.frame(driver.find_element(By.ID, "html-frame"))
    until(driver, lambda d: "Hostile message" in d.find_element(By.TAG_NAME, "body").text)
    time.sleep(1.0)
    assert driver.execute_script("return typeof window.pwned") == "undefined"
    driver.switch_to.default_content()
    assert driver.execute_script("return typeof window.pwned") == "undefined"
    # Images in CSS are images too (they may load now); never a stylesheet or a refresh.
    assert set(counter.hits) <= {"/img", "/css", "/inline-css"}, dict(counter.hits)


# --- a phone's width ------------------------------------------------------------------------


def test_usable_at_360_px(browser: WebDriver, site: WebServer, tmp_path: Path) -> None:
    require_api(site)
    driver = browser
    send(
        site,
        "A subject long enough to need more than one line on a phone screen, surely",
        html="<p>" + "wide " * 200 + "</p>",
        attachment=True,
        to="a.very.long.recipient.address.for.a.narrow.screen@example.net",
    )
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 360, "height": 780, "deviceScaleFactor": 1, "mobile": True},
    )
    try:
        open_page(driver, site)
        until(driver, lambda d: len(items(d)) == 1)

        def fits(d: WebDriver) -> bool:
            return bool(d.execute_script("return document.documentElement.scrollWidth <= 360"))

        assert fits(driver)
        assert not driver.find_element(By.ID, "view-pane").is_displayed()
        items(driver)[0].click()
        until(driver, lambda d: d.find_elements(By.ID, "panel"))
        # Stacked: the list gives way to the view, which takes the whole width.
        assert not driver.find_element(By.ID, "list-pane").is_displayed()
        assert driver.find_element(By.ID, "view").size["width"] >= 300
        for name in ("html", "text", "headers", "raw", "attachments", "smtp"):
            tab(driver, name)
            assert fits(driver), name
        save_artifact(driver, tmp_path, "message-smtp-360")
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        until(driver, lambda d: d.find_element(By.ID, "list-pane").is_displayed())
        driver.get(f"{site.url}/#/overview")
        until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "svg.bars rect"))
        assert fits(driver)
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


# --- keys, search, delete ----------------------------------------------------------------------


def test_keyboard_moves_opens_deletes(browser: WebDriver, site: WebServer) -> None:
    require_api(site)
    driver = browser
    for subject in ("first", "second", "third"):
        send(site, subject)
    open_page(driver, site)
    until(driver, lambda d: subjects(d) == ["third", "second", "first"])
    body = driver.find_element(By.TAG_NAME, "body")

    def selected(d: WebDriver) -> str:
        return str(d.find_element(By.CSS_SELECTOR, "#messages .item.selected .subject").text)

    assert selected(driver) == "third"
    body.send_keys("j")
    until(driver, lambda d: selected(d) == "second")
    body.send_keys(Keys.ARROW_DOWN)
    until(driver, lambda d: selected(d) == "first")
    body.send_keys("k")
    until(driver, lambda d: selected(d) == "second")
    body.send_keys(Keys.ENTER)
    until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".view-subject"))
    assert driver.find_element(By.CSS_SELECTOR, ".view-subject").text == "second"
    # The tabs are an ARIA tablist: the arrow keys move between them.
    tabs = driver.find_element(By.CSS_SELECTOR, "[role=tablist]")
    assert len(tabs.find_elements(By.CSS_SELECTOR, "[role=tab]")) == 6
    driver.find_element(By.ID, "tab-headers").click()
    driver.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    until(driver, lambda d: chosen(d, "raw"))
    assert driver.switch_to.active_element.get_attribute("id") == "tab-raw"
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    until(driver, lambda d: mode(d) == "list")

    body.send_keys("/")
    until(driver, lambda d: d.switch_to.active_element.get_attribute("id") == "search")
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    until(driver, lambda d: d.switch_to.active_element.get_attribute("id") != "search")

    # d asks first; Cancel keeps the message, Delete removes it.
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys("d")
    until(driver, lambda d: d.find_element(By.ID, "confirm").get_attribute("open") is not None)
    driver.find_element(By.ID, "confirm-cancel").click()
    until(driver, lambda d: d.find_element(By.ID, "confirm").get_attribute("open") is None)
    assert subjects(driver) == ["third", "second", "first"]
    body.send_keys(Keys.DELETE)
    until(driver, lambda d: d.find_element(By.ID, "confirm").get_attribute("open") is not None)
    driver.find_element(By.ID, "confirm-ok").click()
    until(driver, lambda d: subjects(d) == ["third", "first"])
    assert site.api("/messages")["total"] == 2
    until(driver, lambda d: counts(d).startswith("2 messages"))


def test_search_read_marks_and_delete_all(browser: WebDriver, site: WebServer) -> None:
    require_api(site)
    driver = browser
    send(site, "alpha invoice")
    send(site, "beta newsletter", sender="news@example.com")
    open_page(driver, site)
    until(driver, lambda d: len(items(d)) == 2)
    assert counts(driver) == "2 messages, 2 unread"
    search = driver.find_element(By.ID, "search")
    search.send_keys("subject:alpha", Keys.ENTER)
    until(driver, lambda d: subjects(d) == ["alpha invoice"])
    items(driver)[0].click()
    until(driver, lambda d: counts(d) == "2 messages, 1 unread")
    # Read marks survive a reload (they are kept in localStorage).
    driver.get(f"{site.url}/#/")
    driver.refresh()
    until(driver, lambda d: len(items(d)) == 2)
    until(driver, lambda d: counts(d) == "2 messages, 1 unread")
    unread = driver.find_elements(By.CSS_SELECTOR, "#messages .item.unread .subject")
    assert [e.text for e in unread] == ["beta newsletter"]
    # A bad query is named under the box, not a blank page.
    search = driver.find_element(By.ID, "search")
    search.send_keys("nosuchoperator:x", Keys.ENTER)
    until(driver, lambda d: d.find_element(By.ID, "search-error").is_displayed())
    assert "nosuchoperator" in driver.find_element(By.ID, "search-error").text
    search.clear()
    search.send_keys(Keys.ENTER)
    until(driver, lambda d: len(items(d)) == 2)
    driver.find_element(By.ID, "delete-all").click()
    until(driver, lambda d: d.find_element(By.ID, "confirm").get_attribute("open") is not None)
    driver.find_element(By.ID, "confirm-ok").click()
    until(driver, lambda d: not items(d) and counts(d) == "0 messages, 0 unread")
    assert site.api("/messages")["total"] == 0


# --- the overview -------------------------------------------------------------------------


def test_overview_page_charts(browser: WebDriver, site: WebServer, tmp_path: Path) -> None:
    driver = browser
    send(site, "by EHLO")
    send(site, "by HELO", helo=True)
    driver.get(f"{site.url}/#/overview")

    def drawn(d: WebDriver) -> dict[str, Any] | None:
        """What the overview shows, read at once (it is drawn anew as mail comes)."""
        shown: dict[str, Any] = d.execute_script(
            """const pane = document.getElementById("overview-pane");
            const all = (css) => [...pane.querySelectorAll(css)].map((e) => e.textContent);
            return {text: pane.textContent, bars: all("svg.bars rect.bar").length,
                    legend: all(".legend .chip"), names: all(".top-names tr")};"""
        )
        done = shown["bars"] == 60 and "2 in the last 60 minutes" in shown["text"]
        return shown if done else None

    try:
        shown = until(driver, drawn)
    except TimeoutException:
        pane = driver.find_element(By.ID, "overview-pane")
        pytest.fail(f"no chart of 2 messages over 60 minutes; the pane shows: {pane.text!r}")
    legend = shown["legend"]
    assert "EHLO 1 (50%)" in legend and "HELO 1 (50%)" in legend
    assert "plain 2 (100%)" in legend
    assert "forward_match" in shown["text"] and "pass 2 (100%)" in legend
    assert shown["names"] == [f"{CLIENT_NAME}2"]
    assert driver.find_element(By.ID, "nav-overview").get_attribute("aria-current") == "page"
    save_artifact(driver, tmp_path, "overview")
    # Esc goes back to the list.
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    until(driver, lambda d: mode(d) == "list")


# --- the sessions -----------------------------------------------------------------------------


def test_sessions_with_and_without_a_message(browser: WebDriver, site: WebServer) -> None:
    require_api(site, sessions=True)
    driver = browser
    send(site, "in a session")
    with smtplib.SMTP(
        "127.0.0.1",
        site.smtp_port,
        local_hostname=CLIENT_NAME,
        source_address=(CLIENT_IP, 0),
        timeout=WAIT,
    ) as client:
        client.ehlo()
        client.noop()
    until(driver, lambda d: len(site.api("/sessions")["sessions"]) == 2)
    open_page(driver, site, "#/sessions")
    rows = until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#sessions-pane tr.session"))
    assert len(rows) == 2
    assert driver.find_element(By.ID, "nav-sessions").get_attribute("aria-current") == "page"
    empty = rows[0]  # the newest
    assert CLIENT_NAME in empty.text and "EHLO" in empty.text and "221" in empty.text
    until(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#sessions-pane tr.session")[0].click() or True,
    )
    detail = driver.find_element(By.ID, "session-detail")
    until(driver, lambda d: "No message was stored" in detail.text)
    assert detail.find_element(By.CSS_SELECTOR, ".greeting-name").text == CLIENT_NAME
    lines = detail.find_elements(By.CSS_SELECTOR, ".transcript tr.t-c .t-text")
    assert [e.text.upper() for e in lines[-2:]] == ["NOOP", "QUIT"]  # as smtplib wrote them
    forward = detail.find_element(By.CSS_SELECTOR, 'tr[data-check="forward_match"] .chip')
    assert forward.text == "pass"
    # The other session stored the message: its link opens the message's SMTP tab.
    # (The table is drawn anew as it changes: a click on a stale row is tried again.)
    until(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#sessions-pane tr.session")[1].click() or True,
    )
    until(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#session-detail a").click() or True)
    until(driver, lambda d: mode(d) == "message" and chosen(d, "smtp"))
    assert driver.find_element(By.CSS_SELECTOR, ".view-subject").text == "in a session"
