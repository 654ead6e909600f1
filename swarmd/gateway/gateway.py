"""The gateway role: runs apps' inference sessions and forward passes across a chain of servers."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from libswarm.errors import (
    LimitError,
    NoRouteError,
    ProtocolError,
    SessionError,
    SwarmError,
    WrongModelError,
)
from libswarm.protocol import Message
from swarmd.discovery.seeds import SeedPoller
from swarmd.discovery.table import PeerTable
from swarmd.gateway.connection import ConnectionPool
from swarmd.gateway.routing import Hop, plan_chain

log = logging.getLogger("swarmd.gateway")

OPEN_TIMEOUT_S = 10.0
STEP_TIMEOUT_S = 120.0  # generous: a long prefill on a slow server is not a failure
APP_IDLE_TIMEOUT_S = 600.0  # an app session untouched this long is closed


@dataclass
class GatewaySession:
    id: str
    batch: int
    max_length: int
    hops: list[Hop]
    server_sessions: list[str]
    position: int = 0
    steps: int = 0  # steps sent so far; numbers each step so that pushes find their request
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Gateway:
    def __init__(self, *, model_id: str, num_layers: int, hidden_size: int, pool: ConnectionPool, table: PeerTable,
                 poller: SeedPoller, status: Callable[[], dict]):
        self.model_id, self.num_layers, self.hidden_size = model_id, num_layers, hidden_size
        self.pool, self.table, self.poller = pool, table, poller
        self.status_fn = status
        self.sessions: dict[str, GatewaySession] = {}
        self._lock = threading.Lock()
        self.handlers: dict[str, Callable[[Message], tuple[dict, dict | None]]] = {
            "status": lambda m: (self.status_fn(), None),
            "peers": lambda m: ({"peers": [r.to_json() for r in self.table.records()]}, None),
            "model_info": self.on_model_info,
            "open": self.on_open,
            "step": self.on_step,
            "close": self.on_close,
            "forward": self.on_forward,
        }

    # --- routing ---------------------------------------------------------------------------
    def route(self) -> list[Hop]:
        try:
            return plan_chain(self.table.servers_for(self.model_id), self.num_layers, self.model_id)
        except NoRouteError:
            self.poller.refresh()  # the table may be stale (a server just started): ask once more
            return plan_chain(self.table.servers_for(self.model_id), self.num_layers, self.model_id)

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
        hops = self.route()
        opened: list[tuple[Hop, str]] = []
        try:
            for hop in hops:
                reply = self.pool.get(hop.address).request(
                    "open",
                    {"model_id": self.model_id, "blocks": [hop.first, hop.last], "max_length": max_length,
                     "batch": batch},
                    timeout_s=OPEN_TIMEOUT_S,
                )
                opened.append((hop, reply.require("session", str)))
        except SwarmError:
            self._close_remote(opened)
            raise
        sess = GatewaySession(secrets.token_hex(12), batch, max_length, hops, [sid for _, sid in opened])
        with self._lock:
            self.sessions[sess.id] = sess
        log.info("session %s opened over %s", sess.id[:8], " -> ".join(f"{h.address}[{h.first}:{h.last})"
                                                                         for h in hops))
        return {"session": sess.id, "route": [[h.address, h.first, h.last] for h in hops]}, None

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
        out = {"hidden": hidden}
        for name in ("position_ids", "key_mask"):
            t = msg.tensor(name, optional=True)
            if t is not None:
                out[name] = t
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
        with sess.lock:
            outputs = self._run_chain(sess, tensors)
            sess.position += T
        return {"position": sess.position}, {"hidden": outputs[-1]}

    def _run_chain(self, sess: GatewaySession, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One step through every hop, with server-to-server push: the gateway sends the step to
        every server at once (hidden states only to the first), each server pushes its output to
        the next and sends a copy back here. A token costs n+1 network hops instead of 2n.
        Returns each hop's output."""
        step = sess.steps
        sess.steps += 1
        n = len(sess.hops)
        deadline = time.monotonic() + STEP_TIMEOUT_S
        small = {k: v for k, v in tensors.items() if k != "hidden"}
        sent = []
        for k, (hop, server_sid) in enumerate(zip(sess.hops, sess.server_sessions)):
            fields: dict = {"session": server_sid, "step": step}
            if k > 0:
                fields["expect_push"] = True
            if k < n - 1:
                fields["next"] = {"address": sess.hops[k + 1].address, "session": sess.server_sessions[k + 1]}
            conn = self.pool.get(hop.address)
            sent.append((conn, conn.send("step", fields, tensors if k == 0 else small, STEP_TIMEOUT_S)))
        return [_hidden(conn.receive(req_id, deadline, "step")) for conn, req_id in sent]

    def on_close(self, msg: Message):
        sid = msg.get("session")
        with self._lock:
            sess = self.sessions.pop(sid, None) if isinstance(sid, str) else None
        if sess is None:
            return {"closed": False}, None
        self._close_remote(list(zip(sess.hops, sess.server_sessions)))
        return {"closed": True}, None

    def on_forward(self, msg: Message):
        self._check_model(msg)
        tensors = self._tensors(msg)
        for hop in self.route():
            reply = self.pool.get(hop.address).request(
                "forward", {"model_id": self.model_id, "blocks": [hop.first, hop.last]}, tensors,
                timeout_s=STEP_TIMEOUT_S,
            )
            tensors = dict(tensors, hidden=_hidden(reply))
        return {}, {"hidden": tensors["hidden"]}

    # --- housekeeping -------------------------------------------------------------------------
    def _close_remote(self, opened: list[tuple[Hop, str]]) -> None:
        for hop, sid in opened:
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


def _hidden(reply: Message) -> torch.Tensor:
    hidden = reply.tensor("hidden")
    assert hidden is not None  # tensor() raises when it is missing
    return hidden
