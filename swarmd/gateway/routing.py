"""Choosing a chain of servers that covers blocks [0, n): pure functions."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from libswarm.errors import NoRouteError


@dataclass(frozen=True)
class ServerSpan:
    address: str
    start: int
    end: int
    free_cache_bytes: int = 0


@dataclass(frozen=True)
class Hop:
    address: str
    first: int
    last: int


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


def plan_chain(servers: Iterable[ServerSpan], num_layers: int, model_id: str, start: int = 0) -> list[Hop]:
    """Fewest hops covering blocks [start, num_layers) (num_layers may be the end of a sub-range
    when a failed span is replaced): at each block take the server that
    reaches furthest (fewer hops = fewer network round trips per token); ties go to the
    server with more free cache, then to the lower address so that plans are reproducible."""
    servers = list(servers)
    gaps = missing_blocks(servers, num_layers, start)
    if gaps:
        text = ", ".join(f"{a}:{b}" for a, b in gaps)
        raise NoRouteError(f"no server covers blocks {text} of model {model_id}")
    hops, pos = [], start
    while pos < num_layers:
        best = min(
            (s for s in servers if s.start <= pos < s.end),
            key=lambda s: (-s.end, -s.free_cache_bytes, s.address),
        )
        hops.append(Hop(best.address, pos, min(best.end, num_layers)))
        pos = hops[-1].last
    return hops
