"""The rooms of the peer server (swarmd/peer/), each on what it alone decides, driven in
process through the server's front door (dispatch.py) with real frames and the tiny model:
no socket, the replies caught where they would leave."""

import os
import time

import pytest
import torch
import zmq

from libswarm.checkpoint import Checkpoint
from libswarm.protocol import decode, encode, registry
from libswarm.protocol.messages import Message
from swarmd.config import LimitsConfig
from swarmd.identity import NodeIdentity
from swarmd.peer.server import SpanServer
from swarmd.runtime.cache import CacheBudget
from swarmd.runtime.span import Lora, Span
from swarmd.transport.access import AccessControl

ALICE, BOB = NodeIdentity(os.urandom(32)).public_key, NodeIdentity(os.urandom(32)).public_key


@pytest.fixture(scope="module")
def span(model_dirs):
    return Span(Checkpoint(model_dirs("llama", layers=2)), 0, 2, torch.device("cpu"), torch.float32).load()


def make_server(span, budget: int = 2**26, **kwargs) -> SpanServer:
    ctx, me = zmq.Context(), NodeIdentity(os.urandom(32))
    srv = SpanServer(ctx, span, CacheBudget(budget), "m", max_length=64, max_batch=2, idle_timeout_s=60,
                     max_message_bytes=2**24, identity=me, access=AccessControl("open", "", me.public_key),
                     resolve_key=lambda a: None, limits=LimitsConfig(64, 1.0, 1000), batch_window_s=0, **kwargs)
    srv.replies = []
    srv.send = lambda ident, reply, req_id: srv.replies.append(decode([bytes(f) for f in reply]))
    return srv


@pytest.fixture
def server(span):
    srv = make_server(span)
    yield srv
    srv.compute.stop()
    srv.sock.close(0)
    srv.zctx.term()


def ask(srv: SpanServer, sender: str, msg_type: str, fields: dict, tensors: dict | None = None) -> Message | None:
    """One request through the front door; its reply, or None when none was sent (yet)."""
    before = len(srv.replies)
    srv.dispatch.request(b"caller-" + sender[:4].encode(), encode(msg_type, 7, fields, tensors), sender)
    return srv.replies[-1] if len(srv.replies) > before else None


def opened(srv: SpanServer, sender: str = ALICE, **more) -> str:
    reply = ask(srv, sender, "open", {"model_id": "m", "blocks": [0, 2], "max_length": 64, "batch": 1, **more})
    assert reply is not None and reply.type == "ok", reply
    return reply.fields["session"]


def hidden(span, length: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, length, span.hidden_size, generator=torch.Generator().manual_seed(seed))


# --- dispatch.py: one typed decode at the edge, one reply per request, none per push ----------------
def test_dispatch_refuses_a_mistyped_field_in_one_line_before_any_handler_runs(server):
    ran = []
    server.handlers["close"] = lambda req: ran.append(req) or ({}, None)
    reply = ask(server, ALICE, "close", {"session": 5})
    assert reply.type == "error" and reply.fields["code"] == "protocol" and not ran
    assert "close: field 'session' must be str" in reply.fields["message"]
    reply = ask(server, ALICE, "close", {"session": "abc"})
    assert reply.type == "ok" and isinstance(ran[0], registry.PeerClose) and ran[0].session == "abc"
    assert ask(server, ALICE, "teleport", {}).fields["code"] == "protocol"


def test_dispatch_answers_no_push_whatever_it_holds(server, span):
    for fields, tensors in [({"session": "x", "step": 1}, {"hidden": hidden(span)}),  # no such session
                            ({"session": "x"}, {"hidden": hidden(span)}),  # no step
                            ({"session": "x", "step": 1}, None)]:  # no tensor
        assert ask(server, ALICE, "push", fields, tensors) is None


def test_a_server_still_joining_answers_membership_but_moves_every_session_elsewhere(span):
    srv = make_server(None)
    try:
        assert ask(srv, ALICE, "ping", {}).type == "ok"
        reply = ask(srv, ALICE, "open", {"model_id": "m", "blocks": [0, 2], "max_length": 16, "batch": 1})
        assert reply.fields["code"] == "moved"
    finally:
        srv.compute.stop()
        srv.sock.close(0)
        srv.zctx.term()


# --- sessions.py: who may open, use and close ----------------------------------------------------------
def test_sessions_a_resent_open_gets_the_same_session_and_holds_nothing_more(server):
    sid = opened(server, open_id="o-1")
    free = server.budget.free_bytes
    assert opened(server, open_id="o-1") == sid and server.budget.free_bytes == free
    assert opened(server, BOB, open_id="o-1") != sid  # another key's open_id is its own


def test_sessions_another_key_cannot_step_or_close_a_session(server, span):
    sid = opened(server, ALICE)
    reply = ask(server, BOB, "step", {"session": sid, "step": 0}, {"hidden": hidden(span)})
    assert reply.fields["code"] == "session" and "unknown or expired session" in reply.fields["message"]
    assert ask(server, BOB, "close", {"session": sid}).fields["closed"] is False
    assert ask(server, ALICE, "close", {"session": sid}).fields["closed"] is True


def test_sessions_blocks_not_served_are_a_limit_and_a_wrong_model_is_named(server):
    reply = ask(server, ALICE, "open", {"model_id": "m", "blocks": [1, 3], "max_length": 16, "batch": 1})
    assert reply.fields["code"] == "limit" and "not served here" in reply.fields["message"]
    reply = ask(server, ALICE, "open", {"model_id": "other", "blocks": [0, 2], "max_length": 16, "batch": 1})
    assert reply.fields["code"] == "wrong_model"


# --- steps.py: where a step runs and what a repeat gets ---------------------------------------------
def test_steps_a_repeated_step_gets_the_same_answer_without_advancing_the_cache(server, span):
    sid = opened(server)
    first = ask(server, ALICE, "step", {"session": sid, "step": 0}, {"hidden": hidden(span, 3)})
    again = ask(server, ALICE, "step", {"session": sid, "step": 0}, {"hidden": hidden(span, 3)})
    assert first.fields["position"] == again.fields["position"] == 3 and again.fields["repeated"] is True
    assert torch.equal(first.tensors["hidden"], again.tensors["hidden"])
    assert server.sessions[sid].cache.length == 3


def test_steps_a_prefill_goes_to_the_compute_thread_and_a_decode_step_runs_inline(server, span):
    sid = opened(server)
    assert ask(server, ALICE, "step", {"session": sid, "step": 0}, {"hidden": hidden(span, 40)}) is None
    assert server.sessions[sid].queued == 1  # answered when the compute thread is done
    srv2 = make_server(span)
    try:
        sid = opened(srv2)
        assert ask(srv2, ALICE, "step", {"session": sid, "step": 0}, {"hidden": hidden(span, 2)}).type == "ok"
    finally:
        srv2.compute.stop()
        srv2.sock.close(0)
        srv2.zctx.term()


# --- pushes.py: whose push a waiting step takes ---------------------------------------------------------
def test_pushes_a_waiting_step_takes_the_push_of_the_hop_it_named_only(server, span):
    sid = opened(server)
    assert ask(server, ALICE, "step", {"session": sid, "step": 0, "expect_push": True, "from": BOB}) is None
    x = hidden(span, 2, seed=3)
    assert ask(server, ALICE, "push", {"session": sid, "step": 0}, {"hidden": x}) is None  # not from BOB
    assert (sid, 0) in server.pending and len(server.replies) == 1  # the open's reply alone
    ask(server, BOB, "push", {"session": sid, "step": 0}, {"hidden": x})  # the step's reply goes out now
    assert len(server.replies) == 2 and server.replies[-1].type == "ok" and server.replies[-1].fields["position"] == 2
    assert not server.pending


def test_pushes_a_push_that_cannot_be_the_step_refuses_it_naming_that_input(server, span):
    sid = opened(server)
    ask(server, ALICE, "step", {"session": sid, "step": 0, "expect_push": True, "from": BOB})
    wrong = torch.randn(1, 2, span.hidden_size + 1)
    ask(server, BOB, "push", {"session": sid, "step": 0}, {"hidden": wrong})
    reply = server.replies[-1]
    assert reply.type == "error" and reply.fields["code"] == "tensor" and reply.fields.get("consumed")


# --- passes.py: which trainables a pass runs with, and its scratch held in the budget ------------------
def test_passes_refuse_a_hosted_adapter_with_the_clients_own_lora(server, span):
    server.adapters = {"hosted": Lora(1.0, {})}
    reply = ask(server, ALICE, "forward", {"model_id": "m", "blocks": [0, 2], "adapter": "hosted"},
                {"hidden": hidden(span, 4), "lora_A.self_attn.q_proj": torch.zeros(2, 4, span.hidden_size)})
    assert reply.fields["code"] == "protocol" and "cannot be combined" in reply.fields["message"]
    reply = ask(server, ALICE, "forward", {"model_id": "m", "blocks": [0, 2], "adapter": "elsewhere"},
                {"hidden": hidden(span, 4)})
    assert reply.fields["code"] == "limit" and "not hosted here" in reply.fields["message"]


def test_passes_hold_their_attention_scratch_in_the_budget_or_refuse(span):
    from libswarm.errors import LimitError

    srv = make_server(span, budget=span.attention_scratch_bytes(1, 16) - 1)
    try:
        x = hidden(span, 16)
        pos = torch.arange(16).expand(1, 16)
        with pytest.raises(LimitError, match="attention memory"):
            srv.passes.forward(span, x, pos, None, 0, 2, None, None)
        srv.budget = CacheBudget(span.attention_scratch_bytes(1, 16))
        _, tensors = srv.passes.forward(span, x, pos, None, 0, 2, None, None)
        assert tensors["hidden"].shape == x.shape and srv.budget.free_bytes == srv.budget.max_bytes
    finally:
        srv.compute.stop()
        srv.sock.close(0)
        srv.zctx.term()


# --- kept.py: a forward's activations kept for its backward, the caller's alone, sessions first ----------
def answer(srv: SpanServer, sender: str, msg_type: str, fields: dict, tensors: dict) -> Message:
    """A pass's reply: it is computed on the compute thread and sent by the serving loop."""
    before = len(srv.replies)
    ask(srv, sender, msg_type, fields, tensors)
    t0 = time.monotonic()
    while len(srv.replies) == before:
        assert time.monotonic() - t0 < 30, f"no answer to {msg_type}"
        srv._deliver()
        time.sleep(0.002)
    return srv.replies[-1]


def test_kept_a_backward_differentiates_its_forwards_pass_and_only_its_callers(server, span, monkeypatch):
    pas = {"model_id": "m", "blocks": [0, 2]}
    x, other = hidden(span, 8, seed=1), hidden(span, 8, seed=2)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    want = answer(server, ALICE, "backward", pas, {"hidden": x, "grad_output": g}).tensors["grad_input"]
    kept = answer(server, ALICE, "forward", {**pas, "keep": True}, {"hidden": x})
    pass_id, held = kept.fields["pass"], server.budget.used_bytes
    assert len(server.passes.kept) == 1 and held > 0  # in the cache budget while it waits
    assert torch.equal(kept.tensors["hidden"], answer(server, ALICE, "forward", pas, {"hidden": x}).tensors["hidden"])

    recomputed = []
    real_graph = span.graph
    monkeypatch.setattr(span, "graph", lambda *a, **k: recomputed.append(1) or real_graph(*a, **k))
    back = {**pas, "pass": pass_id}
    got = answer(server, BOB, "backward", back, {"hidden": x, "grad_output": g})  # another key's pass: not its own
    assert torch.allclose(got.tensors["grad_input"], want, atol=1e-6) and recomputed == [1]
    assert len(server.passes.kept) == 1  # ...and not dropped by it
    got = answer(server, ALICE, "backward", back, {"hidden": x, "grad_output": g})
    assert torch.allclose(got.tensors["grad_input"], want, atol=1e-6) and recomputed == [1]  # none recomputed
    assert server.passes.kept.used == 1 and len(server.passes.kept) == 0 and server.budget.used_bytes == 0

    pass_id = answer(server, ALICE, "forward", {**pas, "keep": True}, {"hidden": x}).fields["pass"]
    got = answer(server, ALICE, "backward", {**pas, "pass": pass_id}, {"hidden": other, "grad_output": g})
    want_other = span.backward(other, torch.arange(8).expand(1, 8), None, 0, 2, g)[0]
    assert torch.allclose(got.tensors["grad_input"], want_other, atol=1e-6)  # other inputs: recomputed, right
    assert server.passes.kept.dropped == 1 and server.budget.used_bytes == 0
    for bad in (12, "made-up", ["x"]):  # garbage names no pass: the backward recomputes
        got = answer(server, ALICE, "backward", {**pas, "pass": bad}, {"hidden": x, "grad_output": g})
        assert torch.allclose(got.tensors["grad_input"], want, atol=1e-6)
    reply = answer(server, ALICE, "forward", {**pas, "keep": "yes"}, {"hidden": x})
    assert "pass" not in reply.fields and len(server.passes.kept) == 0  # only `true` keeps


def test_kept_passes_give_their_room_back_to_a_session_and_never_take_a_sessions(span):
    pas, x = {"model_id": "m", "blocks": [0, 2], "keep": True}, hidden(span, 8)
    n = span.graph(x, torch.arange(8).expand(1, 8), None, 0, 2).nbytes
    session = span.cache_bytes(0, 2, 1, 64)
    srv = make_server(span, budget=2 * n + session // 2)  # two keys' passes leave half a session's room
    try:
        assert "pass" in answer(srv, ALICE, "forward", pas, {"hidden": x}).fields
        assert "pass" in answer(srv, BOB, "forward", pas, {"hidden": x}).fields
        assert srv.budget.free_bytes < session and len(srv.passes.kept) == 2
        sid = opened(srv, max_length=64)  # fits once the oldest pass went
        assert sid and len(srv.passes.kept) < 2 and srv.budget.used_bytes == session + srv.passes.kept.nbytes
        srv.passes.kept.reclaim(srv.budget.max_bytes)  # no pass left to make room with
        assert len(srv.passes.kept) == 0 and srv.budget.used_bytes == session
        while srv.budget.free_bytes >= n:  # fill what is left with sessions...
            opened(srv, BOB, max_length=max(1, min(64, srv.budget.free_bytes * 64 // session)))
        before, sessions = srv.budget.used_bytes, len(srv.sessions)
        refused = srv.passes.kept.refused
        reply = answer(srv, ALICE, "forward", pas, {"hidden": x})  # ...and a pass is computed, not kept
        assert "pass" not in reply.fields and reply.type == "ok" and srv.budget.used_bytes <= before
        assert srv.passes.kept.refused == refused + 1  # counted, for swarmctl status
        assert len(srv.sessions) == sessions  # no session was dropped for it
    finally:
        srv.compute.stop()
        srv.sock.close(0)
        srv.zctx.term()


def test_a_pass_larger_than_a_keys_share_of_the_cache_is_computed_not_kept_and_counted(span):
    pas, x = {"model_id": "m", "blocks": [0, 2], "keep": True}, hidden(span, 8)
    n = span.graph(x, torch.arange(8).expand(1, 8), None, 0, 2).nbytes
    srv = make_server(span, budget=2 * n - 1)  # a key may keep half of it: less than one pass
    try:
        reply = answer(srv, ALICE, "forward", pas, {"hidden": x})
        assert reply.type == "ok" and "pass" not in reply.fields and len(srv.passes.kept) == 0
        assert srv.passes.kept.refused == 1 and srv.passes.kept.dropped == 0 and srv.budget.used_bytes == 0
    finally:
        srv.compute.stop()
        srv.sock.close(0)
        srv.zctx.term()


def test_kept_passes_go_after_their_time_or_once_their_span_is_no_longer_served(server, span):
    pas, now = {"model_id": "m", "blocks": [0, 2], "keep": True}, [0.0]
    server.passes.kept.clock = lambda: now[0]
    answer(server, ALICE, "forward", pas, {"hidden": hidden(span, 4)})
    assert len(server.passes.kept) == 1 and server.budget.used_bytes > 0
    now[0] = 119.0
    server.passes.kept.expire()
    assert len(server.passes.kept) == 1
    now[0] = 121.0
    server.passes.kept.expire()
    assert len(server.passes.kept) == 0 and server.budget.used_bytes == 0
    answer(server, ALICE, "forward", pas, {"hidden": hidden(span, 4)})
    server.passes.kept.served = lambda s: False  # the server moved to other blocks
    server.passes.kept.expire()
    assert len(server.passes.kept) == 0 and server.budget.used_bytes == 0 and server.passes.kept.dropped == 2


def test_kept_a_backward_of_other_positions_or_another_lora_scaling_recomputes(server, span):
    x, g = hidden(span, 6, seed=4), torch.randn(1, 6, span.hidden_size, generator=torch.Generator().manual_seed(5))
    a = torch.randn(2, 4, span.hidden_size, generator=torch.Generator().manual_seed(6)) * 0.1
    b = torch.randn(2, span.hidden_size, 4, generator=torch.Generator().manual_seed(7)) * 0.1
    lora = {"lora_A.self_attn.q_proj": a, "lora_B.self_attn.q_proj": b}
    pas = {"model_id": "m", "blocks": [0, 2], "lora_scaling": 2.0}
    shifted = torch.arange(3, 9).expand(1, 6)
    for changed, more_fields, more_tensors in (("positions", {}, {"position_ids": shifted}),
                                               ("scaling", {"lora_scaling": 0.5}, {})):
        want = answer(server, ALICE, "backward", {**pas, **more_fields},
                      {"hidden": x, "grad_output": g, **lora, **more_tensors})
        pass_id = answer(server, ALICE, "forward", {**pas, "keep": True}, {"hidden": x, **lora}).fields["pass"]
        got = answer(server, ALICE, "backward", {**pas, **more_fields, "pass": pass_id},
                     {"hidden": x, "grad_output": g, **lora, **more_tensors})
        for name, tensor in want.tensors.items():
            assert torch.allclose(got.tensors[name], tensor, atol=1e-6), (changed, name)
        assert server.passes.kept.used == 0, changed


def test_kept_a_lean_backward_sends_the_gradient_alone_and_gets_what_the_whole_one_would(server, span):
    """Protocol 1.6: a backward naming a kept pass may leave its inputs out. It differentiates
    the pass as kept (with its positions and LoRA), for its own key and blocks only; once the
    pass is gone it is a `session` error (the gateway then sends the whole backward), and one
    that sends anything more than the gradient is refused."""
    x, g = hidden(span, 6, seed=8), torch.randn(1, 6, span.hidden_size, generator=torch.Generator().manual_seed(9))
    a = torch.randn(2, 4, span.hidden_size, generator=torch.Generator().manual_seed(10)) * 0.1
    b = torch.randn(2, span.hidden_size, 4, generator=torch.Generator().manual_seed(11)) * 0.1
    sent = {"hidden": x, "position_ids": torch.arange(3, 9).expand(1, 6),
            "lora_A.self_attn.q_proj": a, "lora_B.self_attn.q_proj": b}
    pas = {"model_id": "m", "blocks": [0, 2]}
    want = answer(server, ALICE, "backward", {**pas, "lora_scaling": 2.0}, {**sent, "grad_output": g})
    assert set(want.tensors) == {"grad_input", "grad_lora_A.self_attn.q_proj", "grad_lora_B.self_attn.q_proj"}

    def kept() -> str:
        return answer(server, ALICE, "forward", {**pas, "lora_scaling": 2.0, "keep": True}, sent).fields["pass"]

    pass_id = kept()
    lean = {**pas, "pass": pass_id}
    assert answer(server, BOB, "backward", lean, {"grad_output": g}).fields["code"] == "session"  # not Bob's
    assert answer(server, ALICE, "backward", {**lean, "blocks": [0, 1]}, {"grad_output": g}).fields["code"] == "session"
    pass_id = kept()  # (that one is dropped: it was asked for other blocks than its own)
    got = answer(server, ALICE, "backward", {**pas, "pass": pass_id}, {"grad_output": g})
    assert got.type == "ok" and set(got.tensors) == set(want.tensors)
    for name, tensor in want.tensors.items():
        assert torch.allclose(got.tensors[name], tensor, atol=1e-6), name
    assert server.passes.kept.used == 1 and server.passes.kept.dropped == 1 and len(server.passes.kept) == 0
    assert server.budget.used_bytes == 0
    again = answer(server, ALICE, "backward", {**pas, "pass": pass_id}, {"grad_output": g})  # used: gone
    assert again.type == "error" and again.fields["code"] == "session" and "inputs" in again.fields["message"]

    pass_id = kept()
    for fields, tensors, why in (({**pas, "pass": pass_id}, {"grad_output": g, "lora_A.self_attn.q_proj": a},
                                  "lora_A.self_attn.q_proj"),
                                 ({**pas, "pass": pass_id, "lora_scaling": 2.0}, {"grad_output": g}, "lora_scaling"),
                                 (pas, {"grad_output": g}, "must name its kept pass"),
                                 ({**pas, "pass": pass_id}, {"grad_output": g[:, :3]}, "grad_output must be")):
        reply = answer(server, ALICE, "backward", fields, tensors)
        assert reply.type == "error" and why in reply.fields["message"], (why, reply.fields)
    assert len(server.passes.kept) == 0  # the last one's pass was taken by it, and is gone
