"""The peer plane's compute thread: runs the work too long for the thread that owns the socket.

The socket's thread answers gossip, ping, info, open and close itself, and runs small decode
steps inline (a hand-off would cost more than the step). Everything longer (forward and
backward passes, prefills) comes here, so that liveness never waits on compute: a 3 s forward
no longer makes the server miss gossip and get dropped from every route.

Work is taken by priority: inference steps before forward/backward passes (a user waiting for a
token goes before a training batch), first come first served within a priority. Work whose
caller has stopped waiting (its `deadline` passed while queued) is shed unrun.

Finished work goes back to the socket's thread, which alone may send on the socket: a queue
of (job, reply frames) and one inproc message to wake it."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from libswarm.errors import LimitError
from libswarm.protocol import error_reply

log = logging.getLogger("swarmd.peer")

STEP, PASS = 0, 1  # priorities: inference steps, then forward/backward passes
# A request's deadline is the caller's clock: a server may be seconds off. Work is shed only
# after the time it had left on arrival, and never sooner than this after arrival.
MIN_ALLOWANCE_S = 1.0


@dataclass(order=True)
class Job:
    priority: int
    seq: int
    run: Callable[[], list] = field(compare=False)  # returns the reply's frames
    ident: bytes = field(compare=False)
    req_id: int = field(compare=False)
    expires: float = field(compare=False)  # monotonic
    done: Callable[[], None] | None = field(compare=False, default=None)  # on the socket's thread, after


def expires_at(deadline: float | None) -> float:
    """The monotonic time after which work with this header `deadline` (caller's unix time)
    is not worth starting."""
    now = time.monotonic()
    if deadline is None:
        return float("inf")
    return now + max(deadline - time.time(), MIN_ALLOWANCE_S)


class ComputeThread:
    def __init__(self, zctx: zmq.Context):
        self.zctx = zctx
        self._queue: queue.PriorityQueue[Job] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._finished: deque[tuple[Job, list]] = deque()
        self._wake_addr = f"inproc://compute-done-{id(self)}"
        self.wakeups = zctx.socket(zmq.PULL)  # polled by the socket's thread
        self.wakeups.setsockopt(zmq.LINGER, 0)
        self.wakeups.bind(self._wake_addr)
        self.busy_since: float | None = None  # monotonic start of the job running, if any
        self.shed = 0
        self._thread = threading.Thread(target=self._run, name="compute", daemon=True)
        self._thread.start()

    def submit(self, priority: int, run: Callable[[], list], ident: bytes, req_id: int, deadline: float | None,
               done: Callable[[], None] | None = None) -> None:
        self._queue.put(Job(priority, next(self._seq), run, ident, req_id, expires_at(deadline), done))

    def queued(self) -> int:
        return self._queue.qsize()

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
        self._queue.put(Job(-1, -1, lambda: [], b"", 0, 0.0))  # first in line: the thread ends
        self._thread.join(timeout=5)
        self.wakeups.close(0)

    def _run(self) -> None:
        wake = self.zctx.socket(zmq.PUSH)
        wake.setsockopt(zmq.LINGER, 0)
        wake.connect(self._wake_addr)
        try:
            while True:
                job = self._queue.get()
                if job.priority < 0:
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
