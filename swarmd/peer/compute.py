"""The peer plane's compute thread: runs the work too long for the thread that owns the socket.

The socket's thread answers gossip, ping, info, open and close itself, and runs small decode
steps inline (a hand-off would cost more than the step). Everything longer (forward and
backward passes, prefills) comes here, so that liveness never waits on compute: a 3 s forward
no longer makes the server miss gossip and get dropped from every route.

Work is taken by priority: inference steps before forward/backward passes (a user waiting for a
token goes before a training batch). Within a priority, the keys that have work queued take
turns, one job each, first come first served within a key: a peer that queues a hundred passes
delays another's next one by one pass, not by a hundred. Each key may have at most
`per_key` jobs and `per_key_bytes` of request tensors queued (serve.limits); beyond, its
request is refused with a `limit` error. Work whose caller has stopped waiting (its `deadline`
passed while queued) is shed unrun.

Finished work goes back to the socket's thread, which alone may send on the socket: a queue
of (job, reply frames) and one inproc message to wake it."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from libswarm.errors import LimitError
from libswarm.protocol import error_reply

log = logging.getLogger("swarmd.peer")

STEP, PASS = 0, 1  # priorities: inference steps, then forward/backward passes
# A request's deadline is the caller's clock: a server may be seconds off. Work is shed only
# after the time it had left on arrival, and never sooner than this after arrival.
MIN_ALLOWANCE_S = 1.0


@dataclass
class Job:
    priority: int
    run: Callable[[], list]  # returns the reply's frames
    ident: bytes
    req_id: int
    expires: float  # monotonic
    done: Callable[[], None] | None = None  # on the socket's thread, after
    key: str | None = None  # the peer key that asked for it
    nbytes: int = 0  # its request's tensors, held while it waits


def expires_at(deadline: float | None) -> float:
    """The monotonic time after which work with this header `deadline` (caller's unix time)
    is not worth starting."""
    now = time.monotonic()
    if deadline is None:
        return float("inf")
    return now + max(deadline - time.time(), MIN_ALLOWANCE_S)


class ComputeThread:
    def __init__(self, zctx: zmq.Context, per_key: int = 64, per_key_bytes: int = 4 << 30):
        self.zctx = zctx
        self.per_key, self.per_key_bytes = per_key, per_key_bytes
        self._cond = threading.Condition()
        # per priority: each key's jobs, in the order its turn comes (the key served last goes last)
        self._lanes: tuple[OrderedDict[str | None, deque[Job]], ...] = (OrderedDict(), OrderedDict())
        self._held: dict[str | None, tuple[int, int]] = {}  # per key: jobs and bytes queued
        self._stopping = False
        self._finished: deque[tuple[Job, list]] = deque()
        self._wake_addr = f"inproc://compute-done-{id(self)}"
        self.wakeups = zctx.socket(zmq.PULL)  # polled by the socket's thread
        self.wakeups.setsockopt(zmq.LINGER, 0)
        self.wakeups.bind(self._wake_addr)
        self.busy_since: float | None = None  # monotonic start of the job running, if any
        self.shed = 0
        self.refused = 0
        self._thread = threading.Thread(target=self._run, name="compute", daemon=True)
        self._thread.start()

    def submit(self, priority: int, run: Callable[[], list], ident: bytes, req_id: int, deadline: float | None,
               done: Callable[[], None] | None = None, key: str | None = None, nbytes: int = 0) -> None:
        """Queue work for `key`; raises LimitError when that key has its most queued already."""
        with self._cond:
            jobs, held = self._held.get(key, (0, 0))
            if jobs >= self.per_key or (jobs and held + nbytes > self.per_key_bytes):
                self.refused += 1
                what = f"{jobs} requests" if jobs >= self.per_key else f"{(held + nbytes) / 2**20:.0f} MiB of requests"
                raise LimitError(f"this key has {what} waiting for compute here, the most allowed "
                                 "(serve.limits.queued_per_key, queued_bytes_per_key)")
            self._held[key] = (jobs + 1, held + nbytes)
            lane = self._lanes[priority]
            if key not in lane:
                lane[key] = deque()
            lane[key].append(Job(priority, run, ident, req_id, expires_at(deadline), done, key, nbytes))
            self._cond.notify()

    def queued(self) -> int:
        with self._cond:
            return sum(jobs for jobs, _ in self._held.values())

    def _take(self) -> Job | None:
        """The next job (None: stop), waiting for one."""
        with self._cond:
            while not self._stopping and not any(self._lanes):
                self._cond.wait()
            if self._stopping:
                return None
            lane = next(lane for lane in self._lanes if lane)
            key, jobs = lane.popitem(last=False)
            job = jobs.popleft()
            if jobs:
                lane[key] = jobs  # its next job waits for the other keys' turns
            n, held = self._held.pop(key)
            if n > 1:
                self._held[key] = (n - 1, held - job.nbytes)
            return job

    def finished(self) -> list[tuple[Job, list]]:
        """On the socket's thread: the jobs done since the last call, with their replies."""
        while True:
            try:
                self.wakeups.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        out = []
        while self._finished:
            out.append(self._finished.popleft())
        return out

    def stop(self) -> None:
        with self._cond:  # the job running finishes; none queued starts
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=5)
        self.wakeups.close(0)

    def _run(self) -> None:
        wake = self.zctx.socket(zmq.PUSH)
        wake.setsockopt(zmq.LINGER, 0)
        wake.connect(self._wake_addr)
        try:
            while True:
                job = self._take()
                if job is None:
                    return
                if time.monotonic() > job.expires:
                    self.shed += 1
                    reply = error_reply(job.req_id, LimitError("the caller's deadline passed while this request "
                                                               "waited for compute: not run"))
                else:
                    self.busy_since = time.monotonic()
                    try:
                        reply = job.run()
                    except Exception as e:  # run() makes its own error replies: this is a bug, one request's
                        log.exception("request %s failed", job.req_id)
                        reply = error_reply(job.req_id, e)
                    finally:
                        self.busy_since = None
                self._finished.append((job, reply))
                try:
                    wake.send(b"", zmq.NOBLOCK)
                except zmq.Again:  # the socket's thread has wake-ups queued: it will look anyway
                    pass
        finally:
            wake.close(0)
