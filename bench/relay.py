#!/usr/bin/env python3
"""Delivery benchmarks: R1 relays mail to a sink (ehlo against Postfix), R2 a queue at rest.

Run it through ``make bench`` (after bench/run.py and bench/messages.py),
``make bench-relay`` (these rows alone), or directly with the project venv,
which it needs (R2 writes its store through the store API)::

    .venv/bin/python bench/relay.py [--quick] [--rows R1,R2] [--messages N] [--queue N]

R1, relay: Postfix's smtp-source sends W2's load (20 sessions, many 4 KiB
messages each) to ``ehlo serve --relay-network 127.0.0.0/8 --domain
bench.local --relay-host 127.0.0.1:SINK``, every recipient relayed to a
Postfix smtp-sink that counts (``-c``); then the same to a private Postfix
instance (its own folder, ``relayhost = [127.0.0.1]:SINK``) with a sink of
its own, in the same run. Messages per second end to end: from the start of
smtp-source to the last message counted by the sink; connections to the
sink per 10 messages (the sessions smtp-sink counts once the server is
stopped); server CPU per 1,000 messages (the whole process tree, reaped
children included).

R2, a queue at rest: N deferred entries (100,000; 10,000 with ``--quick``),
one message each, written through the SQLite store's writer (``Envelope.queue``
items, as a relayed message is stored) and then marked ``deferred`` by one SQL
``UPDATE``. It times ``ehlo queue list --limit 50`` (or, where ``ehlo queue``
does not exist yet, ``SQLiteQueue.entries(limit=50)`` in a fresh process),
then starts ``ehlo serve`` on that store with every entry due and the next
hop refusing connections and samples the server's RSS for ``--rss-seconds``,
against the same with 1,000 entries: the scheduler loads due entries in
windows, so its memory must not grow with the queue.

The table goes to stdout with a PASS/FAIL line per target, progress to
stderr, the figures to bench/results/relay-<UTC timestamp>[-quick].json and
bench/results/relay-latest.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import messages as _messages  # bench/messages.py: the timed command runner
import postfix as _postfix  # bench/postfix.py: the private Postfix instance
import run as _run  # bench/run.py: processes, CPU, RSS

ROOT = _run.ROOT
RESULTS = _run.RESULTS
HOST = _run.HOST
MIB = _run.MIB
EHLO = _messages.EHLO
SBIN_PATH = _run.SBIN_PATH

# The targets.
R1_RATIO = 2.0  # ehlo msg/s >= 2x Postfix's
R1_CONNECTIONS = 1.0  # connections to the sink per 10 messages < 1
R2_LIST_SECONDS = 0.5  # `ehlo queue list --limit 50` (median)
R2_RSS_GROWTH = 1.25  # peak RSS with N entries <= 1.25x the RSS with 1,000
SMALL_QUEUE = 1000

SENDER = "bench@bench.local"
RECIPIENT = "rcpt@dest.example"
DOMAIN = "bench.local"
# R1 gives up when the sink has counted nothing new for this many seconds.
STALL_SECONDS = 60.0


# ---------------------------------------------------------------------------
# Processes


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    """Wait until something answers 220 on ``port`` (``proc`` must stay alive)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=2.0) as sock:
                sock.settimeout(5.0)
                reply = _run.read_reply(sock)
                if reply.startswith(b"220"):
                    with contextlib.suppress(OSError):
                        sock.sendall(b"QUIT\r\n")
                        _run.read_reply(sock)
                    return
                last = reply.decode(errors="replace").strip()
        except (OSError, _run.RunError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{what} not answering on {HOST}:{port} after {timeout:g}s ({last})")


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM to the process group ``proc`` leads, SIGKILL when it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything of the group left behind


def start(argv: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PATH": SBIN_PATH},
            **kwargs,
        )


def tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.replace("\r", "\n").strip().splitlines()[-lines:])


# ---------------------------------------------------------------------------
# The sink: smtp-sink -c, its counters read from its output


_COUNTS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")


def parse_counts(output: bytes) -> tuple[int, int]:
    """(sessions ended, messages received) from the end of ``smtp-sink -c`` output.

    smtp-sink prints ``sess=N quit=N mesg=N`` followed by a carriage return
    each time a session ends, a QUIT arrives or a message's "." is read.
    """
    found = _COUNTS.findall(output)
    if not found:
        return 0, 0
    sess, _quit, mesg = found[-1]
    return int(sess), int(mesg)


class Sink:
    """A Postfix smtp-sink on a free loopback port that counts what it receives."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.port = _run.free_port()
        self.output = workdir / f"{name}.out"
        argv = [shutil.which("smtp-sink", path=SBIN_PATH) or "/usr/sbin/smtp-sink", "-c"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
        argv += ["-m", "1000", "-t", "600", f"{HOST}:{self.port}", "1024"]
        self.proc = start(argv, self.output)
        wait_port(self.port, self.proc, "smtp-sink")

    def counts(self) -> tuple[int, int]:
        """(sessions ended, messages received) so far."""
        try:
            with open(self.output, "rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(0, size - 200))
                return parse_counts(handle.read())
        except OSError:
            return 0, 0

    def cpu(self) -> float:
        return _run.tree_cpu(self.proc.pid)

    def stop(self) -> None:
        stop_group(self.proc)


# ---------------------------------------------------------------------------
# The servers under R1


def ehlo_config(path: Path, extra: str = "") -> Path:
    """A configuration file for the relaying ehlo (no MTA-STS lookups, no rate limits)."""
    path.write_text(
        "mta_sts = false\nmax_connection_rate = 0\nmax_connections_per_ip = 1000\n" + extra
    )
    return path


def ehlo_relay_argv(
    port: int, data: Path, config: Path, sink_port: int, workers: int | None, dns: str
) -> list[str]:
    cmd = [
        *EHLO, "serve",
        "--listen", f"{HOST}:{port}",
        "--data", str(data),
        "--store", "sqlite",
        "--config", str(config),
        "--no-tls",
        "--no-reverse-dns",
        "--helo-policy", "off",
        "--log-level", "WARNING",
        "--domain", DOMAIN,
        "--relay-network", "127.0.0.0/8",
        "--relay-host", f"{HOST}:{sink_port}",
        # Nothing is looked up (the next hops are addresses), but the resolver
        # is made at start: the loopback DNS server, never the machine's.
        "--dns-server", dns,
    ]  # fmt: skip
    if workers is not None:
        cmd += ["--workers", str(workers)]
    return cmd


class Postfix:
    """A private Postfix instance (bench/postfix.py) relaying to ``sink_port``."""

    def __init__(self, workdir: Path, sink_port: int) -> None:
        self.port = _run.free_port()
        self.folder = workdir / "postfix"
        argv = _postfix.prepare(self.folder, self.port, relay_port=sink_port)
        self.log = workdir / "postfix.log"
        self.proc = start(argv, self.log)
        try:
            wait_port(self.port, self.proc, "postfix")
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}: {tail(self.log)}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        _postfix.stop(self.folder, self.proc)
        stop_group(self.proc)


class Ehlo:
    """``ehlo serve`` relaying every recipient from 127.0.0.0/8 to ``sink_port``."""

    def __init__(self, workdir: Path, sink_port: int, workers: int | None, dns: str) -> None:
        self.port = _run.free_port()
        self.data = workdir / "ehlo-relay"
        self.data.mkdir()
        config = ehlo_config(workdir / "ehlo-relay.toml")
        self.log = workdir / "ehlo-relay.log"
        self.argv = ehlo_relay_argv(self.port, self.data, config, sink_port, workers, dns)
        self.proc = start(self.argv, self.log)
        try:
            wait_port(self.port, self.proc, "ehlo serve")
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}: {tail(self.log)}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_group(self.proc, timeout=20)


def smtp_source_argv(port: int, messages: int) -> list[str]:
    """W2's load (bench/run.py), from a sender and to a recipient that is relayed."""
    workload = _run.WORKLOADS["W2"]
    binary = shutil.which("smtp-source", path=SBIN_PATH) or "/usr/sbin/smtp-source"
    return [binary, *workload.argv(messages), "-M", _run.HELO_NAME,
            "-f", SENDER, "-t", RECIPIENT, f"{HOST}:{port}"]  # fmt: skip


def relay_run(
    label: str,
    server: Ehlo | Postfix,
    sink: Sink,
    messages: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Send ``messages`` through ``server`` and wait until ``sink`` counted them all."""
    sessions_before, mesg_before = sink.counts()
    cpu_before = _run.tree_cpu(server.pid)
    sink_cpu_before = sink.cpu()
    system_before, steal_before = _run.system_cpu()
    began = time.perf_counter()
    source = subprocess.Popen(
        smtp_source_argv(server.port, messages),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    accepted_at: float | None = None
    last_count, last_change = mesg_before, time.monotonic()
    try:
        while True:
            if accepted_at is None and source.poll() is not None:
                accepted_at = time.perf_counter()
                if source.returncode != 0:
                    output = (source.stdout.read() if source.stdout else b"").decode(
                        errors="replace"
                    )
                    raise RuntimeError(f"smtp-source exit {source.returncode}: {output[-300:]}")
            _, mesg = sink.counts()
            if mesg - mesg_before >= messages:
                break
            if mesg != last_count:
                last_count, last_change = mesg, time.monotonic()
            elif time.monotonic() - last_change > STALL_SECONDS:
                raise RuntimeError(
                    f"the sink counted {mesg - mesg_before} of {messages} messages and nothing"
                    f" more for {STALL_SECONDS:.0f}s"
                )
            time.sleep(0.02)
        done = time.perf_counter()
        if accepted_at is None:
            source.wait(timeout=60)
            accepted_at = time.perf_counter()
    finally:
        if source.poll() is None:
            source.kill()
        source.wait()
    cpu = _run.tree_cpu(server.pid) - cpu_before
    system_after, steal_after = _run.system_cpu()
    sink_cpu = sink.cpu() - sink_cpu_before
    seconds = done - began
    # Sessions end (and are counted) when the server closes its cached connections.
    server.stop()
    deadline = time.monotonic() + 10
    sessions, mesg = sink.counts()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = sink.counts()
        if again == (sessions, mesg):
            break
        sessions, mesg = again
    connections = sessions - sessions_before
    result = {
        "status": "ok",
        "messages": messages,
        "received": mesg - mesg_before,
        "seconds": seconds,
        "accept_seconds": accepted_at - began,
        "msg_s": messages / seconds,
        "accept_msg_s": messages / (accepted_at - began),
        "sink_connections": connections,
        "connections_per_10": connections / messages * 10,
        "server_cpu_s": cpu,
        "cpu_s_per_1k": cpu / messages * 1000,
        "sink_cpu_s": sink_cpu,
        "machine_cpu_cores": (system_after - system_before) / seconds,
        "steal_cores": (steal_after - steal_before) / seconds,
    }
    say(
        f"R1 {label}: {result['msg_s']:,.0f} msg/s end to end ({seconds:.1f}s; accepted in"
        f" {result['accept_seconds']:.1f}s), {connections} connections to the sink,"
        f" server CPU {cpu:.1f}s"
    )
    return result


def run_r1(opts: argparse.Namespace, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "messages": opts.messages,
        "flags": " ".join(smtp_source_argv(0, opts.messages)[1:-1]),
    }
    for key, label in (("ehlo", "ehlo sqlite"), ("postfix", "Postfix")):
        if key not in opts.servers:
            continue
        sink = Sink(workdir, f"sink-{key}")
        server: Ehlo | Postfix | None = None
        try:
            say(f"R1 {label}: {opts.messages:,} messages to the sink on port {sink.port}")
            server = (
                Ehlo(workdir, sink.port, opts.ehlo_workers, opts.dns_server)
                if key == "ehlo"
                else Postfix(workdir, sink.port)
            )
            out[key] = {"label": label, **relay_run(label, server, sink, opts.messages, say)}
            if isinstance(server, Ehlo):
                out[key]["argv"] = server.argv
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            say(f"R1 {label}: FAILED: {exc}")
            out[key] = {"label": label, "status": "failed", "error": str(exc)}
        finally:
            if server is not None:
                server.stop()
            sink.stop()
    return out


# ---------------------------------------------------------------------------
# R2: a queue at rest


async def _fill_queue(data: Path, total: int, next_hop: str) -> None:
    from ehlo.ids import new_queue_id
    from ehlo.storage import Envelope, open_store
    from ehlo.storage.queue import QueueItem

    store = open_store("sqlite", data, writer="thread")
    await store.start()
    try:
        now = dt.datetime.now(dt.UTC)
        body = b"Subject: queued\r\n\r\n" + (b"x" * 70 + b"\r\n") * 14
        for first in range(0, total, 5000):
            futures = []
            for i in range(first, min(first + 5000, total)):
                rcpt = f"user{i}@dest.example"
                envelope = Envelope(
                    queue_id=new_queue_id(),
                    client_ip="127.0.0.1",
                    client_port=40000 + i % 1000,
                    greeting="EHLO",
                    greeting_name="client.example",
                    mail_from=f"sender{i % 100}@{DOMAIN}",
                    mail_params={},
                    rcpt_to=[rcpt],
                    received_at=now,
                    extra={"handed_on": True},
                    queue=[QueueItem(rcpt, next_hop)],
                )
                writer = store.begin(envelope)
                writer.write(body)
                futures.append(writer.start_commit())
            await asyncio.gather(*futures)
    finally:
        await store.close()


def fill_queue(data: Path, total: int, next_hop: str, *, deferred: bool = True) -> None:
    """``total`` messages, one relayed recipient each, all deferred and due now.

    Written through the store's writer (one commit per message, in batches:
    the queue rows are those a relayed message gets), then one ``UPDATE``
    makes every entry ``deferred`` after one failed attempt, due a minute ago.
    """
    asyncio.run(_fill_queue(data, total, next_hop))
    if not deferred:
        return
    now = time.time()
    reply = json.dumps({"code": 421, "enhanced": "4.4.2", "text": "connection refused",
                        "host": next_hop.removeprefix("smtp:"), "address": HOST})  # fmt: skip
    conn = sqlite3.connect(data / "ehlo.sqlite3")
    try:
        with conn:
            conn.execute(
                "UPDATE queue SET state = 'deferred', attempts = 1, next_attempt = ?,"
                " last_reply = ?, updated = ?",
                (now - 60, reply, now),
            )
    finally:
        conn.close()


def queue_counts(data: Path) -> dict[str, int]:
    """Entries per state, and ``due``: those queued or deferred whose time has come."""
    conn = sqlite3.connect(f"{(data / 'ehlo.sqlite3').resolve().as_uri()}?mode=ro", uri=True)
    try:
        counts = dict(conn.execute("SELECT state, count(*) FROM queue GROUP BY state").fetchall())
        (due,) = conn.execute(
            "SELECT count(*) FROM queue WHERE state IN ('queued', 'deferred')"
            " AND next_attempt <= ?",
            (time.time(),),
        ).fetchone()
    finally:
        conn.close()
    return {**counts, "due": int(due)}


def has_queue_command() -> bool:
    result = subprocess.run(
        [*EHLO, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    return re.search(r"^\s+queue\s", result.stdout, re.MULTILINE) is not None


# The fallback while ``ehlo queue`` does not exist: the same page, read the same way.
_ENTRIES = """
import sys
from pathlib import Path
from ehlo.storage.queue import SQLiteQueue
for e in SQLiteQueue(Path(sys.argv[1]) / "ehlo.sqlite3").entries(limit=int(sys.argv[2])):
    print(e.queue_id, e.state, e.recipient)
"""


def list_command(data: Path, limit: int) -> tuple[str, list[str]]:
    """(label, argv for bench/messages.py's ``timed``) of the page R2 times."""
    if has_queue_command():
        return f"ehlo queue list --limit {limit}", [
            *EHLO,
            "queue",
            "list",
            "--limit",
            str(limit),
            "--data",
            str(data),
        ]
    return (
        f"SQLiteQueue.entries(limit={limit}) (no `ehlo queue` yet)",
        [sys.executable, "-c", _ENTRIES, str(data), str(limit)],
    )


def time_list(data: Path, opts: argparse.Namespace, work: Path) -> dict[str, Any]:
    label, argv = list_command(data, 50)
    out, err = work / "list.out", work / "list.err"
    runs = []
    for i in range(opts.runs + 1):  # the first one warms the page cache, untimed
        result = subprocess.run(
            [sys.executable, "-c", _messages._TIMED, str(out), str(err), *argv],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if result.returncode != 0 or not result.stdout.strip():
            raise RuntimeError(f"timing parent failed: {result.stderr.strip()[-300:]}")
        figures = json.loads(result.stdout)
        if figures["status"] != 0:
            raise RuntimeError(f"{label}: exit {figures['status']}: {tail(err)}")
        lines = out.read_bytes().count(b"\n")
        if lines < 50:
            raise RuntimeError(f"{label}: printed {lines} lines, 50 entries expected")
        if i:
            runs.append(figures)
    seconds = [r["seconds"] for r in runs]
    return {
        "command": label,
        "argv": argv,
        "status": "ok",
        "seconds": {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)},
        "peak_rss_mib": max(r["maxrss_kib"] for r in runs) / 1024,
    }


def scheduler_rss(
    data: Path, workdir: Path, name: str, opts: argparse.Namespace, say: Callable[[str], None]
) -> dict[str, Any]:
    """``ehlo serve`` on ``data`` (all entries due, next hop refusing): RSS over time."""
    port = _run.free_port()
    config = ehlo_config(workdir / f"{name}.toml")
    log = workdir / f"{name}.log"
    # The next hop is the one stored with each entry (a port nothing listens on);
    # --relay-host only makes routing not catch-all, so the scheduler runs.
    argv = ehlo_relay_argv(port, data, config, _run.free_port(), opts.ehlo_workers, opts.dns_server)
    before = queue_counts(data)
    proc = start(argv, log)
    samples: list[int] = []
    try:
        wait_port(port, proc, "ehlo serve")
        with _run.RSSSampler(proc.pid, interval=0.1) as sampler:
            deadline = time.monotonic() + opts.rss_seconds
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"ehlo serve died: {tail(log)}")
                samples.append(_run.tree_rss(proc.pid))
                time.sleep(0.5)
        per_process = max(sampler.peak_per_pid.values(), default=0)
        peak = sampler.peak_total
        # The scheduler must have taken entries up (on a busy machine it may
        # start late): wait for it rather than report an idle server's memory.
        deadline = time.monotonic() + 60
        while queue_counts(data)["due"] >= before["due"] and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"ehlo serve died: {tail(log)}")
            time.sleep(0.2)
    finally:
        stop_group(proc, timeout=20)
    after = queue_counts(data)
    result = {
        "status": "ok",
        "entries": sum(v for k, v in before.items() if k != "due"),
        "seconds": opts.rss_seconds,
        "rss_first_mib": samples[0] / MIB if samples else None,
        "rss_last_mib": samples[-1] / MIB if samples else None,
        "peak_rss_mib": peak / MIB,
        "peak_rss_process_mib": per_process / MIB,
        "states_before": before,
        "states_after": after,
        # Entries the scheduler took up while sampled (deferred again: next hop down).
        "handled": before["due"] - after["due"],
    }
    say(
        f"R2 serve with {result['entries']:,} entries: RSS {result['rss_first_mib']:.1f} ->"
        f" {result['rss_last_mib']:.1f} MiB, peak {result['peak_rss_mib']:.1f} MiB;"
        f" states after: {after}"
    )
    return result


def run_r2(opts: argparse.Namespace, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"entries": opts.queue}
    # Nothing listens there: every attempt is refused.
    refusing = f"smtp:{HOST}:{_run.free_port()}"
    stores: dict[str, Path] = {}
    for key, total in (("small", min(SMALL_QUEUE, opts.queue)), ("large", opts.queue)):
        data = workdir / f"queue-{key}"
        say(f"R2: {total:,} deferred entries into {data}")
        began = time.monotonic()
        fill_queue(data, total, refusing)
        out[f"generate_{key}_seconds"] = time.monotonic() - began
        stores[key] = data
    out["store_mib"] = _messages.folder_mib(stores["large"])
    try:
        say("R2: the page of 50")
        out["list"] = time_list(stores["large"], opts, workdir)
        say(f"    {out['list']['command']}: {out['list']['seconds']['median']:.3f} s (median)")
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
        say(f"R2 list: FAILED: {exc}")
        out["list"] = {"status": "failed", "error": str(exc)}
    for key in ("small", "large"):
        try:
            out[f"serve_{key}"] = scheduler_rss(stores[key], workdir, f"serve-{key}", opts, say)
        except (RuntimeError, OSError, subprocess.SubprocessError, sqlite3.Error) as exc:
            say(f"R2 serve ({key}): FAILED: {exc}")
            out[f"serve_{key}"] = {"status": "failed", "error": str(exc)}
    return out


# ---------------------------------------------------------------------------
# Where R1's delivery time goes: the scheduler alone, in this process, under cProfile


def profile_delivery(total: int, workdir: Path, dns: str, say: Callable[[str], None]) -> str:
    """Deliver ``total`` queued messages to a sink with cProfile on; the top functions.

    The queue is filled first (``queued``, next hop the sink), then the
    library's ``Server`` (one process, the scheduler in it) hands it on: no
    receiving in the profile, only the scheduler, the client and the store.
    """
    import cProfile
    import io
    import pstats

    from ehlo import Listen, Server
    from ehlo.config import GreetingConfig, ServerConfig

    sink = Sink(workdir, "sink-profile")
    try:
        data = workdir / "profile"
        fill_queue(data, total, f"smtp:{HOST}:{sink.port}", deferred=False)
        config = ServerConfig(
            listen=(Listen(HOST, 0),), data_dir=data, store="sqlite", domains=(DOMAIN,),
            relay_networks=("127.0.0.0/8",), relay_host=f"{HOST}:{sink.port}", mta_sts=False,
            greeting=GreetingConfig(policy="off"), reverse_dns=False, dns_servers=(dns,),
        )  # fmt: skip

        spent: dict[str, list[float]] = {}

        def timed_call(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                began = time.perf_counter()
                try:
                    return func(*args, **kwargs)
                finally:
                    spent.setdefault(name, []).append(time.perf_counter() - began)

            return call

        async def deliver() -> float:
            server = Server(config)
            began = time.perf_counter()
            await server.start()
            scheduler = server.scheduler
            assert scheduler is not None
            # The calls the scheduler makes in threads (cProfile sees only this one).
            queue, store = scheduler.queue, scheduler.store
            for name in ("due", "claim", "record", "finished_messages", "next_due"):
                setattr(queue, name, timed_call(f"queue.{name}", getattr(queue, name)))
            for name in ("get", "raw", "delete"):
                setattr(store, name, timed_call(f"store.{name}", getattr(store, name)))
            try:
                while sink.counts()[1] < total:
                    await asyncio.sleep(0.05)
                return time.perf_counter() - began
            finally:
                await server.stop(timeout=5.0)

        profile = cProfile.Profile()
        cpu_before = _run._self_cpu()
        seconds = profile.runcall(asyncio.run, deliver())
        cpu = _run._self_cpu() - cpu_before
    finally:
        sink.stop()
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    say(
        f"profile: {total:,} messages delivered in {seconds:.1f}s ({total / seconds:,.0f} msg/s),"
        f" {cpu / total * 1000:.2f} ms of CPU per message (this process, its threads included,"
        " under cProfile)"
    )
    lines = ["calls made in threads (wall time):"]
    for name, times in sorted(spent.items(), key=lambda item: -sum(item[1])):
        lines.append(
            f"  {name:<24} {len(times):>6} calls {sum(times):>8.2f} s in all,"
            f" median {statistics.median(times) * 1000:.2f} ms"
        )
    return "\n".join(lines) + "\n\n" + text.getvalue()


# ---------------------------------------------------------------------------
# Targets and the table


def _ok(entry: Any) -> bool:
    return isinstance(entry, dict) and entry.get("status") == "ok"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, need: float, value: float | None, passed: bool | None, figure: str) -> None:
        out.append({"target": name, "need": need, "value": value, "pass": passed,
                    "figure": figure if value is not None else "not measured"})  # fmt: skip

    r1 = results.get("R1", {})
    ehlo, postfix = r1.get("ehlo"), r1.get("postfix")
    ratio = None
    if _ok(ehlo) and _ok(postfix):
        ratio = ehlo["msg_s"] / postfix["msg_s"]
    add(f"R1 relay >= {R1_RATIO:g}x Postfix", R1_RATIO, ratio,
        None if ratio is None else ratio >= R1_RATIO,
        f"{ratio or 0:.2f}x ({ehlo['msg_s'] if _ok(ehlo) else 0:,.1f} vs"
        f" {postfix['msg_s'] if _ok(postfix) else 0:,.1f} msg/s)")  # fmt: skip
    per10 = ehlo["connections_per_10"] if _ok(ehlo) else None
    add(f"R1 < {R1_CONNECTIONS:g} connection to the sink per 10 msgs", R1_CONNECTIONS, per10,
        None if per10 is None else per10 < R1_CONNECTIONS,
        f"{per10 or 0:.3f} ({ehlo['sink_connections'] if _ok(ehlo) else 0} for"
        f" {ehlo['messages'] if _ok(ehlo) else 0:,})")  # fmt: skip
    r2 = results.get("R2", {})
    page = r2.get("list")
    seconds = page["seconds"]["median"] if _ok(page) else None
    add(f"R2 queue list --limit 50 < {R2_LIST_SECONDS:g} s", R2_LIST_SECONDS, seconds,
        None if seconds is None else seconds < R2_LIST_SECONDS,
        f"{seconds or 0:.3f} s (median, {r2.get('entries', 0):,} entries)")  # fmt: skip
    small, large = r2.get("serve_small"), r2.get("serve_large")
    growth = None
    if _ok(small) and _ok(large):
        growth = large["peak_rss_mib"] / small["peak_rss_mib"]
    add(f"R2 scheduler RSS does not grow with the queue (<= {R2_RSS_GROWTH:g}x)",
        R2_RSS_GROWTH, growth, None if growth is None else growth <= R2_RSS_GROWTH,
        f"{growth or 0:.2f}x ({large['peak_rss_mib'] if _ok(large) else 0:.1f} MiB with"
        f" {large['entries'] if _ok(large) else 0:,} entries vs"
        f" {small['peak_rss_mib'] if _ok(small) else 0:.1f} with"
        f" {small['entries'] if _ok(small) else 0:,})")  # fmt: skip
    return out


def render(report: dict[str, Any]) -> str:
    load = report["loadavg_start"][0], report.get("loadavg_end", [0.0])[0]
    results = report["results"]
    versions = report["versions"]
    lines = [f"delivery rows (ehlo {versions['ehlo_commit']}, {versions['cpus']} CPUs;"
             f" load average {load[0]:.2f} -> {load[1]:.2f})", ""]  # fmt: skip
    r1 = results.get("R1")
    if r1:
        head = (f"{'R1 relay':<12}{'server':<14}{'msgs':>8}{'msg/s e2e':>11}{'accept/s':>10}"
                f"{'conns/10':>10}{'CPU s/1k':>10}{'sink CPU s':>11}{'machine':>9}")  # fmt: skip
        lines += [head, "-" * len(head)]
        for key in ("ehlo", "postfix"):
            row = r1.get(key)
            if row is None:
                continue
            if not _ok(row):
                lines.append(f"{'R1':<12}{row['label']:<14}FAILED: {row.get('error', '?')[:120]}")
                continue
            lines.append(
                f"{'R1':<12}{row['label']:<14}{row['messages']:>8}{row['msg_s']:>11,.0f}"
                f"{row['accept_msg_s']:>10,.0f}{row['connections_per_10']:>10.3f}"
                f"{row['cpu_s_per_1k']:>10.3f}{row['sink_cpu_s']:>11.2f}"
                f"{row['machine_cpu_cores'] * 100:>8.0f}%"
            )
        lines.append(
            "  msg/s e2e: from smtp-source's start to the last message counted by the sink;"
            " accept/s: until smtp-source ended; conns/10: connections to the sink per 10"
            " messages; CPU s/1k: the server's process tree; machine: all CPUs in use"
            " during the run, in % of one core"
        )
        lines.append("")
    r2 = results.get("R2")
    if r2:
        page = r2.get("list", {})
        if _ok(page):
            s = page["seconds"]
            lines.append(
                f"R2 {page['command']}: {s['median']:.3f} s [{s['min']:.3f}-{s['max']:.3f}],"
                f" peak RSS {page['peak_rss_mib']:.1f} MiB ({r2['entries']:,} deferred entries,"
                f" store {r2.get('store_mib', 0):.0f} MiB)"
            )
        else:
            lines.append(f"R2 queue list: FAILED: {page.get('error', '?')}")
        for key in ("serve_small", "serve_large"):
            row = r2.get(key, {})
            if _ok(row):
                lines.append(
                    f"R2 ehlo serve, {row['entries']:>7,} entries due, next hop refusing:"
                    f" RSS {row['rss_first_mib']:.1f} -> {row['rss_last_mib']:.1f} MiB,"
                    f" peak {row['peak_rss_mib']:.1f} MiB (largest process"
                    f" {row['peak_rss_process_mib']:.1f}) over {row['seconds']:g} s;"
                    f" {row['handled']:,} entries taken up"
                )
            else:
                lines.append(f"R2 ehlo serve ({key}): FAILED: {row.get('error', '?')}")
        lines.append("")
    lines.append("targets (issue 17):")
    for t in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        lines.append(f"  [{verdict}] {t['target']:<56} {t['figure']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/relay.py", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="10x fewer messages and entries")
    parser.add_argument("--rows", default="R1,R2", help="comma-separated rows (default R1,R2)")
    parser.add_argument(
        "--servers", default="ehlo,postfix", help="R1's servers (default ehlo,postfix)"
    )
    parser.add_argument("--messages", type=int, metavar="N", help="R1 messages (default 20,000)")
    parser.add_argument("--queue", type=int, metavar="N", help="R2 entries (default 100,000)")
    parser.add_argument("--runs", type=int, default=5, help="R2 timed listings (default 5)")
    parser.add_argument(
        "--rss-seconds", type=float, default=20.0, help="R2 RSS sampling (default 20 s)"
    )
    parser.add_argument(
        "--ehlo-workers", type=int, metavar="N", help="pass --workers N to ehlo serve"
    )
    parser.add_argument(
        "--profile-delivery",
        type=int,
        metavar="N",
        help="instead of the rows: deliver N queued messages to a sink in this process under"
        " cProfile and print where the time goes",
    )
    parser.add_argument("--keep-data", action="store_true", help="keep the data and logs")
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for the JSON results")
    opts = parser.parse_args(argv)
    if opts.messages is None:
        opts.messages = 2_000 if opts.quick else 20_000
    if opts.queue is None:
        opts.queue = 10_000 if opts.quick else 100_000
    opts.row_list = [r.strip().upper() for r in opts.rows.split(",") if r.strip()]
    opts.servers = [s.strip() for s in opts.servers.split(",") if s.strip()]
    if opts.messages < 20 or opts.queue < 50 or opts.runs < 1:
        parser.error("--messages must be at least 20, --queue 50, --runs 1")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    started = time.monotonic()
    started_at = dt.datetime.now(dt.UTC)

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    _run.raise_nofile()
    if opts.profile_delivery:
        workdir = Path(tempfile.mkdtemp(prefix="ehlo-bench-relay-"))
        try:
            with _run.loopback_dns() as dns:
                print(profile_delivery(opts.profile_delivery, workdir, dns.nameserver, say))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0
    report: dict[str, Any] = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "versions": {
            "ehlo_commit": _messages._git_commit(),
            "python": platform.python_version(),
            "postfix": _run.command_output(["postconf", "-h", "mail_version"]),
            "kernel": platform.release(),
            "cpus": str(os.cpu_count()),
        },
        "loadavg_start": os.getloadavg(),
        "results": {},
    }
    if report["loadavg_start"][0] >= 1.0:
        say(f"warning: load average {report['loadavg_start'][0]:.2f}: figures will be noisy")
    workdir = Path(tempfile.mkdtemp(prefix="ehlo-bench-relay-"))
    workdir.chmod(0o755)  # Postfix's daemons (as postfix) walk into their folder
    stack = contextlib.ExitStack()
    try:
        opts.dns_server = stack.enter_context(_run.loopback_dns()).nameserver
    except Exception as exc:  # dnspython missing, port trouble
        print(f"bench/relay.py: the loopback DNS server: {exc}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
        return 1
    try:
        if "R1" in opts.row_list:
            missing = [t for t in ("smtp-source", "smtp-sink", "postfix")
                       if shutil.which(t, path=SBIN_PATH) is None]  # fmt: skip
            if missing:
                report["results"]["R1"] = {"status": "skipped", "error": f"missing: {missing}"}
                say(f"R1: skipped: {', '.join(missing)} missing (make test-deps)")
            else:
                report["results"]["R1"] = run_r1(opts, workdir, say)
        if "R2" in opts.row_list:
            report["results"]["R2"] = run_r2(opts, workdir, say)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        stack.close()
        if opts.keep_data:
            say(f"data and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report["targets"] = targets(report["results"])
    failed = any(
        isinstance(row, dict) and row.get("status") == "failed"
        for rows in report["results"].values()
        for row in rows.values()
    )
    report["loadavg_end"] = os.getloadavg()
    report["elapsed_seconds"] = time.monotonic() - started
    print(render(report))
    opts.output.mkdir(parents=True, exist_ok=True)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    path = opts.output / f"relay-{stamp}{'-quick' if opts.quick else ''}.json"
    text = json.dumps(report, indent=2, default=str) + "\n"
    path.write_text(text)
    (opts.output / "relay-latest.json").write_text(text)
    print(f"results: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
