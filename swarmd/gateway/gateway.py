"""The gateway role: runs apps' inference sessions and forward passes across a chain of servers,
and keeps them going when servers fail.

Failover follows the dual cache: servers hold the attention caches, the gateway holds every
input it sent to each span (History). When a server fails during a step, the gateway bans it,
picks servers that cover its blocks (one or several), opens sessions there, replays the span's
history to rebuild their caches, and finishes the step. The app sees a slower token, never a
different one: replayed inputs are the exact tensors first sent, and every server's reply
states its cache position, which the gateway checks."""

from __future__ import annotations

import logging
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
    ProtocolError,
    RemoteError,
    SessionError,
    SpanMovedError,
    SwarmError,
    TensorError,
    WrongModelError,
)
from libswarm.protocol import Message
from swarmd.discovery.membership import Membership
from swarmd.discovery.table import PeerTable
from swarmd.gateway.bans import Bans
from swarmd.gateway.connection import ConnectionPool
from swarmd.gateway.history import History, StepTimes
from swarmd.gateway.routing import Hop, missing_blocks, plan_chain
from swarmd.inputs import beam_order, positions_and_mask
from swarmd.runtime.span import Lora

log = logging.getLogger("swarmd.gateway")

OPEN_TIMEOUT_S = 10.0
DEFAULT_ROUTE_TIMEOUT_S = 60.0  # how long a step or open may wait for servers to cover the blocks
MAX_ROUTE_TIMEOUT_S = 3600.0
STEP_DEADLINE_FLOOR_S = 1.0  # no hop is declared failed sooner than this
STEP_DEADLINE_FACTOR = 10.0  # ...nor before it took this many times its usual time
UNMEASURED_STEP_S = 30.0  # the allowance for a server whose speed is not known yet
FALLBACK_PACE_S = 2.0  # a route through servers that all failed lately is tried at most this often
APP_IDLE_TIMEOUT_S = 600.0  # an app session untouched this long is closed
# Errors after which another server may succeed; anything else is the request's own fault
# and goes straight back to the app.
SPLIT_MIN_TOKENS = 512  # a forward or backward batch this large is split across chains...
MAX_SPLIT_PARTS = 4  # ...into at most this many parts, run at once
RETRIABLE = (PeerUnavailableError, RemoteError, SessionError, SpanMovedError)


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
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class HopFailure(Exception):
    """Hop `index` of a chain failed; `outputs` holds what the hops before it returned."""

    def __init__(self, index: int, outputs: dict[int, torch.Tensor], error: SwarmError):
        super().__init__(str(error))
        self.index, self.outputs, self.error = index, outputs, error


class Gateway:
    def __init__(self, *, model_id: str, num_layers: int, hidden_size: int, pool: ConnectionPool, table: PeerTable,
                 membership: Membership, status: Callable[[], dict]):
        self.model_id, self.num_layers, self.hidden_size = model_id, num_layers, hidden_size
        self.pool, self.table, self.membership = pool, table, membership
        self.status_fn = status
        self.sessions: dict[str, GatewaySession] = {}
        self.bans = Bans()
        self.step_times = StepTimes()
        self.failovers = 0
        self.last_failover: dict = {}  # when and how long the phases of the latest failover took
        self._lock = threading.Lock()
        self._rng = random.Random()
        self._split_pool = ThreadPoolExecutor(MAX_SPLIT_PARTS, thread_name_prefix="split")
        self.handlers: dict[str, Callable[[Message], tuple[dict, dict | None]]] = {
            "status": lambda m: (self.status_fn(), None),
            "peers": lambda m: ({"peers": self.membership.rows()}, None),
            "model_info": self.on_model_info,
            "open": self.on_open,
            "step": self.on_step,
            "close": self.on_close,
            "forward": self.on_forward,
            "backward": self.on_backward,
        }

    # --- routing ---------------------------------------------------------------------------
    def _plan(self, first: int, last: int, deadline: float,
              exclude: frozenset[str] | set[str] = frozenset(), spread: bool = False,
              adapter: str | None = None) -> list[Hop]:
        """A chain over blocks [first, last) avoiding banned servers (unless, after a refresh of
        the table, only banned ones cover a block), waiting (with capped doubling backoff,
        refreshing the peer table) until `deadline` for one to exist. The lowest-latency chain,
        or with `spread` (forward batches) a random one weighted by speed."""
        backoff_s, t0, refreshed = 0.2, time.monotonic(), 0
        while True:
            candidates = [s for s in self.table.servers_for(self.model_id, adapter) if s.address not in exclude]
            banned = self.bans.banned()
            servers = [s for s in candidates if s.address not in banned]
            try:
                try:
                    hops = plan_chain(servers, last, self.model_id, start=first, rng=self._rng if spread else None)
                except NoRouteError:
                    if not refreshed or len(servers) == len(candidates):
                        raise
                    # only servers that failed lately cover some block: a ban is a preference, and a
                    # server that failed (often one that restarted, under churn) beats no route. It
                    # is paced by its ban (at most FALLBACK_PACE_S), so that one failing fast is
                    # not asked again in a tight loop
                    hops = plan_chain(candidates, last, self.model_id, start=first,
                                      rng=self._rng if spread else None)
                    wait_s = max((self.bans.remaining_s(h.address) for h in hops), default=0.0)
                    time.sleep(max(0.0, min(wait_s, FALLBACK_PACE_S, deadline - time.monotonic())))
                if refreshed:
                    log.info("route for blocks %d:%d found after %.2f s and %d table refreshes", first, last,
                             time.monotonic() - t0, refreshed)
                return hops
            except NoRouteError as e:
                if refreshed:  # the table was fresh and still no route: wait for servers to come
                    left_s = deadline - time.monotonic()
                    if left_s <= 0:
                        hosting = f" hosting adapter {adapter!r}" if adapter else ""
                        raise NoRouteError(f"{e}{hosting} (waited {time.monotonic() - t0:.1f} s)") from None
                    time.sleep(min(backoff_s, left_s))
                    backoff_s = min(backoff_s * 2, 2.0)
                # ask the peers again (a server may have just come back); banned ones, maybe
                # hung, would only stall the refresh
                self.membership.refresh(skip=self.bans.banned())
                refreshed += 1

    def _open_span(self, first: int, last: int, *, max_length: int, batch: int, deadline: float,
                   history: History | None, adapter: str | None = None
                   ) -> tuple[list[Hop], list[str], dict[int, torch.Tensor], float]:
        """Open sessions on servers covering [first, last); with a history, replay it into them.
        Returns the hops, their session ids, the replay's output at each new inner boundary, and
        the seconds spent replaying. A server that fails here is banned and another one is
        tried, until `deadline`."""
        replay_s = 0.0
        full: set[str] = set()  # servers without room for this session (not banned: they work)
        while True:
            hops = self._plan(first, last, deadline, exclude=full, adapter=adapter)
            opened: list[tuple[Hop, str]] = []
            outputs: dict[int, torch.Tensor] = {}
            hop = hops[0]
            try:
                replay = history.replay_inputs(first) if history is not None else None
                for hop in hops:
                    conn = self.pool.get(hop.address)
                    fields = {"model_id": self.model_id, "blocks": [hop.first, hop.last], "max_length": max_length,
                              "batch": batch}
                    if adapter is not None:
                        fields["adapter"] = adapter
                    reply = conn.request("open", fields, timeout_s=OPEN_TIMEOUT_S)
                    opened.append((hop, reply.require("session", str)))
                    if replay is not None:
                        t0 = time.monotonic()
                        replay["hidden"] = self._replay(hop, opened[-1][1], replay)
                        replay_s += time.monotonic() - t0
                        if hop.last < last:
                            outputs[hop.last] = replay["hidden"]
                return hops, [sid for _, sid in opened], outputs, replay_s
            except CacheFullError:
                self._close_remote(opened)
                full.add(hop.address)
                candidates = [s for s in self.table.servers_for(self.model_id, adapter)
                              if s.address not in full and not self.bans.is_banned(s.address)]
                if missing_blocks(candidates, last, first):  # nobody else could take it: say so now
                    raise
            except RETRIABLE as e:
                self._fail(hop, e)
                self._close_remote([(h, sid) for h, sid in opened if h is not hop])
                if time.monotonic() > deadline:  # servers exist but keep failing
                    raise

    def _replay(self, hop: Hop, sid: str, replay: dict[str, torch.Tensor]) -> torch.Tensor:
        """One step that feeds a fresh session every position so far; returns its output."""
        length = replay["hidden"].shape[1]
        tokens = replay["hidden"].shape[0] * length
        t0 = time.monotonic()
        reply = self.pool.get(hop.address).request(
            "step", {"session": sid, "replay": True}, replay, timeout_s=self._allowance_s(hop.address, tokens)
        )
        if reply.get("position") != length:
            raise SessionError(f"server {hop.address} replayed to position {reply.get('position')}, not {length}")
        self.step_times.record(hop.address, time.monotonic() - t0, tokens)
        return _hidden(reply)

    def _allowance_s(self, address: str, tokens: int, floor: bool = True) -> float:
        """How long a hop may take before it is called failed (without `floor`, the part to add
        per further hop of a chain, which shares one floor)."""
        expected = self.step_times.expected_s(address, tokens)
        if expected is None:
            return UNMEASURED_STEP_S
        return (STEP_DEADLINE_FLOOR_S if floor else 0.0) + STEP_DEADLINE_FACTOR * expected

    def _fail(self, hop: Hop, error: SwarmError) -> None:
        banned_s = self.bans.ban(hop.address)
        self.pool.drop(hop.address)
        log.warning("server %s failed on blocks %d:%d (%s); avoiding it for %.0f s", hop.address, hop.first,
                    hop.last, error, banned_s)

    def _check_model(self, msg: Message) -> None:
        asked = msg.get("model_id")
        if asked != self.model_id:
            raise WrongModelError(
                f"this swarmd serves model {self.model_id}; the app asked for {asked} "
                "(is the app's model directory the same checkpoint as the daemon's `model`?)"
            )

    # --- handlers --------------------------------------------------------------------------
    def on_model_info(self, msg: Message):
        return {"model_id": self.model_id, "num_layers": self.num_layers, "hidden_size": self.hidden_size}, None

    def on_open(self, msg: Message):
        self._check_model(msg)
        max_length, batch = msg.require("max_length", int), msg.require("batch", int)
        if max_length <= 0 or batch <= 0:
            raise LimitError("max_length and batch must be positive")
        route_timeout_s = _route_timeout(msg)
        deadline = time.monotonic() + route_timeout_s
        adapter = _adapter(msg)
        hops, sids, _, _ = self._open_span(0, self.num_layers, max_length=max_length, batch=batch, deadline=deadline,
                                        history=None, adapter=adapter)
        sess = GatewaySession(secrets.token_hex(12), batch, max_length, hops, sids, route_timeout_s=route_timeout_s,
                              push=msg.get("push", True) is not False, adapter=adapter)
        with self._lock:
            self.sessions[sess.id] = sess
        log.info("session %s opened over %s", sess.id[:8], _route_text(hops))
        return {"session": sess.id, "route": _route_json(hops)}, None

    def _app_session(self, msg: Message) -> GatewaySession:
        sid = msg.get("session")
        sess = self.sessions.get(sid) if isinstance(sid, str) else None
        if sess is None:
            raise SessionError(f"unknown or closed session {sid!r}")
        sess.last_used = time.monotonic()
        return sess

    def _tensors(self, msg: Message) -> dict[str, torch.Tensor]:
        hidden = msg.tensor("hidden")
        assert hidden is not None
        if hidden.ndim != 3 or hidden.shape[-1] != self.hidden_size:
            raise ProtocolError(f"hidden must be [batch, length, {self.hidden_size}], got {list(hidden.shape)}")
        B, T, _ = hidden.shape
        out = {"hidden": hidden}
        pos, mask = positions_and_mask(msg, B, T)
        out["position_ids"] = pos if pos is not None else torch.arange(T).expand(B, T)
        if mask is not None:
            out["key_mask"] = mask
        order = beam_order(msg, B)
        if order is not None:  # every hop reorders its cache with the step, and the history follows
            out["beam_order"] = order
        return out

    def on_step(self, msg: Message):
        sess = self._app_session(msg)
        tensors = self._tensors(msg)
        B, T, _ = tensors["hidden"].shape
        if B != sess.batch:
            raise SessionError(f"step has batch {B} but the session was opened with batch {sess.batch}")
        if sess.position + T > sess.max_length:
            raise LimitError(
                f"step of {T} positions at position {sess.position} passes the session's max_length {sess.max_length}"
            )
        start = msg.get("start")
        if start is not None and (not isinstance(start, int) or isinstance(start, bool)
                                  or not 0 <= start <= sess.position):
            raise SessionError(f"step: 'start' must be a position within 0..{sess.position}, got {start!r}")
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
        return {"position": sess.position, "route": _route_json(sess.hops)}, {"hidden": out}

    def _step(self, sess: GatewaySession, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if sess.broken:
            self._rebuild(sess)
        try:
            return self._step_once(sess, tensors)
        except BaseException:
            # some servers may have cached this step's positions and others not: the history,
            # which holds only completed steps, is the truth to rebuild from
            sess.broken = True
            raise

    def _rebuild(self, sess: GatewaySession) -> None:
        """Fresh sessions on a fresh route, their caches replayed from the history."""
        old = list(zip(sess.hops, sess.server_sessions))
        deadline = time.monotonic() + sess.route_timeout_s
        hops, sids, outputs, _ = self._open_span(0, self.num_layers, max_length=sess.max_length, batch=sess.batch,
                                                 deadline=deadline, history=sess.history if sess.position else None,
                                                 adapter=sess.adapter)
        self._close_remote(old)
        sess.hops, sess.server_sessions = hops, sids
        for boundary, out in outputs.items():
            sess.history.reset_boundary(boundary, out)
        sess.broken = False
        log.warning("session %s rebuilt over %s after a failed step", sess.id[:8], _route_text(hops))

    def _step_once(self, sess: GatewaySession, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = tensors["hidden"]
        small = {k: v for k, v in tensors.items() if k != "hidden"}
        B, T, _ = hidden.shape
        step = sess.steps
        sess.steps += 1
        inputs: dict[int, torch.Tensor] = {0: hidden}  # block boundary -> this step's input there
        deadline = time.monotonic() + sess.route_timeout_s
        start, computing_failures = 0, 0
        while True:
            try:
                outputs = self._run_chain(sess, start, inputs[sess.hops[start].first], small, step, B * T)
            except HopFailure as f:
                for k, out in f.outputs.items():
                    inputs[sess.hops[k].last] = out
                computing_failures += isinstance(f.error, RemoteError)
                # a step that a replacement fails to compute too is the step's fault (a query of
                # death): back to the caller, rather than banning server after server
                if not isinstance(f.error, RETRIABLE) or computing_failures > 1 or time.monotonic() > deadline:
                    raise f.error from None
                self._repair(sess, f.index, f.error, deadline)
                start = f.index
                continue
            for k, out in outputs.items():
                inputs[sess.hops[k].last] = out
            break
        sess.history.append(inputs, [h.first for h in sess.hops], small["position_ids"], small.get("key_mask"),
                            small.get("beam_order"))
        sess.position += T
        return inputs[self.num_layers]

    def _run_chain(self, sess: GatewaySession, start: int, x: torch.Tensor, small: dict[str, torch.Tensor],
                   step: int, tokens: int) -> dict[int, torch.Tensor]:
        """Step hops start.. of the route. With push, the gateway sends the step to every hop at
        once (hidden states only to the first), and each server pushes its output to the next
        and returns a copy here: n+1 network hops per token instead of 2n. Returns each hop's
        output; raises HopFailure naming the first hop that failed."""
        hops, sids, n = sess.hops, sess.server_sessions, len(sess.hops)
        expect_position = sess.position + x.shape[1]
        outputs: dict[int, torch.Tensor] = {}
        if not sess.push:
            for k in range(start, n):
                try:
                    t0 = time.monotonic()
                    reply = self.pool.get(hops[k].address).request(
                        "step", self._step_fields(sess, k, step), {"hidden": x, **small},
                        timeout_s=self._allowance_s(hops[k].address, tokens))
                    x = self._accept(hops[k], reply, expect_position, time.monotonic() - t0, tokens)
                except SwarmError as e:
                    raise HopFailure(k, outputs, e) from None
                outputs[k] = x
            return outputs
        t0 = time.monotonic()
        sent, send_failure = [], None
        for k in range(start, n):
            fields = self._step_fields(sess, k, step)
            if k > start:  # its input is pushed by the previous hop, and by no other key
                fields["expect_push"], fields["from"] = True, self.pool.resolve_key(hops[k - 1].address)
            try:
                if k < n - 1:
                    fields["next"] = self._next_hop(hops[k + 1], sids[k + 1])
                conn = self.pool.get(hops[k].address)
                sent.append((k, conn, conn.send("step", fields, {"hidden": x, **small} if k == start else small)))
            except SwarmError as e:
                send_failure = HopFailure(k, outputs, e)
                break
        allowance, t_prev = 0.0, t0
        for i, (k, conn, req_id) in enumerate(sent):
            allowance += self._allowance_s(hops[k].address, tokens, floor=i == 0)
            try:
                reply = conn.receive(req_id, t0 + allowance, "step")
                outputs[k] = self._accept(hops[k], reply, expect_position, time.monotonic() - t_prev, tokens)
            except SwarmError as e:
                raise HopFailure(k, outputs, e) from None
            if reply.get("pushed") is False and i + 1 < len(sent):
                # the server could not reach the next one: hand the output over ourselves. If we
                # cannot reach it either, the next server is the one that failed, not this one
                # (blaming this one would replace a healthy server and then fail again on the
                # dead one: two failovers for one death)
                nk, nconn, _ = sent[i + 1]
                try:
                    fields = self._step_fields(sess, nk, step)
                    if nk < n - 1:
                        fields["next"] = self._next_hop(hops[nk + 1], sids[nk + 1])
                    sent[i + 1] = (nk, nconn, nconn.send("step", fields, {"hidden": outputs[k], **small}))
                except SwarmError as e:
                    raise HopFailure(nk, outputs, e) from None
            t_prev = time.monotonic()
        if send_failure is not None:
            raise send_failure
        return outputs

    @staticmethod
    def _step_fields(sess: GatewaySession, k: int, step: int) -> dict:
        fields: dict = {"session": sess.server_sessions[k], "step": step}
        if sess.cut is not None:
            fields["start"] = sess.cut  # every hop cuts its cache back there before the step
        return fields

    def _next_hop(self, hop: Hop, sid: str) -> dict:
        """Where a server pushes its output: the next server's address, key and session."""
        key = self.pool.resolve_key(hop.address)
        if key is None:
            raise PeerUnavailableError(f"peer {hop.address}: its public key is not known")
        return {"address": hop.address, "key": key, "session": sid}

    def _accept(self, hop: Hop, reply: Message, expect_position: int, seconds: float, tokens: int) -> torch.Tensor:
        if reply.get("position") != expect_position:
            raise SessionError(f"server {hop.address} is at position {reply.get('position')}, "
                               f"the session at {expect_position}")
        if not reply.get("repeated"):
            self.step_times.record(hop.address, seconds, tokens)
        self.bans.succeeded(hop.address)
        return _hidden(reply)

    def _repair(self, sess: GatewaySession, index: int, error: SwarmError, deadline: float) -> None:
        """Replace hop `index` by servers covering its blocks, their caches rebuilt by replay."""
        hop = sess.hops[index]
        detected_at = time.time()
        self._fail(hop, error)
        t0 = time.monotonic()
        history = sess.history if sess.position > 0 else None
        hops, sids, outputs, replay_s = self._open_span(
            hop.first, hop.last, max_length=sess.max_length, batch=sess.batch, deadline=deadline, history=history,
            adapter=sess.adapter)
        total_s = time.monotonic() - t0
        self.last_failover = {
            "detected_at": detected_at, "blocks": [hop.first, hop.last], "failed": hop.address,
            "replacements": _route_json(hops), "reason": str(error), "replayed_positions": sess.position,
            "reroute_s": round(total_s - replay_s, 6), "replay_s": round(replay_s, 6),
        }
        sess.hops[index:index + 1] = hops
        sess.server_sessions[index:index + 1] = sids
        for boundary, out in outputs.items():
            sess.history.reset_boundary(boundary, out)
        self.failovers += 1
        log.warning("session %s: blocks %d:%d moved to %s in %.3f s (%d positions replayed in %.3f s)", sess.id[:8],
                    hop.first, hop.last, _route_text(hops), total_s, sess.position, replay_s)

    def on_close(self, msg: Message):
        sid = msg.get("session")
        with self._lock:
            sess = self.sessions.pop(sid, None) if isinstance(sid, str) else None
        if sess is None:
            return {"closed": False}, None
        self._close_remote(list(zip(sess.hops, sess.server_sessions)))
        return {"closed": True}, None

    def on_forward(self, msg: Message):
        """A batch through every block with no cache; a failed hop is re-routed and retried.
        A large batch is split across several chains run at once."""
        self._check_model(msg)
        tensors = self._tensors(msg)
        deadline = time.monotonic() + _route_timeout(msg)
        lora, fields = self._lora(msg)
        outs = self._split(tensors, lora, lambda part: self._forward_chain(part, lora, fields, deadline))
        return {}, {"hidden": torch.cat([o["hidden"] for o in outs])}

    def _forward_chain(self, tensors: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], fields: dict,
                       deadline: float) -> dict[str, torch.Tensor]:
        x, first = tensors["hidden"], 0
        small = {k: v for k, v in tensors.items() if k != "hidden"}
        tokens = x.shape[0] * x.shape[1]
        suspects: dict[Hop, SwarmError] = {}
        while first < self.num_layers:
            for hop in self._plan(first, self.num_layers, deadline, spread=True, adapter=fields.get("adapter"),
                                  exclude={h.address for h in suspects}):
                try:
                    x = self._forward_hop(hop, x, small, lora, fields, tokens)
                except RETRIABLE as e:
                    self._hop_failed(hop, e, suspects)
                    if time.monotonic() > deadline:  # servers exist but keep failing
                        raise
                    break
                first = hop.last
        self._convict(suspects)
        return {"hidden": x}

    def _hop_failed(self, hop: Hop, error: SwarmError, suspects: dict[Hop, SwarmError]) -> None:
        """A hop of a forward or backward pass failed. A server that failed while computing
        (RemoteError) may have been handed a request that no server can compute (a query of
        death): it is only suspected and routed around; if a second server fails the same
        request that way, the request goes back to the caller and nobody is banned. The
        suspects are banned once another server has computed what they could not."""
        if not isinstance(error, RemoteError):
            self._fail(hop, error)
        elif suspects:
            raise error
        else:
            suspects[hop] = error

    def _convict(self, suspects: dict[Hop, SwarmError]) -> None:
        for hop, error in suspects.items():
            self._fail(hop, error)

    def _forward_hop(self, hop: Hop, x: torch.Tensor, small: dict, lora: dict[str, torch.Tensor], fields: dict,
                     tokens: int) -> torch.Tensor:
        """One hop's `forward` request: its blocks of the stack, without cache."""
        out = _hidden(self.pool.get(hop.address).request(
            "forward", {**fields, "blocks": [hop.first, hop.last]}, {"hidden": x, **small, **_slice(lora, hop)},
            timeout_s=max(UNMEASURED_STEP_S, self._allowance_s(hop.address, tokens))))
        self.bans.succeeded(hop.address)
        return out

    def on_backward(self, msg: Message):
        """The gradient of the whole model's block stack w.r.t. its input, given its input and
        the gradient of its output. The chain is run forward (each hop's input kept here), then
        backward hop by hop in reverse; any failed hop bans its server and the whole pass is
        re-planned and redone, until the caller's deadline. Servers keep nothing between calls.
        A large batch is split across several chains run at once; LoRA gradients are summed."""
        self._check_model(msg)
        tensors = self._tensors(msg)
        grad = msg.tensor("grad_output")
        assert grad is not None
        if grad.shape != tensors["hidden"].shape:
            raise ProtocolError(f"grad_output must have the shape of hidden {list(tensors['hidden'].shape)}, "
                                f"got {list(grad.shape)}")
        deadline = time.monotonic() + _route_timeout(msg)
        lora, fields = self._lora(msg)
        outs = self._split({**tensors, "grad_output": grad}, lora,
                           lambda part: self._backward_chain(part, lora, fields, deadline))
        result = {"grad_input": torch.cat([o["grad_input"] for o in outs])}
        for k in outs[0]:
            if k != "grad_input":
                result[k] = torch.stack([o[k] for o in outs]).sum(0)
        return {}, result

    def _backward_chain(self, tensors: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], fields: dict,
                        deadline: float) -> dict[str, torch.Tensor]:
        grad = tensors["grad_output"]
        small = {k: v for k, v in tensors.items() if k not in ("hidden", "grad_output")}
        tokens = tensors["hidden"].shape[0] * tensors["hidden"].shape[1]
        suspects: dict[Hop, SwarmError] = {}
        while True:
            hops = self._plan(0, self.num_layers, deadline, spread=True, adapter=fields.get("adapter"),
                              exclude={h.address for h in suspects})
            inputs = [tensors["hidden"]]  # each hop's input; the last hop's output is not needed
            hop = hops[0]
            try:
                for hop in hops[:-1]:
                    inputs.append(self._forward_hop(hop, inputs[-1], small, lora, fields, tokens))
                g = grad
                lora_grads: dict[str, list[torch.Tensor]] = {f"grad_{k}": [] for k in lora}
                for hop, x_in in reversed(list(zip(hops, inputs))):
                    reply = self.pool.get(hop.address).request(
                        "backward", {**fields, "blocks": [hop.first, hop.last]},
                        {"hidden": x_in, "grad_output": g, **small, **_slice(lora, hop)},
                        timeout_s=max(UNMEASURED_STEP_S, 3 * self._allowance_s(hop.address, tokens)))
                    g_in = reply.tensors.get("grad_input")
                    if g_in is None or any(k not in reply.tensors for k in lora_grads):
                        raise ProtocolError("backward reply lacks grad_input or a LoRA gradient")
                    g = g_in
                    self.bans.succeeded(hop.address)
                    for k, parts in lora_grads.items():
                        parts.insert(0, reply.tensors[k])  # hops come back last first
                self._convict(suspects)
                return {"grad_input": g, **{k: torch.cat(v) for k, v in lora_grads.items()}}
            except RETRIABLE as e:
                self._hop_failed(hop, e, suspects)
                if time.monotonic() > deadline:
                    raise

    def _split(self, tensors: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], run) -> list[dict]:
        """Run `run` on the whole batch, or, for a large one, on parts of it at once (each part
        takes its own speed-weighted chain, so big batches spread over the swarm)."""
        B, T = tensors["hidden"].shape[:2]
        per_sample = any(v.ndim == 4 for v in lora.values())  # deep prompts given per sample: keep whole
        parts = 1 if per_sample or B * T < SPLIT_MIN_TOKENS else min(B, MAX_SPLIT_PARTS)
        if parts == 1:
            return [run(tensors)]
        chunks = [dict(zip(tensors, vals)) for vals in zip(*(v.tensor_split(parts) for v in tensors.values()))]
        return list(self._split_pool.map(run, chunks))

    def _lora(self, msg: Message) -> tuple[dict[str, torch.Tensor], dict]:
        """The app's LoRA tensors ([num_layers, ...] each, sliced per hop) and the fields that go
        with every hop's request."""
        lora = Lora.client_tensors(msg.tensors)
        fields: dict = {"model_id": self.model_id}
        adapter = _adapter(msg)
        if adapter is not None:
            fields["adapter"] = adapter
        if lora:
            bad = [k for k, v in lora.items() if v.ndim not in (3, 4) or v.shape[0] != self.num_layers]
            if bad:
                raise TensorError(f"LoRA tensors and deep prompts must be [{self.num_layers} blocks, ...]: "
                                  f"{bad[0]} is not")
            self._check_deep_prompts(lora.get("deep_prompts"), msg.tensor("hidden"))
            fields["lora_scaling"] = msg.get("lora_scaling", 1.0)
        return lora, fields

    def _check_deep_prompts(self, deep: torch.Tensor | None, hidden: torch.Tensor | None) -> None:
        """Deep prompts fit the hidden states: checked here, so that a request no server could
        compute is refused before any server is asked (and blamed)."""
        if deep is None or hidden is None:
            return
        B, T, H = hidden.shape
        per_sample = deep.ndim == 4
        if deep.shape[-1] != H or deep.shape[-2] > T or (per_sample and deep.shape[1] != B):
            want = f"[{self.num_layers}, {B}, prompt <= {T}, {H}]" if per_sample else \
                f"[{self.num_layers}, prompt <= {T}, {H}]"
            raise TensorError(f"deep_prompts must be {want} for hidden {list(hidden.shape)}, got {list(deep.shape)}")

    # --- housekeeping -------------------------------------------------------------------------
    def _close_remote(self, opened: list[tuple[Hop, str]]) -> None:
        for hop, sid in opened:
            if self.bans.is_banned(hop.address):
                continue  # it failed: closing could hang on it, and it frees idle sessions itself
            try:
                self.pool.get(hop.address).request("close", {"session": sid}, timeout_s=2.0)
            except SwarmError as e:  # the server frees it after its idle timeout anyway
                log.info("closing session on %s: %s", hop.address, e)

    def expire_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            stale = [s for s in self.sessions.values() if now - s.last_used > APP_IDLE_TIMEOUT_S]
            for s in stale:
                del self.sessions[s.id]
        for s in stale:
            log.info("app session %s idle: closing it", s.id[:8])
            self._close_remote(list(zip(s.hops, s.server_sessions)))

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self.sessions.values())
            self.sessions.clear()
        for s in sessions:
            self._close_remote(list(zip(s.hops, s.server_sessions)))


def _adapter(msg: Message) -> str | None:
    name = msg.get("adapter")
    if name is not None and not (isinstance(name, str) and 0 < len(name) <= 64):
        raise ProtocolError("adapter must be an adapter name (a string)")
    return name


def _slice(lora: dict[str, torch.Tensor], hop: Hop) -> dict[str, torch.Tensor]:
    return {k: v[hop.first:hop.last] for k, v in lora.items()}


def _route_timeout(msg: Message) -> float:
    value = msg.get("route_timeout_s", DEFAULT_ROUTE_TIMEOUT_S)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= MAX_ROUTE_TIMEOUT_S:
        raise ProtocolError(f"route_timeout_s must be a number of seconds within 0..{MAX_ROUTE_TIMEOUT_S:.0f}")
    return float(value)


def _route_json(hops: list[Hop]) -> list[list]:
    return [[h.address, h.first, h.last] for h in hops]


def _route_text(hops: list[Hop]) -> str:
    return " -> ".join(f"{h.address}[{h.first}:{h.last})" for h in hops)


def _hidden(reply: Message) -> torch.Tensor:
    hidden = reply.tensor("hidden")
    assert hidden is not None  # tensor() raises when it is missing
    return hidden
