#!/usr/bin/env python3
"""The group commit's insert path on two asyncio drivers: psycopg 3 against asyncpg.

Run it through ``make bench`` or directly with the project venv (psycopg
and the store's schema come from there)::

    .venv/bin/python bench/pg_driver.py [--quick] [--messages N] [--runs N]

What the store's writer does for a batch of messages finishing together:
one transaction with each message's row of ``messages`` (the store's own
``INSERT_MESSAGE`` and ``message_values``: the envelope as JSON text and the
search columns) and its body as a row of ``chunks`` (4 KiB), then
``COMMIT``. The batches hold 1, 10 and 50 messages; each way inserts
``--messages`` messages (2,000; quick 300; a tenth of that in batches of
1, where each message waits for its own fsync) one batch after another on
one connection, as the writer does:

- ``psycopg executemany``: ``AsyncCursor.executemany`` (psycopg 3 sends the
  statements in pipeline mode: one round trip per batch);
- ``psycopg copy``: ``COPY ... FROM STDIN`` with ``write_row``;
- ``asyncpg executemany``: ``Connection.executemany`` (pipelined too);
- ``asyncpg copy``: ``copy_records_to_table`` (binary COPY).

asyncpg is not a dependency of ehlo: when it is not importable, this
script installs the pinned version (0.32.0) with pip into
``bench/.venv-asyncpg/`` (a package folder of its own, put on ``sys.path``;
the project venv is never touched); when that fails (no index), its rows
are skipped with the reason (``--no-install`` skips the install).

For each way and batch size: messages per second, and the CPU per 1,000
messages of this client process (the driver's share) and of the PostgreSQL
tree (the server's share). Before each run the tables are emptied and a
``CHECKPOINT`` taken; the runs of the four ways go in turn, in a rotating
order, ``--runs`` times (3; quick 1), and the medians are kept. By default
a throwaway PostgreSQL is started as the tests start theirs
(``bench/pgcluster.py``: fsync on, the default ``synchronous_commit``);
``--database-url`` uses a database of yours instead.

The table goes to stdout, progress to stderr, the figures to
bench/results/pg-driver-<UTC timestamp>[-quick].json and
bench/results/pg-driver-latest.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pgcluster
from messages import RESULTS, ROOT, _git_commit, save

ASYNCPG = "asyncpg==0.32.0"
ASYNCPG_DIR = ROOT / "bench" / ".venv-asyncpg"
BATCHES = (1, 10, 50)
BODY = 4096
WAYS = ("psycopg executemany", "psycopg copy", "asyncpg executemany", "asyncpg copy")
INSERT_CHUNK = "INSERT INTO chunks (queue_id, seq, data) VALUES (%s, %s, %s)"


def ensure_asyncpg(install: bool, say: Callable[[str], None]) -> tuple[Any, str | None]:
    """asyncpg (the module, None) or (None, why it is not there)."""
    if ASYNCPG_DIR.is_dir():
        sys.path.insert(0, str(ASYNCPG_DIR))
    with contextlib.suppress(ImportError):
        return importlib.import_module("asyncpg"), None
    if not install:
        return None, "asyncpg is not installed (--no-install)"
    say(f"installing {ASYNCPG} into {ASYNCPG_DIR}")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--target", str(ASYNCPG_DIR), ASYNCPG],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        tail = " ".join(done.stderr.split())[-300:]
        return None, f"pip install {ASYNCPG} failed: {tail}"
    if str(ASYNCPG_DIR) not in sys.path:
        sys.path.insert(0, str(ASYNCPG_DIR))
    importlib.invalidate_caches()
    try:
        return importlib.import_module("asyncpg"), None
    except ImportError as exc:
        return None, f"asyncpg does not import after the install: {exc}"


def rows(prefix: str, count: int) -> list[tuple[Any, ...]]:
    """``count`` messages' rows, as the store's writer builds them."""
    from ehlo.storage._pg_rows import message_values
    from ehlo.storage.base import Envelope

    now = dt.datetime.now(dt.UTC)
    out = []
    for i in range(count):
        envelope = Envelope(
            queue_id=f"{prefix}{i:07d}", client_ip="127.0.0.1", client_port=40000 + i % 20000,
            greeting="EHLO", greeting_name="client.bench.test",
            mail_from=f"sender{i % 100}@bench.test", mail_params={"BODY": "8BITMIME"},
            rcpt_to=[f"user{i % 50}@bench.test"], received_at=now, protocol="ESMTP",
            server_name="mx.bench.test", size_received=BODY,
        )  # fmt: skip
        out.append(message_values(envelope, size=BODY, subject=f"message {i}",
                                  attachments=False, chunks=1, node="bench"))  # fmt: skip
    return out


def numbered(sql: str) -> str:
    """``%s`` placeholders as asyncpg's ``$1, $2, ...``."""
    counter = iter(range(1, 10_000))
    return re.sub(r"%s", lambda _m: f"${next(counter)}", sql)


class Drivers:
    """One connection of each driver to the database, and the four ways of inserting."""

    def __init__(self, url: str, asyncpg: Any) -> None:
        self.url = url
        self.asyncpg = asyncpg
        self.pg: Any = None
        self.apg: Any = None
        self.body = os.urandom(BODY)

    async def open(self) -> None:
        import psycopg

        from ehlo.storage import _pg_schema

        with psycopg.connect(self.url, autocommit=True) as conn:
            _pg_schema.migrate(conn, "bench")
        self.pg = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        if self.asyncpg is not None:
            self.apg = await self.asyncpg.connect(self.url)

    async def close(self) -> None:
        if self.pg is not None:
            await self.pg.close()
        if self.apg is not None:
            await self.apg.close()

    async def backend(self) -> int:
        cur = await self.pg.execute("SELECT pg_backend_pid()")
        row = await cur.fetchone()
        return int(row[0])

    async def reset(self) -> None:
        await self.pg.execute("TRUNCATE messages, chunks")
        await self.pg.execute("CHECKPOINT")

    def way(self, name: str) -> Callable[[list[tuple[Any, ...]]], Awaitable[None]]:
        return {
            "psycopg executemany": self.psycopg_executemany,
            "psycopg copy": self.psycopg_copy,
            "asyncpg executemany": self.asyncpg_executemany,
            "asyncpg copy": self.asyncpg_copy,
        }[name]

    async def psycopg_executemany(self, batch: list[tuple[Any, ...]]) -> None:
        from ehlo.storage._pg_rows import INSERT_MESSAGE

        async with self.pg.transaction(), self.pg.cursor() as cur:
            await cur.executemany(INSERT_MESSAGE, batch)
            await cur.executemany(INSERT_CHUNK, [(row[0], 0, self.body) for row in batch])

    async def psycopg_copy(self, batch: list[tuple[Any, ...]]) -> None:
        from ehlo.storage._pg_rows import MESSAGE_COLUMNS

        columns = ", ".join(MESSAGE_COLUMNS)
        async with self.pg.transaction(), self.pg.cursor() as cur:
            async with cur.copy(f"COPY messages ({columns}) FROM STDIN") as copy:
                for row in batch:
                    await copy.write_row(row)
            async with cur.copy("COPY chunks (queue_id, seq, data) FROM STDIN") as copy:
                for row in batch:
                    await copy.write_row((row[0], 0, self.body))

    async def asyncpg_executemany(self, batch: list[tuple[Any, ...]]) -> None:
        from ehlo.storage._pg_rows import INSERT_MESSAGE

        async with self.apg.transaction():
            await self.apg.executemany(numbered(INSERT_MESSAGE), batch)
            await self.apg.executemany(
                numbered(INSERT_CHUNK), [(row[0], 0, self.body) for row in batch]
            )

    async def asyncpg_copy(self, batch: list[tuple[Any, ...]]) -> None:
        from ehlo.storage._pg_rows import MESSAGE_COLUMNS

        async with self.apg.transaction():
            await self.apg.copy_records_to_table("messages", records=batch,
                                                 columns=list(MESSAGE_COLUMNS))  # fmt: skip
            await self.apg.copy_records_to_table(
                "chunks", records=[(row[0], 0, self.body) for row in batch],
                columns=["queue_id", "seq", "data"],
            )  # fmt: skip


async def measure(
    drivers: Drivers, name: str, batch: int, messages: int, postmaster: int, number: int
) -> dict[str, Any]:
    await drivers.reset()
    insert = drivers.way(name)
    prefix = f"{name.split()[0][0]}{name.split()[1][0]}{batch}r{number}-"
    data = rows(prefix, messages)
    pids = pgcluster.tree_pids(postmaster)
    server0 = pgcluster.tree_cpu(postmaster, pids)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for offset in range(0, messages, batch):
        await insert(data[offset : offset + batch])
    seconds = time.perf_counter() - start
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    pids_after = sorted(set(pids) | set(pgcluster.tree_pids(postmaster)))
    server = max(0.0, pgcluster.tree_cpu(postmaster, pids_after) - server0)
    client = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    cur = await drivers.pg.execute("SELECT count(*) FROM messages")
    stored = (await cur.fetchone())[0]
    if stored != messages:
        raise RuntimeError(f"{name}: {stored} messages stored of {messages}")
    return {
        "messages": messages,
        "seconds": seconds,
        "msg_s": messages / seconds,
        "client_cpu_per_1k": client / messages * 1000,
        "server_cpu_per_1k": server / messages * 1000,
    }


def per_run(messages: int, batch: int) -> int:
    """Messages of one run: a tenth for batches of 1 (each its own commit, bound by the fsync)."""
    return max(batch, min(messages, messages // 10 * batch))


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"status": "ok"}
    for key in ("msg_s", "client_cpu_per_1k", "server_cpu_per_1k"):
        values = [r[key] for r in runs]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    out["runs"] = runs
    return out


def render(report: dict[str, Any]) -> str:
    lines = [
        f"PostgreSQL {report['server_version']}, fsync {report['fsync']}, synchronous_commit"
        f" {report['synchronous_commit']}; psycopg {report['versions']['psycopg']}"
        f" (libpq {report['versions']['libpq']}), asyncpg {report['versions']['asyncpg']};"
        f" {report['messages']} messages of 4 KiB per run (a tenth in batches of 1),"
        f" median of {report['runs']} run(s);"
        f" load average {report['loadavg_start'][0]:.2f} at start,"
        f" {report['loadavg_end'][0]:.2f} at end",
        "",
    ]
    head = (f"{'way':<20} {'batch':>5} {'msg/s':>22} {'client CPU s/1k':>15}"
            f" {'server CPU s/1k':>15}")  # fmt: skip
    lines += [head, "-" * len(head)]
    for name in WAYS:
        for batch in BATCHES:
            row = report["results"].get(name, {}).get(str(batch))
            if row is None:
                continue
            if row["status"] != "ok":
                lines.append(f"{name:<20} {batch:>5} {row['status'].upper()}: {row['error']}")
                continue
            m = row["msg_s"]
            rate = f"{m['median']:,.0f} [{m['min']:,.0f}-{m['max']:,.0f}]"
            lines.append(
                f"{name:<20} {batch:>5} {rate:>22} {row['client_cpu_per_1k']['median']:>15.3f}"
                f" {row['server_cpu_per_1k']['median']:>15.3f}"
            )
    lines += ["", "asyncpg / psycopg (msg/s, medians; executemany against executemany):"]
    for item in report["comparison"]:
        lines.append(f"  {item['name']:<28} {item['figure']}")
    return "\n".join(lines)


def compare(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for kind in ("executemany", "copy"):
        for batch in BATCHES:
            mine = results.get(f"asyncpg {kind}", {}).get(str(batch), {})
            theirs = results.get(f"psycopg {kind}", {}).get(str(batch), {})
            value = None
            figure = "not measured"
            if mine.get("status") == "ok" and theirs.get("status") == "ok":
                a, p = mine["msg_s"]["median"], theirs["msg_s"]["median"]
                value = a / p
                figure = f"{value:.2f}x ({a:,.0f} vs {p:,.0f} msg/s)"
            out.append({"name": f"{kind}, batches of {batch}", "value": value, "figure": figure})
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/pg_driver.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 messages per run, one run")
    parser.add_argument("--messages", type=int, default=None, help="per run (2000; quick 300)")
    parser.add_argument(
        "--runs", type=int, default=None, help="runs per way and batch (3; quick 1)"
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not pip-install asyncpg when it is missing: skip its rows",
    )
    parser.add_argument(
        "--database-url", default=None, help="use this database (default: a throwaway PostgreSQL)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for the JSON results")
    opts = parser.parse_args(argv)  # fmt: skip
    if opts.messages is None:
        opts.messages = 300 if opts.quick else 2000
    if opts.runs is None:
        opts.runs = 1 if opts.quick else 3
    return opts


async def run_all(url: str, opts: argparse.Namespace, asyncpg: Any, report: dict[str, Any],
                  say: Callable[[str], None]) -> bool:  # fmt: skip
    drivers = Drivers(url, asyncpg)
    failed = False
    try:
        await drivers.open()
        for name in ("server_version", "fsync", "synchronous_commit"):
            cur = await drivers.pg.execute(f"SHOW {name}")  # fixed setting names
            report[name] = (await cur.fetchone())[0]
        postmaster = pgcluster.parent_pid(await drivers.backend()) or 0
        ways = [w for w in WAYS if asyncpg is not None or not w.startswith("asyncpg")]
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        errors: dict[tuple[str, int], str] = {}
        for number in range(opts.runs):
            for batch in BATCHES:
                shift = (number + BATCHES.index(batch)) % len(ways)
                for name in ways[shift:] + ways[:shift]:
                    key = (name, batch)
                    if key in errors:
                        continue
                    try:
                        count = per_run(opts.messages, batch)
                        result = await measure(drivers, name, batch, count, postmaster, number)
                    except Exception as exc:  # a driver error: this row fails, the rest go on
                        errors[key] = " ".join(str(exc).split())[:300]
                        say(f"{name}, batches of {batch}: FAILED: {errors[key]}")
                        failed = True
                        continue
                    runs.setdefault(key, []).append(result)
                    say(f"{name}, batches of {batch}, run {number + 1}: {result['msg_s']:,.0f}"
                        f" msg/s")  # fmt: skip
        for (name, batch), found in runs.items():
            report["results"].setdefault(name, {})[str(batch)] = summarize(found)
        for (name, batch), error in errors.items():
            report["results"].setdefault(name, {})[str(batch)] = {"status": "failed",
                                                                  "error": error}  # fmt: skip
    finally:
        await drivers.close()
    return not failed


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    started_at = dt.datetime.now(dt.UTC)
    began = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {text}", file=sys.stderr, flush=True)

    import psycopg

    asyncpg, why = ensure_asyncpg(not opts.no_install, say)
    report: dict[str, Any] = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "quick": opts.quick, "runs": opts.runs, "messages": opts.messages,
        "commit": _git_commit(), "loadavg_start": os.getloadavg(),
        "versions": {"python": platform.python_version(), "psycopg": psycopg.__version__,
                     "libpq": str(psycopg.pq.version()),
                     "asyncpg": asyncpg.__version__ if asyncpg is not None else "-"},
        "results": {},
    }  # fmt: skip
    if why is not None:
        say(f"asyncpg rows skipped: {why}")
        for name in WAYS:
            if name.startswith("asyncpg"):
                report["results"][name] = {str(b): {"status": "skipped", "error": why}
                                           for b in BATCHES}  # fmt: skip
    with contextlib.ExitStack() as stack:
        url = opts.database_url
        if url is None:
            say("starting a throwaway PostgreSQL")
            pg = stack.enter_context(pgcluster.cluster())
            url = pg.url(pg.create_database())
        ok = asyncio.run(run_all(url, opts, asyncpg, report, say))
    report["comparison"] = compare(report["results"])
    report["asyncpg_note"] = why
    report["loadavg_end"] = os.getloadavg()
    report["elapsed_seconds"] = time.monotonic() - began
    print(render(report))
    save(report, opts, started_at, "pg-driver")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
