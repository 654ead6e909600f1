"""How many addresses never reached a gossip round may contact, and for whom.

A record is believed only once this daemon has reached its node at its address (table.py);
until then, checking it costs a connection to whatever address the record names. Anyone may
sign records of made-up nodes, so a liar could make every daemon it gossips with open 32
connections a round (and a refresh, one per record) to addresses of its choosing: the swarm
as a scanner, or as a flood aimed at someone else's host. So each round contacts at most
PER_ROUND addresses never reached (checks, gossip with nodes not reached yet, refreshes and
leaves alike), and at most PER_ORIGIN of the nodes that one peer alone told this daemon of
(the key whose request carried their records, or the peer whose reply did). A lone liar's
records then cost each daemon PER_ORIGIN connections a round, and the swarm's real news,
which every peer soon tells, is not held up behind them. Liars with several keys telling
the same records get PER_ROUND a round at most. A made-up address that fails is tried again
only on the capped doubling backoff of failed peers (membership.py), within the same quota.

Bootstrap pays a little: a daemon that hears of the whole swarm from one seed reaches
PER_ORIGIN of those nodes a round until a second peer has told it of the rest (soon: while
its table fills it asks every peer it gossips with for the records it lacks). Simulated
(tests/unit/test_gossip_spread.py), 32 daemons that know only the first converge in 6
rounds instead of 2, 128 in 12 instead of 7."""

from __future__ import annotations

from collections import Counter

PER_ROUND = 16  # half the 32 checks a round used to make: a round's connections wait together anyway
PER_ORIGIN = 4  # a lone teller's share: enough for an honest peer's news of a few joiners a round
MAX_ORIGINS = 40_000  # nodes whose tellers are remembered (4x the table's MAX_NODES); then forgotten at once


class Origins:
    """Who told this daemon of each node it has not reached: the first two tellers (written by
    the serving thread, read by the gossip round: single dict operations, which the GIL keeps
    whole)."""

    def __init__(self) -> None:
        self._tellers: dict[str, tuple[str, ...]] = {}

    def told(self, node_id: str, teller: str) -> None:
        tellers = self._tellers.get(node_id, ())
        if teller in tellers or len(tellers) >= 2:
            return
        if len(self._tellers) >= MAX_ORIGINS:
            self._tellers = {}  # a flood of node ids: attribution restarts (all share one quota meanwhile)
        self._tellers[node_id] = (*tellers, teller)

    def of(self, node_id: str) -> str | None:
        """The one peer that told of `node_id`, or None when two did: a record every peer holds,
        as a real node's soon is, spreads from several; only its tellers know a made-up one."""
        tellers = self._tellers.get(node_id, ("",))
        return tellers[0] if len(tellers) == 1 else None


class RoundQuota:
    """The first contacts one round may still make: PER_ROUND in all, PER_ORIGIN of the nodes
    that one peer alone told of."""

    def __init__(self, origins: Origins, per_round: int = PER_ROUND, per_origin: int = PER_ORIGIN):
        self.origins, self.per_round, self.per_origin = origins, per_round, per_origin
        self._taken: Counter[str | None] = Counter()

    def take(self, node_id: str) -> bool:
        """Whether a first contact with `node_id` may go this round (and count it if so)."""
        origin = self.origins.of(node_id)
        if sum(self._taken.values()) >= self.per_round:
            return False
        if origin is not None and self._taken[origin] >= self.per_origin:
            return False
        self._taken[origin] += 1
        return True
