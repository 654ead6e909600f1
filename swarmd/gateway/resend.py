"""When a request a server has not answered is sent to it again, and when it is given up on:
a step (or an open) unanswered for well past what this gateway's timings of that server say
is its usual pace is resent at doubling intervals, up to MAX_RESENDS times, all within the
deadline it had when sent once. Counts the resends (`swarmctl status`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from libswarm.protocol import Message
from swarmd.gateway.history import StepTimes
from swarmd.transport.connection import NoAnswerInTime, PeerConnection

log = logging.getLogger("swarmd.gateway")

MAX_RESENDS = 6  # times a step is sent again to the same server (all within its deadline)


class Resender:
    def __init__(self, step_times: StepTimes):
        self.step_times = step_times
        self.count = 0  # steps sent again to the same server after no answer in time
        self._lock = threading.Lock()

    def await_reply(self, address: str, first: tuple[PeerConnection, int],
                    resend: Callable[[], tuple[PeerConnection, int]], since: float, deadline: float,
                    tokens: int, what: str = "step") -> tuple[Message, int]:
        """The reply to a step sent to `address` at `since` (`first`: its connection and request
        id), and how many times it was sent again. A step unanswered for what this gateway's
        timings of that server say is well past its usual pace (StepTimes.resend_s) is resent by
        `resend`, at doubling intervals, up to MAX_RESENDS times: a server answers a step it ran
        from its last output, and takes a resent input in place of a lost push, so a lost message
        costs about two usual steps instead of the hop's deadline, a failover and a replay. The
        deadline is the one a step sent once had: a hung server is noticed no later than before,
        and one whose connection drops at once, as before."""
        conn, req_id = first
        interval = self.step_times.resend_s(address, tokens)
        next_at = deadline if interval is None else since + interval
        resends = 0
        while True:
            try:
                return conn.receive(req_id, min(deadline, next_at), what), resends
            except NoAnswerInTime:
                if next_at >= deadline or interval is None:
                    raise
            resends += 1
            with self._lock:
                self.count += 1
            log.debug("server %s: step not answered in %.0f ms; sent again", address, interval * 1000)
            interval *= 2
            # after the last resend, the rest of the deadline: a server slowed down for a while (a
            # loaded machine, a long prefill) is not given up on sooner than a step sent once was
            next_at = time.monotonic() + interval if resends < MAX_RESENDS else deadline
            conn, req_id = resend()
