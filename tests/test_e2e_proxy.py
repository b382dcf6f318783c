"""ehlo behind a real HAProxy: the PROXY protocol (v1 and v2) on opted-in listeners.

The client connects to HAProxy from 127.0.0.5 (or 127.0.0.6); HAProxy
connects to ehlo from 127.0.0.1 and names the client in its header. ehlo
must see the real client everywhere it matters: the Received header, the
envelope, the per-IP limits; and refuse peers that are not trusted proxies
or that send no valid header.
"""

from __future__ import annotations

import os
import smtplib
import socket
from collections.abc import Callable, Iterator

import pytest

from ehlo import Listen

from .haproxy import haproxy_available, run_haproxy
from .helpers import ThreadedServer, client_tls
from .trace import split_trace


@pytest.fixture(autouse=True)
def _need_haproxy() -> None:
    if not haproxy_available():
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed but CI is set: run `make test-deps`")
        pytest.skip("haproxy is not installed (make test-deps installs it)")


def closed_without_reply(sock: socket.socket) -> bool:
    """The server closed (or reset) the connection without sending anything."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def send_via(host: str, port: int, source: str, tag: str, *, tls: bool = False) -> str:
    """One message through HAProxy from ``source``; the queue id."""
    cls = smtplib.SMTP_SSL if tls else smtplib.SMTP
    kwargs = {"context": client_tls()} if tls else {}
    with cls(host, port, timeout=10, source_address=(source, 0), **kwargs) as client:
        client.ehlo("real-client.example")
        client.mail("a@example.net")
        client.rcpt("b@example.org")
        code, text = client.data(f"Subject: {tag}\r\n\r\nvia proxy\r\n".encode())
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[-1]


@pytest.fixture
def proxied(threaded_server: Callable[..., ThreadedServer]) -> Iterator[ThreadedServer]:
    srv = threaded_server(
        listen=(Listen("127.0.0.1", 0, proxy=True), Listen("127.0.0.1", 0, tls=True, proxy=True)),
        reverse_dns=False,
        max_connections_per_ip=1,
    )
    yield srv


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_real_client_ip_through_haproxy(proxied: ThreadedServer, version: str) -> None:
    server = proxied.server
    assert server is not None
    backend = server.addresses[0]
    with run_haproxy(backend, send_proxy=version) as (host, port):
        qid = send_via(host, port, "127.0.0.5", f"proxy {version}")
    stored = server.store.get(qid)
    assert stored is not None
    assert stored.envelope.client_ip == "127.0.0.5"
    raw = server.store.raw(qid)
    assert raw is not None
    fields, _ = split_trace(raw)
    received = fields[0].decode()
    assert "[127.0.0.5]" in received and "127.0.0.1" not in received, received


def test_implicit_tls_behind_haproxy(proxied: ThreadedServer) -> None:
    server = proxied.server
    assert server is not None
    backend = server.addresses[1]
    # HAProxy passes TLS through: the PROXY header, then the client's handshake.
    with run_haproxy(backend, send_proxy="v2", tls_passthrough=True) as (host, port):
        qid = send_via(host, port, "127.0.0.5", "tls via proxy", tls=True)
    stored = server.store.get(qid)
    assert stored is not None
    assert stored.envelope.client_ip == "127.0.0.5"
    assert stored.envelope.tls is not None and stored.envelope.protocol == "ESMTPS"


def test_per_ip_limit_uses_the_real_client(proxied: ThreadedServer) -> None:
    server = proxied.server
    assert server is not None
    with run_haproxy(server.addresses[0], send_proxy="v2") as (host, port):
        first = smtplib.SMTP(host, port, timeout=10, source_address=("127.0.0.5", 0))
        try:
            # The same real client again: over its limit of one connection.
            with pytest.raises(smtplib.SMTPConnectError) as refused:
                smtplib.SMTP(host, port, timeout=10, source_address=("127.0.0.5", 0))
            assert refused.value.smtp_code == 421
            # Another client behind the same proxy is its own address.
            with smtplib.SMTP(host, port, timeout=10, source_address=("127.0.0.6", 0)) as other:
                assert other.noop()[0] == 250
        finally:
            first.close()


def test_untrusted_peer_and_missing_header_are_dropped(
    threaded_server: Callable[..., ThreadedServer],
) -> None:
    srv = threaded_server(
        listen=(Listen("127.0.0.1", 0, proxy=True),), proxy_trusted=("127.0.0.1/32",),
        proxy_timeout=2.0,
    )
    host, port = srv.host, srv.port
    # A trusted peer that speaks SMTP instead of a PROXY header: closed, no banner.
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"EHLO sneaky.example\r\n")
        assert closed_without_reply(sock)
    # A forged header from a peer that is not a trusted proxy: closed unread.
    with socket.create_connection((host, port), timeout=5,
                                  source_address=("127.0.0.9", 0)) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 25\r\n")
        assert closed_without_reply(sock)
    # A trusted proxy with a valid v1 header gets the banner.
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 25\r\n")
        assert sock.recv(1024).startswith(b"220 ")
