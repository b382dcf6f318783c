"""End to end with the tools people point at mail servers: swaks, openssl, Postfix.

Each test runs twice: against an in-process server on asyncio's loop (the
``threaded_server`` fixture) and against ``python -m ehlo serve`` as a child
process (uvloop, as deployed). Missing tools skip the test on a developer's
machine and fail it under CI (``CI`` set): ``make test-deps`` installs them.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ehlo.storage import Store, StoredMessage, open_store

from .helpers import SERVE_WITHOUT_DNS, ThreadedServer, free_port, tool, wait_for_banner
from .trace import split_trace

pytestmark = [pytest.mark.external, pytest.mark.timeout(60)]

TOOL_TIMEOUT = 30.0
QUEUED = re.compile(r"queued as ([0-9A-Za-z]+)")


@dataclass
class Target:
    """A running server: where to connect and its store (for reading)."""

    host: str
    port: int
    store: Store


@pytest.fixture(params=["asyncio-thread", "uvloop-cli"])
def target(
    request: pytest.FixtureRequest,
    threaded_server: Callable[..., ThreadedServer],
    tmp_path: Path,
) -> Iterator[Target]:
    if request.param == "asyncio-thread":
        srv = threaded_server(reverse_dns=False)
        assert srv.server is not None
        yield Target(srv.host, srv.port, srv.server.store)
        return
    data = tmp_path / "cli-data"
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ehlo",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--data",
                str(data),
                *SERVE_WITHOUT_DNS,
            ],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            cwd=tmp_path,
        )
    try:
        wait_for_banner(port, proc, log)
        yield Target("127.0.0.1", port, open_store("sqlite", data))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def run(
    args: list[str], stdin: bytes | None = None, timeout: float = TOOL_TIMEOUT
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        args,
        input=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        check=False,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def split_received(raw: bytes) -> tuple[str, bytes]:
    """The Received header (as text) and the message after the trace headers."""
    fields, message = split_trace(raw)
    return fields[0].decode() + "\r\n", message


def message(target: Target, queue_id: str) -> tuple[StoredMessage, str, bytes]:
    stored = target.store.get(queue_id)
    assert stored is not None, queue_id
    raw = target.store.raw(queue_id)
    assert raw is not None
    header, body = split_received(raw)
    return stored, header, body


# ------------------------------------------------------------------------ swaks


@dataclass
class Transcript:
    """A swaks run: what each side said, in order."""

    lines: list[tuple[str, str]]  # (direction, text): "S" server, "C" client, "=" info
    output: str
    returncode: int

    def replies(self) -> list[tuple[int, list[str]]]:
        out: list[tuple[int, list[str]]] = []
        current: list[str] = []
        for who, text in self.lines:
            if who != "S":
                continue
            current.append(text)
            if text[3:4] != "-":
                out.append((int(text[:3]), [line[4:] for line in current]))
                current = []
        return out

    def client(self) -> list[str]:
        return [text for who, text in self.lines if who == "C"]

    def queue_id(self) -> str:
        found = QUEUED.findall(self.output)
        assert len(found) == 1, self.output
        return str(found[0])


_SWAKS_LINE = re.compile(r"^(<-|<~|<\*\*|<~\*|->|~>|\*\*>|\*~>|===|\*\*\*)\s(.*)$")


def swaks(target: Target, *args: str) -> Transcript:
    proc = run(
        [
            tool("swaks"),
            "--server",
            target.host,
            "--port",
            str(target.port),
            "--timeout",
            "20",
            *args,
        ]
    )
    output = proc.stdout.decode("utf-8", "replace")
    lines: list[tuple[str, str]] = []
    for raw in output.splitlines():
        found = _SWAKS_LINE.match(raw.strip())
        if not found:
            continue
        mark, text = found.groups()
        text = text.lstrip(" ").rstrip("\r")
        who = "S" if mark.startswith("<") else "C" if mark.endswith(">") else "="
        lines.append((who, text))
    return Transcript(lines, output, proc.returncode)


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


# swaks turns LF into CRLF and ends the data with CRLF "." CRLF.
SWAKS_DATA = (
    "Subject: swaks test\nFrom: a@example.org\n\nFirst line\n.starts with a dot\n..two\nlast"
)


def write_data(tmp_path: Path, text: str = SWAKS_DATA) -> Path:
    path = tmp_path / "swaks-data.txt"
    path.write_bytes(text.encode())
    return path


def test_swaks_plain_delivery(target: Target, tmp_path: Path) -> None:
    t = swaks(
        target,
        *envelope_args(tmp_path),
    )
    assert t.returncode == 0, t.output
    codes = [code for code, _ in t.replies()]
    assert codes == [220, 250, 250, 250, 354, 250, 221], t.output
    ehlo = t.replies()[1][1]
    assert "STARTTLS" in ehlo and "PIPELINING" in ehlo
    # swaks greets with its own idea of the host name; the envelope keeps it.
    [greeting] = [c for c in t.client() if c.startswith("EHLO ")]
    qid = t.queue_id()
    stored, header, body = message(target, qid)
    assert body == crlf(SWAKS_DATA) + b"\r\n"
    env = stored.envelope
    assert (env.greeting, env.greeting_name) == ("EHLO", greeting[5:])
    assert (env.mail_from, env.rcpt_to, env.client_ip) == (
        "a@example.org",
        ["b@example.net"],
        "127.0.0.1",
    )
    assert env.tls is None and env.protocol == "ESMTP"
    assert f"with ESMTP id {qid}" in header
    assert stored.subject == "swaks test"


def envelope_args(tmp_path: Path) -> list[str]:
    """swaks options for the usual sender, recipient and message file."""
    data = f"@{write_data(tmp_path)}"
    return ["--from", "a@example.org", "--to", "b@example.net", "--data", data]


def test_swaks_helo_name_in_envelope(target: Target, tmp_path: Path) -> None:
    t = swaks(
        target,
        "--helo",
        "helo-name.test.example",
        *envelope_args(tmp_path),
    )
    assert t.returncode == 0, t.output
    assert "EHLO helo-name.test.example" in t.client()
    stored, header, _ = message(target, t.queue_id())
    assert stored.envelope.greeting_name == "helo-name.test.example"
    assert header.startswith("Received: from helo-name.test.example (")
    # And with plain SMTP: HELO.
    t = swaks(
        target,
        "--protocol",
        "SMTP",
        "--helo",
        "old.example",
        *envelope_args(tmp_path),
    )
    assert t.returncode == 0, t.output
    assert "HELO old.example" in t.client()
    stored, header, body = message(target, t.queue_id())
    assert (stored.envelope.greeting, stored.envelope.greeting_name) == ("HELO", "old.example")
    assert stored.envelope.protocol == "SMTP"
    assert body == crlf(SWAKS_DATA) + b"\r\n"


def test_swaks_starttls(target: Target, tmp_path: Path) -> None:
    t = swaks(
        target,
        "--tls",
        "--helo",
        "tls.example",
        *envelope_args(tmp_path),
    )
    assert t.returncode == 0, t.output
    assert "TLS started with cipher" in t.output
    replies = t.replies()
    assert [code for code, _ in replies] == [220, 250, 220, 250, 250, 250, 354, 250, 221]
    before, after = replies[1][1], replies[3][1]
    assert "STARTTLS" in before and "STARTTLS" not in after
    # Everything after the handshake is shown as encrypted ("<~").
    assert re.search(r"^<~\s+250 2\.0\.0 OK: queued as ", t.output, re.M), t.output
    stored, header, body = message(target, t.queue_id())
    env = stored.envelope
    assert env.tls is not None and env.tls["version"] in ("TLSv1.2", "TLSv1.3")
    assert env.tls["cipher"] in t.output
    assert env.protocol == "ESMTPS"
    assert f"with ESMTPS id {env.queue_id}" in header
    assert f"(using {env.tls['version']} with cipher {env.tls['cipher']})" in header
    assert body == crlf(SWAKS_DATA) + b"\r\n"


def test_swaks_pipeline(target: Target, tmp_path: Path) -> None:
    rcpts = ["r1@example.net", "r2@example.net", "r3@example.net"]
    t = swaks(
        target,
        "--pipeline",
        "--helo",
        "pipe.example",
        "--from",
        "a@example.org",
        "--to",
        ",".join(rcpts),
        "--data",
        f"@{write_data(tmp_path)}",
    )
    assert t.returncode == 0, t.output
    # MAIL, every RCPT and DATA went out before the first of their replies.
    order = [(who, text.split(" ")[0]) for who, text in t.lines if who in "CS"]
    mail = order.index(("C", "MAIL"))
    assert [w for w, _ in order[mail : mail + 5]] == ["C"] * 5, order
    assert [v for _, v in order[mail : mail + 5]] == ["MAIL", "RCPT", "RCPT", "RCPT", "DATA"]
    codes = [code for code, _ in t.replies()]
    assert codes == [220, 250, 250, 250, 250, 250, 354, 250, 221], t.output
    stored, _, body = message(target, t.queue_id())
    assert stored.envelope.rcpt_to == rcpts
    assert body == crlf(SWAKS_DATA) + b"\r\n"


def test_swaks_quit_after_rcpt(target: Target) -> None:
    t = swaks(
        target,
        "--quit-after",
        "RCPT",
        "--helo",
        "q.example",
        "--from",
        "a@example.org",
        "--to",
        "b@example.net",
    )
    assert t.returncode == 0, t.output
    assert [code for code, _ in t.replies()] == [220, 250, 250, 250, 221], t.output
    assert not any(c.startswith("DATA") for c in t.client())
    assert target.store.list() == []


def test_swaks_refused_recipient_syntax(target: Target) -> None:
    # A reply swaks does not expect is reported with "<**" and a non-zero exit.
    t = swaks(target, "--helo", "q.example", "--from", "a@example.org", "--to", "not an address")
    assert t.returncode != 0
    assert re.search(r"^<\*\*\s+50[01] ", t.output, re.M), t.output
    assert target.store.list() == []


# ---------------------------------------------------------------------- openssl


def test_openssl_s_client_starttls(target: Target) -> None:
    body = b"Subject: s_client\r\n\r\nover openssl\r\n.dot\r\n"
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    script = (
        b"EHLO ossl.example\r\nMAIL FROM:<o@example.org>\r\nRCPT TO:<r@example.net>\r\n"
        b"DATA\r\n" + stuffed + b".\r\nQUIT\r\n"
    )
    # Everything is written at once, the way `printf ... | openssl s_client` does:
    # s_client sends it right after the handshake. Several runs, since that
    # used to lose the EHLO depending on timing.
    for _ in range(3):
        proc = run(
            [
                tool("openssl"),
                "s_client",
                "-starttls",
                "smtp",
                "-connect",
                f"{target.host}:{target.port}",
                "-quiet",
            ],
            stdin=script,
            timeout=20,
        )
        output = proc.stdout.decode("utf-8", "replace")
        assert proc.returncode == 0, output
        replies = [line for line in output.splitlines() if re.match(r"^\d{3}[ -]", line)]
        codes = [line[:4] for line in replies if line[3] == " "]
        assert codes[-5:] == ["250 ", "250 ", "250 ", "354 ", "221 "] or codes[-6:] == [
            "250 ",
            "250 ",
            "250 ",
            "354 ",
            "250 ",
            "221 ",
        ], output
        assert not any("STARTTLS" in line for line in replies[-16:]), output
        found = QUEUED.findall(output)
        assert len(found) == 1, output
        stored, header, stored_body = message(target, found[0])
        assert stored_body == body
        env = stored.envelope
        assert (env.greeting, env.greeting_name) == ("EHLO", "ossl.example")
        assert (env.mail_from, env.rcpt_to) == ("o@example.org", ["r@example.net"])
        assert env.tls is not None and env.protocol == "ESMTPS"
        assert f"with ESMTPS id {env.queue_id}" in header
    assert len(target.store.list()) == 3


# ---------------------------------------------------------------------- postfix


def test_smtp_source_50_messages(target: Target) -> None:
    proc = run(
        [
            tool("smtp-source"),
            "-s",
            "5",
            "-m",
            "50",
            "-l",
            "2048",
            "-M",
            "source.example",
            "-f",
            "from@example.org",
            "-t",
            "to@example.net",
            f"{target.host}:{target.port}",
        ],
        timeout=40,
    )
    assert proc.returncode == 0, proc.stdout
    listed = target.store.list()
    assert len(listed) == 50
    assert len({m.envelope.queue_id for m in listed}) == 50
    for stored in listed:
        env = stored.envelope
        assert (env.greeting, env.greeting_name, env.protocol) == ("HELO", "source.example", "SMTP")
        assert (env.mail_from, env.rcpt_to) == ("from@example.org", ["to@example.net"])
        raw = target.store.raw(env.queue_id)
        assert raw is not None and stored.size == len(raw)
        _, message_bytes = split_received(raw)
        head, _, payload = message_bytes.partition(b"\r\n\r\n")
        assert b"From: <from@example.org>" in head
        # -l 2048: 2048 octets of payload, as CRLF lines, and a final CRLF.
        assert len(payload) in (2048, 2050), len(payload)
        assert re.fullmatch(rb"(?:[0-9]*X*\r\n)+", payload), payload[:200]


def test_smtp_source_file_one_connection(target: Target, tmp_path: Path) -> None:
    # -F: the file's lines, each with CRLF appended and leading dots doubled,
    # and then CRLF "." CRLF (so one empty line more: checked against a plain
    # socket recorder); -d: all messages over one connection; -r: recipients
    # per message.
    lines = ["Subject: from a file", "", ".leading dot", "..two dots", "plain", "."]
    path = tmp_path / "message.txt"
    path.write_text("\n".join(lines) + "\n")
    proc = run(
        [
            tool("smtp-source"),
            "-d",
            "-m",
            "4",
            "-r",
            "3",
            "-F",
            str(path),
            "-M",
            "file.example",
            "-f",
            "from@example.org",
            "-t",
            "to@example.net",
            f"{target.host}:{target.port}",
        ],
        timeout=40,
    )
    assert proc.returncode == 0, proc.stdout
    listed = target.store.list()
    assert len(listed) == 4
    expected = "".join(line + "\r\n" for line in lines).encode() + b"\r\n"
    ports = set()
    for stored in listed:
        raw = target.store.raw(stored.envelope.queue_id)
        assert raw is not None
        assert split_received(raw)[1] == expected
        assert len(stored.envelope.rcpt_to) == 3
        ports.add(stored.envelope.client_port)
    assert len(ports) == 1
