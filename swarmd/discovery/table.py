"""The peer table: the latest verified record and beat of every node this daemon has heard of,
and what this daemon itself observed about each (round trip, reachability, weights mismatch).

Liveness does not trust clocks across machines: an entry is alive while newer beats (or
records) of its node keep arriving (every node makes a beat each gossip round). One that has
not advanced for `stale_after_s()` is dead: it stays listed, is never routed to, and is
forgotten after FORGET_AFTER_S.

An address belongs to the node this daemon reached there (a CURVE handshake proves the key);
until then to the first record that claimed it. A node claiming an address that a verified
node holds is not routed to: lying about addresses cannot take an honest node's place."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from dataclasses import dataclass

from swarmd.discovery.records import Beat, Record
from swarmd.gateway.routing import ServerSpan

GOSSIP_INTERVAL_S = 1.0
FORGET_AFTER_S = 60.0
MAX_NODES = 10_000  # bounds the memory a flood of self-signed records can take
# Digests name nodes by a prefix of their id: 16 Z85 characters are ~100 bits, beyond any
# grinding, and keep a digest of 1,000 nodes near 45 KB (a full id would pass the 64 KiB
# header limit near 900 nodes). Beyond MAX_DIGEST_ENTRIES a random part is sent.
DIGEST_ID_CHARS = 16
MAX_DIGEST_ENTRIES = 1200
MAX_REPLY_BYTES = 32 * 1024  # records and beats in one gossip reply: well inside the 64 KiB header


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
    beat: int = 0  # its latest beat within the record's incarnation
    beat_wire: dict | None = None
    verified: bool = False  # this daemon reached it at `address` with its key
    wire_bytes: int = 0  # of `wire`, for capping replies


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
        (a new node while the table holds MAX_NODES nodes that this daemon has reached).
        `via`: the address at which this daemon just reached the node itself."""
        now = time.monotonic()
        size = len(json.dumps(wire)) if wire else 0
        with self._lock:
            e = self._entries.get(record.node_id)
            if e is not None and record.version_key <= e.record.version_key:
                if via is not None and via == e.address:
                    e.verified = True
                return "old"
            address = via if via in record.addresses else (
                e.address if e is not None and e.address in record.addresses else record.addresses[0])
            if e is None and len(self._entries) >= MAX_NODES and not is_self and not self._evict_one(now):
                return "full"
            if e is None:
                self._entries[record.node_id] = Entry(record, wire, address, now, time.time(), is_self=is_self,
                                                      verified=is_self or via == address, wire_bytes=size)
                self._by_address = None
                return "new"
            if address != e.address or record.addresses != e.record.addresses:
                self._by_address = None
                e.verified = False
            if record.incarnation != e.record.incarnation:  # a restart: its beats count afresh
                e.beat, e.beat_wire = 0, None
            e.record, e.wire, e.address, e.advanced_at, e.last_seen = record, wire, address, now, time.time()
            e.verified = e.verified or is_self or via == address
            e.wire_bytes = size
            return "newer"

    def merge_beat(self, beat: Beat) -> str:
        """Take a beat: "newer" (the node is alive), "old", "unknown" (no record of that
        incarnation here yet: its record must come first) or "bad" (signature)."""
        with self._lock:
            e = self._entries.get(beat.node_id)
            if e is None or e.record.incarnation != beat.incarnation:
                return "unknown"
            if beat.beat <= e.beat:
                return "old"
            sign_key = e.record.sign_key
        if not beat.verify(sign_key):  # outside the lock: a signature check is the slow part
            return "bad"
        now = time.monotonic()
        with self._lock:
            if e.record.incarnation != beat.incarnation or beat.beat <= e.beat:
                return "old"
            e.beat, e.beat_wire, e.advanced_at, e.last_seen = beat.beat, beat.wire(), now, time.time()
            return "newer"

    def set_own_beat(self, node_id: str, beat: Beat) -> None:
        with self._lock:
            e = self._entries.get(node_id)
            if e is not None:
                e.beat, e.beat_wire, e.advanced_at = beat.beat, beat.wire(), time.monotonic()

    def _evict_one(self, now: float) -> bool:
        """Room for a new node in a full table: forget the node that went longest without news
        among those this daemon never reached (a flood of made-up nodes cannot push out the
        nodes it talks to). Called with the lock held."""
        candidates = [e for e in self._entries.values() if not e.is_self and not e.verified]
        if not candidates:
            return False
        oldest = min(candidates, key=lambda e: e.advanced_at)
        del self._entries[oldest.record.node_id]
        self._by_address = None
        return True

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

    def digest(self) -> dict[str, list[int]]:
        """What this daemon holds, {id prefix: [incarnation, seq, beat]}, for a gossip request."""
        with self._lock:
            entries = list(self._entries.values())
        if len(entries) > MAX_DIGEST_ENTRIES:
            entries = random.sample(entries, MAX_DIGEST_ENTRIES)
        return {e.record.node_id[:DIGEST_ID_CHARS]: [e.record.incarnation, e.record.seq, e.beat] for e in entries}

    def newer_than(self, digest: dict, max_bytes: int = MAX_REPLY_BYTES) -> tuple[list[dict], list[dict]]:
        """(records, beats) of live nodes that the holder of `digest` lacks or holds older ones
        of, within `max_bytes`, in this order: this daemon's own; nodes the caller has never
        heard of (joins spread first); newer records of nodes it knows; newer beats. Within
        each, a random order: what does not fit goes in a later round. Dead nodes are not
        passed on: they would look fresh to a node that never saw them.

        Another node's beat is passed on only once the caller's is BEAT_LAG_FRACTION of the
        dead threshold behind: liveness needs a beat within that threshold, not every one, and
        this cuts beat traffic by that many rounds."""
        now = time.monotonic()
        lag = max(1, int(BEAT_LAG_FRACTION * self.stale_after_s() / self.gossip_interval_s))
        entries = self.entries()  # own entry first
        unknown, updated, beating = [], [], []
        for e in entries[1:]:
            theirs = _digest_entry(digest.get(e.record.node_id[:DIGEST_ID_CHARS]))
            if theirs is None:
                unknown.append(e)
            elif theirs[:2] < (e.record.incarnation, e.record.seq):
                updated.append(e)
            elif e.beat_wire is not None and theirs[0] == e.record.incarnation and theirs[2] <= e.beat - lag:
                beating.append(e)
        for group in (unknown, updated, beating):
            random.shuffle(group)
        records: list[dict] = []
        beats: list[dict] = []
        left = max_bytes
        for e in entries[:1] + unknown + updated + beating:
            if self.state(e, now) == "dead":
                continue
            theirs = _digest_entry(digest.get(e.record.node_id[:DIGEST_ID_CHARS]))
            ours = (e.record.incarnation, e.record.seq, e.beat)
            if theirs is None or theirs[:2] < ours[:2]:
                if e.wire_bytes + 8 > left:
                    continue
                records.append(e.wire)
                left -= e.wire_bytes + 8
            elif theirs[0] != ours[0] or theirs[2] >= ours[2]:
                continue
            if e.beat_wire is not None and BEAT_BYTES <= left:
                beats.append(e.beat_wire)
                left -= BEAT_BYTES
        return records, beats

    def key_for(self, address: str) -> str | None:
        """The node id (CURVE public key) of the node reached at `address`, if known: the one
        this daemon verified there, else the one whose address in use it is, else any that
        lists it (the first claim)."""
        with self._lock:
            if self._by_address is None:
                listed: dict[str, str] = {}
                used: dict[str, str] = {}
                verified: dict[str, str] = {}
                for e in self._entries.values():
                    if e.verified:
                        verified.setdefault(e.address, e.record.node_id)
                    used.setdefault(e.address, e.record.node_id)
                    for a in e.record.addresses:
                        listed.setdefault(a, e.record.node_id)
                self._by_address = {**listed, **used, **verified}
            return self._by_address.get(address)

    def servers_for(self, model_id: str, adapter: str | None = None) -> list[ServerSpan]:
        """Spans of the online servers of this model (hosting `adapter`, if given), for routing."""
        now = time.monotonic()
        out = []
        for e in self.entries():
            r = e.record
            if r.model_id != model_id or r.span is None or self.state(e, now) != "online":
                continue
            if self.key_for(e.address) != r.node_id:
                continue  # another node holds that address (a verified one, or an earlier claim)
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


BEAT_LAG_FRACTION = 0.25  # of the dead threshold: a relayed beat keeps a node 3/4 of it from looking dead
BEAT_BYTES = 160  # a beat's JSON: 40-character id, two counts, an 88-character signature


def _digest_entry(value: object) -> tuple[int, int, int] | None:
    if isinstance(value, list) and len(value) == 3 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in value):
        return value[0], value[1], value[2]
    return None
