"""The epidemic itself, without sockets: many Membership instances exchange gossip and pings
through an in-process pool and the real codec. Checks that tables converge in about log2(n)
rounds and then stay quiet; that a killed member is routed around everywhere within a few
rounds and ends dead; that a liar's suspicion drops nobody; and that records of made-up nodes
stay where they were sent."""

import math
import os
import time

import pytest

from libswarm.errors import PeerUnavailableError
from libswarm.protocol import Message, decode, encode, registry
from swarmd.discovery.membership import Membership
from swarmd.discovery.records import Record
from swarmd.discovery.table import PeerTable
from swarmd.identity import NodeIdentity
from swarmd.transport.access import AccessControl


class Clock:
    """time.monotonic for the test: one gossip round is one second."""

    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


CLOCK = Clock()


@pytest.fixture(autouse=True)
def simulated_time(monkeypatch):
    monkeypatch.setattr(time, "monotonic", CLOCK)


def one_round(members: list["Membership"], pool: "Pool") -> None:
    CLOCK.t += 1.0
    for m in members:
        if address(m) not in pool.dead:
            m.round()


def gossip(fields: dict) -> registry.Gossip:
    """A gossip request as the peer plane hands it to membership: decoded into its type."""
    return registry.typed(registry.Gossip, registry.parse(registry.PEER, Message("gossip", 1, fields)))


class Conn:
    def __init__(self, pool: "Pool", source: str, target: str):
        self.pool, self.source, self.target, self.replies = pool, source, target, {}

    def send(self, msg_type, fields, tensors=None, timeout_s=1.0, connect_by=None) -> int:
        if self.target in self.pool.dead or (self.source, self.target) in self.pool.cut or \
                self.target not in self.pool.members:
            raise PeerUnavailableError(f"{self.target} does not answer")
        req = decode(encode(msg_type, len(self.replies) + 1, fields))  # through the real codec
        self.pool.bytes += sum(len(f) for f in encode(msg_type, req.id, fields))
        sender = self.pool.members[self.source].identity.public_key if self.source in self.pool.members else None
        fields = {} if msg_type == "ping" else self.pool.members[self.target].on_gossip(
            registry.parse(registry.PEER, req), sender=sender)[0]
        frames = encode("ok", req.id, fields)
        self.pool.bytes += sum(len(f) for f in frames)
        self.replies[req.id] = decode(frames)
        return req.id

    def request(self, *args, **kwargs):
        raise PeerUnavailableError("no bandwidth probes in this simulation")

    def receive(self, req_id, deadline, what="") -> Message:
        return self.replies.pop(req_id)


class Pool:
    def __init__(self):
        self.members: dict[str, Membership] = {}
        self.dead: set[str] = set()
        self.cut: set[tuple[str, str]] = set()  # (from, to) links that fail
        self.bytes = 0

    def for_member(self, source: str):
        pool = self

        class View:
            def get(self, address, key=None):
                return Conn(pool, source, address)

            def drop(self, address):
                pass

        return View()


def address(m: Membership) -> str:
    return m.own_fields()["addresses"][0]


def swarm(n: int) -> tuple[list[Membership], Pool]:
    pool = Pool()
    members = []
    for i in range(n):
        identity = NodeIdentity(os.urandom(32))
        addr = f"tcp://10.0.{i // 250}.{i % 250}:31330"
        m = Membership(identity=identity, pool=pool.for_member(addr), table=PeerTable(),
                       access=AccessControl("open", "", ""),
                       own_fields=lambda addr=addr, i=i: {"addresses": (addr,), "state": "online",
                                                          "model_id": "m", "span": (i % 8, i % 8 + 1)},
                       expected_fingerprint=lambda m, b: None)
        pool.members[addr] = m
        members.append(m)
    for m in members[1:]:  # everyone knows only the first node, with its key
        m.add_hint(address(members[0]), members[0].identity.public_key, "seed")
    return members, pool


def routable(m: Membership) -> set[str]:
    return {s.address for s in m.table.servers_for("m")}


def run(members: list[Membership], pool: Pool, until, limit: int) -> int:
    rounds = 0
    while not until():
        one_round(members, pool)
        rounds += 1
        assert rounds <= limit, f"not done after {rounds} rounds"
    return rounds


def converged(n: int) -> tuple[list[Membership], Pool, int]:
    members, pool = swarm(n)
    everyone = {address(m) for m in members}
    rounds = run(members, pool, lambda: all(routable(m) == everyone for m in members), 3 * math.log2(n) + 4)
    return members, pool, rounds


def test_tables_converge_in_logarithmic_rounds_then_stay_quiet(monkeypatch):
    # Loads and measurements are re-signed every body_refresh_s() (16 s at 32 nodes) by design;
    # a convergence that took more rounds than usual reached that refresh inside the quiet rounds
    # below (4 records at seq 2 in one CI run). Quiet means no news: the refresh is kept out.
    monkeypatch.setattr("swarmd.discovery.membership.BODY_REFRESH_S", 1e6)
    n = 32
    members, pool, rounds = converged(n)
    seqs = {e.record.node_id: e.record.seq for e in members[0].table.entries()}
    for _ in range(members[0].table.hot_rounds()):  # nothing to say any more once the news has gone round
        one_round(members, pool)
    pool.bytes = 0
    one_round(members, pool)
    per_member = pool.bytes / n
    # nothing changed, and less than the body refresh passed: no record was re-signed
    assert {e.record.node_id: e.record.seq for e in members[0].table.entries()} == seqs
    assert all(m.table.state(e) == "online" for m in members for e in m.table.entries())
    print(f"{n} nodes: converged in {rounds} rounds; a quiet round costs {per_member:.0f} B per member")
    # 3 requests of tags and bucket sums (one in ten rounds), 3 small replies, pings: no records
    assert per_member < 3 * 700


def test_a_killed_member_is_routed_around_everywhere_then_dead_and_a_liars_suspicion_drops_nobody():
    n = 32
    members, pool, _ = converged(n)
    victim, accused = members[5], members[9]
    liar = NodeIdentity(os.urandom(32))
    # a liar tells a few members that `accused` (alive) cannot be reached
    e = members[0].table.get(accused.identity.public_key)
    suspicion = [accused.identity.public_key, e.record.incarnation, e.beat]
    for m in members[1:6]:
        m.on_gossip(gossip({"suspects": [suspicion]}), sender=liar.public_key)
    pool.dead.add(address(victim))
    live = [m for m in members if m is not victim]
    took = run(live, pool, lambda: not any(address(victim) in routable(m) for m in live), 2 * math.log2(n) + 2)
    print(f"kill: routed around by all {n - 1} in {took} rounds")
    assert all(address(accused) in routable(m) for m in live), "a made-up suspicion dropped a live node"
    t = live[0].table
    run(live, pool, lambda: all(m.table.state(m.table.get(victim.identity.public_key)) == "dead" for m in live),
        t.suspect_after_s() / t.gossip_interval_s + 3)


def test_records_of_made_up_nodes_stay_where_they_were_sent():
    members, pool, _ = converged(16)
    fakes = []
    for k in range(8):
        ident = NodeIdentity(os.urandom(32))
        fakes.append(ident.public_key)
        r = Record(node_id=ident.public_key, sign_key=ident.sign_key, addresses=(f"tcp://10.9.9.{k}:1",),
                   state="online", timestamp=0.0, seq=1, model_id="m", span=(0, 8), throughput=1e6)
        members[3].on_gossip(gossip({"records": [r.sign(ident)]}))
    for _ in range(12):
        one_round(members, pool)
    held = {m.own_fields()["addresses"][0] for m in members for f in fakes if m.table.get(f) is not None}
    assert held == {address(members[3])}
    assert not any(f in {s.address for s in members[3].table.servers_for("m")} for f in fakes)
    assert all(members[3].table.state(members[3].table.get(f)) in ("unreachable", "dead") for f in fakes)


def test_a_node_one_peer_cannot_reach_stays_online_for_the_others():
    """`a` learns that it cannot reach `x` when its random fanout first picks `x` (each round
    with probability FANOUT / 15: it took more than 12 rounds in 7 % of runs, which made a
    fixed 12 rounds flaky). Meanwhile and after, no other node declares `x` gone (its
    suspicions from `a` are checked and cleared: `suspect` for a moment is allowed), and
    after a few rounds they all route to it."""
    members, pool, _ = converged(16)
    a, x = members[2], members[7]
    pool.cut.add((address(a), address(x)))

    def others_keep_x() -> bool:
        return all(m.table.state(m.table.get(x.identity.public_key)) not in ("dead", "unreachable")
                   for m in members if m is not a)

    for rounds in range(1, 101):  # P(not picked in 100 rounds) = (1 - 3/15) ** 100 = 2e-10
        one_round(members, pool)
        assert others_keep_x(), f"round {rounds}"
        if a.table.state(a.table.get(x.identity.public_key)) in ("unreachable", "dead"):
            break
    assert a.table.state(a.table.get(x.identity.public_key)) in ("unreachable", "dead")
    for _ in range(12):
        one_round(members, pool)
        assert others_keep_x()
    assert all(address(x) in routable(m) for m in members if m is not a)



def test_a_round_opens_at_most_its_contacts_and_the_rest_wait_for_the_next():
    """300 seeds that are gone: a round used to open a connection to every one of them at once
    (and a daemon's sockets ran out at ~340). Each round contacts at most
    MAX_CONTACTS_PER_ROUND; the others are contacted by the next rounds."""
    from swarmd.discovery.membership import MAX_CONTACTS_PER_ROUND

    members, pool = swarm(1)
    m = members[0]
    seeds = [f"tcp://10.9.{i // 250}.{i % 250}:31330" for i in range(300)]
    for s in seeds:
        m.add_hint(s, NodeIdentity(os.urandom(32)).public_key, "seed")
    asked: list[set[str]] = []
    real_get = m.pool.get

    def get(address, key=None):
        asked[-1].add(address)
        return real_get(address, key)
    m.pool.get = get
    for _ in range(4):
        asked.append(set())
        one_round(members, pool)
    assert all(len(a) <= MAX_CONTACTS_PER_ROUND for a in asked), [len(a) for a in asked]
    assert set(seeds) <= set().union(*asked[:3])  # every seed tried within three rounds


def test_refreshes_asked_at_once_share_one_round():
    """Eight apps' requests find no route at once and each asks for a refresh: they share the
    round that runs (0.3 s here), instead of eight rounds one after another (2.4 s) while the
    last waits past its deadline."""
    import threading
    import time as real_time

    members, pool = swarm(2)
    m = members[1]
    get = m.pool.get

    def slow_get(address, key=None):
        real_time.sleep(0.3)  # a round's contacts take this long
        return get(address, key)
    m.pool.get = slow_get
    before, barrier = m._rounds, threading.Barrier(8)

    def refresh():
        barrier.wait()
        m.refresh()
    threads = [threading.Thread(target=refresh) for _ in range(8)]
    t0 = real_time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    took = real_time.perf_counter() - t0
    assert m._rounds - before <= 2 and took < 1.5, (m._rounds - before, took)


def test_made_up_records_cost_a_round_few_connections_and_hold_up_no_one_elses_news():
    """A liar gossiping 48 records of made-up nodes at addresses of its choosing used to make
    the daemon it told open 32 connections a round to them (a refresh: all 48). Now the records
    one peer alone told of get PER_ORIGIN first contacts a round, all first contacts together
    PER_ROUND, and a node that joins meanwhile, telling of itself, is reached at once."""
    from swarmd.discovery.first_contacts import PER_ORIGIN, PER_ROUND

    members, pool, _ = converged(8)
    m = members[3]
    liar = NodeIdentity(os.urandom(32))
    made_up = set()
    for k in range(6):  # 8 records a request, as a request is cut to
        records = []
        for j in range(8):
            ident = NodeIdentity(os.urandom(32))
            r = Record(node_id=ident.public_key, sign_key=ident.sign_key, addresses=(f"tcp://10.9.{k}.{j}:1",),
                       state="online", timestamp=0.0, seq=1, model_id="m", span=(0, 8), throughput=1e6)
            records.append(r.sign(ident))
            made_up.add(r.addresses[0])
        m.on_gossip(gossip({"records": records}), sender=liar.public_key)
    asked: list[set[str]] = []
    real_get = m.pool.get

    def get(address, key=None):
        asked[-1].add(address)
        return real_get(address, key)
    m.pool.get = get
    for _ in range(3):
        asked.append(set())
        one_round(members, pool)
    asked.append(set())
    m.refresh()
    assert all(len(a & made_up) <= PER_ORIGIN for a in asked), [len(a & made_up) for a in asked]
    assert all(len(a - {address(x) for x in members}) <= PER_ROUND for a in asked)

    # a newcomer tells the daemon of itself while the made-up nodes still wait: reached at once
    joiner_address = "tcp://10.0.5.5:31330"
    joiner = Membership(identity=NodeIdentity(os.urandom(32)), pool=pool.for_member(joiner_address),
                        table=PeerTable(), access=AccessControl("open", "", ""),
                        own_fields=lambda: {"addresses": (joiner_address,), "state": "online", "model_id": "m",
                                            "span": (0, 1)},
                        expected_fingerprint=lambda m, b: None)
    pool.members[joiner_address] = joiner
    joiner.publish()
    wire = joiner.table.get(joiner.identity.public_key).wire
    m.on_gossip(gossip({"records": [wire]}), sender=joiner.identity.public_key)
    asked.append(set())
    one_round(members, pool)
    assert joiner_address in asked[-1] and len(asked[-1] & made_up) <= PER_ORIGIN
