"""A real Dovecot LMTP server (the Debian packages) in the foreground on loopback, for tests.

``run_dovecot`` writes a configuration of its own in a temporary folder
(nothing under /etc/dovecot is read: ``dovecot -c FILE``), serving only LMTP
(RFC 2033) on a free loopback port and, unless told otherwise, on a
Unix-domain socket in that folder. Every user exists (a static passdb and
userdb) and gets a Maildir under ``FOLDER/mail/USER``, so a message for
``bob@anything`` lands in ``FOLDER/mail/bob/new/``, stored with its CRLF
line endings (``mail_save_crlf``). It runs ``dovecot -F``
(no daemon), yields a :class:`Dovecot` once both listeners greet with 220,
and on exit stops the master with SIGTERM (then SIGKILL if it lingers) and
checks that the master and every process it started are gone.

As root the mail processes run as ``nobody``/``nogroup`` (the folder is
made world-readable and the mail folder world-writable for them); as another
user they run as that user. The folder is made with :mod:`tempfile` rather
than under pytest's ``tmp_path``: that one is private to its owner (mode
700), and a Unix socket path must stay under about 100 octets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .helpers import child_pids, free_port

__all__ = ["Dovecot", "DovecotError", "dovecot_available", "dovecot_path", "run_dovecot"]

# How long Dovecot may take to listen, and to exit after SIGTERM.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# Attempts when another process takes the free port before Dovecot binds it.
_BIND_ATTEMPTS = 3
_SBIN = "/usr/sbin:/sbin:/usr/local/sbin"
# The unix_listener's name: the socket is BASE_DIR/lmtp-test.
_SOCKET_NAME = "lmtp-test"


class DovecotError(RuntimeError):
    """Dovecot refused the configuration, did not start, or did not stop."""


@dataclasses.dataclass(frozen=True)
class Dovecot:
    """A running Dovecot: where it listens and where it delivers."""

    folder: Path  # the temporary folder: configuration, logs, sockets, mail
    host: str
    port: int
    socket_path: Path | None  # the LMTP Unix socket, if asked for
    pid: int  # the master process

    @property
    def log(self) -> str:
        """Dovecot's log so far (for assertion messages)."""
        path = self.folder / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def maildir(self, user: str) -> Path:
        """The Maildir of ``user`` (the local part of the recipient)."""
        return self.folder / "mail" / user

    def messages(self, user: str) -> list[bytes]:
        """The messages delivered to ``user``'s inbox (``new/``), oldest first."""
        new = self.maildir(user) / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]


def dovecot_path() -> str | None:
    """The dovecot executable (also looked for in the sbin directories), or None."""
    return shutil.which("dovecot") or shutil.which("dovecot", path=_SBIN)


def dovecot_available() -> bool:
    """Whether Dovecot and its LMTP server (dovecot-lmtpd) are installed."""
    exe = dovecot_path()
    return exe is not None and Path("/usr/lib/dovecot/lmtp").exists()


@contextlib.contextmanager
def run_dovecot(*, unix_socket: bool = True, host: str = "127.0.0.1") -> Iterator[Dovecot]:
    """Run Dovecot's LMTP server on ``host`` (a free port) and a Unix socket; yield it."""
    exe = dovecot_path()
    if exe is None:
        raise DovecotError("dovecot is not installed (scripts/install-test-deps.sh installs it)")
    user, group = _mail_identity()
    folder = Path(tempfile.mkdtemp(prefix="ehlo-dovecot-"))
    try:
        folder.chmod(0o755)
        for name in ("run", "state", "mail"):
            (folder / name).mkdir()
        (folder / "mail").chmod(0o1777)
        config = folder / "dovecot.conf"
        for attempt in range(1, _BIND_ATTEMPTS + 1):
            port = free_port(host)
            config.write_text(_config(folder, host, port, unix_socket, user, group))
            _check_config(exe, config)
            with (folder / "stdout.log").open("wb") as out:
                proc = subprocess.Popen(
                    [exe, "-c", str(config), "-F"],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=folder,
                )
            try:
                path = folder / "run" / _SOCKET_NAME if unix_socket else None
                if _wait_ready(proc, host, port, path):
                    yield Dovecot(folder, host, port, path, proc.pid)
                    return
            finally:
                _stop(proc)
            output = _logs(folder)
            if "address already in use" in output.lower() and attempt < _BIND_ATTEMPTS:
                continue  # someone took the port meanwhile: try another
            raise DovecotError(
                f"dovecot exited with status {proc.returncode} before listening on "
                f"{host}:{port}:\n{output}"
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _mail_identity() -> tuple[str, str]:
    """The user and group the mail processes run as: nobody as root, else ourselves."""
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        return nobody.pw_name, grp.getgrgid(nobody.pw_gid).gr_name
    me = pwd.getpwuid(os.geteuid())
    return me.pw_name, grp.getgrgid(os.getegid()).gr_name


def _config(folder: Path, host: str, port: int, unix_socket: bool, user: str, group: str) -> str:
    listener = f"  unix_listener {_SOCKET_NAME} {{\n    mode = 0666\n  }}\n" if unix_socket else ""
    return (
        "protocols = lmtp\n"
        f"base_dir = {folder}/run\n"
        f"state_dir = {folder}/state\n"
        f"log_path = {folder}/dovecot.log\n"
        "ssl = no\n"
        f"default_internal_user = {user}\n"
        f"default_internal_group = {group}\n"
        f"default_login_user = {user}\n"
        f"mail_location = maildir:{folder}/mail/%n\n"
        # Keep the message's CRLF line endings in the file (byte-exact checks).
        "mail_save_crlf = yes\n"
        "passdb {\n  driver = static\n  args = nopassword=y\n}\n"
        "userdb {\n"
        "  driver = static\n"
        f"  args = uid={user} gid={group} home={folder}/mail/%n\n"
        "}\n"
        "service lmtp {\n"
        f"  inet_listener lmtp {{\n    address = {host}\n    port = {port}\n  }}\n"
        f"{listener}"
        "}\n"
    )


def _check_config(exe: str, config: Path) -> None:
    """``doveconf``'s check through ``dovecot -n``: raise DovecotError if it refuses."""
    result = subprocess.run(
        [exe, "-c", str(config), "-n"], capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise DovecotError(
            f"dovecot refused the configuration (status {result.returncode}):\n"
            f"{(result.stdout + result.stderr).strip()}\n--- {config} ---\n{config.read_text()}"
        )


def _greets(family: socket.AddressFamily, address: str | tuple[str, int]) -> bool:
    """Whether an LMTP listener accepts a connection and sends a 220 banner."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(address)
            ok = sock.recv(4).startswith(b"220")
            if ok:
                sock.sendall(b"QUIT\r\n")
            return ok
    except OSError:
        return False


def _wait_ready(proc: subprocess.Popen[bytes], host: str, port: int, path: Path | None) -> bool:
    """Wait until both listeners greet: True, or False when Dovecot exited first."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if _greets(family, (host, port)) and (
            path is None or (path.exists() and _greets(socket.AF_UNIX, str(path)))
        ):
            return True
        time.sleep(0.05)
    raise DovecotError(f"dovecot did not greet on {host}:{port} within {START_TIMEOUT:g} s")


def _logs(folder: Path) -> str:
    parts = []
    for name in ("stdout.log", "dovecot.log"):
        path = folder / name
        if path.exists():
            parts.append(path.read_text(errors="replace").strip())
    return "\n".join(p for p in parts if p)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the master, SIGKILL it if it lingers; then check its children are gone."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        children = child_pids(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # The master waits for its services before it exits; check nothing stayed.
    deadline = time.monotonic() + STOP_TIMEOUT
    while any(_alive(pid) for pid in children):
        if time.monotonic() > deadline:
            left = [pid for pid in children if _alive(pid)]
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            raise DovecotError(f"dovecot processes {left} outlived the master")
        time.sleep(0.05)
