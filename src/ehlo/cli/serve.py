"""``ehlo serve``: its options, the configuration they make, and starting the server.

The options become ``load_config`` overrides (labelled with the option the
user typed, for error messages); logging is configured from the result;
the event loop is uvloop's when it is installed (``EHLO_LOOP=asyncio``
forces asyncio's own, ``EHLO_LOOP=uvloop`` requires uvloop); malloc is
tuned once; then :func:`ehlo.server.supervisor.serve` runs the server, in
this process or in ``--workers`` forked ones, until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from collections.abc import Callable
from typing import Any

from ..config import ConfigError, Listen, ServerConfig, load_config
from ..log import configure_logging
from ._common import (
    GREETING_LABELS,
    Failure,
    count,
    greeting_options,
    greeting_overrides,
    seconds,
    show_defaults,
    store_options,
    store_overrides,
)

# Option -> config key, for error messages that name what the user typed.
_SERVE_LABELS = {
    "listen": "--listen",
    "data_dir": "--data",
    "store": "--store",
    "database_url": "--store",
    "hostname": "--hostname",
    "domains": "--domain",
    "lmtp": "--lmtp",
    "relay_networks": "--relay-network",
    "relay_host": "--relay-host",
    "delivery_port": "--delivery-port",
    "limits.max_message_size": "--max-size",
    "limits.max_recipients": "--max-recipients",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "sni_certificates": "--sni",
    "workers": "--workers",
    "user": "--user",
    "greeting_delay": "--greeting-delay",
    "proxy_trusted": "--proxy-trusted",
    "log_format": "--log-format",
    "log_level": "--log-level",
    "http": "--http",
}


def add_serve_command(commands: Any) -> None:
    """Register ``serve`` on the ``ehlo`` parser's subparsers."""
    serve = commands.add_parser(
        "serve",
        help="run the SMTP server",
        description="Run the SMTP server until SIGTERM or SIGINT (graceful stop).",
    )
    serve.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="address to listen on, repeatable; [IPv6]:PORT (default: 127.0.0.1:2525);"
        " add ,proxy for a listener behind a proxy that sends the PROXY protocol",
    )
    serve.add_argument(
        "--listen-tls",
        action="append",
        metavar="HOST:PORT",
        help="implicit-TLS listener (RFC 8314, as on port 465), repeatable; added to --listen",
    )
    store_options(serve, kinds=("sqlite", "maildir", "null"))
    serve.add_argument(
        "--domain",
        action="append",
        dest="domains",
        metavar="D",
        help="a local domain, repeatable: mail for other domains is relayed for"
        " authenticated users and --relay-network clients, refused (550) to others"
        " (default: no domain: every recipient is kept, nothing is relayed)",
    )
    serve.add_argument(
        "--lmtp",
        metavar="HOST:PORT|unix:/PATH",
        help="hand mail for the local domains to this LMTP server (Dovecot...)"
        " (default: none, they are kept in the store)",
    )
    serve.add_argument(
        "--relay-network",
        action="append",
        dest="relay_networks",
        metavar="CIDR",
        help="clients that may relay without AUTH, repeatable (default: none)",
    )
    serve.add_argument(
        "--relay-host",
        metavar="HOST[:PORT]",
        help="send relayed mail through this smarthost (default: none, to the MX hosts)",
    )
    serve.add_argument(
        "--delivery-port",
        type=int,
        metavar="N",
        help="port of the MX hosts mail is relayed to (default: 25)",
    )
    serve.add_argument("--hostname", metavar="NAME", help="our name in banner and Received")
    serve.add_argument(
        "--max-size", type=count, metavar="BYTES", help="largest message (0: no limit)"
    )
    serve.add_argument("--max-recipients", type=count, metavar="N", help="recipients per message")
    serve.add_argument("--tls-cert", metavar="F", help="TLS certificate chain (PEM)")
    serve.add_argument("--tls-key", metavar="F", help="TLS private key (PEM)")
    serve.add_argument(
        "--no-tls", action="store_true", help="do not offer STARTTLS (no self-signed pair)"
    )
    serve.add_argument(
        "--sni",
        nargs=2,
        action="append",
        metavar=("CERT", "KEY"),
        help="another certificate and key, served to clients asking for its names (SNI);"
        " repeatable",
    )
    serve.add_argument(
        "--require-tls", action="store_true", help="refuse MAIL (530 5.7.0) before STARTTLS"
    )
    serve.add_argument(
        "--submission",
        action="store_true",
        help="submission server (port 587): AUTH required before MAIL; authenticated"
        " users may send to any domain",
    )
    serve.add_argument(
        "--auth-plaintext",
        action="store_true",
        help="offer AUTH without TLS too (passwords travel in clear text)",
    )
    serve.add_argument(
        "--no-auth", action="store_true", help="do not offer AUTH even when users exist"
    )
    serve.add_argument(
        "--greeting-delay",
        type=seconds,
        metavar="SECONDS",
        help="wait before the banner; clients that talk first get 554 (default: 0)",
    )
    serve.add_argument(
        "--proxy-trusted",
        action="append",
        metavar="CIDR",
        help="proxies allowed on ,proxy listeners, repeatable (default: loopback)",
    )
    serve.add_argument(
        "--workers",
        type=count,
        metavar="N",
        help="server processes sharing the listeners, each with its own event loop "
        "(default: 0, one per CPU core)",
    )
    serve.add_argument(
        "--user",
        metavar="NAME",
        help="started as root: bind the listeners, then serve as this user and its groups"
        " (the data folder must be its own)",
    )
    serve.add_argument(
        "--no-reverse-dns",
        action="store_true",
        help="do not look up client names for the Received header",
    )
    serve.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="web UI and HTTP API address (default: 127.0.0.1:8025; when that is busy,"
        " one warning and no web UI); beyond loopback it needs --http-auth or --http-insecure",
    )
    serve.add_argument(
        "--no-http",
        action="store_const",
        dest="http",
        const="",
        help="no web UI and HTTP API (the last of --http and --no-http counts)",
    )
    serve.add_argument(
        "--http-auth",
        action="store_true",
        help="web UI over HTTPS (the server's certificate) with HTTP Basic against the"
        " users file (ehlo users add)",
    )
    serve.add_argument(
        "--http-insecure",
        action="store_true",
        help="allow the web UI beyond loopback without --http-auth (anyone may read the mail)",
    )
    serve.add_argument(
        "--no-transcripts",
        action="store_true",
        help="do not record the sessions' dialogues (transcripts)",
    )
    serve.add_argument(
        "--no-metrics",
        action="store_true",
        help="keep no Prometheus metrics (GET /metrics answers 404)",
    )
    greeting_options(serve, stage=True)
    serve.add_argument("--log-format", choices=("text", "json"), help="log lines on stderr")
    serve.add_argument(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="least severe level logged (default: INFO)",
    )
    serve.set_defaults(func=_serve)
    show_defaults(serve, {**_SERVE_LABELS, **GREETING_LABELS})


def _serve_config(args: argparse.Namespace) -> ServerConfig:
    if args.no_tls and (args.tls_cert or args.tls_key):
        raise ConfigError("--no-tls cannot be combined with --tls-cert or --tls-key")
    overrides: dict[str, Any] = {
        "listen": args.listen,
        "data_dir": args.data,
        **store_overrides(args.store),
        "hostname": args.hostname,
        "domains": args.domains,
        "lmtp": args.lmtp,
        "relay_networks": args.relay_networks,
        "relay_host": args.relay_host,
        "delivery_port": args.delivery_port,
        "limits.max_message_size": args.max_size,
        "limits.max_recipients": args.max_recipients,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "sni_certificates": args.sni,
        "workers": args.workers,
        "user": args.user,
        "greeting_delay": args.greeting_delay,
        "proxy_trusted": args.proxy_trusted,
        "log_format": args.log_format,
        "log_level": args.log_level,
        "http": args.http or None,
    }
    if args.tls_cert or args.tls_key:
        overrides["tls"] = True
    if args.no_tls:
        overrides["tls"] = False
    if args.no_reverse_dns:
        overrides["reverse_dns"] = False
    if args.no_transcripts:
        overrides["transcripts"] = False
    if args.no_metrics:
        overrides["metrics"] = False
    for flag, key in (
        ("require_tls", "require_tls"),
        ("submission", "submission"),
        ("auth_plaintext", "limits.auth_plaintext"),
    ):
        if getattr(args, flag):
            overrides[key] = True
    if args.no_auth:
        overrides["auth"] = False
    if args.http == "":  # --no-http
        overrides["http_enabled"] = False
    if args.http_auth:
        overrides["http_auth"] = True
    if args.http_insecure:
        overrides["http_insecure"] = True
    greeting, labels = greeting_overrides(args)
    overrides.update(greeting)
    config = load_config(args.config, overrides, labels={**_SERVE_LABELS, **labels})
    if args.listen_tls:
        extra = [Listen.parse(text, option="--listen-tls") for text in args.listen_tls]
        extra = [dataclasses.replace(item, tls=True) for item in extra]
        config = dataclasses.replace(config, listen=tuple(dict.fromkeys([*config.listen, *extra])))
    if not config.tls and any(item.tls for item in config.listen):
        raise ConfigError("--listen-tls needs TLS: it cannot be combined with --no-tls")
    return config


def _loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """uvloop's loop factory when it is installed, else None (asyncio's own loop).

    ``EHLO_LOOP=asyncio`` forces asyncio's loop, ``EHLO_LOOP=uvloop`` requires uvloop.
    """
    choice = os.environ.get("EHLO_LOOP", "").strip().lower()
    if choice not in ("", "auto", "asyncio", "uvloop"):
        raise ConfigError(f"EHLO_LOOP: expected asyncio or uvloop, got {choice!r}")
    if choice == "asyncio":
        return None, "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise Failure("EHLO_LOOP=uvloop but uvloop is not installed") from None
        return None, "asyncio"
    version = getattr(uvloop, "__version__", "")
    return uvloop.new_event_loop, f"uvloop {version}".strip()


def _serve(args: argparse.Namespace) -> int:
    config = _serve_config(args)
    try:
        configure_logging(config.log_format, config.log_level)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    factory, loop_name = _loop_factory()
    from ..server.supervisor import StartError, serve
    from ..server.workers import keep_freed_memory

    keep_freed_memory()
    try:
        return serve(config, loop_factory=factory, loop_name=loop_name)
    except StartError as exc:  # port in use, TLS files, the store: one line, exit 1
        raise Failure(str(exc)) from None
