"""load_config: TOML files, command-line precedence, one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ehlo.config import (
    ConfigError,
    GreetingConfig,
    Listen,
    ProtocolLimits,
    ServerConfig,
    load_config,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ehlo.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path | None, overrides: dict[str, Any] | None = None, **kw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides or {}, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------
# Loading


def test_no_file_no_overrides_gives_defaults() -> None:
    config = load_config(None, {})
    assert config == ServerConfig()
    assert config.hostname == "localhost"
    assert config.listen == (Listen("127.0.0.1", 2525),)


def test_full_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
listen = ["127.0.0.1:2525", "[::1]:2526", ":25"]
data_dir = "/var/lib/ehlo"
store = "maildir"
hostname = "mx.example.org"
domains = ["example.org", "example.net"]
tls = true
tls_cert = "/etc/ehlo/cert.pem"
tls_key = "key.pem"
max_connections = 10
max_connections_per_ip = 2
command_timeout = 60
data_timeout = 30.5
shutdown_timeout = 0
reverse_dns = false
reverse_dns_timeout = 0.5
log_format = "json"
log_level = "debug"

[limits]
max_message_size = 1048576
max_recipients = 5
max_command_line = 1024
max_text_line = 0
max_errors = 3
bare_newline = "reject"
pipelining = false
chunking = false
smtputf8 = false
eightbitmime = false
enhancedstatuscodes = false
""",
    )
    config = load_config(path, {})
    assert config.listen == (
        Listen("127.0.0.1", 2525),
        Listen("::1", 2526),
        Listen("0.0.0.0", 25),
    )
    assert config.data_dir == Path("/var/lib/ehlo")
    assert config.store == "maildir"
    assert config.hostname == "mx.example.org"
    assert config.domains == ("example.org", "example.net")
    assert config.tls_cert == Path("/etc/ehlo/cert.pem")
    assert config.tls_key == tmp_path / "key.pem"  # relative to the file's folder
    assert config.max_connections == 10
    assert config.max_connections_per_ip == 2
    assert config.command_timeout == 60.0
    assert isinstance(config.command_timeout, float)
    assert config.data_timeout == 30.5
    assert config.shutdown_timeout == 0.0
    assert config.reverse_dns is False
    assert config.reverse_dns_timeout == 0.5
    assert config.log_format == "json"
    assert config.log_level == "DEBUG"
    assert config.limits == ProtocolLimits(
        max_message_size=1048576,
        max_recipients=5,
        max_command_line=1024,
        max_text_line=0,
        max_errors=3,
        bare_newline="reject",
        pipelining=False,
        chunking=False,
        smtputf8=False,
        eightbitmime=False,
        enhancedstatuscodes=False,
    )


def test_partial_limits_keep_other_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[limits]\nmax_recipients = 7\n"), {})
    assert config.limits.max_recipients == 7
    assert config.limits.max_message_size == ProtocolLimits().max_message_size
    assert config.limits.pipelining is True


def test_relative_data_dir_is_relative_to_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'data_dir = "spool"\n'), {})
    assert config.data_dir == tmp_path / "spool"


def test_empty_file(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), {}) == ServerConfig()


def test_idn_hostname_becomes_a_label(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'hostname = "bücher.example"\n'), {})
    assert config.hostname == "xn--bcher-kva.example"


def test_ip_hostname_is_accepted() -> None:
    assert load_config(None, {"hostname": "192.0.2.1"}).hostname == "192.0.2.1"


# --------------------------------------------------------------------------
# Precedence: command line > file > defaults


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'store = "maildir"\nhostname = "file.example"\nlisten = ["127.0.0.1:1"]\n'
        "[limits]\nmax_recipients = 3\nmax_errors = 4\n",
    )
    config = load_config(
        path,
        {
            "hostname": "cli.example",
            "listen": ["127.0.0.1:2", "[::1]:3"],
            "limits.max_recipients": 9,
            "store": None,  # unset option: the file's value stays
        },
    )
    assert config.hostname == "cli.example"
    assert config.listen == (Listen("127.0.0.1", 2), Listen("::1", 3))
    assert config.limits.max_recipients == 9
    assert config.limits.max_errors == 4  # from the file
    assert config.store == "maildir"  # from the file
    assert config.max_connections == 10000  # default


def test_nested_limits_override(tmp_path: Path) -> None:
    config = load_config(None, {"limits": {"max_message_size": 0}})
    assert config.limits.max_message_size == 0


def test_cli_paths_are_relative_to_the_working_directory(tmp_path: Path) -> None:
    path = write(tmp_path, 'data_dir = "spool"\n')
    config = load_config(path, {"data_dir": "here"})
    assert config.data_dir == Path("here")


def test_cert_from_cli_and_key_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'tls_cert = "a.pem"\ntls_key = "b.pem"\n')
    config = load_config(path, {"tls_cert": "/x/c.pem"})
    assert config.tls_cert == Path("/x/c.pem")
    assert config.tls_key == tmp_path / "b.pem"


# --------------------------------------------------------------------------
# Errors: one line, naming the key


def test_unknown_key_with_suggestion(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "max_conection = 5\n"))
    assert message == 'unknown config key "max_conection" (did you mean "max_connections"?)'


def test_unknown_limits_key_with_suggestion(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[limits]\nmax_recipient = 5\n"))
    assert message == (
        'unknown config key "limits.max_recipient" (did you mean "limits.max_recipients"?)'
    )


def test_limits_key_at_top_level_points_to_the_table(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "max_message_size = 5\n"))
    assert message == (
        'unknown config key "max_message_size" (did you mean "limits.max_message_size"?)'
    )


def test_top_level_key_inside_limits(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, '[limits]\nhostname = "x.example"\n'))
    assert message == 'unknown config key "limits.hostname" (did you mean "hostname"?)'


def test_unknown_key_without_suggestion(tmp_path: Path) -> None:
    assert error_of(write(tmp_path, "zzzz = 1\n")) == 'unknown config key "zzzz"'


def test_unknown_table(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[limit]\nmax_errors = 1\n"))
    assert message == 'unknown config key "limit" (did you mean "limits"?)'


def test_unknown_override_key() -> None:
    assert error_of(None, {"hostnme": "x"}).startswith('unknown config key "hostnme"')


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[limits]\nmax_recipients = "abc"\n',
            'config key limits.max_recipients: expected an integer >= 1, got "abc"',
        ),
        (
            "[limits]\nmax_recipients = 0\n",
            "config key limits.max_recipients: expected an integer >= 1, got 0",
        ),
        (
            "[limits]\nmax_message_size = -1\n",
            "config key limits.max_message_size: expected a size in octets >= 0 (0: no limit),"
            " got -1",
        ),
        (
            "[limits]\nmax_message_size = 1.5\n",
            "config key limits.max_message_size: expected a size in octets >= 0 (0: no limit),"
            " got 1.5",
        ),
        (
            "[limits]\nmax_command_line = 100\n",
            "config key limits.max_command_line: expected an integer >= 512, got 100",
        ),
        (
            "[limits]\nmax_text_line = 80\n",
            "config key limits.max_text_line: expected 0 (no limit) or an integer >= 1000, got 80",
        ),
        (
            '[limits]\nbare_newline = "fix"\n',
            'config key limits.bare_newline: expected one of "normalize", "reject", got "fix"',
        ),
        (
            '[limits]\npipelining = "yes"\n',
            'config key limits.pipelining: expected true or false, got "yes"',
        ),
        (
            "max_connections = true\n",
            "config key max_connections: expected an integer >= 1, got true",
        ),
        (
            "command_timeout = 0\n",
            "config key command_timeout: expected a number of seconds > 0, got 0",
        ),
        (
            "stress_threshold = 0\n",
            "config key stress_threshold: expected a number above 0 and at most 1, got 0",
        ),
        (
            "stress_threshold = 1.5\n",
            "config key stress_threshold: expected a number above 0 and at most 1, got 1.5",
        ),
        (
            "stress_timeout = 0\n",
            "config key stress_timeout: expected a number of seconds > 0, got 0",
        ),
        (
            "shutdown_timeout = -1\n",
            "config key shutdown_timeout: expected a number of seconds >= 0, got -1",
        ),
        (
            "data_timeout = nan\n",
            "config key data_timeout: expected a number of seconds > 0, got nan",
        ),
        (
            'store = "mbox"\n',
            'config key store: expected one of "sqlite", "maildir", "null", "postgresql",'
            ' got "mbox"',
        ),
        (
            'store = "postgresql"\n',
            "config key store: the postgresql store needs database_url"
            " (or --store postgresql://USER@HOST/DB)",
        ),
        (
            'store = "postgresql"\ndatabase_url = "postgresql://ehlo:s3cret@db.example/ehlo"\n',
            "config key database_url: the URL holds a password: put it in ~/.pgpass,"
            " PGPASSFILE or PGPASSWORD instead",
        ),
        (
            'database_url = "host=db.example password=s3cret"\n',
            "config key database_url: the conninfo holds a password: put it in ~/.pgpass,"
            " PGPASSFILE or PGPASSWORD instead",
        ),
        (
            'database_url = "mysql://db.example/ehlo"\n',
            "config key database_url: expected a postgresql:// URL, got scheme 'mysql'",
        ),
        (
            'log_format = "xml"\n',
            'config key log_format: expected one of "text", "json", got "xml"',
        ),
        (
            'log_level = "loud"\n',
            'config key log_level: expected one of "DEBUG", "INFO", "WARNING", "ERROR",'
            ' "CRITICAL", got "loud"',
        ),
        (
            'hostname = "bad_name!"\n',
            'config key hostname: expected a host name such as mail.example.org, got "bad_name!"',
        ),
        (
            'hostname = "-x.example"\n',
            'config key hostname: expected a host name such as mail.example.org, got "-x.example"',
        ),
        (
            'domains = ["example.org", "exa mple.net"]\n',
            "config key domains: expected a list of domain names such as example.org,"
            ' got "exa mple.net"',
        ),
        (
            "domains = 5\n",
            "config key domains: expected a list of domain names, got 5",
        ),
        (
            'data_dir = ""\n',
            'config key data_dir: expected a file or folder path, got ""',
        ),
        (
            "limits = 3\n",
            "config key limits: expected a table ([limits]), got 3",
        ),
        (
            "listen = []\n",
            'config key listen: expected a list of addresses such as ["127.0.0.1:2525"], got []',
        ),
        (
            'listen = ["127.0.0.1:99999"]\n',
            "config key listen: port out of range in '127.0.0.1:99999'",
        ),
        (
            'listen = ["127.0.0.1"]\n',
            "config key listen: expected HOST:PORT, got '127.0.0.1'",
        ),
        (
            'listen = ["mail.example.org:25"]\n',
            "config key listen: host must be an IP address or localhost, got 'mail.example.org'",
        ),
        (
            'tls_cert = "cert.pem"\n',
            "config key tls_cert: tls_key must be given too (a certificate needs its key)",
        ),
        (
            'tls_key = "key.pem"\n',
            "config key tls_key: tls_cert must be given too (a certificate needs its key)",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, toml: str, expected: str) -> None:
    assert error_of(write(tmp_path, toml)) == expected


def test_long_values_are_shortened(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, f'store = "{"x" * 500}"\n'))
    assert message.startswith('config key store: expected one of "sqlite"')
    assert message.endswith("...")
    assert len(message) < 200


def test_override_errors_use_the_option_label() -> None:
    message = error_of(
        None,
        {"limits.max_recipients": 0},
        labels={"limits.max_recipients": "--max-recipients"},
    )
    assert message == "--max-recipients: expected an integer >= 1, got 0"
    message = error_of(None, {"listen": ["nope"]}, labels={"listen": "--listen"})
    assert message == "--listen: expected HOST:PORT, got 'nope'"


def test_cert_without_key_on_the_command_line() -> None:
    message = error_of(
        None,
        {"tls_cert": "c.pem"},
        labels={"tls_cert": "--tls-cert", "tls_key": "--tls-key"},
    )
    assert message == "--tls-cert: --tls-key must be given too (a certificate needs its key)"


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "tls = true\nhostname = \n")
    message = error_of(path)
    assert message.startswith(f"config file {path}: ")
    assert "line 2" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert error_of(path) == f"config file {path}: No such file or directory"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "ehlo.toml"
    path.write_bytes(b'hostname = "\xff"\n')
    assert error_of(path).startswith(f"config file {path}: ")


# --------------------------------------------------------------------------
# DNS servers and greeting verification ([greeting], [greeting.checks])


def test_greeting_and_dns_from_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
dns_servers = ["192.0.2.53", "127.0.0.1:5353", "[::1]:53", "2001:db8::53"]
dns_timeout = 0.5

[greeting]
policy = "strict"
stage = "mail"
trusted_networks = ["10.0.0.0/8", "192.168.1.7/24", "2001:db8::/32", "127.0.0.1"]
max_queries = 20
timeout = 4

[greeting.checks]
forward_match = "defer"
iprev = "record"
dynamic = "off"
""",
    )
    config = load_config(path, {})
    assert config.dns_servers == ("192.0.2.53", "127.0.0.1:5353", "[::1]:53", "2001:db8::53")
    assert config.dns_timeout == 0.5
    greeting = config.greeting
    assert greeting == GreetingConfig(
        policy="strict",
        checks={"forward_match": "defer", "iprev": "record", "dynamic": "off"},
        stage="mail",
        # Host bits are dropped; a bare address is a one-address network.
        trusted_networks=("10.0.0.0/8", "192.168.1.0/24", "2001:db8::/32", "127.0.0.1/32"),
        max_queries=20,
        timeout=4.0,
    )
    policy = greeting.to_policy()
    assert policy.mode("forward_match") == "defer"
    assert policy.mode("syntax") == "reject"  # from the strict preset
    assert policy.mode("dynamic") == "off"
    assert policy.stage == "mail"
    assert policy.trusted("192.168.1.200") and not policy.trusted("192.168.2.1")


def test_greeting_defaults_record_and_refuse_nothing() -> None:
    config = load_config(None, {})
    assert config.greeting == GreetingConfig()
    assert config.dns_servers == ()
    policy = config.greeting.to_policy()
    assert not policy.enforcing
    assert policy.stage == "rcpt"


def test_greeting_overrides_merge_with_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'dns_servers = ["192.0.2.53"]\n[greeting]\npolicy = "record"\n'
        '[greeting.checks]\nforward_match = "reject"\niprev = "defer"\n',
    )
    config = load_config(
        path,
        {
            "dns_servers": ["127.0.0.1:5353"],
            "greeting.policy": "strict",
            "greeting.checks.iprev": "record",  # one check: the file's others stay
            "greeting.stage": None,
        },
    )
    assert config.dns_servers == ("127.0.0.1:5353",)
    assert config.greeting.policy == "strict"
    assert config.greeting.checks == {"forward_match": "reject", "iprev": "record"}
    assert config.greeting.stage == "rcpt"


def test_nested_greeting_override() -> None:
    config = load_config(
        None, {"greeting": {"policy": "off", "checks": {"forward_match": "reject"}}}
    )
    assert config.greeting.policy == "off"
    assert config.greeting.to_policy().enabled_checks == ("forward_match",)
    config = load_config(None, {"greeting.checks": {"spf_helo": "defer"}})
    assert config.greeting.checks == {"spf_helo": "defer"}


def test_dns_server_as_a_single_string() -> None:
    assert load_config(None, {"dns_servers": "[::1]"}).dns_servers == ("::1",)


def test_unknown_greeting_check_with_suggestion(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, '[greeting.checks]\nforward_mach = "reject"\n'))
    assert message == 'unknown greeting check "forward_mach" (did you mean "forward_match"?)'
    message = error_of(None, {"greeting.checks.zzz": "off"})
    assert message == 'unknown greeting check "zzz"'


def test_unknown_greeting_check_from_an_option() -> None:
    message = error_of(
        None,
        {"greeting.checks.ipref": "reject"},
        labels={"greeting.checks.ipref": "--helo-check ipref"},
    )
    assert message == '--helo-check: unknown greeting check "ipref" (did you mean "iprev"?)'


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[greeting]\npolcy = "strict"\n',
            'unknown config key "greeting.polcy" (did you mean "greeting.policy"?)',
        ),
        ('policy = "strict"\n', 'unknown config key "policy" (did you mean "greeting.policy"?)'),
        (
            'forward_match = "reject"\n',
            'unknown config key "forward_match" (did you mean "greeting.checks.forward_match"?)',
        ),
        (
            '[greeting]\nforward_match = "reject"\n',
            'unknown config key "greeting.forward_match"'
            ' (did you mean "greeting.checks.forward_match"?)',
        ),
        (
            "[greeting]\ndns_timeout = 1\n",
            'unknown config key "greeting.dns_timeout" (did you mean "dns_timeout"?)',
        ),
        (
            '[greeting.check]\niprev = "reject"\n',
            'unknown config key "greeting.check" (did you mean "greeting.checks"?)',
        ),
        ("[greting]\n", 'unknown config key "greting" (did you mean "greeting"?)'),
        (
            'dns_server = ["127.0.0.1"]\n',
            'unknown config key "dns_server" (did you mean "dns_servers"?)',
        ),
    ],
)
def test_unknown_greeting_keys(tmp_path: Path, toml: str, expected: str) -> None:
    assert error_of(write(tmp_path, toml)) == expected


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[greeting]\npolicy = "paranoid"\n',
            'config key greeting.policy: expected one of "off", "record", "strict", got "paranoid"',
        ),
        (
            '[greeting]\nstage = "end"\n',
            'config key greeting.stage: expected one of "helo", "mail", "rcpt", "data", got "end"',
        ),
        (
            '[greeting]\ntrusted_networks = ["10.0.0.0/33"]\n',
            "config key greeting.trusted_networks: expected a list of networks such as"
            ' ["10.0.0.0/8", "2001:db8::/32"], got "10.0.0.0/33"',
        ),
        (
            "[greeting]\ntrusted_networks = [8]\n",
            "config key greeting.trusted_networks: expected a list of networks such as"
            ' ["10.0.0.0/8", "2001:db8::/32"], got [8]',
        ),
        (
            "[greeting]\nmax_queries = 0\n",
            "config key greeting.max_queries: expected an integer >= 1, got 0",
        ),
        (
            "[greeting]\ntimeout = -1\n",
            "config key greeting.timeout: expected a number of seconds > 0, got -1",
        ),
        (
            '[greeting.checks]\niprev = "deny"\n',
            'config key greeting.checks.iprev: expected one of "off", "record", "defer",'
            ' "reject", got "deny"',
        ),
        (
            '[greeting.checks]\ndynamic = "reject"\n',
            'config key greeting.checks.dynamic: expected "off" or "record"'
            ' (dynamic is only recorded), got "reject"',
        ),
        (
            "greeting = 3\n",
            "config key greeting: expected a table ([greeting]), got 3",
        ),
        (
            "[greeting]\nchecks = 3\n",
            "config key greeting.checks: expected a table ([greeting.checks]), got 3",
        ),
        (
            'dns_servers = ["dns.example"]\n',
            "config key dns_servers: expected a list of DNS servers such as"
            ' ["192.0.2.53", "127.0.0.1:5353", "[::1]:53"], got "dns.example"',
        ),
        (
            'dns_servers = ["127.0.0.1:0"]\n',
            "config key dns_servers: expected a list of DNS servers such as"
            ' ["192.0.2.53", "127.0.0.1:5353", "[::1]:53"], got "127.0.0.1:0"',
        ),
        (
            'dns_servers = ["[::1]x"]\n',
            "config key dns_servers: expected a list of DNS servers such as"
            ' ["192.0.2.53", "127.0.0.1:5353", "[::1]:53"], got "[::1]x"',
        ),
        (
            "dns_timeout = 0\n",
            "config key dns_timeout: expected a number of seconds > 0, got 0",
        ),
    ],
)
def test_bad_greeting_values_name_the_key(tmp_path: Path, toml: str, expected: str) -> None:
    assert error_of(write(tmp_path, toml)) == expected


def test_greeting_option_labels() -> None:
    message = error_of(
        None,
        {"greeting.checks.dynamic": "defer"},
        labels={"greeting.checks.dynamic": "--helo-check dynamic"},
    )
    assert message == (
        '--helo-check dynamic: expected "off" or "record" (dynamic is only recorded), got "defer"'
    )
    message = error_of(None, {"dns_servers": ["x"]}, labels={"dns_servers": "--dns-server"})
    assert message.startswith("--dns-server: expected a list of DNS servers")


def test_sqlite_writer_is_process_or_thread(tmp_path: Path) -> None:
    assert load_config(None, {}).sqlite_writer == "process"
    path = write(tmp_path, 'sqlite_writer = "thread"\n')
    assert load_config(path, {}).sqlite_writer == "thread"
    path = write(tmp_path, 'sqlite_writer = "fork"\n')
    assert "sqlite_writer" in error_of(path)

