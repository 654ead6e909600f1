"""The local plane: a ROUTER socket on the Unix socket, serving apps and swarmctl.

One thread owns the ROUTER; requests run on a worker pool (a slow generation step of one app
must not hold up another app), and workers hand their replies back to the owner thread over an
inproc PUSH/PULL pair. Operators' requests (`status`, `peers`, `drain` ...) have workers of
their own: apps that keep every app worker busy do not hold up `swarmctl`. App requests beyond
what the workers run wait, up to MAX_WAITING of them and MAX_WAITING_BYTES; more are refused
with a `limit` error at once, so that a flood of requests cannot exhaust the daemon's memory.
Every member of the socket's group may connect; `drain` and `rebalance` are for operators
alone (swarmd/operators.py)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from libswarm.errors import ConfigError, LimitError, ProtocolError, SwarmError
from libswarm.protocol import decode, error_reply, ok_reply, registry
from libswarm.protocol.messages import LOCAL_REPLY_HEADER_BYTES, peek_type
from swarmd.operators import Operators, needs_operator

log = logging.getLogger("swarmd.local")

WORKERS = 64  # concurrent app requests (each holds its own peer connections): many sessions step at once
CONTROL = frozenset({"status", "peers", "model_info", "drain", "rebalance", "key"})
CONTROL_WORKERS = 4
MAX_WAITING = 256  # app requests waiting for a worker
MAX_WAITING_BYTES = 4 << 30  # their frames (a request alone may always wait, whatever its size)
POLL_INTERVAL_MS = 100  # how long the loop waits for a message before it looks at idle sessions and at stop

Handler = Callable[[Any], tuple[Mapping[str, Any], dict | None]]  # the typed request of its type (registry.LOCAL)


class LocalServer:
    def __init__(self, zctx: zmq.Context, socket_path: str, handlers: dict[str, Handler], max_message_bytes: int,
                 operators: Operators | None = None):
        """`operators`: who may `drain` and `rebalance` (default: root and this process's user)."""
        self.zctx, self.path, self.handlers = zctx, socket_path, handlers
        self.operators = operators or Operators(None)
        self.sock = zctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.max_message_bytes = max_message_bytes
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)  # each frame; decode() checks the whole
        self._replies_addr = f"inproc://local-replies-{id(self)}"
        self.replies = zctx.socket(zmq.PULL)
        self.replies.bind(self._replies_addr)
        self._local = threading.local()
        self._pushers: list[zmq.Socket] = []
        self._pushers_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="local")
        self.control = ThreadPoolExecutor(CONTROL_WORKERS, thread_name_prefix="local-control")
        self._held = [0, 0]  # app requests submitted and not finished, and their bytes
        self._held_lock = threading.Lock()
        self.refused = 0
        self.on_idle: Callable[[], None] | None = None

    def bind(self) -> None:
        directory = os.path.dirname(self.path) or "."
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"network.socket: cannot create {directory}: {e.strerror}") from None
        if os.path.exists(self.path):
            if _socket_answers(self.zctx, self.path):
                raise ConfigError(f"network.socket: another swarmd already serves {self.path}")
            os.unlink(self.path)  # left behind by a daemon that died
        try:
            self.sock.bind(f"ipc://{self.path}")
        except zmq.ZMQError as e:
            raise ConfigError(f"network.socket: cannot bind {self.path}: {e}") from None
        # apps and swarmctl of the socket's group may connect (systemd makes the group swarmd)
        os.chmod(self.path, 0o660)
        if os.geteuid() == 0:  # by hand as root: the socket takes its directory's group (swarmd's), not root's
            gid = os.stat(directory).st_gid
            if gid != 0:
                os.chown(self.path, -1, gid)

    def serve(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.replies, zmq.POLLIN)
        while not stop.is_set():
            events = dict(poller.poll(POLL_INTERVAL_MS))
            if self.replies in events:
                while True:
                    try:
                        self.sock.send_multipart(self.replies.recv_multipart(zmq.NOBLOCK, copy=False), copy=False)
                    except zmq.Again:
                        break
                    except zmq.ZMQError as e:
                        log.info("could not deliver a reply: %s", e)
            if self.sock in events:
                while True:
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._dispatch(frames)
            if not events and self.on_idle:
                self.on_idle()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.control.shutdown(wait=False, cancel_futures=True)
        self.sock.close(0)
        self.replies.close(0)
        with self._pushers_lock:
            for s in self._pushers:
                s.close(0)
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _pusher(self) -> zmq.Socket:
        s = getattr(self._local, "push", None)
        if s is None:
            s = self._local.push = self.zctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(self._replies_addr)
            with self._pushers_lock:
                self._pushers.append(s)
        return s

    def _dispatch(self, frames) -> None:
        """On the socket's thread: the request to a worker, or refused when too many wait."""
        if len(frames) > 1 and peek_type(frames[1]) in CONTROL:
            self.control.submit(self._work, frames, True)
            return
        nbytes = sum(len(f) for f in frames)
        with self._held_lock:
            waiting = self._held[0] - WORKERS  # requests are taken in order: the oldest run
            if waiting >= MAX_WAITING or (waiting >= 0 and self._held[1] + nbytes > MAX_WAITING_BYTES):
                self.refused += 1
                refuse = True
            else:
                self._held[0] += 1
                self._held[1] += nbytes
                refuse = False
        if refuse:
            try:  # its header alone, for its id (the error about its missing tensors carries the id too)
                req_id = decode(frames[1:2]).id
            except SwarmError as e:
                req_id = e.req_id
            err = LimitError(f"{max(waiting, 0)} app requests are waiting for this daemon already "
                             f"(at most {MAX_WAITING}, {MAX_WAITING_BYTES >> 30} GiB): try again shortly")
            self.sock.send_multipart([frames[0], *error_reply(req_id, err)], copy=False)
            return
        self.pool.submit(self._app_work, frames, nbytes)

    def _app_work(self, frames, nbytes: int) -> None:
        try:
            self._work(frames)
        finally:
            with self._held_lock:
                self._held[0] -= 1
                self._held[1] -= nbytes

    def _work(self, frames, control: bool = False) -> None:
        ident, body = frames[0], frames[1:]
        req_id = 0
        try:
            msg = decode(body, self.max_message_bytes)
            req_id = msg.id
            if control and msg.type not in CONTROL:  # its header said otherwise: a disguise
                raise ProtocolError(f"{msg.type!r} sent as a control request")
            req = registry.parse(registry.LOCAL, msg)  # decoded once: handlers take the typed request
            if needs_operator(msg):
                self.operators.check(body[0], msg)
            handler = self.handlers.get(msg.type)
            if handler is None:
                raise ProtocolError(f"{msg.type!r} is not served by this daemon")
            fields, tensors = handler(req)
            reply = ok_reply(req_id, fields, tensors, max_header_bytes=LOCAL_REPLY_HEADER_BYTES)
        except SwarmError as e:
            req_id = req_id or e.req_id
            log.info("local request %s refused: %s", req_id, e)
            reply = error_reply(req_id, e)
        except Exception as e:
            log.exception("local request %s failed", req_id)
            reply = error_reply(req_id, e)
        self._pusher().send_multipart([ident, *reply], copy=False)


def _socket_answers(zctx: zmq.Context, path: str) -> bool:
    from libswarm.client import SwarmClient

    try:
        SwarmClient(socket=path, timeout_s=1.0, context=zctx).request("status")
        return True
    except SwarmError:
        return False
