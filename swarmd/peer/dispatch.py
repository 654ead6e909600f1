"""The peer plane's front door: a request's frames decoded once into its typed request
(libswarm.protocol.registry), admitted (the sender's key allowed, within its request rate,
the server attached unless the type is answered while joining) and handed to the handler its
type maps to, whose answer goes back as the reply. `Dispatch` alone decides that map, what
goes to a relay or a push before any of it, and that a request failing costs that request
alone: every request gets exactly one reply (pushes none)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import zmq

from libswarm.errors import LimitError, ProtocolError, SpanMovedError, SwarmError
from libswarm.protocol import Message, decode, ok_reply, registry
from libswarm.protocol.messages import peek_type
from libswarm.protocol.registry import Push, typed
from swarmd.identity import short_id
from swarmd.peer.limits import GossipTime
from swarmd.peer.owner import DEFERRED, Owner
from swarmd.transport.relay import is_relay_ident

# answered before the span is loaded: membership, and relaying (which needs no blocks)
WHILE_JOINING = ("gossip", "ping", "reach", "reach_back", "relay_register")

Handler = Callable[[Any], Any]  # a typed request -> (fields, tensors), or DEFERRED


class Dispatch:
    def __init__(self, server: Owner, handlers: dict[str, Handler], relay: Callable[[bytes, list, str | None], None],
                 on_push: Callable[[Push, str | None], None],
                 on_gossip: Callable[..., tuple[dict, None]] | None = None):
        """`handlers`: request type -> handler of its typed request; `relay`: a relay message
        (relaying.py); `on_push`: a push (pushes.py); `on_gossip(req, sender)`: membership's
        handler of `gossip` (none: refused)."""
        self.server = server
        self.handlers: dict[str, Handler] = dict(handlers)
        self.relay, self.on_push = relay, on_push
        self.on_gossip, self.gossip_time = on_gossip, GossipTime()
        if on_gossip is not None:  # answered here, on the socket's thread, whatever compute is running
            self.handlers["gossip"] = self._gossip

    def handle(self, frames) -> None:
        """A message from the socket: [ident, header, tensor frames...]."""
        srv = self.server
        ident, body = frames[0].bytes, frames[1:]
        sender = _sender_key(body[0]) if body else None
        if srv.access.private and not srv.access.allows(sender):
            return  # its key was removed from the allowed list (SIGHUP) after it connected
        if srv.netem is not None and sender is not None and ident not in srv.link_peers:
            if len(srv.link_peers) >= 4096:
                srv.link_peers.clear()
            srv.link_peers[ident] = sender
        if body and peek_type(body[0]) == "relay":
            self.relay(ident, body, sender)
            return
        self.request(ident, body, sender)

    def request(self, ident: bytes, body: list, sender: str | None) -> None:
        """A request from `sender` (CURVE-proven, or proven by its seal when relayed), whose
        reply goes to `ident`."""
        srv = self.server
        if srv.access.private and not srv.access.allows(sender):
            return  # not allowed (a relayed sender is checked here: its relay was, in handle())
        req_id = 0
        try:
            msg = decode(body, srv.max_message_bytes)
            req_id = msg.id
            if msg.type == "push":  # fire-and-forget from another server: never answered, dropped if bad
                self._push(msg, sender)
                return
            srv.key_limits.admit_request(sender)
            req = registry.parse(registry.PEER, msg)
            if not srv.attached and msg.type not in WHILE_JOINING:
                # a restarted server no gateway has seen leave: answered like a moved span, so that
                # the gateway routes around it (a limit error would go back to the app)
                raise SpanMovedError("this server is still joining the swarm: it serves no blocks yet")
            handler = self.handlers.get(msg.type)
            if handler is None:
                raise ProtocolError(f"{msg.type!r} is not served by this daemon")
            srv.current = (ident, req_id, sender)
            srv.peer_host = _peer_address(body[0]) if not is_relay_ident(ident) else None
            result = handler(req)
            if result is DEFERRED:
                return
            fields, tensors = result
            reply = ok_reply(req_id, fields, tensors, frame_bytes=msg.frame_bytes)
        except Exception as e:
            if not req_id and body and peek_type(body[0]) == "push":
                return  # a push that does not even parse: dropped unanswered, as every push
            req_id = req_id or (e.req_id if isinstance(e, SwarmError) else 0)
            reply = srv.error_reply(req_id, sender, e)
        srv.send(ident, reply, req_id)

    def _push(self, msg: Message, sender: str | None) -> None:
        srv = self.server
        try:
            srv.key_limits.admit_request(sender)
        except LimitError:
            return
        if not srv.attached:
            return
        try:
            push = typed(Push, registry.PEER["push"].parse(msg))
        except SwarmError:
            # made up or malformed: dropped at once
            srv.quiet_log.info((sender, "push"), "push from %s dropped: no such session, or not a step of it",
                               short_id(sender))
            return
        self.on_push(push, sender)

    def _gossip(self, req: registry.Gossip):
        """Membership's answer, within gossip's limits (limits.py): a key beyond its rate is
        refused; beyond gossip's share of this thread's time, the answer is empty (the caller
        learns that this server is alive, and its news from other peers), so that no flood of
        gossip, from one key or many, takes decode steps' time."""
        sender = self.server.current[2]
        self.server.key_limits.admit_gossip(sender)
        if not self.gossip_time.available():
            self.gossip_time.short += 1
            return {}, None
        t0 = time.perf_counter()
        try:
            return self.on_gossip(req, sender=sender)  # type: ignore[misc]
        finally:
            self.gossip_time.spend(time.perf_counter() - t0)


def _frame_property(frame, name: str) -> str | None:
    """A property ZeroMQ gives a received frame, or None (plain sockets, a frame of bytes)."""
    try:
        value = frame.get(name)
    except (AttributeError, zmq.ZMQError):
        return None
    return value if isinstance(value, str) and value else None


def _sender_key(frame) -> str | None:
    """The CURVE key a frame came from (ZAP puts it in the User-Id), or None over plain sockets."""
    return _frame_property(frame, "User-Id")


def _peer_address(frame) -> str | None:
    """The IP address a frame came from, as the connection saw it."""
    return _frame_property(frame, "Peer-Address")
