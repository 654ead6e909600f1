"""Cache accounting, and every kind of bad input: each gets a one-line error naming the problem,
and the daemons go on serving everyone else."""

import os
import subprocess

import pytest
import torch
import yaml
import zmq
from conftest import hf_reference
from helpers import SWARMCTL, SWARMD, Peer, curve_dealer, running_swarm

from libswarm import (
    AutoDistributedModelForCausalLM,
    CacheFullError,
    LimitError,
    ProtocolError,
    SessionError,
    SwarmClient,
    TensorError,
    WrongModelError,
)
from libswarm.protocol import decode, encode

HIDDEN = 64


@pytest.fixture(scope="module")
def swarm(model_dirs):
    d = model_dirs("llama")
    with running_swarm(d, ["0:3", "3:6"]) as (servers, gw):
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        yield d, model, servers, gw


def still_generates(model, d):
    ids = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(9))
    ref = hf_reference(d)
    kw = dict(do_sample=False, max_new_tokens=4, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


def raw_request(address: str, frames: list, server_key: str | None = None) -> dict:
    """Send raw frames to a daemon (its peer plane over CURVE when `server_key` is given) and
    return the decoded reply header fields."""
    if server_key is not None:
        s = curve_dealer(address, server_key)
    else:
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(address)
    try:
        s.send_multipart(frames)
        assert s.poll(10_000), "daemon did not answer"
        reply = decode(s.recv_multipart())
        return {"type": reply.type, **reply.fields}
    finally:
        s.close()


def test_cache_free_drops_by_the_allocation_and_returns_on_close(swarm):
    d, model, servers, gw = swarm
    s0 = servers[0]
    before = s0.ctl("status")["cache"]
    client = SwarmClient(socket=gw.socket)
    opened = client.open_session(model.model_id, max_length=100, batch=2)
    during = s0.ctl("status")["cache"]
    # 3 blocks x K and V x batch 2 x 2 kv heads x 100 positions x head_dim 16 x 4 bytes
    expected = 3 * 2 * 2 * 2 * 100 * 16 * 4
    assert before["free_bytes"] - during["free_bytes"] == expected
    assert during["used_bytes"] - before["used_bytes"] == expected
    assert s0.ctl("status")["sessions"]["server"] == 1
    client.close_session(opened["session"])
    assert s0.ctl("status")["cache"] == before


def test_an_open_resent_under_its_open_id_gets_the_same_session_and_holds_nothing_more(swarm):
    """Issue 42: a gateway resends an open whose answer did not come; if the first one came, the
    server answers the resend with the session it opened, not a second one held for 30 s. Only
    for the key that opened it: another key's open under the same id is an open of its own."""
    d, model, servers, gw = swarm
    s0 = servers[0]
    before = s0.ctl("status")["cache"]["used_bytes"]
    owner, other = Peer(s0), Peer(s0)
    try:
        first = owner.open(s0, model.model_id, open_id="a1")
        held = s0.ctl("status")["cache"]["used_bytes"] - before
        again = owner.open(s0, model.model_id, open_id="a1")
        assert again.get("session") == first.get("session") and again.get("cache_bytes") == held > 0
        assert s0.ctl("status")["cache"]["used_bytes"] - before == held
        theirs = other.open(s0, model.model_id, open_id="a1")
        assert theirs.get("session") != first.get("session")
        assert owner.open(s0, model.model_id, open_id="b2").get("session") != first.get("session")
        for bad in ("x" * 65, 7, ["a1"]):  # beyond its bound, not a string
            refused = owner.open(s0, model.model_id, open_id=bad)
            assert refused.type == "error" and refused.get("code") == "protocol" and "open_id" in refused.get("message")
    finally:
        owner.close()
        other.close()
    assert s0.ctl("status")["cache"]["used_bytes"] == before


def test_session_over_the_cache_budget_is_refused_cleanly(swarm):
    d, model, servers, gw = swarm
    before = [s.ctl("status")["cache"] for s in servers]
    with pytest.raises(CacheFullError, match="KV cache"):
        SwarmClient(socket=gw.socket).open_session(model.model_id, max_length=8192, batch=64)
    # nothing leaked on the server that did accept its part before another refused
    assert [s.ctl("status")["cache"] for s in servers] == before
    still_generates(model, d)


def test_step_past_max_length_and_unknown_session(swarm):
    d, model, servers, gw = swarm
    client = SwarmClient(socket=gw.socket)
    sid = client.open_session(model.model_id, max_length=4, batch=1)["session"]
    with pytest.raises(LimitError, match="max_length 4"):
        client.step(sid, torch.zeros(1, 5, HIDDEN))
    client.close_session(sid)
    with pytest.raises(SessionError, match="unknown or closed session"):
        client.step(sid, torch.zeros(1, 1, HIDDEN))
    still_generates(model, d)


def test_wrong_tensor_shapes_and_dtypes_get_tensor_errors(swarm):
    d, model, servers, gw = swarm
    client = SwarmClient(socket=gw.socket)
    with pytest.raises(ProtocolError, match=r"hidden must be \[batch, length, 64\]"):
        client.forward(model.model_id, torch.zeros(1, 3, 32))
    with pytest.raises(TensorError, match="hidden must be float"):
        client.forward(model.model_id, torch.zeros(1, 3, HIDDEN, dtype=torch.int32))
    with pytest.raises(TensorError, match=r"position_ids must be int64 \[1, 3\]"):
        client.forward(model.model_id, torch.zeros(1, 3, HIDDEN), position_ids=torch.zeros(1, 4))
    with pytest.raises(TensorError, match=r"key_mask must be bool \[1, 3\]"):
        client.forward(model.model_id, torch.zeros(1, 3, HIDDEN), key_mask=torch.ones(2, 3))
    sid = client.open_session(model.model_id, max_length=8, batch=1)["session"]
    with pytest.raises(SessionError, match="batch 1"):
        client.step(sid, torch.zeros(2, 1, HIDDEN))
    client.close_session(sid)
    still_generates(model, d)


def test_garbage_frames_on_both_planes_get_error_replies(swarm):
    d, model, servers, gw = swarm
    peer, key = servers[0].address, servers[0].node_id
    assert raw_request(peer, [b"\x00not json"], key)["code"] == "protocol"
    assert "unknown message type" in raw_request(peer, encode("bogus", 1), key)["message"]
    bad_tensor = [b'{"v":"1.0","type":"forward","id":2,"tensors":[{"name":"hidden","dtype":"float32",'
                  b'"shape":[1,1,64]}]}', b"\0" * 10]
    assert raw_request(peer, bad_tensor, key)["code"] == "tensor"
    reply = raw_request(peer, encode("step", 3, {"session": "nope"}, {"hidden": torch.zeros(1, 1, HIDDEN)}), key)
    assert reply["code"] == "session"
    local = f"ipc://{gw.socket}"
    assert raw_request(local, [b"{}"])["code"] == "protocol"
    assert raw_request(local, [b'{"v":"2.0","type":"status","id":1}'])["message"].startswith("protocol version")
    still_generates(model, d)


def test_peer_plane_answers_only_curve(swarm):
    """A plaintext client gets no answer at all; the same request over CURVE does."""
    d, model, servers, gw = swarm
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(servers[0].address)
    try:
        s.send_multipart(encode("ping", 1))  # queued: a plaintext handshake never completes
        assert s.poll(2000) == 0
    finally:
        s.close()
    assert raw_request(servers[0].address, encode("ping", 2), servers[0].node_id)["type"] == "ok"
    wrong_key = servers[1].node_id  # the handshake fails when the server is not who we expect
    s = curve_dealer(servers[0].address, wrong_key)
    try:
        s.send_multipart(encode("ping", 3))
        assert s.poll(2000) == 0
    finally:
        s.close()


def test_model_the_swarm_does_not_serve_is_refused(swarm, model_dirs):
    d, model, servers, gw = swarm
    other = model_dirs("llama", seed=5, layers=4)
    with pytest.raises(WrongModelError, match="serves"):
        AutoDistributedModelForCausalLM.from_pretrained(other, socket=gw.socket)
    peer, key = servers[0].address, servers[0].node_id
    peer_reply = raw_request(peer, encode("open", 1, {"model_id": "llama-other", "blocks": [0, 3],
                                                      "max_length": 4, "batch": 1}), key)
    assert peer_reply["code"] == "wrong_model"
    assert raw_request(peer, encode("open", 2, {"model_id": model.model_id, "blocks": [2, 5],
                                                "max_length": 4, "batch": 1}), key)["code"] == "limit"
    still_generates(model, d)


def run_swarmd(tmp_path, cfg) -> subprocess.CompletedProcess:
    path = tmp_path / "swarmd.yaml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return subprocess.run([SWARMD, "--config", str(path)], capture_output=True, text=True, timeout=60)


def base_cfg(tmp_path, model, blocks="0:2"):
    return {"model": model, "serve": {"blocks": blocks, "device": "cpu"},
            "network": {"listen": "tcp://127.0.0.1:0", "socket": str(tmp_path / "s.sock")},
            "discovery": {"mdns": False, "seeds": []}, "state_dir": str(tmp_path / "state")}


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda c, t, m: c.update(model=str(t / "missing")), "does not exist"),
        (lambda c, t, m: c.update(model=str(t)), "config.json is missing"),
        (lambda c, t, m: c["serve"].update(blocks="4:60"), "out of range"),
        (lambda c, t, m: c["serve"].update(colour="blue"), "serve.colour: unknown key"),
        (lambda c, t, m: c["network"].update(listen="tcp://127.0.0.1"), "network.listen"),
    ],
)
def test_swarmd_refuses_bad_setups_with_one_line(tmp_path, model_dirs, mutate, needle):
    cfg = base_cfg(tmp_path, model_dirs("llama"))
    mutate(cfg, tmp_path, model_dirs("llama"))
    r = run_swarmd(tmp_path, cfg)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if needle in line]
    assert err, r.stderr
    assert "Traceback" not in r.stderr


def test_swarmd_refuses_an_unsupported_architecture(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"architectures": ["T5ForConditionalGeneration"]}')
    r = run_swarmd(tmp_path, base_cfg(tmp_path, str(tmp_path / "m")))
    assert r.returncode == 2 and "unsupported architecture" in r.stderr and "Traceback" not in r.stderr


def test_swarmd_refuses_malformed_yaml(tmp_path):
    r = run_swarmd(tmp_path, "model: [oops\n")
    assert r.returncode == 2 and "not valid YAML" in r.stderr


def test_swarmctl_without_a_daemon_fails_with_one_line(tmp_path):
    r = subprocess.run([SWARMCTL, "--socket", str(tmp_path / "none.sock"), "status"], capture_output=True,
                       text=True, timeout=30, env=dict(os.environ))
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "not running" in r.stderr


def test_swarmctl_against_a_socket_left_by_a_killed_daemon_says_so_at_once(tmp_path):
    import socket
    import time

    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, as after kill -9: nothing listens
    t0 = time.monotonic()
    r = subprocess.run([SWARMCTL, "--socket", path, "status"], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0
    assert "not running" in r.stderr and "nothing listens" in r.stderr
    assert elapsed < 10, f"took {elapsed:.1f} s (the default timeout is 30 s)"


def test_beam_order_and_start_garbage_or_beyond_limits_get_one_line_errors(swarm):
    """The step fields of beam search (beam_order) and of cutting a session back (start), sent
    wrong to the gateway and straight to a server by a peer: refused, and nothing breaks."""
    from swarmd.identity import NodeIdentity

    d, model, servers, gw = swarm
    local = f"ipc://{gw.socket}"
    client = SwarmClient(socket=gw.socket)
    sid = client.open_session(model.model_id, max_length=8, batch=2)["session"]
    client.step(sid, torch.zeros(2, 3, HIDDEN))
    hidden = {"hidden": torch.zeros(2, 1, HIDDEN)}
    for order, needle in ((torch.zeros(2), "beam_order must be int64 [2]"),
                          (torch.zeros(3, dtype=torch.int64), "beam_order must be int64 [2]"),
                          (torch.tensor([0, 2]), "beam_order must name rows 0..1"),
                          (torch.tensor([-1, 0]), "beam_order must name rows 0..1")):
        reply = raw_request(local, encode("step", 1, {"session": sid}, {**hidden, "beam_order": order}))
        assert reply["code"] == "tensor" and needle in reply["message"], reply
    for start in ("3", 4, -1, True, 2**40):
        reply = raw_request(local, encode("step", 2, {"session": sid, "start": start}, hidden))
        assert reply["code"] == "session" and "'start' must be a position within 0..3" in reply["message"], reply
    assert client.step_with_info(sid, torch.zeros(2, 1, HIDDEN), beam_order=torch.tensor([1, 1]),
                                 start=2)[1]["position"] == 3  # cut back to 2, reordered, one more
    client.close_session(sid)

    # a peer talking to a server directly: the server checks the same
    server = servers[0]
    me = NodeIdentity(os.urandom(32))
    s = curve_dealer(server.address, server.node_id, me)
    try:
        def ask(msg_type: str, req_id: int, fields: dict, tensors: dict | None = None) -> dict:
            s.send_multipart(encode(msg_type, req_id, fields, tensors))
            assert s.poll(10_000), "server did not answer"
            reply = decode(s.recv_multipart())
            return {"type": reply.type, **reply.fields}

        opened = ask("open", 1, {"model_id": model.model_id, "blocks": [0, 3], "max_length": 8, "batch": 2})
        psid = opened["session"]
        assert ask("step", 2, {"session": psid, "step": 1}, {"hidden": torch.zeros(2, 2, HIDDEN)})["type"] == "ok"
        reply = ask("step", 3, {"session": psid, "step": 2, "start": "x"}, hidden)
        assert reply["code"] == "protocol" and "'start' must be an integer" in reply["message"]
        reply = ask("step", 4, {"session": psid, "step": 3, "start": 5}, hidden)
        assert reply["code"] == "session" and "cannot cut the session back to position 5" in reply["message"]
        reply = ask("step", 5, {"session": psid, "step": 4}, {**hidden, "beam_order": torch.tensor([0, 9])})
        assert reply["code"] == "tensor"
        ask("close", 6, {"session": psid})
    finally:
        s.close()
    still_generates(model, d)


def test_a_message_over_max_message_bytes_in_small_frames_is_refused_with_its_id(model_dirs):
    """ZeroMQ bounds each frame (MAXMSGSIZE), not how many frames a message has, and tensors
    travel in 1 MiB frames: each plane checks the whole message against network.max_message_bytes
    and answers `limit` to the request's own id, before any tensor is built. Errors found after
    the header was read answer the request's id too (not 0, which answers nothing), and a push
    that does not parse gets no answer at all, as every push."""
    d = model_dirs("llama")
    with running_swarm(d, ["0:6"], extra={"network": {"max_message_bytes": "4MiB"}}) as (servers, gw):
        model_id = SwarmClient(socket=gw.socket).model_info()["model_id"]
        server = servers[0]
        big = {"hidden": torch.zeros(1, 5 * 2**20 // (4 * HIDDEN), HIDDEN)}  # 5 MiB, in 1 MiB frames
        s = curve_dealer(server.address, server.node_id)
        local = zmq.Context.instance().socket(zmq.DEALER)
        local.setsockopt(zmq.LINGER, 0)
        local.connect(f"ipc://{gw.socket}")
        try:
            def ask(sock, frames: list):
                sock.send_multipart(frames)
                assert sock.poll(10_000), "daemon did not answer"
                return decode(sock.recv_multipart())

            for sock, req_id in ((s, 41), (local, 42)):
                reply = ask(sock, encode("forward", req_id, {"model_id": model_id, "blocks": [0, 6]}, big,
                                         frame_bytes=2**20))
                assert reply.id == req_id and reply.get("code") == "limit", reply.fields
                assert "over the receiver's limit of 4194304 (network.max_message_bytes)" in reply.get("message")
            bad_tensor = [b'{"v":"1.4","type":"forward","id":43,"tensors":[{"name":"hidden","dtype":"float32",'
                          b'"shape":[1,1,64]}]}', b"\0" * 10]
            reply = ask(s, bad_tensor)
            assert reply.id == 43 and reply.get("code") == "tensor"
            s.send_multipart([b'{"v":"1.4","type":"push","id":44,"tensors":[{"name":"hidden","frames":0}]}'])
            reply = ask(s, encode("ping", 45))
            assert reply.id == 45 and reply.type == "ok"  # the bad push (sent first) got no answer
            assert server.ctl("status")["cache"]["used_bytes"] == 0
        finally:
            s.close()
            local.close()
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        still_generates(model, d)


def test_apps_flooding_the_local_plane_get_limit_errors_and_swarmctl_still_answers(model_dirs, tmp_path):
    """A gateway with no servers: every forward waits out its route timeout (3 s), so 64 keep
    every app worker busy. `swarmctl status` still answers at once (operators' requests have
    their own workers); of 400 more, those beyond the 256 allowed to wait are refused with a
    `limit` error at once instead of piling up in memory."""
    import time

    from helpers import Daemon

    from swarmd.local import MAX_WAITING, WORKERS

    d = model_dirs("llama")
    gw = Daemon(str(tmp_path), "gw", d, "none")
    gw.start([]).wait_ready()
    app = zmq.Context.instance().socket(zmq.DEALER)
    app.setsockopt(zmq.LINGER, 0)
    app.connect(f"ipc://{gw.socket}")
    try:
        model_id = SwarmClient(socket=gw.socket).model_info()["model_id"]
        x = torch.zeros(1, 2, HIDDEN)
        n = WORKERS + MAX_WAITING + 400
        for req_id in range(1, n + 1):
            app.send_multipart(encode("forward", req_id, {"model_id": model_id, "route_timeout_s": 3}, {"hidden": x}))
        time.sleep(0.5)
        t0 = time.monotonic()
        status = gw.ctl("status")
        # behind the app requests it would wait 15 s: 320 of them in waves of 64, 3 s each
        assert time.monotonic() - t0 < 8 and status["state"] == "online"
        refused = []
        while len(refused) < n - WORKERS - MAX_WAITING:
            assert app.poll(5000), f"{len(refused)} refused so far"
            reply = decode(app.recv_multipart())
            assert reply.type == "error" and reply.get("code") == "limit", reply.fields
            assert "waiting" in reply.get("message")
            refused.append(reply.id)
        assert sorted(refused) == list(range(WORKERS + MAX_WAITING + 1, n + 1))  # the latest, each by its id
        assert gw.ctl("status")["gateway"]["limited"] == len(refused)
    finally:
        app.close()
        gw.kill()


def test_requests_disguised_as_control_ones_do_not_take_the_operators_workers(model_dirs, tmp_path):
    """A forward whose header says "status" first (JSON keeps the last of two "type" keys)
    would run on the control workers: four of them, each waiting out its route timeout on a
    gateway with no servers, would hold `swarmctl status` for that long. They are refused."""
    import json
    import time

    from helpers import Daemon

    from libswarm.protocol import PROTOCOL_VERSION

    gw = Daemon(str(tmp_path), "gw", model_dirs("llama"), "none")
    gw.start([]).wait_ready()
    app = zmq.Context.instance().socket(zmq.DEALER)
    app.setsockopt(zmq.LINGER, 0)
    app.connect(f"ipc://{gw.socket}")
    try:
        model_id = SwarmClient(socket=gw.socket).model_info()["model_id"]
        x = torch.zeros(1, 2, HIDDEN)
        honest = encode("forward", 1, {"model_id": model_id, "route_timeout_s": 20}, {"hidden": x})
        header = json.loads(bytes(honest[0]))
        for req_id in range(1, 9):
            fields = {k: v for k, v in header.items() if k not in ("v", "type", "id")}
            text = (f'{{"v":"{PROTOCOL_VERSION}","type":"status","type":"forward","id":{req_id},'
                    + json.dumps(fields)[1:])
            app.send_multipart([text.encode(), *honest[1:]])
        time.sleep(0.5)
        t0 = time.monotonic()
        assert gw.ctl("status")["state"] == "online"
        assert time.monotonic() - t0 < 5
        replies = []
        while app.poll(3000):
            replies.append(decode(app.recv_multipart()))
        assert len(replies) == 8 and all(r.type == "error" and "control request" in r.get("message") for r in replies)
    finally:
        app.close()
        gw.kill()
