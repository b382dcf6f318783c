#!/usr/bin/env python3
"""Message bodies in PostgreSQL: chunk rows of 256 KiB against large objects.

Run it through ``make bench`` or directly with the project venv (it needs
psycopg, the ``postgresql`` extra, and the store's schema)::

    .venv/bin/python bench/pg_bodies.py [--quick] [--runs N] [--database-url URL]

Bodies of 4 KiB, 256 KiB and 10 MiB (text, base64 lines like an attachment)
are written, read back and deleted two ways, each body in a transaction of
its own as the store commits a message:

- ``chunks``: the store's way, rows of at most 256 KiB in the ``chunks``
  table of ``ehlo.storage._pg_schema`` (``bytea``, ``STORAGE EXTERNAL``:
  out of line, uncompressed), one ``INSERT`` per row as the body arrives;
  read one row at a time by its key; deleted with ``DELETE ... WHERE
  queue_id = ANY(...)``;
- ``lo``: a large object per body and an ``oid`` column (``lo_from_bytea``
  for the first 256 KiB, ``lo_put`` for each further piece), read with
  ``lo_get`` by 256 KiB, deleted with ``lo_unlink`` and the row.

Neither side ever holds a body whole. For each size and way: write and read
throughput, the server's CPU (the whole PostgreSQL tree) and the client's,
the WAL written (``pg_current_wal_lsn()`` before and after, per body
octet), the space on disk per body octet, the peak private memory
(``RssAnon``) of the connection's backend, and the cost of deleting (time,
WAL, CPU) and of the ``VACUUM`` that gives the space back. A ``CHECKPOINT``
precedes each write, so both ways start with the same full-page images.
By default a throwaway PostgreSQL is started as the tests start theirs
(``bench/pgcluster.py``: fsync on, the default ``synchronous_commit``,
Unix socket); ``--database-url`` uses a database of yours instead.

The table goes to stdout, progress to stderr, the figures to
bench/results/pg-bodies-<UTC timestamp>[-quick].json and
bench/results/pg-bodies-latest.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pgcluster
from messages import RESULTS, _git_commit, save

MIB = 1024 * 1024
CHUNK = 256 * 1024  # the store's CHUNK_SIZE
SIZES = (4 * 1024, 256 * 1024, 10 * MIB)
# Bodies per size and run (quick: these / 10, at least 3).
COUNTS = {4 * 1024: 2000, 256 * 1024: 200, 10 * MIB: 20}
WAYS = ("chunks", "lo")
LO_TABLE = """
CREATE TABLE IF NOT EXISTS bench_lo_bodies (
    queue_id text PRIMARY KEY,
    body     oid NOT NULL
)
"""


def _text(size: int) -> bytes:
    """``size`` octets of base64 lines (CRLF), as an attachment's body is sent."""
    raw = base64.encodebytes(os.urandom(size)).replace(b"\n", b"\r\n")
    return raw[:size]


class Bench:
    """One connection, its backend and the server's tree, and the measured steps."""

    def __init__(self, url: str) -> None:
        import psycopg

        from ehlo.storage import _pg_schema

        self.conn = psycopg.connect(url, autocommit=True)
        _pg_schema.migrate(self.conn, "bench")
        self.conn.execute(LO_TABLE)
        self.backend = int(self._one("SELECT pg_backend_pid()"))
        self.postmaster = pgcluster.parent_pid(self.backend) or self.backend
        self.piece = _text(CHUNK)
        self.prefix = f"b{os.getpid()}-{int(time.time())}"

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.conn.execute(sql, params).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self.conn.close()

    def wal(self) -> int:
        return int(self._one("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')"))

    def disk(self, way: str) -> int:
        tables = ("chunks",) if way == "chunks" else ("pg_largeobject", "bench_lo_bodies")
        return sum(int(self._one("SELECT pg_total_relation_size(%s)", (t,))) for t in tables)

    @contextlib.contextmanager
    def measured(self, figures: dict[str, Any]) -> Iterator[None]:
        """Time, WAL, CPU (server tree, backend, this client) and the backend's peak memory."""
        pids = pgcluster.tree_pids(self.postmaster)
        wal0, server0 = self.wal(), pgcluster.tree_cpu(self.postmaster, pids)
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        with pgcluster.RssAnonPeak([self.backend]) as peak:
            yield
        seconds = time.perf_counter() - start
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        pids_after = sorted(set(pids) | set(pgcluster.tree_pids(self.postmaster)))
        figures.update(
            seconds=seconds,
            wal_bytes=self.wal() - wal0,
            server_cpu=max(0.0, pgcluster.tree_cpu(self.postmaster, pids_after) - server0),
            client_cpu=(usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime),
            backend_rss_anon_mib=peak.peak[self.backend] / MIB,
        )

    # --- the two ways -----------------------------------------------------------------

    def pieces(self, size: int) -> Iterator[bytes]:
        """The body as the store receives it: pieces of at most CHUNK octets."""
        for offset in range(0, size, CHUNK):
            yield self.piece[: min(CHUNK, size - offset)]

    def write(self, way: str, ids: Sequence[str], size: int) -> None:
        for queue_id in ids:
            with self.conn.transaction():
                if way == "chunks":
                    for seq, piece in enumerate(self.pieces(size)):
                        self.conn.execute(
                            "INSERT INTO chunks (queue_id, seq, data) VALUES (%s, %s, %s)",
                            (queue_id, seq, piece),
                        )
                    continue
                oid = None
                offset = 0
                for piece in self.pieces(size):
                    if oid is None:
                        oid = self._one("SELECT lo_from_bytea(0, %s)", (piece,))
                    else:
                        self.conn.execute("SELECT lo_put(%s, %s, %s)", (oid, offset, piece))
                    offset += len(piece)
                self.conn.execute(
                    "INSERT INTO bench_lo_bodies (queue_id, body) VALUES (%s, %s)",
                    (queue_id, oid),
                )

    def read(self, way: str, ids: Sequence[str], size: int) -> int:
        """Read every body piece by piece; the octets read."""
        total = 0
        cur = self.conn.cursor(binary=True)
        for queue_id in ids:
            with self.conn.transaction():
                if way == "chunks":
                    for seq in range((size + CHUNK - 1) // CHUNK):
                        row = cur.execute(
                            "SELECT data FROM chunks WHERE queue_id = %s AND seq = %s",
                            (queue_id, seq),
                        ).fetchone()
                        total += len(row[0]) if row else 0
                    continue
                found = cur.execute(
                    "SELECT body FROM bench_lo_bodies WHERE queue_id = %s", (queue_id,)
                ).fetchone()
                if found is None:
                    continue
                for offset in range(0, size, CHUNK):
                    row = cur.execute(
                        "SELECT lo_get(%s, %s, %s)", (found[0], offset, CHUNK)
                    ).fetchone()
                    total += len(row[0]) if row else 0
        return total

    def delete(self, way: str, ids: Sequence[str], batch: int = 100) -> None:
        for start in range(0, len(ids), batch):
            some = list(ids[start : start + batch])
            with self.conn.transaction():
                if way == "chunks":
                    self.conn.execute("DELETE FROM chunks WHERE queue_id = ANY(%s)", (some,))
                else:
                    self.conn.execute(
                        "SELECT lo_unlink(body) FROM bench_lo_bodies WHERE queue_id = ANY(%s)",
                        (some,),
                    )
                    self.conn.execute(
                        "DELETE FROM bench_lo_bodies WHERE queue_id = ANY(%s)", (some,)
                    )

    def vacuum(self, way: str) -> None:
        for table in ("chunks",) if way == "chunks" else ("pg_largeobject", "bench_lo_bodies"):
            self.conn.execute(f"VACUUM {table}")  # a fixed name: no value formatted in

    # --- one size, one way, one run -------------------------------------------------------

    def run(self, way: str, size: int, count: int, number: int) -> dict[str, Any]:
        ids = [f"{self.prefix}-{way}-{size}-{number}-{i}" for i in range(count)]
        body_bytes = size * count
        self.conn.execute("CHECKPOINT")
        disk0 = self.disk(way)
        write: dict[str, Any] = {}
        with self.measured(write):
            self.write(way, ids, size)
        stored = self.disk(way) - disk0
        read: dict[str, Any] = {}
        with self.measured(read):
            got = self.read(way, ids, size)
        if got != body_bytes:
            raise RuntimeError(f"{way} {size}: read {got} octets of {body_bytes}")
        delete: dict[str, Any] = {}
        with self.measured(delete):
            self.delete(way, ids)
        vacuum: dict[str, Any] = {}
        with self.measured(vacuum):
            self.vacuum(way)
        for step in (write, read):
            step["mb_s"] = body_bytes / step["seconds"] / 1e6 if step["seconds"] else 0.0
            step["bodies_s"] = count / step["seconds"] if step["seconds"] else 0.0
        write["wal_per_body_octet"] = write["wal_bytes"] / body_bytes
        delete["ms_per_body"] = delete["seconds"] * 1000 / count
        delete["wal_per_body"] = delete["wal_bytes"] / count
        return {
            "way": way, "size": size, "bodies": count,
            "disk_bytes": stored, "disk_per_body_octet": stored / body_bytes,
            "write": write, "read": read, "delete": delete, "vacuum": vacuum,
        }  # fmt: skip


def _median(runs: list[dict[str, Any]], step: str, key: str) -> float:
    return float(statistics.median(r[step][key] for r in runs))


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    first = runs[0]
    out: dict[str, Any] = {"way": first["way"], "size": first["size"], "bodies": first["bodies"]}
    out["disk_per_body_octet"] = statistics.median(r["disk_per_body_octet"] for r in runs)
    for step, keys in (
        ("write", ("mb_s", "bodies_s", "wal_per_body_octet", "server_cpu", "client_cpu",
                   "backend_rss_anon_mib")),
        ("read", ("mb_s", "bodies_s", "server_cpu", "client_cpu", "backend_rss_anon_mib")),
        ("delete", ("ms_per_body", "wal_per_body", "server_cpu")),
        ("vacuum", ("seconds", "wal_bytes")),
    ):  # fmt: skip
        out[step] = {key: _median(runs, step, key) for key in keys}
    out["runs"] = runs
    return out


def _size(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // 1024} KiB"


def render(report: dict[str, Any]) -> str:
    lines = [
        f"PostgreSQL {report['server_version']}, fsync {report['fsync']}, synchronous_commit"
        f" {report['synchronous_commit']}; median of {report['runs']} run(s); load average"
        f" {report['loadavg_start'][0]:.2f} at start, {report['loadavg_end'][0]:.2f} at end",
        "",
    ]
    head = (
        f"{'body':>7} {'way':<7} {'n':>5} {'write MB/s':>10} {'read MB/s':>9}"
        f" {'WAL/oct':>7} {'disk/oct':>8} {'srv CPU w':>9} {'backend MiB':>11}"
        f" {'del ms/body':>11} {'del WAL/body':>12} {'vacuum s':>8}"
    )
    lines += [head, "-" * len(head)]
    for row in report["results"]:
        if row.get("status") == "failed":
            lines.append(f"{_size(row['size']):>7} {row['way']:<7} FAILED: {row['error']}")
            continue
        w, r, d, v = row["write"], row["read"], row["delete"], row["vacuum"]
        backend = max(w["backend_rss_anon_mib"], r["backend_rss_anon_mib"])
        lines.append(
            f"{_size(row['size']):>7} {row['way']:<7} {row['bodies']:>5} {w['mb_s']:>10.1f}"
            f" {r['mb_s']:>9.1f} {w['wal_per_body_octet']:>7.2f} {row['disk_per_body_octet']:>8.2f}"
            f" {w['server_cpu']:>9.2f} {backend:>11.1f}"
            f" {d['ms_per_body']:>11.2f} {d['wal_per_body']:>12,.0f} {v['seconds']:>8.2f}"
        )
    lines += [
        "  WAL/oct, disk/oct: WAL written and space on disk per body octet; srv CPU w: CPU"
        " seconds of the PostgreSQL tree while writing; backend MiB: the connection's peak"
        " private memory (RssAnon) writing or reading",
        "",
        "chunk rows / large objects (medians; above 1.0 the chunk rows are faster):",
    ]
    for item in report["comparison"]:
        lines.append(f"  {item['name']:<28} {item['figure']}")
    return "\n".join(lines)


def compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size: the chunk rows' write and read MB/s over the large objects'."""
    out: list[dict[str, Any]] = []
    rows = {(r["size"], r["way"]): r for r in results if r.get("status") != "failed"}
    for size in sorted({r["size"] for r in results}):
        chunks, lo = rows.get((size, "chunks")), rows.get((size, "lo"))
        for step in ("write", "read"):
            value = None
            figure = "not measured"
            if chunks and lo and lo[step]["mb_s"]:
                value = chunks[step]["mb_s"] / lo[step]["mb_s"]
                figure = (f"{value:.2f}x ({chunks[step]['mb_s']:.1f} vs"
                          f" {lo[step]['mb_s']:.1f} MB/s)")  # fmt: skip
            out.append({"name": f"{_size(size)} {step}", "size": size, "step": step,
                        "value": value, "figure": figure})  # fmt: skip
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/pg_bodies.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10x fewer bodies, one run")
    parser.add_argument("--runs", type=int, default=None, help="runs per size and way (3; quick 1)")
    parser.add_argument(
        "--counts", default=None, metavar="SIZE=N,...",
        help="bodies per size, e.g. 4096=20,262144=4,10485760=1 (default: 2000, 200, 20)",
    )  # fmt: skip
    parser.add_argument("--database-url", default=None,
                        help="use this database (default: a throwaway PostgreSQL)")  # fmt: skip
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for the JSON results")
    opts = parser.parse_args(argv)
    if opts.runs is None:
        opts.runs = 1 if opts.quick else 3
    if opts.counts:
        opts.count_of = {int(k): int(v) for k, v in (p.split("=") for p in opts.counts.split(","))}
    else:
        opts.count_of = {s: max(3, n // 10) if opts.quick else n for s, n in COUNTS.items()}
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    started_at = dt.datetime.now(dt.UTC)
    began = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {text}", file=sys.stderr, flush=True)

    report: dict[str, Any] = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "quick": opts.quick, "runs": opts.runs, "commit": _git_commit(),
        "python": platform.python_version(), "loadavg_start": os.getloadavg(),
        "results": [],
    }  # fmt: skip
    with contextlib.ExitStack() as stack:
        url = opts.database_url
        if url is None:
            say("starting a throwaway PostgreSQL")
            pg = stack.enter_context(pgcluster.cluster())
            url = pg.url(pg.create_database())
        bench = Bench(url)
        stack.callback(bench.close)
        for name in ("server_version", "fsync", "synchronous_commit", "shared_buffers"):
            report[name] = bench._one(f"SHOW {name}")  # fixed setting names
        say(f"PostgreSQL {report['server_version']} at {url}")
        order: list[Callable[[], None]] = []
        runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
        errors: dict[tuple[int, str], str] = {}
        for size in SIZES:
            count = opts.count_of.get(size, 0)
            if count <= 0:
                continue
            for number in range(opts.runs):
                # Alternate which way goes first, so that neither always follows the other.
                ways = WAYS if number % 2 == 0 else WAYS[::-1]
                for way in ways:
                    order.append(lambda w=way, s=size, c=count, n=number: _one_run(
                        bench, w, s, c, n, runs, errors, say))  # fmt: skip
        for step in order:
            step()
    for size in SIZES:
        for way in WAYS:
            key = (size, way)
            if key in errors:
                report["results"].append({"way": way, "size": size, "status": "failed",
                                          "error": errors[key]})  # fmt: skip
            elif runs.get(key):
                report["results"].append({"status": "ok", **summarize(runs[key])})
    report["comparison"] = compare(report["results"])
    report["loadavg_end"] = os.getloadavg()
    report["elapsed_seconds"] = time.monotonic() - began
    print(render(report))
    save(report, opts, started_at, "pg-bodies")
    return 1 if errors else 0


def _one_run(
    bench: Bench,
    way: str,
    size: int,
    count: int,
    number: int,
    runs: dict[tuple[int, str], list[dict[str, Any]]],
    errors: dict[tuple[int, str], str],
    say: Callable[[str], None],
) -> None:
    key = (size, way)
    if key in errors:
        return
    try:
        result = bench.run(way, size, count, number)
    except Exception as exc:  # a driver error: the row fails, the others go on
        errors[key] = " ".join(str(exc).split())[:300]
        say(f"{_size(size)} {way}: FAILED: {errors[key]}")
        return
    runs.setdefault(key, []).append(result)
    say(
        f"{_size(size)} {way} run {number + 1}: write {result['write']['mb_s']:.1f} MB/s,"
        f" read {result['read']['mb_s']:.1f} MB/s, WAL {result['write']['wal_per_body_octet']:.2f}"
        f"/octet, delete {result['delete']['ms_per_body']:.2f} ms/body"
    )


if __name__ == "__main__":
    sys.exit(main())
