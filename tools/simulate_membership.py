#!/usr/bin/env python3
"""Membership at scale, in one process: many members gossiping through the real code.

    python tools/simulate_membership.py [--nodes 1000] [--rounds 40] [--seed 0]

Every member is a real Membership with its own PeerTable; requests and replies go through
the real codec (libswarm.protocol encode/decode) and the real record and beat checks. Time
is simulated (one gossip round is one second for every member), so the figures are rounds
of the real protocol, not this machine's speed. One shortcut, stated: each distinct
signature is verified once and the answer remembered for every member (the answer is the
same for all; without it 1,000 members would verify ~10^6 beats a round on two cores).

The swarm starts converged. Then, at fixed rounds: a node joins (knowing one seed), a node
dies (silently, as kill -9), and throughout, one hostile member floods every peer it knows
with made-up signed records, padded with unsigned bytes, and records that lie (a span to
2^40, infinite throughput). Printed: rounds until the join reaches every live member, until
every live member stops routing to the dead node, bytes per second per node in steady state
(mean and worst, sent plus received), the largest message, and what the hostile member
achieved."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SimClock:
    """time.monotonic and time.time for every module: one gossip round is one second."""

    def __init__(self):
        self.t = 1_000_000.0

    def monotonic(self) -> float:
        return self.t

    def time(self) -> float:
        return 1_800_000_000.0 + self.t


CLOCK = SimClock()
time.monotonic = CLOCK.monotonic  # before the project's modules are imported and used
time.time = CLOCK.time

from libswarm.errors import PeerUnavailableError  # noqa: E402
from libswarm.protocol import Message, decode, encode, registry  # noqa: E402
from swarmd.discovery import records as records_module  # noqa: E402
from swarmd.discovery.membership import Membership  # noqa: E402
from swarmd.discovery.records import Record  # noqa: E402
from swarmd.discovery.table import PeerTable  # noqa: E402
from swarmd.identity import NodeIdentity  # noqa: E402
from swarmd.transport.access import AccessControl  # noqa: E402

records_module.verify = functools.lru_cache(maxsize=None)(records_module.verify)
logging.getLogger("swarmd").setLevel(logging.ERROR)  # a refusal per member would be thousands of lines


class Traffic:
    def __init__(self):
        self.bytes: dict[str, int] = {}
        self.largest = 0

    def count(self, address: str, frames: list) -> int:
        n = sum(len(f) for f in frames)
        self.bytes[address] = self.bytes.get(address, 0) + n
        self.largest = max(self.largest, n)
        return n


class Conn:
    """A connection from `source` to `target` that runs the target's handler through the codec."""

    def __init__(self, net: Net, source: str, target: str):
        self.net, self.source, self.target = net, source, target
        self.replies: dict[int, Message] = {}

    def send(self, msg_type, fields=None, tensors=None, timeout_s=1.0, connect_by=None) -> int:  # connected at once
        member = self.net.members.get(self.target)
        if member is None or self.target in self.net.dead:
            raise PeerUnavailableError(f"peer {self.target} refuses connections")
        req_id = len(self.replies) + 1
        frames = [bytes(f) for f in encode(msg_type, req_id, fields)]
        self.net.traffic.count(self.source, frames)
        self.net.traffic.count(self.target, frames)
        sender = self.net.members[self.source].identity.public_key if self.source in self.net.members else None
        if msg_type == "ping":
            reply_fields = {}
        else:
            reply_fields, _ = member.on_gossip(registry.parse(registry.PEER, decode(frames)), sender=sender)
        reply = [bytes(f) for f in encode("ok", req_id, reply_fields)]
        self.net.traffic.count(self.source, reply)
        self.net.traffic.count(self.target, reply)
        self.replies[req_id] = decode(reply)
        return req_id

    def request(self, *args, **kwargs):
        raise PeerUnavailableError("no bandwidth probes in this simulation")

    def receive(self, req_id, deadline, what="") -> Message:
        return self.replies.pop(req_id)


class Net:
    def __init__(self, blocks: int = 1):
        self.blocks = blocks  # per member's span: its record carries a fingerprint per block
        self.members: dict[str, Membership] = {}
        self.dead: set[str] = set()
        self.traffic = Traffic()

    def pool(self, source: str):
        net = self

        class Pool:
            def get(self, address, key=None):
                return Conn(net, source, address)

            def drop(self, address):
                pass

        return Pool()

    def add(self, i: int, seed: Membership | None) -> Membership:
        identity = NodeIdentity(os.urandom(32))
        address = f"tcp://127.0.{i // 250}.{i % 250 + 1}:31330"  # names only: nothing is sent anywhere
        blocks = self.blocks
        fields = {"addresses": (address,), "state": "online", "model_id": "sim-model",
                  "span": (i % 40, i % 40 + blocks), "throughput": 10.0,
                  "fingerprints": tuple(os.urandom(8).hex() for _ in range(blocks))}
        m = Membership(identity=identity, pool=self.pool(address), table=PeerTable(),
                       access=AccessControl("open", "", ""), own_fields=lambda: dict(fields),
                       expected_fingerprint=lambda model, block: None, incarnation=1)
        m.sim_address = address  # type: ignore[attr-defined]
        if seed is not None:
            m.add_hint(seed.sim_address, seed.identity.public_key, "seed")  # type: ignore[attr-defined]
        self.members[address] = m
        return m

    def live(self) -> list[Membership]:
        return [m for a, m in self.members.items() if a not in self.dead]

    def round(self) -> None:
        CLOCK.t += 1.0
        order = self.live()
        random.shuffle(order)
        for m in order:
            m.round()


LIARS: set[str] = set()


def hostile_records(n: int) -> list[dict]:
    """Signed records of made-up nodes, padded with unsigned bytes; and two that lie."""
    import base64

    out = []
    for _ in range(n):
        liar = NodeIdentity(os.urandom(32))
        r = Record(node_id=liar.public_key, sign_key=liar.sign_key, addresses=("tcp://127.9.9.9:1",), state="online",
                   timestamp=CLOCK.time(), seq=1, incarnation=1, model_id="sim-model", span=(0, 40),
                   throughput=1e6)
        out.append({**r.sign(liar), "padding": "x" * 6_000})
    for lie in ('"span":[0,1099511627776]', '"throughput":1e999'):  # a span to 2^40; infinite throughput
        liar = NodeIdentity(os.urandom(32))
        LIARS.add(liar.public_key)
        body = Record(node_id=liar.public_key, sign_key=liar.sign_key, addresses=("tcp://127.9.9.8:1",),
                      state="online", timestamp=CLOCK.time(), seq=1, span=(0, 1), throughput=1.0).sign(liar)["body"]
        text = body.replace('"span":[0,1]', lie) if "span" in lie else body.replace('"throughput":1.0', lie)
        out.append({"body": text, "sig": base64.b64encode(liar.sign(text.encode())).decode()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=40,
                    help="at least 25: rounds 3-13 hold the join, the death and the flood; the last 10 the flood alone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blocks", type=int, default=1,
                    help="blocks per member (40: realistic records of ~1.7 KB with 32 round trips)")
    args = ap.parse_args()
    random.seed(args.seed)
    net = Net(args.blocks)
    t0 = time.perf_counter()
    members = [net.add(i, None) for i in range(args.nodes)]
    # converged start: everyone holds everyone's record, as after a long run, and has reached
    # each node before
    for m in members:
        m.publish()
    wires = [m.table.get(m.identity.public_key).wire for m in members]
    for m in members:
        m.receive(wires, source="start", limit=len(wires), news=False)
        for other in members:
            if other is not m:
                m.table.observe(other.identity.public_key, unreachable=None)
        m.hot_news.clear()  # its own record is old news
    print(f"{args.nodes} members set up in {time.perf_counter() - t0:.0f} s", flush=True)

    hostile, flood = members[-1], hostile_records(6)
    join_round, death_round = 5, 5
    joiner = victim = None
    join_done = death_done = None
    steady_from, steady_bytes, steady, quiet_bytes = 3, {}, {}, {}
    flood_traffic = Traffic()
    flooded_before: dict[str, int] = {}
    flooded: dict[str, int] = {}
    for r in range(1, args.rounds + 1):
        if r == args.rounds - 10:
            quiet_bytes = dict(net.traffic.bytes)
        if r == steady_from:
            steady_bytes = dict(net.traffic.bytes)
            flooded_before = dict(flood_traffic.bytes)
        if r == join_round:
            seed_member = random.choice(members[:-1])
            joiner = net.add(len(net.members), seed_member)
        if r == death_round:
            victim = members[len(members) // 2]
            net.dead.add(victim.sim_address)  # type: ignore[attr-defined]
        # the hostile member sends its flood to a few peers besides gossiping as usual
        honest_traffic, net.traffic = net.traffic, flood_traffic  # the flood is counted apart
        for target in random.sample(members[:-1], 3):
            if target.sim_address not in net.dead:  # type: ignore[attr-defined]
                net.pool(hostile.sim_address).get(target.sim_address).send(  # type: ignore[attr-defined]
                    "gossip", {"records": flood})
        net.traffic = honest_traffic
        t_round = time.perf_counter()
        net.round()
        live = [m for m in net.live() if m is not victim]
        if joiner is not None and join_done is None:
            if all(any(s.address == joiner.sim_address for s in m.table.servers_for("sim-model"))  # type: ignore
                   for m in live if m is not joiner):
                join_done = r - join_round + 1
        if victim is not None and death_done is None:
            if all(not any(s.address == victim.sim_address for s in m.table.servers_for("sim-model"))  # type: ignore
                   for m in live):
                death_done = r - death_round + 1
        if r == steady_from + 10:
            steady = {a: net.traffic.bytes.get(a, 0) - steady_bytes.get(a, 0) for a in net.members}
            flooded = {a: flood_traffic.bytes.get(a, 0) - flooded_before.get(a, 0) for a in net.members}
        print(f"round {r}: {time.perf_counter() - t_round:.1f} s", flush=True)

    seed_bytes = steady.get(seed_member.sim_address, 0) / 10  # type: ignore[attr-defined]
    honest = {a: v / 10 for a, v in steady.items()  # type: ignore[attr-defined]
              if a not in net.dead and a not in (hostile.sim_address, joiner.sim_address, seed_member.sim_address)}
    per_node = list(honest.values())
    lies = sum(1 for m in net.live() for e in m.table.entries() if e.record.node_id in LIARS)
    made_up = sum(1 for m in net.live() for e in m.table.entries() if e.record.addresses[0].startswith("tcp://127.9."))
    padded = sum(1 for m in net.live() for e in m.table.entries() if "padding" in e.wire)
    stale = members[0].table.suspect_after_s()
    print(f"\n{args.nodes} members, 1 s rounds, fanout 3, suspected nodes dead after {stale:.0f} s; "
          f"loads re-signed every {members[0].body_refresh_s():.0f} s")
    print(f"join reached every live member in: {join_done} rounds" if join_done else
          f"join: not everywhere after {args.rounds - join_round + 1} rounds")
    print(f"death: no live member routes to it after {death_done} rounds" if death_done else
          f"death: still routed to somewhere after {args.rounds - death_round + 1} rounds")
    print(f"rounds {steady_from}-{steady_from + 10}, sent+received per honest node (but the joiner's seed): "
          f"median {statistics.median(per_node) / 1000:.1f} KB/s, "
          f"mean {statistics.mean(per_node) / 1000:.1f} KB/s, worst {max(per_node) / 1000:.1f} KB/s (rounds "
          f"{steady_from}-{steady_from + 10}, with the join, the death and the answers to the flood; the flooder: "
          f"{steady.get(hostile.sim_address, 0) / 10 / 1000:.1f} KB/s; the joiner, reached by every member once: "
          f"{steady.get(joiner.sim_address, 0) / 10 / 1000:.1f} KB/s; its seed, which it pulls the table from: "
          f"{seed_bytes / 1000:.1f} KB/s)")  # type: ignore[attr-defined]
    with_flood = [v + flooded.get(a, 0) / 10 for a, v in honest.items()]
    print(f"  with the flood's requests counted too: worst {max(with_flood) / 1000:.1f} KB/s (a flood request "
          f"is {flood_traffic.largest / 1024:.1f} KiB: a member can always be sent bytes; it keeps none of them)")
    quiet = [(net.traffic.bytes.get(a, 0) - quiet_bytes.get(a, 0)) / 10 for a in honest]
    print(f"steady state, rounds {args.rounds - 10}-{args.rounds} (the join and death settled; the flood goes on), "
          f"per honest node: median {statistics.median(quiet) / 1000:.1f} KB/s, "
          f"mean {statistics.mean(quiet) / 1000:.1f} KB/s, worst {max(quiet) / 1000:.1f} KB/s")
    print(f"largest message of the protocol: {net.traffic.largest / 1024:.1f} KiB (limit 64 KiB)")
    print(f"hostile: made-up nodes held by honest members {made_up} "
          f"(of {len(flood) - 2} x {len(net.live()) - 1} possible), padded wires kept {padded}, lying records kept "
          f"{lies}; made-up nodes are unreachable, so they are never routed to and leave the fanout")


if __name__ == "__main__":
    main()
