"""A private Postfix instance for the benchmarks: its folder, its check, its start and stop.

bench/run.py runs one that receives and keeps (the durable reference of W1
and W2: smtpd -> cleanup -> a queue file synced to disk, then the
``discard`` transport); bench/relay.py one that relays to a sink (R1).
Both are ``postfix -c DIR start-fg`` on a loopback port with their own
``main.cf``, ``master.cf``, ``queue_directory`` and ``data_directory`` in
DIR; the system's Postfix and /etc/postfix are only read (master.cf is the
template). Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

HOST = "127.0.0.1"
DOMAIN = "bench.local"
MASTER_CF = Path("/etc/postfix/master.cf")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def binary() -> str:
    return shutil.which("postfix", path=SBIN_PATH) or "/usr/sbin/postfix"


def main_cf(folder: Path, relay_port: int | None = None) -> str:
    """main.cf of a private instance that accepts everything from loopback.

    With ``relay_port`` every message is relayed to ``[127.0.0.1]:relay_port``;
    without it every message is kept (cleanup writes and syncs the queue
    file) and then dropped by the ``discard`` transport: Postfix's cost of
    receiving durably.
    """
    if relay_port is None:
        # No domain is local or relayed: every recipient takes default_transport.
        route = ["mydestination =", "default_transport = discard"]
    else:
        route = [f"mydestination = {DOMAIN}", f"relayhost = [{HOST}]:{relay_port}"]
    return "\n".join(
        [
            "compatibility_level = 3.6",
            f"queue_directory = {folder / 'queue'}",
            f"data_directory = {folder / 'data'}",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "myhostname = postfix.bench.local",
            f"mydomain = {DOMAIN}",
            *route,
            "mynetworks = 127.0.0.0/8",
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
            "alias_maps =",
            "alias_database =",
            "local_recipient_maps =",
            "smtpd_client_connection_rate_limit = 0",
            "smtpd_client_connection_count_limit = 0",
            "smtpd_client_message_rate_limit = 0",
            "smtpd_client_recipient_rate_limit = 0",
            "smtp_tls_security_level = none",
            "smtpd_tls_security_level = none",
            "smtp_dns_support_level = disabled",
            "disable_dns_lookups = yes",
            "smtpd_peername_lookup = no",
            "biff = no",
            "maillog_file = /dev/stdout",
            "",
        ]
    )


def master_cf(template: str, smtp_port: int) -> str:
    """master.cf from Debian's: the ``smtp inet`` service on ``smtp_port``, nothing chrooted."""
    out = []
    for line in template.splitlines():
        fields = line.split()
        if line[:1].isspace() or line.startswith("#") or len(fields) < 8:
            out.append(line)
            continue
        name, kind = fields[0], fields[1]
        if kind == "inet" and name != "smtp":
            continue  # submission, smtps...: not wanted
        if kind == "inet":
            fields[0] = f"{HOST}:{smtp_port}"
        fields[4] = "n"  # chroot: n (the queue folder is our own)
        out.append("  ".join(fields[:8]) + ("  " + " ".join(fields[8:]) if fields[8:] else ""))
    return "\n".join(out) + "\n"


def write_config(folder: Path, smtp_port: int, relay_port: int | None = None) -> None:
    """A private instance's folder: main.cf, master.cf, queue and data folders."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.cf").write_text(main_cf(folder, relay_port))
    (folder / "master.cf").write_text(master_cf(MASTER_CF.read_text(), smtp_port))
    for sub in ("queue", "data"):
        (folder / sub).mkdir(exist_ok=True)
    if os.geteuid() == 0:
        # The master takes its lock in data_directory as the mail owner.
        shutil.chown(folder / "data", user="postfix")


def command(folder: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``postfix -c folder ARGS...``, its output captured."""
    return subprocess.run(
        [binary(), "-c", str(folder), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PATH": SBIN_PATH},
        check=False,
    )


def prepare(folder: Path, smtp_port: int, relay_port: int | None = None) -> list[str]:
    """Write the instance's folder, run ``postfix check`` (it makes the spool folders).

    Returns the command that runs the instance in the foreground; raises
    ``RuntimeError`` with Postfix's complaint when the check fails.
    """
    write_config(folder, smtp_port, relay_port)
    checked = command(folder, "check")
    if checked.returncode != 0:
        raise RuntimeError(f"postfix check: {(checked.stderr or checked.stdout).strip()}")
    return [binary(), "-c", str(folder), "start-fg"]


def stop(folder: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """``postfix -c folder stop``, then wait for the start-fg process ``proc`` to end.

    The caller kills the process group afterwards if anything is left.
    """
    if proc.poll() is not None:
        return
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        command(folder, "stop", timeout=timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
