"""Two ``ehlo serve`` nodes on one PostgreSQL behind HAProxy: several nodes, one store.

One database (the session's throwaway PostgreSQL), two nodes of two
workers each (``tests/cluster.py``), each with its own data folder, a
PROXY protocol listener behind a real HAProxy that balances connections
round robin with ``send-proxy-v2``, and a plain listener for a client
that must reach one node. Clients connect from 127.0.0.2, so the address
HAProxy passes on differs from its own (127.0.0.1). The nodes relay mail
for ``sink.test`` to a counting sink on 127.0.0.6 (``--relay-host``) with
a delivery lease of a few seconds. The nodes start once for the module:

1. 2,000 messages from 20 clients: each stored exactly once (counted by
   subject in SQL), taken by both nodes, visible through ``ehlo messages
   list`` with either node's data folder and through one node's HTTP API,
   with the client's own address.
2. PostgreSQL restarted under load: 451 4.3.0 while it is away, never a
   250 for a message that is then missing; both nodes serve again without
   a restart, each having logged one line for the outage.
3. SIGKILL of one node (its process group) under load, relayed mail in
   its queue: every acknowledged message is stored; the other node
   delivers what the dead one held once its leases expire; duplicates at
   the sink only among deliveries in flight at the kill.
"""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope as AioEnvelope

from .cluster import Load, Node, Outcome, message
from .haproxy import haproxy_available, run_haproxy
from .helpers import free_port, require, wait_until
from .pgserver import PgCluster
from .test_delivery_durability import QUEUED, CountingSink

pytestmark = pytest.mark.timeout(300)

CLIENT_IP = "127.0.0.2"  # the clients' source: what the nodes must record
SINK_IP = "127.0.0.6"
LEASE = 2.0  # seconds a node's claim on a delivery lasts unless renewed
RCPT = re.compile(r"^<?r(\d+)@sink\.test>?$")


class Sink(CountingSink):
    """The counting sink, also noting which deliveries began (RCPT) and from which node."""

    def __init__(self, host: str, port: int, *, delay: float = 0.0) -> None:
        super().__init__(host, port, delay=delay)
        self.begun: list[tuple[int, str]] = []  # (X-Seq of the recipient, the client's EHLO name)

    async def handle_RCPT(
        self,
        server: AioSMTP,
        session: Any,
        envelope: AioEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        found = RCPT.match(address)
        if found is not None:
            with self._lock:
                self.begun.append((int(found.group(1)), str(session.host_name)))
        return await super().handle_RCPT(server, session, envelope, address, options)

    def begun_by(self, node: Node) -> set[int]:
        """The X-Seq of each delivery ``node`` began (its EHLO name is its hostname)."""
        with self._lock:
            return {seq for seq, by in self.begun if by == node.hostname}


@dataclass
class Cluster:
    pg: PgCluster
    database: str
    url: str
    nodes: list[Node]
    front: tuple[str, int]  # HAProxy's frontend
    sink: Sink

    def sql(self, query: str) -> list[list[str]]:
        """Rows of ``query`` (psql, unaligned): each a list of its fields."""
        out = self.pg.psql(self.database, query)
        return [line.split("|") for line in out.splitlines() if line]

    def subjects(self, prefix: str) -> Counter[str]:
        """How many stored messages carry each subject starting with ``prefix``."""
        rows = self.sql(
            "SELECT subject, count(*) FROM messages"
            f" WHERE subject LIKE '{prefix}%' GROUP BY subject"
        )
        return Counter({subject: int(n) for subject, n in rows})


@pytest.fixture(scope="module")
def cluster(pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require(haproxy_available(), "haproxy is not installed (make test-deps installs it)")
    if not pg_cluster.running:
        pg_cluster.start()
    folder = tmp_path_factory.mktemp("cluster")
    database = pg_cluster.create_database()
    url = pg_cluster.url(database)
    sink = Sink(SINK_IP, free_port(SINK_IP), delay=0.05).start()
    config = (
        "tls = false\nmta_sts = false\nretry_min = 1.0\nretry_max = 2.0\n"
        f"delivery_timeout_scale = 0.05\ndelivery_connect_timeout = 5.0\ndelivery_lease = {LEASE}\n"
    )
    relay = [
        "--domain", "a.test", "--relay-network", "127.0.0.0/8",
        "--relay-host", f"{SINK_IP}:{sink.port}",
    ]  # fmt: skip
    nodes = [
        Node(name, folder, ["--store", url], config=config, args=relay, http=name == "a")
        for name in ("a", "b")
    ]
    try:
        for node in nodes:  # both start at once: one start-up's wait
            node.start()
        for node in nodes:
            node.wait_ready()
        a, b = nodes
        with run_haproxy(a.address, send_proxy="v2", more_backends=[b.address]) as front:
            yield Cluster(pg_cluster, database, url, nodes, front, sink)
    finally:
        for node in nodes:
            node.close()
        sink.stop()


class Entry(NamedTuple):
    """A relayed message's queue entry (one recipient each) as the database has it."""

    state: str
    token: str  # lease_token: the node process that last took it
    until: float | None  # lease_until, while delivering (the database's clock)
    seq: int | None  # its X-Seq, while the message is held (it leaves once delivered)


def queue_rows(cluster: Cluster) -> dict[str, Entry]:
    """Queue id -> its entry, for every entry of the queue."""
    rows = cluster.sql(
        "SELECT q.queue_id, q.state, coalesce(q.lease_token, ''), q.lease_until, m.subject"
        " FROM queue q LEFT JOIN messages m USING (queue_id)"
    )
    return {
        queue_id: Entry(
            state,
            token,
            float(until) if until else None,
            int(subject.split()[1]) if subject else None,
        )
        for queue_id, state, token, until, subject in rows
    }


def token_pid(token: str) -> str:
    """The process that holds a lease: its token is ``host:pid:random``."""
    parts = token.split(":")
    return parts[-2] if len(parts) >= 3 else ""


def queued_as(reply: str) -> str:
    """The queue id a 250 names."""
    found = QUEUED.search(reply.encode())
    assert found is not None, reply
    return found.group(1).decode()


def acknowledged(outcomes: list[Outcome]) -> set[str]:
    return {o.tag for o in outcomes if o.code == 250}


def ehlo_json(*args: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "ehlo", *args], capture_output=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return json.loads(done.stdout)


def api(node: Node, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}{path}", timeout=60) as reply:
        return json.load(reply)


# ----------------------------------------------------------------- 1. load


def test_two_thousand_messages_through_haproxy_each_stored_once(cluster: Cluster) -> None:
    total = 2000
    items = [(f"load {seq:04d}", seq) for seq in range(total)]
    load = Load(*cluster.front, items, rcpt=lambda seq: f"u{seq}@a.test", clients=20)
    outcomes = load.start().wait()
    print(f"\n2,000 messages through HAProxy to two nodes: {load.elapsed:.1f} s")
    assert [o for o in outcomes if o.code != 250] == []
    assert len(acknowledged(outcomes)) == total

    # Each stored exactly once, whichever node took it.
    stored = cluster.subjects("load ")
    assert set(stored) == {tag for tag, _ in items}
    assert set(stored.values()) == {1}
    # The real client's address (HAProxy's PROXY v2 header), never HAProxy's.
    addresses = cluster.sql(
        "SELECT client_ip, count(*) FROM messages WHERE subject LIKE 'load %' GROUP BY client_ip"
    )
    assert addresses == [[CLIENT_IP, str(total)]]
    # Both nodes took a fair share: round robin, connection by connection.
    by_node = dict(
        cluster.sql("SELECT node, count(*) FROM messages WHERE subject LIKE 'load %' GROUP BY node")
    )
    per_node = Counter[str]()
    for node in cluster.nodes:
        pids = {str(pid) for pid in node.pids()}
        per_node[node.name] = sum(
            int(n) for name, n in by_node.items() if name.rsplit(":", 1)[-1] in pids
        )
    assert sum(per_node.values()) == total, (by_node, per_node)
    assert min(per_node.values()) >= total // 4, per_node

    # Visible through ``ehlo messages list`` with either node's data folder.
    for node in cluster.nodes:
        listed = ehlo_json(
            "messages",
            "list",
            "--data",
            str(node.data),
            "--store",
            cluster.url,
            "--subject",
            "load ",
            "--all",
            "--json",
        )
        assert sorted(item["subject"] for item in listed) == sorted(stored)
        assert {item["client_ip"] for item in listed} == {CLIENT_IP}
    # ... and through the HTTP API of the node that has one.
    web = next(node for node in cluster.nodes if node.http_port)
    query = urllib.parse.quote('subject:"load 1234"')
    found = api(web, f"/api/v1/messages?q={query}")
    assert [item["subject"] for item in found["messages"]] == ["load 1234"]
    assert found["messages"][0]["client_ip"] == CLIENT_IP
    page = api(web, "/api/v1/messages?limit=1")
    assert page["total"] == int(cluster.sql("SELECT count(*) FROM messages")[0][0])


# ----------------------------------------------------------------- 2. the database restarts

DOWN = "postgresql: the database is unreachable"
BACK = "postgresql: the database is back"


def send_direct(node: Node, tag: str) -> str:
    """One message straight to ``node`` (its plain listener); the DATA reply's text."""
    with smtplib.SMTP(
        "127.0.0.1", node.direct_port, timeout=60, source_address=(CLIENT_IP, 0)
    ) as client:
        client.ehlo("direct.client.test")
        code, text = client.mail("load@client.test")
        assert code == 250, text
        code, text = client.rcpt("someone@a.test")
        assert code == 250, text
        code, text = client.data(message(tag, 0, "someone@a.test"))
        assert code == 250, (code, text)
        return text.decode()


def test_database_restart_under_load(cluster: Cluster) -> None:
    items = [(f"restart {seq:04d}", seq) for seq in range(100_000)]
    lines = {node.name: len(node.log_text().splitlines()) for node in cluster.nodes}
    load = Load(
        *cluster.front, items, rcpt=lambda seq: f"u{seq}@a.test", clients=10, per_connection=20
    ).start()
    try:
        wait_until(lambda: load.acknowledged() >= 50, "50 messages acknowledged", 120)
        cluster.pg.stop("fast")
        try:
            # Every client sees the database gone (451), more than once.
            wait_until(lambda: load.codes()[451] >= 30, lambda: f"451s: {load.codes()}", 120)
            gap = load.codes()
        finally:
            cluster.pg.start()
        # Both nodes store again, without a restart.
        before = load.acknowledged()
        wait_until(
            lambda: load.acknowledged() >= before + 100,
            lambda: f"100 more messages acknowledged after the restart: {load.codes()}",
            120,
        )
    finally:
        load.stop()
        outcomes = load.wait()
    codes = Counter(o.code for o in outcomes)
    print(f"\nrestart under load: {dict(codes)}; during the gap {dict(gap)}")
    # Only 250, or 451 4.3.0 at the end of the data: no connection lost, no other reply.
    refused = [o for o in outcomes if o.code != 250]
    assert refused and all(o.code == 451 and o.text.startswith("4.3.0") for o in refused), [
        o for o in refused if o.code != 451 or not o.text.startswith("4.3.0")
    ][:5]
    assert load.errors == []
    # Nothing acknowledged is missing; nothing is stored twice.
    stored = cluster.subjects("restart ")
    missing = acknowledged(outcomes) - set(stored)
    assert not missing, sorted(missing)[:10]
    assert set(stored.values()) == {1}
    # A message straight to each node: both serve again.
    for node in cluster.nodes:
        send_direct(node, f"after restart {node.name}")
    assert set(cluster.subjects("after restart ")) == {"after restart a", "after restart b"}
    # The outage is logged, not one line per message, and nothing crashed.
    per_node = {
        node.name: node.log_text().splitlines()[lines[node.name] :] for node in cluster.nodes
    }
    failed = len(refused)
    for name, logged in per_node.items():
        down = [line for line in logged if DOWN in line]
        back = [line for line in logged if BACK in line]
        assert down and back, (name, logged[-20:])
        assert len(down) < failed, (name, len(down), failed)
        assert not [line for line in logged if "Traceback" in line], name
    # One line when the database went away and one when it came back, per
    # node (not per worker process), and no error line per refused message.
    known = {
        name: (
            sum(DOWN in line for line in logged),
            sum(BACK in line for line in logged),
            sum("commit failed" in line and " DEBUG " not in line for line in logged),
        )
        for name, logged in per_node.items()
    }
    assert all(found == (1, 1, 0) for found in known.values()), known


# ----------------------------------------------------------------- 3. a node killed


def test_kill_one_node_under_load(cluster: Cluster) -> None:
    total = 400
    items = [(f"relay {seq:04d}", seq) for seq in range(total)]
    sink = cluster.sink

    def delivering(node: Node) -> set[int]:
        """What ``node`` has begun to hand the sink and the sink has not taken yet."""
        return sink.begun_by(node) - set(sink.seqs())

    load = Load(
        *cluster.front, items, rcpt=lambda seq: f"r{seq}@sink.test", clients=10,
        per_connection=10, pause=0.01,
    ).start()  # fmt: skip
    try:
        # Mid-load, with deliveries in flight: kill the node making them (a
        # scheduler takes whatever is due, so either node may hold them all).
        wait_until(
            lambda: load.acknowledged() >= total // 4 and any(map(delivering, cluster.nodes)),
            lambda: f"{load.acknowledged()} acknowledged and {sink.count()} at the sink",
            120,
        )
        a, b = sorted(cluster.nodes, key=lambda node: -len(delivering(node)))
        a_pids = {str(pid) for pid in a.pids()}
        a.kill()
        killed_at = time.time()
        sent_at_kill = len(load.outcomes)
        at_kill = queue_rows(cluster)
        begun_at_kill = sink.begun_by(a)
    finally:
        outcomes = load.wait()
    assert sent_at_kill < total, "the load was over before the kill"
    print(
        f"\nkill -9 of node {a.name} after {sent_at_kill} of {total} messages:"
        f" {dict(Counter(o.code for o in outcomes))}"
    )
    assert {o.code for o in outcomes} <= {250, None}  # lost with the node, or acknowledged
    # Every acknowledged message has its entry; it leaves the store once delivered.
    ids = {queued_as(o.text): o.seq for o in outcomes if o.code == 250}
    assert len(ids) == len(acknowledged(outcomes))
    missing = set(ids) - set(queue_rows(cluster))
    assert not missing, sorted(ids[q] for q in missing)[:10]

    # The other node delivers everything, the dead one's entries too once their leases ran out.
    def undelivered() -> Counter[str]:
        return Counter(e.state for e in queue_rows(cluster).values() if e.state != "delivered")

    wait_until(lambda: not undelivered(), lambda: f"every entry delivered: {undelivered()}", 120)
    rows = queue_rows(cluster)
    seen = Counter(sink.seqs())
    lost = set(ids.values()) - set(seen)
    assert not lost, sorted(lost)[:10]
    assert len(rows) == len(seen)  # each message stored once: one entry each, all delivered

    # In flight at the kill: the dead node's deliveries the sink had begun (and the
    # database did not call delivered), and the entries under its leases.
    def seq(queue_id: str, entry: Entry) -> int | None:
        return entry.seq if entry.seq is not None else ids.get(queue_id)

    state_at_kill = {seq(q, e): e.state for q, e in at_kill.items()}
    a_leases = {
        seq(q, e): e.until
        for q, e in at_kill.items()
        if e.state == "delivering" and token_pid(e.token) in a_pids
    }
    in_flight = {s for s in begun_at_kill if state_at_kill.get(s, "delivered") != "delivered"}
    in_flight |= {s for s in a_leases if s is not None}
    duplicates = {s: n for s, n in seen.items() if n > 1}
    print(
        f"{len(rows)} relayed; in flight at the kill: {len(in_flight)} ({len(a_leases)} under"
        f" node {a.name}'s leases); duplicates at the sink: {len(duplicates)}"
        f" ({sum(duplicates.values()) - len(duplicates)} extra copies)"
    )
    assert set(duplicates) <= in_flight, sorted(set(duplicates) - in_flight)
    assert len(duplicates) <= len(in_flight)
    # What the dead node held was delivered by the other, once its lease had run out.
    assert a_leases, f"node {a.name} held no lease at the kill"
    assert None not in a_leases, a_leases
    arrivals = sink.arrivals()
    for s, until in a_leases.items():
        assert s is not None and until is not None
        last = max(arrivals[s])
        assert last >= until - 0.5, (s, until, arrivals[s], killed_at)
        assert s in sink.begun_by(b), s
