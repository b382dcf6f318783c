"""A small, real DNS server for tests: UDP and TCP on one loopback port, answers from a dict.

Usage (``tests`` is a package)::

    from .dnsserver import DNSServer

    zone = {
        "mail.example.test": {"A": ["192.0.2.10"], "AAAA": ["2001:db8::10"]},
        DNSServer.reverse("192.0.2.10"): {"PTR": ["mail.example.test."]},
    }
    with DNSServer(zone, behaviours={"broken.test": "servfail"}) as server:
        Resolver([server.nameserver])  # "127.0.0.1:PORT"
        ...
        assert server.count("mail.example.test", "A") == 1

Names are matched without case and without the trailing dot. A name missing
from the zone is NXDOMAIN; a present name without the asked type is NODATA;
both carry an SOA whose minimum is ``negative_ttl``. CNAMEs in the zone are
followed. Per-name (or ``default``) behaviour: ``answer``, ``nxdomain``,
``servfail``, ``refused``, ``drop`` (never answer) or ``truncate`` (UDP
answers have TC set and no records, so clients retry over TCP). Every query
received is logged in ``queries``. The server runs in a thread of its own, so
it serves sync and async tests alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import selectors
import socket
import struct
import threading
from types import TracebackType
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset

Behaviour = Literal["answer", "nxdomain", "servfail", "refused", "drop", "truncate"]
Zone = dict[str, dict[str, list[str]]]


@dataclasses.dataclass(frozen=True)
class Query:
    """One query received."""

    transport: Literal["udp", "tcp"]
    name: str  # lowercase, no trailing dot
    rdtype: str  # "A", "PTR", ...


def _norm(name: str | dns.name.Name) -> str:
    text = name.to_text() if isinstance(name, dns.name.Name) else name
    return text.rstrip(".").lower()


class DNSServer:
    """A DNS server on ``host`` (loopback) answering from ``zone``; see the module docstring."""

    def __init__(
        self,
        zone: Zone | None = None,
        *,
        ttl: int = 300,
        negative_ttl: int = 60,
        behaviours: dict[str, Behaviour] | None = None,
        default: Behaviour = "answer",
        host: str = "127.0.0.1",
    ) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.default: Behaviour = default
        self.host = host
        self.port = 0
        self._zone: Zone = {}
        self._behaviours: dict[str, Behaviour] = {}
        self._queries: list[Query] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn_threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        for name, records in (zone or {}).items():
            for rdtype, values in records.items():
                self.set_records(name, rdtype, values)
        for name, behaviour in (behaviours or {}).items():
            self.set_behaviour(name, behaviour)

    # ---------------------------------------------------------------- set up

    @staticmethod
    def reverse(ip: str) -> str:
        """The PTR owner name of ``ip``, e.g. ``10.2.0.192.in-addr.arpa``."""
        return _norm(dns.reversename.from_address(ip))

    def set_records(self, name: str, rdtype: str, values: list[str]) -> None:
        """Set (or, with ``[]``, remove) the records of one type at ``name``."""
        # Parse now, so a typo fails in the test rather than in the server thread.
        for value in values:
            dns.rdata.from_text(dns.rdataclass.IN, rdtype.upper(), value, origin=dns.name.root)
        with self._lock:
            records = self._zone.setdefault(_norm(name), {})
            if values:
                records[rdtype.upper()] = list(values)
            else:
                records.pop(rdtype.upper(), None)

    def remove(self, name: str) -> None:
        """Remove ``name`` from the zone (it becomes NXDOMAIN)."""
        with self._lock:
            self._zone.pop(_norm(name), None)

    def set_behaviour(self, name: str, behaviour: Behaviour) -> None:
        """How to treat queries for ``name`` from now on."""
        with self._lock:
            self._behaviours[_norm(name)] = behaviour

    # ----------------------------------------------------------- the log

    @property
    def queries(self) -> list[Query]:
        """A copy of the log of queries received, oldest first."""
        with self._lock:
            return list(self._queries)

    def count(self, name: str | None = None, rdtype: str | None = None) -> int:
        """Queries received, optionally only those for ``name`` and/or ``rdtype``."""
        return sum(
            1
            for q in self.queries
            if (name is None or q.name == _norm(name))
            and (rdtype is None or q.rdtype == rdtype.upper())
        )

    def clear_queries(self) -> None:
        """Empty the log."""
        with self._lock:
            self._queries.clear()

    # ------------------------------------------------------- start and stop

    @property
    def nameserver(self) -> str:
        """``IP:PORT`` (``[IPv6]:PORT``) for ``ehlo.dns.Resolver``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> DNSServer:
        """Bind UDP and TCP on one free port and serve in a background thread."""
        if self._thread is not None:
            raise RuntimeError("already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(50):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError as exc:
                udp.close()
                tcp.close()
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            break
        else:  # pragma: no cover - the machine is out of ports
            raise RuntimeError("no free port for UDP and TCP")
        tcp.listen(16)
        udp.setblocking(False)
        tcp.setblocking(False)
        self._udp, self._tcp, self.port = udp, tcp, port
        self._thread = threading.Thread(target=self._serve, name=f"dns-{port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every socket (waits for the threads, briefly)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._conn_threads:
            thread.join(timeout=5)
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------ serving

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._udp, selectors.EVENT_READ, "udp")
            sel.register(self._tcp, selectors.EVENT_READ, "tcp")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            while not self._stopping.is_set():
                for key, _ in sel.select(timeout=1.0):
                    if key.data == "udp":
                        self._serve_udp()
                    elif key.data == "tcp":
                        self._accept()

    def _serve_udp(self) -> None:
        assert self._udp is not None
        try:
            wire, peer = self._udp.recvfrom(65535)
        except (BlockingIOError, InterruptedError):
            return
        reply = self._handle(wire, "udp")
        if reply is not None:
            with contextlib.suppress(OSError):
                self._udp.sendto(reply, peer)

    def _accept(self) -> None:
        assert self._tcp is not None
        try:
            conn, _ = self._tcp.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(True)
        conn.settimeout(10.0)
        with self._lock:
            self._conns.add(conn)
        thread = threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True)
        self._conn_threads.append(thread)
        thread.start()

    def _serve_tcp(self, conn: socket.socket) -> None:
        try:
            while not self._stopping.is_set():
                header = _recv_exactly(conn, 2)
                if header is None:
                    return
                wire = _recv_exactly(conn, struct.unpack("!H", header)[0])
                if wire is None:
                    return
                reply = self._handle(wire, "tcp")
                if reply is not None:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handle(self, wire: bytes, transport: Literal["udp", "tcp"]) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name, rdtype = _norm(question.name), dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self._queries.append(Query(transport, name, rdtype))
            behaviour = self._behaviours.get(name, self.default)
            zone = {owner: dict(records) for owner, records in self._zone.items()}
        if behaviour == "drop":
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if behaviour == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif behaviour == "refused":
            response.set_rcode(dns.rcode.REFUSED)
        elif behaviour == "truncate" and transport == "udp":
            response.flags |= dns.flags.TC
        elif behaviour == "nxdomain":
            self._negative(response, nxdomain=True)
        else:
            self._answer(response, zone, name, question.rdtype)
        max_size = 65535 if transport == "tcp" else max(512, query.payload)
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()

    def _answer(
        self,
        response: dns.message.Message,
        zone: Zone,
        name: str,
        rdtype: dns.rdatatype.RdataType,
    ) -> None:
        wanted = dns.rdatatype.to_text(rdtype)
        current = name
        for _ in range(8):  # CNAME chain
            records = zone.get(current)
            if records is None:
                self._negative(response, nxdomain=True)
                return
            if wanted in records:
                response.answer.append(self._rrset(current, wanted, records[wanted]))
                return
            if "CNAME" in records and wanted != "CNAME":
                rrset = self._rrset(current, "CNAME", records["CNAME"])
                response.answer.append(rrset)
                current = _norm(rrset[0].target)
                continue
            break
        self._negative(response, nxdomain=False)

    def _rrset(self, name: str, rdtype: str, values: list[str]) -> dns.rrset.RRset:
        return dns.rrset.from_text_list(
            dns.name.from_text(name),
            self.ttl,
            dns.rdataclass.IN,
            rdtype,
            values,
            origin=dns.name.root,
            relativize=False,
        )

    def _negative(self, response: dns.message.Message, *, nxdomain: bool) -> None:
        if nxdomain:
            response.set_rcode(dns.rcode.NXDOMAIN)
        soa = f"ns.test. hostmaster.test. 1 3600 600 86400 {self.negative_ttl}"
        response.authority.append(
            dns.rrset.from_text(dns.name.root, self.negative_ttl, dns.rdataclass.IN, "SOA", soa)
        )


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
