"""The PostgreSQL store's write path: bodies, group commit, the session log.

This module owns :class:`PostgresWriter` (one message being received) and
:class:`Committer` (the one task per store that writes to the database,
on its own asynchronous pool).

Bodies. ``write`` runs in the event loop and never waits for the network:
a body of at most :data:`CHUNK_SIZE` octets (most mail) is kept in memory
and becomes one ``chunks`` row in the commit's transaction. A larger body
goes on to a private temporary file in the node's spool folder as it
arrives (an unnamed file, ``O_TMPFILE``: a crash leaves nothing behind);
at commit a staging task copies it into ``chunks`` rows of at most
:data:`CHUNK_SIZE` octets (``COPY ... FORMAT BINARY``, one row in memory
at a time) under a ``staged`` row, in a transaction of its own, and only
then hands the message to the committer, whose transaction inserts the
message row and deletes the ``staged`` row. So neither this node nor
PostgreSQL ever holds a large body whole, and a large message does not
lengthen the transaction that the small messages finishing with it share.
Why a file and not chunk rows streamed to the database while the body
arrives: ``write`` cannot wait, so streaming ahead means either a
transaction (and a pooled connection) held open for as long as a slow
client sends, or one commit per chunk, and in both cases rows to delete
for every message aborted half way; the backlog that the network layer
watches is the store's, so one large body held up by the database would
pause every session's DATA. The file costs the copy at commit instead.
Measured on this project's test machine (2 cores, busy), ``ehlo serve``
taking three 10 MiB messages: the process's peak RSS did not move (56.3 MiB
before and after; SQLite's node 45.1 MiB), the 250 came 0.6 to 0.9 s after
the final dot (PostgreSQL alone took about 0.3 s to ``COPY`` and commit
10 MiB of chunk rows; the SQLite store answered in 0.11 to 0.15 s), and
in-process the traced peak was 1.2 MiB for a 3 MiB and a 10 MiB message
alike. Staged rows of a node that died between its
staging and its commit are removed by housekeeping (:func:`drop_orphans`).

Group commit. The messages handed over in one turn of the event loop are
written in ONE transaction: their message rows, chunk rows and queue rows
(``executemany``), the deletion of their ``staged`` rows, one ``NOTIFY``
on ``ehlo_messages`` (and one on ``ehlo_queue`` when a queue row was
added), then ``COMMIT``; each message's future is resolved with its queue
id only after ``COMMIT`` returned (the session sends its 250 then).
``synchronous_commit`` is the database's own. A batch a statement refuses
(an id already stored, a value the database rejects) is written again
with one savepoint per message, so that only that message fails; a batch
the database cannot take at all (it is down) fails every message of it
with a :class:`StoreError` (451 4.3.0), and the next batch starts afresh.

Faults. The pool reconnects by itself and checks each connection before
lending it (a connection broken by a restart is replaced, never used);
a commit waits at most :data:`COMMIT_TIMEOUT` seconds for a connection,
and :data:`OUTAGE_TIMEOUT` while the database is known to be away.
``Outage`` (shared with the synchronous pool) logs one line when it goes
and one when it is back.

The session log. Ended sessions are inserted with the next transaction
(alone when no message is waiting); the table is trimmed to the newest
``keep`` rows every :data:`TRIM_EVERY` sessions, not at each insert.
While the database is away, ended sessions are not kept (a message's
commit never waits behind them).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ._pg_conn import (
    CONNECT_TIMEOUT,
    RECONNECT_TIMEOUT,
    STATEMENT_TIMEOUT_MS,
    Database,
    one_line,
    quiet_pool_logs,
)
from ._pg_rows import INSERT_MESSAGE, message_values
from ._pg_schema import CHANNEL_MESSAGES, CHANNEL_QUEUE, CHUNK_SIZE
from ._spool import SpoolingWriter
from .base import Envelope, StoreError, StoreStats, StoreUnavailable

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

__all__ = ["COMMIT_TIMEOUT", "Committer", "PostgresWriter", "drop_orphans"]

# Seconds a commit waits for a pooled connection before it fails (451),
# and while the database is known to be away (an outage under way).
COMMIT_TIMEOUT = 3.0
OUTAGE_TIMEOUT = 2.0
# The writer's pool: one connection for the committer, the others for staging.
POOL_MIN = 1
# Seconds a writer's connection may idle before it is checked again.
IDLE_CHECK = 1.0
POOL_MAX = 4
# Large bodies copied into the database at once (each on its own connection).
STAGING_MAX = 2
# One transaction takes at most this many messages (and sessions).
BATCH_MAX_OPS = 1000
# The session log is trimmed after this many inserts by this node.
TRIM_EVERY = 100
# Staged rows older than this are a dead node's: housekeeping removes them.
ORPHAN_AGE_SECONDS = 3600

_QUEUE_COLUMNS = (
    "queue_id, recipient, next_hop, state, attempts, next_attempt, created, notify, orcpt,"
    " last_reply, updated, delay_notified, request"
)
INSERT_QUEUE = f"INSERT INTO queue ({_QUEUE_COLUMNS}) VALUES ({', '.join(['%s'] * 13)})"
INSERT_CHUNK = "INSERT INTO chunks (queue_id, seq, data) VALUES (%s, %s, %s)"
INSERT_SESSION = (
    "INSERT INTO sessions (id, node, started_at, ended_at, client_ip, record)"
    " VALUES (%s, %s, %s, %s, %s, %s)"
)
_TRIM_SESSIONS = (
    "DELETE FROM sessions WHERE seq <= (SELECT seq FROM sessions ORDER BY seq DESC"
    " OFFSET %s LIMIT 1)"
)


def _text(value: str | None) -> str | None:
    """Text PostgreSQL can keep: it refuses NUL in ``text`` (a header may hold one)."""
    return value.replace("\x00", "\ufffd") if value and "\x00" in value else value


def _queue_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``QueueItem.row`` for PostgreSQL's columns (``delay_notified`` is a boolean)."""
    return (*row[:11], bool(row[11]), row[12])


@dataclasses.dataclass(slots=True, eq=False)
class _Message:
    """A whole message on its way to the database."""

    queue_id: str
    values: tuple[Any, ...]  # the messages row (_pg_rows.MESSAGE_COLUMNS)
    body: bytes | bytearray | None  # a body of one chunk, or
    spool: IO[bytes] | None  # a larger body, in an unnamed file
    size: int  # body octets (what the backlog counts)
    queued: list[tuple[Any, ...]]  # its queue rows
    future: asyncio.Future[str]
    staged: bool = False  # its chunks are in the database already, under a staged row


class PostgresWriter(SpoolingWriter):
    """One message being streamed into a PostgreSQL store."""

    __slots__ = ("_committer", "_file", "_spool_dir")

    def __init__(self, committer: Committer, envelope: Envelope, spool_dir: Path | None) -> None:
        super().__init__(envelope)
        self._committer = committer
        self._spool_dir = spool_dir
        self._file: IO[bytes] | None = None  # the body file (the committer reads it)

    def _open_spool(self) -> int:
        """An unnamed file in the spool folder: a crash leaves nothing behind."""
        # Closed by abort, or by the committer once the body is in the database.
        self._file = tempfile.TemporaryFile(dir=self._spool_dir, buffering=0)  # noqa: SIM115
        return self._file.fileno()

    async def commit(self) -> str:
        return await self.start_commit()

    def start_commit(self) -> asyncio.Future[str]:
        if self._state != "open":
            raise RuntimeError(f"message {self._envelope.queue_id} is no longer open")
        committer = self._committer
        committer.check_open()
        env = self._envelope
        body: bytearray | None = None
        if self._file is not None:
            try:
                self._flush()
            except StoreError:
                self.abort()
                raise
        elif self._buffer:
            body, self._buffer = self._buffer, bytearray()
        subject = _text(self._head.subject())
        attachments = self._attachments(body)
        chunks = -(-self._size // CHUNK_SIZE)
        try:
            values = message_values(
                env,
                size=self._size,
                subject=subject,
                attachments=attachments,
                chunks=chunks,
                node=committer.node,
            )
        except (TypeError, ValueError) as exc:
            self.abort()
            raise StoreError(f"message {env.queue_id}: {exc}") from exc
        queued_at = env.received_at.timestamp()
        spool, self._file, self._fd = self._file, None, None
        self._state = "done"
        # From here the committer owns the body (and closes its file).
        return committer.put(
            _Message(
                queue_id=env.queue_id,
                values=tuple(_text(v) if isinstance(v, str) else v for v in values),
                body=body,
                spool=spool,
                size=self._size,
                queued=[_queue_row(item.row(env.queue_id, queued_at)) for item in env.queue],
                future=asyncio.get_running_loop().create_future(),
            )
        )

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "done"
        self._buffer = bytearray()
        file, self._file, self._fd = self._file, None, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")


class Committer:
    """The one task of a store that writes messages and sessions to the database."""

    def __init__(self, db: Database, node: str, stats: StoreStats) -> None:
        self.db = db
        self.node = node
        self.stats = stats
        self._pool: psycopg_pool.AsyncConnectionPool[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._pending: list[_Message] = []
        self._sessions: list[tuple[Any, ...]] = []
        self._keep = 0
        self._logged = 0  # sessions inserted since the last trim
        self._staging: set[asyncio.Task[None]] = set()
        self._stage_slots = asyncio.Semaphore(STAGING_MAX)
        self._closing = False
        self._used = 0.0  # when a batch last took a connection (monotonic)
        # Body octets handed over and not yet committed (or failed).
        self.backlog = 0
        self._drain_waiters: list[tuple[int, asyncio.Future[None]]] = []

    # --- life cycle ------------------------------------------------------------------

    async def open(self) -> None:
        """Open the pool in the running loop and start the committer task."""
        import psycopg
        import psycopg_pool

        quiet_pool_logs()
        pool: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
            self.db.url,
            kwargs={**self.db.kwargs(), "autocommit": True},
            min_size=POOL_MIN,
            max_size=POOL_MAX,
            timeout=COMMIT_TIMEOUT,
            configure=_configure,
            check=self._check,
            reconnect_timeout=RECONNECT_TIMEOUT,
            open=False,
            name="ehlo-writer",
        )
        try:
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT + 1)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            await pool.close(timeout=1)
            raise StoreError(f"postgresql: {one_line(exc)}") from None
        self._pool = pool
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="ehlo-postgresql-committer"
        )

    async def _check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Check a pooled connection before a batch, when it may be stale: after
        an outage, or idle for a while (a round trip saved per busy batch)."""
        import psycopg_pool

        now = time.monotonic()
        if self.db.outage.down or now - self._used > IDLE_CHECK:
            await psycopg_pool.AsyncConnectionPool.check_connection(conn)
        self._used = now

    def check_open(self) -> None:
        if self._pool is None or self._closing:
            raise StoreError("postgresql store is not open")

    async def close(self) -> None:
        """Write everything handed over, then close the pool."""
        self._closing = True
        if self._staging:
            await asyncio.gather(*self._staging, return_exceptions=True)
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=5)
        self._settle_drained()

    # --- handing over ----------------------------------------------------------------

    def put(self, message: _Message) -> asyncio.Future[str]:
        self.backlog += message.size
        if message.spool is not None:
            task = asyncio.get_running_loop().create_task(self._stage(message))
            self._staging.add(task)
            task.add_done_callback(self._staging.discard)
        else:
            self._pending.append(message)
            self._wake.set()
        return message.future

    def log(self, row: tuple[Any, ...], keep: int) -> None:
        if self._pool is None or self._closing or self.db.outage.down:
            return  # during an outage the session log waits for nobody: dropped
        self._sessions.append(row)
        self._keep = keep
        self._wake.set()

    def drained(self, low: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.backlog <= low or self._pool is None:
            future.set_result(None)
        else:
            self._drain_waiters.append((low, future))
        return future

    def _release(self, messages: list[_Message]) -> None:
        self.backlog -= sum(m.size for m in messages)
        self._settle_drained()

    def _settle_drained(self) -> None:
        if not self._drain_waiters:
            return
        closed = self._pool is None
        ready = [w for w in self._drain_waiters if closed or self.backlog <= w[0]]
        self._drain_waiters = [w for w in self._drain_waiters if w not in ready]
        for _, future in ready:
            if not future.done():
                future.set_result(None)

    def _timeout(self) -> float:
        return OUTAGE_TIMEOUT if self.db.outage.down else COMMIT_TIMEOUT

    def _failed(self, exc: BaseException) -> StoreError:
        """The error a driver or pool failure gives its messages (the outage noted)."""
        import psycopg
        import psycopg_pool

        if isinstance(exc, (psycopg.OperationalError, psycopg_pool.PoolTimeout)):
            self.db.outage.failed(exc)
            return StoreUnavailable(f"postgresql: {one_line(exc)}")
        return StoreError(f"postgresql: {one_line(exc)}")

    # --- staging a large body ----------------------------------------------------------

    async def _stage(self, message: _Message) -> None:
        """Copy a spooled body into chunk rows under a staged row, then queue its commit."""
        import psycopg
        import psycopg_pool

        spool = message.spool
        assert spool is not None and self._pool is not None
        try:
            async with (
                self._stage_slots,
                self._pool.connection(timeout=self._timeout()) as conn,
                conn.transaction(),
            ):
                await conn.execute(
                    "INSERT INTO staged (queue_id, node) VALUES (%s, %s)",
                    (message.queue_id, self.node),
                )
                async with conn.cursor().copy(
                    "COPY chunks (queue_id, seq, data) FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(["text", "int4", "bytea"])
                    fd = spool.fileno()
                    for seq, offset in enumerate(range(0, message.size, CHUNK_SIZE)):
                        # One chunk in memory at a time, read back from the page cache.
                        data = os.pread(fd, CHUNK_SIZE, offset)
                        if len(data) != min(CHUNK_SIZE, message.size - offset):
                            raise OSError(f"body file ends at {offset + len(data)} octets")
                        await copy.write_row((message.queue_id, seq, data))
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            self._fail([message], self._failed(exc))
        except OSError as exc:
            self._fail([message], StoreError(f"message {message.queue_id}: body file: {exc}"))
        else:
            self.db.outage.ok()
            message.staged = True
            self._pending.append(message)
            self._wake.set()
        finally:
            with contextlib.suppress(OSError):
                spool.close()
            message.spool = None

    # --- the committer -----------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending or self._sessions:
                batch, self._pending = (
                    self._pending[:BATCH_MAX_OPS],
                    self._pending[BATCH_MAX_OPS:],
                )
                sessions, self._sessions = (
                    self._sessions[:BATCH_MAX_OPS],
                    self._sessions[BATCH_MAX_OPS:],
                )
                try:
                    await self._execute(batch, sessions)
                except Exception as exc:  # never let the committer die
                    self._fail(batch, StoreError(f"postgresql: {one_line(exc)}"))
            if self._closing and not self._staging:
                return

    def _fail(self, messages: list[_Message], error: StoreError) -> None:
        for message in messages:
            if not message.future.done():
                message.future.set_exception(error)
        self._release(messages)

    async def _execute(self, batch: list[_Message], sessions: list[tuple[Any, ...]]) -> None:
        """Write one batch in one transaction; settle its futures after ``COMMIT``."""
        import psycopg
        import psycopg_pool

        assert self._pool is not None
        outcomes: list[StoreError | None] | None = None
        try:
            async with self._pool.connection(timeout=self._timeout()) as conn:
                try:
                    await self._write(conn, batch, sessions)
                except psycopg.OperationalError:
                    raise
                except psycopg.Error:
                    if len(batch) <= 1:
                        raise
                    outcomes = await self._write_each(conn, batch, sessions)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            error = self._failed(exc)
            self._fail(batch, error)
            if not self.db.outage.down:
                await self._drop_staged([m for m in batch if m.staged])
            return
        self.db.outage.ok()
        if outcomes is None:
            outcomes = [None] * len(batch)
        if batch:
            self.stats.commits += 1
        refused = []
        for message, outcome in zip(batch, outcomes, strict=True):
            if outcome is not None:
                refused.append(message)
                if not message.future.done():
                    message.future.set_exception(outcome)
                continue
            self.stats.messages += 1
            if not message.future.done():
                message.future.set_result(message.queue_id)
        self._release(batch)
        if refused:
            await self._drop_staged([m for m in refused if m.staged])

    async def _write(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: list[_Message],
        sessions: list[tuple[Any, ...]],
    ) -> None:
        """The batch in one transaction: rows, chunks, queue, staged, notices, COMMIT."""
        async with conn.transaction(), conn.cursor() as cur:
            if len(batch) == 1:  # a lone message: no pipeline to enter and leave
                await self._write_one(cur, batch[0])
                await self._notify(cur, batch[0].queue_id, bool(batch[0].queued))
            elif batch:
                await cur.executemany(INSERT_MESSAGE, [m.values for m in batch])
                chunks = [(m.queue_id, 0, m.body) for m in batch if m.body is not None]
                if chunks:
                    await cur.executemany(INSERT_CHUNK, chunks)
                staged = [m.queue_id for m in batch if m.staged]
                if staged:
                    await cur.execute("DELETE FROM staged WHERE queue_id = ANY(%s)", (staged,))
                queued = [row for m in batch for row in m.queued]
                if queued:
                    await cur.executemany(INSERT_QUEUE, queued)
                await self._notify(cur, batch[-1].queue_id, bool(queued))
            await self._log_sessions(cur, sessions)

    async def _write_each(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: list[_Message],
        sessions: list[tuple[Any, ...]],
    ) -> list[StoreError | None]:
        """The batch again, one savepoint per message: only a refused message fails."""
        import psycopg

        outcomes: list[StoreError | None] = []
        stored: list[_Message] = []
        queued = False
        async with conn.transaction(), conn.cursor() as cur:
            for message in batch:
                try:
                    async with conn.transaction():
                        await self._write_one(cur, message)
                except psycopg.OperationalError:
                    raise
                except psycopg.Error as exc:
                    outcomes.append(StoreError(f"postgresql: {one_line(exc)}"))
                    continue
                outcomes.append(None)
                stored.append(message)
                queued = queued or bool(message.queued)
            if stored:
                await self._notify(cur, stored[-1].queue_id, queued)
            await self._log_sessions(cur, sessions)
        return outcomes

    @staticmethod
    async def _write_one(cur: psycopg.AsyncCursor[Any], message: _Message) -> None:
        await cur.execute(INSERT_MESSAGE, message.values)
        if message.body is not None:
            await cur.execute(INSERT_CHUNK, (message.queue_id, 0, message.body))
        if message.staged:
            await cur.execute("DELETE FROM staged WHERE queue_id = %s", (message.queue_id,))
        if message.queued:
            await cur.executemany(INSERT_QUEUE, message.queued)

    @staticmethod
    async def _notify(cur: psycopg.AsyncCursor[Any], last: str, queued: bool) -> None:
        """The hints for the other nodes, sent by PostgreSQL at COMMIT."""
        await cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL_MESSAGES, last))
        if queued:
            await cur.execute("SELECT pg_notify(%s, '')", (CHANNEL_QUEUE,))

    async def _log_sessions(
        self, cur: psycopg.AsyncCursor[Any], sessions: list[tuple[Any, ...]]
    ) -> None:
        if not sessions:
            return
        await cur.executemany(INSERT_SESSION, sessions)
        self._logged += len(sessions)
        if self._logged >= TRIM_EVERY:
            self._logged = 0
            await cur.execute(_TRIM_SESSIONS, (max(self._keep, 0),))

    async def _drop_staged(self, messages: list[_Message]) -> None:
        """Remove the chunks of messages staged but not stored (best effort)."""
        if not messages or self._pool is None:
            return
        ids = [m.queue_id for m in messages]
        with contextlib.suppress(Exception):
            async with (
                self._pool.connection(timeout=OUTAGE_TIMEOUT) as conn,
                conn.transaction(),
            ):
                await conn.execute(
                    "DELETE FROM chunks WHERE queue_id IN (SELECT queue_id FROM staged"
                    " WHERE queue_id = ANY(%s) AND node = %s)"
                    " AND queue_id NOT IN (SELECT queue_id FROM messages)",
                    (ids, self.node),
                )
                await conn.execute(
                    "DELETE FROM staged WHERE queue_id = ANY(%s) AND node = %s", (ids, self.node)
                )


def drop_orphans(conn: Any, age: float = ORPHAN_AGE_SECONDS) -> int:
    """Delete the staged bodies older than ``age`` seconds whose message never came; how many.

    A node that died between staging a body and committing its message
    left them; run by housekeeping on one node at a time.
    """
    found = conn.execute(
        "DELETE FROM staged WHERE started_at < now() - make_interval(secs => %s)"
        " RETURNING queue_id",
        (age,),
    ).fetchall()
    ids = [row[0] for row in found]
    if ids:
        conn.execute(
            "DELETE FROM chunks WHERE queue_id = ANY(%s)"
            " AND queue_id NOT IN (SELECT queue_id FROM messages)",
            (ids,),
        )
    return len(ids)
