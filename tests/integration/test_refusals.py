"""Servers that refuse: a request beyond one server's limits, or a server that answers errors
or broken replies to requests other servers compute (overloaded, misconfigured, of another
version, hostile). The gateway routes around it and the app gets the whole model's tokens; a
request that every server refuses goes back to the app, promptly, with the servers' reason.
Refusing servers are real daemons armed with a test-only failpoint (swarmd/peer/failpoints.py),
advertising a fast speed so that routes prefer them."""

import time

import pytest
import torch
from helpers import greedy, reached_all, running_swarm

from libswarm import AutoDistributedModelForCausalLM, LimitError, SwarmClient

FAST, SLOW = 0.00001, 0.001  # seconds per block and step, advertised


def gateway_state(gw) -> dict:
    return gw.ctl("status")["gateway"]


def test_a_session_beyond_the_fastest_servers_limits_is_opened_on_one_that_allows_it(model_dirs):
    """The fastest server for blocks 0:3 takes sessions of at most 16 positions: a longer one
    is opened on the other (no error, no ban: the fast one works), a short one on the fast one."""
    d = model_dirs("llama")
    with running_swarm(d, ["0:3", "0:3", "3:6"], speeds={0: FAST, 1: 100 * SLOW, 2: SLOW},
                       extra={"swarm": {"verify": "off"}},  # no spot checks: steps only on the route
                       server_extra={0: {"serve": {"max_length": 16}}}) as (s, gw):
        reached_all(gw, s)
        got, want = greedy(d, gw.socket, 1, 20)  # 26 positions
        assert torch.equal(got, want)
        state = gateway_state(gw)
        assert state["banned"] == [] and state["failovers"] == 0
        assert s[0].ctl("status")["stats"]["steps"] == 0 and s[1].ctl("status")["stats"]["steps"] > 0
        got, want = greedy(d, gw.socket, 2, 6)  # 12 positions: the fast server's
        assert torch.equal(got, want)
        assert s[0].ctl("status")["stats"]["steps"] > 0


def test_servers_refusing_steps_or_opens_or_replying_without_output_are_routed_around(model_dirs):
    """Three bad servers for blocks 0:3, each faster than the next (so routes try them in turn):
    one refuses every step (`protocol`), one answers steps without their output, one refuses
    every open (`wrong_model`). Each generation ends with HF's tokens; each bad server is
    banned after its bad answer, and the one whose reply was broken is distrusted."""
    d = model_dirs("llama")
    env = {0: {"SWARMD_FAILPOINTS": "refuse_work"}, 1: {"SWARMD_FAILPOINTS": "reply_no_hidden"},
           2: {"SWARMD_FAILPOINTS": "refuse_opens", "SWARMD_REFUSE_CODE": "wrong_model"}}
    with running_swarm(d, ["0:3", "0:3", "0:3", "0:3", "3:6"], extra={"swarm": {"verify": "off"}}, env=env,
                       speeds={0: FAST, 1: 50 * SLOW, 2: 200 * SLOW, 3: 1000 * SLOW, 4: SLOW}) as (s, gw):
        reached_all(gw, s)
        for seed in range(3, 6):
            got, want = greedy(d, gw.socket, seed, 8)
            assert torch.equal(got, want)
        stats = [x.ctl("status")["stats"] for x in s[:4]]
        tried = [stats[0]["errors"], stats[1]["steps"], stats[2]["errors"]]
        assert all(tried), tried  # each bad one was tried...
        assert stats[3]["steps"] > 0  # ...and the honest one computed
        with open(gw.log_path) as f:  # bans are short (1 s, doubling): their trace is the log's
            failed = {line.split("server ")[1].split()[0] for line in f if "failed on blocks" in line}
        assert {s[0].address, s[2].address} <= failed, failed
        distrusted = {p.get("node_id") for p in gw.ctl("peers")["peers"] if p.get("state") == "distrusted"}
        assert s[1].node_id in distrusted
        for x in s[:3]:
            x.kill()  # it keeps the sessions the gateway gave up on until they idle out


@pytest.mark.parametrize("what", ["inference", "forward"])
def test_a_request_every_server_refuses_goes_back_to_the_app_at_once(model_dirs, what):
    """Both servers for blocks 0:3 answer `limit` to every step and forward: the app gets that
    error, not a route timeout; at most one server is banned for it."""
    d = model_dirs("llama")
    env = {i: {"SWARMD_FAILPOINTS": "refuse_work", "SWARMD_REFUSE_CODE": "limit"} for i in (0, 1)}
    with running_swarm(d, ["0:3", "0:3", "3:6"], env=env) as (s, gw):
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        ids = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(0))
        t0 = time.monotonic()
        with pytest.raises(LimitError, match="failpoint"):
            if what == "inference":
                model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            else:
                SwarmClient(socket=gw.socket).forward(model.model_id, torch.randn(1, 6, 64))
        assert time.monotonic() - t0 < 20  # the route timeout is 60 s
        assert len(gateway_state(gw)["banned"]) <= 1
