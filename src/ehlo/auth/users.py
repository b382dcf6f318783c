"""The user database of SMTP AUTH: names and Argon2id password hashes in a text file.

This module owns password preparation (SASLprep, RFC 4013), hashing and
checking (Argon2id, RFC 9106, with ``argon2-cffi``: thread-safe, and it
releases the GIL while it hashes) and the ``users`` file in the data
folder::

    # comments and blank lines are allowed
    alice:$argon2id$v=19$m=65536,t=3,p=4$<salt>$<tag>

One ``name:phc-string`` per line. User names are 1-64 characters from
``A-Z a-z 0-9 . _ @ + -`` and are matched exactly (case-sensitive:
``Alice`` and ``alice`` are two users). The file is rewritten atomically
(a temporary file in the same folder, fsync, rename, fsync of the folder)
with mode 0600; concurrent writers are serialised by an ``fcntl`` lock on
``.users.lock``. Comments and lines the store does not understand are kept
as they are when the file is rewritten.

:meth:`UserStore.verify` is what a server calls at login: it re-reads the
file when it changed (so ``ehlo users add`` takes effect without a
restart), never raises, and spends one Argon2id verification whether or
not the user exists.

The PHC strings are the standard ones (``$argon2id$v=19$m=...,t=...,p=...``,
unpadded base64 salt and tag), so files written by earlier versions, which
hashed with ``cryptography``'s Argon2id, still verify.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..saslprep import saslprep as _saslprep

if TYPE_CHECKING:
    from argon2 import PasswordHasher

__all__ = [
    "ARGON2_ITERATIONS",
    "ARGON2_LANES",
    "ARGON2_MEMORY_KIB",
    "ARGON2_SALT_BYTES",
    "ARGON2_TAG_BYTES",
    "UserError",
    "UserStore",
    "check_name",
    "check_password",
    "hash_password",
    "is_valid_name",
    "read_users_file",
    "saslprep",
]

log = logging.getLogger("ehlo.auth")

# RFC 9106 section 4, second recommended option: t=3, p=4, m=64 MiB, 128-bit salt, 256-bit tag.
ARGON2_ITERATIONS = 3
ARGON2_LANES = 4
ARGON2_MEMORY_KIB = 64 * 1024
ARGON2_SALT_BYTES = 16
ARGON2_TAG_BYTES = 32

# RFC 4616 section 2: a PLAIN field is at most 255 octets, so a longer password
# could never be sent with AUTH PLAIN.
MAX_PASSWORD_OCTETS = 255

USERS_FILE = "users"
LOCK_FILE = ".users.lock"

_NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}")
_NAME_RULE = "1-64 characters from A-Z a-z 0-9 . _ @ + -"
# An Argon2id PHC string (version 0x13 = 19), as argon2-cffi writes and reads it.
_PHC = re.compile(
    r"\$argon2id\$v=19\$m=[1-9][0-9]{0,9},t=[1-9][0-9]{0,9},p=[1-9][0-9]{0,7}"
    r"\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+"
)
_HEADER = "# ehlo users: one name:argon2id-phc-string per line (edit with `ehlo users`)\n"


class UserError(ValueError):
    """A refused name or password, or an unreadable users file: a one-line message."""


# --------------------------------------------------------------------------
# SASLprep (RFC 4013, a profile of stringprep, RFC 3454)


def saslprep(text: str, *, query: bool = False) -> str:
    """``text`` prepared with SASLprep (RFC 4013); raise :class:`UserError` if it fails.

    ``query=False`` prepares a stored string (unassigned code points are
    refused); ``query=True`` prepares a string to compare with a stored one.
    """
    try:
        return _saslprep(text, query=query)
    except ValueError as exc:
        raise UserError(f"password {exc}") from None


# --------------------------------------------------------------------------
# Hashing


def is_valid_name(name: str) -> bool:
    """Whether ``name`` is a user name the store accepts (1-64 of ``A-Za-z0-9._@+-``)."""
    return _NAME.fullmatch(name) is not None


def check_name(name: str) -> None:
    """Raise :class:`UserError` unless ``name`` is a valid user name."""
    if not is_valid_name(name):
        raise UserError(f"invalid user name {name!r}: use {_NAME_RULE}")


def hash_password(password: str) -> str:
    """The Argon2id PHC string of ``password`` (after SASLprep), with a fresh random salt.

    Raises :class:`UserError` for an empty password or one SASLprep refuses.
    """
    if not password:
        raise UserError("empty password")
    prepared = saslprep(password)
    if not prepared:
        raise UserError("empty password (after SASLprep)")
    return _hasher().hash(prepared)


def check_password(phc: str, password: str) -> bool:
    """Whether ``password`` (after SASLprep) matches the PHC string ``phc``.

    The parameters come from ``phc``, so hashes made with other parameters
    still verify. False (never an exception) for a wrong password, a
    password SASLprep refuses, or a malformed PHC string.
    """
    try:
        prepared = saslprep(password, query=True)
    except UserError:
        return False
    if not prepared or _PHC.fullmatch(phc) is None:
        return False  # only Argon2id, version 19: argon2-cffi would take argon2i and argon2d too
    from argon2.exceptions import InvalidHashError, VerificationError

    try:
        return _hasher().verify(phc, prepared)
    except (VerificationError, InvalidHashError, ValueError, TypeError):
        return False


@functools.cache
def _hasher() -> PasswordHasher:
    """The Argon2id hasher with the RFC 9106 parameters (made on first use)."""
    # Imported here: only a server with users, or ``ehlo users``, needs it.
    from argon2 import PasswordHasher, Type

    return PasswordHasher(
        time_cost=ARGON2_ITERATIONS,
        memory_cost=ARGON2_MEMORY_KIB,
        parallelism=ARGON2_LANES,
        hash_len=ARGON2_TAG_BYTES,
        salt_len=ARGON2_SALT_BYTES,
        type=Type.ID,
    )


_dummy_lock = threading.Lock()
_dummy_phc: str | None = None


def _dummy_hash() -> str:
    """A hash no password is known for, made once: unknown users cost one verification too."""
    global _dummy_phc
    with _dummy_lock:
        if _dummy_phc is None:
            _dummy_phc = hash_password(secrets.token_urlsafe(24))
        return _dummy_phc


# --------------------------------------------------------------------------
# The users file


def _parse(text: str, path: Path) -> dict[str, str]:
    """The users of a file's text; malformed lines are skipped with a warning."""
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, phc = line.partition(":")
        if not sep or not is_valid_name(name) or _PHC.fullmatch(phc) is None:
            log.warning(
                "%s line %d: not a name:argon2id-phc-string line, skipped",
                path,
                number,
                extra={"event": "users_file_malformed", "path": str(path), "line": number},
            )
            continue
        if name in users:
            log.warning(
                "%s line %d: user %s listed again, the first entry is used",
                path,
                number,
                name,
                extra={"event": "users_file_duplicate", "path": str(path), "line": number},
            )
            continue
        users[name] = phc
    return users


def read_users_file(path: Path) -> dict[str, str]:
    """The users of a users file (name -> PHC string), as a server reads them; {} if none.

    Raises :class:`UserError` when the file exists but cannot be read.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            text = file.read()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    return _parse(text, Path(path))


def _line_name(raw: str) -> str | None:
    """The user a line of the file is about, or None (comment, blank, malformed)."""
    line = raw.strip()
    if not line or line.startswith("#"):
        return None
    name, sep, _phc = line.partition(":")
    return name if sep and is_valid_name(name) else None


_StatKey = tuple[int, int, int, int, int]


def _stat_key(st: os.stat_result) -> _StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class UserStore:
    """The users of SMTP AUTH, kept in ``data_dir / "users"``.

    Reads are cached and re-done only when the file's inode, size or times
    change. Safe to use from several threads; several processes may write
    the file at once (they take turns on an ``fcntl`` lock).
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / USERS_FILE
        self._lock_path = self.data_dir / LOCK_FILE
        self._users: dict[str, str] = {}
        self._key: _StatKey | None = None
        self._loaded = False
        self._refresh_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"UserStore({str(self.data_dir)!r})"

    # ------------------------------------------------------------ reading

    def refresh(self) -> None:
        """Re-read the file if it changed since the last read (a ``stat`` otherwise).

        A missing file (or data folder) means no users. Raises
        :class:`UserError` when the file exists but cannot be read; the
        users read before are kept then.
        """
        with self._refresh_lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self._users, self._key, self._loaded = {}, None, True
                return
            except OSError as exc:
                raise UserError(f"cannot read {self.path}: {exc.strerror or exc}") from None
            if self._loaded and _stat_key(st) == self._key:
                return
            try:
                with open(self.path, encoding="utf-8", errors="replace") as file:
                    key = _stat_key(os.fstat(file.fileno()))
                    text = file.read()
            except FileNotFoundError:  # replaced between stat and open: read next time
                return
            except OSError as exc:
                raise UserError(f"cannot read {self.path}: {exc.strerror or exc}") from None
            self._users, self._key, self._loaded = _parse(text, self.path), key, True

    def _refresh_quietly(self) -> None:
        try:
            self.refresh()
        except UserError as exc:
            log.warning(
                "%s (keeping the users read before)",
                exc,
                extra={"event": "users_file_unreadable", "path": str(self.path)},
            )

    def names(self) -> list[str]:
        """The user names, sorted. Raises :class:`UserError` if the file cannot be read."""
        self.refresh()
        return sorted(self._users)

    def __len__(self) -> int:
        """How many users there are (after a quiet refresh: never raises)."""
        self._refresh_quietly()
        return len(self._users)

    def __contains__(self, name: object) -> bool:
        self._refresh_quietly()
        return name in self._users

    def verify(self, name: str, password: str) -> bool:
        """Whether ``name`` exists and ``password`` is theirs. Never raises.

        CPU and memory heavy (one Argon2id verification, 64 MiB): call it
        from a worker thread, not the event loop. An unknown user costs one
        verification against a dummy hash too, so the time taken does not
        tell which names exist.
        """
        self._refresh_quietly()
        phc = self._users.get(name)
        if phc is None:
            check_password(_dummy_hash(), password)
            return False
        return check_password(phc, password)

    # ------------------------------------------------------------ writing

    def add(self, name: str, password: str) -> bool:
        """Add user ``name``, or replace their password. True if the user is new.

        Raises :class:`UserError` for an invalid name or password, or when
        the data folder or file cannot be written.
        """
        check_name(name)
        if password and len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_OCTETS:
            raise UserError(
                f"password longer than {MAX_PASSWORD_OCTETS} octets (UTF-8):"
                " AUTH PLAIN could not send it"
            )
        phc = hash_password(password)  # before taking the lock: it takes a while
        entry = f"{name}:{phc}\n"
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(
                f"cannot create data folder {self.data_dir}: {exc.strerror or exc}"
            ) from None
        with self._locked():
            lines = self._read_lines()
            new = True
            out: list[str] = []
            for raw in lines:
                if _line_name(raw) == name:
                    if new:
                        out.append(entry)
                        new = False
                    continue  # a duplicate entry goes with the replacement
                out.append(raw)
            if new:
                if not lines:
                    out.append(_HEADER)
                elif not out[-1].endswith("\n"):
                    out[-1] += "\n"
                out.append(entry)
            self._write(out)
        return new

    def remove(self, name: str) -> bool:
        """Remove user ``name``; False if there is no such user.

        Raises :class:`UserError` for an invalid name or when the file
        cannot be written.
        """
        check_name(name)
        if not self.data_dir.exists():
            return False
        with self._locked():
            lines = self._read_lines()
            out = [raw for raw in lines if _line_name(raw) != name]
            if len(out) == len(lines):
                return False
            self._write(out)
        return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the exclusive ``fcntl`` lock that serialises writers."""
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise UserError(f"cannot lock {self._lock_path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read_lines(self) -> list[str]:
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape", newline="") as f:
                return f.readlines()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise UserError(f"cannot read {self.path}: {exc.strerror or exc}") from None

    def _write(self, lines: list[str]) -> None:
        """Replace the file atomically with ``lines`` (mode 0600), then re-read it."""
        data = "".join(lines).encode("utf-8", "surrogateescape")
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=".users.", suffix=".tmp", dir=self.data_dir)
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            tmp = None
            dir_fd = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise UserError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        self.refresh()
