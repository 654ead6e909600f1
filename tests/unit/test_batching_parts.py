"""Decode steps of several sessions run as one batch on a server (swarmd/peer/server.py), in
process: the same outputs as each step alone, one run of the blocks, and a session closed
while its step waited, or a batch that fails, disturbs no other session."""

import os
import sys

import pytest
import torch
import zmq

from libswarm.checkpoint import Checkpoint
from libswarm.protocol import Message, decode, registry
from swarmd.config import LimitsConfig
from swarmd.identity import NodeIdentity
from swarmd.peer.records import ServerSession
from swarmd.peer.server import SpanServer
from swarmd.runtime.cache import CacheBudget, SessionCache
from swarmd.runtime.span import Span
from swarmd.transport.access import AccessControl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from make_test_model import make_model  # noqa: E402


@pytest.fixture(scope="module", params=["llama", "bloom"])
def span(request, tmp_path_factory):
    d = make_model(request.param, str(tmp_path_factory.mktemp(request.param)), layers=3)
    return Span(Checkpoint(d), 0, 3, torch.device("cpu"), torch.float32).load()


@pytest.fixture
def server(span):
    ctx, me = zmq.Context(), NodeIdentity(os.urandom(32))
    srv = SpanServer(ctx, span, CacheBudget(2**26), "m", max_length=64, max_batch=4, idle_timeout_s=60,
                     max_message_bytes=2**24, identity=me, access=AccessControl("open", "", me.public_key),
                     resolve_key=lambda a: None, limits=LimitsConfig(64, 1.0, 1000), batch_window_s=1.0)
    srv.sent = []
    srv.send = lambda ident, reply, req_id: srv.sent.append((ident, decode([bytes(f) for f in reply])))
    yield srv
    srv.compute.stop()
    srv.sock.close(0)
    ctx.term()


def session(server, span, sid: str, prompt: int, batch: int = 1) -> ServerSession:
    cache = SessionCache(first=1, last=3, batch=batch, max_length=64, kv_heads=span.num_kv_heads,
                         head_dim=span.head_dim, dtype=torch.float32, device=torch.device("cpu"))
    s = server.sessions[sid] = ServerSession(sid, cache, span, None)
    h = torch.randn(batch, prompt, span.hidden_size, generator=torch.Generator().manual_seed(prompt))
    span.run(h, torch.arange(prompt).expand(batch, prompt), None, 1, 3, cache=cache)
    return s


def step(sid: str, k: int, hidden: torch.Tensor) -> registry.PeerStep:
    msg = Message("step", k, {"session": sid, "step": k}, {"hidden": hidden})
    return registry.typed(registry.PeerStep, registry.parse(registry.PEER, msg))


def test_steps_of_several_sessions_run_once_and_equal_each_alone(server, span):
    lengths = {"a": 3, "b": 7, "c": 1}
    batched = {sid: session(server, span, sid, n, batch=2 if sid == "b" else 1) for sid, n in lengths.items()}
    xs = {sid: torch.randn(s.cache.batch, 1, span.hidden_size) for sid, s in batched.items()}
    for k, (sid, s) in enumerate(batched.items()):
        assert server.steps.dispatch(s, step(sid, 1, xs[sid]), None, sid.encode(), k, None) is not None
    assert len(server.steps.batch.items) == 3 and not server.sent  # nothing ran yet: they wait for the batch
    server.steps.batch.run()
    assert server.stats.runs == 1 and server.stats.batched_steps == 3 and server.stats.steps == 3
    replies = dict(server.sent)
    for sid, n in lengths.items():
        alone = session(server, span, f"{sid}-alone", n, batch=2 if sid == "b" else 1)
        expected = span.run(xs[sid], torch.full((alone.cache.batch, 1), n), None, 1, 3, cache=alone.cache)
        reply = replies[sid.encode()]
        assert reply.type == "ok" and reply.get("position") == n + 1
        assert torch.allclose(reply.tensors["hidden"], expected, atol=1e-4, rtol=1e-4)
        assert batched[sid].cache.length == n + 1


def test_a_session_closed_while_its_step_waited_fails_alone(server, span):
    a, b = session(server, span, "a", 4), session(server, span, "b", 5)
    for k, s in enumerate((a, b)):
        server.steps.dispatch(s, step(s.id, 1, torch.randn(1, 1, span.hidden_size)), None, s.id.encode(), k, None)
    server.drop("a")
    server.steps.batch.run()
    replies = dict(server.sent)
    assert replies[b"a"].type == "error" and replies[b"a"].get("code") == "session"
    assert replies[b"b"].type == "ok" and b.cache.length == 6


def test_a_batch_that_fails_is_run_one_step_at_a_time(server, span, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a device error in the batched kernel")
    monkeypatch.setattr(span, "run_steps", broken)
    sessions = [session(server, span, sid, 3) for sid in "abc"]
    for k, s in enumerate(sessions):
        server.steps.dispatch(s, step(s.id, 1, torch.randn(1, 1, span.hidden_size)), None, s.id.encode(), k, None)
    server.steps.batch.run()
    assert all(reply.type == "ok" for _, reply in server.sent) and len(server.sent) == 3
    assert server.stats.runs == 3 and server.stats.batched_steps == 0


def test_a_batch_that_fails_after_its_caches_advanced_runs_each_step_again_from_where_it_was(server, span,
                                                                                             monkeypatch):
    """The caches advance inside run_steps, before the batch's one copy to the host, which can
    fail on a GPU (out of memory, a device error): each step's rerun alone must start where
    its session was, not one position on (before, a session at position 4 answered
    `position` 6 for a one-token step, its cache holding the step's keys twice)."""
    run_steps = span.run_steps

    def copy_fails(*args, **kwargs):
        run_steps(*args, **kwargs)
        raise RuntimeError("CUDA error: out of memory (the host copy)")
    monkeypatch.setattr(span, "run_steps", copy_fails)
    sessions = [session(server, span, sid, 4) for sid in "ab"]
    xs = [torch.randn(1, 1, span.hidden_size) for _ in sessions]
    for k, (s, x) in enumerate(zip(sessions, xs)):
        server.steps.dispatch(s, step(s.id, 1, x), None, s.id.encode(), k, None)
    server.steps.batch.run()
    replies = dict(server.sent)
    for s, x in zip(sessions, xs):
        alone = session(server, span, f"{s.id}-alone", 4)
        expected = span.run(x, torch.full((1, 1), 4), None, 1, 3, cache=alone.cache)
        reply = replies[s.id.encode()]
        assert reply.type == "ok" and reply.get("position") == 5 and s.cache.length == 5, reply.fields
        assert torch.allclose(reply.tensors["hidden"], expected, atol=1e-4, rtol=1e-4)


def test_a_bad_step_is_refused_at_once_and_a_second_step_of_a_session_runs_after_its_first(server, span):
    a = session(server, span, "a", 63)
    server.steps.dispatch(a, step("a", 1, torch.randn(1, 1, span.hidden_size)), None, b"a", 1, None)
    with pytest.raises(Exception, match="max_length"):  # the session is full: refused alone, before any batch
        server.steps.dispatch(a, step("a", 2, torch.randn(1, 1, span.hidden_size)), None, b"a", 2, None)
    assert not server.steps.batch.items and server.sent[0][1].type == "ok"  # its waiting step ran first


def test_with_the_window_at_zero_every_step_runs_at_once_alone(server, span):
    server.steps.batch.window_s = 0
    sessions = [session(server, span, sid, 3) for sid in "ab"]
    for k, s in enumerate(sessions):
        fields, tensors = server.steps.dispatch(s, step(s.id, 1, torch.randn(1, 1, span.hidden_size)), None,
                                                s.id.encode(), k, None)
        assert fields["position"] == 4 and tensors["hidden"].shape == (1, 1, span.hidden_size)
    assert not server.steps.batch.items and server.stats.runs == 2 and server.stats.batched_steps == 0


def test_a_batch_waits_only_for_sessions_due_here_within_the_window(server, span):
    import time

    server.steps.batch.window_s = 0.05
    a = session(server, span, "a", 3)
    server.steps.dispatch(a, step("a", 1, torch.randn(1, 1, span.hidden_size)), None, b"a", 1, None)
    now = time.monotonic()
    server.steps.batch.stepped["b"] = (now - 0.01, 0.02)  # steps here every 20 ms: due in 10 ms, within the window
    assert not server.steps.batch.due()
    server.steps.batch.stepped["b"] = (now - 0.01, 0.5)  # elsewhere in its route: due in 490 ms, not waited for
    assert server.steps.batch.due()
    server.steps.batch.stepped["b"] = (now - 0.01, 0.02)
    server.steps.batch.since -= 0.06  # the window has passed: it runs whoever is missing
    assert server.steps.batch.due()
