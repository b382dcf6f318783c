"""Several server processes run from Python, without the command line.

A tiny program calls :func:`ehlo.server.serve` with two workers (and a
hook, which each forked worker must keep); mail is delivered with smtplib,
SIGTERM stops it, and the store holds what the workers took.
"""

from __future__ import annotations

import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import free_port
from .test_cli import TIMEOUT, _children, _until, list_json

EMBEDDED = """
import sys
from ehlo import Verdict
from ehlo.config import load_config
from ehlo.server import serve

async def no_mallory(ctx):
    if (ctx.rcpt or "").startswith("mallory@"):
        return Verdict.reject("No such user here", 550, "5.1.1")
    return None

config = load_config(None, {
    "listen": [f"127.0.0.1:{sys.argv[1]}"],
    "data_dir": sys.argv[2],
    "hostname": "mx.test",
    "tls": False,
    "reverse_dns": False,
    "greeting.policy": "off",
})
sys.exit(serve(config, workers=2, hooks={"rcpt": [no_mallory]}))
"""


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.needs(Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_serve_runs_two_workers_from_python(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    log = tmp_path / "embedded.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", EMBEDDED, str(port), str(data)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
        )
        try:

            def up() -> bool:
                assert proc.poll() is None, log.read_text(errors="replace")
                return _accepting(port)

            _until(up, "the embedded server accepts connections")
            # Two workers and the SQLite writer they share.
            _until(lambda: len(_children(proc.pid)) == 3, "two workers and a writer run")
            for i in range(4):  # new connections: whichever worker accepts them
                with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
                    client.ehlo("embedding.client.test")
                    refused = client.sendmail(
                        "a@example.org",
                        [f"b{i}@example.net", "mallory@example.net"],
                        b"Subject: from python %d\r\n\r\nx\r\n" % i,
                    )
                    assert refused == {"mallory@example.net": (550, b"5.1.1 No such user here")}
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=TIMEOUT) == 0, log.read_text(errors="replace")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=TIMEOUT)
    assert "Traceback" not in log.read_text(errors="replace")
    listed = list_json(data)
    assert sorted(item["subject"] for item in listed) == [f"from python {i}" for i in range(4)]
    by_subject = sorted(listed, key=lambda item: str(item["subject"]))
    assert [item["rcpt_to"] for item in by_subject] == [[f"b{i}@example.net"] for i in range(4)]


def test_a_stop_that_reached_a_starting_worker_stops_it_cleanly(tmp_path: Path) -> None:
    """SIGTERM before a worker's loop handles signals (right after ``ready``
    from the supervisor) is kept, and the worker starts, then stops with 0."""
    import asyncio

    from ehlo.server import supervisor

    from .helpers import make_config

    config = make_config(tmp_path / "data", http_enabled=False)
    supervisor._early_stop(signal.SIGTERM, None)  # what the worker's first handler keeps
    try:
        code = asyncio.run(asyncio.wait_for(supervisor.run_server(config, "test"), 60))
    finally:
        supervisor._EARLY_SIGNALS.clear()
    assert code == 0
