"""A server that returns the right output to the gateway but pushes another one to the next hop
(issue 38, finding 1; docs/security.md). Every hop says which input it ran on (`consumed`, a
digest), and the gateway compares it with what the hop before returned: the app's tokens are
never computed from an input the gateway has not seen, the honest next hop is neither banned
nor distrusted (its spot checks replay what it really ran on), and the pusher is not trusted
with pushes again. Liars are real daemons armed with a test-only failpoint
(swarmd/peer/failpoints.py)."""

import pytest
import torch
from helpers import Daemon, greedy, reached_all, running_swarm, until

FAST, SLOW = 0.00001, 0.001  # seconds per block and step, advertised


def standing(gw: Daemon, node_id: str) -> dict:
    rows = gw.ctl("status")["gateway"]["verify"]["servers"]
    return next((r for r in rows if r["node_id"] == node_id), {})


@pytest.mark.parametrize("behaviour", ["push_wrong", "push_extra", "push_float16", "push_stale"])
def test_a_hop_pushing_another_tensor_than_it_returns_never_reaches_the_app_nor_blames_the_next_hop(model_dirs,
                                                                                                     behaviour):
    """push_wrong: a nudged output; push_extra: one position more; push_float16: the right
    values in another dtype; push_stale: the previous step's output (the right bytes for
    another step). Spot checks on every step (p = 1) check the next hop against two others."""
    d = model_dirs("llama")
    with running_swarm(d, ["0:3", "3:6", "3:6", "3:6"],
                       extra={"swarm": {"verify": "sample", "verify_probability": 1.0}},
                       env={0: {"SWARMD_FAILPOINTS": behaviour}},
                       speeds={0: FAST, 1: FAST, 2: SLOW, 3: SLOW}) as (s, gw):
        reached_all(gw, s)
        pushed_wrong = False
        for seed in range(30, 36):  # until a wrong push went out (the first steps' may not connect)
            got, want = greedy(d, gw.socket, seed, 8)
            assert torch.equal(got, want)
            if s[0].ctl("status")["stats"]["pushes_sent"] >= 1:
                pushed_wrong = True
                break
        assert pushed_wrong, "the pusher never pushed"
        got, want = greedy(d, gw.socket, 99, 8)  # and the gateway bridges the suspect's link since
        assert torch.equal(got, want)
        until(lambda: gw.ctl("status")["gateway"]["verify"]["checks"]["run"] >= 2, 30, "spot checks to run")
        status = gw.ctl("status")["gateway"]
        suspects = status["verify"]["push_suspects"]
        assert [x["address"] for x in suspects] == [s[0].address], suspects
        assert "ran on another input" in suspects[0]["reason"]
        assert status["failovers"] == 0 and s[1].address not in status["banned"]
        assert all(standing(gw, x.node_id).get("offences", 0) == 0 for x in s), status["verify"]
        assert status["verify"]["checks"]["failed"] == 0
        assert all(p["state"] != "distrusted" for p in gw.ctl("peers")["peers"])
        assert s[0].ctl("status")["stats"]["pushes_sent"] == 1  # never asked to push again


def test_a_hop_saying_it_pushed_what_it_never_sent_gets_the_next_hop_its_input_and_no_blame(model_dirs):
    """A pusher answering `pushed: true` and sending nothing left the next hop waiting for its
    input until the gateway gave up on it: the honest next hop was banned and failed over. Now
    the gateway, when a hop waiting for a push does not answer in time, sends it its input once
    more; it answers, and the pusher is the one not trusted with pushes again."""
    d = model_dirs("llama")
    with running_swarm(d, ["0:3", "3:6", "3:6"], extra={"swarm": {"verify": "off"}},
                       env={0: {"SWARMD_FAILPOINTS": "push_none"}}, speeds={0: FAST, 1: FAST, 2: SLOW}) as (s, gw):
        reached_all(gw, s)
        got, want = greedy(d, gw.socket, 5, 6)
        assert torch.equal(got, want)
        status = gw.ctl("status")["gateway"]
        suspects = status["verify"]["push_suspects"]
        assert [x["address"] for x in suspects] == [s[0].address], suspects
        assert "never arrived" in suspects[0]["reason"]
        assert status["failovers"] == 0 and s[1].address not in status["banned"], status
        assert s[2].ctl("status")["stats"]["steps"] == 0  # the next hop was kept
