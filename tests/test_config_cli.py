"""The configuration reference on the command line, run as ``python -m ehlo``.

``ehlo config defaults`` (every key, its default, its meaning, as TOML that
loads back into the default configuration), ``ehlo config check FILE`` (the
settings a file makes, or one line naming what is wrong), the defaults
shown by ``--help``, and ``ehlo users --config``.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ehlo.cli import build_parser
from ehlo.config import CONFIG_KEYS, ServerConfig, key_values, load_config

TIMEOUT = 30.0  # seconds for one command


def run(
    *args: str, cwd: Path | None = None, stdin: bytes = b""
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "ehlo", *args],
        input=stdin,
        capture_output=True,
        timeout=TIMEOUT,
        cwd=cwd,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ehlo: error: ")
    return lines[0]


def defaults_text() -> str:
    result = run("config", "defaults")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


# --------------------------------------------------------------------------
# ehlo config defaults


def test_defaults_are_toml_that_loads_back_into_the_default_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = defaults_text()
    tomllib.loads(text)  # valid TOML, or this raises
    (tmp_path / "defaults.toml").write_text(text)
    # Relative paths in a file are relative to its folder: load it from there.
    monkeypatch.chdir(tmp_path)
    assert load_config(Path("defaults.toml")) == ServerConfig()
    # And `config check` accepts it: the same settings, data_dir made absolute.
    checked = run("config", "check", "defaults.toml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    (tmp_path / "checked.toml").write_text(checked.stdout)
    expected = dataclasses.replace(ServerConfig(), data_dir=tmp_path / "ehlo-data")
    assert load_config(tmp_path / "checked.toml") == expected


def test_every_key_is_listed_under_its_one_line_meaning() -> None:
    lines = defaults_text().splitlines()
    table = ""
    shown: dict[str, str] = {}  # dotted key -> the comment line above it
    for number, line in enumerate(lines):
        header = re.fullmatch(r"\[([a-z.]+)\]", line)
        if header:
            table = header.group(1)
            continue
        # A key, or a key without a default shown commented out.
        entry = re.fullmatch(r"(?:# )?([a-z_0-9]+) = .+", line)
        if entry:
            key = f"{table}.{entry.group(1)}" if table else entry.group(1)
            above = lines[number - 1]
            assert above.startswith("# ") and len(above) > 10, (key, above)
            shown[key] = above[2:]
    declared = {key: doc for key, _value, doc in key_values(ServerConfig())}
    assert shown == declared
    tables = {"limits", "greeting", "greeting.checks"}
    assert set(declared) == set(CONFIG_KEYS) - tables
    for key, doc in declared.items():
        assert doc.strip() and "\n" not in doc, key
    # Every table is there, [greeting.checks] too (empty by default).
    assert {f"[{t}]" for t in tables} <= set(lines)


# --------------------------------------------------------------------------
# ehlo config check FILE


def test_check_prints_the_settings_of_a_file_and_they_load_back(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    config_file = folder / "ehlo.toml"
    config_file.write_text(
        'listen = ["127.0.0.1:2526", "[::1]:4650,tls", ":2527,proxy"]\n'
        "data_dir = 'mail \"spool\" \\ here'\n"
        'hostname = "mx.example.org"\n'
        'domains = ["example.org", "b\u00fccher.example"]\n'
        'tls_cert = "cert.pem"\n'
        'tls_key = "key.pem"\n'
        'sni_certificates = [["a.pem", "a.key"]]\n'
        "dns_servers = ['127.0.0.1:5353']\n"
        "auth_failure_delay = 0.25\n"
        'log_level = "debug"\n'
        "[limits]\nmax_message_size = 1048576\nnul = 'reject'\n"
        '[greeting]\npolicy = "strict"\ntrusted_networks = ["10.1.2.3/8"]\n'
        '[greeting.checks]\nforward_match = "reject"\niprev = "off"\n'
    )
    loaded = load_config(config_file)
    result = run("config", "check", str(config_file))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    data = tomllib.loads(result.stdout)
    assert data["data_dir"] == str(folder / 'mail "spool" \\ here')
    assert data["tls_cert"] == str(folder / "cert.pem")
    assert data["greeting"]["checks"] == {"forward_match": "reject", "iprev": "off"}
    assert data["limits"]["max_message_size"] == 1048576
    assert data["domains"] == ["example.org", "xn--bcher-kva.example"]
    # Saved anywhere, the printed settings are the file's settings.
    elsewhere = tmp_path / "copy.toml"
    elsewhere.write_text(result.stdout)
    assert load_config(elsewhere) == loaded
    assert loaded != ServerConfig()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("max_message_size = 10\n", 'unknown config key "max_message_size"'),
        ("[limits]\nmax_recipients = 0\n", "config key limits.max_recipients: expected"),
        ('hostname = "bad name"\n', "config key hostname: expected a host name"),
        ("listen = [\n", "config file"),
        ('tls_cert = "c.pem"\n', "tls_key must be given too"),
        ('[greeting.checks]\nforward_mach = "reject"\n', 'did you mean "forward_match"'),
    ],
)
def test_check_reports_a_bad_file_in_one_line(tmp_path: Path, body: str, says: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    assert says in one_line_error(run("config", "check", str(path)))


def test_check_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(run("config", "check", str(tmp_path / "none.toml")))
    assert "none.toml" in line


# --------------------------------------------------------------------------
# --help shows the defaults


def _help_entries(text: str) -> dict[str, str]:
    """Option -> its help text (whitespace folded), from argparse's help output."""
    entries: dict[str, str] = {}
    current = ""
    for line in text.splitlines():
        match = re.match(r"  (--[a-z-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = ""
        if current:
            entries[current] += " " + line.strip()
    return {option: " ".join(help.split()) for option, help in entries.items()}


@pytest.mark.parametrize(
    ("command", "option", "default"),
    [
        ("serve", "--hostname", "localhost"),
        ("serve", "--max-size", "26214400"),
        ("serve", "--max-recipients", "100"),
        ("serve", "--dns-timeout", "2"),
        ("serve", "--log-format", "text"),
        ("check-helo", "--hostname", "localhost"),
        ("check-helo", "--dns-timeout", "2"),
    ],
)
def test_help_shows_the_default(command: str, option: str, default: str) -> None:
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"(default: {default})" in _help_entries(result.stdout)[option]


def test_every_serve_option_with_a_value_names_its_default() -> None:
    parser = build_parser("serve")
    serve = next(
        action.choices["serve"]
        for action in parser._actions
        if isinstance(action.choices, dict) and "serve" in action.choices
    )
    # Options that take a value and have a default; those without one
    # (certificates, SNI pairs, --config, --listen-tls, --helo-check,
    # --trusted-network, --user) have nothing to show.
    without = {"--config", "--tls-cert", "--tls-key", "--sni", "--listen-tls", "--helo-check"}
    without |= {"--trusted-network", "--user", "--help"}
    for action in serve._actions:
        option = action.option_strings[-1]
        if action.nargs == 0 or option in without:
            continue
        assert "default" in (action.help or ""), option


# --------------------------------------------------------------------------
# ehlo users --config


def test_users_finds_the_data_folder_in_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "ehlo.toml"
    config.write_text('data_dir = "../mail"\n')  # relative to the file's folder
    added = run("users", "add", "alice", "--config", "etc/ehlo.toml", cwd=tmp_path, stdin=b"pw\n")
    assert added.returncode == 0, added.stderr
    assert (tmp_path / "mail" / "users").is_file()
    assert not (tmp_path / "ehlo-data").exists()
    listed = run("users", "list", "--json", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["[", '"alice"', "]"]
    # --data wins over the file's data_dir.
    other = run("users", "list", "--config", str(config), "--data", str(tmp_path / "other"))
    assert other.returncode == 0, other.stderr
    assert other.stdout.startswith("no users in ")
    removed = run("users", "remove", "alice", "--config", str(config))
    assert removed.returncode == 0, removed.stderr
    assert "alice" not in (tmp_path / "mail" / "users").read_text()


def test_users_with_a_bad_config_file_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "ehlo.toml"
    config.write_text("data_dir = 5\n")
    line = one_line_error(run("users", "list", "--config", str(config)))
    assert "config key data_dir" in line
    assert not (tmp_path / "ehlo-data").exists()
