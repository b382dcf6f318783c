#!/usr/bin/env python3
"""ehlo's benchmark runner: ehlo against Postfix, aiosmtpd, Node.js smtp-server and smtp-sink.

Run it through ``make bench`` (or ``make bench QUICK=1``), which installs what
it needs first (bench/setup.sh). Directly::

    .venv/bin/python bench/run.py [--quick] [--servers ...] [--workloads ...]

Every server is started on a free loopback port, one after the other, and
driven by Postfix's smtp-source; see bench/README.md for the workloads, the
columns and how to read the ratios. Postfix (bench/postfix.py, a private
instance that keeps every message in its queue) is the durable reference
of W1 and W2. The PostgreSQL rows (one node, and two nodes on one
database) store into a throwaway PostgreSQL (bench/pgcluster.py, the tests'
own) and measure its CPU apart from ehlo's. Standard library only (the W6
DNS server borrows tests/dnsserver.py, which needs dnspython from the
project venv).
The table goes to stdout, progress to stderr, the whole result to
bench/results/<UTC timestamp>.json and bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import errno
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pgcluster as _pgcluster  # bench/pgcluster.py: the throwaway PostgreSQL
import postfix as _postfix  # bench/postfix.py: the private Postfix instance

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
EHLO = ROOT / ".venv" / "bin" / "ehlo"
AIOSMTPD_PYTHON = BENCH / ".venv-aiosmtpd" / "bin" / "python"
NODE_DIR = BENCH / "node"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])

HOST = "127.0.0.1"
HELO_NAME = "client.bench.test"  # smtp-source -M; has A/PTR/SPF in the W6 zone
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024
IDLE_SOURCES = [f"127.0.0.{i}" for i in range(2, 12)]  # W4: 10 client addresses

# ---------------------------------------------------------------------------
# Workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    """One smtp-source workload: W1, W2, W3 (W6 is W1 on another server)."""

    name: str
    title: str
    sessions: int
    messages: int  # full run; --quick divides by 10
    length: int  # payload bytes per message (smtp-source -l)
    same_connection: bool = False  # smtp-source -d
    min_messages: int = 200  # when a run is trimmed to the time cap

    def argv(self, messages: int) -> list[str]:
        flags = ["-d"] if self.same_connection else []
        return [*flags, "-s", str(self.sessions), "-m", str(messages), "-l", str(self.length)]

    def flags(self, messages: int | None = None) -> str:
        return " ".join(self.argv(self.messages if messages is None else messages))


WORKLOADS: dict[str, Workload] = {
    "W1": Workload("W1", "one 4 KiB message per connection", 20, 20_000, 4096),
    "W2": Workload("W2", "many messages per connection", 20, 20_000, 4096, same_connection=True),
    "W3": Workload("W3", "10 MiB messages", 4, 200, 10 * MIB, min_messages=4),
}
ALL_WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6")

# ---------------------------------------------------------------------------
# Processes: tree, CPU time, memory


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat after the command name (state is [0])."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].split()


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (scanning /proc: no children files here)."""
    children: dict[int, list[int]] = defaultdict(list)
    alive = False
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is None:
            continue
        pid = int(name)
        if pid == root:
            alive = True
        children[int(fields[1])].append(pid)
    if not alive:
        return []
    out = [root]
    for pid in out:  # grows while iterating: breadth first
        out.extend(children.get(pid, ()))
    return out


def cpu_seconds(root: int, pids: Sequence[int] | None = None) -> float:
    """User + system CPU seconds of the tree (the root's reaped children included)."""
    total = 0
    for pid in tree_pids(root) if pids is None else pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if pid == root:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime
    return total / CLK_TCK


def tree_cpu(root: int, pids: Sequence[int] | None = None) -> float:
    """CPU seconds of a process tree, each process's reaped children included.

    ``cpu_seconds`` adds the reaped children of the root only; Postfix's
    master (a child of ``postfix start-fg``) reaps the smtpd, cleanup, smtp
    and discard processes that end during a run, so here every process in
    the tree adds its own.
    """
    total = 0
    for pid in tree_pids(root) if pids is None else pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / CLK_TCK


def system_cpu() -> tuple[float, float]:
    """Machine-wide (user + nice + system, steal) CPU seconds from /proc/stat.

    Interrupt and softirq time (loopback TCP is largely softirq work) is left
    out, so that what remains, less the server's, smtp-source's and our own
    time, is what other processes used: the noise of the measurement.
    """
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    user, nice, system = fields[0], fields[1], fields[2]
    steal = fields[7] if len(fields) > 7 else 0
    return (user + nice + system) / CLK_TCK, steal / CLK_TCK


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss(root: int) -> int:
    return sum(rss_bytes(pid) for pid in tree_pids(root))


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def reset_hwm(pids: Sequence[int]) -> None:
    """Reset each process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")


def trees(roots: Sequence[int]) -> list[int]:
    """The processes of several trees (several nodes of one row)."""
    return [pid for root in roots for pid in tree_pids(root)]


class RSSSampler:
    """Samples the RSS of a process tree (or several) every ``interval`` seconds in a thread."""

    def __init__(self, root: int | Sequence[int], interval: float = 0.05) -> None:
        self.roots = [root] if isinstance(root, int) else list(root)
        self.interval = interval
        self.peak_total = 0
        self.peak_per_pid: dict[int, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        pids = trees(self.roots)
        refreshed = time.monotonic()
        while True:
            if time.monotonic() - refreshed > 1.0:
                pids = trees(self.roots) or pids
                refreshed = time.monotonic()
            total = 0
            for pid in pids:
                rss = rss_bytes(pid)
                total += rss
                if rss > self.peak_per_pid.get(pid, 0):
                    self.peak_per_pid[pid] = rss
            self.peak_total = max(self.peak_total, total)
            self.samples += 1
            if self._stop.wait(self.interval):
                return


# ---------------------------------------------------------------------------
# Servers


class ServerError(Exception):
    """A server could not start or died."""


class RunError(Exception):
    """One smtp-source run (or W4 step) failed."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class ServerSpec:
    """How to start one server under test."""

    key: str  # "ehlo-sqlite"
    label: str  # "ehlo sqlite"
    kind: str  # ehlo | aiosmtpd | node | smtp-sink
    workloads: tuple[str, ...]
    argv: Callable[[int, Path], list[str]]  # (port, data folder) -> command
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    cwd: Path = ROOT
    check: Callable[[], str | None] = lambda: None  # why it cannot run, or None
    # Count the reaped children of every process of the tree, not of the root only.
    reaped_everywhere: bool = False
    # Asks the server to stop (before its process group gets SIGTERM): (data, process).
    stop: Callable[[Path, subprocess.Popen[bytes]], None] | None = None
    # Processes started from argv, each on its own port and data folder; the
    # clients of a run are split between them (two ehlo nodes on one database).
    nodes: int = 1
    # The pid of the database server the row stores into (PostgreSQL's
    # postmaster): its tree's CPU is measured beside the server's.
    database_pid: Callable[[], int | None] | None = None
    # The arguments that serve /metrics on a given HTTP port (ehlo's commit
    # latency), appended to argv's.
    metrics_argv: Callable[[int], list[str]] | None = None


class RunningServer:
    """A started server: its process group, log file and port.

    A spec of several ``nodes`` starts that many processes, each in its own
    process group with its own port, data folder and log; ``port``,
    ``proc``, ``data`` and ``log_path`` are the first node's, ``ports`` and
    ``roots`` all of them.
    """

    def __init__(self, spec: ServerSpec, workdir: Path, *, pin: bool, tag: str = "") -> None:
        self.spec = spec
        name = spec.key + (f"-{tag}" if tag else "")
        self.data = workdir / name
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        self.ports: list[int] = []
        self.http_ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_paths: list[Path] = []
        self._logs: list[Any] = []
        self.argvs: list[list[str]] = []
        _LIVE.add(self)
        try:
            for node in range(spec.nodes):
                self._start_node(node, workdir, name, pin)
        except ServerError:
            self.stop()
            raise
        self.port = self.ports[0]
        self.proc = self.procs[0]
        self.argv = self.argvs[0]

    def _start_node(self, node: int, workdir: Path, name: str, pin: bool) -> None:
        spec = self.spec
        port = free_port()
        data = self.data if node == 0 else workdir / f"{name}-n{node + 1}"
        data.mkdir(parents=True, exist_ok=True)
        log_path = self.log_path if node == 0 else workdir / f"{name}-n{node + 1}.log"
        try:
            argv = spec.argv(port, data)
            if spec.metrics_argv is not None:
                http = free_port()
                argv += spec.metrics_argv(http)
                self.http_ports.append(http)
        except RuntimeError as exc:  # e.g. a configuration its own check refused
            raise ServerError(str(exc)) from None
        if pin:
            argv = ["taskset", "-c", "0", *argv]
        env = {**os.environ, "PATH": SBIN_PATH, **spec.env}
        log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        try:
            proc = subprocess.Popen(
                argv,
                cwd=spec.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a whole
            )
        except OSError as exc:
            log.close()
            raise ServerError(f"cannot start {argv[0]}: {exc}") from None
        self.ports.append(port)
        self.procs.append(proc)
        self.log_paths.append(log_path)
        self._logs.append(log)
        self.argvs.append(argv)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def roots(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def log_tail(self, lines: int = 8) -> str:
        tails = []
        for path in self.log_paths:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            tails.append("\n".join(text.strip().splitlines()[-lines:]))
        return "\n".join(tail for tail in tails if tail)

    def alive(self) -> bool:
        return bool(self.procs) and all(proc.poll() is None for proc in self.procs)

    def wait_ready(self, timeout: float = 30.0) -> str:
        """Wait until every node answers with a 220 banner; return the (first) banner."""
        banners = [self._wait_port(port, timeout) for port in self.ports]
        return banners[0]

    def _wait_port(self, port: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not self.alive():
                codes = ", ".join(str(proc.returncode) for proc in self.procs
                                  if proc.returncode is not None)  # fmt: skip
                raise ServerError(
                    f"exited with status {codes} before accepting: "
                    f"{self.log_tail(4) or '(no output)'}"
                )
            try:
                with socket.create_connection((HOST, port), timeout=2.0) as sock:
                    sock.settimeout(5.0)
                    reply = read_reply(sock)
                    if reply.startswith(b"220"):
                        with contextlib.suppress(OSError):
                            sock.sendall(b"QUIT\r\n")
                            read_reply(sock)
                        return reply.decode(errors="replace").strip()
                    last = reply.decode(errors="replace").strip()
            except (OSError, RunError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise ServerError(f"not accepting on {HOST}:{port} after {timeout:g}s ({last})")

    def stop(self) -> None:
        """SIGTERM to each process group, SIGKILL after 10 s; always closes the logs."""
        try:
            for proc in self.procs:
                self._stop_one(proc)
        finally:
            for log in self._logs:
                log.close()
            _LIVE.discard(self)

    def _stop_one(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None and self.spec.stop is not None:
            self.spec.stop(self.data, proc)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        else:
            # The leader is gone; make sure no child of it is left either.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


_LIVE: set[RunningServer] = set()


def stop_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()


# ---------------------------------------------------------------------------
# SMTP on a raw socket (readiness, W4)


def reply_complete(buffer: bytes) -> bool:
    """True when ``buffer`` ends with the last line of an SMTP reply."""
    if not buffer.endswith(b"\r\n"):
        return False
    last = buffer[:-2].rsplit(b"\r\n", 1)[-1]
    return len(last) >= 3 and (len(last) == 3 or last[3:4] == b" ")


def read_reply(sock: socket.socket) -> bytes:
    buffer = b""
    while not reply_complete(buffer):
        chunk = sock.recv(65536)
        if not chunk:
            raise RunError(f"connection closed by the server after {buffer[-200:]!r}")
        buffer += chunk
    return buffer


def expect(sock: socket.socket, code: bytes, what: str) -> None:
    reply = read_reply(sock)
    last = reply[:-2].rsplit(b"\r\n", 1)[-1]
    if not last.startswith(code):
        raise RunError(f"{what}: expected {code.decode()}, got {last[:200]!r}")


def fresh_transaction(port: int, timeout: float = 10.0) -> float:
    """Seconds for connect, banner, EHLO, MAIL, RCPT, DATA (1 small message), QUIT."""
    body = (
        b"From: a@bench.test\r\nTo: b@bench.test\r\nSubject: fresh\r\n\r\n"
        + b"x" * 200
        + b"\r\n.\r\n"
    )
    start = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        expect(sock, b"220", "banner")
        for command, code in (
            (b"EHLO fresh.bench.test\r\n", b"250"),
            (b"MAIL FROM:<a@bench.test>\r\n", b"250"),
            (b"RCPT TO:<b@bench.test>\r\n", b"250"),
            (b"DATA\r\n", b"354"),
        ):
            sock.sendall(command)
            expect(sock, code, command.split()[0].decode())
        sock.sendall(body)
        expect(sock, b"250", "end of data")
        sock.sendall(b"QUIT\r\n")
        expect(sock, b"221", "QUIT")
    return time.perf_counter() - start


def open_idle(
    port: int, count: int, sources: Sequence[str], *, batch: int = 100, timeout: float = 30.0
) -> tuple[list[socket.socket], dict[str, int]]:
    """Open ``count`` connections that have sent EHLO and got 250; keep them open.

    Connections are opened ``batch`` at a time (so that no listen backlog
    overflows), round-robin over the ``sources`` addresses. Returns the open
    sockets and the reasons of the ones that failed, counted.
    """
    bind_no_port = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
    held: list[socket.socket] = []
    failures: dict[str, int] = defaultdict(int)
    sel = selectors.DefaultSelector()
    try:
        made = 0
        while made < count:
            state: dict[socket.socket, list[Any]] = {}
            for _ in range(min(batch, count - made)):
                src = sources[made % len(sources)]
                made += 1
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.IPPROTO_IP, bind_no_port, 1)
                    sock.bind((src, 0))
                    sock.setblocking(False)
                    rc = sock.connect_ex((HOST, port))
                    if rc not in (0, errno.EINPROGRESS):
                        raise OSError(rc, os.strerror(rc))
                except OSError as exc:
                    failures[f"connect: {exc.strerror or exc}"] += 1
                    sock.close()
                    continue
                state[sock] = ["connect", b""]
                sel.register(sock, selectors.EVENT_WRITE)
            deadline = time.monotonic() + timeout
            while state and time.monotonic() < deadline:
                for key, _events in sel.select(timeout=0.5):
                    sock = key.fileobj  # type: ignore[assignment]
                    assert isinstance(sock, socket.socket)
                    phase, buffer = state[sock]
                    try:
                        if phase == "connect":
                            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                            if err:
                                raise OSError(err, os.strerror(err))
                            state[sock] = ["banner", b""]
                            sel.modify(sock, selectors.EVENT_READ)
                            continue
                        chunk = sock.recv(65536)
                        if not chunk:
                            raise OSError(0, "closed by the server")
                        buffer += chunk
                        state[sock][1] = buffer
                        if not reply_complete(buffer):
                            continue
                        last = buffer[:-2].rsplit(b"\r\n", 1)[-1]
                        if phase == "banner":
                            if not last.startswith(b"220"):
                                raise OSError(0, f"banner {last[:60]!r}")
                            sock.send(b"EHLO idle.bench.test\r\n")
                            state[sock] = ["ehlo", b""]
                        else:
                            if not last.startswith(b"250"):
                                raise OSError(0, f"EHLO {last[:60]!r}")
                            sel.unregister(sock)
                            del state[sock]
                            held.append(sock)
                    except OSError as exc:
                        failures[f"{phase}: {exc.strerror or exc}"] += 1
                        sel.unregister(sock)
                        del state[sock]
                        sock.close()
            for sock in list(state):
                failures[f"{state[sock][0]}: no answer within {timeout:g}s"] += 1
                sel.unregister(sock)
                sock.close()
            if failures and sum(failures.values()) > max(50, count // 20):
                break  # the server refuses: do not hammer it for the rest
    finally:
        sel.close()
    return held, dict(failures)


# ---------------------------------------------------------------------------
# smtp-source runs


@dataclasses.dataclass
class Run:
    messages: int
    seconds: float
    server_cpu: float  # CPU seconds of the server tree during the run
    client_cpu: float  # CPU seconds of smtp-source
    peak_rss: int  # bytes, whole server tree
    peak_rss_process: int  # bytes, the largest single process
    other_cpu: float = 0.0  # CPU seconds used by the rest of the machine (noise)
    steal: float = 0.0  # CPU seconds the hypervisor took (noise)
    database_cpu: float | None = None  # CPU seconds of the database's processes (PostgreSQL)
    # ehlo_store_commit_seconds during the run: {upper bound: count} (cumulative, "+Inf" last)
    commit_buckets: dict[str, float] | None = None

    def msg_s(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


def smtp_source(
    port: int | Sequence[int], workload: Workload, messages: int, *, timeout: float, pin: bool
) -> tuple[float, float]:
    """Run smtp-source once; return (wall seconds, its CPU seconds).

    With several ports (the nodes of one row) one smtp-source per port runs
    at the same time, the sessions and messages split evenly between them;
    the wall time is until the last one ends.
    """
    ports = [port] if isinstance(port, int) else list(port)
    binary = shutil.which("smtp-source", path=SBIN_PATH) or "/usr/sbin/smtp-source"
    share = dataclasses.replace(workload, sessions=max(1, workload.sessions // len(ports)))
    counts = [messages // len(ports) + (1 if i < messages % len(ports) else 0)
              for i in range(len(ports))]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    procs: list[subprocess.Popen[bytes]] = []
    outputs: list[bytes] = []
    try:
        for node_port, count in zip(ports, counts, strict=True):
            argv = [binary, *share.argv(count), "-M", HELO_NAME, f"{HOST}:{node_port}"]
            if pin:
                argv = ["taskset", "-c", "1", *argv]
            procs.append(subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            ))  # fmt: skip
        deadline = time.monotonic() + timeout
        for proc in procs:
            output, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            outputs.append(output)
    except BaseException as exc:  # a timeout, or Ctrl-C / SIGTERM of the runner
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        if not isinstance(exc, subprocess.TimeoutExpired):
            raise
        raise RunError(
            f"smtp-source {workload.flags(messages)} timed out after {timeout:.0f}s"
        ) from None
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for proc, output in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            text = output.decode(errors="replace").strip().splitlines()
            raise RunError(
                f"smtp-source exit {proc.returncode}: {' | '.join(text[-3:]) or '(no output)'}"
            )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


COMMIT_METRIC = "ehlo_store_commit_seconds_bucket"


def commit_buckets(http_ports: Sequence[int]) -> dict[str, float] | None:
    """``ehlo_store_commit_seconds``'s buckets from each node's /metrics, summed (None: none)."""
    total: dict[str, float] = {}
    for port in http_ports:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as answer:
                text = answer.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            match = re.match(COMMIT_METRIC + r'\{le="([^"]+)"\} (\S+)', line)
            if match:
                total[match.group(1)] = total.get(match.group(1), 0.0) + float(match.group(2))
    return total or None


def bucket_delta(before: dict[str, float] | None,
                 after: dict[str, float] | None) -> dict[str, float] | None:  # fmt: skip
    if before is None or after is None:
        return None
    return {le: after[le] - before.get(le, 0.0) for le in after}


def quantile(buckets: dict[str, float], q: float) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated within its bucket (seconds).

    As Prometheus's histogram_quantile does: linear between the bucket's
    lower and upper bounds; in the +Inf bucket, the largest finite bound.
    """
    bounds = sorted(((float(le), n) for le, n in buckets.items()), key=lambda b: b[0])
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in bounds:
        if count >= rank:
            if upper == float("inf"):
                return lower
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = upper, count
    return lower


def measure(
    server: RunningServer, workload: Workload, messages: int, *, timeout: float, pin: bool
) -> Run:
    roots = server.roots
    pids = trees(roots)
    if not all(tree_pids(root) for root in roots):
        raise RunError("the server is not running")
    reset_hwm(pids)
    tree = tree_cpu if server.spec.reaped_everywhere else cpu_seconds

    def cpu(pid_sets: dict[int, list[int]]) -> float:
        return sum(tree(root, found) for root, found in pid_sets.items())

    by_root = {root: tree_pids(root) for root in roots}
    cpu_before = cpu(by_root)
    database = server.spec.database_pid() if server.spec.database_pid else None
    db_pids = tree_pids(database) if database else []
    db_before = tree_cpu(database, db_pids) if database else 0.0
    commits_before = commit_buckets(server.http_ports) if server.http_ports else None
    system_before, steal_before = system_cpu()
    self_before = _self_cpu()
    with RSSSampler(roots) as sampler:
        seconds, client_cpu = smtp_source(server.ports, workload, messages, timeout=timeout,
                                          pin=pin)  # fmt: skip
    system_after, steal_after = system_cpu()
    self_used = _self_cpu() - self_before
    after_by_root = {root: tree_pids(root) for root in roots}
    pids_after = [pid for found in after_by_root.values() for pid in found]
    if not all(after_by_root.values()):
        raise RunError(f"the server died during the run: {server.log_tail(3)}")
    cpu_after = cpu({root: sorted(set(by_root[root]) | set(after_by_root[root]))
                     for root in roots})  # fmt: skip
    database_cpu = None
    if database:
        db_after = tree_cpu(database, sorted(set(db_pids) | set(tree_pids(database))))
        database_cpu = max(0.0, db_after - db_before)
    commits = bucket_delta(commits_before, commit_buckets(server.http_ports)) \
        if server.http_ports else None
    hwm = {pid: _status_kib(pid, "VmHWM") * 1024 for pid in pids_after}
    per_pid = {pid: max(sampler.peak_per_pid.get(pid, 0), hwm.get(pid, 0)) for pid in pids_after}
    peak_total = sampler.peak_total
    if len(pids_after) == 1:  # VmHWM is exact for one process
        peak_total = max(peak_total, hwm[pids_after[0]])
    server_cpu = max(0.0, cpu_after - cpu_before)
    other = (system_after - system_before - server_cpu - client_cpu - self_used
             - (database_cpu or 0.0))  # fmt: skip
    return Run(
        messages=messages,
        seconds=seconds,
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        peak_rss=peak_total,
        peak_rss_process=max(per_pid.values(), default=0),
        other_cpu=max(0.0, other),
        steal=max(0.0, steal_after - steal_before),
        database_cpu=database_cpu,
        commit_buckets=commits,
    )


def nice_count(value: float, step: int) -> int:
    return max(step, int(value // step) * step)


@dataclasses.dataclass
class Plan:
    """One server on one workload: the warm-up, the run size, the runs so far."""

    server: RunningServer
    label: str
    workload: Workload
    full: int
    warm: Run
    messages: int
    timeout: float
    runs: list[Run] = dataclasses.field(default_factory=list)
    error: str | None = None
    dns_before: int = 0


def plan_workload(
    server: RunningServer, label: str, workload: Workload, opts: argparse.Namespace
) -> Plan:
    """Warm the server up on ``workload`` and size its runs from the warm-up's rate.

    A run that the warm-up predicts longer than ``--time-cap`` seconds gets
    fewer messages (never fewer than ``min_messages``): the budget of the
    whole run holds however slow a server is. A small warm-up can
    underestimate a server (W2's few messages per connection weigh
    smtp-server's 100 ms greeting heavily; a JIT is still cold), so a trimmed
    size is checked with a second warm-up of half that size and set again
    from its rate.
    """
    full = workload.messages // (10 if opts.quick else 1)

    def size(rate: float) -> int:
        if rate > 0 and full / rate > opts.time_cap:
            cap = nice_count(max(workload.min_messages, rate * opts.time_cap), workload.sessions)
            return min(full, cap)
        return full

    warm = max(workload.sessions, full // 20)
    warm_run = measure(server, workload, warm, timeout=opts.warmup_timeout, pin=opts.pin)
    rate = warm_run.msg_s()
    messages = size(rate)
    if messages < full:
        probe = nice_count(max(warm, messages // 2), workload.sessions)
        if probe > warm:
            timeout = max(30.0, 4 * probe / rate + 10) if rate > 0 else opts.warmup_timeout
            warm_run = measure(server, workload, probe, timeout=timeout, pin=opts.pin)
            rate = warm_run.msg_s()
            messages = size(rate)
    expected = messages / rate if rate > 0 else 60.0
    timeout = max(30.0, 4 * expected + 10)
    return Plan(server, label, workload, full, warm_run, messages, timeout)


def summarize(
    workload: Workload, runs: list[Run], *, messages: int, full: int, warm: Run
) -> dict[str, Any]:
    rates = [r.msg_s() for r in runs]
    mb = [r * workload.length / 1e6 for r in rates]
    per_1k = [r.server_cpu / r.messages * 1000 for r in runs]
    client_util = [r.client_cpu / r.seconds for r in runs if r.seconds > 0]
    other = [r.other_cpu / r.seconds for r in runs if r.seconds > 0]
    steal = [r.steal / r.seconds for r in runs if r.seconds > 0]
    noise = [(r.other_cpu + r.steal) / r.seconds for r in runs if r.seconds > 0]
    server_util = [r.server_cpu / r.seconds for r in runs if r.seconds > 0]
    return {
        "status": "ok",
        "flags": workload.flags(messages),
        "messages_per_run": messages,
        "messages_full": full,
        "trimmed": messages < full,
        "msg_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates)},
        "mb_s": {"median": statistics.median(mb), "min": min(mb), "max": max(mb)},
        "cpu_s_per_1k": statistics.median(per_1k),
        "server_cpu_util": statistics.median(server_util) if server_util else None,
        "client_cpu_util": statistics.median(client_util) if client_util else None,
        "other_cpu_cores": statistics.median(other) if other else None,
        "steal_cores": statistics.median(steal) if steal else None,
        "noise_cores": statistics.median(noise) if noise else None,
        "peak_rss_mib": max(r.peak_rss for r in runs) / MIB,
        "peak_rss_process_mib": max(r.peak_rss_process for r in runs) / MIB,
        "warmup": {"messages": warm.messages, "msg_s": warm.msg_s()},
        **store_figures(runs),
        "runs": [dataclasses.asdict(r) | {"msg_s": r.msg_s()} for r in runs],
    }


def store_figures(runs: list[Run]) -> dict[str, Any]:
    """The database's CPU per 1,000 messages and the commit latency, where measured.

    The commit latency's quantiles come from the ``ehlo_store_commit_seconds``
    histogram of the runs together (every node's /metrics, before and after
    each run): interpolated within the histogram's buckets, so indicative.
    """
    out: dict[str, Any] = {}
    db = [r.database_cpu / r.messages * 1000 for r in runs if r.database_cpu is not None]
    if db:
        out["database_cpu_s_per_1k"] = statistics.median(db)
    merged: dict[str, float] = {}
    for run in runs:
        for le, count in (run.commit_buckets or {}).items():
            merged[le] = merged.get(le, 0.0) + count
    if merged and merged.get("+Inf", 0.0) > 0:
        p50, p90 = quantile(merged, 0.5), quantile(merged, 0.9)
        out["commit_ms"] = {
            "p50": p50 * 1000 if p50 is not None else None,
            "p90": p90 * 1000 if p90 is not None else None,
            "count": int(merged["+Inf"]),
        }
    return out


# ---------------------------------------------------------------------------
# W4: idle connections


def run_idle(
    server: RunningServer, opts: argparse.Namespace, say: Callable[[str], None]
) -> dict[str, Any]:
    # A little traffic first, so that lazily built state is there before "before".
    smtp_source(server.port, WORKLOADS["W1"], 40, timeout=60, pin=opts.pin)
    time.sleep(0.5)
    before = statistics.median(tree_rss(server.pid) for _ in range(3))
    start = time.perf_counter()
    held, failures = open_idle(server.port, opts.idle, IDLE_SOURCES)
    open_seconds = time.perf_counter() - start
    try:
        if failures:
            say(f"    idle connections refused or failed: {failures}")
        time.sleep(1.0)
        if not server.alive():
            raise RunError(f"the server died holding idle connections: {server.log_tail(3)}")
        after = statistics.median(tree_rss(server.pid) for _ in range(3))
        fresh: list[float] = []
        fresh_errors: list[str] = []
        for _ in range(opts.fresh):
            try:
                fresh.append(fresh_transaction(server.port))
            except (OSError, RunError) as exc:
                fresh_errors.append(str(exc))
            time.sleep(0.05)
        # The idle connections must still be there (not dropped by the server).
        still = sum(1 for sock in held if _still_open(sock))
    finally:
        for sock in held:
            sock.close()
    n = len(held)
    per_conn = (after - before) / n / 1024 if n else None
    result: dict[str, Any] = {
        "status": "ok" if n and fresh else "failed",
        "requested": opts.idle,
        "held": n,
        "still_open_after": still,
        "failures": failures,
        "open_seconds": open_seconds,
        "rss_before_mib": before / MIB,
        "rss_after_mib": after / MIB,
        "kib_per_conn": per_conn,
        "fresh_ms": {
            "median": statistics.median(fresh) * 1000 if fresh else None,
            "min": min(fresh) * 1000 if fresh else None,
            "max": max(fresh) * 1000 if fresh else None,
            "all": [f * 1000 for f in fresh],
        },
        "fresh_errors": fresh_errors,
    }
    if not n:
        result["error"] = f"no idle connection held: {failures}"
    elif not fresh:
        result["error"] = f"fresh transaction failed: {fresh_errors[:1]}"
    say(
        f"    {n} idle held (opened in {open_seconds:.1f}s, {still} still open), "
        f"RSS {before / MIB:.1f} -> {after / MIB:.1f} MiB"
        + (f" = {per_conn:.2f} KiB/conn" if per_conn is not None else "")
        + (f", fresh transaction {statistics.median(fresh) * 1000:.1f} ms" if fresh else "")
    )
    return result


def _still_open(sock: socket.socket) -> bool:
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return bool(data)  # b"": closed by the server; data: e.g. a 421


# ---------------------------------------------------------------------------
# The servers


def ehlo_features() -> dict[str, bool]:
    try:
        text = subprocess.run(
            [str(EHLO), "serve", "--help"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    flags = ("helo-policy", "dns-server", "workers", "no-transcripts", "http")
    found = {flag: f"--{flag}" in text for flag in flags}
    # `--store postgresql://...`; without it the URL goes in the config file.
    found["store-url"] = "postgresql://" in text
    return found


def ehlo_spec(
    key: str,
    label: str,
    store: str,
    workloads: tuple[str, ...],
    opts: argparse.Namespace,
    features: dict[str, bool],
    *,
    greeting_dns: Callable[[], str] | None = None,
    log_level: str = "WARNING",
    workers: int | None = None,
    extra: tuple[str, ...] = (),
    database: PgDatabase | None = None,
    nodes: int = 1,
) -> ServerSpec:
    def argv(port: int, data: Path) -> list[str]:
        config = data.parent / f"{data.name}.toml"
        # ehlo limits connections per client IP (50), in total (1000) and per IP
        # per minute (300, loopback exempt): W4 holds 5,000 from 127.0.0.2-11.
        text = (
            f"max_connections = {opts.idle + 1000}\nmax_connections_per_ip = {opts.idle + 1000}\n"
            "max_connection_rate = 0\n"
        )
        store_args = ["--store", store]
        if database is not None:
            url = database.url()
            if features["store-url"]:
                store_args = ["--store", url]
            else:  # the keys `--store postgresql://...` sets
                store_args = []
                text += f'store = "postgresql"\ndatabase_url = {json.dumps(url)}\n'
        config.write_text(text)
        cmd = [
            str(EHLO), "serve",
            "--listen", f"{HOST}:{port}",
            "--data", str(data),
            *store_args,
            "--config", str(config),
            "--no-tls",
            "--no-reverse-dns",
            "--log-level", log_level,
        ]  # fmt: skip
        if greeting_dns is not None:
            cmd += ["--helo-policy", "record", "--dns-server", greeting_dns()]
        elif features["helo-policy"]:
            cmd += ["--helo-policy", "off"]
        if workers is not None and features["workers"]:
            cmd += ["--workers", str(workers)]  # this row is about one process
        elif opts.ehlo_workers is not None:
            cmd += ["--workers", str(opts.ehlo_workers)]
        return cmd + list(extra) + list(opts.ehlo_arg)

    def check() -> str | None:
        if not EHLO.exists():
            return f"{EHLO} missing (make setup)"
        if "--no-transcripts" in extra and not features["no-transcripts"]:
            return "`ehlo serve` has no --no-transcripts yet"
        if opts.ehlo_workers is not None and not features["workers"]:
            return "--ehlo-workers given but `ehlo serve` has no --workers"
        if greeting_dns is not None and not (features["helo-policy"] and features["dns-server"]):
            return "`ehlo serve` has no --helo-policy/--dns-server yet"
        if database is not None:
            return database.check()
        return None

    def metrics_argv(http_port: int) -> list[str]:
        return ["--http", f"{HOST}:{http_port}"]  # /metrics: the commit latency

    return ServerSpec(key, label, "ehlo", workloads, argv, check=check, nodes=nodes,
                      database_pid=database.postmaster if database is not None else None,
                      metrics_argv=metrics_argv if features["http"] else None)  # fmt: skip


class PgDatabase:
    """A database of the run's PostgreSQL for one row (``bench/pgcluster.py``).

    The cluster is started once for every PostgreSQL row, on first use; a
    row's nodes share its database. ``--pg-url`` uses a database of yours
    instead (every row then stores into it).
    """

    def __init__(self, holder: dict[str, Any], opts: argparse.Namespace) -> None:
        self.holder = holder
        self.opts = opts
        self._url: str | None = None

    def check(self) -> str | None:
        if self.opts.pg_url:
            return None
        if _pgcluster.pg_bin() is None:
            return "PostgreSQL is not installed (make test-deps)"
        return None

    def url(self) -> str:
        if self._url is None:
            if self.opts.pg_url:
                self._url = str(self.opts.pg_url)
            else:
                cluster = self.holder["cluster"]
                self._url = str(cluster.url(cluster.create_database()))
        return self._url

    def postmaster(self) -> int | None:
        """The postmaster's pid (its tree is every PostgreSQL process), when it runs here.

        The run's own PostgreSQL writes it in ``postmaster.pid``; a server of
        ``--pg-url`` reached on a Unix socket has it in the socket's lock
        file (``DIR/.s.PGSQL.PORT.lock``, first line).
        """
        cluster = self.holder.get("cluster")
        if cluster is not None:
            path = cluster.data / "postmaster.pid"
        else:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.url()).query)
            host, port = query.get("host", [""])[0], query.get("port", ["5432"])[0]
            if not host.startswith("/"):
                return None  # over TCP: perhaps another machine
            path = Path(host) / f".s.PGSQL.{port}.lock"
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


def reference_specs(opts: argparse.Namespace) -> list[ServerSpec]:
    def aiosmtpd(port: int, data: Path) -> list[str]:
        return [
            str(AIOSMTPD_PYTHON),
            str(BENCH / "aiosmtpd_server.py"),
            "--listen",
            f"{HOST}:{port}",
        ]

    def aiosmtpd_check() -> str | None:
        return (
            None if AIOSMTPD_PYTHON.exists() else f"{AIOSMTPD_PYTHON} missing (bash bench/setup.sh)"
        )

    def node(port: int, data: Path) -> list[str]:
        cmd = ["node", str(NODE_DIR / "server.js"), "--listen", f"{HOST}:{port}"]
        return cmd + (["--no-greeting-delay"] if opts.node_no_greeting_delay else [])

    def node_check() -> str | None:
        if shutil.which("node") is None:
            return "node is not installed"
        if not (NODE_DIR / "node_modules" / "smtp-server").is_dir():
            return "bench/node/node_modules missing (bash bench/setup.sh)"
        return None

    def sink(port: int, data: Path) -> list[str]:
        cmd = [shutil.which("smtp-sink", path=SBIN_PATH) or "/usr/sbin/smtp-sink"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
        # -m: simultaneous connections it serves (default 256; W4 holds thousands).
        return [*cmd, "-m", str(opts.idle + 1000), "-t", "600", f"{HOST}:{port}", "4096"]

    def sink_check() -> str | None:
        return (
            None
            if shutil.which("smtp-sink", path=SBIN_PATH)
            else "smtp-sink missing (make test-deps)"
        )

    def postfix(port: int, data: Path) -> list[str]:
        return _postfix.prepare(data, port)  # RuntimeError when `postfix check` refuses

    def postfix_check() -> str | None:
        if shutil.which("postfix", path=SBIN_PATH) is None:
            return "postfix missing (make test-deps)"
        if not _postfix.MASTER_CF.exists():
            return f"{_postfix.MASTER_CF} missing (the template of master.cf)"
        return None

    node_label = "node smtp-server" + (" (no delay)" if opts.node_no_greeting_delay else "")
    return [
        # The durable reference: smtpd -> cleanup -> a synced queue file, then discarded.
        ServerSpec("postfix", "Postfix (queue)", "postfix", ("W1", "W2"), postfix,
                   check=postfix_check, reaped_everywhere=True, stop=_postfix.stop),
        ServerSpec("aiosmtpd", "aiosmtpd/uvloop", "aiosmtpd", ("W1", "W2", "W3", "W4"),
                   aiosmtpd, check=aiosmtpd_check),
        ServerSpec("node", node_label, "node", ("W1", "W2", "W3", "W4"), node,
                   cwd=NODE_DIR, check=node_check),
        ServerSpec("smtp-sink", "smtp-sink (C)", "smtp-sink", ("W1", "W2", "W3", "W4"), sink,
                   check=sink_check),
    ]  # fmt: skip


# ---------------------------------------------------------------------------
# W6: a loopback DNS server


@contextlib.contextmanager
def loopback_dns() -> Iterator[Any]:
    """tests/dnsserver.py serving the names smtp-source's greeting needs."""
    sys.path.insert(0, str(ROOT))
    try:
        from tests.dnsserver import DNSServer
    finally:
        sys.path.remove(str(ROOT))
    zone = {
        HELO_NAME: {"A": ["127.0.0.1"], "TXT": ['"v=spf1 ip4:127.0.0.0/8 -all"']},
        DNSServer.reverse("127.0.0.1"): {"PTR": [f"{HELO_NAME}."]},
    }
    with DNSServer(zone, ttl=3600) as server:
        yield server


# ---------------------------------------------------------------------------
# Versions and the event loop


def ehlo_loop(workdir: Path, opts: argparse.Namespace, features: dict[str, bool]) -> str:
    """Start ehlo once at INFO level and read the event loop from its ready line."""
    spec = ehlo_spec("ehlo-probe", "ehlo probe", "null", (), opts, features, log_level="INFO")
    if spec.check():
        return "unknown"
    server = RunningServer(spec, workdir, pin=False)
    try:
        server.wait_ready(timeout=30)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            match = re.search(r"event loop: ([^,)]+)", server.log_path.read_text(errors="replace"))
            if match:
                return match.group(1).strip()
            time.sleep(0.1)
        return "unknown (no ready line)"
    except ServerError as exc:
        return f"unknown ({_one_line(str(exc))})"
    finally:
        server.stop()


def command_output(argv: list[str], pattern: str | None = None) -> str:
    try:
        out = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            env={**os.environ, "PATH": SBIN_PATH},
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip()
    if pattern:
        match = re.search(pattern, text)
        return match.group(1) if match else "?"
    return text.splitlines()[0] if text else "?"


def versions(features: dict[str, bool]) -> dict[str, str]:
    node_pkg = NODE_DIR / "node_modules" / "smtp-server" / "package.json"
    try:
        smtp_server = json.loads(node_pkg.read_text())["version"]
    except (OSError, ValueError, KeyError):
        smtp_server = "?"
    return {
        "ehlo": command_output([str(EHLO), "--version"], r"ehlo (\S+)"),
        "ehlo_commit": command_output(["git", "rev-parse", "--short", "HEAD"]),
        "python": platform.python_version(),
        "aiosmtpd": command_output(
            [
                str(AIOSMTPD_PYTHON),
                "-c",
                "import aiosmtpd, uvloop; print(aiosmtpd.__version__, uvloop.__version__)",
            ]
        ),
        "node": command_output(["node", "--version"]),
        "smtp-server": smtp_server,
        "postfix": command_output(["dpkg-query", "-W", "-f=${Version}", "postfix"]),
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "ehlo_flags": ", ".join(f"--{k}" for k, v in features.items() if v)
        or "none of the optional ones",
    }


# ---------------------------------------------------------------------------
# Ratios, targets, the table


def _median(results: dict[str, Any], workload: str, server: str, metric: str) -> float | None:
    entry = results.get(workload, {}).get(server)
    if not entry or entry.get("status") != "ok":
        return None
    value = entry.get(metric)
    if isinstance(value, dict):
        value = value.get("median")
    return float(value) if isinstance(value, (int, float)) else None


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for workload, metric in (("W1", "msg_s"), ("W2", "msg_s"), ("W3", "mb_s")):
        for ehlo in ("ehlo-sqlite", "ehlo-null"):
            mine = _median(results, workload, ehlo, metric)
            for ref in ("postfix", "aiosmtpd", "node", "smtp-sink"):
                theirs = _median(results, workload, ref, metric)
                out.append({
                    "workload": workload, "metric": metric, "ehlo": ehlo, "reference": ref,
                    "ratio": mine / theirs if mine is not None and theirs else None,
                })  # fmt: skip
    return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its figure and PASS/FAIL (None: not measured).

    Like is held against like: ehlo's durable store against Postfix's queue,
    ehlo's discard store against the servers that discard.
    """
    out: list[dict[str, Any]] = []

    def ratio_target(
        name: str,
        workload: str,
        metric: str,
        ref: str,
        need: float,
        base: str = "ehlo-sqlite",
        ref_workload: str | None = None,
    ) -> None:
        mine = _median(results, workload, base, metric)
        theirs = _median(results, ref_workload or workload, ref, metric)
        ratio = mine / theirs if mine is not None and theirs else None
        unit = "MB/s" if metric == "mb_s" else "msg/s"
        figure = (
            f"{ratio:.2f}x ({mine:,.1f} vs {theirs:,.1f} {unit})"
            if ratio is not None
            else "not measured"
        )
        out.append(
            {
                "target": name,
                "value": ratio,
                "need": need,
                "pass": None if ratio is None else ratio >= need,
                "figure": figure,
            }
        )

    ratio_target("durable: W1 sqlite >= 3x Postfix", "W1", "msg_s", "postfix", 3.0)
    ratio_target("durable: W2 sqlite >= 5x Postfix", "W2", "msg_s", "postfix", 5.0)
    ratio_target("discard: W1 null >= 3x aiosmtpd", "W1", "msg_s", "aiosmtpd", 3.0,
                 base="ehlo-null")  # fmt: skip
    ratio_target("discard: W2 null >= 1.3x node smtp-server", "W2", "msg_s", "node", 1.3,
                 base="ehlo-null")  # fmt: skip
    ratio_target("W3 >= 1.2x node smtp-server (MB/s)", "W3", "mb_s", "node", 1.2)
    ratio_target("W2 transcripts on >= 90% of off", "W2", "msg_s", "ehlo-sqlite-notx", 0.9)
    rss = _median(results, "W3", "ehlo-sqlite", "peak_rss_process_mib")
    out.append(
        {
            "target": "W3 peak RSS < 40 MiB per process",
            "value": rss,
            "need": 40.0,
            "pass": None if rss is None else rss < 40.0,
            "figure": f"{rss:.1f} MiB" if rss is not None else "not measured",
        }
    )
    kib = _median(results, "W4", "ehlo-sqlite", "kib_per_conn")
    out.append(
        {
            "target": "W4 <= 6 KiB per idle connection",
            "value": kib,
            "need": 6.0,
            "pass": None if kib is None else kib <= 6.0,
            "figure": f"{kib:.2f} KiB" if kib is not None else "not measured",
        }
    )
    fresh = _median(results, "W4", "ehlo-sqlite", "fresh_ms")
    out.append(
        {
            "target": "W4 fresh transaction < 50 ms",
            "value": fresh,
            "need": 50.0,
            "pass": None if fresh is None else fresh < 50.0,
            "figure": f"{fresh:.1f} ms (median)" if fresh is not None else "not measured",
        }
    )
    ratio_target(
        "W6 W1 greeting on >= 85% of off", "W1", "msg_s", "ehlo-sqlite", 0.85, base="ehlo-greeting"
    )
    # Issue 19: the PostgreSQL store, one node against SQLite, two nodes against one.
    ratio_target("W2 postgresql >= 70% of sqlite", "W2", "msg_s", "ehlo-sqlite", 0.7,
                 base="ehlo-pg")  # fmt: skip
    pg_rss = _median(results, "W3", "ehlo-pg", "peak_rss_process_mib")
    out.append(
        {
            "target": "W3 postgresql peak RSS < 60 MiB per process",
            "value": pg_rss,
            "need": 60.0,
            "pass": None if pg_rss is None else pg_rss < 60.0,
            "figure": f"{pg_rss:.1f} MiB" if pg_rss is not None else "not measured",
        }
    )
    ratio_target("W2 postgresql two nodes >= 85% of one", "W2", "msg_s", "ehlo-pg", 0.85,
                 base="ehlo-pg-2n")  # fmt: skip
    # W6's figure comes from the ehlo-greeting server's W1 row.
    return out  # fmt: skip


def information(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Figures reported without a target: W5, the durable store over the discard store."""
    out: list[dict[str, Any]] = []
    for workload in ("W1", "W2"):
        mine = _median(results, workload, "ehlo-sqlite", "msg_s")
        theirs = _median(results, workload, "ehlo-null", "msg_s")
        ratio = mine / theirs if mine is not None and theirs else None
        figure = (f"{ratio:.2f}x ({mine:,.1f} vs {theirs:,.1f} msg/s)"
                  if mine is not None and theirs else "not measured")  # fmt: skip
        out.append({"name": f"W5 {workload} sqlite / null", "value": ratio, "figure": figure})
    return out


def durable(results: dict[str, Any]) -> list[str]:
    """The durable comparison: ehlo's SQLite store against Postfix's queue, W1 and W2."""
    lines: list[str] = []
    for workload in ("W1", "W2"):
        cells = []
        for key in ("ehlo-sqlite", "postfix"):
            rate = _median(results, workload, key, "msg_s")
            cpu = _median(results, workload, key, "cpu_s_per_1k")
            cells.append(f"{_fmt(rate)} msg/s, {_fmt(cpu, '.3f')} CPU s/1k")
        mine = _median(results, workload, "ehlo-sqlite", "msg_s")
        theirs = _median(results, workload, "postfix", "msg_s")
        mine_cpu = _median(results, workload, "ehlo-sqlite", "cpu_s_per_1k")
        theirs_cpu = _median(results, workload, "postfix", "cpu_s_per_1k")
        speed = _fmt(mine / theirs if mine is not None and theirs else None, ".2f")
        cpu_ratio = _fmt(theirs_cpu / mine_cpu if theirs_cpu is not None and mine_cpu else None,
                         ".2f")  # fmt: skip
        lines.append(
            f"  {workload}  ehlo sqlite {cells[0]:<34} Postfix {cells[1]:<34}"
            f" {speed}x the rate, {cpu_ratio}x less CPU per message"
        )
    return lines


STORE_ROWS = ("ehlo-sqlite", "ehlo-pg", "ehlo-pg-2n")


def store_lines(results: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """SQLite and PostgreSQL side by side: rate, CPU of ehlo and of PostgreSQL, commit latency."""
    lines: list[str] = []
    for workload in ("W1", "W2", "W3"):
        for key in STORE_ROWS:
            entry = results.get(workload, {}).get(key)
            if not entry or entry.get("status") != "ok":
                continue
            commit = entry.get("commit_ms") or {}
            latency = (f"{_fmt(commit.get('p50'), '.1f')}/{_fmt(commit.get('p90'), '.1f')} ms"
                       if commit else "-")  # fmt: skip
            lines.append(
                f"  {workload}  {labels.get(key, key):<26} {entry['msg_s']['median']:>8,.0f} msg/s"
                f"  ehlo {entry['cpu_s_per_1k']:.3f}"
                f"  postgres {_fmt(entry.get('database_cpu_s_per_1k'), '.3f'):>5} CPU s/1k"
                f"  commit p50/p90 {latency:<16}"
                f" peak RSS {entry['peak_rss_process_mib']:.1f} MiB/process"
            )
    return lines


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def render(report: dict[str, Any]) -> str:
    results = report["results"]
    labels = {s["key"]: s["label"] for s in report["servers"]}
    status = {s["key"]: s for s in report["servers"]}
    lines: list[str] = []
    lines.append(
        f"ehlo {report['versions']['ehlo']} ({report['versions']['ehlo_commit']}), "
        f"event loop: {report['ehlo_loop']}; {report['versions']['cpus']} CPUs, "
        f"{'quick' if report['options']['quick'] else 'full'} run, "
        f"median of {report['options']['runs']} runs [min-max]; load average at start "
        f"{report['loadavg_start'][0]:.2f}, at end {report.get('loadavg_end', [0])[0]:.2f}"
    )
    head = (
        f"{'workload':<8} {'server':<24} {'msgs/run':>8} {'msg/s':>22} {'MB/s':>18}"
        f" {'CPU s/1k':>9} {'peak RSS':>10} {'server':>7} {'client':>7} {'others':>7}"
    )
    lines += ["", head, "-" * len(head)]
    busy: list[str] = []
    for wl in ("W1", "W2", "W3"):
        for key in report["order"]:
            if wl not in status[key]["workloads"]:
                continue
            entry = results.get(wl, {}).get(key)
            name = "W6" if key == "ehlo-greeting" else wl
            if entry is None:
                continue
            if entry.get("status") != "ok":
                error = _one_line(entry.get("error", "?"))[:120]
                lines.append(f"{name:<8} {labels[key]:<24} FAILED: {error}")
                continue
            m, mb = entry["msg_s"], entry["mb_s"]
            rate = f"{m['median']:,.0f} [{m['min']:,.0f}-{m['max']:,.0f}]"
            mbs = f"{mb['median']:,.1f} [{mb['min']:,.1f}-{mb['max']:,.1f}]"
            lines.append(
                f"{name:<8} {labels[key]:<24} {entry['messages_per_run']:>8} {rate:>22} {mbs:>18}"
                f" {entry['cpu_s_per_1k']:>9.3f} {entry['peak_rss_mib']:>6.1f} MiB"
                f" {_pct(entry.get('server_cpu_util')):>7} {_pct(entry.get('client_cpu_util')):>7}"
                f" {_pct(entry.get('noise_cores')):>7}"
            )
            if (entry.get("noise_cores") or 0) > 0.25:
                busy.append(f"{name} {labels[key]}")
    lines.append(
        "  server/client/others: CPU used during the runs (median), in % of one core, by the"
        " server's processes, by smtp-source, and by everything else: other processes and the"
        " time the hypervisor took (steal)"
    )
    if busy:
        lines.append(
            f"  ! others took > 25% of a core during: {', '.join(busy)}:"
            " those figures are noisy; rerun on a quiet machine"
        )
    if "W4" in results:
        head4 = (f"{'W4':<8} {'server':<24} {'held':>6} {'RSS before->after':>20}"
                 f" {'KiB/conn':>9} {'fresh txn ms':>22}")  # fmt: skip
        lines += ["", head4, "-" * len(head4)]
        for key in report["order"]:
            entry = results["W4"].get(key)
            if entry is None:
                continue
            if entry.get("status") != "ok":
                error = _one_line(entry.get("error", "?"))[:120]
                lines.append(f"{'W4':<8} {labels[key]:<24} FAILED: {error}")
                continue
            fresh = entry["fresh_ms"]
            rss = f"{entry['rss_before_mib']:.1f}->{entry['rss_after_mib']:.1f} MiB"
            fr = f"{fresh['median']:.1f} [{fresh['min']:.1f}-{fresh['max']:.1f}]"
            lines.append(
                f"{'W4':<8} {labels[key]:<24} {entry['held']:>6} {rss:>20}"
                f" {_fmt(entry['kib_per_conn'], '.2f'):>9} {fr:>22}"
            )
    skipped = [s for s in report["servers"] if s.get("status") not in ("ok", None)]
    for s in skipped:
        lines.append(f"! {s['label']}: {s['status']}: {_one_line(s.get('error', ''))}")
    store = store_lines(results, labels)
    if store:
        lines += ["", "stores, SQLite and PostgreSQL (medians; CPU of ehlo's processes and of"
                  " PostgreSQL's apart; commit: end of data to commit, from ehlo's /metrics):"]
        lines += store
    # Ratios
    lines += ["", "durable, ehlo's SQLite store / Postfix's queue (medians of this run):"]
    lines += durable(results)
    lines += ["", "ratios, ehlo / reference (medians of this run; W3 in MB/s):"]
    by: dict[tuple[str, str], dict[str, float | None]] = defaultdict(dict)
    for r in report["ratios"]:
        by[(r["workload"], r["ehlo"])][r["reference"]] = r["ratio"]
    refs = ("postfix", "aiosmtpd", "node", "smtp-sink")
    lines.append(f"  {'':<16}" + "".join(f"{labels.get(r, r):>22}" for r in refs))
    for (wl, ehlo), values in sorted(by.items()):
        if ehlo not in labels:
            continue
        cells = "".join(f"{_fmt(values.get(r), '.2f') + 'x':>22}" for r in refs)
        lines.append(f"  {wl + ' ' + labels[ehlo]:<16}{cells}")
    lines += ["", "information (no target):"]
    for item in report.get("information", []):
        lines.append(f"  [info] {item['name']:<40} {item['figure']}")
    lines += ["", "targets (issue 20; the PostgreSQL store: issue 19):"]
    for t in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        lines.append(f"  [{verdict}] {t['target']:<42} {t['figure']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main


def raise_nofile() -> int:
    """Raise our RLIMIT_NOFILE (servers and smtp-source inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536
    if hard != resource.RLIM_INFINITY and hard < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
    target = hard if hard != resource.RLIM_INFINITY else max(soft, want)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="10x fewer messages (under 2 minutes)")
    parser.add_argument(
        "--runs", type=int, default=3, help="measured runs per workload (default 3)"
    )
    parser.add_argument(
        "--servers",
        default="ehlo-sqlite,ehlo-null,ehlo-sqlite-1w,ehlo-sqlite-notx,ehlo-pg,ehlo-pg-2n,postfix,"
        "aiosmtpd,node,smtp-sink,ehlo-greeting",
        help="comma-separated servers to run (default: all)",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(ALL_WORKLOADS),
        help="comma-separated workloads (default: W1..W6)",
    )
    parser.add_argument(
        "--idle", type=int, default=None, help="W4 idle connections (default 5000; quick 1000)"
    )
    parser.add_argument(
        "--fresh", type=int, default=5, help="W4 fresh transactions timed (default 5)"
    )
    parser.add_argument(
        "--time-cap",
        type=float,
        default=None,
        help="a run whose warm-up predicts longer than this many seconds gets fewer "
        "messages (default 8, quick 2)",
    )
    parser.add_argument("--warmup-timeout", type=float, default=90.0)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the server to CPU 0 and smtp-source to CPU 1 (taskset)",
    )
    parser.add_argument(
        "--ehlo-workers",
        type=int,
        default=None,
        metavar="N",
        help="pass --workers N to the ehlo rows but the 1-worker one (default: ehlo's own)",
    )
    parser.add_argument(
        "--ehlo-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for ehlo serve, repeatable (--ehlo-arg=--flag)",
    )
    parser.add_argument(
        "--node-no-greeting-delay",
        action="store_true",
        help="remove smtp-server's fixed 100 ms greeting delay (patched in server.js)",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="run each server's workloads before starting the next one (default: servers"
        " all started, runs taken in turn)",
    )
    parser.add_argument("--keep-data", action="store_true", help="keep the servers' data and logs")
    parser.add_argument(
        "--pg-url",
        default=None,
        metavar="URL",
        help="the PostgreSQL rows store into this database (default: a throwaway PostgreSQL"
        " started for the run, a database per row; its CPU is then measured too)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for the JSON results")
    opts = parser.parse_args(argv)
    if opts.idle is None:
        opts.idle = 1000 if opts.quick else 5000
    if opts.time_cap is None:
        opts.time_cap = 2.0 if opts.quick else 8.0
    opts.server_list = [s.strip() for s in opts.servers.split(",") if s.strip()]
    opts.workload_list = [w.strip().upper() for w in opts.workloads.split(",") if w.strip()]
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
    nofile = raise_nofile()
    if nofile < opts.idle + 200:
        say(f"warning: only {nofile} file descriptors: W4 reduced")
        opts.idle = max(100, nofile - 500)
    if shutil.which("smtp-source", path=SBIN_PATH) is None:
        print("bench: smtp-source is missing (make test-deps)", file=sys.stderr)
        return 1
    if opts.pin and (os.cpu_count() or 1) < 2:
        opts.pin = False
    features = ehlo_features()
    wanted = set(opts.workload_list)
    # W5 is W1+W2 on ehlo null; W6 is W1 on ehlo with greeting checks.
    ehlo_wl = tuple(
        w for w in ("W1", "W2", "W3", "W4")
        if w in wanted or ("W5" in wanted and w in ("W1", "W2")) or ("W6" in wanted and w == "W1")
    )  # fmt: skip
    null_wl = tuple(w for w in ("W1", "W2", "W3") if w in wanted or ("W5" in wanted and w != "W3"))
    dns_holder: dict[str, Any] = {}
    pg_holder: dict[str, Any] = {}
    specs = [
        ehlo_spec("ehlo-sqlite", "ehlo sqlite", "sqlite", ehlo_wl, opts, features),
        ehlo_spec("ehlo-null", "ehlo null", "null", null_wl, opts, features),
        # The cost of a message apart from the parallelism (the issue's CPU
        # seconds per 1,000 messages, single worker).
        ehlo_spec("ehlo-sqlite-1w", "ehlo sqlite, 1 worker", "sqlite",
                  tuple(w for w in ("W1", "W2", "W3") if w in wanted), opts, features, workers=1),
        *[dataclasses.replace(s, workloads=tuple(w for w in s.workloads if w in wanted))
          for s in reference_specs(opts)],
        # What recording each session's transcript costs (W2 on >= 90% of off).
        ehlo_spec("ehlo-sqlite-notx", "ehlo sqlite, no transcripts", "sqlite",
                  tuple(w for w in ("W2",) if w in wanted), opts, features,
                  extra=("--no-transcripts",)),
        ehlo_spec("ehlo-greeting", "ehlo sqlite+greeting", "sqlite",
                  ("W1",) if "W6" in wanted else (), opts, features,
                  greeting_dns=lambda: dns_holder["server"].nameserver),
        # One node on PostgreSQL beside SQLite, and two nodes on one database
        # (the clients split between them): the cost of coordination.
        ehlo_spec("ehlo-pg", "ehlo postgresql", "postgresql",
                  tuple(w for w in ("W1", "W2", "W3") if w in wanted), opts, features,
                  database=PgDatabase(pg_holder, opts)),
        ehlo_spec("ehlo-pg-2n", "ehlo postgresql, 2 nodes", "postgresql",
                  tuple(w for w in ("W2",) if w in wanted), opts, features,
                  database=PgDatabase(pg_holder, opts), nodes=2),
    ]  # fmt: skip
    specs = [s for s in specs if s.key in opts.server_list and s.workloads]
    workdir = Path(tempfile.mkdtemp(prefix="ehlo-bench-"))
    workdir.chmod(0o755)  # Postfix's daemons (as postfix) walk into their folder
    report: dict[str, Any] = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "workloads": {k: {"title": w.title, "flags": w.flags()} for k, w in WORKLOADS.items()},
        "versions": versions(features),
        "ehlo_loop": "?",
        "loadavg_start": os.getloadavg(),
        "servers": [],
        "order": [s.key for s in specs],
        "results": {},
    }
    flags = report["versions"]["ehlo_flags"]
    say(f"work folder {workdir}; RLIMIT_NOFILE {nofile}; ehlo flags: {flags}")
    if not features["helo-policy"]:
        say("warning: ehlo serve has no --helo-policy: greeting checks run in record mode")
    results: dict[str, dict[str, Any]] = report["results"]
    interrupted = False
    try:
        if any(s.kind == "ehlo" for s in specs):
            report["ehlo_loop"] = ehlo_loop(workdir, opts, features)
            say(f"ehlo event loop: {report['ehlo_loop']}")
        runnable: list[ServerSpec] = []
        for spec in specs:
            info: dict[str, Any] = {"key": spec.key, "label": spec.label, "kind": spec.kind,
                                    "workloads": list(spec.workloads), "status": "ok"}  # fmt: skip
            report["servers"].append(info)
            problem = spec.check()
            if problem:
                info.update(status="skipped", error=problem)
                say(f"{spec.label}: skipped: {problem}")
                for wl in spec.workloads:
                    results.setdefault(wl, {})[spec.key] = {"status": "skipped", "error": problem}
                continue
            runnable.append(spec)
        with contextlib.ExitStack() as stack:
            if not opts.pg_url and any(s.database_pid is not None for s in runnable):
                try:
                    say("starting a throwaway PostgreSQL (bench/pgcluster.py)")
                    pg_holder["cluster"] = stack.enter_context(_pgcluster.cluster())
                except Exception as exc:  # initdb/pg_ctl failed
                    error = f"PostgreSQL: {_one_line(str(exc))[:300]}"
                    say(f"PostgreSQL rows skipped: {error}")
                    for spec in [s for s in runnable if s.database_pid is not None]:
                        for info in report["servers"]:
                            if info["key"] == spec.key:
                                info.update(status="skipped", error=error)
                        for wl in spec.workloads:
                            results.setdefault(wl, {})[spec.key] = {"status": "skipped",
                                                                    "error": error}  # fmt: skip
                    runnable = [s for s in runnable if s.database_pid is None]
            dns_count: Callable[[], int] | None = None
            if any(s.key == "ehlo-greeting" for s in runnable):
                try:
                    dns = stack.enter_context(loopback_dns())
                    dns_holder["server"] = dns
                    dns_count = dns.count
                except Exception as exc:  # dnspython missing, port trouble
                    error = f"loopback DNS server: {exc}"
                    say(f"ehlo-greeting: skipped: {error}")
                    results.setdefault("W1", {})["ehlo-greeting"] = {
                        "status": "skipped",
                        "error": error,
                    }
                    for info in report["servers"]:
                        if info["key"] == "ehlo-greeting":
                            info.update(status="skipped", error=error)
                    runnable = [s for s in runnable if s.key != "ehlo-greeting"]
            busy = [s for s in runnable if any(w in WORKLOADS for w in s.workloads)]
            groups = [[s] for s in busy] if opts.sequential else [busy]
            for group in groups:
                if group:
                    throughput_phase(group, workdir, opts, report, say, dns_count)
            if dns_count is not None:
                report["dns_queries_total"] = dns_count()
        for spec in runnable:
            if "W4" in spec.workloads:
                idle_phase(spec, workdir, opts, report, say)
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: stopping the servers")
    finally:
        stop_all()
        if opts.keep_data:
            say(f"data and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report["ratios"] = ratios(results)
    report["targets"] = targets(results)
    report["information"] = information(results)
    report["elapsed_seconds"] = time.monotonic() - started
    report["loadavg_end"] = os.getloadavg()
    report["interrupted"] = interrupted
    print(render(report))
    print(f"\n(elapsed {report['elapsed_seconds']:.0f}s)")
    opts.output.mkdir(parents=True, exist_ok=True)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    path = opts.output / f"{stamp}{'-quick' if opts.quick else ''}.json"
    text = json.dumps(report, indent=2, default=str)
    path.write_text(text + "\n")
    (opts.output / "latest.json").write_text(text + "\n")
    print(f"results: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 130 if interrupted else 0


def throughput_phase(
    specs: Sequence[ServerSpec],
    workdir: Path,
    opts: argparse.Namespace,
    report: dict[str, Any],
    say: Callable[[str], None],
    dns_count: Callable[[], int] | None,
) -> None:
    """W1..W3 (and W6) on ``specs``: all started, then driven one at a time.

    For each workload every server is warmed up in turn, then the measured
    runs go round the servers (run 1 of each, run 2 of each, ...; the order
    rotates), so that a change in the machine's background load over time
    falls on every server alike instead of on whichever ran last.
    """
    results: dict[str, dict[str, Any]] = report["results"]
    infos = {info["key"]: info for info in report["servers"]}
    servers: dict[str, RunningServer] = {}
    try:
        for spec in specs:
            info = infos[spec.key]
            workloads = [w for w in spec.workloads if w in WORKLOADS]
            try:
                server = RunningServer(spec, workdir, pin=opts.pin)
                servers[spec.key] = server
                info["banner"] = server.wait_ready()
                info["argv"] = server.argv
                if len(server.argvs) > 1:
                    info["node_argvs"] = server.argvs  # every node's command
                say(f"{spec.label} on port {server.port} (pid {server.pid}): {info['banner']}")
            except ServerError as exc:
                info.update(status="failed", error=str(exc))
                say(f"{spec.label}: FAILED to start: {exc}")
                for wl in workloads:
                    results.setdefault(wl, {})[spec.key] = {"status": "failed", "error": str(exc)}
                servers.pop(spec.key, None)
        for wl in ("W1", "W2", "W3"):
            workload = WORKLOADS[wl]
            plans: dict[str, Plan] = {}
            for spec in specs:
                current = servers.get(spec.key)
                if current is None or wl not in spec.workloads:
                    continue
                server = current
                name = "W6 (W1)" if spec.key == "ehlo-greeting" else wl
                say(f"{name} {spec.label}: warm-up ({workload.flags()})")
                try:
                    if not server.alive():
                        raise RunError(f"the server is gone: {server.log_tail(3)}")
                    plan = plan_workload(server, spec.label, workload, opts)
                except (RunError, OSError, subprocess.SubprocessError) as exc:
                    _failed(results, wl, spec.key, server, exc, say)
                    continue
                plans[spec.key] = plan
                rate = plan.warm.msg_s()
                note = (f" (trimmed from {plan.full} to fit {opts.time_cap:g}s per run)"
                        if plan.messages < plan.full else "")  # fmt: skip
                say(
                    f"    {plan.warm.messages} msgs: {rate:,.0f} msg/s; runs of {plan.messages}"
                    + note
                )
                if spec.key == "ehlo-greeting" and dns_count is not None:
                    plan.dns_before = dns_count()
            keys = list(plans)
            for i in range(opts.runs):
                shift = i % len(keys) if keys else 0
                for key in keys[shift:] + keys[:shift]:
                    plan = plans[key]
                    if plan.error is not None:
                        continue
                    try:
                        if not plan.server.alive():
                            raise RunError(f"the server is gone: {plan.server.log_tail(3)}")
                        run = measure(plan.server, workload, plan.messages,
                                      timeout=plan.timeout, pin=opts.pin)  # fmt: skip
                    except (RunError, OSError, subprocess.SubprocessError) as exc:
                        plan.error = str(exc)
                        _failed(results, wl, key, plan.server, exc, say)
                        continue
                    plan.runs.append(run)
                    say(
                        f"{wl} {plan.label} run {i + 1}/{opts.runs}: {run.msg_s():,.0f} msg/s,"
                        f" server CPU {run.server_cpu:.2f}s, client CPU {run.client_cpu:.2f}s,"
                        f" peak RSS {run.peak_rss / MIB:.1f} MiB,"
                        f" others {run.other_cpu / run.seconds:.2f} + steal"
                        f" {run.steal / run.seconds:.2f} cores"
                    )
            for key, plan in plans.items():
                if plan.error is not None or not plan.runs:
                    continue
                entry = summarize(workload, plan.runs, messages=plan.messages, full=plan.full,
                                  warm=plan.warm)  # fmt: skip
                if key == "ehlo-greeting" and dns_count is not None:
                    # W6 asks for a warm cache: this stays at (or near) 0.
                    entry["dns_queries_during_runs"] = dns_count() - plan.dns_before
                    queries = entry["dns_queries_during_runs"]
                    say(f"W6 DNS queries during the measured runs: {queries}")
                results.setdefault(wl, {})[key] = entry
    finally:
        for server in servers.values():
            server.stop()
            if not opts.keep_data:
                shutil.rmtree(server.data, ignore_errors=True)


def idle_phase(
    spec: ServerSpec,
    workdir: Path,
    opts: argparse.Namespace,
    report: dict[str, Any],
    say: Callable[[str], None],
) -> None:
    """W4 on a fresh instance of ``spec`` (so no earlier workload's heap is counted)."""
    results: dict[str, dict[str, Any]] = report["results"]
    info = next(i for i in report["servers"] if i["key"] == spec.key)
    server: RunningServer | None = None
    try:
        try:
            server = RunningServer(spec, workdir, pin=opts.pin, tag="w4")
            banner = server.wait_ready()
        except ServerError as exc:
            info.update(status="failed", error=str(exc))
            say(f"{spec.label}: FAILED to start for W4: {exc}")
            results.setdefault("W4", {})[spec.key] = {"status": "failed", "error": str(exc)}
            return
        info.setdefault("banner", banner)
        info.setdefault("argv", server.argv)
        say(f"W4 {spec.label} (fresh, port {server.port}): {opts.idle} idle connections")
        try:
            entry = run_idle(server, opts, say)
        except (RunError, OSError, subprocess.SubprocessError) as exc:
            _failed(results, "W4", spec.key, server, exc, say)
            return
        results.setdefault("W4", {})[spec.key] = entry
    finally:
        if server is not None:
            server.stop()
            if not opts.keep_data:
                shutil.rmtree(server.data, ignore_errors=True)


def _failed(
    results: dict[str, dict[str, Any]],
    workload: str,
    key: str,
    server: RunningServer,
    exc: BaseException,
    say: Callable[[str], None],
) -> None:
    results.setdefault(workload, {})[key] = {"status": "failed", "error": str(exc)}
    say(f"    {workload} {server.spec.label} FAILED: {exc}")
    tail = server.log_tail(5)
    if tail:
        say("    server log: " + tail.replace("\n", "\n      "))


if __name__ == "__main__":
    sys.exit(main())
