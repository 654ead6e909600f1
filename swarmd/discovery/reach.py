"""Whether peers can connect to this daemon, and the relays it is reached through when they cannot.

A check asks two peers (reached directly, and not themselves known unreachable; on distinct
hosts where it can) to call back at this daemon's announced address; a `reach_back` arriving
there proves it reachable. It is unreachable only when QUORUM peers of distinct keys took the
question and none got through (each answered `calling: false`, or its call never came): one
peer, a liar or one with a broken route, cannot make a reachable node hide behind relays. A
check short of that changes nothing (a node keeps its last verdict) and is asked again soon,
of other peers. A swarm with a single other peer has only that one to ask: its word counts
once this daemon has been up SETTLE_S (its table may still be filling before). Checks run at
start and every CHECK_INTERVAL_S (sooner while the answer is unknown), and each change is
logged.

An unreachable server keeps links to up to RELAYS_WANTED relays (peers that offer to relay and
are not known unreachable: those found reachable first, then the nearest); a relay that fails is not chosen again for
RELAY_RETRY_S. Its record names the relays that acknowledged it, and peers reach it there."""

from __future__ import annotations

import logging
import random
import secrets
import time
from typing import TYPE_CHECKING

from libswarm.errors import SwarmError
from swarmd.discovery.table import PeerTable
from swarmd.identity import short_id
from swarmd.transport.connection import ConnectionPool

if TYPE_CHECKING:
    from swarmd.peer.server import SpanServer

log = logging.getLogger("swarmd.discovery")

CHECK_INTERVAL_S = 300.0
RETRY_S = 2.0  # while unknown (no peer to ask yet, or none answered)
ASKED = 2  # peers asked at once
QUORUM = 2  # distinct peers that must fail to get through for "unreachable"
SETTLE_S = 30.0  # after start, a lone peer's word waits this long for a second peer to ask
CALL_WAIT_S = 5.0  # how long a call back may take to arrive (the caller gives up after 3 s)
RELAYS_WANTED = 2
RELAY_RETRY_S = 30.0


class Reachability:
    def __init__(self, *, pool: ConnectionPool, table: PeerTable, own_id: str, address: str, server: SpanServer):
        self.pool, self.table, self.own_id, self.address, self.server = pool, table, own_id, address, server
        self.state = "unknown"
        self._next_check = 0.0
        self._started = time.monotonic()
        # a check under way: (nonce -> the key of the peer asked, asked at, keys of the peers calling)
        self._pending: tuple[dict[str, str], float, set[str]] | None = None
        self._eligible = 0  # peers that could be asked at the last check
        self._wanted: list[tuple[str, str]] = []

    def tick(self) -> None:
        """Once a second, on its own thread: a check's progress, and the relays to keep."""
        now = time.monotonic()
        if self._pending is not None:
            self._settle(now)
        elif now >= self._next_check:
            self._ask(now)
        self._tend_relays(now)

    def _ask(self, now: float) -> None:
        peers = [e for e in self.table.entries() if not e.is_self and e.verified and e.record.reachable != "no"
                 and e.address.startswith("tcp://") and self.table.routable(e)]
        self._eligible = len(peers)
        asked: dict[str, str] = {}
        calling: set[str] = set()
        for e in _pick(peers, ASKED):
            nonce = secrets.token_hex(16)
            try:
                reply = self.pool.get(e.address, e.record.node_id).request(
                    "reach", {"address": self.address, "nonce": nonce}, timeout_s=2.0)
            except SwarmError as err:
                log.debug("reachability: %s did not take the question: %s", e.record.short_id, err)
                continue
            asked[nonce] = e.record.node_id
            if reply.get("calling") is True:
                calling.add(e.record.node_id)
            else:
                log.info("reachability: %s will not call back: %s", e.record.short_id, reply.get("why"))
        if asked:
            self._pending = (asked, now, calling)
        else:
            self._next_check = now + RETRY_S

    def _settle(self, now: float) -> None:
        assert self._pending is not None
        asked, asked_at, calling = self._pending
        if any(n in self.server.reached for n in asked):
            self._decide("yes", now)
        elif now - asked_at > CALL_WAIT_S or not calling:
            # asked, and nobody got through (or would not try: it sees another address)
            failed = set(asked.values())
            if len(failed) >= self._quorum(now):
                self._decide("no", now)
            else:
                self._pending = None  # too few to tell: the last verdict stands, others are asked soon
                self._next_check = now + RETRY_S
                log.debug("reachability: only %d peer(s) could not get through, %d needed: the verdict stays %s",
                         len(failed), self._quorum(now), self.state)

    def _quorum(self, now: float) -> int:
        """Distinct peers whose failure makes this daemon unreachable: QUORUM, or a lone peer's
        word in a swarm that has no second one to ask once the table has had time to fill."""
        if self._eligible < QUORUM and now - self._started >= SETTLE_S:
            return max(1, self._eligible)
        return QUORUM

    def _decide(self, state: str, now: float) -> None:
        self._pending = None
        self._next_check = now + CHECK_INTERVAL_S
        if state != self.state:
            if state == "no":
                log.warning("peers cannot connect to %s: serving through relays (open the port to serve "
                            "directly; docs/operations.md, Ports)", self.address)
            else:
                log.info("peers can connect to %s", self.address)
        self.state = state

    def _tend_relays(self, now: float) -> None:
        if self.state != "no":
            wanted: list[tuple[str, str]] = []
        else:
            failures = self.server.relay_failures

            def usable(rid: str) -> bool:
                return now - failures.get(rid, (-RELAY_RETRY_S, ""))[0] >= RELAY_RETRY_S

            candidates = sorted(
                (e for e in self.table.entries() if not e.is_self and e.verified and e.record.relay
                 and e.record.reachable != "no" and not e.record.via and self.table.routable(e)
                 and e.address.startswith("tcp://")
                 and usable(e.record.node_id)),
                key=lambda e: (e.record.reachable != "yes", e.rtt_ms is None, e.rtt_ms or 0.0))
            wanted = [(rid, address) for rid, address in self._wanted if usable(rid)]
            for e in candidates:
                if len(wanted) >= RELAYS_WANTED:
                    break
                if all(rid != e.record.node_id for rid, _ in wanted):
                    wanted.append((e.record.node_id, e.address))
            if not wanted and self._wanted:
                log.warning("no relay available: this server cannot be reached until one is")
        if wanted != self._wanted:
            if wanted:
                log.info("relays wanted: %s", ", ".join(f"{short_id(r)} at {a}" for r, a in wanted))
            self._wanted = wanted
            self.server.want_relays(wanted)


def _pick(peers: list, n: int) -> list:
    """`n` peers to ask: those found reachable first (they know best), each from another host
    where there are enough (two Sybil keys on one machine then answer as one at most)."""
    random.shuffle(peers)
    peers.sort(key=lambda e: e.record.reachable != "yes")
    chosen, hosts = [], set()
    for e in peers:
        host = _host_of(e.address)
        if host not in hosts:
            chosen.append(e)
            hosts.add(host)
    chosen += [e for e in peers if e not in chosen]
    return chosen[:n]


def _host_of(address: str) -> str:
    """The host of a tcp://host:port address."""
    return address[len("tcp://"):].rsplit(":", 1)[0]
