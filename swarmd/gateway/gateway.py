"""The gateway role: runs apps' inference sessions across a chain of servers, and keeps them
going when servers fail (training passes: training.py; routes: router.py).

Failover follows the dual cache: servers hold the attention caches, the gateway holds every
input it sent to each span (History). When a server fails during a step, the gateway bans it,
picks servers that cover its blocks (one or several), opens sessions there, replays the span's
history to rebuild their caches, and finishes the step. The app sees a slower token, never a
different one: replayed inputs are the exact tensors first sent, and every server's reply
states its cache position, which the gateway checks."""

from __future__ import annotations

import logging
import queue
import random
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from libswarm.errors import (
    CacheFullError,
    LimitError,
    NoRouteError,
    PeerUnavailableError,
    RemoteError,
    SessionError,
    SwarmError,
    WrongOutputError,
)
from libswarm.protocol import Message
from libswarm.protocol.tensors import tensor_digest
from swarmd.discovery.membership import Membership
from swarmd.discovery.table import PeerTable
from swarmd.gateway.history import History
from swarmd.gateway.router import (
    DEFAULT_ROUTE_TIMEOUT_S,
    Router,
    hidden_of,
    refused,
    retriable,
    route_json,
    route_text,
    route_timeout,
)
from swarmd.gateway.training import TrainingChains, adapter_name
from swarmd.gateway.verify import DEFAULT_VERIFY_PROBABILITY, ImplausibleOutput, disagreement
from swarmd.routing import Hop, missing_blocks
from swarmd.transport.connection import ConnectionPool, NoAnswerInTime, PeerConnection

log = logging.getLogger("swarmd.gateway")

OPEN_TIMEOUT_S = 10.0
APP_IDLE_TIMEOUT_S = 600.0  # an app session untouched this long is closed
CHECK_TIMEOUT_S = 10.0  # a check that cannot find or use other servers this long gives up
MAX_QUEUED_CHECKS = 4  # spot checks waiting for the checking thread; more are skipped (counted)
MAX_WRONG_OUTPUT_ROUTES = 64  # routes a step is tried on after wrong outputs (within its route timeout)
# Reruns of a step after disputed pushes: each one but the first after a failover marks a pusher
# or a receiver, whose link the gateway then bridges itself, so a route of n hops needs < 2n
MAX_PUSH_RERUNS = 16
MAX_RESENDS = 6  # times a step is sent again to the same server (all within its deadline)


@dataclass
class Shadow:
    """With strict verification: servers other than the hop's own that compute the same blocks
    for the same session, step by step, to compare."""

    main: str  # the address of the hop it checks
    hops: list[Hop]
    sids: list[str]


class LieDetected(Exception):
    """A step's output was shown wrong after the whole route ran it: rebuild and run it again."""


@dataclass
class GatewaySession:
    id: str
    batch: int
    max_length: int
    hops: list[Hop]
    server_sessions: list[str]
    route_timeout_s: float = DEFAULT_ROUTE_TIMEOUT_S
    push: bool = True
    adapter: str | None = None  # a hosted LoRA adapter: only servers hosting it are used
    position: int = 0
    steps: int = 0  # steps sent so far; numbers each step so that pushes find their request
    broken: bool = False  # a step failed after some servers ran it: rebuild before the next one
    history: History = field(default_factory=History)
    cut: int | None = None  # the position the step being run starts at, when the app cut the session back
    since: list[int] = field(default_factory=list)  # per hop: the position from which its server's outputs are kept
    shadows: dict[tuple[int, int], Shadow] = field(default_factory=dict)  # strict verification
    checking: bool = False  # a spot check of this session is queued or running
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class PushDispute(Exception):
    """Hop `index` ran on an input other than the one the hop before it returned to the gateway
    (a push the gateway never saw), or does not say what it ran on: its output and every later
    hop's are not to be used. `outputs` holds what the hops before it returned; `suspect` is the
    pusher to stop trusting with pushes, `blind` the hop that does not say what it ran on."""

    def __init__(self, index: int, outputs: dict[int, torch.Tensor], why: str, suspect: str | None = None,
                 blind: str | None = None):
        super().__init__(why)
        self.index, self.outputs, self.why, self.suspect, self.blind = index, outputs, why, suspect, blind


class HopFailure(Exception):
    """Hop `index` of a chain failed; `outputs` holds what the hops before it returned."""

    def __init__(self, index: int, outputs: dict[int, torch.Tensor], error: SwarmError):
        super().__init__(str(error))
        self.index, self.outputs, self.error = index, outputs, error


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
        self.membership = membership
        self.status_fn = status
        self.sessions: dict[str, GatewaySession] = {}
        self.failovers = 0
        self.resends = 0  # steps sent again to the same server after no answer in time
        self.last_failover: dict = {}  # when and how long the phases of the latest failover took
        self._lock = threading.Lock()
        self.verify, self.verify_probability = verify, verify_probability
        self.checks = {"run": 0, "passed": 0, "failed": 0, "inconclusive": 0, "skipped": 0}
        self._rng = random.Random()
        self._check_queue: queue.Queue = queue.Queue(MAX_QUEUED_CHECKS)
        self._checker: threading.Thread | None = None
        self._shadow_pool = ThreadPoolExecutor(8, thread_name_prefix="shadow") if verify == "strict" else None
        self.handlers: dict[str, Callable[[Message], tuple[dict, dict | None]]] = {
            "status": lambda m: (self.status_fn(), None),
            "peers": lambda m: ({"peers": self.router.annotate(self.membership.rows())}, None),
            "model_info": self.on_model_info,
            "open": self.on_open,
            "step": self.on_step,
            "close": self.on_close,
            "forward": self.training.on_forward,
            "backward": self.training.on_backward,
        }

    def _open_span(self, first: int, last: int, *, max_length: int, batch: int, deadline: float,
                   history: History | None, adapter: str | None = None, avoid: frozenset[str] = frozenset()
                   ) -> tuple[list[Hop], list[str], dict[int, torch.Tensor], float]:
        """Open sessions on servers covering [first, last); with a history, replay it into them.
        Returns the hops, their session ids, the replay's output at each new inner boundary, and
        the seconds spent replaying. A server that fails here is banned and another one is
        tried, until `deadline`."""
        replay_s = 0.0
        full: set[str] = set()  # servers without room for this session (not banned: they work)
        while True:
            hops = self.router.plan(first, last, deadline, exclude=full | avoid, adapter=adapter)
            opened: list[tuple[Hop, str]] = []
            outputs: dict[int, torch.Tensor] = {}
            hop = hops[0]
            try:
                replay = history.replay_inputs(first) if history is not None else None
                for hop in hops:
                    conn = self.router.pool.get(hop.address)
                    fields = {"model_id": self.model_id, "blocks": [hop.first, hop.last], "max_length": max_length,
                              "batch": batch}
                    if adapter is not None:
                        fields["adapter"] = adapter
                    sid = self._open_one(hop, conn, fields).get("session")
                    if not isinstance(sid, str):
                        raise RemoteError(f"server {hop.address} opened a session without naming it")
                    opened.append((hop, sid))
                    if replay is not None:
                        t0 = time.monotonic()
                        replay["hidden"] = self._replay(hop, opened[-1][1], replay)
                        replay_s += time.monotonic() - t0
                        if hop.last < last:
                            outputs[hop.last] = replay["hidden"]
                return hops, [sid for _, sid in opened], outputs, replay_s
            except SwarmError as e:
                if isinstance(e, (CacheFullError, LimitError)) and e.peer is not None:
                    # no room there, or the session is beyond that server's limits (length, batch,
                    # its share per key, its rate): it works, it is not banned; another may take it
                    self.router.close_remote(opened)
                    full.add(hop.address)
                    candidates = [s for s in self.router.table.servers_for(self.model_id, adapter)
                                  if s.address not in full | avoid and not self.router.bans.is_banned(s.address)]
                    if missing_blocks(candidates, last, first):  # nobody else could take it: say so now
                        raise
                    continue
                # what the gateway asks to open is checked here: any other refusal is the server's
                if not retriable(e):
                    raise
                self.router.fail(hop, e)
                self.router.close_remote([(h, sid) for h, sid in opened if h is not hop])
                if time.monotonic() > deadline:  # servers exist but keep failing
                    raise

    def _open_one(self, hop: Hop, conn: PeerConnection, fields: dict) -> Message:
        """`open` at one server. A server this gateway has timed is asked again when it does not
        answer within its resend allowance (as a step is): the open or its answer was lost. Both
        carry one `open_id`: a server that got the first answers the resend with the same session."""
        t0 = time.monotonic()
        fields = {**fields, "open_id": secrets.token_hex(8)}  # a resend is answered with the same session

        def ask() -> tuple[PeerConnection, int]:
            return conn, conn.send("open", fields, timeout_s=OPEN_TIMEOUT_S)

        return self._await_step(hop.address, ask(), ask, t0, t0 + OPEN_TIMEOUT_S, 1, "open")[0]

    def _replay(self, hop: Hop, sid: str, replay: dict[str, torch.Tensor], band: bool = True) -> torch.Tensor:
        """One step that feeds a fresh session every position so far; returns its output."""
        length = replay["hidden"].shape[1]
        tokens = replay["hidden"].shape[0] * length
        t0 = time.monotonic()
        reply = self.router.pool.get(hop.address).request(
            "step", {"session": sid, "replay": True}, replay, timeout_s=self.router.allowance_s(hop.address, tokens)
        )
        if reply.get("position") != length:
            raise SessionError(f"server {hop.address} replayed to position {reply.get('position')}, not {length}")
        self.router.step_times.record(hop.address, time.monotonic() - t0, tokens, hop.last - hop.first)
        return self.router.check(hop, replay["hidden"], hidden_of(reply, hop.address), band)

    # --- handlers --------------------------------------------------------------------------
    def on_model_info(self, msg: Message):
        return {"model_id": self.model_id, "num_layers": self.num_layers, "hidden_size": self.hidden_size}, None

    def on_open(self, msg: Message):
        self.router.check_model(msg)
        max_length, batch = msg.require("max_length", int), msg.require("batch", int)
        if max_length <= 0 or batch <= 0:
            raise LimitError("max_length and batch must be positive")
        route_timeout_s = route_timeout(msg)
        deadline = time.monotonic() + route_timeout_s
        adapter = adapter_name(msg)
        hops, sids, _, _ = self._open_span(0, self.num_layers, max_length=max_length, batch=batch, deadline=deadline,
                                        history=None, adapter=adapter)
        sess = GatewaySession(secrets.token_hex(12), batch, max_length, hops, sids, route_timeout_s=route_timeout_s,
                              push=msg.get("push", True) is not False, adapter=adapter, since=[0] * len(hops))
        with self._lock:
            self.sessions[sess.id] = sess
        log.info("session %s opened over %s", sess.id[:8], route_text(hops))
        return {"session": sess.id, "route": route_json(hops)}, None

    def _app_session(self, msg: Message) -> GatewaySession:
        sid = msg.get("session")
        sess = self.sessions.get(sid) if isinstance(sid, str) else None
        if sess is None:
            raise SessionError(f"unknown or closed session {sid!r}")
        sess.last_used = time.monotonic()
        return sess

    def on_step(self, msg: Message):
        sess = self._app_session(msg)
        tensors = self.router.tensors(msg)
        B, T, _ = tensors["hidden"].shape
        if B != sess.batch:
            raise SessionError(f"step has batch {B} but the session was opened with batch {sess.batch}")
        start = msg.get("start")
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
            if "position_ids" not in msg.tensors:
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
                outputs = self._run_chain(sess, start, inputs[sess.hops[start].first], small, step, B * T, joined,
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
                    verdict = self._second_opinion(sess, sess.hops[f.index], inputs[sess.hops[f.index].first],
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
        if self.verify == "strict":
            self._cross_check(sess, inputs, small, step)
        # with sample, the final boundary too: the last hop's output, for spot checks of it
        final = [self.num_layers] if self.verify == "sample" else []
        sess.history.append(inputs, [h.first for h in sess.hops] + final, small["position_ids"],
                            small.get("key_mask"), small.get("beam_order"))
        sess.position += T
        if self.verify == "sample" and self._rng.random() < self.verify_probability:
            self._queue_check(sess)
        return inputs[self.num_layers]

    def _run_chain(self, sess: GatewaySession, start: int, x: torch.Tensor, small: dict[str, torch.Tensor],
                   step: int, tokens: int, joined: frozenset[str] | set[str] = frozenset(),
                   rollback: bool = False) -> dict[int, torch.Tensor]:
        """Step hops start.. of the route. With push, the gateway sends the step to every hop at
        once (hidden states only to the first), and each server pushes its output to the next
        and returns a copy here: n+1 network hops per token instead of 2n. Each hop says what
        input it ran on, which must be what the hop before returned here (raises PushDispute).
        With `rollback`, every hop first cuts its cache back to where the step starts. Returns
        each hop's output; raises HopFailure naming the first hop that failed."""
        hops, sids, n = sess.hops, sess.server_sessions, len(sess.hops)
        expect_position = sess.position + x.shape[1]
        outputs: dict[int, torch.Tensor] = {}
        if not sess.push:
            for k in range(start, n):
                try:
                    t0 = time.monotonic()
                    own = self.router.allowance_s(hops[k].address, tokens)
                    conn = self.router.pool.get(hops[k].address)
                    fields, tensors = self._step_fields(sess, k, step, rollback), {"hidden": x, **small}

                    def ask(conn=conn, fields=fields, tensors=tensors, own=own) -> tuple[PeerConnection, int]:
                        return conn, conn.send("step", fields, tensors, timeout_s=own)

                    reply, resends = self._await_step(hops[k].address, ask(), ask, t0, t0 + own, tokens)
                    self._check_consumed(hops, k, reply.get("consumed"), x, outputs, joined, could_be_pushed=False)
                    x = self._accept(hops[k], reply, expect_position, time.monotonic() - t0, tokens, x,
                                     timed=not resends)
                except SwarmError as e:
                    raise HopFailure(k, outputs, e) from None
                outputs[k] = x
            return outputs
        t0 = time.monotonic()
        keys = [self.router.pool.resolve_key(h.address) for h in hops]  # once per hop and step
        # pushes only over links the gateway can vouch for: from a server whose push was never
        # disputed, to one that says what it ran on. Over others the gateway hands the input over
        linked = [k > start and self.router.pushes.allowed(hops[k - 1].address, hops[k].address) for k in range(n)]
        sent: dict[int, tuple] = {}
        awaiting_push: set[int] = set()  # hops told to take their input from a push

        def send(k: int, hidden: torch.Tensor | None) -> None:
            fields = self._step_fields(sess, k, step, rollback)
            if hidden is None:  # its input is pushed by the previous hop, and by no other key
                fields["expect_push"], fields["from"] = True, keys[k - 1]
                awaiting_push.add(k)
            else:
                awaiting_push.discard(k)
            if k < n - 1 and linked[k + 1]:
                fields["next"] = self._next_hop(hops[k + 1], sids[k + 1], keys[k + 1])
            conn = self.router.pool.get(hops[k].address, keys[k])
            sent[k] = (conn, conn.send("step", fields, {"hidden": hidden, **small} if hidden is not None else small))

        send_failure = None
        for k in range(start, n):
            if k > start and not linked[k]:
                continue  # sent once the hop before has answered, with its output as the input
            try:
                send(k, x if k == start else None)
            except SwarmError as e:
                send_failure = HopFailure(k, outputs, e)
                break
        allowance, t_prev = 0.0, t0
        for k in range(start, n):
            if send_failure is not None and k >= send_failure.index:
                raise send_failure
            hop_input = x if k == start else outputs[k - 1]
            try:
                if k not in sent:
                    send(k, hop_input)
                conn, req_id = sent[k]
                own, added = self.router.allowances(hops[k].address, tokens)
                allowance += own if k == start else added
                # within the chain's allowance from the start, and within its own from when the hop
                # before answered (its input was pushed then): a hung hop after fast ones is not
                # given the others' unused time (for hops not measured yet, 10 s each)
                deadline = min(t0 + allowance, t_prev + own)
                waited_push, resends = k in awaiting_push, 0

                def resend(k: int = k, hop_input: torch.Tensor = hop_input) -> tuple[PeerConnection, int]:
                    send(k, hop_input)  # with its input: it replaces a step still waiting for a lost push
                    return sent[k]

                try:
                    reply, resends = self._await_step(hops[k].address, (conn, req_id), resend,
                                                      t0 if k == start else t_prev, deadline, tokens)
                    if waited_push and (k in awaiting_push or reply.get("repeated")):
                        self.router.pushes.delivered(hops[k - 1].address)
                    elif waited_push:  # answered once resent with its input: the push was lost, or never made
                        self.router.pushes.missed(hops[k - 1].address, f"its push to {hops[k].address} did not come")
                except PeerUnavailableError:
                    if k not in awaiting_push:
                        raise
                    send(k, hop_input)
                    reply = self._without_push(hops, k, sent[k], own)
                self._check_consumed(hops, k, reply.get("consumed"), hop_input, outputs, joined,
                                     could_be_pushed=k in awaiting_push or bool(reply.get("repeated")),
                                     repeated=bool(reply.get("repeated")))
                outputs[k] = self._accept(hops[k], reply, expect_position, time.monotonic() - t_prev, tokens,
                                          hop_input, timed=not resends)
            except SwarmError as e:
                if k in awaiting_push and e.peer is not None and e.consumed is not None:
                    # refused for its input: when that was not what the hop before returned here,
                    # the refusal is the pusher's doing (raises PushDispute)
                    self._check_consumed(hops, k, e.consumed, hop_input, outputs, joined, could_be_pushed=True)
                raise HopFailure(k, outputs, e) from None
            if reply.get("pushed") is False and k + 1 in sent:
                # the server could not reach the next one: hand the output over ourselves. If we
                # cannot reach it either, the next server is the one that failed, not this one
                # (blaming this one would replace a healthy server and then fail again on the
                # dead one: two failovers for one death)
                try:
                    send(k + 1, outputs[k])
                except SwarmError as e:
                    raise HopFailure(k + 1, outputs, e) from None
            t_prev = time.monotonic()
        if send_failure is not None:
            raise send_failure
        return outputs

    def _await_step(self, address: str, first: tuple[PeerConnection, int],
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
        interval = self.router.step_times.resend_s(address, tokens)
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
                self.resends += 1
            log.debug("server %s: step not answered in %.0f ms; sent again", address, interval * 1000)
            interval *= 2
            # after the last resend, the rest of the deadline: a server slowed down for a while (a
            # loaded machine, a long prefill) is not given up on sooner than a step sent once was
            next_at = time.monotonic() + interval if resends < MAX_RESENDS else deadline
            conn, req_id = resend()

    def _without_push(self, hops: list[Hop], k: int, resent: tuple, own_s: float) -> Message:
        """Hop k, told to take its input from the hop before's push, did not answer in time: the
        push may never have come (a hostile pusher saying it pushed, or a lost message), which
        is no fault of hop k's. The step goes to it again with its input (replacing the one
        waiting for the push); if it answers now, the pusher is not asked to push again, and hop
        k is blamed only if it fails this time too. `resent`: (connection, request id) of the
        step sent again with its input."""
        log.info("server %s: no answer while waiting for the push of %s; sent it its input", hops[k].address,
                 hops[k - 1].address)
        conn, req_id = resent
        reply = conn.receive(req_id, time.monotonic() + own_s, "step")
        self.router.pushes.suspect(hops[k - 1].address, f"its push to {hops[k].address} never arrived")
        return reply

    def _check_consumed(self, hops: list[Hop], k: int, said: object, hop_input: torch.Tensor,
                        outputs: dict[int, torch.Tensor], joined: frozenset[str] | set[str],
                        could_be_pushed: bool, repeated: bool = False) -> None:
        """Hop k ran on `hop_input`, the input the gateway holds for it (what the hop before
        returned), as its reply's `consumed` (`said`) says; else raises PushDispute, when its
        input may have come by push, or WrongOutputError, when it came from the gateway alone
        (the server then says itself that it ran on something else)."""
        if said == tensor_digest(hop_input):
            return
        address = hops[k].address
        if not could_be_pushed or k == 0:
            if said is None:
                return  # a server older than protocol 1.5: it ran on what this gateway sent it
            raise WrongOutputError(f"server {address} says it ran on another input than the one it was sent")
        if said is None:
            raise PushDispute(k, outputs, f"server {address} does not say which input it ran on",
                              blind=address)
        pusher = hops[k - 1].address
        if repeated and pusher in joined:
            # it ran the step before, on the push of a server that failed since (and that the
            # gateway never heard from): nobody to suspect, the step runs again from our copy
            raise PushDispute(k, outputs, f"server {address} ran this step on a push of a server replaced since")
        raise PushDispute(k, outputs, f"server {address} ran on another input than the one {pusher} returned "
                                      f"(blocks {hops[k - 1].first}:{hops[k - 1].last})", suspect=pusher)

    @staticmethod
    def _step_fields(sess: GatewaySession, k: int, step: int, rollback: bool = False) -> dict:
        fields: dict = {"session": sess.server_sessions[k], "step": step}
        if sess.cut is not None or rollback:
            # every hop cuts its cache back there before the step: the app's cut (then the
            # session's position is the cut), or a rerun of the step from the gateway's inputs
            fields["start"] = sess.position
        return fields

    @staticmethod
    def _next_hop(hop: Hop, sid: str, key: str | None) -> dict:
        """Where a server pushes its output: the next server's address, key and session."""
        if key is None:
            raise PeerUnavailableError(f"peer {hop.address}: its public key is not known")
        return {"address": hop.address, "key": key, "session": sid}

    def _accept(self, hop: Hop, reply: Message, expect_position: int, seconds: float, tokens: int,
                x: torch.Tensor, band: bool = True, timed: bool = True) -> torch.Tensor:
        """The hop's output, checked; with `timed`, its time counts in its server's pace (not when
        it was resent: the time then is this gateway's wait, not the server's)."""
        if reply.get("position") != expect_position:
            raise SessionError(f"server {hop.address} is at position {reply.get('position')}, "
                               f"the session at {expect_position}")
        out = self.router.check(hop, x, hidden_of(reply, hop.address), band)
        if timed and not reply.get("repeated"):
            self.router.step_times.record(hop.address, seconds, tokens, hop.last - hop.first)
        self.router.bans.succeeded(hop.address)
        return out

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
        sess.hops[index:index + 1] = hops
        sess.server_sessions[index:index + 1] = sids
        sess.since[index:index + 1] = [sess.position] * len(hops)
        for boundary, out in outputs.items():
            sess.history.reset_boundary(boundary, out)
        self.failovers += 1
        log.warning("session %s: blocks %d:%d moved to %s in %.3f s (%d positions replayed in %.3f s)", sess.id[:8],
                    hop.first, hop.last, route_text(hops), total_s, sess.position, replay_s)
        return hops

    def on_close(self, msg: Message):
        sid = msg.get("session")
        with self._lock:
            sess = self.sessions.pop(sid, None) if isinstance(sid, str) else None
        if sess is None:
            return {"closed": False}, None
        self.router.close_remote(list(zip(sess.hops, sess.server_sessions)))
        self._close_shadows(sess)
        return {"closed": True}, None

    # --- checking servers' outputs (docs/security.md) ---------------------------------------------
    def _compute_elsewhere(self, first: int, last: int, replay: dict[str, torch.Tensor], avoid: frozenset[str],
                           batch: int, adapter: str | None) -> tuple[torch.Tensor, list[Hop]]:
        """Blocks [first, last) run on `replay` by servers other than `avoid`, in fresh sessions
        closed afterwards: the output, and the hops that computed it."""
        length = replay["hidden"].shape[1]
        hops, sids, _, _ = self._open_span(first, last, max_length=length, batch=batch,
                                           deadline=time.monotonic() + CHECK_TIMEOUT_S, history=None, adapter=adapter,
                                           avoid=avoid)
        try:
            x = dict(replay)
            for hop, sid in zip(hops, sids):  # compared with another server's: no band needed
                x["hidden"] = self._replay(hop, sid, x, band=False)
            return x["hidden"], hops
        finally:
            self.router.close_remote(list(zip(hops, sids)))

    def _judge(self, first: int, last: int, replay: dict[str, torch.Tensor], cut: int,
               claims: dict[str, tuple[torch.Tensor, list[str]]], avoid: frozenset[str], batch: int,
               adapter: str | None) -> str | None:
        """Two servers' outputs (`claims`: name -> its output from position `cut` on, and the
        addresses that computed it) differ: a third computes the same, and the one it
        contradicts while confirming the other is distrusted. Returns the name found lying, or
        None (no third, or no majority)."""
        try:
            third, hops = self._compute_elsewhere(first, last, replay, avoid, batch, adapter)
        except SwarmError as e:
            self._count("inconclusive")
            log.warning("blocks %d:%d: %s disagree and no third server settles it (%s)", first, last,
                        " and ".join(claims), e)
            return None
        third = third[:, cut:]
        judges = [h.address for h in hops]
        verdict = {a: disagreement(out, third, self.router.tolerance(chain, judges, last - first))
                   for a, (out, chain) in claims.items()}
        wrong = [a for a, why in verdict.items() if why is not None]
        if len(wrong) != 1:
            self._count("inconclusive")
            log.warning("blocks %d:%d: %s disagree and %s agrees with %s", first, last, " and ".join(claims),
                        route_text(hops), "neither" if wrong else "both")
            return None
        liar = wrong[0]
        self.router.bands.learn((first, last), replay["hidden"][:, cut:], third)  # two servers agree on it
        for a in claims:
            if a != liar:
                self.router.reputation.passed(a)
        self.router.reputation.offence(liar, f"blocks {first}:{last}: {verdict[liar]} "
                                              f"(contradicted by {' and '.join(a for a in claims if a != liar)} and "
                                              f"{route_text(hops)})")
        self.router.bans.ban(liar)
        return liar

    def _cross_check(self, sess: GatewaySession, inputs: dict[int, torch.Tensor], small: dict[str, torch.Tensor],
                     step: int) -> None:
        """strict: each hop's output for this step computed again by a shadow (other servers
        holding its blocks, fed the same inputs every step), side by side; raises LieDetected
        when a hop's output was wrong (after distrusting its server)."""
        assert self._shadow_pool is not None
        jobs = [(hop, self._shadow_pool.submit(self._shadow_step, sess, hop, inputs[hop.first], small, step))
                for hop in sess.hops]
        for hop, job in jobs:
            shadow, theirs = job.result()
            ours = inputs[hop.last]
            why = self._compare(hop, inputs[hop.first], ours, theirs, shadow.hops)
            if why is None:
                continue
            # the third computes every position so far and this step's, from the history
            trial = History({b: list(v) for b, v in sess.history.inputs.items()}, list(sess.history.positions),
                            list(sess.history.masks))
            trial.append(inputs, [hop.first], small["position_ids"], small.get("key_mask"), small.get("beam_order"))
            replay = trial.replay_inputs(hop.first)
            liar = self._settle(sess, hop, ours, theirs, shadow.hops, replay, replay["hidden"].shape[1] - ours.shape[1])
            if liar == hop.address:
                raise LieDetected()
            self._close_shadow(sess, (hop.first, hop.last))
            if liar is None:
                raise WrongOutputError(f"blocks {hop.first}:{hop.last}: the servers' outputs disagree ({why}) and "
                                       "strict verification found no majority")

    def _shadow_step(self, sess: GatewaySession, hop: Hop, x: torch.Tensor, small: dict[str, torch.Tensor],
                     step: int) -> tuple[Shadow, torch.Tensor]:
        span = (hop.first, hop.last)
        shadow = sess.shadows.get(span)
        if shadow is not None and shadow.main != hop.address:
            self._close_shadow(sess, span)
            shadow = None
        deadline = time.monotonic() + sess.route_timeout_s
        for attempt in range(3):
            if shadow is None:
                try:
                    hops, sids, _, _ = self._open_span(
                        hop.first, hop.last, max_length=sess.max_length, batch=sess.batch, deadline=deadline,
                        history=sess.history if sess.position else None, adapter=sess.adapter,
                        avoid=frozenset({hop.address}))
                except NoRouteError as e:
                    raise NoRouteError(f"strict verification needs a second server for blocks "
                                       f"{hop.first}:{hop.last}: {e}") from None
                shadow = sess.shadows[span] = Shadow(hop.address, hops, sids)
            try:
                out = x
                for h, sid in zip(shadow.hops, shadow.sids):
                    fields = self._step_fields(sess, 0, step)
                    fields["session"] = sid
                    t0 = time.monotonic()
                    tokens = out.shape[0] * out.shape[1]
                    reply = self.router.pool.get(h.address).request(
                        "step", fields, {"hidden": out, **small}, timeout_s=self.router.allowance_s(h.address, tokens))
                    out = self._accept(h, reply, sess.position + x.shape[1], time.monotonic() - t0, tokens, out,
                                       band=False)  # compared with the hop's own
                return shadow, out
            except SwarmError as e:
                if retriable(e):
                    for h in shadow.hops:
                        if not self.router.bans.is_banned(h.address):
                            self.router.fail(h, e)
                self._close_shadow(sess, span)
                shadow = None
                if not retriable(e) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _close_shadow(self, sess: GatewaySession, span: tuple[int, int]) -> None:
        shadow = sess.shadows.pop(span, None)
        if shadow is not None:
            self.router.close_remote(list(zip(shadow.hops, shadow.sids)))

    def _close_shadows(self, sess: GatewaySession) -> None:
        for span in list(sess.shadows):
            self._close_shadow(sess, span)

    def _queue_check(self, sess: GatewaySession) -> None:
        """sample: one hop of the session, picked at random, checked off the step's path. What
        is checked is a copy of the history, so the app goes on meanwhile."""
        if sess.checking:
            self._count("skipped")
            return
        k = self._rng.randrange(len(sess.hops))
        hop, since = sess.hops[k], min(sess.since[k], sess.position)
        if since >= sess.position:
            return
        others = [s for s in self.router.table.servers_for(self.model_id, sess.adapter) if s.address != hop.address
                  and not self.router.bans.is_banned(s.address)
                  and not self.router.reputation.is_distrusted(s.address)]
        if missing_blocks(others, hop.last, hop.first):  # nobody else holds those blocks now: nothing to compare
            self._count("skipped")
            return
        replay = sess.history.replay_inputs(hop.first)
        expected = torch.cat(sess.history.inputs[hop.last], dim=1)[:, since:]
        try:
            self._check_queue.put_nowait((sess, hop, replay, since, expected))
        except queue.Full:
            self._count("skipped")
            return
        sess.checking = True
        if self._checker is None:
            self._checker = threading.Thread(target=self._check_loop, name="checks", daemon=True)
            self._checker.start()

    def _check_loop(self) -> None:
        while True:
            sess, hop, replay, since, expected = self._check_queue.get()
            try:
                self._spot_check(sess, hop, replay, since, expected)
            except Exception as e:  # a check must never take the gateway down
                self._count("inconclusive")
                log.warning("spot check of %s on blocks %d:%d: %s", hop.address, hop.first, hop.last, e)
            finally:
                sess.checking = False

    def _spot_check(self, sess: GatewaySession, hop: Hop, replay: dict[str, torch.Tensor], since: int,
                    expected: torch.Tensor) -> None:
        """Positions `since`.. of the session as the hop's server computed them, against other
        servers given the same inputs (every position, to rebuild the cache)."""
        try:
            theirs, checkers = self._compute_elsewhere(hop.first, hop.last, replay,
                                                       frozenset({hop.address}),
                                                       sess.batch, sess.adapter)
        except SwarmError as e:
            self._count("inconclusive")
            log.info("spot check of %s on blocks %d:%d: no other server to check it (%s)", hop.address, hop.first,
                     hop.last, e)
            return
        theirs = theirs[:, since:]
        if self._compare(hop, replay["hidden"][:, since:], expected, theirs, checkers) is None:
            return
        if self._settle(sess, hop, expected, theirs, checkers, replay, since) == hop.address:
            # its wrong outputs are in the session's caches and history: the next step rebuilds
            # the route from the app's own inputs, through servers that did not lie
            sess.broken = True

    def _compare(self, hop: Hop, x: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor,
                 checkers: list[Hop]) -> str | None:
        """A check of the hop's output `ours` for the input `x` against the checkers' (counted):
        why they differ, or None (then every server involved passed, and the span's norm band
        learns from the output two servers agree on)."""
        tol = self.router.tolerance([hop.address], [h.address for h in checkers], hop.last - hop.first)
        why = disagreement(ours, theirs, tol)
        self._count("run")
        self._count("failed" if why is not None else "passed")
        if why is None:
            for a in {hop.address, *(h.address for h in checkers)}:
                self.router.reputation.passed(a)
            self.router.bands.learn((hop.first, hop.last), x, ours)
        return why

    def _second_opinion(self, sess: GatewaySession, hop: Hop, x: torch.Tensor, out: torch.Tensor,
                        small: dict[str, torch.Tensor], why: str) -> str:
        """The hop's output `out` for this step's input `x` is outside the norm band: other
        servers run its blocks on every position so far and this step's, at once. Returns
        "confirmed" (they agree, or a third sided with the hop), "liar" (a third sided with
        them: the hop's server is distrusted) or "unsettled" (no other server, no majority)."""
        log.warning("server %s on blocks %d:%d: %s; asking another server", hop.address, hop.first, hop.last, why)
        trial = History({b: list(v) for b, v in sess.history.inputs.items()}, list(sess.history.positions),
                        list(sess.history.masks))
        trial.append({hop.first: x}, [hop.first], small["position_ids"], small.get("key_mask"), small.get("beam_order"))
        replay = trial.replay_inputs(hop.first)
        cut = replay["hidden"].shape[1] - out.shape[1]
        try:
            theirs, checkers = self._compute_elsewhere(hop.first, hop.last, replay,
                                                       frozenset({hop.address}),
                                                       sess.batch, sess.adapter)
        except SwarmError as e:
            self._count("inconclusive")
            log.warning("blocks %d:%d: no other server to confirm %s's output (%s)", hop.first, hop.last,
                        hop.address, e)
            return "unsettled"
        theirs = theirs[:, cut:]
        if self._compare(hop, x, out, theirs, checkers) is None:
            return "confirmed"
        liar = self._settle(sess, hop, out, theirs, checkers, replay, cut)
        return "unsettled" if liar is None else "liar" if liar == hop.address else "confirmed"

    def _settle(self, sess: GatewaySession, hop: Hop, ours: torch.Tensor, theirs: torch.Tensor, checkers: list[Hop],
                replay: dict[str, torch.Tensor], cut: int) -> str | None:
        """The hop and its checkers disagree: a third settles it (_judge). A chain of checkers
        is one claim: its wrong answer cannot be pinned on one of its servers."""
        chain = [h.address for h in checkers]
        claims = {hop.address: (ours, [hop.address]),
                  chain[0] if len(chain) == 1 else route_text(checkers): (theirs, chain)}
        avoid = frozenset({hop.address, *chain})
        return self._judge(hop.first, hop.last, replay, cut, claims, avoid, sess.batch, sess.adapter)

    def _count(self, what: str) -> None:
        with self._lock:
            self.checks[what] += 1

    def verify_status(self) -> dict:
        return {"mode": self.verify, "probability": self.verify_probability if self.verify == "sample" else None,
                "checks": dict(self.checks), "servers": self.router.reputation.to_json(),
                "push_suspects": self.router.pushes.to_json()}

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


