"""The pytest plugin: an ehlo server inside the test's process, and the mail it received.

Installed with ehlo, registered through the ``pytest11`` entry point: any
test suite in an environment with ehlo gets two fixtures and a marker.

- ``smtp_server`` (function scope): an :class:`SMTPTestServer` on
  127.0.0.1, a free port, with its own SQLite store in the test's
  ``tmp_path``, running in a background thread with its own event loop, so
  that synchronous code (smtplib, a framework's mail backend, the
  application under test) can talk to it. Stopped at teardown.
- ``async_smtp_server`` (with pytest-asyncio): an
  :class:`AsyncSMTPTestServer` running in the test's own event loop;
  ``await server.wait_for(...)``. A blocking client in that loop would
  stall the server: send with an asyncio client (aiosmtplib, ehlo's own) or
  from a thread (``asyncio.to_thread``). Without pytest-asyncio the fixture
  fails the test with a line that says so.
- ``@pytest.mark.ehlo(tls=True, size=..., auth_users={...}, **keys)``
  configures both (on a test, a class or a module's ``pytestmark``; the
  closest marker wins key by key). ``tls``: STARTTLS offered with a
  self-signed certificate (``server.tls_cert``, for clients that verify);
  ``size``: the SIZE limit in octets; ``auth_users``: names and passwords
  AUTH accepts (offered without TLS too, as a test server on loopback
  may); any other keyword is a config key of ``ehlo serve`` (``domains=[...]``,
  ``limits={"max_recipients": 5}``, ``greeting={"policy": "off"}``),
  validated as in a config file.

Defaults: no TLS, no reverse DNS, and the greeting checks at the ``record``
preset with the checks that need DNS turned off, so a message still carries
the local checks' results (``greeting_checks``) and no lookup leaves the
machine: the resolver is not even configured from the system's
resolv.conf, it is given 127.0.0.1 port 9, where nothing answers. A test
that turns DNS checks on gives ``dns_servers`` of its own DNS server.

``wait_for`` does not poll: the server calls back when the store has
committed a message (``Server(on_stored=...)``, before the client's 250),
and the waiter then reads the store. Each call returns a message no earlier
``wait_for`` on that server returned, the oldest that matches, so a test can
send and wait, send and wait again. After ``timeout`` seconds it raises
:class:`TimeoutError` with the list of what was received.

Importing this module starts nothing and loads no server code (pytest
imports it for every session of a project that has ehlo installed); pytest
is not a dependency of ehlo, only this module imports it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import email
import email.policy
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .config import ServerConfig
    from .server import Server
    from .storage import Envelope, Store, StoredMessage

__all__ = [
    "AsyncSMTPTestServer",
    "ReceivedMessage",
    "SMTPTestServer",
    "async_smtp_server",
    "smtp_server",
]

# What a criterion of wait_for may be: a whole value, or a pattern searched in it.
Criterion = str | re.Pattern[str] | None

# The resolver's only nameserver unless a test names its own: the discard
# port of loopback, where nothing answers. The default checks never ask it;
# it keeps the machine's resolver (resolv.conf) out of the test server.
_NO_DNS = "127.0.0.1:9"
# Seconds a server may take to start or stop (the machine may be busy).
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0
# Seconds open sessions get to finish when a test's server stops.
_DRAIN = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A message the test server stored: the parsed message and what the session said."""

    id: str  # the store's id (``ehlo messages show ID``)
    mail_from: str  # the envelope's reverse-path; "" for <>
    rcpt_to: list[str]  # the envelope's recipients, in order
    greeting: str  # "HELO" or "EHLO"
    greeting_name: str  # the name the client gave with it
    greeting_checks: Any  # the greeting checks' results, as ``messages show --json`` has them
    tls: dict[str, str] | None  # {"version": ..., "cipher": ...} after STARTTLS, else None
    auth: str | None  # the user the session authenticated as (AUTH), else None
    received_at: _dt.datetime  # when the server took it (UTC)
    raw: bytes = dataclasses.field(repr=False)  # the stored bytes, ehlo's Received header first
    message: EmailMessage = dataclasses.field(repr=False)  # ``raw`` parsed (email.policy.default)

    @classmethod
    def from_store(cls, stored: StoredMessage, raw: bytes) -> ReceivedMessage:
        env = stored.envelope
        data = env.to_json()
        auth = data.get("auth")  # {"user": ..., "mechanism": ...}
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        return cls(
            id=env.queue_id,
            mail_from=env.mail_from,
            rcpt_to=list(env.rcpt_to),
            greeting=env.greeting,
            greeting_name=env.greeting_name,
            greeting_checks=data.get("greeting_checks"),
            tls=dict(env.tls) if env.tls else None,
            auth=auth.get("user") if isinstance(auth, dict) else None,
            received_at=env.received_at,
            raw=raw,
            message=message,
        )

    @property
    def subject(self) -> str | None:
        """The Subject field, decoded; None when there is none."""
        value = self.message["subject"]
        return None if value is None else str(value)

    @property
    def text(self) -> str | None:
        """The plain-text body (the first text/plain part) decoded, lines ending in "\\n".

        None when there is no text/plain part.
        """
        body = self.message.get_body(preferencelist=("plain",))
        if body is None:
            return None
        content = body.get_content()
        return content.replace("\r\n", "\n") if isinstance(content, str) else None


def _matches(value: str, wanted: str | re.Pattern[str], *, fold: bool) -> bool:
    if isinstance(wanted, re.Pattern):
        return wanted.search(value) is not None
    return value.casefold() == wanted.casefold() if fold else value == wanted


@dataclasses.dataclass(frozen=True, slots=True)
class _Wanted:
    """What ``wait_for`` waits for: every criterion given must hold."""

    to: Criterion = None  # some envelope recipient (whole address, any case) or a pattern
    subject: Criterion = None  # the decoded Subject, exactly, or a pattern
    mail_from: Criterion = None  # the envelope's reverse-path (whole, any case) or a pattern

    def matches(self, message: ReceivedMessage) -> bool:
        to, subject, mail_from = self.to, self.subject, self.mail_from
        if to is not None and not any(_matches(r, to, fold=True) for r in message.rcpt_to):
            return False
        if subject is not None and (
            message.subject is None or not _matches(message.subject, subject, fold=False)
        ):
            return False
        return mail_from is None or _matches(message.mail_from, mail_from, fold=True)

    def __str__(self) -> str:
        shown = [
            f"{name}={value.pattern if isinstance(value, re.Pattern) else value!r}"
            + (" (pattern)" if isinstance(value, re.Pattern) else "")
            for name, value in (
                ("to", self.to),
                ("subject", self.subject),
                ("mail_from", self.mail_from),
            )
            if value is not None
        ]
        return "message with " + ", ".join(shown) if shown else "message"


def server_config(
    data_dir: Path,
    *,
    tls: bool = False,
    size: int | None = None,
    auth_users: Mapping[str, str] | None = None,
    **keys: Any,
) -> ServerConfig:
    """The configuration of a test server: the defaults above, then the options given.

    Raises :class:`ehlo.ConfigError` naming a bad key or value.
    """
    from .config import ConfigError, load_config
    from .greeting import SPECS

    overrides: dict[str, Any] = {
        "store": "sqlite",
        "sqlite_writer": "thread",  # no writer process per test
        "reverse_dns": False,
        "dns_servers": [_NO_DNS],
        "greeting.policy": "record",
        **{f"greeting.checks.{spec.name}": "off" for spec in SPECS if spec.dns},
        "tls": tls,
    }
    if size is not None:
        overrides["limits.max_message_size"] = size
    if auth_users:
        overrides["auth"] = True
        overrides["limits.auth_plaintext"] = True
    for fixed in ("listen", "data_dir"):
        if fixed in keys:
            raise ConfigError(f"config key {fixed}: the test server chooses it")
    overrides.update(keys)  # nested tables are flattened after these: the caller's win
    overrides["listen"] = ["127.0.0.1:0"]
    overrides["data_dir"] = str(data_dir)
    return load_config(None, overrides)


class _TestServer:
    """What both test servers share: configuration, the store's messages, clear()."""

    def __init__(
        self,
        data_dir: Path,
        *,
        tls: bool = False,
        size: int | None = None,
        auth_users: Mapping[str, str] | None = None,
        **keys: Any,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.config = server_config(
            self.data_dir, tls=tls, size=size, auth_users=auth_users, **keys
        )
        self._auth_users = dict(auth_users or {})
        # The self-signed certificate STARTTLS presents (None without TLS).
        self.tls_cert: Path | None = None
        self._server: Server | None = None
        self._cache: dict[str, ReceivedMessage] = {}
        self._returned: set[str] = set()  # ids an earlier wait_for returned

    def _prepare(self) -> None:
        """Users and the TLS pair, written in the data folder before the server starts."""
        from .storage import ensure_data_dir

        ensure_data_dir(self.data_dir)
        if self._auth_users:
            from .auth import UserStore

            users = UserStore(self.data_dir)
            for name, password in self._auth_users.items():
                users.add(name, password)
        config = self.config
        if config.tls:
            if config.tls_cert is not None:
                self.tls_cert = Path(config.tls_cert)
            else:
                from .server.tls import ensure_self_signed

                self.tls_cert, _ = ensure_self_signed(self.data_dir, config.hostname)

    def _new_server(self, on_stored: Callable[[Envelope], None]) -> Server:
        from .server import Server

        return Server(self.config, on_stored=on_stored)

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}" if self._server is not None else "stopped"
        return f"<{type(self).__name__} {where} {self.data_dir}>"

    @property
    def _store(self) -> Store:
        if self._server is None:
            raise RuntimeError("the test server is not running")
        return self._server.store

    @property
    def host(self) -> str:
        """The address it listens on (127.0.0.1)."""
        if self._server is None:
            raise RuntimeError("the test server is not running")
        return self._server.addresses[0][0]

    @property
    def port(self) -> int:
        """The port it listens on (chosen by the system)."""
        if self._server is None:
            raise RuntimeError("the test server is not running")
        return self._server.addresses[0][1]

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Every message the store holds, oldest first (newest last)."""
        store = self._store
        out: list[ReceivedMessage] = []
        for stored in reversed(store.list()):
            queue_id = stored.envelope.queue_id
            found = self._cache.get(queue_id)
            if found is None:
                raw = store.raw(queue_id)
                if raw is None:  # deleted in between
                    continue
                found = self._cache[queue_id] = ReceivedMessage.from_store(stored, raw)
            out.append(found)
        return out

    def clear(self) -> None:
        """Delete every message received so far; ``wait_for`` starts afresh."""
        from .storage import Query

        self._store.delete_matching(Query())
        self._cache.clear()
        self._returned.clear()

    def _take(self, wanted: _Wanted) -> ReceivedMessage | None:
        """The oldest message matching ``wanted`` that no wait_for returned, now taken."""
        for message in self.messages:
            if message.id not in self._returned and wanted.matches(message):
                self._returned.add(message.id)
                return message
        return None

    def _timed_out(self, wanted: _Wanted, timeout: float) -> TimeoutError:
        received = self.messages
        lines = [f"no {wanted} arrived within {timeout:g} s; "]
        if not received:
            lines[0] += "nothing was received"
        else:
            lines[0] += f"received {len(received)}:"
            for n, m in enumerate(received, 1):
                lines.append(
                    f"  {n}. from <{m.mail_from}> to {', '.join(f'<{r}>' for r in m.rcpt_to)}"
                    f" subject {m.subject!r} (id {m.id})"
                    + (" [returned by an earlier wait_for]" if m.id in self._returned else "")
                )
        return TimeoutError("\n".join(lines))


class SMTPTestServer(_TestServer):
    """An ehlo server in a background thread, for synchronous tests.

    ``with SMTPTestServer(folder) as server:`` (or ``start()`` / ``stop()``);
    the ``smtp_server`` fixture is one of these. Keyword arguments as for
    ``@pytest.mark.ehlo``.
    """

    def __init__(self, data_dir: Path, **options: Any) -> None:
        super().__init__(data_dir, **options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        # Bumped by the server's thread at each commit; wait_for sleeps on it.
        self._changed = threading.Condition()
        self._commits = 0

    def _stored(self, envelope: Envelope) -> None:  # on the server's thread
        with self._changed:
            self._commits += 1
            self._changed.notify_all()

    def start(self) -> SMTPTestServer:
        """Start the server and return once it listens."""
        self._prepare()
        self._thread = threading.Thread(target=self._run, name="ehlo-smtp-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT):
            raise RuntimeError(f"the test server did not start within {_START_TIMEOUT:g} s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            try:
                server = self._new_server(self._stored)
                loop.run_until_complete(server.start())
            except BaseException as exc:  # reported by start() in the test's thread
                self._error = exc
                return
            self._server = server
            self._ready.set()
            loop.run_forever()
        finally:
            self._ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        """Stop the server (open sessions get a moment, then 421) and its thread."""
        server, loop, thread = self._server, self._loop, self._thread
        if server is not None and loop is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(server.stop(timeout=_DRAIN), loop).result(
                    _STOP_TIMEOUT
                )
            finally:
                loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(_STOP_TIMEOUT)
        self._server = None

    def __enter__(self) -> SMTPTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _commit_after(self, seen: int, deadline: float) -> bool:
        """Sleep until a commit after the ``seen``-th or the deadline; whether one came."""
        with self._changed:
            while self._commits == seen:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def wait_for(
        self,
        to: Criterion = None,
        subject: Criterion = None,
        mail_from: Criterion = None,
        timeout: float = 5.0,
    ) -> ReceivedMessage:
        """The oldest message that matches and no earlier call returned; waits for it.

        ``to``: one of the envelope's recipients, ``mail_from``: its
        reverse-path (whole addresses, in any case), ``subject``: the decoded
        Subject exactly; a compiled ``re`` pattern instead is searched. None
        matches anything. Raises :class:`TimeoutError` listing what was
        received when nothing matched within ``timeout`` seconds.
        """
        __tracebackhide__ = True
        wanted = _Wanted(to, subject, mail_from)
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                seen = self._commits
            found = self._take(wanted)  # read outside the lock: commits go on meanwhile
            if found is not None:
                return found
            if not self._commit_after(seen, deadline):
                break
        found = self._take(wanted)  # committed as the time ran out
        if found is not None:
            return found
        raise self._timed_out(wanted, timeout)


class AsyncSMTPTestServer(_TestServer):
    """An ehlo server in the running event loop, for async tests.

    ``async with AsyncSMTPTestServer(folder) as server:`` (or ``await
    start()`` / ``await stop()``); the ``async_smtp_server`` fixture is one
    of these. ``messages`` and ``clear()`` read the store at once.
    """

    def __init__(self, data_dir: Path, **options: Any) -> None:
        super().__init__(data_dir, **options)
        self._changed: asyncio.Event | None = None

    def _stored(self, envelope: Envelope) -> None:  # on this loop
        if self._changed is not None:
            self._changed.set()

    async def start(self) -> AsyncSMTPTestServer:
        """Start the server in this event loop; return once it listens."""
        self._prepare()
        self._changed = asyncio.Event()
        server = self._new_server(self._stored)
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        """Stop the server (open sessions get a moment, then 421)."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(timeout=_DRAIN)

    async def __aenter__(self) -> AsyncSMTPTestServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for(
        self,
        to: Criterion = None,
        subject: Criterion = None,
        mail_from: Criterion = None,
        timeout: float = 5.0,
    ) -> ReceivedMessage:
        """As :meth:`SMTPTestServer.wait_for`, awaited."""
        __tracebackhide__ = True
        changed = self._changed
        if changed is None:
            raise RuntimeError("the test server is not running")
        wanted = _Wanted(to, subject, mail_from)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            changed.clear()  # no await before the read: no commit can slip in between
            found = self._take(wanted)
            if found is not None:
                return found
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                break
        found = self._take(wanted)
        if found is not None:
            return found
        raise self._timed_out(wanted, timeout)


# --- pytest ------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "ehlo(tls=False, size=None, auth_users=None, **config_keys): options of the"
        " smtp_server and async_smtp_server fixtures (ehlo.testing)",
    )


def _options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The keywords of the ``ehlo`` markers on the test, the closest one winning."""
    options: dict[str, Any] = {}
    for mark in reversed(list(request.node.iter_markers("ehlo"))):
        if mark.args:
            pytest.fail("@pytest.mark.ehlo takes keywords only", pytrace=False)
        options.update(mark.kwargs)
    return options


def _configured(request: pytest.FixtureRequest, make: Callable[..., _TestServer]) -> Any:
    from .config import ConfigError

    try:
        return make(**_options(request))
    except ConfigError as exc:
        pytest.fail(f"@pytest.mark.ehlo: {exc}", pytrace=False)


@pytest.fixture
def smtp_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SMTPTestServer]:
    """An ehlo server on 127.0.0.1 in a background thread, for this test (ehlo.testing)."""
    server: SMTPTestServer = _configured(
        request, lambda **options: SMTPTestServer(tmp_path / "ehlo-smtp", **options)
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _async_fixture() -> Any:
    """``async_smtp_server``: with pytest-asyncio, else a fixture that says it is needed."""
    try:
        import pytest_asyncio
    except ImportError:

        @pytest.fixture(name="async_smtp_server")
        def missing() -> None:
            pytest.fail("async_smtp_server needs pytest-asyncio", pytrace=False)

        return missing

    @pytest_asyncio.fixture(name="async_smtp_server")
    async def running(
        request: pytest.FixtureRequest, tmp_path: Path
    ) -> AsyncIterator[AsyncSMTPTestServer]:
        """An ehlo server on 127.0.0.1 in this test's event loop (ehlo.testing)."""
        server: AsyncSMTPTestServer = _configured(
            request, lambda **options: AsyncSMTPTestServer(tmp_path / "ehlo-smtp-async", **options)
        )
        await server.start()
        try:
            yield server
        finally:
            await server.stop()

    return running


async_smtp_server = _async_fixture()
