"""Placement at run time: choosing this server's blocks when it starts with `serve.blocks:
auto`, re-choosing them periodically, and moving without breaking any generation.

A move loads the new blocks first (the old ones keep serving), checks again that every old
block is still covered by someone else, switches (new sessions go to the new blocks; the
record announces them), and lets sessions on the old blocks drain until they finish or
`serve.drain_timeout_s` passes, after which their gateways fail over by replay."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from libswarm.errors import LimitError
from swarmd.placement import Holder, Move, block_throughput, bottleneck, choose_span, pick_mover, plan_move

if TYPE_CHECKING:
    from swarmd.daemon import Daemon

log = logging.getLogger("swarmd.balancer")

DISCOVERY_WAIT_S = 3.0  # before choosing, how long to listen for the swarm (when peers are expected)


class Balancer:
    def __init__(self, daemon: Daemon):
        self.d = daemon
        self.moves = 0
        self.moving = False
        self.last_move: dict = {}
        self._lock = threading.Lock()

    def holders(self) -> list[Holder]:
        """Online servers of this daemon's model (itself included), as placement sees them."""
        table = self.d.table
        return [
            Holder(e.record.node_id, e.record.span[0], e.record.span[1], e.record.throughput, e.record.movable)
            for e in table.entries()
            if e.record.model_id == self.d.model_id and e.record.span is not None and table.state(e) == "online"
        ]

    def discover(self) -> None:
        """Before choosing: gossip with the contacts until the table stops growing (bounded)."""
        if not self.d.membership.hints and self.d.mdns is None:
            return
        deadline, seen = time.monotonic() + DISCOVERY_WAIT_S, -1
        while time.monotonic() < deadline:
            self.d.membership.refresh()
            n = len(self.d.table.entries())
            if n == seen and n > 0:
                return
            seen = n
            time.sleep(0.5)

    def others(self) -> list[Holder]:
        return [h for h in self.holders() if h.key != self.d.identity.public_key]

    def choose(self, length: int, throughput: float) -> tuple[int, int]:
        others = self.others()
        start, end = choose_span(others, self.d.num_layers, length, throughput)
        tp = block_throughput(others, self.d.num_layers)
        log.info("placement: %d servers known; taking blocks %d:%d (their throughput now %s)", len(others),
                 start, end, ", ".join(f"{x:.1f}" for x in tp[start:end]))
        return start, end

    def plan(self, margin: float | None = None) -> Move | None:
        """This server's move, if it is the one server that should move now (pick_mover)."""
        if margin is None:
            chosen = pick_mover(self.holders(), self.d.num_layers)
            return chosen[1] if chosen and chosen[0] == self.d.identity.public_key else None
        return plan_move(self.holders(), self.d.identity.public_key, self.d.num_layers, margin=margin)

    def still_safe(self, old: tuple[int, int], new: tuple[int, int]) -> bool:
        """Every block of `old` outside `new` is held by another online server right now."""
        tp = block_throughput(self.others(), self.d.num_layers)
        return all(tp[b] > 0 for b in range(*old) if not new[0] <= b < new[1])

    def move(self, new: tuple[int, int], reason: str) -> bool:
        """Load `new`, switch to it, drain the old span. False when the move was abandoned."""
        with self._lock:
            server, old = self.d.server, self.d.blocks
            if server is None or old is None or new == old:
                return False
            self.moving = True
            try:
                t0 = time.monotonic()
                log.info("moving from blocks %d:%d to %d:%d (%s): loading the new blocks first", *old, *new, reason)
                span = self.d.load_span(*new)
                if not self.still_safe(old, new):
                    log.info("move to %d:%d abandoned: blocks %d:%d would be left uncovered", *new, *old)
                    return False
                if not server.switch_span(span):
                    log.error("move to %d:%d abandoned: the serving thread did not switch", *new)
                    return False
                self.d.span, self.d.blocks = span, new
                self.d.membership.round()  # tell the swarm now, not at the next round
                self.moves += 1
                self.last_move = {"at": time.time(), "from": list(old), "to": list(new), "reason": reason,
                                  "seconds": round(time.monotonic() - t0, 2)}
                log.info("moved to blocks %d:%d in %.1f s", *new, time.monotonic() - t0)
                return True
            finally:
                self.moving = False

    def run(self, stop: threading.Event) -> None:
        interval = self.d.config.serve.rebalance_interval_s
        while not stop.wait(interval * random.uniform(0.75, 1.25)):  # jitter: servers do not move in step
            try:
                move = self.plan()
                if move is not None:
                    self.move(move.new, f"swarm throughput {move.before:.1f} -> {move.after:.1f} steps/s")
            except Exception:
                log.exception("rebalancing failed")

    # --- swarmctl rebalance ----------------------------------------------------------------------
    def on_rebalance(self, dry_run: bool, start_move: Callable[[Callable[[], object]], None]) -> dict:
        if self.d.blocks is None:
            raise LimitError("this daemon serves no blocks (serve.blocks: none)")
        holders = self.holders()
        before = bottleneck(holders, self.d.num_layers)
        reply: dict = {"current": list(self.d.blocks), "proposed": None, "before": before, "after": before,
                 "moving": False, "auto": self.d.auto}
        if not self.d.auto:
            reply["reason"] = "serve.blocks is fixed in the config; only blocks: auto moves"
            return reply
        move = self.plan(margin=0.0)  # the operator asked: any strict improvement counts
        if move is None:
            reply["reason"] = "no other span raises the swarm's throughput without uncovering blocks"
            return reply
        reply.update(proposed=list(move.new), after=move.after)
        if not dry_run:
            reply["moving"] = True
            start_move(lambda: self.move(move.new, "swarmctl rebalance"))
        return reply
