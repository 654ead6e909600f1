import pytest

from libswarm.errors import NoRouteError
from swarmd.gateway.routing import Hop, ServerSpan, missing_blocks, plan_chain


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
