"""Reverse DNS for the Received header: one lookup per address and TTL, nothing per message.

Clients come from documentation addresses (192.0.2.0/24) named by a PROXY
header on a listener that trusts 127.0.0.1, so that the server looks them
up in the loopback DNS server (tests/dnsserver.py), which counts the
queries it receives. Loopback clients need no lookup at all.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from ehlo import Listen
from ehlo.server import Server

from .dnsserver import DNSServer
from .helpers import Client

CONFIRMED = "192.0.2.7"  # PTR mail.client.test, whose A is the client
UNCONFIRMED = "192.0.2.8"  # PTR other.client.test, whose A is another address
NO_PTR = "192.0.2.9"  # NXDOMAIN

ZONE = {
    DNSServer.reverse(CONFIRMED): {"PTR": ["mail.client.test."]},
    "mail.client.test": {"A": [CONFIRMED]},
    DNSServer.reverse(UNCONFIRMED): {"PTR": ["other.client.test."]},
    "other.client.test": {"A": ["198.51.100.8"]},
}
EXPECTED = {CONFIRMED: "mail.client.test", UNCONFIRMED: "unknown", NO_PTR: "unknown"}

CONNECTIONS = 5
MESSAGES = 4


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE, ttl=300, negative_ttl=300) as server:
        yield server


class TaskNames:
    """The coroutine names of the tasks the running loop creates (a task factory)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __enter__(self) -> TaskNames:
        self.loop = asyncio.get_running_loop()
        self.previous = self.loop.get_task_factory()
        self.loop.set_task_factory(self._create)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.set_task_factory(self.previous)

    def _create(
        self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Future[Any]:
        self.names.append(getattr(coro, "__qualname__", repr(coro)))
        return asyncio.Task(coro, loop=loop, **kwargs)

    def count(self, qualname: str) -> int:
        return self.names.count(qualname)


async def proxied_session(server: Server, client_ip: str, messages: int) -> None:
    """One connection through a PROXY v1 header naming ``client_ip``, ``messages`` messages."""
    client = await Client.connect(server, banner=False)
    try:
        client.send(f"PROXY TCP4 {client_ip} 127.0.0.1 40000 25\r\n")
        assert (await client.reply()).code == 220
        await client.ehlo("client.example")
        for n in range(messages):
            assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250
            assert (await client.cmd("RCPT TO:<b@example.net>")).code == 250
            assert (await client.cmd("DATA")).code == 354
            reply = await client.cmd(f"Subject: {client_ip} {n}\r\n\r\nbody\r\n.")
            assert reply.code == 250, reply
        assert (await client.cmd("QUIT")).code == 221
    finally:
        client.close()


def received_names(server: Server) -> list[str]:
    """The client name of every stored message's Received header ("name [ip]")."""
    names = []
    for stored in server.store.list():
        raw = server.store.raw(stored.envelope.queue_id)
        assert raw is not None
        first = raw.split(b"\r\n", 1)[0].decode()
        assert first.startswith("Received: from client.example ("), first
        names.append(first.partition("(")[2].rstrip(")"))
    return names


@pytest.mark.parametrize("client_ip", [CONFIRMED, UNCONFIRMED, NO_PTR])
async def test_one_lookup_for_many_connections_and_messages(
    start: Callable[..., Awaitable[Server]], dns: DNSServer, client_ip: str
) -> None:
    server = await start(
        listen=(Listen("127.0.0.1", 0, proxy=True),),
        proxy_trusted=("127.0.0.1/32",),
        reverse_dns=True,
        dns_servers=(dns.nameserver,),
    )
    assert server.ctx is not None
    with TaskNames() as tasks:
        # The first connection looks the client up; the others, one after
        # another and then side by side, find every answer in the cache.
        await proxied_session(server, client_ip, MESSAGES)
        for _ in range(CONNECTIONS - 3):
            await proxied_session(server, client_ip, MESSAGES)
        await asyncio.gather(*(proxied_session(server, client_ip, MESSAGES) for _ in range(2)))
    # One PTR query in all (and one forward query for a PTR name), within the TTL.
    assert dns.count(DNSServer.reverse(client_ip), "PTR") == 1
    assert dns.count(rdtype="A") == (0 if client_ip == NO_PTR else 1)
    # Asked of the resolver at all (cache hits included): by the first
    # connection only; one lookup task in all.
    forward = 0 if client_ip == NO_PTR else 1
    assert server.ctx.resolver.queries == 1 + forward
    assert tasks.count("ServerContext._lookup") == 1
    # No message waited for the name, but perhaps the very first one.
    assert tasks.count("SMTPServerProtocol._complete") <= 1
    # The header names the verified PTR name (or "unknown") in every message.
    names = received_names(server)
    assert names == [f"{EXPECTED[client_ip]} [{client_ip}]"] * (CONNECTIONS * MESSAGES)


# Run in a fresh interpreter: whether the DNS library is loaded shows there.
_START = """
import asyncio, sys
from ehlo import Listen, Server, ServerConfig
from ehlo.config import GreetingConfig

async def main(reverse_dns):
    config = ServerConfig(
        listen=(Listen("127.0.0.1", 0),), data_dir=sys.argv[1], tls=False,
        reverse_dns=reverse_dns, dns_servers=(sys.argv[2],),
        greeting=GreetingConfig(policy="off"),
    )
    before = "dns.asyncresolver" in sys.modules
    async with Server(config):
        print(reverse_dns, before, "dns.asyncresolver" in sys.modules)

asyncio.run(main(sys.argv[3] == "on"))
"""


def test_dns_loaded_at_start_not_by_the_first_client(tmp_path: Path, dns: DNSServer) -> None:
    # Loading the DNS library takes a tenth of a second of CPU: done on a
    # first connection, it would stall every session of that event loop.
    # Without reverse DNS (and greeting checks) it is not loaded at all.
    for mode in ("on", "off"):
        argv = [sys.executable, "-c", _START, str(tmp_path / mode), dns.nameserver, mode]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        on = mode == "on"
        assert done.stdout.split() == [str(on), "False", str(on)]
