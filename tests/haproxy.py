"""A real HAProxy (the Debian package) in the foreground on loopback, for tests.

``run_haproxy`` writes a TCP-mode configuration that relays one frontend on a
free loopback port to one backend server (or several, taken in turn: round
robin) with ``send-proxy`` (PROXY v1) or ``send-proxy-v2``, checks it with
``haproxy -c``, runs ``haproxy -db`` (no daemon, no chroot, no user switch)
and yields the frontend's address once it listens; on exit it terminates
HAProxy (then kills it if it lingers). The configuration has its own
``resolvers default`` section on loopback, so that HAProxy does not open a
socket to the machine's resolver (/etc/resolv.conf).

Readiness is seen in /proc/net/tcp{,6} (the frontend socket in LISTEN state),
so no probe connection reaches the backend; where /proc is not available a
probe connection is used instead, which the backend sees as one extra
connection (a PROXY header, then EOF).

In TCP mode HAProxy connects to the backend as soon as it accepts a client,
without waiting for client data (what SMTP, where the server speaks first,
needs), and writes the PROXY header first on that connection. When the
backend closes, HAProxy forwards what was sent and then closes the client.
With several backends, a connection refused by one (a node that is down) is
tried again on another (``option redispatch``), so that a client only sees
the failure when no backend takes it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .helpers import free_port

__all__ = ["HAProxyError", "haproxy_available", "haproxy_path", "haproxy_version", "run_haproxy"]

# How long HAProxy may take to listen, and to exit after SIGTERM.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
# Short timeouts: tests fail fast instead of waiting on a stuck peer.
TIMEOUT_CONNECT = "2s"
TIMEOUT_CLIENT = "30s"
TIMEOUT_SERVER = "30s"
# Attempts when another process takes the free port before HAProxy binds it.
_BIND_ATTEMPTS = 3
_SBIN = "/usr/sbin:/sbin:/usr/local/sbin"
# The discard port: the nameserver of HAProxy's resolvers section, never queried.
UNUSED_NAMESERVER_PORT = 9


class HAProxyError(RuntimeError):
    """HAProxy refused the configuration or did not start."""


def haproxy_path() -> str | None:
    """The haproxy executable (also looked for in the sbin directories), or None."""
    return shutil.which("haproxy") or shutil.which("haproxy", path=_SBIN)


def haproxy_available() -> bool:
    """Whether an haproxy executable is installed."""
    return haproxy_path() is not None


def haproxy_version() -> str:
    """The first line of ``haproxy -v`` (e.g. "HAProxy version 2.6.12-1+deb12u4 ...")."""
    exe = _require()
    out = subprocess.run(
        [exe, "-v"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    return out.splitlines()[0] if out else ""


@contextlib.contextmanager
def run_haproxy(
    backend: tuple[str, int],
    *,
    send_proxy: str = "v2",
    listen_host: str = "127.0.0.1",
    tls_passthrough: bool = False,
    proxy_v2_options: Sequence[str] = (),
    more_backends: Sequence[tuple[str, int]] = (),
) -> Iterator[tuple[str, int]]:
    """Run HAProxy relaying a loopback frontend to ``backend``; yields the frontend (host, port).

    ``send_proxy`` is "v1" or "v2" (the header HAProxy sends the backend).
    ``tls_passthrough`` makes HAProxy wait (up to 5 s) for the client's TLS
    ClientHello before connecting to the backend, then relay it untouched right
    behind the PROXY header, as in front of an implicit-TLS port (HAProxy does
    not terminate TLS). ``proxy_v2_options`` are HAProxy's ``proxy-v2-options``
    (e.g. "crc32c", which adds a CRC32C TLV). ``more_backends`` are servers
    balanced with ``backend`` round robin, each connection to the next one.
    """
    if send_proxy not in ("v1", "v2"):
        raise ValueError(f"send_proxy: expected 'v1' or 'v2', got {send_proxy!r}")
    if proxy_v2_options and send_proxy != "v2":
        raise ValueError("proxy_v2_options need send_proxy='v2'")
    exe = _require()
    with tempfile.TemporaryDirectory(prefix="ehlo-haproxy-") as tmp:
        directory = Path(tmp)
        config = directory / "haproxy.cfg"
        log_path = directory / "haproxy.log"
        for attempt in range(1, _BIND_ATTEMPTS + 1):
            port = free_port(listen_host)
            config.write_text(
                _config(
                    (backend, *more_backends), send_proxy, listen_host, port, tls_passthrough,
                    proxy_v2_options,
                )
            )
            _check_config(exe, config)
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [exe, "-f", str(config), "-db"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=directory,
                )
            try:
                if _wait_listening(proc, listen_host, port):
                    yield listen_host, port
                    return
            finally:
                _stop(proc)
            output = log_path.read_text(errors="replace").strip()
            if "cannot bind" in output.lower() and attempt < _BIND_ATTEMPTS:
                continue  # someone took the port meanwhile: try another
            raise HAProxyError(
                f"haproxy exited with status {proc.returncode} before listening on "
                f"{_hostport(listen_host, port)}:\n{output}"
            )


def _require() -> str:
    exe = haproxy_path()
    if exe is None:
        raise HAProxyError("haproxy is not installed (scripts/install-test-deps.sh installs it)")
    return exe


def _hostport(host: str, port: int) -> str:
    """HAProxy's address syntax: IPv6 addresses in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _config(
    backends: Sequence[tuple[str, int]],
    send_proxy: str,
    listen_host: str,
    port: int,
    tls_passthrough: bool,
    proxy_v2_options: Sequence[str],
) -> str:
    options = "send-proxy" if send_proxy == "v1" else "send-proxy-v2"
    if proxy_v2_options:
        options += " proxy-v2-options " + ",".join(proxy_v2_options)
    servers = "".join(
        f"    server s{n} {_hostport(*backend)} {options}\n"
        for n, backend in enumerate(backends, 1)
    )
    balance = ""
    if len(backends) > 1:
        # Each connection to the next server; one refused is tried again on
        # another (a node that is down costs a retry, not a client).
        balance = "    balance roundrobin\n    retries 1\n    option redispatch 1\n"
    inspect = ""
    if tls_passthrough:
        # Wait for a ClientHello (the first TLS record) before choosing the server.
        inspect = (
            "    tcp-request inspect-delay 5s\n"
            "    tcp-request content accept if { req.ssl_hello_type 1 }\n"
        )
    return (
        "global\n"
        "    maxconn 64\n"
        "    nbthread 1\n"
        "    log stderr format short local0 notice\n"
        # Otherwise HAProxy makes a "default" resolvers section from
        # /etc/resolv.conf and opens a socket to the machine's resolver; this
        # one names a loopback port that nothing asks (no server uses DNS).
        "resolvers default\n"
        f"    nameserver none {_hostport('127.0.0.1', UNUSED_NAMESERVER_PORT)}\n"
        "defaults\n"
        "    mode tcp\n"
        "    log global\n"
        "    option tcplog\n"
        f"    timeout connect {TIMEOUT_CONNECT}\n"
        f"    timeout client {TIMEOUT_CLIENT}\n"
        f"    timeout server {TIMEOUT_SERVER}\n"
        "frontend fe\n"
        f"    bind {_hostport(listen_host, port)}\n"
        f"{inspect}"
        "    default_backend be\n"
        "backend be\n"
        f"{balance}"
        f"{servers}"
    )


def _check_config(exe: str, config: Path) -> None:
    """``haproxy -c``: raise HAProxyError with its output if it refuses the config."""
    result = subprocess.run(
        [exe, "-c", "-f", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise HAProxyError(
            f"haproxy -c refused the configuration (status {result.returncode}):\n"
            f"{output}\n--- {config} ---\n{config.read_text()}"
        )


def _wait_listening(proc: subprocess.Popen[bytes], host: str, port: int) -> bool:
    """Wait until HAProxy listens on host:port: True, or False when it exited first."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        listening = _proc_net_listening(host, port)
        if listening is None:
            listening = _accepts(host, port)
        if listening:
            return True
        time.sleep(0.02)
    raise HAProxyError(
        f"haproxy did not listen on {_hostport(host, port)} within {START_TIMEOUT:g} s"
    )


def _proc_net_listening(host: str, port: int) -> bool | None:
    """Whether /proc/net shows a TCP socket listening on host:port; None if it cannot tell."""
    if ":" in host:
        raw = socket.inet_pton(socket.AF_INET6, host)
        table = "/proc/net/tcp6"
    else:
        raw = socket.inet_pton(socket.AF_INET, host)
        table = "/proc/net/tcp"
    # The kernel prints each 32-bit word of the address in host byte order.
    words = (raw[i : i + 4] for i in range(0, len(raw), 4))
    local = "".join(f"{int.from_bytes(w, sys.byteorder):08X}" for w in words) + f":{port:04X}"
    try:
        with open(table) as f:
            next(f, None)  # the column titles
            for line in f:
                fields = line.split()
                # State 0A is LISTEN.
                if len(fields) > 3 and fields[1] == local and fields[3] == "0A":
                    return True
    except OSError:
        return None
    return False


def _accepts(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port succeeds (the backend sees it)."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate HAProxy, then kill it if it does not exit in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
