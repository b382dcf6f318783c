"""The storage seam: what every message store must offer.

A store receives one message at a time per session through a
:class:`MessageWriter` (``begin`` -> ``write``... -> ``commit`` or ``abort``)
and answers queries over what it holds. ``commit`` returns only once the
message and its envelope are durable on disk: the SMTP session sends its final
250 after that and never before (RFC 5321 section 6.1, "it MUST NOT lose the
message").

Writers are used from the event loop thread. ``write`` must not block for
long (no fsync there); ``commit`` is where durability is paid, and backends
share that cost between concurrent sessions (group commit).

Files on disk are private to the server's user, whatever its umask: every
file a store creates is made with :data:`FILE_MODE` (0600), every folder
with :data:`DIR_MODE` (0700), and the data folder too when ehlo creates it
(:func:`ensure_data_dir`; one that exists keeps its mode, with a warning
when group or others may enter it). ``start`` proves each folder a store
writes to is writable (:func:`check_writable`), so that a store that
cannot keep mail fails at start rather than at the first message.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import datetime as _dt
import email.header
import errno
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._overview import Overview, overview_of
from ._query import Query, Retention

if TYPE_CHECKING:
    from .queue import Queue, QueueItem

# Messages deleted in one transaction (or one folder sync): retention runs
# while sessions commit, so each batch holds the write lock only briefly.
DELETE_BATCH = 200
# Seconds between retention passes while serving.
RETENTION_INTERVAL = 1.0
# Sessions a session log keeps unless told otherwise (``session_log_max``).
SESSION_LOG_MAX = 10_000


class StoreError(Exception):
    """The store could not accept or commit a message (disk full, I/O error).

    The session answers 451 4.3.0 to the client: the message is not lost,
    the client keeps it and retries later.
    """


class StoreUnavailable(StoreError):
    """The store's database is away (an outage it logged once, when it began).

    The server answers the message 451 like any StoreError but does not
    log an error line per message: one per outage is enough.
    """


class NoSuchMessage(StoreError):
    """A query's paging bound (``before``/``after``) names no stored message."""


class JSONText(str):
    """A value of ``Envelope.extra`` that is JSON text already (a report
    serialised once and stored as it is for every message it applies to)."""

    __slots__ = ()

    def value(self) -> Any:
        """The JSON value it holds."""
        return json.loads(self)


def _plain(value: Any) -> Any:
    return value.value() if isinstance(value, JSONText) else value


# Keys of ``Envelope.extra`` shown at the top level of ``to_json``.
PROMOTED_EXTRA = ("greeting_checks", "greeting_verdict", "auth", "violations", "authres_forged")
# The key of ``Envelope.extra`` holding the session's transcript as the
# message keeps it: ``[[t, dir, text], ...]`` (seconds since connect; "C",
# "S" or "*"), JSON text. Left out of ``to_json`` unless asked for.
TRANSCRIPT = "transcript"


@dataclasses.dataclass(slots=True)
class Envelope:
    """Everything known about a message besides its bytes."""

    queue_id: str
    client_ip: str
    client_port: int
    greeting: str  # "HELO" or "EHLO"
    greeting_name: str
    mail_from: str  # "" for the null reverse-path <>
    mail_params: dict[str, str | None]
    rcpt_to: list[str]
    received_at: _dt.datetime  # timezone-aware, UTC
    tls: dict[str, str] | None = None  # {"version": ..., "cipher": ...}
    protocol: str = "SMTP"  # RFC 3848 keyword used in the Received header
    server_name: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Octets of the message as the client sent it (after dot-unstuffing),
    # set by the session at the end of the data; None when not known.
    size_received: int | None = None
    # The recipients to hand on (relay, LMTP): the store queues them in the
    # message's own commit. Kept by the queue, not in the envelope's JSON.
    queue: list[QueueItem] = dataclasses.field(default_factory=list)

    def to_json(self, *, transcript: bool = False) -> dict[str, Any]:
        """The envelope as JSON-ready data (the keys of ``messages --json``).

        ``transcript``: keep the session transcript in ``extra`` (what a
        store writes); left out otherwise, a list would grow too big with it.
        """
        skip = PROMOTED_EXTRA if transcript else (*PROMOTED_EXTRA, TRANSCRIPT)
        return {
            "id": self.queue_id,
            "received_at": self.received_at.isoformat(),
            "client_ip": self.client_ip,
            "client_port": self.client_port,
            "greeting": self.greeting,
            "greeting_name": self.greeting_name,
            "mail_from": self.mail_from,
            "mail_params": dict(self.mail_params),
            "rcpt_to": list(self.rcpt_to),
            "tls": dict(self.tls) if self.tls else None,
            "protocol": self.protocol,
            "server_name": self.server_name,
            **({"size_received": self.size_received} if self.size_received is not None else {}),
            # Greeting verification results are first-class keys of the envelope.
            **{key: _plain(self.extra[key]) for key in PROMOTED_EXTRA if key in self.extra},
            **(
                {"extra": rest}
                if (
                    rest := {k: _plain(v) for k, v in self.extra.items() if k not in skip}
                )
                else {}
            ),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Envelope:
        """Rebuild an envelope written by :meth:`to_json`."""
        return cls(
            queue_id=data["id"],
            client_ip=data["client_ip"],
            client_port=int(data.get("client_port", 0)),
            greeting=data["greeting"],
            greeting_name=data["greeting_name"],
            mail_from=data["mail_from"],
            mail_params=dict(data.get("mail_params") or {}),
            rcpt_to=list(data["rcpt_to"]),
            received_at=_dt.datetime.fromisoformat(data["received_at"]),
            tls=data.get("tls"),
            protocol=data.get("protocol", "SMTP"),
            server_name=data.get("server_name", ""),
            size_received=(
                int(data["size_received"]) if data.get("size_received") is not None else None
            ),
            extra={
                **dict(data.get("extra") or {}),
                **{key: data[key] for key in PROMOTED_EXTRA if key in data},
            },
        )


@dataclasses.dataclass(slots=True, frozen=True)
class StoredMessage:
    """A committed message as listed by a store: its envelope and size."""

    envelope: Envelope
    size: int  # octets stored, ehlo's Received (and Authentication-Results) header included
    subject: str | None
    # Whether a part is given as an attachment (``_query.has_attachment``),
    # None when not known (a message stored before it was recorded).
    attachments: bool | None = None

    @property
    def size_received(self) -> int | None:
        """Octets the client sent (None for messages stored before it was recorded)."""
        return self.envelope.size_received


@dataclasses.dataclass(slots=True)
class StoreStats:
    """Counters kept by a backend (updated by its writer thread, read anywhere)."""

    # Durability points paid: SQL COMMITs (sqlite), fsync batches of new/ (maildir).
    # Fewer commits than messages means concurrent sessions shared fsyncs.
    commits: int = 0
    # Messages committed (made durable and visible).
    messages: int = 0


# The keys of each message ``messages list --json`` prints and the API lists, in order.
LIST_FIELDS = (
    "id",
    "received_at",
    "client_ip",
    "client_port",
    "greeting",
    "greeting_name",
    "mail_from",
    "mail_params",
    "rcpt_to",
    "tls",
    "protocol",
    "server_name",
    "auth",
    "greeting_verdict",
    "size",
    "size_received",
    "subject",
)


def message_json(message: StoredMessage, *, transcript: bool = False) -> dict[str, Any]:
    """A stored message as ``messages show --json`` prints it: the fields of
    ``list --json`` and the rest of the envelope (greeting checks included).

    ``transcript``: add ``"transcript"``, the session's lines as
    :func:`transcript_json` gives them (None when none was recorded).
    """
    data = list_json(message)
    for key, value in message.envelope.to_json().items():
        data.setdefault(key, value)  # greeting_checks, violations, authres_forged, extra
    if transcript:
        data["transcript"] = transcript_json(message.envelope.extra.get(TRANSCRIPT))
    return data


def transcript_json(stored: Any) -> list[dict[str, Any]] | None:
    """A stored transcript (``[[t, dir, text], ...]``, or its JSON text) as the API
    shows it: ``[{"t": 0.012, "dir": "C", "text": "EHLO x"}, ...]``; None when
    there is none. Malformed items are left out."""
    if stored is None:
        return None
    if isinstance(stored, str):
        try:
            stored = json.loads(stored)
        except ValueError:
            return None
    if not isinstance(stored, list):
        return None
    return [
        {"t": item[0], "dir": item[1], "text": item[2]}
        for item in stored
        if isinstance(item, list)
        and len(item) == 3
        and isinstance(item[0], int | float)
        and item[1] in ("C", "S", "*")
        and isinstance(item[2], str)
    ]


def list_json(message: StoredMessage) -> dict[str, Any]:
    """A stored message as ``messages list --json`` prints it: :data:`LIST_FIELDS`."""
    env = message.envelope
    extra = env.extra
    verdict = extra.get("greeting_verdict")
    return {
        "id": env.queue_id,
        "received_at": env.received_at.isoformat(),
        "client_ip": env.client_ip,
        "client_port": env.client_port,
        "greeting": env.greeting,
        "greeting_name": env.greeting_name,
        "mail_from": env.mail_from,
        "mail_params": dict(env.mail_params),
        "rcpt_to": list(env.rcpt_to),
        "tls": dict(env.tls) if env.tls else None,
        "protocol": env.protocol,
        "server_name": env.server_name,
        "auth": extra.get("auth"),
        "greeting_verdict": json.loads(verdict) if isinstance(verdict, str) else verdict,
        "size": message.size,
        "size_received": message.size_received,
        "subject": message.subject,
    }


log = logging.getLogger(__name__)

# Modes of what the stores create: messages are other people's mail.
FILE_MODE = 0o600
DIR_MODE = 0o700
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Data folders this process has already warned about (a forked worker inherits it).
_warned: set[Path] = set()


def create_private(path: Path) -> int:
    """Create the file ``path`` (it must not exist) mode 0600; a descriptor open for writing."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, FILE_MODE)


def private_dir(path: Path) -> None:
    """Make sure the folder ``path`` exists; one this call creates is mode 0700.

    Its parent must exist. A folder that exists already keeps its mode.
    """
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    os.chmod(path, DIR_MODE)  # the umask may have taken bits off


def ensure_data_dir(path: Path) -> None:
    """Create the data folder (mode 0700, missing parents as usual), or check its mode.

    An existing folder is not changed: an operator may have opened it to a
    group on purpose (a mail reader). If group or others may enter it, one
    warning is logged per process; the files in it are private anyway.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        private_dir(path)
        return
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    mode = path.stat().st_mode & 0o777
    key = path.resolve()
    if mode & 0o077 and key not in _warned:
        _warned.add(key)
        log.warning(
            "data folder %s has mode %04o: group or others may enter it (ehlo's own"
            " files are 0600; chmod 700 it unless that is what you want)",
            path,
            mode,
            extra={"event": "data_dir_mode", "path": str(path), "mode": f"{mode:04o}"},
        )


def check_writable(folder: Path) -> None:
    """Create, write, fsync and remove a file in ``folder``; StoreError saying why not.

    Run by ``Store.start`` on every folder a store writes to: a read-only or
    full filesystem, or a folder owned by another user, stops the server at
    start instead of turning every message into a 451.
    """
    probe = folder / f".ehlo-probe.{os.getpid()}.{secrets.token_hex(4)}"
    created = False
    try:
        fd = create_private(probe)
        created = True
        try:
            os.write(fd, b"ehlo\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(probe)
        raise StoreError(f"cannot write in {folder}: {exc.strerror or exc}") from None


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory (a file just created or renamed) durable."""
    if os.name == "nt":  # pragma: no cover - directories cannot be opened there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The header section is scanned for the Subject up to this many octets.
HEADER_SCAN_LIMIT = 64 * 1024

_LINE_END = re.compile(rb"\r?\n")


class HeaderSniffer:
    """Keeps the start of a message until its header section is complete.

    Fed with every ``write``; costs one length check per call once the blank
    line ending the header section (or :data:`HEADER_SCAN_LIMIT`) is reached.
    """

    __slots__ = ("_head", "done")

    def __init__(self) -> None:
        self._head = bytearray()
        self.done = False

    def feed(self, data: bytes) -> None:
        """Look at the next bytes of the message."""
        if self.done:
            return
        head = self._head
        start = max(0, len(head) - 3)
        head += data[: HEADER_SCAN_LIMIT - len(head)]
        if head[:1] == b"\n" or head[:2] == b"\r\n":
            self.done = True  # no header section at all
            return
        end = head.find(b"\n\n", start)
        end_crlf = head.find(b"\n\r\n", start)
        if end_crlf >= 0 and (end < 0 or end_crlf < end):
            end = end_crlf
        if end >= 0:
            del head[end + 1 :]
            self.done = True
        elif len(head) >= HEADER_SCAN_LIMIT:
            self.done = True

    @property
    def head(self) -> bytes:
        """The header section seen so far (up to the line ending the last field)."""
        return bytes(self._head)

    def subject(self) -> str | None:
        """The decoded Subject seen so far, or None."""
        return extract_subject(bytes(self._head))


def extract_subject(head: bytes) -> str | None:
    """The first Subject field of a header section, RFC 2047 words decoded.

    ``head`` is the start of a message (anything after the first blank line
    is ignored). Never raises: undecodable text comes back as it was sent.
    """
    value: list[bytes] | None = None
    for line in _LINE_END.split(head):
        if not line:
            break  # blank line: end of the header section
        if value is not None:
            if line[:1] in (b" ", b"\t"):
                value.append(line)  # folded continuation (RFC 5322 section 2.2.3)
                continue
            break
        if line[:8].lower() == b"subject:":
            value = [line[8:]]
    if value is None:
        return None
    raw = b"".join(value)
    try:
        text = raw.decode("utf-8")  # RFC 6532 allows UTF-8 in header fields
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "replace")
    text = text.strip()
    if "=?" not in text:
        return text  # no RFC 2047 encoded word to decode
    try:
        return _decode_words(text)
    except Exception:  # bad charsets, bad base64, anything: show what was sent
        return text


def _decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words with :mod:`email.header`."""
    parts = email.header.decode_header(text)
    out: list[str] = []
    for part, charset in parts:
        if isinstance(part, str):
            out.append(part)
        elif charset is None:
            # decode_header gives unencoded text back as raw-unicode-escape bytes.
            out.append(part.decode("raw-unicode-escape"))
        else:
            out.append(part.decode(charset, "replace"))
    return "".join(out)


class MessageWriter(abc.ABC):
    """One message on its way into a store."""

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Append bytes to the message. Must not fsync; may raise StoreError."""

    @abc.abstractmethod
    async def commit(self) -> str:
        """Make the message durable and visible; return its id (the queue id).

        When this returns the message and its envelope survive a crash or a
        power loss. Raises StoreError when that cannot be promised.
        """

    @abc.abstractmethod
    def abort(self) -> None:
        """Forget the message. Safe to call at any time, more than once."""

    @property
    def size(self) -> int | None:
        """Octets written so far: the stored size, ehlo's headers included (None: not counted)."""
        return None

    def start_commit(self) -> asyncio.Future[str]:
        """Begin :meth:`commit` now; a future of its outcome.

        The server calls this instead of awaiting ``commit()``. The default
        runs ``commit()`` as a task; a store that can queue its commit at
        once returns its own future (no task, and no turn of the event loop
        before the commit leaves). May raise StoreError like ``commit``.
        """
        return asyncio.ensure_future(self.commit())


class Store(abc.ABC):
    """A message store: written by sessions, read by the CLI (and later the API)."""

    name: str = "store"

    @property
    def backlog_bytes(self) -> int:
        """Message bytes accepted by ``write`` but not yet handed to the disk.

        The network layer may stop reading from clients while this is above
        its high-water mark (a few tens of MiB) and resume once it drops, so
        a slow disk slows senders down instead of filling memory.
        """
        return 0

    def drained(self, low: int) -> asyncio.Future[None]:
        """A future done once ``backlog_bytes`` is at most ``low`` (at once if it is)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open files, start writer threads. Called once before ``begin``."""

    def preflight(self) -> None:  # noqa: B027 - optional hook
        """Check, without starting anything, the folders ``start`` will write to.

        Raises StoreError naming one that is not writable. ``ehlo serve
        --workers`` calls it before forking, so that such a folder is one
        error line rather than one per worker; ``start`` checks again.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Finish pending commits and release resources."""

    @abc.abstractmethod
    def begin(self, envelope: Envelope) -> MessageWriter:
        """Start a message. The envelope may still be completed before commit."""

    # --- the session log ---------------------------------------------------------------

    def log_session(self, record: dict[str, Any], keep: int = SESSION_LOG_MAX) -> None:  # noqa: B027
        """Keep one ended session's record (fire and forget, never blocking).

        ``record`` is JSON-ready and has at least ``id``, ``started_at``,
        ``ended_at`` (ISO text) and ``client_ip``. The store keeps the
        newest ``keep`` records; writing happens off the event loop, with
        the store's other writes. This default keeps nothing.
        """

    def sessions(self, limit: int = 50, before: str | None = None) -> list[dict[str, Any]]:
        """Logged sessions, newest first: at most ``limit``, older than the one
        whose id is ``before``. Raises StoreError for a ``before`` it does not hold."""
        if before is not None:
            raise StoreError(f"no session with id {before!r}")
        return []

    @property
    def queue(self) -> Queue | None:
        """The outbound queue this store keeps (None: it cannot queue mail)."""
        return None

    def add_listener(self, callback: Callable[[str], None]) -> None:  # noqa: B027
        """Call ``callback(topic)`` in the running loop when another process may
        have changed the store: ``"messages"`` (stored or deleted), ``"queue"`` or ``"users"``.

        A hint to look again sooner, nothing more: a listener still polls,
        since a hint can be lost. This default never calls (the store's
        readers poll). Call it from the loop, after ``start``.
        """

    @abc.abstractmethod
    def list(self, limit: int | None = None) -> Sequence[StoredMessage]:
        """Committed messages, newest first. Synchronous: used by the CLI."""

    def search(self, query: Query) -> Iterator[StoredMessage]:
        """The messages ``query`` selects, newest first, one at a time.

        This default filters :meth:`list`; the backends stream instead.
        """
        yield from page(list(self.list()), query)

    def overview(self, since: _dt.datetime) -> Overview:
        """What was received at or after ``since``, counted (see :class:`Overview`).

        This default counts the messages ``search`` selects; SQLite counts in SQL.
        """
        return overview_of(self.search(Query(since=since)), since)

    def delete(self, ids: Iterable[str]) -> Sequence[str]:
        """Delete messages for good (their bodies too); the ids that were there."""
        raise StoreError(f"the {self.name} store cannot delete messages")

    def delete_matching(self, query: Query) -> int:
        """Delete what ``query`` selects, oldest first, in batches; how many."""
        deleted = 0
        while True:
            ids = [m.envelope.queue_id for m in self.search(dataclasses.replace(query, limit=None))]
            if not ids:
                return deleted
            gone = self.delete(ids[-DELETE_BATCH:])
            if not gone:
                return deleted
            deleted += len(gone)

    def prune(self, retention: Retention, limit: int = DELETE_BATCH) -> int:
        """Delete at most ``limit`` messages beyond ``retention`` (oldest first); how many."""
        return 0

    # --- retention while serving ------------------------------------------------------

    retention: Retention | None = None
    _retention_task: asyncio.Task[None] | None = None
    _retention_stop: asyncio.Event | None = None

    def _start_retention(self) -> None:
        """Called by ``start``: prune in the background while the store is open."""
        retention = self.retention
        if retention is None or not retention.active or self._retention_task is not None:
            return
        self._retention_stop = asyncio.Event()
        self._retention_task = asyncio.get_running_loop().create_task(
            self._retain(retention, self._retention_stop), name=f"ehlo-retention-{self.name}"
        )

    async def _retain(self, retention: Retention, stop: asyncio.Event) -> None:
        """Prune a batch at a time, in a thread (sessions keep running), then wait a while."""
        while not stop.is_set():
            try:
                while not stop.is_set():
                    if await asyncio.to_thread(self.prune, retention) < DELETE_BATCH:
                        break
            except Exception as exc:  # retention must never take the server down
                log.warning(
                    "retention: %s", exc, extra={"event": "retention_failed", "error": str(exc)}
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETENTION_INTERVAL)

    async def _stop_retention(self) -> None:
        """Called by ``close``: let the batch under way finish, then stop."""
        task, self._retention_task = self._retention_task, None
        if task is None:
            return
        if self._retention_stop is not None:
            self._retention_stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def newer(self, mark: object | None) -> tuple[Sequence[StoredMessage], object]:
        """What was committed since ``mark``, oldest first, and the mark of now.

        The cheap question of "what is new" that a reader asks over and over
        (the web API's live events), whichever process wrote the messages.
        ``mark`` is opaque: None (the first call) answers no message, only
        the mark to ask with next; a mark made by another store counts as
        None. This default compares the ids :meth:`list` gives with those
        of the mark; the backends answer from an index or a folder listing.
        """
        messages = self.list()
        ids = frozenset(m.envelope.queue_id for m in messages)
        if not isinstance(mark, frozenset):
            return [], ids
        return [m for m in reversed(messages) if m.envelope.queue_id not in mark], ids

    def newer_ids(self, mark: object | None) -> tuple[Sequence[str], object]:
        """:meth:`newer`'s ids only, with the same marks: what a reader asks
        while nobody waits for the messages themselves (it reads them later,
        by id, if someone comes to ask). This default reads them all."""
        messages, mark = self.newer(mark)
        return [m.envelope.queue_id for m in messages], mark

    def count(self) -> int:
        """How many messages the store holds."""
        return len(self.list())

    @abc.abstractmethod
    def get(self, queue_id: str) -> StoredMessage | None:
        """One committed message's envelope and size, or None."""

    @abc.abstractmethod
    def raw(self, queue_id: str) -> bytes | None:
        """The stored bytes of one message (Received header first), or None."""

    def read(self, queue_id: str) -> tuple[StoredMessage, bytes] | None:
        """One message's envelope and bytes at once (what delivery reads), or None."""
        stored = self.get(queue_id)
        if stored is None:
            return None
        data = self.raw(queue_id)
        return None if data is None else (stored, data)


def page_bounds(ids: Sequence[str], query: Query) -> tuple[int, int]:
    """The slice of ``ids`` (newest first) between ``query.before`` and ``query.after``.

    Raises :class:`StoreError` for a bound that names no message.
    """
    start, end = 0, len(ids)
    for bound, after in ((query.before, False), (query.after, True)):
        if bound is None:
            continue
        try:
            where = ids.index(bound)
        except ValueError:
            raise NoSuchMessage(f"no message with id {bound!r}") from None
        if after:
            end = min(end, where)
        else:
            start = max(start, where + 1)
    return start, end


def page(items: Sequence[StoredMessage], query: Query) -> Iterator[StoredMessage]:
    """Apply a query's filters, paging and limit to messages already newest first."""
    start, end = 0, len(items)
    if query.before or query.after:
        start, end = page_bounds([item.envelope.queue_id for item in items], query)
    chosen = items[start:end]
    picked = (item for item in chosen if query.matches(item))
    if query.limit is None:
        yield from picked
        return
    if query.after is not None and query.before is None:
        # The page just newer than ``after``: the oldest of those, newest first.
        tail = list(picked)
        yield from tail[max(len(tail) - query.limit, 0) :]
        return
    for count, item in enumerate(picked):
        if count >= query.limit:
            return
        yield item
