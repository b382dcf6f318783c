"""Make docs/screenshot-smtp.png: the web page's message view on its SMTP tab.

Run from the top of the repository with the test tools installed
(``make setup``) and Debian's chromium and chromium-driver::

    .venv/bin/python scripts/screenshot.py [OUTPUT.png]

It starts what the page's tests start (``tests/browser.py``): an ehlo server
with a SQLite store in a temporary folder whose greeting checks ask the
loopback DNS server of the test zone (``tests/greeting_zone.py``), and the
web application over that store; sends a few realistic messages with
smtplib from different loopback addresses (a forward-confirmed EHLO over
STARTTLS, a greeting name that resolves elsewhere, a bare HELO), then opens
the first one's SMTP tab in headless Chromium and saves the window.
"""

from __future__ import annotations

import smtplib
import ssl
import sys
import tempfile
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402
from tests import greeting_zone as zone  # noqa: E402
from tests.browser import WebServer, chromium_available, make_driver  # noqa: E402
from tests.helpers import make_config  # noqa: E402

from ehlo.config import GreetingConfig  # noqa: E402

WAIT = 60.0


def send(
    site: WebServer,
    n: int,
    name: str,
    subject: str,
    *,
    helo: bool = False,
    tls: bool = False,
    html: str | None = None,
) -> None:
    """A message from 127.0.0.n greeting as ``name``."""
    message = EmailMessage()
    message["From"] = "Build Bot <builds@ci.example.org>"
    message["To"] = "Dev Team <dev@example.net>"
    message["Subject"] = subject
    message.set_content("The nightly build passed: 1,204 tests, 0 failures.\n")
    if html is not None:
        message.add_alternative(html, subtype="html")
    with smtplib.SMTP(
        "127.0.0.1", site.smtp_port, local_hostname=name, source_address=(zone.client_ip(n), 0)
    ) as client:
        if helo:
            client.helo(name)
        elif tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # the test server's self-signed certificate
            client.starttls(context=context)
        client.send_message(message, to_addrs=["dev@example.net"])


def main() -> int:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "screenshot-smtp.png"
    if not chromium_available():
        print("screenshot: needs chromium and chromium-driver, and selenium", file=sys.stderr)
        return 1
    dns = zone.start_server()
    with tempfile.TemporaryDirectory(prefix="ehlo-screenshot-") as folder:
        config = make_config(
            Path(folder) / "data",
            dns_servers=(dns.nameserver,),
            dns_timeout=zone.DNS_TIMEOUT,
            hostname="mx.ehlo.test",
            greeting=GreetingConfig(policy="record", checks={"syntax": "reject"}),
        )
        site = WebServer(config).start()
        driver = make_driver(Path(folder) / "profile", width=1360, height=2000)
        try:
            send(site, 9, zone.MISMATCH, "Your invoice #4471", helo=True)
            send(site, 12, zone.match_name(40), "Password reset requested")
            send(
                site,
                5,
                zone.match_name(5),
                "Nightly build #1290 passed",
                tls=True,
                html="<h1>Build passed</h1><p>1,204 tests, 0 failures.</p>",
            )
            driver.get(f"{site.url}/#/")
            wait = WebDriverWait(driver, WAIT)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#messages .item")) == 3)
            newest = driver.find_elements(By.CSS_SELECTOR, "#messages .item")[0]
            newest_id = newest.get_attribute("data-id")
            driver.get(f"{site.url}/#/messages/{newest_id}/smtp")
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#panel .transcript"))
            output.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(output))
        finally:
            driver.quit()
            site.stop()
            dns.stop()
    print(f"screenshot: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
