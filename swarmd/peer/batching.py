"""Decode steps of different sessions run as one batch (`serve.batch_window_ms`): the weights
are read once for all of them, which is where a shared server's throughput comes from.
`StepBatch` alone decides which steps may join a batch, how long the first one waits for the
others (the window, by default half a step's measured time, and not for a session whose next
step is due later, by the pace of its steps here), and what happens when a batch fails (each
step runs again alone, so that only a step at fault fails)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from libswarm.errors import SessionError
from libswarm.protocol import ok_reply
from libswarm.protocol.registry import PeerStep
from swarmd.peer.owner import Owner
from swarmd.peer.records import BatchedStep, ServerSession

log = logging.getLogger("swarmd.peer")

MAX_BATCH_ROWS = 64  # rows (sessions' batches together) of one batched decode step
DEFAULT_WINDOW_S = 0.002  # serve.batch_window_ms: auto, before a step's time is measured...
MAX_AUTO_WINDOW_S = 0.050  # ...and at most, whatever a step takes
ACTIVE_S = 1.0  # a session that stepped this recently, and is due again within the window, is waited for


class StepBatch:
    def __init__(self, server: Owner, window_s: float | None, observe: Callable[[float], None],
                 run_one: Callable[[ServerSession, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
                 finish: Callable[[ServerSession, PeerStep, torch.Tensor, torch.Tensor], tuple]):
        """`window_s`: how long a decode step may wait for other sessions' steps (0: never
        batched; None: half a step's time, as measured); `observe(seconds)`: the step-time
        histogram; `run_one` and `finish`: a step's run alone and its reply (steps.py)."""
        self.server, self.window_s, self.observe = server, window_s, observe
        self.run_one, self.finish = run_one, finish
        self.items: list[BatchedStep] = []
        self.since = 0.0  # monotonic: when its first step came
        self.step_s: float | None = None  # a decode step's time lately (the window's default)
        # session id -> (monotonic time of its latest step here, the time between its steps here lately)
        self.stepped: dict[str, tuple[float, float | None]] = {}

    def __bool__(self) -> bool:
        return bool(self.items)

    def batchable(self, s: ServerSession, req: PeerStep, x: torch.Tensor | None) -> bool:
        """A plain decode step (one position, no adapter, no cut-back or beam reordering, not a
        repeat), with batching on, on blocks whose rows do not affect each other's outputs."""
        return (self.window_s != 0 and self.server.span.rows_independent
                and x is not None and x.ndim == 3 and x.shape[1] == 1 and s.lora is None
                and req.start is None and req.beam_order is None
                and not (req.step is not None and req.step == s.last_step))

    def add(self, item: BatchedStep) -> None:
        if not self.items:
            self.since = time.monotonic()
        self.items.append(item)
        item.session.in_batch = True

    def deadline(self) -> float:
        window = self.window_s
        if window is None:
            window = min(MAX_AUTO_WINDOW_S, 0.5 * self.step_s) if self.step_s is not None else DEFAULT_WINDOW_S
        return self.since + window

    def due(self) -> bool:
        """Run the batch now: it is full, its first step has waited the window, or no session
        missing from it is due here before the window closes (by the pace of its steps here:
        a session whose next step is further off, being elsewhere in its route, is not waited for)."""
        now = time.monotonic()
        deadline = self.deadline()
        if now >= deadline or sum(b.hidden.shape[0] for b in self.items) >= MAX_BATCH_ROWS:
            return True
        waiting = {b.session.id for b in self.items}
        for sid, (last, period) in list(self.stepped.items()):
            if sid in waiting or period is None or now - last > min(ACTIVE_S, 2 * period):
                continue
            if last + period <= deadline:
                return False
        return True

    def paced(self, sid: str) -> None:
        """A step of session `sid` ran: the pace of its steps here."""
        now = time.monotonic()
        last = self.stepped.get(sid)
        if last is None or now - last[0] > ACTIVE_S:
            self.stepped[sid] = (now, None)
        else:
            pace = now - last[0]
            self.stepped[sid] = (now, pace if last[1] is None else 0.7 * last[1] + 0.3 * pace)

    def forget_idle(self, now: float) -> None:
        for sid, (t, _) in list(self.stepped.items()):
            if now - t > ACTIVE_S:
                self.stepped.pop(sid, None)

    def timed(self, seconds: float, **counts: int) -> None:
        self.observe(seconds)
        self.step_s = seconds if self.step_s is None else 0.8 * self.step_s + 0.2 * seconds
        self.server.count(**counts)

    def run(self) -> None:
        """Run the gathered steps: one batch per span and block range, each reply and push to its
        own next hop. A session closed meanwhile gets an error; a batch that fails is run again
        one step at a time, so that only a step at fault fails."""
        srv = self.server
        items, self.items = self.items, []
        groups: dict[tuple[int, int, int], list[BatchedStep]] = {}
        for b in items:
            b.session.in_batch = False
            if srv.sessions.get(b.session.id) is not b.session:
                err = SessionError(f"session {b.session.id[:8]} was closed while its step waited")
                srv.send(b.ident, srv.error_reply(b.req_id, b.sender, err), b.req_id)
                continue
            c = b.session.cache
            groups.setdefault((id(b.session.span), c.first, c.last), []).append(b)
        for group in groups.values():
            outs = self._run_group(group) if len(group) > 1 else None
            for k, b in enumerate(group):
                try:
                    out = outs[k] if outs is not None else self.run_one(b.session, b.hidden, b.pos, b.mask)
                    fields, tensors = self.finish(b.session, b.req, out, b.hidden)
                    reply = ok_reply(b.req_id, fields, tensors, frame_bytes=b.req.msg.frame_bytes)
                except Exception as e:
                    reply = srv.error_reply(b.req_id, b.sender, e)
                srv.send(b.ident, reply, b.req_id)

    def _run_group(self, group: list[BatchedStep]) -> list[torch.Tensor] | None:
        """The outputs of one batch of steps on the host, or None when it failed: then every
        cache is back where it was, so that each step runs again alone from there (the caches
        advance inside run_steps, before the host copy, which can fail on a GPU too)."""
        marks = [b.session.cache.mark() for b in group]
        t0 = time.perf_counter()
        try:
            span, c = group[0].session.span, group[0].session.cache
            outs = span.run_steps([(b.hidden, b.pos, b.mask, b.session.cache) for b in group], c.first, c.last)
            if outs[0].device.type != "cpu":  # one copy to the host for the whole batch
                outs = list(torch.cat(outs).cpu().split([o.shape[0] for o in outs]))
            self.timed(time.perf_counter() - t0, runs=1, batched_steps=len(group))
            return outs
        except Exception as e:
            log.warning("a batch of %d steps failed (%s); running them one at a time", len(group), e)
            for b, mark in zip(group, marks):
                b.session.cache.rewind(mark)
            return None
