"""``ehlo check-helo`` and ``ehlo serve --helo-policy``, run for real as subprocesses.

A real DNS server on loopback (``tests/dnsserver.py``) serves a small zone:
a name that resolves to 127.0.0.1 (with its PTR and an SPF record), one that
resolves elsewhere (directly and through a CNAME), a name that does not exist
and one whose server fails (SERVFAIL). ``check-helo`` must show the cause of
a mismatch at a glance, print one JSON object with ``--json``, and give the
verdict the configured policy would; ``serve`` must refuse a mismatching
EHLO at RCPT under the strict policy, accept a matching one, and keep the
check results in the stored envelope. Every wait is bounded; every server
is stopped in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ehlo.cli import main

from .dnsserver import DNSServer
from .helpers import free_port

TIMEOUT = 15.0  # seconds for any single wait

GOOD = "good.test"  # A 127.0.0.1, PTR of 127.0.0.1, SPF pass for 127.0.0.1
ELSEWHERE = "elsewhere.test"  # A 192.0.2.7: not the client
ALIAS = "alias.test"  # CNAME -> elsewhere.test
MISSING = "missing.test"  # NXDOMAIN
BROKEN = "broken.test"  # SERVFAIL

ZONE = {
    GOOD: {"A": ["127.0.0.1"], "TXT": ['"v=spf1 ip4:127.0.0.1 -all"']},
    ELSEWHERE: {"A": ["192.0.2.7"]},
    ALIAS: {"CNAME": [f"{ELSEWHERE}."]},
    DNSServer.reverse("127.0.0.1"): {"PTR": [f"{GOOD}."]},
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    """The test zone on a free loopback port, for every test of this module."""
    with DNSServer(ZONE, behaviours={BROKEN: "servfail"}) as server:
        yield server


def ehlo_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ehlo", *args]


def no_color_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "NO_COLOR"}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ehlo_cmd(*args), capture_output=True, text=True, timeout=TIMEOUT)


def check_helo(dns: DNSServer, *args: str) -> subprocess.CompletedProcess[str]:
    """``ehlo check-helo ARGS --dns-server OUR-SERVER``; it must exit 0 without stderr."""
    result = run("check-helo", *args, "--dns-server", dns.nameserver)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result


def check_helo_here(capsys: pytest.CaptureFixture[str], dns: DNSServer, *args: str) -> str:
    """As ``check_helo``, but through ``main`` in this process (no start-up cost)."""
    assert main(["check-helo", *args, "--dns-server", dns.nameserver]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def check_helo_json(dns: DNSServer, *args: str) -> dict[str, Any]:
    data = json.loads(check_helo(dns, *args, "--json").stdout)
    assert isinstance(data, dict)
    return data


def row(output: str, check: str) -> str:
    """The table row of ``check`` (the line starting with its name)."""
    rows = [line for line in output.splitlines() if line.split(" ", 1)[0] == check]
    assert len(rows) == 1, output
    return rows[0]


def evidence_below(output: str, check: str) -> list[str]:
    """The indented evidence lines printed under the row of ``check``."""
    lines = output.splitlines()
    start = lines.index(row(output, check)) + 1
    below: list[str] = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        below.append(line.strip())
    return below


def verdict(output: str) -> str:
    last = output.rstrip("\n").splitlines()[-1]
    assert last.startswith("verdict: "), output
    return last


def one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("ehlo")]
    assert len(errors) == 1, stderr
    return errors[-1]


# --------------------------------------------------------------------------
# check-helo: the table


def test_mismatch_shows_the_cause_at_a_glance(dns_server: DNSServer) -> None:
    out = check_helo(dns_server, ELSEWHERE, "127.0.0.1").stdout
    assert "\x1b[" not in out  # no color when stdout is not a terminal
    assert out.splitlines()[0].startswith(f"EHLO {ELSEWHERE} from 127.0.0.1")
    assert row(out, "forward_match").split() == [
        "forward_match",
        "FAIL",
        "record",
        "does",
        "not",
        "resolve",
        "to",
        "127.0.0.1",
        "(it",
        "resolves",
        "to",
        "192.0.2.7)",
    ]
    assert evidence_below(out, "forward_match") == [
        f"A {ELSEWHERE} -> 192.0.2.7",
        f"AAAA {ELSEWHERE} -> no records",
    ]
    assert row(out, "resolves").split()[:3] == ["resolves", "pass", "record"]
    assert row(out, "iprev").split()[:2] == ["iprev", "pass"]
    assert f"PTR name {GOOD} resolves back" in row(out, "iprev")
    # The default policy records: the explanation says nothing is refused.
    assert verdict(out) == "verdict: accept (policy record: nothing is refused)"


def test_cname_chain_is_shown_in_the_evidence(
    capsys: pytest.CaptureFixture[str], dns_server: DNSServer
) -> None:
    out = check_helo_here(capsys, dns_server, ALIAS, "127.0.0.1")
    assert "FAIL" in row(out, "forward_match")
    assert f"via CNAME {ELSEWHERE}" in row(out, "forward_match")
    assert f"A {ALIAS} -> 192.0.2.7 (via CNAME {ELSEWHERE})" in evidence_below(out, "forward_match")


def test_matching_name_passes_every_identity_check(dns_server: DNSServer) -> None:
    out = check_helo(dns_server, GOOD, "127.0.0.1", "--helo-policy", "strict").stdout
    for check in (
        "syntax",
        "fqdn",
        "resolves",
        "forward_match",
        "iprev",
        "ptr_match",
        "not_us",
        "spf_helo",
    ):
        assert row(out, check).split()[1] == "pass", out
    assert "FAIL" not in out and "TEMPERROR" not in out
    assert verdict(out) == "verdict: accept (policy strict: no check that can refuse failed)"


def test_nxdomain_is_explained(dns_server: DNSServer) -> None:
    out = check_helo(dns_server, MISSING, "127.0.0.1", "--helo").stdout
    assert out.startswith(f"HELO {MISSING} from 127.0.0.1")
    assert "does not exist in DNS (NXDOMAIN)" in row(out, "resolves")
    assert f"A {MISSING} -> NXDOMAIN" in evidence_below(out, "resolves")
    assert "(it does not exist)" in row(out, "forward_match")


def test_bare_ip_fails_syntax(dns_server: DNSServer) -> None:
    out = check_helo(dns_server, "127.0.0.1", "127.0.0.1", "--helo-policy", "strict").stdout
    assert row(out, "syntax").split()[:3] == ["syntax", "FAIL", "reject"]
    assert "bare IP address" in row(out, "syntax")
    assert verdict(out).startswith("verdict: reject -> 550 5.7.1 EHLO name 127.0.0.1 is a bare IP")


def test_address_literal_of_the_client_passes_literal_match(dns_server: DNSServer) -> None:
    data = check_helo_json(dns_server, "[127.0.0.1]", "127.0.0.1", "--helo-policy", "strict")
    checks = data["checks"]
    assert checks["syntax"]["result"] == "pass"
    assert checks["literal_match"]["result"] == "pass"
    assert checks["literal_match"]["evidence"] == {"literal": "127.0.0.1", "client_ip": "127.0.0.1"}
    assert checks["forward_match"]["result"] == "none"
    assert data["verdict"] == {"action": "accept", "reply": None, "check": None}
    out = check_helo(dns_server, "[192.0.2.1]", "127.0.0.1", "--helo-policy", "strict").stdout
    assert "FAIL" in row(out, "literal_match")
    assert verdict(out).startswith("verdict: reject -> 550 5.7.1 EHLO name [192.0.2.1] is not")


# --------------------------------------------------------------------------
# check-helo: the verdict of the policy


def test_strict_rejects_a_mismatch_with_550_naming_the_cause(dns_server: DNSServer) -> None:
    out = check_helo(dns_server, ELSEWHERE, "127.0.0.1", "--helo-policy", "strict").stdout
    assert row(out, "forward_match").split()[:3] == ["forward_match", "FAIL", "reject"]
    assert verdict(out) == (
        f"verdict: reject -> 550 5.7.1 EHLO name {ELSEWHERE} does not resolve to 127.0.0.1"
        " (it resolves to 192.0.2.7)"
    )
    data = check_helo_json(dns_server, ELSEWHERE, "127.0.0.1", "--helo-policy", "strict")
    assert data["verdict"] == {
        "action": "reject",
        "reply": f"550 5.7.1 EHLO name {ELSEWHERE} does not resolve to 127.0.0.1"
        " (it resolves to 192.0.2.7)",
        "check": "forward_match",
    }


def test_temperror_is_never_a_5xx(dns_server: DNSServer) -> None:
    out = check_helo(dns_server, BROKEN, "127.0.0.1", "--helo-policy", "strict").stdout
    assert row(out, "forward_match").split()[:2] == ["forward_match", "TEMPERROR"]
    assert row(out, "resolves").split()[:2] == ["resolves", "TEMPERROR"]
    assert verdict(out).startswith(f"verdict: defer -> 451 4.7.1 EHLO name {BROKEN} could not")
    assert " 5.7." not in verdict(out)
    data = check_helo_json(dns_server, BROKEN, "127.0.0.1", "--helo-policy", "strict")
    assert data["checks"]["forward_match"]["result"] == "temperror"
    assert data["verdict"]["action"] == "defer"
    assert data["verdict"]["reply"].startswith("451 4.7.1 ")


def test_per_check_modes_from_flags_and_config_file(
    capsys: pytest.CaptureFixture[str], dns_server: DNSServer, tmp_path: Path
) -> None:
    out = check_helo(
        dns_server, ELSEWHERE, "127.0.0.1", "--helo-check", "forward_match=defer"
    ).stdout
    assert row(out, "forward_match").split()[:3] == ["forward_match", "FAIL", "defer"]
    assert verdict(out).startswith(f"verdict: defer -> 450 4.7.1 EHLO name {ELSEWHERE}")
    config = tmp_path / "ehlo.toml"
    config.write_text(
        'hostname = "mx.test"\n[greeting]\npolicy = "strict"\n'
        '[greeting.checks]\nforward_match = "record"\nptr_match = "reject"\n',
        encoding="utf-8",
    )
    data = check_helo_json(dns_server, ELSEWHERE, "127.0.0.1", "--config", str(config))
    # forward_match only recorded: ptr_match (switched to reject) decides.
    assert data["verdict"]["check"] == "ptr_match"
    assert data["verdict"]["reply"].startswith("550 5.7.1 ")
    # The configured host name is ours: a client claiming it fails not_us.
    out = check_helo_here(capsys, dns_server, "mx.test", "127.0.0.1", "--config", str(config))
    assert row(out, "not_us").split()[:3] == ["not_us", "FAIL", "reject"]
    assert evidence_below(out, "not_us") == ["our_names: mx.test"]


def test_trusted_network_is_accepted_whatever_the_checks(
    capsys: pytest.CaptureFixture[str], dns_server: DNSServer
) -> None:
    out = check_helo_here(
        capsys,
        dns_server,
        ELSEWHERE,
        "127.0.0.1",
        "--helo-policy",
        "strict",
        "--trusted-network",
        "127.0.0.0/8",
    )
    assert "FAIL" in row(out, "forward_match")  # still explained
    assert verdict(out) == (
        "verdict: accept (127.0.0.1 is in the trusted network 127.0.0.0/8:"
        " the server skips the checks)"
    )


def test_json_is_one_object_with_every_check(dns_server: DNSServer) -> None:
    data = check_helo_json(dns_server, ELSEWHERE, "127.0.0.1", "--helo")
    assert set(data) == {"name", "ip", "verb", "checks", "verdict"}
    assert (data["name"], data["ip"], data["verb"]) == (ELSEWHERE, "127.0.0.1", "HELO")
    assert list(data["checks"]) == [
        "syntax",
        "fqdn",
        "literal_match",
        "resolves",
        "forward_match",
        "iprev",
        "ptr_match",
        "not_us",
        "spf_helo",
        "dynamic",
        "consistent",
    ]
    for result in data["checks"].values():
        assert set(result) == {"result", "reason", "evidence"}
    forward = data["checks"]["forward_match"]
    assert forward["result"] == "fail"
    assert forward["reason"] == "does not resolve to 127.0.0.1 (it resolves to 192.0.2.7)"
    assert forward["evidence"]["client_ip"] == "127.0.0.1"
    assert {"name": ELSEWHERE, "type": "A", "answers": ["192.0.2.7"]} in forward["evidence"][
        "lookups"
    ]
    assert data["checks"]["iprev"]["evidence"]["confirmed"] == [GOOD]
    assert data["verdict"] == {"action": "accept", "reply": None, "check": None}


def test_color_only_on_a_terminal(dns_server: DNSServer) -> None:
    import pty

    main, sub = pty.openpty()
    env = {**no_color_env(), "TERM": "xterm"}
    proc = subprocess.Popen(
        ehlo_cmd("check-helo", ELSEWHERE, "127.0.0.1", "--dns-server", dns_server.nameserver),
        stdout=sub,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    os.close(sub)
    output = b""
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
        os.close(main)
        assert proc.stderr is not None
        proc.stderr.close()
    text = output.decode()
    assert "\x1b[31mFAIL" in text  # failures in red
    assert "\x1b[32maccept\x1b[0m" in text


# --------------------------------------------------------------------------
# check-helo: errors (in process: the same ``main``, without the start-up cost)


def test_bad_ip_exits_2_with_one_line() -> None:
    result = run("check-helo", "x.test", "999.1.1.1")
    assert result.returncode == 2
    assert result.stdout == ""
    assert one_line_error(result.stderr) == (
        "ehlo: error: IP: expected an IP address such as 192.0.2.7, got '999.1.1.1'"
    )


def error_of(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run ``ehlo ARGS`` in process; it must exit 2 with one error line and no output."""
    assert main(list(args)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return one_line_error(captured.err)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("x.test", "::1::"),
            "ehlo: error: IP: expected an IP address such as 192.0.2.7, got '::1::'",
        ),
        (
            ("x.test", "127.0.0.1", "--helo-check", "forward_mach=reject"),
            'ehlo: error: --helo-check: unknown greeting check "forward_mach"'
            ' (did you mean "forward_match"?)',
        ),
        (
            ("x.test", "127.0.0.1", "--helo-check", "dynamic=reject"),
            'ehlo: error: --helo-check dynamic: expected "off" or "record"'
            ' (dynamic is only recorded), got "reject"',
        ),
        (
            ("x.test", "127.0.0.1", "--dns-server", "dns.example"),
            "ehlo: error: --dns-server: expected a list of DNS servers such as",
        ),
        (
            ("x.test", "127.0.0.1", "--trusted-network", "10.0.0.0/33"),
            "ehlo: error: --trusted-network: expected a list of networks such as",
        ),
        (
            ("x.test", "127.0.0.1", "--helo-policy", "paranoid"),
            "ehlo check-helo: error: argument --helo-policy: invalid choice: 'paranoid'",
        ),
        (("x.test",), "ehlo check-helo: error: the following arguments are required: IP"),
    ],
)
def test_usage_and_config_errors_exit_2(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], expected: str
) -> None:
    assert error_of(capsys, "check-helo", *args).startswith(expected)


def test_unknown_check_in_the_config_file_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "ehlo.toml"
    config.write_text('[greeting.checks]\nforward_mach = "reject"\n', encoding="utf-8")
    assert error_of(capsys, "check-helo", "x.test", "127.0.0.1", "--config", str(config)) == (
        'ehlo: error: unknown greeting check "forward_mach" (did you mean "forward_match"?)'
    )


# --------------------------------------------------------------------------
# serve --helo-policy strict, end to end


@contextlib.contextmanager
def serving(tmp_path: Path, *args: str) -> Iterator[int]:
    """``ehlo serve`` on a free loopback port; yields the port, killed in ``finally``."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ehlo_cmd(
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--data",
                str(tmp_path / "data"),
                "--hostname",
                "mx.test",
                "--no-tls",
                *args,
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            deadline = time.monotonic() + TIMEOUT
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"server exited with {proc.returncode}: {log_path.read_text()}")
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"server did not start: {log_path.read_text()}")
                    time.sleep(0.05)
            yield port
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=TIMEOUT)


def greet_and_rcpt(port: int, name: str) -> tuple[int, bytes, smtplib.SMTP]:
    """EHLO ``name`` from 127.0.0.1, MAIL, RCPT; the RCPT reply and the open client."""
    client = smtplib.SMTP(
        "127.0.0.1", port, local_hostname=name, timeout=TIMEOUT, source_address=("127.0.0.1", 0)
    )
    assert client.ehlo()[0] == 250  # the greeting reply never waits for DNS
    assert client.mail("alice@example.org")[0] == 250
    code, text = client.rcpt("bob@example.net")
    return code, text, client


def test_serve_strict_refuses_a_mismatch_at_rcpt_and_records_a_match(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    with serving(
        tmp_path,
        "--dns-server",
        dns_server.nameserver,
        "--dns-timeout",
        "2",
        "--helo-policy",
        "strict",
    ) as port:
        code, text, client = greet_and_rcpt(port, ELSEWHERE)
        with client:
            assert code == 550
            assert text.decode() == (
                f"5.7.1 EHLO name {ELSEWHERE} does not resolve to 127.0.0.1"
                " (it resolves to 192.0.2.7)"
            )
        code, text, client = greet_and_rcpt(port, BROKEN)
        with client:
            assert code == 451  # a DNS failure is never permanent
            assert text.startswith(b"4.7.1 ")
        code, text, client = greet_and_rcpt(port, GOOD)
        with client:
            assert code == 250, text
            code, text = client.data(b"Subject: checked\r\n\r\nhello\r\n")
            assert code == 250, text
            queue_id = text.decode().rsplit(" ", 1)[-1]

    data = str(tmp_path / "data")
    shown = run("messages", "show", queue_id, "--json", "--data", data)
    assert shown.returncode == 0, shown.stderr
    envelope = json.loads(shown.stdout)
    assert envelope["greeting_name"] == GOOD
    checks = envelope["greeting_checks"]
    assert checks["forward_match"]["result"] == "pass"
    assert checks["forward_match"]["reason"] == "resolves to the client address 127.0.0.1"
    assert checks["iprev"]["result"] == "pass"
    assert envelope["greeting_verdict"]["action"] == "accept"
    listed = run("messages", "list", "--json", "--data", data)
    assert listed.returncode == 0, listed.stderr
    [message] = json.loads(listed.stdout)
    assert "greeting_checks" not in message  # in `show --json` only
    assert message["greeting_verdict"]["action"] == "accept"
    raw = run("messages", "show", queue_id, "--raw", "--data", data).stdout
    assert f"from {GOOD} ({GOOD} [127.0.0.1])" in raw


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("--helo-check", "forward_match=deny"),
            'ehlo: error: --helo-check forward_match: expected one of "off", "record", "defer",'
            ' "reject", got "deny"',
        ),
        (("--helo-stage", "end"), "ehlo serve: error: argument --helo-stage: invalid choice"),
        (
            ("--dns-timeout", "0"),
            "ehlo: error: --dns-timeout: expected a number of seconds > 0, got 0.0",
        ),
        (
            ("--dns-server", "127.0.0.1:99999"),
            "ehlo: error: --dns-server: expected a list of DNS servers",
        ),
    ],
)
def test_serve_greeting_option_errors_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    message = error_of(
        capsys, "serve", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "d"), *args
    )
    assert message.startswith(expected)
