"""ehlo.greeting.psl (registered domains, offline PSL) and ehlo.greeting.dynamic (pool names)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ehlo.greeting import psl
from ehlo.greeting.dynamic import looks_dynamic
from ehlo.greeting.psl import registered_domain, same_registered_domain

# ------------------------------------------------------------------ registered_domain


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mail.example.co.uk", "example.co.uk"),
        ("example.co.uk", "example.co.uk"),
        ("Mail.Example.COM.", "example.com"),
        ("a.b.c.example.com", "example.com"),
        ("mx1.example.org", "example.org"),
        ("host.example.com.au", "example.com.au"),
        ("mail.example.test", "example.test"),  # no PSL rule: "*" prevails
        ("x.y.example.internal", "example.internal"),
        ("a.github.io", "a.github.io"),  # PSL private section counts
        ("mx.bücher.de", "bücher.de"),
        ("mx.xn--bcher-kva.de", "xn--bcher-kva.de"),
        # No registered domain.
        ("co.uk", None),
        ("uk", None),
        ("com", None),
        ("github.io", None),
        ("localhost", None),
        ("mailhost", None),
        ("192.0.2.7", None),
        ("[192.0.2.7]", None),
        ("2001:db8::7", None),
        ("[IPv6:2001:db8::7]", None),
        ("", None),
        (".", None),
        ("example..com", None),
        ("a" * 64 + ".example.com", None),
    ],
)
def test_registered_domain(name: str, expected: str | None) -> None:
    assert registered_domain(name) == expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("mx1.example.org", "mail.example.org", True),
        ("MX1.Example.ORG.", "mail.example.org", True),
        ("example.org", "a.b.example.org", True),
        ("mail.example.co.uk", "mail.other.co.uk", False),
        ("mail.example.org", "mail.example.net", False),
        ("a.github.io", "b.github.io", False),
        ("co.uk", "co.uk", False),  # neither has one
        ("localhost", "localhost", False),
        ("192.0.2.7", "192.0.2.7", False),
    ],
)
def test_same_registered_domain(a: str, b: str, expected: bool) -> None:
    assert same_registered_domain(a, b) is expected
    assert same_registered_domain(b, a) is expected


def test_extractor_built_once_under_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psl, "_extractor", None)
    built: list[object] = []
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        built.append(psl._get_extractor())
        assert registered_domain("mail.example.co.uk") == "example.co.uk"

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(built) == 8
    assert all(extractor is built[0] for extractor in built)


_OFFLINE_PROBE = """
import socket

def refuse(*args, **kwargs):
    raise AssertionError("network used")

socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse

from ehlo.greeting.psl import registered_domain
assert registered_domain("mail.example.co.uk") == "example.co.uk"
assert registered_domain("co.uk") is None
print("ok")
"""


def test_offline_and_no_cache_files(tmp_path: Path) -> None:
    """A fresh process with no network and an empty HOME: works, writes nothing."""
    home = tmp_path / "home"
    home.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TLDEXTRACT_", "XDG_")) and key not in ("HOME",)
    }
    env["HOME"] = str(home)
    env["TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS"] = "https://publicsuffix.invalid/list.dat"
    done = subprocess.run(
        [sys.executable, "-c", _OFFLINE_PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert list(home.rglob("*")) == []  # no ~/.cache/python-tldextract


def test_no_network_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network used")

    monkeypatch.setattr(psl, "_extractor", None)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert registered_domain("www.example.com.au") == "example.com.au"


# ------------------------------------------------------------------ looks_dynamic

V4 = "192.0.2.7"
V6 = "2001:db8::7"


@pytest.mark.parametrize(
    ("name", "ip", "fragment"),
    [
        # IPv4: dotted, dashed, underscored, padded, reversed, concatenated, hex.
        ("192-0-2-7.dyn.example.net", V4, "192-0-2-7"),
        ("7.2.0.192.pool.example", V4, "7.2.0.192"),
        ("host192000002007.example", V4, "192000002007"),
        ("c0000207.cust.example", V4, "c0000207"),
        ("C0000207.CUST.EXAMPLE", V4, "c0000207"),
        ("dhcp-192-0-2-7.example", V4, "192-0-2-7"),
        ("ip192.0.2.7.example", V4, "192.0.2.7"),
        ("192_0_2_7.example", V4, "192_0_2_7"),
        ("192-000-002-007.static.example", V4, "192-000-002-007"),
        ("7-2-0-192.rev.example", V4, "7-2-0-192"),
        ("ppp007002000192.example", V4, "007002000192"),
        ("x-070200c0.example", V4, "070200c0"),
        ("c-10-1-2-3.hsd1.example.net", "10.1.2.3", "10-1-2-3"),
        ("dyn-10-1-2-3.example", "::ffff:10.1.2.3", "10-1-2-3"),
        # IPv6: all eight groups, short or padded; 32 hex digits; compressed.
        ("2001-db8-0-0-0-0-0-7.dyn.example", V6, "2001-db8-0-0-0-0-0-7"),
        (
            "2001-0db8-0000-0000-0000-0000-0000-0007.example",
            V6,
            "2001-0db8-0000-0000-0000-0000-0000-0007",
        ),
        ("h20010db8000000000000000000000007.example", V6, "20010db8000000000000000000000007"),
        ("2001-db8--7.pool.example", V6, "2001-db8--7"),
        ("0-0-0-0-0-0-0-1.example", "::1", "0-0-0-0-0-0-0-1"),
    ],
)
def test_looks_dynamic(name: str, ip: str, fragment: str) -> None:
    assert looks_dynamic(name, ip) == fragment


@pytest.mark.parametrize(
    ("name", "ip"),
    [
        ("mail.example.org", V4),
        ("mx7.example.org", V4),
        ("192.example.org", V4),
        ("192-0-2.example.org", V4),  # three octets only
        ("2-7.example.org", V4),
        ("192-0-2-71.example.org", V4),  # another address
        ("1192-0-2-7.example.org", V4),  # inside a longer number
        ("192.0-2-7.example.org", V4),  # mixed separators
        ("192-0-2-8.dyn.example.net", V4),  # a neighbour's name
        ("abc0000207.example", V4),  # inside a longer hex run
        ("host19200027.example", V4),  # unpadded concatenation is ambiguous
        ("mail.example", V6),
        ("7.example", V6),
        ("2001-db8.example", V6),
        ("2001-db8-0-0-0-0-0-77.example", V6),
        ("xn--1ca.example", "::1"),  # "--1" alone is not ::1
        ("mail.example.org", "not-an-ip"),
    ],
)
def test_not_dynamic(name: str, ip: str) -> None:
    assert looks_dynamic(name, ip) is None
