"""The gateway role: runs apps' inference sessions across a chain of servers, and keeps them
going when servers fail. This module decides what happens to an app's session: opened,
stepped, rebuilt or repaired when a step fails, closed. How one step runs along the route is
chain.py's; opening and replaying spans, spans.py's; resending an unanswered step, resend.py's;
checking servers' outputs, checks.py's; training passes, training.py's; routes, router.py's.

Failover follows the dual cache: servers hold the attention caches, the gateway holds every
input it sent to each span (History). When a server fails during a step, the gateway bans it,
picks servers that cover its blocks (one or several), opens sessions there, replays the span's
history to rebuild their caches, and finishes the step. The app sees a slower token, never a
different one: replayed inputs are the exact tensors first sent, and every server's reply
states its cache position, which the gateway checks."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from libswarm.errors import LimitError, RemoteError, SessionError, SwarmError, WrongOutputError
from libswarm.protocol import registry
from swarmd.discovery.membership import Membership
from swarmd.discovery.table import PeerTable
from swarmd.gateway.chain import HopFailure, PushDispute, StepChain
from swarmd.gateway.checks import LieDetected, OutputChecks
from swarmd.gateway.history import History
from swarmd.gateway.resend import Resender
from swarmd.gateway.router import Router, refused, retriable, route_json, route_text, route_timeout
from swarmd.gateway.sessions import GatewaySession
from swarmd.gateway.spans import SpanOpener
from swarmd.gateway.training import TrainingChains, adapter_name
from swarmd.gateway.verify import DEFAULT_VERIFY_PROBABILITY, ImplausibleOutput
from swarmd.routing import Hop
from swarmd.transport.connection import ConnectionPool

log = logging.getLogger("swarmd.gateway")

APP_IDLE_TIMEOUT_S = 600.0  # an app session untouched this long is closed
MAX_WRONG_OUTPUT_ROUTES = 64  # routes a step is tried on after wrong outputs (within its route timeout)
# Reruns of a step after disputed pushes: each one but the first after a failover marks a pusher
# or a receiver, whose link the gateway then bridges itself, so a route of n hops needs < 2n
MAX_PUSH_RERUNS = 16


class Gateway:
    """The local plane's handlers for apps: inference sessions here, training chains in
    training.py, both over one Router."""

    def __init__(self, *, model_id: str, num_layers: int, hidden_size: int, pool: ConnectionPool, table: PeerTable,
                 membership: Membership, status: Callable[[], dict], verify: str = "sample",
                 verify_probability: float = DEFAULT_VERIFY_PROBABILITY):
        self.model_id, self.num_layers, self.hidden_size = model_id, num_layers, hidden_size
        self.router = Router(model_id=model_id, num_layers=num_layers, hidden_size=hidden_size, pool=pool,
                             table=table, membership=membership)
        self.training = TrainingChains(self.router)
        self.resender = Resender(self.router.step_times)
        self.opener = SpanOpener(self.router, self.resender)
        self.chain = StepChain(self.router, self.resender)
        self.checks = OutputChecks(self.router, self.opener, self.chain, verify, verify_probability)
        self.membership = membership
        self.status_fn = status
        self.sessions: dict[str, GatewaySession] = {}
        self.failovers = 0
        self.last_failover: dict = {}  # when and how long the phases of the latest failover took
        self._lock = threading.Lock()
        # request type -> handler of its typed request (libswarm.protocol.registry.LOCAL)
        self.handlers: dict[str, Callable[[Any], tuple[Mapping[str, Any], dict | None]]] = {
            "status": lambda m: (self.status_fn(), None),
            "peers": lambda m: ({"peers": self.router.annotate(self.membership.rows())}, None),
            "model_info": self.on_model_info,
            "open": self.on_open,
            "step": self.on_step,
            "close": self.on_close,
            "forward": self.training.on_forward,
            "backward": self.training.on_backward,
        }

    @property
    def resends(self) -> int:
        """Steps sent again to the same server after no answer in time."""
        return self.resender.count

    # Kept on the gateway, though spans.py and checks.py do the work: the handlers (on_open,
    # on_close) and the failover below open spans and close shadows by these names
    def _open_span(self, first: int, last: int, *, max_length: int, batch: int, deadline: float,
                   history: History | None, adapter: str | None = None, avoid: frozenset[str] = frozenset()
                   ) -> tuple[list[Hop], list[str], dict[int, torch.Tensor], float]:
        """Sessions on servers covering [first, last), replayed from `history` (SpanOpener.open)."""
        return self.opener.open(first, last, max_length=max_length, batch=batch, deadline=deadline,
                                history=history, adapter=adapter, avoid=avoid)

    def _close_shadows(self, sess: GatewaySession) -> None:
        """With strict verification: the session's shadows closed on their servers."""
        self.checks.close_shadows(sess)

    # --- handlers --------------------------------------------------------------------------
    def on_model_info(self, req: registry.ModelInfo) -> tuple[registry.ModelInfoReply, None]:
        return {"model_id": self.model_id, "num_layers": self.num_layers, "hidden_size": self.hidden_size}, None

    def on_open(self, req: registry.Open) -> tuple[registry.SessionOpened, None]:
        self.router.check_model(req.model_id)
        max_length, batch = req.max_length, req.batch
        if max_length <= 0 or batch <= 0:
            raise LimitError("max_length and batch must be positive")
        route_timeout_s = route_timeout(req.route_timeout_s)
        deadline = time.monotonic() + route_timeout_s
        adapter = adapter_name(req.adapter)
        hops, sids, _, _ = self._open_span(0, self.num_layers, max_length=max_length, batch=batch, deadline=deadline,
                                        history=None, adapter=adapter)
        sess = GatewaySession(secrets.token_hex(12), batch, max_length, hops, sids, route_timeout_s=route_timeout_s,
                              push=req.push is not False, adapter=adapter, since=[0] * len(hops))
        with self._lock:
            self.sessions[sess.id] = sess
        log.info("session %s opened over %s", sess.id[:8], route_text(hops))
        return {"session": sess.id, "route": route_json(hops)}, None

    def _app_session(self, sid: str) -> GatewaySession:
        sess = self.sessions.get(sid)
        if sess is None:
            raise SessionError(f"unknown or closed session {sid!r}")
        sess.last_used = time.monotonic()
        return sess

    def on_step(self, req: registry.Step) -> tuple[registry.SessionStepped, dict[str, torch.Tensor]]:
        sess = self._app_session(req.session)
        tensors = self.router.tensors(req.msg)
        B, T, _ = tensors["hidden"].shape
        if B != sess.batch:
            raise SessionError(f"step has batch {B} but the session was opened with batch {sess.batch}")
        start = req.start
        if start is not None and (not isinstance(start, int) or isinstance(start, bool)
                                  or not 0 <= start <= sess.position):
            raise SessionError(f"step: 'start' must be a position within 0..{sess.position}, got {start!r}")
        at = sess.position if start is None else start  # a step that cuts back drafts starts there
        if at + T > sess.max_length:
            raise LimitError(
                f"step of {T} positions at position {at} passes the session's max_length {sess.max_length}")
        with sess.lock:
            if start is not None and start < sess.position:  # cut back: drafts the app rejected
                sess.history.truncate(start)
                sess.position = start
                sess.cut = start
            if req.position_ids is None:
                tensors["position_ids"] = tensors["position_ids"] + sess.position
            try:
                out = self._step(sess, tensors)
            finally:
                sess.cut = None
        return {"position": sess.position, "route": route_json(sess.hops)}, {"hidden": out}

    def _step(self, sess: GatewaySession, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        deadline = time.monotonic() + sess.route_timeout_s
        for _ in range(MAX_WRONG_OUTPUT_ROUTES):  # each round distrusts a server: it ends
            if sess.broken:
                self._rebuild(sess)
            try:
                return self._step_once(sess, tensors)
            except LieDetected:
                # a server's output was wrong and later hops ran on it: their caches hold this
                # step's positions computed from it. The history holds only checked steps:
                # rebuild the route from it (the liar is distrusted now) and run the step again
                sess.broken = True
                if time.monotonic() > deadline:
                    break
            except BaseException:
                # some servers may have cached this step's positions and others not: the history,
                # which holds only completed steps, is the truth to rebuild from
                sess.broken = True
                raise
        raise WrongOutputError("the step's outputs kept being wrong over rebuilt routes")

    def _rebuild(self, sess: GatewaySession) -> None:
        """Fresh sessions on a fresh route, their caches replayed from the history."""
        old = list(zip(sess.hops, sess.server_sessions))
        deadline = time.monotonic() + sess.route_timeout_s
        hops, sids, outputs, _ = self._open_span(0, self.num_layers, max_length=sess.max_length, batch=sess.batch,
                                                 deadline=deadline, history=sess.history if sess.position else None,
                                                 adapter=sess.adapter)
        self.router.close_remote(old)
        self._close_shadows(sess)
        sess.hops, sess.server_sessions, sess.since = hops, sids, [sess.position] * len(hops)
        for boundary, out in outputs.items():
            sess.history.reset_boundary(boundary, out)
        sess.broken = False
        log.warning("session %s rebuilt over %s after a failed step", sess.id[:8], route_text(hops))

    def _step_once(self, sess: GatewaySession, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = tensors["hidden"]
        small = {k: v for k, v in tensors.items() if k != "hidden"}
        B, T, _ = hidden.shape
        step = sess.steps
        sess.steps += 1
        inputs: dict[int, torch.Tensor] = {0: hidden}  # block boundary -> this step's input there
        deadline = time.monotonic() + sess.route_timeout_s
        start, complaints = 0, set()  # codes of the errors hops failed this step with while computing or refused it
        joined: set[str] = set()  # servers that replaced failed ones during this step
        rollback, reruns = False, 0
        while True:
            try:
                outputs = self.chain.run(sess, start, inputs[sess.hops[start].first], small, step, B * T, joined,
                                         rollback)
            except PushDispute as d:
                # hop d.index (and every later one, fed from it) ran on an input the gateway never
                # saw: none of their outputs is used. They run the step again, cut back to where
                # it started, from the gateway's own copy of the input
                for k, out in d.outputs.items():
                    inputs[sess.hops[k].last] = out
                if d.suspect is not None:
                    self.router.pushes.suspect(d.suspect, d.why)
                else:
                    log.info("session %s: %s; running it again from the gateway's copy", sess.id[:8], d.why)
                if d.blind is not None:
                    self.router.pushes.blind(d.blind)
                reruns += 1
                if "beam_order" in small or reruns > MAX_PUSH_RERUNS or time.monotonic() > deadline:
                    # a rerun would reorder the beams of a cache twice: rebuild it from the history
                    raise LieDetected() from None
                step, rollback, start = sess.steps, True, d.index
                sess.steps += 1
                continue
            except HopFailure as f:
                for k, out in f.outputs.items():
                    inputs[sess.hops[k].last] = out
                if isinstance(f.error, ImplausibleOutput) and f.error.output is not None:
                    verdict = self.checks.second_opinion(sess, sess.hops[f.index], inputs[sess.hops[f.index].first],
                                                         f.error.output, small, str(f.error))
                    if verdict == "liar":
                        raise LieDetected() from None
                    if verdict == "confirmed":
                        # its output stands: the later hops run from it (those that ran on its
                        # push already answer `repeated`, with the same output)
                        inputs[sess.hops[f.index].last] = f.error.output
                        if f.index == len(sess.hops) - 1:
                            break
                        start = f.index + 1
                        continue
                    # unsettled: not used, and the server routed around for a while (banned,
                    # not distrusted), as if it had failed
                # a step that a replacement fails to compute or refuses too, in the same way, is
                # the step's fault (a query of death): back to the caller, rather than banning
                # server after server. Servers that fail in different ways are each at fault
                complaint = f.error.code if isinstance(f.error, RemoteError) or refused(f.error) else None
                if (not retriable(f.error) or complaint in complaints or time.monotonic() > deadline):
                    raise f.error from None
                if complaint is not None:
                    complaints.add(complaint)
                if isinstance(f.error, WrongOutputError):
                    # with push, the hops after it may have run on the wrong output already
                    self.router.fail(sess.hops[f.index], f.error)
                    raise LieDetected() from None
                joined.update(h.address for h in self._repair(sess, f.index, f.error, deadline))
                start = f.index
                continue
            for k, out in outputs.items():
                inputs[sess.hops[k].last] = out
            break
        if self.checks.mode == "strict":
            self.checks.cross_check(sess, inputs, small, step)
        # with sample, the final boundary too: the last hop's output, for spot checks of it
        final = [self.num_layers] if self.checks.mode == "sample" else []
        sess.history.append(inputs, [h.first for h in sess.hops] + final, small["position_ids"],
                            small.get("key_mask"), small.get("beam_order"))
        sess.position += T
        self.checks.sample(sess)
        return inputs[self.num_layers]

    def _repair(self, sess: GatewaySession, index: int, error: SwarmError, deadline: float) -> list[Hop]:
        """Replace hop `index` by servers covering its blocks, their caches rebuilt by replay;
        returns the new hops."""
        hop = sess.hops[index]
        detected_at = time.time()
        self.router.fail(hop, error)
        t0 = time.monotonic()
        history = sess.history if sess.position > 0 else None
        hops, sids, outputs, replay_s = self._open_span(
            hop.first, hop.last, max_length=sess.max_length, batch=sess.batch, deadline=deadline, history=history,
            adapter=sess.adapter)
        total_s = time.monotonic() - t0
        self.last_failover = {
            "detected_at": detected_at, "blocks": [hop.first, hop.last], "failed": hop.address,
            "replacements": route_json(hops), "reason": str(error), "replayed_positions": sess.position,
            "reroute_s": round(total_s - replay_s, 6), "replay_s": round(replay_s, 6),
        }
        # the failed server may be alive and only slow: its session is closed (from another thread)
        self.router.close_remote([(hop, sess.server_sessions[index])])
        sess.hops[index:index + 1] = hops
        sess.server_sessions[index:index + 1] = sids
        sess.since[index:index + 1] = [sess.position] * len(hops)
        for boundary, out in outputs.items():
            sess.history.reset_boundary(boundary, out)
        self.failovers += 1
        log.warning("session %s: blocks %d:%d moved to %s in %.3f s (%d positions replayed in %.3f s)", sess.id[:8],
                    hop.first, hop.last, route_text(hops), total_s, sess.position, replay_s)
        return hops

    def on_close(self, req: registry.Close) -> tuple[registry.Closed, None]:
        with self._lock:
            sess = self.sessions.pop(req.session, None)
        if sess is None:
            return {"closed": False}, None
        self.router.close_remote(list(zip(sess.hops, sess.server_sessions)))
        self._close_shadows(sess)
        return {"closed": True}, None

    # --- housekeeping -------------------------------------------------------------------------
    def forget_servers(self, addresses: set[str]) -> None:
        """Servers that may no longer be used (their key left a private swarm's list): every
        session routed through one rebuilds its route from its history before its next step."""
        with self._lock:
            hit = [s for s in self.sessions.values() if any(h.address in addresses for h in s.hops)]
        for s in hit:
            s.broken = True
            log.warning("session %s: %s left the swarm; its route is rebuilt before the next step", s.id[:8],
                        ", ".join(sorted(h.address for h in s.hops if h.address in addresses)))

    def expire_idle(self) -> None:
        self.training.kept.expire()
        now = time.monotonic()
        with self._lock:
            stale = [s for s in self.sessions.values() if now - s.last_used > APP_IDLE_TIMEOUT_S]
            for s in stale:
                del self.sessions[s.id]
        for s in stale:
            log.info("app session %s idle: closing it", s.id[:8])
            self.router.close_remote(list(zip(s.hops, s.server_sessions)))
            self._close_shadows(s)

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self.sessions.values())
            self.sessions.clear()
        for s in sessions:
            self.router.close_remote(list(zip(s.hops, s.server_sessions)))
            self._close_shadows(s)


