"""``ehlo send`` and ``ehlo probe`` as a user runs them: child processes, real servers.

The commands run through ``ehlo.client.cli.main`` (the same parser that
``add_client_commands`` puts into ``ehlo``), against ehlo's server in a
thread, aiosmtpd (AUTH) and smtp-sink (no ESMTP). Checked: exit codes per
failure class, one ``ehlo: error:`` line and never a traceback, the
transcript with secrets redacted, the message built from options, stdin and
attachments, and the probe report in text and JSON.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ehlo import Verdict

from .helpers import ThreadedServer, free_port
from .test_client_e2e import (
    Pki,
    Recorder,
    Sink,
    after_received,
    aiosmtpd_server,
    authenticator,
    make_pki,
    run_cli,
    smtp_sink,  # noqa: F401 - a fixture
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


ERROR_LINE = re.compile(r"ehlo( send| probe)?: error: ")


def only_error_line(stderr: str) -> str:
    """The one ``ehlo: error:`` line (argparse says ``ehlo send: error:``); no traceback."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1, stderr
    return lines[0]


def stored(srv: ThreadedServer) -> list[tuple[Any, bytes]]:
    assert srv.server is not None
    store = srv.server.store
    out = []
    for message in store.list():
        raw = store.raw(message.envelope.queue_id)
        assert raw is not None
        out.append((message.envelope, after_received(raw)))
    return out


def target(srv: ThreadedServer) -> str:
    return f"127.0.0.1:{srv.port}"


# ------------------------------------------------------------------ usage


def test_help_documents_exit_codes() -> None:
    proc = run_cli("send", "--help")
    assert proc.returncode == 0
    for line in ("exit status:", "  3  connection", "  4  TLS", "  5  AUTH",
                 "  6  sender refused", "  7  recipients refused", "  8  message refused",
                 "  9  no route"):
        assert line in proc.stdout, line
    for option in ("--from", "--to", "--server", "--helo-only", "--tls", "--auth", "--header",
                   "--subject", "--body", "--attach", "--no-pipelining", "--bdat", "--no-bdat",
                   "--source-ip", "--transcript", "--dns-server", "--insecure"):
        assert option in proc.stdout, option


def test_usage_errors_are_one_line() -> None:
    proc = run_cli("send", "--from", "a@example.org")
    assert proc.returncode == 2
    assert only_error_line(proc.stderr).endswith("the following arguments are required: --to")
    proc = run_cli("send", "--from", "a@example.org", "--to", "not an address", "--server", "x")
    assert proc.returncode == 2
    assert "--to 'not an address'" in only_error_line(proc.stderr)
    proc = run_cli("probe", "[::1")
    assert proc.returncode == 2 and "expected [IPv6]:PORT" in only_error_line(proc.stderr)


# ------------------------------------------------------------------- send


def test_send_transcript_over_verified_starttls(
    threaded_server: Callable[..., ThreadedServer], pki: Pki
) -> None:
    srv = threaded_server(reverse_dns=False, tls_cert=pki.cert_file, tls_key=pki.key_file)
    proc = run_cli(
        "send", "--from", "alice@example.org", "--to", "bob@example.net",
        "--server", f"localhost:{srv.port}", "--helo", "client.example",
        "--cafile", str(pki.ca_file), "--subject", "Transcript test", "--transcript",
        "--tls", "verify",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"=== Trying localhost:{srv.port}..." in out
    assert "<-  220 " in out and " -> EHLO client.example" in out and " -> STARTTLS" in out
    assert "=== TLS started: TLSv1." in out and "(verified)" in out
    assert " ~> EHLO client.example" in out and " ~> MAIL FROM:<alice@example.org> SIZE=" in out
    assert " ~> BDAT " in out and "<~  250 2.0.0 OK: queued as" in out
    assert f"delivered <bob@example.net> via localhost:{srv.port}: 250 2.0.0" in out
    [(envelope, message)] = stored(srv)
    assert envelope.tls is not None and envelope.greeting_name == "client.example"
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert parsed["Subject"] == "Transcript test"
    assert parsed["From"] == "alice@example.org" and parsed["To"] == "bob@example.net"
    assert parsed["Message-ID"].endswith("@example.org>")
    assert parsed.get_content() == "This is a test message sent by ehlo send.\r\n"


def test_send_builds_the_message_from_options(
    threaded_server: Callable[..., ThreadedServer], tmp_path: Path
) -> None:
    srv = threaded_server(reverse_dns=False, tls=False)
    attachment = tmp_path / "données.bin"
    attachment.write_bytes(bytes(range(256)) * 40)
    body = "Grüße\n.a line starting with a dot\nend\n".encode()
    proc = run_cli(
        "send", "--from", "a@example.org", "--to", "b@example.net", "--to", "c@example.net",
        "--server", target(srv), "--subject", "Grüße aus Köln", "--header", "X-Test: yes",
        "--header", "Subject: replaced", "--body", "-", "--attach", str(attachment),
        "--no-bdat", "--transcript", "--source-ip", "127.0.0.5", stdin=body,
    )
    assert proc.returncode == 0, proc.stderr
    assert " -> DATA" in proc.stdout and "BODY=8BITMIME" in proc.stdout
    [(envelope, message)] = stored(srv)
    assert envelope.rcpt_to == ["b@example.net", "c@example.net"]
    assert envelope.client_ip == "127.0.0.5"
    assert envelope.mail_params.get("BODY") == "8BITMIME"
    declared = int(envelope.mail_params["SIZE"])
    assert abs(declared - len(message)) < 64  # SIZE declared before sending, an estimate
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert parsed["Subject"] == "replaced" and parsed["X-Test"] == "yes"
    text, attached = parsed.iter_parts()
    assert text.get_content() == body.decode().replace("\n", "\r\n")
    assert attached.get_filename() == "données.bin"
    assert attached.get_content() == attachment.read_bytes()


def test_send_subject_is_encoded(threaded_server: Callable[..., ThreadedServer]) -> None:
    srv = threaded_server(reverse_dns=False, tls=False, smtputf8=False, eightbitmime=False)
    proc = run_cli("send", "--from", "a@example.org", "--to", "b@example.net",
                   "--server", target(srv), "--subject", "Grüße", "--helo-only", "--transcript")
    assert proc.returncode == 0, proc.stderr
    assert " -> HELO " in proc.stdout and " -> EHLO" not in proc.stdout
    assert " -> MAIL FROM:<a@example.org>\n" in proc.stdout  # no parameters after HELO
    [(envelope, message)] = stored(srv)
    assert envelope.greeting == "HELO"
    assert b"Subject: =?utf-8?" in message and message.isascii()


def test_send_many_recipients_with_data_folds_the_to_header(
    threaded_server: Callable[..., ThreadedServer],
) -> None:
    # 60 recipients made a 1,382-octet To: line; ehlo's server refused it with DATA.
    srv = threaded_server(reverse_dns=False, tls=False)
    rcpts = [f"recipient-{i:02d}@example.net" for i in range(60)]
    to = [arg for rcpt in rcpts for arg in ("--to", rcpt)]
    proc = run_cli("send", "--from", "a@example.org", *to, "--server", target(srv),
                   "--no-bdat", "--subject", "Sixty", "--transcript")
    assert proc.returncode == 0, proc.stderr
    assert " -> DATA" in proc.stdout and " -> BDAT" not in proc.stdout
    [(envelope, message)] = stored(srv)
    assert envelope.rcpt_to == rcpts
    head = message[: message.index(b"\r\n\r\n")]
    lines = head.split(b"\r\n")
    # RFC 5322 section 2.1.1: at most 998 octets, and 78 where the field can fold.
    assert all(len(line) <= 78 for line in lines), max(lines, key=len)
    to_lines = [i for i, line in enumerate(lines) if line.lower().startswith(b"to:")]
    assert len(to_lines) == 1
    assert lines[to_lines[0] + 1].startswith(b" ")  # folded (RFC 5322 section 2.2.3)
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert [a.addr_spec for a in parsed["To"].addresses] == rcpts
    assert parsed["Subject"] == "Sixty"


def test_send_exit_codes(threaded_server: Callable[..., ThreadedServer], tmp_path: Path) -> None:
    async def reject_sender(ctx: Any) -> Verdict | None:
        return Verdict.reject("Go away", 550, "5.7.1") if ctx.mail_from == "bad@x.test" else None

    async def reject_large(ctx: Any) -> Verdict | None:
        return Verdict.reject("Too long", 554, "5.6.0") if (ctx.size or 0) > 2000 else None

    srv = threaded_server(
        reverse_dns=False, tls=False, domains=("example.net",), eightbitmime=False,
        hooks={"mail": [reject_sender], "data": [reject_large]},
    )
    base = ["send", "--server", target(srv), "--timeout", "10"]

    proc = run_cli(*base, "--from", "bad@x.test", "--to", "b@example.net")
    assert proc.returncode == 6
    assert "refused the sender <bad@x.test>: 550 5.7.1 Go away" in only_error_line(proc.stderr)

    proc = run_cli(*base, "--from", "a@example.org", "--to", "b@example.net",
                   "--to", "z@other.test")
    assert proc.returncode == 7
    assert "delivered <b@example.net>" in proc.stdout and "refused <z@other.test>" in proc.stdout
    assert "<z@other.test> refused: 55" in only_error_line(proc.stderr)

    proc = run_cli(*base, "--from", "a@example.org", "--to", "z@other.test")
    assert proc.returncode == 7 and "all recipients refused" in only_error_line(proc.stderr)

    big = tmp_path / "big.txt"
    big.write_text("a line of text\n" * 500)
    proc = run_cli(*base, "--from", "a@example.org", "--to", "b@example.net", "--body", str(big))
    assert proc.returncode == 8 and "554 5.6.0 Too long" in only_error_line(proc.stderr)

    eight = tmp_path / "eight.txt"
    eight.write_bytes("café\n".encode())
    proc = run_cli(*base, "--from", "a@example.org", "--to", "b@example.net",
                   "--body", str(eight), "--transcript")
    assert proc.returncode == 8 and "8BITMIME" in only_error_line(proc.stderr)
    assert "MAIL FROM" not in proc.stdout  # found before any transaction

    proc = run_cli(*base, "--from", "a@example.org", "--to", "b@example.net",
                   "--tls", "required")
    assert proc.returncode == 4 and "STARTTLS is not offered" in only_error_line(proc.stderr)

    proc = run_cli("send", "--server", f"127.0.0.1:{free_port()}", "--from", "a@example.org",
                   "--to", "b@example.net")
    assert proc.returncode == 3 and "cannot connect" in only_error_line(proc.stderr)

    long_line = tmp_path / "long.txt"
    long_line.write_text("x" * 1500 + "\n")
    proc = run_cli(*base, "--from", "a@example.org", "--to", "b@example.net",
                   "--body", str(long_line))
    assert proc.returncode == 8 and "998" in only_error_line(proc.stderr)
    assert [e.rcpt_to for e, _ in stored(srv)] == [["b@example.net"]]


def test_send_auth_with_redacted_transcript(pki: Pki) -> None:
    handler = Recorder()
    password = "pa55 wörd"
    with aiosmtpd_server(
        handler, tls_context=pki.server_context(), authenticator=authenticator
    ) as controller:
        base = ["send", "--server", f"127.0.0.1:{controller.port}", "--cafile",
                str(pki.ca_file), "--from", "a@example.org", "--to", "b@example.net",
                "--transcript", "--auth", "alice"]
        proc = run_cli(*base, "--auth-mechanism", "LOGIN",
                       env={"EHLO_AUTH_PASSWORD": "s3cret pw"})
        assert proc.returncode == 0, proc.stderr
        assert " ~> AUTH LOGIN" in proc.stdout and proc.stdout.count("<~  334 ") == 2
        assert proc.stdout.count(" ~> <redacted>") == 2
        assert "<~  235 2.7.0" in proc.stdout
        proc = run_cli(*base, env={"EHLO_AUTH_PASSWORD": password})
        assert proc.returncode == 5
        assert "refused AUTH PLAIN: 535" in only_error_line(proc.stderr)
        assert " ~> AUTH PLAIN <redacted>" in proc.stdout
        for secret in (password, base64.b64encode(f"\0alice\0{password}".encode()).decode()):
            assert secret not in proc.stdout + proc.stderr
        proc = run_cli(*base)  # no variable, and no terminal to ask on
        assert proc.returncode == 2
        assert "EHLO_AUTH_PASSWORD" in only_error_line(proc.stderr)
    assert len(handler.envelopes) == 1


def test_send_implicit_tls(pki: Pki) -> None:
    handler = Recorder()
    with aiosmtpd_server(handler, ssl_context=pki.server_context()) as controller:
        proc = run_cli("send", "--server", f"localhost:{controller.port}", "--tls", "implicit",
                       "--cafile", str(pki.ca_file), "--from", "a@example.org",
                       "--to", "b@example.net", "--transcript")
        assert proc.returncode == 0, proc.stderr
        assert "=== TLS started" in proc.stdout and "(verified)" in proc.stdout
        assert " -> " not in proc.stdout and "<~  220 " in proc.stdout  # TLS from the banner on
        proc = run_cli("send", "--server", f"localhost:{controller.port}", "--tls", "implicit",
                       "--from", "a@example.org", "--to", "b@example.net")
        assert proc.returncode == 4 and "not trusted" in only_error_line(proc.stderr)
    assert len(handler.envelopes) == 1


def test_send_auth_not_offered(threaded_server: Callable[..., ThreadedServer]) -> None:
    srv = threaded_server(reverse_dns=False, tls=False)
    proc = run_cli("send", "--server", target(srv), "--from", "a@example.org",
                   "--to", "b@example.net", "--auth", "alice",
                   env={"EHLO_AUTH_PASSWORD": "x"})
    assert proc.returncode == 5 and "does not offer AUTH" in only_error_line(proc.stderr)


# ------------------------------------------------------------------ probe


def test_probe_report_verified(threaded_server: Callable[..., ThreadedServer], pki: Pki) -> None:
    srv = threaded_server(reverse_dns=False, tls_cert=pki.cert_file, tls_key=pki.key_file)
    proc = run_cli("probe", f"localhost:{srv.port}", "--cafile", str(pki.ca_file),
                   "--helo", "probe.example")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Banner:      220 localhost ESMTP" in out
    assert "  PIPELINING " in out and "RFC 2920" in out
    assert "  SIZE 26214400 " in out and "25.0 MiB" in out
    assert "  STARTTLS " in out and "Extensions after TLS:" in out
    assert "HELO:        works (250 " in out
    assert "TLS:         STARTTLS: TLSv1." in out
    assert "names     localhost, 127.0.0.1, ::1" in out
    assert "chain     verified" in out and "days left" in out
    assert "AUTH:        before TLS: none offered" in out
    assert "Limits:      SIZE: messages up to 26214400 octets" in out
    assert "not trusted" not in out

    proc = run_cli("probe", f"127.0.0.1:{srv.port}", "--cafile", str(pki.ca_file), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) == {"banner", "ehlo", "extensions", "helo_ok", "tls", "auth"}
    assert report["banner"].startswith("220 ")
    keywords = [e["keyword"] for e in report["extensions"]]
    assert "STARTTLS" in keywords and "CHUNKING" in keywords
    assert all(e["description"] for e in report["extensions"])
    assert report["helo_ok"] is True
    tls = report["tls"]
    assert tls["offered"] and tls["started"] and tls["verified"] and tls["verify_error"] is None
    assert tls["version"].startswith("TLSv1.") and "127.0.0.1" in tls["names"]
    assert "STARTTLS" not in [e["keyword"] for e in tls["extensions"]]
    assert report["auth"] == {"before_tls": [], "after_tls": []}


def test_probe_report_untrusted(threaded_server: Callable[..., ThreadedServer]) -> None:
    srv = threaded_server(reverse_dns=False)  # a self-signed certificate
    proc = run_cli("probe", target(srv))
    assert proc.returncode == 0, proc.stderr
    assert "chain     NOT verified: " in proc.stdout
    assert "the certificate is not trusted" in proc.stdout
    proc = run_cli("probe", target(srv), "--json")
    tls = json.loads(proc.stdout)["tls"]
    assert tls["started"] and not tls["verified"] and tls["verify_error"]
    assert tls["subject"] == "CN=localhost"


@pytest.mark.external
def test_probe_smtp_sink_without_esmtp(smtp_sink: Callable[..., Sink]) -> None:  # noqa: F811
    sink = smtp_sink("-e")
    proc = run_cli("probe", f"127.0.0.1:{sink.port}", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["extensions"] == [] and report["helo_ok"] is True
    assert report["tls"]["offered"] is False
    proc = run_cli("probe", f"127.0.0.1:{sink.port}")
    assert "EHLO is refused (500)" in proc.stdout and "HELO:        works" in proc.stdout


def test_probe_unreachable() -> None:
    proc = run_cli("probe", f"127.0.0.1:{free_port()}", "--timeout", "5")
    assert proc.returncode == 3
    assert "cannot connect" in only_error_line(proc.stderr)
    assert proc.stdout == ""
