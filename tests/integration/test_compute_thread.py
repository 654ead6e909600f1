"""The peer plane keeps liveness and decode steps off long compute, and training does not run
blocks forward more than it must.

One server (0:6) makes every forward pass take 3 s longer (failpoint slow_forward: a long
prefill, a large training batch, a slow GPU); a second one (0:3) and the gateway watch it."""

import threading
import time

import pytest
import torch
from helpers import running_swarm

from libswarm import SwarmClient

SLOW_FORWARD_S = 3.0


@pytest.fixture(scope="module")
def slow_swarm(model_dirs):
    d = model_dirs("llama")
    with running_swarm(d, ["0:6", "0:3"], env={0: {"SWARMD_FAILPOINTS": "slow_forward"}}) as (servers, gw):
        yield servers, gw


def test_a_long_forward_neither_marks_its_server_unreachable_nor_holds_up_decode_steps(slow_swarm):
    servers, gw = slow_swarm
    slow, watcher = servers
    client = SwarmClient(gw.socket)
    info = client.model_info()
    model_id, hidden_size = info["model_id"], info["hidden_size"]
    sess = client.open_session(model_id, max_length=512, batch=1)
    assert [h[0] for h in sess["route"]] == [slow.address]
    x = torch.randn(1, 1, hidden_size)
    client.step(sess["session"], torch.randn(1, 4, hidden_size))  # the prompt

    # two forwards at once from two apps: 6 s of compute queued on the slow server
    done: list[float] = []

    def forward():
        t0 = time.monotonic()
        SwarmClient(gw.socket).forward(model_id, torch.randn(2, 8, hidden_size))
        done.append(time.monotonic() - t0)

    passes = [threading.Thread(target=forward) for _ in range(2)]
    for t in passes:
        t.start()
    time.sleep(0.5)  # both are on the server now
    step_s, states = [], set()
    watchers = [SwarmClient(gw.socket), SwarmClient(watcher.socket)]
    while any(t.is_alive() for t in passes):
        t0 = time.monotonic()
        client.step(sess["session"], x)
        step_s.append(time.monotonic() - t0)
        for w in watchers:
            states |= {p["state"] for p in w.peers() if p["address"] == slow.address}
        time.sleep(0.05)
    for t in passes:
        t.join()

    assert len(done) == 2 and max(done) >= 2 * SLOW_FORWARD_S  # the passes really ran, one after the other
    assert len(step_s) >= 10
    # a step waits for no pass (the old single thread made each wait up to 6 s)
    assert max(step_s) < 1.0, step_s
    # and the server answered gossip and pings all along: nobody stopped routing to it
    assert states == {"online"}, states
    status = gw.ctl("status")
    assert status["gateway"]["failovers"] == 0 and status["gateway"]["banned"] == []
    client.close_session(sess["session"])


def test_a_training_step_runs_each_block_forward_at_most_twice_and_frees_what_it_kept(model_dirs):
    """forward + loss.backward() through three servers: each server computes its blocks in the
    forward pass, and once more inside its backward (to differentiate them). The hop inputs the
    gateway kept for the backward are gone once it is done."""
    from libswarm import AutoDistributedModelForCausalLM

    d = model_dirs("llama")
    with running_swarm(d, ["0:2", "2:4", "4:6"]) as (servers, gw):
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        embeddings = model.get_input_embeddings()
        ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(5))
        inputs = embeddings(ids).detach().requires_grad_(True)
        before = [s.ctl("status")["stats"] for s in servers]
        loss = model(inputs_embeds=inputs, labels=ids).loss
        assert gw.ctl("status")["gateway"]["kept_passes"] == 1  # the forward's hop inputs, for backward
        loss.backward()
        after = [s.ctl("status")["stats"] for s in servers]
        for b, a in zip(before, after):
            forwards, backwards = a["forwards"] - b["forwards"], a["backwards"] - b["backwards"]
            assert (forwards, backwards) == (1, 1), (forwards, backwards)  # two block forwards: pass + recompute
        assert inputs.grad is not None and inputs.grad.abs().sum() > 0
        status = gw.ctl("status")["gateway"]
        assert status["kept_passes"] == 0 and status["kept_bytes"] == 0
