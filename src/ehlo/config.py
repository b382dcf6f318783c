"""Configuration: validated, frozen dataclasses, from defaults, TOML and the CLI.

Every field is documented where it is declared: each key's meaning in one
line in its ``_Key(doc=...)`` (what ``ehlo config defaults`` prints), more in
the comment above it when there is more to say. ``ServerConfig`` is what the
server and its sessions read; ``ProtocolLimits`` is the part the sans-IO
protocol core needs, so that the core never sees anything else.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

# Public API: `from ehlo.config import ProtocolLimits` keeps working.
from .protocol import ProtocolLimits as ProtocolLimits

if TYPE_CHECKING:
    import ssl

    from .delivery.routes import Routing
    from .delivery.scheduler import DeliverySettings
    from .greeting import GreetingPolicy

from typing import Annotated, get_type_hints

from ._net import format_hostport, is_hostname, parse_hostport

StoreKind = Literal["sqlite", "maildir", "null", "postgresql"]
LogFormat = Literal["text", "json"]


class ConfigError(ValueError):
    """A bad option or config key; the message names it in one line."""


LISTEN_OPTIONS = ("tls", "proxy")


@dataclasses.dataclass(frozen=True, slots=True)
class Listen:
    """One listening address.

    ``tls``: implicit TLS, the handshake before the banner (RFC 8314, as on
    port 465). ``proxy``: a trusted proxy sends a PROXY protocol header
    (HAProxy's v1 or v2) before anything else, naming the real client.
    """

    host: str
    port: int
    tls: bool = False
    proxy: bool = False

    def __str__(self) -> str:
        flags = "".join(f",{name}" for name in LISTEN_OPTIONS if getattr(self, name))
        return f"{format_hostport(self.host, self.port)}{flags}"

    @classmethod
    def parse(cls, text: str, *, option: str = "--listen") -> Listen:
        """Parse ``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (all addresses).

        Options follow after commas: ``127.0.0.1:465,tls`` (implicit TLS),
        ``127.0.0.1:2526,proxy`` (PROXY protocol), or both.
        """
        value, *options = text.strip().split(",")
        flags: dict[str, bool] = {}
        for opt in options:
            name = opt.strip().lower()
            if name not in LISTEN_OPTIONS:
                raise ConfigError(
                    f"{option}: unknown listener option {opt.strip()!r} in {text!r}"
                    f" (expected {' or '.join(LISTEN_OPTIONS)})"
                )
            flags[name] = True
        try:
            host, port = parse_hostport(value, None, min_port=0, shown=text)
        except ValueError as exc:
            raise ConfigError(f"{option}: {exc}") from None
        if host:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                if host != "localhost":
                    raise ConfigError(
                        f"{option}: host must be an IP address or localhost, got {host!r}"
                    ) from None
        return cls(host or "0.0.0.0", port, **flags)


# The web UI and API's address when the ``http`` key is unset.
HTTP_DEFAULT = Listen("127.0.0.1", 8025)


@dataclasses.dataclass(frozen=True, slots=True)
class _Key:
    """How a configuration field is loaded (in ``Annotated`` on the field).

    ``check`` validates a value and returns it as the field holds it; a
    ``ConfigError`` names the key. ``doc``: what the key means, in one line
    (``ehlo config defaults`` prints it; a key without one stops the module
    from loading). ``name``: the key in TOML and overrides, when it is not
    the field's name. ``files``: how a value read from a config file is made
    relative to the file's folder (paths).
    """

    check: Callable[[str, Any], Any]
    name: str | None = None
    files: Callable[[Path, Any], Any] | None = None
    doc: str = ""


# The other marks a field carries: loaded from a table of its own, or not
# configuration at all (set by the program). A field without any mark is
# an error when the key tables are built.
_TABLE = "table"
_NOT_A_KEY = "not a key"


@dataclasses.dataclass(frozen=True, slots=True)
class GreetingConfig:
    """Greeting verification (``ehlo.greeting``): what runs and what it may refuse."""

    # Preset: "off" (no checks), "record" (checks recorded, nothing refused;
    # RFC 5321 section 4.1.4) or "strict" (failures of the identity checks rejected).
    policy: Annotated[
        str,
        _Key(
            _greeting_preset,
            doc="preset of the greeting checks: off, record (nothing refused) or strict",
        ),
    ] = "record"
    # Per-check overrides of the preset: check name -> off | record | defer | reject.
    checks: Annotated[Mapping[str, str], _TABLE] = dataclasses.field(default_factory=dict)
    stage: Annotated[
        str,
        _Key(_greeting_stage, doc="when the greeting verdict is applied: helo, mail, rcpt or data"),
    ] = "rcpt"
    trusted_networks: Annotated[
        tuple[str, ...],
        _Key(_networks, doc="client networks (CIDR) whose greetings are not checked"),
    ] = ()
    max_queries: Annotated[
        int, _Key(_positive_int, doc="DNS lookups the checks of one session may make")
    ] = 50
    timeout: Annotated[
        float,
        _Key(
            _positive_seconds,
            doc="seconds all checks of one greeting may take; beyond, they are temperror",
        ),
    ] = 10.0

    @property
    def active(self) -> bool:
        """False when no check can run (policy "off" and no check switched on)."""
        return self.policy != "off" or any(mode != "off" for mode in self.checks.values())

    def to_policy(self) -> GreetingPolicy:
        """The ``GreetingPolicy`` this configuration describes (ValueError if invalid)."""
        from .greeting import GreetingPolicy

        networks = tuple(ipaddress.ip_network(n, strict=False) for n in self.trusted_networks)
        return GreetingPolicy.preset(
            self.policy,
            modes=dict(self.checks),
            stage=self.stage,
            trusted_networks=networks,
            max_queries=self.max_queries,
            timeout=self.timeout,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything ``ehlo serve`` and ``ehlo.Server`` read."""

    listen: Annotated[
        tuple[Listen, ...],
        _Key(
            _listen,
            doc="addresses: HOST:PORT, [IPv6]:PORT or :PORT, options ,tls (implicit TLS) ,proxy",
        ),
    ] = (Listen("127.0.0.1", 2525),)
    data_dir: Annotated[
        Path,
        _Key(
            _path, files=_relative_path,
            doc="folder of the store, the users file, the self-signed certificate",
        ),
    ] = Path("ehlo-data")
    store: Annotated[
        StoreKind,
        _Key(
            _choice("sqlite", "maildir", "null", "postgresql"),
            doc="storage backend: sqlite, maildir, null (discard) or postgresql (database_url)",
        ),
    ] = "sqlite"
    # The PostgreSQL store's database (store = "postgresql"): a libpq URL
    # or key=value string without a password; libpq finds that where it
    # always does (PGPASSWORD, ~/.pgpass or PGPASSFILE, a service file).
    database_url: Annotated[
        str | None,
        _Key(
            _database_url,
            doc="the PostgreSQL store's database: postgresql://USER@HOST/DB (no password in it)",
        ),
    ] = None
    hostname: Annotated[
        str,
        _Key(_hostname, doc="our host name: in the banner, the EHLO reply and Received headers"),
    ] = "localhost"
    domains: Annotated[
        tuple[str, ...],
        _Key(
            _domains,
            doc="accept only these recipient domains (and postmaster); empty: accept all",
        ),
    ] = ()
    # TLS: a certificate and key (PEM); without them a self-signed pair is
    # created in data_dir on first run, unless tls is False.
    tls: Annotated[
        bool,
        _Key(_bool, doc="offer STARTTLS (a self-signed pair in data_dir unless tls_cert is set)"),
    ] = True
    tls_cert: Annotated[
        Path | None,
        _Key(
            _optional_path,
            files=_relative_path,
            doc="certificate chain (PEM file); unset: the self-signed one",
        ),
    ] = None
    tls_key: Annotated[
        Path | None,
        _Key(_optional_path, files=_relative_path, doc="private key (PEM file) of tls_cert"),
    ] = None
    # More certificates (cert, key), chosen by the name a client asks for
    # with SNI; tls_cert (or the self-signed pair) serves everything else.
    sni_certificates: Annotated[
        tuple[tuple[Path, Path], ...],
        _Key(
            _sni_certificates,
            files=_relative_pairs,
            doc="more [certificate, key] pairs, chosen by the name a client asks with SNI",
        ),
    ] = ()
    # RFC 3207 section 4: refuse MAIL with 530 5.7.0 until STARTTLS is done.
    require_tls: Annotated[
        bool, _Key(_bool, doc="refuse MAIL with 530 5.7.0 until STARTTLS is done (RFC 3207)")
    ] = False
    # Submission listeners (RFC 6409, port 587): AUTH is required before
    # MAIL (530 5.7.0), and an authenticated user may address any domain.
    submission: Annotated[
        bool, _Key(_bool, doc="submission (RFC 6409): AUTH before MAIL, then any recipient domain")
    ] = False
    auth: Annotated[
        bool, _Key(_bool, doc="offer AUTH whenever the users file (ehlo users add) holds a user")
    ] = True
    # Failed AUTH attempts: each reply waits this many seconds (more with
    # each failure); after max_auth_failures from one client IP within
    # auth_lockout seconds, AUTH from that IP gets 421 until the lockout ends.
    auth_failure_delay: Annotated[
        float,
        _Key(_seconds_or_zero, doc="seconds each failed AUTH reply waits (more with each failure)"),
    ] = 1.0
    max_auth_failures: Annotated[
        int,
        _Key(
            _positive_int,
            doc="failed AUTH attempts from one client IP in auth_lockout before 421",
        ),
    ] = 5
    auth_lockout: Annotated[
        float,
        _Key(_seconds_or_zero, doc="seconds of the per-IP AUTH failure window and of the lockout"),
    ] = 600.0
    # Failed AUTH attempts per account, from any address: after
    # max_auth_failures_per_user for one user name within auth_user_lockout
    # seconds, AUTH as that user gets 454 4.7.0 without the password being
    # checked, until the window ends. 0: no per-account limit.
    max_auth_failures_per_user: Annotated[
        int, _Key(_count_or_zero, doc="failed AUTH attempts per user name before 454; 0: no limit")
    ] = 10
    auth_user_lockout: Annotated[
        float, _Key(_positive_seconds, doc="seconds of the per-account AUTH failure window")
    ] = 600.0
    # Password checks run two at a time (in each server process); at most
    # max_auth_queue logins wait for their turn, each at most
    # auth_queue_timeout seconds. A login beyond either gets 454 4.7.0
    # (RFC 4954 section 6: try again later).
    max_auth_queue: Annotated[
        int, _Key(_count_or_zero, doc="logins waiting for a password check; beyond, 454 4.7.0")
    ] = 32
    auth_queue_timeout: Annotated[
        float,
        _Key(_positive_seconds, doc="seconds a login may wait for its password check; beyond, 454"),
    ] = 10.0
    # Proxies allowed to send a PROXY header on "proxy" listeners (CIDR);
    # other peers of those listeners are disconnected.
    proxy_trusted: Annotated[
        tuple[str, ...],
        _Key(_networks, doc="networks (CIDR) allowed to send a PROXY header on proxy listeners"),
    ] = ("127.0.0.0/8", "::1/128")
    proxy_timeout: Annotated[
        float, _Key(_positive_seconds, doc="seconds a proxy has to send its PROXY header")
    ] = 10.0
    # Limits enforced by the protocol core.
    limits: Annotated[ProtocolLimits, _TABLE] = ProtocolLimits()
    # Connections in total and from one client IP. An idle connection costs
    # about 2 KiB (some 20 MiB for 10,000) and one file descriptor: the
    # server raises its soft RLIMIT_NOFILE towards the hard limit to fit
    # max_connections (plus a reserve of 128) and, if the hard limit is too
    # low, lowers the limit to what fits and says so. At the limit, the
    # connection idle longest outside a transaction (not in MAIL/RCPT,
    # DATA, BDAT, an AUTH exchange or a TLS handshake) is closed with 421
    # 4.4.2 to admit the newcomer; with none, the newcomer gets 421 4.7.0.
    # Beyond max_connections_per_ip, 421 4.7.0 (nothing is closed for it).
    # The per-IP limits (these, the rate, AUTH failures) count an IPv6
    # client by its /64 network, an IPv4 one by its address.
    max_connections: Annotated[
        int,
        _Key(
            _positive_int,
            doc="open connections in all; at the limit the longest idle one is closed",
        ),
    ] = 10000
    max_connections_per_ip: Annotated[
        int,
        _Key(_positive_int, doc="open connections from one client IP (IPv6: its /64); 421 beyond"),
    ] = 50
    # Stress mode (like Postfix's): from this fraction of max_connections
    # open, connections idle before or between transactions are closed
    # after stress_timeout seconds instead of command_timeout; the server
    # leaves stress mode when the open connections fall to 10 points below
    # the threshold (70% for 0.8).
    stress_threshold: Annotated[
        float,
        _Key(_fraction, doc="fraction of max_connections from which idle ones get stress_timeout"),
    ] = 0.8
    stress_timeout: Annotated[
        float, _Key(_positive_seconds, doc="seconds an idle connection may wait in stress mode")
    ] = 10.0
    max_connection_rate: Annotated[
        int,
        _Key(
            _count_or_zero,
            doc="new connections per client IP per minute; 421 beyond; 0: no limit",
        ),
    ] = 300
    # Client networks the per-IP limits (connections, rate, AUTH failures)
    # do not apply to.
    limits_exempt: Annotated[
        tuple[str, ...],
        _Key(_networks, doc="client networks (CIDR) the per-IP limits do not apply to"),
    ] = ("127.0.0.0/8", "::1/128")
    # Seconds to wait before the banner; a client that talks first (RFC 5321
    # section 3.1: the client waits for the greeting) gets 554 and is dropped.
    greeting_delay: Annotated[
        float,
        _Key(_seconds_or_zero, doc="seconds before the banner; a client that talks first gets 554"),
    ] = 0.0
    # A client that pipelines without PIPELINING being offered, or puts
    # commands after one that must end a group (RFC 2920 section 3.1):
    # "record" (logged, noted in the envelope), "reject" (554, dropped), "off".
    pipelining_violation: Annotated[
        str,
        _Key(
            _choice("record", "reject", "off"),
            doc="commands pipelined against RFC 2920: record, reject or off",
        ),
    ] = "record"
    # RFC 8601 section 5: an incoming Authentication-Results field that claims
    # one of our names (hostname, SNI certificate names) as its authserv-id is
    # "rename"d to X-Original-Authentication-Results or "remove"d; the stored
    # envelope counts them (authres_forged).
    authres_forged: Annotated[
        str,
        _Key(
            _choice("rename", "remove"),
            doc="an Authentication-Results field claiming our name: rename or remove",
        ),
    ] = "rename"
    # RFC 5321 section 6.3: a message whose header section holds more than
    # this many Received fields (counting those the client sent, not ours)
    # is refused at the end of its data with 554 5.4.6, as a likely loop.
    max_hops: Annotated[
        int,
        _Key(_positive_int, doc="Received fields a message may carry; more: 554 5.4.6 (a loop)"),
    ] = 100
    # NOOP, RSET, VRFY, HELP, a repeated HELO/EHLO (not the one required
    # after STARTTLS) and other commands that move no mail: beyond this many
    # in one session, 421 4.7.0. 0: no limit.
    max_junk_commands: Annotated[
        int,
        _Key(
            _count_or_zero,
            doc="commands moving no mail (NOOP, RSET...) per session; 0: no limit",
        ),
    ] = 100
    max_session_time: Annotated[
        float, _Key(_positive_seconds, doc="longest session in seconds; 421 4.4.2 beyond")
    ] = 3600.0
    # Server processes sharing the listeners (``ehlo serve``), each with its
    # own event loop; the SQLite store then coordinates their writers.
    # 0: one per CPU core this process may run on.
    workers: Annotated[
        int, _Key(_count_or_zero, doc="server processes sharing the listeners; 0: one per CPU core")
    ] = 0
    # Prometheus counters of connections, sessions, messages, refusals,
    # TLS, AUTH, greeting checks, commit latency and limits, summed over the
    # workers, served at /metrics (ehlo.server._metrics); false: none kept.
    metrics: Annotated[
        bool, _Key(_bool, doc="keep Prometheus metrics (summed over workers) for /metrics")
    ] = True
    # Where the SQLite store's writer runs: "process" (a child process, away
    # from the event loop's GIL; with several workers, one for all of them)
    # or "thread" (a thread of each server process: no child process).
    sqlite_writer: Annotated[
        str,
        _Key(
            _choice("process", "thread"),
            doc="where the SQLite store's writer runs: process or thread",
        ),
    ] = "process"
    # Set by ``ehlo serve`` for its workers (not a configuration key): the
    # address of the SQLite writer they share.
    sqlite_writer_address: Annotated[str | None, _NOT_A_KEY] = None
    # Retention while serving, oldest messages first, in small batches (body
    # files too; SQLite and Maildir): keep at most this many messages...
    # 0: no limit.
    keep_messages: Annotated[
        int, _Key(_count_or_zero, doc="keep at most this many messages, the oldest deleted first")
    ] = 0
    # ...and only those received in the last this many days (fractions
    # allowed). 0: no limit.
    keep_days: Annotated[
        float, _Key(_days_or_zero, doc="delete messages older than this many days; 0: never")
    ] = 0.0
    # Record each session's dialogue (client lines and replies, timed from
    # connect; message data and AUTH secrets elided): each stored message
    # keeps its session's greeting, TLS and AUTH lines and its own
    # transaction, and the session log each session's whole transcript.
    transcripts: Annotated[
        bool,
        _Key(_bool, doc="record each session's dialogue with its messages and in the session log"),
    ] = True
    # The session log: ended sessions (with or without a message, refused
    # ones too) with their transcripts and greeting verdicts; the newest this
    # many are kept (a table of the SQLite store, a JSON-lines file beside a
    # Maildir). 0: no session log.
    session_log_max: Annotated[
        int, _Key(_count_or_zero, doc="sessions the session log keeps, the newest; 0: none")
    ] = 10_000
    # RFC 5321 section 4.5.3.2.7: at least 5 minutes awaiting a command.
    command_timeout: Annotated[
        float,
        _Key(_positive_seconds, doc="seconds awaiting a command (RFC 5321 asks for at least 300)"),
    ] = 300.0
    # Longest wait for more message data (RFC 5321 section 4.5.3.2.5/6 spirit).
    data_timeout: Annotated[
        float, _Key(_positive_seconds, doc="seconds awaiting more message data")
    ] = 180.0
    shutdown_timeout: Annotated[
        float,
        _Key(
            _seconds_or_zero,
            doc="seconds transactions in progress may take to finish after SIGTERM",
        ),
    ] = 30.0
    # DNS servers ("IP" or "IP:PORT") for reverse names and greeting checks;
    # empty: the system's (/etc/resolv.conf).
    dns_servers: Annotated[
        tuple[str, ...],
        _Key(
            _dns_servers,
            doc="DNS servers (IP or IP:PORT) to ask; empty: the system's resolv.conf",
        ),
    ] = ()
    dns_timeout: Annotated[
        float, _Key(_positive_seconds, doc="seconds one DNS lookup may take")
    ] = 2.0
    # Greeting verification.
    greeting: Annotated[GreetingConfig, _TABLE] = GreetingConfig()
    reverse_dns: Annotated[
        bool, _Key(_bool, doc="look up the client's reverse DNS name for the Received header")
    ] = True
    reverse_dns_timeout: Annotated[
        float, _Key(_positive_seconds, doc="seconds to wait for that name before writing unknown")
    ] = 2.0
    # Started as root: bind the listeners, then run every process (the
    # workers, the SQLite writer) as this user and its groups. The data
    # folder is created as the user's when missing, and must be the user's
    # when it exists. Certificates and keys are read before the switch; a
    # SIGHUP reload reads them as the user. None: no switch (a warning when
    # started as root). Not root: only the current user's name is accepted.
    user: Annotated[
        str | None,
        _Key(_user, doc="started as root: bind, then run every process as this user"),
    ] = None
    # The web UI and HTTP API (``ehlo.web``), served by one process. Unset:
    # 127.0.0.1:8025 (HTTP_DEFAULT), and when that address is busy (a second
    # server on one machine) one warning and SMTP serves without HTTP; an
    # address set here or with --http that cannot be bound stops the start.
    http: Annotated[
        Listen | None,
        _Key(_http, doc="web UI and API address HOST:PORT; unset: 127.0.0.1:8025, skipped if busy"),
    ] = None
    http_enabled: Annotated[
        bool, _Key(_bool, doc="serve the web UI and API (false: --no-http)")
    ] = True
    # Bound beyond loopback, the server refuses to start unless http_auth
    # (HTTPS with the server's certificate, HTTP Basic against the users
    # file) or http_insecure (plain HTTP, no login: the operator knows) is set.
    http_auth: Annotated[
        bool, _Key(_bool, doc="web UI over HTTPS with HTTP Basic against the users file")
    ] = False
    http_insecure: Annotated[
        bool, _Key(_bool, doc="allow the web UI beyond loopback without http_auth (no login)")
    ] = False
    # Delivery (``ehlo.delivery``). With local ``domains`` or ``submission``,
    # recipients outside the local domains are relayed for authenticated
    # sessions and relay_networks clients (550 5.7.1 for everyone else);
    # without either, ehlo keeps every recipient and relays nothing.
    lmtp: Annotated[
        str | None,
        _Key(_lmtp, doc="hand local recipients to this LMTP server: HOST:PORT or unix:/PATH"),
    ] = None
    keep_local: Annotated[
        bool, _Key(_bool, doc="with lmtp: keep a copy of local mail in the store too")
    ] = False
    relay_networks: Annotated[
        tuple[str, ...],
        _Key(_networks, doc="client networks (CIDR) that may relay without AUTH; default none"),
    ] = ()
    relay_host: Annotated[
        str | None,
        _Key(_relay_host, doc="smarthost HOST[:PORT] for relayed mail; unset: the MX hosts"),
    ] = None
    relay_auth_user: Annotated[
        str | None,
        _Key(_optional_text, doc="user name for AUTH at the smarthost (see relay_password_file)"),
    ] = None
    relay_password_file: Annotated[
        Path | None,
        _Key(
            _optional_path, files=_relative_path,
            doc="file whose first line is the smarthost password",
        ),
    ] = None
    # Static routes: recipient domain -> "HOST[:PORT]" or "lmtp:HOST:PORT"
    # (or "lmtp:unix:/PATH"), over the MX hosts and the smarthost.
    routes: Annotated[
        Mapping[str, str],
        _Key(_routes, doc='[routes] "example.org" = "HOST:PORT" or "lmtp:HOST:PORT"'),
    ] = dataclasses.field(default_factory=dict)
    delivery_port: Annotated[
        int,
        _Key(_port, doc="port of the MX hosts ehlo delivers to (25; other ports for tests)"),
    ] = 25
    # Outbound TLS per recipient domain, after Postfix's levels: none, may
    # (opportunistic STARTTLS, the default), encrypt (STARTTLS required, any
    # certificate), verify (STARTTLS with a certificate that verifies).
    tls_policy: Annotated[
        Mapping[str, str],
        _Key(_tls_policy, doc='[tls_policy] "example.org" = "none" | "may" | "encrypt" | "verify"'),
    ] = dataclasses.field(default_factory=dict)
    mta_sts: Annotated[
        bool, _Key(_bool, doc="honour the MTA-STS policies of recipient domains (RFC 8461)")
    ] = True
    mta_sts_port: Annotated[
        int, _Key(_port, doc="HTTPS port of MTA-STS policy hosts (443; other ports for tests)")
    ] = 443
    # CA certificates outbound TLS "verify" (and MTA-STS) trusts; unset: the system's.
    delivery_ca_file: Annotated[
        Path | None,
        _Key(
            _optional_path, files=_relative_path,
            doc="CA certificates (PEM) outbound verify trusts; unset: the system's",
        ),
    ] = None
    delivery_concurrency: Annotated[
        int, _Key(_positive_int, doc="outbound connections at once, in all")
    ] = 20
    delivery_per_destination: Annotated[
        int, _Key(_positive_int, doc="outbound connections at once to one next hop")
    ] = 4
    # RFC 5321 section 4.5.4.1: retry after at least 30 minutes, give up
    # after at least 4-5 days; the delay grows from retry_min to retry_max.
    retry_min: Annotated[
        float, _Key(_positive_seconds, doc="seconds before the first retry of a deferred recipient")
    ] = 300.0
    retry_max: Annotated[
        float, _Key(_positive_seconds, doc="longest delay between two retries, in seconds")
    ] = 4000.0
    max_queue_lifetime: Annotated[
        float, _Key(_positive_seconds, doc="seconds a recipient may stay queued before it bounces")
    ] = 5 * 86400.0
    delay_warning: Annotated[
        float,
        _Key(_seconds_or_zero, doc="seconds queued before a delay notice (NOTIFY=DELAY); 0: none"),
    ] = 4 * 3600.0
    # RFC 5321 section 4.5.3.2: the client's timeouts (its minimums) scaled
    # by this factor (1.0); the TCP connect has its own.
    delivery_timeout_scale: Annotated[
        float,
        _Key(_positive_float, doc="factor on the RFC 5321 outbound timeouts (1: 5 min a command)"),
    ] = 1.0
    delivery_connect_timeout: Annotated[
        float, _Key(_positive_seconds, doc="seconds an outbound TCP connection may take")
    ] = 30.0
    # A node's claim on the recipients it is delivering (PostgreSQL: several
    # nodes share one queue): renewed while the delivery lasts; a node that
    # died leaves its claims to the others once this has passed.
    delivery_lease: Annotated[
        float,
        _Key(_positive_seconds, doc="seconds a node's claim on a delivery lasts unless renewed"),
    ] = 300.0
    log_format: Annotated[
        LogFormat, _Key(_choice("text", "json"), doc="log lines on stderr: text or json")
    ] = "text"
    log_level: Annotated[
        str,
        _Key(
            _choice(*_LOG_LEVELS, fold=True),
            doc="least severe level logged: DEBUG, INFO, WARNING, ERROR or CRITICAL",
        ),
    ] = "INFO"


    @property
    def http_address(self) -> Listen:
        """Where the web UI and API listen: ``http``, or :data:`HTTP_DEFAULT` when unset."""
        return self.http if self.http is not None else HTTP_DEFAULT

    def delivery_settings(self, own_addresses: Iterable[tuple[str, int]] = ()) -> DeliverySettings:
        """What the delivery scheduler (``ehlo.delivery.scheduler``) needs of these settings."""
        from .client import Timeouts
        from .delivery.scheduler import DeliverySettings

        scale = self.delivery_timeout_scale
        base = Timeouts()
        timeouts = Timeouts(
            **{
                f.name: getattr(base, f.name) * scale
                for f in dataclasses.fields(Timeouts)
                if f.name != "connect"
            },
            connect=self.delivery_connect_timeout,
        )
        login = None
        if self.relay_auth_user is not None and self.relay_password_file is not None:
            try:
                text = Path(self.relay_password_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"relay_password_file: {exc.strerror or exc}") from None
            login = (self.relay_auth_user, text.splitlines()[0] if text else "")
        return DeliverySettings(
            hostname=self.hostname,
            routing=self.routing(),
            delivery_port=self.delivery_port,
            concurrency=self.delivery_concurrency,
            per_destination=self.delivery_per_destination,
            retry_min=self.retry_min,
            retry_max=max(self.retry_max, self.retry_min),
            max_lifetime=self.max_queue_lifetime,
            delay_warning=self.delay_warning,
            tls_policy=dict(self.tls_policy),
            mta_sts=self.mta_sts,
            mta_sts_port=self.mta_sts_port,
            timeouts=timeouts,
            relay_login=login,
            own_addresses=frozenset(own_addresses),
            ssl_context=self.delivery_ssl_context(),
            lease=self.delivery_lease,
        )

    def delivery_ssl_context(self) -> ssl.SSLContext:
        """The context outbound TLS verifies with (``delivery_ca_file``, else the system's CAs)."""
        import ssl

        try:
            return ssl.create_default_context(
                cafile=str(self.delivery_ca_file) if self.delivery_ca_file else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"delivery_ca_file: {exc}") from None

    def routing(self) -> Routing:
        """The routing rules (``ehlo.delivery.routes``) these settings describe."""
        from .delivery.routes import Routing

        # Next hops as the configuration file writes them ("HOST:PORT"), also
        # when ServerConfig is built directly (the library): as next hops.
        return Routing(
            domains=frozenset(d.lower().rstrip(".") for d in self.domains),
            submission=self.submission,
            lmtp=_lmtp("lmtp", self.lmtp),
            keep_local=self.keep_local,
            relay_networks=tuple(ipaddress.ip_network(n) for n in self.relay_networks),
            relay_host=_relay_host("relay_host", self.relay_host),
            routes=dict(_routes("routes", self.routes)),
        )


# --------------------------------------------------------------------------
# Loading: TOML file + command-line overrides -> ServerConfig
#
# ``load_config`` owns the TOML layout (top-level keys mirror ServerConfig
# fields, a ``[limits]`` table mirrors ProtocolLimits, a ``[greeting]`` table
# mirrors GreetingConfig with its ``[greeting.checks]`` table mapping check
# names to modes) and every check on the values. The key tables are built
# from the fields: each field of ServerConfig and GreetingConfig declares in
# ``Annotated`` how it is loaded (``_Key``: its validator, its TOML name when
# that differs, how a file's relative paths resolve), or that it is a table
# or no key at all; ProtocolLimits' keys are declared in ``_LIMIT_CHECKS``.
# Precedence: command line > file > defaults. Each error is one
# ``ConfigError`` line naming the key, e.g.
# ``config key limits.max_recipients: expected an integer >= 1, got "abc"``.

_LIMITS = "limits"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _show(value: Any) -> str:
    """A config value as the message quotes it: TOML-like, one line, short."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, dict):
        text = "a table"
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(label: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{label}: expected {expected}, got {_show(value)}")


def _int(label: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    expected = f"an integer >= {minimum}"
    if maximum is not None:
        expected = f"an integer from {minimum} to {maximum}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(label, expected, value)
    if value < minimum or (maximum is not None and value > maximum):
        raise _fail(label, expected, value)
    return value


def _positive_int(label: str, value: Any) -> int:
    return _int(label, value, minimum=1)


def _size(label: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(label, "a size in octets >= 0 (0: no limit)", value)
    return value


def _command_line(label: str, value: Any) -> int:
    # RFC 5321 section 4.5.3.1.4: 512 octets must be accepted.
    return _int(label, value, minimum=512)


def _text_line(label: str, value: Any) -> int:
    # RFC 5321 section 4.5.3.1.6: 1000 octets must be accepted; 0 turns it off.
    if isinstance(value, bool) or not isinstance(value, int) or not (value == 0 or value >= 1000):
        raise _fail(label, "0 (no limit) or an integer >= 1000", value)
    return value


def _seconds(label: str, value: Any, *, allow_zero: bool = False) -> float:
    expected = "a number of seconds >= 0" if allow_zero else "a number of seconds > 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(label, expected, value)
    seconds = float(value)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise _fail(label, expected, value)
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise _fail(label, expected, value)
    return seconds


def _positive_seconds(label: str, value: Any) -> float:
    return _seconds(label, value)


def _seconds_or_zero(label: str, value: Any) -> float:
    return _seconds(label, value, allow_zero=True)


def _days_or_zero(label: str, value: Any) -> float:
    expected = "a number of days >= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(label, expected, value)
    days = float(value)
    if days != days or days < 0 or days == float("inf"):
        raise _fail(label, expected, value)
    return days


def _bool(label: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(label, "true or false", value)
    return value


def _choice(*choices: str, fold: bool = False) -> Callable[[str, Any], str]:
    expected = "one of " + ", ".join(f'"{c}"' for c in choices)

    def check(label: str, value: Any) -> str:
        if isinstance(value, str):
            text = value.upper() if fold else value
            if text in choices:
                return text
        raise _fail(label, expected, value)

    return check


def _path(label: str, value: Any) -> Path:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise _fail(label, "a file or folder path", value)
    return Path(value).expanduser()


def _optional_path(label: str, value: Any) -> Path | None:
    if value is None:
        return None
    return _path(label, value)


# The host name validator (RFC 1123), under the name it has always had here.
valid_hostname = is_hostname


def _domain_name(label: str, value: Any, what: str) -> str:
    if isinstance(value, str):
        name = value.strip()
        if name and not name.isascii():
            try:
                name = name.encode("idna").decode("ascii")
            except UnicodeError:
                name = ""
        if is_hostname(name):
            return name
    raise _fail(label, what, value)


def _hostname(label: str, value: Any) -> str:
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            pass
    return _domain_name(label, value, "a host name such as mail.example.org")


def _user(label: str, value: Any) -> str | None:
    # A POSIX account name (the portable set, plus what useradd allows).
    if value is None:
        return None
    if isinstance(value, str):
        name = value.strip()
        if name and not name.startswith("-") and len(name) <= 32 and all(
            c.isascii() and (c.isalnum() or c in "._-$") for c in name
        ):
            return name
    raise _fail(label, "a user name such as ehlo", value)


def _domains(label: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _fail(label, "a list of domain names", value)
    return tuple(
        _domain_name(label, item, "a list of domain names such as example.org") for item in value
    )


def _listen(label: str, value: Any) -> tuple[Listen, ...]:
    if isinstance(value, (str, Listen)):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(label, 'a list of addresses such as ["127.0.0.1:2525"]', value)
    out: list[Listen] = []
    for item in value:
        if isinstance(item, Listen):
            out.append(item)
        elif isinstance(item, str):
            out.append(Listen.parse(item, option=label))
        else:
            raise _fail(label, 'a list of addresses such as ["127.0.0.1:2525"]', value)
    return tuple(dict.fromkeys(out))


def http_exposed(host: str) -> bool:
    """Whether a web address ``host`` is reachable from beyond this machine (not loopback)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _http(label: str, value: Any) -> Listen | None:
    if value is None or isinstance(value, Listen):
        return value
    if not isinstance(value, str):
        raise _fail(label, 'an address such as "127.0.0.1:8025"', value)
    found = Listen.parse(value, option=label)
    if found.tls or found.proxy:
        raise ConfigError(f"{label}: listener options are not for the web address, got {value!r}")
    return found


def _nameserver(label: str, text: str, expected: str) -> str:
    """``IP``, ``IP:PORT``, ``[IPv6]`` or ``[IPv6]:PORT``, normalised; ConfigError if not."""
    try:
        host, port = parse_hostport(text, 0)  # port 0: none given
        address = ipaddress.ip_address(host)
    except ValueError:
        raise _fail(label, expected, text) from None
    return format_hostport(str(address), port) if port else str(address)


def _dns_servers(label: str, value: Any) -> tuple[str, ...]:
    expected = 'a list of DNS servers such as ["192.0.2.53", "127.0.0.1:5353", "[::1]:53"]'
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _fail(label, expected, value)
    return tuple(dict.fromkeys(_nameserver(label, item, expected) for item in value))


def _database_url(label: str, value: Any) -> str | None:
    if value is None:
        return None
    from .storage._pg_conn import check_database_url  # only the text: no driver imported

    if not isinstance(value, str):
        raise _fail(label, "a PostgreSQL URL such as postgresql://ehlo@db.example/ehlo", value)
    try:
        return check_database_url(value)
    except ValueError as exc:
        raise ConfigError(f"{label}: {exc}") from None


def _optional_text(label: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip() and value.isprintable():
        return value.strip()
    raise _fail(label, "a non-empty string", value)


def _positive_float(label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
        raise _fail(label, "a number > 0", value)
    return float(value)


def _port(label: str, value: Any) -> int:
    return _int(label, value, minimum=1, maximum=65535)


def _lmtp(label: str, value: Any) -> str | None:
    from .delivery.routes import normalise_route

    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().removeprefix("lmtp:")
        try:
            return normalise_route(f"lmtp:{text}")
        except ValueError:
            pass
    raise _fail(label, "HOST:PORT or unix:/PATH of an LMTP server", value)


def _relay_host(label: str, value: Any) -> str | None:
    from .delivery.routes import normalise_route

    if value is None:
        return None
    if isinstance(value, str) and not value.strip().startswith("lmtp:"):
        try:
            return normalise_route(value)
        except ValueError:
            pass
    raise _fail(label, "HOST[:PORT] of a smarthost", value)


def _route_domain(label: str, key: Any) -> str:
    if not isinstance(key, str):
        raise _fail(label, "a domain name", key)
    return _domain_name(label, key, "a domain name such as example.org").lower()


def _routes(label: str, value: Any) -> Mapping[str, str]:
    from .delivery.routes import normalise_route

    if not isinstance(value, Mapping):
        raise _fail(label, 'a table such as { "example.org" = "mx.example.org:25" }', value)
    out: dict[str, str] = {}
    for key, target in value.items():
        domain = _route_domain(label, key)
        try:
            if not isinstance(target, str):
                raise ValueError
            out[domain] = normalise_route(target)
        except ValueError:
            raise _fail(
                f"{label} {key!r}", "HOST[:PORT], lmtp:HOST:PORT or lmtp:unix:/PATH", target
            ) from None
    return out


_TLS_LEVELS = ("none", "may", "encrypt", "verify")


def _tls_policy(label: str, value: Any) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise _fail(label, 'a table such as { "example.org" = "verify" }', value)
    out: dict[str, str] = {}
    for key, level in value.items():
        domain = _route_domain(label, key)
        if level not in _TLS_LEVELS:
            raise _fail(f"{label} {key!r}", "one of none, may, encrypt, verify", level)
        out[domain] = level
    return out


def _networks(label: str, value: Any) -> tuple[str, ...]:
    expected = 'a list of networks such as ["10.0.0.0/8", "2001:db8::/32"]'
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _fail(label, expected, value)
    out: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise _fail(label, expected, value)
        try:
            # Host bits are dropped: "192.168.1.5/24" means 192.168.1.0/24.
            out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError:
            raise _fail(label, expected, item) from None
    return tuple(dict.fromkeys(out))


def _fraction(label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise _fail(label, "a number above 0 and at most 1", value)
    return float(value)


def _count_or_zero(label: str, value: Any) -> int:
    return _int(label, value, minimum=0)


def _sni_certificates(label: str, value: Any) -> tuple[tuple[Path, Path], ...]:
    expected = 'a list of [certificate, key] pairs such as [["a.pem", "a.key"]]'
    if not isinstance(value, (list, tuple)):
        raise _fail(label, expected, value)
    out: list[tuple[Path, Path]] = []
    for item in value:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise _fail(label, expected, item)
        out.append((_path(label, item[0]), _path(label, item[1])))
    return tuple(out)


def _greeting_preset(label: str, value: Any) -> str:
    from .greeting import PRESETS

    return _choice(*PRESETS)(label, value)


def _greeting_stage(label: str, value: Any) -> str:
    from .greeting import STAGES

    return _choice(*STAGES)(label, value)


def _check_mode(check: str, label: str, value: Any) -> str:
    """The mode of one ``[greeting.checks]`` entry; ConfigError for a bad name or mode."""
    from .greeting import CHECKS, MODES, RECORD_ONLY

    if check not in CHECKS:
        guesses = difflib.get_close_matches(check, CHECKS, n=1, cutoff=0.6)
        hint = f' (did you mean "{guesses[0]}"?)' if guesses else ""
        where = f"{label.split()[0]}: " if label.startswith("-") else ""  # the option
        raise ConfigError(f'{where}unknown greeting check "{check}"{hint}')
    allowed: list[str] = list(MODES)
    if check in RECORD_ONLY:
        allowed = [m for m in MODES if m in ("off", "record")]
        expected = " or ".join(f'"{m}"' for m in allowed) + f" ({check} is only recorded)"
    else:
        expected = "one of " + ", ".join(f'"{m}"' for m in allowed)
    if not isinstance(value, str) or value not in allowed:
        raise _fail(label, expected, value)
    return value


_Check = Callable[[str, Any], Any]


def _relative_path(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else base / path


def _relative_pairs(
    base: Path, pairs: tuple[tuple[Path, Path], ...]
) -> tuple[tuple[Path, Path], ...]:
    return tuple((base / cert, base / key) for cert, key in pairs)


_Field = tuple[str, _Key]
"""A key's field name and how the key is loaded."""


def _keys_of(cls: type) -> dict[str, _Field]:
    """The keys of the dataclass ``cls`` by name, from the ``_Key`` marks of its fields.

    TypeError for a field that has neither a ``_Key`` nor a ``_TABLE`` or
    ``_NOT_A_KEY`` mark, or whose ``_Key`` has no ``doc``: a new field must
    say how it is configured and what it means.
    """
    hints = get_type_hints(cls, include_extras=True)
    keys: dict[str, _Field] = {}
    for field in dataclasses.fields(cls):
        marks = getattr(hints[field.name], "__metadata__", ())
        key = next((mark for mark in marks if isinstance(mark, _Key)), None)
        if key is not None:
            _documented(cls.__name__, field.name, key)
            keys[key.name or field.name] = (field.name, key)
        elif _TABLE not in marks and _NOT_A_KEY not in marks:
            raise TypeError(f"{cls.__name__}.{field.name}: no config key declared")
    return keys


def _documented(owner: str, name: str, key: _Key) -> None:
    """TypeError unless ``key`` has its one-line ``doc``."""
    if not key.doc.strip() or "\n" in key.doc:
        raise TypeError(f"{owner}.{name}: the config key needs a one-line doc")


def _keys_declared(
    cls: type, declared: Mapping[str, _Key], not_keys: frozenset[str]
) -> dict[str, _Field]:
    """As ``_keys_of``, for a dataclass whose keys are declared apart, by field name."""
    names = [field.name for field in dataclasses.fields(cls)]
    stray = sorted(set(declared) - set(names))
    if stray:
        raise TypeError(f"{cls.__name__} has no field {stray[0]}")
    missing = [name for name in names if name not in declared and name not in not_keys]
    if missing:
        raise TypeError(f"{cls.__name__}.{missing[0]}: no config key declared")
    for name, key in declared.items():
        _documented(cls.__name__, name, key)
    return {
        (declared[name].name or name): (name, declared[name]) for name in names if name in declared
    }


_SERVER_KEYS = _keys_of(ServerConfig)

# ProtocolLimits belongs to the protocol core, which knows nothing of
# configuration: its keys are declared here by field name. The fields the
# server sets itself (STARTTLS and the AUTH mechanisms it can offer) are
# not keys.
_LIMIT_CHECKS: dict[str, _Key] = {
    "max_message_size": _Key(
        _size, doc="largest message in octets (advertised with SIZE); 0: no limit"
    ),
    "max_recipients": _Key(_positive_int, doc="recipients of one message (RFC 5321: at least 100)"),
    "max_command_line": _Key(
        _command_line, doc="longest command line in octets with its CRLF (at least 512)"
    ),
    "max_text_line": _Key(
        _text_line, doc="longest message line in octets with its CRLF (at least 1000); 0: any"
    ),
    "max_errors": _Key(
        _positive_int, doc="5xx replies in one session before it is closed with 421 4.7.0"
    ),
    "bare_newline": _Key(
        _choice("normalize", "reject"), doc="bare CR or LF in DATA: normalize (to CRLF) or reject"
    ),
    "nul": _Key(_choice("keep", "reject"), doc="NUL octets in a body: keep, or reject (554 5.6.0)"),
    "pipelining": _Key(_bool, doc="offer PIPELINING (RFC 2920)"),
    "chunking": _Key(_bool, doc="offer CHUNKING, BDAT (RFC 3030)"),
    "smtputf8": _Key(_bool, doc="offer SMTPUTF8 (RFC 6531)"),
    "eightbitmime": _Key(_bool, doc="offer 8BITMIME (RFC 6152)"),
    "enhancedstatuscodes": _Key(_bool, doc="offer ENHANCEDSTATUSCODES (RFC 2034)"),
    "dsn": _Key(_bool, doc="offer DSN: RET, ENVID, NOTIFY and ORCPT (RFC 3461)"),
    "auth_plaintext": _Key(_bool, doc="offer AUTH without TLS (passwords in clear text)"),
}
_LIMIT_NOT_KEYS = frozenset({"starttls", "auth_mechanisms"})
_LIMIT_KEYS = _keys_declared(ProtocolLimits, _LIMIT_CHECKS, _LIMIT_NOT_KEYS)

_GREETING = "greeting"
_CHECKS_TABLE = f"{_GREETING}.checks"

_GREETING_KEYS = _keys_of(GreetingConfig)

# Tables and their keys; [greeting.checks] maps check names to modes (_check_mode).
_TABLES: dict[str, dict[str, _Field]] = {_LIMITS: _LIMIT_KEYS, _GREETING: _GREETING_KEYS}
_TABLE_NAMES = (_LIMITS, _GREETING, _CHECKS_TABLE)

# Every key a file or an override may set, dotted for the tables; the checks
# of [greeting.checks] are the names in ``ehlo.greeting.CHECKS``.
CONFIG_KEYS: tuple[str, ...] = (
    *_SERVER_KEYS,
    *_TABLE_NAMES,
    *(f"{table}.{key}" for table, keys in _TABLES.items() for key in keys),
)


# What each table holds, in one line (``ehlo config defaults`` prints it).
TABLE_DOCS: dict[str, str] = {
    _LIMITS: "what the protocol core enforces on every session",
    _GREETING: "greeting verification: the checks of the HELO/EHLO name",
    _CHECKS_TABLE: "per-check modes over the preset: NAME = off | record | defer | reject",
}


def key_values(config: ServerConfig) -> list[tuple[str, Any, str]]:
    """Every key of ``config`` with its value and its one-line doc.

    The top-level keys first, in the order they are declared, then the
    ``limits`` and ``greeting`` keys, dotted. The entries of
    ``[greeting.checks]`` are ``config.greeting.checks``.
    """
    rows: list[tuple[str, Any, str]] = []
    for table, keys in (("", _SERVER_KEYS), *_TABLES.items()):
        holder = getattr(config, table) if table else config
        prefix = f"{table}." if table else ""
        for key, (name, spec) in keys.items():
            rows.append((prefix + key, getattr(holder, name), spec.doc))
    return rows


def _known_keys() -> list[str]:
    """Every settable key, check names included (``greeting.checks.forward_match``)."""
    from .greeting import CHECKS

    return [*CONFIG_KEYS, *(f"{_CHECKS_TABLE}.{check}" for check in CHECKS)]


def _unknown(key: str) -> ConfigError:
    """``unknown config key "x"``, with the nearest known key when one is close."""
    known = _known_keys()
    bare = key.rpartition(".")[2]
    # The right name in the wrong table ("max_message_size" for limits.max_message_size).
    guesses = [k for k in known if k.rpartition(".")[2] == bare and k != key]
    if not guesses:
        table = next((t for t in _TABLE_NAMES[::-1] if key.startswith(f"{t}.")), "")
        pool = [k for k in known if k.startswith(f"{table}.")] if table else known
        guesses = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
    hint = f' (did you mean "{guesses[0]}"?)' if guesses else ""
    return ConfigError(f'unknown config key "{key}"{hint}')


def _field(key: str) -> _Field | None:
    """The field a dotted key sets and how it is loaded; None for an unknown key."""
    table, dot, name = key.rpartition(".")
    keys = _TABLES.get(table) if dot else _SERVER_KEYS
    return keys.get(name) if keys is not None else None


def _check(key: str, value: Any, label: str) -> Any:
    table, _, name = key.rpartition(".")
    if table == _CHECKS_TABLE:
        return _check_mode(name, label, value)
    found = _field(key)
    if found is None:
        raise _unknown(key)
    return found[1].check(label, value)


def _fields(values: Mapping[str, Any], table: str = "") -> dict[str, Any]:
    """The values of one table (the top level for ""), by field name."""
    keys = _TABLES[table] if table else _SERVER_KEYS
    prefix = f"{table}." if table else ""
    return {
        keys[key.removeprefix(prefix)][0]: value
        for key, value in values.items()
        if key.startswith(prefix) and key.removeprefix(prefix) in keys
    }


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"limits": {"x": 1}, "y": 2}`` -> ``[("limits.x", 1), ("y", 2)]``.

    The tables ([limits], [greeting], [greeting.checks]) are flattened to
    dotted keys, however they are given (nested or dotted already).
    """
    items: list[tuple[str, Any]] = []
    for name, value in data.items():
        key = f"{prefix}{name}"
        if key in _TABLE_NAMES and value is not None:
            if not isinstance(value, Mapping):
                raise _fail(f"config key {key}", f"a table ([{key}])", value)
            items.extend(_flatten(value, f"{key}."))
        else:
            items.append((key, value))
    return items


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML document at ``path``; unreadable or malformed files raise ConfigError."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None


def load_config(
    path: Path | None,
    overrides: Mapping[str, Any] | None = None,
    *,
    labels: Mapping[str, str] | None = None,
) -> ServerConfig:
    """Build a validated ``ServerConfig`` from defaults, a TOML file and overrides.

    ``path``: a TOML file whose top-level keys mirror ``ServerConfig`` fields,
    with a ``[limits]`` table mirroring ``ProtocolLimits`` and a ``[greeting]``
    table mirroring ``GreetingConfig`` (``policy``, ``stage``,
    ``trusted_networks``, ``max_queries``, ``timeout``) whose
    ``[greeting.checks]`` table maps check names (``ehlo.greeting.CHECKS``)
    to ``off | record | defer | reject``; None for none.
    Relative paths in the file (``data_dir``, ``tls_cert``, ``tls_key``,
    ``sni_certificates``) are
    taken relative to the file's folder.

    ``overrides``: values that win over the file (the command line), keyed by
    the same names; table fields dotted (``"limits.max_recipients"``,
    ``"greeting.policy"``, ``"greeting.checks.forward_match"``) or in nested
    mappings (``{"greeting": {"checks": {...}}}``). ``None`` values are skipped, so unset options
    can be passed as they are. ``labels`` names an override in error messages
    (e.g. ``{"limits.max_message_size": "--max-size"}``); otherwise errors say
    ``config key NAME``.

    Raises ``ConfigError`` (one line naming the key) for an unknown key or
    check name (with the nearest known one as a suggestion), a wrong type or
    range, ``tls_cert`` without ``tls_key`` or the reverse.
    """
    values: dict[str, Any] = {}
    names: dict[str, str] = {}  # key -> how the error messages call it
    if path is not None:
        base = Path(path).parent
        for key, value in _flatten(read_config_file(Path(path))):
            checked = _check(key, value, f"config key {key}")
            found = _field(key)
            if found is not None and found[1].files is not None and checked is not None:
                checked = found[1].files(base, checked)
            values[key] = checked
            names[key] = f"config key {key}"
    for key, value in _flatten(overrides or {}):
        if value is None:
            continue
        label = (labels or {}).get(key, f"config key {key}")
        values[key] = _check(key, value, label)
        names[key] = label

    cert, key_file = values.get("tls_cert"), values.get("tls_key")
    if (cert is None) != (key_file is None):
        given, missing = ("tls_cert", "tls_key") if cert is not None else ("tls_key", "tls_cert")
        label = names[given]
        other = (labels or {}).get(missing, missing) if label.startswith("-") else missing
        raise ConfigError(f"{label}: {other} must be given too (a certificate needs its key)")

    if values.get("store") == "postgresql" and not values.get("database_url"):
        raise ConfigError(
            f"{names['store']}: the postgresql store needs database_url"
            " (or --store postgresql://USER@HOST/DB)"
        )
    limits = ProtocolLimits(**_fields(values, _LIMITS))
    greeting = _greeting_config(values, names)
    return ServerConfig(limits=limits, greeting=greeting, **_fields(values))


def _greeting_config(values: Mapping[str, Any], names: Mapping[str, str]) -> GreetingConfig:
    """The [greeting] table (and its checks) of the validated ``values``."""
    prefix, checks_prefix = f"{_GREETING}.", f"{_CHECKS_TABLE}."
    checks = {
        k.removeprefix(checks_prefix): v for k, v in values.items() if k.startswith(checks_prefix)
    }
    config = GreetingConfig(checks=checks, **_fields(values, _GREETING))
    if not config.active:
        return config  # nothing runs: no need to load the checks to vet the combination
    try:
        config.to_policy()  # every value was checked; this guards their combination
    except ValueError as exc:
        label = next((names[k] for k in values if k.startswith(prefix)), "config key greeting")
        raise ConfigError(f"{label}: {exc}") from None
    return config
