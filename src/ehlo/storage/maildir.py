"""The Maildir message store.

This module owns one Maildir folder (``data_dir/maildir``): its ``tmp/``,
``new/`` and ``cur/`` subfolders, and the envelope sidecars in
``ehlo-envelopes/`` (one ``<queue_id>.json`` per message: ``Envelope.to_json()`` plus ``size``,
``subject`` and the message's ``file`` name). Its session log is
``ehlo-sessions.jsonl`` beside the Maildir, in the data folder
(:mod:`ehlo.storage._sessionlog`).

Delivery follows the Maildir protocol: a message is written to
``tmp/<time>.<queue_id>.<host>`` (buffered, from the event loop thread, no
fsync), and ``commit`` hands it to the committer thread, which takes every
commit queued at that moment and for the whole batch

1. fsyncs each message file and writes each sidecar (temp name, fsync,
   rename), several at once on a small fixed pool of threads,
2. fsyncs ``ehlo-envelopes/`` once, so every envelope is durable,
3. renames each message from ``tmp/`` into ``new/``,
4. fsyncs ``new/`` once, then resolves the waiting commits.

A message is visible only in ``new/`` or ``cur/``, and it gets there after its
envelope is on disk. ``stats.commits`` counts the batches (fsyncs of ``new/``),
``stats.messages`` the messages. Messages and sidecars are mode 0600, the
folders the store creates 0700; ``start`` checks that ``tmp/``, ``new/`` and
``ehlo-envelopes/`` are writable. Readers (an IMAP server) may move messages to
``cur/`` and add flags (``:2,S``); listing finds them there, and lists files
without a sidecar (delivered by someone else) with an envelope derived from
their name.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as _dt
import functools
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..ids import _ALPHABET, is_queue_id
from ._query import AttachmentSniffer, Query, Retention, body_text
from ._sessionlog import SessionFile
from .base import (
    DELETE_BATCH,
    HEADER_SCAN_LIMIT,
    SESSION_LOG_MAX,
    Envelope,
    HeaderSniffer,
    MessageWriter,
    Store,
    StoredMessage,
    StoreError,
    StoreStats,
    check_writable,
    create_private,
    extract_subject,
    fsync_dir,
    log,
    page_bounds,
    private_dir,
)
from .maildir_queue import QUEUE_FOLDER, MaildirQueue, entries_file, new_entries, write_file
from .queue import QueueEntry

__all__ = ["MaildirStore", "MaildirWriter"]

# Buffer of the open tmp/ file: the event loop issues one write() per this much.
_FILE_BUFFER = 256 * 1024
# Files left in tmp/ (and sidecars without a message) this old are removed at
# start: the Maildir convention of 36 hours, safe with other live writers.
_STALE_SECONDS = 36 * 3600
# Not a dot-folder: Maildir++ readers (Dovecot, Courier) take those for mailboxes.
# list(limit=N) opens the sidecars of the N newest names, and of any name up
# to this much older: a queue id is made a little before ``received_at``.
_LIST_SLACK_SECONDS = 15 * 60
# Threads fsyncing the files of one batch at once.
_FSYNC_THREADS = 8
_SIDECARS = "ehlo-envelopes"
# Separators between a Maildir file's unique name and its info (":2,S").
_INFO_SEPARATORS = (":", "!")


def _host_part() -> str:
    """This host's name as Maildir wants it: no "/" or ":" (nor ".")."""
    name = socket.gethostname() or "localhost"
    return name.replace("/", "\\057").replace(":", "\\072").replace(".", "\\056")


def _base_name(name: str) -> str:
    """A Maildir file name without its info part."""
    for sep in _INFO_SEPARATORS:
        name = name.split(sep, 1)[0]
    return name


@dataclass(slots=True)
class _Commit:
    writer: MaildirWriter
    sidecar: bytes
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[str]
    entries: list[QueueEntry]  # its outbound queue entries (none: nothing to hand on)


@dataclass(slots=True)
class _Stop:
    done: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)


class _Committer(threading.Thread):
    """Makes queued messages durable and visible, one batch at a time."""

    def __init__(self, store: MaildirStore) -> None:
        super().__init__(name=f"ehlo-maildir-{store.path.name}", daemon=True)
        self.store = store
        self.ops: queue.SimpleQueue[_Commit | _Stop] = queue.SimpleQueue()
        self.pool = concurrent.futures.ThreadPoolExecutor(
            _FSYNC_THREADS, thread_name_prefix="ehlo-maildir-fsync"
        )

    def run(self) -> None:
        while True:
            batch: list[_Commit] = []
            op = self.ops.get()
            while True:
                if isinstance(op, _Stop):
                    self._commit(batch)
                    self.pool.shutdown()
                    op.done.set_result(None)
                    return
                batch.append(op)
                try:
                    op = self.ops.get_nowait()
                except queue.Empty:
                    break
            self._commit(batch)

    def _commit(self, batch: list[_Commit]) -> None:
        if not batch:
            return
        queued = any(op.entries for op in batch)
        if not queued:
            _settle(batch, self._commit_batch(batch, queued))
            return
        queue = self.store.queue
        with contextlib.ExitStack() as held:
            try:
                # Shared with other committers; the cleanup at start waits for it.
                held.enter_context(queue.committing())
            except Exception as exc:
                for op in batch:
                    op.writer._discard()
                _settle(batch, {id(op): _error(op.writer.queue_id, exc) for op in batch})
                return
            outcomes = self._commit_batch(batch, queued)
        try:  # before the 250: the queue's readers see what it covers (files read again)
            queue.committed([op.writer.queue_id for op in batch if op.entries])
        except Exception as exc:  # the messages are durable: only readers may lag
            log.warning(
                "maildir queue: %s", exc, extra={"event": "queue_commit", "error": str(exc)}
            )
        _settle(batch, outcomes)

    def _commit_batch(self, batch: list[_Commit], queued: bool) -> dict[int, str | BaseException]:
        """Make a batch durable and visible; the outcome of each commit (by ``id``)."""
        store = self.store
        outcomes: dict[int, str | BaseException] = {}
        ready: list[_Commit] = []
        # File fsyncs run side by side: the filesystem journal merges them.
        failures = (
            self.pool.map(_make_durable, batch) if len(batch) > 1 else [_make_durable(batch[0])]
        )
        for op, failure in zip(batch, failures, strict=True):
            if failure is not None:
                outcomes[id(op)] = _error(op.writer.queue_id, failure)
                op.writer._discard()
            else:
                ready.append(op)
        try:
            if ready:
                fsync_dir(store.path / _SIDECARS)
                if queued:  # the entries are durable before their message is visible
                    fsync_dir(store.path / QUEUE_FOLDER)
            moved: list[_Commit] = []
            for op in ready:
                try:
                    op.writer._publish()
                except Exception as exc:
                    outcomes[id(op)] = _error(op.writer.queue_id, exc)
                    op.writer._discard()
                else:
                    moved.append(op)
            if moved:
                fsync_dir(store.path / "new")
                store.stats.commits += 1
                store.stats.messages += len(moved)
            for op in moved:
                outcomes[id(op)] = op.writer.queue_id
        except Exception as exc:
            # A folder fsync failed: published messages may be visible, but
            # durability cannot be promised, so the client is told to retry.
            for op in ready:
                outcomes.setdefault(id(op), _error(op.writer.queue_id, exc))
        return outcomes


def _settle(batch: list[_Commit], outcomes: dict[int, str | BaseException]) -> None:
    """Hand each commit of a batch its outcome, on its own event loop."""
    by_loop: dict[
        asyncio.AbstractEventLoop, list[tuple[asyncio.Future[str], str | BaseException]]
    ] = {}
    for op in batch:
        by_loop.setdefault(op.loop, []).append((op.future, outcomes[id(op)]))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # loop closed: nobody waits
            loop.call_soon_threadsafe(_resolve, items)


def _make_durable(op: _Commit) -> BaseException | None:
    try:
        op.writer._make_durable(op.sidecar, op.entries)
    except Exception as exc:
        return exc
    return None


def _error(queue_id: str, exc: BaseException) -> StoreError:
    error = StoreError(f"maildir: message {queue_id}: {exc}")
    error.__cause__ = exc
    return error


def _resolve(items: list[tuple[asyncio.Future[str], str | BaseException]]) -> None:
    """Runs on the event loop: settle the commit futures of one batch."""
    for future, outcome in items:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class MaildirWriter(MessageWriter):
    """One message being written into ``tmp/`` of a :class:`MaildirStore`."""

    def __init__(self, store: MaildirStore, envelope: Envelope) -> None:
        self._store = store
        self._envelope = envelope
        self.queue_id = envelope.queue_id
        self.name = f"{int(time.time())}.{envelope.queue_id}.{store.host}"
        self._tmp = store.path / "tmp" / self.name
        self._head = HeaderSniffer()
        self._attach = AttachmentSniffer()
        self._size = 0
        self._state = "open"  # "open", "committing", "done"
        try:
            fd = create_private(self._tmp)
        except OSError as exc:
            raise _error(self.queue_id, exc) from exc
        self._file: IO[bytes] = open(fd, "wb", buffering=_FILE_BUFFER)  # noqa: SIM115

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    def write(self, data: bytes) -> None:
        if self._state != "open":
            raise RuntimeError(f"message {self.queue_id} is no longer open")
        self._size += len(data)
        if not self._head.done:
            self._head.feed(data)
        self._attach.feed(data)
        try:
            self._file.write(data)
        except OSError as exc:
            raise _error(self.queue_id, exc) from exc

    async def commit(self) -> str:
        if self._state != "open":
            raise RuntimeError(f"message {self.queue_id} is no longer open")
        committer = self._store._committer
        if committer is None:
            raise StoreError(f"maildir store {self._store.path} is not open")
        record = self._envelope.to_json(transcript=True)
        record.update(
            size=self._size,
            subject=self._head.subject(),
            file=self.name,
            attachments=self._attach.found,
        )
        sidecar = json.dumps(record, ensure_ascii=False, default=str).encode()
        env = self._envelope
        entries = (
            new_entries(self.queue_id, env.queue, env.received_at.timestamp()) if env.queue else []
        )
        try:
            self._file.flush()
        except OSError as exc:
            self.abort()
            raise _error(self.queue_id, exc) from exc
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._state = "committing"
        committer.ops.put(_Commit(self, sidecar, loop, future, entries))
        try:
            return await future
        finally:
            self._state = "done"

    def _make_durable(self, sidecar: bytes, entries: list[QueueEntry]) -> None:
        """Committer thread: fsync the message, write and fsync its sidecar and entries."""
        try:
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        folder = self._store.path / _SIDECARS
        temp = folder / f".{self.queue_id}.json.tmp"
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()  # left by a commit of this id that failed half way
        with open(create_private(temp), "wb") as handle:
            handle.write(sidecar)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, folder / f"{self.queue_id}.json")
        if entries:
            queue_file = self._store.path / QUEUE_FOLDER / f"{self.queue_id}.json"
            write_file(queue_file, entries_file(entries))

    def _discard(self) -> None:
        """Committer thread: remove what a failed commit left behind."""
        with contextlib.suppress(OSError):
            self._file.close()
        store = self._store.path
        for path in (
            self._tmp,
            store / _SIDECARS / f"{self.queue_id}.json",
            store / QUEUE_FOLDER / f"{self.queue_id}.json",
        ):
            with contextlib.suppress(OSError):
                path.unlink()

    def _publish(self) -> None:
        """Committer thread: move the message from tmp/ into new/."""
        os.rename(self._tmp, self._store.path / "new" / self.name)

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "done"
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self._tmp.unlink()


class MaildirStore(Store):
    """Messages as files in a Maildir, envelopes as JSON sidecars beside them.

    ``MaildirStore(data_dir / "maildir")``; ``await start()`` before ``begin``;
    ``list``/``get``/``raw`` work without ``start``.
    """

    name = "maildir"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.host = _host_part()
        self.stats = StoreStats()
        self._committer: _Committer | None = None
        self._queue: MaildirQueue | None = None
        self._sessions = SessionFile(self.path.parent / "ehlo-sessions.jsonl")

    async def start(self) -> None:
        if self._committer is not None:
            return
        try:
            await asyncio.to_thread(self._prepare)
        except (OSError, StoreError) as exc:
            raise StoreError(f"maildir store {self.path}: {exc}") from exc
        committer = _Committer(self)
        committer.start()
        self._committer = committer
        self._sessions = SessionFile(self._sessions.path)  # a store started again logs again
        self._start_retention()

    def preflight(self) -> None:
        try:
            self._folders()
        except (OSError, StoreError) as exc:
            raise StoreError(f"maildir store {self.path}: {exc}") from exc

    def _folders(self) -> None:
        """Create the Maildir's folders (0700) and check those the store writes to."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        private_dir(self.path)
        for sub in ("tmp", "new", "cur", _SIDECARS):
            private_dir(self.path / sub)
        # Where messages and envelopes are written (cur/ is the readers').
        for sub in ("tmp", "new", _SIDECARS):
            check_writable(self.path / sub)
        # Then the outbound queue's (a Maildir made before it has none yet).
        private_dir(self.path / QUEUE_FOLDER)
        check_writable(self.path / QUEUE_FOLDER)

    def _prepare(self) -> None:
        self._folders()
        # Entries whose message never became visible (a crash between the two).
        self.queue.clean(lambda: {queue_id for queue_id, _ in self._files()})
        cutoff = time.time() - _STALE_SECONDS
        stale: list[Path] = []
        for folder in (self.path / "tmp", self.path / _SIDECARS):
            with os.scandir(folder) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        if entry.is_file() and entry.stat().st_mtime < cutoff:
                            stale.append(Path(entry.path))
        if not stale:
            return
        present = {queue_id for queue_id, _ in self._files()}
        for path in stale:
            if path.parent.name == _SIDECARS and path.name.removesuffix(".json") in present:
                continue  # the envelope of a message still there
            with contextlib.suppress(OSError):
                path.unlink()

    async def close(self) -> None:
        await self._stop_retention()
        await asyncio.to_thread(self._sessions.close)
        committer = self._committer
        if committer is None:
            return
        self._committer = None
        stop = _Stop()
        committer.ops.put(stop)
        await asyncio.wrap_future(stop.done)
        await asyncio.to_thread(committer.join)

    def log_session(self, record: dict[str, Any], keep: int = SESSION_LOG_MAX) -> None:
        if self._committer is not None:
            self._sessions.add(record, keep)

    def sessions(self, limit: int = 50, before: str | None = None) -> list[dict[str, Any]]:
        return self._sessions.sessions(limit, before)

    def begin(self, envelope: Envelope) -> MaildirWriter:
        if self._committer is None:
            raise StoreError(f"maildir store {self.path} is not open")
        if not is_queue_id(envelope.queue_id):
            raise StoreError(f"maildir: bad queue id {envelope.queue_id!r}")
        return MaildirWriter(self, envelope)

    @property
    def queue(self) -> MaildirQueue:
        """The outbound queue, in the Maildir's ``ehlo-queue/`` folder."""
        found = self._queue
        if found is None:
            found = self._queue = MaildirQueue(self.path / QUEUE_FOLDER)
        return found

    # --- reads ---------------------------------------------------------------

    def _files(self) -> Iterator[tuple[str, Path]]:
        """(id, path) of every message in new/ and cur/."""
        for sub in ("new", "cur"):
            try:
                entries = os.scandir(self.path / sub)
            except FileNotFoundError:
                continue
            with entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    yield _id_of(entry.name), Path(entry.path)

    def _sidecar(self, queue_id: str) -> dict[str, Any] | None:
        if not is_queue_id(queue_id):
            return None
        try:
            data = json.loads((self.path / _SIDECARS / f"{queue_id}.json").read_bytes())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _locate(self, queue_id: str, file: str | None = None) -> Path | None:
        if file and "/" not in file and not file.startswith("."):
            candidate = self.path / "new" / file
            if candidate.exists():
                return candidate
        for found_id, path in self._files():
            if found_id == queue_id:
                return path
        return None

    def _stored(self, queue_id: str, path: Path, record: dict[str, Any] | None) -> StoredMessage:
        if record is not None:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                envelope = Envelope.from_json(record)
                size = record.get("size")
                attachments = record.get("attachments")
                return StoredMessage(
                    envelope=envelope,
                    size=int(size) if size is not None else path.stat().st_size,
                    subject=record.get("subject"),
                    attachments=attachments if isinstance(attachments, bool) else None,
                )
        return self._from_file(queue_id, path)

    @staticmethod
    def _from_file(queue_id: str, path: Path) -> StoredMessage:
        """A message without a usable sidecar: what its name and bytes tell."""
        info = path.stat()
        stamp = path.name.split(".", 1)[0]
        when = int(stamp) if stamp.isdigit() else info.st_mtime
        try:
            with open(path, "rb") as handle:
                subject = extract_subject(handle.read(HEADER_SCAN_LIMIT))
        except OSError:
            subject = None
        envelope = Envelope(
            queue_id=queue_id,
            client_ip="",
            client_port=0,
            greeting="",
            greeting_name="",
            mail_from="",
            mail_params={},
            rcpt_to=[],
            received_at=_dt.datetime.fromtimestamp(when, _dt.UTC),
        )
        return StoredMessage(envelope=envelope, size=info.st_size, subject=subject)

    def list(self, limit: int | None = None) -> Sequence[StoredMessage]:
        files = sorted(self._files(), key=_file_time, reverse=True)
        if limit is not None and len(files) > limit:
            # Names tell the receipt time (queue ids lead with it) closely
            # enough to skip opening sidecars of clearly older messages.
            if limit <= 0:
                return []
            horizon = _file_time(files[limit - 1])[0] - _LIST_SLACK_SECONDS
            files = [item for item in files if _file_time(item)[0] >= horizon]
        found: list[StoredMessage] = []
        for queue_id, path in files:
            with contextlib.suppress(FileNotFoundError):  # moved or deleted meanwhile
                found.append(self._stored(queue_id, path, self._sidecar(queue_id)))
        found.sort(key=lambda m: (_utc(m.envelope.received_at), m.envelope.queue_id), reverse=True)
        return found if limit is None else found[: max(limit, 0)]

    def newer(self, mark: object | None) -> tuple[Sequence[StoredMessage], object]:
        """Messages in new/ or cur/ that the mark's listing did not hold (names only)."""
        files = dict(self._files())
        ids = frozenset(files)
        if not isinstance(mark, frozenset):
            return [], ids
        found = []
        for queue_id, path in sorted(
            ((i, p) for i, p in files.items() if i not in mark), key=_file_time
        ):
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                found.append(self._stored(queue_id, path, self._sidecar(queue_id)))
        return found, ids

    def search(self, query: Query) -> Iterator[StoredMessage]:
        """The selected messages, newest first by their names' time, read one at a time.

        Every envelope in range is opened and tested: slower than the SQLite
        store's index, but memory holds only the file names.
        """
        files = sorted(self._files(), key=_file_time, reverse=True)
        if query.before is not None or query.after is not None:
            start, end = page_bounds([queue_id for queue_id, _ in files], query)
            files = files[start:end]
            if query.after is not None and query.before is None and query.limit is not None:
                files.reverse()  # the page just newer than ``after``: scan upwards
                picked = list(self._scan(files, query, query.limit))
                yield from picked[::-1]
                return
        yield from self._scan(files, query, query.limit)

    def _scan(
        self, files: Sequence[tuple[str, Path]], query: Query, limit: int | None
    ) -> Iterator[StoredMessage]:
        count = 0
        for queue_id, path in files:
            if limit is not None and count >= limit:
                return
            try:
                message = self._stored(queue_id, path, self._sidecar(queue_id))
            except FileNotFoundError:  # moved or deleted meanwhile
                continue
            body = functools.partial(_body_text, path) if query.needs_body else None
            if query.matches(message, body):
                count += 1
                yield message

    def count(self) -> int:
        """How many messages the store holds (the files of new/ and cur/)."""
        return sum(1 for _ in self._files())

    def delete(self, ids: Iterable[str]) -> Sequence[str]:
        """Remove the message files and their envelopes; the ids that were there."""
        wanted = set(ids)
        if not wanted:
            return []
        gone: list[str] = []
        touched: set[Path] = set()
        for queue_id, path in list(self._files()):
            if queue_id not in wanted:
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreError(f"maildir: message {queue_id}: {exc}") from exc
            touched.add(path.parent)
            gone.append(queue_id)
            if is_queue_id(queue_id):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path / _SIDECARS / f"{queue_id}.json")
                    touched.add(self.path / _SIDECARS)
        for folder in touched:  # the removals are durable when this returns
            with contextlib.suppress(OSError):
                fsync_dir(folder)
        # A deleted message is not handed on; what was done stays in the history.
        # After the message: a crash between the two leaves entries that start drops.
        if gone:
            self.queue.drop_pending(gone)
        return gone

    def delete_matching(self, query: Query) -> int:
        ids = [m.envelope.queue_id for m in self.search(dataclasses.replace(query, limit=None))]
        return len(self.delete(ids))

    def prune(self, retention: Retention, limit: int = DELETE_BATCH) -> int:
        """Remove at most ``limit`` of the oldest messages beyond ``retention``.

        A message still in the outbound queue is kept until it is handed on.
        """
        if not retention.active:
            return 0
        files = sorted(self._files(), key=_file_time)  # oldest first, by name
        held = self.queue.pending(queue_id for queue_id, _ in files) if files else set()
        free = [item for item in files if item[0] not in held]
        doomed: list[str] = []
        if retention.keep_messages > 0:
            excess = len(files) - retention.keep_messages
            doomed = [queue_id for queue_id, _ in free[: max(excess, 0)]]
        if retention.keep_days > 0:
            cutoff = time.time() - retention.keep_days * 86400
            old = [item[0] for item in free if _file_time(item)[0] < cutoff]
            if len(old) > len(doomed):
                doomed = old
        return len(self.delete(doomed[:limit]))

    def get(self, queue_id: str) -> StoredMessage | None:
        record = self._sidecar(queue_id)
        path = self._locate(queue_id, record.get("file") if record else None)
        if path is None:
            return None
        try:
            return self._stored(queue_id, path, record)
        except FileNotFoundError:
            return None

    def raw(self, queue_id: str) -> bytes | None:
        record = self._sidecar(queue_id)
        path = self._locate(queue_id, record.get("file") if record else None)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"maildir: message {queue_id}: {exc}") from exc


def _body_text(path: Path) -> str:
    """The searchable text of the message in ``path`` ("" when it is gone)."""
    try:
        return body_text(path.read_bytes())
    except OSError:
        return ""


def _id_of(name: str) -> str:
    """The queue id in a Maildir file name, or the unique part for foreign files."""
    base = _base_name(name)
    parts = base.split(".", 2)
    if len(parts) >= 2 and is_queue_id(parts[1]):
        return parts[1]
    return base


def _file_time(item: tuple[str, Path]) -> tuple[float, str]:
    """Sort key, without opening the file: receipt time from the name."""
    queue_id, path = item
    if is_queue_id(queue_id):
        value = 0
        for char in queue_id:
            value = value << 5 | _ALPHABET.index(char)
        return ((value >> 32) / 1000, queue_id)  # ids lead with epoch milliseconds
    stamp = path.name.split(".", 1)[0]
    return (float(stamp) if stamp.isdigit() else 0.0, queue_id)


def _utc(moment: _dt.datetime) -> _dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=_dt.UTC)
