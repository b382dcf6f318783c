"""The server's Prometheus metrics: what is counted, where it is kept, how it is read.

:class:`Metrics` holds the counters of one :class:`~ehlo.server.Server`
(connections, sessions by greeting, messages and their octets, refusals by
stage and reply code, TLS handshakes, AUTH outcomes, greeting check
results, the store's commit latency, evictions and limits hit); the
session and the transport count on it, and :meth:`Metrics.exposition`
renders them in Prometheus' text format for ``GET /metrics``.

Two ways to keep them:

- One process (an embedded ``Server``, ``ehlo serve --workers 1``): each
  ``Metrics`` has a registry of its own, so several servers in one process
  (a test suite) never share or clash; its exposition is that registry.
- Several processes (``ehlo serve --workers N``): prometheus_client's
  multiprocess mode. The supervisor makes a private folder
  (:func:`prepare_directory`: a temporary folder, in memory on ``/dev/shm``
  when there is one, mode 0700, removed when the server stops) and sets
  ``PROMETHEUS_MULTIPROC_DIR`` before it forks; each worker's
  counters live in memory-mapped files of that folder named by its pid; the
  exposition (:func:`exposition`, in whichever process serves HTTP) sums
  every file, those of workers that died or were restarted included; the
  supervisor calls :func:`process_dead` for a worker that ended.

Cheap on the hot path: every label value known in advance (a limit's name,
a mechanism, a TLS version seen before) is resolved to its child once and
kept in an attribute or a dict, so counting is one ``inc()`` on a child,
never ``labels(...)``; an accepted message costs three calls (count, octets,
commit latency). prometheus_client is imported when the first ``Metrics``
is made, not with the server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Metric

__all__ = [
    "AUTH_RESULTS",
    "LIMITS",
    "REFUSAL_REASONS",
    "Metrics",
    "exposition",
    "prepare_directory",
    "process_dead",
    "remove_directory",
]

# The environment variable prometheus_client's multiprocess mode reads.
ENV = "PROMETHEUS_MULTIPROC_DIR"

# Why a connection was closed at once, without a session (its 421).
REFUSAL_REASONS = (
    "max_connections",
    "max_connections_per_ip",
    "max_connection_rate",
    "shutdown",
    "proxy_untrusted",
    "proxy_header",
)

# The limits counted when they are reached, by their configuration key.
LIMITS = (
    "max_connections",
    "max_connections_per_ip",
    "max_connection_rate",
    "max_message_size",
    "max_recipients",
    "max_command_line",
    "max_text_line",
    "max_errors",
    "max_hops",
    "max_junk_commands",
    "max_auth_failures",
    "max_auth_failures_per_user",
    "max_auth_queue",
    "max_session_time",
    "command_timeout",
    "data_timeout",
    "stress_timeout",
)

# How an AUTH exchange ended: credentials accepted; refused (535); the
# address or the account locked out; the password check could not start in
# time (454); the exchange ended without credentials (cancelled, malformed).
AUTH_RESULTS = ("success", "failure", "locked", "busy", "aborted")
_AUTH_MECHANISMS = ("PLAIN", "LOGIN")

# The stages whose refusals are counted, by the verb a fault names.
_STAGE_OF_VERB = {"MAIL": "mail", "RCPT": "rcpt", "DATA": "data", "BDAT": "data"}

# Seconds: a group commit with an fsync takes a few milliseconds; a disk
# under load or a writer restarting, seconds.
_COMMIT_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Metrics:
    """The counters of one server; see the module docstring.

    ``directory``: the multiprocess folder shared with the other workers
    (``PROMETHEUS_MULTIPROC_DIR``, prepared by the supervisor); None keeps
    the counters in this object's own registry.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.directory = Path(directory) if directory is not None else None
        registry: CollectorRegistry | None
        if self.directory is None:
            registry = CollectorRegistry(auto_describe=True)
        else:
            _use_multiprocess(self.directory)
            registry = None  # the files are the registry: exposition() reads them all
        self.registry = registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        self.connections = counter(
            "ehlo_connections_total", "Connections accepted: each was given a session"
        )
        refused = counter(
            "ehlo_connections_refused_total",
            "Connections closed at once without a session (421 at a limit or while"
            " stopping; a PROXY listener's untrusted peer or bad header), by reason",
            ("reason",),
        )
        self.refused = {reason: refused.labels(reason) for reason in REFUSAL_REASONS}
        sessions = counter(
            "ehlo_sessions_total",
            "Sessions that greeted, by their first greeting (HELO or EHLO)",
            ("greeting",),
        )
        self.sessions = {verb: sessions.labels(verb) for verb in ("HELO", "EHLO")}
        self.messages = counter(
            "ehlo_messages_accepted_total", "Messages accepted: stored, answered 250"
        )
        self.octets = counter(
            "ehlo_received_bytes_total",
            "Octets of the messages accepted, as the client sent them (after dot-unstuffing)",
        )
        self._refusals = counter(
            "ehlo_refusals_total",
            "4xx and 5xx replies to the connection (connect hooks), MAIL, RCPT and DATA"
            " (BDAT counts as data), by stage and reply code",
            ("stage", "code"),
        )
        self._refusal_children: dict[tuple[str, int], Counter] = {}
        self._tls = counter(
            "ehlo_tls_handshakes_total",
            "TLS handshakes of STARTTLS and implicit-TLS listeners: ok by protocol"
            " version; failed (STARTTLS only), without a version",
            ("result", "version"),
        )
        self._tls_ok: dict[str, Counter] = {}
        self.tls_failed = self._tls.labels("failed", "")
        auth = counter(
            "ehlo_auth_total",
            "AUTH exchanges by mechanism and result: success, failure (535),"
            " locked (address or account locked out), busy (454: the password check"
            " could not start in time), aborted (cancelled or malformed)",
            ("mechanism", "result"),
        )
        self._auth = auth
        self._auth_children = {
            (mechanism, result): auth.labels(mechanism, result)
            for mechanism in _AUTH_MECHANISMS
            for result in AUTH_RESULTS
        }
        self._checks = counter(
            "ehlo_greeting_checks_total",
            "Greeting verification results, by check and result (one per check of"
            " each greeting verified)",
            ("check", "result"),
        )
        self._check_children: dict[tuple[str, str], Counter] = {}
        self.commit_seconds = Histogram(
            "ehlo_store_commit_seconds",
            "Seconds from a message's end of data to the store's commit (the 250 waits"
            " for it), messages accepted",
            buckets=_COMMIT_BUCKETS,
            registry=registry,
        )
        self.evictions = counter(
            "ehlo_evictions_total",
            "Idle connections closed (421 4.4.2) to give their slot to a newcomer",
        )
        limits = counter(
            "ehlo_limits_hit_total",
            "Limits reached, by configuration key (a refusal, a 421, a timeout)",
            ("limit",),
        )
        self.limits = {name: limits.labels(name) for name in LIMITS}

    # Counting what has a label value not known in advance: each child is
    # made once, on first use, then kept.

    def refusal(self, stage: str, code: int) -> None:
        """A 4xx or 5xx reply at ``stage`` (connect, mail, rcpt, data)."""
        key = (stage, code)
        child = self._refusal_children.get(key)
        if child is None:
            child = self._refusal_children[key] = self._refusals.labels(stage, str(code))
        child.inc()

    def fault(self, verb: str, code: int) -> None:
        """A refusal the protocol core sent itself, for the command ``verb``."""
        stage = _STAGE_OF_VERB.get(verb)
        if stage is not None:
            self.refusal(stage, code)

    def tls_ok(self, version: str | None) -> None:
        """A TLS handshake that completed with ``version`` (e.g. TLSv1.3)."""
        name = version or ""
        child = self._tls_ok.get(name)
        if child is None:
            child = self._tls_ok[name] = self._tls.labels("ok", name)
        child.inc()

    def auth(self, mechanism: str, result: str) -> None:
        """An AUTH exchange that ended with ``result`` (one of :data:`AUTH_RESULTS`)."""
        child = self._auth_children.get((mechanism, result))
        if child is None:  # a mechanism only a future version offers
            child = self._auth_children[(mechanism, result)] = self._auth.labels(mechanism, result)
        child.inc()

    def checks(self, results: dict[str, str]) -> None:
        """The results of one greeting's checks: ``{check: result}``."""
        children = self._check_children
        for key in results.items():
            child = children.get(key)
            if child is None:
                child = children[key] = self._checks.labels(*key)
            child.inc()

    def limit(self, name: str) -> None:
        """The limit ``name`` (one of :data:`LIMITS`) was reached."""
        self.limits[name].inc()

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (version 0.0.4).

        With a multiprocess folder, the sum over every process that wrote to it.
        Either way without the ``_created`` timestamps prometheus_client adds
        in one process (multiprocess mode has none): the same series both ways.
        """
        if self.directory is not None:
            return exposition(self.directory)
        from prometheus_client import generate_latest
        from prometheus_client.registry import Collector

        assert self.registry is not None
        registry: CollectorRegistry = self.registry

        class WithoutCreated(Collector):
            def collect(self) -> Iterator[Metric]:
                for family in registry.collect():
                    family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                    yield family

        return generate_latest(WithoutCreated())


def exposition(directory: str | os.PathLike[str]) -> bytes:
    """The text format of the counters every process wrote to ``directory``, summed."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    # prometheus_client leaves these functions unannotated: their signatures as used.
    collector: Callable[..., object] = multiprocess.MultiProcessCollector
    collector(registry, path=os.fspath(directory))
    return generate_latest(registry)


def prepare_directory() -> Path:
    """A new, empty multiprocess folder (mode 0700), named in the environment.

    A private temporary folder, in memory when the machine has ``/dev/shm``
    (the counters are written at every message: no disk should see them,
    and nothing is kept across runs); the processes forked afterwards
    inherit ``PROMETHEUS_MULTIPROC_DIR``. :func:`remove_directory` removes it;
    a supervisor killed outright (SIGKILL) leaves it behind, 64 KiB per
    file, two files per worker.
    """
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None
    path = Path(tempfile.mkdtemp(prefix="ehlo-metrics-", dir=base))
    os.environ[ENV] = str(path)
    return path


def remove_directory(path: Path) -> None:
    """Remove a folder of :func:`prepare_directory` (the server has stopped)."""
    if os.environ.get(ENV) == str(path):
        del os.environ[ENV]
    shutil.rmtree(path, ignore_errors=True)


def process_dead(pid: int, directory: str | os.PathLike[str]) -> None:
    """A worker ended: drop its live gauges (its counters stay in the sums)."""
    from prometheus_client import multiprocess

    mark_dead: Callable[[int, str], None] = multiprocess.mark_process_dead
    mark_dead(pid, os.fspath(directory))


def _use_multiprocess(directory: Path) -> None:
    """Make the counters made from now on in this process live in ``directory``'s files.

    prometheus_client picks its value class when it is first imported; if
    that happened before ``PROMETHEUS_MULTIPROC_DIR`` was set, the class is
    chosen again here.
    """
    from prometheus_client import values

    os.environ[ENV] = str(directory)
    if not getattr(values.ValueClass, "_multiprocess", False):
        value_class: Callable[[], type] = values.MultiProcessValue
        values.ValueClass = value_class()
