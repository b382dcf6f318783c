"""The embeddable server: listeners, shared state, limits and graceful shutdown.

``Server(config, store=..., hooks=...)`` is the library entry point; ``ehlo
serve`` is a thin wrapper around it. The server owns what all sessions share
(configuration, store, hooks, TLS certificates, users, reverse-DNS lookups,
connection counts and abuse counters, the Prometheus metrics) in a
:class:`ServerContext`, the listeners (plain, implicit TLS, PROXY
protocol), and a sweeper that enforces
timeouts for every connection at once instead of one timer per connection.
It also owns the connection slots: the file-descriptor limit they need,
stress mode (shorter idle timeouts past a high-water mark) and, at the
limit, closing the connection idle longest to admit a newcomer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import resource
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Listen, ServerConfig
from ..extensions import Extension, build_extensions
from ..policy import Hook, Hooks
from ..protocol import Reply
from ..storage import Retention, Store, open_store
from ._cluster import Cluster
from ._hashing import VerifierPool
from ._transport import SMTPServerProtocol
from .abuse import (
    AccountGuard,
    AuthGuard,
    EventCounter,
    Networks,
    SharedCounters,
    WindowCounter,
)

if TYPE_CHECKING:
    from ..auth import UserStore
    from ..delivery.scheduler import Scheduler
    from ..dns import Resolver
    from ..greeting import GreetingVerifier
    from ..storage import Envelope
    from ..web._service import HTTPService
    from ._metrics import Metrics
    from .proxy import ProxyInfo
    from .tls import TLSContexts

log = logging.getLogger("ehlo.server")

# Password verifications (Argon2id, 64 MiB each) running at once.
_HASH_WORKERS = 2
# File descriptors kept beyond one per connection: listeners, the event
# loop, the store and its writer, DNS sockets, logs, a newcomer admitted
# before the connection it replaces has closed.
FD_RESERVE = 128
# Stress mode ends this far (as a fraction of max_connections) below where it began.
_STRESS_HYSTERESIS = 0.1

_fd_limits: dict[int, int] = {}  # max_connections -> connections the fd limit allows


def connection_capacity(max_connections: int) -> int:
    """How many connections this process can hold, ``max_connections`` at most.

    Each connection is a file descriptor. When the soft RLIMIT_NOFILE is
    below ``max_connections`` plus :data:`FD_RESERVE`, it is raised towards
    the hard limit; if even the hard limit is too low, one warning says so
    and the answer is what fits. Asked again (a forked worker), it answers
    from memory without a second warning.
    """
    known = _fd_limits.get(max_connections)
    if known is not None:
        return known
    needed = max_connections + FD_RESERVE
    capacity = max_connections
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # no such limit here
        soft = hard = resource.RLIM_INFINITY
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.debug("cannot raise the file descriptor limit: %s", exc)
        if soft < needed:
            capacity = max(1, soft - FD_RESERVE)
            log.warning(
                "file descriptor limit %d (hard limit %s) allows about %d connections,"
                " fewer than max_connections = %d: the limit is %d",
                soft, "unlimited" if hard == resource.RLIM_INFINITY else hard,
                capacity, max_connections, capacity,
                extra={"event": "fd_limit", "fd_limit": soft, "max_connections": capacity},
            )
    _fd_limits[max_connections] = capacity
    return capacity



class ServerContext:
    """What every session of one server shares."""

    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        hooks: Hooks,
        tls: TLSContexts | None,
        users: UserStore | None = None,
        shared: SharedCounters | None = None,
        metrics: Metrics | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self.config = config
        self.store = store
        # The Prometheus counters the sessions move (None: not counted).
        self.metrics = metrics
        # Open connections of every worker process (``ehlo serve --workers``).
        self.shared_counts = shared.connections if shared is not None else None
        self.hooks = hooks
        self.tls = tls
        self.ssl_context: ssl.SSLContext | None = tls.context if tls is not None else None
        self.users = users
        limits = config.limits
        if self.ssl_context is not None and not limits.starttls:
            limits = dataclasses.replace(limits, starttls=True)
        if users is not None and not limits.auth_mechanisms:
            from ..auth import MECHANISMS

            limits = dataclasses.replace(limits, auth_mechanisms=MECHANISMS)
        if limits is not config.limits:
            self.config = dataclasses.replace(config, limits=limits)
        # Users added or removed while the server runs count at the next EHLO.
        self.extensions: tuple[Extension, ...] = build_extensions(
            self.config.limits, (lambda: len(users) > 0) if users is not None else None
        )
        # Where each recipient goes (kept, handed on, refused): ehlo.delivery.routes.
        self.routing = config.routing()
        # The delivery scheduler when this process runs it (woken by new mail).
        self.scheduler: Scheduler | None = None
        # The embedding program's notice of each message committed (Server's on_stored).
        self.on_stored: Callable[[Envelope], None] | None = None
        # Every name this server answers as: Authentication-Results fields a
        # client sends with one of them as authserv-id are forged (RFC 8601 section 5).
        self.authserv_ids = frozenset(
            [config.hostname.lower().rstrip(".")]
            + [n for n in (tls.names() if tls is not None else []) if not n.startswith("*.")]
        )
        name = config.hostname
        self.banner = Reply(220, None, f"{name} ESMTP ehlo ready")
        self.goodbye = Reply(221, "2.0.0", f"{name} closing connection")
        # RFC 5321 section 3.8: a server may close a connection with 421.
        self.evicted = Reply(421, "4.4.2", f"{name} Idle connection closed to admit another client")
        self.connections: set[SMTPServerProtocol] = set()
        # Connections idle outside a transaction, the longest idle first (an
        # entry moves to the end when its connection is active again).
        self.idle: OrderedDict[SMTPServerProtocol, None] = OrderedDict()
        # max_connections, or fewer when the file-descriptor limit is lower.
        self.max_connections = connection_capacity(config.max_connections)
        # Stress mode: idle connections get stress_timeout instead of command_timeout.
        self.stress = False
        # Connections this process closed to admit another client.
        self.evictions = 0
        self.per_ip: dict[str, int] = {}
        self.exempt = Networks(config.limits_exempt)
        self.proxy_trusted = Networks(config.proxy_trusted)
        self.connection_rate: EventCounter = (
            shared.connection_rate if shared is not None else WindowCounter(60.0)
        )
        ip_failures: EventCounter = (
            shared.auth_failures if shared is not None else WindowCounter(config.auth_lockout)
        )
        account_failures: EventCounter = (
            shared.account_failures
            if shared is not None
            else WindowCounter(config.auth_user_lockout)
        )
        # Nodes on one PostgreSQL database add up their counts (ehlo.server._cluster).
        self.cluster = cluster
        if cluster is not None:
            self.connection_rate = cluster.counter(
                "connection_rate", self.connection_rate, config.max_connection_rate
            )
            ip_failures = cluster.counter(
                "auth_ip", ip_failures, config.max_auth_failures, lock=True
            )
            account_failures = cluster.counter(
                "auth_user", account_failures, config.max_auth_failures_per_user, lock=True
            )
        self.auth_guard = AuthGuard(
            config.max_auth_failures,
            config.auth_lockout,
            config.auth_failure_delay,
            ip_failures,
        )
        self.account_guard = AccountGuard(
            config.max_auth_failures_per_user,
            config.auth_user_lockout,
            account_failures,
        )
        self.verifiers = VerifierPool(
            _HASH_WORKERS, config.max_auth_queue, config.auth_queue_timeout
        )
        self.draining = False
        # DNS and greeting verification are imported only when used: a
        # server without them (--helo-policy off --no-reverse-dns) stays small.
        self._resolver: Resolver | None = None
        self.verifier: GreetingVerifier | None = None
        if config.reverse_dns:
            # Now, not on the first connection: importing dnspython there
            # would stall every session of this event loop.
            from .. import dns  # noqa: F401
        if config.greeting.active:
            from ..greeting import GreetingVerifier

            policy = config.greeting.to_policy()
            if policy.enabled_checks:
                self.verifier = GreetingVerifier(
                    policy, self.resolver, our_names=(config.hostname,)
                )

    def admit(self, proto: SMTPServerProtocol) -> Reply | None:
        """Count a new connection, or the 421 that refuses it."""
        config = self.config
        metrics = self.metrics
        if self.draining:
            if metrics is not None:
                metrics.refused["shutdown"].inc()
            return Reply(421, "4.3.2", "Service shutting down, try again later")
        # With several workers, the limits hold for the whole server.
        shared = self.shared_counts
        total = len(self.connections) if shared is None else shared.total()
        victim: SMTPServerProtocol | None = None
        if total >= self.max_connections:
            # A worker can only close its own connections: with none idle, refuse.
            victim = self.idlest()
            if victim is None:
                self._limit_refusal("max_connections")
                return Reply(421, "4.7.0", "Too many connections, try again later")
        # The per-address limits count an IPv6 client by its /64 (abuse.client_key).
        ip = proto.client_key
        count = self.per_ip.get(ip, 0)
        if proto.client_ip not in self.exempt:
            if (count if shared is None else shared.count(ip)) >= config.max_connections_per_ip:
                self._limit_refusal("max_connections_per_ip")
                return Reply(
                    421, "4.7.0", "Too many connections from your address, try again later"
                )
            rate = config.max_connection_rate
            if rate and self.connection_rate.hit(ip, time.monotonic()) > rate:
                self._limit_refusal("max_connection_rate")
                return Reply(
                    421,
                    "4.7.0",
                    "Too many connections from your address per minute, try again later",
                )
        if victim is not None:
            self.evict(victim, proto.client_ip)
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1  # the victim may have been from ip too
        self.connections.add(proto)
        if shared is not None:
            shared.add(ip)
        self.check_stress(total + (victim is None))
        if metrics is not None:
            metrics.connections.inc()
        return None

    def _limit_refusal(self, limit: str) -> None:
        """Count a connection refused at ``limit``."""
        metrics = self.metrics
        if metrics is not None:
            metrics.refused[limit].inc()
            metrics.limits[limit].inc()

    def idlest(self) -> SMTPServerProtocol | None:
        """The connection idle longest outside a transaction, or None."""
        idle = self.idle
        while idle:
            proto = next(iter(idle))
            if proto.evictable:
                return proto
            idle.pop(proto)  # stale: it re-enters when idle again
        return None

    def evict(self, proto: SMTPServerProtocol, newcomer: str) -> None:
        """Close ``proto`` with 421 4.4.2 to make room for a client from ``newcomer``."""
        idle_for = time.monotonic() - proto.last_activity
        self.evictions += 1
        if self.metrics is not None:
            self.metrics.evictions.inc()
        log.info(
            "evicted %s (idle %.1fs) to admit %s", proto.client_ip, idle_for, newcomer,
            extra={"event": "evicted", "client_ip": proto.client_ip, "idle": round(idle_for, 1),
                   "newcomer": newcomer},
        )
        proto.evict(self.evicted)
        self.release(proto)  # its slot is the newcomer's now, not when its socket closes

    def check_stress(self, total: int | None = None) -> None:
        """Enter or leave stress mode for ``total`` open connections (counted if None)."""
        if total is None:
            shared = self.shared_counts
            total = len(self.connections) if shared is None else shared.total()
        limit = self.max_connections
        threshold = self.config.stress_threshold
        if not self.stress and total >= threshold * limit:
            self.stress = True
            log.warning(
                "stress mode: %d of %d connections open; idle connections now time out"
                " after %gs", total, limit, self.config.stress_timeout,
                extra={"event": "stress", "connections": total, "max_connections": limit},
            )
        elif self.stress and total <= (threshold - _STRESS_HYSTERESIS) * limit:
            self.stress = False
            log.warning(
                "stress mode ended: %d of %d connections open", total, limit,
                extra={"event": "stress_end", "connections": total, "max_connections": limit},
            )

    async def verify_password(self, name: str, password: str) -> bool:
        """Check a user's password off the event loop (Argon2id is slow by design).

        Bounded (each verification takes 64 MiB): raises
        :class:`~ehlo.server._hashing.VerifierBusy` when it could not start in
        time, the queue of logins is full, or the server is stopping.
        """
        users = self.users
        if users is None:
            return False
        return await self.verifiers.run(users.verify, name, password)

    def prune(self, now: float) -> None:
        """Forget abuse counters whose window has ended (called by the sweeper)."""
        self.connection_rate.prune(now)
        self.auth_guard.prune(now)
        self.account_guard.prune(now)

    def close(self) -> None:
        """Release what the context started (the password-hashing threads).

        Logins still waiting for a verification get 454 at once; one in
        progress ends on its own (one hash) and holds up neither ``stop``
        nor the process's exit beyond that.
        """
        self.verifiers.close()

    def release(self, proto: SMTPServerProtocol) -> None:
        """Forget a closed connection."""
        self.idle.pop(proto, None)
        if proto in self.connections:
            self.connections.discard(proto)
            key = proto.client_key
            if self.shared_counts is not None:
                self.shared_counts.remove(key)
            count = self.per_ip.get(key, 1) - 1
            if count <= 0:
                self.per_ip.pop(key, None)
            else:
                self.per_ip[key] = count
            if self.stress:
                self.check_stress()

    @property
    def resolver(self) -> Resolver:
        """The DNS resolver (with its TTL cache) all sessions share, made on first use."""
        if self._resolver is None:
            from ..dns import Resolver

            config = self.config
            self._resolver = Resolver(list(config.dns_servers) or None, timeout=config.dns_timeout)
        return self._resolver

    def reverse_name(self, ip: str) -> str | asyncio.Future[str | None] | None:
        """The client's forward-confirmed reverse name (or None), or a future of it.

        A loopback client, and one whose answers are all in the resolver's
        TTL cache (shared by every connection of this process), get the name
        at once: no query and no task. Otherwise one lookup task; concurrent
        ones for the same address share their queries.
        """
        from ..dns import loopback_name, peek_reverse_name

        known = loopback_name(ip)
        if known is not None:
            return known
        cached, name = peek_reverse_name(self.resolver, ip)
        if cached:
            return name
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
            from ..dns import reverse_name

            return await reverse_name(self.resolver, ip, self.config.reverse_dns_timeout)
        except Exception as exc:  # DNS trouble is never fatal to a session
            log.debug("reverse DNS for %s failed: %s", ip, exc)
            return None


def tls_contexts_for(config: ServerConfig) -> TLSContexts | None:
    """The server's TLS contexts (None without TLS); TLSConfigError for unusable files."""
    if not config.tls:
        if any(listen.tls for listen in config.listen):
            raise ValueError("implicit TLS listeners need TLS (remove --no-tls)")
        return None
    from .tls import TLSContexts, ensure_self_signed

    if config.tls_cert is not None and config.tls_key is not None:
        cert, key = Path(config.tls_cert), Path(config.tls_key)
    else:
        cert, key = ensure_self_signed(Path(config.data_dir), config.hostname)
    return TLSContexts((cert, key), config.sni_certificates)


def _open_users(config: ServerConfig, cluster: Cluster | None = None) -> UserStore | None:
    """The user database (AUTH is offered whenever it holds a user).

    The users file of the data folder, or the users table the nodes on one
    PostgreSQL database share (``cluster``).
    """
    if not config.auth:
        return None
    from ..auth import UserStore

    users = cluster.open_users() if cluster is not None else UserStore(Path(config.data_dir))
    if len(users) == 0 and config.submission:
        log.warning(
            "submission mode without users: nobody can authenticate"
            " (add one with `ehlo users add NAME`)"
        )
    return users


class _ProxyListener:
    """A listener whose peers send a PROXY protocol header first.

    It accepts connections itself, reads exactly the header (nothing after it:
    the TLS handshake of an implicit-TLS listener follows on the same socket),
    then hands the socket to the event loop with the real client's address.
    Only peers in ``proxy_trusted`` may connect.
    """

    def __init__(self, ctx: ServerContext, sock: socket.socket, listen: Listen) -> None:
        self.ctx = ctx
        self.sockets = [sock]
        self.listen = listen
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self.sockets[0]
        while True:
            try:
                conn, address = await loop.sock_accept(sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                log.warning("accept failed on %s: %s", self.listen, exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.ensure_future(self._handshake(conn, address))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _handshake(self, conn: socket.socket, address: tuple[object, ...]) -> None:
        from .proxy import ProxyError, read_header

        ctx = self.ctx
        peer = str(address[0])
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        if peer not in ctx.proxy_trusted:
            log.warning(
                "refused %s on PROXY listener %s: not a trusted proxy",
                peer,
                self.listen,
                extra={"event": "proxy_refused", "client_ip": peer},
            )
            if ctx.metrics is not None:
                ctx.metrics.refused["proxy_untrusted"].inc()
            conn.close()
            return
        try:
            info = await read_header(loop, conn, ctx.config.proxy_timeout)
        except (ProxyError, TimeoutError, OSError) as exc:
            log.warning(
                "bad PROXY header from %s: %s",
                peer,
                exc,
                extra={"event": "proxy_error", "client_ip": peer},
            )
            if ctx.metrics is not None:
                ctx.metrics.refused["proxy_header"].inc()
            conn.close()
            return
        except asyncio.CancelledError:
            conn.close()
            raise

        def factory() -> SMTPServerProtocol:
            return SMTPServerProtocol(ctx, implicit_tls=self.listen.tls, proxy=info)

        try:
            await loop.connect_accepted_socket(
                factory,
                conn,
                ssl=ctx.ssl_context if self.listen.tls else None,
                ssl_handshake_timeout=_handshake_timeout(ctx) if self.listen.tls else None,
            )
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as exc:
            log.info("connection from %s via proxy %s failed: %s", _client(info, peer), peer, exc)
            conn.close()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in list(self._pending):
            task.cancel()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()

    async def wait_closed(self) -> None:
        tasks = [t for t in (self._task, *self._pending) if t is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def http_exposure_error(host: str, port: int) -> str:
    """The one line refusing a web UI beyond loopback without a login or a waiver."""
    from .._net import format_hostport

    return (
        f"web UI on {format_hostport(host, port)} is reachable beyond loopback: add"
        " --http-auth (HTTPS and a login from the users file) or --http-insecure"
        " (http_auth / http_insecure in the config file)"
    )


def _client(info: ProxyInfo, peer: str) -> str:
    return info.source[0] if info.source is not None else peer


def _handshake_timeout(ctx: ServerContext) -> float:
    return min(60.0, ctx.config.command_timeout)


class Server:
    """An ESMTP server; use ``await start()`` / ``await stop()`` or ``async with``.

    ``on_stored``: called with the envelope of each message once the store
    has committed it (its ``queue_id`` is the store's id, so the message can
    be read back at once), on the server's event loop, before the client
    gets its 250; it must not block. An exception it raises is logged and
    changes nothing for the session. ``ehlo.testing`` waits on it.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        store: Store | None = None,
        hooks: Hooks | Mapping[str, Iterable[Hook]] | None = None,
        sockets: Iterable[socket.socket] | None = None,
        shared_counters: SharedCounters | None = None,
        tls: TLSContexts | None = None,
        delivery: bool | None = None,
        clock: Callable[[], float] | None = None,
        http: Listen | tuple[str, int] | socket.socket | None = None,
        on_stored: Callable[[Envelope], None] | None = None,
        metrics_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.config = config if config is not None else ServerConfig()
        self._on_stored = on_stored
        # The web UI and API (ehlo.web) in this loop: an address, a bound
        # socket (ehlo serve binds it first), or None (no HTTP). With
        # ``config.http_auth``: HTTPS with the server's certificate and HTTP
        # Basic against the users file.
        self._http_spec = http
        self.http: HTTPService | None = None
        # The delivery scheduler: None runs it when the routing hands mail on
        # (ehlo serve runs it in one worker only); ``clock`` is its clock.
        self._delivery = delivery
        self._clock = clock
        self.scheduler: Scheduler | None = None
        # TLS contexts loaded already (``ehlo serve`` reads keys before it
        # gives up root); None: loaded by start().
        self._tls = tls
        # Several processes serving the same listeners share their abuse
        # counts here, so that the limits hold for all of them together.
        self._shared_counters = shared_counters
        self._store = store
        self._hooks = hooks if isinstance(hooks, Hooks) else Hooks(hooks)
        self._sockets = list(sockets) if sockets is not None else None
        self._servers: list[asyncio.Server | _ProxyListener] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._owns_store = store is None
        self.ctx: ServerContext | None = None
        self._stopped = asyncio.Event()
        # The Prometheus counters (config ``metrics``): this server's own,
        # or, with ``metrics_dir`` (``ehlo serve --workers N``), files in that
        # folder summed with the other workers' (ehlo.server._metrics).
        self.metrics: Metrics | None = None
        if self.config.metrics:
            from ._metrics import Metrics

            self.metrics = Metrics(metrics_dir)

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
            store = open_store(
                config.store,
                Path(config.data_dir),
                shared=config.workers > 1,
                writer=config.sqlite_writer,
                writer_address=config.sqlite_writer_address,
                retention=Retention(config.keep_messages, config.keep_days),
                database_url=config.database_url,
            )
        await store.start()
        cluster: Cluster | None = None
        try:
            tls = self._tls if self._tls is not None else tls_contexts_for(config)
            cluster = Cluster.open(config, store)
            ctx = ServerContext(
                config, store, self._hooks, tls, _open_users(config, cluster),
                self._shared_counters, self.metrics, cluster,
            )
            ctx.on_stored = self._on_stored
            self.ctx = ctx
            sockets: list[socket.socket | None] = (
                list(self._sockets) if self._sockets is not None else [None] * len(config.listen)
            )
            listens = list(config.listen)
            if len(listens) != len(sockets):
                listens = [Listen("", 0)] * len(sockets)  # sockets given without their specs
            for listen, sock in zip(listens, sockets, strict=True):
                await self._listen(ctx, listen, sock)
        except BaseException:
            for server in self._servers:
                server.close()
            if cluster is not None:
                await cluster.close()
            if self._owns_store:
                await store.close()
            raise
        if cluster is not None:
            await cluster.start()
        ctx.add_our_addresses(host for host, _ in self.addresses)
        if self._delivery is not False and not ctx.routing.catch_all:
            await self._start_delivery(ctx)
        if self._http_spec is not None:
            try:
                await self._start_http(ctx, self._http_spec)
            except BaseException:
                await self.stop(timeout=0)
                raise
        # A worker's start is its supervisor's to log (once for the server).
        level = logging.DEBUG if ctx.shared_counts is not None else logging.INFO
        if tls is not None and tls.names():
            log.log(level, "TLS certificates by SNI for %s", ", ".join(tls.names()))
        self._sweeper = asyncio.ensure_future(self._sweep())
        for host, port in self.addresses:
            log.log(
                level,
                "listening on %s port %d",
                host,
                port,
                extra={"event": "listening", "host": host, "port": port},
            )

    async def _start_delivery(self, ctx: ServerContext) -> None:
        """Start the scheduler that hands queued mail on (ehlo.delivery)."""
        from ..delivery.scheduler import Scheduler

        if ctx.store.queue is None:
            log.warning(
                "the %s store keeps no outbound queue: relayed mail is refused", ctx.store.name
            )
            return
        settings = self.config.delivery_settings(own_addresses=self.addresses)
        scheduler = Scheduler(
            ctx.store, settings, lambda: ctx.resolver, hooks=self._hooks,
            clock=self._clock or time.time,
        )
        await scheduler.start()
        self.scheduler = ctx.scheduler = scheduler

    async def _start_http(
        self, ctx: ServerContext, spec: Listen | tuple[str, int] | socket.socket
    ) -> None:
        """Serve the web UI and API (``ehlo.web``) in this event loop."""
        from ..config import http_exposed
        from ..web import WebContext
        from ..web._service import HTTPService

        config = self.config
        sock = spec if isinstance(spec, socket.socket) else None
        if isinstance(spec, Listen):
            host, port = spec.host, spec.port
        elif isinstance(spec, tuple):
            host, port = spec
        else:
            host, port = str(spec.getsockname()[0]), int(spec.getsockname()[1])
        if http_exposed(host) and not (config.http_auth or config.http_insecure):
            raise ValueError(http_exposure_error(host, port))
        users = None
        ssl_context = None
        if config.http_auth:
            from ..auth import UserStore

            ssl_context = ctx.ssl_context
            if ssl_context is None:
                raise ValueError("--http-auth needs TLS for HTTPS (remove --no-tls)")
            users = ctx.users if ctx.users is not None else UserStore(Path(config.data_dir))
            if len(users) == 0:
                log.warning(
                    "web UI with --http-auth but no users: nobody can log in"
                    " (add one with `ehlo users add NAME`)"
                )
        service = HTTPService(
            WebContext(
                store=ctx.store,
                users=users,
                # Worker 0 renders the sum over every worker's counts.
                metrics=self.metrics.exposition if self.metrics is not None else None,
            ),
            sock=sock, host=host, port=port, ssl_context=ssl_context,
        )
        await service.start()
        self.http = service
        log.info(
            "web UI and API on %s", service.url, extra={"event": "http", "url": service.url}
        )

    async def _listen(self, ctx: ServerContext, listen: Listen, sock: socket.socket | None) -> None:
        loop = asyncio.get_running_loop()
        if listen.proxy:
            if sock is None:
                from .workers import bind_listeners

                sock = bind_listeners([listen])[0]
            proxied = _ProxyListener(ctx, sock, listen)
            self._servers.append(proxied)
            proxied.start()
            return
        implicit = listen.tls

        def factory() -> SMTPServerProtocol:
            return SMTPServerProtocol(ctx, implicit_tls=implicit)

        # RFC 8314 section 3: implicit TLS, the handshake before the banner.
        ssl_context = ctx.ssl_context if implicit else None
        timeout = _handshake_timeout(ctx) if implicit else None
        if sock is not None:
            server = await loop.create_server(
                factory, sock=sock, ssl=ssl_context, ssl_handshake_timeout=timeout
            )
        else:
            server = await loop.create_server(
                factory,
                listen.host,
                listen.port,
                reuse_address=True,
                backlog=1024,
                ssl=ssl_context,
                ssl_handshake_timeout=timeout,
            )
        self._servers.append(server)

    def reload(self) -> None:
        """Read the TLS certificates and the users again (SIGHUP); sessions keep running.

        A certificate that cannot be loaded is logged and the current ones stay.
        """
        ctx = self.ctx
        if ctx is None:
            return
        if ctx.tls is not None:
            from .tls import TLSConfigError

            try:
                ctx.tls.reload()
            except TLSConfigError as exc:
                log.error(
                    "TLS reload failed, keeping the current certificates: %s",
                    exc,
                    extra={"event": "reload_failed", "error": str(exc)},
                )
            else:
                log.info("TLS certificates reloaded", extra={"event": "reloaded"})
        if ctx.cluster is not None:
            ctx.cluster.wake_users()  # read in the background: the database may be slow
        elif ctx.users is not None:
            ctx.users.refresh()

    async def _sweep(self) -> None:
        # One timer for all connections: RFC 5321 section 4.5.3.2 timeouts.
        ctx = self.ctx
        assert ctx is not None
        interval = max(
            0.05,
            min(
                1.0,
                ctx.config.command_timeout / 4,
                ctx.config.data_timeout / 4,
                ctx.config.stress_timeout / 4,
            ),
        )
        last_prune = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            if ctx.shared_counts is not None:
                ctx.check_stress()  # other workers' connections come and go too
            for proto in [p for p in ctx.connections if p.timeout_due(now)]:
                proto.close_for_timeout()
            if now - last_prune > 10.0:
                ctx.prune(now)
                last_prune = now

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting; let transactions finish within ``timeout``; close the rest 421."""
        ctx = self.ctx
        if ctx is None:
            return
        deadline = self.config.shutdown_timeout if timeout is None else timeout
        ctx.draining = True
        ctx.verifiers.close()  # logins waiting for a password check: 454 now
        http, self.http = self.http, None
        if http is not None:
            await http.stop()
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
        if self.scheduler is not None:
            await self.scheduler.stop()
            self.scheduler = ctx.scheduler = None
        if ctx.cluster is not None:
            await ctx.cluster.close()
        if self._owns_store:
            await ctx.store.close()
        ctx.close()
        self._stopped.set()
        level = logging.DEBUG if ctx.shared_counts is not None else logging.INFO  # see start()
        log.log(level, "stopped", extra={"event": "stopped"})

    async def serve_forever(self) -> None:
        """Wait until ``stop()`` has completed."""
        await self._stopped.wait()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
