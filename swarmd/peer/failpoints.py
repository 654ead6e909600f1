"""Faults injected for tests, chosen once at start by SWARMD_FAILPOINTS (comma-separated names).
Each wraps one method of the server, so that the serving path of a production daemon holds
no test at all.

- exit_on_replay: the process exits when a gateway replays a session's history to it (a
  server that dies in the middle of a failover);
- hang_on_forward: a forward pass never returns (a wedged device call);
- slow_forward: a forward pass takes 3 s longer (a long prefill, a large training batch, a
  slow GPU), so that tests can see what else goes on meanwhile."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("swarmd.peer")

SLOW_FORWARD_S = 3.0


def _exit_on_replay(server) -> None:
    step = server._run_step

    def run_step(s, msg, hidden):
        if msg.get("replay"):
            log.warning("failpoint exit_on_replay: exiting")
            os._exit(3)
        return step(s, msg, hidden)
    server._run_step = run_step


def _hang_on_forward(server) -> None:
    def forward(*args):
        log.warning("failpoint hang_on_forward: this request never returns")
        threading.Event().wait()
    server._forward = forward


def _slow_forward(server) -> None:
    forward = server._forward

    def slow(*args):
        time.sleep(SLOW_FORWARD_S)
        return forward(*args)
    server._forward = slow


FAILPOINTS: dict[str, Callable] = {"exit_on_replay": _exit_on_replay, "hang_on_forward": _hang_on_forward,
                                   "slow_forward": _slow_forward}


def install(server, names: str) -> None:
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in FAILPOINTS:
            log.warning("SWARMD_FAILPOINTS: unknown failpoint %r ignored (known: %s)", name, ", ".join(FAILPOINTS))
            continue
        log.warning("failpoint %s armed (tests only)", name)
        FAILPOINTS[name](server)
