"""MTA-STS (RFC 8461): whether a domain asks for verified TLS to its MX hosts, and to which.

Delivery asks ``MTASTS.policy(domain)`` before connecting to a domain's MX
hosts. The ``_mta-sts`` TXT record is looked up through ehlo's resolver;
when it names a policy id other than the cached policy's (or nothing is
cached), the policy is fetched over HTTPS from
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (the certificate must
verify for that name; no redirects; status 200, ``text/plain``, at most
64 KiB, within the timeout), parsed, and cached per domain for its
``max_age``. When no live policy can be had (the TXT lookup fails or finds
no valid record, the fetch or the parse fails), an unexpired cached policy
still applies; without one the answer is ``None``: deliver as if the domain
had not published MTA-STS. Each failed fetch is logged as one line (logger
``ehlo.delivery``) naming the domain and the reason.

What a policy means for a delivery (``enforce``, ``testing``, ``none``) is
the caller's business; ``Policy.matches`` says whether an MX host is one the
policy names. ``parse_txt`` and ``parse_policy`` are the pure parsers. The
HTTPS fetch itself (aiohttp, loaded only when a first policy is fetched) is
in ``ehlo.delivery._mtasts_fetch``, with the adapter that makes aiohttp
resolve names through ehlo's resolver and never the system's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from .._cache import TTLCache
from .._net import is_hostname
from ..dns import DNSTempError, Resolver

if TYPE_CHECKING:
    from ._mtasts_fetch import Fetcher

__all__ = [
    "MAX_AGE_LIMIT",
    "MAX_POLICY_SIZE",
    "MODES",
    "MTASTS",
    "Policy",
    "PolicyFetchError",
    "parse_policy",
    "parse_txt",
]

log = logging.getLogger("ehlo.delivery")

# RFC 8461 section 3.2: max_age is at most 31557600 seconds (about a year).
MAX_AGE_LIMIT = 31_557_600
# RFC 8461 section 3.3: senders may refuse policy bodies larger than 64 KiB.
MAX_POLICY_SIZE = 64 * 1024
MODES = ("enforce", "testing", "none")
WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"

_WSP = " \t"
# RFC 8461 section 3.1: sts-id = "id=" 1*32(ALPHA / DIGIT).
_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
# RFC 8461 sections 3.1 and 3.2: sts-ext-name and sts-policy-ext-name (which
# also covers version, mode, mx and max_age).
_FIELD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
# RFC 8461 section 3.1: sts-ext-value, visible ASCII but "=" and ";".
_TXT_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
# RFC 8461 section 3.2: sts-policy-ext-value, visible characters (UTF-8
# allowed) with inner spaces; the surrounding white space is already gone.
_POLICY_VALUE = re.compile(r"[^\x00-\x20\x7f](?:[^\x00-\x1f\x7f]*[^\x00-\x20\x7f])?")
# RFC 8461 section 3.2: sts-policy-max-age-value = 1*10(DIGIT).
_MAX_AGE = re.compile(r"[0-9]{1,10}")


class PolicyFetchError(Exception):
    """The policy could not be fetched; the message is the one-line reason."""


def _host_key(name: str) -> str | None:
    """``name`` as compared: lowercase A-labels, without one trailing dot; None if not a name."""
    name = name.strip().removesuffix(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    name = name.lower()
    return name if is_hostname(name) else None


def _pattern_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        # RFC 8461 section 4.1: the wildcard stands for exactly one leftmost label.
        label, dot, rest = host.partition(".")
        return bool(label and dot) and rest == pattern[2:]
    return host == pattern


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """A domain's MTA-STS policy as fetched: its mode, the MX patterns, how long it holds.

    ``mx`` holds the patterns lowercase, without trailing dots; ``fetched_at``
    is the ``MTASTS`` clock's time (seconds) when the policy was fetched.
    """

    domain: str
    id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    fetched_at: float

    def matches(self, mx_host: str) -> bool:
        """Whether ``mx_host`` is named by one of the policy's ``mx`` patterns.

        RFC 8461 section 4.1: an exact name, or ``*.example.org`` standing for
        one more leftmost label (``mail.example.org``, not ``example.org`` nor
        ``a.b.example.org``); without regard to case or a trailing dot.
        """
        host = _host_key(mx_host)
        return host is not None and any(_pattern_matches(p, host) for p in self.mx)

    def expired(self, now: float) -> bool:
        """Whether ``max_age`` seconds have passed since the fetch at ``now``."""
        # RFC 8461 section 5.1: a policy applies while time since fetch is below max_age.
        return now >= self.fetched_at + self.max_age


def parse_txt(records: Iterable[str]) -> str | None:
    """The policy id of the one valid ``v=STSv1; id=...`` record among ``records``, else None.

    ``records`` are TXT record texts (character-strings already joined).
    """
    # RFC 8461 section 3.1: records that do not begin with the version field are discarded.
    found = [r for r in records if r.split(";", 1)[0].rstrip(_WSP) == "v=STSv1"]
    # RFC 8461 section 3.1: not exactly one record, or an invalid one: no policy.
    if len(found) != 1:
        return None
    fields = found[0].split(";")[1:]
    if fields and not fields[-1].strip(_WSP):
        fields.pop()  # the optional ";" at the end
    policy_id = None
    for field in fields:
        name, equals, value = field.strip(_WSP).partition("=")
        if not equals:
            return None
        if name == "id":
            if not _TXT_ID.fullmatch(value):
                return None
            policy_id = policy_id or value
        # RFC 8461 section 3.2: unknown fields are ignored, if they are well formed.
        elif not (_FIELD_NAME.fullmatch(name) and _TXT_EXT_VALUE.fullmatch(value)):
            return None
    return policy_id


def _mx_pattern(value: str) -> str:
    pattern = value.lower().removesuffix(".")
    base = pattern[2:] if pattern.startswith("*.") else pattern
    # RFC 8461 section 3.2: a Domain, optionally "*." first; IDNs as A-labels.
    if not is_hostname(base):
        raise ValueError(f"mx {value!r} is not a host name or a *.domain pattern")
    return pattern


def parse_policy(text: str, *, domain: str, id: str, now: float) -> Policy:
    """The policy in ``text`` (the body of ``mta-sts.txt``) for ``domain``, fetched at ``now``.

    ``id`` is the id from the TXT record. Raises ``ValueError`` with a
    one-line reason when ``text`` is not a valid STSv1 policy.
    """
    fields: dict[str, str] = {}
    mx: list[str] = []
    # RFC 8461 section 3.2: one "key: value" field per line, lines ending in CRLF or LF.
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r")
        if not line.strip(_WSP):
            continue  # after the last line end (or a blank line)
        key, colon, value = line.partition(":")
        value = value.strip(_WSP)
        if not (colon and _FIELD_NAME.fullmatch(key) and _POLICY_VALUE.fullmatch(value)):
            raise ValueError(f"line {number} is not a 'key: value' field: {line[:60]!r}")
        if key == "mx":
            mx.append(_mx_pattern(value))
        else:
            # RFC 8461 section 3.2: unknown keys are ignored; of a repeated key, the first counts.
            fields.setdefault(key, value)
    version = fields.get("version")
    if version != "STSv1":
        raise ValueError("no version field" if version is None else f"version {version!r}")
    mode = fields.get("mode")
    if mode not in MODES:
        raise ValueError("no mode field" if mode is None else f"mode {mode!r}")
    max_age = fields.get("max_age")
    if max_age is None or not _MAX_AGE.fullmatch(max_age):
        raise ValueError("no max_age field" if max_age is None else f"max_age {max_age!r}")
    # RFC 8461 section 3.2: mx names the allowed MX hosts; a "none" policy needs none.
    if not mx and mode != "none":
        raise ValueError("no mx field")
    return Policy(
        domain=domain,
        id=id,
        mode=mode,
        mx=tuple(dict.fromkeys(mx)),
        max_age=min(int(max_age), MAX_AGE_LIMIT),
        fetched_at=now,
    )


class MTASTS:
    """MTA-STS policies of recipient domains: discovered, fetched, parsed and cached.

    ``resolver`` answers every lookup: the TXT records and the address of
    ``mta-sts.<domain>`` (never the system resolver). ``port`` is the HTTPS
    port (443; tests use others); ``ssl_context`` verifies the policy host's
    certificate (default: the system's CAs); ``timeout`` bounds each fetch in
    seconds, from connecting to the last octet; ``clock`` (seconds) dates
    fetches and expiry; at most ``max_entries`` domains' policies are kept,
    the least recently used dropped first. After a failed fetch, the same
    domain and id are not fetched again for ``retry_after`` seconds (a new
    id in the TXT record is fetched at once). One instance serves one event
    loop; ``close`` it when done.
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        port: int = 443,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        max_entries: int = 10_000,
        retry_after: float = 300.0,
    ) -> None:
        if not 0 < port < 65536:
            raise ValueError("port must be 1 to 65535")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if retry_after < 0:
            raise ValueError("retry_after must not be negative")
        self.resolver = resolver
        self.port = port
        self.ssl_context = ssl_context
        self.timeout = timeout
        self._clock = clock
        self._cache: TTLCache[str, Policy] = TTLCache(max_entries, clock=clock)
        # (domain, id) whose fetch failed lately: not fetched again until retry_after.
        self._failed: TTLCache[tuple[str, str], str] = TTLCache(max_entries, clock=clock)
        self.retry_after = retry_after
        self._inflight: dict[tuple[str, str], asyncio.Task[Policy | None]] = {}
        self._fetcher: Fetcher | None = None
        self.fetches = 0  # HTTPS fetches started

    def cached(self, domain: str) -> Policy | None:
        """The unexpired cached policy of ``domain``, if any; never looks anything up."""
        name = _host_key(domain)
        return None if name is None else self._cache.peek(name)

    async def policy(self, domain: str) -> Policy | None:
        """The policy that applies to mail for ``domain`` now; None when there is none.

        Never raises for DNS or HTTPS trouble: a failure keeps an unexpired
        cached policy, or answers None without one.
        """
        name = _host_key(domain)
        if name is None:
            return None
        cached = self._cache.get(name)
        try:
            answer = await self.resolver.lookup(f"_mta-sts.{name}", "TXT")
        except (DNSTempError, ValueError) as exc:
            # RFC 8461 section 3.3: no live policy discovered via DNS: the cached one applies.
            log.debug("MTA-STS TXT lookup for %s failed: %s", name, exc)
            return cached
        policy_id = parse_txt(answer.values)
        if policy_id is None:
            # RFC 8461 sections 3.3 and 8.3: a record gone (or broken) while a cached policy
            # is unexpired does not end it; a domain leaves by publishing mode "none" first.
            return cached
        if cached is not None and cached.id == policy_id:
            # RFC 8461 section 5.1: an unexpired cached policy with the current id is used.
            return cached
        # RFC 8461 section 3.3: senders may limit how often they try a failing policy host.
        if self._failed.get((name, policy_id)) is not None:
            return cached
        fetched = await self._fetch_once(name, policy_id)
        # RFC 8461 section 3.3: no policy fetched: an unexpired cached policy still
        # applies; without one, deliver as though the domain had no MTA-STS.
        return fetched if fetched is not None else self._cache.get(name)

    async def _fetch_once(self, domain: str, policy_id: str) -> Policy | None:
        """Fetch (domain, id) once, however many callers ask for it at the same time."""
        key = (domain, policy_id)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch(domain, policy_id))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        # Shielded: a caller that gives up does not cancel the others' fetch.
        return await asyncio.shield(task)

    def _finished(self, key: tuple[str, str], task: asyncio.Task[Policy | None]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved, even when every caller went away

    async def _fetch(self, domain: str, policy_id: str) -> Policy | None:
        if self._fetcher is None:
            from ._mtasts_fetch import Fetcher  # aiohttp: loaded on the first fetch only

            self._fetcher = Fetcher(
                self.resolver, port=self.port, ssl_context=self.ssl_context, timeout=self.timeout
            )
        self.fetches += 1
        try:
            text = await self._fetcher.fetch(f"mta-sts.{domain}")
            policy = parse_policy(text, domain=domain, id=policy_id, now=self._clock())
        except Exception as exc:  # whatever fails, delivery goes on (without this policy)
            if isinstance(exc, PolicyFetchError):
                reason = str(exc)
            elif isinstance(exc, ValueError):
                reason = f"invalid policy: {exc}"
            else:
                reason = f"{type(exc).__name__}: {exc}"
            self._failure(domain, policy_id, reason)
            return None
        self._cache.put(domain, policy, policy.fetched_at + policy.max_age - self._clock())
        return policy

    def _failure(self, domain: str, policy_id: str, reason: str) -> None:
        """Log a failed fetch (one line) and remember it for ``retry_after`` seconds."""
        self._failed.put((domain, policy_id), reason, self.retry_after)
        kept = self._cache.peek(domain)
        log.warning(
            "MTA-STS policy of %s (id %s) not used: %s; %s",
            domain,
            policy_id,
            reason,
            f"the cached policy (id {kept.id}) still applies" if kept else "no policy applies",
        )

    async def close(self) -> None:
        """Stop fetches under way and close the HTTPS connections."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._fetcher is not None:
            await self._fetcher.close()
            self._fetcher = None
