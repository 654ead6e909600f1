#!/usr/bin/env python3
"""How close decentralized placement gets to the best possible swarm throughput.

    python tools/simulate_balance.py [--swarms 100] [--seed 0]

Random swarms (heterogeneous speeds and memories) go through joins one by one, leaves, and a
burst of joins that all choose from the same stale view. Servers choose and re-choose their
blocks with the daemon's own functions (swarmd/placement.py): `choose_span` when joining,
then the moves `pick_mover` names, one at a time as in the daemons, until nobody moves. After each phase the swarm's
bottleneck throughput is compared with the optimum for the same machines, computed exactly
as a mixed-integer program (each server's start block; maximize the smallest block
throughput) with scipy's HiGHS. Prints the median, 10th percentile and worst ratio, and the
moves made."""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from swarmd.placement import MOVE_MARGIN, Holder, bottleneck, choose_span, pick_mover  # noqa: E402

MAX_MOVES = 500
TIME_LIMIT_S = 5.0
STATS = {"unproven": 0}


def optimum(servers: list[tuple[str, int, float]], num_blocks: int) -> float:
    """Max over placements of the smallest block throughput; servers are (key, length, tp)."""
    cols = [(i, s) for i, (_, k, _) in enumerate(servers) for s in range(num_blocks - k + 1)]
    n = len(cols) + 1  # x_(i,s) then T
    c = np.zeros(n)
    c[-1] = -1.0
    rows, lb, ub = [], [], []
    for i in range(len(servers)):  # each server starts exactly once
        row = np.zeros(n)
        for j, (ci, _) in enumerate(cols):
            if ci == i:
                row[j] = 1
        rows.append(row)
        lb.append(1)
        ub.append(1)
    for b in range(num_blocks):  # T <= throughput of block b
        row = np.zeros(n)
        row[-1] = 1
        for j, (i, s) in enumerate(cols):
            _, k, tp = servers[i]
            if s <= b < s + k:
                row[j] = -tp
        rows.append(row)
        lb.append(-np.inf)
        ub.append(0)
    integrality = np.ones(n)
    integrality[-1] = 0
    upper = np.ones(n)
    upper[-1] = np.inf
    saved = os.dup(1)  # HiGHS prints progress lines on stdout from C++
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        try:
            res = milp(c, constraints=LinearConstraint(np.array(rows), lb, ub), integrality=integrality,
                       bounds=Bounds(np.zeros(n), upper), options={"time_limit": TIME_LIMIT_S})
        finally:
            os.dup2(saved, 1)
            os.close(saved)
    if res.status == 0:
        return float(-res.fun)
    # not proven in time: the solver's bound is at least the optimum, so the ratio is a lower bound
    STATS["unproven"] += 1
    return float(-res.mip_dual_bound)


class Swarm:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.holders: dict[str, Holder] = {}  # a holder keeps its machine's length and throughput
        self.moves = 0

    def join(self, key: str, length: int, tp: float, view: list[Holder] | None = None) -> None:
        view = list(self.holders.values()) if view is None else view
        start, end = choose_span(view, self.num_blocks, length, tp)
        self.holders[key] = Holder(key, start, end, tp)

    def leave(self, key: str) -> None:
        del self.holders[key]

    def blocks_held(self) -> int:
        return sum(h.length for h in self.holders.values())

    def rebalance(self) -> None:
        """Moves as the daemons make them: each time, the one server pick_mover names (every
        server computes the same choice from the same table), until nobody should move."""
        for _ in range(MAX_MOVES):
            chosen = pick_mover(list(self.holders.values()), self.num_blocks)
            if chosen is None:
                return
            key, move = chosen
            self.holders[key] = self.holders[key].at(move.new[0])
            self.moves += 1

    def ratio(self) -> float:
        best = optimum([(k, h.length, h.throughput) for k, h in self.holders.items()], self.num_blocks)
        got = bottleneck(self.holders.values(), self.num_blocks)
        return 1.0 if best <= 0 else got / best


def machine(rng: random.Random, num_blocks: int) -> tuple[int, float]:
    """A length (from its memory) and a throughput (from its speed): both vary ~10x."""
    length = max(1, min(num_blocks, int(round(num_blocks * rng.uniform(0.1, 0.6)))))
    speed = rng.lognormvariate(0, 0.8)  # per-block speed
    return length, round(speed / length * 100, 3)  # requests/s through the whole span


def one_swarm(rng: random.Random, copies: tuple[float, float]) -> dict:
    """A swarm whose machines together hold between copies[0] and copies[1] copies of the model."""
    num_blocks = rng.choice([8, 12, 16, 24, 32])
    names = iter(f"s{i}" for i in range(1000))
    target = rng.uniform(*copies) * num_blocks
    swarm = Swarm(num_blocks)
    while swarm.blocks_held() < target:
        swarm.join(next(names), *machine(rng, num_blocks))
    results = {}
    swarm.rebalance()
    results["joins"] = swarm.ratio()
    for key in rng.sample(list(swarm.holders), k=min(rng.randint(1, 3), len(swarm.holders) - 2)):
        swarm.leave(key)
    if swarm.blocks_held() >= num_blocks:  # else the model no longer fits
        swarm.rebalance()
        results["leaves"] = swarm.ratio()
    stale = list(swarm.holders.values())
    for _ in range(rng.randint(2, 5)):  # a burst: every newcomer sees the same old table
        swarm.join(next(names), *machine(rng, num_blocks), view=stale)
    results["burst, before moves"] = swarm.ratio()
    swarm.rebalance()
    results["burst"] = swarm.ratio()
    results["moves"] = swarm.moves
    results["servers"] = len(swarm.holders)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--swarms", type=int, default=100)
    p.add_argument("--tight", type=int, default=30, help="tight swarms, reported apart")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    for label, copies, count in (("swarms with memory for 1.5-4 copies of the model", (1.5, 4.0), args.swarms),
                                 ("tight swarms, memory for 1-1.5 copies", (1.0, 1.5), args.tight)):
        t0 = time.time()
        runs = [one_swarm(rng, copies) for _ in range(count)]
        print(f"{count} {label} (seed {args.seed}, margin {MOVE_MARGIN:.0%}), {time.time() - t0:.0f} s")
        report(runs)
    print(f"optima not proven within {TIME_LIMIT_S:.0f} s (the solver's bound used, so those ratios are lower "
          f"bounds): {STATS['unproven']}")


def report(runs: list[dict]) -> None:
    settled = []
    for phase in ("joins", "leaves", "burst, before moves", "burst"):
        ratios = sorted(r[phase] for r in runs if phase in r)
        if phase != "burst, before moves":
            settled += ratios
        print(f"  after {phase:20s} median {statistics.median(ratios):6.1%}  p10 {p10(ratios):6.1%}  "
              f"worst {ratios[0]:6.1%}  ({len(ratios)} swarms)")
    settled.sort()
    moves = [r["moves"] for r in runs]
    print(f"  all settled states     median {statistics.median(settled):6.1%}  p10 {p10(settled):6.1%}  "
          f"worst {settled[0]:6.1%}  ({len(settled)} states)")
    print(f"  moves per swarm: median {statistics.median(moves):.0f}, max {max(moves)}, total {sum(moves)} "
          f"for {sum(r['servers'] for r in runs)} servers at the end")


def p10(sorted_values: list[float]) -> float:
    return sorted_values[max(0, int(len(sorted_values) * 0.1) - 1)]


if __name__ == "__main__":
    main()
