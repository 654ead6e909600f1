"""What one peer key may hold or ask of a server: sessions, a share of the KV cache, requests
per second. Keys are what CURVE proves, so one gateway or server is one key; a hostile peer
can make many keys, but each must complete a handshake, and each new key starts with the
same small allowance as everyone else.

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


class KeyLimits:
    def __init__(self, limits: LimitsConfig, clock=time.monotonic):
        self.limits, self._clock = limits, clock
        self._buckets: OrderedDict[str | None, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)
        self.refused = 0

    def admit_request(self, key: str | None) -> None:
        """Take one request from `key`'s token bucket, or raise LimitError."""
        rate = float(self.limits.requests_per_s_per_key)
        now = self._clock()
        tokens, then = self._buckets.pop(key, (rate * BURST_S, now))
        tokens = min(rate * BURST_S, tokens + (now - then) * rate)
        if len(self._buckets) >= MAX_TRACKED_KEYS:
            self._buckets.popitem(last=False)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            self.refused += 1
            raise LimitError(f"too many requests from this key: at most {self.limits.requests_per_s_per_key} a second "
                             "(serve.limits.requests_per_s_per_key)")
        self._buckets[key] = (tokens - 1.0, now)

    def admit_session(self, key: str | None, held: list[int], nbytes: int, budget_bytes: int,
                      network: str | None = None, network_held: list[int] | None = None) -> None:
        """A new session of `nbytes` for `key`, which holds sessions of `held` bytes already,
        from `network` (`shared_network`), whose keys hold `network_held` bytes already."""
        if len(held) >= self.limits.sessions_per_key:
            raise LimitError(f"this key has {len(held)} sessions open here, the most allowed "
                             "(serve.limits.sessions_per_key)")
        share = int(budget_bytes * self.limits.cache_share_per_key)
        if sum(held) + nbytes > share:
            raise LimitError(f"this key's sessions would hold {(sum(held) + nbytes) / 2**20:.1f} MiB of KV cache here, "
                             f"more than its share of {share / 2**20:.1f} MiB (serve.limits.cache_share_per_key)")
        together = sum(network_held or []) + nbytes
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
