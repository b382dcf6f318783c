"""A throwaway PostgreSQL (Debian's ``postgresql`` package) for tests.

``PgCluster`` runs ``initdb`` and ``pg_ctl`` from
``/usr/lib/postgresql/<version>/bin`` in a temporary folder, as ``nobody``
when the tests run as root (``initdb`` refuses root): no system service, no
configuration under /etc. The server listens on a Unix socket in that
folder (and on a loopback TCP port, for tests that need one); the
superuser is ``ehlo`` with ``trust`` authentication, which the socket's
folder (mode 0755, only its owner may write) keeps to this machine.

One cluster serves a whole test session (``pg_cluster`` in conftest);
each test gets a database of its own (``pg_url``), created in a few tens
of milliseconds from ``template0``. ``fsync`` stays on: the durability
tests mean what they say. ``stop`` and ``start`` let a test take the
database away and bring it back on the same socket and port.

Standard library only (no test helper imported): ``bench/`` starts its
throwaway PostgreSQL with this same class.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PgCluster", "PgError", "pg_bin"]

START_TIMEOUT = 60
SUPERUSER = "ehlo"


class PgError(RuntimeError):
    """initdb, pg_ctl or psql failed."""


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (None: not installed)."""
    def version(path: str) -> int:
        name = Path(path).parent.parent.name
        return int(name) if name.isdigit() else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_owner() -> list[str]:
    """The prefix that runs a command as the cluster's owner (nobody when root)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


class PgCluster:
    """One PostgreSQL server in a temporary folder."""

    def __init__(self) -> None:
        binary = pg_bin()
        if binary is None:
            raise PgError("PostgreSQL is not installed (make test-deps)")
        self.bin = binary
        # Not under pytest's tmp_path: that is private to root (mode 0700),
        # and a Unix socket's path must stay under about 100 octets.
        self.folder = Path(tempfile.mkdtemp(prefix="ehlo-pg-"))
        self.folder.chmod(0o755)
        self.data = self.folder / "data"
        self.socket_dir = self.folder / "run"
        self.log = self.folder / "postgresql.log"
        self.port = free_port()
        self._names = itertools.count(1)
        self.running = False

    # --- life cycle ---------------------------------------------------------------------

    def init(self) -> PgCluster:
        for path in (self.data, self.socket_dir):
            path.mkdir(mode=0o700)
        self.log.touch()
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            for path in (self.data, self.socket_dir, self.log):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
        self.socket_dir.chmod(0o755)
        self._run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", SUPERUSER,
             "-E", "UTF8", "--locale=C", "--no-sync"],
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# ehlo's tests\n"
                "max_connections = 300\n"
                "shared_buffers = 64MB\n"
                "fsync = on\n"
                "synchronous_commit = on\n"
                "log_min_messages = warning\n"
            )
        return self

    def start(self) -> None:
        options = (
            f"-k {self.socket_dir} -p {self.port} -c listen_addresses=127.0.0.1"
        )
        self._run(
            [str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
             "-t", str(START_TIMEOUT), "-o", options, "start"],
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as a crash would, no checkpoint)."""
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])
        self.running = False

    def destroy(self) -> None:
        if self.running:
            with contextlib.suppress(PgError):
                self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    # --- use --------------------------------------------------------------------------

    def url(self, database: str = "postgres", *, tcp: bool = False) -> str:
        """A libpq URL for ``database``: on the Unix socket, or 127.0.0.1 with ``tcp``."""
        if tcp:
            return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"
        return f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}&port={self.port}"

    def create_database(self) -> str:
        """A new empty database; its name."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self.psql("postgres", f"CREATE DATABASE {name} TEMPLATE template0")
        return name

    def psql(self, database: str, sql: str) -> str:
        """Run SQL with psql (-At: unaligned, tuples only); its output."""
        psql = self.bin / "psql"
        if not psql.exists():
            psql = Path(shutil.which("psql") or "psql")
        done = subprocess.run(
            [str(psql), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
             "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-c", sql],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if done.returncode != 0:
            raise PgError(f"psql: {done.stderr.strip()}")
        return done.stdout

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(
            [*_as_owner(), *argv], capture_output=True, text=True, timeout=120, check=False,
            cwd=self.folder,
        )
        if done.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise PgError(
                f"{Path(argv[0]).name} failed ({done.returncode}): {done.stderr.strip()}\n{tail}"
            )
