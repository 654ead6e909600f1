"""Request/reply over a DEALER socket to one peer, with deadlines, stale-reply filtering and
fast failure detection.

A peer that dies (kill -9) closes its TCP connection: the socket monitor reports the
disconnect at once and every request waiting on that peer fails within milliseconds. A peer
that hangs (SIGSTOP, a wedged GPU) keeps its connection open but stops answering ZeroMQ's
heartbeats: after HEARTBEAT_TIMEOUT_MS the connection is dropped and reported the same way.

Every connection is CURVE: encrypted, and authenticated both ways by node keys. The peer's
key must be known before connecting (from its record, the seed list, mDNS or the key
query); a peer that refuses our key (a private swarm we are not in) fails fast as "denied".

ZeroMQ sockets are not thread-safe, so every thread that talks to peers keeps its own
connections in a ConnectionPool."""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import torch
import zmq
from zmq.utils.monitor import parse_monitor_message

from libswarm.errors import LimitError, PeerUnavailableError, ProtocolError, SwarmError
from libswarm.protocol import Message, decode, encode
from libswarm.protocol.messages import CHUNKED_SINCE, FRAME_BYTES, raise_if_error, speaks
from swarmd.identity import NodeIdentity, short_id
from swarmd.transport.netem import Link, frames_size, process_profile
from swarmd.transport.relay import Sealer, sealed_bytes, sealed_message, split_relayed

CONNECT_TIMEOUT_S = 3.0  # a peer that accepts no connection in this time is unreachable
RECONNECT_GRACE_S = 0.3  # after a disconnect, how long a send waits for the connection to come back
HEARTBEAT_IVL_MS = 500  # ping an idle connection this often...
HEARTBEAT_TIMEOUT_MS = 2000  # ...and drop it when no pong comes back in this time (hung peer)
MAX_STASHED = 64
MAX_ASKED = 256  # requests sent on one connection whose replies may still be kept for `receive`
RECEIVE_HWM = 64  # messages ZeroMQ queues from one peer before reading it stops (each <= max_message_bytes)
_ids = itertools.count(1)
_HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
_MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | _HANDSHAKE_FAILED


class NoAnswerInTime(PeerUnavailableError):
    """No reply by the deadline while the connection held: the request, a push it waited for
    or its reply may have been lost on the way, or the peer is hung (a step may be resent)."""


class PeerConnection:
    def __init__(self, zctx: zmq.Context, address: str, identity: NodeIdentity, server_key: str,
                 max_message_bytes: int = 0):
        self.address, self.server_key = address, server_key
        self.endpoint = address  # where the socket connects (a relay's address, for a relayed peer)
        try:
            self.sock = zctx.socket(zmq.DEALER)
        except zmq.ZMQError as e:  # out of sockets or file descriptors: this peer cannot be reached now
            raise PeerUnavailableError(f"peer {address[:300]}: no connection can be opened now ({e})") from None
        self.sock.curve_secretkey = identity.secret_key.encode()
        self.sock.curve_publickey = identity.public_key.encode()
        self.sock.curve_serverkey = server_key.encode()
        self.sock.setsockopt(zmq.LINGER, 0)
        # queue nothing for a peer that is not connected: a send then fails fast instead of
        # piling requests up for a dead address
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)  # a peer back from a restart is found within 1 s
        # a peer answers what was asked; what it sends beyond waits in its own queues, not ours
        self.sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self.max_message_bytes = max_message_bytes
        if max_message_bytes:
            self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)  # each frame; decode() checks the whole
        try:
            self.monitor = self.sock.get_monitor_socket(_MONITOR_EVENTS)
        except zmq.ZMQError as e:
            self.sock.close(0)
            raise PeerUnavailableError(f"peer {address[:300]}: no connection can be opened now ({e})") from None
        self.state = "connecting"  # connecting | up | down | refused | denied
        # tensors over FRAME_BYTES go in frames of that size once the peer is known to read them
        # (its record's protocol, or any reply): CURVE is twice as fast on 1 MiB frames as on 32 MiB
        self.frame_bytes = 0
        self.disconnects = 0
        # benchmarks and tests: an emulated link to this peer (swarmd/transport/netem.py), else None
        profile = process_profile()
        self.link = Link(profile, server_key) if profile is not None else None
        # replies that arrived while another request was awaited (one peer, two hops of a route)
        self._stash: dict[int, Message] = {}
        self._asked: OrderedDict[int, None] = OrderedDict()  # sent here, reply not received yet
        self._replies = zmq.Poller()  # what receive() waits on: one for the connection's life
        self._replies.register(self.sock, zmq.POLLIN)
        self._replies.register(self.monitor, zmq.POLLIN)
        try:
            self.sock.connect(self.endpoint)
        except zmq.ZMQError as e:  # an address ZeroMQ cannot use (from a record, a seed, mDNS)
            self.close()
            raise PeerUnavailableError(f"peer {address[:300]}: cannot connect there ({e})") from None

    # --- connection state ------------------------------------------------------------------
    def _drain_monitor(self) -> None:
        while self.monitor.poll(0):
            event = parse_monitor_message(self.monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.state = "up"
            elif event & _HANDSHAKE_FAILED:
                self.state = "denied"  # our key refused (private swarm), or the peer is not who we think
            elif event == zmq.EVENT_DISCONNECTED:
                if self.state != "denied":  # a refused handshake is followed by a disconnect
                    self.state = "down"
                self.disconnects += 1
            elif event == zmq.EVENT_CONNECT_RETRIED and self.state != "up":
                self.state = "refused"  # nothing listens there (a connect attempt failed)

    def _wait_writable(self, timeout_s: float) -> bool:
        """Until the peer can take a message: at once when connected, a moment for a new or
        re-established connection, never for a peer known to have gone."""
        if self.state == "up" and self.sock.poll(0, zmq.POLLOUT):  # the hot path: one cheap check
            self._drain_monitor()
            if self.state == "up":
                return True
        deadline = time.monotonic() + timeout_s
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLOUT)
        poller.register(self.monitor, zmq.POLLIN)
        while True:
            self._drain_monitor()
            if self.state in ("refused", "denied"):
                return False
            if self.state == "down":
                deadline = min(deadline, time.monotonic() + RECONNECT_GRACE_S)
            left_ms = int((deadline - time.monotonic()) * 1000)
            events = dict(poller.poll(max(left_ms, 0)))
            if self.sock in events:
                return True
            if left_ms <= 0:
                return False

    # --- messages --------------------------------------------------------------------------
    def send(self, msg_type: str, fields: dict | None = None, tensors: dict[str, torch.Tensor] | None = None,
             timeout_s: float = 30.0, connect_by: float | None = None) -> int:
        """Send a request; returns its id for `receive`. `connect_by`: a monotonic time after
        which a connection still being made is given up (several made at once share one wait)."""
        req_id = next(_ids)
        frames = self._frames(msg_type, req_id, fields, tensors, deadline=time.time() + timeout_s)
        wait_s = min(timeout_s, CONNECT_TIMEOUT_S)
        if connect_by is not None:
            wait_s = max(0.0, min(wait_s, connect_by - time.monotonic()))
        if not self._wait_writable(wait_s):
            reason = {"refused": "refuses connections",
                      "denied": "refused the handshake (our key is not allowed there, or its key is not "
                                f"{short_id(self.server_key)})"}.get(self.state, "is unreachable")
            raise PeerUnavailableError(f"peer {self.address} {reason}")
        if self.link is not None:
            self._emulated_send(frames, 0)
        else:
            self.sock.send_multipart(frames, copy=False)
        self._asked[req_id] = None
        while len(self._asked) > MAX_ASKED:
            self._asked.popitem(last=False)
        return req_id

    def _emulated_send(self, frames: list, flags: int) -> None:
        """Across the emulated link: after its delay, or never (lost); the connection may break."""
        assert self.link is not None
        wait_s, cut = self.link.admit(frames_size(frames))
        if wait_s is not None:
            time.sleep(wait_s)
            self.sock.send_multipart(frames, flags=flags, copy=False)
        if cut:  # whatever waits on this connection fails, as when a route breaks
            self.sock.disconnect(self.endpoint)
            self.sock.connect(self.endpoint)

    def receive(self, req_id: int, deadline: float, what: str = "request") -> Message:
        """Wait until the monotonic `deadline` for the reply to `req_id`; drop late replies to
        older requests; fail at once if the connection drops meanwhile."""
        self._asked.pop(req_id, None)  # asked for now: whatever comes later under this id is no one's
        if req_id in self._stash:
            return self._checked(self._stash.pop(req_id))
        disconnects = self.disconnects
        while True:
            # past the deadline, a reply that has come already is still taken: the caller may have
            # been busy elsewhere (sending a chain's later hops) while this peer answered in time
            left_ms = int((deadline - time.monotonic()) * 1000)
            events = dict(self._replies.poll(max(left_ms, 0)))
            if not events:
                raise NoAnswerInTime(f"peer {self.address} did not answer {what} in time")
            if self.monitor in events:
                self._drain_monitor()
                if self.disconnects != disconnects:
                    raise PeerUnavailableError(f"connection to peer {self.address} lost during {what}")
            if self.sock not in events:
                continue
            try:
                reply = self._unwrap(decode(self.sock.recv_multipart(copy=False), self.max_message_bytes))
            except (ProtocolError, LimitError) as e:
                raise PeerUnavailableError(f"peer {self.address} sent a bad reply: {e}") from None
            if reply.chunked:
                self.frame_bytes = FRAME_BYTES
            if reply.id == req_id:
                return self._checked(reply)
            if reply.id not in self._asked:
                continue  # a reply to nothing sent and not received yet (late, or unsolicited): dropped
            del self._asked[reply.id]
            self._stash[reply.id] = reply  # a request sent on this connection and not received yet
            while len(self._stash) > MAX_STASHED:
                self._stash.pop(next(iter(self._stash)))

    def _checked(self, reply: Message) -> Message:
        """The reply, or its error raised, marked as this peer's."""
        try:
            return raise_if_error(reply)
        except SwarmError as e:
            e.peer = self.address
            raise

    def request(self, msg_type: str, fields: dict | None = None, tensors: dict[str, torch.Tensor] | None = None,
                timeout_s: float = 30.0) -> Message:
        deadline = time.monotonic() + timeout_s
        req_id = self.send(msg_type, fields, tensors, timeout_s)
        return self.receive(req_id, deadline, msg_type)

    def push(self, msg_type: str, fields: dict, tensors: dict[str, torch.Tensor], wait_s: float = 0.5) -> bool:
        """Fire-and-forget: False when the peer cannot take it (gone, or not connected in wait_s)."""
        if not self._wait_writable(wait_s):
            return False
        try:
            frames = self._frames(msg_type, next(_ids), fields, tensors)
            if self.link is not None:
                self._emulated_send(frames, zmq.NOBLOCK)
            else:
                self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def _frames(self, msg_type: str, req_id: int, fields: dict | None, tensors: dict[str, torch.Tensor] | None,
                deadline: float | None = None) -> list:
        return encode(msg_type, req_id, fields, tensors, deadline=deadline, frame_bytes=self.frame_bytes)

    def _unwrap(self, reply: Message) -> Message:
        return reply

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)


class RelayedConnection(PeerConnection):
    """To a peer that accepts no connections, through a relay that forwards sealed messages
    (swarmd/transport/relay.py): the same requests, replies and failures as a direct one. The
    relay's own answers (it cannot forward) come back as errors of the request; the relay
    failing is the peer failing."""

    def __init__(self, zctx: zmq.Context, address: str, identity: NodeIdentity, relay_key: str, node_id: str,
                 sealer: Sealer, max_message_bytes: int = 0):
        relay_address, _ = split_relayed(address) or ("", "")
        super().__init__(zctx, relay_address, identity, relay_key, max_message_bytes)
        self.address, self.server_key, self.relay_key, self.sealer = address, node_id, relay_key, sealer

    def _frames(self, msg_type: str, req_id: int, fields: dict | None, tensors: dict[str, torch.Tensor] | None,
                deadline: float | None = None) -> list:
        inner = encode(msg_type, req_id, fields, tensors, deadline=deadline)
        return sealed_message("relay", req_id, {"to": self.server_key}, self.sealer.seal(self.server_key, inner))

    def _unwrap(self, reply: Message) -> Message:
        if reply.type != "relay":
            return reply  # the relay's own answer: it could not forward the request
        if reply.get("from") != self.server_key:
            raise ProtocolError("a relayed answer from another node")
        return decode(self.sealer.open(self.server_key, sealed_bytes(reply)))


def peer_context(io_threads: int = 1) -> zmq.Context:
    """A ZeroMQ context for a daemon: a peer connection holds three sockets (and about four file
    descriptors), and ZeroMQ's default of 1023 sockets ran out at ~340 peers."""
    zctx = zmq.Context(io_threads=io_threads)
    zctx.set(zmq.MAX_SOCKETS, max(1023, raise_open_files_limit() * 2 // 3))
    return zctx


def raise_open_files_limit(want: int = 65536) -> int:
    """Raise this process's soft limit on open files toward `want`, within its hard limit (a
    daemon of a large swarm holds a few descriptors per peer); returns the soft limit now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return want if soft == resource.RLIM_INFINITY else soft


class ConnectionPool:
    """One connection per (thread, peer address); with `max_connections`, at most that many per
    thread, the least recently used closed first (each connection holds three ZeroMQ sockets
    and their file descriptors)."""

    def __init__(self, zctx: zmq.Context, identity: NodeIdentity, resolve_key: Callable[[str], str | None],
                 max_message_bytes: int = 0, max_connections: int = 0,
                 resolve_protocol: Callable[[str], str | None] | None = None):
        self.zctx, self.identity, self.max_message_bytes = zctx, identity, max_message_bytes
        self.max_connections = max_connections  # per thread; 0: no bound. Beyond it the least recently used goes
        self.resolve_key = resolve_key  # address -> the node id known to answer there
        self.resolve_protocol = resolve_protocol  # address -> the protocol version its record states
        self._local = threading.local()
        self.sealer: Sealer | None = None  # for relayed peers, made at the first
        self._all: list[PeerConnection] = []
        self._lock = threading.Lock()

    def get(self, address: str, key: str | None = None) -> PeerConnection:
        """This thread's connection to the node at `address` (whose key is `key`, or looked up)."""
        relayed = split_relayed(address)
        if relayed is not None:  # the address names the node's key itself
            if key is not None and key != relayed[1]:
                raise PeerUnavailableError(f"peer {address} is not {short_id(key)}")
            key = relayed[1]
        key = key or self.resolve_key(address)
        if key is None:
            raise PeerUnavailableError(f"peer {address}: its public key is not known (not in any record, "
                                       "seed entry or key query answer)")
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.pop(address, None)  # re-inserted below: the dict's order is least recently used first
        if conn is not None and conn.server_key != key:  # another node now answers there
            conns[address] = conn
            self.drop(address)
            conn = None
        if conn is None:
            if self.max_connections and len(conns) >= self.max_connections:
                self.drop(next(iter(conns)))
            conn = self._connect(address, key, relayed)
            if self.resolve_protocol is not None and speaks(self.resolve_protocol(address) or "", CHUNKED_SINCE):
                conn.frame_bytes = FRAME_BYTES
            with self._lock:
                self._all.append(conn)
        conns[address] = conn
        return conn

    def _connect(self, address: str, key: str, relayed: tuple[str, str] | None) -> PeerConnection:
        if relayed is None:
            return PeerConnection(self.zctx, address, self.identity, key, self.max_message_bytes)
        relay_key = self.resolve_key(relayed[0])
        if relay_key is None:
            raise PeerUnavailableError(f"peer {short_id(key)}: the key of its relay {relayed[0]} is not known")
        if self.sealer is None:
            self.sealer = Sealer(self.identity)
        return RelayedConnection(self.zctx, address, self.identity, relay_key, key, self.sealer,
                                 self.max_message_bytes)

    def count(self) -> int:
        """Connections open, over all threads."""
        with self._lock:
            return len(self._all)

    def drop(self, address: str) -> None:
        """Forget this thread's connection to a peer (after a failure, reconnect afresh)."""
        conns = getattr(self._local, "conns", {})
        conn = conns.pop(address, None)
        if conn is not None:
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)
            conn.close()

    def close_all(self) -> None:
        with self._lock:
            for c in self._all:
                c.close()
            self._all.clear()
