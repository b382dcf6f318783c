"""ehlo.server.tls: the self-signed certificate, the server context and describe()."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import re
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ehlo.server.tls import (
    CERT_VALIDITY,
    TLSConfigError,
    describe,
    ensure_self_signed,
    server_context,
)

TLS_VERSIONS = {"TLSv1.2", "TLSv1.3"}


def load(cert: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert.read_bytes())


def client_context(cert: Path) -> ssl.SSLContext:
    """A client that trusts only ``cert``, verifying the host name."""
    return ssl.create_default_context(cafile=str(cert))


# ------------------------------------------------------------------ the certificate


def test_created_once_then_reused(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path, "localhost")
    assert (cert, key) == (tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem")
    before = (cert.read_bytes(), key.read_bytes(), cert.stat().st_mtime_ns)
    again = ensure_self_signed(tmp_path, "localhost")
    assert again == (cert, key)
    assert (cert.read_bytes(), key.read_bytes(), cert.stat().st_mtime_ns) == before
    assert sorted(p.name for p in cert.parent.iterdir()) == [".lock", "cert.pem", "key.pem"]


def test_key_and_folder_permissions(tmp_path: Path) -> None:
    _, key = ensure_self_signed(tmp_path, "localhost")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    key.chmod(0o644)
    ensure_self_signed(tmp_path, "localhost")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_certificate_contents_for_localhost(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    cert = load(ensure_self_signed(tmp_path, "localhost")[0])
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["localhost"]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    lifetime = cert.not_valid_after_utc - now
    assert CERT_VALIDITY - dt.timedelta(minutes=1) < lifetime <= CERT_VALIDITY


def test_certificate_for_another_host_name(tmp_path: Path) -> None:
    cert = load(ensure_self_signed(tmp_path, "Mail.Example.TEST.")[0])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.test"]
    assert san.get_values_for_type(x509.IPAddress) == []


def test_regenerated_when_host_name_changes(tmp_path: Path) -> None:
    cert, _ = ensure_self_signed(tmp_path, "one.example.test")
    first = cert.read_bytes()
    ensure_self_signed(tmp_path, "two.example.test")
    assert cert.read_bytes() != first
    san = load(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["two.example.test"]


def test_regenerated_when_expired(tmp_path: Path) -> None:
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    cert, key = ensure_self_signed(tmp_path, "localhost", now=long_ago)
    assert load(cert).not_valid_after_utc < dt.datetime.now(dt.UTC)
    ensure_self_signed(tmp_path, "localhost")
    assert load(cert).not_valid_after_utc > dt.datetime.now(dt.UTC)
    server_context(cert, key)  # the new pair matches


def test_regenerated_when_damaged(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path, "localhost")
    key.write_text("garbage\n")
    ensure_self_signed(tmp_path, "localhost")
    server_context(cert, key)


def test_unwritable_folder_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(TLSConfigError, match="cannot create"):
        ensure_self_signed(blocker, "localhost")


# ------------------------------------------------------------------ handshakes


async def test_handshake_over_loopback(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path, "localhost")
    server_ctx = server_context(cert, key)
    seen: dict[str, dict[str, str]] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["server"] = describe(writer.get_extra_info("ssl_object"))
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(cert), server_hostname="localhost"
            )
            ssl_object = writer.get_extra_info("ssl_object")
            assert isinstance(ssl_object, ssl.SSLObject)
            client_view = describe(ssl_object)
            writer.write(b"ping\n")
            assert await reader.readline() == b"ping\n"
            writer.close()
            await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()

    assert client_view == seen["server"]
    assert set(client_view) == {"version", "cipher", "bits"}
    assert client_view["version"] in TLS_VERSIONS
    assert ssl.TLSVersion[client_view["version"].replace(".", "_")] >= ssl.TLSVersion.TLSv1_2
    assert client_view["cipher"] == ssl_object.cipher()[0]  # type: ignore[index]
    assert int(client_view["bits"]) >= 128
    if client_view["version"] == "TLSv1.3":
        assert client_view["cipher"].startswith("TLS_")


def _serve_once(listener: socket.socket, ctx: ssl.SSLContext, out: dict[str, object]) -> None:
    conn, _ = listener.accept()
    conn.settimeout(10)
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            out["describe"] = describe(tls)
            tls.sendall(tls.recv(100))
    except (OSError, ssl.SSLError) as exc:
        out["error"] = exc
        conn.close()


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str
) -> tuple[dict[str, str], dict[str, object]]:
    """One TLS connection over a real loopback TCP socket pair, in blocking mode."""
    out: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        thread = threading.Thread(target=_serve_once, args=(listener, server_ctx, out))
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                assert isinstance(tls, ssl.SSLSocket)
                tls.sendall(b"hello")
                assert tls.recv(100) == b"hello"
                return describe(tls), out
        finally:
            thread.join(timeout=10)


def test_handshake_with_sslsocket_and_host_name(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path, "mail.example.test")
    client_view, out = _handshake(
        server_context(cert, key), client_context(cert), "mail.example.test"
    )
    assert client_view == out["describe"]
    assert client_view["version"] in TLS_VERSIONS


def test_wrong_host_name_fails_verification(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path, "mail.example.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_context(cert, key), client_context(cert), "other.example.test")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_old_tls_versions_refused(tmp_path: Path, version: str) -> None:
    cert, key = ensure_self_signed(tmp_path, "localhost")
    client = client_context(cert)
    client.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that the client would offer them
    client.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    client.maximum_version = ssl.TLSVersion[version]
    with pytest.raises(ssl.SSLError) as info:
        _handshake(server_context(cert, key), client, "localhost")
    assert "PROTOCOL_VERSION" in str(info.value).upper()


def test_tls12_works_and_is_described(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path, "localhost")
    client = client_context(cert)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client_view, out = _handshake(server_context(cert, key), client, "localhost")
    assert client_view == out["describe"]
    assert client_view["version"] == "TLSv1.2"
    assert client_view["cipher"].startswith("ECDHE-ECDSA-")
    assert "GCM" in client_view["cipher"] or "CHACHA20" in client_view["cipher"]


def test_describe_before_handshake_raises(tmp_path: Path) -> None:
    ctx = server_context(*ensure_self_signed(tmp_path, "localhost"))
    ssl_object = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    with pytest.raises(ValueError, match="handshake"):
        describe(ssl_object)


# ------------------------------------------------------------------ the context


def test_context_settings(tmp_path: Path) -> None:
    ctx = server_context(*ensure_self_signed(tmp_path, "localhost"))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(c["aead"] and c["kea"] in {"kx-ecdhe", "kx-dhe"} for c in tls12)


def test_mismatched_key(tmp_path: Path) -> None:
    cert, _ = ensure_self_signed(tmp_path / "a", "localhost")
    _, other_key = ensure_self_signed(tmp_path / "b", "localhost")
    with pytest.raises(TLSConfigError) as info:
        server_context(cert, other_key)
    message = str(info.value)
    assert "\n" not in message
    assert str(other_key) in message and "does not match" in message


def test_missing_or_unreadable_files(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path, "localhost")
    missing = tmp_path / "missing.pem"
    with pytest.raises(TLSConfigError, match=re.escape(f"certificate {missing}")):
        server_context(missing, key)
    with pytest.raises(TLSConfigError, match=re.escape(f"key {missing}")):
        server_context(cert, missing)
    with pytest.raises(TLSConfigError, match=re.escape(f"key {tmp_path}")):
        server_context(cert, tmp_path)  # a folder


def test_not_pem(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path, "localhost")
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    expected = re.escape(f"certificate {junk}: not a PEM certificate")
    with pytest.raises(TLSConfigError, match=expected):
        server_context(junk, key)
    with pytest.raises(TLSConfigError, match=re.escape(f"key {junk}: not a PEM private key")):
        server_context(cert, junk)


def test_encrypted_key_refused_without_prompting(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    cert, key = ensure_self_signed(tmp_path, "localhost")
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError, match="encrypted"):
        server_context(cert, encrypted)


def test_combined_pem_file(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path, "localhost")
    both = tmp_path / "both.pem"
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    server_context(both, both)
