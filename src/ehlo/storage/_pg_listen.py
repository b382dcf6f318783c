"""The hints other nodes send with ``NOTIFY``, heard on one connection per process.

``Listener(url, callback)`` keeps one autocommit connection that has run
``LISTEN`` on the store's channels (``ehlo_messages``, ``ehlo_queue``,
``ehlo_users``) and calls ``callback(channel, payload)`` in the event loop
for each notice. A notice is a hint to look again, nothing more: one sent
while this connection was away is lost, so after every reconnection the
callback is called once per channel with an empty payload (look now), and
the listeners poll as well.

When the connection breaks (the database restarts, the backend is
terminated, a network path dies: a connection quiet for
:data:`HEALTH_INTERVAL` seconds is asked ``SELECT 1``), it is made again
with a growing delay, up to :data:`BACKOFF_MAX` seconds. Quietly: the
store's :class:`~ehlo.storage._pg_conn.Outage` logs outages once, from the
operations that fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._pg_conn import CONNECT_TIMEOUT, check_database_url, one_line, require_driver
from ._pg_schema import CHANNEL_MESSAGES, CHANNEL_QUEUE, CHANNEL_USERS
from .base import StoreError

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("ehlo.storage")

CHANNELS = (CHANNEL_MESSAGES, CHANNEL_QUEUE, CHANNEL_USERS)
# Seconds between reconnection attempts: the first, doubled up to the last.
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
# Seconds without a notice after which the connection is checked...
HEALTH_INTERVAL = 30.0
# ...and how long that check may take.
HEALTH_TIMEOUT = 10.0


class Listener:
    """``LISTEN`` on the store's channels; ``callback(channel, payload)`` per notice."""

    def __init__(
        self,
        url: str,
        callback: Callable[[str, str], None],
        *,
        channels: Sequence[str] = CHANNELS,
        application: str = "ehlo-listen",
    ) -> None:
        self.url = check_database_url(url)
        self.callback = callback
        self.channels = tuple(channels)
        self.application = application
        # Connections made, the first included (the tests and the metrics read it).
        self.connections = 0
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.closed

    async def start(self) -> None:
        """Connect and ``LISTEN`` (StoreError, one line, if the database cannot be
        reached now), then hear notices in a task until :meth:`close`."""
        if self._task is not None:
            return
        require_driver()
        import psycopg

        self._closing = False
        try:
            self._conn = await self._connect()
        except psycopg.Error as exc:
            raise StoreError(f"postgresql: listen: {one_line(exc)}") from None
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ehlo-pg-listen")

    async def close(self) -> None:
        """Stop hearing notices and close the connection."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._drop()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        import psycopg
        from psycopg import sql

        conn = await psycopg.AsyncConnection.connect(
            self.url,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
            application_name=self.application,
        )
        try:
            for channel in self.channels:
                # A channel is an identifier: quoted as one, never as a value.
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            await conn.close()
            raise
        self.connections += 1
        return conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _run(self) -> None:
        import psycopg

        delay = BACKOFF_MIN
        while not self._closing:
            conn = self._conn
            if conn is None:
                try:
                    conn = self._conn = await self._connect()
                except (psycopg.Error, OSError) as exc:
                    log.debug("postgresql: listen: %s", one_line(exc))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                delay = BACKOFF_MIN
                # Notices sent while away are lost: every channel is worth a look.
                for channel in self.channels:
                    self._call(channel, "")
            try:
                await self._hear(conn)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.debug("postgresql: listen: connection lost: %s", one_line(exc))
                await self._drop()

    async def _hear(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Pass on notices for a while, then check that the connection still answers."""
        async for notice in conn.notifies(timeout=HEALTH_INTERVAL):
            self._call(notice.channel, notice.payload)
        await asyncio.wait_for(conn.execute("SELECT 1"), HEALTH_TIMEOUT)

    def _call(self, channel: str, payload: str) -> None:
        try:
            self.callback(channel, payload)
        except Exception:  # a listener's bug must not end the notices
            log.exception("postgresql: listen: callback failed")
