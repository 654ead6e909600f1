"""The epidemic itself, without sockets: many Membership instances exchange gossip through an
in-process pool. Checks that the tables converge in about log2(n) rounds, and that in steady
state no live node's beat ever goes unrefreshed for as long as the table's dead threshold
(so a large swarm does not flap), while records are not re-sent once everyone has them."""

import math
import os

from libswarm.errors import PeerUnavailableError
from libswarm.protocol import Message, decode, encode
from swarmd.discovery.access import AccessControl
from swarmd.discovery.membership import Membership
from swarmd.discovery.table import PeerTable
from swarmd.identity import NodeIdentity


class Conn:
    def __init__(self, target: Membership):
        self.target, self.replies = target, {}

    def send(self, msg_type, fields, tensors=None, timeout_s=1.0) -> int:
        req = decode(encode(msg_type, len(self.replies) + 1, fields))  # through the real codec
        fields, _ = self.target.on_gossip(req)
        self.replies[req.id] = decode(encode("ok", req.id, fields))
        return req.id

    def request(self, *args, **kwargs):
        raise PeerUnavailableError("no bandwidth probes in this simulation")

    def receive(self, req_id, deadline, what="") -> Message:
        return self.replies.pop(req_id)


class Pool:
    def __init__(self):
        self.members: dict[str, Membership] = {}

    def get(self, address, key=None):
        return Conn(self.members[address])

    def drop(self, address):
        pass


def swarm(n: int) -> tuple[list[Membership], Pool]:
    pool = Pool()
    members = []
    for i in range(n):
        identity = NodeIdentity(os.urandom(32))
        address = f"tcp://10.0.{i // 250}.{i % 250}:31330"
        m = Membership(identity=identity, pool=pool, table=PeerTable(), access=AccessControl("open", "", ""),
                       own_fields=lambda address=address, i=i: {"addresses": (address,), "state": "online",
                                                                "model_id": "m", "span": (i % 8, i % 8 + 1)},
                       expected_fingerprint=lambda m, b: None)
        pool.members[address] = m
        members.append(m)
    first = members[0].own_fields()["addresses"][0]
    for m in members[1:]:  # everyone knows only the first node, with its key
        m.add_hint(first, members[0].identity.public_key, "seed")
    return members, pool


def test_tables_converge_in_logarithmic_rounds_and_never_look_dead_in_steady_state():
    n = 32
    members, _ = swarm(n)
    ids = {m.identity.public_key for m in members}
    rounds = 0
    while not all({e.record.node_id for e in m.table.entries()} == ids for m in members):
        for m in members:
            m.round()
        rounds += 1
        assert rounds <= 3 * math.log2(n), f"not converged after {rounds} rounds"

    # steady state: per (holder, node), rounds since a newer version arrived
    threshold_rounds = members[0].table.stale_after_s() / members[0].table.gossip_interval_s
    last_beat = {(i, e.record.node_id): e.beat for i, m in enumerate(members) for e in m.table.entries()}
    age = dict.fromkeys(last_beat, 0)
    worst = 0
    seqs = {e.record.node_id: e.record.seq for e in members[0].table.entries()}
    for _ in range(10):
        for m in members:
            m.round()
        for i, m in enumerate(members):
            for e in m.table.entries():
                key = (i, e.record.node_id)
                age[key] = 0 if e.beat != last_beat.get(key) else age[key] + 1
                last_beat[key] = e.beat
                worst = max(worst, age[key])
    # nothing changed, and less than BODY_REFRESH_S passed: no record was re-signed
    assert {e.record.node_id: e.record.seq for e in members[0].table.entries()} == seqs
    print(f"{n} nodes: converged in {rounds} rounds; oldest record in steady state {worst} rounds "
          f"(dead after {threshold_rounds:.1f})")
    assert worst + 1 < threshold_rounds
