#!/usr/bin/env python3
"""The HTTP API on a large store: a page, a search, and how soon ``wait`` answers.

Run it through ``make bench`` (after bench/messages.py) or directly with the
project venv, which it needs (it writes the store through the store API and
asks the API with aiohttp)::

    .venv/bin/python bench/web.py [--quick] [--messages N] [--runs N] [--waits N]

It generates N messages (100,000; 10,000 with ``--quick``) into a SQLite
store with ``tests/messages_data.py``, starts ``ehlo serve --http`` on it
(one worker, lookups off), and measures from a client on loopback:

- ``GET /api/v1/messages?limit=50``: the first page;
- ``GET /api/v1/messages?q=to:...&limit=50`` for a recipient on one message
  in a thousand (the page is filled after scanning half the store) and for
  one on every fiftieth;
- ``GET /api/v1/wait?q=to:...``: a request waits for a recipient nobody has
  used yet, then smtplib sends that message; the figure is the time from the
  client's 250 to the answer, ``--waits`` times.

Each request is made once untimed (its answer checked), then ``--runs``
times. The table goes to stdout with a PASS/FAIL line per target, progress
to stderr, the figures to bench/results/web-<UTC timestamp>[-quick].json and
bench/results/web-latest.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from messages import EHLO, RESULTS, _git_commit, _messages_data, save, stored_count

# The targets (issue 18): medians, in seconds.
PAGE_SECONDS = 0.050
SEARCH_SECONDS = 0.200
WAIT_SECONDS = 0.050
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Serving:
    """``ehlo serve`` on the data folder, with the HTTP API."""

    def __init__(self, data: Path, work: Path) -> None:
        self.smtp_port = free_port()
        self.http_port = free_port()
        self.log = work / "serve.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    *EHLO, "serve",
                    "--data", str(data),
                    "--listen", f"{HOST}:{self.smtp_port}",
                    "--http", f"{HOST}:{self.http_port}",
                    "--workers", "1",
                    "--no-tls",
                    "--no-reverse-dns",
                    "--helo-policy", "off",
                    "--log-level", "WARNING",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ehlo serve exited: {self.log.read_text(errors='replace')}")
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("ehlo serve did not answer /healthz in time")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def summary(times: list[float]) -> dict[str, Any]:
    ordered = sorted(times)
    return {
        "runs": len(ordered),
        "median_s": statistics.median(ordered),
        "p90_s": ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))],
        "min_s": ordered[0],
        "max_s": ordered[-1],
    }


async def time_get(session: Any, url: str, runs: int, expect: int) -> dict[str, Any]:
    """GET ``url`` once to check it (``expect`` messages on the page), then ``runs`` times."""
    async with session.get(url) as answer:
        body = await answer.json()
        if answer.status != 200 or len(body["messages"]) != expect:
            raise RuntimeError(f"{url}: {answer.status}, {len(body.get('messages', []))} messages")
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        async with session.get(url) as answer:
            await answer.read()
        times.append(time.perf_counter() - began)
    return summary(times)


def send(port: int, rcpt: str) -> float:
    """Send one message to ``rcpt``; the moment its 250 arrived (perf_counter)."""
    with smtplib.SMTP(HOST, port, timeout=30) as client:
        client.sendmail("bench@from.example", [rcpt], f"Subject: wait {rcpt}\r\n\r\nhi\r\n")
        return time.perf_counter()


async def time_waits(session: Any, serving: Serving, waits: int) -> dict[str, Any]:
    """``wait`` for a new recipient, send it, and time the answer after the 250."""
    latencies = []
    for n in range(waits):
        rcpt = f"wait{n}-{os.getpid()}@bench.example"
        url = f"{serving.base}/api/v1/wait?q=to:{rcpt}&timeout=30"
        request = asyncio.ensure_future(session.get(url))
        await asyncio.sleep(0.2)  # the request is waiting before the message is sent
        acked = await asyncio.to_thread(send, serving.smtp_port, rcpt)
        async with await request as answer:
            answered = time.perf_counter()
            body = await answer.json()
        if answer.status != 200 or rcpt not in body["message"]["rcpt_to"]:
            raise RuntimeError(f"wait for {rcpt}: {answer.status} {body}")
        latencies.append(max(answered - acked, 0.0))
    return summary(latencies)


async def measure(serving: Serving, total: int, opts: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    data = _messages_data()
    rare = sum(1 for i in range(total) if "Special@Rare.example" in data.envelope(i).rcpt_to)
    results: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        api = f"{serving.base}/api/v1/messages"
        results["page"] = await time_get(session, f"{api}?limit=50", opts.runs, min(50, total))
        results["search_rare"] = await time_get(
            session, f"{api}?q=to:special@rare.example&limit=50", opts.runs, min(50, rare)
        )
        results["search_common"] = await time_get(
            session, f"{api}?q=to:user7@dest.example&limit=50", opts.runs, min(50, total // 50)
        )
        results["wait"] = await time_waits(session, serving, opts.waits)
    return results


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, label, limit in (
        ("page", "first page of /messages < 50 ms", PAGE_SECONDS),
        ("search_rare", "search by recipient (1 in 1,000) < 200 ms", SEARCH_SECONDS),
        ("search_common", "search by recipient (1 in 50) < 200 ms", SEARCH_SECONDS),
        ("wait", "wait answers < 50 ms after the 250 (median)", WAIT_SECONDS),
    ):
        value = results.get(key, {}).get("median_s")
        rows.append(
            {
                "target": label,
                "value_ms": None if value is None else round(value * 1000, 1),
                "met": value is not None and value < limit,
            }
        )
    return rows


def render(report: dict[str, Any]) -> str:
    lines = [f"HTTP API on {report['messages']:,} stored messages (SQLite, one worker)", ""]
    lines.append(f"{'request':<16}{'median ms':>10}{'p90 ms':>10}{'max ms':>10}{'runs':>6}")
    for key, row in report["results"].items():
        lines.append(
            f"{key:<16}{row['median_s'] * 1000:>10.1f}{row['p90_s'] * 1000:>10.1f}"
            f"{row['max_s'] * 1000:>10.1f}{row['runs']:>6}"
        )
    lines.append("")
    for row in report["targets"]:
        lines.append(f"{'PASS' if row['met'] else 'FAIL'}  {row['target']}: {row['value_ms']} ms")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 messages, fewer runs")
    parser.add_argument("--messages", type=int, default=None, help="messages in the store")
    parser.add_argument("--runs", type=int, default=None, help="timed requests of each kind")
    parser.add_argument("--waits", type=int, default=None, help="timed waits")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results folder")
    opts = parser.parse_args(argv)
    opts.messages = opts.messages or (10_000 if opts.quick else 100_000)
    opts.runs = opts.runs or (10 if opts.quick else 30)
    opts.waits = opts.waits or (10 if opts.quick else 30)
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    started = time.monotonic()
    started_at = dt.datetime.now(dt.UTC)

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="ehlo-bench-web-"))
    data = work / "data"
    report: dict[str, Any] = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "versions": {
            "ehlo_commit": _git_commit(),
            "python": platform.python_version(),
            "cpus": str(os.cpu_count()),
        },
        "loadavg_start": os.getloadavg(),
    }
    serving: Serving | None = None
    try:
        say(f"generating {opts.messages:,} messages in {data}")
        _messages_data().generate(data, opts.messages)
        report["messages"] = stored_count(data)
        serving = Serving(data, work)
        serving.wait_ready()
        say("measuring")
        report["results"] = asyncio.run(measure(serving, report["messages"], opts))
    except (RuntimeError, OSError) as exc:
        say(f"failed: {exc}")
        return 1
    finally:
        if serving is not None:
            serving.stop()
        shutil.rmtree(work, ignore_errors=True)
    report["targets"] = targets(report["results"])
    report["loadavg_end"] = os.getloadavg()
    report["elapsed_seconds"] = time.monotonic() - started
    print(render(report))
    save(report, opts, started_at, "web")
    return 0


if __name__ == "__main__":
    sys.exit(main())
