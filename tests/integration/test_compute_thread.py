"""The peer plane keeps liveness and decode steps off long compute, and training does not run
blocks forward more than it must.

One server (0:6) makes every forward pass take 3 s longer (failpoint slow_forward: a long
prefill, a large training batch, a slow GPU); a second one (0:3) and the gateway watch it."""

import threading
import time

import pytest
import torch
from helpers import running_swarm, until

from libswarm import SwarmClient
from libswarm.errors import ProtocolError, SessionError

SLOW_FORWARD_S = 3.0


@pytest.fixture(scope="module")
def slow_swarm(model_dirs):
    d = model_dirs("llama")
    with running_swarm(d, ["0:6", "0:3"], env={0: {"SWARMD_FAILPOINTS": "slow_forward"}},
                       server_extra={0: {"serve": {"limits": {"queued_per_key": 2}}}}) as (servers, gw):
        yield servers, gw


def test_a_long_forward_neither_marks_its_server_unreachable_nor_holds_up_decode_steps(slow_swarm):
    servers, gw = slow_swarm
    slow, watcher = servers
    client = SwarmClient(gw.socket)
    info = client.model_info()
    model_id, hidden_size = info["model_id"], info["hidden_size"]
    sess = client.open_session(model_id, max_length=512, batch=1)
    # the slow server holds blocks 3:6 alone, so every step goes through it (the route may take
    # 0:3 from either server: which is cheaper depends on their speeds as measured at start)
    assert sess["route"][-1][0] == slow.address, sess["route"]
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

    print(f"{len(step_s)} decode steps during two {SLOW_FORWARD_S:.0f} s passes: median "
          f"{sorted(step_s)[len(step_s) // 2] * 1000:.1f} ms, slowest {max(step_s) * 1000:.1f} ms")
    assert len(done) == 2 and max(done) >= 2 * SLOW_FORWARD_S  # the passes really ran, one after the other
    assert len(step_s) >= 10
    # a step waits for no pass (the old single thread made each wait up to 6 s)
    assert max(step_s) < 1.0, step_s
    # and the server answered gossip and pings all along: nobody stopped routing to it
    assert states == {"online"}, states
    status = gw.ctl("status")
    assert status["gateway"]["failovers"] == 0 and status["gateway"]["banned"] == []
    client.close_session(sess["session"])


def test_a_key_queueing_passes_delays_another_keys_pass_by_one_and_is_refused_beyond_its_queue(slow_swarm):
    """Key a sends four passes of 3 s: one runs, two wait, the fourth is refused (its queue
    holds 2 here). Key b's pass, sent next, runs after a's second, before a's third: keys take
    turns (first come first served, b would wait for all of a's)."""
    from helpers import curve_dealer

    from libswarm.protocol import decode, encode

    servers, gw = slow_swarm
    slow = servers[0]
    info = SwarmClient(gw.socket).model_info()
    fields = {"model_id": info["model_id"], "blocks": [0, 6]}
    x = torch.randn(1, 4, info["hidden_size"])
    a, b = curve_dealer(slow.address, slow.node_id), curve_dealer(slow.address, slow.node_id)
    arrived: dict[tuple[str, int], float] = {}

    def wait_for(name: str, req_id: int):
        while (name, req_id) not in arrived:
            for s, n in ((a, "a"), (b, "b")):
                if s.poll(10):
                    reply = decode(s.recv_multipart())
                    arrived[(n, reply.id)] = time.monotonic()
                    replies[(n, reply.id)] = reply
            assert time.monotonic() - t0 < 60, f"no answer to {name}{req_id}"

    replies: dict = {}
    t0 = time.monotonic()
    try:
        a.send_multipart(encode("forward", 1, fields, {"hidden": x}))
        a.send_multipart(encode("ping", 100))
        wait_for("a", 100)  # handled in order: the first pass is with the compute thread by now...
        watch = SwarmClient(slow.socket)  # in-process: a swarmctl run could outlast the pass under load
        until(lambda: watch.status()["stats"]["queued"] == 0, 10, "a's first pass to start")  # ...and runs
        for req_id in (2, 3, 4):
            a.send_multipart(encode("forward", req_id, fields, {"hidden": x}))
        wait_for("a", 4)
        refused = replies[("a", 4)]
        assert refused.type == "error" and refused.get("code") == "limit", refused.fields
        assert "queued_per_key" in refused.get("message")
        b.send_multipart(encode("forward", 1, fields, {"hidden": x}))  # while a's first still runs
        assert watch.status()["stats"]["limited"] >= 1  # counted for the operator
        wait_for("a", 3)
        wait_for("b", 1)
    finally:
        a.close()
        b.close()
    assert all(replies[("a", i)].type == "ok" for i in (1, 2, 3)) and replies[("b", 1)].type == "ok"
    order = [k for k in sorted(arrived, key=arrived.get) if k != ("a", 100)]
    assert order == [("a", 4), ("a", 1), ("a", 2), ("b", 1), ("a", 3)], order


def test_a_training_step_runs_each_block_forward_once_and_frees_what_it_kept(model_dirs):
    """forward + loss.backward() through three servers: each server computes its blocks in the
    forward pass and keeps their activations, and its backward differentiates those (no forward
    again). The hop inputs the gateway kept, and the activations the servers kept, are gone once
    it is done."""
    from libswarm import AutoDistributedModelForCausalLM

    d = model_dirs("llama")
    with running_swarm(d, ["0:2", "2:4", "4:6"]) as (servers, gw):
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        embeddings = model.get_input_embeddings()
        ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(5))  # one part: never split
        inputs = embeddings(ids).detach().requires_grad_(True)
        before = [s.ctl("status") for s in servers]
        whole = []  # backwards that sent their inputs again
        real_backward = model.client.backward
        model.client.backward = lambda *a, **k: whole.append(1) or real_backward(*a, **k)
        loss = model(inputs_embeds=inputs, labels=ids).loss
        assert gw.ctl("status")["gateway"]["kept_passes"] == 1  # the forward's hop inputs, for backward
        assert all(s.ctl("status")["peer_plane"]["kept_passes"] == 1 for s in servers)  # and its activations
        loss.backward()
        after = [s.ctl("status") for s in servers]
        for b, a in zip(before, after):
            forwards = a["stats"]["forwards"] - b["stats"]["forwards"]
            backwards = a["stats"]["backwards"] - b["stats"]["backwards"]
            assert (forwards, backwards) == (1, 1), (forwards, backwards)
            kept, was = a["peer_plane"], b["peer_plane"]
            assert kept["kept_passes_used"] - was["kept_passes_used"] == 1  # differentiated, not run again
            assert a["stats"]["errors"] == b["stats"]["errors"]  # asked with the gradient alone (1.6), first time
            assert kept["kept_passes"] == 0 and kept["kept_passes_bytes"] == 0
        assert inputs.grad is not None and inputs.grad.abs().sum() > 0
        assert whole == []  # the app sent the gradient alone (1.6): the daemon had the rest
        status = gw.ctl("status")["gateway"]
        assert status["kept_passes"] == 0 and status["kept_bytes"] == 0

        # a pass id that is made up, of another type, huge, or kept for other inputs, and a `keep`
        # that is not `true`: the backward recomputes and is right, nothing is kept
        client = SwarmClient(gw.socket)
        info = client.model_info()
        h, h2, g = (torch.randn(1, 8, info["hidden_size"], generator=torch.Generator().manual_seed(i))
                    for i in range(3))
        want, _ = client.backward(info["model_id"], h2, g)
        _, fields = client.forward_with_info(info["model_id"], h, keep=True)
        for bad in ("made-up", 12, "x" * 60_000, fields["pass"]):
            got, _ = client.backward(info["model_id"], h2, g, pass_id=bad)
            assert torch.allclose(got, want, atol=1e-6), bad
        # the gradient alone (protocol 1.6): the kept pass's own inputs; once used, `session`
        want_h, _ = client.backward(info["model_id"], h, g)
        _, fields = client.forward_with_info(info["model_id"], h, keep=True)
        with pytest.raises(ProtocolError, match="grad_output must have the shape"):
            client.backward_kept(info["model_id"], g[:, :3], fields["pass"])
        _, fields = client.forward_with_info(info["model_id"], h, keep=True)
        got, _ = client.backward_kept(info["model_id"], g, fields["pass"])
        assert torch.allclose(got, want_h, atol=1e-6)
        with pytest.raises(SessionError, match="send the backward with its inputs"):
            client.backward_kept(info["model_id"], g, fields["pass"])
        with pytest.raises(ProtocolError, match="must name its kept pass"):
            client.request("backward", {"model_id": info["model_id"]}, {"grad_output": g})
        _, fields = client.forward_with_info(info["model_id"], h, keep=True)
        with pytest.raises(ProtocolError, match="grad_output alone, not position_ids"):
            client.request("backward", {"model_id": info["model_id"], "pass": fields["pass"]},
                           {"grad_output": g, "position_ids": torch.arange(8).expand(1, 8)})
        assert torch.allclose(client.backward_kept(info["model_id"], g, fields["pass"])[0], want_h, atol=1e-6)
        with pytest.raises(ProtocolError, match="header"):  # beyond the header's 64 KiB: refused at once
            client.backward(info["model_id"], h2, g, pass_id="x" * 70_000)
        reply = client.request("forward", {"model_id": info["model_id"], "keep": "yes"}, {"hidden": h})
        assert "pass" not in reply.fields and gw.ctl("status")["gateway"]["kept_passes"] == 0

        # a hop over 1 MiB travels in 1 MiB frames both ways (protocol 1.4), and computes the same
        from helpers import curve_dealer

        from libswarm.protocol import decode, encode

        hidden = torch.randn(64, 80, info["hidden_size"])  # over 1 MiB with the test model
        s = curve_dealer(servers[0].address, servers[0].node_id)
        replies = []
        try:
            for req_id, frame_bytes in ((1, 0), (2, 2**20)):
                s.send_multipart(encode("forward", req_id, {"model_id": info["model_id"], "blocks": [0, 2]},
                                        {"hidden": hidden}, frame_bytes=frame_bytes))
                assert s.poll(30_000)
                frames = s.recv_multipart()
                assert len(frames) > 2  # the reply's tensor came in several frames
                replies.append(decode(frames))
        finally:
            s.close()
        assert [r.type for r in replies] == ["ok", "ok"]
        assert torch.equal(replies[0].tensors["hidden"], replies[1].tensors["hidden"])
