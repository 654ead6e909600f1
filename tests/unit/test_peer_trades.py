"""A span server trading places (double-holding, placement.py): it serves a second span
beside its own, sessions, forwards and all, until it lets that span go; the sessions open
there then drain as after a move. Driven in process through the server's front door, with
the changes of spans taken as the serving thread takes them between two requests."""

import os

import pytest
import torch
import zmq

from libswarm.checkpoint import Checkpoint
from libswarm.protocol import decode, encode
from libswarm.protocol.messages import Message
from swarmd.config import LimitsConfig
from swarmd.identity import NodeIdentity
from swarmd.peer.server import SpanServer
from swarmd.runtime.cache import CacheBudget
from swarmd.runtime.span import Span
from swarmd.transport.access import AccessControl

ALICE = NodeIdentity(os.urandom(32)).public_key


@pytest.fixture(scope="module")
def checkpoint(model_dirs):
    return Checkpoint(model_dirs("llama", layers=4))


def load(checkpoint, start: int, end: int) -> Span:
    return Span(checkpoint, start, end, torch.device("cpu"), torch.float32).load()


@pytest.fixture
def server(checkpoint):
    ctx, me = zmq.Context(), NodeIdentity(os.urandom(32))
    srv = SpanServer(ctx, load(checkpoint, 0, 2), CacheBudget(2**26), "m", max_length=64, max_batch=2,
                     idle_timeout_s=60, max_message_bytes=2**24, identity=me,
                     access=AccessControl("open", "", me.public_key), resolve_key=lambda a: None,
                     limits=LimitsConfig(64, 1.0, 1000), batch_window_s=0)
    srv.replies = []
    srv.send = lambda ident, reply, req_id: srv.replies.append(decode([bytes(f) for f in reply]))
    yield srv
    srv.compute.stop()
    srv.sock.close(0)
    srv.zctx.term()


def ask(srv: SpanServer, msg_type: str, fields: dict, tensors: dict | None = None) -> Message:
    srv.dispatch.request(b"caller", encode(msg_type, 7, fields, tensors), ALICE)
    return srv.replies[-1]


def open_on(srv: SpanServer, blocks: list[int]) -> Message:
    return ask(srv, "open", {"model_id": "m", "blocks": blocks, "max_length": 16, "batch": 1})


def step(srv: SpanServer, sid: str, n: int, span: Span) -> torch.Tensor:
    x = torch.randn(1, 1, span.hidden_size, generator=torch.Generator().manual_seed(n))
    reply = ask(srv, "step", {"session": sid, "step": n}, {"hidden": x})
    assert reply.type == "ok", reply
    return reply.tensors["hidden"]


def test_a_hold_serves_both_spans_until_the_old_one_is_let_go_and_drains(server, checkpoint):
    old_span = server.span
    sid_old = open_on(server, [0, 2]).fields["session"]
    step(server, sid_old, 0, old_span)
    new_span = load(checkpoint, 2, 4)
    server.switch_span(new_span, timeout_s=0, keep=True)
    server.take_changes()
    assert (server.span, server.also) == (new_span, old_span)
    # both spans take new sessions, and sessions opened before go on
    sid_new = open_on(server, [2, 4]).fields["session"]
    sid_also = open_on(server, [0, 1]).fields["session"]
    assert server.sessions[sid_also].span is old_span and server.sessions[sid_new].span is new_span
    step(server, sid_old, 1, old_span)
    step(server, sid_new, 0, new_span)
    # forwards and backwards (run later, on the compute thread) go to the span holding their blocks
    assert server.passes.span_of(0, 2) is old_span and server.passes.span_of(2, 4) is new_span
    assert open_on(server, [1, 3]).fields["code"] == "limit"  # one span must hold a session's blocks

    server.drop_also(timeout_s=0)
    server.take_changes()
    assert server.also is None and [s for s, _ in server.old_spans] == [old_span]
    assert open_on(server, [0, 2]).fields["code"] == "moved"  # the gateway reroutes
    step(server, sid_old, 2, old_span)  # draining, as after a move
    ask(server, "close", {"session": sid_old})
    ask(server, "close", {"session": sid_also})
    server.expire_idle()
    assert server.old_spans == []  # drained and unloaded
    # a gateway whose table is a few gossip rounds old is told to reroute, not refused
    assert open_on(server, [0, 2]).fields["code"] == "moved"


def test_a_bridge_serves_blocks_beside_the_span_without_switching(server, checkpoint):
    own = server.span
    bridged = load(checkpoint, 3, 4)
    server.add_also(bridged, timeout_s=0)
    server.take_changes()
    assert server.span is own and server.also is bridged
    sid = open_on(server, [3, 4]).fields["session"]
    step(server, sid, 0, bridged)
    assert open_on(server, [2, 4]).fields["code"] == "limit"  # block 2 is on neither
