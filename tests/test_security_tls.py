"""TLS as clients see it: implicit TLS, protocol versions, ciphers, SNI, reloading.

Real clients (Python's ``ssl`` and ``smtplib``, ``openssl s_client``, swaks)
talk to a real server on 127.0.0.1 whose certificates come from a test CA
(trustme). The file proves that:

* an implicit-TLS listener (RFC 8314) says nothing before the handshake, never
  answers plaintext, does not offer STARTTLS inside TLS, and records the
  session's TLS in the envelope and the Received header;
* TLS 1.0 and 1.1 and suites without forward secrecy or AEAD are refused by
  the server (the client did offer them), while TLS 1.2 and 1.3 work, on both
  STARTTLS and implicit TLS;
* key exchange uses X25519, P-256 or P-384 only (no X448, P-521 or
  finite-field groups), and no DHE suite is offered;
* the certificate follows the name the client asks for (SNI): exact names,
  one-label wildcards, the default certificate for anything else;
* SIGHUP reloads the certificates for new connections without dropping a
  session, and a broken certificate file keeps the current ones;
* ``require_tls`` refuses MAIL until STARTTLS, but not on implicit TLS.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from ehlo import Listen
from ehlo.server.tls import server_context
from ehlo.storage import open_store

from .helpers import BlockingClient, ThreadedServer, free_port, tool, wait_until
from .trace import split_trace

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 10.0
DEFAULT_NAME = "mx.example.test"
QUEUED = re.compile(r"queued as ([0-9A-Za-z]+)")
MESSAGE = b"Subject: tls test\r\nFrom: a@example.org\r\n\r\nOver TLS.\r\n"


# ------------------------------------------------------------------ certificates


@dataclasses.dataclass
class PKI:
    """A test CA and the certificate files it issued."""

    ca: trustme.CA
    folder: Path

    def issue(
        self, stem: str, *names: str, key_type: trustme.KeyType = trustme.KeyType.ECDSA
    ) -> tuple[Path, Path]:
        """A new certificate and key for ``names``, written to ``stem``.pem/.key."""
        leaf = self.ca.issue_cert(*names, key_type=key_type)
        cert, key = self.folder / f"{stem}.pem", self.folder / f"{stem}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return cert, key

    def client(self) -> ssl.SSLContext:
        """A client verifying the chain against the test CA (names are checked by the tests)."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(trustme.CA(), tmp_path_factory.mktemp("pki"))


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def fingerprint(blob: bytes | None) -> str:
    assert blob is not None
    return hashlib.sha256(blob).hexdigest()


def dns_names(sock: ssl.SSLSocket) -> list[str]:
    """The DNS names in the peer certificate's subjectAltName."""
    cert = sock.getpeercert()
    assert cert, "no verified peer certificate"
    names: tuple[tuple[str, str], ...] = cert.get("subjectAltName", ())  # type: ignore[assignment]
    return [value for kind, value in names if kind == "DNS"]


# ------------------------------------------------------------------ an SMTP client


class Dialog(BlockingClient):
    """The raw blocking client, with the EHLO keywords and one whole transaction."""

    def ehlo(self, name: str = "client.example.test") -> list[str]:
        r = self.cmd(f"EHLO {name}")
        assert r.code == 250, r
        return [line.split(" ")[0].upper() for line in r.lines[1:]]

    def send_message(self, body: bytes = MESSAGE) -> str:
        """One transaction; the queue id of the stored message."""
        for line in ("MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>"):
            r = self.cmd(line)
            assert r.code == 250, (line, r)
        r = self.cmd("DATA")
        assert r.code == 354, r
        self.send(body + b".\r\n")
        r = self.reply()
        assert r.code == 250, r
        found = QUEUED.search(r.lines[-1])
        assert found, r
        return found.group(1)


# ------------------------------------------------------------------ the server


@dataclasses.dataclass
class TLSServer:
    """A server with a STARTTLS listener and an implicit-TLS listener."""

    threaded: ThreadedServer
    plain_port: int
    tls_port: int

    def port(self, listener: str) -> int:
        return self.tls_port if listener == "implicit" else self.plain_port

    def connect(
        self, listener: str, ctx: ssl.SSLContext, server_hostname: str | None = None
    ) -> Dialog:
        """A session inside TLS on either listener (EHLO done when STARTTLS was needed)."""
        if listener == "implicit":
            return Dialog.open(self.tls_port, tls=ctx, server_hostname=server_hostname)
        dialog = Dialog.open(self.plain_port)
        assert "STARTTLS" in dialog.ehlo()
        dialog.starttls(ctx, server_hostname)
        return dialog

    def stored(self, queue_id: str) -> tuple[dict[str, str] | None, str, str]:
        """The envelope's TLS, its protocol and the Received header (unfolded)."""
        assert self.threaded.server is not None
        store = self.threaded.server.store
        message = store.get(queue_id)
        raw = store.raw(queue_id)
        assert message is not None and raw is not None, queue_id
        fields, _ = split_trace(raw)
        received = fields[0].decode().replace("\r\n\t", " ")
        return message.envelope.tls, message.envelope.protocol, received


def start_tls_server(
    threaded_server: Callable[..., ThreadedServer], cert: Path, key: Path, **overrides: Any
) -> TLSServer:
    """A server for mx.example.test with ``cert`` and ``key``: STARTTLS and implicit TLS."""
    overrides.setdefault("reverse_dns", False)
    srv = threaded_server(
        listen=(Listen("127.0.0.1", 0), Listen("127.0.0.1", 0, tls=True)),
        hostname=DEFAULT_NAME,
        tls_cert=cert,
        tls_key=key,
        **overrides,
    )
    assert srv.server is not None
    (_, plain), (_, implicit) = srv.server.addresses
    return TLSServer(srv, plain, implicit)


@pytest.fixture
def tls_server(pki: PKI, threaded_server: Callable[..., ThreadedServer]) -> TLSServer:
    """ECDSA certificates: the default for mx.example.test; by SNI a.example.test, *.b..."""
    return start_tls_server(
        threaded_server,
        *pki.issue("mx", DEFAULT_NAME),
        sni_certificates=(pki.issue("a", "a.example.test"), pki.issue("b", "*.b.example.test")),
    )


@pytest.fixture
def rsa_server(pki: PKI, threaded_server: Callable[..., ThreadedServer]) -> TLSServer:
    """An RSA certificate, with which static-RSA (not forward secret) suites could work."""
    cert, key = pki.issue("rsa", DEFAULT_NAME, key_type=trustme.KeyType.RSA)
    return start_tls_server(threaded_server, cert, key)


def server_log(caplog: pytest.LogCaptureFixture, pattern: str) -> str:
    """The first server log message matching ``pattern``, waiting a little for it."""
    found: list[str] = []

    def logged() -> bool:
        messages = (record.getMessage() for record in list(caplog.records))
        found[:] = [message for message in messages if re.search(pattern, message)]
        return bool(found)

    wait_until(logged, lambda: f"a server log message matching {pattern!r}: {caplog.text}",
               TIMEOUT)
    return found[0]


LISTENERS = ["starttls", "implicit"]


# ------------------------------------------------------------------ implicit TLS


def test_implicit_tls_banner_only_after_handshake(tls_server: TLSServer, pki: PKI) -> None:
    with socket.create_connection(("127.0.0.1", tls_server.tls_port), timeout=TIMEOUT) as raw:
        # RFC 8314 section 3.3: the server speaks first only inside TLS.
        raw.settimeout(0.5)
        with pytest.raises(TimeoutError):
            raw.recv(1)
        raw.settimeout(TIMEOUT)
        tls = pki.client().wrap_socket(raw, server_hostname=DEFAULT_NAME)
        dialog = Dialog(tls)
        r = dialog.reply()
        assert (r.code, r.lines) == (220, [f"{DEFAULT_NAME} ESMTP ehlo ready"])
        assert tls.version() == "TLSv1.3"
        keywords = dialog.ehlo()
        # RFC 3207 section 4.2 and RFC 8314: no STARTTLS inside TLS.
        assert "STARTTLS" not in keywords and "PIPELINING" in keywords
        r = dialog.cmd("STARTTLS")
        assert (r.code, r.lines) == (503, ["5.5.1 TLS is already active"])
        # The session goes on inside the same TLS.
        assert dialog.cmd("NOOP").code == 250
        dialog.close()


def test_implicit_tls_message_records_tls(tls_server: TLSServer, pki: PKI) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1",
        tls_server.tls_port,
        local_hostname="ssl.example.test",
        context=pki.client(),
        timeout=TIMEOUT,
    ) as client:
        assert client.ehlo()[0] == 250
        assert not client.has_extn("starttls")
        assert isinstance(client.sock, ssl.SSLSocket)
        version, cipher = client.sock.version(), client.sock.cipher()
        assert version == "TLSv1.3" and cipher is not None
        refused = client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
        assert refused == {}
        assert client.noop()[0] == 250
    assert tls_server.threaded.server is not None
    [stored] = tls_server.threaded.server.store.list()
    queue_id = stored.envelope.queue_id
    tls, protocol, received = tls_server.stored(queue_id)
    assert tls is not None
    assert (tls["version"], tls["cipher"]) == ("TLSv1.3", cipher[0])
    assert protocol == "ESMTPS"
    assert f"with ESMTPS id {queue_id}" in received
    assert f"(using TLSv1.3 with cipher {cipher[0]})" in received
    assert received.startswith("Received: from ssl.example.test (unknown [127.0.0.1])")


def test_implicit_tls_port_never_answers_plaintext(tls_server: TLSServer, pki: PKI) -> None:
    received = b""
    with socket.create_connection(("127.0.0.1", tls_server.tls_port), timeout=TIMEOUT) as raw:
        raw.sendall(b"EHLO plain.example.test\r\n")
        # Read until the server closes (a server that waits would time out here).
        try:
            while data := raw.recv(4096):
                received += data
        except ConnectionResetError:
            pass
    # Not one byte of SMTP: no banner, no reply to EHLO (at most a TLS alert record).
    assert not re.search(rb"\d{3}[ -]", received), received
    assert received == b"" or received[:1] == b"\x15", received
    # The listener still serves TLS clients.
    dialog = Dialog.open(tls_server.tls_port, tls=pki.client())
    assert dialog.cmd("QUIT").code == 221
    dialog.close()


# ------------------------------------------------------------------ versions and ciphers


def s_client(port: int, listener: str, *args: str) -> tuple[int, str]:
    """``openssl s_client`` sending QUIT: its exit status and output.

    -msg shows the records each side sent; -ign_eof keeps the connection until
    the server closes it (without it, a line starting with Q means "quit").
    """
    command = [tool("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", "-msg", "-ign_eof"]
    command += args
    if listener == "starttls":
        command += ["-starttls", "smtp"]
    proc = subprocess.run(
        command,
        input=b"QUIT\r\n",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=TIMEOUT,
        check=False,
    )
    return proc.returncode, proc.stdout.decode("utf-8", "replace")


def server_records(output: str) -> list[str]:
    """What s_client received in TLS records (the ``<<<`` lines of -msg)."""
    return [line for line in output.splitlines() if line.startswith("<<< ")]


def assert_offered_and_refused(output: str, hello: str) -> None:
    """s_client sent a ``hello`` ClientHello and the server answered no ServerHello."""
    assert re.search(
        rf"^>>> {re.escape(hello)}, Handshake \[length [0-9a-f]+\], ClientHello$", output, re.M
    ), output
    assert not any("ServerHello" in line for line in server_records(output)), output
    assert "Cipher is (NONE)" in output and "CONNECTION ESTABLISHED" not in output, output


# Lets OpenSSL 3 offer what its default security level forbids.
ANY_CLIENT = "DEFAULT:@SECLEVEL=0"


@pytest.mark.external
@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize(("flag", "hello"), [("-tls1", "TLS 1.0"), ("-tls1_1", "TLS 1.1")])
def test_old_tls_versions_refused_by_the_server(
    tls_server: TLSServer,
    caplog: pytest.LogCaptureFixture,
    listener: str,
    flag: str,
    hello: str,
) -> None:
    caplog.set_level(logging.INFO, logger="ehlo")
    _, output = s_client(tls_server.port(listener), listener, flag, "-cipher", ANY_CLIENT)
    # The client did offer the old version, and got no ServerHello: no session.
    assert_offered_and_refused(output, hello)
    if listener == "starttls":
        # The server says why: the version, not the ciphers.
        server_log(caplog, r"UNSUPPORTED_PROTOCOL")


@pytest.mark.external
@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize(("flag", "version"), [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
def test_current_tls_versions_work(
    tls_server: TLSServer, listener: str, flag: str, version: str
) -> None:
    status, output = s_client(
        tls_server.port(listener), listener, flag, "-cipher", ANY_CLIENT, "-brief"
    )
    assert status == 0, output
    assert "CONNECTION ESTABLISHED" in output, output
    assert f"Protocol version: {version}" in output, output
    assert any("ServerHello" in line for line in server_records(output)), output
    # After the handshake the SMTP session answers QUIT.
    assert re.search(r"^221 mx\.example\.test closing connection\r?$", output, re.M), output


WEAK_TLS12_SUITES = [
    ("ecdsa", "ECDHE-ECDSA-AES128-SHA"),  # CBC
    ("ecdsa", "ECDHE-ECDSA-AES256-SHA384"),  # CBC
    ("rsa", "ECDHE-RSA-AES128-SHA"),  # CBC
    ("rsa", "AES128-GCM-SHA256"),  # RSA key exchange: no forward secrecy
    ("rsa", "AES128-SHA"),  # neither
]


def server_for(request: pytest.FixtureRequest, key: str) -> TLSServer:
    server = request.getfixturevalue("tls_server" if key == "ecdsa" else "rsa_server")
    assert isinstance(server, TLSServer)
    return server


@pytest.mark.external
@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize(("key", "cipher"), WEAK_TLS12_SUITES)
def test_weak_tls12_suites_refused_by_the_server(
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    listener: str,
    key: str,
    cipher: str,
) -> None:
    # Each suite would work with this server's certificate type; only the
    # server's policy can refuse it.
    caplog.set_level(logging.INFO, logger="ehlo")
    server = server_for(request, key)
    _, output = s_client(
        server.port(listener), listener, "-tls1_2", "-cipher", f"{cipher}:@SECLEVEL=0"
    )
    # The client offered the suite (the only one it had), and got no ServerHello.
    assert_offered_and_refused(output, "TLS 1.2")
    if listener == "starttls":
        server_log(caplog, r"NO_SHARED_CIPHER")


@pytest.mark.external
@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize(
    ("key", "cipher"),
    [
        ("ecdsa", "ECDHE-ECDSA-AES128-GCM-SHA256"),
        ("ecdsa", "ECDHE-ECDSA-CHACHA20-POLY1305"),
        ("rsa", "ECDHE-RSA-AES256-GCM-SHA384"),
        ("rsa", "ECDHE-RSA-CHACHA20-POLY1305"),
    ],
)
def test_forward_secret_aead_suites_accepted(
    request: pytest.FixtureRequest, listener: str, key: str, cipher: str
) -> None:
    # The controls for the refusals above: same client settings, good suites.
    server = server_for(request, key)
    status, output = s_client(
        server.port(listener), listener, "-tls1_2", "-cipher", f"{cipher}:@SECLEVEL=0", "-brief"
    )
    assert status == 0, output
    assert "Protocol version: TLSv1.2" in output, output
    assert f"Ciphersuite: {cipher}" in output, output
    assert re.search(r"^221 mx\.example\.test closing connection\r?$", output, re.M), output


# Key exchange groups: TLS 1.3 with the ECDSA certificate, TLS 1.2 (ECDHE) with
# the RSA one (in TLS 1.2 the client's groups also bind the curve of an ECDSA
# certificate, so a P-256 certificate needs a client offering P-256).
GROUP_CASES = [("-tls1_3", "ecdsa", "TLS 1.3"), ("-tls1_2", "rsa", "TLS 1.2")]


@pytest.mark.external
@pytest.mark.parametrize(
    ("flag", "key", "hello", "group"),
    [
        *[(*case, group) for case in GROUP_CASES for group in ("X448", "secp521r1")],
        # Finite-field groups are TLS 1.3 key shares (in TLS 1.2 they mean DHE).
        ("-tls1_3", "ecdsa", "TLS 1.3", "ffdhe2048"),
    ],
)
def test_groups_outside_the_profile_refused(
    request: pytest.FixtureRequest, flag: str, key: str, hello: str, group: str
) -> None:
    # Each group is in OpenSSL's default list; only X25519, P-256 and P-384
    # are in Mozilla's "intermediate" profile, and only they may be agreed.
    server = server_for(request, key)
    _, output = s_client(server.port("starttls"), "starttls", flag, "-groups", group)
    assert_offered_and_refused(output, hello)


@pytest.mark.external
@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize(("flag", "key", "hello"), GROUP_CASES)
@pytest.mark.parametrize(
    ("group", "shown"),
    [("X25519", "X25519"), ("prime256v1", "ECDH, prime256v1"), ("secp384r1", "ECDH, secp384r1")],
)
def test_profile_groups_accepted(
    request: pytest.FixtureRequest,
    listener: str,
    flag: str,
    key: str,
    hello: str,
    group: str,
    shown: str,
) -> None:
    server = server_for(request, key)
    status, output = s_client(server.port(listener), listener, flag, "-groups", group, "-brief")
    assert status == 0, output
    assert "CONNECTION ESTABLISHED" in output, output
    assert f"Server Temp Key: {shown}," in output, output
    assert re.search(r"^221 mx\.example\.test closing connection\r?$", output, re.M), output


@pytest.mark.external
@pytest.mark.parametrize("cipher", ["DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-CHACHA20-POLY1305"])
def test_dhe_suites_not_offered(pki: PKI, rsa_server: TLSServer, cipher: str) -> None:
    # The README says ECDHE only: a client with nothing but DHE gets no
    # session, and the server does not list suites it could never choose.
    _, output = s_client(rsa_server.port("starttls"), "starttls", "-tls1_2", "-cipher", cipher)
    assert_offered_and_refused(output, "TLS 1.2")
    listed = [
        suite["name"]
        for suite in server_context(
            *pki.issue("rsa-list", DEFAULT_NAME, key_type=trustme.KeyType.RSA)
        ).get_ciphers()
    ]
    assert listed and not [name for name in listed if name.startswith("DHE-")], listed


@pytest.mark.external
@pytest.mark.xfail(
    strict=True,
    reason="a refused handshake is closed without the protocol_version alert OpenSSL queued"
    " (RFC 8446 appendix D): the event loop's SSL transport aborts without flushing it",
)
@pytest.mark.parametrize("listener", LISTENERS)
def test_old_version_refusal_carries_an_alert(tls_server: TLSServer, listener: str) -> None:
    _, output = s_client(tls_server.port(listener), listener, "-tls1_1", "-cipher", ANY_CLIENT)
    assert any("Alert" in line and "protocol_version" in line for line in server_records(output)), (
        output
    )


# ------------------------------------------------------------------ SNI

SNI_CASES = [
    ("a.example.test", ["a.example.test"]),
    ("A.Example.Test", ["a.example.test"]),
    ("x.b.example.test", ["*.b.example.test"]),
    # RFC 6125 section 6.4.3: the wildcard is one whole label, never the bare name.
    ("b.example.test", [DEFAULT_NAME]),
    ("y.x.b.example.test", [DEFAULT_NAME]),
    ("other.example.test", [DEFAULT_NAME]),
    (None, [DEFAULT_NAME]),  # no SNI: the client connects to an IP address
]


@pytest.mark.parametrize("listener", LISTENERS)
def test_certificate_chosen_by_sni(tls_server: TLSServer, pki: PKI, listener: str) -> None:
    seen: dict[str | None, list[str]] = {}
    for name, _ in SNI_CASES:
        dialog = tls_server.connect(listener, pki.client(), server_hostname=name)
        try:
            seen[name] = dns_names(dialog.tls)
            assert "STARTTLS" not in dialog.ehlo()
        finally:
            dialog.close()
    assert seen == dict(SNI_CASES)


# ------------------------------------------------------------------ require_tls


def test_require_tls(pki: PKI, threaded_server: Callable[..., ThreadedServer]) -> None:
    cert, key = pki.issue("required", DEFAULT_NAME)
    srv = threaded_server(
        listen=(Listen("127.0.0.1", 0), Listen("127.0.0.1", 0, tls=True)),
        tls_cert=cert,
        tls_key=key,
        require_tls=True,
        reverse_dns=False,
    )
    assert srv.server is not None
    (_, plain), (_, implicit) = srv.server.addresses

    dialog = Dialog.open(plain)
    assert "STARTTLS" in dialog.ehlo()
    # RFC 3207 section 4: 530 until STARTTLS; nothing is accepted in between.
    r = dialog.cmd("MAIL FROM:<a@example.org>")
    assert (r.code, r.enhanced) == (530, "5.7.0"), r
    r = dialog.cmd("RCPT TO:<b@example.net>")
    assert r.code == 503, r
    dialog.starttls(pki.client(), DEFAULT_NAME)
    dialog.ehlo()
    starttls_id = dialog.send_message()
    dialog.cmd("QUIT")
    dialog.close()

    dialog = Dialog.open(implicit, tls=pki.client(), server_hostname=DEFAULT_NAME)
    dialog.ehlo()
    implicit_id = dialog.send_message()
    dialog.cmd("QUIT")
    dialog.close()

    # HELO (no STARTTLS possible) is refused too; no enhanced code without EHLO.
    dialog = Dialog.open(plain)
    assert dialog.cmd("HELO old.example.test").code == 250
    r = dialog.cmd("MAIL FROM:<a@example.org>")
    assert (r.code, r.lines) == (530, ["Must issue a STARTTLS command first"])
    dialog.close()

    listed = {m.envelope.queue_id: m.envelope for m in srv.server.store.list()}
    assert set(listed) == {starttls_id, implicit_id}
    assert all(env.tls is not None and env.protocol == "ESMTPS" for env in listed.values())


# ------------------------------------------------------------------ swaks


@pytest.mark.external
def test_swaks_tls_on_connect(tls_server: TLSServer, tmp_path: Path) -> None:
    data = tmp_path / "message.txt"
    data.write_bytes(b"Subject: swaks tlsc\n\nover implicit TLS\n")
    proc = subprocess.run(
        [
            tool("swaks"),
            "--server",
            "127.0.0.1",
            "--port",
            str(tls_server.tls_port),
            "--tls-on-connect",
            "--helo",
            "swaks.example.test",
            "--from",
            "a@example.org",
            "--to",
            "b@example.net",
            "--data",
            f"@{data}",
            "--timeout",
            "10",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=30,
        check=False,
    )
    output = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, output
    assert "TLS started with cipher" in output, output
    # TLS came before anything SMTP: the banner is already shown as encrypted.
    assert re.search(r"^<~\s+220 mx\.example\.test ESMTP", output, re.M), output
    assert "STARTTLS" not in output.split("EHLO swaks.example.test", 1)[1], output
    [queue_id] = QUEUED.findall(output)
    tls, protocol, received = tls_server.stored(queue_id)
    assert tls is not None and tls["version"] in ("TLSv1.2", "TLSv1.3")
    assert tls["cipher"] in output
    assert protocol == "ESMTPS"
    assert f"with ESMTPS id {queue_id}" in received


# ------------------------------------------------------------------ reload (SIGHUP)


class ServeProcess:
    """``ehlo serve`` as a child process, its stderr lines collected as they come."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ehlo", "serve", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=cwd,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, after: int = 0, timeout: float = TIMEOUT) -> int:
        """The index of the first log line from ``after`` on that matches ``pattern``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for index in range(after, len(self.lines)):
                    if re.search(pattern, self.lines[index]):
                        return index
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    pytest.fail(f"no log line matching {pattern!r}:\n" + "\n".join(self.lines))
                self._changed.wait(min(left, 0.2))

    def signal(self, signum: int) -> int:
        """Send ``signum``; the number of log lines before it."""
        with self._changed:
            count = len(self.lines)
        self.proc.send_signal(signum)
        return count

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def start(*args: str) -> ServeProcess:
        process = ServeProcess(list(args), tmp_path)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def peer_certificate(port: int, listener: str, ctx: ssl.SSLContext, name: str | None) -> str:
    """The fingerprint of the certificate a new connection gets."""
    if listener == "implicit":
        dialog = Dialog.open(port, tls=ctx, server_hostname=name)
    else:
        dialog = Dialog.open(port)
        dialog.ehlo()
        dialog.starttls(ctx, name)
    try:
        return fingerprint(dialog.tls.getpeercert(binary_form=True))
    finally:
        dialog.cmd("QUIT")
        dialog.close()


def test_sighup_reloads_certificates_without_dropping_sessions(
    pki: PKI, serve: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    cert, key = pki.issue("live", DEFAULT_NAME)
    first = fingerprint(der(cert))
    plain, implicit = free_port(), free_port()
    server = serve(
        "--listen",
        f"127.0.0.1:{plain}",
        "--listen-tls",
        f"127.0.0.1:{implicit}",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--data",
        str(tmp_path / "data"),
        "--no-reverse-dns",
        "--helo-policy",
        "off",
        "--workers",
        "2",  # the supervisor forwards SIGHUP to each worker
    )
    server.wait_for(r"\bready on 127\.0\.0\.1:\d+, 127\.0\.0\.1:\d+", timeout=20)
    ctx = pki.client()

    # A session inside TLS with the first certificate, kept open.
    old = Dialog.open(plain)
    old.ehlo()
    old.starttls(ctx, DEFAULT_NAME)
    assert fingerprint(old.tls.getpeercert(binary_form=True)) == first

    # New pair over the same files, then SIGHUP.
    new_cert, new_key = pki.issue("next", DEFAULT_NAME)
    cert.write_bytes(new_cert.read_bytes())
    key.write_bytes(new_key.read_bytes())
    second = fingerprint(der(cert))
    assert second != first
    mark = server.signal(signal.SIGHUP)
    reloaded = server.wait_for(r"TLS certificates reloaded", after=mark)
    server.wait_for(r"TLS certificates reloaded", after=reloaded + 1)  # both workers

    for listener, port in (("starttls", plain), ("implicit", implicit)):
        for name in (DEFAULT_NAME, None, DEFAULT_NAME, None):  # whichever worker answers
            assert peer_certificate(port, listener, ctx, name) == second, (listener, name)

    # The old session still works, inside its own TLS.
    assert "STARTTLS" not in old.ehlo()
    old_id = old.send_message()

    # A broken certificate: logged, the current pair stays, the server goes on.
    cert.write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    mark = server.signal(signal.SIGHUP)
    failed = server.wait_for(r"TLS reload failed", after=mark)
    assert str(cert) in server.lines[failed]
    assert server.proc.poll() is None
    for listener, port in (("starttls", plain), ("implicit", implicit)):
        assert peer_certificate(port, listener, ctx, DEFAULT_NAME) == second, listener
    assert old.cmd("NOOP").code == 250
    old.cmd("QUIT")
    old.close()

    server.signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
    server.wait_for(r"\bstopped\b")
    assert not any("Traceback" in line for line in server.lines), "\n".join(server.lines)

    store = open_store("sqlite", tmp_path / "data")
    stored = store.get(old_id)
    assert stored is not None
    assert stored.envelope.tls is not None and stored.envelope.protocol == "ESMTPS"
