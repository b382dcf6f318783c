"""Running ehlo as a real MX: a privileged port, another user, a systemd unit.

``ehlo serve`` runs for real (``python -m ehlo`` subprocesses). The file
proves that:

* started as root with ``--user nobody`` on a port below 1024, the
  listeners bind, then every ehlo process (the supervisor, each worker,
  the SQLite writer process) runs as nobody with nobody's groups; mail is
  stored over SMTP and STARTTLS, a SIGHUP reload works, and every file in
  the data folder is nobody's;
* a data folder that exists and belongs to root is refused with one line
  saying what to run; ``--user`` by someone who is not root is refused
  unless it names that same user;
* a port in use is the same one line whatever the number of listeners or
  workers, and nothing (no self-signed pair) is written when a bind fails;
* a user without the right to a port below 1024 gets one line saying what
  to do;
* ``contrib/ehlo.service`` passes ``systemd-analyze verify``.

The cases that switch users need root (as the test suite runs in CI).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import SERVE_WITHOUT_DNS
from .dnsserver import DNSServer
from .test_cli import TIMEOUT, ehlo_cmd, free_port, one_line_error
from .test_store_files import NOBODY, tool

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
MESSAGE = b"From: a@example.org\r\nSubject: deploy\r\n\r\nhello\r\n"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder nobody may enter (pytest's own are 0700), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="ehlo-deploy-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def privileged_port() -> int:
    """A free port below 1024 on 127.0.0.1 (25 unless a mail server holds it)."""
    for port in (25, 587, 465, 24, 26, 999):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free port below 1024 on 127.0.0.1")


class Serve:
    """``ehlo serve`` in a subprocess, its stderr in a file."""

    def __init__(
        self, log: Path, *args: str, prefix: tuple[str, ...] = (), dns: bool = False
    ) -> None:
        self.log = log
        self._stderr = open(log, "wb")  # noqa: SIM115 - closed in close()
        no_dns = () if dns else SERVE_WITHOUT_DNS
        self.proc = subprocess.Popen(
            [*prefix, *ehlo_cmd("serve", "--hostname", "mx", *no_dns, *args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            cwd=log.parent,
        )

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, count: int = 1) -> None:
        """Until ``text`` appears ``count`` times in the log."""
        deadline = time.monotonic() + TIMEOUT
        while self.stderr().count(text) < count:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} x{count}: {self.stderr()}")
            time.sleep(0.05)

    def wait_exit(self) -> int:
        try:
            return self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running: {self.stderr()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
        self._stderr.close()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").iterdir():
            children = (task / "children").read_text().split()
            todo.extend(int(child) for child in children)
    return found


def ids(pid: int) -> dict[str, list[int]]:
    """The Uid, Gid and Groups lines of ``/proc/PID/status``."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {
        key: [int(value) for value in rest.split()]
        for key, _, rest in (line.partition(":") for line in lines)
        if key in ("Uid", "Gid", "Groups")
    }


def stored(data: Path, store: str) -> list[dict[str, object]]:
    result = subprocess.run(
        ehlo_cmd("messages", "list", "--json", "--data", str(data), "--store", store),
        capture_output=True,
        timeout=TIMEOUT,
        check=True,
    )
    messages: list[dict[str, object]] = json.loads(result.stdout)
    return messages


# --------------------------------------------------------------------------
# --user: bind as root, serve as nobody


@needs_root
@pytest.mark.parametrize(
    ("store", "workers", "processes"),
    [
        ("sqlite", 2, 4),  # the supervisor, two workers, the SQLite writer process
        ("sqlite", 1, 3),  # one worker: the writer is still started before root goes
        ("maildir", 1, 1),  # one process, no child
    ],
)
def test_user_binds_a_privileged_port_then_every_process_is_that_user(
    shared_tmp: Path, store: str, workers: int, processes: int
) -> None:
    port = privileged_port()
    data = shared_tmp / "var" / "ehlo"  # missing: made nobody's
    server = Serve(
        shared_tmp / "serve.log",
        "--listen", f"127.0.0.1:{port}", "--data", str(data), "--store", store,
        "--user", "nobody", "--workers", str(workers),
    )  # fmt: skip
    try:
        server.wait_for(" ready on ")  # once, by the supervisor
        pids = descendants(server.proc.pid)
        assert len(pids) == processes, (pids, server.stderr())
        nobody = pwd.getpwnam("nobody")
        groups = sorted(set(os.getgrouplist("nobody", nobody.pw_gid)))
        for pid in pids:
            found = ids(pid)
            assert found["Uid"] == [NOBODY] * 4, (pid, found)
            assert found["Gid"] == [nobody.pw_gid] * 4, (pid, found)
            assert sorted(found["Groups"]) == groups, (pid, found)
        # Mail over plain SMTP and STARTTLS (the workers' TLS, read as root).
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
            client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
            client.starttls(context=ssl._create_unverified_context())
            client.sendmail("a@example.org", ["c@example.net"], MESSAGE)
        # The reload reads the certificates again, as nobody.
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for("TLS certificates reloaded", workers)
        server.proc.terminate()
        assert server.wait_exit() == 0, server.stderr()
    finally:
        server.close()
    log = server.stderr()
    assert "Traceback" not in log and " ERROR " not in log, log
    assert "running as root" not in log, log
    assert "running as user nobody" in log, log
    assert len(stored(data, store)) == 2
    owners = {
        str(path.relative_to(data)): (path.lstat().st_uid, path.lstat().st_gid)
        for path in [data, *data.rglob("*")]
    }
    assert "tls/key.pem" in owners, owners
    assert set(owners.values()) == {(NOBODY, nobody.pw_gid)}, owners


@needs_root
def test_user_with_dns_and_greeting_checks(shared_tmp: Path) -> None:
    """Reverse DNS and greeting checks, first used after the switch, still work.

    Their modules are loaded before root is given up: the user may be
    unable to read the Python installation (here, one under /root).
    """
    port = privileged_port()
    data = shared_tmp / "data"
    zone = {
        DNSServer.reverse("127.0.0.1"): {"PTR": ["client.example.test."]},
        "client.example.test": {"A": ["127.0.0.1"]},
    }
    http = free_port()
    with DNSServer(zone) as dns:
        server = Serve(
            shared_tmp / "serve.log",
            "--listen", f"127.0.0.1:{port}", "--data", str(data), "--user", "nobody",
            "--workers", "2", "--dns-server", dns.nameserver, "--helo-policy", "record",
            "--http", f"127.0.0.1:{http}",
            dns=True,
        )  # fmt: skip
        try:
            server.wait_for(" ready on ")  # once, by the supervisor
            with smtplib.SMTP(
                "127.0.0.1", port, local_hostname="client.example.test", timeout=TIMEOUT
            ) as client:
                client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
            # The web UI's files were read as root: the page and the OpenAPI
            # document are served by a worker that runs as nobody.
            for path, wanted in (("/", b"<!doctype html"), ("/api/v1/openapi.json", b"openapi")):
                with urllib.request.urlopen(f"http://127.0.0.1:{http}{path}", timeout=30) as page:
                    assert wanted in page.read().lower(), path
            server.proc.terminate()
            assert server.wait_exit() == 0, server.stderr()
        finally:
            server.close()
        assert dns.count("client.example.test", "A") >= 1
    log = server.stderr()
    assert "Traceback" not in log and " ERROR " not in log, log
    (message,) = stored(data, "sqlite")
    raw = subprocess.run(
        ehlo_cmd("messages", "show", str(message["id"]), "--raw", "--data", str(data)),
        capture_output=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout
    assert b"client.example.test" in raw.split(b"\r\n\r\n")[0]


@needs_root
def test_root_without_user_serves_with_one_warning(shared_tmp: Path) -> None:
    server = Serve(
        shared_tmp / "serve.log",
        "--listen", f"127.0.0.1:{free_port()}", "--data", str(shared_tmp / "data"),
        "--workers", "2", "--no-tls",
    )  # fmt: skip
    try:
        server.wait_for(" ready on ")  # once, by the supervisor
        server.proc.terminate()
        assert server.wait_exit() == 0, server.stderr()
    finally:
        server.close()
    warnings = [line for line in server.stderr().splitlines() if "running as root" in line]
    assert len(warnings) == 1, server.stderr()
    assert "--user NAME" in warnings[0]


@needs_root
def test_a_data_folder_of_root_is_refused_with_what_to_run(shared_tmp: Path) -> None:
    data = shared_tmp / "data"
    data.mkdir(mode=0o700)  # root's, as `mkdir` by the operator left it
    server = Serve(
        shared_tmp / "serve.log",
        "--listen", f"127.0.0.1:{free_port()}", "--data", str(data), "--user", "nobody",
        "--workers", "2",
    )  # fmt: skip
    try:
        assert server.wait_exit() == 1
    finally:
        server.close()
    line = one_line_error(server.stderr().encode())
    assert line == (
        f"ehlo: error: {data}: owned by root, not nobody: run `chown -R nobody: {data}`"
        " (or start without --user)"
    )
    assert list(data.iterdir()) == []  # nothing written
    assert data.stat().st_uid == 0


def test_user_when_not_root(shared_tmp: Path) -> None:
    """Only root switches; naming the user one already is starts as usual."""
    prefix = unprivileged()
    me = "nobody" if prefix else pwd.getpwuid(os.geteuid()).pw_name
    other = "root" if me != "root" else "daemon"
    home = shared_tmp / "home"
    home.mkdir()
    if prefix:
        os.chown(home, NOBODY, pwd.getpwnam("nobody").pw_gid)
    data = home / "data"
    refused = subprocess.run(
        [*prefix, *ehlo_cmd("serve", "--user", other, "--data", str(data), "--no-tls")],
        capture_output=True,
        timeout=TIMEOUT,
        cwd=shared_tmp,
    )
    assert refused.returncode == 1
    line = one_line_error(refused.stderr)
    assert line == (
        f"ehlo: error: --user {other}: only root can switch to another user (ehlo runs as {me})"
    )
    assert not data.exists()
    server = Serve(
        shared_tmp / "serve.log",
        "--listen", f"127.0.0.1:{free_port()}", "--data", str(data), "--user", me,
        "--workers", "1", "--no-tls", "--store", "maildir",
        prefix=prefix,
    )  # fmt: skip
    try:
        server.wait_for(" ready on ")
        server.proc.terminate()
        assert server.wait_exit() == 0, server.stderr()
    finally:
        server.close()


# --------------------------------------------------------------------------
# Listen errors: one line, nothing written


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("listeners", [1, 2])
def test_port_in_use_is_one_line_and_writes_nothing(
    shared_tmp: Path, listeners: int, workers: str
) -> None:
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        listen = [f"127.0.0.1:{port}"]
        if listeners == 2:  # the one in use second: the first binds, then is let go
            listen.insert(0, f"127.0.0.1:{free_port()}")
        data = shared_tmp / "data"
        result = subprocess.run(
            ehlo_cmd(
                "serve", "--data", str(data), "--hostname", "mx", "--workers", workers,
                *SERVE_WITHOUT_DNS, *(arg for item in listen for arg in ("--listen", item)),
            ),
            capture_output=True,
            timeout=TIMEOUT,
            cwd=shared_tmp,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    line = one_line_error(result.stderr)
    assert line == f"ehlo: error: cannot listen on 127.0.0.1:{port}: address already in use"
    assert not (data / "tls").exists()
    assert not data.exists() or list(data.iterdir()) == []


def unprivileged() -> tuple[str, ...]:
    """The command prefix that runs ehlo as a user without the right to low ports."""
    if os.geteuid() != 0:
        return ()
    group = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
    return (tool("setpriv"), "--reuid=nobody", f"--regid={group}", "--clear-groups")


def test_a_privileged_port_refused_says_what_to_do(shared_tmp: Path) -> None:
    port = privileged_port()
    data = shared_tmp / "data"
    result = subprocess.run(
        [
            *unprivileged(),
            *ehlo_cmd(
                "serve", "--listen", f"127.0.0.1:{port}", "--data", str(data), "--workers", "2",
                *SERVE_WITHOUT_DNS,
            ),
        ],
        capture_output=True,
        timeout=TIMEOUT,
        cwd=shared_tmp,
    )  # fmt: skip
    if result.returncode == 0 or b"ready on" in result.stderr:
        pytest.skip("this user may bind low ports (CAP_NET_BIND_SERVICE)")
    assert result.returncode == 1
    line = one_line_error(result.stderr)
    assert line == (
        f"ehlo: error: cannot listen on 127.0.0.1:{port}: permission denied"
        f" (port {port} needs root: start as root with --user NAME, or grant"
        " CAP_NET_BIND_SERVICE (systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE),"
        " or listen on a port above 1023)"
    )
    assert not data.exists()


# --------------------------------------------------------------------------
# The systemd unit


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts contrib/ehlo.service, without a warning.

    verify checks that ExecStart's program exists: the copy verified runs
    this checkout's ``ehlo`` instead of /usr/local/bin/ehlo, which need not
    be installed here; everything else is the file as shipped.
    """
    analyze = tool("systemd-analyze")
    unit = (ROOT / "contrib" / "ehlo.service").read_text()
    assert "ExecStart=/usr/local/bin/ehlo serve --config /etc/ehlo/ehlo.toml\n" in unit
    ehlo = Path(ehlo_cmd()[0]).parent / "ehlo"
    assert ehlo.is_file(), ehlo
    copy = tmp_path / "ehlo.service"
    copy.write_text(unit.replace("/usr/local/bin/ehlo", str(ehlo)))
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    # A directive systemd does not know, or a bad value, is only a warning.
    assert str(copy) not in output and "ehlo.service" not in output, output
    for directive in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ReadWritePaths=/var/lib/ehlo",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=",
        "Restart=on-failure",
        "#AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "#User=ehlo",
    ):
        assert f"\n{directive}" in unit, directive
