"""SPF for the HELO identity, evaluated by pyspf with every DNS query through ehlo's resolver.

This module owns the ``spf_helo`` evaluation: RFC 7208 ``check_host()`` for
the HELO/EHLO name (RFC 7208 section 2.3), its result, a readable
explanation, the SPF record used and the DNS evidence.

pyspf (``import spf``) does the SPF logic: record selection, mechanisms,
macros, the processing limits. It is synchronous and makes its DNS queries
through one method, ``spf.query.dns(name, qtype, ...)``, which normally calls
the module-level ``spf.DNSLookup``. ``_HeloQuery`` overrides that method, so
each query pyspf asks goes to the asyncio ``Resolver`` (its shared TTL cache,
any per-session cap wrapped around it) and nothing in the ``spf`` module is
patched. The evaluation runs in a worker thread of a small pool of its own;
each DNS query is handed back to the event loop with
``asyncio.run_coroutine_threadsafe`` and waited for with what remains of the
overall deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import threading
import time
from typing import Any, Literal

import spf as pyspf  # type: ignore[import-untyped]

from ehlo.dns import DNSTempError, Lookup, Resolver

from .._net import is_hostname

__all__ = ["SpfOutcome", "SpfResult", "spf_helo"]

SpfResult = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
"""The results of RFC 7208 section 2.6."""

_RESULTS: frozenset[str] = frozenset(
    ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
)

# Worker threads for evaluations (each mostly waits on DNS). A pool of its own,
# so that SPF never starves the default executor that storage uses.
MAX_WORKERS = 32
# The worker's own deadline is this much later than the caller's: normally the
# caller's timeout fires first and abandons the worker; this is a backstop.
_WORKER_GRACE = 0.5
# Longest domain-supplied explanation (exp=) kept in our explanation.
_MAX_DOMAIN_EXPLANATION = 200

_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class SpfOutcome:
    """One SPF evaluation of a HELO name.

    ``result`` is the RFC 7208 result; ``explanation`` says why in words
    (with the matching mechanism when there is one); ``record`` is the SPF
    record of the HELO domain, when one was found; ``lookups`` is the DNS
    evidence, one ``"NAME TYPE -> answers"`` line per distinct query.
    """

    result: SpfResult
    explanation: str
    record: str | None = None
    lookups: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        """The outcome as plain JSON-able data."""
        return {
            "result": self.result,
            "explanation": self.explanation,
            "record": self.record,
            "lookups": list(self.lookups),
        }


def _get_executor() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=MAX_WORKERS, thread_name_prefix="ehlo-spf"
            )
        return _executor


def helo_domain(helo: str) -> str | None:
    """The HELO name as a lowercase ASCII domain without trailing dot, or None.

    None for an address literal, a bare IP address, a single label and
    anything that is not a well-formed domain name.
    """
    # RFC 7208 section 2.3: the HELO check only applies to a fully qualified domain name.
    text = helo.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text or text.startswith("["):  # RFC 5321 section 4.1.3 address literal
        return None
    try:
        ipaddress.ip_address(text)
        return None  # a bare IP address is not a domain
    except ValueError:
        pass
    try:
        text = text.encode("ascii").decode("ascii")
    except UnicodeError:
        try:  # U-labels (RFC 6531 greetings) as A-labels
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    text = text.lower()
    labels = text.split(".")
    # RFC 7208 section 4.3: malformed or single-label domains give "none".
    if len(text) > 253 or len(labels) < 2:
        return None
    # One trailing dot was taken off above; a second one is an empty label.
    if text.endswith(".") or not is_hostname(text, underscore=True):
        return None
    if labels[-1].isdigit():  # an all-numeric top label is not a domain
        return None
    return text


def _answers(lookup: Lookup) -> str:
    if lookup.nxdomain:
        answers = "NXDOMAIN"
    elif not lookup.values:
        answers = "no records"
    elif lookup.rdtype in ("TXT", "SPF"):
        answers = ", ".join(f'"{value}"' for value in lookup.values)
    else:
        answers = ", ".join(lookup.values)
    chain = "".join(f"CNAME {cname} -> " for cname in lookup.cnames)
    return f"{lookup.name} {lookup.rdtype} -> {chain}{answers}"


class _Bridge:
    """Runs the resolver's lookups on the event loop for a worker thread, within a deadline."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, resolver: Resolver, deadline: float
    ) -> None:
        self._loop = loop
        self._resolver = resolver
        self._deadline = deadline  # time.monotonic()
        self._lock = threading.Lock()
        self._aborted = False
        self._pending: concurrent.futures.Future[Lookup] | None = None
        self._pending_query = ""
        self._evidence: list[str] = []
        self.record: str | None = None

    def note(self, line: str) -> None:
        with self._lock:
            if not self._aborted:  # after abort() the evidence is final
                self._evidence.append(line)

    def evidence(self) -> list[str]:
        with self._lock:
            return list(self._evidence)

    def lookup(self, name: str, rdtype: str) -> Lookup:
        """``resolver.lookup(name, rdtype)``, from the worker thread.

        Raises ``DNSTempError`` when the lookup fails for now, the deadline
        passes or the evaluation was abandoned; ``ValueError`` for a name
        that is not valid in DNS.
        """
        with self._lock:
            if self._aborted:
                raise DNSTempError("SPF evaluation abandoned")
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise DNSTempError("SPF evaluation time limit reached")
            coro = self._resolver.lookup(name, rdtype)
            try:
                future = asyncio.run_coroutine_threadsafe(coro, self._loop)
            except RuntimeError:  # the loop is closed
                coro.close()
                raise DNSTempError("event loop gone") from None
            self._pending = future
            self._pending_query = f"{name} {rdtype}"
        try:
            return future.result(timeout=remaining)
        except TimeoutError:
            future.cancel()
            raise DNSTempError(
                f"SPF evaluation time limit reached looking up {name} {rdtype}"
            ) from None
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            raise DNSTempError(f"lookup of {name} {rdtype} cancelled") from None
        finally:
            with self._lock:
                self._pending = None

    def abort(self) -> None:
        """Stop: the query in flight is cancelled and no new one starts."""
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
            if self._pending is not None and self._pending.cancel():
                self._evidence.append(f"{self._pending_query} -> no answer in time")


class _HeloQuery(pyspf.query):  # type: ignore[misc]
    """A pyspf query for the HELO identity whose DNS goes through a ``_Bridge``.

    ``dns()`` is pyspf's single DNS entry point (``dns_txt``, ``dns_spf``,
    ``dns_a``, ``dns_mx``, ``dns_ptr`` and ``validated_ptrs`` all call it);
    this override keeps its contract: a list of answers, ``[]`` for none,
    CNAMEs followed, void lookups counted, ``TempError`` for a failure.
    """

    def __init__(self, bridge: _Bridge, ip: str, helo: str) -> None:
        # RFC 7208 section 2.3: the HELO check uses "postmaster@" + the HELO name
        # as <sender>; pyspf does exactly that for an empty sender.
        super().__init__(i=ip, s="", h=helo, strict=True)
        self._bridge = bridge
        self._answers: dict[tuple[str, str], list[Any]] = {}
        self._top_done = False
        self.top_lookup: Lookup | None = None

    def dns_spf(self, domain: str) -> Any:
        top = not self._top_done
        self._top_done = True
        record = super().dns_spf(domain)
        if top:
            self._bridge.record = record
        return record

    def dns(
        self,
        name: Any,
        qtype: str,
        cnames: Any = None,
        ignore_void: bool = False,
    ) -> list[Any]:
        if not name:
            raise pyspf.PermError("empty domain name to look up")
        text = str(name)
        if text.endswith("."):
            text = text[:-1]
        # As pyspf itself: a name DNS cannot carry has no records (not a void lookup).
        if not all(0 < len(label) < 64 for label in text.split(".")):
            return []
        text = text.lower()
        key = (text, qtype)
        result = self._answers.get(key)
        if result is None:
            result = self._ask(text, qtype)
            self._answers[key] = result
        # RFC 7208 section 4.6.4: more than 2 void lookups is a permerror.
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > pyspf.MAX_VOID_LOOKUPS:
                raise pyspf.PermError(f"Void lookup limit of {pyspf.MAX_VOID_LOOKUPS} exceeded")
        return list(result)

    def _ask(self, name: str, qtype: str) -> list[Any]:
        try:
            lookup = self._bridge.lookup(name, qtype)
        except DNSTempError as exc:
            self._bridge.note(f"{name} {qtype} -> temperror: {exc}")
            # RFC 7208 section 2.6.6: a transient DNS error gives temperror.
            # (pyspf writes "SPF Temporary Error: " before it; say "DNS" once.)
            text = str(exc)
            raise pyspf.TempError(text if text.startswith("DNS ") else f"DNS {text}") from None
        except ValueError:
            self._bridge.note(f"{name} {qtype} -> not a valid DNS name")
            return []
        except Exception as exc:  # anything else the resolver (or a wrapper) raised
            self._bridge.note(f"{name} {qtype} -> error: {exc}")
            raise pyspf.TempError(f"DNS {type(exc).__name__}: {exc}") from None
        self._bridge.note(_answers(lookup))
        if self.top_lookup is None and qtype == "TXT":
            self.top_lookup = lookup
        return _to_pyspf(lookup, qtype)


def _to_pyspf(lookup: Lookup, qtype: str) -> list[Any]:
    """Answers in the shapes pyspf's DNS drivers give them."""
    if qtype in ("TXT", "SPF"):
        # One entry per record, a list of byte strings (ours are already joined).
        return [[value.encode("utf-8")] for value in lookup.values]
    if qtype == "MX":
        out: list[Any] = []
        for value in lookup.values:
            preference, _, exchange = value.partition(" ")
            if exchange in ("", ".", "@"):
                continue  # RFC 7505 null MX: no exchange to look up
            out.append((int(preference), exchange))
        return out
    return list(lookup.values)  # A, AAAA: addresses; PTR: names


def _clean(text: str) -> str:
    """Domain-supplied text made printable and short."""
    printable = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    if len(printable) > _MAX_DOMAIN_EXPLANATION:
        printable = printable[: _MAX_DOMAIN_EXPLANATION - 3] + "..."
    return printable


def _describe(query: _HeloQuery, result: str, exp: str, ip: str, domain: str) -> str:
    mechanism = query.mechanism
    matched = f"matched {mechanism}" if mechanism else "no mechanism matched"
    if result == "pass":
        text = f"{ip} is authorised to use HELO {domain} ({matched})"
    elif result == "fail":
        text = f"{domain} does not authorise {ip} ({matched})"
    elif result == "softfail":
        text = f"{domain} discourages but does not forbid {ip} ({matched})"
    elif result == "neutral":
        text = f"{domain} makes no assertion about {ip} ({matched})"
    elif result == "none":
        top = query.top_lookup
        if top is not None and top.nxdomain:
            text = f"{domain} does not exist (NXDOMAIN), so it has no SPF record"
        else:
            text = f"{domain} publishes no SPF record"
    else:  # permerror, temperror: pyspf's message says what went wrong
        return exp
    if result in ("fail", "softfail") and exp and exp != pyspf.EXPLANATIONS.get(result):
        # RFC 7208 section 6.2: the domain's own explanation (exp=), third-party text.
        text += f'; the domain explains: "{_clean(exp)}"'
    return text


def _evaluate(bridge: _Bridge, ip: str, domain: str) -> tuple[SpfResult, str]:
    """Run pyspf in this (worker) thread; never raises."""
    try:
        query = _HeloQuery(bridge, ip, domain)
        result, _code, exp = query.check()
        result = str(result)
        if result not in _RESULTS:  # "ambiguous" exists only in pyspf's harsh mode
            return "temperror", f"unexpected SPF result {result!r}: {exp}"
        return result, _describe(query, result, str(exp), ip, domain)  # type: ignore[return-value]
    except Exception as exc:
        return "temperror", f"SPF evaluation failed: {type(exc).__name__}: {exc}"


async def spf_helo(
    resolver: Resolver, client_ip: str, helo: str, *, timeout: float = 10.0
) -> SpfOutcome:
    """SPF ``check_host()`` for the HELO identity ``helo`` and the client ``client_ip``.

    Every DNS query goes through ``resolver``. The result is ``none`` for a
    HELO that is an address literal or not a domain name, ``temperror`` for
    a DNS failure, for any error inside pyspf and when the evaluation takes
    longer than ``timeout`` seconds. Never raises, except when cancelled.
    """
    domain = helo_domain(helo)
    if domain is None:
        # RFC 7208 section 2.3: SPF for HELO is only defined for a domain name.
        return SpfOutcome("none", f"HELO {helo!r} is not a domain name, so SPF does not apply")
    try:
        address = ipaddress.ip_address(client_ip.strip())
    except ValueError:
        return SpfOutcome("temperror", f"client address {client_ip!r} is not an IP address")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # RFC 7208 section 5: compare IPv4 as IPv4
    loop = asyncio.get_running_loop()
    bridge = _Bridge(loop, resolver, time.monotonic() + timeout + _WORKER_GRACE)
    work = loop.run_in_executor(_get_executor(), _evaluate, bridge, str(address), domain)
    try:
        # RFC 7208 section 4.6.4: the evaluation as a whole is time-limited.
        async with asyncio.timeout(timeout):
            result, explanation = await work
    except TimeoutError:
        result = "temperror"
        explanation = f"SPF evaluation of {domain} did not finish within {timeout:g} s"
    finally:
        bridge.abort()  # a worker still running gives up now (its lookup is cancelled)
    return SpfOutcome(result, explanation, bridge.record, bridge.evidence())
