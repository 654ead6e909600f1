"""The peer plane's server role: a ROUTER socket serving one span of blocks.

The thread that owns the socket answers gossip, ping, info, open, close and pushes itself,
and runs small decode steps inline: such a step is a few milliseconds of compute, and a
hand-off to another thread would cost more than it saves. Decode steps of different sessions
that arrive together run as one batch (`serve.batch_window_ms`): the weights are read once
for all of them, which is where a shared server's throughput comes from. Forward and backward
passes and large steps (prefills) go to the compute thread (compute.py), which runs steps
first: a long pass delays neither liveness nor other sessions' tokens.

Every request gets exactly one reply; a request that fails gets an error reply and leaves
every other session untouched."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import zmq

from libswarm.errors import (
    CacheFullError,
    LimitError,
    PeerUnavailableError,
    ProtocolError,
    SessionError,
    SpanMovedError,
    SwarmError,
    TensorError,
    WrongModelError,
)
from libswarm.protocol import Message, decode, error_reply, ok_reply, registry
from libswarm.protocol.messages import FRAME_BYTES, peek_type
from libswarm.protocol.tensors import tensor_digest
from swarmd.config import LimitsConfig
from swarmd.discovery.keyquery import split_address
from swarmd.identity import NodeIdentity, is_key, short_id
from swarmd.inputs import beam_order, positions_and_mask
from swarmd.logs import RateLimitedLog
from swarmd.metrics import step_histogram
from swarmd.peer.compute import PASS, STEP, ComputeThread
from swarmd.peer.early import EarlyPushes
from swarmd.peer.limits import GossipTime, KeyLimits, shared_network
from swarmd.peer.sessions import BatchedStep, PendingStep, ServerSession
from swarmd.runtime.adapters import load_adapter, slice_lora
from swarmd.runtime.cache import CacheBudget
from swarmd.runtime.span import DEEP_PROMPTS, Lora, Span, client_trainables
from swarmd.transport.access import ZAP_DOMAIN, AccessControl
from swarmd.transport.connection import ConnectionPool, PeerConnection
from swarmd.transport.netem import Link, frames_size, process_profile
from swarmd.transport.relay import (
    KEEPALIVE_S,
    RelayLink,
    RelayService,
    Sealer,
    is_relay_ident,
    open_relayed,
    relay_ident,
    sealed_message,
    split_relay_ident,
)

log = logging.getLogger("swarmd.peer")

POLL_INTERVAL_MS = 200  # how often idle sessions are looked at when no request arrives
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A step waiting for its push (or a push waiting for its step) is dropped after this long: the
# gateway has long given up on it by then and resent the step from its history.
PENDING_TIMEOUT_S = 60.0
MAX_PENDING = 4096  # bounds the steps waiting for pushes, over all sessions
MAX_PUSH_PEERS = 64  # connections kept for pushing to next hops; the least recently used goes
LOG_EVERY_S = 10.0  # refused requests are logged at most once per peer and reason this often
MAX_OPEN_ID = 64  # characters of an open's open_id
MAX_OPEN_IDS = 4096  # open_ids remembered (the oldest forgotten first)
DEFERRED = object()  # a handler's answer when the reply is sent later (a step waiting for its push)
INLINE_MAX_TOKENS = 32  # a step of at most this many tokens (batch x length) runs on the socket's thread
MAX_BATCH_ROWS = 64  # rows (sessions' batches together) of one batched decode step
DEFAULT_WINDOW_S = 0.002  # serve.batch_window_ms: auto, before a step's time is measured...
MAX_AUTO_WINDOW_S = 0.050  # ...and at most, whatever a step takes
ACTIVE_S = 1.0  # a session that stepped this recently, and is due again within the window, is waited for
# answered before the span is loaded: membership, and relaying (which needs no blocks)
WHILE_JOINING = ("gossip", "ping", "reach", "reach_back", "relay_register")
REACH_TIMEOUT_S = 3.0  # a dial-back that does not get through in this time finds the node unreachable
MAX_DIAL_BACKS = 4  # reachability checks this daemon runs for others at once
MAX_REACHED = 64  # dial-back nonces remembered


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
        """`on_gossip(msg, sender)`: membership's handler of `gossip` requests (none: refused);
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
        self.stats = ServerStats()
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
        self._lock = threading.Lock()  # guards self.sessions for readers in other threads
        self.pending: dict[tuple[str, int], PendingStep] = {}
        self.resolve_key = resolve_key
        self.zctx, self.identity = zctx, identity
        # relaying (swarmd/transport/relay.py): as a relay, for others; as a server that accepts
        # no connections, its links to its relays (wanted ones set by another thread)
        self.relay = relay or RelayService(False, 0, 0)
        self.sealer = Sealer(identity)
        self.relay_links: dict[str, RelayLink] = {}
        self._want_relays: list[tuple[str, str]] | None = None
        self.relay_failures: dict[str, tuple[float, str]] = {}  # relay id -> (monotonic, why) of its last failure
        self.relays_up: list[tuple[str, str]] = []  # (relay id, address) registered, for the record
        self._dial_backs = 0
        self.reached: OrderedDict[str, float] = OrderedDict()  # dial-back nonces that got through
        self.batch_window_s = batch_window_s
        self._batch: list[BatchedStep] = []
        self._batch_since = 0.0  # monotonic: when its first step came
        self._step_s: float | None = None  # a decode step's time lately (the batch window's default)
        # session id -> (monotonic time of its latest step here, the time between its steps here lately)
        self._stepped: dict[str, tuple[float, float | None]] = {}
        self.peers = ConnectionPool(zctx, identity, resolve_key, max_message_bytes, max_connections=MAX_PUSH_PEERS,
                                    resolve_protocol=resolve_protocol)  # one set of connections per thread
        self._current: tuple[bytes, int, str | None] = (b"", 0, None)  # (ident, request id, sender key)
        self._peer_host: str | None = None  # the IP address the request being handled came from
        self.quiet_log = RateLimitedLog(log, LOG_EVERY_S)
        self.key_limits = KeyLimits(limits)
        # pushes that came before their step: only for a session that exists, charged to the cache
        # budget and the pusher's share (early.py), so that a flood of them pins nothing uncounted
        self.early = EarlyPushes(budget, self.key_limits, self._kv_bytes_of)
        # benchmarks and tests: emulated links back to each caller (swarmd/transport/netem.py), else None
        self.netem = process_profile()
        self.opened: OrderedDict[tuple[str | None, str], str] = OrderedDict()  # (key, open_id) -> session
        self.link_peers: dict[bytes, str] = {}  # with an emulated network: a caller's node id by connection
        self.links: dict[bytes, Link] = {}
        self.compute = ComputeThread(zctx, limits.queued_per_key, limits.queued_bytes_per_key)
        self._stats_lock = threading.Lock()  # the socket's and the compute thread both count
        # moving to other blocks (rebalancing): the new span, handed over by another thread and
        # switched to by the serving thread; earlier spans drain their sessions until a deadline
        self._next_span: Span | None = None
        self._next_adapters: dict[str, Lora] = {}
        self._switched = threading.Event()
        self.old_spans: list[tuple[Span, float]] = []  # (span, drain deadline, monotonic)
        self.drain_timeout_s = drain_timeout_s
        self.draining = False  # stopping: no new sessions
        self.step_seconds = step_histogram()
        self.busy_since: float | None = None  # monotonic start of the request being handled, if any
        self.adapter_dirs = dict(adapter_dirs or {})
        self.adapters: dict[str, Lora] = {}  # loaded for the current span
        self.handlers = {
            "open": self.on_open,
            "step": self.on_step,
            "close": self.on_close,
            "forward": self.on_forward,
            "backward": self.on_backward,
            "ping": lambda msg: ({}, None),
            "relay_register": self.on_relay_register,
            "reach": self.on_reach,
            "reach_back": self.on_reach_back,
        }
        self.on_gossip, self.gossip_time = on_gossip, GossipTime()
        if on_gossip is not None:  # answered here, on the socket's thread, whatever compute is running
            self.handlers["gossip"] = self._gossip

    def bind(self, endpoint: str) -> str:
        self.sock.bind(endpoint)
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def attach(self, span: Span, budget: CacheBudget, adapters: dict[str, Lora]) -> None:
        """From another thread, once: start serving `span`. Until then (a server that binds
        before it loads, so the swarm can see the span it announced) only gossip and ping
        are answered. The span goes last: the serving thread checks it first."""
        self.budget, self.adapters, self.span = budget, adapters, span
        self.early.budget = budget
        self.attached = True

    # --- the loop -------------------------------------------------------------------------
    def serve(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.compute.wakeups, zmq.POLLIN)
        last_sweep = time.monotonic()
        while not stop.is_set():
            if self._next_span is not None:
                self._switch()
            if self._want_relays is not None or self.relay_links:
                self._tend_links(poller)
            wait_ms = POLL_INTERVAL_MS
            if self._batch:
                wait_ms = max(0, min(wait_ms, int((self._batch_deadline() - time.monotonic()) * 1000)))
            events = dict(poller.poll(wait_ms))
            for link in list(self.relay_links.values()):
                if link.sock in events:
                    self._from_relay(link)
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
                        self.handle(frames)
                    except Exception as e:  # a bug must cost one request, never the serving thread
                        self._survived(e)
                    finally:
                        self.busy_since = None
            if self._batch and self._batch_due():
                self._run_batch()
            if time.monotonic() - last_sweep >= POLL_INTERVAL_MS / 1000:  # not on every decode step
                self.expire_idle()
                last_sweep = time.monotonic()
        if self._batch:  # steps gathered when the stop came are answered, not dropped
            self._run_batch()
        self.compute.stop()
        self.sock.close(0)
        for link in self.relay_links.values():
            link.close()
        self.peers.close_all()
        self.pending.clear()  # the socket is closed: nobody is answered now
        for sid in list(self.sessions):
            self._drop(sid)

    def handle(self, frames) -> None:
        ident, body = frames[0].bytes, frames[1:]
        sender = _sender_key(body[0]) if body else None
        if self.access.private and not self.access.allows(sender):
            return  # its key was removed from the allowed list (SIGHUP) after it connected
        if self.netem is not None and sender is not None and ident not in self.link_peers:
            if len(self.link_peers) >= 4096:
                self.link_peers.clear()
            self.link_peers[ident] = sender
        if body and peek_type(body[0]) == "relay":
            self._relay(ident, body, sender)
            return
        self._handle(ident, body, sender)

    def _handle(self, ident: bytes, body: list, sender: str | None) -> None:
        """A request from `sender` (CURVE-proven, or proven by its seal when relayed), whose
        reply goes to `ident`."""
        if self.access.private and not self.access.allows(sender):
            return  # not allowed (a relayed sender is checked here: its relay was, in handle())
        req_id = 0
        try:
            msg = decode(body, self.max_message_bytes)
            req_id = msg.id
            if msg.type == "push":  # fire-and-forget from another server: never answered, dropped if bad
                try:
                    self.key_limits.admit_request(sender)
                except LimitError:
                    return
                if self.attached:
                    self.on_push(msg, sender)
                return
            self.key_limits.admit_request(sender)
            registry.check(registry.PEER, msg)
            if not self.attached and msg.type not in WHILE_JOINING:
                # a restarted server no gateway has seen leave: answered like a moved span, so that
                # the gateway routes around it (a limit error would go back to the app)
                raise SpanMovedError("this server is still joining the swarm: it serves no blocks yet")
            handler = self.handlers.get(msg.type)
            if handler is None:
                raise ProtocolError(f"{msg.type!r} is not served by this daemon")
            self._current = (ident, req_id, sender)
            self._peer_host = _peer_address(body[0]) if not is_relay_ident(ident) else None
            result = handler(msg)
            if result is DEFERRED:
                return
            fields, tensors = result
            reply = ok_reply(req_id, fields, tensors, frame_bytes=_frame_bytes(msg))
        except Exception as e:
            if not req_id and body and peek_type(body[0]) == "push":
                return  # a push that does not even parse: dropped unanswered, as every push
            req_id = req_id or (e.req_id if isinstance(e, SwarmError) else 0)
            reply = self._error_reply(req_id, sender, e)
        self._send(ident, reply, req_id)

    def _error_reply(self, req_id: int, sender: str | None, e: Exception) -> list:
        self._count(errors=1)
        if isinstance(e, SwarmError):
            self.quiet_log.info((sender, type(e).__name__), "request %s from %s refused: %s", req_id,
                                short_id(sender), e)
        elif self.quiet_log.allow(("bug", sender, type(e).__name__)):
            # a bug must cost one request, never the daemon; its traceback once a while per
            # sender and kind, whatever a peer repeats
            log.exception("request %s from %s failed", req_id, short_id(sender), exc_info=e)
        return error_reply(req_id, e)

    def _survived(self, e: Exception) -> None:
        """An exception that escaped a request's own handling (a bug): logged, and the serving
        thread goes on with the next message."""
        if self.quiet_log.allow(("escaped", type(e).__name__)):
            log.error("a message could not be handled (%s: %s); serving on", type(e).__name__, str(e)[:200],
                      exc_info=e)

    def _count(self, **added: int) -> None:
        with self._stats_lock:
            for name, n in added.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    # --- work for the compute thread -------------------------------------------------------------
    def _defer(self, priority: int, work: Callable[[], tuple], ident: bytes, req_id: int, sender: str | None,
               msg: Message, done: Callable[[], None] | None = None) -> object:
        """Run `work` (the computation of request `msg`, returning its reply's fields and
        tensors) on the compute thread; its reply is sent when it is done."""
        frame_bytes = _frame_bytes(msg)

        def run() -> list:
            try:
                fields, tensors = work()
                return ok_reply(req_id, fields, tensors, frame_bytes=frame_bytes)
            except Exception as e:
                return self._error_reply(req_id, sender, e)
        self.compute.submit(priority, run, ident, req_id, msg.deadline, done, key=sender,
                            nbytes=sum(t.nbytes for t in msg.tensors.values()))
        return DEFERRED

    def _deliver(self) -> None:
        """Send the replies of the compute thread's finished work (on the socket's thread)."""
        for job, reply in self.compute.finished():
            if job.done is not None:
                job.done()
            self._send(job.ident, reply, job.req_id)

    def _emulate(self, ident: bytes, frames: list) -> bool:
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

    def _send(self, ident: bytes, reply: list, req_id: int) -> None:
        if not self._emulate(ident, reply):
            return
        if is_relay_ident(ident):
            self._send_relayed(ident, reply, req_id)
            return
        try:
            self.sock.send_multipart([ident, *reply], copy=False)
        except zmq.ZMQError as e:
            log.warning("could not reply to request %s: %s", req_id, e)

    # --- relaying ---------------------------------------------------------------------------
    def _relay(self, ident: bytes, body: list, sender: str | None) -> None:
        """As a relay: forward a sealed message to the server it is for (or a server's answer to
        its client). Not counted against the sender's request rate: the byte budget bounds it."""
        req_id = 0
        try:
            msg = decode(body, self.max_message_bytes)
            req_id = msg.id
            to = msg.get("to")
            if msg.type != "relay":
                raise ProtocolError("malformed relay message")
            if not is_key(to):
                raise ProtocolError("relay: field 'to' must be a node id")
            sealed = msg.tensor("sealed")
            assert sealed is not None
            self._expire_relayed()
            routed = self.relay.route(sender, to, ident, sum(len(_buffer(f)) for f in body), msg.id)
            if routed is None:
                return
            target, outer_id = routed
            frames = sealed_message("relay", outer_id, {"from": sender}, sealed)
            if self._emulate(target, frames):
                self.sock.send_multipart([target, *frames], copy=False)
        except Exception as e:
            req_id = req_id or (e.req_id if isinstance(e, SwarmError) else 0)
            if sender not in self.relay.servers:  # a relayed server's answers get no answer
                self._send(ident, self._error_reply(req_id, sender, e), req_id)

    def _expire_relayed(self) -> None:
        """As a relay: a relayed server whose registration lapsed (it died, or lost its link to
        this relay) cannot answer what was forwarded to it: each client waiting is told now."""
        for p in self.relay.expire():
            err = PeerUnavailableError(f"peer {short_id(p.server)}: its registration at this relay lapsed "
                                       "(it left, or lost its link here)")
            self._send(p.ident, error_reply(p.req_id, err), p.req_id)

    def _gossip(self, msg: Message):
        """Membership's answer, within gossip's limits (limits.py): a key beyond its rate is
        refused; beyond gossip's share of this thread's time, the answer is empty (the caller
        learns that this server is alive, and its news from other peers), so that no flood of
        gossip, from one key or many, takes decode steps' time."""
        self.key_limits.admit_gossip(self.sender)
        if not self.gossip_time.available():
            self.gossip_time.short += 1
            return {}, None
        t0 = time.perf_counter()
        try:
            return self.on_gossip(msg, sender=self.sender)  # type: ignore[misc]
        finally:
            self.gossip_time.spend(time.perf_counter() - t0)

    def on_relay_register(self, msg: Message):
        self._expire_relayed()  # before a slot is counted free or taken
        self.relay.register(self.sender, self._current[0], self._peer_host)
        return {"keepalive_s": KEEPALIVE_S}, None

    def want_relays(self, relays: list[tuple[str, str]]) -> None:
        """From another thread: keep links to these relays ((node id, address) each), none other."""
        self._want_relays = list(relays)

    def _tend_links(self, poller: zmq.Poller) -> None:
        """On the serving thread: links made and closed as wanted; failed ones closed (and
        remembered, so that another relay is chosen); registrations kept alive."""
        want, self._want_relays = self._want_relays, None
        if want is not None:
            wanted = dict(want)
            for rid in [r for r in self.relay_links if r not in wanted]:
                self._close_link(poller, rid, None)
            for rid, address in wanted.items():
                if rid not in self.relay_links:
                    link = self.relay_links[rid] = RelayLink(self.zctx, self.identity, rid, address)
                    poller.register(link.sock, zmq.POLLIN)
        for rid, link in list(self.relay_links.items()):
            link.tick()
            if link.failed is not None:
                self._close_link(poller, rid, link.failed)
        self.relays_up = [(rid, link.address) for rid, link in self.relay_links.items() if link.registered]

    def _close_link(self, poller: zmq.Poller, rid: str, why: str | None) -> None:
        link = self.relay_links.pop(rid)
        poller.unregister(link.sock)
        link.close()
        if why is not None:
            self.relay_failures[rid] = (time.monotonic(), why)
            log.warning("relay %s at %s lost: %s", short_id(rid), link.address, why)

    def _from_relay(self, link: RelayLink) -> None:
        while True:
            try:
                frames = link.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if peek_type(frames[0]) != "relay":
                try:
                    link.on_reply(decode(frames))
                except SwarmError:  # a relay's own reply that does not parse: dropped
                    pass
                continue
            try:
                client, inner, outer_id = open_relayed(self.sealer, frames)
            except (ProtocolError, TensorError) as e:
                self.quiet_log.warning(("relay", link.relay_id, str(e)[-24:]), "relayed message through %s dropped: %s",
                                       short_id(link.relay_id), e)
                continue
            self.busy_since = time.monotonic()
            try:
                self._handle(relay_ident(link.relay_id, client, outer_id), inner, client)
            except Exception as e:
                self._survived(e)
            finally:
                self.busy_since = None

    def _send_relayed(self, ident: bytes, reply: list, req_id: int) -> None:
        relay_id, client, outer_id = split_relay_ident(ident)
        link = self.relay_links.get(relay_id)
        if link is None:  # the relay is gone: so is the client's connection through it
            return
        try:
            frames = sealed_message("relay", outer_id, {"to": client}, self.sealer.seal(client, reply))
            link.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except (zmq.ZMQError, ProtocolError) as e:
            self.quiet_log.warning(("relay-reply", relay_id), "could not reply to relayed request %s: %s", req_id, e)

    # --- reachability --------------------------------------------------------------------------
    def on_reach(self, msg: Message):
        """A peer asks to be called back at its announced address: whether others can connect to
        it. Only the host it speaks from is called (never a third party), once, with its key
        (so nothing but a CURVE handshake is ever attempted), and only a few at a time; the
        answer travels as a `reach_back` with the peer's nonce, or not at all."""
        address, nonce = msg.require("address", str), msg.require("nonce", str)
        ident, _, sender = self._current
        if is_relay_ident(ident) or sender is None:
            raise ProtocolError("reach: ask over a direct connection")
        host_port = split_address(address)
        if host_port is None or len(nonce) > 64:
            raise ProtocolError("reach: 'address' must be tcp://host:port and 'nonce' at most 64 characters")
        seen = self._peer_host
        if seen is not None and _is_ip(host_port[0]) and _host(host_port[0]) != _host(seen):
            return {"calling": False, "why": f"its requests come from {seen}, not {host_port[0]}"}, None
        if self._dial_backs >= MAX_DIAL_BACKS:
            raise LimitError("too many reachability checks under way here; ask again later")
        self._dial_backs += 1
        threading.Thread(target=self._dial_back, args=(address, sender, nonce, seen), name="dial-back",
                         daemon=True).start()
        return {"calling": True}, None

    def _dial_back(self, address: str, key: str, nonce: str, seen: str | None) -> None:
        try:
            host = split_address(address)[0]  # type: ignore[index]
            if seen is not None and not _is_ip(host):  # a name: called only if it names that host
                try:
                    hosts = {_host(str(info[4][0])) for info in socket.getaddrinfo(host, None)}
                except OSError:
                    return
                if _host(seen) not in hosts:
                    return
            conn = PeerConnection(self.zctx, address, self.identity, key)
            try:
                conn.request("reach_back", {"nonce": nonce}, timeout_s=REACH_TIMEOUT_S)
            except SwarmError:
                pass
            finally:
                conn.close()
        finally:
            self._dial_backs -= 1

    def on_reach_back(self, msg: Message):
        nonce = msg.require("nonce", str)
        if is_relay_ident(self._current[0]):
            raise ProtocolError("reach_back: must come over a direct connection")
        self.reached[nonce[:64]] = time.monotonic()
        while len(self.reached) > MAX_REACHED:
            self.reached.popitem(last=False)
        return {}, None

    @property
    def sender(self) -> str | None:
        """The key (CURVE-proven) of the peer whose request is being handled."""
        return self._current[2]

    def stalled_s(self) -> float:
        """How long the request being handled, on the socket's or the compute thread, has been
        computing (0 when idle); read by the main thread, which does not feed the watchdog past
        serve.stall_timeout_s."""
        now = time.monotonic()
        return max([0.0, *(now - since for since in (self.busy_since, self.compute.busy_since) if since is not None)])

    # --- moving ----------------------------------------------------------------------------
    def switch_span(self, span: Span, timeout_s: float = 10.0) -> bool:
        """From another thread: serve `span` for new sessions from now on; sessions open on
        the current one drain there. True once the serving thread has switched."""
        self._switched.clear()
        self._next_adapters = self.read_adapters(span)
        self._next_span = span
        return self._switched.wait(timeout_s)

    def read_adapters(self, span: Span) -> dict[str, Lora]:
        """The hosted adapters (serve.adapters) for `span`, moved to its device and dtype once here
        rather than at every step."""
        out = {}
        for name, d in self.adapter_dirs.items():
            lora = load_adapter(name, d, span.checkpoint, span.start, span.end)
            out[name] = Lora(lora.scaling, {k: v.to(span.device, span.dtype) for k, v in lora.tensors.items()})
        return out

    def _switch(self) -> None:
        new, self._next_span = self._next_span, None
        assert new is not None
        old = self.span
        self.adapters = self._next_adapters
        self.span = new
        draining = sum(1 for x in self.sessions.values() if x.span is old)
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
                    self._drop(sid)
                users = []
            if not users:
                self.old_spans.remove((span, deadline))
                log.info("blocks %d:%d drained and unloaded", span.start, span.end)
                if span.device.type == "cuda":
                    torch.cuda.empty_cache()

    # --- handlers ------------------------------------------------------------------------
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

    def _check_model(self, msg: Message) -> None:
        asked = msg.get("model_id")
        if asked != self.model_id:
            raise WrongModelError(f"this server serves model {self.model_id}, not {asked}")

    def _check_blocks(self, msg: Message) -> tuple[int, int]:
        blocks = msg.get("blocks")
        if (
            not isinstance(blocks, list) or len(blocks) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)
        ):
            raise ProtocolError(f"{msg.type}: 'blocks' must be [first, last]")
        first, last = blocks
        if not (self.span.start <= first < last <= self.span.end):
            if any(old.start <= first < last <= old.end for old, _ in self.old_spans) or self._next_span is not None:
                raise SpanMovedError(f"this server moved to blocks {self.span.start}:{self.span.end}")
            raise LimitError(
                f"blocks {first}:{last} are not served here (this server has {self.span.start}:{self.span.end})"
            )
        return first, last

    def on_open(self, msg: Message):
        if self.draining:
            raise SpanMovedError("this server is draining (stopping): open the session elsewhere")
        self._check_model(msg)
        first, last = self._check_blocks(msg)
        max_length = msg.require("max_length", int)
        batch = msg.require("batch", int)
        if not 0 < max_length <= self.max_length:
            raise LimitError(f"max_length {max_length} is outside 1..{self.max_length} allowed by this server")
        if not 0 < batch <= self.max_batch:
            raise LimitError(f"batch {batch} is outside 1..{self.max_batch} allowed by this server")
        open_id = msg.get("open_id")
        if open_id is not None and len(open_id) > MAX_OPEN_ID:
            raise ProtocolError(f"open: open_id longer than {MAX_OPEN_ID} characters")
        again = self.opened.get((self._current[2], open_id)) if open_id is not None else None
        if again is not None and again in self.sessions:
            # a resend of an open that came (its answer was lost): the same session, nothing more held
            return {"session": again, "cache_bytes": self.sessions[again].cache.nbytes}, None
        lora = self._hosted_adapter(msg, first, last)  # before reserving: a refusal must hold nothing
        nbytes = self.span.cache_bytes(first, last, batch, max_length)
        network = shared_network(self._peer_host, self.access.private)
        with self._lock:
            held = [x.cache.nbytes for x in self.sessions.values() if x.owner == self._current[2]]
            held_network = [x.cache.nbytes for x in self.sessions.values() if network and x.network == network]
        self.budget.reserve(nbytes)  # a session that fits nowhere here is cache_full, before any per-key limit
        try:
            self.key_limits.admit_session(self._current[2], held, nbytes, self.budget.max_bytes,
                                          pushed_bytes=self.early.held_by(self._current[2]), network=network,
                                          network_held=held_network)
            cache = self.span.new_cache(first, last, batch, max_length)
        except BaseException:
            self.budget.release(nbytes)
            raise
        sid = secrets.token_hex(12)
        with self._lock:
            self.sessions[sid] = ServerSession(sid, cache, self.span, self._current[2], lora, network=network)
        self._count(sessions_opened=1)
        if open_id is not None:
            self.opened[(self._current[2], open_id)] = sid
            while len(self.opened) > MAX_OPEN_IDS:
                self.opened.popitem(last=False)
        return {"session": sid, "cache_bytes": nbytes}, None

    def _kv_bytes_of(self, key: str | None) -> int:
        """The KV cache of the sessions `key` opened here (on the serving thread, which alone
        changes them)."""
        return sum(x.cache.nbytes for x in self.sessions.values() if x.owner == key)

    def _session(self, msg: Message) -> ServerSession:
        """The caller's session: another key (the previous hop, which learns the id to push to
        it) gets the same answer as for a session that does not exist."""
        sid = msg.get("session")
        s = self.sessions.get(sid) if isinstance(sid, str) else None
        if s is None or s.owner != self._current[2]:
            raise SessionError(f"unknown or expired session {str(sid)[:32]!r}")
        s.last_used = time.monotonic()
        return s

    def _inputs(self, msg: Message, batch: int | None = None, hidden: torch.Tensor | None = None):
        """hidden [B, T, H] plus optional position_ids [B, T] int64 and key_mask [B, T] bool, checked."""
        if hidden is None:
            hidden = msg.tensor("hidden")
            assert hidden is not None
        if hidden.dtype not in FLOAT_DTYPES or hidden.ndim != 3 or hidden.shape[2] != self.span.hidden_size:
            raise TensorError(
                f"hidden must be float [batch, length, {self.span.hidden_size}], got {str(hidden.dtype)[6:]} "
                f"{list(hidden.shape)}"
            )
        B, T, _ = hidden.shape
        if B == 0 or T == 0:
            raise TensorError("hidden has an empty batch or length")
        if batch is None and (B > self.max_batch or T > self.max_length):
            raise LimitError(f"forward of batch {B} x length {T} exceeds {self.max_batch} x {self.max_length}")
        pos, mask = positions_and_mask(msg, B, T)
        return hidden, pos, mask

    def on_step(self, msg: Message):
        s = self._session(msg)
        step = msg.get("step")
        repeat = s.queued == 0 and isinstance(step, int) and step == s.last_step and s.last_output is not None
        if not repeat:
            # a route runs a session's steps in turn: a step of another number (a rerun from the
            # gateway's own copy of its input, after a push it could not vouch for) makes the one
            # still waiting for its push moot. Left waiting, a late push would run it after the rerun
            self._unwait(s, f"superseded by step {step} of its session", keep=step)
        if not repeat and msg.tensors.get("hidden") is None and msg.get("expect_push"):
            key = (s.id, step)
            expected = msg.get("from")
            if isinstance(expected, str):
                self.early.named(s, expected)
            pushed = self.early.take(s, step, expected if isinstance(expected, str) else None)
            if pushed is None:  # the previous server has not pushed yet: answer when it does
                if len(self.pending) >= MAX_PENDING:
                    raise LimitError("too many steps waiting for pushes")
                # one step of a session waits at a time (any other was let go above): a key holds
                # no more waiting steps than it has sessions open here
                s.waiting_step = step
                self.pending[key] = PendingStep(*self._current, s, msg)
                return DEFERRED
            return self._dispatch_step(s, msg, pushed, *self._current)
        return self._dispatch_step(s, msg, None, *self._current)

    def _dispatch_step(self, s: ServerSession, msg: Message, hidden: torch.Tensor | None, ident: bytes, req_id: int,
                       sender: str | None):
        """Run a step here and now when it is small and its session has nothing queued, else on
        the compute thread (after any earlier step of its session: a session's steps never
        overlap)."""
        # a step resent with its input (its push was lost) replaces the request waiting for that push
        waiting = self.pending.pop((s.id, msg.get("step")), None)
        if waiting is not None and waiting.ident != ident:
            err = SessionError("step superseded by a resend with its input")
            self._send(waiting.ident, error_reply(waiting.req_id, err), waiting.req_id)
        if s.in_batch:  # its earlier step runs first: a session's steps never overlap
            self._run_batch()
        x = hidden if hidden is not None else msg.tensors.get("hidden")
        tokens = x.shape[0] * x.shape[1] if x is not None and x.ndim == 3 else 0
        if s.queued == 0 and tokens <= INLINE_MAX_TOKENS:
            if self._batchable(s, msg, x):
                return self._gather(s, msg, hidden, ident, req_id, sender)
            return self._step(s, msg, hidden)
        def done() -> None:
            s.queued -= 1
        deferred = self._defer(STEP, lambda: self._step(s, msg, hidden), ident, req_id, sender, msg, done)
        s.queued += 1  # once queued (a refused step never runs, and never calls done)
        return deferred

    def _step(self, s: ServerSession, msg: Message, hidden: torch.Tensor | None):
        """A step's computation, on whichever thread runs it: a repeat of the last step gets its
        answer again, anything else runs the blocks."""
        step = msg.get("step")
        if isinstance(step, int) and step == s.last_step and s.last_output is not None:
            return self._repeat_step(s, msg)
        with _naming_input(msg, hidden):
            return self._run_step(s, msg, hidden)

    # --- batches of decode steps across sessions -------------------------------------------------
    def _batchable(self, s: ServerSession, msg: Message, x: torch.Tensor | None) -> bool:
        """A plain decode step (one position, no adapter, no cut-back or beam reordering, not a
        repeat), with batching on, on blocks whose rows do not affect each other's outputs."""
        step = msg.get("step")
        return (self.batch_window_s != 0 and self.span.rows_independent
                and x is not None and x.ndim == 3 and x.shape[1] == 1 and s.lora is None
                and msg.get("start") is None and "beam_order" not in msg.tensors
                and not (isinstance(step, int) and step == s.last_step))

    def _gather(self, s: ServerSession, msg: Message, hidden: torch.Tensor | None, ident: bytes, req_id: int,
                sender: str | None) -> object:
        """Check a decode step now (a bad one is refused at once, alone) and keep it for the batch."""
        with _naming_input(msg, hidden):
            hidden, pos, mask = self._inputs(msg, batch=s.cache.batch, hidden=hidden)
            s.cache.check_step(hidden.shape[0], 1)
        if pos is None:
            pos = torch.full((hidden.shape[0], 1), s.cache.length)
        if not self._batch:
            self._batch_since = time.monotonic()
        self._batch.append(BatchedStep(s, msg, hidden, pos, mask, ident, req_id, sender))
        s.in_batch = True
        return DEFERRED

    def _batch_deadline(self) -> float:
        window = self.batch_window_s
        if window is None:
            window = min(MAX_AUTO_WINDOW_S, 0.5 * self._step_s) if self._step_s is not None else DEFAULT_WINDOW_S
        return self._batch_since + window

    def _batch_due(self) -> bool:
        """Run the batch now: it is full, its first step has waited the window, or no session
        missing from it is due here before the window closes (by the pace of its steps here:
        a session whose next step is further off, being elsewhere in its route, is not waited for)."""
        now = time.monotonic()
        deadline = self._batch_deadline()
        if now >= deadline or sum(b.hidden.shape[0] for b in self._batch) >= MAX_BATCH_ROWS:
            return True
        waiting = {b.session.id for b in self._batch}
        for sid, (last, period) in list(self._stepped.items()):
            if sid in waiting or period is None or now - last > min(ACTIVE_S, 2 * period):
                continue
            if last + period <= deadline:
                return False
        return True

    def _run_batch(self) -> None:
        """Run the gathered steps: one batch per span and block range, each reply and push to its
        own next hop. A session closed meanwhile gets an error; a batch that fails is run again
        one step at a time, so that only a step at fault fails."""
        items, self._batch = self._batch, []
        groups: dict[tuple[int, int, int], list[BatchedStep]] = {}
        for b in items:
            b.session.in_batch = False
            if self.sessions.get(b.session.id) is not b.session:
                err = SessionError(f"session {b.session.id[:8]} was closed while its step waited")
                self._send(b.ident, self._error_reply(b.req_id, b.sender, err), b.req_id)
                continue
            c = b.session.cache
            groups.setdefault((id(b.session.span), c.first, c.last), []).append(b)
        for group in groups.values():
            outs = self._run_group(group) if len(group) > 1 else None
            for k, b in enumerate(group):
                try:
                    out = outs[k] if outs is not None else self._compute_step(b.session, b.hidden, b.pos, b.mask)
                    fields, tensors = self._finish_step(b.session, b.msg, out, b.hidden)
                    reply = ok_reply(b.req_id, fields, tensors, frame_bytes=_frame_bytes(b.msg))
                except Exception as e:
                    reply = self._error_reply(b.req_id, b.sender, e)
                self._send(b.ident, reply, b.req_id)

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
            self._timed(time.perf_counter() - t0, runs=1, batched_steps=len(group))
            return outs
        except Exception as e:
            log.warning("a batch of %d steps failed (%s); running them one at a time", len(group), e)
            for b, mark in zip(group, marks):
                b.session.cache.rewind(mark)
            return None

    def _timed(self, seconds: float, **counts: int) -> None:
        self.step_seconds.observe(seconds)
        self._step_s = seconds if self._step_s is None else 0.8 * self._step_s + 0.2 * seconds
        self._count(**counts)

    def _run_step(self, s: ServerSession, msg: Message, hidden: torch.Tensor | None):
        hidden, pos, mask = self._inputs(msg, batch=s.cache.batch, hidden=hidden)
        B, T, _ = hidden.shape
        start = msg.get("start")
        if start is not None:  # the session was cut back (rejected drafts): the step starts there
            if not isinstance(start, int) or isinstance(start, bool):
                raise ProtocolError("step: 'start' must be an integer position")
            s.cache.truncate(start)
        s.cache.check_step(B, T)
        order = beam_order(msg, B)
        if order is not None:
            s.cache.reorder(order)
        if pos is None:
            pos = torch.arange(s.cache.length, s.cache.length + T).expand(B, T)
        return self._finish_step(s, msg, self._compute_step(s, hidden, pos, mask), hidden)

    def _compute_step(self, s: ServerSession, hidden: torch.Tensor, pos: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
        t0 = time.perf_counter()
        out = s.span.run(hidden, pos, mask, s.cache.first, s.cache.last, cache=s.cache, lora=s.lora)
        self._timed(time.perf_counter() - t0, runs=1)
        return out

    def _finish_step(self, s: ServerSession, msg: Message, out: torch.Tensor, x: torch.Tensor):
        """A step's output: kept for a repeat, pushed to the next hop, and the reply's content,
        which names the input `x` it ran on (`consumed`: the gateway compares it with what the
        previous hop returned, so that a push it never saw cannot go unnoticed)."""
        if out.device.type != "cpu":
            out = out.cpu()  # once: the push, the reply and a repeat all send this copy
        step = msg.get("step")
        self._count(steps=1, tokens=out.shape[0] * out.shape[1])
        now = time.monotonic()
        last = self._stepped.get(s.id)
        if last is None or now - last[0] > ACTIVE_S:
            self._stepped[s.id] = (now, None)
        else:
            pace = now - last[0]
            self._stepped[s.id] = (now, pace if last[1] is None else 0.7 * last[1] + 0.3 * pace)
        consumed = tensor_digest(x)
        s.last_step, s.last_output, s.last_consumed = (step, out, consumed) if isinstance(step, int) \
            else (None, None, None)
        nxt = msg.get("next")
        pushed = self._push(nxt, step, out) if nxt is not None else None
        fields: dict = {"position": s.cache.length, "consumed": consumed}
        if pushed is False:
            fields["pushed"] = False  # the gateway sends `out` to the next server itself
        return fields, {"hidden": out}

    def _repeat_step(self, s: ServerSession, msg: Message):
        """A step already run (the gateway resent it after a failure elsewhere): same answer."""
        assert s.last_output is not None
        nxt = msg.get("next")
        fields: dict = {"position": s.cache.length, "repeated": True, "consumed": s.last_consumed}
        if nxt is not None and not self._push(nxt, s.last_step, s.last_output):
            fields["pushed"] = False
        return fields, {"hidden": s.last_output}

    def _push(self, nxt: object, step: object, out: torch.Tensor) -> bool:
        """Send this span's output straight to the next server of the route (server-to-server
        push). Only to a tcp address that a known peer with that key answers at, and never
        waiting: a peer not connected yet (or gone) gets False, and the gateway hands the
        output over itself (the connection is being made for the next step meanwhile)."""
        if not (isinstance(nxt, dict) and isinstance(nxt.get("address"), str) and isinstance(nxt.get("session"), str)
                and is_key(nxt.get("key"))):
            raise ProtocolError("step: 'next' must be {address, key, session}")
        address, key = nxt["address"], nxt["key"]
        if not address.startswith("tcp://") or self.resolve_key(address) != key:
            self.quiet_log.info(("next", address), "push to %s not sent: no known peer with key %s answers there",
                                address[:80], short_id(key))
            return False
        if not self.access.allows(key):
            self.quiet_log.info(("next", address), "push to %s not sent: its key is not allowed in this private "
                                "swarm", address)
            return False
        conn = self.peers.get(address, key)
        if conn.push("push", {"session": nxt["session"], "step": step}, {"hidden": out}, wait_s=0.0):
            self._count(pushes_sent=1)
            return True
        self.quiet_log.info(("next", address), "push to %s not delivered: peer not connected", address)
        return False

    def on_push(self, msg: Message, sender: str | None = None) -> None:
        hidden = msg.tensors.get("hidden")
        sid, step = msg.get("session"), msg.get("step")
        session = self.sessions.get(sid) if isinstance(sid, str) else None
        if hidden is not None and session is not None and isinstance(step, int) and not _fits_step(hidden, session):
            waiting = self.pending.get((session.id, step))
            if waiting is not None and _push_from(waiting.msg, sender):
                # the route's previous hop pushed what cannot be this step's input: the step is
                # refused naming that input, so that its gateway blames the pusher, not this server
                del self.pending[(session.id, step)]
                session.waiting_step = None
                err = TensorError(f"step {step}: the previous hop pushed {str(hidden.dtype)[6:]} "
                                  f"{list(hidden.shape)[:8]}, not a step of this session")
                err.consumed = tensor_digest(hidden)
                self._send(waiting.ident, self._error_reply(waiting.req_id, waiting.sender, err), waiting.req_id)
                return
        if hidden is None or session is None or not isinstance(step, int) or not _fits_step(hidden, session):
            # made up, malformed or larger than any step of the session: dropped at once
            self.quiet_log.info((sender, "push"), "push from %s dropped: no such session, or not a step of it",
                                short_id(sender))
            return
        key = (session.id, step)
        self._count(pushes_received=1)
        waiting = self.pending.get(key)
        if waiting is not None and not _push_from(waiting.msg, sender):
            return  # not from the route's previous hop
        self.pending.pop(key, None)
        if waiting is None:
            if session.last_step == step:
                return  # a second push of a step already run (a resend after a failure): nothing to do
            try:
                self.early.keep(session, step, hidden, sender)
            except LimitError as e:
                self.quiet_log.info((sender, "early push"), "push from %s for step %s of session %s dropped: %s",
                                    short_id(sender), step, session.id[:8], e)
            return
        try:
            waiting.session.last_used = time.monotonic()
            result = self._dispatch_step(waiting.session, waiting.msg, hidden, waiting.ident, waiting.req_id,
                                         waiting.sender)
            if result is DEFERRED:
                return
            fields, tensors = result
            reply = ok_reply(waiting.req_id, fields, tensors, frame_bytes=_frame_bytes(waiting.msg))
        except Exception as e:
            reply = self._error_reply(waiting.req_id, waiting.sender, e)
        self._send(waiting.ident, reply, waiting.req_id)

    def on_forward(self, msg: Message):
        self._check_model(msg)
        first, last = self._check_blocks(msg)
        hidden, pos, mask = self._inputs(msg)
        B, T, _ = hidden.shape
        if pos is None:
            pos = torch.arange(T).expand(B, T)
        lora, deep = self._trainables(msg, first, last)
        span = self.span  # the one asked for, even if the server moves before the work runs
        return self._defer(PASS, lambda: self._forward(span, hidden, pos, mask, first, last, lora, deep),
                           *self._current, msg)

    def _forward(self, span: Span, hidden: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, first: int,
                 last: int, lora: Lora | None, deep: torch.Tensor | None):
        B, T, _ = hidden.shape
        with self._scratch(span, B, T, blocks=1, what="forward"):
            out = span.run(hidden, pos, mask, first, last, lora=lora, deep_prompts=deep)
        self._count(forwards=1)
        return {}, {"hidden": out}

    @contextlib.contextmanager
    def _scratch(self, span: Span, batch: int, length: int, blocks: int, what: str):
        """Hold the attention scratch of a forward or backward in the cache budget while it
        runs: it grows with length squared, and unaccounted one request could exhaust the
        server's memory (and the next one again)."""
        nbytes = span.attention_scratch_bytes(batch, length, blocks)
        try:
            self.budget.reserve(nbytes)
        except CacheFullError:
            raise LimitError(f"{what} of batch {batch} x length {length} needs {nbytes / 2**20:.0f} MiB of attention "
                             f"memory; {self.budget.free_bytes / 2**20:.0f} MiB are free here: send smaller batches "
                             "or shorter sequences") from None
        try:
            yield
        finally:
            self.budget.release(nbytes)

    def _hosted_adapter(self, msg: Message, first: int, last: int) -> Lora | None:
        name = msg.get("adapter")
        if name is None:
            return None
        if name not in self.adapters:
            raise LimitError(f"adapter {name!r} is not hosted here (this server has {sorted(self.adapters)})")
        return slice_lora(self.adapters[name], self.span.start, first, last)

    def _trainables(self, msg: Message, first: int, last: int) -> tuple[Lora | None, torch.Tensor | None]:
        """The LoRA (a hosted adapter, or the client's own) and the client's deep prompts of a
        forward or backward, checked against these blocks."""
        hosted = self._hosted_adapter(msg, first, last)
        tensors = client_trainables(msg.tensors)
        if hosted is not None:
            if tensors:
                raise ProtocolError("a hosted adapter and the client's own LoRA cannot be combined")
            return hosted, None
        deep, hidden = tensors.pop(DEEP_PROMPTS, None), msg.tensors["hidden"]
        if deep is not None:
            self.span.check_deep_prompts(deep, first, last)
            if deep.shape[-2] > hidden.shape[1]:
                raise TensorError("deep_prompts cover more positions than hidden has")
            if deep.ndim == 4 and deep.shape[1] != hidden.shape[0]:
                raise TensorError(f"deep_prompts given per sample are for batch {deep.shape[1]}, hidden has "
                                  f"{hidden.shape[0]}")
        if not tensors:
            return None, deep
        scaling = msg.get("lora_scaling", 1.0)
        if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
            raise ProtocolError("LoRA tensors need a numeric 'lora_scaling' (alpha / r)")
        lora = Lora(float(scaling), tensors)
        self.span.check_lora(lora, first, last)
        return lora, deep

    def on_backward(self, msg: Message):
        """Gradient of blocks' input given their input and the gradient of their output."""
        self._check_model(msg)
        first, last = self._check_blocks(msg)
        hidden, pos, mask = self._inputs(msg)
        grad = msg.tensor("grad_output")
        assert grad is not None
        if grad.dtype not in FLOAT_DTYPES or grad.shape != hidden.shape:
            raise TensorError(f"grad_output must be float {list(hidden.shape)} like hidden, got {str(grad.dtype)[6:]} "
                              f"{list(grad.shape)}")
        B, T, _ = hidden.shape
        if pos is None:
            pos = torch.arange(T).expand(B, T)
        lora, deep = self._trainables(msg, first, last)
        span = self.span

        def work():
            with self._scratch(span, B, T, blocks=last - first, what="backward"):
                grad_input, lora_grads = span.backward(hidden, pos, mask, first, last, grad, lora, deep)
            self._count(backwards=1)
            return {}, {"grad_input": grad_input, **lora_grads}
        return self._defer(PASS, work, *self._current, msg)

    def on_close(self, msg: Message):
        sid = msg.get("session")
        s = self.sessions.get(sid) if isinstance(sid, str) else None
        closed = s is not None and s.owner == self._current[2] and self._drop(s.id)
        return {"closed": bool(closed)}, None

    # --- housekeeping ------------------------------------------------------------------------
    def _unwait(self, s: ServerSession, why: str, keep: object = None) -> None:
        """The session's step waiting for its push, if any (other than step `keep`), answered
        with a session error."""
        if s.waiting_step is None or s.waiting_step == keep:
            return
        p = self.pending.pop((s.id, s.waiting_step), None)
        s.waiting_step = None
        if p is not None:
            self._send(p.ident, error_reply(p.req_id, SessionError(f"step {p.msg.get('step')}: {why}")), p.req_id)

    def _drop(self, sid: str) -> bool:
        with self._lock:
            s = self.sessions.pop(sid, None)
        if s is None:
            return False
        self._unwait(s, "its session was closed")
        self.early.forget(s.id)
        self.budget.release(s.cache.nbytes)
        s.span.forget(s.cache)
        return True

    def expire_idle(self) -> None:
        now = time.monotonic()
        if self.relay.servers:
            self._expire_relayed()
        if self.old_spans:
            self._drain_old_spans(now)
        for key, p in list(self.pending.items()):
            if now - p.created > PENDING_TIMEOUT_S:
                del self.pending[key]
                err = SessionError("the previous server's push never arrived")
                self._send(p.ident, error_reply(p.req_id, err), p.req_id)
        self.early.expire(now - PENDING_TIMEOUT_S, lambda sid: sid in self.sessions)
        unused_s = self.key_limits.limits.unused_session_timeout_s
        for sid, s in list(self.sessions.items()):
            if now - s.last_used > self.idle_timeout_s:
                log.info("session %s idle for %.0f s: freeing its cache", sid[:8], now - s.last_used)
                self._drop(sid)
            elif s.cache.length == 0 and now - s.last_used > unused_s:  # reserved, never used (limits.py)
                self.quiet_log.info(("unused", s.owner), "session %s of %s held no position for %.0f s: freeing "
                                    "its cache (serve.limits.unused_session_timeout_s)", sid[:8],
                                    short_id(s.owner) if s.owner else "?", now - s.last_used)
                self._drop(sid)
        for sid, (t, _) in list(self._stepped.items()):
            if now - t > ACTIVE_S:
                self._stepped.pop(sid, None)



def _buffer(frame) -> memoryview:
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def _host(host: str) -> str:
    return host.strip("[]").removeprefix("::ffff:")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(_host(host))
        return True
    except ValueError:
        return False


def _frame_bytes(request: Message) -> int:
    """How a reply to `request` may cut its tensors into frames (none for a 1.3 caller)."""
    return FRAME_BYTES if request.chunked else 0


def _sender_key(frame) -> str | None:
    """The CURVE key a frame came from (ZAP puts it in the User-Id), or None over plain sockets."""
    try:
        key = frame.get("User-Id")
    except (AttributeError, zmq.ZMQError):
        return None
    return key if isinstance(key, str) and key else None


def _peer_address(frame) -> str | None:
    """The IP address a frame came from, as the connection saw it."""
    try:
        value = frame.get("Peer-Address")
    except (AttributeError, zmq.ZMQError):
        return None
    return value if isinstance(value, str) and value else None


@contextlib.contextmanager
def _naming_input(msg: Message, hidden: torch.Tensor | None):
    """A step refused for its input (its shape against its position ids, its length against
    the positions left) names the input it was given (`consumed`): when that came by push, the
    gateway can tell that the fault is the pusher's, not this server's."""
    try:
        yield
    except SwarmError as e:
        x = hidden if hidden is not None else msg.tensors.get("hidden")
        if e.consumed is None and isinstance(x, torch.Tensor):
            e.consumed = tensor_digest(x)
        raise


def _push_from(step: Message, sender: str | None) -> bool:
    """Whether a push from `sender` may be this step's input: the gateway names the previous
    hop's key in `from` (older gateways do not: then any sender)."""
    expected = step.get("from")
    return expected is None or expected == sender


def _fits_step(hidden: torch.Tensor, s: ServerSession) -> bool:
    """Whether `hidden` could be a step's input for session `s` (its batch, at most the positions
    it has left, the span's width): anything else is refused before it is kept."""
    return (hidden.dtype in FLOAT_DTYPES and hidden.ndim == 3 and hidden.shape[0] == s.cache.batch
            and 0 < hidden.shape[1] <= s.cache.max_length - s.cache.length and hidden.shape[2] == s.span.hidden_size)
