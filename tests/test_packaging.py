"""Packaging: the wheel, its metadata, the dependency ranges and the Makefile's Python check.

The wheel test builds ehlo's wheel from a copy of the project, installs it
into a fresh virtual environment with the exact versions of
``requirements/constraints.txt`` (pip fetches them from its index or its
cache), and runs that installation: ``ehlo --version``, ``ehlo serve`` on a
loopback port, a message sent with smtplib, ``ehlo messages list``.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from ehlo import __version__

from .conftest import SERVE_WITHOUT_DNS, require

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
PIP_TIMEOUT = 600.0  # seconds for one pip command (it may download)
TIMEOUT = 30.0  # seconds for any other wait


def pyproject() -> dict[str, object]:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)


def requirements() -> list[Requirement]:
    """The runtime and test requirements of pyproject.toml."""
    project = pyproject()["project"]
    assert isinstance(project, dict)
    return [
        Requirement(text)
        for text in [*project["dependencies"], *project["optional-dependencies"]["test"]]
    ]


def pinned() -> dict[str, str]:
    """Normalised name -> exact version, from requirements/constraints.txt."""
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        name, sep, version = text.partition("==")
        assert sep and version, f"not an exact pin: {line!r}"
        pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


# --------------------------------------------------------------------------
# Ranges and pins


def test_dependencies_are_ranges_pinned_exactly_in_the_constraints() -> None:
    pins = pinned()
    for requirement in requirements():
        specifiers = list(requirement.specifier)
        # A range, not one exact version: a program embedding ehlo can resolve it.
        assert specifiers, f"{requirement}: give a lower bound"
        assert all(s.operator not in ("==", "===") for s in specifiers), str(requirement)
        assert any(s.operator == ">=" for s in specifiers), f"{requirement}: no lower bound"
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{requirement.name} is not in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pins[name]), (requirement, pins[name])
    assert "ehlo" not in pins


def test_the_venv_runs_the_pinned_versions() -> None:
    from importlib.metadata import PackageNotFoundError, version

    for name, exact in pinned().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # a dependency of another platform (none on Linux today)
        assert installed == exact, f"{name}: {installed} installed, {exact} pinned (make setup)"


# --------------------------------------------------------------------------
# make setup with an old Python


_MAKE_ERROR = re.compile(r"make(\[\d+\])?: \*\*\* ")


def test_make_setup_refuses_a_python_older_than_3_11_in_one_line(tmp_path: Path) -> None:
    make = shutil.which("make")
    require(make is not None, "make is not installed")
    assert make is not None
    project = tmp_path / "project"
    (project / "requirements").mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml", "requirements/constraints.txt"):
        shutil.copy(ROOT / name, project / name)
    # An interpreter that says it is 3.10 (the version check exits 1 under it).
    old = tmp_path / "python3.10"
    old.write_text(
        '#!/bin/sh\nif [ "$1" = "--version" ]; then echo "Python 3.10.13"; exit 0; fi\nexit 1\n'
    )
    old.chmod(0o755)
    # A make of its own, not a sub-make of `make test` (which names itself make[1]).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    for target in ("setup", "run"):
        result = subprocess.run(
            [make, "-s", target, f"PYTHON={old}"],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=env,
        )
        assert result.returncode != 0
        # make's own "*** [target] Error 1" line, then ours alone.
        lines = [line for line in result.stderr.splitlines() if not _MAKE_ERROR.match(line)]
        assert lines == [
            f"make: ehlo needs Python >= 3.11; {old} is Python 3.10.13"
            f" (try: make PYTHON=python3.11 {target})"
        ]
        assert not (project / ".venv").exists()


# --------------------------------------------------------------------------
# The wheel, installed and run


def _copy_project(to: Path) -> Path:
    """The files a wheel is built from, copied (the build writes beside them)."""
    to.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, to / name)
    shutil.copytree(
        ROOT / "src", to / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    return to


def _run(*args: str | Path, timeout: float = TIMEOUT, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def serving_from(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts, killed at its end whatever happens."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_wheel_installs_into_a_fresh_venv_and_serves(
    tmp_path: Path, serving_from: list[subprocess.Popen[bytes]]
) -> None:
    source = _copy_project(tmp_path / "source")
    dist = tmp_path / "dist"
    _run(
        sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", dist, source,
        timeout=PIP_TIMEOUT,
    )  # fmt: skip
    wheels = list(dist.glob("ehlo-*.whl"))
    assert [w.name for w in wheels] == [f"ehlo-{__version__}-py3-none-any.whl"]

    # The metadata a package index shows.
    with zipfile.ZipFile(wheels[0]) as archive:
        info = f"ehlo-{__version__}.dist-info"
        metadata = email.parser.Parser().parsestr(archive.read(f"{info}/METADATA").decode())
        license_text = archive.read(f"{info}/licenses/LICENSE").decode()
    assert metadata["License-Expression"] == "MIT"
    assert "Copyright (c) 2026 the ehlo authors" in license_text
    assert metadata["Requires-Python"] == ">=3.11"
    classifiers = metadata.get_all("Classifier") or []
    assert "Topic :: Communications :: Email :: Mail Transport Agents" in classifiers
    assert not any(c.startswith("License ::") for c in classifiers)  # the expression says it
    runtime = metadata.get_all("Requires-Dist") or []
    assert not [r for r in runtime if "==" in r and "extra ==" not in r], runtime

    # A fresh venv, the wheel and the pinned runtime dependencies only. The
    # venv gets no pip of its own (copying one in is most of a venv's making):
    # this pip installs into it, inspects and checks it (pip --python).
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    bin_dir = venv / "bin"
    pip = (sys.executable, "-m", "pip", "--python", bin_dir / "python")
    _run(
        *pip, "install", "--quiet", "--disable-pip-version-check",
        "-c", CONSTRAINTS, wheels[0], timeout=PIP_TIMEOUT,
    )  # fmt: skip
    frozen = _run(*pip, "freeze").lower().splitlines()
    names = {line.split("==")[0].split(" @ ")[0].strip() for line in frozen}
    assert "ehlo" in names
    assert not names & {"pytest", "mypy", "ruff", "hypothesis"}  # no test tools in a server
    _run(*pip, "check")
    # The installed copy runs, not the project's source.
    where = _run(bin_dir / "python", "-c", "import ehlo; print(ehlo.__file__)", cwd=tmp_path)
    assert Path(where.strip()).is_relative_to(venv)
    assert _run(bin_dir / "ehlo", "--version").strip() == f"ehlo {__version__}"

    # ehlo serve from the venv, a message in, the message listed.
    port, data = _free_port(), tmp_path / "data"
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [bin_dir / "ehlo", "serve", "--listen", f"127.0.0.1:{port}", "--data", data,
         "--hostname", "mx.test", "--workers", "1", *SERVE_WITHOUT_DNS],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd=tmp_path,
    )  # fmt: skip
    serving_from.append(server)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not listen"
                time.sleep(0.05)
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=TIMEOUT) as c:
            c.sendmail(
                "alice@example.org",
                ["bob@example.net"],
                b"From: alice@example.org\r\nSubject: from the wheel\r\n\r\nHello.\r\n",
            )
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=TIMEOUT) == 0
    finally:
        log.close()
    listed = json.loads(_run(bin_dir / "ehlo", "messages", "list", "--json", "--data", data))
    assert [(m["mail_from"], m["subject"]) for m in listed] == [
        ("alice@example.org", "from the wheel")
    ]
    assert os.path.isdir(data)
