import torch

from swarmd.gateway.bans import BAN_MAX_S, Bans
from swarmd.gateway.history import History, StepTimes


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_bans_double_with_each_failure_up_to_a_cap_and_expire():
    clock = Clock()
    bans = Bans(clock)
    assert [bans.ban("a") for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert bans.is_banned("a") and not bans.is_banned("b")
    clock.t += 8.5
    assert not bans.is_banned("a") and bans.banned() == set()
    for _ in range(20):
        last = bans.ban("a")
    assert last == BAN_MAX_S
    bans.succeeded("a")
    assert bans.ban("a") == 1.0  # a success forgets the failures


def test_history_replays_every_step_exactly_and_fills_missing_masks():
    h = History()
    steps = [torch.randn(2, 3, 4), torch.randn(2, 1, 4), torch.randn(2, 2, 4).to(torch.bfloat16).float()]
    pos = [torch.arange(3).expand(2, 3), torch.tensor([[3], [3]]), torch.tensor([[4, 5], [4, 5]])]
    masks = [torch.tensor([[True] * 3, [False, True, True]]), None, None]
    for x, p, m in zip(steps, pos, masks):
        h.append({0: x, 5: x * 2}, [0, 5], p, m)
    r = h.replay_inputs(5)
    assert torch.equal(r["hidden"], torch.cat(steps, 1) * 2)
    assert torch.equal(r["position_ids"], torch.cat(pos, 1))
    assert r["key_mask"].tolist() == [[True] * 6, [False] + [True] * 5]
    h.reset_boundary(3, torch.ones(2, 6, 4))
    assert h.replay_inputs(3)["hidden"].shape == (2, 6, 4)


def test_step_times_scale_with_tokens_and_follow_changes():
    st = StepTimes()
    assert st.expected_s("a", 1) is None
    st.record("a", 0.017, 1)  # 1 token + 16 fixed units
    assert abs(st.expected_s("a", 1) - 0.017) < 1e-9
    assert abs(st.expected_s("a", 33) - 0.049) < 1e-9
    for _ in range(50):
        st.record("a", 0.170, 1)
    assert abs(st.expected_s("a", 1) - 0.170) < 1e-3
