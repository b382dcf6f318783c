"""The embedding API: hooks per stage, recipient domains, Received header, stop()."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from ehlo import HookContext, Hooks, Reply, Server, ServerConfig, Verdict
from ehlo.server.received import protocol_keyword, received_header
from ehlo.storage import Envelope, MessageWriter, NullStore, StoreError, open_store

from . import helpers
from .dnsserver import DNSServer
from .helpers import PRODUCTION_WRITER, Client, ipv6_loopback, require


def make_config(data_dir: Path, **overrides: Any) -> ServerConfig:
    """This module's servers commit as ``ehlo serve`` does: what a 250 waits for is its subject."""
    return helpers.make_config(data_dir, **{**PRODUCTION_WRITER, **overrides})


async def smtp(port: int, *lines: str) -> list[str]:
    """Send ``lines`` one by one after the banner; return each reply's last line."""
    c = await Client.open("127.0.0.1", port)
    try:
        return [(await c.cmd(line)).last for line in lines]
    finally:
        c.close()


TX = ("EHLO c.example", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>")


async def test_hooks_see_context_and_decide_each_stage(tmp_path: Path) -> None:
    seen: list[tuple[str, str | None, str | None]] = []

    async def record(ctx: HookContext) -> Verdict | None:
        seen.append((ctx.stage, ctx.greeting_name, ctx.rcpt))
        if ctx.stage == "rcpt" and ctx.rcpt == "blocked@example.net":
            return Verdict.reject("No such user", 550, "5.1.1")
        if ctx.stage == "rcpt" and ctx.rcpt == "later@example.net":
            return Verdict.defer()
        if ctx.stage == "mail" and ctx.mail_from == "spammer@example.com":
            return Verdict.reject()
        if ctx.stage == "data":
            assert ctx.queue_id and ctx.size == len(b"x\r\n")
            assert ctx.rcpt_to == ["b@example.net"]
        return None

    hooks = {stage: [record] for stage in ("connect", "helo", "mail", "rcpt", "data")}
    async with Server(make_config(tmp_path), hooks=hooks) as server:
        port = server.addresses[0][1]
        replies = await smtp(
            port,
            "EHLO c.example",
            "MAIL FROM:<spammer@example.com>",
            "MAIL FROM:<a@example.org>",
            "RCPT TO:<blocked@example.net>",
            "RCPT TO:<later@example.net>",
            "RCPT TO:<b@example.net>",
            "DATA",
            "x\r\n.",
            "QUIT",
        )
        assert replies[1] == "550 5.7.1 Sender refused by policy"
        assert replies[3] == "550 5.1.1 No such user"
        assert replies[4] == "450 4.7.1 Recipient deferred by policy, try again later"
        assert replies[5].startswith("250 2.1.5")
        assert replies[7].startswith("250 2.0.0 OK: queued as ")
        assert len(server.store.list()) == 1
    stages = [s for s, _, _ in seen]
    assert stages[:2] == ["connect", "helo"]
    assert stages.count("rcpt") == 3 and stages[-1] == "data"
    assert ("helo", "c.example", None) in seen


async def test_data_hook_refusal_keeps_nothing(tmp_path: Path) -> None:
    async def refuse(ctx: HookContext) -> Verdict | None:
        return Verdict.reject("Content refused", 554, "5.7.1")

    async with Server(make_config(tmp_path), hooks={"data": [refuse]}) as server:
        replies = await smtp(server.addresses[0][1], *TX, "DATA", "hello\r\n.")
        assert replies[-1] == "554 5.7.1 Content refused"
        assert server.store.list() == []


async def test_failing_hook_defers_never_rejects(tmp_path: Path) -> None:
    async def broken(ctx: HookContext) -> Verdict | None:
        raise RuntimeError("policy database down")

    async def slow(ctx: HookContext) -> Verdict | None:
        await asyncio.Event().wait()  # never answers: the hook timeout decides
        return None

    hooks = Hooks({"mail": [broken], "rcpt": [slow]}, timeout=0.2)
    async with Server(make_config(tmp_path), hooks=hooks) as server:
        replies = await smtp(server.addresses[0][1], "EHLO c.example", "MAIL FROM:<a@b.example>")
        assert replies[-1] == "451 4.3.0 Temporary policy failure, try again later"
    hooks2 = Hooks({"rcpt": [slow]}, timeout=0.2)
    async with Server(make_config(tmp_path), hooks=hooks2) as server:
        replies = await smtp(server.addresses[0][1], *TX)
        assert replies[-1].startswith("451 4.3.0")


async def test_connect_hook_refusal_gives_554_then_only_quit(tmp_path: Path) -> None:
    async def refuse(ctx: HookContext) -> Verdict | None:
        return Verdict.reject("Blocked network")

    async with Server(make_config(tmp_path), hooks={"connect": [refuse]}) as server:
        c = await Client.connect(server, banner=False)
        assert (await c.reply()).raw == b"554 Blocked network\r\n"
        c.send(b"EHLO x.example\r\nQUIT\r\n")
        assert (await c.reply()).code == 503
        assert (await c.reply()).code == 221
        c.close()


def test_verdict_validation() -> None:
    with pytest.raises(ValueError):
        Verdict.reject("x", 450)
    with pytest.raises(ValueError):
        Verdict.defer("x", 550)
    with pytest.raises(ValueError):
        Verdict.accept(Reply(550, None, "no"))
    with pytest.raises(ValueError):
        Hooks({"bogus": []}).register("bogus", lambda ctx: None)  # type: ignore[arg-type,return-value]


async def test_domains_restrict_recipients_but_not_postmaster(tmp_path: Path) -> None:
    config = make_config(tmp_path, domains=("example.net",))
    async with Server(config) as server:
        replies = await smtp(
            server.addresses[0][1],
            "EHLO c.example",
            "MAIL FROM:<a@example.org>",
            "RCPT TO:<b@example.net>",
            "RCPT TO:<b@EXAMPLE.NET>",
            "RCPT TO:<c@elsewhere.example>",
            "RCPT TO:<postmaster@other.example>",
            "RCPT TO:<Postmaster>",
        )
        assert replies[2].startswith("250 ") and replies[3].startswith("250 ")
        assert replies[4] == (
            "550 5.7.1 Relaying denied: <c@elsewhere.example> is not a local domain"
        )
        assert replies[5].startswith("250 ") and replies[6].startswith("250 ")


async def test_received_header_and_envelope(tmp_path: Path) -> None:
    # Reverse DNS on, asking the loopback DNS server: a loopback client is
    # "localhost" without a query (RFC 6761 section 6.3).
    with DNSServer({}) as dns:
        config = make_config(tmp_path, reverse_dns=True, dns_servers=(dns.nameserver,))
        async with Server(config) as server:
            await _check_received_header_and_envelope(server)
        assert dns.queries == []


async def _check_received_header_and_envelope(server: Server) -> None:
    """One message by aiosmtplib; its Received header (reverse name "localhost"), envelope."""
    port = server.addresses[0][1]
    await aiosmtplib.send(
        b"Subject: r\r\n\r\nbody\r\n",
        sender="a@example.org",
        recipients=["b@example.net"],
        hostname="127.0.0.1",
        port=port,
        local_hostname="client.example",
        start_tls=False,
    )
    [stored] = server.store.list()
    raw = server.store.raw(stored.envelope.queue_id)
    assert raw is not None
    header, _, rest = raw.partition(b"\r\nSubject:")
    text = header.decode()
    assert re.fullmatch(
        r"Received: from client\.example \(localhost \[127\.0\.0\.1\]\)\r\n"
        r"\tby localhost \(ehlo\) with ESMTP id (\w{16})\r\n"
        r"\tfor <b@example\.net>; \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000",
        text,
    ), text
    assert stored.envelope.queue_id in text
    assert rest == b" r\r\n\r\nbody\r\n"
    assert stored.envelope.greeting == "EHLO"
    assert stored.envelope.mail_from == "a@example.org"
    assert stored.envelope.protocol == "ESMTP"
    assert stored.size == len(raw)


def test_received_header_odd_greeting_and_keywords() -> None:
    header = received_header(
        greeting_name="not a (valid) name",
        client_ip="2001:db8::7",
        client_name=None,
        server_name="mx.example",
        protocol="ESMTPS",
        queue_id="ID",
        recipient=None,
        tls={"version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256"},
        now=0,
    ).decode()
    assert header.startswith("Received: from [IPv6:2001:db8::7] ([IPv6:2001:db8::7] helo=not?a?")
    assert "(using TLSv1.3 with cipher TLS_AES_128_GCM_SHA256);\r\n\tThu, 01 Jan 1970" in header
    assert protocol_keyword(False, False) == "SMTP"
    assert protocol_keyword(True, True) == "ESMTPS"
    assert protocol_keyword(True, True, auth=True) == "ESMTPSA"
    assert protocol_keyword(True, False, utf8=True) == "UTF8SMTP"
    assert protocol_keyword(True, True, utf8=True) == "UTF8SMTPS"


async def test_stop_lets_a_transaction_finish_and_says_421_to_idle(tmp_path: Path) -> None:
    server = Server(make_config(tmp_path))
    await server.start()
    port = server.addresses[0][1]
    idle = await Client.open("127.0.0.1", port)
    busy = await Client.open("127.0.0.1", port)
    busy.send(b"HELO b.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    for _ in range(4):
        await busy.reply()
    stopping = asyncio.ensure_future(server.stop(timeout=5))
    assert (await idle.reply()).code == 421
    busy.send(b"Subject: late\r\n\r\nstill arriving\r\n.\r\n")
    assert (await busy.reply()).code == 250
    assert (await busy.reply()).code == 421
    await asyncio.wait_for(stopping, 10)
    idle.close()
    busy.close()
    store = open_store("sqlite", tmp_path)
    assert [m.subject for m in store.list()] == ["late"]


async def test_stop_deadline_closes_stalled_transaction(tmp_path: Path) -> None:
    server = Server(make_config(tmp_path))
    await server.start()
    c = await Client.connect(server)
    c.send(b"HELO b.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    for _ in range(4):
        await c.reply()
    c.send(b"partial body\r\n")
    await asyncio.wait_for(server.stop(timeout=0.3), 5)
    assert (await c.reply()).code == 421
    c.close()
    assert open_store("sqlite", tmp_path).list() == []


async def test_two_listeners_ipv4_and_ipv6(tmp_path: Path) -> None:
    from ehlo import Listen

    require(ipv6_loopback(), "no IPv6 loopback here")
    config = make_config(tmp_path, listen=(Listen("127.0.0.1", 0), Listen("::1", 0)))
    async with Server(config) as server:
        hosts = {host for host, _ in server.addresses}
        assert hosts == {"127.0.0.1", "::1"}
        v6_port = next(port for host, port in server.addresses if host == "::1")
        c = await Client.open("::1", v6_port)
        r = await c.cmd("EHLO [IPv6:::1]")
        assert r.wire[0] == "250-localhost Hello [IPv6:::1]"
        c.close()


class _GatedWriter(MessageWriter):
    """A writer whose commit the test settles by hand (``start_commit`` returns its future)."""

    def __init__(self, store: _GatedStore, queue_id: str) -> None:
        self.store = store
        self.queue_id = queue_id

    def write(self, data: bytes) -> None:
        pass

    async def commit(self) -> str:
        return await self.start_commit()

    def start_commit(self) -> asyncio.Future[str]:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.store.commits.put_nowait((self.queue_id, future))
        return future

    def abort(self) -> None:
        pass


class _GatedStore(NullStore):
    def __init__(self) -> None:
        super().__init__()
        self.commits: asyncio.Queue[tuple[str, asyncio.Future[str]]] = asyncio.Queue()

    def begin(self, envelope: Envelope) -> _GatedWriter:  # type: ignore[override]
        return _GatedWriter(self, envelope.queue_id)


class _CoroutineOnlyWriter(MessageWriter):
    """A store written against the older interface: only ``async commit``."""

    def __init__(self, queue_id: str) -> None:
        self.queue_id = queue_id

    def write(self, data: bytes) -> None:
        pass

    async def commit(self) -> str:
        await asyncio.sleep(0.01)  # a commit that takes time, as a real one does
        return self.queue_id

    def abort(self) -> None:
        pass


class _CoroutineOnlyStore(NullStore):
    def begin(self, envelope: Envelope) -> _CoroutineOnlyWriter:  # type: ignore[override]
        return _CoroutineOnlyWriter(envelope.queue_id)


async def _send_message(port: int) -> Client:
    """A connection that has sent a whole message (its reply not read yet)."""
    c = await Client.open("127.0.0.1", port)
    for line in ("HELO c.example", "MAIL FROM:<a@b.example>", "RCPT TO:<c@d.example>", "DATA"):
        await c.cmd(line)
    c.send(b"Subject: gated\r\n\r\nbody\r\n.\r\n")
    return c


async def _noop_round_trip(port: int) -> None:
    """Connect, NOOP, wait for its 250, QUIT."""
    c = await Client.open("127.0.0.1", port)
    try:
        assert (await c.cmd("NOOP")).code == 250
        await c.cmd("QUIT")
    finally:
        c.close()


async def _accept(ctx: HookContext) -> Verdict | None:
    return None


# The commit is awaited two ways: straight from the transport, or (with a
# policy stage at DATA) after the policy's word, in the session's task.
_COMMIT_PATHS = pytest.mark.parametrize(
    "hooks", [None, {"data": [_accept]}], ids=["direct", "policy"]
)


@_COMMIT_PATHS
async def test_250_waits_for_the_store_and_a_failed_or_cancelled_commit_is_451(
    tmp_path: Path, hooks: dict[str, list[Any]] | None
) -> None:
    store = _GatedStore()
    server = Server(make_config(tmp_path), store=store, hooks=hooks)
    await server.start()
    try:
        c = await _send_message(server.addresses[0][1])
        queue_id, future = await asyncio.wait_for(store.commits.get(), 5)
        # RFC 5321 section 6.1: nothing is said before the store has the message.
        reply = asyncio.ensure_future(c.reply(timeout=60))
        # A whole exchange on another connection: the server's loop has run
        # on past the commit, and anything it said early has arrived.
        await _noop_round_trip(server.addresses[0][1])
        assert not reply.done()
        future.set_result(queue_id)
        assert (await asyncio.wait_for(reply, 5)).wire == [f"250 OK: queued as {queue_id}"]
        c.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
        for _ in range(3):
            await c.reply()
        c.send(b"Subject: second\r\n\r\nbody\r\n.\r\n")
        _, future = await asyncio.wait_for(store.commits.get(), 5)
        future.set_exception(StoreError("disk full"))
        assert (await c.reply()).code == 451
        c.send(b"NOOP\r\n")  # the session goes on after the refusal
        assert (await c.reply()).code == 250
        # A commit the store cancels is not taken either: 451, never a hang.
        c.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
        for _ in range(3):
            await c.reply()
        c.send(b"Subject: third\r\n\r\nbody\r\n.\r\n")
        _, future = await asyncio.wait_for(store.commits.get(), 5)
        future.cancel()
        assert (await c.reply()).code == 451
        c.close()
    finally:
        await server.stop(timeout=1)


@_COMMIT_PATHS
async def test_stop_deadline_during_a_commit_answers_421(
    tmp_path: Path, hooks: dict[str, list[Any]] | None
) -> None:
    store = _GatedStore()
    server = Server(make_config(tmp_path), store=store, hooks=hooks)
    await server.start()
    c = await _send_message(server.addresses[0][1])
    _, future = await asyncio.wait_for(store.commits.get(), 5)
    await asyncio.wait_for(server.stop(timeout=0.3), 5)
    assert (await c.reply()).code == 421
    assert future.cancelled()  # the commit nobody waits for any more
    c.close()


async def test_a_store_with_only_an_async_commit_still_works(tmp_path: Path) -> None:
    server = Server(make_config(tmp_path), store=_CoroutineOnlyStore())
    await server.start()
    try:
        c = await _send_message(server.addresses[0][1])
        assert (await c.reply()).last.startswith("250 OK: queued as")
        c.close()
    finally:
        await server.stop(timeout=1)
