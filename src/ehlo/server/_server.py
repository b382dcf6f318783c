"""The embeddable server: listeners, shared state, limits and graceful shutdown.

``Server(config, store=..., hooks=...)`` is the library entry point; ``ehlo
serve`` is a thin wrapper around it. The server owns what all sessions share
(configuration, store, hooks, TLS context, reverse-DNS lookups, connection
counts) in a :class:`ServerContext`, and a sweeper that enforces timeouts for
every connection at once instead of one timer per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..config import ServerConfig
from ..dns import Resolver, loopback_name, reverse_name
from ..extensions import Extension, build_extensions
from ..greeting import GreetingVerifier
from ..policy import Hook, Hooks
from ..protocol import Reply
from ..storage import Store, open_store
from ._transport import SMTPServerProtocol

log = logging.getLogger("ehlo.server")


class ServerContext:
    """What every session of one server shares."""

    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        hooks: Hooks,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.config = config
        self.store = store
        self.hooks = hooks
        self.ssl_context = ssl_context
        limits = config.limits
        if ssl_context is not None and not limits.starttls:
            limits = dataclasses.replace(limits, starttls=True)
            self.config = dataclasses.replace(config, limits=limits)
        self.extensions: tuple[Extension, ...] = build_extensions(self.config.limits)
        self.domains = frozenset(d.lower().rstrip(".") for d in config.domains)
        name = config.hostname
        self.banner = Reply(220, None, f"{name} ESMTP ehlo ready")
        self.goodbye = Reply(221, "2.0.0", f"{name} closing connection")
        self.connections: set[SMTPServerProtocol] = set()
        self.per_ip: dict[str, int] = {}
        self.draining = False
        self.resolver = Resolver(list(config.dns_servers) or None, timeout=config.dns_timeout)
        policy = config.greeting.to_policy()
        self.verifier: GreetingVerifier | None = (
            GreetingVerifier(policy, self.resolver, our_names=(config.hostname,))
            if policy.enabled_checks
            else None
        )

    def admit(self, proto: SMTPServerProtocol) -> Reply | None:
        """Count a new connection, or the 421 that refuses it."""
        if self.draining:
            return Reply(421, "4.3.2", "Service shutting down, try again later")
        if len(self.connections) >= self.config.max_connections:
            return Reply(421, "4.7.0", "Too many connections, try again later")
        count = self.per_ip.get(proto.client_ip, 0)
        if count >= self.config.max_connections_per_ip:
            return Reply(421, "4.7.0", "Too many connections from your address, try again later")
        self.per_ip[proto.client_ip] = count + 1
        self.connections.add(proto)
        return None

    def release(self, proto: SMTPServerProtocol) -> None:
        """Forget a closed connection."""
        if proto in self.connections:
            self.connections.discard(proto)
            count = self.per_ip.get(proto.client_ip, 1) - 1
            if count <= 0:
                self.per_ip.pop(proto.client_ip, None)
            else:
                self.per_ip[proto.client_ip] = count

    def reverse_name(self, ip: str) -> asyncio.Future[str | None]:
        """A future of the client's forward-confirmed reverse name (or None).

        Answers come from the resolver's TTL cache; a loopback client needs no
        lookup and no task.
        """
        known = loopback_name(ip)
        if known is not None:
            fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
            fut.set_result(known)
            return fut
        return asyncio.ensure_future(self._lookup(ip))

    def add_our_addresses(self, addresses: Iterable[str]) -> None:
        """Record the addresses we listen on (for the not_us greeting check)."""
        if self.verifier is not None:
            wild = {"0.0.0.0", "::"}
            ours = [a for a in addresses if a not in wild]
            self.verifier.our_addresses = tuple(
                dict.fromkeys([*self.verifier.our_addresses, *ours])
            )

    async def _lookup(self, ip: str) -> str | None:
        try:
            return await reverse_name(self.resolver, ip, self.config.reverse_dns_timeout)
        except Exception as exc:  # DNS trouble is never fatal to a session
            log.debug("reverse DNS for %s failed: %s", ip, exc)
            return None


def _make_ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    if not config.tls:
        return None
    from .tls import ensure_self_signed, server_context

    if config.tls_cert is not None and config.tls_key is not None:
        cert, key = Path(config.tls_cert), Path(config.tls_key)
    else:
        cert, key = ensure_self_signed(Path(config.data_dir), config.hostname)
    return server_context(cert, key)


class Server:
    """An ESMTP server; use ``await start()`` / ``await stop()`` or ``async with``."""

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        store: Store | None = None,
        hooks: Hooks | Mapping[str, Iterable[Hook]] | None = None,
        sockets: Iterable[socket.socket] | None = None,
    ) -> None:
        self.config = config if config is not None else ServerConfig()
        self._store = store
        self._hooks = hooks if isinstance(hooks, Hooks) else Hooks(hooks)
        self._sockets = list(sockets) if sockets is not None else None
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._owns_store = store is None
        self.ctx: ServerContext | None = None
        self._stopped = asyncio.Event()

    @property
    def store(self) -> Store:
        """The message store (available after start)."""
        if self.ctx is None:
            raise RuntimeError("the server is not started")
        return self.ctx.store

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) pairs actually listened on (port 0 resolved)."""
        out: list[tuple[str, int]] = []
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                out.append((str(name[0]), int(name[1])))
        return out

    async def start(self) -> None:
        """Open the store, prepare TLS and start listening."""
        config = self.config
        store = self._store
        if store is None:
            store = open_store(config.store, Path(config.data_dir))
        await store.start()
        try:
            ssl_context = _make_ssl_context(config)
            ctx = ServerContext(config, store, self._hooks, ssl_context)
            self.ctx = ctx
            loop = asyncio.get_running_loop()

            def factory() -> SMTPServerProtocol:
                return SMTPServerProtocol(ctx)

            if self._sockets is not None:
                for sock in self._sockets:
                    self._servers.append(await loop.create_server(factory, sock=sock))
            else:
                for listen in config.listen:
                    server = await loop.create_server(
                        factory, listen.host, listen.port, reuse_address=True, backlog=1024
                    )
                    self._servers.append(server)
        except BaseException:
            for server in self._servers:
                server.close()
            if self._owns_store:
                await store.close()
            raise
        ctx.add_our_addresses(host for host, _ in self.addresses)
        self._sweeper = asyncio.ensure_future(self._sweep())
        for host, port in self.addresses:
            log.info("listening on %s port %d", host, port,
                     extra={"event": "listening", "host": host, "port": port})

    async def _sweep(self) -> None:
        # One timer for all connections: RFC 5321 section 4.5.3.2 timeouts.
        ctx = self.ctx
        assert ctx is not None
        interval = max(0.05, min(1.0, ctx.config.command_timeout / 4,
                                 ctx.config.data_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for proto in [p for p in ctx.connections if p.timeout_due(now)]:
                proto.close_for_timeout()

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting; let transactions finish within ``timeout``; close the rest 421."""
        ctx = self.ctx
        if ctx is None:
            return
        deadline = self.config.shutdown_timeout if timeout is None else timeout
        ctx.draining = True
        for server in self._servers:
            server.close()
        for proto in list(ctx.connections):
            proto.shutdown()
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while ctx.connections and loop.time() < end:
            await asyncio.sleep(0.02)
        for proto in list(ctx.connections):
            proto.force_close()
        # Give the transports a moment to flush their 421 and close.
        for _ in range(50):
            if not ctx.connections:
                break
            await asyncio.sleep(0.01)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()
        if self._owns_store:
            await ctx.store.close()
        self._stopped.set()
        log.info("stopped", extra={"event": "stopped"})

    async def serve_forever(self) -> None:
        """Wait until ``stop()`` has completed."""
        await self._stopped.wait()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
