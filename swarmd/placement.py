"""Which blocks a server holds: pure functions over the swarm's spans and throughputs, shared
by the daemon, `swarmctl rebalance` and tools/simulate_balance.py.

The model of the swarm: a server holding blocks [start, end) serves `throughput` requests
per second through its whole span (one-token steps, measured: records.py). A block's
throughput is the sum over the servers holding it; the swarm's throughput is its bottleneck,
the smallest block throughput (an uncovered block makes it 0). A joining server takes the
window that raises the bottleneck most; servers move only when that raises the bottleneck by
more than a margin, and never in a way that leaves a covered block uncovered."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Throughputs within this share of each other count as equal when placements are compared:
# measurements are noisy, and a move must be clearly better (this is also the hysteresis
# that stops two servers from swapping places back and forth).
MOVE_MARGIN = 0.05


@dataclass(frozen=True)
class Holder:
    key: str  # the server's node id (any unique name in simulations)
    start: int
    end: int
    throughput: float
    movable: bool = True  # serve.blocks: auto (a fixed "START:END" never moves)

    @property
    def length(self) -> int:
        return self.end - self.start

    def at(self, start: int) -> Holder:
        return Holder(self.key, start, start + self.length, self.throughput, self.movable)


@dataclass(frozen=True)
class Move:
    old: tuple[int, int] | None
    new: tuple[int, int]
    before: float  # the swarm's bottleneck throughput now
    after: float  # ...and after the move
    rank: tuple = field(default=(), compare=False, repr=False)  # _rank of the swarm after the move


def block_throughput(holders: Iterable[Holder], num_blocks: int) -> list[float]:
    tp = [0.0] * num_blocks
    for h in holders:
        for b in range(max(0, h.start), min(num_blocks, h.end)):
            tp[b] += h.throughput
    return tp


def bottleneck(holders: Iterable[Holder], num_blocks: int) -> float:
    return min(block_throughput(holders, num_blocks), default=0.0)


def _rank(tp: Sequence[float]) -> tuple:
    """Better placements rank higher: a larger bottleneck, then fewer blocks at it, then a
    larger second-weakest block, and so on (the weakest blocks get covered first)."""
    return tuple(sorted(tp))


def better(new: Sequence[float], old: Sequence[float], margin: float = MOVE_MARGIN) -> bool:
    """Whether block throughputs `new` are clearly better than `old`: the sorted profiles,
    weakest first, compared at the first place they differ, where `new` must be higher by
    more than `margin` (or cover a block `old` left uncovered). A strict ranking: moves that
    pass it can never cycle."""
    for n, o in zip(sorted(new), sorted(old)):
        if abs(n - o) <= 1e-9 * max(1.0, abs(o)):
            continue
        return n > o * (1 + margin) or (o == 0 and n > 0)
    return False


def _windows(base: Sequence[float], length: int, throughput: float):
    """Every start of a `length`-block window, with the block throughputs `base` would have
    if a server of `throughput` held that window."""
    for start in range(len(base) - length + 1):
        tp = list(base)
        for b in range(start, start + length):
            tp[b] += throughput
        yield start, tp


def choose_span(others: Iterable[Holder], num_blocks: int, length: int, throughput: float) -> tuple[int, int]:
    """The window of `length` blocks that a server of `throughput` should take, given the
    other servers: the one that raises the weakest blocks most (ties: the lowest start)."""
    length = max(1, min(length, num_blocks))
    best_start, best_rank = 0, None
    for start, tp in _windows(block_throughput(others, num_blocks), length, throughput):
        rank = _rank(tp)
        if best_rank is None or rank > best_rank:
            best_start, best_rank = start, rank
    return best_start, best_start + length


def plan_move(holders: Sequence[Holder], me: str, num_blocks: int, margin: float = MOVE_MARGIN) -> Move | None:
    """Whether the server `me` should move, and where: only when the swarm's blocks get clearly
    better (`better`: the weakest first, so the bottleneck never drops, and it rises once no
    block is left at the old level), and no block that is covered now ends up uncovered.
    Each move strictly improves one ranking of the whole swarm, so moves cannot cycle."""
    mine = next((h for h in holders if h.key == me), None)
    if mine is None:
        return None
    others = [h for h in holders if h.key != me]
    now = block_throughput(holders, num_blocks)
    best: tuple | None = None
    for start, after in _windows(block_throughput(others, num_blocks), mine.length, mine.throughput):
        if start == mine.start:
            continue
        if any(n > 0 and a == 0 for n, a in zip(now, after)):
            continue  # would uncover a block someone relies on
        rank = _rank(after)
        if best is None or rank > best[0]:
            best = (rank, start, after)
    if best is not None and better(best[2], now, margin):
        rank, start, after = best
        return Move((mine.start, mine.end), (start, start + mine.length), min(now), min(after), rank)
    return None


def pick_mover(holders: Sequence[Holder], num_blocks: int, margin: float = MOVE_MARGIN) -> tuple[str, Move] | None:
    """The one server that should move now, and where: of all movable servers with a move, the
    one whose move leaves the swarm best (ties: the smallest key). Every server computes this
    from the same gossiped table and only the chosen one moves, so two servers never leave the
    same blocks at once believing the other stays."""
    best: tuple | None = None
    for h in holders:
        if not h.movable:
            continue
        move = plan_move(holders, h.key, num_blocks, margin)
        if move is None:
            continue
        if best is None or move.rank > best[0] or (move.rank == best[0] and h.key < best[1]):
            best = (move.rank, h.key, move)
    return (best[1], best[2]) if best else None


def blocks_that_fit(memory_bytes: int, block_bytes: int, cache_bytes: int, num_blocks: int) -> int:
    """How many blocks a server can hold: the memory left after the KV cache budget, divided by
    one block's weights (at least 1, at most the whole model)."""
    if block_bytes <= 0:
        return num_blocks
    return max(1, min(num_blocks, (memory_bytes - cache_bytes) // block_bytes))
