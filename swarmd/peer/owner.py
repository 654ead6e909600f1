"""What the rooms of the peer server (sessions, steps, batch, pushes, passes, relaying,
dial-backs, dispatch) may use of the server that owns them: its span and limits, the request
being handled, and its one way to answer. A Protocol, so that each room is typed against
this and none imports the server (server.py wires them; nothing imports it back)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import zmq

    from libswarm.protocol.registry import Request
    from swarmd.identity import NodeIdentity
    from swarmd.logs import RateLimitedLog
    from swarmd.peer.compute import ComputeThread
    from swarmd.peer.early import EarlyPushes
    from swarmd.peer.limits import KeyLimits
    from swarmd.peer.records import ServerSession
    from swarmd.runtime.cache import CacheBudget
    from swarmd.runtime.span import Lora, Span
    from swarmd.transport.access import AccessControl
    from swarmd.transport.connection import ConnectionPool
    from swarmd.transport.netem import LinkProfile
    from swarmd.transport.relay import RelayService

DEFERRED = object()  # a handler's answer when the reply is sent later (a step waiting for its push)


class Owner(Protocol):
    span: Span
    budget: CacheBudget
    model_id: str
    attached: bool
    max_length: int
    max_batch: int
    idle_timeout_s: float
    draining: bool
    sessions: dict[str, ServerSession]
    sessions_lock: threading.Lock
    adapters: dict[str, Lora]
    old_spans: list[tuple[Span, float]]
    also: Span | None
    also_adapters: dict[str, Lora]
    next_span: Span | None
    key_limits: KeyLimits
    early: EarlyPushes
    access: AccessControl
    peers: ConnectionPool
    resolve_key: Callable[[str], str | None]
    quiet_log: RateLimitedLog
    compute: ComputeThread
    relay: RelayService
    zctx: zmq.Context
    identity: NodeIdentity
    sock: zmq.Socket
    max_message_bytes: int
    busy_since: float | None
    # the request being handled on the serving thread: (ident, request id, sender key), and the
    # IP address it came from (None when relayed)
    current: tuple[bytes, int, str | None]
    peer_host: str | None
    opened: OrderedDict[tuple[str | None, str], str]
    netem: LinkProfile | None  # benchmarks and tests: emulated links back to each caller
    link_peers: dict[bytes, str]  # with an emulated network: a caller's node id by connection

    def send(self, ident: bytes, reply: list, req_id: int) -> None: ...

    def moved_from(self, first: int, last: int) -> bool: ...

    def emulate(self, ident: bytes, frames: list) -> bool: ...

    def error_reply(self, req_id: int, sender: str | None, e: Exception) -> list: ...

    def count(self, **added: int) -> None: ...

    def survived(self, e: Exception) -> None: ...

    def defer(self, priority: int, work: Callable[[], tuple], ident: bytes, req_id: int, sender: str | None,
              req: Request, done: Callable[[], None] | None = None) -> object: ...

    def drop(self, sid: str) -> bool: ...
