"""The session log of a store without a database: one JSON-lines file.

This module owns :class:`SessionFile`, the session log of the Maildir store
(``ehlo-sessions.jsonl`` in the data folder, mode 0600): one JSON record per
ended session, oldest first. Records are handed over from the event loop
and appended by a thread of their own, a batch per write; the newest
``keep`` records are kept.

Several processes (``ehlo serve --workers``) append to one file. Each
append opens the file (``O_APPEND``: a write lands whole at the end) under
a shared ``flock`` of ``ehlo-sessions.lock``; a trim (when this process has
appended a quarter of ``keep`` since its last one) takes that lock
exclusively, writes the newest ``keep`` lines to a temporary file and
renames it over the log, so no append is lost to the replaced file.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._sqlite_db import HAVE_FLOCK
from .base import FILE_MODE, StoreError, log

if HAVE_FLOCK:
    import fcntl

__all__ = ["SessionFile"]

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


class SessionFile:
    """A capped JSON-lines session log (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_suffix(".lock")
        self._ops: queue.SimpleQueue[tuple[str, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._since_trim = 0

    # --- writing (a thread) ----------------------------------------------------------

    def add(self, record: dict[str, Any], keep: int) -> None:
        """Queue one record (from the event loop: no I/O here)."""
        if keep <= 0 or self._closed:
            return
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"ehlo-sessions-{self.path.name}", daemon=True
            )
            self._thread.start()
        self._ops.put((_encode(record), keep))

    def close(self) -> None:
        """Write what is queued, then stop the thread (blocking: call it in a thread)."""
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._ops.put(None)
        thread.join()

    def _run(self) -> None:
        while True:
            op = self._ops.get()
            lines: list[str] = []
            keep = 0
            stop = op is None
            while op is not None:
                lines.append(op[0])
                keep = op[1]
                try:
                    op = self._ops.get_nowait()
                except queue.Empty:
                    break
                stop = op is None
            if lines:
                try:
                    self._append(lines, keep)
                except OSError as exc:  # the log must never take the server down
                    log.warning(
                        "session log %s: %s",
                        self.path,
                        exc,
                        extra={"event": "session_log_failed", "error": str(exc)},
                    )
            if stop:
                return

    def _locked(self, exclusive: bool) -> contextlib.AbstractContextManager[None]:
        return _flock(self.lock_path, exclusive)

    def _append(self, lines: list[str], keep: int) -> None:
        data = ("\n".join(lines) + "\n").encode("utf-8")
        with self._locked(False):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        self._since_trim += len(lines)
        if self._since_trim >= max(keep // 4, 1):
            self._since_trim = 0
            self._trim(keep)

    def _trim(self, keep: int) -> None:
        with self._locked(True):
            try:
                with open(self.path, "rb") as handle:
                    lines = handle.read().splitlines(keepends=True)
            except FileNotFoundError:
                return
            if len(lines) <= keep:
                return
            temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            try:
                os.write(fd, b"".join(lines[-keep:]))
            finally:
                os.close(fd)
            os.replace(temp, self.path)

    # --- reading ---------------------------------------------------------------------

    def sessions(self, limit: int, before: str | None) -> list[dict[str, Any]]:
        """The newest ``limit`` records older than session ``before``, newest first."""
        try:
            with open(self.path, "rb") as handle:
                lines = handle.read().splitlines()
        except FileNotFoundError:
            lines = []
        except OSError as exc:
            raise StoreError(f"session log {self.path}: {exc}") from exc
        out: list[dict[str, Any]] = []
        found = before is None
        marker = None if before is None else _encode(before)
        for line in reversed(lines):
            if not found:
                # Cheap test first: only a line naming the id is parsed.
                if marker is not None and marker.encode() in line:
                    record = _parse(line)
                    found = record is not None and record.get("id") == before
                continue
            if len(out) >= limit:
                break
            record = _parse(line)
            if record is not None:
                out.append(record)
        if not found:
            raise StoreError(f"no session with id {before!r}")
        return out


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None  # a line cut short by a crash
    return record if isinstance(record, dict) else None


@contextlib.contextmanager
def _flock(path: Path, exclusive: bool) -> Iterator[None]:
    if not HAVE_FLOCK:  # pragma: no cover - Windows: one process writes
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)
