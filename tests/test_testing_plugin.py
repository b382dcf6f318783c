"""The pytest plugin (ehlo.testing): test files that use its fixtures, run by pytester.

Each test writes a small test file, runs it in a pytest subprocess (the
plugin is loaded there through its ``pytest11`` entry point, as in any
project that installs ehlo) and checks the outcomes and what was printed.
Also the server's ``on_stored`` callback the plugin waits on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import aiosmtplib
import pytest

from ehlo import Server
from ehlo.storage import Envelope

from .helpers import make_config

pytest_plugins = ["pytester"]

# Seconds a pytest subprocess may take on a busy machine.
_RUN_TIMEOUT = 300


def run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    """Run ``source`` as a test file in a pytest subprocess (entry-point plugins loaded)."""
    pytester.makepyfile(test_app=textwrap.dedent(source))
    return pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
        *args,
        timeout=_RUN_TIMEOUT,
    )


SEND = """
import smtplib


def send(server, to="bob@example.com", subject="Hello", body="Hi Bob", sender="alice@example.com"):
    message = f"From: {sender}\\r\\nTo: {to}\\r\\nSubject: {subject}\\r\\n\\r\\n{body}\\r\\n"
    with smtplib.SMTP(server.host, server.port, local_hostname="app.example") as client:
        client.sendmail(sender, [to], message)
"""


def test_entry_point_declares_the_plugin() -> None:
    found = [ep for ep in entry_points(group="pytest11") if ep.name == "ehlo"]
    assert [ep.value for ep in found] == ["ehlo.testing"]


def test_importing_the_plugin_starts_nothing_and_loads_no_server() -> None:
    code = (
        "import sys, threading, json, ehlo.testing as t\n"
        "print(json.dumps({'fixtures': [hasattr(t, n) for n in ('smtp_server',"
        " 'async_smtp_server')], 'loaded': sorted(m for m in sys.modules if m.startswith("
        "('ehlo.server', 'ehlo.storage', 'ehlo.config', 'ehlo.greeting', 'aiohttp'))),"
        " 'threads': threading.active_count()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    facts = json.loads(out.stdout)
    assert facts == {"fixtures": [True, True], "loaded": [], "threads": 1}


def test_smtp_server_with_smtplib_wait_for_clear_and_timeout(pytester: pytest.Pytester) -> None:
    ports = pytester.path / "ports.txt"
    result = run(
        pytester,
        SEND
        + f"""
import re
import threading
import time

PORTS = {str(ports)!r}


def test_send_and_wait(smtp_server):
    send(smtp_server)
    got = smtp_server.wait_for(to="BOB@example.com")
    assert got.subject == "Hello"
    assert got.text == "Hi Bob\\n"
    assert (got.mail_from, got.rcpt_to) == ("alice@example.com", ["bob@example.com"])
    assert (got.greeting, got.greeting_name) == ("EHLO", "app.example")
    assert got.greeting_checks["syntax"]["result"] == "pass"
    assert got.tls is None and got.auth is None
    assert got.message["To"] == "bob@example.com"
    assert got.raw.startswith(b"Received: ") and got.raw.endswith(b"Hi Bob\\r\\n")
    assert [m.id for m in smtp_server.messages] == [got.id]
    with open(PORTS, "a") as f:
        f.write(f"{{smtp_server.port}} {{len(smtp_server.messages)}}\\n")


def test_a_second_server_of_its_own(smtp_server):
    assert smtp_server.messages == []
    send(smtp_server, subject="Second")
    assert smtp_server.wait_for(subject=re.compile("^Sec")).subject == "Second"
    with open(PORTS, "a") as f:
        f.write(f"{{smtp_server.port}} {{len(smtp_server.messages)}}\\n")


def test_each_wait_returns_the_next_message(smtp_server):
    send(smtp_server, subject="one")
    send(smtp_server, subject="two")
    assert smtp_server.wait_for(to="bob@example.com").subject == "one"
    assert smtp_server.wait_for(to="bob@example.com").subject == "two"
    assert [m.subject for m in smtp_server.messages] == ["one", "two"]


def test_waits_for_mail_sent_later(smtp_server):
    sender = threading.Timer(0.3, send, (smtp_server,), {{"subject": "late"}})
    sender.start()
    started = time.monotonic()
    try:
        assert smtp_server.wait_for(subject="late", timeout=60).subject == "late"
    finally:
        sender.join()
    # Woken by the commit, not found by a last look when the time ran out.
    assert time.monotonic() - started < 30


def test_clear(smtp_server):
    send(smtp_server, subject="before")
    smtp_server.wait_for(subject="before")
    smtp_server.clear()
    assert smtp_server.messages == []
    send(smtp_server, subject="after")
    assert smtp_server.wait_for().subject == "after"
    assert [m.subject for m in smtp_server.messages] == ["after"]


def test_timeout_names_what_arrived(smtp_server):
    send(smtp_server, to="carol@example.com", subject="For Carol")
    smtp_server.wait_for(to="nobody@example.com", subject="Report", timeout=0.5)
""",
    )
    result.assert_outcomes(passed=5, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*TimeoutError: no message with to='nobody@example.com', subject='Report'"
            " arrived within 0.5 s; received 1:",
            "*1. from <alice@example.com> to <carol@example.com> subject 'For Carol' (id *)",
        ]
    )
    # The plugin's own frames are hidden: the failure points at the test's line.
    assert "ehlo/testing.py" not in result.stdout.str()
    seen = [line.split() for line in ports.read_text().splitlines()]
    assert len(seen) == 2 and seen[0][0] != seen[1][0]  # two servers, one per test
    assert [count for _, count in seen] == ["1", "1"]  # each with its own store


def test_marker_options_tls_size_auth_and_bad_keys(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        SEND
        + """
import smtplib
import ssl

import pytest

pytestmark = pytest.mark.ehlo(size=100_000)


@pytest.mark.ehlo(tls=True)
def test_starttls_with_the_self_signed_certificate(smtp_server):
    context = ssl.create_default_context(cafile=str(smtp_server.tls_cert))
    context.check_hostname = False  # the certificate names localhost; we dial 127.0.0.1
    with smtplib.SMTP(smtp_server.host, smtp_server.port, local_hostname="app.example") as c:
        c.starttls(context=context)
        c.sendmail("a@example.com", ["b@example.com"], "Subject: secret\\r\\n\\r\\nx\\r\\n")
    got = smtp_server.wait_for(subject="secret")
    assert got.tls["version"].startswith("TLSv1.")


def test_no_tls_by_default(smtp_server):
    with smtplib.SMTP(smtp_server.host, smtp_server.port, local_hostname="app.example") as c:
        c.ehlo()
        assert not c.has_extn("starttls")
    assert smtp_server.tls_cert is None


@pytest.mark.ehlo(size=1000)
def test_size_limit(smtp_server):
    with smtplib.SMTP(smtp_server.host, smtp_server.port, local_hostname="app.example") as c:
        c.ehlo()
        assert c.esmtp_features["size"] == "1000"
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            c.sendmail("a@example.com", ["b@example.com"], "Subject: big\\r\\n\\r\\n" + "x" * 2000)
        assert refused.value.smtp_code == 552
    send(smtp_server, subject="small")
    assert [m.subject for m in smtp_server.messages] == ["small"]


def test_size_from_the_module_marker(smtp_server):
    with smtplib.SMTP(smtp_server.host, smtp_server.port, local_hostname="app.example") as c:
        c.ehlo()
        assert c.esmtp_features["size"] == "100000"


@pytest.mark.ehlo(auth_users={"alice": "s3cret"})
def test_auth_users(smtp_server):
    with smtplib.SMTP(smtp_server.host, smtp_server.port, local_hostname="app.example") as c:
        c.login("alice", "s3cret")
        c.sendmail("alice@example.com", ["b@example.com"], "Subject: signed in\\r\\n\\r\\nx\\r\\n")
    assert smtp_server.wait_for(mail_from="alice@example.com").auth == "alice"


@pytest.mark.ehlo(domains=["example.com"])
def test_any_config_key(smtp_server):
    with smtplib.SMTP(smtp_server.host, smtp_server.port, local_hostname="app.example") as c:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            c.sendmail("a@example.com", ["b@elsewhere.example"], "Subject: x\\r\\n\\r\\nx\\r\\n")


@pytest.mark.ehlo(max_recipientz=5)
def test_unknown_key(smtp_server):
    pass
""",
    )
    result.assert_outcomes(passed=6, errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.ehlo: *max_recipientz*"])


def test_async_smtp_server_in_the_tests_loop(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
import asyncio

import aiosmtplib
import pytest


async def send(server, subject):
    await aiosmtplib.send(
        f"Subject: {subject}\\r\\n\\r\\nbody\\r\\n",
        sender="a@example.com",
        recipients=["b@example.com"],
        hostname=server.host,
        port=server.port,
        local_hostname="async.example",
        start_tls=False,
    )


@pytest.mark.asyncio
async def test_wait_for(async_smtp_server):
    assert async_smtp_server.messages == []
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiter = asyncio.ensure_future(async_smtp_server.wait_for(to="b@example.com", timeout=60))
    await asyncio.sleep(0)  # waiting before the message is sent
    await send(async_smtp_server, "async hello")
    got = await waiter
    assert loop.time() - started < 30  # woken by the commit, not by the timeout
    assert (got.subject, got.greeting_name) == ("async hello", "async.example")
    async_smtp_server.clear()
    assert async_smtp_server.messages == []


@pytest.mark.asyncio
@pytest.mark.ehlo(size=2000)
async def test_options_and_timeout(async_smtp_server):
    client = aiosmtplib.SMTP(
        hostname=async_smtp_server.host, port=async_smtp_server.port, start_tls=False
    )
    await client.connect()
    await client.ehlo()
    assert client.esmtp_extensions["size"] == "2000"
    await client.quit()
    await send(async_smtp_server, "other")
    await async_smtp_server.wait_for(subject="wanted", timeout=0.5)
""",
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*TimeoutError: no message with subject='wanted' arrived within 0.5 s; received 1:",
            "*1. from <a@example.com> to <b@example.com> subject 'other' (id *)",
        ]
    )


async def test_on_stored_tells_of_each_commit_before_the_250(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, bool]] = []

    def stored(envelope: Envelope) -> None:
        # Already readable from the store when the callback runs.
        seen.append((envelope.queue_id, server.store.get(envelope.queue_id) is not None))
        if len(seen) == 2:
            raise RuntimeError("a broken callback")

    server = Server(make_config(tmp_path / "data"), on_stored=stored)
    async with server:
        port = server.addresses[0][1]
        for n in (1, 2):
            errors, reply = await aiosmtplib.send(
                f"Subject: {n}\r\n\r\nx\r\n",
                sender="a@example.com",
                recipients=["b@example.com"],
                hostname="127.0.0.1",
                port=port,
                start_tls=False,
            )
            assert not errors and "OK: queued as " in reply
            # Told before the client got its 250, even when the callback failed.
            assert seen[-1] == (reply.rsplit(" ", 1)[1], True)
        assert len(server.store.list()) == 2
    assert "on_stored failed" in caplog.text and "a broken callback" in caplog.text


def test_the_readme_example_passes(pytester: pytest.Pytester) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Testing your application\n", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "smtp_server.wait_for(to=" in example and len(example.splitlines()) <= 12
    result = run(pytester, example)
    result.assert_outcomes(passed=1)
