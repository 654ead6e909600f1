#!/usr/bin/env python3
"""How long the gateway takes to plan a route in a large swarm.

    python tools/bench_routing.py [--blocks 80] [--servers 100 500 2000] [--seed 0]

Random swarms (each server holds 4 to 15 consecutive blocks, with random step times and round
trips) planned with the daemon's own plan_chain (swarmd/routing.py), side by side with a
reference that tries every server at every block boundary and every boundary as a hop's end
(the plain shortest path the daemon's planner prunes). Both must choose the same chain; the
median time of 5 plans of each is printed, with the ratio."""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from swarmd.routing import Hop, ServerSpan, plan_chain  # noqa: E402


def reference_plan(servers: list[ServerSpan], num_layers: int, start: int = 0) -> list[Hop]:
    """The same costs and tie-breaks as plan_chain, every (server, boundary, end) tried."""
    bounds = sorted({start, num_layers, *(min(max(x, start), num_layers) for s in servers for x in (s.start, s.end))})
    best: dict[int, tuple] = {num_layers: (0.0, 0, (), [])}
    for pos in reversed(bounds[:-1]):
        options = [(round(s.hop_cost(end - pos) + best[end][0], 9), best[end][1] + 1,
                    (-end, -s.free_cache_bytes, s.address), [Hop(s.address, pos, end), *best[end][3]])
                   for s in servers if s.start <= pos < s.end
                   for end in bounds if pos < end <= min(s.end, num_layers) and end in best]
        if options:
            best[pos] = min(options, key=lambda o: o[:3])
    return best[start][3]


def swarm(n: int, blocks: int, rng: random.Random) -> list[ServerSpan]:
    servers = []
    for i in range(n):
        start = rng.randrange(0, blocks)
        servers.append(ServerSpan(f"tcp://10.{i // 62500}.{i // 250 % 250}.{i % 250}:31330", start,
                                  min(blocks, start + rng.randrange(4, 16)), block_s=rng.uniform(0.001, 0.01),
                                  rtt_s=rng.uniform(0.001, 0.1)))
    for b in range(0, blocks, 8):  # no gaps
        servers.append(ServerSpan(f"tcp://10.99.0.{b}:31330", b, min(blocks, b + 8), block_s=0.01, rtt_s=0.1))
    return servers


def median_s(fn, times: int = 5) -> float:
    samples = []
    for _ in range(times):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=80)
    ap.add_argument("--servers", type=int, nargs="+", default=[100, 500, 2000])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print("| servers | plan_chain | every server at every boundary | ratio |\n|---|---|---|---|")
    for n in args.servers:
        servers = swarm(n, args.blocks, rng)
        ours, ref = plan_chain(servers, args.blocks, "m"), reference_plan(servers, args.blocks)
        if ours != ref:
            raise SystemExit(f"{n} servers: the plans differ\n{ours}\n{ref}")
        a = median_s(lambda s=servers: plan_chain(s, args.blocks, "m"))
        b = median_s(lambda s=servers: reference_plan(s, args.blocks))
        print(f"| {n} | {a * 1000:.1f} ms | {b * 1000:.1f} ms | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
