#!/usr/bin/env python3
"""How fast membership works, on real daemons on loopback, and what encryption costs.

    python tools/bench_membership.py [--nodes 4] [--repeat 3]

1. Convergence: --nodes servers start together, knowing only the first as a seed (or, for
   mDNS, nothing); time from the last daemon ready until every table lists all online.
2. Join: one more daemon starts into the converged swarm; time from its readiness until
   every table lists it online.
3. Death: one daemon is killed with SIGKILL; time until no table lists it online.
4. CURVE: a ZeroMQ request/reply round trip between two threads, plaintext and CURVE side
   by side, for a decode step's hidden state (8 KiB) and a prefill's (4 MiB).

    python tools/bench_membership.py --gossip-cost 1000 5000

5. Gossip cost (alone, no daemons): CPU time of the serving thread per `gossip` request
   against a table of that many believed nodes, 512 of them news (a busy swarm): as an
   honest caller sends it (the news tags it has), with anti-entropy `sums` equal to the
   table's (a converged caller), with sums of an empty table (every bucket differs; the
   reply is the most it may carry), with no tags (every piece of news is a candidate), and
   with the most records a request may bring (8, held here already)."""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time

import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from localswarm import Daemon, online_ids, running_swarm, until, wait_tables  # noqa: E402
from make_test_model import make_model  # noqa: E402


def swarm_times(model_dir: str, n: int, mode: str) -> dict:
    spans = [f"{i % 4}:{i % 4 + 1}" for i in range(n)]
    with running_swarm(model_dir, spans, gateway=False, seeds="first" if mode == "seeds" else "none",
                       mdns=mode == "mdns") as (servers, _):
        ids = {s.node_id for s in servers}
        converge = wait_tables(servers, ids, 60.0)
        root = os.path.dirname(servers[0].dir)
        extra = {"discovery": {"mdns": True, "mdns_interfaces": ["127.0.0.1"]}} if mode == "mdns" else None
        late = Daemon(root, "late", model_dir, "0:1", extra)
        try:
            late.start([servers[0].address] if mode == "seeds" else []).wait_ready()
            join = until(lambda: all(late.node_id in online_ids(s) for s in servers))
            victim = servers[-1]
            victim.kill(signal.SIGKILL)
            rest = [*servers[:-1], late]
            death = until(lambda: all(victim.node_id not in online_ids(s) for s in rest))
        finally:
            late.stop()
    return {"converge": converge, "join": join, "death": death}


def echo_round_trip(curve: bool, nbytes: int, rounds: int) -> float:
    ctx = zmq.Context()
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    if curve:
        spub, ssec = zmq.curve_keypair()
        cpub, csec = zmq.curve_keypair()
        server.curve_server, server.curve_secretkey, server.curve_publickey = True, ssec, spub
        client.curve_secretkey, client.curve_publickey, client.curve_serverkey = csec, cpub, spub
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client.connect(f"tcp://127.0.0.1:{port}")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if server.poll(100):
                server.send_multipart(server.recv_multipart(copy=False), copy=False)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    payload = os.urandom(nbytes)
    times = []
    for i in range(rounds + 5):
        t0 = time.perf_counter()
        client.send_multipart([b"h", payload], copy=False)
        client.recv_multipart(copy=False)
        if i >= 5:
            times.append(time.perf_counter() - t0)
    stop.set()
    t.join()
    ctx.destroy(linger=0)
    return statistics.median(times)


def gossip_member(nodes: int):
    """A Membership whose table believes `nodes` other online servers (signed records)."""
    from swarmd.discovery.membership import Membership
    from swarmd.discovery.records import Record
    from swarmd.discovery.table import PeerTable
    from swarmd.identity import NodeIdentity
    from swarmd.transport.access import AccessControl

    me = NodeIdentity(os.urandom(32))
    m = Membership(identity=me, pool=None, table=PeerTable(), access=AccessControl("open", "", ""),  # type: ignore[arg-type]
                   own_fields=lambda: {"addresses": ("tcp://127.0.0.1:1",), "state": "online", "model_id": "m",
                                       "span": (0, 1)},
                   expected_fingerprint=lambda model, block: None, incarnation=1)
    m.publish()
    for i in range(nodes):
        peer = NodeIdentity(os.urandom(32))
        address = f"tcp://10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}:31330"
        r = Record(node_id=peer.public_key, sign_key=peer.sign_key, addresses=(address,), state="online",
                   timestamp=time.time(), seq=1, incarnation=1, model_id="m", span=(i % 40, i % 40 + 1),
                   throughput=10.0, fingerprints=(os.urandom(8).hex(),))
        wire = r.sign(peer)
        m.table.merge(r, wire, via=address)
        if i < 512:  # the most news a daemon passes on at once
            m._make_hot("record", wire)
    return m


def gossip_cost(nodes: int, requests: int = 2000) -> dict[str, float]:
    """CPU seconds of the serving thread per gossip request (see the module's docstring)."""
    from libswarm.protocol import decode, encode, registry
    from swarmd.discovery.table import LARGE_BUCKETS

    m = gossip_member(nodes)
    caller = os.urandom(32).hex()
    tags = m.news_tags()
    cases = {"news only": {"news": tags}, "sums, converged caller": {"news": tags, "sums": m.table.sums(LARGE_BUCKETS)},
             "sums, empty caller": {"news": tags, "sums": "0" * 8 * LARGE_BUCKETS},
             "no news tags": {"news": []},
             "8 known records": {"news": tags, "records": [e.wire for e in m.table.entries()[1:9]]}}
    out = {}
    for name, fields in cases.items():
        msg = registry.parse(registry.PEER, decode(encode("gossip", 1, fields)))
        m.on_gossip(msg, sender=caller)  # warm
        t0 = time.process_time()
        for _ in range(requests):
            m.on_gossip(msg, sender=caller)
        out[name] = (time.process_time() - t0) / requests
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--gossip-cost", type=int, nargs="+", metavar="NODES",
                   help="only measure the CPU cost of a gossip request against tables of these sizes")
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    if args.gossip_cost:
        for nodes in args.gossip_cost:
            for name, seconds in gossip_cost(nodes).items():
                print(f"gossip, {nodes:5d} nodes, {name:22s}: {seconds * 1e3:7.3f} ms CPU per request", flush=True)
        return
    model_dir = make_model("llama", tempfile.mkdtemp(prefix="bench-membership-"), layers=4)
    for mode in ("seeds", "mdns"):
        runs = [swarm_times(model_dir, args.nodes, mode) for _ in range(args.repeat)]
        for key in ("converge", "join", "death"):
            values = [r[key] for r in runs]
            print(f"{mode:5s} {args.nodes} nodes  {key:8s}  median {statistics.median(values):5.2f} s  "
                  f"max {max(values):5.2f} s  ({', '.join(f'{v:.2f}' for v in values)})")
    for nbytes, rounds in ((8 * 1024, 2000), (4 * 1024 * 1024, 50)):
        plain, curve = echo_round_trip(False, nbytes, rounds), echo_round_trip(True, nbytes, rounds)
        print(f"round trip {nbytes // 1024:5d} KiB: plaintext {plain * 1e6:8.1f} µs, CURVE {curve * 1e6:8.1f} µs "
              f"(+{(curve - plain) * 1e6:.1f} µs, {curve / plain:.2f}x)")


if __name__ == "__main__":
    main()
