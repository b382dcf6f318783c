"""What the ``ehlo`` commands share: the parser class, option types, common options.

The one-line usage error (:class:`Parser`), the runtime error that exits 1
(:class:`Failure`), argument types, the greeting/DNS options of ``serve``
and ``check-helo``, the store options (``--store`` a kind or a
``postgresql://`` URL: :func:`store_choice` makes it and ``--config`` the
kind and database URL), and printing text a client chose
(control characters escaped, never an encoding error).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

# Greeting verification and DNS options, shared by ``serve`` and ``check-helo``.
GREETING_LABELS = {
    "hostname": "--hostname",
    "dns_servers": "--dns-server",
    "dns_timeout": "--dns-timeout",
    "greeting.policy": "--helo-policy",
    "greeting.stage": "--helo-stage",
    "greeting.trusted_networks": "--trusted-network",
}


class Failure(Exception):
    """A runtime error reported as one line with exit status 1."""


class Parser(argparse.ArgumentParser):
    """argparse with the usage error kept to the usage line and one message."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None


def check_mode(text: str) -> tuple[str, str]:
    """``NAME=MODE`` of ``--helo-check`` (``forward-match`` is ``forward_match``)."""
    name, sep, mode = text.partition("=")
    name = name.strip().lower().replace("-", "_")
    if not sep or not name or not mode.strip():
        raise argparse.ArgumentTypeError(
            f"expected NAME=MODE such as forward_match=reject, got {text!r}"
        )
    return name, mode.strip().lower()


def greeting_options(parser: argparse.ArgumentParser, *, stage: bool) -> None:
    """The greeting verification and DNS options (``--helo-*``, ``--dns-*``)."""
    from ..greeting import CHECKS, MODES, PRESETS, STAGES

    parser.add_argument(
        "--helo-policy",
        choices=PRESETS,
        help="greeting checks: off, record (default: nothing is refused) or strict",
    )
    if stage:
        parser.add_argument(
            "--helo-stage",
            choices=STAGES,
            help="when the greeting verdict is applied (default: rcpt)",
        )
    parser.add_argument(
        "--helo-check",
        action="append",
        type=check_mode,
        metavar="NAME=MODE",
        help=f"one check's mode ({'|'.join(MODES)}), repeatable; checks: {', '.join(CHECKS)}",
    )
    parser.add_argument(
        "--trusted-network",
        action="append",
        metavar="CIDR",
        help="clients in this network skip the greeting checks, repeatable",
    )
    parser.add_argument(
        "--dns-server",
        action="append",
        metavar="IP[:PORT]",
        help="DNS server to ask, repeatable; [IPv6]:PORT (default: the system's)",
    )
    parser.add_argument(
        "--dns-timeout", type=seconds, metavar="SECONDS", help="longest wait for one DNS lookup"
    )


def greeting_overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``load_config`` overrides and labels of the greeting and DNS options."""
    overrides: dict[str, Any] = {
        "dns_servers": args.dns_server,
        "dns_timeout": args.dns_timeout,
        "greeting.policy": args.helo_policy,
        "greeting.stage": getattr(args, "helo_stage", None),
        "greeting.trusted_networks": args.trusted_network,
    }
    labels = dict(GREETING_LABELS)
    for name, mode in args.helo_check or ():
        overrides[f"greeting.checks.{name}"] = mode
        labels[f"greeting.checks.{name}"] = f"--helo-check {name}"
    return overrides, labels


# ``--store`` and ``--data`` as the configuration errors name them: a
# ``--store postgresql://...`` sets both ``store`` and ``database_url``.
STORE_LABELS = {"data_dir": "--data", "store": "--store", "database_url": "--store"}
_PG_SCHEMES = ("postgresql://", "postgres://")


def store_kind(kinds: Sequence[str]) -> Callable[[str], str]:
    """The ``--store`` type: one of ``kinds``, ``postgresql``, or a PostgreSQL URL.

    A URL is checked later, by the configuration (a password in it is
    refused there, in one line that does not repeat it).
    """
    names = (*kinds, "postgresql")

    def check(text: str) -> str:
        if text in names or text.lower().startswith(_PG_SCHEMES):
            return text
        shown = "a URL" if "://" in text else repr(text)  # never echo what may be a secret
        raise argparse.ArgumentTypeError(
            f"expected {', '.join(names)} or a postgresql:// URL, got {shown}"
        )

    return check


def store_overrides(store: str | None) -> dict[str, Any]:
    """The ``load_config`` overrides of ``--store``: a kind, or for a PostgreSQL
    URL the kind ``postgresql`` and that ``database_url`` (labels: STORE_LABELS)."""
    if store is None:
        return {}
    if store.lower().startswith(_PG_SCHEMES):
        return {"store": "postgresql", "database_url": store}
    return {"store": store}


def store_choice(store: str | None, config: Path | None) -> tuple[str, str | None]:
    """(kind, database_url) of ``--store`` and ``--config``: ``--store`` wins, then the
    file's ``store`` and ``database_url``, then sqlite. ``database_url`` is None
    unless the kind is postgresql. Raises ConfigError (one line, exit 2) for a
    bad file, a URL holding a password, or postgresql without a database."""
    from ..config import load_config

    found = load_config(config, store_overrides(store), labels=STORE_LABELS)
    kind: str = found.store
    return kind, found.database_url if kind == "postgresql" else None


def store_options(parser: argparse.ArgumentParser, *, kinds: Sequence[str]) -> None:
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="data folder holding the store (default: ./ehlo-data)",
    )
    parser.add_argument(
        "--store",
        type=store_kind(kinds),
        metavar="|".join((*kinds, "postgresql://...")),
        help=f"storage backend: {', '.join(kinds)}, or the PostgreSQL store's database"
        " postgresql://USER@HOST/DB (no password: libpq reads ~/.pgpass, PGPASSFILE or"
        " PGPASSWORD); postgresql alone takes database_url from --config (default: sqlite)",
    )
    parser.add_argument("--config", metavar="FILE", type=Path, help="TOML configuration file")


def show_defaults(parser: argparse.ArgumentParser, labels: Mapping[str, str]) -> None:
    """Add "(default: X)" to the help of the options that set a config key.

    ``labels`` maps config keys to the options that set them (the labels
    given to ``load_config``); X is the key's default in ``ServerConfig``.
    Help that already names its default, and keys without one, are left
    as they are.
    """
    from ..config import ServerConfig, key_values

    defaults = {key: value for key, value, _doc in key_values(ServerConfig())}
    options = {option: key for key, option in labels.items()}
    for action in parser._actions:
        key = next((options[o] for o in action.option_strings if o in options), None)
        if key is None or key not in defaults or "default" in (action.help or ""):
            continue
        shown = _default_text(defaults[key])
        if shown:
            action.help = f"{action.help or ''} (default: {shown})".lstrip()


def _default_text(value: Any) -> str:
    """A default as the help shows it; "" for none (None, an empty list, a switch)."""
    if value is None or isinstance(value, bool):
        return ""
    if isinstance(value, (tuple, list)):
        return ", ".join(filter(None, map(_default_text, value)))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def usage(parser: argparse.ArgumentParser, what: str) -> int:
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {what}", file=sys.stderr)
    return 2


# C0 and C1 control characters (but tab) would drive the terminal: show them escaped.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c != 0x09}
_CONTROLS_KEEP_LINES = {c: v for c, v in _CONTROLS.items() if c != 0x0A}


def safe(text: str, *, lines: bool = False) -> str:
    return text.translate(_CONTROLS_KEEP_LINES if lines else _CONTROLS)


def text_output() -> None:
    # Subjects and bodies are whatever clients sent: never fail on encoding.
    if hasattr(sys.stdout, "reconfigure"):
        with contextlib.suppress(ValueError, OSError):
            sys.stdout.reconfigure(errors="replace")


class Listing:
    """The rows of a ``list`` command, written as they come: a JSON array (``--json``),
    JSON lines (``--jsonl``) or a text table under ``header``."""

    def __init__(
        self,
        args: argparse.Namespace,
        header: str,
        to_json: Callable[[Any], Any],
        to_text: Callable[[Any], str],
    ) -> None:
        text_output()
        self.mode = "json" if args.json else "jsonl" if args.jsonl else "text"
        self.header, self.to_json, self.to_text = header, to_json, to_text
        self.shown = 0
        self.write = sys.stdout.write
        if self.mode == "json":
            self.write("[")

    def add(self, row: Any) -> None:
        if self.mode == "text":
            if not self.shown:
                self.write(self.header + "\n")
            self.write(self.to_text(row) + "\n")
        else:
            item = json.dumps(self.to_json(row), ensure_ascii=False)
            if self.mode == "jsonl":
                self.write(item + "\n")
            else:
                self.write(("\n" if not self.shown else ",\n") + item)
        self.shown += 1

    def end(self, nothing: str) -> None:
        """Close the array; ``nothing`` is the text written when no row was."""
        if self.mode == "json":
            self.write("\n]\n" if self.shown else "]\n")
        elif self.mode == "text" and not self.shown:
            self.write(nothing + "\n")
