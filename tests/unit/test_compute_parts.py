"""The peer plane's compute thread (priorities, shedding) and the gateway's kept passes
(bounded, freed on backward and after their timeout)."""

import threading
import time

import pytest
import torch
import zmq

from libswarm.errors import LimitError
from libswarm.protocol import decode, ok_reply
from swarmd.gateway.training import KeptPasses
from swarmd.peer.compute import MIN_ALLOWANCE_S, PASS, STEP, ComputeThread, expires_at
from swarmd.routing import Hop


@pytest.fixture
def compute():
    ctx = zmq.Context()
    c = ComputeThread(ctx)
    yield c
    c.stop()
    ctx.term()


def wait_finished(c: ComputeThread, n: int, limit_s: float = 10.0) -> list:
    done, deadline = [], time.monotonic() + limit_s
    while len(done) < n and time.monotonic() < deadline:
        if c.wakeups.poll(100):
            done += c.finished()
    return done


def recorder(order: list, gate: threading.Event):
    """Jobs that append their name to `order` when they run; with `wait`, not before `gate`."""
    def job(name, wait=False):
        def run():
            if wait:
                gate.wait(5)
            order.append(name)
            return ok_reply(0)
        return run
    return job


def test_steps_queued_behind_a_pass_run_before_the_passes_queued_earlier(compute):
    order, gate = [], threading.Event()
    job = recorder(order, gate)

    compute.submit(PASS, job("pass 1", wait=True), b"a", 1, None)  # running while the rest queue
    time.sleep(0.1)
    compute.submit(PASS, job("pass 2"), b"a", 2, None)
    compute.submit(STEP, job("step 1"), b"b", 3, None)
    compute.submit(PASS, job("pass 3"), b"a", 4, None)
    compute.submit(STEP, job("step 2"), b"b", 5, None)
    gate.set()
    done = wait_finished(compute, 5)
    assert order == ["pass 1", "step 1", "step 2", "pass 2", "pass 3"]
    assert [job.req_id for job, _ in done] == [1, 3, 5, 2, 4]  # each reply comes back with its request


def test_keys_with_work_queued_take_turns_one_request_each(compute):
    """Key a queues four passes, then b one: b's runs after a's next one, not after all four."""
    order, gate = [], threading.Event()
    job = recorder(order, gate)

    compute.submit(PASS, job("a1", wait=True), b"a", 1, None, key="a")
    time.sleep(0.1)  # a1 runs; the rest queue
    for i in (2, 3, 4):
        compute.submit(PASS, job(f"a{i}"), b"a", i, None, key="a")
    compute.submit(PASS, job("b1"), b"b", 5, None, key="b")
    compute.submit(PASS, job("c1"), b"c", 6, None, key="c")
    compute.submit(PASS, job("b2"), b"b", 7, None, key="b")
    gate.set()
    wait_finished(compute, 7)
    assert order == ["a1", "a2", "b1", "c1", "a3", "b2", "a4"]


def test_a_key_queues_at_most_its_requests_and_bytes_and_others_still_queue():
    ctx = zmq.Context()
    compute = ComputeThread(ctx, per_key=2, per_key_bytes=100)
    gate = threading.Event()
    try:
        def blocker():
            gate.wait(5)
            return ok_reply(0)
        compute.submit(PASS, blocker, b"a", 1, None, key="a")  # running: not waiting any more
        time.sleep(0.1)
        compute.submit(PASS, lambda: ok_reply(0), b"a", 2, None, key="a", nbytes=500)  # alone: any size waits
        with pytest.raises(LimitError, match="MiB of requests"):
            compute.submit(PASS, lambda: ok_reply(0), b"a", 3, None, key="a", nbytes=1)
        compute.submit(PASS, lambda: ok_reply(0), b"b", 4, None, key="b", nbytes=60)
        compute.submit(STEP, lambda: ok_reply(0), b"b", 5, None, key="b", nbytes=40)
        with pytest.raises(LimitError, match="2 requests waiting"):
            compute.submit(STEP, lambda: ok_reply(0), b"b", 6, None, key="b")
        assert compute.queued() == 3 and compute.refused == 2
        gate.set()
        assert len(wait_finished(compute, 4)) == 4
        assert compute.queued() == 0
        compute.submit(PASS, lambda: ok_reply(0), b"a", 7, None, key="a", nbytes=90)  # its turn is free again
        assert len(wait_finished(compute, 1)) == 1
    finally:
        gate.set()
        compute.stop()
        ctx.term()


def test_work_whose_deadline_passed_while_queued_is_shed_unrun(compute):
    gate, ran = threading.Event(), []

    def blocker():
        gate.wait(5)
        return ok_reply(1)

    def late():
        ran.append(True)
        return ok_reply(2)

    compute.submit(PASS, blocker, b"a", 1, None)
    compute.submit(PASS, late, b"a", 2, time.time())  # already due: allowed MIN_ALLOWANCE_S from now
    time.sleep(MIN_ALLOWANCE_S + 0.2)
    gate.set()
    done = wait_finished(compute, 2)
    reply = decode(done[1][1])
    assert not ran and compute.shed == 1
    assert reply.type == "error" and reply.fields["code"] == "limit" and "deadline" in reply.fields["message"]


def test_a_deadline_far_behind_this_clock_still_gets_the_minimum_allowance():
    now = time.monotonic()
    assert expires_at(time.time() - 3600) >= now + MIN_ALLOWANCE_S - 0.01
    assert expires_at(None) == float("inf")
    assert expires_at(time.time() + 10) == pytest.approx(now + 10, abs=0.5)


def chain(nbytes_each: int, hops: int = 2) -> list:
    return [(Hop(f"s{i}", i, i + 1), torch.zeros(nbytes_each // 4), None) for i in range(hops)]


def test_kept_passes_are_taken_once_and_expire_after_their_timeout():
    clock = [0.0]
    kept = KeptPasses(max_bytes=10_000, timeout_s=60, clock=lambda: clock[0])
    a = kept.put([chain(1000)], {})
    b = kept.put([chain(1000)], {})
    assert len(kept) == 2 and kept.nbytes == 4000
    assert kept.take(a) is not None and kept.take(a) is None  # a backward takes it; a second finds none
    assert kept.nbytes == 2000
    clock[0] = 61.0
    kept.expire()
    assert len(kept) == 0 and kept.nbytes == 0 and kept.take(b) is None and kept.dropped == 1


def test_kept_passes_stay_within_their_bytes_dropping_the_oldest():
    kept = KeptPasses(max_bytes=10_000, timeout_s=60)
    ids = [kept.put([chain(2000)], {}) for _ in range(3)]  # 4000 bytes each: the third drops the first
    assert kept.nbytes == 8000 and kept.take(ids[0]) is None and kept.take(ids[2]) is not None
    assert kept.put([chain(20_000)], {}) is None  # alone over the bound: not kept at all
    assert kept.take("made-up") is None and kept.take(None) is None


def test_batches_are_split_by_the_servers_measured_speed_and_never_for_a_single_server():
    from swarmd.gateway.router import Router
    from swarmd.gateway.training import TrainingChains
    from swarmd.routing import ServerSpan

    class Table:
        servers: list = []

        def servers_for(self, model_id, adapter=None):
            return self.servers

    table = Table()
    chains = TrainingChains(Router(model_id="m", num_layers=6, hidden_size=4, pool=None, table=table,
                                   membership=None))
    batch = torch.zeros(8, 64, 4)  # 512 positions
    slow = [ServerSpan(f"s{i}", 2 * i, 2 * i + 2, forward_block_s=1e-3) for i in range(3)]  # 3 s expected
    fast = [ServerSpan(f"s{i}", 2 * i, 2 * i + 2, forward_block_s=1e-6) for i in range(3)]  # 3 ms expected
    for servers, parts in ((slow, 4), (fast, 1), ([ServerSpan("a", 0, 6, forward_block_s=1e-3)], 1),
                           ([ServerSpan(f"s{i}", 2 * i, 2 * i + 2) for i in range(3)], 4)):  # unmeasured: >= 512
        table.servers = servers
        assert chains._parts(batch, {}, None) == parts
    table.servers = slow
    assert chains._parts(torch.zeros(1, 512, 4), {}, None) == 1  # one sequence stays whole
