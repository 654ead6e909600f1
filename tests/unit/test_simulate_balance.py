"""The placement simulator on a small seed set, without the optimum (a MILP each time): every
phase of every swarm (joins, leaves, bursts, restarts, a whole fleet started at once) must
settle with the model covered whenever the machines' memory allows, and no move may ever
uncover a block."""

import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))

import simulate_balance as sim  # noqa: E402


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_settled_swarm_leaves_a_block_uncovered_and_no_move_uncovers_one(seed, monkeypatch):
    monkeypatch.setattr(sim, "STATS", dict.fromkeys(sim.STATS, 0))
    rng = random.Random(seed)
    for copies in ((1.5, 4.0), (1.0, 1.5)):
        for _ in range(6):
            sim.one_swarm(rng, copies, measure=False)
    assert sim.STATS["uncovering moves"] == 0
    assert sim.STATS["settled with a gap"] == 0
