"""One outbound session: a next hop's hosts, the connection, and message after message.

:class:`Session` finds the hosts of a next hop (MX by preference, without
ourselves; one host; an LMTP server), applies the TLS policy and MTA-STS,
connects to the first host that answers (after an opportunistic STARTTLS
that fails, once more in plain text, as Postfix's ``may`` level does),
then carries every message the scheduler has for that next hop, each with
all its recipients there, recording per-recipient outcomes and the
transcript of each attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..client import SMTPClient
from ..client._errors import (
    ConnectionFailed,
    MessageNotSupported,
    NoRoute,
    SMTPClientError,
    TLSFailed,
)
from ..client.routing import MailHost
from ..policy import HookContext
from ..protocol import Reply
from ..storage import Envelope
from ..storage.queue import Attempt, EntryUpdate, QueueEntry
from ._model import Job, Outcome, local_reply, reply_dict
from .routes import NextHop, parse_next_hop

if TYPE_CHECKING:
    from .scheduler import Scheduler

log = logging.getLogger("ehlo.delivery")

# Messages a connection takes from its next hop's line before others get a turn.
PER_CONNECTION = 100
# Seconds an idle connection waits for more mail for its next hop.
IDLE_REUSE = 2.0
# Seconds before a message whose body cannot be read yet is looked at again.
MISSING_BODY_DELAY = 5.0
_TLS_MODES = {"none": "off", "may": "opportunistic", "encrypt": "encrypt", "verify": "verify"}


class Session:
    """One outbound session to one next hop (one host after another until one answers)."""

    def __init__(self, scheduler: Scheduler, hop_text: str) -> None:
        self.s = scheduler
        self.hop_text = hop_text
        self.client: SMTPClient | None = None
        self.where = ""
        self.lines: list[str] = []
        self.preamble = 0  # transcript lines of the session before the first transaction

    def _say(self, kind: str, text: str, tls: bool) -> None:
        mark = {"send": "C", "recv": "S"}.get(kind, "*")
        self.lines.append(f"{mark}: {text}")

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.quit(), 10)
            client.close()

    async def run(self, job: Job) -> Job | None:
        """Deliver ``job`` and then more for this hop; the job left over, if any."""
        s = self.s
        try:
            hop = parse_next_hop(self.hop_text, s.settings.delivery_port)
        except ValueError as exc:
            bad = local_reply(554, "5.4.4", f"bad next hop: {exc}")
            await self._fail_all(job, bad, bounce=True)
            return s._take(self.hop_text)
        count = 0
        current: Job | None = job
        while current is not None and not s._stopping:
            # The delivery hooks, before each attempt (a refusal, a new route).
            hop, hooked = await self._hooked(hop, current)
            if hooked is not None:
                if hop.kind == "local":
                    await self._stored(hooked)
                else:
                    if self.client is None and not await self._connect(hop, hooked):
                        return s._take(self.hop_text)
                    if not await self._deliver(hop, hooked):
                        return s._take(self.hop_text)  # the session broke: a new one
                    count += 1
                    if count >= PER_CONNECTION:
                        return s._take(self.hop_text)
            current = s._take(self.hop_text)
            if current is None and self.client is not None:
                deadline = time.monotonic() + IDLE_REUSE
                while current is None and time.monotonic() < deadline and not s._stopping:
                    s.wake()
                    await asyncio.sleep(0.1)
                    current = s._take(self.hop_text)
        return current  # taken but not started when the scheduler stops

    async def _stored(self, job: Job) -> None:
        """Recipients kept in the store that asked for a success notice (NOTIFY=SUCCESS)."""
        envelope, raw = await self._message(job.queue_id)
        reply = local_reply(250, "2.0.0", "delivered to the message store")
        outcomes = {
            e.recipient: Outcome("delivered", dict(reply), "delivered") for e in job.entries
        }
        await self.s.finish(job, outcomes, None, envelope, raw)

    async def _hooked(self, hop: NextHop, job: Job) -> tuple[NextHop, Job | None]:
        """The ``delivery`` hooks: a recipient refused, deferred, or sent elsewhere."""
        hooks = self.s.hooks
        if hooks is None or not hooks.has("delivery"):
            return hop, job
        keep: list[QueueEntry] = []
        outcomes: dict[str, Outcome] = {}
        moved: list[EntryUpdate] = []
        for entry in job.entries:
            ctx = HookContext(
                stage="delivery",
                client_ip="",
                client_port=0,
                rcpt=entry.recipient,
                queue_id=entry.queue_id,
                next_hop=self.hop_text,
            )
            reply = await hooks.run(ctx)
            if reply is not None and reply.code >= 400:
                state = "bounced" if reply.code >= 500 else "deferred"
                outcomes[entry.recipient] = Outcome(state, reply_dict(reply, "policy"))
            elif ctx.next_hop and ctx.next_hop != self.hop_text:
                try:
                    parse_next_hop(ctx.next_hop)
                except ValueError:
                    outcomes[entry.recipient] = Outcome(
                        "deferred",
                        local_reply(451, "4.3.5", f"bad next hop from a hook: {ctx.next_hop}"),
                    )
                    continue
                self.s._loaded.discard(entry.key)
                moved.append(
                    EntryUpdate(
                        entry.queue_id,
                        entry.recipient,
                        "queued",
                        self.s.clock(),
                        None,
                        attempted=False,
                    )
                )
                await asyncio.to_thread(
                    self.s.queue.set_next_hop, entry.queue_id, entry.recipient, ctx.next_hop
                )
            else:
                keep.append(entry)
        if outcomes:
            envelope, raw = await self._message(job.queue_id)
            await self.s.finish(
                Job(job.queue_id, [e for e in job.entries if e.recipient in outcomes]),
                outcomes,
                None,
                envelope,
                raw,
            )
        if moved:
            await asyncio.to_thread(self.s.queue.record, moved)
            self.s.wake()
        return hop, (Job(job.queue_id, keep) if keep else None)

    async def _message(self, queue_id: str) -> tuple[Envelope | None, bytes | None]:
        return await self.s.read_message(queue_id)

    def _tls_mode(self, hop: NextHop, domain: str) -> str:
        policy = self.s.settings.tls_policy
        if hop.kind == "lmtp":
            return "off"
        level = policy.get(domain) or policy.get(hop.host.lower()) or "may"
        return _TLS_MODES.get(level, "opportunistic")

    async def _hosts(self, hop: NextHop, job: Job) -> tuple[list[MailHost], str | None] | None:
        """The hosts to try and, under MTA-STS enforce, the policy's say; None when the
        job was decided already (no route)."""
        s = self.s
        if hop.kind != "mx":
            if hop.path is not None:
                return [MailHost(hop.path, 0, (hop.path,), 0)], None
            try:
                addresses = (
                    await s.resolver.addresses(hop.host) if not _is_ip(hop.host) else [hop.host]
                )
            except Exception as exc:
                await self._fail_all(job, local_reply(451, "4.4.3", f"DNS: {hop.host}: {exc}"))
                return None
            if not addresses:
                await self._fail_all(
                    job, local_reply(550, "5.4.4", f"{hop.host} has no address"), bounce=True
                )
                return None
            return [MailHost(hop.host, 0, tuple(addresses), hop.port)], None
        try:
            hosts = await s.router.route(hop.host)
        except NoRoute as exc:
            enhanced = "4.4.3" if exc.temporary else "5.1.2"
            code = 451 if exc.temporary else 550
            await self._fail_all(
                job, local_reply(code, enhanced, str(exc)), bounce=not exc.temporary
            )
            return None
        except Exception as exc:  # DNS trouble defers, never bounces
            await self._fail_all(job, local_reply(451, "4.4.3", f"DNS: {hop.host}: {exc}"))
            return None
        hosts = self._without_self(hosts)
        if not hosts:
            # RFC 5321 section 5.1: we are the best MX for a domain we do not serve.
            await self._fail_all(
                job,
                local_reply(554, "5.4.6", f"mail for {hop.host} loops back to myself"),
                bounce=True,
            )
            return None
        sts_mode = None
        if s.mtasts is not None and s.settings.mta_sts:
            try:
                policy = await s.mtasts.policy(hop.host)
            except Exception as exc:
                policy = None
                log.warning("MTA-STS %s: %s", hop.host, exc)
            if policy is not None and policy.mode in ("enforce", "testing"):
                matching = [h for h in hosts if policy.matches(h.name)]
                if policy.mode == "testing":
                    if len(matching) != len(hosts):
                        log.info(
                            "MTA-STS testing %s: enforce would skip %s",
                            hop.host,
                            ", ".join(h.name for h in hosts if h not in matching),
                            extra={"event": "mta_sts_testing", "domain": hop.host},
                        )
                else:
                    if not matching:
                        await self._fail_all(
                            job,
                            local_reply(
                                451,
                                "4.7.5",
                                f"MTA-STS: no MX host of {hop.host} matches its policy",
                            ),
                        )
                        return None
                    hosts = matching
                    sts_mode = "enforce"
        return hosts, sts_mode

    def _without_self(self, hosts: list[MailHost]) -> list[MailHost]:
        own = self.s.settings.own_addresses
        name = self.s.settings.hostname.lower()
        mine = [
            h.preference
            for h in hosts
            if h.name.lower() == name or any((a, h.port) in own for a in h.addresses)
        ]
        if not mine:
            return hosts
        # RFC 5321 section 5.1: drop ourselves and every MX no better than us.
        best = min(mine)
        return [h for h in hosts if h.preference < best]

    async def _connect(self, hop: NextHop, job: Job) -> bool:
        """Open a session to the first host that answers; False when none did (job decided)."""
        s = self.s
        domain = hop.host if hop.kind == "mx" else job.entries[0].recipient.rpartition("@")[2]
        found = await self._hosts(hop, job)
        if found is None:
            return False
        hosts, sts = found
        mode = "verify" if sts == "enforce" else self._tls_mode(hop, domain.lower())
        last: dict[str, Any] = local_reply(451, "4.4.1", "no host answered")
        for host in hosts:
            for address in host.addresses:
                where = (
                    f"{host.name}[unix]"
                    if hop.path is not None
                    else f"{host.name}[{address}]:{host.port}"
                )
                for tls in [mode, "off"] if mode == "opportunistic" else [mode]:
                    self.lines = []
                    client = self._client(hop, host, address, tls)
                    try:
                        s.connections_made += 1
                        await client.connect()
                        if (
                            hop.kind == "smtp"
                            and s.settings.relay_login is not None
                            and (self.hop_text == s.settings.routing.relay_host)
                        ):
                            await client.login(*s.settings.relay_login)
                    except TLSFailed as exc:
                        client.close()
                        last = reply_dict(exc.reply, where, f"TLS: {exc}")
                        if last["code"] == 0:
                            last = local_reply(451, "4.7.5", f"{where}: TLS: {exc}")
                        continue  # opportunistic: once more without STARTTLS
                    except SMTPClientError as exc:
                        # Refused or unreachable (a 4xx or 5xx banner, EHLO or AUTH):
                        # the next address or host (RFC 5321 section 5.1).
                        client.close()
                        last = reply_dict(exc.reply, where, str(exc))
                        if last["code"] == 0:
                            last = local_reply(451, "4.4.1", f"{where}: {exc}")
                        break
                    except (OSError, TimeoutError) as exc:
                        client.close()
                        last = local_reply(451, "4.4.1", f"{where}: {exc or type(exc).__name__}")
                        break
                    self.client = client
                    self.where = where
                    self.preamble = len(self.lines)
                    s._down.pop(self.hop_text, None)
                    return True
        # RFC 5321 section 4.5.4.1: no host answered: wait before trying again.
        s._down[self.hop_text] = (s.clock() + min(s.settings.retry_min, 300.0), last)
        await self._fail_all(job, last)
        return False

    def _client(self, hop: NextHop, host: MailHost, address: str, tls: str) -> SMTPClient:
        s = self.s
        kwargs: dict[str, Any] = {}
        if hop.kind == "lmtp":
            kwargs["lmtp"] = True
        ssl_context = s.settings.ssl_context
        if tls == "verify" and ssl_context is None:
            ssl_context = ssl.create_default_context()
        return SMTPClient(
            f"unix:{hop.path}" if hop.path is not None else address,
            host.port,
            helo_name=s.settings.hostname,
            tls=tls,  # type: ignore[arg-type]
            ssl_context=ssl_context,
            tls_server_name=host.name,
            timeouts=s.settings.timeouts,
            transcript=self._say,
            allow_plaintext_auth=False,
            **kwargs,
        )

    async def _fail_all(self, job: Job, reply: dict[str, Any], *, bounce: bool = False) -> None:
        """Every recipient of the job (and of the jobs waiting for this hop) gets ``reply``."""
        s = self.s
        jobs = [job]
        if not bounce:
            waiting = s._ready.pop(self.hop_text, deque())
            jobs.extend(waiting)
        for one in jobs:
            envelope: Envelope | None = None
            raw: bytes | None = None
            if bounce or s.deferral_needs_message(one.entries):
                envelope, raw = await self._message(one.queue_id)
            state = "bounced" if bounce else "deferred"
            outcomes = {e.recipient: Outcome(state, dict(reply)) for e in one.entries}
            attempt = Attempt(
                one.queue_id,
                s.clock(),
                self.hop_text,
                reply.get("host", ""),
                {r: o.reply for r, o in outcomes.items()},
                "\n".join(self.lines),
            )
            await s.finish(one, outcomes, attempt, envelope, raw)

    async def _deliver(self, hop: NextHop, job: Job) -> bool:
        """One message over the open session; False when the session broke."""
        s = self.s
        client = self.client
        assert client is not None
        envelope, raw = await self._message(job.queue_id)
        s.prefetch(self.hop_text)  # the next message is read while this one is sent
        start = len(self.lines)
        if envelope is None or raw is None:
            # Not readable yet (a Maildir message between its entries file and
            # new/), or deleted meanwhile (which removes its pending entries):
            # look again shortly, without counting an attempt.
            later = s.clock() + MISSING_BODY_DELAY
            s._write(
                [
                    EntryUpdate(e.queue_id, e.recipient, "queued", later, None, attempted=False)
                    for e in job.entries
                ],
                None,
                None,
            )
            for e in job.entries:
                s._loaded.discard(e.key)
            return True
        s.attempts += 1
        rcpts = [e.recipient for e in job.entries]
        ext = client.extensions
        dsn = "DSN" in ext
        mail_params: dict[str, str | None] = {}
        rcpt_params: dict[str, dict[str, str | None]] = {}
        if dsn:
            # RFC 3461 section 5.2.1: pass the DSN parameters on to a next hop that offers DSN.
            for key in ("RET", "ENVID"):
                value = envelope.mail_params.get(key)
                if value:
                    mail_params[key] = value
            for e in job.entries:
                params: dict[str, str | None] = {}
                if e.notify:
                    params["NOTIFY"] = e.notify
                if e.orcpt:
                    params["ORCPT"] = e.orcpt
                if params:
                    rcpt_params[e.recipient] = params
        smtputf8 = "SMTPUTF8" in {k.upper() for k in envelope.mail_params}
        outcomes: dict[str, Outcome] = {}
        broke = False
        try:
            result = await client.send_message(
                envelope.mail_from,
                rcpts,
                raw,
                smtputf8=smtputf8 or None,
                mail_params=mail_params or None,
                rcpt_params=rcpt_params or None,
            )
        except MessageNotSupported as exc:
            text = str(exc)
            enhanced = "5.6.7" if "SMTPUTF8" in text else "5.3.4" if "SIZE" in text else "5.6.3"
            for r in rcpts:
                outcomes[r] = Outcome(
                    "bounced", local_reply(554, enhanced, f"{self.where}: {text}")
                )
        except SMTPClientError as exc:
            refused = getattr(exc, "refused", None)
            if isinstance(refused, Mapping):
                for r in rcpts:
                    reply = refused.get(r)
                    outcomes[r] = self._judge(reply, str(exc))
            else:
                for r in rcpts:
                    outcomes[r] = self._judge(exc.reply, str(exc))
            broke = isinstance(exc, ConnectionFailed) or not client.connected
        except (OSError, TimeoutError) as exc:
            for r in rcpts:
                outcomes[r] = Outcome("deferred", local_reply(451, "4.4.2", f"{self.where}: {exc}"))
            broke = True
        else:
            for r in rcpts:
                if r in result.refused:
                    outcomes[r] = self._judge(result.refused[r], "")
                elif r in result.failed:
                    outcomes[r] = self._judge(result.failed[r], "")
                elif r in result.delivered:
                    reply = result.delivered[r]
                    action = "delivered" if hop.kind == "lmtp" else (None if dsn else "relayed")
                    outcomes[r] = Outcome("delivered", reply_dict(reply, self.where), action)
                else:
                    outcomes[r] = Outcome("deferred", local_reply(451, "4.4.2", "no reply"))
        transcript = "\n".join(self.lines[: self.preamble] + self.lines[start:])
        attempt = Attempt(
            job.queue_id,
            s.clock(),
            self.hop_text,
            self.where,
            {r: o.reply for r, o in outcomes.items()},
            transcript,
        )
        await s.finish(job, outcomes, attempt, envelope, raw)
        return not broke and client.connected

    def _judge(self, reply: Reply | None, text: str) -> Outcome:
        """A refusal's outcome: 5xx bounces, 4xx (or none) defers (RFC 5321 section 4.2.1)."""
        if reply is None:
            return Outcome("deferred", local_reply(451, "4.4.2", f"{self.where}: {text}"))
        state = "bounced" if reply.code >= 500 else "deferred"
        action = "failed" if state == "bounced" else None
        return Outcome(state, reply_dict(reply, self.where), action)


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
