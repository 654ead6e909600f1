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
    assert pick_mover(holders, 6) == ("c", plan_move(holders, "c", 6))
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
