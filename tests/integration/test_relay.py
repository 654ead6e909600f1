"""A server that accepts no connections serves through relays (docs/operations.md, Ports).

On loopback, the unreachable server listens on 127.0.0.1 but announces 127.0.0.2, where
nothing listens: every connection to it is refused, as by a firewall, while its own
connections out work. Two relays serve the first blocks; a gateway-only daemon generates.
(tests/integration/test_netns.py has the same across network namespaces, with a firewall.)"""

import contextlib
import os
import signal
import threading

import pytest
import torch
import zmq
from conftest import decisive_prompts, hf_reference
from helpers import Daemon, curve_dealer, until
from test_failover import At

from libswarm import AutoDistributedModelForCausalLM
from libswarm.protocol import decode, encode
from swarmd.identity import NodeIdentity, short_id
from swarmd.transport.relay import Sealer, sealed_bytes, sealed_message

NEW_TOKENS = 16
GEN = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
LIMIT_S = 60.0


def peer_row(d: Daemon, node_id: str) -> dict | None:
    return next((p for p in d.ctl("peers")["peers"] if p["node_id"] == node_id), None)


def relayed_through(gw: Daemon, n: Daemon) -> str | None:
    """The relay's address in the gateway's address for `n`, once it routes there through one."""
    row = peer_row(gw, n.node_id)
    if row is None or not row["address"].startswith("relay+") or row["state"] != "online":
        return None
    return row["address"][len("relay+"):-41]


class Squatters:
    """Keys that register with a relay and renew twice a second, serving nothing: Sybils
    holding its slots before a server that needs one comes."""

    def __init__(self, relay: Daemon, count: int):
        self.relay, self.count = relay, count
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        socks = [curve_dealer(self.relay.address, self.relay.node_id) for _ in range(self.count)]
        try:
            while not self.stop.wait(0.5):
                for s in socks:
                    with contextlib.suppress(zmq.Again):
                        s.send_multipart(encode("relay_register", 1), zmq.NOBLOCK)
                    while s.poll(0):
                        s.recv_multipart()
        finally:
            for s in socks:
                s.close(0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def relayed_for(relay: Daemon) -> list[str]:
    return relay.ctl("status")["network"]["relay"]["servers"]


@pytest.fixture(scope="module")
def relayed_swarm(model_dirs, tmp_path_factory):
    d = model_dirs("llama", layers=4)
    tmp_path = tmp_path_factory.mktemp("relay")
    # each relays for at most two servers: on r1, the server and one more the refusal test
    # registers; r2's two are squatted before the server comes
    relays = [Daemon(str(tmp_path), f"r{k}", d, "0:2", {"network": {"relay": True, "relay_max_servers": 2}})
              .seed_speed(0.002) for k in (1, 2)]
    # a session the gateway abandoned through the killed relay stays open here until it idles out:
    # not worth waiting for at the end
    n = Daemon(str(tmp_path), "n", d, "2:4", {"serve": {"drain_timeout_s": 1}}).seed_speed(0.002)
    n.cfg["network"]["announce"] = [n.address.replace("127.0.0.1", "127.0.0.2")]
    gw = Daemon(str(tmp_path), "gw", d, "none")
    everyone = [*relays, n, gw]
    squatters = None
    try:
        for r in relays:
            r.start([x.address for x in relays])
        for r in relays:
            r.wait_ready()
        squatters = Squatters(relays[1], 2)
        until(lambda: len(relayed_for(relays[1])) == 2, LIMIT_S, "the squatters to hold r2's slots")
        n.start([r.address for r in relays])
        gw.start([r.address for r in relays])
        for x in everyone:
            x.wait_ready()
        until(lambda: len(n.ctl("status")["network"]["via"]) == 2, LIMIT_S, "the server to be relayed by both")
        until(lambda: relayed_through(gw, n), LIMIT_S, "the gateway to reach the server through a relay")
        yield d, relays, n, gw
    finally:
        if squatters is not None:
            squatters.close()
        for x in everyone:
            x.terminate()
        for x in everyone:
            x.stop()


def test_keys_squatting_a_relay_before_the_server_came_gave_it_a_slot(relayed_swarm):
    """r2's two slots were held by keys that only register (Sybils): the server, whose signed
    record says it needs a relay, took one of them; the squatter it displaced is refused since,
    and the other stays (it displaced nobody)."""
    d, relays, n, gw = relayed_swarm
    relay = relays[1].ctl("status")["network"]["relay"]
    assert short_id(n.node_id) in relay["servers"] and len(relay["servers"]) == 2
    assert relay["evicted"] >= 1 and relay["refused"] >= 1


def test_relay_forwards_only_sealed_messages_and_refuses_the_rest(relayed_swarm):
    """A peer's own seal goes through and is answered; the same bytes again (a replay), one
    altered byte (a relay tampering), or messages for nobody it relays are refused, and the
    swarm serves on."""
    d, relays, n, gw = relayed_swarm
    r = relays[0]
    me = NodeIdentity(os.urandom(32))
    sealer = Sealer(me)
    s = curve_dealer(r.address, r.node_id, me)
    try:
        def ask(frames, wait_ms=5000):
            s.send_multipart(frames)
            if not s.poll(wait_ms):
                return None
            return decode(s.recv_multipart())

        sealed = sealer.seal(n.node_id, encode("ping", 7, {}))
        reply = ask(sealed_message("relay", 1, {"to": n.node_id}, sealed))
        assert reply.type == "relay" and reply.get("from") == n.node_id
        inner = decode(sealer.open(n.node_id, sealed_bytes(reply)))
        assert inner.type == "ok" and inner.id == 7
        assert ask(sealed_message("relay", 2, {"to": n.node_id}, sealed), 1000) is None  # a replay: dropped
        tampered = bytearray(sealed)
        tampered[-1] ^= 1
        assert ask(sealed_message("relay", 3, {"to": n.node_id}, bytes(tampered)), 1000) is None
        reply = ask(encode("relay", 4, {"to": gw.node_id}, {"sealed": torch.zeros(64, dtype=torch.uint8)}))
        assert reply.type == "error" and reply.get("code") == "unavailable" and "not relayed here" in \
            reply.get("message")
        reply = ask(encode("relay", 5, {"to": n.node_id}))
        assert reply.type == "error" and reply.get("code") == "tensor"
        reply = ask(encode("relay", 6, {"to": "not a key"}, {"sealed": torch.zeros(8, dtype=torch.uint8)}))
        assert reply.type == "error" and reply.get("code") == "protocol"
        # a reachability check calls back only the host that asks, at a tcp address
        reply = ask(encode("reach", 7, {"address": "tcp://10.9.9.9:31330", "nonce": "n"}))
        assert reply.type == "ok" and reply.get("calling") is False and "10.9.9.9" in reply.get("why")
        reply = ask(encode("reach", 8, {"address": "udp://127.0.0.1:1", "nonce": "n"}))
        assert reply.type == "error" and reply.get("code") == "protocol"
        # the relay takes a second server to relay for, and refuses a third (network.relay_max_servers)
        assert ask(encode("relay_register", 9)).type == "ok"
        third = curve_dealer(r.address, r.node_id)
        try:
            third.send_multipart(encode("relay_register", 10))
            assert third.poll(5000)
            reply = decode(third.recv_multipart())
            assert reply.type == "error" and reply.get("code") == "limit" and "relay_max_servers" in \
                reply.get("message")
        finally:
            third.close(0)
    finally:
        s.close(0)
    log = n.tail(50000)
    assert "was received before (a replay)" in log and "fails authentication" in log
    ids = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(6))
    model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
    assert torch.equal(model.generate(ids, **GEN), hf_reference(d).generate(ids, **GEN))


def test_concurrent_sessions_through_a_relayed_server_get_their_own_answers(relayed_swarm):
    """Each thread's pool has its own connection under the gateway's one key, with request ids
    that overlap: every answer must reach the connection that asked (no waits, no failovers)."""
    from concurrent.futures import ThreadPoolExecutor

    d, relays, n, gw = relayed_swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
    hf = hf_reference(d)
    prompts = decisive_prompts(hf, [6] * 3, GEN, first_seed=40)
    expected = [hf.generate(p, **GEN) for p in prompts]
    failovers = gw.ctl("status")["gateway"]["failovers"]
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda p: model.generate(p, **GEN), prompts))
    assert all(torch.equal(o, e) for o, e in zip(outs, expected))
    assert gw.ctl("status")["gateway"]["failovers"] == failovers


def test_unreachable_server_serves_through_relays_and_survives_losing_one(relayed_swarm):
    d, relays, n, gw = relayed_swarm
    net = n.ctl("status")["network"]
    assert net["reachable"] == "no"
    assert {v["node_id"] for v in net["via"]} == {r.node_id for r in relays}
    row = peer_row(gw, n.node_id)
    assert row["reachable"] == "no" and len(row["via"]) == 2
    assert all(peer_row(gw, r.node_id)["reachable"] == "yes" for r in relays)

    model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
    ids = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(5))
    expected = hf_reference(d).generate(ids, **GEN)
    assert torch.equal(model.generate(ids, **GEN), expected)
    assert n.ctl("status")["stats"]["steps"] > 0

    # the relay the gateway reaches the server through dies mid-generation: the session moves
    # (to the other relay, once the server names only that one) by replay; tokens unchanged
    killed = []

    def kill_relay():
        address = relayed_through(gw, n)
        victim = next(r for r in relays if r.address == address)
        victim.kill(signal.SIGKILL)
        killed.append(victim)

    failovers = gw.ctl("status")["gateway"]["failovers"]
    with model.inference_session(max_length=64, route_timeout_s=LIMIT_S):
        out = model.generate(ids, logits_processor=[At({5: kill_relay})], **GEN)
    assert killed and torch.equal(out, expected)
    assert gw.ctl("status")["gateway"]["failovers"] > failovers
    survivor = next(r for r in relays if r is not killed[0])
    assert [v["node_id"] for v in n.ctl("status")["network"]["via"]] == [survivor.node_id]
    assert relayed_through(gw, n) == survivor.address
