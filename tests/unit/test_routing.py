import pytest

from libswarm.errors import NoRouteError
from swarmd.routing import Hop, ServerSpan, forward_seconds, missing_blocks, plan_chain


def test_chain_covers_all_blocks_with_fewest_hops():
    servers = [ServerSpan("a", 0, 2), ServerSpan("b", 0, 4), ServerSpan("c", 2, 6), ServerSpan("d", 4, 6)]
    assert plan_chain(servers, 6, "m") == [Hop("b", 0, 4), Hop("c", 4, 6)]


def test_overlapping_spans_are_entered_in_the_middle():
    servers = [ServerSpan("a", 0, 3), ServerSpan("b", 1, 6)]
    assert plan_chain(servers, 6, "m") == [Hop("a", 0, 3), Hop("b", 3, 6)]


def test_ties_prefer_free_cache_then_address():
    servers = [ServerSpan("z", 0, 4, 10), ServerSpan("y", 0, 4, 99), ServerSpan("x", 0, 4, 10)]
    assert plan_chain(servers, 4, "m")[0].address == "y"
    servers = [ServerSpan("z", 0, 4, 10), ServerSpan("x", 0, 4, 10)]
    assert plan_chain(servers, 4, "m")[0].address == "x"


def test_missing_blocks_are_named_in_the_error():
    servers = [ServerSpan("a", 0, 2), ServerSpan("b", 3, 4)]
    assert missing_blocks(servers, 6) == [(2, 3), (4, 6)]
    with pytest.raises(NoRouteError, match=r"blocks 2:3, 4:6 of model m"):
        plan_chain(servers, 6, "m")


def test_route_avoids_a_slow_server():
    servers = [ServerSpan("slow", 0, 4, 10, block_s=0.050, rtt_s=0.001),
               ServerSpan("f1", 0, 2, 10, block_s=0.002, rtt_s=0.001),
               ServerSpan("f2", 2, 4, 10, block_s=0.002, rtt_s=0.001)]
    assert [h.address for h in plan_chain(servers, 4, "m")] == ["f1", "f2"]
    # the same servers, equally fast: one hop beats two
    servers = [ServerSpan(s.address, s.start, s.end, 10, block_s=0.002, rtt_s=0.001) for s in servers]
    assert [h.address for h in plan_chain(servers, 4, "m")] == ["slow"]


def test_route_avoids_a_server_without_free_cache_unless_it_is_the_only_one():
    servers = [ServerSpan("full", 0, 4, 0, block_s=0.001, rtt_s=0.001),
               ServerSpan("a", 0, 4, 10**9, block_s=0.003, rtt_s=0.005)]
    assert plan_chain(servers, 4, "m")[0].address == "a"
    assert plan_chain(servers[:1], 4, "m")[0].address == "full"


def test_route_uses_measured_round_trips():
    servers = [ServerSpan("far", 0, 4, 10, block_s=0.001, rtt_s=0.080), ServerSpan("near", 0, 4, 10, block_s=0.001,
                                                                                   rtt_s=0.002)]
    assert plan_chain(servers, 4, "m")[0].address == "near"


def test_forward_batches_spread_over_servers_by_speed():
    import random

    servers = [ServerSpan("fast", 0, 4, 10, block_s=0.001, rtt_s=0.001),
               ServerSpan("slow", 0, 4, 10, block_s=0.004, rtt_s=0.001)]
    rng = random.Random(0)
    picks = [plan_chain(servers, 4, "m", rng=rng)[0].address for _ in range(2000)]
    fast = picks.count("fast") / len(picks)
    assert 0.6 < fast < 0.95  # both used, the faster one more


def test_a_forward_is_expected_to_take_the_fastest_holder_of_each_block_per_position():
    servers = [ServerSpan("a", 0, 4, forward_block_s=0.002), ServerSpan("b", 2, 6, forward_block_s=0.001),
               ServerSpan("c", 4, 6)]  # c measured nothing: b is known for 4:6
    assert forward_seconds(servers, 6, 100) == pytest.approx(100 * (2 * 0.002 + 4 * 0.001))
    assert forward_seconds([ServerSpan("a", 0, 4, forward_block_s=0.002), ServerSpan("c", 4, 6)], 6, 100) is None


def test_short_ids_are_hex_of_the_keys_first_bytes():
    import os

    from zmq.utils import z85

    from swarmd.identity import NodeIdentity, short_id

    key = NodeIdentity(os.urandom(32)).public_key
    assert short_id(key) == z85.decode(key.encode())[:4].hex() and len(short_id(key)) == 8
    assert short_id(None) == "?" and short_id("not a key") == "?"


def test_plans_equal_trying_every_server_at_every_boundary():
    """The planner looks only at the servers holding each boundary's next block: on random
    swarms (overlaps, full caches, unmeasured servers), for the whole stack and for the
    sub-ranges a failover replans, it picks exactly the chain of the plain shortest path over
    every (server, boundary, end) in tools/bench_routing.py."""
    import random

    from bench_routing import reference_plan, swarm

    rng = random.Random(7)
    for _ in range(200):
        blocks = rng.choice([6, 12, 30])
        servers = swarm(rng.randrange(1, 30), blocks, rng)
        servers = [ServerSpan(s.address, s.start, s.end, free_cache_bytes=rng.choice([-1, 0, 5]),
                              block_s=rng.choice([None, s.block_s]), rtt_s=rng.choice([None, s.rtt_s]))
                   for s in servers]
        assert plan_chain(servers, blocks, "m") == reference_plan(servers, blocks)
        first = rng.randrange(0, blocks - 1)
        last = rng.randrange(first + 1, blocks + 1)
        assert plan_chain(servers, last, "m", start=first) == reference_plan(servers, last, first)
