"""Which blocks a server holds: pure functions over the swarm's spans and throughputs, shared
by the daemon, `swarmctl rebalance` and tools/simulate_balance.py.

The model of the swarm: a server holding blocks [start, end) serves `throughput` requests
per second through its whole span (one-token steps, measured: records.py). A block's
throughput is the sum over the servers holding it; the swarm's throughput is its bottleneck,
the smallest block throughput (an uncovered block makes it 0). A joining server takes the
window that raises the bottleneck most (servers joining together take turns by key:
`assign_joiners`). The swarm then moves towards a plan of the whole swarm (`plan_swarm`) when
that is better by more than a margin, one server at a time, and never in a way that leaves a
covered block uncovered.

Some plans cannot be reached by single moves: two servers, each alone on some blocks, must
trade places, and whichever moves first uncovers the blocks it leaves. A server whose memory
holds both spans (`Holder.capacity`, beside the KV cache budget it promised) can then
double-hold: it loads the planned span beside the one it holds, serves both while the others
move, and drops the old one once other servers cover it. While it double-holds, its
throughput counts on its new span only: the old span counts as covered (no block there is a
gap) but adds nothing to any block's throughput, since one machine's compute is not doubled
by holding more weights; a swarm that stopped mid-trade would thus rank, and measure, as bad
as the throughput it really has.

Every function orders servers by key before it sums their throughputs, and breaks every tie by
start or key: each server computes the same answer from the same table, whatever order its
table lists the servers in. The searches over windows are vectorized with numpy: a plan for
a hundred servers on 80 blocks takes a few seconds of one core, not minutes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

# Throughputs within this share of each other count as equal when placements are compared:
# measurements are noisy, and a move must be clearly better (this is also the hysteresis
# that stops two servers from swapping places back and forth).
MOVE_MARGIN = 0.05
PLAN_BISECTIONS = 20  # of the target throughput: to a millionth of the range
PLAN_POLISH_MOVES = 50
SWEEP_RULES = 4
SWEEP_BUDGET = 150  # placements one backtracking sweep may try before it gives a target up (protocol.md)
PLAN_SEARCH_BISECTIONS = 8  # of the target above the greedy sweeps' best: to 0.4 % of the range
# Double-holding steps whose outcome is looked ahead (each replays the rest of the plan, a few
# hundred vectorized steps at most in a swarm of a hundred): the best-ranked few, since a trade
# that a better one cannot complete rarely completes for a worse one, and a swarm in a corner
# must not cost its servers minutes of planning.
TRADES_TRIED = 8
# A swarm with a block uncovered that no single move fills: the search for a few moves that fill it
GAP_SEARCH_DEPTH = 4
GAP_SEARCH_STATES = 20000


@dataclass(frozen=True)
class Holder:
    key: str  # the server's node id (any unique name in simulations)
    start: int
    end: int
    throughput: float
    movable: bool = True  # serve.blocks: auto (a fixed "START:END" never moves)
    capacity: int = 0  # blocks its memory holds beside its KV cache budget (0: just its span)
    also: tuple[int, int] | None = None  # the span it still holds while trading places (double-holding)

    @property
    def length(self) -> int:
        return self.end - self.start

    def at(self, start: int) -> Holder:
        """The same server holding its span from `start`, and nothing beside it."""
        return replace(self, start=start, end=start + self.length, also=None)

    def can_hold(self, start: int, end: int) -> bool:
        """Whether its memory holds its span and the blocks [start, end) at once (counted once:
        where the two overlap it loads nothing twice). Only a movable server double-holds: a
        fixed span is the operator's choice."""
        overlap = max(0, min(self.end, end) - max(self.start, start))
        needs = self.length + (end - start) - overlap
        return self.movable and self.also is None and needs <= max(self.capacity, self.length)


@dataclass(frozen=True)
class Move:
    old: tuple[int, int] | None
    new: tuple[int, int]
    before: float  # the swarm's bottleneck throughput now
    after: float  # ...and after the move
    rank: tuple = field(default=(), compare=False, repr=False)  # _rank of the swarm after the move
    # "move": load `new`, then leave `old`; "hold": load `new` and keep serving `old` beside it;
    # "bridge": keep `old` and load `new` beside it, to cover blocks another server is about to
    # leave (both double-hold); "drop": stop holding `old`, which others cover now (`new` stays)
    kind: str = "move"


def block_throughput(holders: Iterable[Holder], num_blocks: int) -> list[float]:
    tp = [0.0] * num_blocks
    for h in sorted(holders, key=lambda h: h.key):
        for b in range(max(0, h.start), min(num_blocks, h.end)):
            tp[b] += h.throughput
    return tp


def bottleneck(holders: Iterable[Holder], num_blocks: int) -> float:
    return min(block_throughput(holders, num_blocks), default=0.0)


def coverage(holders: Iterable[Holder], num_blocks: int) -> np.ndarray:
    """Per block, how many spans hold it: the spans held beside another during a trade count
    (a block there is served, if slowly), while their throughput does not (block_throughput)."""
    cover = np.zeros(num_blocks, dtype=np.int64)
    for h in holders:
        if h.throughput <= 0:  # as block_throughput: a server that serves nothing yet covers nothing
            continue
        for start, end in ((h.start, h.end), *((h.also,) if h.also else ())):
            cover[max(0, start):max(0, min(num_blocks, end))] += 1
    return cover


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


def _masks(num_blocks: int, length: int) -> np.ndarray:
    """Row s: 1.0 on the blocks of the window [s, s + length), else 0.0."""
    starts = np.arange(num_blocks - length + 1)[:, None]
    blocks = np.arange(num_blocks)[None, :]
    return ((blocks >= starts) & (blocks < starts + length)).astype(np.float64)


def _windows(base: Sequence[float], length: int, throughput: float) -> np.ndarray:
    """Row s: the block throughputs `base` would have if a server of `throughput` held the
    `length` blocks from s."""
    return np.asarray(base, dtype=np.float64)[None, :] + throughput * _masks(len(base), length)


def _best(profiles: np.ndarray, allowed: np.ndarray | None = None) -> int | None:
    """The row (among `allowed`) whose sorted profile ranks highest; ties: the first row."""
    rows = np.arange(len(profiles)) if allowed is None else np.flatnonzero(allowed)
    if rows.size == 0:
        return None
    keys = np.sort(profiles[rows], axis=1)
    alive = np.arange(len(rows))
    for column in range(keys.shape[1]):  # the weakest block first; few rows survive the first columns
        values = keys[alive, column]
        alive = alive[values == values.max()]
        if alive.size == 1:
            break
    return int(rows[alive[0]])


def choose_span(others: Iterable[Holder], num_blocks: int, length: int, throughput: float) -> tuple[int, int]:
    """The window of `length` blocks that a server of `throughput` should take, given the
    other servers: the one that raises the weakest blocks most (ties: the lowest start)."""
    length = max(1, min(length, num_blocks))
    start = _best(_windows(block_throughput(others, num_blocks), length, throughput))
    assert start is not None
    return start, start + length


def _uncovers(now: np.ndarray, covers: np.ndarray) -> np.ndarray:
    """Per row of `covers` (coverage counts): whether it leaves a block uncovered that is
    covered `now`."""
    return ((now[None, :] > 0) & (covers == 0)).any(axis=1)


def plan_move(holders: Sequence[Holder], me: str, num_blocks: int, margin: float = MOVE_MARGIN) -> Move | None:
    """Whether the server `me` should move, and where: only when the swarm's blocks get clearly
    better (`better`: the weakest first, so the bottleneck never drops, and it rises once no
    block is left at the old level), and no block that is covered now ends up uncovered.
    Each move strictly improves one ranking of the whole swarm, so moves cannot cycle."""
    mine = next((h for h in holders if h.key == me), None)
    if mine is None or mine.also is not None:  # a server mid-trade only drops its old span (pick_mover)
        return None
    now = block_throughput(holders, num_blocks)
    others = [h for h in holders if h.key != me]
    profiles = _windows(block_throughput(others, num_blocks), mine.length, mine.throughput)
    covers = coverage(others, num_blocks)[None, :] + _masks(num_blocks, mine.length)
    allowed = ~_uncovers(coverage(holders, num_blocks), covers)  # never uncover a block someone relies on
    allowed[mine.start] = False
    start = _best(profiles, allowed)
    if start is None:
        return None
    after = profiles[start].tolist()
    if not better(after, now, margin):
        return None
    return Move((mine.start, mine.end), (start, start + mine.length), min(now), min(after), _rank(after))


def _order(kinds: Sequence[tuple[int, float]], counts: Sequence[int], d: float, rules: Sequence[int]) -> list[int]:
    """The kinds of server (length, throughput; numbered in the order of their first keys) with
    some free, in the order the choice `rules` prefer them to start at a block `d` short of the
    target: each rule's first choice, then each rule's second, and so on. Ties go to the last
    key, but for the slowest server that fills the shortfall alone (the first)."""
    free = [k for k, c in enumerate(counts) if c]
    ranked = []
    for rule in rules:
        if rule == 0:  # the most throughput-blocks that go to filling the shortfall
            ranked.append(sorted(free, key=lambda k: (-min(kinds[k][1], d) * kinds[k][0], -k)))
        elif rule == 1:  # the slowest server that fills it alone, then the fastest
            ranked.append(sorted(free, key=lambda k: (0, kinds[k][1], -kinds[k][0], k)
                                 if kinds[k][1] >= d else (1, -kinds[k][1], -k)))
        elif rule == 2:  # the longest
            ranked.append(sorted(free, key=lambda k: (-kinds[k][0], -kinds[k][1], -k)))
        else:  # the fastest
            ranked.append(sorted(free, key=lambda k: (-kinds[k][1], -kinds[k][0], -k)))
    if len(ranked) == 1:
        return ranked[0]
    out: list[int] = []
    for choices in zip(*ranked):
        out += [k for k in choices if k not in out]
    return out


def _sweep(base: Sequence[float], servers: Sequence[Holder], num_blocks: int, target: float,
           rules: Sequence[int], budget: int = 0) -> tuple[dict[str, int], list[Holder]] | None:
    """Whether `servers` can lift every block of `base` to `target`, placed left to right: at
    the first block short of it, one more server starts there (or as far right as its length
    allows), the kinds tried in the order the `rules` prefer. With a `budget`, it backtracks
    when the servers left cannot fill what is left short, trying up to `budget` placements in
    all (past it, the answer is no); without, it keeps the first choice at each block. Returns
    (starts, servers left over), or None."""
    eps = 1e-9 * max(1.0, target)
    deficit = [target - x for x in base]
    alike: dict[tuple[int, float], list[Holder]] = {}
    for h in sorted(servers, key=lambda h: h.key):
        alike.setdefault((h.end - h.start, h.throughput), []).append(h)
    groups = list(alike.values())  # in the order of their first keys; alike servers placed in key order
    kinds = list(alike)
    counts = [len(g) for g in groups]
    chosen: list[tuple[int, int]] = []  # (kind, start), in the order placed
    tried = 0

    def fits(b: int) -> bool:
        """A bound: what the free servers could add from block b on covers what is short there."""
        reach = num_blocks - b
        rest = deficit[b:]
        return sum(x for x in rest if x > eps) <= eps + sum(
            c * tp * min(length, reach) for (length, tp), c in zip(kinds, counts)) \
            and max(rest) <= eps + sum(c * tp for (_, tp), c in zip(kinds, counts))

    def fill(b: int) -> bool:
        nonlocal tried
        while b < num_blocks and deficit[b] <= eps:
            b += 1
        if b == num_blocks:
            return True
        if not any(counts) or (budget and not fits(b)):
            return False
        for k in _order(kinds, counts, deficit[b], rules):
            tried += 1
            if budget and tried > budget:
                return False
            length, tp = kinds[k]
            start = min(b, num_blocks - length)
            counts[k] -= 1
            chosen.append((k, start))
            for x in range(start, start + length):
                deficit[x] -= tp
            if fill(b):
                return True
            if not budget:
                return False
            for x in range(start, start + length):
                deficit[x] += tp
            chosen.pop()
            counts[k] += 1
        return False

    if not fill(0):
        return None
    starts: dict[str, int] = {}
    used = [0] * len(groups)
    for k, start in chosen:
        starts[groups[k][used[k]].key] = start
        used[k] += 1
    return starts, [h for k, g in enumerate(groups) for h in g[used[k]:]]


def plan_swarm(holders: Sequence[Holder], num_blocks: int) -> dict[str, int]:
    """A placement of the whole swarm, as each movable server's start block: computed from who
    the servers are (lengths, throughputs, keys, and the fixed servers' spans) and not from where
    the movable ones are now, so every server computes the same plan from the same table and it
    stays the same while the swarm carries it out move by move.

    For a target throughput, a sweep from block 0 places a server wherever a block falls short;
    bisection finds the highest target each of SWEEP_RULES choice rules reaches, sweeping from
    the first block and from the last. Then a search that backtracks (SWEEP_BUDGET placements
    at most per target), trying every rule's choices at each block, looks for a higher target
    than the best of those. Servers left over go where they raise the weakest blocks most, then
    single moves and swaps of two servers polish each candidate. The best candidate (by the
    sorted-profile rank) is the plan. Single moves from where the swarm happens to be settle in
    local optima (one server alone holds blocks that another would serve better); a plan made
    from scratch does not depend on that history."""
    fixed = sorted((h for h in holders if not h.movable), key=lambda h: h.key)
    movable = sorted((h for h in holders if h.movable), key=lambda h: h.key)
    if not movable:
        return {}
    best: tuple | None = None
    for search in (False, True):  # the greedy sweeps, then the backtracking ones above their best
        for rule, mirrored in ((r, m) for r in range(SWEEP_RULES) for m in (False, True)):
            above = best[0][0] if search and best is not None else 0.0
            placed = _plan_one(fixed, movable, num_blocks, (rule,), mirrored, above=above,
                               budget=SWEEP_BUDGET if search else 0)
            rank = None if placed is None else _rank(block_throughput(placed, num_blocks))
            if rank is not None and (best is None or rank > best[0]):
                best = (rank, placed)
    assert best is not None
    return _fewest_moves(holders, {h.key: h.start for h in best[1] if h.movable})


def _mirror(h: Holder, num_blocks: int) -> Holder:
    return replace(h, start=num_blocks - h.end, end=num_blocks - h.start, also=None)


def _plan_one(fixed: list[Holder], movable: list[Holder], num_blocks: int, rules: tuple[int, ...], mirrored: bool,
              above: float = 0.0, budget: int = 0) -> list[Holder] | None:
    """One candidate plan: the sweep with `rules`, from block 0 or (`mirrored`) from the last, at
    the highest target it reaches; with `above`, only a target above it counts (else None)."""
    if mirrored:
        fixed = [_mirror(h, num_blocks) for h in fixed]
    base = block_throughput(fixed, num_blocks)
    # no block can get more than its share of all the throughput-blocks, nor more than every server at once
    high = min(min(base) + sum(h.throughput for h in movable),
               (sum(base) + sum(h.throughput * h.length for h in movable)) / num_blocks)
    low = above
    found = None if above else _sweep(base, movable, num_blocks, 0.0, rules, budget)
    for _ in range(PLAN_BISECTIONS if not above else PLAN_SEARCH_BISECTIONS):
        if high <= low * (1 + 1e-6):
            break
        mid = (low + high) / 2
        got = _sweep(base, movable, num_blocks, mid, rules, budget)
        if got is None:
            high = mid
        else:
            low, found = mid, got
    if found is None:
        return None
    starts, left = found
    placed = fixed + [h.at(starts[h.key]) for h in movable if h.key in starts]
    for h in sorted(left, key=lambda h: (-h.throughput * h.length, h.key)):
        placed.append(h.at(choose_span(placed, num_blocks, h.length, h.throughput)[0]))
    if mirrored:
        placed = [_mirror(h, num_blocks) for h in placed]
    return _polish(placed, num_blocks)


def _fewest_moves(holders: Sequence[Holder], plan: dict[str, int]) -> dict[str, int]:
    """The same plan with fewer moves: servers alike (same length and throughput) can trade
    places, so one that already sits at a start planned for one of them keeps it."""
    alike: dict[tuple[int, float], list[Holder]] = {}
    for h in holders:
        if h.key in plan:
            alike.setdefault((h.length, h.throughput), []).append(h)
    out = dict(plan)
    for group in alike.values():
        starts = sorted(plan[h.key] for h in group)
        stay = []
        for h in sorted(group, key=lambda h: h.key):
            if h.start in starts:
                starts.remove(h.start)
                stay.append(h)
        for h in sorted((h for h in group if h not in stay), key=lambda h: h.key):
            out[h.key] = starts.pop(0)
        for h in stay:
            out[h.key] = h.start
    return out


def _place(num_blocks: int, starts: np.ndarray, lengths: np.ndarray, throughputs: np.ndarray) -> np.ndarray:
    """Row k: a server of throughputs[k] on the blocks [starts[k], starts[k] + lengths[k])."""
    blocks = np.arange(num_blocks)[None, :]
    inside = (blocks >= starts[:, None]) & (blocks < (starts + lengths)[:, None])
    return throughputs[:, None] * inside


def _polish(holders: list[Holder], num_blocks: int) -> list[Holder]:
    """The best single move or swap of two servers' places, over and over, while it ranks the
    swarm strictly higher."""
    holders = sorted(holders, key=lambda h: h.key)
    lengths = np.array([h.length for h in holders])
    tps = np.array([h.throughput for h in holders], dtype=np.float64)
    movable = np.array([i for i, h in enumerate(holders) if h.movable], dtype=np.int64)
    # single moves: every movable server to every start (its own start is masked out below)
    mover = np.concatenate([np.full(num_blocks - lengths[i] + 1, i) for i in movable] or [np.zeros(0, np.int64)])
    target = np.concatenate([np.arange(num_blocks - lengths[i] + 1) for i in movable] or [np.zeros(0, np.int64)])
    # swaps: two movable servers of different lengths trade places (alike lengths reach nothing new)
    pairs = np.array([(i, j) for i in movable for j in movable if i < j and lengths[i] != lengths[j]],
                     dtype=np.int64).reshape(-1, 2)
    first, second = pairs[:, 0], pairs[:, 1]
    for _ in range(PLAN_POLISH_MOVES):
        starts = np.array([h.start for h in holders])
        now = np.asarray(block_throughput(holders, num_blocks))
        own = _place(num_blocks, starts, lengths, tps)
        to_first = np.minimum(starts[second], num_blocks - lengths[first])
        to_second = np.minimum(starts[first], num_blocks - lengths[second])
        profiles = np.concatenate([
            now[None, :] - own[mover] + _place(num_blocks, target, lengths[mover], tps[mover]),
            now[None, :] - own[first] - own[second] + _place(num_blocks, to_first, lengths[first], tps[first])
            + _place(num_blocks, to_second, lengths[second], tps[second]),
        ])
        allowed = np.concatenate([target != starts[mover], np.ones(len(pairs), dtype=bool)])
        pick = _best(profiles, allowed)
        if pick is None or not better(profiles[pick].tolist(), now.tolist(), 0.0):
            break
        if pick < len(mover):
            holders[mover[pick]] = holders[mover[pick]].at(int(target[pick]))
        else:
            k = pick - len(mover)
            holders[first[k]] = holders[first[k]].at(int(to_first[k]))
            holders[second[k]] = holders[second[k]].at(int(to_second[k]))
    return holders


def pick_mover(holders: Sequence[Holder], num_blocks: int, margin: float = MOVE_MARGIN) -> tuple[str, Move] | None:
    """The one server that should move now, and where. Every server computes this from the
    same gossiped table and only the chosen one moves, so two servers never leave the same
    blocks at once believing the other stays.

    The order (protocol.md, Placement): covering a block no span holds (the single move that
    leaves the fewest bare, else the first move of `_gap_path`, which no step of the plan may
    interrupt); dropping a second span no longer needed (`_drop`); when the plan (`plan_swarm`)
    is clearly better (`better`, by `margin`), its safe step that ranks the swarm highest (ties:
    the smallest key; one that ranks the swarm lower only where the plan is then reached), else
    double-holding (`_holding_step`) where the rest of the plan then follows; else the best
    single move of a server not where the plan puts it, or of any server whose move makes the
    swarm as good as the plan; else a drop. No move uncovers a block; each covers one, shortens
    the way to cover one, puts one more server in place (ranking the swarm no lower, or on a way
    that reaches the plan), or ranks the swarm strictly higher. Once the plan is not clearly
    better, no move that ranks the swarm higher makes it so again (`better` compares at the
    first place the profiles differ), so nothing pulls a server back: with the same table, the
    moves end."""
    holders = sorted(holders, key=lambda h: h.key)
    now = block_throughput(holders, num_blocks)
    target = plan_swarm(holders, num_blocks)
    planned_tp = block_throughput([h.at(target.get(h.key, h.start)) for h in holders], num_blocks)
    wanted = better(planned_tp, now, margin)
    dropped = _drop(holders, num_blocks, target)
    if dropped:
        return dropped
    def single_moves() -> list[tuple[Holder, Move | None]]:
        return [(h, plan_move(holders, h.key, num_blocks, margin)) for h in holders if h.movable]

    # blocks no span holds (a span held beside another during a trade covers its blocks, though
    # its throughput does not count: such a block is served)
    gaps_now = len(gaps(holders, num_blocks))
    moves = single_moves() if gaps_now else None
    if moves is not None:
        # the swarm serves no one: first the move that fills most, else the way to fill one that
        # no single move opens (a step of the plan in between could undo its first move)
        fills = [(m.rank, h.key, m) for h, m in moves if m is not None and gaps_now > len(
            gaps([apply_move(x, m) if x.key == h.key else x for x in holders], num_blocks))]
        cover = (max(fills)[1:] if fills else None) or _gap_path(holders, num_blocks)
        if cover:
            return cover
    step = (wanted and _plan_step(holders, target, num_blocks, guard=True)) or \
        (wanted and _holding_step(holders, target, num_blocks))
    if step:
        return step
    best: tuple | None = None
    for h, move in moves if moves is not None else single_moves():  # most calls end at a plan step
        if move is None:
            continue
        if target.get(h.key) == h.start and better(planned_tp, move.rank, margin):
            # a server where the plan puts it stays, but where its move alone makes the swarm as
            # good as the plan (which is then no longer wanted)
            continue
        if best is None or move.rank > best[0]:
            best = (move.rank, h.key, move)
    if best:
        return best[1], best[2]
    return _drop(holders, num_blocks) or None


def _gap_path(holders: Sequence[Holder], num_blocks: int) -> tuple[str, Move] | None:
    """When a block is uncovered and no move fills it without uncovering another (servers alone
    on their blocks, and none with memory to spare): the first move of the shortest sequence of
    moves, none uncovering a block, after which fewer blocks are uncovered. The moves on the way
    may rank the swarm no higher (it serves no one while a block is missing, so a sideways move
    costs nothing); the search runs breadth first, servers by key and starts in order, over at
    most GAP_SEARCH_STATES states of at most GAP_SEARCH_DEPTH moves. Each move it names leaves
    a shorter such sequence from the swarm it makes, so the moves end."""
    movers = [h for h in holders if h.movable and h.also is None]
    if not movers or sum(h.length for h in holders) < num_blocks:
        return None
    rest = coverage([h for h in holders if not (h.movable and h.also is None)], num_blocks)
    lengths = np.array([h.length for h in movers], dtype=np.int64)
    masks = [_masks(num_blocks, int(length)).astype(np.int64) for length in lengths]
    first = tuple(h.start for h in movers)
    cover0 = rest + sum(masks[i][s] for i, s in enumerate(first))
    gaps0 = int((cover0 == 0).sum())
    seen = {first}
    frontier: list[tuple[tuple[int, ...], tuple[int, int] | None]] = [(first, None)]
    for _ in range(GAP_SEARCH_DEPTH):
        following: list[tuple[tuple[int, ...], tuple[int, int] | None]] = []
        for starts, first_move in frontier:
            cover = rest + sum(masks[i][s] for i, s in enumerate(starts))
            for i in range(len(movers)):
                after = cover[None, :] - masks[i][starts[i]][None, :] + masks[i]
                safe = ~_uncovers(cover, after)
                safe[starts[i]] = False
                for s in np.flatnonzero(safe).tolist():
                    state = starts[:i] + (s,) + starts[i + 1:]
                    if state in seen:
                        continue
                    seen.add(state)
                    move = first_move or (i, s)
                    if int((after[s] == 0).sum()) < gaps0:
                        h, to = movers[move[0]], move[1]
                        now = block_throughput(holders, num_blocks)
                        moved = block_throughput([h.at(to) if x.key == h.key else x for x in holders], num_blocks)
                        return h.key, Move((h.start, h.end), (to, to + h.length), min(now), min(moved), _rank(moved))
                    if len(seen) >= GAP_SEARCH_STATES:
                        return None
                    following.append((state, move))
        frontier = following
    return None


def _drop(holders: Sequence[Holder], num_blocks: int, target: dict[str, int] | None = None) -> tuple[str, Move] | None:
    """The first server (by key) that double-holds a span whose every block is held by
    another span too: it lets that span go, which uncovers nothing. With `target`, only the
    spans of servers where the plan puts them count (and the server's own): a span held so
    that another server can leave its blocks must stay until the server that takes them over
    is in place, not only until it is still there."""
    if target is None:
        cover = coverage(holders, num_blocks)
    else:
        cover = coverage([replace(x, also=None) for x in holders if target.get(x.key, x.start) == x.start],
                         num_blocks)
    for h in holders:
        if h.also is None:
            continue
        start, end = max(0, h.also[0]), min(num_blocks, h.also[1])
        own = coverage([replace(h, also=None)], num_blocks) if target is not None and \
            target.get(h.key, h.start) != h.start else np.zeros(num_blocks, dtype=np.int64)
        if (cover[start:end] + own[start:end] > (1 if target is None else 0)).all():
            tp = block_throughput(holders, num_blocks)  # the old span adds no throughput: dropping changes none
            return h.key, Move(h.also, (h.start, h.end), min(tp), min(tp), _rank(tp), kind="drop")
    return None


def _steps(holders: Sequence[Holder], movers: Sequence[Holder], starts: Sequence[int],
           num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Row k: the block throughputs and the coverage counts of the swarm once movers[k] (none of
    them double-holding) has moved to starts[k], all else as it is."""
    lengths = np.array([h.length for h in movers], dtype=np.int64)
    tps = np.array([h.throughput for h in movers], dtype=np.float64)
    old = _place(num_blocks, np.array([h.start for h in movers], dtype=np.int64), lengths, np.ones(len(movers)))
    new = _place(num_blocks, np.asarray(starts, dtype=np.int64), lengths, np.ones(len(movers)))
    now = np.asarray(block_throughput(holders, num_blocks))
    return now[None, :] + tps[:, None] * (new - old), coverage(holders, num_blocks)[None, :] + (new - old)


def _plan_step(holders: Sequence[Holder], target: dict[str, int], num_blocks: int,
               guard: bool = False) -> tuple[str, Move] | None:
    """The safe step towards `target` that ranks the swarm highest: a server not where the plan
    puts it (and not double-holding) moves there, leaving no covered block uncovered. With
    `guard`, a step that ranks the swarm lower than now is taken only where the whole plan is
    then reached (`_reaches`): half a plan can be worse than both where the swarm is and the
    plan (a step that weakens some blocks for a trade that no memory allows, then nothing)."""
    steps = [h for h in holders if target.get(h.key, h.start) != h.start and h.also is None]
    if not steps:
        return None
    profiles, covers = _steps(holders, steps, [target[h.key] for h in steps], num_blocks)
    pick = _best(profiles, ~_uncovers(coverage(holders, num_blocks), covers))  # unsafe steps wait for another
    if pick is None:
        return None
    h, after = steps[pick], profiles[pick].tolist()
    start = target[h.key]
    now = block_throughput(holders, num_blocks)
    if guard and _rank(after) < _rank(now) and not _reaches(holders, target, num_blocks):
        return None
    return h.key, Move((h.start, h.end), (start, start + h.length), min(now), min(after), _rank(after))


def _holding_step(holders: Sequence[Holder], target: dict[str, int], num_blocks: int,
                  lookahead: bool = True) -> tuple[str, Move] | None:
    """When no single step towards `target` is safe: a server that double-holds so that one
    becomes safe. Either the mover itself, if its memory holds both spans, takes its planned
    span and keeps its old one ("hold"); or another server whose memory has room for the blocks
    the step would uncover loads them beside its own span ("bridge"): in the corners the movers
    are often the servers with no memory to spare, while one already in place has some. Of
    these, the one whose enabled step ranks the swarm highest (ties: the smallest mover's key,
    its own hold before a bridge, then the helper's key), among the first TRADES_TRIED after
    which the whole plan is reached in safe steps (`_reaches`): a trade that no other server
    could complete would leave a span held, and counted at no throughput, for good."""
    movers = [h for h in holders if target.get(h.key, h.start) != h.start and h.also is None and h.movable]
    if not movers:
        return None
    now = block_throughput(holders, num_blocks)
    cover = coverage(holders, num_blocks)
    profiles, covers = _steps(holders, movers, [target[h.key] for h in movers], num_blocks)
    ranked = sorted(((_rank(tp), m, after) for m, tp, after in zip(movers, profiles.tolist(), covers)),
                    key=lambda r: (tuple(-x for x in r[0]), r[1].key))
    by_key = {h.key: h for h in holders}
    tried = 0
    for rank, m, after_cover in ranked:
        start = target[m.key]
        trades: list[tuple[str, Move]] = []
        if m.can_hold(start, start + m.length):
            trades.append((m.key, Move((m.start, m.end), (start, start + m.length), min(now), min(rank), rank,
                                       kind="hold")))
        left = np.flatnonzero((cover > 0) & (after_cover == 0))
        if left.size:
            window = (int(left[0]), int(left[-1]) + 1)  # the blocks it would uncover, and any between
            bridges = [(h, _bridged(h, window)) for h in holders if h.key != m.key]
            # whole windows first, then the largest parts: servers that each have room for
            # part of the window bridge it together, one after another
            bridges.sort(key=lambda b: -(b[1][1] - b[1][0]))
            trades += [(h.key, Move((h.start, h.end), part, min(now), min(now), _rank(now), kind="bridge"))
                       for h, part in bridges if part[1] > part[0]]
        for key, move in trades:
            if not lookahead:
                return key, move
            if tried == TRADES_TRIED:
                return None
            tried += 1
            if _reaches([apply_move(h, move) if h.key == key else h for h in by_key.values()], target, num_blocks):
                return key, move
    return None


def _bridged(h: Holder, window: tuple[int, int]) -> tuple[int, int]:
    """The most of `window` that `h` has the memory to hold beside its span: all of it, or the
    longest part from either end (empty: none)."""
    start, end = window
    for length in range(end - start, 0, -1):
        for part in ((start, start + length), (end - length, end)):
            if h.can_hold(*part):
                return part
    return start, start


def _reaches(holders: Sequence[Holder], target: dict[str, int], num_blocks: int) -> bool:
    """Whether pick_mover's own steps (drops, safe steps of the plan, and further double-holding
    where needed) take the swarm from `holders` to `target`, with no span left double-held."""
    state = {h.key: h for h in holders}
    for _ in range(4 * len(state) + 2):  # each server moves once, and double-holds and drops once or twice
        now = sorted(state.values(), key=lambda h: h.key)
        if all(target.get(h.key, h.start) == h.start and h.also is None for h in now):
            return True
        chosen = _drop(now, num_blocks, target) or _plan_step(now, target, num_blocks) or \
            _holding_step(now, target, num_blocks, lookahead=False) or _drop(now, num_blocks)
        if chosen is None:
            return False
        key, move = chosen
        state[key] = apply_move(state[key], move)
    return False


def apply_move(h: Holder, move: Move) -> Holder:
    """`h` once it has made `move` (simulations and look-aheads)."""
    if move.kind == "drop":
        return replace(h, also=None)
    if move.kind == "bridge":
        return replace(h, also=move.new)
    moved = h.at(move.new[0])
    return replace(moved, also=(h.start, h.end)) if move.kind == "hold" else moved


def assign_joiners(settled: Sequence[Holder], joiners: Sequence[Holder], num_blocks: int) -> dict[str, tuple[int, int]]:
    """Spans for servers that announced themselves at about the same time (state `joining`):
    one after another in the order of their keys, each takes `choose_span` given the settled
    servers (online, or already loading their blocks) and the joiners before it. Every joiner
    computes the same assignment from the same table, so none yields to another that yields
    too, and two that started together never both take the first blocks."""
    placed = list(settled)
    spans: dict[str, tuple[int, int]] = {}
    for j in sorted(joiners, key=lambda h: h.key):
        spans[j.key] = choose_span(placed, num_blocks, j.length, j.throughput)
        placed.append(j.at(spans[j.key][0]))
    return spans


def gaps(holders: Iterable[Holder], num_blocks: int) -> list[int]:
    """Blocks that no server holds (a span held beside another during a trade counts)."""
    return [int(b) for b in np.flatnonzero(coverage(holders, num_blocks) == 0)]


def blocks_that_fit(memory_bytes: int, block_bytes: int, cache_bytes: int, num_blocks: int) -> int:
    """How many blocks a server can hold: the memory left after the KV cache budget, divided by
    one block's weights (at least 1, at most the whole model)."""
    if block_bytes <= 0:
        return num_blocks
    return max(1, min(num_blocks, (memory_bytes - cache_bytes) // block_bytes))
