"""Peers that lie, flood and poke at the peer plane: each attack is made against real daemons,
is refused or dropped, and the daemons go on serving everyone else with nothing held for it."""

import json
import os
import time

import pytest
import torch
from helpers import Peer, generate_equals_hf, rss_mib, running_swarm

from libswarm import AutoDistributedModelForCausalLM, SwarmClient, TensorError
from libswarm.protocol import decode, encode
from swarmd.identity import NodeIdentity

HIDDEN = 64


@pytest.fixture(scope="module")
def swarm(model_dirs):
    d = model_dirs("llama")
    with running_swarm(d, ["0:3", "3:6"]) as (servers, gw):
        yield d, servers, gw


def model_id(gw) -> str:
    return SwarmClient(socket=gw.socket).model_info()["model_id"]


def test_opens_naming_an_adapter_not_hosted_hold_no_cache(swarm):
    d, servers, gw = swarm
    peer = Peer(servers[0])
    try:
        for _ in range(20):
            reply = peer.open(servers[0], model_id(gw), adapter="nope")
            assert reply.type == "error" and reply.get("code") == "limit", reply.fields
    finally:
        peer.close()
    assert servers[0].ctl("status")["cache"]["used_bytes"] == 0
    generate_equals_hf(d, gw.socket)


def test_pushes_for_made_up_or_oversized_steps_pin_no_memory(swarm):
    d, servers, gw = swarm
    s0 = servers[0]
    rss_before = rss_mib(s0)
    peer = Peer(s0)
    try:
        own = peer.open(s0, model_id(gw)).get("session")
        big = torch.zeros(1, 65536, HIDDEN)  # 16 MiB: more positions than the session's 64
        for i in range(40):
            peer.send("push", {"session": f"made-up-{i}", "step": i}, {"hidden": big})
            peer.send("push", {"session": own, "step": i}, {"hidden": big})
        assert peer.request("ping").type == "ok"  # handled in order: every push is in by now
        status = s0.ctl("status")
    finally:
        peer.close()
    assert status["peer_plane"]["pushes_waiting"] == 0
    grown_mib = rss_mib(s0) - rss_before
    assert grown_mib < 200, f"the server grew {grown_mib:.0f} MiB from 1.25 GiB of refused pushes"
    generate_equals_hf(d, gw.socket)


def test_a_session_holds_one_step_waiting_for_its_push_and_none_once_closed(swarm):
    """Steps that wait for a push nobody sends, under made-up step numbers: each replaces the
    one before it (answered `session`), so that a key holds no more waiting steps than it has
    sessions; closing the session answers the last one. Before, a key could fill the server's
    4096 places in a second and every route through it waited on nothing."""
    d, servers, gw = swarm
    s0 = servers[0]
    peer = Peer(s0)
    try:
        sid = peer.open(s0, model_id(gw)).get("session")
        ids = [peer.send("step", {"session": sid, "step": step, "expect_push": True}) for step in range(50)]
        ping, answers = peer.send("ping"), {}
        while ping not in answers:  # handled in order: every step is in by then
            assert peer.sock.poll(15_000), f"{len(answers)} of 49 steps answered"
            reply = decode(peer.sock.recv_multipart())
            answers[reply.id] = reply
        del answers[ping]
        assert s0.ctl("status")["peer_plane"]["steps_waiting"] == 1
        assert set(answers) == set(ids[:49])
        assert all(r.type == "error" and r.get("code") == "session" and "superseded" in r.get("message")
                   for r in answers.values())
        close, answers = peer.send("close", {"session": sid}), {}
        while close not in answers:
            assert peer.sock.poll(15_000), "no answer to close"
            reply = decode(peer.sock.recv_multipart())
            answers[reply.id] = reply
        peer.sessions.remove(sid)
        assert answers[close].get("closed") is True
        last = answers[ids[49]]
        assert last.get("code") == "session" and "closed" in last.get("message")
        assert s0.ctl("status")["peer_plane"]["steps_waiting"] == 0
    finally:
        peer.close()
    generate_equals_hf(d, gw.socket)


def test_next_hop_must_be_a_known_peer_and_never_stalls_the_server(swarm):
    d, servers, gw = swarm
    s0 = servers[0]
    connections_before = s0.ctl("status")["peer_plane"]["push_connections"]  # to s1, for real routes
    peer = Peer(s0)
    try:
        sid = peer.open(s0, model_id(gw)).get("session")
        bogus = [("tcp://127.0.0.1:1", NodeIdentity(os.urandom(32)).public_key),
                 (f"ipc:///tmp/not-a-peer-{os.getpid()}", NodeIdentity(os.urandom(32)).public_key),
                 (servers[1].address, NodeIdentity(os.urandom(32)).public_key)]  # a real address, a wrong key
        t0 = time.monotonic()
        for step in range(30):
            address, key = bogus[step % 3]
            reply = peer.request("step", {"session": sid, "step": step,
                                          "next": {"address": address, "key": key, "session": "x"}},
                                 {"hidden": torch.zeros(1, 1, HIDDEN)})
            assert reply.type == "ok" and reply.get("pushed") is False, reply.fields
        elapsed = time.monotonic() - t0
        status = s0.ctl("status")
    finally:
        peer.close()
    assert elapsed < 5, f"30 steps naming bogus next hops took {elapsed:.1f} s"  # 0.3-0.5 s each before
    assert status["peer_plane"]["push_connections"] == connections_before
    generate_equals_hf(d, gw.socket)


def test_a_session_answers_only_the_key_that_opened_it(swarm):
    d, servers, gw = swarm
    s0 = servers[0]
    owner, other = Peer(s0), Peer(s0)
    try:
        sid = owner.open(s0, model_id(gw)).get("session")
        x = {"hidden": torch.zeros(1, 1, HIDDEN)}
        stolen = other.request("step", {"session": sid, "step": 0}, x)
        assert stolen.type == "error" and stolen.get("code") == "session"
        assert other.request("close", {"session": sid}).get("closed") is False
        assert owner.request("step", {"session": sid, "step": 0}, x).get("position") == 1
        assert owner.request("close", {"session": sid}).get("closed") is True
    finally:
        owner.close()
        other.close()


def test_a_request_no_server_can_compute_goes_back_to_the_caller_and_bans_nobody(swarm):
    d, servers, gw = swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
    client = SwarmClient(socket=gw.socket)
    before = client.status()["gateway"]
    hidden = torch.randn(2, 5, HIDDEN)
    deep = torch.randn(6, 3, 2, HIDDEN)  # prompts for a batch of 3, hidden states for 2
    with pytest.raises(TensorError, match="deep_prompts"):
        client.forward(model.model_id, hidden, lora={"deep_prompts": deep}, lora_scaling=1.0)
    after = client.status()["gateway"]
    assert after["banned"] == [] and after["failovers"] == before["failovers"]
    generate_equals_hf(d, gw.socket)


def test_a_forward_whose_attention_would_not_fit_is_refused_before_allocating(swarm):
    """Attention memory grows with length squared, outside the KV cache: a forward of 16 x 8192
    positions would need ~17 GiB here. It is refused with a `limit` error and nothing is held."""
    d, servers, gw = swarm
    s0 = servers[0]
    rss_before = rss_mib(s0)
    peer = Peer(s0)
    try:
        for what, extra in (("forward", {}), ("backward", {"grad_output": torch.zeros(16, 8192, HIDDEN)})):
            reply = peer.request(what, {"model_id": model_id(gw), "blocks": [0, 3]},
                                 {"hidden": torch.zeros(16, 8192, HIDDEN), **extra})
            assert reply.type == "error" and reply.get("code") == "limit", reply.fields
            assert "attention memory" in reply.get("message")
    finally:
        peer.close()
    assert rss_mib(s0) - rss_before < 500
    assert s0.ctl("status")["cache"]["used_bytes"] == 0
    generate_equals_hf(d, gw.socket)


def test_one_key_cannot_take_the_whole_cache_or_the_serving_thread(swarm):
    """Sessions of one key stop at its share of the cache (half by default), while another key
    still opens; a flood of requests from one key gets `limit` answers beyond its rate while
    another key is answered."""
    d, servers, gw = swarm
    s0 = servers[0]
    greedy, other = Peer(s0), Peer(s0)
    try:
        big = {"max_length": 8192}  # 6 MiB each here: the 64 MiB budget's half holds 5
        replies = [greedy.open(s0, model_id(gw), **big) for _ in range(8)]
        codes = [r.get("code") if r.type == "error" else "ok" for r in replies]
        assert codes == ["ok"] * 5 + ["limit"] * 3, codes
        assert "cache_share_per_key" in replies[-1].get("message")
        assert other.open(s0, model_id(gw), **big).type == "ok"
        for r in replies[:5]:
            assert greedy.request("close", {"session": r.get("session")}).get("closed") is True
    finally:
        greedy.close()
        other.close()
    generate_equals_hf(d, gw.socket)


def test_a_flood_of_requests_from_one_key_is_refused_beyond_its_rate_and_others_are_served(model_dirs):
    d = model_dirs("llama")
    with running_swarm(d, ["0:3", "3:6"], extra={"serve": {"limits": {"requests_per_s_per_key": 50}}}) as (
            servers, gw):
        s0 = servers[0]
        flood, other = Peer(s0), Peer(s0)
        try:
            ids = [flood.send("ping") for _ in range(600)]  # the burst is 100, the rate 50 a second
            answers = {}
            while len(answers) < len(ids):
                assert flood.sock.poll(30_000)
                r = decode(flood.sock.recv_multipart())
                answers[r.id] = r.get("code") if r.type == "error" else r.type
            assert list(answers.values()).count("limit") > 300
            assert other.request("ping").type == "ok"
        finally:
            flood.close()
            other.close()
        generate_equals_hf(d, gw.socket)


def test_a_gossip_flood_from_one_key_is_refused_beyond_its_rate_and_others_are_gossiped_with(swarm):
    """Issue 38, finding 10. Gossip runs on the serving thread: one key asking for anti-entropy
    (`sums` of an empty table: every bucket differs) 200 times at once gets `limit` answers
    beyond 10 a second (bursts of 2 s), well inside the 5,000 requests a second any request
    may use; another key's gossip is answered meanwhile, and the server serves on."""
    d, servers, gw = swarm
    s0 = servers[0]
    flood, other = Peer(s0), Peer(s0)
    try:
        ids = [flood.send("gossip", {"news": [], "sums": "0" * 8 * 256}) for _ in range(200)]
        answers = {}
        while len(answers) < len(ids):
            assert flood.sock.poll(30_000), f"{len(answers)} of {len(ids)} gossip requests answered"
            r = decode(flood.sock.recv_multipart())
            answers[r.id] = r
        refused = [r for r in answers.values() if r.type == "error"]
        assert 150 <= len(refused) <= 200 - 20, len(refused)
        assert all(r.get("code") == "limit" and "too much gossip" in r.get("message") for r in refused)
        reply = other.request("gossip", {"news": [], "sums": "0" * 8 * 256})
        assert reply.type == "ok" and reply.get("table"), reply.fields  # the other servers' records
    finally:
        flood.close()
        other.close()
    generate_equals_hf(d, gw.socket)


def answer_pings(identities: list, stop) -> tuple[list[int], object]:
    """A peer plane for each identity (CURVE with its key) that answers every request with an
    empty `ok`: nodes that exist, as far as a daemon checking them can tell. Returns the ports
    and the thread serving them."""
    import threading

    import zmq

    ctx = zmq.Context.instance()
    socks, ports = [], []
    for ident in identities:
        s = ctx.socket(zmq.ROUTER)
        s.curve_server = True
        s.curve_secretkey = ident.secret_key.encode()
        s.curve_publickey = ident.public_key.encode()
        s.linger = 0
        ports.append(s.bind_to_random_port("tcp://127.0.0.1"))
        socks.append(s)

    def serve():
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        while not stop.is_set():
            for s, _ in poller.poll(100):
                frames = s.recv_multipart()
                try:
                    msg = decode(frames[1:])
                except Exception:
                    continue
                s.send_multipart([frames[0], *encode("ok", msg.id, {})])
        for s in socks:
            s.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return ports, thread


def test_eighty_big_records_re_signed_every_second_neither_flap_the_servers_nor_get_lost(model_dirs):
    """80 realistic records (a 40-block span's fingerprints, 32 round trips: ~1.7 KB each) of
    nodes that answer pings, re-signed every second as old daemons did, gossiped into one of
    two real servers for 20 s and on until all 80 reach the other one (before, a pull reply of
    them all passed the 64 KiB header limit and was refused): the two never see each other leave
    `online`. A daemon passes a record on only once it has reached its node (the 80 answer), and
    reaches at most PER_ORIGIN of a lone teller's nodes a round: 80 take 20 rounds, and b,
    told by a alone, follows a round or more behind, so the wait is bounded by the quota, with
    room for a loaded machine's slower rounds."""
    import threading

    from swarmd.discovery.first_contacts import PER_ORIGIN
    from swarmd.discovery.records import Record
    from swarmd.discovery.table import GOSSIP_INTERVAL_S

    d = model_dirs("llama")
    with running_swarm(d, ["0:3", "3:6"], gateway=False) as (servers, _):
        a, b = servers
        fakes = [NodeIdentity(os.urandom(32)) for _ in range(80)]
        stop = threading.Event()
        ports, responder = answer_pings(fakes, stop)

        def signed(i: int, seq: int) -> dict:
            ident = fakes[i]
            return Record(
                node_id=ident.public_key, sign_key=ident.sign_key, addresses=(f"tcp://127.0.0.1:{ports[i]}",),
                state="online", timestamp=time.time(), seq=seq, incarnation=1, model_id="another-model-0123456789",
                span=(0, 40), throughput=3.0, fingerprints=tuple(os.urandom(8).hex() for _ in range(40)),
                rtt_ms={os.urandom(4).hex(): 10.0 + k for k in range(32)}).sign(ident)

        assert len(json.dumps(signed(0, 1))) > 1500

        def flood():
            peer = Peer(a)
            try:
                seq = 0
                while not stop.is_set():
                    seq += 1
                    for k in range(0, 80, 8):
                        peer.request("gossip", {"records": [signed(i, seq) for i in range(k, k + 8)]})
                    stop.wait(1.0)
            finally:
                peer.close()

        # and 8 records of nodes that do not exist (nothing answers at their addresses)
        from helpers import free_port

        ghosts = [NodeIdentity(os.urandom(32)) for _ in range(8)]
        ghost_ports = [free_port() for _ in ghosts]
        peer = Peer(a)
        peer.request("gossip", {"records": [Record(
            node_id=g.public_key, sign_key=g.sign_key, addresses=(f"tcp://127.0.0.1:{port}",), state="online",
            timestamp=time.time(), seq=1, incarnation=1, model_id="another-model-0123456789", span=(0, 40),
            throughput=3.0).sign(g) for g, port in zip(ghosts, ghost_ports)]})
        peer.close()
        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        states = []
        fake_ids = {f.public_key for f in fakes}
        rounds = len(fakes) / PER_ORIGIN  # on a, then as many on b, overlapping
        try:
            t0 = time.monotonic()
            while True:
                a_sees = {p["node_id"]: p["state"] for p in a.ctl("peers")["peers"]}
                b_peers = b.ctl("peers")["peers"]
                b_sees = {p["node_id"]: p["state"] for p in b_peers}
                b_holds = {p["node_id"] for p in b_peers}
                states.append((a_sees.get(b.node_id), b_sees.get(a.node_id)))
                waited = time.monotonic() - t0
                if waited >= 20 and (fake_ids <= b_holds or waited > 2 * rounds * GOSSIP_INTERVAL_S + 10):
                    break
                time.sleep(1.0)
        finally:
            stop.set()
            flooder.join(10)
            responder.join(5)
        assert all(s == ("online", "online") for s in states), states
        on_b = fake_ids & b_holds
        assert len(on_b) == 80, f"only {len(on_b)} of the 80 records reached the other server in {waited:.0f} s"
        assert not b_holds & {g.public_key for g in ghosts}, "records of nodes nobody can reach were passed on"
        assert all(a_sees.get(g.public_key) in (None, "unreachable", "dead") for g in ghosts)
        generate_equals_hf(d, a.socket)  # a serves as the gateway too: the route over both still works


def test_requests_quoting_huge_text_or_with_fields_of_the_wrong_type_get_short_errors(swarm):
    """An error quoting a peer's 64 KiB of text (an unknown type, a model id) is cut short, so
    its reply fits: once it did not, and the exception killed the serving thread and the
    daemon. Fields of the wrong type and impossible deadlines are `protocol` errors naming
    them, with no traceback logged; the server goes on serving."""
    d, servers, gw = swarm
    s0 = servers[0]
    tracebacks = s0.tail(10**7).count("Traceback")
    peer = Peer(s0)
    try:
        def raw(header: bytes, req_id: int):
            peer.sock.send_multipart([header])
            while True:
                assert peer.sock.poll(15_000), f"no answer to request {req_id}"
                reply = decode(peer.sock.recv_multipart())
                if reply.id == req_id:
                    return reply

        emoji = "\U0001F600" * 16000  # 64 KB as UTF-8; escaped in a JSON reply, three times that
        header = json.dumps({"v": "1.4", "type": emoji, "id": 7}, ensure_ascii=False).encode()
        assert len(header) <= 64 * 1024
        reply = raw(header, 7)
        assert reply.get("code") == "protocol" and "unknown message type" in reply.get("message")
        assert len(reply.get("message")) <= 1000
        reply = peer.open(s0, emoji[:5000])  # 60 KB once escaped
        assert reply.get("code") == "wrong_model" and len(reply.get("message")) <= 1000

        sid = peer.open(s0, model_id(gw)).get("session")
        cases = [("step", {"session": sid, "step": [0], "expect_push": True}, "field 'step' must be int"),
                 ("open", {"model_id": model_id(gw), "blocks": [0, 3], "max_length": 8, "batch": 1, "adapter": []},
                  "field 'adapter' must be str"),
                 ("step", {"session": sid, "next": "tcp://127.0.0.1:1"}, "field 'next' must be dict")]
        hidden = {"hidden": torch.zeros(1, 1, HIDDEN)}
        for msg_type, fields, needle in cases:
            reply = peer.request(msg_type, fields, hidden if msg_type == "step" else None)
            assert reply.get("code") == "protocol" and needle in reply.get("message"), reply.fields
        for i, deadline in enumerate((b"NaN", b"Infinity", b"1" + b"0" * 400, b"true")):
            reply = raw(b'{"v":"1.4","type":"ping","id":%d,"deadline":%s}' % (20 + i, deadline), 20 + i)
            assert reply.get("code") == "protocol" and "'deadline' must be a finite number" in reply.get("message")
        assert peer.request("ping").type == "ok"
    finally:
        peer.close()
    assert s0.alive and s0.tail(10**7).count("Traceback") == tracebacks
    generate_equals_hf(d, gw.socket)
