#!/usr/bin/env python3
"""``ehlo messages`` on a large store: how long a page takes, how much memory a full listing.

Run it through ``make bench`` (after bench/run.py) or directly with the
project venv, which it needs (it writes the store through the store API)::

    .venv/bin/python bench/messages.py [--quick] [--messages N] [--runs N]

It generates N messages (100,000; 10,000 with ``--quick``) into a SQLite
store in a temporary data folder, with the envelopes of
``tests/messages_data.py`` (recipients, TLS, authenticated users, greeting
reports on every other message), then times ``ehlo messages`` commands run
as subprocesses against it: each one once untimed (its output checked; it
also warms the page cache), then ``--runs`` times, each from a small parent
process that reports the wall time and the command's peak RSS (``os.wait4``).
The table goes to stdout with a PASS/FAIL line per target, progress to
stderr, the figures to bench/results/messages-<UTC timestamp>[-quick].json
and bench/results/messages-latest.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# The ``ehlo`` script of the venv running this file, else the module.
_SCRIPT = Path(sys.executable).parent / "ehlo"
EHLO = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "ehlo"]
MIB = 1024 * 1024
# The targets: a page of 50 under this many seconds (median); the whole
# store as JSON lines under this peak RSS (largest run).
PAGE_SECONDS = 0.5
ALL_RSS_MIB = 80.0
# The sender the filtered page asks for: every 100th message has it.
SENDER = 42
COMMAND_TIMEOUT = 600.0

# Runs argv[3:] with stdout into the file argv[1] and stderr into argv[2];
# prints its wall time, CPU time, peak RSS (KiB) and exit status as JSON. A small
# parent of its own: ``ru_maxrss`` of a child would count the pages of a
# large parent (this process, after generating the store) until exec.
_TIMED = """
import json, os, subprocess, sys, time
with open(sys.argv[1], "wb") as out, open(sys.argv[2], "wb") as err:
    began = time.perf_counter()
    child = subprocess.Popen(sys.argv[3:], stdout=out, stderr=err)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - began
print(json.dumps({"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                  "maxrss_kib": usage.ru_maxrss, "status": os.waitstatus_to_exitcode(status)}))
"""


def _messages_data() -> Any:
    """tests/messages_data.py: the generator the scale tests use."""
    sys.path.insert(0, str(ROOT))
    try:
        from tests import messages_data
    finally:
        sys.path.remove(str(ROOT))
    return messages_data


def stored_count(data: Path) -> int:
    """How many messages the SQLite store in ``data`` holds (0 without one)."""
    import sqlite3

    path = data / "ehlo.sqlite3"
    if not path.exists():
        return 0
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        conn.close()


def folder_mib(data: Path) -> float:
    return sum(p.stat().st_size for p in data.rglob("*") if p.is_file()) / MIB


class CommandFailed(Exception):
    """An ``ehlo messages`` command exited non-zero or printed the wrong thing."""


def timed(args: Sequence[str], out: Path, err: Path) -> dict[str, Any]:
    """One run of ``ehlo ARGS``: wall and CPU seconds, peak RSS in MiB."""
    result = subprocess.run(
        [sys.executable, "-c", _TIMED, str(out), str(err), *EHLO, *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    if result.returncode != 0 or not result.stdout.strip():
        raise CommandFailed(f"timing parent failed: {result.stderr.strip()[-500:]}")
    figures = json.loads(result.stdout)
    if figures["status"] != 0:
        problem = err.read_text(errors="replace").strip()[-500:]
        raise CommandFailed(f"ehlo {' '.join(args)}: exit {figures['status']}: {problem}")
    return {
        "seconds": figures["seconds"],
        "cpu_seconds": figures["cpu_seconds"],
        "peak_rss_mib": figures["maxrss_kib"] / 1024,
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = [r["seconds"] for r in runs]
    return {
        "seconds": {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)},
        "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "runs": runs,
    }


def measure(
    label: str,
    args: list[str],
    check: Any,
    opts: argparse.Namespace,
    work: Path,
    *,
    to_null: bool = False,
) -> dict[str, Any]:
    """A warm-up run whose output ``check`` verifies, then ``opts.runs`` timed runs."""
    out, err = work / "out", work / "err"
    timed(args, out, err)
    problem = check(out.read_bytes())
    if problem:
        raise CommandFailed(f"{label}: {problem}")
    runs = [timed(args, Path(os.devnull) if to_null else out, err) for _ in range(opts.runs)]
    return {"command": label, "args": args, "status": "ok", **summary(runs)}


def _lines(expected: int, *, header: bool = False) -> Any:
    """A check: the output has ``expected`` message lines (and a header line)."""

    def check(output: bytes) -> str | None:
        found = output.count(b"\n") - (1 if header and expected else 0)
        return None if found == expected else f"{found} lines printed, {expected} expected"

    return check


def targets(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    page = rows.get("page", {}).get("seconds", {}).get("median")
    everything = rows.get("all", {}).get("peak_rss_mib")
    return [
        {
            "target": f"list --limit 50 < {PAGE_SECONDS} s",
            "need": PAGE_SECONDS,
            "value": page,
            "pass": None if page is None else page < PAGE_SECONDS,
            "figure": "not measured" if page is None else f"{page:.3f} s (median)",
        },
        {
            "target": f"list --all --jsonl peak RSS < {ALL_RSS_MIB:.0f} MiB",
            "need": ALL_RSS_MIB,
            "value": everything,
            "pass": None if everything is None else everything < ALL_RSS_MIB,
            "figure": "not measured" if everything is None else f"{everything:.1f} MiB (largest)",
        },
    ]


def render(report: dict[str, Any]) -> str:
    load = report["loadavg_start"][0], report["loadavg_end"][0]
    lines = [
        f"ehlo messages: {report['messages']:,} messages in a sqlite store"
        f" ({report['store_mib']:.1f} MiB); {report['runs']} timed runs each;"
        f" load average {load[0]:.2f} -> {load[1]:.2f}",
        f"{'command':<44}{'wall s: median [min-max]':>28}{'CPU s':>8}{'peak RSS':>12}",
    ]
    for row in report["results"].values():
        if row["status"] != "ok":
            lines.append(f"{row['command']:<44}  FAILED: {row['error']}")
            continue
        s = row["seconds"]
        wall = f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"
        cpu = f"{row['cpu_seconds']:.3f}"
        lines.append(f"{row['command']:<44}{wall:>28}{cpu:>8}{row['peak_rss_mib']:>8.1f} MiB")
    lines.append("")
    for target in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[target["pass"]]
        lines.append(f"[{verdict}] {target['target']}: {target['figure']}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/messages.py", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="10,000 messages (not 100,000)")
    parser.add_argument("--messages", type=int, metavar="N", help="generate N messages")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command (default 5)")
    parser.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="data folder to use and keep: generated there when it holds no store, else"
        " measured as it is (a store generated by an earlier run)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for the JSON results")
    opts = parser.parse_args(argv)
    if opts.messages is None:
        opts.messages = 10_000 if opts.quick else 100_000
    if opts.messages < 1 or opts.runs < 1:
        parser.error("--messages and --runs must be at least 1")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    started = time.monotonic()
    started_at = dt.datetime.now(dt.UTC)

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    data_module = _messages_data()
    work = Path(tempfile.mkdtemp(prefix="ehlo-bench-messages-"))
    data = opts.data if opts.data is not None else work / "data"
    report: dict[str, Any] = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "versions": {
            "ehlo_commit": _git_commit(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpus": str(os.cpu_count()),
        },
        "loadavg_start": os.getloadavg(),
        "results": {},
    }
    if report["loadavg_start"][0] >= 1.0:
        say(f"warning: load average {report['loadavg_start'][0]:.2f}: figures will be high")
    failed = False
    try:
        total = stored_count(data)
        if total == 0:
            say(f"generating {opts.messages:,} messages in {data}")
            began = time.monotonic()
            data_module.generate(data, opts.messages)
            report["generate_seconds"] = time.monotonic() - began
            say(f"generated in {report['generate_seconds']:.1f} s")
            total = opts.messages
        else:
            say(f"{data} holds {total:,} messages: measured as it is")
        report["messages"] = total
        report["store_mib"] = folder_mib(data)
        report["runs"] = opts.runs
        where = ["--data", str(data)]
        middle = total // 2 - (total // 2) % 2  # an even one: it has a greeting report
        senders = sum(1 for i in range(total) if i % 100 == SENDER)
        plan: list[tuple[str, str, list[str], Any, bool]] = [
            ("page", "list --limit 50", ["list", "--limit", "50"],
             _lines(min(50, total), header=True), False),
            ("filtered", f"list --from sender{SENDER}@ --limit 50",
             ["list", "--from", f"sender{SENDER}@", "--limit", "50"],
             _lines(min(50, senders), header=True), False),
            ("all", "list --all --jsonl > /dev/null", ["list", "--all", "--jsonl"],
             _lines(total), True),
        ]  # fmt: skip
        results: dict[str, dict[str, Any]] = report["results"]
        for key, label, args, check, to_null in plan:
            say(f"ehlo messages {label}")
            try:
                results[key] = measure(
                    label, ["messages", *args, *where], check, opts, work, to_null=to_null
                )
            except (CommandFailed, subprocess.TimeoutExpired) as exc:
                failed = True
                results[key] = {"command": label, "status": "failed", "error": str(exc)}
        say("ehlo messages show ID --json")
        try:
            results["show"] = _measure_show(data_module, middle, where, opts, work)
        except (CommandFailed, subprocess.TimeoutExpired) as exc:
            failed = True
            results["show"] = {"command": "show ID --json", "status": "failed", "error": str(exc)}
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["targets"] = targets(report["results"])
    report["loadavg_end"] = os.getloadavg()
    report["elapsed_seconds"] = time.monotonic() - started
    print(render(report))
    save(report, opts, started_at, "messages")
    return 1 if failed else 0


def save(
    report: dict[str, Any], opts: argparse.Namespace, started_at: dt.datetime, name: str
) -> None:
    """``report`` as NAME-<UTC timestamp>[-quick].json and NAME-latest.json in ``opts.output``."""
    opts.output.mkdir(parents=True, exist_ok=True)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    path = opts.output / f"{name}-{stamp}{'-quick' if opts.quick else ''}.json"
    text = json.dumps(report, indent=2, default=str) + "\n"
    path.write_text(text)
    (opts.output / f"{name}-latest.json").write_text(text)
    print(f"results: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def _measure_show(
    data_module: Any, number: int, where: list[str], opts: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """``show ID --json`` of message ``number`` (found by its time with ``list``)."""
    until = data_module.when(number + 1).isoformat()
    found = subprocess.run(
        [*EHLO, "messages", "list", "--jsonl", "--limit", "1", "--until", until, *where],
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    if found.returncode != 0 or not found.stdout.strip():
        raise CommandFailed(f"list --until {until}: {found.stderr.decode(errors='replace')}")
    queue_id = json.loads(found.stdout)["id"]

    def check(output: bytes) -> str | None:
        shown = json.loads(output)
        if shown.get("id") != queue_id or "greeting_checks" not in shown:
            return f"show {queue_id} --json printed {output[:200]!r}"
        return None

    args = ["messages", "show", queue_id, "--json", *where]
    return {"id": queue_id, **measure("show ID --json", args, check, opts, work)}


def _git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "?"
    return result.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
