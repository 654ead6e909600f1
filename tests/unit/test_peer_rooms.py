"""The rooms of the peer server (swarmd/peer/), each on what it alone decides, driven in
process through the server's front door (dispatch.py) with real frames and the tiny model:
no socket, the replies caught where they would leave."""

import os

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
