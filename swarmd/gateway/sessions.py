"""An app's inference session as the gateway holds it: the route it runs over, the server
sessions along it, its position and the history to replay them from; and what each step
request tells a hop about that session (step_fields: its server session, the step's number,
and where to cut its cache back to before running it)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from swarmd.gateway.history import History
from swarmd.gateway.router import DEFAULT_ROUTE_TIMEOUT_S
from swarmd.routing import Hop


@dataclass
class Shadow:
    """With strict verification: servers other than the hop's own that compute the same blocks
    for the same session, step by step, to compare."""

    main: str  # the address of the hop it checks
    hops: list[Hop]
    sids: list[str]


@dataclass
class GatewaySession:
    id: str
    batch: int
    max_length: int
    hops: list[Hop]
    server_sessions: list[str]
    route_timeout_s: float = DEFAULT_ROUTE_TIMEOUT_S
    push: bool = True
    adapter: str | None = None  # a hosted LoRA adapter: only servers hosting it are used
    position: int = 0
    steps: int = 0  # steps sent so far; numbers each step so that pushes find their request
    broken: bool = False  # a step failed after some servers ran it: rebuild before the next one
    history: History = field(default_factory=History)
    cut: int | None = None  # the position the step being run starts at, when the app cut the session back
    since: list[int] = field(default_factory=list)  # per hop: the position from which its server's outputs are kept
    shadows: dict[tuple[int, int], Shadow] = field(default_factory=dict)  # strict verification
    checking: bool = False  # a spot check of this session is queued or running
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


def step_fields(sess: GatewaySession, k: int, step: int, rollback: bool = False) -> dict:
    """The fields of step number `step` as hop k of the session's route is sent it."""
    fields: dict = {"session": sess.server_sessions[k], "step": step}
    if sess.cut is not None or rollback:
        # every hop cuts its cache back there before the step: the app's cut (then the
        # session's position is the cut), or a rerun of the step from the gateway's inputs
        fields["start"] = sess.position
    return fields
