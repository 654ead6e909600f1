"""A server that returns the right output to the gateway but pushes another one to the next hop
(issue 38, finding 1; docs/security.md). Every hop says which input it ran on (`consumed`, a
digest), and the gateway compares it with what the hop before returned: the app's tokens are
never computed from an input the gateway has not seen, the honest next hop is neither banned
nor distrusted (its spot checks replay what it really ran on), and the pusher is not trusted
with pushes again. Liars are real daemons armed with a test-only failpoint
(swarmd/peer/failpoints.py)."""

import pytest
import torch
from helpers import Daemon, Peer, generate_equals_hf, greedy, reached_all, rss_mib, running_swarm, until

from libswarm import SwarmClient

FAST, SLOW = 0.00001, 0.02  # seconds per block and step, advertised: apart by more than a loaded
# machine's noise in round trips (60 ms over a span of 3), so that routes never take a SLOW one
HIDDEN = 64  # the test model's


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


def test_early_pushes_of_one_key_pin_no_more_than_its_share_of_the_cache(model_dirs):
    """Issue 38, finding 9. A key that knows sessions' ids (as their previous hop does) pushes
    4 x 1 MiB into each of 30 one-block sessions of other keys before any step comes: 120 MiB,
    where those sessions' KV cache is 30 MiB. Before, all of it stayed held for 60 s, counted
    nowhere. Early pushes are charged to the cache budget and to the pusher's share of it (a
    quarter here, 16 MiB): the rest are dropped, and the server goes on serving."""
    d = model_dirs("llama")
    with running_swarm(d, ["0:3", "3:6"], extra={"serve": {"limits": {"cache_share_per_key": 0.25}}}) as (s, gw):
        s0 = s[0]
        model_id = SwarmClient(socket=gw.socket).model_info()["model_id"]
        owners, hostile = [Peer(s0) for _ in range(3)], Peer(s0)
        try:
            sids = []
            for owner in owners:  # 10 MiB each: within their own shares of 16 MiB
                for _ in range(10):
                    reply = owner.open(s0, model_id, blocks=[0, 1], max_length=4096)
                    assert reply.type == "ok" and reply.get("cache_bytes") == 2**20, reply.fields
                    sids.append(reply.get("session"))
            kv_bytes = s0.ctl("status")["cache"]["used_bytes"]
            rss_before = rss_mib(s0)
            whole = torch.randn(1, 4096, HIDDEN)  # 1 MiB: a step over every position a session has
            for step in range(4):
                for sid in sids:
                    hostile.send("push", {"session": sid, "step": step}, {"hidden": whole})
            assert hostile.request("ping").type == "ok"  # handled in order: every push is in by now
            grown_mib = rss_mib(s0) - rss_before
            status = s0.ctl("status")
        finally:
            hostile.close()
            for owner in owners:
                owner.close()
        assert grown_mib < 64, f"the server grew {grown_mib:.0f} MiB from 120 MiB of early pushes"
        held = status["peer_plane"]["pushes_waiting_bytes"]
        assert 0 < held <= 16 * 2**20, status["peer_plane"]
        assert status["cache"]["used_bytes"] == kv_bytes + held  # charged to the budget while they wait
        # a session holds one such push (a newer one of the same key replaces it): 16 sessions did,
        # and the pushes into the other 14 were dropped, each time
        assert status["peer_plane"]["pushes_waiting"] == 16 and status["peer_plane"]["pushes_refused"] == 4 * 14
        after = s0.ctl("status")
        assert after["peer_plane"]["pushes_waiting"] == 0 and after["cache"]["used_bytes"] == 0  # closed: let go
        generate_equals_hf(d, gw.socket)
