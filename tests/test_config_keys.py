"""The config key tables, derived from the dataclass fields: complete both ways.

Every field of ``ServerConfig``, ``ProtocolLimits`` and ``GreetingConfig``
is a key that loads from TOML into that field (or is declared a table or no
key), and every key sets a field; the tables are built from the fields'
marks, and a field without one stops the module from loading.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import pytest

from ehlo import config as module
from ehlo.config import (
    CONFIG_KEYS,
    GreetingConfig,
    Listen,
    ProtocolLimits,
    ServerConfig,
    load_config,
)

from .test_config import write

# --------------------------------------------------------------------------
# The key tables: derived from the dataclass fields

# One value per key, other than its default: (TOML text, the value loaded).
SAMPLES: dict[str, tuple[str, Any]] = {
    "listen": ('["127.0.0.1:2600"]', (Listen("127.0.0.1", 2600),)),
    "data_dir": ('"/srv/ehlo"', Path("/srv/ehlo")),
    "store": ('"maildir"', "maildir"),
    "database_url": ('"postgresql://ehlo@db.example/ehlo"', "postgresql://ehlo@db.example/ehlo"),
    "hostname": ('"mx.example.org"', "mx.example.org"),
    "domains": ('["example.org"]', ("example.org",)),
    "tls": ("false", False),
    "tls_cert": ('"/etc/c.pem"', Path("/etc/c.pem")),
    "tls_key": ('"/etc/k.pem"', Path("/etc/k.pem")),
    "sni_certificates": ('[["/a.pem", "/a.key"]]', ((Path("/a.pem"), Path("/a.key")),)),
    "require_tls": ("true", True),
    "submission": ("true", True),
    "auth": ("false", False),
    "auth_failure_delay": ("2.5", 2.5),
    "max_auth_failures": ("7", 7),
    "auth_lockout": ("30", 30.0),
    "max_auth_failures_per_user": ("3", 3),
    "auth_user_lockout": ("40", 40.0),
    "max_auth_queue": ("4", 4),
    "auth_queue_timeout": ("5", 5.0),
    "proxy_trusted": ('["10.0.0.0/8"]', ("10.0.0.0/8",)),
    "proxy_timeout": ("3", 3.0),
    "max_connections": ("99", 99),
    "max_connections_per_ip": ("9", 9),
    "stress_threshold": ("0.5", 0.5),
    "stress_timeout": ("4", 4.0),
    "max_connection_rate": ("0", 0),
    "limits_exempt": ('["192.0.2.0/24"]', ("192.0.2.0/24",)),
    "greeting_delay": ("1", 1.0),
    "pipelining_violation": ('"reject"', "reject"),
    "authres_forged": ('"remove"', "remove"),
    "max_hops": ("30", 30),
    "max_junk_commands": ("0", 0),
    "max_session_time": ("60", 60.0),
    "workers": ("2", 2),
    "metrics": ("false", False),
    "user": ('"ehlo"', "ehlo"),
    "http": ('"127.0.0.1:9025"', Listen("127.0.0.1", 9025)),
    "http_enabled": ("false", False),
    "http_auth": ("true", True),
    "http_insecure": ("true", True),
    "keep_messages": ("500", 500),
    "keep_days": ("1.5", 1.5),
    "transcripts": ("false", False),
    "session_log_max": ("0", 0),
    "sqlite_writer": ('"thread"', "thread"),
    "command_timeout": ("301", 301.0),
    "data_timeout": ("181", 181.0),
    "shutdown_timeout": ("0", 0.0),
    "dns_servers": ('["127.0.0.1:5353"]', ("127.0.0.1:5353",)),
    "dns_timeout": ("1", 1.0),
    "reverse_dns": ("false", False),
    "reverse_dns_timeout": ("0.5", 0.5),
    "lmtp": ('"127.0.0.1:24"', "lmtp:127.0.0.1:24"),
    "keep_local": ("true", True),
    "relay_networks": ('["192.0.2.0/24"]', ("192.0.2.0/24",)),
    "relay_host": ('"smart.example.org:587"', "smtp:smart.example.org:587"),
    "relay_auth_user": ('"relay"', "relay"),
    "relay_password_file": ('"/etc/ehlo/relay.pw"', Path("/etc/ehlo/relay.pw")),
    "routes": ('{ "example.net" = "lmtp:unix:/run/lmtp" }', {"example.net": "lmtp:unix:/run/lmtp"}),
    "delivery_port": ("2526", 2526),
    "tls_policy": ('{ "example.net" = "verify" }', {"example.net": "verify"}),
    "mta_sts": ("false", False),
    "mta_sts_port": ("8443", 8443),
    "delivery_ca_file": ('"/etc/ehlo/ca.pem"', Path("/etc/ehlo/ca.pem")),
    "delivery_concurrency": ("5", 5),
    "delivery_per_destination": ("2", 2),
    "retry_min": ("60", 60.0),
    "retry_max": ("600", 600.0),
    "max_queue_lifetime": ("86400", 86400.0),
    "delay_warning": ("0", 0.0),
    "delivery_timeout_scale": ("0.5", 0.5),
    "delivery_connect_timeout": ("5", 5.0),
    "delivery_lease": ("30", 30.0),
    "log_format": ('"json"', "json"),
    "log_level": ('"debug"', "DEBUG"),
    "limits.max_message_size": ("1024", 1024),
    "limits.max_recipients": ("5", 5),
    "limits.max_command_line": ("1024", 1024),
    "limits.max_text_line": ("0", 0),
    "limits.max_errors": ("3", 3),
    "limits.bare_newline": ('"reject"', "reject"),
    "limits.nul": ('"reject"', "reject"),
    "limits.pipelining": ("false", False),
    "limits.chunking": ("false", False),
    "limits.smtputf8": ("false", False),
    "limits.eightbitmime": ("false", False),
    "limits.enhancedstatuscodes": ("false", False),
    "limits.dsn": ("false", False),
    "limits.auth_plaintext": ("true", True),
    "greeting.policy": ('"strict"', "strict"),
    "greeting.stage": ('"mail"', "mail"),
    "greeting.trusted_networks": ('["10.1.0.0/16"]', ("10.1.0.0/16",)),
    "greeting.max_queries": ("9", 9),
    "greeting.timeout": ("3", 3.0),
}

# Fields that are tables of their own or set by the program, not keys.
NOT_KEYS = {
    "limits",
    "greeting",
    "sqlite_writer_address",
    "limits.starttls",
    "limits.auth_mechanisms",
    "greeting.checks",
}


def _field_names() -> set[str]:
    return {
        *(f.name for f in dataclasses.fields(ServerConfig)),
        *(f"limits.{f.name}" for f in dataclasses.fields(ProtocolLimits)),
        *(f"greeting.{f.name}" for f in dataclasses.fields(GreetingConfig)),
    }


def test_every_field_is_a_key_and_every_key_a_field() -> None:
    keys = {k for k in CONFIG_KEYS if k not in ("limits", "greeting", "greeting.checks")}
    assert keys == set(SAMPLES)
    assert keys == _field_names() - NOT_KEYS


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_every_key_loads_from_toml_into_its_field(tmp_path: Path, key: str) -> None:
    text, expected = SAMPLES[key]
    table, _, name = key.rpartition(".")
    body = f"[{table}]\n{name} = {text}\n" if table else f"{name} = {text}\n"
    if key in ("tls_cert", "tls_key"):  # each needs the other
        other = "tls_key" if key == "tls_cert" else "tls_cert"
        body = f'{other} = "/etc/other.pem"\n' + body
    config = load_config(write(tmp_path, body), {})
    holder: Any = config
    if table:
        holder = getattr(config, table)
    assert getattr(holder, name) == expected
    default: Any = ServerConfig()
    if table:
        default = getattr(default, table)
    assert getattr(default, name) != expected, "the sample must differ from the default"


def test_key_tables_are_built_from_field_marks() -> None:
    key = module._Key(module._positive_int, name="renamed", doc="a count")
    marked = dataclasses.make_dataclass(
        "Marked",
        [
            ("count", Annotated[int, key]),
            ("inner", Annotated[int, module._TABLE]),
            ("internal", Annotated[int, module._NOT_A_KEY]),
        ],
    )
    assert module._keys_of(marked) == {"renamed": ("count", key)}
    unmarked = dataclasses.make_dataclass("Unmarked", [("count", int)])
    with pytest.raises(TypeError, match=r"^Unmarked.count: no config key declared$"):
        module._keys_of(unmarked)
    with pytest.raises(TypeError, match=r"^ProtocolLimits.starttls: no config key declared$"):
        module._keys_declared(ProtocolLimits, module._LIMIT_CHECKS, frozenset())
    undocumented = dataclasses.make_dataclass(
        "Undocumented", [("count", Annotated[int, module._Key(module._positive_int)])]
    )
    with pytest.raises(TypeError, match=r"^Undocumented.count: the config key needs a one-line"):
        module._keys_of(undocumented)
    stray = {**module._LIMIT_CHECKS, "max_recipient": module._Key(module._positive_int, doc="x")}
    with pytest.raises(TypeError, match=r"^ProtocolLimits has no field max_recipient$"):
        module._keys_declared(ProtocolLimits, stray, module._LIMIT_NOT_KEYS)
    # The tables hold the fields' own validators: a key's check is its field's mark.
    assert module._SERVER_KEYS["tls"][0] == "tls"
    assert module._SERVER_KEYS["tls"][1].check is module._bool
    assert module._LIMIT_KEYS["max_recipients"][0] == "max_recipients"
    assert module._GREETING_KEYS["timeout"][0] == "timeout"


def test_paths_in_a_file_resolve_by_their_field_mark(tmp_path: Path) -> None:
    relative = {k for k, (_, key) in module._SERVER_KEYS.items() if key.files is not None}
    assert relative == {
        "data_dir", "tls_cert", "tls_key", "sni_certificates", "relay_password_file",
        "delivery_ca_file",
    }
    path = write(
        tmp_path,
        'data_dir = "d"\ntls_cert = "c.pem"\ntls_key = "/abs/k.pem"\n'
        'sni_certificates = [["s.pem", "s.key"]]\nrelay_password_file = "pw"\n'
        'delivery_ca_file = "ca.pem"\n',
    )
    config = load_config(path, {"data_dir": "cli"})
    assert config.data_dir == Path("cli")  # the command line's is not the file's
    assert config.tls_cert == tmp_path / "c.pem"
    assert config.tls_key == Path("/abs/k.pem")
    assert config.sni_certificates == ((tmp_path / "s.pem", tmp_path / "s.key"),)
    assert config.relay_password_file == tmp_path / "pw"
    assert config.delivery_ca_file == tmp_path / "ca.pem"
