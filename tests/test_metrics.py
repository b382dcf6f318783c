"""Prometheus metrics: counted by real sessions, served at /metrics, summed over workers.

Each test talks to a real server (in this process, or ``ehlo serve --workers
2`` in a subprocess) with real clients, then reads ``/metrics`` over HTTP
from the web application (``ehlo.web.build_app`` served by aiohttp on a
loopback port) and parses it with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from ehlo import Server, Verdict
from ehlo.auth import UserStore
from ehlo.config import GreetingConfig
from ehlo.greeting import CHECKS, RESULTS
from ehlo.policy import HookContext
from ehlo.server._metrics import exposition
from ehlo.web import WebContext, build_app

from . import greeting_zone as zone
from .dnsserver import DNSServer
from .helpers import (
    SERVE_WITHOUT_DNS,
    Client,
    async_wait_until,
    child_pids,
    client_tls,
    free_port,
    make_config,
    wait_for_banner,
    wait_until,
)

greeting_dns = zone.greeting_dns

PASSWORD = "correct horse battery staple"
BODY = b"From: a@example.org\r\nSubject: counted\r\n\r\nOne message.\r\n"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Scrape = Callable[[Server], Awaitable[Samples]]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by (sample name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when it is absent."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= got)


@contextlib.asynccontextmanager
async def web_app(ctx: WebContext) -> AsyncIterator[str]:
    """The web application over ``ctx`` on a loopback port: its base URL."""
    runner = web.AppRunner(build_app(ctx))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def scrape() -> AsyncIterator[Scrape]:
    """``await scrape(server)``: GET /metrics of ``server`` over HTTP, parsed."""
    async with aiohttp.ClientSession() as http:

        async def get(server: Server) -> Samples:
            metrics = server.metrics
            assert metrics is not None
            ctx = WebContext(store=server.store, metrics=metrics.exposition)
            async with web_app(ctx) as url:
                response = await http.get(f"{url}/metrics")
                assert response.status == 200
                assert response.headers["Content-Type"] == CONTENT_TYPE
                return parse(await response.text())

        yield get


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def no_mallory(ctx: HookContext) -> Verdict | None:
    if (ctx.rcpt or "").startswith("mallory@"):
        return Verdict.reject("No such user here", 550, "5.1.1")
    return None


# --------------------------------------------------------------------------
# /metrics


async def test_metrics_answer_in_the_text_format_on_both_paths(
    start: Callable[..., Awaitable[Server]],
) -> None:
    server = await start(tls=False)
    assert server.metrics is not None
    async with (
        web_app(WebContext(store=server.store, metrics=server.metrics.exposition)) as url,
        aiohttp.ClientSession() as http,
    ):
        for path in ("/metrics", "/api/v1/metrics"):
            async with http.get(url + path) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == CONTENT_TYPE
                text = await response.text()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            # Every metric is there from the start, each with its help text.
            for name in (
                "ehlo_connections",
                "ehlo_connections_refused",
                "ehlo_sessions",
                "ehlo_messages_accepted",
                "ehlo_received_bytes",
                "ehlo_refusals",
                "ehlo_tls_handshakes",
                "ehlo_auth",
                "ehlo_greeting_checks",
                "ehlo_store_commit_seconds",
                "ehlo_evictions",
                "ehlo_limits_hit",
            ):
                assert name in families, name
                assert families[name].documentation, name
            assert families["ehlo_store_commit_seconds"].type == "histogram"
            assert all(f.type in ("counter", "histogram") for f in families.values())
            # One process shows no _created timestamps (as with several workers).
            assert "_created" not in text


async def test_no_metrics_kept_is_a_json_404(start: Callable[..., Awaitable[Server]]) -> None:
    server = await start(tls=False, metrics=False)
    assert server.metrics is None
    async with (
        web_app(WebContext(store=server.store, metrics=None)) as url,
        aiohttp.ClientSession() as http,
    ):
        for path in ("/metrics", "/api/v1/metrics"):
            async with http.get(url + path) as response:
                assert response.status == 404
                body = await response.json()
            assert body["error"]["status"] == 404
            assert "metrics" in body["error"]["message"]


# --------------------------------------------------------------------------
# Counted by real sessions


async def test_counters_move_as_sessions_happen(tmp_path: Path, scrape: Scrape) -> None:
    data = tmp_path / "data"
    UserStore(data).add("alice", PASSWORD)
    server = Server(
        make_config(data, auth_failure_delay=0.0, max_recipients=2),
        hooks={"rcpt": [no_mallory]},
    )
    await server.start()
    try:
        before = await scrape(server)
        assert value(before, "ehlo_connections_total") == 0
        assert value(before, "ehlo_messages_accepted_total") == 0
        assert value(before, "ehlo_store_commit_seconds_count") == 0
        port = server.addresses[0][1]

        def sessions() -> None:
            # An EHLO session: one message accepted, one recipient refused by
            # a hook (550), one over max_recipients (452 from the core).
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test") as smtp:
                smtp.ehlo()
                smtp.mail("a@example.org")
                assert smtp.rcpt("b@example.net")[0] == 250
                assert smtp.rcpt("mallory@example.net")[0] == 550
                assert smtp.rcpt("c@example.net")[0] == 250
                assert smtp.rcpt("d@example.net")[0] == 452
                assert smtp.data(BODY)[0] == 250
            # A HELO session without mail.
            with smtplib.SMTP("127.0.0.1", port) as smtp:
                assert smtp.helo("old.client.test")[0] == 250
            # STARTTLS, then a wrong password.
            with smtplib.SMTP("127.0.0.1", port, local_hostname="tls.client.test") as smtp:
                smtp.starttls(context=client_tls())
                smtp.ehlo()
                code, _ = smtp.docmd("AUTH", f"PLAIN {plain('alice', 'not the password')}")
                assert code == 535
                code, _ = smtp.docmd("AUTH", f"PLAIN {plain('alice', PASSWORD)}")
                assert code == 235

        await asyncio.to_thread(sessions)
        after = await scrape(server)
    finally:
        await server.stop(timeout=1.0)
    assert value(after, "ehlo_connections_total") == 3
    assert value(after, "ehlo_sessions_total", greeting="EHLO") == 2
    assert value(after, "ehlo_sessions_total", greeting="HELO") == 1
    assert value(after, "ehlo_messages_accepted_total") == 1
    assert value(after, "ehlo_received_bytes_total") == len(BODY)
    assert value(after, "ehlo_refusals_total", stage="rcpt", code="550") == 1
    assert value(after, "ehlo_refusals_total", stage="rcpt", code="452") == 1
    assert total(after, "ehlo_refusals_total") == 2
    assert value(after, "ehlo_limits_hit_total", limit="max_recipients") == 1
    assert value(after, "ehlo_tls_handshakes_total", result="ok", version="TLSv1.3") == 1
    assert total(after, "ehlo_tls_handshakes_total", result="failed") == 0
    assert value(after, "ehlo_auth_total", mechanism="PLAIN", result="failure") == 1
    assert value(after, "ehlo_auth_total", mechanism="PLAIN", result="success") == 1
    assert value(after, "ehlo_store_commit_seconds_count") == 1
    assert value(after, "ehlo_store_commit_seconds_bucket", le="+Inf") == 1
    assert value(after, "ehlo_store_commit_seconds_sum") > 0


async def test_refused_connections_evictions_and_a_message_too_large(
    start: Callable[..., Awaitable[Server]], scrape: Scrape
) -> None:
    # One slot per address: a second client from 127.0.0.1 is refused.
    server = await start(tls=False, max_connections_per_ip=1, max_message_size=1000)
    first = await Client.connect(server)
    try:
        await first.ehlo()
        second = await Client.connect(server, banner=False)
        assert (await second.reply()).code == 421
        second.close()
        # A body over max_message_size: 552 at the end of DATA.
        assert (await first.cmd("MAIL FROM:<a@example.org>")).code == 250
        assert (await first.cmd("RCPT TO:<b@example.net>")).code == 250
        assert (await first.cmd("DATA")).code == 354
        first.send(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n")
        first.send((b"y" * 70 + b"\r\n") * 20 + b".\r\n")
        assert (await first.reply()).code == 552
    finally:
        first.close()
    samples = await scrape(server)
    assert value(samples, "ehlo_connections_total") == 1
    assert value(samples, "ehlo_connections_refused_total", reason="max_connections_per_ip") == 1
    assert value(samples, "ehlo_limits_hit_total", limit="max_connections_per_ip") == 1
    assert value(samples, "ehlo_refusals_total", stage="data", code="552") == 1
    assert value(samples, "ehlo_limits_hit_total", limit="max_message_size") == 1
    assert value(samples, "ehlo_messages_accepted_total") == 0

    # One slot in all: a newcomer takes the slot of the idle client.
    crowded = await start(tls=False, max_connections=1)
    idle = await Client.connect(crowded)
    try:
        await idle.ehlo()
        newcomer = await Client.connect(crowded)
        newcomer.close()
        assert (await idle.reply()).code == 421
    finally:
        idle.close()
    samples = await scrape(crowded)
    assert value(samples, "ehlo_evictions_total") == 1
    assert value(samples, "ehlo_connections_total") == 2


async def test_a_failed_tls_handshake_and_a_timeout_are_counted(
    start: Callable[..., Awaitable[Server]], scrape: Scrape
) -> None:
    server = await start(command_timeout=0.5)
    client = await Client.connect(server)
    try:
        await client.ehlo()
        assert (await client.cmd("STARTTLS")).code == 220
        client.send(b"this is no TLS ClientHello\r\n" * 4)
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(client.reader.read(), 20.0) == b""
    finally:
        client.close()
    # A client that says nothing after its greeting: 421 after command_timeout.
    silent = await Client.connect(server)
    try:
        await silent.ehlo()
        assert (await silent.reply(timeout=20.0)).code == 421
    finally:
        silent.close()
    samples = await scrape(server)
    assert total(samples, "ehlo_tls_handshakes_total", result="failed") == 1
    assert total(samples, "ehlo_tls_handshakes_total", result="ok") == 0
    assert value(samples, "ehlo_limits_hit_total", limit="command_timeout") == 1


async def test_greeting_check_results_are_counted_by_check_and_result(
    tmp_path: Path, greeting_dns: DNSServer, scrape: Scrape
) -> None:
    config = make_config(
        tmp_path / "data",
        tls=False,
        dns_servers=(greeting_dns.nameserver,),
        dns_timeout=zone.DNS_TIMEOUT,
        greeting=GreetingConfig(policy="record"),
    )
    async with Server(config) as server:
        # The name matches the client's address: forward_match passes.
        samples: Samples = {}

        async def counted() -> bool:
            nonlocal samples
            samples = await scrape(server)
            return total(samples, "ehlo_greeting_checks_total") > 0

        client = await Client.connect(server, source=zone.client_ip(5))
        try:
            await client.ehlo(zone.match_name(5))
            # The checks run in the background; they are counted when they end
            # (checks that a session's end cuts short are not).
            await async_wait_until(counted, "the greeting checks to be counted")
            await client.cmd("QUIT")
        finally:
            client.close()
    assert value(samples, "ehlo_greeting_checks_total", check="forward_match", result="pass") == 1
    counted_checks = {
        dict(labels)["check"]: (dict(labels)["result"], v)
        for (name, labels), v in samples.items()
        if name == "ehlo_greeting_checks_total" and v
    }
    # One result per check of the one greeting, each a known check and result.
    assert set(counted_checks) <= set(CHECKS)
    assert all(result in RESULTS and v == 1 for result, v in counted_checks.values())
    assert value(samples, "ehlo_sessions_total", greeting="EHLO") == 1


async def test_two_servers_in_one_process_count_apart(
    start: Callable[..., Awaitable[Server]], scrape: Scrape
) -> None:
    busy = await start(tls=False)
    quiet = await start(tls=False)
    assert busy.metrics is not quiet.metrics
    for _ in range(3):
        client = await Client.connect(busy)
        await client.ehlo()
        client.close()
    busy_samples, quiet_samples = await scrape(busy), await scrape(quiet)
    assert value(busy_samples, "ehlo_connections_total") == 3
    assert value(busy_samples, "ehlo_sessions_total", greeting="EHLO") == 3
    assert value(quiet_samples, "ehlo_connections_total") == 0
    assert value(quiet_samples, "ehlo_sessions_total", greeting="EHLO") == 0


# --------------------------------------------------------------------------
# Several workers


def _connections_by_process(folder: Path) -> dict[int, float]:
    """Connections each process counted (if any), from its own file in the multiprocess folder."""
    out: dict[int, float] = {}
    for path in folder.glob("counter_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        for family in MultiProcessCollector.merge([str(path)]):
            for sample in family.samples:
                if sample.name == "ehlo_connections_total" and sample.value > 0:
                    out[pid] = out.get(pid, 0.0) + sample.value
    return out


def _live_workers(supervisor: int) -> list[int]:
    """The worker pids of ``ehlo serve --workers 2`` (the SQLite writer left out)."""
    pids = []
    for pid in child_pids(supervisor):
        with contextlib.suppress(FileNotFoundError):
            if b"--hub" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
    return pids


def _metrics_folder(log: Path) -> Path | None:
    """The workers' multiprocess folder, as the supervisor logs it (JSON, DEBUG)."""
    for line in log.read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("event") == "metrics_dir":
            return Path(json.loads(line)["path"])
    return None


def _over_http(http_port: int) -> Samples:
    """GET /metrics of the web UI (served by worker 0), parsed."""
    url = f"http://127.0.0.1:{http_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(answer.read().decode())


def _serve_two_workers(
    tmp_path: Path, port: int, *extra: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """``ehlo serve --workers 2`` on ``port`` with ``extra`` flags; the process and its log."""
    log = tmp_path / "serve.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "ehlo", "serve",
                "--listen", f"127.0.0.1:{port}", "--data", str(tmp_path / "data"),
                "--hostname", "mx.test", "--no-tls", *SERVE_WITHOUT_DNS, "--workers", "2",
                *extra, "--log-format", "json", "--log-level", "debug",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    return proc, log


def test_metrics_are_summed_over_two_workers(tmp_path: Path) -> None:
    port = free_port()
    http_port = free_port()
    proc, log = _serve_two_workers(tmp_path, port, "--http", f"127.0.0.1:{http_port}")
    try:
        wait_for_banner(port, proc, log)
        wait_until(lambda: len(_live_workers(proc.pid)) == 2, "two workers to run")
        workers_seen = time.monotonic()
        workers = set(_live_workers(proc.pid))
        # One private folder for both, made for this run.
        folder = _metrics_folder(log)
        assert folder is not None, log.read_text()
        assert folder.stat().st_mode & 0o777 == 0o700
        assert folder.name.startswith("ehlo-metrics-")
        sent = 1  # the banner check above was a connection too

        def deliver(i: int) -> None:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="w.client.test") as smtp:
                smtp.sendmail("a@example.org", [f"r{i}@example.net"], BODY)

        # Rounds of eight connections at once, until each worker has taken some.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for _ in range(25):
                if set(_connections_by_process(folder)) >= workers:
                    break
                list(pool.map(deliver, range(sent, sent + 8)))
                sent += 8
        by_process = _connections_by_process(folder)
        assert set(by_process) >= workers, f"a worker took no connection: {by_process}"
        messages = sent - 1

        samples = parse(exposition(folder).decode())
        assert value(samples, "ehlo_connections_total") == sent
        assert value(samples, "ehlo_messages_accepted_total") == messages
        assert value(samples, "ehlo_sessions_total", greeting="EHLO") == messages
        assert value(samples, "ehlo_received_bytes_total") == messages * len(BODY)
        assert value(samples, "ehlo_store_commit_seconds_count") == messages
        # The web UI (one worker) answers the same sums over HTTP.
        served = _over_http(http_port)
        for name in ("ehlo_connections_total", "ehlo_messages_accepted_total"):
            assert value(served, name) == value(samples, name), name

        # A worker killed outright is started again (the supervisor restarts
        # one that ran for 2 s or more); its counts stay in the sums.
        time.sleep(max(0.0, workers_seen + 3.0 - time.monotonic()))
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: victim not in (live := _live_workers(proc.pid)) and len(live) == 2,
            "the killed worker to be replaced",
        )
        wait_for_banner(port, proc, log)
        deliver(sent)
        sent += 2  # that message, and the banner check
        messages += 1
        samples = parse(exposition(folder).decode())
        assert value(samples, "ehlo_connections_total") == sent
        assert value(samples, "ehlo_messages_accepted_total") == messages
        assert value(_over_http(http_port), "ehlo_messages_accepted_total") == messages
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    # Gone with the server.
    assert not folder.exists()


def test_no_metrics_gives_the_workers_no_folder(tmp_path: Path) -> None:
    port = free_port()
    proc, log = _serve_two_workers(tmp_path, port, "--no-metrics")
    try:
        wait_for_banner(port, proc, log)
        with smtplib.SMTP("127.0.0.1", port, local_hostname="w.client.test") as smtp:
            smtp.sendmail("a@example.org", ["b@example.net"], BODY)
        assert _metrics_folder(log) is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
