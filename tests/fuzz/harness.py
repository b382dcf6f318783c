"""Fuzz targets for the protocol core, their invariants, and the mutation strategies.

Each :class:`Target` takes a :class:`Case` (input bytes, split points, a few
small integers of options) and raises ``AssertionError`` when an invariant
breaks; any other exception escaping the code under test is a failure too.
The oracle is always "no crash and the invariants hold", never fixed outputs.

Targets:

``server``
    A byte stream fed in pieces to :class:`ServerConnection`, answered by an
    accepting policy (:class:`FuzzDriver`, built on ``tests.engine.Driver``).
    Every output line is a well-formed reply of at most 512 octets; each
    command gets exactly one reply, in order; the receive buffer stays within
    the bound the limits imply; CLOSED is final; DATA bodies are CRLF-clean
    and within the line and size limits; a BDAT chunk delivers exactly its
    declared size; MAIL and RCPT addresses keep to RFC 5321 syntax; commands
    sent after STARTTLS and before the handshake are never acted on; and the
    output is the same however the stream is split.
``client``
    A stream of replies fed in pieces to :class:`ClientConnection`, which
    sends commands chosen by a small policy: only ``RemoteProtocolError``
    from reading and ``LocalProtocolError`` from refused commands may escape;
    replies are well-formed and the buffer stays bounded; the transcript is
    the same however the stream is split.
``parsers``
    ``parse_path``, ``parse_params``, ``split_path``, ``is_domain`` and the
    address-literal checks on arbitrary text: only ``SyntaxProblem`` (or
    ``ValueError`` for literals) escapes, every refusal carries a valid reply,
    and every accepted value re-parses to itself.
``reply``
    ``Reply.parse`` on arbitrary bytes raises only ``ValueError``; the client's
    reply reader raises only ``RemoteProtocolError``; a reply that renders back
    to exactly its input is read the same way by both.
``proxy``
    ``ehlo.server.proxy.parse_header`` (when that module exists): only
    ``ProxyError`` escapes, ``consumed`` stays within the data, parsing a
    growing buffer gives the same result as parsing all of it at once, and
    reading as ``read_header`` does never reads past a valid header.

Seeds live in ``tests/fuzz/corpus/<target>/*.bin``; files named ``crash-*``
are failing inputs saved by ``scripts/fuzz.py``. :data:`KNOWN_BUGS` lists the
bugs found and not fixed yet, with the seeds that reproduce them.

The TLS handshake after a 220 to STARTTLS is modelled by :data:`TLS_MARKER`
(the first bytes of a TLS handshake record): bytes between the STARTTLS line
and the marker are plaintext injected before the handshake, bytes after it
are what the client sends inside TLS.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib
import ipaddress
import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st

from ehlo import ProtocolLimits
from ehlo.extensions import build_extensions
from ehlo.protocol import (
    NEED_DATA,
    PAUSED,
    Bdat,
    ClientConnection,
    ClientState,
    Command,
    Data,
    DataChunk,
    DataEnd,
    Event,
    Fault,
    LocalProtocolError,
    Mail,
    Rcpt,
    RemoteProtocolError,
    Reply,
    ServerConnection,
    StartTls,
    State,
    SyntaxProblem,
    Vrfy,
    is_address_literal,
    is_domain,
    parse_address_literal,
    parse_params,
    parse_path,
)
from ehlo.protocol import _events as protocol_events
from ehlo.protocol import _server as server_module
from ehlo.protocol._syntax import is_dot_string, quoted_string_end, split_path

from ..engine import Driver

# What every run of the targets sets, bounded (tests/test_fuzz.py) or long
# (scripts/fuzz.py): no deadline, no example database, no health checks
# (the strategies are large on purpose), no blob printed for failures.
SETTINGS: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "print_blob": False,
    "phases": (Phase.explicit, Phase.generate, Phase.shrink),
    "suppress_health_check": list(HealthCheck),
}


CORPUS = Path(__file__).resolve().parent / "corpus"

# The AUTH exchange events exist only where the server implements AUTH.
AUTH_EVENT: type[Event] | None = getattr(protocol_events, "Auth", None)
AUTH_RESPONSE_EVENT: type[Event] | None = getattr(protocol_events, "AuthResponse", None)

# Buffer limits of the server engine: the longest partial DATA line it holds
# before streaming it, the longest AUTH line (RFC 4954 section 4) and the room
# added to command lines for ESMTP parameters.
DATA_FLUSH: int = getattr(server_module, "_PARTIAL_FLUSH", 64 * 1024)
AUTH_LINE: int = getattr(server_module, "_AUTH_LINE", 12288)
PARAM_ALLOWANCE: int = getattr(server_module, "_PARAM_ALLOWANCE", 512)

# RFC 5321 section 4.5.3.1.5: a reply line is at most 512 octets with its CRLF.
MAX_REPLY_LINE = 512
REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -]")
# The replies of the "long-parameter-reply" known bug.
PARAMETER_ECHO = re.compile(
    rb"(501|555)[ -](5\.5\.4 )?(Bad value for parameter |Empty value for parameter "
    rb"|Parameter \S+ given twice|(MAIL FROM|RCPT TO) parameter \S+ not recognized)"
)
# The replies of the "body-error-depends-on-split" known bug.
BODY_ERROR = re.compile(
    rb"55[24] (5\.[36]\.[04] )?Message (contains a line longer than allowed"
    rb"|contains a bare CR or LF; lines must end with CRLF"
    rb"|size exceeds fixed maximum message size)"
)
ENHANCED_CODE = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}\Z")

# A TLS handshake record starts with content type 22 and version 3.x.
TLS_MARKER = b"\x16\x03\x01"

PROXY_MODULE = "ehlo.server.proxy"


# ----------------------------------------------------------------- known bugs


@dataclass(frozen=True)
class KnownBug:
    """A bug the fuzzer found that is not fixed yet.

    ``seeds`` ("target/file.bin") reproduce it: their replay is a strict xfail,
    so fixing the bug turns them into failures until the entry is removed.
    Property runs may tolerate the bug's exact failure pattern (see
    :func:`tolerating`) so that they keep checking everything else.
    """

    summary: str
    seeds: tuple[str, ...]


KNOWN_BUGS: dict[str, KnownBug] = {}

_tolerated: set[str] = set()
_tolerated_hits: Counter[str] = Counter()


@contextmanager
def tolerating(bug_ids: Iterable[str]) -> Iterator[Counter[str]]:
    """Count, rather than raise, failures of these known bugs; yields the counts."""
    saved = set(_tolerated)
    _tolerated.update(bug_ids)
    _tolerated_hits.clear()
    try:
        yield _tolerated_hits
    finally:
        _tolerated.clear()
        _tolerated.update(saved)


def known_bug(bug_id: str, message: str) -> None:
    """Report a failure matching known bug ``bug_id``: counted if tolerated, else raised."""
    assert bug_id in KNOWN_BUGS, bug_id
    if bug_id in _tolerated:
        _tolerated_hits[bug_id] += 1
        return
    raise AssertionError(f"[known bug {bug_id}: {KNOWN_BUGS[bug_id].summary}] {message}")


def seed_keys_of_known_bugs() -> set[str]:
    return {key for bug in KNOWN_BUGS.values() for key in bug.seeds}


# ---------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One fuzz input: the bytes, where to split them, and target options."""

    data: bytes
    cuts: tuple[int, ...] = ()
    options: tuple[int, ...] = ()

    def __repr__(self) -> str:
        data = self.data
        if len(data) > 4000:
            digest = hashlib.sha256(data).hexdigest()[:12]
            shown = f"{data[:2000]!r} ... ({len(data)} octets, sha256 {digest})"
        else:
            shown = repr(data)
        cuts = self.cuts if len(self.cuts) <= 40 else f"<{len(self.cuts)} cuts>"
        return f"Case(data={shown}, cuts={cuts}, options={self.options})"


def pieces(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``data`` split at ``cuts`` (out-of-range and repeated points ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def step_cuts(length: int, step: int) -> tuple[int, ...]:
    """Split points every ``step`` octets."""
    return tuple(range(step, length, step))


def _next_bound(points: Sequence[int], pos: int, end: int) -> int:
    for point in points:
        if point > pos:
            return point
    return end


# --------------------------------------------------------------------- corpus


def corpus_files(target: str) -> list[Path]:
    """The seed files of ``target``, sorted by name."""
    folder = CORPUS / target
    return sorted(folder.glob("*.bin")) if folder.is_dir() else []


def load_seeds(target: str) -> list[bytes]:
    """The seeds of ``target`` to mutate (not those of known bugs; one empty seed if none)."""
    skip = seed_keys_of_known_bugs()
    paths = [p for p in corpus_files(target) if f"{target}/{p.name}" not in skip]
    return [path.read_bytes() for path in paths] or [b""]


def seed_lines(seeds: Iterable[bytes], limit: int = 300) -> list[bytes]:
    """Distinct lines (with their endings) of the seeds: a mutation dictionary."""
    lines: dict[bytes, None] = {}
    for seed in seeds:
        for line in seed.splitlines(keepends=True):
            if 0 < len(line) <= 200:
                lines.setdefault(line, None)
    return list(lines)[:limit]


# ------------------------------------------------------------------ mutations

COMMON_TOKENS: tuple[bytes, ...] = (
    b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n..", b".", b"..",
    b"\r\n", b"\n", b"\r", b"\x00", b"\xff", b"\x7f", b"\t", b" ", b"  ",
    b"\xc3\xa9", b"\xc3", b"\xed\xa0\x80", b"\xf0\x9f\x93\xa7", b"\xef\xbb\xbf",
    b"0", b"1", b"-1", b"4294967296", b"999999999999", b"18446744073709551616",
    TLS_MARKER,
)

SERVER_TOKENS: tuple[bytes, ...] = (
    b"EHLO client.example\r\n", b"HELO client.example\r\n", b"MAIL FROM:<a@b.example>\r\n",
    b"MAIL FROM:<>\r\n", b"RCPT TO:<c@d.example>\r\n", b"RCPT TO:<Postmaster>\r\n",
    b"DATA\r\n", b"BDAT 999999999999\r\n", b"BDAT 0 LAST\r\n", b"BDAT 3\r\n", b"BDAT 5 LAST\r\n",
    b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"STARTTLS\r\n", b"VRFY postmaster\r\n", b"HELP\r\n",
    b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n", b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\n", b"*\r\n", b"=\r\n",
    b"AUTH ", b"MAIL FROM:", b"RCPT TO:", b" SIZE=", b" SMTPUTF8", b" BODY=8BITMIME",
    b" BODY=BINARYMIME", b" AUTH=<>", b" NOTIFY=NEVER", b"<", b">", b"<>", b"@", b":", b",",
    b'"', b"\\", b"[IPv6:::1]", b"[127.0.0.1]", b"%", b"=", b"reject", b"VRFY close\r\n",
)

CLIENT_TOKENS: tuple[bytes, ...] = (
    b"220 ", b"220-", b"250 ", b"250-", b"251 ", b"334 ", b"354 ", b"421 ", b"235 ",
    b"221 ", b"450 ", b"501 ", b"503 ", b"535 ", b"538 ", b"550 ", b"554 ", b"999 ",
    b"2.0.0 ", b"4.7.0 ", b"5.5.1 ", b"2.1000.0 ", b"PIPELINING", b"CHUNKING", b"STARTTLS",
    b"AUTH PLAIN LOGIN", b"AUTH=LOGIN", b"SIZE 100", b"SIZE", b"SMTPUTF8", b"8BITMIME",
    b"ENHANCEDSTATUSCODES", b"BINARYMIME", b"DSN",
)

PARSER_TOKENS: tuple[bytes, ...] = tuple(
    t.encode("utf-8")
    for t in (
        "<", ">", "<>", "@", ":", ",", ".", "..", '"', "\\", "[", "]", "IPv6:", "IPV6:",
        "%", "%eth0", "::", "::ffff:", "1.2.3.4", "255", "256", "0377", "-", "=", " ", "  ",
        "\t", "\x00", "\x7f", "FROM:", "TO:", "Postmaster", "@a.example,@b.example:",
        "SIZE=100", "SMTPUTF8", "BODY=8BITMIME", "X-", "a" * 64, "a" * 65, "b" * 63 + ".",
        "\u00e9", "\u0663", "\uff11", "\u00df", "\u0130", "\u212a", "\ufeff", "\U0001f4e7",
        "\u200b", "\u2028",
    )
)

REPLY_TOKENS: tuple[bytes, ...] = CLIENT_TOKENS

RUN_BYTES = b"A.\r\n \x00\xff<@"
RUN_LENGTHS = (
    63, 64, 65, 254, 255, 256, 257, 510, 511, 512, 513, 998, 999, 1000, 1001, 1024, 4096,
    12287, 12288, 65535, 65536, 65537, 70000,
)
LINE_ENDINGS = (b"\n", b"\r", b"", b"\r\r\n", b"\n\r", b"\r\n\r\n", b"\r\n.\r\n", b"\x00\r\n")
INTERESTING_BYTES = (0x00, 0x0A, 0x0D, 0x20, 0x2E, 0x3C, 0x3E, 0x40, 0x7F, 0x80, 0xC3, 0xFF)


@st.composite
def mutated(
    draw: st.DrawFn,
    seeds: Sequence[bytes],
    tokens: Sequence[bytes],
    max_ops: int = 6,
) -> bytes:
    """A seed with a few byte-level mutations applied."""
    buf = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, max_ops))):
        op = draw(st.integers(0, 10))
        size = len(buf)
        pos = draw(st.integers(0, size))
        if op == 0:  # flip one bit
            if size:
                at = min(pos, size - 1)
                buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:  # insert an interesting token
            buf[pos:pos] = draw(st.sampled_from(tokens))
        elif op == 2:  # insert random bytes
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == 3:  # delete a range
            del buf[pos : pos + draw(st.integers(1, 32))]
        elif op == 4:  # duplicate a range (repeated commands, pipelined groups)
            length = draw(st.integers(1, 128))
            buf[pos:pos] = buf[pos : pos + length] * draw(st.integers(1, 4))
        elif op == 5:  # splice: a slice of another seed
            other = draw(st.sampled_from(seeds))
            start = draw(st.integers(0, len(other)))
            buf[pos:pos] = other[start : start + draw(st.integers(1, 256))]
        elif op == 6:  # a long run of one byte
            byte = RUN_BYTES[draw(st.integers(0, len(RUN_BYTES) - 1))]
            buf[pos:pos] = bytes([byte]) * draw(st.sampled_from(RUN_LENGTHS))
        elif op == 7:  # overwrite one byte with an interesting one
            if size:
                buf[min(pos, size - 1)] = draw(st.sampled_from(INTERESTING_BYTES))
        elif op == 8:  # change the case of a range (verbs and keywords)
            end = pos + draw(st.integers(1, 16))
            buf[pos:end] = bytes(buf[pos:end]).swapcase()
        elif op == 9:  # rewrite the next line ending
            at = buf.find(b"\n", pos)
            if at >= 0:
                start = at - 1 if at and buf[at - 1] == 0x0D else at
                buf[start : at + 1] = draw(st.sampled_from(LINE_ENDINGS))
        else:  # insert another seed whole (concatenated sessions)
            buf[pos:pos] = draw(st.sampled_from(seeds))
    return bytes(buf)


def token_soup(tokens: Sequence[bytes], max_tokens: int = 40) -> st.SearchStrategy[bytes]:
    """Tokens and random bytes, concatenated."""
    part = st.one_of(st.sampled_from(tokens), st.binary(max_size=8))
    return st.lists(part, max_size=max_tokens).map(b"".join)


def fuzz_bytes(seeds: Sequence[bytes], tokens: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    """Mostly mutated seeds, some token soup, some purely random bytes."""
    dictionary = [*tokens, *COMMON_TOKENS, *seed_lines(seeds)]
    from_seeds = mutated(seeds, dictionary)
    return st.one_of(from_seeds, from_seeds, from_seeds, token_soup(dictionary),
                     st.binary(max_size=512))


@st.composite
def cases(
    draw: st.DrawFn,
    data: st.SearchStrategy[bytes],
    options: st.SearchStrategy[tuple[int, ...]] | None = None,
) -> Case:
    """A :class:`Case`: bytes, then split points (random, or every few octets)."""
    payload = draw(data)
    size = len(payload)
    if draw(st.booleans()):
        cuts = tuple(draw(st.lists(st.integers(0, size), max_size=8)))
    else:
        # At most about 600 pieces, so that long inputs stay fast.
        step = max(draw(st.integers(1, 64)), size // 600)
        cuts = step_cuts(size, step)
    return Case(payload, cuts, draw(options) if options is not None else ())


# --------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """A fuzz target: its strategy, its checks, and how to replay a seed file."""

    name: str
    summary: str
    strategy: Callable[[], st.SearchStrategy[Case]]
    check: Callable[[Case], None]
    replay_cases: Callable[[bytes], Iterable[Case]]
    requires: str | None = None  # a module that must import, else the target is skipped

    def available(self) -> bool:
        if self.requires is None:
            return True
        try:
            importlib.import_module(self.requires)
        except ImportError:
            return False
        return True

    def replay(self, data: bytes) -> None:
        """Run every replay case of one seed through the checks."""
        for case in self.replay_cases(data):
            self.check(case)


def replay_splits(data: bytes, byte_limit: int = 4096) -> list[tuple[int, ...]]:
    """The split patterns replayed for a seed: every octet (short seeds), 7 and 64."""
    splits = [step_cuts(len(data), 7), step_cuts(len(data), 64)]
    if len(data) <= byte_limit:
        splits.insert(0, step_cuts(len(data), 1))
    return splits


# ---------------------------------------------------------------------- server


def _limits(**changes: Any) -> ProtocolLimits:
    """ProtocolLimits with ``changes``, skipping fields this version does not have."""
    known = {f.name for f in dataclasses.fields(ProtocolLimits)}
    return ProtocolLimits(**{k: v for k, v in changes.items() if k in known})


@dataclass(frozen=True)
class ServerSetup:
    """A server configuration the server target runs under."""

    name: str
    limits: ProtocolLimits
    banner: Reply


SERVER_SETUPS: tuple[ServerSetup, ...] = (
    ServerSetup(
        "default",
        _limits(starttls=True, auth_mechanisms=("PLAIN", "LOGIN")),
        Reply(220, None, "fuzz.example ESMTP"),
    ),
    ServerSetup(
        "tight",
        _limits(
            max_command_line=80, max_text_line=100, max_message_size=300, max_recipients=2,
            max_errors=6, bare_newline="reject", auth_mechanisms=("PLAIN", "LOGIN"),
            auth_plaintext=True,
        ),
        Reply(220, None, ["fuzz.example ESMTP", "second banner line"]),
    ),
    ServerSetup(
        "bare",
        _limits(
            pipelining=False, chunking=False, smtputf8=False, eightbitmime=False,
            enhancedstatuscodes=False, max_errors=0, max_text_line=0, max_message_size=0,
        ),
        Reply(220, None, "fuzz.example SMTP"),
    ),
    ServerSetup("refused", _limits(), Reply(554, "5.7.1", "no service for you")),
)


def _check_reply_line_length(line: bytes) -> None:
    if len(line) + 2 <= MAX_REPLY_LINE:
        return
    message = f"reply line of {len(line) + 2} octets (limit {MAX_REPLY_LINE}): {line[:80]!r}..."
    if PARAMETER_ECHO.match(line):
        known_bug("long-parameter-reply", message)
    else:
        raise AssertionError(message)


def split_replies(out: bytes) -> list[bytes]:
    """Cut server output into whole replies, checking every line on the way."""
    replies: list[bytes] = []
    start = pos = 0
    code: bytes | None = None
    while pos < len(out):
        end = out.find(b"\r\n", pos)
        assert end >= 0, f"output does not end with CRLF: {out[pos:pos + 80]!r}"
        line = out[pos:end]
        _check_reply_line_length(line)
        assert REPLY_LINE.match(line), f"malformed reply line {line[:80]!r}"
        assert b"\r" not in line and b"\n" not in line, f"bare CR or LF in reply {line!r}"
        assert code is None or line[:3] == code, f"multi-line reply changes code: {line!r}"
        code = line[:3]
        pos = end + 2
        if line[3:4] == b" ":
            replies.append(out[start:pos])
            start, code = pos, None
    assert start == len(out), f"multi-line reply without its last line: {out[start:]!r}"
    return replies


@dataclass
class FuzzDriver(Driver):
    """The accepting driver of ``tests.engine``, with fuzzing checks on every event.

    Replies: 334 to AUTH (and to the first LOGIN response), 235 to other
    responses, 501 to ``*``; 451/550 to addresses starting with "reject";
    421 to ``VRFY close``; otherwise what :class:`Driver` answers.
    """

    setup: ServerSetup = SERVER_SETUPS[0]
    output: bytearray = field(default_factory=bytearray)
    delivered: list[tuple[str, bytes]] = field(default_factory=list)
    fed: int = 0  # octets handed to receive_data so far (stream offset)
    tls_offset: int | None = None  # stream offset just after a STARTTLS answered 220
    closed: bool = False
    closed_buffered: int = 0
    body: bytearray | None = None
    body_kind: str = ""
    chunk_size: int = 0
    chunk_got: int = 0
    chunk_last: bool = False
    auth_mechanism: str = ""
    auth_steps: int = 0

    def __post_init__(self) -> None:
        self.limits = self.setup.limits
        self.conn = ServerConnection(self.limits, build_extensions(self.limits))
        self.conn.send(self.setup.banner)
        banner = self.conn.data_to_send()
        assert split_replies(banner) == [banner]
        self.output += banner
        self.check_state(0)

    # ------------------------------------------------------------ policy

    def reply_for(self, event: Command) -> Reply:
        if AUTH_EVENT is not None and isinstance(event, AUTH_EVENT):
            self.auth_mechanism = str(getattr(event, "mechanism", ""))
            self.auth_steps = 0
            return Reply(334, None, "")
        if AUTH_RESPONSE_EVENT is not None and isinstance(event, AUTH_RESPONSE_EVENT):
            self.auth_steps += 1
            if getattr(event, "line", "") == "*":
                return Reply(501, "5.7.0", "Authentication cancelled")
            if self.auth_mechanism == "LOGIN" and self.auth_steps == 1:
                return Reply(334, None, "UGFzc3dvcmQ6")
            return Reply(235, "2.7.0", "Authentication successful")
        if isinstance(event, Mail) and event.address.startswith("reject"):
            return Reply(451, "4.7.1", "try again later")
        if isinstance(event, Rcpt) and event.address.lower().startswith("reject"):
            return Reply(550, "5.1.1", "no such user")
        if isinstance(event, Vrfy) and event.argument == "close":
            return Reply(421, "4.3.2", "shutting down")
        return super().reply_for(event)

    # ------------------------------------------------------------- input

    def feed_checked(self, data: bytes) -> None:
        """Feed one piece, answer every event, check the state and the buffer."""
        self.fed += len(data)
        self.conn.receive_data(data)
        self.pump()
        self.check_state(len(data))

    def check_state(self, piece: int) -> None:
        """CLOSED is final and the receive buffer stays within its bound."""
        conn = self.conn
        state = conn.state
        if self.closed:
            assert state is State.CLOSED, f"left CLOSED for {state}"
            assert conn.buffered <= self.closed_buffered, "buffer grew after close"
            return
        if state is State.CLOSED:
            self.closed = True
            self.closed_buffered = conn.buffered
            assert conn.buffered < self._buffer_bound(State.DATA) + piece
            return
        bound = self._buffer_bound(state)
        assert conn.buffered < bound, (
            f"{conn.buffered} octets buffered in state {state.name} (bound {bound})"
        )

    def _buffer_bound(self, state: State) -> int:
        """Octets the engine may hold after answering NEED_DATA in ``state``."""
        command = max(self.limits.max_command_line + PARAM_ALLOWANCE, AUTH_LINE)
        if state is State.DATA:
            return max(DATA_FLUSH, command)
        if state in (State.BDAT, State.TLS_PENDING):
            return 1  # nothing: a chunk is consumed as it arrives, TLS drops all
        return command

    def pump(self) -> None:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is NEED_DATA or event is PAUSED:
                if event is PAUSED:
                    assert conn.state in (State.CLOSED, State.TLS_PENDING), (
                        f"PAUSED in state {conn.state} with no command awaiting a reply"
                    )
                assert conn.data_to_send() == b"", "output without an event"
                return
            assert isinstance(event, Event), f"next_event returned {event!r}"
            assert not self.closed, f"event {event!r} after the connection closed"
            self._handle(event)

    def _handle(self, event: Event) -> None:
        conn = self.conn
        if isinstance(event, Fault):
            out = conn.data_to_send()
            replies = split_replies(out)
            assert replies and _renders(event.reply, replies[0]), (event, out)
            if event.closing:
                assert conn.state is State.CLOSED
                assert len(replies) == 2 and replies[1][:4] == b"421 ", out
            else:
                assert len(replies) == 1, f"{event!r} answered by {out!r}"
            if event.aborted:
                self.body = None
            self.output += out
        elif isinstance(event, DataChunk):
            assert conn.data_to_send() == b""
            self._on_chunk(event.data)
        elif isinstance(event, Bdat):
            assert conn.data_to_send() == b""
            assert conn.state is State.BDAT, f"Bdat event in state {conn.state}"
            if event.first:
                self.body = bytearray()
                self.body_kind = "BDAT"
            assert self.body is not None and self.body_kind == "BDAT", "BDAT chunk without start"
            self.chunk_size, self.chunk_got, self.chunk_last = event.size, 0, event.last
        elif isinstance(event, Command):
            if isinstance(event, (Mail, Rcpt)):
                check_mailbox(event.address)
            self._answer(event)
        else:
            raise AssertionError(f"unknown event {event!r}")

    def _answer(self, event: Command) -> None:
        conn = self.conn
        assert conn.awaiting_reply is event, f"{event!r} is not the command awaiting a reply"
        if isinstance(event, DataEnd):
            self._on_data_end(event)
        reply = self.reply_for(event)
        if isinstance(event, StartTls) and reply.code == 220:
            self.tls_offset = self.fed - conn.buffered
        was_closed_by_errors = conn.errors + (reply.code >= 500) >= self.limits.max_errors > 0
        conn.send(reply)
        out = conn.data_to_send()
        replies = split_replies(out)
        assert replies and _renders(reply, replies[0]), f"{event!r}: sent {reply!r}, got {out!r}"
        if len(replies) == 2:
            assert was_closed_by_errors and replies[1][:4] == b"421 ", out
            assert conn.state is State.CLOSED
        else:
            assert len(replies) == 1, f"{event!r} answered by {out!r}"
        if reply.code == 421:
            assert conn.state is State.CLOSED, "421 sent but the connection stays open"
        if isinstance(event, Data) and conn.state is State.DATA:
            self.body = bytearray()
            self.body_kind = "DATA"
        if isinstance(event, DataEnd):
            assert self.body is not None
            if reply.code < 400 and (self.body_kind == "DATA" or event.last):
                self.delivered.append((self.body_kind, bytes(self.body)))
            if self.body_kind == "DATA" or event.last or reply.code >= 400:
                self.body = None
        self.output += out

    def _on_chunk(self, data: bytes) -> None:
        assert self.body is not None, "message data outside DATA or BDAT"
        assert data, "empty DataChunk"
        self.body += data
        if self.body_kind == "DATA":
            crlf = data.count(b"\r\n")
            assert data.count(b"\r") == crlf and data.count(b"\n") == crlf, (
                f"DATA chunk with a bare CR or LF: {data[:200]!r}"
            )
        else:
            self.chunk_got += len(data)
            assert self.chunk_got <= self.chunk_size, "BDAT chunk longer than declared"
        limit = self.limits.max_message_size
        assert not limit or len(self.body) <= limit, "message data beyond the size limit"

    def _on_data_end(self, event: DataEnd) -> None:
        body = self.body
        assert body is not None, "end of data without a body"
        assert event.size == len(body), f"DataEnd.size {event.size}, delivered {len(body)}"
        limit = self.limits.max_message_size
        assert not limit or event.size <= limit, "message over the size limit accepted"
        if self.body_kind == "DATA":
            assert event.last
            max_line = self.limits.max_text_line
            if max_line:
                longest = max(len(line) for line in bytes(body).split(b"\r\n"))
                assert longest <= max_line - 2, f"a {longest}-octet text line passed"
        else:
            assert self.chunk_got == self.chunk_size, (
                f"BDAT {self.chunk_size} delivered {self.chunk_got} octets"
            )
            assert event.last == self.chunk_last

    def finish(self) -> None:
        """The peer closed: the connection ends and produces nothing more."""
        self.conn.receive_eof()
        assert self.conn.state is State.CLOSED
        assert self.conn.next_event() is PAUSED
        assert self.conn.data_to_send() == b""


def _renders(reply: Reply, wire: bytes) -> bool:
    return wire in (reply.render(True), reply.render(False))


def run_server(data: bytes, cuts: Iterable[int], setup: ServerSetup) -> FuzzDriver:
    """Feed ``data`` split at ``cuts``; a TLS handshake happens at :data:`TLS_MARKER`."""
    driver = FuzzDriver(setup=setup)
    conn = driver.conn
    points = sorted({c for c in cuts if 0 < c < len(data)})
    pos, end = 0, len(data)
    while pos < end:
        stop = _next_bound(points, pos, end)
        driver.feed_checked(data[pos:stop])
        pos = stop
        if conn.state is State.TLS_PENDING and driver.tls_offset is not None:
            marker = data.find(TLS_MARKER, driver.tls_offset)
            driver.tls_offset = None
            if marker < 0:
                driver.feed_checked(data[pos:])  # never a handshake: all dropped
                assert conn.buffered == 0
                break
            if marker > pos:
                driver.feed_checked(data[pos:marker])  # injected before the handshake
            conn.tls_started()
            assert conn.buffered == 0, "bytes from before the TLS handshake survived it"
            pos = marker + len(TLS_MARKER)
            driver.fed = pos
            driver.pump()
            driver.check_state(0)
    driver.finish()
    split_replies(bytes(driver.output))
    return driver


def check_server(case: Case) -> None:
    index = case.options[0] if case.options else 0
    setup = SERVER_SETUPS[index % len(SERVER_SETUPS)]
    whole = run_server(case.data, (), setup)
    split = run_server(case.data, case.cuts, setup)
    if split.output != whole.output:
        message = (
            "the output depends on how the input is split:\n"
            f"  whole: {bytes(whole.output)[-600:]!r}\n  split: {bytes(split.output)[-600:]!r}"
        )
        if BODY_ERROR.sub(b"", split.output) == BODY_ERROR.sub(b"", whole.output):
            known_bug("body-error-depends-on-split", message)
        else:
            raise AssertionError(message)
    assert split.delivered == whole.delivered, "delivered messages depend on the split"


def server_cases() -> st.SearchStrategy[Case]:
    seeds = load_seeds("server")
    setups = st.integers(0, len(SERVER_SETUPS) - 1).map(lambda i: (i,))
    return cases(fuzz_bytes(seeds, SERVER_TOKENS), setups)


def server_replay(data: bytes) -> Iterator[Case]:
    for index in range(len(SERVER_SETUPS)):
        for cuts in replay_splits(data):
            yield Case(data, cuts, (index,))


# ---------------------------------------------------------------------- client

_PLAIN = base64.b64encode(b"\x00user\x00secret").decode("ascii")
_BODY = b"Subject: fuzz\r\n\r\n.leading dot\r\nbare\nLF and bare\rCR\r\n.\r\nend"


@dataclass
class ClientSession:
    """Drives a ClientConnection: picks commands, records a transcript."""

    plan: tuple[int, ...]
    client: ClientConnection = field(default_factory=ClientConnection)
    transcript: list[str] = field(default_factory=list)
    step: int = 0
    mails: int = 0
    rcpts: int = 0
    tls_tried: bool = False
    auth_tried: bool = False
    tls_offset: int | None = None

    # ------------------------------------------------------- the actions

    def ehlo(self) -> None:
        self.client.ehlo("client.example")

    def helo(self) -> None:
        self.client.helo("client.example")

    def mail(self) -> None:
        self.client.mail("a@example.org")

    def mail_params(self) -> None:
        self.client.mail("a@example.org", {"SIZE": "120", "BODY": "8BITMIME"})

    def mail_utf8(self) -> None:
        self.client.mail("j\u00f6rg@b\u00fccher.example", {"SMTPUTF8": None})

    def rcpt(self) -> None:
        self.client.rcpt("Postmaster" if self.rcpts % 2 else "b@example.net")

    def data(self) -> None:
        self.client.data()

    def bdat(self) -> None:
        self.client.bdat(b"chunk\r\n.one\r")

    def bdat_last(self) -> None:
        self.client.bdat(b"last\nline", last=True)

    def rset(self) -> None:
        self.client.rset()

    def noop(self) -> None:
        self.client.noop()

    def vrfy(self) -> None:
        self.client.vrfy("user")

    def quit(self) -> None:
        self.client.quit()

    def starttls(self) -> None:
        self.client.starttls()

    def auth_plain_initial(self) -> None:
        self.client.auth("PLAIN", _PLAIN)

    def auth_plain(self) -> None:
        self.client.auth("PLAIN")

    def auth_login(self) -> None:
        self.client.auth("LOGIN")

    def auth_empty(self) -> None:
        self.client.auth("PLAIN", "")

    def respond(self) -> None:
        self.client.auth_response(_PLAIN)

    def cancel(self) -> None:
        self.client.auth_response("*")

    def respond_empty(self) -> None:
        self.client.auth_response("")

    def body(self) -> None:
        self.client.send_data(_BODY)
        self.client.end_data()

    def body_pieces(self) -> None:
        for piece in (b".a\r", b"\n.", b"\r\n..x\r", b"\r", b".\n", b"", b"\r"):
            self.client.send_data(piece)
        self.client.end_data()

    def end_data(self) -> None:
        self.client.end_data()

    # ------------------------------------------------------------ policy

    def natural(self) -> Callable[[], None] | None:
        """The next command of an ordinary session, or None to wait."""
        c = self.client
        if c.auth_challenge_pending:
            return self.respond
        if c.sending_body:
            return self.body if self.mails % 2 else self.body_pieces
        if c.state is ClientState.READY:
            return self.ehlo
        if c.state is ClientState.REFUSED:
            return self.quit
        if c.state is not ClientState.GREETED:
            return None
        if c.in_transaction:
            if self.rcpts < 2:
                return self.rcpt
            if c.esmtp and "CHUNKING" in c.extensions and self.mails % 2 == 0:
                return self.bdat if self.mails == 2 else self.bdat_last
            return self.data
        if c.esmtp and "STARTTLS" in c.extensions and not c.tls_active and not self.tls_tried:
            return self.starttls
        mechanisms = c.extensions.auth_mechanisms if c.esmtp else ()
        if mechanisms and not c.authenticated and not self.auth_tried:
            return self.auth_plain_initial if "PLAIN" in mechanisms else self.auth_login
        if self.mails == 0:
            return self.mail
        if self.mails == 1 and "SMTPUTF8" in c.extensions:
            return self.mail_utf8
        if self.mails < 3:
            return self.mail_params
        return self.quit

    def candidates(self) -> list[Callable[[], None]]:
        """Commands worth trying in the current state (the client may still refuse)."""
        c = self.client
        if c.auth_challenge_pending:
            return [self.respond, self.cancel, self.respond_empty, self.noop]
        if c.sending_body:
            return [self.body, self.body_pieces, self.end_data, self.noop]
        if c.state is ClientState.READY:
            return [self.ehlo, self.helo, self.noop, self.vrfy, self.rset, self.quit, self.mail]
        if c.state is ClientState.REFUSED:
            return [self.quit, self.noop]
        if c.in_transaction:
            return [self.rcpt, self.rcpt, self.data, self.bdat, self.bdat_last, self.rset,
                    self.noop, self.quit, self.mail, self.starttls]
        return [self.mail, self.mail_params, self.mail_utf8, self.starttls,
                self.auth_plain_initial, self.auth_plain, self.auth_login, self.auth_empty,
                self.ehlo, self.helo, self.noop, self.vrfy, self.rset, self.quit, self.data]

    def act(self) -> None:
        """Send up to four commands (pipelined when the client allows it)."""
        for _ in range(4):
            choice = self.plan[self.step % len(self.plan)]
            self.step += 1
            if choice == 0:
                action = self.natural()
            else:
                options = self.candidates()
                action = options[(choice - 1) % len(options)]
            if action is None:
                return
            name = action.__name__
            try:
                action()
            except LocalProtocolError:
                self.transcript.append(f"refused {name}")
                return
            out = self.client.data_to_send()
            _check_client_output(name, out)
            self.transcript.append(f"sent {out!r}")
            self._count(name)

    def _count(self, name: str) -> None:
        """Session progress, from the commands the client accepted."""
        if name.startswith("mail"):
            self.mails += 1
            self.rcpts = 0
        elif name == "rcpt":
            self.rcpts += 1
        elif name == "starttls":
            self.tls_tried = True
        elif name.startswith("auth"):
            self.auth_tried = True

    def drain(self, fed: int) -> bool:
        """Read replies and act on each; False once the session is over."""
        c = self.client
        while True:
            if _closed(c):
                return False
            discarded = c.discarded_after_starttls
            try:
                reply = c.next_reply()
            except RemoteProtocolError as exc:
                self.transcript.append(f"remote error {exc}")
                return False
            if reply is NEED_DATA:
                assert c.buffered <= c.max_line_length, f"{c.buffered} octets buffered"
                return True
            assert isinstance(reply, Reply), f"next_reply returned {reply!r}"
            _check_reply(reply, c.max_lines)
            self.transcript.append(f"reply {reply!r}")
            self.transcript.append(
                f"state {c.state.name} awaiting={c.awaiting} esmtp={c.esmtp}"
                f" pipelining={c.pipelining} size={c.extensions.size}"
                f" auth={c.extensions.auth_mechanisms} rcpts={c.accepted_recipients}"
                f" in_tx={c.in_transaction} authenticated={c.authenticated}"
            )
            if c.state is ClientState.TLS_PENDING:
                assert c.buffered == 0, "bytes after the 220 to STARTTLS were kept"
                self.tls_offset = fed - (c.discarded_after_starttls - discarded)
                return True
            if not _closed(c):
                self.act()


def _closed(client: ClientConnection) -> bool:
    return client.state is ClientState.CLOSED


def _check_reply(reply: Reply, max_lines: int) -> None:
    assert 200 <= reply.code <= 599
    assert 1 <= len(reply.lines) <= max_lines
    assert all("\r" not in t and "\n" not in t for t in reply.lines)
    if reply.enhanced is not None:
        match = ENHANCED_CODE.match(reply.enhanced)
        assert match and match.group(1) == str(reply.code)[0], reply


def _check_client_output(name: str, out: bytes) -> None:
    if name in ("body", "body_pieces", "end_data"):
        assert out.endswith(b".\r\n"), f"{name}: the data does not end with a dot line"
    elif name in ("bdat", "bdat_last"):
        head, sep, chunk = out.partition(b"\r\n")
        match = re.fullmatch(rb"BDAT ([0-9]+)( LAST)?", head)
        assert sep and match, f"bad BDAT line {head!r}"
        assert int(match.group(1)) == len(chunk), f"BDAT {match.group(1)!r} with {len(chunk)}"
    else:
        assert out.endswith(b"\r\n") and out.count(b"\n") == 1 and out.count(b"\r") == 1, (
            f"{name}: not exactly one command line: {out!r}"
        )


def run_client(data: bytes, cuts: Iterable[int], plan: tuple[int, ...]) -> list[str]:
    """Feed a reply stream split at ``cuts``; return the session transcript."""
    session = ClientSession(plan or (0,))
    client = session.client
    session.act()  # before the banner every command is refused
    points = sorted({c for c in cuts if 0 < c < len(data)})
    pos, end = 0, len(data)
    alive = True
    while alive and pos < end:
        stop = _next_bound(points, pos, end)
        client.receive_data(data[pos:stop])
        pos = stop
        alive = session.drain(pos)
        if alive and client.state is ClientState.TLS_PENDING:
            assert session.tls_offset is not None
            marker = data.find(TLS_MARKER, session.tls_offset)
            session.tls_offset = None
            if marker < 0:
                client.receive_data(data[pos:])  # never a handshake: all dropped
                assert client.buffered == 0
                alive = False
                break
            if marker > pos:
                client.receive_data(data[pos:marker])
                assert client.buffered == 0
            client.tls_started()
            session.transcript.append("tls")
            pos = marker + len(TLS_MARKER)
            session.act()
            alive = session.drain(pos)
    if alive:
        client.receive_eof()
        session.drain(pos)
    return session.transcript


def check_client(case: Case) -> None:
    whole = run_client(case.data, (), case.options)
    split = run_client(case.data, case.cuts, case.options)
    assert split == whole, (
        "the client's session depends on how the replies are split:\n"
        f"  whole: {whole[-6:]}\n  split: {split[-6:]}"
    )


# Plans: 0 is the natural next command, k > 0 the (k-1)th of ClientSession.candidates().
CLIENT_PLANS: tuple[tuple[int, ...], ...] = (
    (0,), (3, 0, 0, 0), (0, 2, 0, 4, 0, 0), (2, 0, 9, 0, 14), (13, 11, 1, 0),
)


def client_cases() -> st.SearchStrategy[Case]:
    seeds = load_seeds("client")
    step = st.one_of(st.just(0), st.integers(0, 30))
    plans = st.one_of(
        st.sampled_from(CLIENT_PLANS), st.lists(step, min_size=1, max_size=8).map(tuple)
    )
    return cases(fuzz_bytes(seeds, CLIENT_TOKENS), plans)


def client_replay(data: bytes) -> Iterator[Case]:
    for plan in CLIENT_PLANS:
        for cuts in replay_splits(data):
            yield Case(data, cuts, plan)


# --------------------------------------------------------------------- parsers

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
# RFC 5321 section 4.1.3 address literals (a grammar check on accepted text).
_IPV4_LITERAL = re.compile(r"\[[0-9]{1,3}(?:\.[0-9]{1,3}){3}\]\Z")
_IPV6_LITERAL = re.compile(r"\[[Ii][Pp][Vv]6:[0-9A-Fa-f:.]+\]\Z")
_ZONE_LITERAL = re.compile(r"\[IPv6:[0-9A-Fa-f:.]*%.*\]\Z", re.IGNORECASE | re.DOTALL)
_GENERAL_LITERAL = re.compile(r"\[[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+\]\Z")


def _check_problem(problem: SyntaxProblem) -> None:
    reply = problem.reply
    assert isinstance(reply, Reply) and 500 <= reply.code <= 599, reply
    for enhanced in (True, False):
        for line in reply.render(enhanced).split(b"\r\n")[:-1]:
            _check_reply_line_length(line)


def check_mailbox(address: str) -> None:
    """An accepted address: nothing outside a quoted local part breaks RFC 5321 syntax."""
    if address == "" or address.lower() == "postmaster":
        return
    if address.startswith('"'):
        end = quoted_string_end(address, utf8=True)
        local, at, domain = address[:end], address[end : end + 1], address[end + 1 :]
    else:
        local, at, domain = address.partition("@")
    assert local and at == "@", f"accepted address without local part or @: {address!r}"
    if domain.startswith("["):
        _check_literal(domain)
    else:
        assert is_domain(domain, utf8=True), f"accepted address with domain {domain!r}"
    if not local.startswith('"'):
        assert not any(ord(c) <= 32 or ord(c) == 127 for c in local), address


def _check_path(text: str, sender: bool, utf8: bool) -> None:
    try:
        result = parse_path(text, sender=sender, utf8=utf8)
    except SyntaxProblem as problem:
        _check_problem(problem)
        return
    assert isinstance(result, str)
    if result == "":
        assert sender and text == "<>", f"empty path accepted from {text!r}"
        return
    assert result in text
    check_mailbox(result)
    if not utf8 and not result.isascii():
        message = f"non-ASCII path {text!r} accepted without SMTPUTF8"
        if _ZONE_LITERAL.search(result):
            known_bug("ipv6-zone-literal", message)
        else:
            raise AssertionError(message)
    if not utf8:
        assert parse_path(text, sender=sender, utf8=True) == result
    assert parse_path(f"<{result}>", sender=sender, utf8=utf8) == result, (
        f"accepted {result!r} does not re-parse"
    )
    if not sender and result.lower() != "postmaster":
        assert parse_path(text, sender=True, utf8=utf8) == result


def _check_params(text: str, utf8: bool) -> None:
    try:
        params = parse_params(text, utf8=utf8)
    except SyntaxProblem as problem:
        _check_problem(problem)
        return
    for key, value in params.items():
        assert _KEYWORD.match(key) and key == key.upper(), f"bad keyword {key!r}"
        if value is not None:
            assert value and " " not in value and "=" not in value, (key, value)
            assert utf8 or value.isascii(), f"non-ASCII value accepted: {value!r}"
    rendered = " ".join(k if v is None else f"{k}={v}" for k, v in params.items())
    assert parse_params(rendered, utf8=utf8) == params, f"{params!r} does not re-parse"


def _check_split(text: str, prefix: str, utf8: bool) -> None:
    try:
        path, params = split_path(text, prefix)
    except SyntaxProblem as problem:
        _check_problem(problem)
        return
    assert not path.startswith("<") or path.endswith(">"), path
    assert params == params.strip(" "), repr(params)
    again = prefix + path + (f" {params}" if params else "")
    assert split_path(again, prefix) == (path, params), f"{again!r} splits differently"
    _check_path(path, prefix == "FROM:", utf8)
    _check_params(params, utf8)


def _check_domain(text: str, utf8: bool) -> None:
    ok = is_domain(text, utf8)
    assert isinstance(ok, bool)
    if ok:
        assert len(text) <= 255 and all(text.split(".")), text
        if not utf8:
            assert text.isascii() and is_domain(text, True), text


def _check_literal(text: str) -> None:
    try:
        value = parse_address_literal(text)
    except ValueError:
        assert not is_address_literal(text)
        return
    assert is_address_literal(text)
    grammar = {
        ipaddress.IPv4Address: _IPV4_LITERAL,
        ipaddress.IPv6Address: _IPV6_LITERAL,
        str: _GENERAL_LITERAL,
    }[type(value)]
    if not grammar.match(text):
        message = f"address literal {text!r} accepted outside RFC 5321 syntax"
        if _ZONE_LITERAL.match(text):
            known_bug("ipv6-zone-literal", message)
            return
        raise AssertionError(message)
    again = {
        ipaddress.IPv4Address: f"[{value}]",
        ipaddress.IPv6Address: f"[IPv6:{value}]",
        str: f"[{value}]",
    }[type(value)]
    assert parse_address_literal(again) == value, f"{again!r} does not re-parse"


def _check_text(text: str) -> None:
    for utf8 in (False, True):
        for sender in (False, True):
            _check_path(text, sender, utf8)
        _check_params(text, utf8)
        _check_domain(text, utf8)
        assert isinstance(is_dot_string(text, utf8), bool)
        end = quoted_string_end(text, utf8)
        assert end == -1 or (2 <= end <= len(text) and text[end - 1] == '"'), (text, end)
        for prefix in ("FROM:", "TO:"):
            _check_split(text, prefix, utf8)
    _check_literal(text)


def check_parsers(case: Case) -> None:
    text = case.data.decode("utf-8", "replace")
    _check_text(text)
    # The same text as the inside of a path, and after the verb's keyword.
    _check_text(f"<{text}>")
    for prefix in ("FROM:", "TO:"):
        _check_split(f"{prefix}{text}", prefix, True)
    lines = dict.fromkeys(line for line in text.splitlines() if line != text)
    for line in list(lines)[:16]:
        _check_text(line)


def parser_cases() -> st.SearchStrategy[Case]:
    seeds = load_seeds("parsers")
    text = st.text(max_size=80).map(lambda t: t.encode("utf-8"))
    return cases(st.one_of(fuzz_bytes(seeds, PARSER_TOKENS), text))


def parser_replay(data: bytes) -> Iterator[Case]:
    yield Case(data)


# ----------------------------------------------------------------------- reply


def check_reply(case: Case) -> None:
    data = case.data
    try:
        parsed: Reply | None = Reply.parse(data)
    except ValueError:
        parsed = None
    if parsed is not None:
        assert 200 <= parsed.code <= 599
        assert all("\r" not in t and "\n" not in t for t in parsed.lines)
    client = ClientConnection()
    first: Reply | None = None
    chunks = pieces(data, case.cuts)
    fed = 0
    try:
        for chunk in chunks:
            client.receive_data(chunk)
            fed += 1
            reply = client.next_reply()
            if reply is not NEED_DATA:
                assert isinstance(reply, Reply)
                first = reply
                break
    except RemoteProtocolError:
        return
    if first is None:
        return
    _check_reply(first, client.max_lines)
    if fed == len(chunks) and client.buffered == 0:
        # The whole input was one reply: when it is the canonical rendering of
        # what the client read, Reply.parse must read the same.
        canonical = first.render(first.enhanced is not None) == data
        if canonical:
            assert parsed is not None, f"Reply.parse refused what the client read: {first!r}"
            if parsed != first:
                message = f"Reply.parse read {parsed!r}, the client {first!r}"
                lenient = parsed.enhanced is not None and first.enhanced is None
                if lenient and not ENHANCED_CODE.match(parsed.enhanced or ""):
                    known_bug("lenient-enhanced-code", message)
                    return
                raise AssertionError(message)
            assert parsed.render(parsed.enhanced is not None) == data


def _rendered_replies() -> st.SearchStrategy[bytes]:
    text = st.text(
        st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\x00"),
        max_size=40,
    )

    def build(code: int, detail: tuple[int, int] | None, lines: list[str], enh: bool) -> bytes:
        cls = str(code)[0]
        enhanced = None if detail is None or cls == "3" else f"{cls}.{detail[0]}.{detail[1]}"
        return Reply(code, enhanced, lines).render(enh)

    details = st.none() | st.tuples(st.integers(0, 999), st.integers(0, 999))
    return st.builds(build, st.integers(200, 599), details,
                     st.lists(text, min_size=1, max_size=5), st.booleans())


def reply_cases() -> st.SearchStrategy[Case]:
    seeds = load_seeds("reply")
    return cases(st.one_of(fuzz_bytes(seeds, REPLY_TOKENS), _rendered_replies()))


def reply_replay(data: bytes) -> Iterator[Case]:
    for cuts in replay_splits(data):
        yield Case(data, cuts)


# ----------------------------------------------------------------------- proxy


def _proxy_outcome(parse: Callable[[bytes], Any], error: type[Exception], data: bytes) -> Any:
    try:
        result = parse(data)
    except error:
        return ("error",)
    if result is None:
        return ("incomplete",)
    info, consumed = result
    assert isinstance(consumed, int) and 0 < consumed <= len(data), (
        f"consumed {consumed!r} of {len(data)} octets"
    )
    return ("header", repr(info), consumed)


def check_proxy(case: Case) -> None:
    module = importlib.import_module(PROXY_MODULE)
    parse, error = module.parse_header, module.ProxyError
    data = case.data
    whole = _proxy_outcome(parse, error, data)
    # A transport calls parse_header on its growing buffer after each read.
    streamed: Any = ("incomplete",)
    for stop in [*sorted({c for c in case.cuts if 0 < c < len(data)}), len(data)]:
        streamed = _proxy_outcome(parse, error, data[:stop])
        if streamed[0] != "incomplete":
            break
    assert streamed == whole, f"streamed {streamed}, whole {whole}"
    if whole[0] == "header":
        consumed = whole[2]
        assert _proxy_outcome(parse, error, data[:consumed]) == whole, (
            "the header alone parses differently"
        )
    read_size = getattr(module, "_safe_read_size", None)
    if read_size is not None:
        _check_proxy_reads(parse, error, read_size, data, case.cuts, whole)


def _check_proxy_reads(
    parse: Callable[[bytes], Any],
    error: type[Exception],
    read_size: Callable[[bytearray], int],
    data: bytes,
    cuts: Iterable[int],
    whole: Any,
) -> None:
    """Reading as ``read_header`` does never reads past a valid header.

    Each read asks for ``_safe_read_size(buf)`` octets and may get fewer (a
    read stops at the next of ``cuts``, like a short ``recv``).
    """
    points = sorted({c for c in cuts if 0 < c < len(data)})
    buf = bytearray()
    while True:
        outcome = _proxy_outcome(parse, error, bytes(buf))
        if outcome[0] == "header":
            assert outcome[2] == len(buf), (
                f"read {len(buf)} octets for a {outcome[2]}-octet header"
            )
            assert outcome == whole, f"read {outcome}, whole {whole}"
            return
        if outcome[0] == "error" or len(buf) == len(data):
            return  # refused, or the peer closed inside the header
        want = read_size(buf)
        assert want > 0, f"read size {want} for {bytes(buf)!r}"
        stop = min(len(buf) + want, _next_bound(points, len(buf), len(data)))
        buf += data[len(buf) : stop]


def proxy_cases() -> st.SearchStrategy[Case]:
    seeds = load_seeds("proxy")
    tokens = (b"PROXY ", b"TCP4 ", b"TCP6 ", b"UNKNOWN", b"\r\n\r\n\x00\r\nQUIT\n",
              b"\x21", b"\x20", b"\x11", b"\x21\x11\x00\x0c", b"\xff\xff", b"65535", b"65536")
    return cases(fuzz_bytes(seeds, tokens))


def proxy_replay(data: bytes) -> Iterator[Case]:
    for cuts in replay_splits(data, byte_limit=1024):
        yield Case(data, cuts)


# -------------------------------------------------------------------- registry

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("server", "ServerConnection on arbitrary streams", server_cases, check_server,
               server_replay),
        Target("client", "ClientConnection on arbitrary reply streams", client_cases,
               check_client, client_replay),
        Target("parsers", "paths, parameters, domains, address literals", parser_cases,
               check_parsers, parser_replay),
        Target("reply", "Reply.parse and the client's reply reader", reply_cases, check_reply,
               reply_replay),
        Target("proxy", "PROXY protocol header parsing", proxy_cases, check_proxy,
               proxy_replay, requires=PROXY_MODULE),
    )
}
