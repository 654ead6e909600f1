"""Server-to-server pushes (protocol.md, `push`): what this server sends to the next hop of a
route, and what it takes from the previous one. `Pushes` alone decides whether an output goes
out (only to a known peer with the named key, never waiting), whether a push that comes may be
a waiting step's input (from the hop the step named, the size of a step of that session), and
how long a step waits for its push; pushes that come before their step are kept by early.py."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from libswarm.errors import LimitError, ProtocolError, SessionError, TensorError
from libswarm.protocol import error_reply
from libswarm.protocol.registry import PeerStep, Push
from libswarm.protocol.tensors import tensor_digest
from swarmd.identity import is_key, short_id
from swarmd.inputs import FLOAT_DTYPES
from swarmd.peer.owner import Owner
from swarmd.peer.records import PendingStep, ServerSession

# A step waiting for its push (or a push waiting for its step) is dropped after this long: the
# gateway has long given up on it by then and resent the step from its history.
PENDING_TIMEOUT_S = 60.0
MAX_PENDING = 4096  # bounds the steps waiting for pushes, over all sessions


class Pushes:
    def __init__(self, server: Owner, run_waiting: Callable[[PendingStep, torch.Tensor], None]):
        """`run_waiting(step, hidden)`: run a step whose push came (steps.py)."""
        self.server = server
        self.run_waiting = run_waiting
        self.pending: dict[tuple[str, int | None], PendingStep] = {}

    # --- out: to the next hop ------------------------------------------------------------------
    def send(self, nxt: object, step: object, out: torch.Tensor) -> bool:
        """Send this span's output straight to the next server of the route. Only to a tcp
        address that a known peer with that key answers at, and never waiting: a peer not
        connected yet (or gone) gets False, and the gateway hands the output over itself (the
        connection is being made for the next step meanwhile)."""
        srv = self.server
        if not (isinstance(nxt, dict) and isinstance(nxt.get("address"), str) and isinstance(nxt.get("session"), str)
                and is_key(nxt.get("key"))):
            raise ProtocolError("step: 'next' must be {address, key, session}")
        address, key = nxt["address"], nxt["key"]
        if not address.startswith("tcp://") or srv.resolve_key(address) != key:
            srv.quiet_log.info(("next", address), "push to %s not sent: no known peer with key %s answers there",
                               address[:80], short_id(key))
            return False
        if not srv.access.allows(key):
            srv.quiet_log.info(("next", address), "push to %s not sent: its key is not allowed in this private "
                               "swarm", address)
            return False
        conn = srv.peers.get(address, key)
        if conn.push("push", {"session": nxt["session"], "step": step}, {"hidden": out}, wait_s=0.0):
            srv.count(pushes_sent=1)
            return True
        srv.quiet_log.info(("next", address), "push to %s not delivered: peer not connected", address)
        return False

    # --- in: from the previous hop --------------------------------------------------------------
    def wait(self, s: ServerSession, req: PeerStep) -> None:
        """Leave step `req` of `s` waiting for its push; answered when it comes (or expires)."""
        if len(self.pending) >= MAX_PENDING:
            raise LimitError("too many steps waiting for pushes")
        # one step of a session waits at a time (any other was let go before): a key holds no
        # more waiting steps than it has sessions open here
        s.waiting_step = req.step
        self.pending[(s.id, req.step)] = PendingStep(*self.server.current, s, req)

    def replaced(self, s: ServerSession, step: int | None, ident: bytes) -> None:
        """A step resent with its input (its push was lost) replaces the request waiting for that push."""
        waiting = self.pending.pop((s.id, step), None)
        if waiting is not None and waiting.ident != ident:
            err = SessionError("step superseded by a resend with its input")
            self.server.send(waiting.ident, error_reply(waiting.req_id, err), waiting.req_id)

    def unwait(self, s: ServerSession, why: str, keep: object = None) -> None:
        """The session's step waiting for its push, if any (other than step `keep`), answered
        with a session error."""
        if s.waiting_step is None or s.waiting_step == keep:
            return
        p = self.pending.pop((s.id, s.waiting_step), None)
        s.waiting_step = None
        if p is not None:
            self.server.send(p.ident, error_reply(p.req_id, SessionError(f"step {p.req.step}: {why}")), p.req_id)

    def expire(self, now: float) -> None:
        for key, p in list(self.pending.items()):
            if now - p.created > PENDING_TIMEOUT_S:
                del self.pending[key]
                err = SessionError("the previous server's push never arrived")
                self.server.send(p.ident, error_reply(p.req_id, err), p.req_id)
        self.server.early.expire(now - PENDING_TIMEOUT_S, lambda sid: sid in self.server.sessions)

    def on_push(self, req: Push, sender: str | None) -> None:
        """A push is never answered: one that cannot be a step's input is dropped (or, when the
        step waiting for it named its sender, refuses that step naming the input)."""
        srv, hidden, step = self.server, req.hidden, req.step
        session = srv.sessions.get(req.session)
        if session is not None and not _fits_step(hidden, session):
            waiting = self.pending.get((session.id, step))
            if waiting is not None and _push_from(waiting.req, sender):
                # the route's previous hop pushed what cannot be this step's input: the step is
                # refused naming that input, so that its gateway blames the pusher, not this server
                del self.pending[(session.id, step)]
                session.waiting_step = None
                err = TensorError(f"step {step}: the previous hop pushed {str(hidden.dtype)[6:]} "
                                  f"{list(hidden.shape)[:8]}, not a step of this session")
                err.consumed = tensor_digest(hidden)
                srv.send(waiting.ident, srv.error_reply(waiting.req_id, waiting.sender, err), waiting.req_id)
                return
        if session is None or not _fits_step(hidden, session):
            # made up, malformed or larger than any step of the session: dropped at once
            srv.quiet_log.info((sender, "push"), "push from %s dropped: no such session, or not a step of it",
                               short_id(sender))
            return
        key = (session.id, step)
        srv.count(pushes_received=1)
        waiting = self.pending.get(key)
        if waiting is not None and not _push_from(waiting.req, sender):
            return  # not from the route's previous hop
        self.pending.pop(key, None)
        if waiting is None:
            if session.last_step == step:
                return  # a second push of a step already run (a resend after a failure): nothing to do
            try:
                srv.early.keep(session, step, hidden, sender)
            except LimitError as e:
                srv.quiet_log.info((sender, "early push"), "push from %s for step %s of session %s dropped: %s",
                                   short_id(sender), step, session.id[:8], e)
            return
        waiting.session.last_used = time.monotonic()
        self.run_waiting(waiting, hidden)


def _push_from(step: PeerStep, sender: str | None) -> bool:
    """Whether a push from `sender` may be this step's input: the gateway names the previous
    hop's key in `from` (older gateways do not: then any sender)."""
    return step.from_ is None or step.from_ == sender


def _fits_step(hidden: torch.Tensor, s: ServerSession) -> bool:
    """Whether `hidden` could be a step's input for session `s` (its batch, at most the positions
    it has left, the span's width): anything else is refused before it is kept."""
    return (hidden.dtype in FLOAT_DTYPES and hidden.ndim == 3 and hidden.shape[0] == s.cache.batch
            and 0 < hidden.shape[1] <= s.cache.max_length - s.cache.length and hidden.shape[2] == s.span.hidden_size)

