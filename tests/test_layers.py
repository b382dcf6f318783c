"""The protocol core is a leaf; extensions come from one table; imports work in any order.

The import contracts in pyproject.toml (``lint-imports``, run by ``make test``)
check the layers of the whole package; these tests check what the contracts
cannot see: that every module imports before the package's own ``__init__``
has run, that the server side of the core names no concrete extension, and
that an extension the core has never heard of works through the Extension
base class alone.
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import ehlo
import ehlo.config
from ehlo import protocol
from ehlo.extensions import EXTENSIONS, AuthExtension, build_extensions
from ehlo.protocol import (
    Auth,
    Extension,
    Mail,
    ProtocolLimits,
    Reply,
    ServerConnection,
    SessionFacts,
    Transaction,
)

from .engine import Driver, codes

SRC = Path(ehlo.__file__).parent
PROTOCOL = SRC / "protocol"

# One fresh interpreter loads every module once, so that the third-party
# libraries are in memory; then, for each module named in argv, a forked child
# forgets all of ehlo and imports that module while the package object exists
# but its __init__ has not run (as when __init__ imports that module before
# anything else), and only then runs the package's __init__. The command line
# sits above the package's public surface (it reads ehlo.__version__), which
# therefore never imports it: it is imported the ordinary way, __init__ first.
# The children run one per CPU at a time (each still alone in its own process).
_EACH_MODULE_FIRST = """
import importlib, importlib.util, os, sys, traceback
for name in sys.argv[1:]:
    importlib.import_module(name)
running = 0
for name in sys.argv[1:]:
    if running == len(os.sched_getaffinity(0)):
        os.wait()
        running -= 1
    running += 1
    pid = os.fork()
    if pid == 0:
        for key in [k for k in sys.modules if k == "ehlo" or k.startswith("ehlo.")]:
            del sys.modules[key]
        try:
            if name == "ehlo.cli" or name.startswith("ehlo.cli."):
                importlib.import_module(name)
            else:
                spec = importlib.util.find_spec("ehlo")
                package = importlib.util.module_from_spec(spec)
                sys.modules["ehlo"] = package
                importlib.import_module(name)
                spec.loader.exec_module(package)
            assert sys.modules["ehlo"].ServerConfig().limits.max_errors
        except BaseException:
            print(name + ": " + traceback.format_exc().strip().splitlines()[-1], flush=True)
            os._exit(1)
        os._exit(0)
for _ in range(running):
    os.wait()
"""


def _modules() -> list[str]:
    names = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue  # runs the command line
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


@pytest.mark.slow
def test_every_module_can_be_imported_first() -> None:
    modules = [m for m in _modules() if m != "ehlo"]
    assert "ehlo.protocol._server" in modules and "ehlo.extensions.auth" in modules

    proc = subprocess.run(
        [sys.executable, "-c", _EACH_MODULE_FIRST, *modules],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    failed = proc.stdout.strip()
    assert not failed, failed


def _imports_of(path: Path) -> list[str]:
    """The modules ``path`` imports, relative imports resolved, at any depth in the file."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append(".".join([*base, node.module] if node.module else base))
            else:
                found.append(node.module or "")
    return found


def test_protocol_imports_nothing_else_of_ehlo() -> None:
    # The server side and the client side alike (lint-imports checks this too).
    paths = sorted(PROTOCOL.glob("*.py"))
    assert {"_server.py", "_client.py", "_extension.py", "_limits.py"} <= {p.name for p in paths}
    outside = {
        path.name: names
        for path in paths
        if (
            names := [
                name
                for name in _imports_of(path)
                if (name == "ehlo" or name.startswith("ehlo."))
                and not (name == "ehlo.protocol" or name.startswith("ehlo.protocol."))
            ]
        )
    }
    assert outside == {}


def test_server_core_names_no_concrete_extension() -> None:
    tree = ast.parse((PROTOCOL / "_server.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    strings = {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }
    limits = ProtocolLimits(starttls=True, auth_mechanisms=("PLAIN",))
    for ext in build_extensions(limits):
        assert type(ext).__name__ not in names
        # A keyword that is also the extension's verb (AUTH, STARTTLS) is
        # command syntax, which the core parses; other keywords it must not know.
        if ext.keyword not in ext.verbs:
            assert ext.keyword not in strings, ext.keyword


def test_protocol_limits_has_one_home() -> None:
    assert ehlo.ProtocolLimits is protocol.ProtocolLimits
    assert ehlo.config.ProtocolLimits is protocol.ProtocolLimits
    assert ehlo.ServerConfig().limits == ProtocolLimits()


# ------------------------------------------------------------- the table


def _keywords(limits: ProtocolLimits) -> list[str]:
    return [ext.keyword for ext in build_extensions(limits)]


def test_table_builds_the_extensions_in_ehlo_order() -> None:
    assert _keywords(ProtocolLimits()) == [
        "PIPELINING",
        "SIZE",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "DSN",
        "SMTPUTF8",
        "CHUNKING",
    ]
    every = ProtocolLimits(starttls=True, auth_mechanisms=("PLAIN", "LOGIN"))
    assert _keywords(every) == [
        "PIPELINING",
        "SIZE",
        "STARTTLS",
        "AUTH",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "DSN",
        "SMTPUTF8",
        "CHUNKING",
    ]
    assert len(EXTENSIONS) == len(_keywords(every))


# Each ProtocolLimits switch and the keyword it turns on; SIZE is always offered.
_SWITCHES = {
    "pipelining": "PIPELINING",
    "starttls": "STARTTLS",
    "auth_mechanisms": "AUTH",
    "enhancedstatuscodes": "ENHANCEDSTATUSCODES",
    "eightbitmime": "8BITMIME",
    "dsn": "DSN",
    "smtputf8": "SMTPUTF8",
    "chunking": "CHUNKING",
}


def test_each_switch_removes_exactly_its_extension() -> None:
    assert len(EXTENSIONS) == len(_SWITCHES) + 1  # a new row needs its switch here
    every = ProtocolLimits(starttls=True, auth_mechanisms=("PLAIN",))
    for switch, keyword in _SWITCHES.items():
        off = dataclasses.replace(every, **{switch: () if switch == "auth_mechanisms" else False})
        assert _keywords(off) == [k for k in _keywords(every) if k != keyword], switch


def test_auth_available_is_asked_at_each_ehlo() -> None:
    users: list[str] = []
    limits = ProtocolLimits(auth_mechanisms=("PLAIN",), auth_plaintext=True)
    exts = build_extensions(limits, lambda: bool(users))
    auth = next(ext for ext in exts if isinstance(ext, AuthExtension))
    facts = SessionFacts(tls_active=True)
    assert not auth.offered(facts)
    users.append("alice")
    assert auth.offered(facts)


# ------------------------------------------- the core through the base class


def _driver(*extensions: Extension) -> Driver:
    d = Driver(ProtocolLimits())
    d.conn = ServerConnection(d.limits, extensions) if extensions else ServerConnection(d.limits)
    d.conn.send(Reply(220, None, "test ESMTP"))
    d.conn.data_to_send()
    return d


def test_without_extensions_the_core_speaks_plain_rfc5321() -> None:
    d = _driver()
    assert d.conn.extension_lines() == []
    assert codes(d.say("EHLO client.example")) == ["250"]
    # RFC 5321 section 4.1.1.11: 555 for a parameter no extension owns.
    assert d.say("MAIL FROM:<a@example.org> SIZE=10").startswith("555 ")
    assert d.say("BDAT 3 LAST").startswith("502 ")


class _Utf8Names(Extension):
    keyword = "XUTF8"
    enables_utf8 = True


class _Codes(Extension):
    keyword = "XCODES"
    enables_enhanced_codes = True


class _Token(Extension):
    """An AUTH offer with its own mechanism, unrelated to AuthExtension."""

    keyword = "XAUTH"
    verbs = frozenset({"AUTH"})
    mechanisms = ("XTOKEN",)

    def ehlo_line(self) -> str:
        return "AUTH XTOKEN"


class _Priority(Extension):
    keyword = "XPRIORITY"
    mail_params = frozenset({"XPRIORITY"})

    def mail_param(self, name: str, value: str | None, tx: Transaction) -> Reply | None:
        if value not in ("1", "2", "3"):
            return Reply(501, "5.5.4", "Syntax: XPRIORITY=1|2|3")
        return None


def test_an_unknown_extension_works_through_the_base_class() -> None:
    d = _driver(_Utf8Names(), _Codes(), _Token(), _Priority())
    reply = d.say("EHLO bücher.example")
    assert reply.startswith("250-") and "250-AUTH XTOKEN" in reply and "XPRIORITY" in reply
    assert d.conn.enhanced
    out = d.say("AUTH XTOKEN dG9rZW4=")
    assert isinstance(d.events[-1], Auth) and d.events[-1].mechanism == "XTOKEN", out
    d = _driver(_Utf8Names(), _Codes(), _Token(), _Priority())
    d.say("EHLO client.example")
    assert d.say("MAIL FROM:<a@example.org> XPRIORITY=9").startswith("501 5.5.4 ")
    assert d.say("MAIL FROM:<a@example.org> XPRIORITY=2").startswith("250 ")
    assert isinstance(d.events[-1], Mail) and d.events[-1].params == {"XPRIORITY": "2"}


def test_auth_needing_tls_is_found_through_the_base_class() -> None:
    class TlsOnly(_Token):
        def offered(self, facts: SessionFacts) -> bool:
            return facts.tls_active

    d = _driver(TlsOnly())
    d.say("EHLO client.example")
    # RFC 4954 section 6: 538 when the mechanism needs encryption.
    assert d.say("AUTH XTOKEN").startswith("538 ")


def test_public_names_load_their_modules_on_first_use() -> None:
    # `import ehlo` (and so every `ehlo` command, e.g. `messages list`) loads
    # neither the server nor the greeting checks until one of their names is used.
    script = (
        "import sys, ehlo, ehlo.greeting\n"
        "assert 'ehlo.server' not in sys.modules, 'ehlo.server'\n"
        "assert 'ehlo.greeting._checks' not in sys.modules, 'ehlo.greeting._checks'\n"
        "assert ehlo.Server.__module__ == 'ehlo.server._server'\n"
        "assert ehlo.greeting.run_checks.__module__ == 'ehlo.greeting._checks'\n"
        "assert 'Server' in dir(ehlo)\n"
        "try:\n"
        "    ehlo.no_such_name\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_aiohttp_is_loaded_only_when_a_policy_is_fetched() -> None:
    # ehlo.delivery.mtasts fetches MTA-STS policies with aiohttp: importing ehlo,
    # the command line, the server or the MTA-STS module itself must not load it.
    script = (
        "import sys, ehlo, ehlo.cli, ehlo.cli.serve, ehlo.server, ehlo.delivery.mtasts\n"
        "assert ehlo.Server.__module__ == 'ehlo.server._server'\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'yarl'))\n"
        "assert not loaded, loaded\n"
        "import ehlo.delivery._mtasts_fetch\n"
        "assert 'aiohttp' in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
