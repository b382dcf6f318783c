"""Several ``ehlo serve`` nodes on one store, and the clients that load them.

- :class:`Node`: ``ehlo serve --workers 2`` in a process group of its own
  (SIGKILL of the group kills the supervisor and its workers at once, as a
  dead machine would), with two listeners: one with the PROXY protocol, for
  HAProxy in front, and a plain one, for a client that must reach this
  very node. Its own data folder, configuration file and log file. It
  counts as started once every worker has logged its own "ready" line
  (the nodes log at DEBUG for it): a worker still starting needs the
  database, which a test may be about to take away.
- :class:`Load`: many clients (threads, smtplib) sending tagged messages
  through one address, several messages per connection, from a chosen
  loopback source address; every message's outcome is kept (the code of
  the reply to its data, or none when the connection was lost first), and
  a lost or refused connection is opened again, so that the load goes on
  across a node's death or the database's absence.
- :func:`message`: a message whose subject, Message-ID and ``X-Seq`` field
  name it (a counting sink reads ``X-Seq``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .helpers import SERVE_WITHOUT_DNS, child_pids, free_port, greets, wait_until

__all__ = ["Load", "Node", "Outcome", "message"]

# A worker's "ready" line (logged at DEBUG): its number.
_WORKER_READY = re.compile(r" ready on .*, worker (\d+), store: ")
START_TIMEOUT = 60.0  # seconds a node may take to greet (a loaded machine)
STOP_TIMEOUT = 30.0
# Seconds one SMTP reply may take: a commit waits for a database that may be
# restarting (the server answers 451 within its own timeouts, shorter).
REPLY_TIMEOUT = 60.0


def message(tag: str, seq: int, rcpt: str) -> bytes:
    """A small message named by ``tag`` (subject, Message-ID) and ``seq`` (X-Seq)."""
    return (
        f"From: <load@client.test>\r\nTo: <{rcpt}>\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag.replace(' ', '.')}@client.test>\r\nX-Seq: {seq}\r\n"
        f"\r\nMessage {seq}, {tag}.\r\n"
    ).encode()


class Node:
    """One ``ehlo serve`` node: its process group, listeners, data folder and log."""

    def __init__(
        self,
        name: str,
        folder: Path,
        store: Sequence[str],
        *,
        config: str = "",
        args: Sequence[str] = (),
        http: bool = False,
        workers: int = 2,
    ) -> None:
        self.name = name
        self.hostname = f"{name}.cluster.test"  # its banner's, Received's and EHLO's name
        self.data = folder / name
        self.port = free_port()  # the PROXY protocol listener, behind HAProxy
        self.direct_port = free_port()  # a plain listener, straight to this node
        self.http_port = free_port() if http else None
        self.log = folder / f"{name}.log"
        self.config = folder / f"{name}.toml"
        self.config.write_text(config)
        http_args = ["--http", f"127.0.0.1:{self.http_port}"] if self.http_port else []
        self.argv = [
            sys.executable, "-m", "ehlo", "serve",
            "--listen", f"127.0.0.1:{self.port},proxy",
            "--listen", f"127.0.0.1:{self.direct_port}",
            "--data", str(self.data), *store, "--config", str(self.config),
            "--hostname", self.hostname, "--workers", str(workers),
            # DEBUG: each worker logs its own "ready" line once it has started.
            "--log-level", "DEBUG", *SERVE_WITHOUT_DNS, *http_args, *args,
        ]  # fmt: skip
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The PROXY protocol listener (HAProxy's backend)."""
        return ("127.0.0.1", self.port)

    def start(self) -> Node:
        """Start the process (without waiting: see :meth:`wait_ready`)."""
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=self.log.parent,
                start_new_session=True,  # its own process group: the workers too
            )
        return self

    def wait_ready(self) -> None:
        """Wait until every worker has started (its store open, its scheduler and web UI
        running) and the node greets on its plain listener."""
        proc = self.proc
        assert proc is not None

        def ready() -> bool:
            assert proc.poll() is None, f"node {self.name} exited: {self.log_text()}"
            started = {int(n) for n in _WORKER_READY.findall(self.log_text())}
            if started != set(range(self.workers)):
                return False
            return greets(self.direct_port) and (self.http_port is None or _accepts(self.http_port))

        wait_until(ready, f"node {self.name} to greet: {self.log}", START_TIMEOUT, poll=0.1)

    def pids(self) -> set[int]:
        """The supervisor and every process under it (workers, helpers)."""
        assert self.proc is not None
        found: set[int] = set()
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.add(pid)
            with contextlib.suppress(OSError):
                todo.extend(child_pids(pid))
        return found

    def kill(self) -> None:
        """SIGKILL to the whole process group: no shutdown code runs anywhere."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT)

    def stop(self) -> int:
        """SIGTERM (a graceful stop); the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(STOP_TIMEOUT)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class Outcome:
    """What the client saw for one message."""

    tag: str
    seq: int
    code: int | None  # the reply to its data (or to MAIL/RCPT); None: connection lost
    text: str
    at: float  # time.monotonic() when it was seen


class Load:
    """``clients`` threads sending ``items`` ((tag, seq) pairs) through ``host:port``.

    Each client takes its share of the items in order, ``per_connection``
    messages on one connection (then QUIT and a new one). A connection lost
    or refused is opened again, after a short pause (for at most
    ``give_up`` seconds in a row); the message being sent then counts as
    not acknowledged (code None). ``rcpt(seq)`` is each message's recipient.
    """

    def __init__(
        self,
        host: str,
        port: int,
        items: Sequence[tuple[str, int]],
        *,
        rcpt: Callable[[int], str],
        clients: int = 20,
        per_connection: int = 25,
        source: str = "127.0.0.2",
        pause: float = 0.0,
        give_up: float = 60.0,
    ) -> None:
        self.host, self.port = host, port
        self.rcpt = rcpt
        self.source = source
        self.per_connection = per_connection
        self.pause = pause
        self.give_up = give_up
        self.shares = [list(items[i::clients]) for i in range(clients)]
        self.outcomes: list[Outcome] = []
        self.errors: list[str] = []  # connections lost or refused, as the clients saw them
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(share,), daemon=True)
            for share in self.shares
            if share
        ]
        self.started = 0.0
        self.elapsed = 0.0

    def start(self) -> Load:
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Let each client finish the message it is sending, then quit."""
        self._stop.set()

    def wait(self, timeout: float = 300.0) -> list[Outcome]:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            assert not thread.is_alive(), f"the clients did not finish in {timeout:g} s"
        self.elapsed = time.monotonic() - self.started
        return self.outcomes

    def acknowledged(self) -> int:
        """Messages that got a 250 so far."""
        with self._lock:
            return sum(1 for o in self.outcomes if o.code == 250)

    def codes(self) -> Counter[int | None]:
        """How many messages got each reply code so far (None: connection lost)."""
        with self._lock:
            return Counter(o.code for o in self.outcomes)

    def _note(self, tag: str, seq: int, code: int | None, text: bytes | str) -> None:
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        with self._lock:
            self.outcomes.append(Outcome(tag, seq, code, text, time.monotonic()))

    def _connect(self) -> smtplib.SMTP:
        """A new connection that greeted with 220 (refused ones are tried again)."""
        deadline = time.monotonic() + self.give_up
        while True:
            try:
                client = smtplib.SMTP(
                    self.host, self.port, local_hostname="load.client.test",
                    timeout=REPLY_TIMEOUT, source_address=(self.source, 0),
                )  # fmt: skip
                client.ehlo("load.client.test")
                return client
            except (OSError, smtplib.SMTPException) as exc:
                with self._lock:
                    self.errors.append(f"connect: {exc!r}")
                assert time.monotonic() < deadline, f"no connection for {self.give_up:g} s: {exc!r}"
                time.sleep(0.1)

    def _client(self, share: list[tuple[str, int]]) -> None:
        client: smtplib.SMTP | None = None
        sent = 0
        try:
            for tag, seq in share:
                if self._stop.is_set():
                    break
                if client is None or sent >= self.per_connection:
                    if client is not None:
                        with contextlib.suppress(OSError, smtplib.SMTPException):
                            client.quit()
                    client, sent = self._connect(), 0
                sent += 1
                try:
                    self._send(client, tag, seq)
                except (OSError, smtplib.SMTPException) as exc:
                    # Lost (a node killed, a reply that never came): not acknowledged.
                    self._note(tag, seq, None, repr(exc))
                    with self._lock:
                        self.errors.append(f"{tag}: {exc!r}")
                    with contextlib.suppress(OSError):
                        client.close()
                    client = None
                if self.pause:
                    time.sleep(self.pause)
        finally:
            if client is not None:
                with contextlib.suppress(OSError, smtplib.SMTPException):
                    client.quit()

    def _send(self, client: smtplib.SMTP, tag: str, seq: int) -> None:
        try:
            code, text = client.mail("load@client.test")
            if code == 250:
                code, text = client.rcpt(self.rcpt(seq))
                if code == 250:
                    code, text = client.data(message(tag, seq, self.rcpt(seq)))
        except smtplib.SMTPResponseException as exc:  # DATA refused: no 354
            code, text = exc.smtp_code, exc.smtp_error
        if code != 250:
            with contextlib.suppress(smtplib.SMTPException):
                client.rset()
        if code == 421:  # the server is closing this connection
            raise smtplib.SMTPServerDisconnected(f"421 {text.decode(errors='replace')}")
        self._note(tag, seq, code, text)
