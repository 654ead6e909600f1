"""The parts of the gateway's inference sessions, without daemons: what a step request tells a
hop (sessions.py), when an unanswered request is sent again (resend.py), which servers take a
span (spans.py), whom a disputed push blames (chain.py), and when a spot check is skipped
(checks.py)."""

import time

import pytest
import torch

from libswarm.errors import CacheFullError
from libswarm.protocol import Message
from swarmd.gateway.chain import PushDispute, check_consumed
from swarmd.gateway.history import StepTimes
from swarmd.gateway.resend import Resender
from swarmd.gateway.router import Router
from swarmd.gateway.sessions import GatewaySession, step_fields
from swarmd.routing import Hop, ServerSpan
from swarmd.transport.connection import NoAnswerInTime


class Table:
    """A peer table holding `servers`, that never has news."""

    def __init__(self, servers):
        self.servers = servers

    def servers_for(self, model_id, adapter=None):
        return list(self.servers)

    def claimed_step_s(self, address, tokens):
        return None

    def version(self):
        return 0

    def wait_news(self, seen, timeout_s):
        time.sleep(max(0.0, timeout_s))


class Opens:
    """A server's connection that answers `open` with a session, or, when `full`, with no room."""

    def __init__(self, address, full=False):
        self.address, self.full, self.opens = address, full, 0

    def send(self, msg_type, fields=None, tensors=None, timeout_s=30.0):
        self.opens += 1
        return self.opens

    def receive(self, req_id, deadline, what="request"):
        if self.full:
            e = CacheFullError("no room for a session of 8 positions")
            e.peer = self.address
            raise e
        return Message("ok", req_id, {"session": f"s{self.address}"})


class Pool:
    def __init__(self, conns):
        self.conns = {c.address: c for c in conns}

    def get(self, address, key=None):
        return self.conns[address]

    def resolve_key(self, address):
        return None

    def drop(self, address):
        pass


def router_over(servers, conns=()):
    return Router(model_id="m", num_layers=6, hidden_size=4, pool=Pool(conns), table=Table(servers),
                  membership=None)


def test_a_step_tells_every_hop_to_cut_its_cache_back_only_after_the_app_cut_it_or_on_a_rerun():
    sess = GatewaySession("s", 1, 8, [Hop("a", 0, 3), Hop("b", 3, 6)], ["sa", "sb"], position=5)
    assert step_fields(sess, 1, 7) == {"session": "sb", "step": 7}
    assert step_fields(sess, 0, 7, rollback=True) == {"session": "sa", "step": 7, "start": 5}
    sess.position = sess.cut = 3  # the app cut its drafts back to position 3
    assert step_fields(sess, 1, 8) == {"session": "sb", "step": 8, "start": 3}


def test_an_untimed_server_is_waited_for_to_the_deadline_and_a_timed_one_is_resent_its_step_once_overdue():
    class Conn:
        def __init__(self, answers_after):
            self.waits, self.answers_after = [], answers_after

        def receive(self, req_id, deadline, what="request"):
            self.waits.append(deadline)
            if len(self.waits) <= self.answers_after:
                raise NoAnswerInTime(f"no answer to {what} in time")
            return Message("ok", req_id, {"position": 1})

    def resend():
        resent.append(time.monotonic())
        return conn, 2

    times, resent = StepTimes(), []
    resender = Resender(times)
    conn, t0 = Conn(answers_after=1), time.monotonic()
    with pytest.raises(NoAnswerInTime):  # its usual pace unknown: a lost message is not told from it
        resender.await_reply("a", (conn, 1), resend, t0, t0 + 5.0, 1)
    assert conn.waits == [t0 + 5.0] and not resent and resender.count == 0
    for _ in range(5):
        times.record("b", 0.017, 1, 2)
    conn = Conn(answers_after=1)
    reply, resends = resender.await_reply("b", (conn, 1), resend, t0, t0 + 5.0, 1)
    assert reply.id == 2 and resends == 1 and resender.count == 1 and len(resent) == 1
    assert conn.waits[0] == pytest.approx(t0 + times.resend_s("b", 1))  # overdue by its pace, not its deadline


def test_a_server_without_room_for_a_span_is_passed_over_without_a_ban():
    from swarmd.gateway.spans import SpanOpener

    full, free = Opens("a", full=True), Opens("b")  # equal costs: the lower address is tried first
    router = router_over([ServerSpan("a", 0, 6), ServerSpan("b", 0, 6)], [full, free])
    opener = SpanOpener(router, Resender(router.step_times))
    hops, sids, outputs, _ = opener.open(0, 6, max_length=8, batch=1, deadline=time.monotonic() + 5, history=None)
    assert hops == [Hop("b", 0, 6)] and sids == ["sb"] and outputs == {}
    assert full.opens == 1 and not router.bans.banned()  # it works: only full
    router = router_over([ServerSpan("a", 0, 6)], [Opens("a", full=True)])
    with pytest.raises(CacheFullError):  # nobody else could take it: said at once, not at the deadline
        SpanOpener(router, Resender(router.step_times)).open(0, 6, max_length=8, batch=1,
                                                              deadline=time.monotonic() + 60, history=None)


def test_a_repeated_step_first_run_on_a_push_of_a_replaced_server_runs_again_suspecting_nobody():
    hops = [Hop("a", 0, 3), Hop("b", 3, 6)]
    pushed = torch.ones(1, 1, 4)  # what b ran on, not what a returned here
    with pytest.raises(PushDispute) as dispute:
        check_consumed(hops, 1, "0" * 32, torch.zeros(1, 1, 4), {0: pushed}, joined={"a"}, could_be_pushed=True,
                       repeated=True)
    assert dispute.value.index == 1 and dispute.value.suspect is None
    with pytest.raises(PushDispute) as dispute:  # a, not replaced since: its push is the one suspected
        check_consumed(hops, 1, "0" * 32, torch.zeros(1, 1, 4), {0: pushed}, joined=set(), could_be_pushed=True,
                       repeated=True)
    assert dispute.value.suspect == "a"


def test_a_spot_check_is_skipped_and_counted_when_no_other_server_holds_the_hops_blocks():
    from swarmd.gateway.chain import StepChain
    from swarmd.gateway.checks import OutputChecks
    from swarmd.gateway.spans import SpanOpener

    router = router_over([ServerSpan("a", 0, 6)])
    resender = Resender(router.step_times)
    checks = OutputChecks(router, SpanOpener(router, resender), StepChain(router, resender), "sample", 1.0)
    sess = GatewaySession("s", 1, 8, [Hop("a", 0, 6)], ["sa"], position=1, since=[0])
    checks.sample(sess)
    assert checks.counts["skipped"] == 1 and checks.counts["run"] == 0 and not sess.checking
    assert checks.status()["checks"]["skipped"] == 1


def test_training_hops_travel_in_their_servers_dtype_and_a_backward_uses_what_each_server_kept():
    """training.py: once a bfloat16 server has answered, its inputs and output gradients go to
    it in bfloat16 (it converts what it gets anyway); the backward of a kept pass names what
    each server kept, and runs no forward again, though the app sends its input in float32. A
    server that speaks 1.6 gets the gradient alone (it has the input); a 1.5 server gets the
    input too, and so does a 1.6 server that no longer holds the pass."""
    from libswarm.errors import SessionError
    from libswarm.protocol import registry
    from swarmd.gateway.training import TrainingChains

    class Bf16Server:
        def __init__(self, address, version, forgets=False):
            self.address, self.version, self.forgets, self.got = address, version, forgets, []

        def request(self, msg_type, fields, tensors, timeout_s=30.0):
            floats = {k: v.dtype for k, v in tensors.items() if v.is_floating_point()}
            self.got.append((msg_type, floats, fields.get("pass")))
            if msg_type == "forward":
                kept = {"pass": f"kept-by-{self.address}"} if fields.get("keep") else {}
                return Message("ok", 1, kept, {"hidden": (tensors["hidden"].float() * 0.5).to(torch.bfloat16)},
                               version=self.version)
            if self.forgets and "hidden" not in tensors:
                raise SessionError("pass is not kept here")
            return Message("ok", 1, {}, {"grad_input": (tensors["grad_output"].float() * 0.5).to(torch.bfloat16)},
                           version=self.version)

    a, b, c = Bf16Server("a", "1.6"), Bf16Server("b", "1.5"), Bf16Server("c", "1.6", forgets=True)
    chains = TrainingChains(router_over([ServerSpan("a", 0, 2), ServerSpan("b", 2, 4), ServerSpan("c", 4, 6)],
                                        [a, b, c]))
    x, g = torch.randn(1, 5, 4), torch.randn(1, 5, 4)

    def ask(msg_type, fields, tensors):
        return registry.parse(registry.LOCAL, Message(msg_type, 1, {"model_id": "m", **fields}, tensors))

    chains.on_forward(ask("forward", {}, {"hidden": x}))  # learns what each computes in
    assert a.got[0][1]["hidden"] == torch.float32  # not known yet: as the app sent it
    reply, _ = chains.on_forward(ask("forward", {"keep": True}, {"hidden": x}))
    assert all(s.got[-1][1]["hidden"] == torch.bfloat16 for s in (a, b, c))
    for s in (a, b, c):
        s.got.clear()
    _, tensors = chains.on_backward(ask("backward", {"pass": reply["pass"]}, {"hidden": x, "grad_output": g}))
    both = {"hidden": torch.bfloat16, "grad_output": torch.bfloat16}
    assert c.got == [("backward", {"grad_output": torch.bfloat16}, "kept-by-c"), ("backward", both, "kept-by-c")]
    assert b.got == [("backward", both, "kept-by-b")]
    assert a.got == [("backward", {"grad_output": torch.bfloat16}, "kept-by-a")]
    assert torch.allclose(tensors["grad_input"].float(), g * 0.125, atol=1e-2)

    # the app's backward may send the gradient alone (1.6): the pass's own inputs go to c again
    reply, _ = chains.on_forward(ask("forward", {"keep": True}, {"hidden": x}))
    c.got.clear()
    _, lean = chains.on_backward(ask("backward", {"pass": reply["pass"]}, {"grad_output": g}))
    assert torch.equal(lean["grad_input"], tensors["grad_input"]) and c.got[-1] == ("backward", both, "kept-by-c")
    with pytest.raises(SessionError, match="send the backward with its inputs"):  # used: gone
        chains.on_backward(ask("backward", {"pass": reply["pass"]}, {"grad_output": g}))
