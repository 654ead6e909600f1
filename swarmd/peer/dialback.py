"""Reachability checks for others (protocol.md, `reach` and `reach_back`): a peer asks to be
called back at its announced address, to learn whether others can connect to it. `DialBack`
alone decides whom it calls: only the host the request came from (never a third party), once,
with the asker's key (so nothing but a CURVE handshake is ever attempted), a few at a time."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import OrderedDict

from libswarm.errors import LimitError, ProtocolError, SwarmError
from libswarm.protocol.registry import Empty, Reach, ReachBack, Reached
from swarmd.discovery.keyquery import split_address
from swarmd.peer.owner import Owner
from swarmd.transport.connection import PeerConnection
from swarmd.transport.relay import is_relay_ident

REACH_TIMEOUT_S = 3.0  # a dial-back that does not get through in this time finds the node unreachable
MAX_DIAL_BACKS = 4  # reachability checks this daemon runs for others at once
MAX_REACHED = 64  # dial-back nonces remembered


class DialBack:
    def __init__(self, server: Owner):
        self.server = server
        self.running = 0
        self.reached: OrderedDict[str, float] = OrderedDict()  # dial-back nonces that got through

    def on_reach(self, req: Reach) -> tuple[Reached, None]:
        """The answer travels as a `reach_back` with the peer's nonce, or not at all."""
        ident, _, sender = self.server.current
        if is_relay_ident(ident) or sender is None:
            raise ProtocolError("reach: ask over a direct connection")
        host_port = split_address(req.address)
        if host_port is None or len(req.nonce) > 64:
            raise ProtocolError("reach: 'address' must be tcp://host:port and 'nonce' at most 64 characters")
        seen = self.server.peer_host
        if seen is not None and _is_ip(host_port[0]) and _host(host_port[0]) != _host(seen):
            return {"calling": False, "why": f"its requests come from {seen}, not {host_port[0]}"}, None
        if self.running >= MAX_DIAL_BACKS:
            raise LimitError("too many reachability checks under way here; ask again later")
        self.running += 1
        threading.Thread(target=self._call, args=(req.address, sender, req.nonce, seen), name="dial-back",
                         daemon=True).start()
        return {"calling": True}, None

    def _call(self, address: str, key: str, nonce: str, seen: str | None) -> None:
        try:
            host = split_address(address)[0]  # type: ignore[index]
            if seen is not None and not _is_ip(host):  # a name: called only if it names that host
                try:
                    hosts = {_host(str(info[4][0])) for info in socket.getaddrinfo(host, None)}
                except OSError:
                    return
                if _host(seen) not in hosts:
                    return
            conn = PeerConnection(self.server.zctx, address, self.server.identity, key)
            try:
                conn.request("reach_back", {"nonce": nonce}, timeout_s=REACH_TIMEOUT_S)
            except SwarmError:
                pass
            finally:
                conn.close()
        finally:
            self.running -= 1

    def on_reach_back(self, req: ReachBack) -> tuple[Empty, None]:
        if is_relay_ident(self.server.current[0]):
            raise ProtocolError("reach_back: must come over a direct connection")
        self.reached[req.nonce[:64]] = time.monotonic()
        while len(self.reached) > MAX_REACHED:
            self.reached.popitem(last=False)
        return {}, None


def _host(host: str) -> str:
    return host.strip("[]").removeprefix("::ffff:")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(_host(host))
        return True
    except ValueError:
        return False
