"""Whom a gossip round contacts: the peers it gossips with (a fanout drawn at random, peers whose
retry time has come, bootstrap contacts not yet known), and the nodes it only pings (those
another node suspects, and those heard of but never reached).

Decided here, from the table and the backoff and contacts the caller passes in: how the fanout
is drawn so that made-up records cannot take the places of peers that answer, in which order a
refresh contacts everyone, and which checks come first. Nodes never reached are contacted only
within the round's quota (first_contacts.py); how many contacts a round opens in all is the
caller's cap (membership.py)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping

from swarmd.discovery.bootstrap import Hint
from swarmd.discovery.first_contacts import RoundQuota
from swarmd.discovery.table import PeerTable
from swarmd.transport.access import AccessControl

FANOUT = 3
MAX_RETRIES_PER_ROUND = 4
MAX_CHECKS_PER_ROUND = 32  # pings to nodes suspected by others, or heard of but not reached yet (first_contacts.py)

Target = tuple[str, str | None, str | None]  # (address, key, node id); no node id for a bootstrap contact


def gossip_targets(*, table: PeerTable, access: AccessControl, own_id: str, retry: Mapping[str, tuple[int, float]],
                   hints: list[Hint], skip: set[str] | frozenset[str], everyone: bool,
                   quota: RoundQuota) -> list[Target]:
    """(address, key, node id) to gossip with: FANOUT random live peers (all, with
    `everyone`), plus bootstrap contacts not already known as live nodes. Nodes never
    reached are contacted within `quota`. `retry`: node id -> (failures, monotonic time of
    its next try), for peers that failed."""
    now = time.monotonic()
    live: list[Target] = []
    kin: list[Target] = []  # of this daemon's model
    me = table.get(own_id)
    own_model = me.record.model_id if me is not None else None
    answered: set[str] = set()  # addresses of peers reached before
    due: list[tuple[float, Target]] = []  # failed before, retry time come
    known_addresses: set[str] = set()
    never_reached: set[str] = set()
    for e in table.entries():
        if e.is_self:
            continue
        if not e.verified:
            never_reached.add(e.record.node_id)
        state = table.state(e, now)
        if state not in ("dead", "offline"):
            known_addresses.update(e.record.addresses)
            if e.address not in skip and access.allows(e.record.node_id):
                target = (e.address, e.record.node_id, e.record.node_id)
                retry_at = retry.get(e.record.node_id)
                if retry_at is None:
                    live.append(target)
                    if e.record.model_id == own_model and own_model is not None and e.verified:
                        kin.append(target)
                    if e.verified:
                        answered.add(e.address)
                elif retry_at[1] <= now or everyone:
                    due.append((retry_at[1], target))
    # peers that fail (gone, or made up by a liar) do not take the fanout's places from
    # those that answer: they are retried with capped doubling backoff, a few per round
    # and of the FANOUT drawn at random, at most one may be a peer never reached (new, or
    # made up): the others give their places to peers that answered before, so a flood of
    # made-up records cannot cut this daemon off from the peers it gossips with. The draw
    # stays uniform, so a node that just joined is contacted by a few peers a round, not
    # by all of them at once
    if everyone:  # this model's servers first: a round contacts at most MAX_CONTACTS_PER_ROUND
        kin_set = set(kin)
        targets = kin + [t for t in live if t not in kin_set] + [t for _, t in sorted(due)]
    else:
        # one of the FANOUT is a peer of this daemon's own model that answered before: its
        # model's news, which matter most here, never wait on a draw among other models' nodes
        first = [random.choice(kin)] if kin else []
        rest = [t for t in live if t not in first]
        drawn = first + random.sample(rest, min(FANOUT - len(first), len(rest)))
        new = [t for t in drawn if t[0] not in answered]
        targets = [t for t in drawn if t[0] in answered] + new[:1]
        spare = [t for t in live if t[0] in answered and t not in targets]
        fill = random.sample(spare, min(len(new) - 1, len(spare))) if len(new) > 1 else []
        targets += fill + new[1:len(new) - len(fill)]  # no such peers to give: keep the drawn
        targets += [t for _, t in sorted(due)[:MAX_RETRIES_PER_ROUND]]
    targets = [t for t in targets if t[2] is None or t[2] not in never_reached or quota.take(t[2])]
    me = table.get(own_id)
    not_hints = known_addresses | set(me.record.addresses if me else []) | set(skip)
    for h in sorted(hints, key=lambda h: h.next_try):  # longest due first: a round takes only so many
        if h.address in not_hints or h.key == own_id:
            continue
        if h.next_try <= now or everyone:
            targets.append((h.address, h.key, None))
    return targets


def checks_due(*, table: PeerTable, access: AccessControl, heard_as_news: Callable[[str], bool], contacted: set[str],
               quota: RoundQuota, news_only: bool = False) -> list[tuple[str, str]]:
    """(address, node id) to ping this round: nodes another node suspects, then nodes heard
    of as news, then (unless `news_only`) others not reached yet, within `quota`; none at
    the `contacted` addresses."""
    now = time.monotonic()
    doubted: list[tuple[str, str]] = []
    heard: list[tuple[str, str]] = []
    others: list[tuple[str, str]] = []
    for e in table.entries():
        if e.is_self or e.address in contacted or e.unreachable or table.state(e, now) in ("dead", "offline"):
            continue
        node_id = e.record.node_id
        if e.doubt is not None:
            doubted.append((e.address, node_id))
        elif not e.verified and access.allows(node_id):
            (heard if heard_as_news(node_id) else others).append((e.address, node_id))
    random.shuffle(others)
    checks = doubted[:MAX_CHECKS_PER_ROUND]
    for address, node_id in heard + ([] if news_only else others):
        if len(checks) >= MAX_CHECKS_PER_ROUND:
            break
        if quota.take(node_id):
            checks.append((address, node_id))
    return checks
