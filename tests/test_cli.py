"""The ``ehlo`` command line, run for real as ``python -m ehlo`` subprocesses.

``serve`` is started on a free loopback port, mail is delivered with smtplib
(HELO, EHLO + STARTTLS), the server is stopped with SIGTERM/SIGINT, and
``messages list/show`` read back what was stored. Every wait is bounded and
every server is killed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ehlo

from .helpers import SERVE_WITHOUT_DNS, free_port, sleep_until_older_than
from .trace import split_trace

TIMEOUT = 15.0  # seconds for any single wait

HELO_MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: plain hello\r\n"
    b"\r\n"
    b"First line.\r\n"
    b".A line that starts with a dot.\r\n"
    b"Last line.\r\n"
)

EHLO_MESSAGE = (
    b"From: Carol <carol@example.org>\r\n"
    b"To: Dan <dan@example.net>, Erin <erin@example.net>\r\n"
    b"Subject: =?utf-8?q?s=C3=A9cure?= hello\r\n"
    b"\r\n"
    b"Over TLS.\r\n"
)


# --------------------------------------------------------------------------
# Helpers


def ehlo_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ehlo", *args]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(ehlo_cmd(*args), capture_output=True, timeout=TIMEOUT, env=env)


def one_line_error(stderr: bytes) -> str:
    """The single ``ehlo: error:`` line of stderr, after checking there is no traceback."""
    text = stderr.decode()
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("ehlo: error:")]
    assert len(errors) == 1, text
    return errors[0]


class ServerProcess:
    """``ehlo serve`` in a subprocess, its stderr in a file."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.data = tmp_path / "data"
        self.stderr_path = tmp_path / f"serve-{self.port}.log"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            ehlo_cmd(
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--data",
                str(self.data),
                "--hostname",
                "mx.test",
                *SERVE_WITHOUT_DNS,
                *args,
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env=env,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}: {self.stderr()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"server did not accept connections: {self.stderr()}")

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=TIMEOUT)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=TIMEOUT)

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
        self._stderr.close()


@contextlib.contextmanager
def serving(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path, *args, env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def no_verify() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def send_helo(server: ServerProcess) -> None:
    with server.smtp() as client:
        assert client.helo("helo.client.test")[0] == 250
        client.sendmail("alice@example.org", ["bob@example.net"], HELO_MESSAGE)


def send_ehlo_starttls(server: ServerProcess) -> None:
    with server.smtp() as client:
        assert client.ehlo("ehlo.client.test")[0] == 250
        assert client.has_extn("starttls")
        assert client.starttls(context=no_verify())[0] == 220
        assert client.ehlo("ehlo.client.test")[0] == 250
        client.sendmail("carol@example.org", ["dan@example.net", "erin@example.net"], EHLO_MESSAGE)


def list_json(data: Path, *args: str) -> list[dict[str, Any]]:
    every = () if "--limit" in args else ("--all",)  # a page is 20 messages by default
    result = run("messages", "list", "--json", "--data", str(data), *every, *args)
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert isinstance(listed, list)
    return listed


def assert_stored_as_sent(raw: bytes, sent: bytes) -> None:
    """Stored bytes = our trace headers (Received first) + exactly what the client sent."""
    fields, message = split_trace(raw)
    assert message == sent
    assert fields[0].startswith(b"Received: ")


def env_with(**values: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(values)
    return env


# --------------------------------------------------------------------------
# serve + messages, end to end


@pytest.mark.parametrize("loop", ["default", "asyncio"])
def test_serve_stores_helo_and_ehlo_starttls_messages(tmp_path: Path, loop: str) -> None:
    env = env_with(EHLO_LOOP=loop) if loop != "default" else None
    with serving(tmp_path, env=env) as server:
        send_helo(server)
        send_ehlo_starttls(server)
        assert server.stop() == 0
        log = server.stderr()
    assert "Traceback" not in log
    assert "event loop: " + ("asyncio" if loop == "asyncio" else "uvloop") in log

    listed = list_json(server.data)
    assert len(listed) == 2
    by_greeting = {item["greeting"]: item for item in listed}
    assert set(by_greeting) == {"HELO", "EHLO"}

    helo, ehlo_ = by_greeting["HELO"], by_greeting["EHLO"]
    assert helo["greeting_name"] == "helo.client.test"
    assert helo["mail_from"] == "alice@example.org"
    assert helo["rcpt_to"] == ["bob@example.net"]
    assert helo["subject"] == "plain hello"
    assert helo["tls"] is None
    assert helo["client_ip"] == "127.0.0.1"

    assert ehlo_["greeting_name"] == "ehlo.client.test"
    assert ehlo_["mail_from"] == "carol@example.org"
    assert ehlo_["rcpt_to"] == ["dan@example.net", "erin@example.net"]
    assert ehlo_["subject"] == "sécure hello"
    assert ehlo_["tls"] is not None
    assert ehlo_["tls"]["version"].startswith("TLS")
    assert ehlo_["tls"]["cipher"]

    for item in listed:
        for key in ("id", "received_at", "client_port", "mail_params", "protocol", "size"):
            assert key in item
    assert listed[0]["received_at"] >= listed[1]["received_at"]  # newest first

    # show --raw: the exact bytes, Received header first.
    for item, sent in ((helo, HELO_MESSAGE), (ehlo_, EHLO_MESSAGE)):
        shown = run("messages", "show", item["id"], "--raw", "--data", str(server.data))
        assert shown.returncode == 0, shown.stderr
        assert_stored_as_sent(shown.stdout, sent)
        assert len(shown.stdout) == item["size"]
    if loop != "default":
        return  # how the commands below print a store does not depend on the loop that wrote it

    # show --json: the same object as list.
    shown = run("messages", "show", helo["id"], "--json", "--data", str(server.data))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == helo

    # show: envelope summary, then the message as text.
    shown = run("messages", "show", ehlo_["id"], "--data", str(server.data))
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout.decode()
    assert "mail_from:   <carol@example.org>" in text
    assert "<dan@example.net>, <erin@example.net>" in text
    assert "sécure hello" in text
    assert "\nOver TLS.\n" in text
    assert "\r" not in text

    # list as a table, and --limit.
    table = run("messages", "list", "--data", str(server.data))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.decode().splitlines()
    assert lines[0].split()[:2] == ["ID", "RECEIVED"]
    assert len(lines) == 3
    assert any("plain hello" in line and "<alice@example.org>" in line for line in lines)
    assert len(list_json(server.data, "--limit", "1")) == 1


def test_maildir_store_json_logs_and_sigint(tmp_path: Path) -> None:
    with serving(tmp_path, "--store", "maildir", "--log-format", "json", "--no-tls") as server:
        send_helo(server)
        assert server.stop(signal.SIGINT) == 0
        log = server.stderr()
    assert (server.data / "maildir" / "new").is_dir()

    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    for record in records:
        assert {"ts", "level", "logger", "msg"} <= set(record)
    message = [r for r in records if r.get("event") == "message"]
    assert len(message) == 1
    assert message[0]["client_ip"] == "127.0.0.1"
    assert message[0]["outcome"] == "accepted"
    assert any(r.get("event") == "connect" and r.get("client_ip") for r in records)

    # The store is named explicitly, then found without --store.
    for args in (("--store", "maildir"), ()):
        listed = list_json(server.data, *args)
        assert len(listed) == 1
        assert listed[0]["greeting"] == "HELO"
        assert listed[0]["mail_from"] == "alice@example.org"
        assert listed[0]["subject"] == "plain hello"
        shown = run("messages", "show", listed[0]["id"], "--raw", "--data", str(server.data), *args)
        assert shown.returncode == 0, shown.stderr
        assert_stored_as_sent(shown.stdout, HELO_MESSAGE)


# --------------------------------------------------------------------------
# Graceful shutdown


def start_message(client: smtplib.SMTP, subject: str) -> None:
    """A transaction left in the middle of its DATA (the rest: b"second half\r\n.\r\n")."""
    assert client.ehlo("busy.client.test")[0] == 250
    assert client.mail("alice@example.org")[0] == 250
    assert client.rcpt("bob@example.net")[0] == 250
    assert client.docmd("DATA")[0] == 354
    client.send(b"Subject: %s\r\n\r\nfirst half\r\n" % subject.encode())


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_lets_data_finish_and_sends_421_to_idle_clients(
    tmp_path: Path, workers: str
) -> None:
    with serving(tmp_path, "--no-tls", "--workers", workers) as server:
        busy = server.smtp()
        idle = server.smtp()
        try:
            start_message(busy, "in flight")
            assert idle.ehlo("idle.client.test")[0] == 250

            server.proc.send_signal(signal.SIGTERM)
            code, text = idle.getreply()  # unsolicited, on SIGTERM
            assert code == 421, text

            # No new connections once stopping (every worker has let go of
            # the shared listener a moment after the signal).
            refused_by = time.monotonic() + 5
            while True:
                try:
                    socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
                except OSError:
                    break
                assert time.monotonic() < refused_by, "still accepting after SIGTERM"
                time.sleep(0.02)

            assert server.proc.poll() is None  # still finishing the transaction
            busy.send(b"second half\r\n.\r\n")
            code, text = busy.getreply()
            assert code == 250, text
            assert server.proc.wait(timeout=TIMEOUT) == 0
        finally:
            busy.close()
            idle.close()
    listed = list_json(server.data)
    assert [item["subject"] for item in listed] == ["in flight"]


def test_shutdown_timeout_from_config_closes_slow_transactions(tmp_path: Path) -> None:
    config = tmp_path / "ehlo.toml"
    config.write_text("shutdown_timeout = 0.3\ntls = false\n")
    with serving(tmp_path, "--config", str(config)) as server:
        slow = server.smtp()
        try:
            assert slow.ehlo("slow.client.test")[0] == 250
            assert slow.mail("alice@example.org")[0] == 250
            assert slow.rcpt("bob@example.net")[0] == 250
            assert slow.docmd("DATA")[0] == 354
            slow.send(b"Subject: never finished\r\n\r\n")
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            code, _text = slow.getreply()
            assert code == 421
            assert server.proc.wait(timeout=TIMEOUT) == 0
            assert time.monotonic() - started < 5
        finally:
            slow.close()
    assert list_json(server.data) == []


# --------------------------------------------------------------------------
# Errors: one line, the right exit status


def test_bad_config_key_exits_2_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "ehlo.toml"
    config.write_text("max_conection = 5\n")
    result = run("serve", "--config", str(config), "--data", str(tmp_path / "data"))
    assert result.returncode == 2
    assert result.stderr.decode() == (
        'ehlo: error: unknown config key "max_conection" (did you mean "max_connections"?)\n'
    )
    assert not (tmp_path / "data").exists()  # nothing started


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--max-recipients", "0"), "ehlo: error: --max-recipients: expected an integer >= 1"),
        (("--listen", "localhost"), "ehlo: error: --listen: expected HOST:PORT"),
        (("--hostname", "bad name"), "ehlo: error: --hostname: expected a host name"),
        (("--tls-cert", "c.pem"), "ehlo: error: --tls-cert: --tls-key must be given too"),
        (("--no-tls", "--tls-cert", "c", "--tls-key", "k"), "ehlo: error: --no-tls cannot"),
    ],
)
def test_bad_options_exit_2(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    result = run("serve", "--data", str(tmp_path / "data"), *args)
    assert result.returncode == 2
    assert one_line_error(result.stderr).startswith(expected)


def test_unknown_option_is_a_usage_error() -> None:
    result = run("serve", "--bogus")
    assert result.returncode == 2
    assert b"unrecognized arguments: --bogus" in result.stderr
    assert b"Traceback" not in result.stderr


def test_port_in_use_exits_1_with_one_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            "serve", "--listen", f"127.0.0.1:{port}", "--data", str(tmp_path / "d"), "--no-tls"
        )
    assert result.returncode == 1
    assert result.stderr.decode() == (
        f"ehlo: error: cannot listen on 127.0.0.1:{port}: address already in use\n"
    )


def test_missing_tls_files_exit_1(tmp_path: Path) -> None:
    result = run(
        "serve",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--data",
        str(tmp_path / "d"),
        "--tls-cert",
        str(tmp_path / "cert.pem"),
        "--tls-key",
        str(tmp_path / "key.pem"),
    )
    assert result.returncode == 1
    line = one_line_error(result.stderr)
    assert (
        line == f"ehlo: error: TLS certificate {tmp_path / 'cert.pem'}: No such file or directory"
    )


def test_messages_with_a_missing_data_folder(tmp_path: Path) -> None:
    result = run("messages", "list", "--data", str(tmp_path / "absent"))
    assert result.returncode == 1
    assert "does not exist" in one_line_error(result.stderr)
    assert not (tmp_path / "absent").exists()


def test_messages_on_an_empty_store(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    assert list_json(tmp_path / "data") == []
    result = run("messages", "list", "--data", str(tmp_path / "data"))
    assert result.returncode == 0
    assert result.stdout == b"no messages\n"
    result = run("messages", "show", "06H24STAB3WY3GF6", "--data", str(tmp_path / "data"))
    assert result.returncode == 1
    assert one_line_error(result.stderr) == "ehlo: error: no message with id '06H24STAB3WY3GF6'"


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.decode().strip() == f"ehlo {ehlo.__version__}"


def test_no_command_is_a_usage_error() -> None:
    result = run()
    assert result.returncode == 2
    assert b"Traceback" not in result.stderr


# --------------------------------------------------------------------------
# Log line formats (in process: what `serve --log-format` installs)


def test_text_log_format() -> None:
    import io
    import logging
    import re

    from ehlo.log import configure_logging

    stream = io.StringIO()
    handler = configure_logging("text", "info", stream=stream)
    try:
        logging.getLogger("ehlo.session").info("message %s accepted", "06H2", extra={"x": 1})
        logging.getLogger("ehlo.session").debug("hidden")
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(logging.WARNING)
    line = stream.getvalue()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO message 06H2 accepted\n", line
    ), line


def test_json_log_format_never_fails_on_odd_values() -> None:
    import io
    import logging

    from ehlo.log import JSONFormatter, configure_logging

    stream = io.StringIO()
    handler = configure_logging("json", "DEBUG", stream=stream)
    circular: dict[str, Any] = {}
    circular["self"] = circular
    try:
        log = logging.getLogger("ehlo.session")
        log.debug(
            "odd %s",
            "values",
            extra={"event": "x", "rcpt_to": ["a@b"], "obj": object(), "circ": circular},
        )
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(logging.WARNING)
    (first,) = (json.loads(line) for line in stream.getvalue().splitlines())
    # A format string that does not match its arguments still gives a line.
    bad = logging.makeLogRecord({"msg": "bad format %d", "args": ("not a number",)})
    second = json.loads(JSONFormatter().format(bad))
    assert first["level"] == "DEBUG"
    assert first["logger"] == "ehlo.session"
    assert first["msg"] == "odd values"
    assert first["event"] == "x"
    assert first["rcpt_to"] == ["a@b"]
    assert first["obj"].startswith("<object")
    assert isinstance(first["circ"], str)
    assert first["ts"].endswith("Z")
    assert "bad format" in second["msg"]


# --------------------------------------------------------------------------
# Several worker processes


@pytest.mark.parametrize("store", ["sqlite", "maildir"])
def test_workers_share_listener_and_store(tmp_path: Path, store: str) -> None:
    import concurrent.futures

    with serving(
        tmp_path, "--workers", "2", "--store", store, "--helo-policy", "off", "--log-format", "json"
    ) as server:

        def deliver(i: int) -> None:
            with server.smtp() as client:
                client.ehlo("worker.client.test")
                client.sendmail(
                    "a@example.org", [f"r{i}@example.net"], b"Subject: w%d\r\n\r\nx\r\n" % i
                )

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(deliver, range(40)))
        assert server.stop() == 0
        lines = [json.loads(line) for line in server.stderr().splitlines() if line.startswith("{")]
    ready = [line for line in lines if line.get("event") == "ready"]
    assert [line["workers"] for line in ready] == [2]  # the supervisor's line, once
    assert sum(line.get("event") == "message" for line in lines) == 40
    listed = list_json(server.data, "--store", store)
    assert sorted(item["subject"] for item in listed) == sorted(f"w{i}" for i in range(40))


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(field) for field in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_children(server: ServerProcess, count: int) -> list[int]:
    deadline = time.monotonic() + TIMEOUT
    while len(children := _children(server.proc.pid)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(children) == count
    return children


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fail after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def _no_signal_pending(pid: int) -> bool:
    """No signal waits for delivery to ``pid`` (or it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):  # gone before, or while, it was read
        return True
    fields = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    return int(fields["SigPnd"], 16) == 0 and int(fields["ShdPnd"], 16) == 0


def _writer_and_workers(server: ServerProcess) -> tuple[int, list[int]]:
    """The shared SQLite writer's pid and the two workers' of ``--workers 2``."""
    children = _wait_children(server, 3)
    writers = [pid for pid in children if "--hub" in _cmdline(pid)]
    assert len(writers) == 1
    return writers[0], [pid for pid in children if pid != writers[0]]


@pytest.mark.needs(Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    with serving(tmp_path, "--no-tls", "--workers", "2") as server:
        children = _wait_children(server, 3)  # two workers, their SQLite writer
        deadline = time.monotonic() + TIMEOUT
        with server.smtp() as client:  # a worker answers
            assert client.ehlo("c.test")[0] == 250
        server.proc.kill()  # SIGKILL: the supervisor cannot forward anything
        server.proc.wait(timeout=TIMEOUT)
        while any(map(_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, children)), "workers outlived the supervisor"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_sigterm_to_every_process_still_drains(tmp_path: Path) -> None:
    # A service manager (systemd's default KillMode) signals the supervisor
    # and each worker; the supervisor forwards its own. A worker must take
    # the pair as one stop, not as the second signal that cuts sessions off.
    # Workers log their stop at DEBUG (the supervisor's line is the INFO one).
    with serving(tmp_path, "--no-tls", "--workers", "2", "--log-level", "debug") as server:
        children = _wait_children(server, 3)  # two workers, their SQLite writer
        busy = server.smtp()
        try:
            start_message(busy, "drained")
            # The supervisor's SIGTERM first, forwarded to each worker; then
            # each worker's own, once the first is taken (signals sent at
            # once could merge into one delivery, and prove nothing).
            os.kill(server.proc.pid, signal.SIGTERM)
            _until(lambda: server.stderr().count("DEBUG SIGTERM received: stopping") == 2,
                   "each worker logged its stop")  # fmt: skip
            for pid in children:  # the idle worker may have stopped already
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            _until(lambda: all(map(_no_signal_pending, children)), "every signal was delivered")
            busy.send(b"second half\r\n.\r\n")
            code, text = busy.getreply()
            assert code == 250, text
            assert server.proc.wait(timeout=TIMEOUT) == 0
            log = server.stderr()
        finally:
            busy.close()
    assert "closing every connection now" not in log
    assert [item["subject"] for item in list_json(server.data)] == ["drained"]


@pytest.mark.needs(Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_workers_share_one_sqlite_writer_that_survives_a_dead_worker(tmp_path: Path) -> None:
    with serving(tmp_path, "--no-tls", "--workers", "2", "--helo-policy", "off") as server:
        writer, workers = _writer_and_workers(server)
        children = [writer, *workers]
        sleep_until_older_than(workers, 2.5)  # past the supervisor's crash-loop guard
        # A message half sent, its body already in a file...
        client = server.smtp()
        start_message(client, "never finished")
        client.send((b"y" * 78 + b"\r\n") * 8000)  # 640,000 octets: more than one chunk
        spool = server.data / "ehlo.sqlite3.bodies" / ".spool"
        _until(
            lambda: any(p.is_file() and p.suffix != ".lock" and p.stat().st_size >= 256 * 1024
                        for p in spool.rglob("*")),
            "the body is being written to its file",
        )  # fmt: skip
        for pid in workers:  # ...then every worker dies at once
            os.kill(pid, signal.SIGKILL)
        client.close()
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            fresh = [p for p in _children(server.proc.pid) if p not in children]
            if len(fresh) == 2:
                break
            time.sleep(0.05)
        assert len(fresh) == 2, "the supervisor did not restart its workers"
        server.wait_ready()
        with server.smtp() as after:  # the same writer takes the new workers' mail
            after.ehlo("after.client.test")
            after.sendmail("a@example.org", ["b@example.net"], b"Subject: after\r\n\r\nz\r\n")
        assert _children(server.proc.pid).count(writer) == 1
        db = sqlite3.connect(server.data / "ehlo.sqlite3")
        try:
            leftovers = db.execute(
                "SELECT (SELECT count(*) FROM chunks c WHERE NOT EXISTS"
                " (SELECT 1 FROM messages m WHERE m.queue_id = c.queue_id)),"
                " (SELECT count(*) FROM pending)"
            ).fetchone()
        finally:
            db.close()
        assert leftovers == (0, 0)
        # The dead worker's spool folder went with the body in it; the two
        # new workers' folders are there, empty.
        spool = server.data / "ehlo.sqlite3.bodies" / ".spool"
        assert (spool.parent.stat().st_mode & 0o777) == 0o700  # made by the shared writer
        assert [p for p in spool.rglob("*") if p.is_file() and p.suffix != ".lock"] == []
        assert len([p for p in spool.iterdir() if p.is_dir()]) == 2
        assert server.stop() == 0
    assert [item["subject"] for item in list_json(server.data)] == ["after"]


def test_workers_report_an_unusable_database_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "ehlo.sqlite3").write_bytes(b"not an SQLite file at all " * 200)
    result = run(
        "serve",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--data",
        str(data),
        "--workers",
        "2",
        "--no-tls",
    )
    assert result.returncode == 1
    assert "not a database" in one_line_error(result.stderr)


@pytest.mark.needs(Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_sqlite_writer_thread_starts_no_writer_process(tmp_path: Path) -> None:
    config = tmp_path / "ehlo.toml"
    config.write_text('sqlite_writer = "thread"\ntls = false\n')
    with serving(tmp_path, "--config", str(config), "--workers", "2") as server:
        children = _wait_children(server, 2)
        # A message stored first: whatever writes it has started by then.
        server.wait_ready()
        with server.smtp() as client:
            client.ehlo("c.test")
            client.sendmail("a@example.org", ["b@example.net"], b"Subject: threads\r\n\r\nx\r\n")
        assert sorted(_children(server.proc.pid)) == sorted(children)
        for pid in children:
            assert _children(pid) == []  # nor one under a worker
            assert "_sqlite_process" not in _cmdline(pid)
        assert server.stop() == 0
    assert [item["subject"] for item in list_json(server.data)] == ["threads"]


FAULTS = """
import random, resource, sys
from ehlo.server.workers import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else None
text = (b"x" * 78 + b"\\r\\n") * 3300
rng = random.Random(1)
live = []
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):  # as the DATA reader goes: a read, a block taken, checked, kept a while
    data = bytearray(text[: rng.randrange(200_000, 262_144)])
    block = bytes(data)
    block.replace(b"\\r", b"").replace(b"\\n", b"\\r\\n") == block
    live = [*live[-1:], block]
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_keep_freed_memory_stops_page_faults_on_every_block() -> None:
    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1])

    tuned, with_tuning = faults("tuned")
    _, without = faults("default")
    assert tuned == "True"
    # Without: fresh pages for most blocks (64 per 256 KiB). With: reused.
    assert without > 200 * 32
    assert with_tuning < 200 * 8


@pytest.mark.needs(Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_dead_shared_writer_is_replaced_and_the_workers_restarted(tmp_path: Path) -> None:
    with serving(tmp_path, "--no-tls", "--workers", "2", "--helo-policy", "off") as server:
        writer, workers = _writer_and_workers(server)
        children = [writer, *workers]
        with server.smtp() as client:
            client.sendmail("a@example.org", ["b@example.net"], b"Subject: before\r\n\r\nx\r\n")
        sleep_until_older_than([writer], 3.2)  # past the crash-loop guard (see the next test)
        os.kill(writer, signal.SIGKILL)
        # Until the new writer and workers are up, mail gets a 4xx or no
        # connection; then it is taken again.
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                with server.smtp() as client:
                    client.sendmail(
                        "a@example.org", ["b@example.net"], b"Subject: after\r\n\r\ny\r\n"
                    )
                break
            except (smtplib.SMTPException, OSError):
                assert time.monotonic() < deadline, server.stderr()
                time.sleep(0.1)
        now = _children(server.proc.pid)
        assert len(now) == 3 and not set(now) & set(children), "writer and workers not replaced"
        assert "the SQLite writer process" in server.stderr()
        assert server.stop() == 0
    assert sorted(item["subject"] for item in list_json(server.data)) == ["after", "before"]


@pytest.mark.needs(Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_shared_writer_dying_right_after_its_start_stops_the_server(tmp_path: Path) -> None:
    with serving(tmp_path, "--no-tls", "--workers", "2") as server:
        writer, _ = _writer_and_workers(server)
        os.kill(writer, signal.SIGKILL)  # within its first seconds: a crash loop
        assert server.proc.wait(TIMEOUT) == 1
        assert "within 3 s of its start: stopping" in server.stderr()
