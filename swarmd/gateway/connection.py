"""Request/reply over a DEALER socket to one peer, with a deadline and stale-reply filtering.

ZeroMQ sockets are not thread-safe, so every thread that talks to peers keeps its own
connections in a ConnectionPool."""

from __future__ import annotations

import itertools
import threading
import time

import torch
import zmq

from libswarm.errors import PeerUnavailableError, ProtocolError
from libswarm.protocol import Message, decode, encode
from libswarm.protocol.messages import raise_if_error

CONNECT_TIMEOUT_S = 3.0  # a peer that accepts no connection in this time is unreachable
_ids = itertools.count(1)


class PeerConnection:
    def __init__(self, zctx: zmq.Context, address: str, max_message_bytes: int = 0):
        self.address = address
        self.sock = zctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # queue nothing for a peer that is not connected: a send then waits (and times out)
        # instead of piling requests up for a dead address
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        if max_message_bytes:
            self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.sock.connect(address)

    def send(self, msg_type: str, fields: dict | None = None, tensors: dict[str, torch.Tensor] | None = None,
             timeout_s: float = 30.0) -> int:
        """Send a request; returns its id for `receive`."""
        req_id = next(_ids)
        frames = encode(msg_type, req_id, fields, tensors, deadline=time.time() + timeout_s)
        if not self.sock.poll(int(min(timeout_s, CONNECT_TIMEOUT_S) * 1000), zmq.POLLOUT):
            raise PeerUnavailableError(f"peer {self.address} is unreachable")
        self.sock.send_multipart(frames, copy=False)
        return req_id

    def receive(self, req_id: int, deadline: float, what: str = "request") -> Message:
        """Wait (until the monotonic `deadline`) for the reply to `req_id`; drop late replies to older requests."""
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self.sock.poll(left_ms, zmq.POLLIN):
                raise PeerUnavailableError(f"peer {self.address} did not answer {what} in time")
            try:
                reply = decode(self.sock.recv_multipart(copy=False))
            except ProtocolError as e:
                raise PeerUnavailableError(f"peer {self.address} sent a bad reply: {e}") from None
            if reply.id == req_id:
                return raise_if_error(reply)

    def request(self, msg_type: str, fields: dict | None = None, tensors: dict[str, torch.Tensor] | None = None,
                timeout_s: float = 30.0) -> Message:
        deadline = time.monotonic() + timeout_s
        req_id = self.send(msg_type, fields, tensors, timeout_s)
        return self.receive(req_id, deadline, msg_type)

    def push(self, msg_type: str, fields: dict, tensors: dict[str, torch.Tensor], wait_s: float = 0.5) -> bool:
        """Fire-and-forget: False when the peer is not connected within wait_s (a live connection
        is writable at once; a new one needs a moment to connect)."""
        if not self.sock.poll(int(wait_s * 1000), zmq.POLLOUT):
            return False
        try:
            self.sock.send_multipart(encode(msg_type, next(_ids), fields, tensors), flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def close(self) -> None:
        self.sock.close(0)


class ConnectionPool:
    """One connection per (thread, peer address)."""

    def __init__(self, zctx: zmq.Context, max_message_bytes: int = 0):
        self.zctx, self.max_message_bytes = zctx, max_message_bytes
        self._local = threading.local()
        self._all: list[PeerConnection] = []
        self._lock = threading.Lock()

    def get(self, address: str) -> PeerConnection:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(address)
        if conn is None:
            conn = conns[address] = PeerConnection(self.zctx, address, self.max_message_bytes)
            with self._lock:
                self._all.append(conn)
        return conn

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
