"""Pushes that come before their step (swarmd/peer/early.py): who may leave them waiting, and
how much they may hold (issue 38, finding 9)."""

from types import SimpleNamespace

import pytest
import torch

from libswarm.errors import LimitError
from swarmd.config import LimitsConfig
from swarmd.peer.early import MAX_EARLY_PUSHES_PER_SESSION, EarlyPushes
from swarmd.peer.limits import KeyLimits
from swarmd.runtime.cache import CacheBudget

H = 4  # hidden size: a position of a float32 push is 16 bytes


def session(sid: str = "s1", max_length: int = 100, length: int = 0):
    cache = SimpleNamespace(batch=1, max_length=max_length, length=length)
    return SimpleNamespace(id=sid, prev_hop=None, cache=cache, span=SimpleNamespace(hidden_size=H))


def pushes(budget_bytes: int = 10_000, share: float = 0.5, kv: dict | None = None) -> EarlyPushes:
    limits = KeyLimits(LimitsConfig(sessions_per_key=16, cache_share_per_key=share, requests_per_s_per_key=100))
    return EarlyPushes(CacheBudget(budget_bytes), limits, lambda key: (kv or {}).get(key, 0))


def hidden(positions: int) -> torch.Tensor:
    return torch.zeros(1, positions, H)


def test_once_a_step_names_the_previous_hop_other_keys_pushes_go_and_each_other_key_holds_one():
    early, s = pushes(), session()
    early.keep(s, 1, hidden(1), "hop")
    early.keep(s, 1, hidden(1), "stranger")  # before any step named the hop: either may be it
    assert early.count == 2
    early.named(s, "hop")  # a step named its previous hop: the stranger's push cannot be its input
    assert early.count == 1 and early.held_by("stranger") == 0
    for step in range(2, 9):
        early.keep(s, step, hidden(1) + 1, "stranger")  # e.g. a hop replaced since: one push at a time
        early.keep(s, step, hidden(1), "hop")
    assert early.held_by("stranger") == 16 and early.held_by("hop") == MAX_EARLY_PUSHES_PER_SESSION * 16
    assert torch.equal(early.take(s, 8, "hop"), hidden(1))  # the step's `from` decides whose push is its input
    assert early.budget.used_bytes == early.nbytes == 16 + 3 * 16


def test_a_sessions_early_pushes_together_hold_one_step_of_its_positions_left():
    early, s = pushes(), session(max_length=100, length=90)  # 10 positions left: 160 bytes
    early.named(s, "hop")
    early.keep(s, 1, hidden(6), "stranger")
    with pytest.raises(LimitError, match="holds 96 bytes of early pushes of other keys, of at most 160 bytes"):
        early.keep(s, 2, hidden(6), "stranger2")  # only room for 4 positions more: dropped
    early.keep(s, 2, hidden(10), "hop")  # the previous hop's push goes before a stranger's
    assert early.nbytes == 160 and early.held_by("stranger") == 0 and early.refused == 1


def test_a_keys_pushes_and_sessions_share_its_part_of_the_budget_and_nothing_is_held_beyond():
    early = pushes(budget_bytes=4000, share=0.5, kv={"greedy": 1000})  # its share: 2000 bytes, 1000 in sessions
    sessions = [session(f"s{i}") for i in range(8)]
    kept = 0
    for s in sessions:
        try:
            early.keep(s, 1, hidden(20), "greedy")  # 320 bytes each
            kept += 1
        except LimitError as e:
            assert "cache_share_per_key" in str(e)
    assert kept == 3 and early.held_by("greedy") == 960 and early.budget.used_bytes == 960
    early.keep(sessions[7], 1, hidden(60), "other")  # another key is not starved
    for s in sessions:
        early.forget(s.id)
    assert early.budget.used_bytes == early.nbytes == early.count == 0


def test_a_push_the_budget_cannot_hold_is_dropped():
    early = pushes(budget_bytes=1000, share=1.0)
    early.keep(session("a"), 1, hidden(50), "a")  # 800 bytes
    with pytest.raises(LimitError, match="budget"):
        early.keep(session("b"), 1, hidden(50), "b")
    early.expire(older_than=float("inf"), live=lambda sid: True)  # 60 s later: let go
    assert early.budget.used_bytes == 0
