"""Placement at run time: choosing this server's blocks when it starts with `serve.blocks:
auto`, re-choosing them periodically (at once when the model has a gap), and moving without
breaking any generation.

Joining: the server announces the span it would take (record state `joining`) before loading
anything, waits until the joiners it knows of stop changing, and takes the span that
`assign_joiners` gives it: servers that start together take turns by key, so they do not all
take the first blocks, and every one of them computes the same turns. It then announces
`loading` (its span is fixed from then on, and later joiners build around it) and loads.

A move loads the new blocks first (the old ones keep serving), checks again that every old
block is still covered by someone else, switches (new sessions go to the new blocks; the
record announces them), and lets sessions on the old blocks drain until they finish or
`serve.drain_timeout_s` passes, after which their gateways fail over by replay.

Double-holding (placement.py: two servers alone on their blocks trade places) reuses that
machinery, with the server's memory holding both spans: a "hold" switches to the new span but
keeps the old one served, new sessions included, and a "bridge" loads blocks another server
is about to leave and serves them beside its own span. The record announces the second span
(`also`) while it lasts, so that gateways route to it and placement counts it as covered.
When the plan names the server again for a "drop", it checks that others hold those blocks,
stops taking sessions there, and lets the sessions open there drain as after a move. Two Span
objects are served side by side rather than one over both spans: the spans need not touch,
the one left can be freed alone, and a session keeps the Span it was opened on, as after a
move."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Protocol

from libswarm.errors import LimitError
from swarmd.discovery.membership import Membership
from swarmd.discovery.table import PeerTable
from swarmd.peer.server import SpanServer
from swarmd.placement import (
    Holder,
    Move,
    assign_joiners,
    block_throughput,
    bottleneck,
    coverage,
    gaps,
    pick_mover,
    plan_move,
)
from swarmd.runtime.span import Span

log = logging.getLogger("swarmd.balancer")

DISCOVERY_WAIT_S = 3.0  # before choosing, how long to listen for the swarm (when peers are expected)
JOIN_SETTLE_S = 2.0  # joining: how long the joiners known and this server's span must stay the same
JOIN_WAIT_MAX_S = 15.0  # ...at most, before loading whatever it has then
JOIN_POLL_S = 0.25
GAP_CHECK_S = 1.0  # how often a server looks for blocks nobody holds (between rebalance intervals)


class SpanHost(Protocol):
    """What the balancer needs of the daemon that serves the span: its blocks (announced in its
    record), its server, and loading a span."""

    @property
    def blocks(self) -> tuple[int, int] | None: ...

    @property
    def server(self) -> SpanServer | None: ...

    def announce_blocks(self, blocks: tuple[int, int]) -> None:
        """From now on the record says these blocks (joining: the ones this server would take)."""

    def serving(self, span: Span) -> None:
        """The server switched to `span`, or added or let go the span held beside it: the
        record says its blocks from now on."""

    def load_span(self, start: int, end: int) -> Span: ...


class Balancer:
    def __init__(self, host: SpanHost, *, table: PeerTable, membership: Membership, key: str, model_id: str,
                 num_layers: int, auto: bool, interval_s: float, expects_peers: Callable[[], bool]):
        """`key`: this node's id; `expects_peers`: whether discovery has anyone to ask (seeds or
        mDNS), so that joining waits for the swarm's answers."""
        self.host, self.table, self.membership, self.key = host, table, membership, key
        self.model_id, self.num_layers, self.auto, self.interval_s = model_id, num_layers, auto, interval_s
        self.expects_peers = expects_peers
        self.moves = 0
        self.moving = False
        self.last_move: dict = {}
        self._unmovable: tuple | None = None  # the table when a gap last found no server able to move
        self._lock = threading.Lock()

    def holders(self, states: tuple[str, ...] = ("online",)) -> list[Holder]:
        """Servers of this daemon's model (itself included) in one of `states`, as placement sees
        them."""
        table = self.table
        # only nodes this daemon reached with their key: a record anyone may sign for a made-up
        # node (a huge throughput on some span) must not steer placement nor hide a gap
        return [
            Holder(e.record.node_id, e.record.span[0], e.record.span[1], e.record.throughput, e.record.movable,
                   capacity=e.record.capacity, also=e.record.also)
            for e in table.entries()
            if e.record.model_id == self.model_id and e.record.span is not None and table.state(e) in states
            and (e.is_self or e.verified)
        ]

    def discover(self) -> None:
        """Before choosing: gossip with the contacts until the table stops growing (bounded)."""
        if not self.expects_peers():
            return
        deadline, seen = time.monotonic() + DISCOVERY_WAIT_S, -1
        while time.monotonic() < deadline:
            self.membership.refresh()
            entries = self.table.entries()
            # placement counts only nodes reached with their key: wait for those heard of to be reached
            settled = all(e.is_self or e.verified or e.unreachable
                          or self.table.state(e) in ("dead", "unreachable", "offline") for e in entries)
            if len(entries) == seen and seen > 0 and settled:
                return
            seen = len(entries)
            time.sleep(0.5)

    def others(self) -> list[Holder]:
        return [h for h in self.holders() if h.key != self.key]

    def _turns(self, length: int, throughput: float) -> tuple[tuple[int, int], list[Holder], list[Holder]]:
        """This server's span by `assign_joiners`, with the servers settled (online, or loading
        their span) and the joiners it was computed from. Each joiner, this one included once
        its record is in the table, counts as its record says: every joiner computes from the
        same numbers."""
        me = self.key
        settled = [h for h in self.holders(("online", "loading")) if h.key != me]
        joiners = [h for h in self.holders(("joining",)) if h.key != me]
        mine = next((h for h in self.holders(("joining",)) if h.key == me), Holder(me, 0, length, throughput))
        return assign_joiners(settled, [*joiners, mine], self.num_layers)[me], settled, joiners

    def join(self, length: int, throughput: float) -> tuple[int, int]:
        """Choose this server's span with the servers starting at the same time (see the module's
        doc): announce a span, and take it once it has stayed the same for JOIN_SETTLE_S (long
        enough for the announcements of servers started together to reach everyone). Returns
        the span to load; the record says `joining` until the caller moves on to loading."""
        span, settled, joiners = self._turns(length, throughput)
        log.info("placement: %d servers known, %d joining too; announcing blocks %d:%d", len(settled),
                 len(joiners), *span)
        self.host.announce_blocks(span)  # and the record says it now
        t0 = last_change = time.monotonic()
        while time.monotonic() - last_change < JOIN_SETTLE_S and time.monotonic() - t0 < JOIN_WAIT_MAX_S:
            time.sleep(JOIN_POLL_S)
            span, settled, joiners = self._turns(length, throughput)
            if span != self.host.blocks:
                log.info("placement: %d servers known, %d joining too; now announcing blocks %d:%d", len(settled),
                         len(joiners), *span)
                self.host.announce_blocks(span)
                last_change = time.monotonic()
        tp = block_throughput(settled, self.num_layers)
        log.info("placement: %d servers known (%d more joining); taking blocks %d:%d (their throughput now %s)",
                 len(settled), len(joiners), *span, ", ".join(f"{x:.1f}" for x in tp[span[0]:span[1]]))
        return span

    def plan(self, margin: float | None = None) -> Move | None:
        """This server's move, if it is the one server that should move now (pick_mover)."""
        if margin is None:
            chosen = pick_mover(self.holders(), self.num_layers)
            return chosen[1] if chosen and chosen[0] == self.key else None
        return plan_move(self.holders(), self.key, self.num_layers, margin=margin)

    def still_safe(self, old: tuple[int, int], new: tuple[int, int]) -> bool:
        """Every block of `old` outside `new` is held by another online server right now (a span
        another server holds beside its own counts)."""
        cover = coverage(self.others(), self.num_layers)
        return all(cover[b] > 0 for b in range(*old) if not new[0] <= b < new[1])

    def move(self, new: tuple[int, int], reason: str, keep: bool = False) -> bool:
        """Load `new`, switch to it, drain the old span; with `keep` (a "hold"), serve the old
        span beside the new one until `drop`. False when the move was abandoned."""
        with self._lock:
            server, old = self.host.server, self.host.blocks
            if server is None or old is None or new == old or (keep and server.also is not None):
                return False
            self.moving = True
            try:
                t0 = time.monotonic()
                log.info("moving from blocks %d:%d to %d:%d (%s): loading the new blocks first%s", *old, *new, reason,
                         ", then serving both until others cover the old ones" if keep else "")
                span = self.host.load_span(*new)
                if not keep and not self.still_safe(old, new):
                    log.info("move to %d:%d abandoned: blocks %d:%d would be left uncovered", *new, *old)
                    return False
                if not server.switch_span(span, keep=keep):
                    log.error("move to %d:%d abandoned: the serving thread did not switch", *new)
                    return False
                self.host.serving(span)  # the record says so now, not at the next round
                self._moved(old, new, reason, t0, "hold" if keep else "move")
                return True
            finally:
                self.moving = False

    def bridge(self, blocks: tuple[int, int], reason: str) -> bool:
        """Load `blocks` and serve them beside this server's span (another server is about to
        leave them), until `drop`. False when abandoned."""
        with self._lock:
            server, own = self.host.server, self.host.blocks
            if server is None or own is None or server.also is not None:
                return False
            self.moving = True
            try:
                t0 = time.monotonic()
                log.info("loading blocks %d:%d to serve beside %d:%d (%s)", *blocks, *own, reason)
                if not server.add_also(self.host.load_span(*blocks)):
                    log.error("bridge of %d:%d abandoned: the serving thread did not take it", *blocks)
                    return False
                self.host.serving(server.span)
                self._moved(own, own, reason, t0, "bridge", also=blocks)
                return True
            finally:
                self.moving = False

    def drop(self, reason: str) -> bool:
        """Stop serving the span held beside this server's own, once others hold its blocks;
        its sessions drain. False when it is still needed (or there is none)."""
        with self._lock:
            server, own = self.host.server, self.host.blocks
            if server is None or own is None or server.also is None:
                return False
            also = (server.also.start, server.also.end)
            if not self.still_safe(also, own):
                log.info("keeping blocks %d:%d: no other server holds them yet", *also)
                return False
            if not server.drop_also():
                log.error("letting blocks %d:%d go failed: the serving thread did not", *also)
                return False
            self.host.serving(server.span)
            self._moved(own, own, reason, time.monotonic(), "drop", also=also)
            return True

    def _moved(self, old: tuple[int, int], new: tuple[int, int], reason: str, t0: float, kind: str,
               also: tuple[int, int] | None = None) -> None:
        self.moves += kind != "drop"
        self.last_move = {"at": time.time(), "from": list(old), "to": list(new), "reason": reason, "kind": kind,
                          "seconds": round(time.monotonic() - t0, 2), **({"also": list(also)} if also else {})}
        log.info("%s done in %.1f s: serving blocks %d:%d%s", kind, time.monotonic() - t0, *new,
                 f", blocks {also[0]}:{also[1]} {'let go' if kind == 'drop' else 'beside them'}" if also else "")

    def carry_out(self, move: Move, reason: str) -> bool:
        """Make a move of any kind pick_mover names."""
        if move.kind == "drop":
            return self.drop(reason)
        if move.kind == "bridge":
            return self.bridge(move.new, reason)
        return self.move(move.new, reason, keep=move.kind == "hold")

    def _snapshot(self) -> tuple:
        """What placement depends on: the servers, their spans and throughputs."""
        holders = self.holders(("online", "loading", "joining"))
        return tuple(sorted((h.key, h.start, h.end, h.throughput, h.also or ()) for h in holders))

    def gap(self) -> list[int]:
        """Blocks of the model that no server holds, loads, or has announced it will take (a
        joiner takes its span within JOIN_WAIT_MAX_S, or its record goes dead)."""
        return gaps(self.holders(("online", "loading", "joining")), self.num_layers)

    def run(self, stop: threading.Event) -> None:
        """Re-plan every rebalance interval (with jitter, so servers do not move in step), and at
        once when the table shows a gap: an uncovered block stops every generation. All servers
        compute the same pick (pick_mover), so exactly one moves into a gap."""
        interval = self.interval_s
        due = time.monotonic() + interval * random.uniform(0.75, 1.25)
        while not stop.wait(min(GAP_CHECK_S, max(0.0, due - time.monotonic()))):
            try:
                missing = self.gap()
                if time.monotonic() >= due:
                    due = time.monotonic() + interval * random.uniform(0.75, 1.25)
                elif not missing or self._unmovable == self._snapshot():
                    continue  # no gap; or a gap nobody could fill, and the table has not changed since
                move = self.plan()
                self._unmovable = self._snapshot() if move is None and missing else None
                if move is not None:
                    why = f"blocks {_runs(missing)} uncovered" if missing else \
                        "others hold them now" if move.kind == "drop" else \
                        f"swarm throughput {move.before:.1f} -> {move.after:.1f} steps/s" if move.kind == "move" else \
                        "trading places with another server (the plan's next steps would uncover blocks)"
                    self.carry_out(move, why)
            except Exception:
                log.exception("rebalancing failed")

    # --- swarmctl rebalance ----------------------------------------------------------------------
    def on_rebalance(self, dry_run: bool, start_move: Callable[[Callable[[], object]], None]) -> dict:
        blocks = self.host.blocks
        if blocks is None:
            raise LimitError("this daemon serves no blocks (serve.blocks: none)")
        holders = self.holders()
        before = bottleneck(holders, self.num_layers)
        reply: dict = {"current": list(blocks), "proposed": None, "before": before, "after": before,
                 "moving": False, "auto": self.auto}
        if not self.auto:
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


def _runs(blocks: list[int]) -> str:
    """[2, 3, 5] -> "2:4, 5:6"."""
    out: list[list[int]] = []
    for b in blocks:
        if out and out[-1][1] == b:
            out[-1][1] = b + 1
        else:
            out.append([b, b + 1])
    return ", ".join(f"{a}:{b}" for a, b in out)
