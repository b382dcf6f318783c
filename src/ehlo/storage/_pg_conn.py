"""The PostgreSQL store's connections: the URL, the driver, the pools, outages.

``check_database_url`` reads a libpq URL or key=value string without
importing the driver (``ehlo.config`` checks the key with it) and refuses a
password in it: libpq finds the password where it always does
(``PGPASSWORD``, ``~/.pgpass`` or ``PGPASSFILE``, a service file), never on
a command line that ``ps`` shows. ``Database`` owns what one process holds
open: a synchronous pool for the reads and the commands, and, once
``open_async`` ran in the server's loop, an asynchronous one for the
writer. A failed connection or statement becomes a :class:`StoreError` of
one line; ``Outage`` logs one line when the database goes away and one
when it is back, however many messages failed in between.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from .base import StoreError

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

log = logging.getLogger("ehlo.storage")

SCHEMES = ("postgresql", "postgres")
# Seconds a connection attempt may take, and a statement (libpq options):
# a commit that cannot finish in time is a 451, not a hung client.
CONNECT_TIMEOUT = 5
STATEMENT_TIMEOUT_MS = 30_000
# Seconds a caller waits for a pooled connection before giving up.
POOL_TIMEOUT = 10.0
# Seconds a pool keeps retrying one lost connection (1 s, then what is left)
# before it gives up until the next caller asks: its delays double with each
# attempt, so a longer chain would leave a node minutes behind a database
# that is back. A caller that finds no connection starts a new chain at once.
RECONNECT_TIMEOUT = 2.0


def is_database_url(text: str) -> bool:
    """Whether ``text`` names a PostgreSQL database (``--store postgresql://...``)."""
    return text.split("://", 1)[0].lower() in SCHEMES and "://" in text


def check_database_url(text: str) -> str:
    """``text`` stripped, when it is a PostgreSQL URL or conninfo without a password.

    Raises ValueError (one line) otherwise.
    """
    text = text.strip()
    if not text or not text.isprintable():
        raise ValueError("expected a PostgreSQL URL such as postgresql://ehlo@db.example/ehlo")
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme.lower() not in SCHEMES:
            raise ValueError(
                f"expected a postgresql:// URL, got scheme {parts.scheme!r}"
            )
        query = dict(parse_qsl(parts.query))
        if parts.password is not None or "password" in query:
            raise ValueError(
                "the URL holds a password: put it in ~/.pgpass, PGPASSFILE or PGPASSWORD instead"
            )
        return text
    pairs = [item.partition("=") for item in text.split()]
    if not all(sep and key for key, sep, _ in pairs):
        raise ValueError("expected a postgresql:// URL or key=value pairs (libpq conninfo)")
    if any(key == "password" for key, _, _ in pairs):
        raise ValueError(
            "the conninfo holds a password: put it in ~/.pgpass, PGPASSFILE or PGPASSWORD instead"
        )
    return text


def display_url(url: str) -> str:
    """The URL as logs and errors show it (it never holds a password)."""
    return url


def require_driver() -> None:
    """Import psycopg and its pool, or raise one StoreError line saying what to install."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise StoreError(
            f"the postgresql store needs psycopg 3 and psycopg-pool ({exc.name} is missing):"
            " pip install 'ehlo[postgresql]'"
        ) from None


def node_name() -> str:
    """This process's name in the database: host name and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def one_line(exc: BaseException) -> str:
    """A driver error as one line (libpq's messages span several)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class Outage:
    """One log line when the database becomes unreachable, one when it is back."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.since: float | None = None
        self.failures = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            log.error(
                "postgresql: the database is unreachable: %s", one_line(exc),
                extra={"event": "database_down", "error": one_line(exc)},
            )

    def ok(self) -> None:
        if self.since is None:
            return
        seconds = time.monotonic() - self.since
        log.warning(
            "postgresql: the database is back after %.1f s (%d operations failed)",
            seconds, self.failures,
            extra={"event": "database_up", "seconds": round(seconds, 1), "failed": self.failures},
        )
        self.since = None
        self.failures = 0


def quiet_pool_logs() -> None:
    """psycopg_pool logs every failed connection attempt as a warning: during an
    outage that is a line a second. :class:`Outage` logs it once instead."""
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    conn.commit()


class Database:
    """The connections of one process to the store's database.

    Synchronous callers (the reads, the CLI, the queue's operations run in
    threads) use :meth:`connection`; the pool opens at the first use and
    reconnects by itself after an outage.
    """

    def __init__(self, url: str, *, max_size: int = 4, application: str = "ehlo") -> None:
        self.url = check_database_url(url)
        self.max_size = max_size
        self.application = application
        self.outage = Outage(self.url)
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
        self._pid = os.getpid()

    def kwargs(self) -> dict[str, Any]:
        """Connection options besides the URL (libpq's own keywords)."""
        return {
            "connect_timeout": CONNECT_TIMEOUT,
            "application_name": self.application,
        }

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection[Any]:
        """One new connection outside the pool (migrations, LISTEN, the import)."""
        require_driver()
        import psycopg

        try:
            conn = psycopg.connect(self.url, autocommit=autocommit, **self.kwargs())
        except psycopg.Error as exc:
            raise StoreError(f"postgresql: {one_line(exc)}") from None
        return conn

    def _sync_pool(self) -> psycopg_pool.ConnectionPool[Any]:
        if self._pool is not None and self._pid != os.getpid():
            self._pool = None  # inherited across a fork: never shared with the parent
        if self._pool is None:
            require_driver()
            import psycopg_pool

            self._pid = os.getpid()
            quiet_pool_logs()
            self._pool = psycopg_pool.ConnectionPool(
                self.url,
                kwargs=self.kwargs(),
                min_size=0,
                max_size=self.max_size,
                timeout=POOL_TIMEOUT,
                configure=_configure,
                check=psycopg_pool.ConnectionPool.check_connection,
                reconnect_timeout=RECONNECT_TIMEOUT,
                open=True,
                name="ehlo-sync",
            )
        return self._pool

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in a transaction (committed when the block ends).

        Any driver or pool error becomes a one-line :class:`StoreError`.
        """
        require_driver()
        import psycopg
        import psycopg_pool

        try:
            with self._sync_pool().connection() as conn:
                yield conn
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            self.outage.failed(exc) if _unreachable(exc) else None
            raise StoreError(f"postgresql: {one_line(exc)}") from None
        else:
            self.outage.ok()

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                pool.close(timeout=5)


def _unreachable(exc: BaseException) -> bool:
    """Whether an error means the database is away (not a bad statement)."""
    import psycopg
    import psycopg_pool

    return isinstance(exc, (psycopg.OperationalError, psycopg_pool.PoolTimeout))
