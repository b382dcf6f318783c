"""The AUTH users in PostgreSQL: table ``users`` (name, Argon2id PHC string, updated).

:class:`PostgresUsers` is the table every node shares. It has what
``ehlo.auth``'s ``UserStore`` asks of a user table (``load``, ``put``,
``delete``) without this package importing ``ehlo.auth``: the PHC strings
are made and checked there, only stored here. Each change is one short
transaction that also sends ``NOTIFY ehlo_users`` (a hint for the other
nodes to read the table again). ``load`` first asks the database for a
fingerprint of the table (its row count and a sum of hashes of its rows)
and reads the rows only when that changed, so that a node can ask every
second at the cost of one small query.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ._pg_conn import Database
from ._pg_schema import CHANNEL_USERS
from .base import StoreError

__all__ = ["PostgresUsers"]

_NO_SCHEMA = (
    "postgresql: the database holds no ehlo schema yet (no table users):"
    " run `ehlo db migrate` or start a node on it first"
)
_FINGERPRINT = (
    "SELECT count(*), coalesce(sum(hashtextextended(name || ':' || phc, 0)), 0)::text FROM users"
)


class PostgresUsers:
    """The ``users`` table of one database (names and PHC strings)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._fingerprint: tuple[int, str] | None = None
        self._users: dict[str, str] = {}

    def __str__(self) -> str:
        return f"the users table of {self.db.url}"

    def __repr__(self) -> str:
        return f"PostgresUsers({self.db.url!r})"

    def load(self) -> dict[str, str]:
        """Every user's PHC string by name (a new dict). Raises StoreError."""
        with self._connection() as conn:
            row = conn.execute(_FINGERPRINT).fetchone()
            fingerprint = (int(row[0]), str(row[1]))
            if fingerprint != self._fingerprint:
                self._users = {
                    str(name): str(phc) for name, phc in conn.execute("SELECT name, phc FROM users")
                }
                self._fingerprint = fingerprint
        return dict(self._users)

    def put(self, name: str, phc: str) -> bool:
        """Add user ``name`` or replace their PHC string; True if the user is new."""
        with self._connection() as conn:
            # xmax is 0 on a row this statement inserted, not on one it updated.
            row = conn.execute(
                "INSERT INTO users (name, phc) VALUES (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET phc = excluded.phc, updated = now()"
                " RETURNING xmax = 0",
                (name, phc),
            ).fetchone()
            conn.execute("SELECT pg_notify(%s, '')", (CHANNEL_USERS,))
        return bool(row and row[0])

    def delete(self, name: str) -> bool:
        """Remove user ``name``; False if there was none."""
        with self._connection() as conn:
            deleted = conn.execute("DELETE FROM users WHERE name = %s", (name,)).rowcount
            if deleted:
                conn.execute("SELECT pg_notify(%s, '')", (CHANNEL_USERS,))
        return bool(deleted)

    def close(self) -> None:
        """Close the connections (the command line's table; a store closes its own)."""
        self.db.close()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        """A pooled connection in a transaction; a missing table says what to run."""
        try:
            with self.db.connection() as conn:
                yield conn
        except StoreError as exc:
            if 'relation "users" does not exist' in str(exc):
                raise StoreError(_NO_SCHEMA) from None
            raise
