"""``ehlo send`` and ``ehlo probe`` against ``ehlo serve`` as a new user runs them.

``ehlo serve`` runs in a child process with its own self-signed certificate
(``DATA/tls/cert.pem``, made for ``localhost``, which names 127.0.0.1 too),
a STARTTLS port and an implicit-TLS port (``--listen-tls``). Checked: the
default opportunistic TLS encrypts without verifying (RFC 7435) and says
that the certificate would not verify; ``--tls verify`` (and its older name
``required``) fails with exit 4 unless ``--cafile`` trusts the certificate;
``ehlo probe`` shows the server's EHLO reply as sent and probes an
implicit-TLS port, failing in one line within its timeout on a port that
does not answer TLS; ``--bdat`` to a server without CHUNKING is one error
line, once.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .conftest import ThreadedServer, free_port
from .dnsserver import DNSServer
from .test_cli import ServerProcess, list_json
from .test_client_cli import only_error_line, stored, target
from .test_client_e2e import run_cli

pytestmark = pytest.mark.timeout(120)

FROM = ("--from", "alice@example.org", "--to", "bob@example.net")


def to(rcpt: str) -> tuple[str, ...]:
    """``--from`` and ``--to`` a recipient of the test's own on the module's server."""
    return ("--from", "alice@example.org", "--to", rcpt)


def stored_for(serve: Serve, rcpt: str) -> list[dict[str, Any]]:
    """The messages ``serve`` stored for ``rcpt`` (``messages list --json``)."""
    return [m for m in list_json(serve.process.data) if m["rcpt_to"] == [rcpt]]


class Serve:
    """``ehlo serve`` with a STARTTLS port and an implicit-TLS port."""

    def __init__(self, process: ServerProcess, tls_port: int) -> None:
        self.process = process
        self.plain = f"127.0.0.1:{process.port}"
        self.implicit = f"127.0.0.1:{tls_port}"
        self.cert = process.data / "tls" / "cert.pem"


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """One server for the module's tests: each sends to recipients of its own (``to``)."""
    tls_port = free_port()
    process = ServerProcess(
        tmp_path_factory.mktemp("serve"),
        "--hostname",
        "localhost",
        "--listen-tls",
        f"127.0.0.1:{tls_port}",
        "--workers",
        "1",
    )
    try:
        process.wait_ready()
        yield Serve(process, tls_port)
    finally:
        process.close()


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


# -------------------------------------------------------------------- send


def test_send_with_defaults_to_ehlo_serve_encrypts_without_verifying(serve: Serve) -> None:
    rcpt = "defaults@example.net"
    proc = run_cli("send", "--server", serve.plain, *to(rcpt), "--transcript", "--timeout", "20")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    assert " -> STARTTLS" in out and "=== TLS started: TLSv1." in out
    assert (
        "=== TLS peer certificate: CN=localhost (not verified by the TLS policy;"
        " it would not verify: self-signed certificate)" in out
    )
    assert f"delivered <{rcpt}> via {serve.plain}: 250 " in out
    assert f"tls via {serve.plain}: TLSv1." in out
    assert "it would not verify: self-signed certificate" in out.splitlines()[-1]
    [message] = stored_for(serve, rcpt)
    assert message["rcpt_to"] == [rcpt]
    assert message["tls"] is not None and message["tls"]["version"].startswith("TLSv1.")


@pytest.mark.parametrize("policy", ["verify", "required"])
def test_send_verify_needs_a_trusted_certificate(serve: Serve, policy: str) -> None:
    rcpt = f"{policy}@example.net"
    proc = run_cli("send", "--server", serve.plain, *to(rcpt), "--tls", policy, "--timeout", "20")
    assert proc.returncode == 4, proc.stderr
    assert "not trusted: self-signed certificate" in only_error_line(proc.stderr)
    assert stored_for(serve, rcpt) == []
    # The server's own certificate as the trust anchor: it names 127.0.0.1.
    proc = run_cli(
        "send",
        "--server",
        serve.plain,
        *to(rcpt),
        "--tls",
        policy,
        "--cafile",
        str(serve.cert),
        "--transcript",
        "--timeout",
        "20",
    )
    assert proc.returncode == 0, proc.stderr
    assert "=== TLS peer certificate: CN=localhost (verified)" in proc.stdout
    assert f"tls via {serve.plain}: TLSv1." in proc.stdout
    assert proc.stdout.rstrip().endswith(": verified")
    [message] = stored_for(serve, rcpt)
    assert message["tls"] is not None


def test_send_encrypt_requires_tls_but_not_trust(
    serve: Serve, threaded_server: Callable[..., ThreadedServer]
) -> None:
    proc = run_cli("send", "--server", serve.plain, *FROM, "--tls", "encrypt", "--timeout", "20")
    assert proc.returncode == 0, proc.stderr
    assert "it would not verify: self-signed certificate" in proc.stdout
    plain = threaded_server(tls=False)
    proc = run_cli("send", "--server", target(plain), *FROM, "--tls", "encrypt", "--timeout", "20")
    assert proc.returncode == 4
    assert "STARTTLS is not offered" in only_error_line(proc.stderr)


def test_send_implicit_tls_with_cafile(serve: Serve) -> None:
    proc = run_cli(
        "send", "--server", serve.implicit, "--tls", "implicit", *FROM, "--timeout", "20"
    )
    assert proc.returncode == 4
    assert "not trusted: self-signed certificate" in only_error_line(proc.stderr)
    proc = run_cli(
        "send",
        "--server",
        serve.implicit,
        "--tls",
        "implicit",
        *FROM,
        "--cafile",
        str(serve.cert),
        "--timeout",
        "20",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith(": verified")


def test_send_bdat_without_chunking_is_one_error(
    threaded_server: Callable[..., ThreadedServer],
) -> None:
    srv = threaded_server(tls=False, chunking=False)
    for extra in ((), ("--transcript",), ("--no-pipelining", "--transcript")):
        proc = run_cli("send", "--server", target(srv), *FROM, "--bdat", "--timeout", "20", *extra)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        line = only_error_line(proc.stderr)
        assert line == (
            f"ehlo: error: BDAT was asked for but {target(srv)} does not offer CHUNKING (RFC 3030)"
        )
        assert proc.stderr.count("CHUNKING") == 1
        assert "CHUNKING (RFC 3030)" not in proc.stdout  # not repeated on stdout
        assert "MAIL FROM" not in proc.stdout  # found before any transaction
    assert stored(srv) == []
    help_text = run_cli("send", "--help").stdout
    assert "--bdat when CHUNKING is not offered" in " ".join(help_text.split())


def test_mx_delivery_with_opportunistic_tls_takes_an_untrusted_certificate(
    threaded_server: Callable[..., ThreadedServer],
) -> None:
    srv = threaded_server()  # STARTTLS with the self-signed certificate
    zone = {
        "tls.example.test": {"MX": ["10 mx.tls.example.test."]},
        "mx.tls.example.test": {"A": ["127.0.0.1"]},
    }
    with DNSServer(zone) as dns_server:
        route = (
            "send", "--from", "a@example.org", "--to", "b@tls.example.test",
            "--dns-server", dns_server.nameserver, "--port", str(srv.port), "--timeout", "20",
        )  # fmt: skip
        proc = run_cli(*route, "--transcript")
        assert proc.returncode == 0, proc.stderr
        assert "Route: mx.tls.example.test (MX 10) -> 127.0.0.1" in proc.stdout
        assert "it would not verify: self-signed certificate" in proc.stdout
        assert f"delivered <b@tls.example.test> via 127.0.0.1:{srv.port}" in proc.stdout
        [(envelope, _)] = stored(srv)
        assert envelope.tls is not None
        # Asked to verify, the same route fails on the certificate.
        proc = run_cli(*route, "--tls", "verify")
        assert proc.returncode == 4
        assert "not trusted: self-signed certificate" in only_error_line(proc.stderr)
    assert len(stored(srv)) == 1


# ------------------------------------------------------------------- probe


def test_probe_shows_the_servers_ehlo_reply(serve: Serve) -> None:
    proc = run_cli("probe", serve.plain, "--helo", "probe.example", "--timeout", "20")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "EHLO:        250-localhost Hello probe.example [127.0.0.1]" in lines
    assert "             250-STARTTLS" in lines
    assert "EHLO:        250 ok" not in proc.stdout
    proc = run_cli("probe", serve.plain, "--helo", "probe.example", "--json", "--timeout", "20")
    report = json.loads(proc.stdout)
    first, *rest = report["ehlo"].split("\n")
    assert first == "250-localhost Hello probe.example [127.0.0.1]"
    assert "250-STARTTLS" in rest and rest[-1].startswith("250 ")


def test_probe_implicit_tls_port(serve: Serve) -> None:
    for option in (("--tls", "implicit"), ("--implicit-tls",)):
        proc = run_cli("probe", serve.implicit, *option, "--timeout", "20")
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert "Banner:      220 localhost ESMTP" in out
        assert "EHLO:        250-localhost Hello " in out
        assert "TLS:         implicit TLS: TLSv1." in out
        assert "chain     NOT verified: self-signed certificate" in out
    proc = run_cli("probe", serve.implicit, "--tls", "implicit", "--json", "--timeout", "20")
    report = json.loads(proc.stdout)
    assert report["banner"].startswith("220 localhost")
    assert report["ehlo"].startswith("250-localhost Hello ")
    assert report["tls"]["implicit"] and report["tls"]["started"]


def test_probe_implicit_tls_fails_fast_on_a_port_without_tls(serve: Serve) -> None:
    # A port that speaks plain SMTP first: the handshake fails at once.
    started = time.monotonic()
    proc = run_cli("probe", serve.plain, "--tls", "implicit", "--timeout", "3")
    assert time.monotonic() - started < 15
    assert proc.returncode == 4, proc.stderr
    assert "not an implicit-TLS port?" in only_error_line(proc.stderr)
    assert len(proc.stderr.splitlines()) == 1 and proc.stdout == ""
    # A port that never answers: the handshake gives up after --timeout.
    with silent_listener() as port:
        started = time.monotonic()
        proc = run_cli("probe", f"127.0.0.1:{port}", "--tls", "implicit", "--timeout", "3")
        elapsed = time.monotonic() - started
    assert proc.returncode == 4, proc.stderr
    assert elapsed < 15  # 3 s of waiting plus a slow interpreter start; never 30 s
    line = only_error_line(proc.stderr)
    assert line == (
        f"ehlo: error: no TLS handshake with 127.0.0.1:{port} within 3s (not an implicit-TLS port?)"
    )
    assert len(proc.stderr.splitlines()) == 1 and proc.stdout == ""


def test_probe_starttls_on_an_implicit_tls_port_hints_at_implicit(serve: Serve) -> None:
    proc = run_cli("probe", serve.implicit, "--tls", "starttls", "--timeout", "2")
    assert proc.returncode == 3, proc.stderr
    line = only_error_line(proc.stderr)
    assert line == (
        f"ehlo: error: timeout: the banner did not come from {serve.implicit} within 2s"
        " (an implicit-TLS port? probe it with --tls implicit)"
    )
    assert proc.stdout == ""


# ----------------------------------------------------------- would_verify


def test_would_verify_names_the_reason() -> None:
    import datetime as dt

    import trustme
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from ehlo.client._certinfo import would_verify

    def der(pem: bytes) -> bytes:
        return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)

    ca = trustme.CA()
    chain = [der(blob.bytes()) for blob in ca.issue_cert("mx.example.org").cert_chain_pems]
    anchors = [der(ca.cert_pem.bytes())]
    assert would_verify(chain, "mx.example.org", anchors) is None
    assert would_verify(chain, "MX.example.org.", anchors) is None
    assert would_verify(chain, "other.example.org", anchors) == (
        "certificate is for mx.example.org, not other.example.org"
    )
    other_ca = [der(trustme.CA().cert_pem.bytes())]
    assert would_verify(chain, "mx.example.org", other_ca) == "no trusted CA issued it"
    later = dt.datetime(3001, 1, 1, tzinfo=dt.UTC)
    assert would_verify(chain, "mx.example.org", anchors, now=later) == (
        "certificate has expired (3000-01-01)"
    )
    assert would_verify([], "mx.example.org", anchors) == "the server sent no certificate"
    assert would_verify(chain, "mx.example.org", []) == (
        "no trusted CA certificates to check it against"
    )
