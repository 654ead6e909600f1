"""Choosing a chain of servers that covers blocks [0, n): pure functions."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from libswarm.errors import NoRouteError

# What a hop costs when nothing is measured yet, and the penalty for a server with no free
# cache (it would refuse the session: only worth it when nobody else holds those blocks).
DEFAULT_RTT_S = 0.002
DEFAULT_BLOCK_S = 0.001
FULL_PENALTY_S = 1.0
QUANTIZED_PENALTY_S = 1.0  # swarm.quantized: avoid


@dataclass(frozen=True)
class ServerSpan:
    address: str
    start: int
    end: int
    free_cache_bytes: int = -1  # -1: unknown
    block_s: float | None = None  # its time per block for a one-token step
    rtt_s: float | None = None  # round trip from this daemon
    forward_block_s: float | None = None  # its time per block per position in large forward passes
    relayed: bool = False  # reached through a relay (its round trip, when measured, includes the relay's)
    penalty_s: float = 0.0  # added to its cost: a quantized server that the gateway avoids (swarm.quantized)

    def hop_cost(self, blocks: int) -> float:
        rtt_s = self.rtt_s if self.rtt_s is not None else DEFAULT_RTT_S * (2 if self.relayed else 1)
        cost = rtt_s + blocks * (
            self.block_s if self.block_s is not None else DEFAULT_BLOCK_S)
        return cost + self.penalty_s + (FULL_PENALTY_S if self.free_cache_bytes == 0 else 0.0)


@dataclass(frozen=True)
class Hop:
    address: str
    first: int
    last: int


def forward_seconds(servers: Iterable[ServerSpan], num_layers: int, positions: int) -> float | None:
    """What a forward of `positions` through blocks [0, num_layers) takes on the fastest holder
    of each block, as measured by the servers (None when some block's holders measured none)."""
    best: list[float | None] = [None] * num_layers
    for s in servers:
        if s.forward_block_s is None:
            continue
        for b in range(max(0, s.start), min(num_layers, s.end)):
            if best[b] is None or s.forward_block_s < best[b]:  # type: ignore[operator]
                best[b] = s.forward_block_s
    if any(t is None for t in best):
        return None
    return positions * sum(t for t in best if t is not None)


def missing_blocks(servers: Iterable[ServerSpan], num_layers: int, start: int = 0) -> list[tuple[int, int]]:
    """Ranges [a, b) of blocks in [start, num_layers) that no server covers."""
    covered = [False] * num_layers
    for s in servers:
        for b in range(max(0, s.start), min(num_layers, s.end)):
            covered[b] = True
    gaps, b = [], start
    while b < num_layers:
        if covered[b]:
            b += 1
            continue
        a = b
        while b < num_layers and not covered[b]:
            b += 1
        gaps.append((a, b))
    return gaps


def plan_chain(servers: Iterable[ServerSpan], num_layers: int, model_id: str, start: int = 0,
               rng: random.Random | None = None) -> list[Hop]:
    """The lowest-latency chain over blocks [start, num_layers) (num_layers may be the end of a
    sub-range when a failed span is replaced): a shortest path over block boundaries, where a
    hop through a server costs its round trip plus its per-block step time for the blocks it
    runs, plus a penalty when it has no free cache. Equal costs go to the chain that moves
    furthest first (fewer hops), then to more free cache, then to the lower address, so that
    plans are reproducible. With `rng`, each server's cost is scaled by a random factor (mean 1):
    forward batches then spread over servers, the faster ones taking more."""
    servers = list(servers)
    gaps = missing_blocks(servers, num_layers, start)
    if gaps:
        text = ", ".join(f"{a}:{b}" for a, b in gaps)
        raise NoRouteError(f"no server covers blocks {text} of model {model_id}")
    factor = {s.address: rng.expovariate(1.0) if rng else 1.0 for s in servers}
    bounds = sorted({start, num_layers, *(min(max(x, start), num_layers) for s in servers for x in (s.start, s.end))})
    index = {b: i for i, b in enumerate(bounds)}
    # covering[i]: the servers holding the block after boundary i, each with its last boundary
    # (so that a swarm of thousands is planned in milliseconds, not seconds)
    covering: list[list[tuple[ServerSpan, int]]] = [[] for _ in bounds]
    for srv in servers:
        if srv.end <= start or srv.start >= num_layers:
            continue  # nothing of the range
        last = index[min(srv.end, num_layers)]
        for i in range(index[max(srv.start, start)], last):
            covering[i].append((srv, last))
    # best[pos]: (cost, hops, tie-break) of the best chain from boundary pos to the end
    best: dict[int, tuple[float, int, tuple, list[Hop]]] = {num_layers: (0.0, 0, (), [])}
    for i in reversed(range(len(bounds) - 1)):
        pos, choice = bounds[i], None
        for srv, last in covering[i]:
            for end in bounds[i + 1:last + 1]:  # the boundaries after pos up to the server's end
                if end not in best:
                    continue
                rest = best[end]
                cost = round(srv.hop_cost(end - pos) * factor[srv.address] + rest[0], 9)
                key = (cost, rest[1] + 1, (-end, -srv.free_cache_bytes, srv.address))
                if choice is None or key < choice[:3]:
                    choice = (*key, [Hop(srv.address, pos, end), *rest[3]])
        if choice is not None:
            best[pos] = choice
    return best[start][3]
