"""The files a running server leaves on disk, and stores that cannot write.

``ehlo serve`` runs for real (``python -m ehlo`` subprocesses) with the
umask most shells have (022). The file proves that:

* the data folder ehlo creates is 0700, every file under it 0600 and every
  folder 0700, for both stores, with a small and a large message stored
  (the SQLite store's database, ``-wal`` and ``-shm``, body file, lock
  files; the Maildir's messages and envelopes), while the server runs and
  after it stopped;
* a data folder that exists with a wider mode is left alone, with one
  warning however many workers start;
* a store folder the server cannot write to stops ``ehlo serve`` at start
  with one error line and exit status 1: it never says "ready".

Permission bits do not stop root: run as root, the read-only cases run the
server as ``nobody`` (``setpriv``) on folders owned by root.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import SERVE_WITHOUT_DNS, free_port, tool
from .test_cli import TIMEOUT, ehlo_cmd, one_line_error

pytestmark = pytest.mark.timeout(120)

SMALL = b"From: a@example.org\r\nSubject: small\r\n\r\nhello\r\n"
# Larger than the SQLite store's one-chunk limit (256 KiB): a body file.
LARGE = b"From: a@example.org\r\nSubject: large\r\n\r\n" + (b"x" * 998 + b"\r\n") * 400
NOBODY = 65534


class Serve:
    """``ehlo serve`` in a subprocess with umask 022, its stderr in a file."""

    def __init__(self, data: Path, log: Path, *args: str, prefix: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.log = log
        self._stderr = open(log, "wb")  # noqa: SIM115 - closed in close()
        listen = f"127.0.0.1:{self.port}"
        command = ehlo_cmd(
            "serve", "--listen", listen, "--data", str(data), "--hostname", "mx", *SERVE_WITHOUT_DNS
        )
        self.proc = subprocess.Popen(
            [*prefix, *command, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            umask=0o022,
        )

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")  # written by the server only

    def wait_ready(self, count: int = 1) -> None:
        """Until ``count`` processes logged "ready" (the server accepts mail then)."""
        deadline = time.monotonic() + TIMEOUT
        while self.stderr().count(" ready on ") < count:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready: {self.stderr()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        assert self.proc.wait(timeout=TIMEOUT) == 0, self.stderr()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
        self._stderr.close()


def modes(data: Path) -> dict[str, str]:
    """Every entry under ``data`` (and ``data`` itself, as "."): its mode in octal."""
    found = {".": f"{stat.S_IMODE(data.stat().st_mode):o}"}
    for path in sorted(data.rglob("*")):
        found[str(path.relative_to(data))] = f"{stat.S_IMODE(path.lstat().st_mode):o}"
    return found


def assert_private(data: Path, expected: list[str]) -> None:
    """Folders 0700 and files 0600 under ``data``, and each of ``expected`` there."""
    found = modes(data)
    wrong = {
        name: mode
        for name, mode in found.items()
        if mode != ("700" if (data / name).is_dir() else "600")
    }
    assert not wrong, found
    for name in expected:
        assert any(name == key or key.endswith(name) for key in found), (name, found)


# --------------------------------------------------------------------------
# Modes of what the stores write


@pytest.mark.parametrize(
    ("store", "files"),
    [
        (
            "sqlite",
            [
                "ehlo.sqlite3",
                "ehlo.sqlite3-wal",
                "ehlo.sqlite3-shm",
                "ehlo.sqlite3.bodies/.spool",
                "tls/key.pem",
                "tls/cert.pem",
            ],
        ),
        ("maildir", ["maildir/tmp", "maildir/cur", "tls/key.pem", "tls/cert.pem"]),
    ],
)
def test_store_files_are_private_under_umask_022(
    tmp_path: Path, store: str, files: list[str]
) -> None:
    data = tmp_path / "data"
    server = Serve(data, tmp_path / "serve.log", "--store", store, "--workers", "1")
    try:
        server.wait_ready()
        with smtplib.SMTP("127.0.0.1", server.port, timeout=TIMEOUT) as client:
            client.sendmail("a@example.org", ["b@example.net"], SMALL)
            client.sendmail("a@example.org", ["b@example.net"], LARGE)
        if store == "sqlite":
            bodies = [p for p in (data / "ehlo.sqlite3.bodies").iterdir() if p.name != ".spool"]
            assert len(bodies) == 1 and bodies[0].stat().st_size > len(LARGE), bodies
            locks = sorted((data / "ehlo.sqlite3.locks").iterdir())
            assert [p.suffix for p in locks] == [".lock"], locks
            spool = sorted(p.name for p in (data / "ehlo.sqlite3.bodies" / ".spool").iterdir())
            assert len(spool) == 2 and f"{spool[0]}.lock" == spool[1], spool
        else:
            assert len(list((data / "maildir" / "new").iterdir())) == 2
            assert len(list((data / "maildir" / "ehlo-envelopes").iterdir())) == 2
        assert_private(data, files)  # while it runs: WAL, shared memory, locks
        server.stop()
    finally:
        server.close()
    assert_private(data, [name for name in files if "-wal" not in name and "-shm" not in name])


def test_existing_sqlite_files_are_narrowed(tmp_path: Path) -> None:
    # A data folder written by an earlier version: the database 0644.
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    server = Serve(data, tmp_path / "first.log", "--no-tls", "--workers", "1")
    try:
        server.wait_ready()
        server.stop()
    finally:
        server.close()
    (data / "ehlo.sqlite3").chmod(0o644)
    server = Serve(data, tmp_path / "second.log", "--no-tls", "--workers", "1")
    try:
        server.wait_ready()
        assert_private(data, ["ehlo.sqlite3", "ehlo.sqlite3-wal", "ehlo.sqlite3-shm"])
        server.stop()
    finally:
        server.close()


def test_an_open_data_folder_is_kept_with_one_warning(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o750)  # e.g. a mail reader group, chosen by the operator
    args = ("--no-tls", "--workers", "2", "--log-level", "debug")
    server = Serve(data, tmp_path / "serve.log", *args)
    try:
        server.wait_ready(count=3)  # the supervisor, and each worker at DEBUG
        with smtplib.SMTP("127.0.0.1", server.port, timeout=TIMEOUT) as client:
            client.sendmail("a@example.org", ["b@example.net"], SMALL)
        server.stop()
    finally:
        server.close()
    warnings = [line for line in server.stderr().splitlines() if "has mode 0750" in line]
    assert len(warnings) == 1, server.stderr()
    assert f"data folder {data} has mode 0750" in warnings[0]
    assert stat.S_IMODE(data.stat().st_mode) == 0o750
    found = modes(data)
    assert found.pop(".") == "750"
    assert all(mode in ("600", "700") for mode in found.values()), found


# --------------------------------------------------------------------------
# A store that cannot write does not start


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder another user may enter (pytest's own are 0700), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="ehlo-ro-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(folder)


def unprivileged() -> tuple[str, ...]:
    """The command prefix that runs the server as a user permission bits apply to."""
    if os.geteuid() != 0:
        return ()
    return (tool("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")


def read_only(*folders: Path) -> None:
    """Make ``folders`` (and what they hold) unwritable for the server's user."""
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            if os.geteuid() == 0:
                os.chown(path, 0, 0)  # root's, 0755: nobody may only read
                path.chmod(0o755 if path.is_dir() else 0o644)
            else:
                path.chmod(0o555 if path.is_dir() else 0o444)


def writable(*folders: Path) -> None:
    """Make ``folders`` writable for the server's user."""
    for folder in folders:
        if os.geteuid() == 0:
            os.chown(folder, NOBODY, NOBODY)
        folder.chmod(0o700)


def assert_refused(server: Serve, reason: str) -> None:
    """The server exits 1 with one error line holding ``reason``, never saying "ready"."""
    deadline = time.monotonic() + TIMEOUT
    while server.proc.poll() is None:
        assert " ready on " not in server.stderr(), server.stderr()
        assert time.monotonic() < deadline, f"still running: {server.stderr()}"
        time.sleep(0.05)
    text = server.stderr()
    assert server.proc.returncode == 1, text
    assert " ready on " not in text, text
    line = one_line_error(text.encode())
    assert reason in line, line


def test_maildir_on_a_read_only_folder_does_not_start(shared_tmp: Path) -> None:
    data = shared_tmp / "data"
    for sub in ("tmp", "new", "cur", "ehlo-envelopes"):
        (data / "maildir" / sub).mkdir(parents=True)
    read_only(data)
    server = Serve(
        data, shared_tmp / "serve.log", "--store", "maildir", "--no-tls", "--workers", "1",
        prefix=unprivileged(),
    )  # fmt: skip
    try:
        assert_refused(server, f"cannot write in {data / 'maildir' / 'tmp'}: Permission denied")
    finally:
        server.close()
    assert not [p for p in data.rglob("*") if p.is_file()]  # nothing half made


@pytest.mark.parametrize(("writer", "workers"), [("thread", 1), ("thread", 2), ("process", 2)])
@pytest.mark.parametrize("where", ["data folder", "bodies folder"])
def test_sqlite_on_a_read_only_folder_does_not_start(
    shared_tmp: Path, where: str, writer: str, workers: int
) -> None:
    data = shared_tmp / "data"
    bodies = data / "ehlo.sqlite3.bodies"
    (bodies / ".spool").mkdir(parents=True)
    if where == "data folder":
        read_only(data)
        reason = f"cannot write in {data}: Permission denied"
    else:
        # The database folder and the spool are writable, the folder large
        # bodies are linked into at commit is not.
        read_only(bodies)
        writable(data, bodies / ".spool")
        reason = f"cannot write in {bodies}: Permission denied"
    config = shared_tmp / "ehlo.toml"
    config.write_text(f'sqlite_writer = "{writer}"\ntls = false\nworkers = {workers}\n')
    server = Serve(data, shared_tmp / "serve.log", "--config", str(config), prefix=unprivileged())
    try:
        assert_refused(server, reason)
    finally:
        server.close()
