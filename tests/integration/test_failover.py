"""Servers die, hang and vanish during generation; the tokens stay exactly those of Hugging Face.

The swarm has two servers for each third of the model (the route takes one, the other is the
spare) and a 2:4 span that exists only as two smaller servers, 2:3 and 3:4. Each test kills
the servers the live route uses at a chosen step, from inside generate() (a logits processor
runs between steps), and compares every token with HF's greedy generation."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import hf_reference
from helpers import reached_all, running_swarm, until
from transformers import LogitsProcessor, LogitsProcessorList

from libswarm import AutoDistributedModelForCausalLM, NoRouteError
from swarmd.peer.failpoints import SLOW_REPLAY_S

SPANS = ["0:2", "2:4", "4:6", "0:2", "2:4", "4:6", "2:3", "3:4"]
NEW_TOKENS = 32
GEN = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)


@pytest.fixture(scope="module")
def swarm(model_dirs):
    d = model_dirs("llama")
    with running_swarm(d, SPANS) as (servers, gw):
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        ids = torch.randint(3, 500, (1, 8), generator=torch.Generator().manual_seed(11))
        expected = hf_reference(d).generate(ids, **GEN)
        yield model, servers, gw, ids, expected


@pytest.fixture
def live(swarm):
    """Every server alive before each test (the previous test may have killed some)."""
    model, servers, gw, ids, expected = swarm
    seeds = [s.address for s in servers]
    for s in servers:
        if not s.alive:
            s.revive(seeds)
    return swarm


class At(LogitsProcessor):
    """Runs actions at given decode steps, between steps of a real generate() call."""

    def __init__(self, actions: dict[int, object]):
        self.actions, self.step = actions, 0

    def __call__(self, input_ids, scores):
        self.step += 1
        if self.step in self.actions:
            self.actions[self.step]()
        return scores


def serving(servers, session, first_block: int):
    """The daemon that serves the hop starting at first_block in the session's current route."""
    by_address = {s.address: s for s in servers}
    hop = next(h for h in session.route if h[1] == first_block)
    return by_address[hop[0]]


def generate_with(model, ids, actions, route_timeout_s=None):
    with model.inference_session(max_length=64, route_timeout_s=route_timeout_s) as sess:
        actions_now = {k: (lambda f=f: f(sess)) for k, f in actions.items()}
        out = model.generate(ids, logits_processor=LogitsProcessorList([At(actions_now)]), **GEN)
        return out, [tuple(h[1:]) for h in sess.route], [h[0] for h in sess.route]


def kill(servers, first_block, sig=signal.SIGKILL):
    def act(sess):
        victim = serving(servers, sess, first_block)
        victim.kill(sig)
        act.victims.append(victim)

    act.victims = []
    return act


@pytest.mark.parametrize("first_block", [0, 2, 4], ids=["first", "middle", "last"])
def test_kill_server_mid_generation_keeps_tokens(live, first_block):
    model, servers, gw, ids, expected = live
    step = random.Random(first_block).randint(3, NEW_TOKENS - 4)
    act = kill(servers, first_block)
    before = gw.ctl("status")["gateway"]["failovers"]
    out, spans, addresses = generate_with(model, ids, {step: act})
    assert torch.equal(out, expected)
    assert act.victims[0].address not in addresses
    assert spans[0][0] == 0 and spans[-1][1] == 6
    assert gw.ctl("status")["gateway"]["failovers"] == before + 1


def test_kill_a_server_mid_beam_search_replays_the_reordered_history(live):
    """Beam search reorders the servers' caches at every step; the replacement's cache is
    rebuilt from the gateway's history, reordered the same way."""
    model, servers, gw, ids, _ = live
    opts = dict(num_beams=3, max_new_tokens=16, min_new_tokens=16, pad_token_id=0)
    expected = hf_reference(model.checkpoint.dir).generate(ids, **opts)
    victims = []

    def act() -> None:
        victims.append(serving(servers, model.active_session, 2))
        victims[0].kill()

    before = gw.ctl("status")["gateway"]["failovers"]
    out = model.generate(ids, logits_processor=LogitsProcessorList([At({9: act})]), **opts)
    assert victims and torch.equal(out, expected)
    assert gw.ctl("status")["gateway"]["failovers"] == before + 1


def test_spare_covering_the_failed_blocks_as_two_smaller_spans(live):
    model, servers, gw, ids, expected = live

    def kill_both_2_4(sess):
        for s in servers:
            if SPANS[servers.index(s)] == "2:4":
                s.kill()

    out, spans, _ = generate_with(model, ids, {9: kill_both_2_4})
    assert torch.equal(out, expected)
    assert spans == [(0, 2), (2, 3), (3, 4), (4, 6)]


def test_two_failures_in_one_generation(live):
    model, servers, gw, ids, expected = live
    out, _, addresses = generate_with(model, ids, {5: kill(servers, 0), 17: kill(servers, 4)})
    assert torch.equal(out, expected)


def test_failure_during_prefill(live):
    model, servers, gw, ids, expected = live
    original = model.client.step_with_info
    victims = []

    def step_after_killing(session_id, *args, **kwargs):
        if not victims:  # the session is open, its route known, the prefill not yet sent
            sess = model.active_session
            victims.append(serving(servers, sess, 2))
            victims[0].kill()
        return original(session_id, *args, **kwargs)

    model.client.step_with_info = step_after_killing
    try:
        out, _, addresses = generate_with(model, ids, {})
    finally:
        model.client.step_with_info = original
    assert torch.equal(out, expected)
    assert victims[0].address not in addresses


def test_sigstopped_server_is_detected_and_routed_around(live):
    model, servers, gw, ids, expected = live
    act = kill(servers, 2, signal.SIGSTOP)
    t0 = time.monotonic()
    out, _, addresses = generate_with(model, ids, {12: act})
    elapsed = time.monotonic() - t0
    act.victims[0].kill(signal.SIGCONT)
    act.victims[0].kill()  # its stale session would linger until its idle timeout; start afresh
    assert torch.equal(out, expected)
    assert act.victims[0].address not in addresses
    assert elapsed < 15, f"a hung server took {elapsed:.1f} s to route around"


def test_a_server_never_measured_that_hangs_is_given_up_on_by_its_claimed_speed(model_dirs):
    """A server this gateway has not measured yet is given what its record claims (10 times,
    plus 10 s for one-time costs), not a flat 30 s: one that claims to be fast and stalls its
    first step is routed around within seconds, and the tokens stay HF's."""
    d = model_dirs("llama")
    ids = torch.randint(3, 500, (1, 8), generator=torch.Generator().manual_seed(15))
    expected = hf_reference(d).generate(ids, **GEN)
    # s0 claims 0.1 ms a block, so the route takes it; it never answers a step
    with running_swarm(d, ["0:6", "0:6"], speeds={0: 0.0001, 1: 0.01},
                       env={0: {"SWARMD_FAILPOINTS": "hang_steps"}}) as (servers, gw):
        reached_all(gw, servers)
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        t0 = time.monotonic()
        with model.inference_session(max_length=64) as sess:
            out = model.generate(ids, **GEN)
            route = [h[0] for h in sess.route]
        elapsed = time.monotonic() - t0
        servers[0].kill()  # its serving thread is stuck: no drain
        assert torch.equal(out, expected)
        assert route == [servers[1].address]
        assert gw.ctl("status")["gateway"]["failovers"] >= 1
        assert elapsed < 22, f"an unmeasured hung server took {elapsed:.1f} s to route around"


def test_a_server_much_slower_than_it_claims_loses_the_next_routes_to_one_that_keeps_its_word(model_dirs):
    """Routes follow what the gateway measured, not what a record claims, once a server proves
    much slower than it says (a lying server, or one whose device is now shared: a record's
    speed is measured once)."""
    d = model_dirs("llama")
    ids = torch.randint(3, 500, (1, 8), generator=torch.Generator().manual_seed(16))
    kw = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    expected = hf_reference(d).generate(ids, **kw)
    # s0 claims 0.1 ms a block and computes every step 0.3 s slower; s1 claims 10 ms a block
    with running_swarm(d, ["0:6", "0:6"], speeds={0: 0.0001, 1: 0.01},
                       env={0: {"SWARMD_FAILPOINTS": "slow_steps"}}) as (servers, gw):
        reached_all(gw, servers)
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        routes = []
        for _ in range(2):
            with model.inference_session(max_length=32) as sess:
                assert torch.equal(model.generate(ids, **kw), expected)
                routes.append([h[0] for h in sess.route])
            # s0 runs decode steps on its network thread, so pings sent meanwhile measured its
            # round trip long: wait for one sent since, so that the route is not decided by that
            until(lambda: next(p["rtt_ms"] for p in gw.ctl("peers")["peers"] if p["address"] == servers[0].address)
                  < 30, 20, "a round trip to s0 measured while it is idle")
        assert routes == [[servers[0].address], [servers[1].address]]
        assert gw.ctl("status")["gateway"]["failovers"] == 0  # slow, not failed
        # the operator sees why: swarmctl peers on the gateway
        rows = {p["address"]: p for p in gw.ctl("peers")["peers"]}
        slow, kept = rows[servers[0].address], rows[servers[1].address]
        assert slow["step_ms"] >= 150 and "slower than it claims" in slow["error"], slow
        assert kept["step_ms"] is not None and not kept["error"], kept


def test_failed_over_session_frees_caches_on_surviving_servers_at_close(live):
    model, servers, gw, ids, expected = live
    act = kill(servers, 4)
    out, _, _ = generate_with(model, ids, {6: act})
    assert torch.equal(out, expected)
    # a spot check (swarm.verify: sample) runs off the step's path and holds its own sessions on
    # other servers while it runs, after the app's close too (up to MAX_QUEUED_CHECKS wait their
    # turn, seconds each on a loaded machine): once none is pending, every session is freed within
    # seconds, never left for the idle timeout
    until(lambda: gw.ctl("status")["gateway"]["verify"]["pending"] == 0, 120, "the spot checks to end")
    for s in servers:
        if s.alive:
            def freed(s=s) -> bool:
                status = s.ctl("status")
                return status["sessions"]["server"] == 0 and status["cache"]["used_bytes"] == 0
            until(freed, 10, f"{s.name} to free every session")


def test_replacement_that_dies_during_replay_is_replaced_too(model_dirs):
    d = model_dirs("llama")
    ids = torch.randint(3, 500, (1, 8), generator=torch.Generator().manual_seed(12))
    expected = hf_reference(d).generate(ids, **GEN)
    # "dying" and s2 are spares for 3:6; dying is much faster, so it is chosen first, and it
    # exits when asked to replay. It starts only after the session is open, so the route
    # does not take it at first.
    with running_swarm(d, ["0:3", "3:6", "3:6"], speeds={2: 0.05}) as (servers, gw):
        from localswarm import Daemon

        dying = Daemon(os.path.dirname(gw.dir), "dying", d, "3:6", None, {"SWARMD_FAILPOINTS": "exit_on_replay"})
        dying.seed_speed(0.0001)
        gw.cfg["discovery"]["seeds"].append(dying.address)
        gw.stop()
        gw.start(gw.cfg["discovery"]["seeds"]).wait_ready()
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        victims = []

        def start_spare_then_kill(sess):
            dying.start([x.address for x in servers]).wait_ready()
            deadline = time.time() + 15
            while time.time() < deadline:
                peers = {p["address"]: p["state"] for p in gw.ctl("peers")["peers"]}
                if peers.get(dying.address) == "online":
                    break
                time.sleep(0.3)
            victims.append(serving(servers, sess, 3))
            victims[0].kill()

        try:
            out, _, final = generate_with(model, ids, {7: start_spare_then_kill})
        finally:
            dying.stop()
        assert torch.equal(out, expected)
        assert dying.proc.returncode == 3  # it did die during its replay
        survivor = next(s for s in servers[1:] if s is not victims[0])
        assert final == [servers[0].address, survivor.address]


def test_a_replacement_too_slow_to_replay_is_replaced_and_its_session_there_closed(model_dirs):
    """A replacement alive but too slow (its replay past the gateway's allowance) is given up on
    and replaced; the session it opened is closed once it answers, not left holding its cache
    until its idle timeout (10 minutes): the gateway closes failed servers' sessions from a
    thread of its own."""
    d = model_dirs("llama")
    ids = torch.randint(3, 500, (1, 8), generator=torch.Generator().manual_seed(13))
    expected = hf_reference(d).generate(ids, **GEN)
    with running_swarm(d, ["0:3", "3:6", "3:6"], speeds={2: 0.05}) as (servers, gw):
        from localswarm import Daemon

        slow = Daemon(os.path.dirname(gw.dir), "slow", d, "3:6", None, {"SWARMD_FAILPOINTS": "slow_replay"})
        slow.seed_speed(0.0001)  # chosen first, as the fastest
        gw.cfg["discovery"]["seeds"].append(slow.address)
        gw.stop()
        gw.start(gw.cfg["discovery"]["seeds"]).wait_ready()
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)

        def start_spare_then_kill(sess):
            slow.start([x.address for x in servers]).wait_ready()
            until(lambda: {p["address"]: p["state"] for p in gw.ctl("peers")["peers"]}.get(slow.address) == "online",
                  15, "the slow spare online")
            serving(servers, sess, 3).kill()

        try:
            out, _, final = generate_with(model, ids, {7: start_spare_then_kill})
            assert torch.equal(out, expected)
            assert slow.address not in final
            assert slow.ctl("status")["stats"]["sessions_opened"] == 1  # it opened the replacement's session
            status = {}

            def closed() -> bool:
                status.update(slow.ctl("status"))
                return status["sessions"]["server"] == 0 and status["cache"]["used_bytes"] == 0
            until(closed, SLOW_REPLAY_S + 10, "the slow spare's session to be closed")
        finally:
            slow.stop()


def test_no_spare_gives_a_clear_error_within_the_callers_deadline(model_dirs):
    d = model_dirs("llama")
    ids = torch.randint(3, 500, (1, 8), generator=torch.Generator().manual_seed(13))
    with running_swarm(d, ["0:3", "3:6"]) as (servers, gw):
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        t = {}

        def kill_last(sess):
            servers[1].kill()
            t["killed"] = time.monotonic()

        with pytest.raises(NoRouteError, match=r"no server covers blocks 3:6 of model llama-"):
            generate_with(model, ids, {4: kill_last}, route_timeout_s=3)
        waited = time.monotonic() - t["killed"]
        assert 2.5 <= waited <= 10, waited
        assert servers[0].ctl("status")["state"] == "online"  # the rest of the swarm is unharmed


CLIENT = """
import sys, time, torch
from libswarm import SwarmClient
c = SwarmClient(socket=sys.argv[1])
mid = c.model_info()["model_id"]
s = c.open_session(mid, 32, 1)["session"]
c.step(s, torch.zeros(1, 4, 64))
print("stepped", flush=True)
time.sleep(600)
"""


def test_client_killed_mid_session_frees_server_caches_after_idle_timeout(model_dirs):
    d = model_dirs("llama")
    extra = {"serve": {"session_idle_timeout_s": 3}}
    with running_swarm(d, ["0:3", "3:6"], extra=extra) as (servers, gw):
        app = subprocess.Popen([sys.executable, "-c", CLIENT, gw.socket], stdout=subprocess.PIPE, text=True)
        assert app.stdout.readline().strip() == "stepped"
        assert [s.ctl("status")["sessions"]["server"] for s in servers] == [1, 1]
        app.kill()
        app.wait()
        deadline = time.time() + 15
        while time.time() < deadline:
            if all(s.ctl("status")["cache"]["used_bytes"] == 0 for s in servers):
                break
            time.sleep(0.5)
        assert [s.ctl("status")["sessions"]["server"] for s in servers] == [0, 0]
        assert all(s.ctl("status")["cache"]["used_bytes"] == 0 for s in servers)


@torch.no_grad()
def test_failed_step_can_be_retried_once_a_server_returns(model_dirs):
    """A step that failed for want of servers leaves the session consistent: once a server for
    the missing blocks appears, the same step succeeds and the logits are HF's."""
    d = model_dirs("llama")
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(14))
    full = hf_reference(d)(ids).logits
    with running_swarm(d, ["0:3", "3:6"]) as (servers, gw):
        from localswarm import Daemon

        spare = Daemon(os.path.dirname(gw.dir), "spare", d, "3:6")
        gw.cfg["discovery"]["seeds"].append(spare.address)
        gw.stop()
        gw.start(gw.cfg["discovery"]["seeds"]).wait_ready()
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        try:
            with model.inference_session(max_length=16, route_timeout_s=2):
                first = model(ids[:, :8]).logits
                servers[1].kill()
                with pytest.raises(NoRouteError, match="blocks 3:6"):
                    model(ids[:, 8:9])
                spare.start([s.address for s in servers]).wait_ready()
                rest = [model(ids[:, 8:9]).logits, model(ids[:, 9:12]).logits]
        finally:
            spare.stop()
    assert (torch.cat([first, *rest], 1) - full).abs().max().item() <= 1e-4
