"""The peer plane's server role: a ROUTER socket serving one span of blocks.

`SpanServer` owns the socket, the serving thread's loop and the compute thread, the span
(and moving to another), and the one way to answer; the rooms it wires do the rest:
dispatch.py (a request decoded, admitted and handed to its handler), sessions.py (opening
and closing sessions), steps.py with batching.py and pushes.py (decode steps: inline, batched
across sessions, pushed to the next hop), passes.py (forward and backward), relaying.py and
dialback.py (for peers behind NAT).

The thread that owns the socket answers gossip, ping, info, open, close and pushes itself,
and runs small decode steps inline: such a step is a few milliseconds of compute, and a
hand-off to another thread would cost more than it saves. Forward and backward passes and
large steps (prefills) go to the compute thread (compute.py), which runs steps first: a long
pass delays neither liveness nor other sessions' tokens.

Every request gets exactly one reply; a request that fails gets an error reply and leaves
every other session untouched."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import zmq

from libswarm.errors import SwarmError
from libswarm.protocol import error_reply, ok_reply
from libswarm.protocol.registry import Request
from swarmd.config import LimitsConfig
from swarmd.identity import NodeIdentity, short_id
from swarmd.logs import RateLimitedLog
from swarmd.metrics import step_histogram
from swarmd.peer.compute import ComputeThread
from swarmd.peer.dialback import DialBack
from swarmd.peer.dispatch import Dispatch
from swarmd.peer.early import EarlyPushes
from swarmd.peer.limits import KeyLimits
from swarmd.peer.owner import DEFERRED
from swarmd.peer.passes import Passes
from swarmd.peer.records import ServerSession
from swarmd.peer.relaying import Relaying
from swarmd.peer.sessions import Sessions
from swarmd.peer.steps import Steps
from swarmd.runtime.adapters import load_adapter
from swarmd.runtime.cache import CacheBudget
from swarmd.runtime.span import Lora, Span
from swarmd.transport.access import ZAP_DOMAIN, AccessControl
from swarmd.transport.connection import ConnectionPool
from swarmd.transport.netem import Link, frames_size, process_profile
from swarmd.transport.relay import RelayService, is_relay_ident

log = logging.getLogger("swarmd.peer")

POLL_INTERVAL_MS = 200  # how often idle sessions are looked at when no request arrives
MAX_PUSH_PEERS = 64  # connections kept for pushing to next hops; the least recently used goes
LOG_EVERY_S = 10.0  # refused requests are logged at most once per peer and reason this often
# after a move (or a span let go) with no session left to drain there, requests for those blocks
# are still answered `span_moved` this long: gateways whose table is a few gossip rounds old then
# reroute rather than fail
LEFT_GRACE_S = 60.0


@dataclass
class ServerStats:
    steps: int = 0
    tokens: int = 0
    forwards: int = 0
    backwards: int = 0
    errors: int = 0
    sessions_opened: int = 0
    pushes_sent: int = 0
    pushes_received: int = 0
    runs: int = 0  # times the blocks ran for steps: a batch of several sessions' steps is one
    batched_steps: int = 0  # steps that ran in a batch with other sessions' steps


class SpanServer:
    def __init__(self, zctx: zmq.Context, span: Span | None, budget: CacheBudget, model_id: str, *, max_length: int,
                 max_batch: int, idle_timeout_s: float, max_message_bytes: int, identity: NodeIdentity,
                 access: AccessControl, resolve_key: Callable[[str], str | None], limits: LimitsConfig,
                 resolve_protocol: Callable[[str], str | None] | None = None,
                 on_gossip: Callable[..., tuple[dict, None]] | None = None, drain_timeout_s: float = 300.0,
                 adapter_dirs: dict[str, str] | None = None, relay: RelayService | None = None,
                 batch_window_s: float | None = None):
        """`on_gossip(req, sender)`: membership's handler of `gossip` requests (none: refused);
        `adapter_dirs`: serve.adapters, {name: PEFT directory}; `relay`: what this daemon relays
        for servers that accept no connections (none: it relays nothing); `batch_window_s`: how
        long a decode step may wait for other sessions' steps to run with (0: never batched;
        None: half a step's time, as measured)."""
        # None until attach() (a server bound before it loads): handle() then answers WHILE_JOINING only
        self.span, self.budget, self.model_id = cast(Span, span), budget, model_id
        self.attached = span is not None
        self.max_length, self.max_batch = max_length, max_batch
        self.idle_timeout_s = idle_timeout_s
        self.sessions: dict[str, ServerSession] = {}
        self.sessions_lock = threading.Lock()  # guards self.sessions for readers in other threads
        self.opened: OrderedDict[tuple[str | None, str], str] = OrderedDict()  # (key, open_id) -> session
        self.stats = ServerStats()
        self._stats_lock = threading.Lock()  # the socket's and the compute thread both count
        self.sock = zctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.max_message_bytes = max_message_bytes
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)  # each frame; decode() checks the whole
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # CURVE server: every peer is encrypted and known by its key; the ZAP handler (access.py)
        # decides which keys may connect
        self.sock.curve_server = True
        self.sock.curve_secretkey = identity.secret_key.encode()
        self.sock.curve_publickey = identity.public_key.encode()
        self.sock.zap_domain = ZAP_DOMAIN.encode()
        self.access = access
        self.resolve_key = resolve_key
        self.zctx, self.identity = zctx, identity
        self.relay = relay or RelayService(False, 0, 0)  # what this daemon relays for others
        self.peers = ConnectionPool(zctx, identity, resolve_key, max_message_bytes, max_connections=MAX_PUSH_PEERS,
                                    resolve_protocol=resolve_protocol)  # one set of connections per thread
        self.current: tuple[bytes, int, str | None] = (b"", 0, None)  # (ident, request id, sender key)
        self.peer_host: str | None = None  # the IP address the request being handled came from
        self.quiet_log = RateLimitedLog(log, LOG_EVERY_S)
        self.key_limits = KeyLimits(limits)
        self.compute = ComputeThread(zctx, limits.queued_per_key, limits.queued_bytes_per_key)
        # benchmarks and tests: emulated links back to each caller (swarmd/transport/netem.py), else None
        self.netem = process_profile()
        self.link_peers: dict[bytes, str] = {}  # with an emulated network: a caller's node id by connection
        self.links: dict[bytes, Link] = {}
        # moving to other blocks (rebalancing): the new span, handed over by another thread and
        # switched to by the serving thread; earlier spans drain their sessions until a deadline
        self.next_span: Span | None = None
        self._next_adapters: dict[str, Lora] = {}
        self._keep_old = False  # the switch keeps the current span served beside the new one
        self._change: Callable[[], None] | None = None  # another change of spans for the serving thread
        self._switched = threading.Event()
        # trading places (placement.py, double-holding): a second span served beside `span`, new
        # sessions included, until others cover its blocks; then it drains like a moved-from span
        self.also: Span | None = None
        self.also_adapters: dict[str, Lora] = {}
        self.left: dict[tuple[int, int], float] = {}  # spans served here before: when left (monotonic)
        self.old_spans: list[tuple[Span, float]] = []  # (span, drain deadline, monotonic)
        self.drain_timeout_s = drain_timeout_s
        self.draining = False  # stopping: no new sessions
        self.step_seconds = step_histogram()
        self.busy_since: float | None = None  # monotonic start of the request being handled, if any
        self.adapter_dirs = dict(adapter_dirs or {})
        self.adapters: dict[str, Lora] = {}  # loaded for the current span

        # the rooms
        self.session_room = Sessions(self)
        # pushes that came before their step: only for a session that exists, charged to the cache
        # budget and the pusher's share (early.py), so that a flood of them pins nothing uncounted
        self.early = EarlyPushes(budget, self.key_limits, self.session_room.kv_bytes_of)
        self.steps = Steps(self, self.session_room, batch_window_s, self.step_seconds.observe)
        self.passes = Passes(self, self.session_room)
        self.passes.kept.attach(budget)
        self.dialback = DialBack(self)
        self.relaying = Relaying(self, self._relayed)
        self.dispatch = Dispatch(self, {
            "open": self.session_room.on_open,
            "step": self.steps.on_step,
            "close": self.session_room.on_close,
            "forward": self.passes.on_forward,
            "backward": self.passes.on_backward,
            "ping": lambda req: ({}, None),
            "relay_register": self.relaying.on_register,
            "reach": self.dialback.on_reach,
            "reach_back": self.dialback.on_reach_back,
        }, relay=lambda *a: self.relaying.relay(*a), on_push=self.steps.pushes.on_push, on_gossip=on_gossip)

    def _relayed(self, ident: bytes, body: list, sender: str | None) -> None:
        """A request that came through a relay (relaying.py), answered as any other."""
        self.dispatch.request(ident, body, sender)

    @property
    def handlers(self) -> dict:
        """Request type -> handler (dispatch.py): what this server answers."""
        return self.dispatch.handlers

    def bind(self, endpoint: str) -> str:
        self.sock.bind(endpoint)
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def attach(self, span: Span, budget: CacheBudget, adapters: dict[str, Lora]) -> None:
        """From another thread, once: start serving `span`. Until then (a server that binds
        before it loads, so the swarm can see the span it announced) only gossip and ping
        are answered. The span goes last: the serving thread checks it first."""
        self.budget, self.adapters, self.span = budget, adapters, span
        self.early.budget = budget
        self.passes.kept.attach(budget)  # kept training passes give their room back to sessions
        self.attached = True

    # --- the loop -------------------------------------------------------------------------
    def serve(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.compute.wakeups, zmq.POLLIN)
        batch, relaying = self.steps.batch, self.relaying
        last_sweep = time.monotonic()
        while not stop.is_set():
            self.take_changes()
            if relaying.busy:
                relaying.tend(poller)
            wait_ms = POLL_INTERVAL_MS
            if batch:
                wait_ms = max(0, min(wait_ms, int((batch.deadline() - time.monotonic()) * 1000)))
            events = dict(poller.poll(wait_ms))
            for link in list(relaying.links.values()):
                if link.sock in events:
                    relaying.received(link)
            if self.compute.wakeups in events:
                self._deliver()
            if self.sock in events:
                while True:
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.busy_since = time.monotonic()
                    try:
                        self.dispatch.handle(frames)
                    except Exception as e:  # a bug must cost one request, never the serving thread
                        self.survived(e)
                    finally:
                        self.busy_since = None
            if batch and batch.due():
                batch.run()
            if time.monotonic() - last_sweep >= POLL_INTERVAL_MS / 1000:  # not on every decode step
                self.expire_idle()
                last_sweep = time.monotonic()
        if batch:  # steps gathered when the stop came are answered, not dropped
            batch.run()
        self.compute.stop()
        self.sock.close(0)
        relaying.close_all()
        self.peers.close_all()
        self.steps.pushes.pending.clear()  # the socket is closed: nobody is answered now
        for sid in list(self.sessions):
            self.drop(sid)

    def error_reply(self, req_id: int, sender: str | None, e: Exception) -> list:
        self.count(errors=1)
        if isinstance(e, SwarmError):
            self.quiet_log.info((sender, type(e).__name__), "request %s from %s refused: %s", req_id,
                                short_id(sender), e)
        elif self.quiet_log.allow(("bug", sender, type(e).__name__)):
            # a bug must cost one request, never the daemon; its traceback once a while per
            # sender and kind, whatever a peer repeats
            log.exception("request %s from %s failed", req_id, short_id(sender), exc_info=e)
        return error_reply(req_id, e)

    def survived(self, e: Exception) -> None:
        """An exception that escaped a request's own handling (a bug): logged, and the serving
        thread goes on with the next message."""
        if self.quiet_log.allow(("escaped", type(e).__name__)):
            log.error("a message could not be handled (%s: %s); serving on", type(e).__name__, str(e)[:200],
                      exc_info=e)

    def count(self, **added: int) -> None:
        with self._stats_lock:
            for name, n in added.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    # --- work for the compute thread -------------------------------------------------------------
    def defer(self, priority: int, work: Callable[[], tuple], ident: bytes, req_id: int, sender: str | None,
              req: Request, done: Callable[[], None] | None = None) -> object:
        """Run `work` (the computation of request `req`, returning its reply's fields and
        tensors) on the compute thread; its reply is sent when it is done."""
        frame_bytes, msg = req.msg.frame_bytes, req.msg

        def run() -> list:
            try:
                fields, tensors = work()
                return ok_reply(req_id, fields, tensors, frame_bytes=frame_bytes)
            except Exception as e:
                return self.error_reply(req_id, sender, e)
        self.compute.submit(priority, run, ident, req_id, msg.deadline, done, key=sender,
                            nbytes=sum(t.nbytes for t in msg.tensors.values()))
        return DEFERRED

    def _deliver(self) -> None:
        """Send the replies of the compute thread's finished work (on the socket's thread)."""
        for job, reply in self.compute.finished():
            if job.done is not None:
                job.done()
            self.send(job.ident, reply, job.req_id)

    def emulate(self, ident: bytes, frames: list) -> bool:
        """Benchmarks and tests: wait as the emulated link to `ident` would; False when the
        message is lost on it."""
        if self.netem is None:
            return True
        link = self.links.get(ident)
        if link is None:
            if len(self.links) >= 4096:
                self.links.clear()
            link = self.links[ident] = Link(self.netem, self.link_peers.get(ident))
        wait_s, _ = link.admit(frames_size(frames))  # a reply cannot cut the caller's connection
        if wait_s is None:
            return False
        time.sleep(wait_s)
        return True

    def send(self, ident: bytes, reply: list, req_id: int) -> None:
        """The one way a reply leaves this server (directly, or sealed through a relay)."""
        if not self.emulate(ident, reply):
            return
        if is_relay_ident(ident):
            self.relaying.send(ident, reply, req_id)
            return
        try:
            self.sock.send_multipart([ident, *reply], copy=False)
        except zmq.ZMQError as e:
            log.warning("could not reply to request %s: %s", req_id, e)

    # --- what the daemon and discovery read of the rooms --------------------------------------
    @property
    def pending(self) -> dict:
        """Steps waiting for their push (pushes.py)."""
        return self.steps.pushes.pending

    @property
    def gossip_time(self):
        return self.dispatch.gossip_time

    @property
    def reached(self) -> OrderedDict[str, float]:
        """Dial-back nonces that got through (dialback.py)."""
        return self.dialback.reached

    @property
    def relay_failures(self) -> dict[str, tuple[float, str]]:
        return self.relaying.failures

    @property
    def relays_up(self) -> list[tuple[str, str]]:
        return self.relaying.up

    def want_relays(self, relays: list[tuple[str, str]]) -> None:
        """From another thread: keep links to these relays ((node id, address) each), none other."""
        self.relaying.want(relays)

    def stalled_s(self) -> float:
        """How long the request being handled, on the socket's or the compute thread, has been
        computing (0 when idle); read by the main thread, which does not feed the watchdog past
        serve.stall_timeout_s."""
        now = time.monotonic()
        return max([0.0, *(now - since for since in (self.busy_since, self.compute.busy_since) if since is not None)])

    # --- moving ----------------------------------------------------------------------------
    def switch_span(self, span: Span, timeout_s: float = 10.0, keep: bool = False) -> bool:
        """From another thread: serve `span` for new sessions from now on; sessions open on
        the current one drain there, or with `keep` the current one goes on serving beside it,
        new sessions included (`also`), until `drop_also`. True once the serving thread has
        switched."""
        self._switched.clear()
        self._next_adapters = self.read_adapters(span)
        self._keep_old = keep
        self.next_span = span
        return self._switched.wait(timeout_s)

    def add_also(self, span: Span, timeout_s: float = 10.0) -> bool:
        """From another thread: serve `span` beside the current one (blocks another server is
        about to leave) until `drop_also`. True once the serving thread serves it."""
        adapters = self.read_adapters(span)

        def add() -> None:
            self._retire_also()
            self.also, self.also_adapters = span, adapters
            log.info("now serving blocks %d:%d beside %d:%d", span.start, span.end, self.span.start, self.span.end)
        return self._on_serving_thread(add, timeout_s)

    def drop_also(self, timeout_s: float = 10.0) -> bool:
        """From another thread: stop taking sessions on the span served beside the current one;
        those open there drain as after a move. True once the serving thread has let it go."""
        return self._on_serving_thread(self._retire_also, timeout_s)

    def take_changes(self) -> None:
        """On the serving thread, between two requests: the change of spans another thread
        handed over (switch_span, add_also, drop_also), if any."""
        if self.next_span is not None:
            self._switch()
        if self._change is not None:
            change, self._change = self._change, None
            change()
            self._switched.set()

    def _on_serving_thread(self, change: Callable[[], None], timeout_s: float) -> bool:
        """Have the serving thread make `change` between two requests: it alone reads the spans
        while it handles one."""
        self._switched.clear()
        self._change = change
        return self._switched.wait(timeout_s)

    def _retire_also(self) -> None:
        also, self.also, self.also_adapters = self.also, None, {}
        if also is None:
            return
        self.left[also.start, also.end] = time.monotonic()
        draining = sum(1 for x in self.sessions.values() if x.span is also)
        if draining:
            self.old_spans.append((also, time.monotonic() + self.drain_timeout_s))
        log.info("no longer serving blocks %d:%d beside %d:%d (%d sessions drain there)", also.start, also.end,
                 self.span.start, self.span.end, draining)

    def read_adapters(self, span: Span) -> dict[str, Lora]:
        """The hosted adapters (serve.adapters) for `span`, moved to its device and dtype once here
        rather than at every step."""
        out = {}
        for name, d in self.adapter_dirs.items():
            lora = load_adapter(name, d, span.checkpoint, span.start, span.end)
            out[name] = Lora(lora.scaling, {k: v.to(span.device, span.dtype) for k, v in lora.tensors.items()})
        return out

    def _switch(self) -> None:
        new, self.next_span = self.next_span, None
        assert new is not None
        old, old_adapters = self.span, self.adapters
        self.adapters = self._next_adapters
        self.span = new
        if self._keep_old:
            self._retire_also()
            self.also, self.also_adapters = old, old_adapters
            log.info("now serving blocks %d:%d, and %d:%d beside them until others cover those", new.start, new.end,
                     old.start, old.end)
            self._switched.set()
            return
        draining = sum(1 for x in self.sessions.values() if x.span is old)
        self.left[old.start, old.end] = time.monotonic()
        if draining:
            self.old_spans.append((old, time.monotonic() + self.drain_timeout_s))
        log.info("now serving blocks %d:%d (was %d:%d; %d sessions drain there)", new.start, new.end, old.start,
                 old.end, draining)
        self._switched.set()

    def _drain_old_spans(self, now: float) -> None:
        for span, deadline in list(self.old_spans):
            users = [sid for sid, x in self.sessions.items() if x.span is span]
            if users and now > deadline:
                log.info("drain of blocks %d:%d timed out: closing %d sessions (their gateways fail over)",
                         span.start, span.end, len(users))
                for sid in users:
                    self.drop(sid)
                users = []
            if not users:
                self.old_spans.remove((span, deadline))
                log.info("blocks %d:%d drained and unloaded", span.start, span.end)
                if span.device.type == "cuda":
                    torch.cuda.empty_cache()

    def moved_from(self, first: int, last: int) -> bool:
        """Whether blocks [first, last) were served here lately (LEFT_GRACE_S), or drain here."""
        now = time.monotonic()
        for span, at in list(self.left.items()):
            if now - at > LEFT_GRACE_S:
                del self.left[span]
        return (any(old.start <= first < last <= old.end for old, _ in self.old_spans)
                or any(a <= first < last <= b for a, b in self.left))

    def info(self) -> dict:
        if not self.attached:
            return {"model_id": self.model_id, "span": None, "sessions": 0, "max_length": self.max_length,
                    "max_batch": self.max_batch}
        return {
            "model_id": self.model_id,
            "span": [self.span.start, self.span.end],
            "num_layers": self.span.checkpoint.num_layers,
            "hidden_size": self.span.hidden_size,
            "dtype": str(self.span.dtype).removeprefix("torch."),
            "device": str(self.span.device),
            "cache_max_bytes": self.budget.max_bytes,
            "cache_free_bytes": self.budget.free_bytes,
            "sessions": len(self.sessions),
            "max_length": self.max_length,
            "max_batch": self.max_batch,
            "fingerprints": self.span.fingerprints,
        }

    # --- housekeeping ------------------------------------------------------------------------
    def drop(self, sid: str) -> bool:
        """Close session `sid`: its waiting step answered, its early pushes and cache freed."""
        with self.sessions_lock:
            s = self.sessions.pop(sid, None)
        if s is None:
            return False
        self.steps.pushes.unwait(s, "its session was closed")
        self.early.forget(s.id)
        self.budget.release(s.cache.nbytes)
        s.span.forget(s.cache)
        return True

    def expire_idle(self) -> None:
        now = time.monotonic()
        if self.relay.servers:
            self.relaying.expire()
        if self.old_spans:
            self._drain_old_spans(now)
        self.steps.pushes.expire(now)
        self.session_room.expire_idle(now)
        self.steps.batch.forget_idle(now)
