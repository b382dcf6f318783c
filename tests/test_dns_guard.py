"""The suite's guard against the machine's own DNS resolver, and the defaults it relies on.

Tests ask the loopback DNS server (``tests/dnsserver.py``) or look nothing
up. The guard (``tests/dnsguard/sitecustomize.py``, installed by conftest)
refuses a resolver configured from /etc/resolv.conf in the pytest process and
in every Python subprocess, and fails the test that did it; these tests check
that it does, that it leaves loopback resolvers and unrelated processes alone,
and that the shared helpers (``make_config``, HAProxy's configuration) need no
DNS at all.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ehlo.dns import Resolver

from . import conftest
from .dnsguard.sitecustomize import GUARD_LOG_ENV, SystemResolverRefused
from .haproxy import _config, haproxy_path
from .helpers import SERVE_WITHOUT_DNS, make_config, require

TIMEOUT = 60


def test_a_resolver_from_resolv_conf_is_refused_and_reported() -> None:
    before = len(conftest._dns_offences)
    try:
        with pytest.raises(SystemResolverRefused, match=r"/etc/resolv\.conf"):
            Resolver()  # no nameservers: the machine's configuration
        found = conftest._dns_offences[before:]
        assert len(found) == 1
        # The report names where the resolver was made, for the test's failure.
        assert "_system_resolver" in found[0]
        assert "test_dns_guard.py" in found[0]
        # Explicit nameservers on loopback are what tests use: allowed, unreported.
        assert Resolver(["127.0.0.1:5353"]).nameservers == ["127.0.0.1:5353"]
        assert len(conftest._dns_offences) == before + 1
    finally:
        del conftest._dns_offences[before:]  # expected here: not this test's failure


def _python(code: str, log: Path) -> subprocess.CompletedProcess[str]:
    """``python -c CODE`` as the tests start subprocesses, its offences logged to ``log``."""
    env = {**os.environ, GUARD_LOG_ENV: str(log)}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )


def test_a_subprocess_is_guarded_and_its_offence_logged(tmp_path: Path) -> None:
    log = tmp_path / "guard.log"
    result = _python("from ehlo.dns import Resolver; Resolver()", log)
    assert result.returncode == 1
    assert "SystemResolverRefused" in result.stderr
    lines = log.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    assert "_system_resolver" in lines[0]


def test_the_guard_imports_nothing_into_a_subprocess(tmp_path: Path) -> None:
    log = tmp_path / "guard.log"
    code = (
        "import sys; print('dns' in sys.modules); "
        "from ehlo.dns import Resolver; print(Resolver(['127.0.0.1:5353']).nameservers)"
    )
    result = _python(code, log)
    assert result.returncode == 0, result.stderr
    # dnspython is patched when imported, not imported by the guard itself.
    assert result.stdout.splitlines() == ["False", "['127.0.0.1:5353']"]
    assert not log.exists()


def test_make_config_looks_nothing_up(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert config.reverse_dns is False
    assert not config.greeting.active
    assert make_config(tmp_path, reverse_dns=True).reverse_dns is True  # a test may opt in


def test_serve_without_dns_turns_off_every_lookup(tmp_path: Path) -> None:
    from ehlo.cli import build_parser  # the same parsing as ``ehlo serve``
    from ehlo.cli.serve import _serve_config

    args = build_parser().parse_args(["serve", "--data", str(tmp_path), *SERVE_WITHOUT_DNS])
    config = _serve_config(args)
    assert config.reverse_dns is False
    assert not config.greeting.active


_CONNECT_53 = re.compile(r"connect\(\d+, \{sa_family=AF_INET6?, sin6?_port=htons\(53\), (.*?)\}")


@pytest.mark.needs(shutil.which("strace") is not None, reason="strace is not installed")
@pytest.mark.needs(haproxy_path() is not None, reason="haproxy is not installed")
def test_haproxy_opens_no_socket_to_the_system_resolver(tmp_path: Path) -> None:
    config = tmp_path / "haproxy.cfg"
    config.write_text(_config([("127.0.0.1", 2525)], "v2", "127.0.0.1", 2526, False, ()))
    trace = tmp_path / "trace.txt"
    exe = haproxy_path()
    assert exe is not None
    result = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=connect",
            "-o",
            str(trace),
            exe,
            "-c",
            "-f",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    require(
        result.returncode == 0 or "Configuration file is valid" in result.stdout,
        f"haproxy -c could not run under strace: {result.stderr[-500:]}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    targets = _CONNECT_53.findall(trace.read_text())
    assert all("127.0.0." in target for target in targets), targets
