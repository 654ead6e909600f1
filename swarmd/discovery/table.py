"""The peer table: the latest verified record of every node this daemon has heard of, and what
this daemon itself observed about each (round trip, reachability, suspicion, weights mismatch).

Liveness is by probing, not by relaying heartbeats (SWIM): a node is taken to be alive until a
contact with it fails. A failed contact makes it `unreachable` here and starts its suspicion;
a suspicion not lifted within `suspect_after_s()` makes it `dead`: still listed, never routed
to, forgotten after FORGET_AFTER_S. Evidence of life lifts a suspicion: a newer record or
beat signed by the node, a request from it, or a contact that succeeds. Another node's
suspicion is only a reason to check (`suspect`, not routed to until this daemon's own contact
settles it): one liar cannot make honest nodes drop a live peer.

A record is believed once this daemon has reached its node at its address (a CURVE handshake
proves the key): until then it is not routed to and not passed on as news, so a flood of
made-up records stays where it was sent. An address belongs to the node reached there; until
then to the node using it, then to the first record that claimed it. A node claiming an
address that a verified node holds is not routed to."""

from __future__ import annotations

import itertools
import json
import math
import random
import threading
import time
import zlib
from dataclasses import dataclass, field

from swarmd.discovery.records import Beat, Record
from swarmd.identity import short_id
from swarmd.routing import QUANTIZED_PENALTY_S, ServerSpan

GOSSIP_INTERVAL_S = 1.0
FORGET_AFTER_S = 60.0
MAX_NODES = 10_000  # bounds the memory a flood of self-signed records can take
MAX_REPLY_BYTES = 32 * 1024  # what one gossip reply carries: well inside the 64 KiB header
# Anti-entropy: a node's table is summed in buckets by node id; two nodes compare the sums and
# the callee sends the records of the buckets that differ. 16 buckets for small tables, 256 for
# large ones (a bucket of a 1,000-node table holds ~4 records).
SMALL_BUCKETS, LARGE_BUCKETS = 16, 256
# The sums and the believed records by bucket are computed once per change of the table (a pass
# over every record: 1.2 ms at 1,000 nodes, 6.2 ms at 5,000, which a flood of `gossip` used to
# buy per request on the serving thread), and at least this often: a suspicion becomes a death
# with time alone
VIEW_MAX_AGE_S = 1.0
RTT_WINDOW = 5  # contacts whose least round trip is a node's RTT
TAG_CHARS = 12  # of a news tag (membership.py), and of a signature naming a version in bucket sums


@dataclass
class Entry:
    record: Record
    wire: dict
    address: str  # the address this daemon uses for the node (one of the record's)
    advanced_at: float  # time.monotonic() when a newer version last arrived
    last_seen: float  # time.time() of the last evidence of life
    rtt_ms: float | None = None  # measured by this daemon: the least of its last RTT_WINDOW contacts
    rtt_recent: list[float] = field(default_factory=list)  # those contacts' round trips, ms
    unreachable: str | None = None  # why this daemon's last contact failed
    mismatch: str | None = None  # why its weights are not this daemon's
    distrust: str | None = None  # why this daemon's gateway caught it computing wrong outputs
    distrust_until: float = 0.0  # monotonic
    is_self: bool = False
    beat: int = 0  # its latest beat within the record's incarnation
    beat_wire: dict | None = None
    verified: bool = False  # this daemon reached it at `address` with its key
    wire_bytes: int = 0  # of `wire`, for capping replies
    suspect_since: float | None = None  # monotonic: a contact failed and nothing has lifted it since
    doubt: int | None = None  # another node suspects this beat of it: to be checked here
    heard_at: float = 0.0  # monotonic time of the last evidence of life (-inf: none yet)
    cleared: int = -1  # the latest beat suspected by another node that this daemon found alive

    @property
    def tag(self) -> str:
        return self.wire["sig"][:TAG_CHARS] if self.wire else ""


@dataclass
class BucketView:
    """Anti-entropy's view of the table for one number of buckets (see VIEW_MAX_AGE_S)."""

    revision: int  # of the table it was computed from
    at: float  # monotonic
    sums: str
    entries: dict[int, list[Entry]]  # bucket -> the other nodes' records believed there
    own: tuple[int, Entry] | None  # this daemon's own record and its bucket
    smallest: int  # wire bytes of the smallest record in it


class PeerTable:
    def __init__(self, gossip_interval_s: float = GOSSIP_INTERVAL_S, own_id: str = ""):
        """`own_id`: this daemon's node id, which spreads the daemons of a swarm over the
        relays of a relayed node (each picks one of them by a hash of both ids)."""
        self.gossip_interval_s = gossip_interval_s
        self.own_id = own_id
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        # news that may give a gateway waiting for servers a route: a node's new record version,
        # or this daemon reaching one (see wait_news)
        self._news = threading.Condition(self._lock)
        self._version = 0
        # address -> node id for key_for (asked on every hop of every step): rebuilt after a
        # change of who is where
        self._by_address: dict[str, str] | None = None
        # bumped (under the lock) by every change of which records are believed, or of their
        # versions: the bucket views are computed again after one
        self._revision = 0
        self._views: dict[int, BucketView] = {}
        self._sigs: dict[str, str] = {}  # signature of each record held -> its node id (see `holds`)
        self.quantized = "use"  # swarm.quantized: how servers_for offers quantized servers to routing

    # --- liveness ----------------------------------------------------------------------------
    def suspect_after_s(self) -> float:
        """How long a suspicion may stand before its node counts as dead: a few rounds more
        than it takes the node to hear of it and its refutation to spread (about log2 of the
        swarm's size)."""
        n = max(len(self._entries), 2)
        return self.gossip_interval_s * (3 + math.log2(n))

    def hot_rounds(self) -> int:
        """Rounds a daemon passes news on: enough for an epidemic to reach the whole swarm."""
        return 4 + math.ceil(math.log2(max(len(self._entries), 2)))

    def state(self, e: Entry, now: float | None = None) -> str:
        if e.is_self or e.record.state == "offline":
            return e.record.state
        now = time.monotonic() if now is None else now
        if e.suspect_since is not None and now - e.suspect_since > self.suspect_after_s():
            return "dead"
        if e.unreachable:
            return "unreachable"
        if e.doubt is not None:
            return "suspect"
        if e.mismatch:
            return "mismatch"
        if e.distrust and e.distrust_until > now:
            return "distrusted"
        return e.record.state

    def routable(self, e: Entry, now: float | None = None) -> bool:
        """Believed (reached by this daemon) and alive: its records may be passed on."""
        return (e.is_self or e.verified) and self.state(e, now) not in ("dead", "unreachable", "suspect")

    # --- updates -------------------------------------------------------------------------------
    def merge(self, record: Record, wire: dict, via: str | None = None, is_self: bool = False) -> str:
        """Take a verified record: "new" node, "newer" version, "old" (ignored), or "full"
        (a new node while the table holds MAX_NODES nodes that this daemon has reached).
        `via`: the address at which this daemon just reached the node itself. A newer
        version is evidence of life: it lifts a suspicion."""
        now = time.monotonic()
        size = len(json.dumps(wire)) if wire else 0
        with self._lock:
            e = self._entries.get(record.node_id)
            if e is not None and record.version_key <= e.record.version_key:
                if via is not None and via == e.address and not e.verified:
                    e.verified = True
                    self._revision += 1
                return "old"
            contacts = record.contact_addresses
            address = via if via in contacts else (
                e.address if e is not None and e.address in contacts else self._pick(record.node_id, contacts))
            if e is None and len(self._entries) >= MAX_NODES and not is_self and not self._evict_one(now):
                return "full"
            self._revision += 1
            if e is None:
                self._index(wire, record.node_id)
                self._entries[record.node_id] = Entry(record, wire, address, now, time.time(), is_self=is_self,
                                                      verified=is_self or via == address, wire_bytes=size,
                                                      heard_at=now if is_self or via == address else -math.inf)
                self._by_address = None
                self._announce()
                return "new"
            if address != e.address or contacts != e.record.contact_addresses:
                self._by_address = None
                e.verified = False
                if address != e.address:  # a failure at its old address says nothing of the new one
                    e.unreachable = None
            if record.incarnation != e.record.incarnation:  # a restart: its beats count afresh
                e.beat, e.beat_wire, e.cleared = 0, None, -1
            routing_news = (record.state, record.span, record.also, record.incarnation, address) != (
                e.record.state, e.record.span, e.record.also, e.record.incarnation, e.address)
            self._sigs.pop(_signature(e.wire) or "", None)
            self._index(wire, record.node_id)
            e.record, e.wire, e.address, e.advanced_at, e.last_seen = record, wire, address, now, time.time()
            e.verified = e.verified or is_self or via == address
            e.wire_bytes = size
            if e.verified:
                self._alive(e, now)
            if routing_news:  # not for its counters (sessions, free cache): they change all the time
                self._announce()
            return "newer"

    def _pick(self, node_id: str, contacts: tuple[str, ...]) -> str:
        """Which of a node's contact addresses this daemon uses first: its only one, or for a
        relayed node one of its relays by a hash of both ids, so that the clients of a relayed
        server spread over its relays instead of all taking the first (its relays' bandwidth
        budgets add up, and a relay's loss moves only its share)."""
        if len(contacts) == 1:
            return contacts[0]
        return contacts[zlib.crc32(f"{self.own_id}/{node_id}".encode()) % len(contacts)]

    def _index(self, wire: dict, node_id: str) -> None:
        if _signature(wire) is not None:
            self._sigs[wire["sig"]] = node_id

    def _forget(self, e: Entry) -> None:
        """Called with the lock held."""
        del self._entries[e.record.node_id]
        self._sigs.pop(_signature(e.wire) or "", None)

    def holds(self, wire: object) -> bool:
        """Whether `wire` is, byte for byte, the record held for its node: checked when it came,
        so that a peer sending it again (an honest one re-sends its own for a few rounds; a
        hostile one, as often as it may) costs no signature check."""
        sig = _signature(wire)
        with self._lock:
            e = self._entries.get(self._sigs.get(sig, "")) if sig is not None else None
            return e is not None and e.wire.get("sig") == sig and e.wire.get("body") == wire["body"]  # type: ignore[index]

    def _announce(self) -> None:
        """Wake those waiting for news (called with the lock held)."""
        self._version += 1
        self._news.notify_all()

    def version(self) -> int:
        """A counter of news (see wait_news)."""
        with self._lock:
            return self._version

    def wait_news(self, seen: int, timeout_s: float) -> None:
        """Wait until there is news since `seen` (a `version()` read before looking at the
        table), or for `timeout_s`."""
        with self._news:
            self._news.wait_for(lambda: self._version != seen, timeout=max(0.0, timeout_s))

    def merge_beat(self, beat: Beat) -> str:
        """Take a beat: "newer" (the node is alive: a suspicion is lifted), "old", "unknown" (no
        record of that incarnation here yet: its record must come first) or "bad" (signature)."""
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
            e.beat, e.beat_wire = beat.beat, beat.wire()
            self._alive(e, now)
            return "newer"

    def set_own_beat(self, node_id: str, beat: Beat) -> None:
        with self._lock:
            e = self._entries.get(node_id)
            if e is not None:
                e.beat, e.beat_wire, e.advanced_at = beat.beat, beat.wire(), time.monotonic()

    def _alive(self, e: Entry, now: float) -> None:
        """Evidence of life from the node itself. Called with the lock held."""
        if e.suspect_since is not None or e.doubt is not None:
            self._revision += 1  # it may be believed again
        if e.doubt is not None:
            e.cleared = max(e.cleared, e.doubt)  # that suspicion, heard again, is not checked again
        e.suspect_since, e.doubt, e.heard_at, e.last_seen = None, None, now, time.time()

    def heard_from(self, node_id: str | None) -> None:
        """A request from the node arrived (its CURVE key proves who sent it): it is alive,
        though this daemon may still fail to reach it (`unreachable` stays)."""
        if node_id is None:
            return
        with self._lock:
            e = self._entries.get(node_id)
            if e is not None and not e.is_self:
                self._alive(e, time.monotonic())

    def doubt(self, node_id: str, incarnation: int, beat: int, fresh_s: float) -> bool:
        """Another node suspects this node's `beat`: True when this daemon should check it
        (it believes the node, holds that beat or an older one, and has no evidence of life
        from the last `fresh_s`); the node is `suspect` here until the check settles it."""
        now = time.monotonic()
        with self._lock:
            e = self._entries.get(node_id)
            if (e is None or e.is_self or not e.verified or e.record.incarnation != incarnation or beat < e.beat
                    or beat <= e.cleared or e.unreachable or e.doubt is not None or now - e.heard_at < fresh_s
                    or e.record.state == "offline"):
                return False
            e.doubt = beat
            self._revision += 1
            return True

    def _evict_one(self, now: float) -> bool:
        """Room for a new node in a full table: forget the node that went longest without news
        among those this daemon never reached (a flood of made-up nodes cannot push out the
        nodes it talks to). Called with the lock held."""
        candidates = [e for e in self._entries.values() if not e.is_self and not e.verified]
        if not candidates:
            return False
        oldest = min(candidates, key=lambda e: e.advanced_at)
        self._forget(oldest)
        self._by_address = None
        self._revision += 1
        return True

    def observe(self, node_id: str, *, rtt_ms: float | None = None, unreachable: str | None = None,
                address: str | None = None) -> bool:
        """This daemon's own contact with a node (at `address`, if given): a round trip, or why it
        failed. Returns True when a failure makes a node it believed alive and reached suspect
        (news the swarm should hear)."""
        now = time.monotonic()
        with self._lock:
            e = self._entries.get(node_id)
            if e is None or e.is_self:
                return False
            was_reachable = e.unreachable is None
            if was_reachable != (unreachable is None) or (unreachable is None and not e.verified):
                self._revision += 1
            e.unreachable = unreachable
            if unreachable is None:
                if not was_reachable or (not e.verified and (address is None or address == e.address)):
                    self._announce()  # reached again, or for the first time: it may be routed to now
                if address is None or address == e.address:
                    if not e.verified:
                        self._by_address = None
                    e.verified = True
                self._alive(e, now)
                if rtt_ms is not None:
                    # the least of the last few: waiting in a busy peer's (or this daemon's)
                    # queue only ever adds to a round trip, and one slow contact must not
                    # turn routes away from a near server
                    e.rtt_recent = [*e.rtt_recent[-(RTT_WINDOW - 1):], rtt_ms]
                    e.rtt_ms = min(e.rtt_recent)
                return False
            if e.doubt is not None or e.suspect_since is None:
                self._revision += 1
            e.doubt = None
            # news only when a node that answered stops answering: one this daemon could never
            # reach, or that others found alive since, is not suspected over and over
            news = e.verified and was_reachable and e.suspect_since is None and e.record.state != "offline"
            if e.suspect_since is None:
                e.suspect_since = now
            return news

    def set_mismatch(self, node_id: str, reason: str | None) -> None:
        with self._lock:
            if node_id in self._entries:
                self._entries[node_id].mismatch = reason

    def set_distrust(self, node_id: str, reason: str, seconds: float) -> None:
        with self._lock:
            if node_id in self._entries:
                e = self._entries[node_id]
                e.distrust, e.distrust_until = reason, time.monotonic() + seconds

    def drop(self, keep) -> list[Record]:
        """Forget at once every node (but this one) whose key `keep(key)` refuses: a key removed
        from a private swarm's list must leave the table and every route now, not when it dies."""
        with self._lock:
            gone = [e for e in self._entries.values() if not e.is_self and not keep(e.record.node_id)]
            for e in gone:
                self._forget(e)
            if gone:
                self._by_address = None
                self._revision += 1
                self._announce()
        return [e.record for e in gone]

    def prune(self) -> list[Record]:
        """Forget nodes dead or offline for FORGET_AFTER_S; returns their records."""
        now = time.monotonic()
        dead_after = self.suspect_after_s() + FORGET_AFTER_S
        with self._lock:
            gone = [e for e in self._entries.values() if not e.is_self and (
                (e.suspect_since is not None and now - e.suspect_since > dead_after)
                or (e.record.state == "offline" and now - e.advanced_at > FORGET_AFTER_S))]
            for e in gone:
                self._forget(e)
            if gone:
                self._by_address = None
                self._revision += 1
        return [e.record for e in gone]

    # --- reading -------------------------------------------------------------------------------
    def get(self, node_id: str) -> Entry | None:
        with self._lock:
            return self._entries.get(node_id)

    def entries(self) -> list[Entry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: (not e.is_self, e.address))

    def sums(self, buckets: int) -> str:
        """Anti-entropy: for each of `buckets` buckets of node ids, a 32-bit sum of the versions
        this daemon holds and believes (see `routable`), as 8 hex digits each."""
        return self._view(buckets).sums

    def differing(self, sums: object, max_bytes: int) -> list[dict]:
        """Anti-entropy: the records this daemon believes in the buckets whose sums differ from
        the caller's `sums` (this daemon's own record first, then whole buckets in random
        order), within `max_bytes`; nothing for sums that are not well formed."""
        if (not isinstance(sums, str) or len(sums) not in (8 * SMALL_BUCKETS, 8 * LARGE_BUCKETS)
                or sums.strip("0123456789abcdef")):
            return []
        view = self._view(len(sums) // 8)
        ours = view.sums

        def differs(b: int) -> bool:
            return ours[8 * b:8 * b + 8] != sums[8 * b:8 * b + 8]
        order = [b for b in view.entries if differs(b)]
        random.shuffle(order)
        own = [view.own[1]] if view.own is not None and differs(view.own[0]) else []
        out, left = [], max_bytes
        for e in itertools.chain(own, (e for b in order for e in view.entries[b])):
            if left < view.smallest + 8:
                break  # no record fits any more
            if e.wire and e.wire_bytes + 8 <= left:
                out.append(e.wire)
                left -= e.wire_bytes + 8
        return out

    def _view(self, buckets: int) -> BucketView:
        """The table's sums and believed records by bucket, computed again only after a change
        or VIEW_MAX_AGE_S (a gossip request reads them on the serving thread)."""
        now = time.monotonic()
        with self._lock:
            view, revision = self._views.get(buckets), self._revision
        if view is not None and view.revision == revision and now - view.at < VIEW_MAX_AGE_S:
            return view
        acc = [0] * buckets
        by_bucket: dict[int, list[Entry]] = {}
        own = None
        for e in self.entries():
            if self.routable(e, now):
                b = _bucket(e.record.node_id, buckets)
                acc[b] ^= zlib.crc32(e.tag.encode())
                if e.is_self:
                    own = (b, e)
                else:
                    by_bucket.setdefault(b, []).append(e)
        smallest = min((e.wire_bytes for es in by_bucket.values() for e in es if e.wire), default=0)
        view = BucketView(revision, now, "".join(f"{x:08x}" for x in acc), by_bucket, own, smallest)
        with self._lock:
            self._views[buckets] = view
        return view

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
                    for a in e.record.contact_addresses:
                        listed.setdefault(a, e.record.node_id)
                self._by_address = {**listed, **used, **verified}
            return self._by_address.get(address)

    def protocol_for(self, address: str) -> str | None:
        """The protocol version in the record of the node at `address`, if known."""
        key = self.key_for(address)
        with self._lock:
            e = self._entries.get(key) if key is not None else None
            return e.record.protocol if e is not None else None

    def numerics(self, address: str) -> tuple[str, str]:
        """(quant, kv_dtype) of the server at `address` as its record says (unknown: unquantized)."""
        key = self.key_for(address)
        with self._lock:
            e = self._entries.get(key) if key is not None else None
        return (e.record.quant, e.record.kv_dtype) if e is not None else ("none", "auto")

    def claimed_step_s(self, address: str, tokens: int) -> float | None:
        """What a step of `tokens` positions through the whole span of the server at `address`
        takes by its record's claims (a one-token step, plus the positions at its large-forward
        rate); None when it claims no speed."""
        key = self.key_for(address)
        with self._lock:
            e = self._entries.get(key) if key is not None else None
        if e is None or e.record.throughput <= 0 or e.record.forward_throughput <= 0:
            return None
        return 1.0 / e.record.throughput + tokens / e.record.forward_throughput

    def servers_for(self, model_id: str, adapter: str | None = None) -> list[ServerSpan]:
        """Spans of the online servers of this model (hosting `adapter`, if given), for routing."""
        now = time.monotonic()
        out = []
        for e in self.entries():
            r = e.record
            if r.model_id != model_id or r.span is None or self.state(e, now) != "online":
                continue
            if not (e.verified or e.is_self):
                continue  # not reached by this daemon yet: it may be made up
            if self.key_for(e.address) != r.node_id:
                continue  # another node holds that address (a verified one, or an earlier claim)
            if adapter is not None and adapter not in r.adapters:
                continue
            if r.quantized and self.quantized == "refuse":
                continue
            block_s = 1.0 / (r.throughput * (r.span[1] - r.span[0])) if r.throughput > 0 else None
            rtt_s = 0.0 if e.is_self else (e.rtt_ms / 1000 if e.rtt_ms is not None else None)
            forward_block_s = (1.0 / (r.forward_throughput * (r.span[1] - r.span[0]))
                               if r.forward_throughput > 0 else None)
            # a server trading places serves the span it holds beside its own too (placement.py),
            # at the same speed per block: a route may use either, or both
            for start, end in (r.span, *((r.also,) if r.also else ())):
                out.append(ServerSpan(e.address, start, end, r.cache_free_bytes, block_s, rtt_s, forward_block_s,
                                      relayed=bool(r.via), penalty_s=QUANTIZED_PENALTY_S
                                      if r.quantized and self.quantized == "avoid" else 0.0))
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
            "also": list(r.also) if r.also else None,
            "capacity": r.capacity,
            "state": self.state(e),
            "throughput": r.throughput,
            "forward_throughput": r.forward_throughput,
            "bandwidth_mbps": r.bandwidth_mbps,
            "movable": r.movable,
            "adapters": list(r.adapters),
            "reachable": r.reachable,
            "relay": r.relay,
            "via": [short_id(rid) for rid, _ in r.via],
            "quant": r.quant,
            "kv_dtype": r.kv_dtype,
            "cache_free_bytes": r.cache_free_bytes,
            "sessions": r.sessions,
            "version": r.version,
            "protocol": r.protocol,
            "rtt_ms": e.rtt_ms,
            "last_seen_s_ago": round(time.time() - e.last_seen, 1),
            "error": e.unreachable or e.mismatch or (e.distrust if e.distrust_until > time.monotonic() else None),
            "is_self": e.is_self,
        }

    def rows(self) -> list[dict]:
        return [self.to_json(e) for e in self.entries()]


def _signature(wire: object) -> str | None:
    """A record's signature as it travels, if `wire` has the shape of one."""
    if isinstance(wire, dict) and isinstance(wire.get("sig"), str) and isinstance(wire.get("body"), str):
        return wire["sig"]
    return None


def _bucket(node_id: str, buckets: int) -> int:
    return zlib.crc32(node_id.encode()) % buckets
