#!/usr/bin/env python3
"""What reverse DNS costs ehlo: W2 with it off and on, and the first client's banner.

Starts ``ehlo serve --store null --helo-policy off`` on a free loopback port,
with ``--no-reverse-dns`` or with reverse DNS on, always with
``--dns-server`` naming the loopback DNS server of tests/dnsserver.py (never
the machine's resolver). Then, per configuration, interleaved ``--rounds``
times:

- W2 (smtp-source -d -s 20 -m N -l 4096): messages per second, server CPU
  seconds per 1,000 messages, and the PTR and A queries the DNS server got;
- the latency of the first connection's 220 banner after the server is up
  (what a lazy import on that connection costs every session of the loop).

Loopback clients need no lookup; ``--proxy-client 192.0.2.7`` puts HAProxy
in front of ehlo (PROXY v1, ``set-src``), so that every connection comes
from that address and its PTR is looked up. Medians are printed at the end.
``.venv/bin/python bench/rdns.py [--messages 20000] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EHLO = ROOT / ".venv" / "bin" / "ehlo"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
HELO_NAME = "client.bench.test"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_cpu(root: int) -> float:
    """User + system CPU seconds of ``root`` and its descendants."""
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            data = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()
        parents[int(name)] = int(fields[1])
        times[int(name)] = int(fields[11]) + int(fields[12])
    tree = [root]
    for pid in tree:  # grows while iterating: breadth first
        tree.extend(child for child, parent in parents.items() if parent == pid)
    total = sum(times.get(pid, 0) for pid in tree)
    return total / CLK_TCK


def banner(port: int, timeout: float = 10.0) -> float:
    """Seconds from connect to the 220 banner (QUIT sent after)."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        data = sock.recv(512)
        elapsed = time.perf_counter() - started
        if not data.startswith(b"220"):
            raise RuntimeError(f"no banner: {data!r}")
        sock.sendall(b"QUIT\r\n")
        sock.recv(512)
    return elapsed


def wait_until(check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


class Run:
    """One ehlo serve (and HAProxy in front of it, for a proxied client)."""

    def __init__(self, work: Path, dns: str, rdns: bool, opts: argparse.Namespace) -> None:
        self.port = free_port()
        config = work / "ehlo.toml"
        config.write_text(
            "max_connections = 2000\nmax_connections_per_ip = 2000\nmax_connection_rate = 0\n"
        )
        listen = f"127.0.0.1:{self.port}" + (",proxy" if opts.proxy_client else "")
        argv = [
            str(EHLO), "serve", "--listen", listen, "--data", str(work / "data"),
            "--store", "null", "--config", str(config), "--no-tls", "--log-level", "INFO",
            "--helo-policy", "off", "--dns-server", dns,
        ]  # fmt: skip
        if not rdns:
            argv.append("--no-reverse-dns")
        if opts.workers is not None:
            argv += ["--workers", str(opts.workers)]
        self.log = work / "ehlo.log"
        self.procs = [self._start(argv, self.log)]
        wait_until(
            lambda: "event loop" in self.log.read_text(errors="replace"), "ehlo's ready line"
        )
        self.target = self.port
        if opts.proxy_client:
            self.target = free_port()
            haproxy_cfg = work / "haproxy.cfg"
            haproxy_cfg.write_text(
                "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n"
                "  timeout client 120s\n  timeout server 120s\n"
                f"frontend f\n  bind 127.0.0.1:{self.target}\n"
                f"  tcp-request connection set-src ipv4({opts.proxy_client})\n"
                f"  default_backend b\nbackend b\n  server s 127.0.0.1:{self.port} send-proxy\n"
            )
            haproxy = shutil.which("haproxy", path=SBIN_PATH) or "haproxy"
            self.procs.append(self._start([haproxy, "-db", "-f", str(haproxy_cfg)], work / "hap"))
            wait_until(lambda: banner(self.target), "haproxy")
        time.sleep(0.5)  # every worker up

    @staticmethod
    def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            return subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000, help="W2 messages per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="ehlo serve --workers")
    parser.add_argument("--proxy-client", default=None, help="through HAProxy, from this IP")
    opts = parser.parse_args()
    source = shutil.which("smtp-source", path=SBIN_PATH)
    if source is None:
        print("rdns: smtp-source is missing (make test-deps)", file=sys.stderr)
        return 1
    sys.path.insert(0, str(ROOT))
    from tests.dnsserver import DNSServer

    zone = {
        HELO_NAME: {"A": ["127.0.0.1"]},
        DNSServer.reverse("127.0.0.1"): {"PTR": [f"{HELO_NAME}."]},
    }
    if opts.proxy_client:
        zone["mail.client.bench.test"] = {"A": [opts.proxy_client]}
        zone[DNSServer.reverse(opts.proxy_client)] = {"PTR": ["mail.client.bench.test."]}
    rows: dict[str, list[tuple[float, float, float]]] = {"off": [], "on": []}
    with DNSServer(zone, ttl=3600) as dns:
        for rnd in range(opts.rounds):
            for mode in ("off", "on"):
                work = Path(tempfile.mkdtemp(prefix="ehlo-rdns-"))
                run = Run(work, dns.nameserver, mode == "on", opts)
                try:
                    first = banner(run.target)
                    ptr, a = dns.count(rdtype="PTR"), dns.count(rdtype="A")
                    cpu = tree_cpu(run.procs[0].pid)
                    load = os.getloadavg()[0]
                    argv = [source, "-d", "-s", "20", "-m", str(opts.messages), "-l", "4096"]
                    started = time.perf_counter()
                    subprocess.run(
                        [*argv, "-M", HELO_NAME, f"127.0.0.1:{run.target}"],
                        check=True,
                        stdout=subprocess.DEVNULL,
                        timeout=600,
                    )
                    seconds = time.perf_counter() - started
                    cpu = tree_cpu(run.procs[0].pid) - cpu
                    ptr, a = dns.count(rdtype="PTR") - ptr, dns.count(rdtype="A") - a
                finally:
                    run.stop()
                    shutil.rmtree(work, ignore_errors=True)
                rate, per_k = opts.messages / seconds, cpu / opts.messages * 1000
                rows[mode].append((rate, per_k, first * 1000))
                print(
                    f"round {rnd + 1} reverse DNS {mode}: {rate:,.0f} msg/s, server CPU"
                    f" {per_k:.3f} s/1000 msg, first banner {first * 1000:.1f} ms,"
                    f" PTR queries {ptr}, A queries {a} (load {load:.2f})",
                    flush=True,
                )
    for mode, results in rows.items():
        print(
            f"median reverse DNS {mode}: {statistics.median(r[0] for r in results):,.0f} msg/s,"
            f" {statistics.median(r[1] for r in results):.3f} CPU s/1000 msg,"
            f" first banner {statistics.median(r[2] for r in results):.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
