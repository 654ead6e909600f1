#!/usr/bin/env python3
"""How close decentralized placement gets to the best possible swarm throughput.

    python tools/simulate_balance.py [--swarms 100] [--tight 30] [--seed 0] [--headroom 0.5] [--headroom-max 2.0]
                                      [--optima FILE] [--prove-limit 60]

Random swarms (heterogeneous speeds and memories) go through joins one by one, leaves, a
burst of joins that all choose from the same stale view, a restart of a third to two thirds of
the servers at once, and a start of the whole swarm at once (a fleet, or power back after a
cut). Servers choose and re-choose their blocks with the daemon's own functions
(swarmd/placement.py): `choose_span` when joining alone, `assign_joiners` when several
announce themselves together, then the moves `pick_mover` names, one at a time as in the
daemons, until nobody moves.

Memory is modelled apart from the span a machine serves, so that the simulation cannot
double-hold (placement.py: a server trading places loads its new span beside its old one)
where the machine could not: each machine's capacity, in blocks, is its span's length, except
for a share of machines (--headroom, 0.5 by default) whose memory holds between 1 and
--headroom-max (2.0) times its span, drawn uniformly. Those stand for operators who set
serve.num_blocks below what fits, and for machines whose memory exceeds what they are asked to
serve. Capacities come from a stream of their own, drawn for every machine whatever the share:
the same seed gives the same swarms at every --headroom (and as before memory was modelled);
--headroom 0 lets no machine double-hold (the corners where two servers must trade places then
remain). After each phase the swarm's
bottleneck throughput is compared with the optimum for the same machines, computed exactly
as a mixed-integer program (each server's start block; maximize the smallest block
throughput) with scipy's HiGHS; the optimum places each machine on one span (double-holding is
a passage, not a placement), so it does not depend on the capacities. The solver has 5 s;
where it proves nothing in that time its bound stands in (often loose), and a settled state
under 90 % of such a bound gets it --prove-limit seconds (60) more, once. Prints the median, 10th
percentile and worst ratio, the moves made, the double-holding moves among them, the moves that
uncovered a block (there must be none), and the settled states that leave a block uncovered
although the machines' memory allowed full cover, or that still double-hold (none either)."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from swarmd.placement import (  # noqa: E402
    MOVE_MARGIN,
    Holder,
    apply_move,
    assign_joiners,
    bottleneck,
    choose_span,
    gaps,
    pick_mover,
)

MAX_MOVES = 500
TIME_LIMIT_S = 5.0
# A state under this share of an optimum the solver did not prove in TIME_LIMIT_S is measured
# against a bound that is often loose: the solver gets --prove-limit seconds more for it
REPROVE_BELOW = 0.9
PROVE = {"limit": 60.0}  # --prove-limit
LIMIT_USED: dict[tuple, float] = {}  # per key of OPTIMA, the time limit its value was found with
FEASIBILITY_STEPS = 12
PROVEN_WITHIN = 0.005  # an optimum bracketed this closely counts as found (ratios within 0.5 %)
OPTIMA: dict[tuple, float] = {}  # (machines, blocks) -> the optimum, or the solver's bound when unproven
UNPROVEN: set[tuple] = set()  # keys of OPTIMA whose value is a bound only
USED: set[tuple] = set()  # keys of OPTIMA this run compared with
STATS = {"unproven": 0, "uncovering moves": 0, "settled with a gap": 0, "double-holding moves": 0,
         "settled double-holding": 0}
HEADROOM = {"share": 0.5, "max": 2.0}  # --headroom, --headroom-max: see machine()
# memories are drawn from their own stream (seeded with --seed): the swarms' lengths, speeds and
# events stay those of the same seed before memory was modelled, whatever the headroom
MEMORY_RNG = random.Random(0)
Machine = tuple[int, float, int]  # length (blocks it serves), throughput, capacity (blocks its memory holds)


def optimum(servers: list[tuple[str, int, float]], num_blocks: int, time_limit: float = TIME_LIMIT_S) -> float:
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
    constraints = LinearConstraint(np.array(rows), lb, ub)

    def solve(objective: np.ndarray, t_low: float, t_high: float):
        low, high = np.zeros(n), np.ones(n)
        low[-1], high[-1] = t_low, t_high
        saved = os.dup(1)  # HiGHS prints progress lines on stdout from C++
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            try:
                return milp(objective, constraints=constraints, integrality=integrality, bounds=Bounds(low, high),
                            options={"time_limit": time_limit})
            finally:
                os.dup2(saved, 1)
                os.close(saved)

    res = solve(c, 0.0, np.inf)
    if res.status == 0:
        return float(-res.fun)
    # Not proven in time: the solver's bound is at least the optimum, but often far above it
    # (the LP relaxation spreads servers fractionally). Feasibility questions ("can every block
    # reach T?") are answered much faster, so bisect between the best placement found and that
    # bound: the smallest T proven infeasible is a tighter bound on the optimum.
    found = float(-res.fun) if res.x is not None else 0.0
    bound = float(-res.mip_dual_bound)
    for _ in range(FEASIBILITY_STEPS):
        if bound - found <= PROVEN_WITHIN * bound:
            return bound
        mid = (found + bound) / 2
        check = solve(np.zeros(n), mid, mid)
        if check.status == 2:  # infeasible
            bound = mid
        elif check.status == 0:
            found = mid
        else:
            break  # not answered in time either
    if bound - found <= PROVEN_WITHIN * bound:
        return bound
    STATS["unproven"] += 1  # the bound is used, so the ratio is a lower bound (the caller notes which)
    return bound


class Swarm:
    def __init__(self, num_blocks: int, measure: bool = True):
        self.num_blocks = num_blocks
        self.measure = measure  # compare with the optimum (a MILP each time: the slow part)
        self.holders: dict[str, Holder] = {}  # a holder keeps its machine's length, throughput and capacity
        self.moves = 0

    def join(self, key: str, length: int, tp: float, capacity: int, view: list[Holder] | None = None) -> None:
        view = list(self.holders.values()) if view is None else view
        start, end = choose_span(view, self.num_blocks, length, tp)
        self.holders[key] = Holder(key, start, end, tp, capacity=capacity)

    def join_together(self, machines: dict[str, Machine]) -> None:
        """Servers that start at once: each announces itself (state `joining`) and, once the
        announcements have spread, takes the span `assign_joiners` gives it."""
        joiners = [Holder(key, 0, length, tp, capacity=cap) for key, (length, tp, cap) in machines.items()]
        for key, (start, _) in assign_joiners(list(self.holders.values()), joiners, self.num_blocks).items():
            length, tp, cap = machines[key]
            self.holders[key] = Holder(key, start, start + length, tp, capacity=cap)

    def leave(self, key: str) -> None:
        del self.holders[key]

    def blocks_held(self) -> int:
        return sum(h.length for h in self.holders.values())

    def rebalance(self) -> None:
        """Moves as the daemons make them: each time, the one server pick_mover names (every
        server computes the same choice from the same table), until nobody should move. A move
        that leaves a covered block uncovered is counted (it must never happen), and so are the
        double-holding moves (a drop of the old span after one is not a move of its own)."""
        for _ in range(MAX_MOVES):
            chosen = pick_mover(list(self.holders.values()), self.num_blocks)
            if chosen is None:
                return
            key, move = chosen
            before = set(gaps(self.holders.values(), self.num_blocks))
            self.holders[key] = apply_move(self.holders[key], move)
            self.moves += move.kind != "drop"
            STATS["double-holding moves"] += move.kind in ("hold", "bridge")
            if set(gaps(self.holders.values(), self.num_blocks)) - before:
                STATS["uncovering moves"] += 1

    def settled_with_gap(self) -> bool:
        """A settled swarm that leaves a block uncovered although its servers could cover all."""
        return bool(gaps(self.holders.values(), self.num_blocks)) and self.blocks_held() >= self.num_blocks

    def ratio(self, prove: bool = False) -> float:
        """The bottleneck against the optimum; with `prove` (a settled state) an unproven optimum
        that makes the ratio look poor gets another, longer solve."""
        if not self.measure:
            return math.nan
        machines = tuple(sorted((h.length, h.throughput) for h in self.holders.values()))  # capacity: no matter
        key = (machines, self.num_blocks)
        USED.add(key)
        named = [(str(i), k, tp) for i, (k, tp) in enumerate(machines)]
        if key not in OPTIMA:  # depends on the machines alone, not where they are
            unproven = STATS["unproven"]
            OPTIMA[key] = optimum(named, self.num_blocks)
            if STATS["unproven"] > unproven:
                UNPROVEN.add(key)
        best = OPTIMA[key]
        got = bottleneck(self.holders.values(), self.num_blocks)
        longer = LIMIT_USED.get(key, TIME_LIMIT_S) < PROVE["limit"]
        if prove and key in UNPROVEN and got < REPROVE_BELOW * best and longer:
            unproven = STATS["unproven"]
            OPTIMA[key] = best = min(best, optimum(named, self.num_blocks, PROVE["limit"]))
            LIMIT_USED[key] = PROVE["limit"]
            if STATS["unproven"] == unproven:
                UNPROVEN.discard(key)
            STATS["unproven"] = unproven
        return 1.0 if best <= 0 else got / best


def machine(rng: random.Random, num_blocks: int) -> Machine:
    """A length (from its memory) and a throughput (from its speed): both vary ~10x. Its
    capacity: the length, or for a share HEADROOM["share"] of machines, between 1 and
    HEADROOM["max"] times it (at most the whole model), drawn from MEMORY_RNG; both numbers
    are drawn every time, so the headroom changes no other draw."""
    length = max(1, min(num_blocks, int(round(num_blocks * rng.uniform(0.1, 0.6)))))
    speed = rng.lognormvariate(0, 0.8)  # per-block speed
    roomy, factor = MEMORY_RNG.random() < HEADROOM["share"], MEMORY_RNG.uniform(1.0, HEADROOM["max"])
    capacity = min(num_blocks, int(length * factor)) if roomy else length
    return length, round(speed / length * 100, 3), capacity  # throughput: requests/s through the whole span


def one_swarm(rng: random.Random, copies: tuple[float, float], measure: bool = True) -> dict:
    """A swarm whose machines together hold between copies[0] and copies[1] copies of the model."""
    num_blocks = rng.choice([8, 12, 16, 24, 32])
    names = iter(f"s{i}" for i in range(1000))
    target = rng.uniform(*copies) * num_blocks
    swarm = Swarm(num_blocks, measure)
    while swarm.blocks_held() < target:
        swarm.join(next(names), *machine(rng, num_blocks))
    results = {}
    settle(swarm, results, "joins")
    for key in rng.sample(list(swarm.holders), k=min(rng.randint(1, 3), len(swarm.holders) - 2)):
        swarm.leave(key)
    if swarm.blocks_held() >= num_blocks:  # else the model no longer fits
        settle(swarm, results, "leaves")
    stale = list(swarm.holders.values())
    burst = {next(names): machine(rng, num_blocks) for _ in range(rng.randint(2, 5))}
    for key, m in burst.items():  # without announcements: every newcomer sees the same old table
        swarm.join(key, *m, view=stale)
    results["burst, no announcement"] = swarm.ratio()
    for key in burst:
        swarm.leave(key)
    swarm.join_together(burst)  # as the daemons do: announced, then turns by key
    results["burst, before moves"] = swarm.ratio()
    settle(swarm, results, "burst")
    machines = {k: (h.length, h.throughput, h.capacity) for k, h in swarm.holders.items()}
    restarting = rng.sample(sorted(machines), k=max(1, round(len(machines) * rng.uniform(1 / 3, 2 / 3))))
    for key in restarting:
        swarm.leave(key)
    swarm.join_together({k: machines[k] for k in restarting})
    results["restart, before moves"] = swarm.ratio()
    settle(swarm, results, "restart")
    fleet = Swarm(num_blocks, measure)  # the same machines, all started at once
    fleet.join_together(machines)
    results["start together, before moves"] = fleet.ratio()
    settle(fleet, results, "start together")
    results["moves"] = swarm.moves + fleet.moves
    results["servers"] = len(swarm.holders)
    return results


def settle(swarm: Swarm, results: dict, phase: str) -> None:
    swarm.rebalance()
    results[phase] = swarm.ratio(prove=True)
    STATS["settled with a gap"] += swarm.settled_with_gap()
    STATS["settled double-holding"] += any(h.also for h in swarm.holders.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--swarms", type=int, default=100)
    p.add_argument("--tight", type=int, default=30, help="tight swarms, reported apart")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optima", metavar="FILE",
                   help="keep the optima in FILE (JSON) and reuse them: they depend on the machines alone, so a rerun "
                        "with another --headroom or placement takes seconds, not minutes")
    p.add_argument("--headroom", type=float, default=HEADROOM["share"],
                   help="share of machines whose memory holds more than the span they serve (0: none may double-hold)")
    p.add_argument("--headroom-max", type=float, default=HEADROOM["max"],
                   help="those machines hold between 1 and this many times their span")
    p.add_argument("--prove-limit", type=float, default=PROVE["limit"],
                   help=f"seconds the solver gets, once, for an unproven optimum against which a settled state "
                        f"looks under {REPROVE_BELOW:.0%}")
    args = p.parse_args()
    PROVE["limit"] = args.prove_limit
    HEADROOM.update(share=args.headroom, max=args.headroom_max)
    MEMORY_RNG.seed(args.seed)
    if args.optima and os.path.exists(args.optima):
        with open(args.optima) as f:
            for machines, n, best, proven, *limit in json.load(f):
                key = (tuple(map(tuple, machines)), n)
                OPTIMA[key] = best
                LIMIT_USED[key] = limit[0] if limit else TIME_LIMIT_S
                if not proven:
                    UNPROVEN.add(key)
    rng = random.Random(args.seed)
    for label, copies, count in (("swarms with memory for 1.5-4 copies of the model", (1.5, 4.0), args.swarms),
                                 ("tight swarms, memory for 1-1.5 copies", (1.0, 1.5), args.tight)):
        t0 = time.time()
        runs = [one_swarm(rng, copies) for _ in range(count)]
        print(f"{count} {label} (seed {args.seed}, margin {MOVE_MARGIN:.0%}, headroom {args.headroom:g} of machines "
              f"up to {args.headroom_max:g}x), {time.time() - t0:.0f} s")
        report(runs)
        if args.optima:
            with open(args.optima, "w") as f:
                json.dump([[m, n, best, (m, n) not in UNPROVEN, LIMIT_USED.get((m, n), TIME_LIMIT_S)]
                           for (m, n), best in OPTIMA.items()], f)
    print(f"optima not proven within {TIME_LIMIT_S:.0f} s, or {PROVE['limit']:.0f} s where a settled state was under "
          f"{REPROVE_BELOW:.0%} of the bound (the solver's bound used, so those ratios are lower "
          f"bounds): {len(UNPROVEN & USED)} of {len(USED)}")
    print(f"moves that uncovered a block: {STATS['uncovering moves']}; settled states with a block uncovered "
          f"although memory allowed full cover: {STATS['settled with a gap']}; settled states still double-holding: "
          f"{STATS['settled double-holding']}; double-holding moves made: {STATS['double-holding moves']}")


PHASES = ("joins", "leaves", "burst, no announcement", "burst, before moves", "burst", "restart, before moves",
          "restart", "start together, before moves", "start together")
UNSETTLED = ("burst, no announcement", "burst, before moves", "restart, before moves", "start together, before moves")


def report(runs: list[dict]) -> None:
    if not runs:
        return
    settled = []
    for phase in PHASES:
        ratios = sorted(r[phase] for r in runs if phase in r)
        if not ratios:
            continue
        if phase not in UNSETTLED:
            settled += ratios
        print(f"  after {phase:30s} median {statistics.median(ratios):6.1%}  p10 {p10(ratios):6.1%}  "
              f"worst {ratios[0]:6.1%}  ({len(ratios)} swarms)")
    settled.sort()
    moves = [r["moves"] for r in runs]
    print(f"  {'all settled states':36s} median {statistics.median(settled):6.1%}  p10 {p10(settled):6.1%}  "
          f"worst {settled[0]:6.1%}  ({len(settled)} states)")
    print(f"  moves per swarm: median {statistics.median(moves):.0f}, max {max(moves)}, total {sum(moves)} "
          f"for {sum(r['servers'] for r in runs)} servers at the end")


def p10(sorted_values: list[float]) -> float:
    return sorted_values[max(0, int(len(sorted_values) * 0.1) - 1)]


if __name__ == "__main__":
    main()
