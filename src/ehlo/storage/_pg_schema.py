"""The PostgreSQL store's schema, its versions and the migrations between them.

Every table the nodes share lives here, and only here: messages with their
envelopes, greeting reports and transcripts (JSON text, as the SQLite store
keeps them) and the columns the search reads (case-folded); the bodies as
chunk rows; the session log; the outbound queue with its leases and
attempts; the AUTH users; the abuse counters the nodes share.

``ehlo_schema`` holds one row per applied version. ``migrate`` applies the
missing versions in order, each in its own transaction, under an advisory
lock so that two nodes starting at once do not both apply one; a
migration only ever adds (tables, columns, indexes): nothing a node still
running the version before reads is dropped. A database newer than this
code is refused with one line rather than written to.
"""

from __future__ import annotations

from typing import Any

from ._spool import CHUNK_SIZE as CHUNK_SIZE  # the chunk rows' size
from .base import StoreError

# Advisory lock keys (pg_advisory_lock's bigint): one per purpose, chosen
# once; they only need to differ from each other and from the operator's.
LOCK_MIGRATE = 0x65686C6F_0001
LOCK_HOUSEKEEPING = 0x65686C6F_0002

# NOTIFY channels: a hint to look again (the listeners poll as well).
CHANNEL_MESSAGES = "ehlo_messages"  # payload: the queue id (or "" for a delete)
CHANNEL_QUEUE = "ehlo_queue"  # payload: "" (entries became due or changed)
CHANNEL_USERS = "ehlo_users"  # payload: ""

# Bodies are kept as rows of at most CHUNK_SIZE octets (bytea, stored
# uncompressed out of line): neither side ever holds a large message whole;
# a body of one chunk is what the writer keeps in memory (``_spool``).

_V1 = """
CREATE TABLE messages (
    queue_id      text PRIMARY KEY,
    seq           bigint GENERATED ALWAYS AS IDENTITY,
    xid           xid8 NOT NULL DEFAULT pg_current_xact_id(),
    node          text NOT NULL,
    received_at   timestamptz NOT NULL,
    client_ip     text NOT NULL,
    client_port   integer NOT NULL,
    greeting      text NOT NULL,
    greeting_name text NOT NULL,
    mail_from     text NOT NULL,
    mail_params   text NOT NULL,
    rcpt_to       text NOT NULL,
    tls           text,
    protocol      text NOT NULL,
    server_name   text NOT NULL,
    extra         text NOT NULL,
    size          bigint NOT NULL,
    subject       text,
    size_received bigint,
    chunks        integer NOT NULL,
    s_mail_from   text NOT NULL,
    s_rcpt_to     text NOT NULL,
    s_subject     text NOT NULL,
    s_helo        text NOT NULL,
    s_tls         boolean NOT NULL,
    s_auth        text,
    s_checks      text NOT NULL,
    attachments   boolean
);
CREATE INDEX messages_received_at ON messages (received_at, queue_id);
CREATE INDEX messages_xid ON messages (xid);

CREATE TABLE chunks (
    queue_id text NOT NULL,
    seq      integer NOT NULL,
    data     bytea NOT NULL,
    PRIMARY KEY (queue_id, seq)
);
ALTER TABLE chunks ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE staged (
    queue_id   text PRIMARY KEY,
    node       text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sessions (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id         text NOT NULL,
    node       text NOT NULL,
    started_at text NOT NULL,
    ended_at   text NOT NULL,
    client_ip  text NOT NULL,
    record     text NOT NULL
);
CREATE INDEX sessions_id ON sessions (id);

CREATE TABLE queue (
    queue_id       text NOT NULL,
    recipient      text NOT NULL,
    next_hop       text NOT NULL,
    state          text NOT NULL,
    attempts       integer NOT NULL,
    next_attempt   double precision NOT NULL,
    created        double precision NOT NULL,
    notify         text,
    orcpt          text,
    last_reply     text,
    updated        double precision NOT NULL,
    delay_notified boolean NOT NULL,
    request        text,
    lease_token    text,
    lease_until    double precision,
    PRIMARY KEY (queue_id, recipient)
);
CREATE INDEX queue_due ON queue (next_attempt) WHERE state IN ('queued', 'deferred');
CREATE INDEX queue_leases ON queue (lease_until) WHERE state = 'delivering';
CREATE INDEX queue_created ON queue (created, queue_id);

CREATE TABLE attempts (
    queue_id   text NOT NULL,
    at         double precision NOT NULL,
    next_hop   text NOT NULL,
    host       text NOT NULL,
    results    text NOT NULL,
    transcript text NOT NULL,
    node       text NOT NULL DEFAULT ''
);
CREATE INDEX attempts_queue_id ON attempts (queue_id, at);

CREATE TABLE users (
    name    text PRIMARY KEY,
    phc     text NOT NULL,
    updated timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE abuse_counts (
    kind   text NOT NULL,
    key    text NOT NULL,
    slot   bigint NOT NULL,
    count  integer NOT NULL,
    PRIMARY KEY (kind, key, slot)
);
CREATE TABLE abuse_locks (
    kind  text NOT NULL,
    key   text NOT NULL,
    until double precision NOT NULL,
    PRIMARY KEY (kind, key)
);
"""

# Version n is MIGRATIONS[n - 1]; append, never edit one that shipped.
MIGRATIONS: tuple[str, ...] = (_V1,)
LATEST = len(MIGRATIONS)

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS ehlo_schema (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now(),
    ehlo       text NOT NULL
)
"""


def current_version(conn: Any) -> int:
    """The schema version of the database (0: none applied, or no table yet)."""
    row = conn.execute(
        "SELECT to_regclass('ehlo_schema') IS NOT NULL"
    ).fetchone()
    if not row or not row[0]:
        return 0
    found = conn.execute("SELECT coalesce(max(version), 0) FROM ehlo_schema").fetchone()
    return int(found[0]) if found else 0


def status(conn: Any) -> dict[str, Any]:
    """What ``ehlo db status`` shows: versions, counts, the server's settings."""
    version = current_version(conn)
    info: dict[str, Any] = {
        "schema_version": version,
        "latest_version": LATEST,
        "server_version": conn.execute("SHOW server_version").fetchone()[0],
        "synchronous_commit": conn.execute("SHOW synchronous_commit").fetchone()[0],
        "applied": [],
    }
    if version:
        info["applied"] = [
            {"version": int(v), "applied_at": at.isoformat(), "ehlo": by}
            for v, at, by in conn.execute(
                "SELECT version, applied_at, ehlo FROM ehlo_schema ORDER BY version"
            )
        ]
        info["messages"] = int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
        info["queue"] = {
            state: int(n)
            for state, n in conn.execute("SELECT state, count(*) FROM queue GROUP BY state")
        }
        info["users"] = int(conn.execute("SELECT count(*) FROM users").fetchone()[0])
    conn.rollback()
    return info


def migrate(conn: Any, ehlo_version: str) -> tuple[int, int]:
    """Bring the schema to :data:`LATEST`; the versions before and after.

    ``conn`` is a connection in autocommit mode. Raises StoreError for a
    database whose schema is newer than this code.
    """
    conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_MIGRATE,))
    try:
        conn.execute(_VERSION_TABLE)
        before = current_version(conn)
        if before > LATEST:
            raise StoreError(
                f"the database's schema is version {before}, newer than this ehlo"
                f" knows ({LATEST}): upgrade ehlo on this node"
            )
        for version in range(before + 1, LATEST + 1):
            with conn.transaction():
                conn.execute(MIGRATIONS[version - 1])
                conn.execute(
                    "INSERT INTO ehlo_schema (version, ehlo) VALUES (%s, %s)",
                    (version, ehlo_version),
                )
        return before, LATEST
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_MIGRATE,))
