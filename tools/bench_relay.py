#!/usr/bin/env python3
"""What a relayed hop costs: round trips to a server reached directly and to one reached
through a relay, taken in turn from one client, on loopback (optionally with every message
crossing an emulated link: SWARMD_NETEM, swarmd/transport/netem.py, in the daemons and here).

    python tools/bench_relay.py [--rounds 300] [--bytes 8192]
    python tools/bench_relay.py --netem "delay_ms=50,jitter_ms=1,rate_mbit=100"

A relay R serves blocks 0:2 of a tiny model; D serves 2:4 and accepts connections; N serves
2:4 and accepts none (it listens on 127.0.0.1 and announces 127.0.0.2), so it is reached
through R. Each round sends one `ping` carrying a payload of --bytes (8 KiB: one token's
hidden state of a 4096-wide model in 16 bits) to D directly and to N through R, alternated.
Prints the median round trip of each and the difference: the relayed hop's extra latency
(one more link each way, two seals and two openings)."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from make_test_model import make_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--bytes", type=int, default=8192)
    ap.add_argument("--netem", default="", help="SWARMD_NETEM for every daemon and this client")
    a = ap.parse_args(argv)
    if a.netem:
        os.environ["SWARMD_NETEM"] = a.netem
    import zmq
    from localswarm import Daemon, until

    from swarmd.identity import NodeIdentity
    from swarmd.transport.connection import ConnectionPool
    from swarmd.transport.relay import relayed_address

    d = make_model("llama", tempfile.mkdtemp(prefix="bench-relay-"), layers=4)
    root = tempfile.mkdtemp(prefix="bench-relay-")
    # its byte budget out of the way: this measures latency, not the limit
    relay = Daemon(root, "relay", d, "0:2", {"network": {"relay": True, "relay_max_bytes_per_s": "10GB"}}).seed_speed(
        0.002)
    direct = Daemon(root, "direct", d, "2:4").seed_speed(0.002)
    hidden = Daemon(root, "nat", d, "2:4").seed_speed(0.002)
    hidden.cfg["network"]["announce"] = [hidden.address.replace("127.0.0.1", "127.0.0.2")]
    daemons = [relay, direct, hidden]
    try:
        for x in daemons:
            x.start([relay.address])
        for x in daemons:
            x.wait_ready()
        until(lambda: hidden.ctl("status")["network"]["via"], 60, "the server to be relayed")
        keys = {relay.address: relay.node_id, direct.address: direct.node_id}
        pool = ConnectionPool(zmq.Context(), NodeIdentity(os.urandom(32)), keys.get)
        payload = {"payload": torch.zeros(a.bytes // 4)}
        targets = {"direct": pool.get(direct.address),
                   "relayed": pool.get(relayed_address(relay.address, hidden.node_id))}
        times: dict[str, list[float]] = {k: [] for k in targets}
        for _ in range(10):  # connections up, keys derived
            for conn in targets.values():
                conn.request("ping", {}, payload, timeout_s=10)
        for _ in range(a.rounds):
            for name, conn in targets.items():
                t = time.perf_counter()
                conn.request("ping", {}, payload, timeout_s=10)
                times[name].append(time.perf_counter() - t)
        forwarded = relay.ctl("status")["network"]["relay"]["forwarded_bytes"]
    finally:
        for x in daemons:
            x.stop()
    cpu = platform.processor() or platform.machine()
    print(f"{a.rounds} rounds, {a.bytes} B payload, link: {a.netem or 'loopback'}; {cpu}, {os.cpu_count()} CPUs")
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    p90 = {k: statistics.quantiles(v, n=10)[-1] * 1000 for k, v in times.items()}
    for k in times:
        print(f"  {k:8s} round trip  median {med[k]:8.3f} ms   p90 {p90[k]:8.3f} ms")
    print(f"  relayed hop: +{med['relayed'] - med['direct']:.3f} ms ({med['relayed'] / med['direct']:.2f}x direct); "
          f"the relay forwarded {forwarded / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
