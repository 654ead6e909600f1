"""Placement's corners: servers each alone on some blocks that must trade places, which no
order of single moves reaches without uncovering a block. A server whose memory holds two
spans double-holds to get there (placement.py); one without that memory never does."""

import random
from dataclasses import replace

import numpy as np

from swarmd.placement import (
    Holder,
    apply_move,
    better,
    block_throughput,
    bottleneck,
    coverage,
    gaps,
    pick_mover,
    plan_swarm,
)

# a holds 0:2 alone and b holds 3:4 alone; the plan puts b on 0:2 and a on 2:4 (c stays), so
# whichever of a and b moves first leaves its blocks to nobody
CORNER = [Holder("a", 0, 2, 2.0), Holder("b", 2, 4, 3.0), Holder("c", 2, 3, 2.0)]
CORNER_BLOCKS = 4


def settle(holders: list[Holder], num_blocks: int, max_moves: int = 50) -> tuple[list[Holder], list[tuple[str, str]]]:
    """pick_mover's moves one at a time, as the daemons make them, until nobody moves; every
    move is checked to leave no covered block uncovered."""
    state = {h.key: h for h in holders}
    made = []
    for _ in range(max_moves):
        chosen = pick_mover(list(state.values()), num_blocks)
        if chosen is None:
            return list(state.values()), made
        key, move = chosen
        before = set(gaps(state.values(), num_blocks))
        state[key] = apply_move(state[key], move)
        assert not set(gaps(state.values(), num_blocks)) - before, f"{key} {move} uncovered a block"
        made.append((key, move.kind))
    raise AssertionError(f"still moving after {max_moves} moves: {made}")


def test_the_corner_is_stuck_without_memory_to_spare():
    plan = plan_swarm(CORNER, CORNER_BLOCKS)
    planned = [h.at(plan[h.key]) for h in CORNER]
    assert better(block_throughput(planned, CORNER_BLOCKS), block_throughput(CORNER, CORNER_BLOCKS))
    assert pick_mover(CORNER, CORNER_BLOCKS) is None  # every step towards the plan uncovers a block


def test_a_server_with_the_memory_for_both_spans_trades_places_without_a_gap():
    holders = [replace(h, capacity=4) if h.key == "a" else h for h in CORNER]
    settled, made = settle(holders, CORNER_BLOCKS)
    assert made == [("a", "hold"), ("b", "move"), ("a", "drop")]
    plan = plan_swarm(CORNER, CORNER_BLOCKS)
    assert {h.key: h.start for h in settled} == plan
    assert all(h.also is None for h in settled)
    # the weakest blocks stay at 2 steps/s, but fewer of them: [2, 2, 3, 5] -> [2, 3, 3, 4]
    assert better(block_throughput(settled, CORNER_BLOCKS), block_throughput(CORNER, CORNER_BLOCKS))


def test_a_server_without_the_memory_never_double_holds():
    # a's two spans are 4 blocks; 3 do not hold them, nor does b's 2 hold its own two
    holders = [replace(h, capacity={"a": 3, "b": 2, "c": 1}[h.key]) for h in CORNER]
    assert pick_mover(holders, CORNER_BLOCKS) is None
    fixed = [replace(h, capacity=4, movable=h.key != "a") for h in CORNER]  # a fixed span is the operator's
    chosen = pick_mover(fixed, CORNER_BLOCKS)
    assert chosen is None or chosen[1].kind not in ("hold", "bridge")


def test_a_server_in_place_bridges_the_blocks_a_mover_leaves_then_lets_them_go():
    holders = [Holder("a", 0, 4, 2.0), Holder("b", 2, 6, 1.0), Holder("c", 0, 1, 1.0, capacity=2)]
    assert pick_mover([replace(h, capacity=0) for h in holders], 6) is None
    settled, made = settle(holders, 6)
    assert made[0] == ("c", "bridge") and made[-1] == ("c", "drop")
    assert {h.key: h.start for h in settled} == plan_swarm(holders, 6)
    assert all(h.also is None for h in settled)


def test_two_servers_each_with_room_for_part_of_the_blocks_bridge_them_together():
    # s2 (no room) must leave 0:7 for 25:32 and s4 (no room) 25:32 for 0:18: neither can go
    # first, and no server has room for all 7 blocks, but s5 has room for 4 and s1 for 5
    holders = [Holder("s2", 0, 7, 93.664, capacity=7), Holder("s5", 7, 22, 6.729, capacity=19),
               Holder("s1", 14, 25, 9.801, capacity=16), Holder("s4", 14, 32, 11.514, capacity=18)]
    assert pick_mover([replace(h, capacity=0) for h in holders], 32) is None
    settled, made = settle(holders, 32)
    assert made[:2] == [("s5", "bridge"), ("s1", "bridge")]
    assert {key for key, kind in made if kind == "drop"} == {"s1", "s5"}
    assert all(h.also is None for h in settled)
    assert bottleneck(settled, 32) > 1.5 * bottleneck(holders, 32)  # 6.7 -> 11.5 steps/s


def test_a_span_held_beside_another_covers_its_blocks_but_adds_no_throughput():
    trading = [Holder("a", 2, 4, 2.0, also=(0, 2)), Holder("b", 2, 4, 3.0)]
    assert gaps(trading, 4) == []
    assert coverage(trading, 4).tolist() == [1, 1, 2, 2]
    assert block_throughput(trading, 4) == [0.0, 0.0, 5.0, 5.0]  # one machine's compute, counted once
    assert bottleneck(trading, 4) == 0.0  # a swarm that stopped mid-trade ranks as it serves


def test_the_old_span_is_kept_while_it_is_the_only_holder_of_a_block():
    holders = [Holder("a", 2, 4, 2.0, also=(0, 2)), Holder("b", 2, 4, 3.0), Holder("c", 1, 2, 1.0)]
    chosen = pick_mover(holders, 4)
    assert chosen is None or chosen[1].kind != "drop" or chosen[0] != "a"  # block 0 has only a's old span


def test_random_small_swarms_with_memory_to_spare_never_uncover_a_block_and_end_without_a_second_span():
    rng = random.Random(7)
    trades = 0
    for _ in range(400):
        n = rng.choice([4, 5, 6, 8])
        holders = []
        for i in range(rng.randint(2, 3)):
            length = rng.randint(1, n - 1)
            start = rng.randint(0, n - length)
            holders.append(Holder(f"s{i}", start, start + length, float(rng.choice([1, 2, 3, 5, 8])),
                                  capacity=rng.choice([0, length, 2 * length, n])))
        if gaps(holders, n):
            continue
        settled, made = settle(holders, n)
        trades += sum(kind in ("hold", "bridge") for _, kind in made)
        assert all(h.also is None for h in settled)
    assert trades > 0  # the corners did come up, and were left


# Servers whose spans add up to the model's 8 blocks, block 1 uncovered, none with memory to
# spare: every move that covers block 1 leaves a block that the mover alone holds.
GAP_NO_SINGLE_MOVE = [Holder("s0", 0, 1, 59.477, capacity=1), Holder("s2", 2, 3, 132.187, capacity=1),
                      Holder("s4", 3, 5, 14.595, capacity=2), Holder("s5", 4, 8, 5.84, capacity=4)]


def test_a_gap_that_no_single_move_fills_is_filled_by_moves_that_uncover_nothing():
    for h in GAP_NO_SINGLE_MOVE:  # no single move of anyone fills it without leaving a block bare
        for start in range(8 - h.length + 1):
            moved = [x.at(start) if x.key == h.key else x for x in GAP_NO_SINGLE_MOVE]
            assert gaps(moved, 8) != [] if start != h.start else gaps(moved, 8) == [1]
    settled, made = settle(GAP_NO_SINGLE_MOVE, 8)  # settle() asserts that no move uncovers a block
    assert gaps(settled, 8) == []
    assert all(kind == "move" for _, kind in made)
    # the same from the other end, and a burst that left block 0 bare
    mirrored = [Holder(h.key, 8 - h.end, 8 - h.start, h.throughput, capacity=h.capacity) for h in GAP_NO_SINGLE_MOVE]
    assert gaps(settle(mirrored, 8)[0], 8) == []
    burst = [Holder("s3", 1, 2, 81.303), Holder("s5", 2, 4, 37.313), Holder("s6", 3, 5, 41.884),
             Holder("s2", 5, 8, 75.651)]
    assert gaps(burst, 8) == [0] and gaps(settle(burst, 8)[0], 8) == []


def test_a_gap_the_servers_are_too_few_to_fill_names_no_mover():
    short = [Holder("a", 0, 2, 1.0), Holder("b", 3, 5, 1.0), Holder("c", 5, 7, 1.0)]  # 6 blocks of 8
    assert pick_mover(short, 8) is None


def test_the_plan_reaches_the_optimum_where_the_greedy_sweeps_stop_short():
    servers = [(4, 25.272), (4, 33.802), (4, 35.996), (6, 24.307), (6, 32.688), (7, 17.298)]
    holders = [Holder(f"s{i}", 0, length, tp) for i, (length, tp) in enumerate(servers)]
    n = 12
    # every placement (9 * 9 * 9 * 7 * 7 * 6 of them): the best bottleneck there is
    grids = np.meshgrid(*[np.arange(n - length + 1) for length, _ in servers], indexing="ij")
    starts = np.stack([g.ravel() for g in grids], axis=1)
    blocks = np.arange(n)
    tp = sum(t * ((blocks[None, :] >= starts[:, [i]]) & (blocks[None, :] < starts[:, [i]] + length))
             for i, (length, t) in enumerate(servers))
    optimum = tp.min(axis=1).max()
    plan = plan_swarm(holders, n)
    assert bottleneck([h.at(plan[h.key]) for h in holders], n) >= optimum * (1 - 1e-9)
