"""``ehlo config defaults`` and ``ehlo config check FILE``: the configuration reference.

``defaults`` prints every configuration key with its default value and its
one-line meaning (the ``doc`` of the key's declaration in
:mod:`ehlo.config`) as a TOML document, like ``postconf -d``: a file made of
it loads back into the default configuration. A key without a default
(``tls_cert``, ``tls_key``) is shown commented out. ``check FILE`` loads a
file as ``ehlo serve --config FILE`` would (a bad key or value is one line
naming it, exit 2) and prints the settings it makes in the same form, with
paths made absolute, so that the output is itself a valid configuration.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..config import TABLE_DOCS, Listen, ServerConfig, key_values, load_config
from ._common import Parser, usage

_CHECKS_TABLE = "greeting.checks"


def add_config_command(commands: Any) -> None:
    """Register ``config`` (``defaults``, ``check``) on the ``ehlo`` parser's subparsers."""
    config = commands.add_parser(
        "config",
        help="print every configuration key, or check a configuration file",
        description="The configuration reference: every key of the TOML file with its "
        "default and meaning, or the settings a file makes.",
    )
    actions = config.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    defaults = actions.add_parser(
        "defaults",
        help="every key with its default and meaning, as TOML",
        description="Print every configuration key with its default value and its meaning "
        "as a TOML document (a valid configuration file).",
    )
    defaults.set_defaults(func=_defaults)
    check = actions.add_parser(
        "check",
        help="validate a configuration file and print its settings",
        description="Load FILE as `ehlo serve --config FILE` would and print every "
        "setting it makes, as TOML (paths absolute). A bad key or value is reported "
        "in one line (exit 2).",
    )
    check.add_argument("file", metavar="FILE", type=Path, help="the TOML configuration file")
    check.set_defaults(func=_check)
    config.set_defaults(func=lambda _args: usage(config, "choose defaults or check"))


def _defaults(_args: argparse.Namespace) -> int:
    header = [
        "# ehlo configuration keys and their defaults (ehlo config defaults).",
        "# Relative paths in a file are taken relative to the file's folder.",
    ]
    print(render(ServerConfig(), header=header), end="")
    return 0


def _check(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    header = [f"# The settings {toml_string(str(args.file))} makes (ehlo config check)."]
    print(render(config, header=header, absolute=True), end="")
    return 0


def render(config: ServerConfig, *, header: Iterable[str] = (), absolute: bool = False) -> str:
    """``config`` as a TOML document: each key under a comment saying what it means.

    ``absolute``: paths are written absolute (as the current folder makes
    them), so the document means the same wherever it is saved.
    """
    from ..greeting import CHECKS

    lines = list(header)
    table = ""
    for key, value, doc in key_values(config):
        where, _, name = key.rpartition(".")
        if where != table:
            lines += ["", f"# {TABLE_DOCS[where]}", f"[{where}]"]
            table = where
        lines += ["", f"# {doc}"]
        text = toml_value(value, absolute=absolute)
        lines.append(f"{name} = {text}" if text is not None else f"# {name} = (not set)")
    lines += [
        "",
        f"# {TABLE_DOCS[_CHECKS_TABLE]}",
        *textwrap.wrap(
            f"checks: {', '.join(CHECKS)}", 76, initial_indent="# ", subsequent_indent="#   "
        ),
        f"[{_CHECKS_TABLE}]",
    ]
    for name, mode in sorted(config.greeting.checks.items()):
        lines.append(f"{name} = {toml_string(mode)}")
    return "\n".join(lines) + "\n"


def toml_value(value: Any, *, absolute: bool = False) -> str | None:
    """A configuration value as a TOML value; None for None (TOML has no null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # finite: the configuration refuses inf and nan
    if isinstance(value, Path):
        return toml_string(str(value.absolute() if absolute else value))
    if isinstance(value, (str, Listen)):
        return toml_string(str(value))
    if isinstance(value, (tuple, list)):
        items = (toml_value(item, absolute=absolute) for item in value)
        return "[" + ", ".join(item for item in items if item is not None) + "]"
    if isinstance(value, Mapping):  # an inline table ([routes], [tls_policy])
        pairs = (
            f"{toml_string(str(k))} = {toml_value(v, absolute=absolute)}" for k, v in value.items()
        )
        return "{" + ", ".join(pairs) + "}"
    raise TypeError(f"no TOML form for {type(value).__name__}")


# TOML basic strings: quote, backslash and the controls (DEL too) escaped.
_ESCAPES = {
    **{c: f"\\u{c:04x}" for c in (*range(0x20), 0x7F)},
    0x08: "\\b",
    0x09: "\\t",
    0x0A: "\\n",
    0x0C: "\\f",
    0x0D: "\\r",
    0x22: '\\"',
    0x5C: "\\\\",
}


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string."""
    return '"' + text.translate(_ESCAPES) + '"'
