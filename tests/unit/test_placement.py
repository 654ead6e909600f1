"""Placement: the pure functions that choose and re-choose a server's blocks."""

from swarmd.placement import Holder, block_throughput, blocks_that_fit, bottleneck, choose_span, plan_move


def test_a_new_server_fills_a_gap():
    others = [Holder("a", 0, 4, 10.0), Holder("b", 6, 10, 10.0)]
    assert choose_span(others, 10, 2, 5.0) == (4, 6)
    assert choose_span(others, 10, 4, 5.0) in ((2, 6), (3, 7), (4, 8))  # covers the gap whatever else


def test_a_new_server_takes_the_weakest_blocks():
    others = [Holder("fast", 0, 4, 30.0), Holder("slow", 4, 8, 5.0), Holder("mid", 0, 8, 10.0)]
    assert choose_span(others, 8, 4, 10.0) == (4, 8)
    assert bottleneck([*others, Holder("new", 4, 8, 10.0)], 8) == 25.0


def test_first_server_starts_at_zero_and_lengths_are_clamped():
    assert choose_span([], 6, 2, 1.0) == (0, 2)
    assert choose_span([], 3, 10, 1.0) == (0, 3)


def test_move_that_would_uncover_a_block_is_never_planned():
    # a is the only holder of 0:2; covering the gap 4:6 would uncover 0:2
    holders = [Holder("a", 0, 2, 10.0), Holder("b", 2, 4, 10.0)]
    assert plan_move(holders, "a", 6) is None
    assert plan_move(holders, "b", 6) is None
    # here the move would pay (two gap blocks covered for one uncovered), and is still refused
    holders = [Holder("a", 0, 2, 10.0), Holder("c", 1, 2, 10.0), Holder("b", 2, 4, 10.0)]
    assert plan_move(holders, "a", 6) is None


def test_redundant_server_moves_to_cover_a_gap():
    holders = [Holder("a", 0, 2, 10.0), Holder("b", 0, 2, 10.0), Holder("c", 2, 4, 10.0)]
    move = plan_move(holders, "b", 6)
    assert move is not None and move.new == (4, 6) and move.before == 0.0


def test_hysteresis_stops_ping_pong():
    # moving b would raise the bottleneck from 10 to 10.3: under the margin, so nobody moves
    holders = [Holder("a", 0, 2, 10.0), Holder("b", 0, 2, 0.3), Holder("c", 2, 4, 10.0)]
    assert block_throughput(holders, 4) == [10.3, 10.3, 10.0, 10.0]
    assert plan_move(holders, "b", 4) is None
    assert plan_move(holders, "a", 4) is None
    # a large gain moves, and the result is stable: the mover does not want to move back
    holders = [Holder("a", 0, 2, 10.0), Holder("b", 0, 2, 10.0), Holder("c", 2, 4, 2.0)]
    move = plan_move(holders, "b", 4)
    assert move is not None and move.new == (2, 4)
    after = [holders[0], Holder("b", 2, 4, 10.0), holders[2]]
    assert all(plan_move(after, k, 4) is None for k in "abc")


def test_blocks_that_fit_memory():
    assert blocks_that_fit(10_000, 1_000, 2_000, 32) == 8
    assert blocks_that_fit(500, 1_000, 0, 32) == 1
    assert blocks_that_fit(10**12, 1_000, 0, 32) == 32


def test_only_one_server_is_picked_to_move_so_two_never_leave_the_same_blocks():
    from swarmd.placement import pick_mover

    # c and d both hold 4:6 and either could fill the gap 2:4 alone; both moving would open 4:6
    holders = [Holder("a", 0, 2, 10.0), Holder("d", 4, 6, 10.0), Holder("c", 4, 6, 10.0)]
    key, move = pick_mover(holders, 6)
    assert key in "cd" and move.new == (2, 4)
    assert pick_mover(holders, 6) == (key, move)  # every server computes the same pick
    # fixed servers are never picked
    holders = [Holder("a", 0, 2, 10.0), Holder("c", 4, 6, 10.0, movable=False), Holder("d", 4, 6, 10.0)]
    key, move = pick_mover(holders, 6)
    assert key == "d" and move.new == (2, 4)


def test_span_throughput_is_capped_by_the_network():
    from swarmd.runtime.speed import BlockSpeed

    speed = BlockSpeed(step_s=0.001, forward_tokens_per_s=1e4, block_bytes=1)
    assert speed.span_throughput(4) == 250.0
    assert speed.span_throughput(4, step_bytes=8192, bandwidth_bps=10e6) == 250.0  # 10 MB/s: 610 steps/s
    assert speed.span_throughput(4, step_bytes=8192, bandwidth_bps=1e6) == round(1e6 / 16384, 3)  # 1 MB/s: 61


def settle(holders: list[Holder], num_blocks: int, limit: int = 50) -> list[Holder]:
    """pick_mover's moves one at a time, as the daemons make them; none may uncover a block."""
    from swarmd.placement import pick_mover

    for _ in range(limit):
        chosen = pick_mover(holders, num_blocks)
        if chosen is None:
            return holders
        before = block_throughput(holders, num_blocks)
        holders = [h.at(chosen[1].new[0]) if h.key == chosen[0] else h for h in holders]
        after = block_throughput(holders, num_blocks)
        assert not any(b > 0 and a == 0 for b, a in zip(before, after)), (chosen, holders)
    raise AssertionError(f"still moving after {limit} moves: {holders}")


def test_the_swarm_plan_gets_out_of_a_local_optimum_in_a_safe_order():
    from swarmd.placement import plan_swarm

    # blocks [1, 4, 4, 1]: no single move helps (c alone holds block 3, and b moving to 2:4
    # changes nothing), but b to 2:4 and then c to 0:2 makes [2, 2, 3, 3]
    holders = [Holder("a", 0, 2, 1.0), Holder("b", 1, 3, 3.0), Holder("c", 2, 4, 1.0)]
    assert all(plan_move(holders, k, 4) is None for k in "abc")
    plan = plan_swarm(holders, 4)
    settled = settle(holders, 4)
    assert bottleneck(settled, 4) == 2.0
    assert {h.key: h.start for h in settled} == plan
    # the plan depends on who the servers are, not where they are: it holds while carried out
    assert plan_swarm(settled, 4) == plan


def test_alike_servers_do_not_trade_places_for_nothing():
    from swarmd.placement import plan_swarm

    holders = [Holder("a", 0, 3, 5.0), Holder("b", 3, 6, 5.0), Holder("c", 0, 3, 5.0), Holder("d", 3, 6, 5.0)]
    assert plan_swarm(holders, 6) == {"a": 0, "b": 3, "c": 0, "d": 3}
    assert settle(holders, 6) == holders


def test_servers_joining_together_take_turns_by_key_and_cover_the_model():
    from swarmd.placement import assign_joiners

    # four servers of 3 blocks start at once on a 6-block model: each announced 0:3 (the table
    # was empty); every one of them computes the same turns from the same table
    joiners = [Holder(k, 0, 3, 10.0) for k in "dbca"]
    spans = assign_joiners([], joiners, 6)
    assert spans == {"a": (0, 3), "b": (3, 6), "c": (0, 3), "d": (3, 6)}
    assert assign_joiners([], list(reversed(joiners)), 6) == spans
    # a server already online (or loading) keeps its blocks; joiners fill around it
    assert assign_joiners([Holder("z", 0, 3, 10.0)], joiners[:1], 6) == {"d": (3, 6)}


def test_a_gap_is_filled_even_by_a_server_the_plan_would_keep_where_it_is():
    from swarmd.placement import pick_mover, plan_swarm

    # the plan swaps s2 and s3, but each alone holds blocks the other would leave: no step of
    # it is safe. s0 sits where the plan wants it, and is the only one that can fill block 2.
    holders = [Holder("s3", 0, 2, 31.33), Holder("s0", 3, 7, 24.35), Holder("s2", 5, 8, 51.86)]
    assert plan_swarm(holders, 8)["s0"] == 3
    key, move = pick_mover(holders, 8)
    assert key == "s0" and move.before == 0.0 and move.after > 0
    assert bottleneck(settle(holders, 8), 8) > 0
