import os
import time

import pytest
import torch

from libswarm.errors import SwarmError
from swarmd.discovery.records import Record
from swarmd.discovery.table import PeerTable
from swarmd.gateway.bans import BAN_MAX_S, Bans
from swarmd.gateway.history import History, StepTimes
from swarmd.identity import NodeIdentity


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_bans_double_with_each_failure_up_to_a_cap_and_expire():
    clock = Clock()
    bans = Bans(clock)

    def fail_after_ban(address="a"):  # tried again once its ban is over, and failed again
        clock.t += bans.remaining_s(address)
        return bans.ban(address)

    assert [fail_after_ban() for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert bans.is_banned("a") and not bans.is_banned("b")
    clock.t += 8.5
    assert not bans.is_banned("a") and bans.banned() == set()
    for _ in range(20):
        last = fail_after_ban()
    assert last == BAN_MAX_S
    clock.t += BAN_MAX_S
    bans.succeeded("a")
    assert bans.ban("a") == 1.0  # a success forgets the failures
    for _ in range(5000):  # a long run of failures (churn, hours) must not overflow the doubling
        last = fail_after_ban()
    assert last == BAN_MAX_S and bans.remaining_s("a") == BAN_MAX_S and bans.remaining_s("b") == 0.0


def test_failures_of_a_banned_server_seen_by_other_sessions_do_not_double_its_ban():
    """Every session routed through a server that died or restarted finds out on its own: that
    is one incident, not one per session (64 sessions would ban a server that restarts in a
    second for the 5-minute maximum)."""
    clock = Clock()
    bans = Bans(clock)
    assert [bans.ban("a") for _ in range(8)] == [1.0] * 8
    clock.t += 0.5
    assert bans.ban("a") == 0.5 and bans.remaining_s("a") == 0.5
    clock.t += 0.5
    assert bans.ban("a") == 2.0  # tried again after its ban, failed again: doubled


def test_bans_and_step_times_keep_a_bounded_number_of_addresses_under_churn():
    """A long run under churn meets ever new addresses (restarts at new ports, remapping
    NATs): what is kept about old ones is forgotten once it no longer matters, and nothing
    that still matters is."""
    from swarmd.gateway.bans import PRUNE_ABOVE

    clock = Clock()
    bans = Bans(clock)
    bans.ban("kept")
    for i in range(20 * PRUNE_ABOVE):  # each address fails once, a second apart
        bans.ban(f"tcp://10.0.0.1:{i}")
        clock.t += 1.0
    assert len(bans) <= PRUNE_ABOVE + BAN_MAX_S + 2
    hot = [f"tcp://10.0.0.1:{i}" for i in range(20 * PRUNE_ABOVE - 5, 20 * PRUNE_ABOVE)]
    for a in hot:  # recent failures: still counted (a second failure doubles the ban)
        assert bans.ban(a) == 2.0
    bans.succeeded(hot[0])
    clock.t += BAN_MAX_S
    bans.succeeded(hot[1])  # its ban is over and it worked: forgotten at once
    assert bans.ban(hot[1]) == 1.0

    st = StepTimes(max_servers=100)
    st.record("steady", 0.017, 1)
    for i in range(1000):
        st.record(f"tcp://10.0.0.1:{i}", 0.017, 1)
        if i % 50 == 0:
            st.record("steady", 0.017, 1)  # timed again and again: never the oldest
    assert len(st) == 100
    assert st.expected_s("steady", 1) is not None and st.expected_s("tcp://10.0.0.1:999", 1) is not None
    assert st.expected_s("tcp://10.0.0.1:0", 1) is None


def test_history_replays_every_step_exactly_and_fills_missing_masks():
    h = History()
    steps = [torch.randn(2, 3, 4), torch.randn(2, 1, 4), torch.randn(2, 2, 4).to(torch.bfloat16).float()]
    pos = [torch.arange(3).expand(2, 3), torch.tensor([[3], [3]]), torch.tensor([[4, 5], [4, 5]])]
    masks = [torch.tensor([[True] * 3, [False, True, True]]), None, None]
    for x, p, m in zip(steps, pos, masks):
        h.append({0: x, 5: x * 2}, [0, 5], p, m)
    r = h.replay_inputs(5)
    assert torch.equal(r["hidden"], torch.cat(steps, 1) * 2)
    assert torch.equal(r["position_ids"], torch.cat(pos, 1))
    assert r["key_mask"].tolist() == [[True] * 6, [False] + [True] * 5]
    h.reset_boundary(3, torch.ones(2, 6, 4))
    assert h.replay_inputs(3)["hidden"].shape == (2, 6, 4)


def test_step_times_scale_with_tokens_and_follow_changes():
    st = StepTimes()
    assert st.expected_s("a", 1) is None
    st.record("a", 0.017, 1)  # 1 token + 16 fixed units
    assert abs(st.expected_s("a", 1) - 0.017) < 1e-9
    assert abs(st.expected_s("a", 33) - 0.049) < 1e-9
    for _ in range(50):
        st.record("a", 0.170, 1)
    assert abs(st.expected_s("a", 1) - 0.170) < 1e-3


def test_a_server_not_measured_yet_is_given_what_its_record_claims_within_bounds():
    """Before a gateway has timed a server, a step may take 10 times what the server's record
    claims plus 10 s for first-step costs, at most 5 minutes; 30 s when it claims nothing."""
    from swarmd.gateway.router import UNMEASURED_MAX_S, UNMEASURED_STEP_S, Router

    table = PeerTable()
    router = Router(model_id="m", num_layers=8, hidden_size=4, pool=None, table=table, membership=None)

    def server(address, **claims):
        i = NodeIdentity(os.urandom(32))
        table.merge(Record(node_id=i.public_key, sign_key=i.sign_key, addresses=(address,), state="online",
                           timestamp=time.time(), seq=1, model_id="m", span=(0, 8), **claims), {})
        return address

    fast = server("tcp://10.0.0.1:1", throughput=100.0, forward_throughput=1000.0)  # 10 ms + 1 ms a position
    slow = server("tcp://10.0.0.2:1", throughput=0.5, forward_throughput=20.0)  # a CPU server: 2 s + 50 ms
    silent = server("tcp://10.0.0.3:1")
    assert abs(router.allowance_s(fast, 1) - (10 + 10 * 0.011)) < 1e-9  # far under 30 s: a stall is seen soon
    assert abs(router.allowance_s(slow, 100) - (10 + 10 * 7.0)) < 1e-9  # a long prefill gets the time it needs
    assert router.allowance_s(slow, 4000) == UNMEASURED_MAX_S
    assert router.allowance_s(silent, 1) == router.allowance_s("tcp://10.0.0.9:1", 1) == UNMEASURED_STEP_S
    router.step_times.record(fast, 0.017, 1)  # measured: its own times from now on
    assert abs(router.allowance_s(fast, 1) - (1 + 10 * 0.017)) < 1e-9


def test_routes_take_a_server_by_its_measured_speed_while_much_slower_than_it_claims():
    """A server timed over 3x and over 100 ms a step slower than its record claims is routed by
    the time measured, for 5 minutes after its last timed step; then its claim again (it may
    have recovered: it is tried and timed anew)."""
    from swarmd.gateway.router import MEASURED_FOR_S, Router
    from swarmd.routing import ServerSpan

    clock = Clock()
    router = Router(model_id="m", num_layers=6, hidden_size=4, pool=None, table=PeerTable(), membership=None)
    router.step_times = StepTimes(clock=clock)
    claim = ServerSpan("a", 0, 6, block_s=0.001, rtt_s=0.002)  # 6 ms a step through its span
    assert router._as_measured(claim) == claim  # not timed yet
    router.step_times.record("a", 0.302, 1, blocks=6)  # 300 ms a step beyond the round trip
    assert abs(router._as_measured(claim).block_s - 0.05) < 1e-9
    clock.t += MEASURED_FOR_S + 1
    assert router._as_measured(claim) == claim
    router.step_times.record("b", 0.050, 1, blocks=6)  # 8x its claim, but only 42 ms more: noise, not a lie
    assert router._as_measured(ServerSpan("b", 0, 6, block_s=0.001, rtt_s=0.002)).block_s == 0.001
    router.step_times.record("c", 0.050, 1, blocks=2)  # claims nothing: what was measured
    assert abs(router._as_measured(ServerSpan("c", 0, 2, rtt_s=0.002)).block_s - 0.024) < 1e-9


def test_a_gateway_waiting_for_a_route_takes_a_server_as_soon_as_its_table_has_it():
    """While no server covers some blocks, the gateway asks its peers again with a backoff
    that grows to 2 s; a server that comes back (its record, or this daemon reaching it) is
    routed to at once, not at the next backoff."""
    import threading

    from swarmd.gateway.router import Router

    class Membership:
        refreshes = 0

        def refresh(self, skip=()):
            Membership.refreshes += 1

    table = PeerTable()
    router = Router(model_id="m", num_layers=6, hidden_size=4, pool=FakePool([]), table=table,
                    membership=Membership())
    i = NodeIdentity(os.urandom(32))
    address = "tcp://10.0.0.7:1"
    back = Record(node_id=i.public_key, sign_key=i.sign_key, addresses=(address,), state="online",
                  timestamp=time.time(), seq=1, model_id="m", span=(0, 6), throughput=10.0)
    arrived = {}

    def comes_back():
        time.sleep(3.2)  # the backoff has grown to 2 s by now (0.2, 0.4, 0.8, 1.6 ...)
        arrived["t"] = time.monotonic()
        table.merge(back, {}, via=address)  # its record, from the node itself

    threading.Thread(target=comes_back).start()
    hops = router.plan(0, 6, deadline=time.monotonic() + 20)
    waited = time.monotonic() - arrived["t"]
    assert [h.address for h in hops] == [address]
    assert waited < 0.5, f"routed {waited:.2f} s after the server was back"
    assert Membership.refreshes <= 8  # news is looked at without asking the peers again


class FakeServer:
    """One hop's connection as the gateway sees it: answers steps in order, or is unreachable.
    `pushes` False: it answers as a server that could not reach the next one."""

    def __init__(self, address: str, reachable: bool = True, pushes: bool = True):
        self.address, self.reachable, self.pushes = address, reachable, pushes
        self.replies: dict[int, object] = {}
        self.sends = 0

    def send(self, msg_type, fields=None, tensors=None, timeout_s=30.0):
        from libswarm.errors import PeerUnavailableError
        from libswarm.protocol import Message
        from libswarm.protocol.tensors import tensor_digest

        self.sends += 1
        if not self.reachable:
            raise PeerUnavailableError(f"peer {self.address} refuses connections")
        req_id = len(self.replies) + 1000 * self.sends
        # every hop's output is zeros like the app's input: what it ran on (given or pushed) too
        reply = {"position": 1, "consumed": tensor_digest(torch.zeros(1, 1, 4))}
        if "next" in (fields or {}) and not self.pushes:
            reply["pushed"] = False
        self.replies[req_id] = Message("ok", req_id, reply, {"hidden": torch.zeros(1, 1, 4)})
        return req_id

    def receive(self, req_id, deadline, what="request"):
        return self.replies.pop(req_id)


class FakePool:
    def __init__(self, servers):
        self.servers = {s.address: s for s in servers}

    def get(self, address, key=None):
        return self.servers[address]

    def resolve_key(self, address):
        return "k" * 40

    def drop(self, address):
        pass


def chain_gateway(servers):
    from swarmd.gateway.gateway import Gateway
    from swarmd.gateway.sessions import GatewaySession
    from swarmd.routing import Hop

    gw = Gateway(model_id="m", num_layers=6, hidden_size=4, pool=FakePool(servers), table=PeerTable(), membership=None,
                 status=dict)
    hops = [Hop(s.address, 2 * i, 2 * i + 2) for i, s in enumerate(servers)]
    sess = GatewaySession("s", 1, 8, hops, [f"sid{i}" for i in range(len(hops))])
    return gw, sess


def test_a_hop_after_others_that_answered_has_its_own_allowance_from_their_answer_not_theirs_too():
    """Hops not measured yet get 10 s each: a chain's last hop that hangs after the others
    answered is given up on 10 s after they did, not 10 s for each hop of the chain."""
    from swarmd.gateway.chain import HopFailure

    class Hung(FakeServer):
        def receive(self, req_id, deadline, what="request"):
            from libswarm.errors import PeerUnavailableError

            self.deadline = deadline
            raise PeerUnavailableError(f"peer {self.address} did not answer {what} in time")

    servers = [FakeServer("a"), FakeServer("b"), Hung("c")]
    gw, sess = chain_gateway(servers)
    t0 = time.monotonic()
    with pytest.raises(HopFailure) as e:
        gw.chain.run(sess, 0, torch.zeros(1, 1, 4), {"position_ids": torch.zeros(1, 1, dtype=torch.long)}, 1, 1)
    assert e.value.index == 2
    assert 29.0 < servers[2].deadline - t0 < 31.0  # without: 3 x 30 s (nothing claimed: 30 s a hop)


def test_a_hand_over_to_an_unreachable_server_blames_that_server_not_the_one_handing_over():
    """The last server dies after the gateway sent it the step but before the middle one pushed:
    the middle one answers `pushed: false`, the gateway's own hand-over finds the last one gone,
    and the failure names the last hop (blaming the middle one replaced a healthy server and
    then failed over a second time on the dead one)."""
    from swarmd.gateway.chain import HopFailure

    a, b, c = FakeServer("a"), FakeServer("b", pushes=False), FakeServer("c")
    gw, sess = chain_gateway([a, b, c])
    small = {"position_ids": torch.zeros(1, 1, dtype=torch.long)}
    original_send = c.send

    def dies_after_first_send(*args, **kwargs):
        if c.sends == 1:
            c.reachable = False
        return original_send(*args, **kwargs)

    c.send = dies_after_first_send
    with pytest.raises(HopFailure) as failure:
        gw.chain.run(sess, 0, torch.zeros(1, 1, 4), small, step=0, tokens=1)
    assert failure.value.index == 2
    assert sorted(failure.value.outputs) == [0, 1]  # the last one's input is known: replay from there
    assert not gw.router.bans.banned()  # only the repair bans, and it is given the right hop


def test_a_server_that_cannot_push_has_its_output_handed_over_by_the_gateway():
    a, b, c = FakeServer("a"), FakeServer("b", pushes=False), FakeServer("c")
    gw, sess = chain_gateway([a, b, c])
    small = {"position_ids": torch.zeros(1, 1, dtype=torch.long)}
    outputs = gw.chain.run(sess, 0, torch.zeros(1, 1, 4), small, step=0, tokens=1)
    assert sorted(outputs) == [0, 1, 2] and c.sends == 2


def test_a_hop_that_ran_on_another_input_than_the_one_before_returned_is_a_dispute_blaming_the_pusher():
    """Hop c says it ran on something else than what b returned to the gateway (b pushed another
    tensor): not c's failure (no ban, no distrust) but a dispute naming b; a push of something
    c refused (it says what it was given) likewise; and a hop whose input came from the gateway
    alone that says it ran on something else is the one at fault."""
    from libswarm.errors import TensorError, WrongOutputError
    from swarmd.gateway.chain import HopFailure, PushDispute

    class Pushed(FakeServer):  # ran on, or refused, what it was pushed: not zeros
        def __init__(self, address, refuses=False):
            super().__init__(address)
            self.refuses = refuses

        def send(self, msg_type, fields=None, tensors=None, timeout_s=30.0):
            req_id = super().send(msg_type, fields, tensors, timeout_s)
            if self.refuses:
                err = TensorError("position_ids must be int64 [1, 2], got int64 [1, 1]")
                err.peer, err.consumed = self.address, "0" * 32
                self.replies[req_id] = err
            else:
                self.replies[req_id].fields["consumed"] = "0" * 32
            return req_id

        def receive(self, req_id, deadline, what="request"):
            reply = self.replies.pop(req_id)
            if isinstance(reply, Exception):
                raise reply
            return reply

    small = {"position_ids": torch.zeros(1, 1, dtype=torch.long)}
    for c in (Pushed("c"), Pushed("c", refuses=True)):
        gw, sess = chain_gateway([FakeServer("a"), FakeServer("b"), c])
        with pytest.raises(PushDispute) as dispute:
            gw.chain.run(sess, 0, torch.zeros(1, 1, 4), small, step=0, tokens=1)
        assert dispute.value.index == 2 and dispute.value.suspect == "b" and sorted(dispute.value.outputs) == [0, 1]
        assert not gw.router.bans.banned()
    gw, sess = chain_gateway([Pushed("a"), FakeServer("b")])  # the first hop's input is the gateway's own
    with pytest.raises(HopFailure) as failure:
        gw.chain.run(sess, 0, torch.zeros(1, 1, 4), small, step=0, tokens=1)
    assert failure.value.index == 0 and isinstance(failure.value.error, WrongOutputError)


class FailingServer:
    """Answers every request at once with an error, as a server does while it restarts."""

    def __init__(self):
        self.requests = 0

    def request(self, msg_type, fields=None, tensors=None, timeout_s=30.0):
        from libswarm.errors import SpanMovedError

        self.requests += 1
        raise SpanMovedError("moved: this server is joining the swarm")


def test_a_lone_server_that_keeps_failing_fast_is_paced_and_the_forward_ends_at_its_deadline():
    """The only server covering the blocks fails every request at once. Routing through it anyway
    (a ban is a preference when nothing else covers the blocks) must neither ask it in a tight
    loop nor run past the caller's deadline (found in a long churn run: thousands of failures in
    a loop, until the ban's doubling overflowed)."""

    from swarmd.gateway.gateway import Gateway
    from swarmd.gateway.router import FALLBACK_PACE_S
    from swarmd.routing import ServerSpan

    class Table:
        def servers_for(self, model_id, adapter=None):
            return [ServerSpan("a", 0, 6)]

        def claimed_step_s(self, address, tokens):
            return None  # its record claims no speed

        def version(self):
            return 0  # never news

        def wait_news(self, seen, timeout_s):
            time.sleep(max(0.0, timeout_s))

    class Membership:
        refreshes = 0

        def refresh(self, skip=()):
            self.refreshes += 1

    server = FailingServer()
    pool = FakePool([])
    pool.servers["a"] = server
    gw = Gateway(model_id="m", num_layers=6, hidden_size=4, pool=pool, table=Table(), membership=Membership(),
                 status=dict)
    tensors = {"hidden": torch.zeros(1, 2, 4), "position_ids": torch.zeros(1, 2, dtype=torch.long)}
    t0 = time.monotonic()
    with pytest.raises(SwarmError):
        gw.training._forward_chain(tensors, {}, {"model_id": "m"}, deadline=t0 + 4.0)
    took = time.monotonic() - t0
    assert 4.0 <= took < 4.0 + FALLBACK_PACE_S + 1.0
    # bans of 1, 2, 2 ... s apart: a handful of requests in 4 s, not thousands
    assert 2 <= server.requests <= 5, server.requests


def test_a_step_is_resent_after_twice_the_90th_percentile_of_its_servers_recent_steps():
    """Issue 42: not before 4 timed steps (the pace is not known yet), then 2 x p90 of the last
    20, scaled to the step's tokens, plus 5 ms of scheduling noise; old samples age out."""
    from swarmd.gateway.history import RECENT_STEPS, RESEND_SLACK_S

    st = StepTimes()
    for _ in range(3):
        st.record("a", 0.017, 1)  # 1 ms a unit (1 token + 16)
        assert st.resend_s("a", 1) is None
    st.record("a", 0.017, 1)
    assert st.resend_s("a", 1) == pytest.approx(2 * 0.017 + RESEND_SLACK_S)
    for _ in range(RECENT_STEPS - 2):
        st.record("a", 0.017, 1)
    st.record("a", 0.170, 1)  # one slow step in 20 is the 95th percentile: not what counts
    st.record("a", 0.034, 1)  # the 90th
    assert st.resend_s("a", 1) == pytest.approx(2 * 0.034 + RESEND_SLACK_S)
    assert st.resend_s("a", 33) == pytest.approx(2 * 0.034 * 49 / 17 + RESEND_SLACK_S)
    for _ in range(RECENT_STEPS):
        st.record("a", 0.017, 1)
    assert st.resend_s("a", 1) == pytest.approx(2 * 0.017 + RESEND_SLACK_S)
    assert st.resend_s("b", 1) is None


def test_a_pusher_is_suspected_only_when_four_of_its_last_twenty_pushes_went_missing():
    """A lost push and a push not made look the same: a lossy link keeps its pushes, a pusher
    that skips many does not."""
    from swarmd.gateway.verify import PUSH_MISSES, PUSH_WINDOW, PushLinks

    links = PushLinks()
    for _ in range(PUSH_MISSES - 1):
        links.missed("p", "its push did not come")
        for _ in range(3):
            links.delivered("p")
    assert links.allowed("p", "q")
    for _ in range(PUSH_WINDOW):
        links.delivered("p")  # the earlier misses leave the window
    links.missed("p", "its push did not come")
    assert links.allowed("p", "q")
    for _ in range(PUSH_MISSES - 1):
        links.missed("p", "its push did not come")
    assert not links.allowed("p", "q")
    assert "4 of its last 20" in links.to_json()[0]["reason"]


def test_a_lost_reply_is_resent_to_the_same_server_instead_of_waiting_out_its_deadline():
    """Hop b's reply is lost: the step goes to b again once overdue by b's measured pace (a few
    tens of ms here), b answers it, and the chain completes with no failure, within b's deadline."""
    from swarmd.transport.connection import NoAnswerInTime

    class Lossy(FakeServer):
        def __init__(self, address):
            super().__init__(address)
            self.waits: list[float] = []

        def receive(self, req_id, deadline, what="request"):
            self.waits.append(deadline)
            if self.sends == 1:  # the first answer is lost on the way
                raise NoAnswerInTime(f"peer {self.address} did not answer {what} in time")
            return super().receive(req_id, deadline, what)

    a, b, c = FakeServer("a"), Lossy("b"), FakeServer("c")
    gw, sess = chain_gateway([a, b, c])
    for s in (a, b, c):
        for _ in range(5):
            gw.router.step_times.record(s.address, 0.017, 1, 2)
    small = {"position_ids": torch.zeros(1, 1, dtype=torch.long)}
    t0 = time.monotonic()
    outputs = gw.chain.run(sess, 0, torch.zeros(1, 1, 4), small, step=3, tokens=1)
    assert sorted(outputs) == [0, 1, 2] and b.sends == 2 and gw.resends == 1
    resend_at, own = b.waits[0] - t0, gw.router.allowance_s("b", 1)
    assert resend_at < 0.2 < own, (resend_at, own)  # 2 x 17 ms + 5 ms after a answered, not 1 s + 10 x 17 ms
    assert b.waits[1] - t0 <= own + 0.2  # the resent step keeps the hop's deadline
    assert not gw.router.bans.banned() and gw.router.pushes.allowed("a", "b")


def test_a_hung_server_is_resent_its_step_at_doubling_intervals_and_given_up_at_its_deadline_not_sooner():
    """Resends do not shorten the hop's deadline: a server hung (or slowed down by a loaded
    machine) fails over when a step sent once would have, not after the last resend (here after
    39, 117, 273 and 585 ms: the next would be past its deadline of 1.17 s)."""
    from swarmd.gateway.chain import HopFailure
    from swarmd.gateway.resend import MAX_RESENDS
    from swarmd.transport.connection import NoAnswerInTime

    class Hung(FakeServer):
        def receive(self, req_id, deadline, what="request"):
            time.sleep(max(0.0, deadline - time.monotonic()))
            raise NoAnswerInTime(f"peer {self.address} did not answer {what} in time")

    a, b = FakeServer("a"), Hung("b")
    gw, sess = chain_gateway([a, b])
    for s in (a, b):
        for _ in range(5):
            gw.router.step_times.record(s.address, 0.017, 1, 2)
    t0 = time.monotonic()
    with pytest.raises(HopFailure) as e:
        gw.chain.run(sess, 0, torch.zeros(1, 1, 4), {"position_ids": torch.zeros(1, 1, dtype=torch.long)}, 3, 1)
    took = time.monotonic() - t0
    assert e.value.index == 1 and gw.resends == 4 <= MAX_RESENDS and b.sends == 1 + gw.resends
    assert gw.router.allowance_s("b", 1) - 0.05 <= took < gw.router.allowance_s("b", 1) + 1.0, took
