"""A session's decode and prefill steps on a span server. `Steps` alone decides where a step
runs (small ones here and now on the socket's thread, or in the batch being gathered; large
ones, and those of a session with work queued, on the compute thread after it: a session's
steps never overlap), what a repeated step gets (its answer again, the cache not advanced
twice), and what a step's reply says (`position`, `consumed`: the digest of the input it ran
on, so that the gateway can tell a push it never saw; `pushed: false` when the output could
not go to the next hop)."""

from __future__ import annotations

import contextlib
import time

import torch

from libswarm.errors import ProtocolError, SwarmError, TensorError
from libswarm.protocol import ok_reply
from libswarm.protocol.registry import PeerStep, Stepped
from libswarm.protocol.tensors import tensor_digest
from swarmd.inputs import beam_order, span_inputs
from swarmd.peer.batching import StepBatch
from swarmd.peer.compute import STEP
from swarmd.peer.owner import DEFERRED, Owner
from swarmd.peer.pushes import Pushes
from swarmd.peer.records import BatchedStep, PendingStep, ServerSession
from swarmd.peer.sessions import Sessions

INLINE_MAX_TOKENS = 32  # a step of at most this many tokens (batch x length) runs on the socket's thread


class Steps:
    def __init__(self, server: Owner, sessions: Sessions, window_s: float | None, observe):
        self.server, self.sessions = server, sessions
        # the batch and the pushes call back into this room late-bound, so that a failpoint that
        # replaces `finish` or `push` (tests only) replaces it everywhere
        self.batch = StepBatch(server, window_s, observe, lambda *a: self.run(*a), lambda *a: self.finish(*a))
        self.pushes = Pushes(server, self._pushed)
        self.push = self.pushes.send

    def on_step(self, req: PeerStep):
        s = self.sessions.of_caller(req.session)
        step = req.step
        repeat = s.queued == 0 and step is not None and step == s.last_step and s.last_output is not None
        if not repeat:
            # a route runs a session's steps in turn: a step of another number (a rerun from the
            # gateway's own copy of its input, after a push it could not vouch for) makes the one
            # still waiting for its push moot. Left waiting, a late push would run it after the rerun
            self.pushes.unwait(s, f"superseded by step {step} of its session", keep=step)
        if not repeat and req.hidden is None and req.expect_push:
            if req.from_ is not None:
                self.server.early.named(s, req.from_)
            pushed = self.server.early.take(s, step, req.from_)
            if pushed is None:  # the previous server has not pushed yet: answer when it does
                self.pushes.wait(s, req)
                return DEFERRED
            return self.dispatch(s, req, pushed, *self.server.current)
        return self.dispatch(s, req, None, *self.server.current)

    def _pushed(self, waiting: PendingStep, hidden: torch.Tensor) -> None:
        """The push a waiting step needed came: the step runs, and is answered, now or when done."""
        srv = self.server
        try:
            result = self.dispatch(waiting.session, waiting.req, hidden, waiting.ident, waiting.req_id, waiting.sender)
            if result is DEFERRED:
                return
            fields, tensors = result  # type: ignore[misc]
            reply = ok_reply(waiting.req_id, fields, tensors, frame_bytes=waiting.req.msg.frame_bytes)
        except Exception as e:
            reply = srv.error_reply(waiting.req_id, waiting.sender, e)
        srv.send(waiting.ident, reply, waiting.req_id)

    def dispatch(self, s: ServerSession, req: PeerStep, hidden: torch.Tensor | None, ident: bytes, req_id: int,
                 sender: str | None):
        """Run a step here and now when it is small and its session has nothing queued, else on
        the compute thread (after any earlier step of its session: a session's steps never
        overlap)."""
        self.pushes.replaced(s, req.step, ident)
        if s.in_batch:  # its earlier step runs first: a session's steps never overlap
            self.batch.run()
        x = hidden if hidden is not None else req.hidden
        tokens = x.shape[0] * x.shape[1] if x is not None and x.ndim == 3 else 0
        if s.queued == 0 and tokens <= INLINE_MAX_TOKENS:
            if self.batch.batchable(s, req, x):
                return self._gather(s, req, hidden, ident, req_id, sender)
            return self.step(s, req, hidden)

        def done() -> None:
            s.queued -= 1
        deferred = self.server.defer(STEP, lambda: self.step(s, req, hidden), ident, req_id, sender, req, done)
        s.queued += 1  # once queued (a refused step never runs, and never calls done)
        return deferred

    def step(self, s: ServerSession, req: PeerStep, hidden: torch.Tensor | None):
        """A step's computation, on whichever thread runs it: a repeat of the last step gets its
        answer again, anything else runs the blocks."""
        if req.step is not None and req.step == s.last_step and s.last_output is not None:
            return self._repeat(s, req)
        with _naming_input(req, hidden):
            return self.run_step(s, req, hidden)

    def _inputs(self, s: ServerSession, req: PeerStep, hidden: torch.Tensor | None):
        x = hidden if hidden is not None else req.hidden
        if x is None:
            raise TensorError("step: tensor 'hidden' is missing")
        return span_inputs(req.msg, x, self.server.span.hidden_size)

    def _gather(self, s: ServerSession, req: PeerStep, hidden: torch.Tensor | None, ident: bytes, req_id: int,
                sender: str | None) -> object:
        """Check a decode step now (a bad one is refused at once, alone) and keep it for the batch."""
        with _naming_input(req, hidden):
            hidden, pos, mask = self._inputs(s, req, hidden)
            s.cache.check_step(hidden.shape[0], 1)
        if pos is None:
            pos = torch.full((hidden.shape[0], 1), s.cache.length)
        self.batch.add(BatchedStep(s, req, hidden, pos, mask, ident, req_id, sender))
        return DEFERRED

    def run_step(self, s: ServerSession, req: PeerStep, hidden: torch.Tensor | None):
        hidden, pos, mask = self._inputs(s, req, hidden)
        B, T, _ = hidden.shape
        start = req.start
        if start is not None:  # the session was cut back (rejected drafts): the step starts there
            if not isinstance(start, int) or isinstance(start, bool):
                raise ProtocolError("step: 'start' must be an integer position")
            s.cache.truncate(start)
        s.cache.check_step(B, T)
        order = beam_order(req.msg, B)
        if order is not None:
            s.cache.reorder(order)
        if pos is None:
            pos = torch.arange(s.cache.length, s.cache.length + T).expand(B, T)
        return self.finish(s, req, self.run(s, hidden, pos, mask), hidden)

    def run(self, s: ServerSession, hidden: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None
            ) -> torch.Tensor:
        t0 = time.perf_counter()
        out = s.span.run(hidden, pos, mask, s.cache.first, s.cache.last, cache=s.cache, lora=s.lora)
        self.batch.timed(time.perf_counter() - t0, runs=1)
        return out

    def finish(self, s: ServerSession, req: PeerStep, out: torch.Tensor, x: torch.Tensor
               ) -> tuple[Stepped, dict[str, torch.Tensor]]:
        """A step's output: kept for a repeat, pushed to the next hop, and the reply's content,
        which names the input `x` it ran on (`consumed`: the gateway compares it with what the
        previous hop returned, so that a push it never saw cannot go unnoticed)."""
        if out.device.type != "cpu":
            out = out.cpu()  # once: the push, the reply and a repeat all send this copy
        self.server.count(steps=1, tokens=out.shape[0] * out.shape[1])
        self.batch.paced(s.id)
        consumed = tensor_digest(x)
        s.last_step, s.last_output, s.last_consumed = (req.step, out, consumed) if req.step is not None \
            else (None, None, None)
        pushed = self.push(req.next, req.step, out) if req.next is not None else None
        fields: Stepped = {"position": s.cache.length, "consumed": consumed}
        if pushed is False:
            fields["pushed"] = False  # the gateway sends `out` to the next server itself
        return fields, {"hidden": out}

    def _repeat(self, s: ServerSession, req: PeerStep) -> tuple[Stepped, dict[str, torch.Tensor]]:
        """A step already run (the gateway resent it after a failure elsewhere): same answer."""
        assert s.last_output is not None and s.last_consumed is not None  # kept together
        fields: Stepped = {"position": s.cache.length, "repeated": True, "consumed": s.last_consumed}
        if req.next is not None and not self.push(req.next, s.last_step, s.last_output):
            fields["pushed"] = False
        return fields, {"hidden": s.last_output}


@contextlib.contextmanager
def _naming_input(req: PeerStep, hidden: torch.Tensor | None):
    """A step refused for its input (its shape against its position ids, its length against
    the positions left) names the input it was given (`consumed`): when that came by push, the
    gateway can tell that the fault is the pusher's, not this server's."""
    try:
        yield
    except SwarmError as e:
        x = hidden if hidden is not None else req.hidden
        if e.consumed is None and isinstance(x, torch.Tensor):
            e.consumed = tensor_digest(x)
        raise
