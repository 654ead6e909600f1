"""The peer table: the latest verified record of every node this daemon has heard of, and
what this daemon itself observed about each (round trip, reachability, weights mismatch).

Liveness does not trust clocks across machines: an entry is alive while newer versions of
its record keep arriving (every node re-signs its record each gossip interval). One that has
not advanced for `stale_after_s()` is dead: it stays listed, is never routed to, and is
forgotten after FORGET_AFTER_S."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from swarmd.discovery.records import Record
from swarmd.gateway.routing import ServerSpan

GOSSIP_INTERVAL_S = 1.0
FORGET_AFTER_S = 60.0
MAX_NODES = 10_000  # bounds the memory a flood of self-signed records can take


@dataclass
class Entry:
    record: Record
    wire: dict
    address: str  # the address this daemon uses for the node (one of the record's)
    advanced_at: float  # time.monotonic() when a newer version last arrived
    last_seen: float  # time.time() of that
    rtt_ms: float | None = None  # measured by this daemon
    unreachable: str | None = None  # why this daemon's last contact failed
    mismatch: str | None = None  # why its weights are not this daemon's
    is_self: bool = False


class PeerTable:
    def __init__(self, gossip_interval_s: float = GOSSIP_INTERVAL_S):
        self.gossip_interval_s = gossip_interval_s
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        # address -> node id for key_for (asked on every hop of every step): rebuilt after a
        # change of who is where, not on the heartbeats that only re-sign the same record
        self._by_address: dict[str, str] | None = None

    # --- liveness ----------------------------------------------------------------------------
    def stale_after_s(self) -> float:
        """How long a record may go without a newer version before its node counts as dead:
        a few gossip rounds more than an epidemic needs to reach everyone (about log2 of the
        swarm's size), so a live node is not declared dead in a large swarm."""
        n = max(len(self._entries), 2)
        return self.gossip_interval_s * (3 + 2 * math.log2(n))

    def state(self, e: Entry, now: float | None = None) -> str:
        if e.is_self or e.record.state == "offline":
            return e.record.state
        if (time.monotonic() if now is None else now) - e.advanced_at > self.stale_after_s():
            return "dead"
        if e.unreachable:
            return "unreachable"
        if e.mismatch:
            return "mismatch"
        return e.record.state

    # --- updates -------------------------------------------------------------------------------
    def merge(self, record: Record, wire: dict, via: str | None = None, is_self: bool = False) -> str:
        """Take a verified record: "new" node, "newer" version, "old" (ignored), or "full"
        (a new node while the table holds MAX_NODES)."""
        now = time.monotonic()
        with self._lock:
            e = self._entries.get(record.node_id)
            if e is not None and record.version_key <= e.record.version_key:
                return "old"
            address = via if via in record.addresses else (
                e.address if e is not None and e.address in record.addresses else record.addresses[0])
            if e is None and len(self._entries) >= MAX_NODES and not is_self:
                return "full"
            if e is None:
                self._entries[record.node_id] = Entry(record, wire, address, now, time.time(), is_self=is_self)
                self._by_address = None
                return "new"
            if address != e.address or record.addresses != e.record.addresses:
                self._by_address = None
            e.record, e.wire, e.address, e.advanced_at, e.last_seen = record, wire, address, now, time.time()
            return "newer"

    def observe(self, node_id: str, *, rtt_ms: float | None = None, unreachable: str | None = None) -> None:
        """This daemon's own contact with a node: a round trip, or why it failed."""
        with self._lock:
            e = self._entries.get(node_id)
            if e is None:
                return
            e.unreachable = unreachable
            if rtt_ms is not None:
                e.rtt_ms = rtt_ms

    def set_mismatch(self, node_id: str, reason: str | None) -> None:
        with self._lock:
            if node_id in self._entries:
                self._entries[node_id].mismatch = reason

    def prune(self) -> list[Record]:
        """Forget nodes dead or offline for FORGET_AFTER_S; returns their records."""
        now = time.monotonic()
        with self._lock:
            gone = [e for e in self._entries.values() if not e.is_self and now - e.advanced_at > max(
                FORGET_AFTER_S, self.stale_after_s())]
            for e in gone:
                del self._entries[e.record.node_id]
            if gone:
                self._by_address = None
        return [e.record for e in gone]

    # --- reading -------------------------------------------------------------------------------
    def get(self, node_id: str) -> Entry | None:
        with self._lock:
            return self._entries.get(node_id)

    def entries(self) -> list[Entry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: (not e.is_self, e.address))

    def digest(self) -> dict[str, list]:
        with self._lock:
            return {nid: [e.record.timestamp, e.record.seq] for nid, e in self._entries.items()}

    def newer_than(self, digest: dict) -> list[dict]:
        """Wire records of live nodes that the holder of `digest` lacks or has older versions of.
        Dead nodes' records are not passed on: they would look fresh to a node that never saw them."""
        now = time.monotonic()
        out = []
        for e in self.entries():
            if self.state(e, now) == "dead":
                continue
            theirs = digest.get(e.record.node_id)
            if not (isinstance(theirs, list) and len(theirs) == 2 and all(
                    isinstance(x, (int, float)) for x in theirs)) or tuple(theirs) < e.record.version_key:
                out.append(e.wire)
        return out

    def key_for(self, address: str) -> str | None:
        """The node id (CURVE public key) of the node reached at `address`, if known."""
        with self._lock:
            if self._by_address is None:
                listed: dict[str, str] = {}  # any address a node lists; the one in use wins
                used: dict[str, str] = {}
                for e in self._entries.values():
                    used.setdefault(e.address, e.record.node_id)
                    for a in e.record.addresses:
                        listed.setdefault(a, e.record.node_id)
                self._by_address = {**listed, **used}
            return self._by_address.get(address)

    def servers_for(self, model_id: str, adapter: str | None = None) -> list[ServerSpan]:
        """Spans of the online servers of this model (hosting `adapter`, if given), for routing."""
        now = time.monotonic()
        out = []
        for e in self.entries():
            r = e.record
            if r.model_id != model_id or r.span is None or self.state(e, now) != "online":
                continue
            if adapter is not None and adapter not in r.adapters:
                continue
            block_s = 1.0 / (r.throughput * (r.span[1] - r.span[0])) if r.throughput > 0 else None
            rtt_s = 0.0 if e.is_self else (e.rtt_ms / 1000 if e.rtt_ms is not None else None)
            out.append(ServerSpan(e.address, r.span[0], r.span[1], r.cache_free_bytes, block_s, rtt_s))
        return out

    def to_json(self, e: Entry) -> dict:
        r = e.record
        return {
            "node_id": r.node_id,
            "short_id": r.short_id,
            "address": e.address,
            "addresses": list(r.addresses),
            "model_id": r.model_id,
            "span": list(r.span) if r.span else None,
            "state": self.state(e),
            "throughput": r.throughput,
            "forward_throughput": r.forward_throughput,
            "bandwidth_mbps": r.bandwidth_mbps,
            "movable": r.movable,
            "adapters": list(r.adapters),
            "cache_free_bytes": r.cache_free_bytes,
            "sessions": r.sessions,
            "version": r.version,
            "protocol": r.protocol,
            "rtt_ms": e.rtt_ms,
            "last_seen_s_ago": round(time.time() - e.last_seen, 1),
            "error": e.unreachable or e.mismatch,
            "is_self": e.is_self,
        }

    def rows(self) -> list[dict]:
        return [self.to_json(e) for e in self.entries()]
