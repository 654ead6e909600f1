"""What one peer key may hold or ask of a server: sessions, a share of the KV cache, requests
per second, gossip requests per second; and the share of the serving thread's time that
gossip may take over all keys (GossipTime). Keys are what CURVE proves, so one gateway or
server is one key; a hostile peer can make many keys, but each must complete a handshake, and
each new key starts with the same small allowance as everyone else.

Keys cost nothing, so a share per key alone let two keys at a share of 0.5 reserve the whole
KV cache, with `open`s alone. Hence two more rules for the cache:
- a session that has held no position for serve.limits.unused_session_timeout_s since it was
  opened is closed (server.py, expire_idle): a reservation must be used, a step at least;
- in an open swarm, the keys connecting from one internet network (a /24, a /48) share one
  key's share (`shared_network`): more keys need more networks, which cost. Private
  addresses (a site's own machines, loopback) are not grouped: a lab's gateways share a /24
  and each is its own operator's; nor are requests that come through a relay (the server
  cannot see where they come from), nor any in a private swarm, where every key is listed."""

from __future__ import annotations

import time
from collections import OrderedDict

from libswarm.errors import LimitError
from swarmd.config import LimitsConfig
from swarmd.transport.prefixes import is_public, network_of

BURST_S = 2.0  # a key may spend this many seconds' worth of requests at once
MAX_TRACKED_KEYS = 10_000  # request buckets kept; the least recently seen goes beyond
# An honest daemon gossips with a given server once a round (1 s), a few times while catching
# up (its own rounds, a leave, a refresh): ten times that is never an honest key's rate, and a
# key beyond it is refused, whatever its requests cost
GOSSIP_PER_S_PER_KEY = 10
# Gossip runs on the serving thread, between decode steps. Over all keys it may take this share
# of that thread's time (bursts of GOSSIP_BURST_S); beyond, a request gets an empty answer,
# which costs microseconds. Honest gossip takes ~0.1 % (a few requests a second of ~0.1 ms)
GOSSIP_TIME_SHARE = 0.05
GOSSIP_BURST_S = 0.1


class KeyLimits:
    def __init__(self, limits: LimitsConfig, clock=time.monotonic):
        self.limits, self._clock = limits, clock
        self._buckets: OrderedDict[str | None, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)
        self._gossip: OrderedDict[str | None, tuple[float, float]] = OrderedDict()
        self.refused = 0

    def admit_request(self, key: str | None) -> None:
        """Take one request from `key`'s token bucket, or raise LimitError."""
        if not self._take(self._buckets, key, float(self.limits.requests_per_s_per_key)):
            raise LimitError(f"too many requests from this key: at most {self.limits.requests_per_s_per_key} a second "
                             "(serve.limits.requests_per_s_per_key)")

    def admit_gossip(self, key: str | None) -> None:
        """Take one gossip request from `key`'s own bucket (besides admit_request), or raise LimitError."""
        if not self._take(self._gossip, key, float(GOSSIP_PER_S_PER_KEY)):
            raise LimitError(f"too much gossip from this key: at most {GOSSIP_PER_S_PER_KEY} requests a second")

    def _take(self, buckets: OrderedDict[str | None, tuple[float, float]], key: str | None, rate: float) -> bool:
        now = self._clock()
        tokens, then = buckets.pop(key, (rate * BURST_S, now))
        tokens = min(rate * BURST_S, tokens + (now - then) * rate)
        if len(buckets) >= MAX_TRACKED_KEYS:
            buckets.popitem(last=False)
        if tokens < 1.0:
            buckets[key] = (tokens, now)
            self.refused += 1
            return False
        buckets[key] = (tokens - 1.0, now)
        return True

    def admit_session(self, key: str | None, held: list[int], nbytes: int, budget_bytes: int,
                      pushed_bytes: int = 0, network: str | None = None,
                      network_held: list[int] | None = None) -> None:
        """A new session of `nbytes` for `key`, which holds sessions of `held` bytes and early
        pushes of `pushed_bytes` already, from `network` (`shared_network`), whose keys' sessions
        hold `network_held` bytes already."""
        if len(held) >= self.limits.sessions_per_key:
            raise LimitError(f"this key has {len(held)} sessions open here, the most allowed "
                             "(serve.limits.sessions_per_key)")
        self._within_share("sessions", sum(held) + pushed_bytes + nbytes, budget_bytes)
        self._within_network_share(network, network_held or [], nbytes, budget_bytes)

    def admit_push(self, key: str | None, held_bytes: int, nbytes: int, budget_bytes: int) -> None:
        """An early push of `nbytes` from `key`, whose sessions and early pushes hold `held_bytes`."""
        self._within_share("early pushes", held_bytes + nbytes, budget_bytes)

    def _within_share(self, what: str, nbytes: int, budget_bytes: int) -> None:
        """A key's sessions and the pushes waiting here that it sent share one part of the cache
        budget: either way, one key pins no more of the server's memory."""
        share = int(budget_bytes * self.limits.cache_share_per_key)
        if nbytes > share:
            raise LimitError(f"this key's {what} would hold {nbytes / 2**20:.1f} MiB of KV cache here (sessions and "
                             f"early pushes together), more than its share of {share / 2**20:.1f} MiB "
                             "(serve.limits.cache_share_per_key)")

    def _within_network_share(self, network: str | None, network_held: list[int], nbytes: int,
                             budget_bytes: int) -> None:
        """The keys of one internet network share one key's share of the cache (`shared_network`)."""
        share = int(budget_bytes * self.limits.cache_share_per_key)
        together = sum(network_held) + nbytes
        if network is not None and together > share:
            raise LimitError(f"the sessions of keys from {network} would hold {together / 2**20:.1f} MiB of KV cache "
                             f"here, more than the share of {share / 2**20:.1f} MiB the keys of one network share "
                             "(serve.limits.cache_share_per_key)")


def shared_network(host: str | None, private_swarm: bool) -> str | None:
    """The network whose keys share one cache share with a request from `host` (the address
    its connection came from; None through a relay), or None: its key's share alone."""
    if private_swarm or not is_public(host):
        return None
    return network_of(host)


class GossipTime:
    """The serving thread's time that gossip may take, over all keys: a bucket of seconds that
    fills at GOSSIP_TIME_SHARE of the clock, up to GOSSIP_BURST_S. Time is measured, not
    estimated: whatever a request costs (a large table, records to check) is what it spends."""

    def __init__(self, share: float = GOSSIP_TIME_SHARE, burst_s: float = GOSSIP_BURST_S, clock=time.perf_counter):
        self.share, self.burst_s, self._clock = share, burst_s, clock
        self._left_s, self._then = burst_s, clock()
        self.short = 0  # requests answered empty: the share was spent

    def available(self) -> bool:
        now = self._clock()
        self._left_s, self._then = min(self.burst_s, self._left_s + (now - self._then) * self.share), now
        return self._left_s > 0

    def spend(self, seconds: float) -> None:
        self._left_s -= seconds
