"""Membership: bootstrap from seeds and mDNS, then gossip signed records until every daemon
holds the same table, and find dead nodes by probing (SWIM), not by relaying heartbeats.

Each round (GOSSIP_INTERVAL_S), a daemon re-signs its record only if what it says has changed
(at once for its state, span, addresses or adapters; loads and measurements at most every
`body_refresh_s()`, which grows with the swarm so that the whole swarm's news stays within a
few records a second) and sends `gossip` to FANOUT random peers, to peers whose retry time has
come, and to any bootstrap contact not yet known. A request carries the tags of the news the
caller passes on (`news`), its own record while it is news, its suspicions, and now and then
its table's bucket sums (`sums`, anti-entropy); the reply carries the callee's news that the
caller's tags lack, and with `sums` the records of the buckets that differ. So a round costs in
proportion to what changed, and pull plus push spreads news to n daemons in about log2(n)
rounds.

News is a record this daemon believes (it reached the node itself), a suspicion this daemon's
own contact confirmed, or a beat that lifts a suspicion; each is passed on for `hot_rounds()`.
A contact that fails makes the peer suspect here and the suspicion news; a daemon hearing it
checks the peer itself before it passes it on, and a suspected node that hears of it refutes
with a new signed beat. A suspicion not lifted in `suspect_after_s()` makes the node dead.

Whom a round contacts is targets.py's choice; nodes heard of but never reached are contacted
within a quota a round (first_contacts.py): made-up records cannot turn a daemon into a
scanner. How news is named, held and packed into a message is news.py's; the seed and mDNS
contacts and their backoff are bootstrap.py's.

A record is accepted only when verified (records.py), its key is allowed (private swarms),
and it is newer than the one held; a beat only when signed by the key of the record held. Bad
records are logged once per sender and reason. Gateway-only daemons pull, and publish nothing."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable

from libswarm import __version__
from libswarm.errors import SwarmError
from libswarm.protocol import PROTOCOL_VERSION, registry
from swarmd.config import Seed
from swarmd.discovery.bootstrap import BootstrapContacts, Hint
from swarmd.discovery.first_contacts import Origins, RoundQuota
from swarmd.discovery.keyquery import query_keys
from swarmd.discovery.news import MAX_NEWS, News
from swarmd.discovery.records import MAX_RTTS, Beat, Record, RecordError, decode_beat, decode_record
from swarmd.discovery.table import LARGE_BUCKETS, MAX_NODES, MAX_REPLY_BYTES, SMALL_BUCKETS, PeerTable
from swarmd.discovery.targets import MAX_CHECKS_PER_ROUND, Target, checks_due, gossip_targets
from swarmd.identity import NodeIdentity, is_key, short_id
from swarmd.logs import LineBudget
from swarmd.transport.access import AccessControl
from swarmd.transport.connection import ConnectionPool, NoAnswerInTime

log = logging.getLogger("swarmd.discovery")

GOSSIP_TIMEOUT_S = 1.0
MAX_GOSSIP_RECORDS = 4096  # records taken from one reply
# records, beats and suspicions taken from one request: an honest caller sends its own and a
# few suspicions, and requests are handled on the serving thread, so a flood of signed records
# must not stall decode steps
MAX_REQUEST_RECORDS = 8
MAX_REQUEST_BEATS = 8
MAX_SUSPECTS = 16
MAX_REPLY_BEATS = 4096
AE_EVERY_ROUNDS = 10  # anti-entropy with one peer this often (every round while catching up)
BODY_REFRESH_S = 10.0  # loads and measurements (cache free, sessions, round trips) go out this often at most
BODY_REFRESH_PER_NODE_S = 0.5  # ... and no more often than this times the swarm's size
BODY_PUSH_ROUNDS = 5  # a new record rides on this many of the node's own requests
FRESH_ROUNDS = 2  # a node heard from this recently is not checked on another's suspicion
PEER_RETRY_MAX_S = 30.0  # a peer that failed is retried after 1, 2, 4 ... s, at most this far apart
# peers a round (or a leave) contacts at most, checks included: a refresh in a swarm of
# thousands, or a seed list of hundreds, opens this many connections at once, not one each;
# the rest wait for the next rounds (the daemon's pool keeps twice this many per thread)
MAX_CONTACTS_PER_ROUND = 128
# What a record says that is news at once; the rest (loads, measurements) waits for body_refresh_s().
STABLE_FIELDS = ("addresses", "state", "model_id", "span", "also", "capacity", "fingerprints", "movable", "adapters",
                 "reachable", "relay", "via")
FINGERPRINT_PREFIX = 16  # hex characters of each block's fingerprint carried in records
BANDWIDTH_PROBE_INTERVAL_S = 30.0  # how often the bandwidth to one random peer is measured
BANDWIDTH_PROBE_BYTES = 256 * 1024


class Membership:
    def __init__(self, *, identity: NodeIdentity, pool: ConnectionPool, table: PeerTable, access: AccessControl,
                 own_fields: Callable[[], dict | None], expected_fingerprint: Callable[[str | None, int], str | None],
                 incarnation: int | None = None):
        self.identity, self.pool, self.table, self.access = identity, pool, table, access
        # grows with every start (the daemon keeps it in state_dir): orders this node's news
        self.incarnation = int(time.time()) if incarnation is None else incarnation
        self._beat = 0  # grows only to refute a suspicion of this node
        self._refuted_round = -1
        self._body_at = -1e9  # monotonic time of the last re-signed record
        self._body_round = -BODY_PUSH_ROUNDS  # the round it was made in
        self._rounds = 0
        self._retry: dict[str, tuple[int, float]] = {}  # node id -> (failures, monotonic time of next try)
        self.own_fields, self.expected_fingerprint = own_fields, expected_fingerprint
        self.contacts = BootstrapContacts()
        self.rejected = 0  # records refused (bad signature, forged, from the future, not allowed...)
        self._seq = 0
        self._lock = threading.RLock()  # one round (or publish) at a time: versions never collide
        # refreshes asked by several threads at once share one round (see refresh)
        self._refresh = threading.Condition()
        self._refreshing, self._refreshes = False, 0
        self._left = False  # offline published (stopping): every later record says offline too
        self._logged: set[tuple[str, str]] = set()
        # distinct reasons are each logged once, but a peer can vary them: 20 lines per source and
        # 200 in all per 10 s
        self._lines = LineBudget(20, 10.0, 200)
        self._states: dict[str, str] = {}
        self.bandwidth_bps: float | None = None  # the best recently measured to a peer, bytes/s
        self._next_probe = 0.0
        self.hot_news = News()  # what this daemon passes on, and the news it holds back until believed
        self._beat_lock = threading.Lock()
        self.origins = Origins()  # who told this daemon of nodes it has not reached: their contacts' quota
        self._catching_up = True  # the last anti-entropy exchange brought records: another one next round
        self._ae_phase = random.randrange(AE_EVERY_ROUNDS)

    @property
    def interval_s(self) -> float:
        """One gossip round: the table's, so that sending and judging liveness agree."""
        return self.table.gossip_interval_s

    # --- bootstrap contacts --------------------------------------------------------------------
    @property
    def hints(self) -> dict[str, Hint]:
        """The bootstrap contacts by address (bootstrap.py)."""
        return self.contacts.hints

    def set_seeds(self, seeds: list[Seed]) -> None:
        self.contacts.set_seeds(seeds)

    def add_hint(self, address: str, key: str | None, source: str) -> None:
        self.contacts.add(address, key, source)

    def retry_contacts_now(self) -> None:
        """Forget the backoff of failed contacts (this daemon's peer plane just came up: seeds
        tried while it was loading deserve a prompt second try)."""
        self.contacts.retry_now()

    def key_for(self, address: str) -> str | None:
        """Node id answering at `address`: from the table first, then bootstrap contacts."""
        key = self.table.key_for(address)
        if key is None:
            key = self.contacts.key_at(address)
        return key

    # --- own record ----------------------------------------------------------------------------
    def publish(self, state: str | None = None) -> Record | None:
        """A new beat, and a new record when what it says has changed (see the module's doc);
        returns the record in force (None for a node that serves nothing)."""
        with self._lock:
            return self._publish(state)

    def body_refresh_s(self) -> float:
        """How long loads and measurements wait before they are re-signed: BODY_REFRESH_S, and
        longer in large swarms, where each node's news costs every node its bytes."""
        return max(BODY_REFRESH_S, BODY_REFRESH_PER_NODE_S * len(self.table.entries()))

    def _publish(self, state: str | None) -> Record | None:
        fields = self.own_fields()
        if fields is None:
            return None
        if self._left:
            state = "offline"  # a round after leave() must not announce this node online again
        if state is not None:
            fields["state"] = state
        own = self.table.get(self.identity.public_key)
        now = time.monotonic()
        stable_changed = own is None or any(
            _wire_value(getattr(own.record, k)) != _wire_value(fields.get(k, getattr(own.record, k)))
            for k in STABLE_FIELDS)
        if stable_changed or now - self._body_at >= self.body_refresh_s():
            self._seq += 1
            rtts = sorted((e.rtt_ms, e.record.short_id) for e in self.table.entries()
                           if not e.is_self and e.rtt_ms is not None)[:MAX_RTTS]
            record = Record(node_id=self.identity.public_key, sign_key=self.identity.sign_key, timestamp=time.time(),
                            seq=self._seq, incarnation=self.incarnation, version=__version__,
                            protocol=PROTOCOL_VERSION, rtt_ms={short: round(ms, 3) for ms, short in rtts},
                            bandwidth_mbps=round(self.bandwidth_bps * 8 / 1e6, 1) if self.bandwidth_bps else 0.0,
                            **fields)
            wire = record.sign(self.identity)
            self.table.merge(record, wire, is_self=True)
            self._body_at, self._body_round = now, self._rounds
            self._make_hot("record", wire)
        own = self.table.get(self.identity.public_key)
        return own.record if own is not None else None

    def _refute(self, beat: int) -> None:
        """Another node suspects this node's `beat`: a newer one, signed, says it is alive."""
        with self._beat_lock:  # not the round's lock: this runs on the serving thread
            if beat < self._beat or self._refuted_round == self._rounds:
                return  # refuted already (at most once a round: suspicions can be made up at will)
            self._beat = beat + 1
            self._refuted_round = self._rounds
            wire = Beat.signed(self.identity, self.incarnation, self._beat)
            self.table.set_own_beat(self.identity.public_key, decode_beat(wire))
            self._make_hot("beat", wire)

    # --- news --------------------------------------------------------------------------------
    def _make_hot(self, kind: str, wire: object) -> None:
        """`wire` is news from this round on (news.py)."""
        self.hot_news.add(kind, wire, self._rounds)

    def news(self, known: set[str] | frozenset[str] = frozenset(),
             max_bytes: int = MAX_REPLY_BYTES) -> dict[str, list]:
        """The news this daemon passes on that `known` (a caller's tags) lacks, within
        `max_bytes`: suspicions first, then beats, then records, each in random order."""
        return self.hot_news.pick(known, max_bytes)

    def news_tags(self) -> list[str]:
        return self.hot_news.tags()

    # --- receiving -----------------------------------------------------------------------------
    def receive(self, wires: object, source: str, via_key: str | None = None, via: str | None = None,
                limit: int = MAX_GOSSIP_RECORDS, news: bool = True) -> int:
        """Merge records from a peer; returns how many were new or newer. `news`: they came as
        news (not from anti-entropy), and are passed on once this daemon has reached their node."""
        if not isinstance(wires, list):
            self._log_once(source, "sent records that are not a list")
            return 0
        if len(wires) > limit:
            self._log_once(source, f"sent {len(wires)} records, more than the {limit} taken")
        changed = 0
        for wire in wires[:limit]:
            if via is None and self.table.holds(wire):
                continue  # the very record held here: nothing to check, nothing new (`via` may verify its node)
            try:
                record = decode_record(wire)
            except RecordError as e:
                self.rejected += 1
                self._log_once(source, str(e))
                continue
            wire = {"body": wire["body"], "sig": wire["sig"]}  # only what is signed is kept and relayed
            if record.node_id == self.identity.public_key:
                continue  # only this daemon speaks for itself
            if not self.access.allows(record.node_id):
                self.rejected += 1
                self._log_once(source, f"record of {record.short_id}, whose key is not allowed in this private swarm")
                continue
            result = self.table.merge(record, wire, via=via if record.node_id == via_key else None)
            entry = self.table.get(record.node_id)
            if entry is not None and not entry.verified:
                self.origins.told(record.node_id, source)
            if result == "full":
                self._log_once(source, f"record of {record.short_id}: the peer table is full")
            elif result != "old":
                changed += 1
                self.table.set_mismatch(record.node_id, self._weights_mismatch(record))
                if news and entry is not None:
                    if entry.verified:
                        self._make_hot("record", wire)
                    else:
                        self.hot_news.hold(record.node_id, self._rounds)
                if result == "new":
                    log.info("peer %s joined: %s, %s", record.short_id, record.addresses[0],
                             f"blocks {record.span[0]}:{record.span[1]}" if record.span else "no blocks")
        return changed

    def receive_beats(self, wires: object, source: str, limit: int = MAX_REPLY_BEATS) -> int:
        """Merge beats from a peer; returns how many were newer. A beat that lifts a suspicion
        held here is passed on; others are news to nobody."""
        if not isinstance(wires, list):
            self._log_once(source, "sent beats that are not a list")
            return 0
        newer = 0
        for wire in wires[:limit]:
            try:
                beat = decode_beat(wire)
            except RecordError as e:
                self.rejected += 1
                self._log_once(source, str(e))
                continue
            if beat.node_id == self.identity.public_key:
                continue
            held = self.table.get(beat.node_id)
            doubted = held is not None and (held.suspect_since is not None or held.doubt is not None)
            result = self.table.merge_beat(beat)
            if result == "bad":
                self.rejected += 1
                self._log_once(source, f"beat of {short_id(beat.node_id)}: bad signature")
            elif result == "newer":
                newer += 1
                if doubted:
                    self._make_hot("beat", beat.wire())
        return newer

    def receive_suspects(self, items: object, source: str, limit: int = MAX_SUSPECTS) -> int:
        """Another node could not reach these nodes ([node id, incarnation, beat] each): each
        is checked here before this daemon passes the suspicion on; one of this node itself is
        refuted. Returns how many are to be checked."""
        if not isinstance(items, list):
            self._log_once(source, "sent suspicions that are not a list")
            return 0
        checks = 0
        for item in items[:limit]:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and is_key(item[0])
                    and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**53 for x in item[1:])):
                self._log_once(source, "sent a malformed suspicion")
                continue
            node_id, inc, beat = item
            if node_id == self.identity.public_key:
                if inc == self.incarnation:
                    self._refute(beat)
            elif self.table.doubt(node_id, inc, beat, fresh_s=FRESH_ROUNDS * self.interval_s):
                checks += 1
        return checks

    def _weights_mismatch(self, r: Record) -> str | None:
        """Why a peer's weights differ from this daemon's checkpoint, or None (also when this
        daemon cannot tell: it lacks those blocks, or the record has no fingerprints)."""
        if r.span is None or len(r.fingerprints) != r.span[1] - r.span[0]:
            return None
        for block, theirs in zip(range(*r.span), r.fingerprints):
            ours = self.expected_fingerprint(r.model_id, block)
            if ours is not None and theirs != ours[:FINGERPRINT_PREFIX]:
                reason = f"weights of block {block} differ from this daemon's checkpoint (same config, other weights)"
                self._log_once(r.short_id, reason + "; it will not be routed to", level=logging.WARNING)
                return reason
        return None

    def _log_once(self, source: str, reason: str, level: int = logging.WARNING) -> None:
        if (source, reason) not in self._logged:
            if len(self._logged) > 10_000:
                self._logged.clear()
            self._logged.add((source, reason))
            if self._lines.take(source):
                log.log(level, "from %s: %s; ignored", source, reason)

    def on_gossip(self, req: registry.Gossip, sender: str | None = None) -> tuple[dict, None]:
        """The peer-plane handler: merge what the caller sent, answer the news its tags lack
        and, for anti-entropy `sums`, the records of the buckets that differ. `sender`: the
        caller's key (its CURVE handshake proves it): a request is evidence of its life."""
        self.table.heard_from(sender)
        source = f"a gossip request of {short_id(sender)}" if sender else "a gossip request"
        # each value is checked where it is read (anything but a list of what is expected is dropped)
        self.receive(req.records if req.records is not None else [], source=source, limit=MAX_REQUEST_RECORDS)
        self.receive_beats(req.beats if req.beats is not None else [], source=source, limit=MAX_REQUEST_BEATS)
        self.receive_suspects(req.suspects if req.suspects is not None else [], source=source)
        known = {t for t in req.news[:MAX_NEWS] if isinstance(t, str)} if isinstance(req.news, list) else set()
        reply: dict = self.news(known)
        if req.sums is not None:
            left = MAX_REPLY_BYTES - len(json.dumps(reply))
            reply["table"] = self.table.differing(req.sums, left)
        return reply, None

    # --- gossip rounds -------------------------------------------------------------------------
    def _targets(self, skip: set[str] | frozenset[str], everyone: bool, quota: RoundQuota) -> list[Target]:
        """(address, key, node id) to gossip with this round (targets.py)."""
        return gossip_targets(table=self.table, access=self.access, own_id=self.identity.public_key,
                              retry=self._retry, hints=self.contacts.all(), skip=skip, everyone=everyone, quota=quota)

    def _checks(self, contacted: set[str], quota: RoundQuota, news_only: bool = False) -> list[tuple[str, str]]:
        """(address, node id) to ping this round (targets.py)."""
        return checks_due(table=self.table, access=self.access, heard_as_news=self.hot_news.is_held,
                          contacted=contacted, quota=quota, news_only=news_only)

    def _ping(self, checks: list[tuple[str, str]]) -> None:
        """Ping each (address, node id) at once, and wait for the answers (GOSSIP_TIMEOUT_S)."""
        pending = []
        opened = []
        for address, node_id in checks:
            try:
                opened.append((address, node_id, self.pool.get(address, node_id)))
            except SwarmError as e:
                self._contact_failed(address, node_id, str(e))
        connect_by = time.monotonic() + GOSSIP_TIMEOUT_S  # one wait for every connection being made
        for address, node_id, conn in opened:
            try:
                pending.append((address, node_id, conn, conn.send("ping", {}, timeout_s=GOSSIP_TIMEOUT_S,
                                                                  connect_by=connect_by), time.monotonic()))
            except SwarmError as e:
                self._contact_failed(address, node_id, str(e))
        deadline = time.monotonic() + GOSSIP_TIMEOUT_S
        for address, node_id, conn, req_id, t0 in pending:
            try:
                conn.receive(req_id, deadline, "ping")
            except SwarmError as e:
                self._contact_failed(address, node_id, str(e), timed_out=isinstance(e, NoAnswerInTime))
                continue
            self._contact_ok(address, node_id, (time.monotonic() - t0) * 1000)

    def round(self, skip: set[str] | frozenset[str] = frozenset(), everyone: bool = False) -> None:
        with self._lock:
            self._rounds += 1
            self.hot_news.expire(self._rounds, self.table.hot_rounds())
            self.publish()
            own = self.table.get(self.identity.public_key)
            recent = own is not None and self._rounds - self._body_round < BODY_PUSH_ROUNDS
            news = self.news(max_bytes=MAX_REPLY_BYTES // 4)
            fields: dict = {"news": self.news_tags(), "records": [own.wire] if recent and own else [],
                            "beats": [own.beat_wire] if own and own.beat_wire and self._rounds - self._refuted_round
                            < self.table.hot_rounds() else [], "suspects": news["suspects"]}
            quota = RoundQuota(self.origins)  # this round's first contacts: made-up records cost few
            targets = self._targets(skip, everyone, quota)[:MAX_CONTACTS_PER_ROUND]
            peers = sum(1 for e in self.table.entries() if not e.is_self)
            ae_all = self._catching_up or peers < 2  # a table still filling: ask everyone contacted
            ae_one = self._rounds % AE_EVERY_ROUNDS == self._ae_phase
            # the table's sums cost a pass over every record: only for a round that sends them
            sums = self.table.sums(LARGE_BUCKETS if peers >= LARGE_BUCKETS else SMALL_BUCKETS) \
                if ae_all or ae_one else None
            pending = []
            opened = []  # every connection is started first, then they share one wait to come up:
            # nodes that never finish a handshake (records naming blackholed addresses) cost a round
            # one GOSSIP_TIMEOUT_S, not one each; likewise the key queries of contacts given
            # without a key (seeds), which used to wait half a second each, one after another
            learnt = query_keys([address for address, key, _ in targets if key is None])
            for address, key, node_id in targets:
                try:
                    if key is None:
                        key = learnt[address]
                        if key is None:
                            raise SwarmError("does not answer the key query (no swarmd there, or UDP blocked)")
                        self.add_hint(address, key, self.contacts.source_of(address))
                    if not self.access.allows(key):
                        raise SwarmError(f"its key {short_id(key)} is not allowed in this private swarm")
                    opened.append(("gossip", address, key, node_id, self.pool.get(address, key)))
                except SwarmError as e:
                    self._contact_failed(address, node_id, str(e))
            contacted = {t[0] for t in targets}
            checks = self._checks(contacted, quota)[:MAX_CONTACTS_PER_ROUND - len(targets)]
            for address, node_id in checks:
                try:
                    opened.append(("ping", address, node_id, node_id, self.pool.get(address, node_id)))
                except SwarmError as e:
                    self._contact_failed(address, node_id, str(e))
            connect_by = time.monotonic() + GOSSIP_TIMEOUT_S
            for what, address, key, node_id, conn in opened:
                try:
                    if what == "gossip":
                        ae = ae_all or ae_one
                        ae_one = ae_one and not ae
                        req_id = conn.send("gossip", {**fields, "sums": sums} if ae else fields,
                                           timeout_s=GOSSIP_TIMEOUT_S, connect_by=connect_by)
                    else:
                        req_id = conn.send("ping", {}, timeout_s=GOSSIP_TIMEOUT_S, connect_by=connect_by)
                    pending.append((what, address, key, node_id, conn, req_id, time.monotonic()))
                except SwarmError as e:
                    self._contact_failed(address, node_id, str(e))
            deadline = time.monotonic() + GOSSIP_TIMEOUT_S
            caught_up = True
            for what, address, key, node_id, conn, req_id, t0 in pending:
                try:
                    reply = conn.receive(req_id, deadline, what)
                except SwarmError as e:
                    self._contact_failed(address, node_id, str(e), timed_out=isinstance(e, NoAnswerInTime))
                    continue
                rtt_ms = (time.monotonic() - t0) * 1000
                if what == "gossip":
                    self.receive(reply.get("records", []), source=address, via_key=key, via=address)
                    if self.receive(reply.get("table", []), source=address, via_key=key, via=address, news=False):
                        caught_up = False
                    self.receive_beats(reply.get("beats", []), source=address)
                    self.receive_suspects(reply.get("suspects", []), source=address)
                self._contact_ok(address, key, rtt_ms)
            self._catching_up = not caught_up
            # news and suspicions these replies brought are checked now, not a round later: each
            # hop of an epidemic would otherwise cost a round
            contacted |= {a for a, _ in checks}
            more = self._checks(contacted, quota, news_only=True)[:MAX_CHECKS_PER_ROUND - len(checks)]
            if more:
                self._ping(more)
            gossiped = [p for p in pending if p[0] == "gossip"]
            if gossiped and time.monotonic() >= self._next_probe:
                self._probe_bandwidth(gossiped[0][1], gossiped[0][2])
            self._log_transitions()
            self.table.prune()

    def _probe_bandwidth(self, address: str, key: str) -> None:
        """Time a ping carrying BANDWIDTH_PROBE_BYTES against an empty one to the same peer."""
        import torch

        self._next_probe = time.monotonic() + BANDWIDTH_PROBE_INTERVAL_S
        try:
            conn = self.pool.get(address, key)
            t0 = time.monotonic()
            conn.request("ping", timeout_s=GOSSIP_TIMEOUT_S)
            t1 = time.monotonic()
            conn.request("ping", {}, {"payload": torch.zeros(BANDWIDTH_PROBE_BYTES // 4)}, timeout_s=5.0)
            t2 = time.monotonic()
        except SwarmError:
            return
        extra_s = (t2 - t1) - (t1 - t0)
        if extra_s <= 0:  # noise: try again next round
            self._next_probe = time.monotonic()
        else:
            bps = BANDWIDTH_PROBE_BYTES / extra_s
            # the best path seen lately: one slow peer should not make this node look slow
            self.bandwidth_bps = bps if self.bandwidth_bps is None else max(bps, 0.5 * self.bandwidth_bps)

    def _contact_ok(self, address: str, node_id: str | None = None, rtt_ms: float | None = None) -> None:
        self._retry.pop(node_id or "", None)
        if node_id is not None:
            self.table.observe(node_id, rtt_ms=rtt_ms, unreachable=None, address=address)
            e = self.table.get(node_id)
            if e is not None and e.verified and self.hot_news.release(node_id):
                self._make_hot("record", e.wire)  # news heard before: believed now, so passed on
        self.contacts.answered(address)

    def _contact_failed(self, address: str, node_id: str | None, error: str, timed_out: bool = False) -> None:
        if timed_out and node_id is not None and node_id not in self._retry:
            e = self.table.get(node_id)
            if e is not None and e.verified and e.unreachable is None:
                # one unanswered request from a node that answered the one before (its connection
                # held): a lost message as likely as a dead node. It is asked again next round; a
                # second one in a row makes it suspect. A node that died closes its connection
                # and refuses new ones: that failure, not a timeout, counts at once
                self._retry[node_id] = (0, time.monotonic())
                log.debug("peer %s: %s; asking again before suspecting it", short_id(node_id), error)
                return
        self.pool.drop(address)
        if node_id is not None:
            e = self.table.get(node_id)
            if self.table.observe(node_id, unreachable=error) and e is not None:
                self._make_hot("suspect", [node_id, e.record.incarnation, e.beat])
            failures = self._retry.get(node_id, (0, 0.0))[0] + 1
            if len(self._retry) > 4 * MAX_NODES:
                self._retry.clear()
            self._retry[node_id] = (failures, time.monotonic() + min(self.interval_s * 2 ** (failures - 1),
                                                                      PEER_RETRY_MAX_S))
        self.contacts.failed(address, error, self.interval_s)

    def _log_transitions(self) -> None:
        states = {}
        for e in self.table.entries():
            if e.is_self:
                continue
            state = self.table.state(e)
            before = self._states.get(e.record.node_id)
            if before is not None and before != state and state in ("dead", "offline", "unreachable", "online"):
                log.info("peer %s (%s): %s -> %s", e.record.short_id, e.address, before, state)
            states[e.record.node_id] = state
        self._states = states  # only the table's nodes: the ids of evicted records are not kept

    def refresh(self, skip: set[str] | frozenset[str] = frozenset()) -> None:
        """A round with every known peer and contact now (the gateway found no route). Apps'
        requests waiting for a route each ask for one: a refresh asked while another runs
        waits for that one instead of queueing a round of its own behind it (rounds take the
        round lock one at a time, up to a second each, and waiters would pile up past their
        deadlines)."""
        with self._refresh:
            if self._refreshing:
                started = self._refreshes
                while self._refreshing and self._refreshes == started:
                    self._refresh.wait()
                return
            self._refreshing = True
        try:
            self.round(skip=set(skip), everyone=True)
        finally:
            with self._refresh:
                self._refreshing = False
                self._refreshes += 1
                self._refresh.notify_all()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                self.round()
            except Exception:
                log.exception("gossip round failed")
            stop.wait(max(0.05, self.interval_s - (time.monotonic() - t0)))

    def leave(self, timeout_s: float = 1.0) -> None:
        """Publish `offline` to every live peer before stopping (best effort, bounded)."""
        self._left = True
        if self.publish(state="offline") is None:
            return
        own = self.table.get(self.identity.public_key)
        assert own is not None
        fields = {"records": [own.wire], "news": self.news_tags()}
        deadline = time.monotonic() + timeout_s
        sent = []
        for address, key, _ in self._targets(set(), True, RoundQuota(self.origins))[:MAX_CONTACTS_PER_ROUND]:
            if key is None or time.monotonic() > deadline:
                continue
            try:
                conn = self.pool.get(address, key)
                sent.append((conn, conn.send("gossip", fields, timeout_s=max(0.05, deadline - time.monotonic()))))
            except SwarmError:
                continue
        for conn, req_id in sent:
            try:
                conn.receive(req_id, deadline, "gossip")
            except SwarmError:
                pass

    def rows(self) -> list[dict]:
        """swarmctl peers: every node in the table, then bootstrap contacts not (yet) answering."""
        rows = self.table.rows()
        return rows + self.contacts.rows({a for r in rows for a in r["addresses"]})


def _wire_value(value: object) -> object:
    """A record field as it is compared for changes (tuples and lists alike)."""
    return list(value) if isinstance(value, tuple) else value
