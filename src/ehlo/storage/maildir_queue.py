"""The outbound queue of the Maildir store: one JSON file per queued message.

This module owns the queue folder ``ehlo-queue/`` inside the Maildir, beside
``ehlo-envelopes/``. It is inside the Maildir, not beside it, so that it sits
on the same filesystem as ``new/`` (the order of the fsyncs below means
something only there) and travels with the Maildir when it is copied; it is
not a dot-folder, which Maildir++ readers (Dovecot, Courier) would take for a
mailbox. In it:

- ``<queue_id>.json``: the message's entries and its attempts,
  ``{"entries": [...], "attempts": [...]}`` (the fields of
  :class:`~ehlo.storage.queue.QueueEntry` and :class:`~ehlo.storage.queue.Attempt`);
- ``.lock``: the lock every process takes (``fcntl.flock``) around each
  read-modify-write (exclusive) and each read (shared); its first 8 bytes
  count the changes made to the folder (see below);
- ``.<queue_id>.json.tmp``: a file being written (removed at start).

The store's committer writes a message's entries file (temporary name,
fsync, rename), fsyncs this folder, and only then moves the message into
``new/``: a message is never visible without its entries. It holds the lock
shared from the first entries file of a batch until the batch is in
``new/``, so that the exclusive holder at ``MaildirStore.start`` sees no
commit in flight: there, the pending entries of a message that is in neither
``new/`` nor ``cur/`` (a crash between the two renames, or during a delete)
are dropped, as :meth:`MaildirQueue.drop_pending` does for a deleted message,
and a file left with nothing is removed. Once the batch is in ``new/``, and
before its 250, the committer bumps the change counter (below), so every
reader sees the entries the reply covers. Every update rewrites the files
it changes the same way (temporary file, fsync, rename) and fsyncs the
folder once before returning. Attempts live in their message's file, so
that ``record`` changes entries and attempts at once, as one transaction
does in the SQLite store; the price is that each update of a message
rewrites its transcripts too (kept until ``expire_history``).

Costs. Each process keeps an index in memory: per message, its creation
time, the earliest due time of its queued or deferred entries, its entries
per state, and the file's identity (inode, mtime, size), about 300 bytes a
message. It is built at first use by reading every file (one open and one
JSON parse per queued message), and kept current by this process's own
writes. Other processes (``ehlo queue``, other workers) change the folder
too; a folder's mtime cannot tell (it moves on a coarse clock, a few
milliseconds, and this process's own writes move it as well), so every
writer bumps the change counter in ``.lock`` while it holds the lock
exclusively. A reader reads those 8 bytes; when they differ from the count
its own writes left, it lists the folder, stats each file, and re-reads only
the files whose identity changed. ``due``, ``next_due``, ``counts``,
``pending`` and ``finished_messages`` then answer from the index (``due``
reads the files of the messages it returns); every update reads and
rewrites only the files it changes. ``entries`` orders messages by the index
when this process has one; otherwise (``ehlo queue list``) it lists the
folder, ordering by each file's mtime, which the writer sets to the
message's ``created``, and reads files only until its page is full.
``expire_history`` reads every file; the cleanup at start lists ``new/``
and ``cur/`` when the folder holds entries files, and reads the orphans.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..ids import is_queue_id
from .base import FILE_MODE, StoreError, create_private, fsync_dir, log
from .queue import FINAL, PENDING, Attempt, EntryUpdate, Queue, QueueEntry, QueueItem

if sys.platform != "win32":
    import fcntl

__all__ = ["QUEUE_FOLDER", "MaildirQueue"]

# The queue folder's name inside the Maildir.
QUEUE_FOLDER = "ehlo-queue"
_LOCK = ".lock"
_SUFFIX = ".json"
_COUNTER = 8  # bytes of the change counter at the start of the lock file
_WAITING = ("queued", "deferred")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# How far a file's mtime (its message's ``created``) may be from the value in it.
_CLOCK = 0.001


@dataclass(slots=True)
class _Indexed:
    """What the index knows of one message's entries file."""

    created: float
    due: float | None  # earliest next_attempt of its queued/deferred entries
    states: dict[str, int]
    identity: tuple[int, int, int] = (0, 0, 0)  # inode, mtime_ns, size


@dataclass(slots=True)
class _Record:
    """One message's entries file, read for a change."""

    entries: list[QueueEntry]
    attempts: list[Attempt] = field(default_factory=list)


def _entry_json(entry: QueueEntry) -> dict[str, Any]:
    return dataclasses.asdict(entry)


def _entry_from(data: dict[str, Any]) -> QueueEntry:
    reply = data.get("last_reply")
    return QueueEntry(
        queue_id=str(data["queue_id"]),
        recipient=str(data["recipient"]),
        next_hop=str(data["next_hop"]),
        state=str(data["state"]),
        attempts=int(data["attempts"]),
        next_attempt=float(data["next_attempt"]),
        created=float(data["created"]),
        notify=data.get("notify"),
        orcpt=data.get("orcpt"),
        last_reply=reply if isinstance(reply, dict) else None,
        updated=float(data.get("updated", 0.0)),
        delay_notified=bool(data.get("delay_notified", False)),
        request=data.get("request"),
    )


def _attempt_json(attempt: Attempt) -> dict[str, Any]:
    return dataclasses.asdict(attempt)


def _attempt_from(data: dict[str, Any]) -> Attempt:
    results = data.get("results")
    return Attempt(
        queue_id=str(data["queue_id"]),
        at=float(data["at"]),
        next_hop=str(data["next_hop"]),
        host=str(data["host"]),
        results=results if isinstance(results, dict) else {},
        transcript=str(data.get("transcript", "")),
    )


def new_entries(queue_id: str, items: Sequence[QueueItem], now: float) -> list[QueueEntry]:
    """The entries of a message being committed (one per recipient, the first kept)."""
    found: dict[str, QueueEntry] = {}
    for item in items:
        if item.recipient not in found:
            found[item.recipient] = QueueEntry(
                queue_id=queue_id,
                recipient=item.recipient,
                next_hop=item.next_hop,
                state="queued",
                attempts=0,
                next_attempt=now,
                created=now,
                notify=item.notify,
                orcpt=item.orcpt,
                updated=now,
            )
    return list(found.values())


def _summary(entries: Sequence[QueueEntry]) -> _Indexed:
    states: dict[str, int] = {}
    for entry in entries:
        states[entry.state] = states.get(entry.state, 0) + 1
    waiting = [e.next_attempt for e in entries if e.state in _WAITING]
    created = min((e.created for e in entries), default=0.0)
    return _Indexed(created, min(waiting) if waiting else None, states)


def _identity(info: os.stat_result) -> tuple[int, int, int]:
    return (info.st_ino, info.st_mtime_ns, info.st_size)


class MaildirQueue(Queue):
    """The queue in a Maildir's ``ehlo-queue/`` folder (see the module docstring).

    Safe to use from several threads (one operation at a time) and several
    processes (the lock file).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._mutex = threading.RLock()
        self._index: dict[str, _Indexed] | None = None
        self._seen = -1  # the change counter the index reflects

    # --- files and locks ----------------------------------------------------------

    def _file(self, queue_id: str) -> Path:
        return self.path / f"{queue_id}{_SUFFIX}"

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[int | None]:
        """The lock file's descriptor, flocked; None when the folder does not exist."""
        try:
            try:
                fd = os.open(self.path / _LOCK, os.O_RDWR | _O_CLOEXEC)
            except FileNotFoundError:  # made by the store's start; by the first user else
                fd = os.open(self.path / _LOCK, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, FILE_MODE)
                _keep_owner(self.path, fd)
        except FileNotFoundError:
            yield None
            return
        except OSError as exc:
            raise StoreError(f"maildir queue {self.path}: {exc}") from exc
        try:
            if sys.platform != "win32":  # pragma: no branch - one process there
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _counter(fd: int) -> int:
        data = os.pread(fd, _COUNTER, 0)
        return int.from_bytes(data, "big") if len(data) == _COUNTER else 0

    def _bump(self, fd: int, changed: dict[str, _Record | None], fresh: bool) -> None:
        """Count a change (exclusive lock held); keep the index current if it was.

        ``changed``: the records just written (None: the file is gone).
        """
        count = self._counter(fd) + 1
        os.pwrite(fd, count.to_bytes(_COUNTER, "big"), 0)
        index = self._index
        if not fresh or index is None:
            self._seen = -1  # rescanned at the next use (unchanged files are not re-read)
            return
        for queue_id, record in changed.items():
            try:
                info = os.stat(self._file(queue_id))
            except FileNotFoundError:
                record = None
            if record is None or not record.entries:
                index.pop(queue_id, None)
                continue
            summary = _summary(record.entries)
            summary.identity = _identity(info)
            index[queue_id] = summary
        self._seen = count

    def _refresh(self, fd: int) -> bool:
        """Bring the index up to date (a lock held); whether it was already."""
        count = self._counter(fd)
        if self._index is not None and count == self._seen:
            return True
        old = self._index or {}
        index: dict[str, _Indexed] = {}
        with os.scandir(self.path) as found:
            for item in found:
                name = item.name
                if name.startswith(".") or not name.endswith(_SUFFIX):
                    continue
                queue_id = name[: -len(_SUFFIX)]
                try:
                    identity = _identity(item.stat())
                except FileNotFoundError:
                    continue
                known = old.get(queue_id)
                if known is not None and known.identity == identity:
                    index[queue_id] = known
                    continue
                record = self._load(Path(item.path))
                if record is None or not record.entries:
                    continue
                summary = _summary(record.entries)
                summary.identity = identity
                index[queue_id] = summary
        self._index = index
        self._seen = count
        return False

    @staticmethod
    def _load(path: Path) -> _Record | None:
        """A message's entries file (None: gone, or unreadable: logged and left alone)."""
        try:
            data = json.loads(path.read_bytes())
            return _Record(
                [_entry_from(e) for e in data.get("entries", ())],
                [_attempt_from(a) for a in data.get("attempts", ())],
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning(
                "maildir queue: %s: unreadable, skipped (%s)",
                path,
                exc,
                extra={"event": "queue_file_unreadable", "path": str(path), "error": str(exc)},
            )
            return None

    def _store(self, queue_id: str, record: _Record) -> None:
        """Write a message's entries file atomically (its folder is fsynced by the caller)."""
        path = self._file(queue_id)
        if not record.entries and not record.attempts:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        write_file(
            path,
            {
                "entries": [_entry_json(e) for e in record.entries],
                "attempts": [_attempt_json(a) for a in record.attempts],
            },
        )

    @contextlib.contextmanager
    def _reading(self) -> Iterator[dict[str, _Indexed] | None]:
        """The current index, under the shared lock (None: no queue folder)."""
        with self._mutex, self._locked(exclusive=False) as fd:
            if fd is None:
                yield None
                return
            try:
                self._refresh(fd)
            except OSError as exc:
                raise StoreError(f"maildir queue {self.path}: {exc}") from exc
            assert self._index is not None
            yield self._index

    def _change(
        self,
        pick: Callable[[dict[str, _Indexed]], Iterable[str]],
        edit: Callable[[str, _Record], int],
        *,
        create: bool = False,
    ) -> int:
        """Read-modify-write the files of the messages ``pick`` names, under the lock."""
        with self._mutex, self._locked(exclusive=True) as fd:
            if fd is None:
                return 0
            return self._change_locked(fd, pick, edit, create=create)

    def _change_locked(
        self,
        fd: int,
        pick: Callable[[dict[str, _Indexed]], Iterable[str]],
        edit: Callable[[str, _Record], int],
        *,
        create: bool = False,
    ) -> int:
        """:meth:`_change` with the lock held exclusively.

        ``edit`` changes one message's record in place and says how many
        entries it changed; records it leaves as they were are not rewritten.
        """
        changed: dict[str, _Record | None] = {}
        try:
            self._refresh(fd)  # under the exclusive lock: current from here
            assert self._index is not None
            total = 0
            try:
                for queue_id in list(dict.fromkeys(pick(self._index))):
                    if not is_queue_id(queue_id):
                        continue
                    record = self._load(self._file(queue_id))
                    if record is None:
                        if not create:
                            continue
                        record = _Record([])
                    before = (len(record.entries), len(record.attempts))
                    count = edit(queue_id, record)
                    if count or before != (len(record.entries), len(record.attempts)):
                        self._store(queue_id, record)
                        changed[queue_id] = record
                    total += count
                if changed:
                    fsync_dir(self.path)  # the renames are durable when this returns
            finally:
                if changed:  # even after a failure part way: readers must look again
                    self._bump(fd, changed, fresh=True)
            return total
        except OSError as exc:
            raise StoreError(f"maildir queue {self.path}: {exc}") from exc

    # --- the committer --------------------------------------------------------------

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        """Held by the store's committer while a batch with entries becomes durable."""
        with self._locked(exclusive=False):
            yield

    def committed(self, ids: Iterable[str]) -> None:
        """These messages are visible with their entries: tell the readers.

        Their files are read again here: once visible, they may have changed.
        """
        with self._mutex, self._locked(exclusive=True) as fd:
            if fd is None:
                return
            try:
                fresh = self._index is not None and self._counter(fd) == self._seen
                changed = {queue_id: self._load(self._file(queue_id)) for queue_id in ids}
                self._bump(fd, changed, fresh)
            except OSError as exc:
                raise StoreError(f"maildir queue {self.path}: {exc}") from exc

    def clean(self, visible: Callable[[], set[str]]) -> int:
        """At start: drop the pending entries of messages that are not visible; how many.

        Holds the lock exclusively throughout, so no commit is in flight;
        ``visible`` lists the ids in ``new/`` and ``cur/`` (called only when
        there are entries files). Temporary files are removed too.
        """
        with self._mutex, self._locked(exclusive=True) as fd:
            if fd is None:
                return 0
            try:
                names = os.listdir(self.path)
                for name in names:
                    if name.startswith(".") and name.endswith(".tmp"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.path / name)
            except OSError as exc:
                raise StoreError(f"maildir queue {self.path}: {exc}") from exc
            ids = [n[: -len(_SUFFIX)] for n in names if n.endswith(_SUFFIX) and n[0] != "."]
            if not ids:
                return 0
            present = visible()
            orphans = [queue_id for queue_id in ids if queue_id not in present]
            if not orphans:
                return 0
            return self._change_locked(fd, lambda index: orphans, _drop_pending)

    def drop_pending(self, ids: Iterable[str]) -> int:
        """Remove the entries of messages that are gone, but their history; how many."""
        wanted = list(ids)
        return self._change(lambda index: wanted, _drop_pending) if wanted else 0

    # --- the scheduler ------------------------------------------------------------

    def due(self, now: float, limit: int) -> list[QueueEntry]:
        if limit <= 0:
            return []
        with self._reading() as index:
            if index is None:
                return []
            ready = [(s.due, queue_id) for queue_id, s in index.items() if s.due is not None]
            ready = sorted(item for item in ready if item[0] <= now)
            found: list[QueueEntry] = []
            for due, queue_id in ready:
                if len(found) >= limit and due > found[limit - 1].next_attempt:
                    break  # no later message has an entry due earlier
                record = self._load(self._file(queue_id))
                if record is None:
                    continue
                found.extend(
                    e for e in record.entries if e.state in _WAITING and e.next_attempt <= now
                )
                found.sort(key=lambda e: e.next_attempt)
            return found[:limit]

    def next_due(self) -> float | None:
        with self._reading() as index:
            if index is None:
                return None
            return min((s.due for s in index.values() if s.due is not None), default=None)

    def claim(self, entries: Sequence[QueueEntry]) -> None:
        keys = {entry.key for entry in entries}
        if not keys:
            return

        def edit(queue_id: str, record: _Record) -> int:
            count = 0
            for entry in record.entries:
                if entry.key in keys and entry.state in _WAITING:
                    entry.state = "delivering"
                    count += 1
            return count

        self._change(lambda index: [key[0] for key in keys], edit)

    def record(self, updates: Sequence[EntryUpdate], attempts: Sequence[Attempt] = ()) -> None:
        if not updates and not attempts:
            return
        now = time.time()
        by_id: dict[str, list[EntryUpdate]] = {}
        for update in updates:
            by_id.setdefault(update.queue_id, []).append(update)
        tried: dict[str, list[Attempt]] = {}
        for attempt in attempts:
            tried.setdefault(attempt.queue_id, []).append(attempt)

        def edit(queue_id: str, record: _Record) -> int:
            count = 0
            mine = {entry.recipient: entry for entry in record.entries}
            for u in by_id.get(queue_id, ()):
                entry = mine.get(u.recipient)
                if entry is None:
                    continue
                entry.state = u.state
                entry.next_attempt = u.next_attempt
                if u.last_reply is not None:
                    entry.last_reply = u.last_reply
                entry.attempts += 1 if u.attempted else 0
                entry.updated = now
                if u.delay_notified is not None:
                    entry.delay_notified = u.delay_notified
                if u.state in FINAL or entry.request == "retry":
                    entry.request = None
                count += 1
            record.attempts.extend(tried.get(queue_id, ()))
            return count

        self._change(lambda index: [*by_id, *tried], edit, create=True)

    def set_next_hop(self, queue_id: str, recipient: str, next_hop: str) -> None:
        """Send one entry elsewhere (a ``delivery`` hook's decision)."""

        def edit(_queue_id: str, record: _Record) -> int:
            count = 0
            for entry in record.entries:
                if entry.recipient == recipient and entry.next_hop != next_hop:
                    entry.next_hop = next_hop
                    count += 1
            return count

        self._change(lambda index: [queue_id], edit)

    def recover(self) -> int:
        def edit(_queue_id: str, record: _Record) -> int:
            count = 0
            for entry in record.entries:
                if entry.state == "delivering":
                    entry.state = "queued"
                    count += 1
            return count

        return self._change(
            lambda index: [q for q, s in index.items() if s.states.get("delivering")], edit
        )

    # --- the command line -----------------------------------------------------------

    def entries(
        self,
        *,
        queue_ids: Sequence[str] | None = None,
        state: str | None = None,
        recipient: str | None = None,
        limit: int | None = None,
        before: str | None = None,
    ) -> list[QueueEntry]:
        if queue_ids is not None and not queue_ids:
            return []
        if limit is not None and limit <= 0:
            return []
        with self._mutex:
            if self._index is None:  # not built in this process (``ehlo queue``): by names
                return self._entries_by_name(queue_ids, state, recipient, limit, before)
            with self._reading() as index:
                if index is None:
                    return self._entries_by_name(queue_ids, state, recipient, limit, before)
                ids = list(index) if queue_ids is None else [q for q in queue_ids if q in index]
                if state is not None:
                    ids = [q for q in ids if index[q].states.get(state)]
                order = sorted(set(ids), key=lambda q: (index[q].created, q), reverse=True)
                if before is not None:
                    mark = index.get(before)
                    if mark is None:
                        raise StoreError(f"no queued message with id {before!r}")
                    order = [q for q in order if (index[q].created, q) < (mark.created, before)]
                found: list[QueueEntry] = []
                for queue_id in order:
                    if limit is not None and len(found) >= limit:
                        break
                    record = self._load(self._file(queue_id))
                    if record is not None:
                        found.extend(_matching(record, state, recipient))
                return found if limit is None else found[:limit]

    def _entries_by_name(
        self,
        queue_ids: Sequence[str] | None,
        state: str | None,
        recipient: str | None,
        limit: int | None,
        before: str | None,
    ) -> list[QueueEntry]:
        """:meth:`entries` without the index: files read newest first, until the page is full.

        A file's mtime is its message's ``created`` (set when it is written),
        so the first page costs one listing of the folder with a stat per
        file and reading about the page's files; a page ``before`` a message
        reads the files newer than it as well. A file copied without its
        times (a newer mtime) is read sooner than needed, never missed; only
        an mtime set back by hand can keep a message off the page it belongs
        on (the scheduler's ``due`` and the updates do not use mtimes).
        """
        with self._locked(exclusive=False) as fd:
            if fd is None:
                if before is not None:
                    raise StoreError(f"no queued message with id {before!r}")
                return []
            mark: tuple[float, str] | None = None
            if before is not None:
                record = self._load(self._file(before)) if is_queue_id(before) else None
                if record is None or not record.entries:
                    raise StoreError(f"no queued message with id {before!r}")
                mark = (min(e.created for e in record.entries), before)
            pages: list[tuple[tuple[float, str], list[QueueEntry]]] = []
            count = 0
            for stamp, queue_id in self._by_time(queue_ids):
                if limit is not None and count >= limit:
                    pages.sort(key=lambda page: page[0], reverse=True)
                    if stamp < _last_key(pages, limit)[0] - _CLOCK:
                        break  # every file from here on is older than the page
                record = self._load(self._file(queue_id))
                if record is None or not record.entries:
                    continue
                key = (min(e.created for e in record.entries), queue_id)
                if mark is not None and key >= mark:
                    continue
                chosen = _matching(record, state, recipient)
                if chosen:
                    pages.append((key, chosen))
                    count += len(chosen)
        pages.sort(key=lambda page: page[0], reverse=True)
        found = [entry for _, chosen in pages for entry in chosen]
        return found if limit is None else found[:limit]

    def _by_time(self, queue_ids: Sequence[str] | None) -> list[tuple[float, str]]:
        """(mtime, queue id) of the entries files (of ``queue_ids``), newest first."""
        found: list[tuple[float, str]] = []
        if queue_ids is not None:
            for queue_id in set(queue_ids):
                if is_queue_id(queue_id):
                    with contextlib.suppress(FileNotFoundError):
                        found.append((os.stat(self._file(queue_id)).st_mtime_ns / 1e9, queue_id))
        else:
            with os.scandir(self.path) as listing:
                for item in listing:
                    queue_id = item.name[: -len(_SUFFIX)]
                    if item.name.endswith(_SUFFIX) and is_queue_id(queue_id):
                        with contextlib.suppress(FileNotFoundError):
                            found.append((item.stat().st_mtime_ns / 1e9, queue_id))
        found.sort(reverse=True)
        return found

    def attempts(self, queue_id: str) -> list[Attempt]:
        if not is_queue_id(queue_id):
            return []
        with self._mutex, self._locked(exclusive=False) as fd:
            if fd is None:
                return []
            record = self._load(self._file(queue_id))
        if record is None:
            return []
        return sorted(record.attempts, key=lambda a: a.at)  # stable: kept order on ties

    def _states(
        self,
        ids: Sequence[str] | None,
        states: tuple[str, ...],
        change: Callable[[QueueEntry], None] | None,
    ) -> int:
        """Apply ``change`` to the entries in ``states`` (None: delete them); how many."""
        if ids is not None and not ids:
            return 0

        def pick(index: dict[str, _Indexed]) -> list[str]:
            chosen = list(index) if ids is None else [q for q in ids if q in index]
            return [q for q in chosen if any(index[q].states.get(s) for s in states)]

        def edit(_queue_id: str, record: _Record) -> int:
            hit = [e for e in record.entries if e.state in states]
            if change is None:
                record.entries = [e for e in record.entries if e.state not in states]
            else:
                for entry in hit:
                    change(entry)
            return len(hit)

        return self._change(pick, edit)

    def retry(self, ids: Sequence[str] | None, now: float) -> int:
        def change(entry: QueueEntry) -> None:
            entry.next_attempt = now
            if entry.request != "bounce":
                entry.request = "retry"  # even a next hop marked down

        return self._states(ids, _WAITING, change)

    def hold(self, ids: Sequence[str]) -> int:
        def change(entry: QueueEntry) -> None:
            entry.state = "held"

        return self._states(ids, _WAITING, change)

    def release(self, ids: Sequence[str], now: float) -> int:
        def change(entry: QueueEntry) -> None:
            entry.state, entry.next_attempt = "queued", now

        return self._states(ids, ("held",), change)

    def remove(self, ids: Sequence[str]) -> int:
        return self._states(ids, tuple(s for s in (*PENDING, *FINAL) if s != "delivering"), None)

    def request_bounce(self, ids: Sequence[str], now: float) -> int:
        def change(entry: QueueEntry) -> None:
            entry.request, entry.state, entry.next_attempt = "bounce", "queued", now

        return self._states(ids, ("queued", "deferred", "held"), change)

    # --- the store and housekeeping ------------------------------------------------

    def pending(self, ids: Iterable[str]) -> set[str]:
        wanted = set(ids)
        if not wanted:
            return set()
        with self._reading() as index:
            if index is None:
                return set()
            return {
                q for q in wanted if q in index and any(index[q].states.get(s) for s in PENDING)
            }

    def finished_messages(self, ids: Iterable[str]) -> list[str]:
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return []
        with self._reading() as index:
            if index is None:
                return []
            return [
                q for q in wanted if q in index and not any(index[q].states.get(s) for s in PENDING)
            ]

    def counts(self) -> dict[str, int]:
        with self._reading() as index:
            if index is None:
                return {}
            total: dict[str, int] = {}
            for summary in index.values():
                for state, count in summary.states.items():
                    total[state] = total.get(state, 0) + count
            return total

    def expire_history(self, before: float) -> int:
        def pick(_index: dict[str, _Indexed]) -> list[str]:
            return [
                n[: -len(_SUFFIX)]
                for n in os.listdir(self.path)
                if n.endswith(_SUFFIX) and not n.startswith(".")
            ]

        def edit(_queue_id: str, record: _Record) -> int:
            kept = [e for e in record.entries if not (e.state in FINAL and e.updated < before)]
            gone = len(record.entries) - len(kept)
            record.entries = kept
            if not any(e.state in PENDING for e in kept):
                record.attempts = [a for a in record.attempts if a.at >= before]
            return gone

        return self._change(pick, edit)


def _matching(record: _Record, state: str | None, recipient: str | None) -> list[QueueEntry]:
    """A message's entries that pass the filters of :meth:`MaildirQueue.entries`, by recipient."""
    needle = recipient.lower() if recipient is not None else None
    return [
        e
        for e in sorted(record.entries, key=lambda e: e.recipient)
        if (state is None or e.state == state) and (needle is None or needle in e.recipient.lower())
    ]


def _last_key(
    pages: list[tuple[tuple[float, str], list[QueueEntry]]], limit: int
) -> tuple[float, str]:
    """The key of the message holding the ``limit``-th entry of sorted ``pages``."""
    count = 0
    for key, chosen in pages:
        count += len(chosen)
        if count >= limit:
            return key
    return pages[-1][0]


def _drop_pending(_queue_id: str, record: _Record) -> int:
    """Keep only the finished entries (the history) of a message that is gone."""
    kept = [e for e in record.entries if e.state in FINAL]
    gone = len(record.entries) - len(kept)
    record.entries = kept
    return gone


def _keep_owner(folder: Path, fd: int) -> None:
    """A file root makes (``ehlo queue`` run as root) belongs to the folder's owner, the server."""
    if sys.platform == "win32" or os.geteuid() != 0:
        return
    info = os.stat(folder)
    if info.st_uid != 0:
        os.fchown(fd, info.st_uid, info.st_gid)


def write_file(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to ``path`` atomically: a temporary file, fsync, rename (not the folder)."""
    temp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()  # left by a write that failed half way
    with open(create_private(temp), "wb") as handle:
        _keep_owner(path.parent, handle.fileno())
        handle.write(json.dumps(data, ensure_ascii=False).encode())
        handle.flush()
        entries = data.get("entries")
        if entries:  # the mtime is the message's arrival: listings sort by it unread
            stamp = int(min(entry["created"] for entry in entries) * 1e9)
            os.utime(handle.fileno(), ns=(stamp, stamp))
        os.fsync(handle.fileno())
    os.replace(temp, path)


def entries_file(entries: Sequence[QueueEntry]) -> dict[str, Any]:
    """The contents of a new message's entries file."""
    return {"entries": [_entry_json(e) for e in entries], "attempts": []}
