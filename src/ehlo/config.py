"""Configuration: validated, frozen dataclasses, from defaults, TOML and the CLI.

Every field is documented where it is declared. ``ServerConfig`` is what the
server and its sessions read; ``ProtocolLimits`` is the part the sans-IO
protocol core needs, so that the core never sees anything else.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Literal

StoreKind = Literal["sqlite", "maildir", "null"]
BareNewline = Literal["normalize", "reject"]
LogFormat = Literal["text", "json"]


class ConfigError(ValueError):
    """A bad option or config key; the message names it in one line."""


@dataclasses.dataclass(frozen=True, slots=True)
class ProtocolLimits:
    """What the protocol core enforces on its own."""

    # RFC 5321 section 4.5.3.1.4: a command line is at most 512 octets with CRLF.
    max_command_line: int = 512
    # RFC 5321 section 4.5.3.1.6: a text line is at most 1000 octets with CRLF.
    # 0 turns the check off (lines are still streamed, never buffered whole).
    max_text_line: int = 1000
    # Largest message accepted, in octets (advertised as SIZE). 0: no limit.
    max_message_size: int = 25 * 1024 * 1024
    # RFC 5321 section 4.5.3.1.8: at least 100 recipients must be accepted.
    max_recipients: int = 100
    # 5xx replies in one session before it is closed with 421 4.7.0.
    max_errors: int = 20
    # Bare CR or LF inside DATA: "normalize" to CRLF, or "reject" with 5xx.
    bare_newline: BareNewline = "normalize"
    # Extensions offered (each can be switched off).
    pipelining: bool = True
    chunking: bool = True
    smtputf8: bool = True
    eightbitmime: bool = True
    enhancedstatuscodes: bool = True
    # Offer STARTTLS (the transport must be able to start TLS).
    starttls: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Listen:
    """One listening address."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, text: str, *, option: str = "--listen") -> Listen:
        """Parse ``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (all addresses)."""
        value = text.strip()
        if value.startswith("["):
            end = value.find("]")
            if end < 0 or not value[end + 1 :].startswith(":"):
                raise ConfigError(f"{option}: expected [IPv6]:PORT, got {text!r}")
            host, port_text = value[1:end], value[end + 2 :]
        else:
            host, sep, port_text = value.rpartition(":")
            if not sep:
                raise ConfigError(f"{option}: expected HOST:PORT, got {text!r}")
            if ":" in host:
                raise ConfigError(f"{option}: write IPv6 addresses as [ADDR]:PORT, got {text!r}")
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"{option}: port must be a number, got {text!r}") from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"{option}: port out of range in {text!r}")
        if host:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                if host != "localhost":
                    raise ConfigError(
                        f"{option}: host must be an IP address or localhost, got {host!r}"
                    ) from None
        return cls(host or "0.0.0.0", port)


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything ``ehlo serve`` and ``ehlo.Server`` read."""

    # Addresses to listen on.
    listen: tuple[Listen, ...] = (Listen("127.0.0.1", 2525),)
    # Folder for the store, the self-signed certificate and other state.
    data_dir: Path = Path("ehlo-data")
    # Storage backend: "sqlite" (default), "maildir" or "null" (discard).
    store: StoreKind = "sqlite"
    # Our host name: in the banner, the EHLO reply and Received headers.
    hostname: str = "localhost"
    # Accept only these recipient domains (and postmaster); empty: accept all.
    domains: tuple[str, ...] = ()
    # TLS: a certificate and key (PEM); without them a self-signed pair is
    # created in data_dir on first run, unless tls is False.
    tls: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Limits enforced by the protocol core.
    limits: ProtocolLimits = ProtocolLimits()
    # Connections in total and from one client IP; 421 4.7.0 beyond.
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    # RFC 5321 section 4.5.3.2.7: at least 5 minutes awaiting a command.
    command_timeout: float = 300.0
    # Longest wait for more message data (RFC 5321 section 4.5.3.2.5/6 spirit).
    data_timeout: float = 180.0
    # SIGTERM: how long transactions in progress may take to finish.
    shutdown_timeout: float = 30.0
    # Look up the client's reverse DNS name for the Received header.
    reverse_dns: bool = True
    # Seconds to wait for that name before writing "unknown".
    reverse_dns_timeout: float = 2.0
    # Logging: "text" or "json" lines on stderr.
    log_format: LogFormat = "text"
    log_level: str = "INFO"
