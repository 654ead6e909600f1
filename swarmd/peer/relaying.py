"""Relaying (swarmd/transport/relay.py) on the peer plane's socket, both ways. As a relay,
for others: `Relaying` forwards a sealed message to the registered server it is for, and a
server's answer back, never reading either; a client whose server's registration lapsed is
told at once. As a server that accepts no connections: it keeps links to the relays it was
told to use, registered and alive, and answers what comes through them as if it had come
directly (the seal proves the sender)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq

from libswarm.errors import PeerUnavailableError, ProtocolError, SwarmError, TensorError
from libswarm.protocol import decode, error_reply
from libswarm.protocol.messages import peek_type
from libswarm.protocol.registry import Registered, RelayRegister
from swarmd.identity import is_key, short_id
from swarmd.peer.owner import Owner
from swarmd.transport.relay import (
    KEEPALIVE_S,
    RelayLink,
    Sealer,
    open_relayed,
    relay_ident,
    sealed_message,
    split_relay_ident,
)

log = logging.getLogger("swarmd.peer")


def _buffer(frame) -> memoryview:
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


class Relaying:
    def __init__(self, server: Owner, handle: Callable[[bytes, list, str | None], None]):
        """`handle(ident, body, sender)`: how a request that came through a relay is answered
        (dispatch.py)."""
        self.server, self.handle = server, handle
        self.sealer = Sealer(server.identity)
        self.links: dict[str, RelayLink] = {}
        self._want: list[tuple[str, str]] | None = None
        self.failures: dict[str, tuple[float, str]] = {}  # relay id -> (monotonic, why) of its last failure
        self.up: list[tuple[str, str]] = []  # (relay id, address) registered, for the record

    # --- as a relay -----------------------------------------------------------------------------
    def relay(self, ident: bytes, body: list, sender: str | None) -> None:
        """Forward a sealed message to the server it is for (or a server's answer to its
        client). Not counted against the sender's request rate: the byte budget bounds it."""
        srv = self.server
        req_id = 0
        try:
            msg = decode(body, srv.max_message_bytes)
            req_id = msg.id
            to = msg.get("to")
            if msg.type != "relay":
                raise ProtocolError("malformed relay message")
            if not is_key(to):
                raise ProtocolError("relay: field 'to' must be a node id")
            sealed = msg.tensor("sealed")
            assert sealed is not None
            self.expire()
            routed = srv.relay.route(sender, to, ident, sum(len(_buffer(f)) for f in body), msg.id)
            if routed is None:
                return
            target, outer_id = routed
            frames = sealed_message("relay", outer_id, {"from": sender}, sealed)
            if srv.emulate(target, frames):
                srv.sock.send_multipart([target, *frames], copy=False)
        except Exception as e:
            req_id = req_id or (e.req_id if isinstance(e, SwarmError) else 0)
            if sender not in srv.relay.servers:  # a relayed server's answers get no answer
                srv.send(ident, srv.error_reply(req_id, sender, e), req_id)

    def expire(self) -> None:
        """A relayed server whose registration lapsed (it died, or lost its link to this relay)
        cannot answer what was forwarded to it: each client waiting is told now."""
        for p in self.server.relay.expire():
            err = PeerUnavailableError(f"peer {short_id(p.server)}: its registration at this relay lapsed "
                                       "(it left, or lost its link here)")
            self.server.send(p.ident, error_reply(p.req_id, err), p.req_id)

    def on_register(self, req: RelayRegister) -> tuple[Registered, None]:
        srv = self.server
        self.expire()  # before a slot is counted free or taken
        srv.relay.register(srv.current[2], srv.current[0], srv.peer_host)
        return {"keepalive_s": KEEPALIVE_S}, None

    # --- as a server behind relays --------------------------------------------------------------
    def want(self, relays: list[tuple[str, str]]) -> None:
        """From another thread: keep links to these relays ((node id, address) each), none other."""
        self._want = list(relays)

    @property
    def busy(self) -> bool:
        return self._want is not None or bool(self.links)

    def tend(self, poller: zmq.Poller) -> None:
        """On the serving thread: links made and closed as wanted; failed ones closed (and
        remembered, so that another relay is chosen); registrations kept alive."""
        want, self._want = self._want, None
        if want is not None:
            wanted = dict(want)
            for rid in [r for r in self.links if r not in wanted]:
                self._close(poller, rid, None)
            for rid, address in wanted.items():
                if rid not in self.links:
                    link = self.links[rid] = RelayLink(self.server.zctx, self.server.identity, rid, address)
                    poller.register(link.sock, zmq.POLLIN)
        for rid, link in list(self.links.items()):
            link.tick()
            if link.failed is not None:
                self._close(poller, rid, link.failed)
        self.up = [(rid, link.address) for rid, link in self.links.items() if link.registered]

    def _close(self, poller: zmq.Poller, rid: str, why: str | None) -> None:
        link = self.links.pop(rid)
        poller.unregister(link.sock)
        link.close()
        if why is not None:
            self.failures[rid] = (time.monotonic(), why)
            log.warning("relay %s at %s lost: %s", short_id(rid), link.address, why)

    def close_all(self) -> None:
        for link in self.links.values():
            link.close()

    def received(self, link: RelayLink) -> None:
        """What came through `link`: the relay's own replies, and sealed requests, answered."""
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
                self.server.quiet_log.warning(("relay", link.relay_id, str(e)[-24:]),
                                              "relayed message through %s dropped: %s", short_id(link.relay_id), e)
                continue
            self.server.busy_since = time.monotonic()
            try:
                self.handle(relay_ident(link.relay_id, client, outer_id), inner, client)
            except Exception as e:
                self.server.survived(e)
            finally:
                self.server.busy_since = None

    def send(self, ident: bytes, reply: list, req_id: int) -> None:
        """A reply to a request that came through a relay: sealed, back the way it came."""
        relay_id, client, outer_id = split_relay_ident(ident)
        link = self.links.get(relay_id)
        if link is None:  # the relay is gone: so is the client's connection through it
            return
        try:
            frames = sealed_message("relay", outer_id, {"to": client}, self.sealer.seal(client, reply))
            link.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except (zmq.ZMQError, ProtocolError) as e:
            self.server.quiet_log.warning(("relay-reply", relay_id), "could not reply to relayed request %s: %s",
                                          req_id, e)
