"""Servers that failed recently, avoided for a while: 1 s after a first failure, doubling with
each further failure up to 5 minutes, forgotten after a success. Shared by all sessions of a
gateway, so a server that failed one session is not handed to the next."""

from __future__ import annotations

import threading
import time

BAN_BASE_S = 1.0  # short: a server that hiccuped once should be back in routes quickly
BAN_MAX_S = 300.0  # a server that keeps failing is tried again at most every 5 minutes
# Past this many addresses, those whose ban ended over BAN_MAX_S ago are forgotten: in a long run
# under churn (servers that come back at new ports, NATs that remap them) every address that
# ever failed would otherwise stay for good.
PRUNE_ABOVE = 1024


class Bans:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def ban(self, address: str) -> float:
        """Record a failure; returns how long the server is banned for. A failure while its ban
        lasts is the same incident seen by another session (every session routed through a
        server that died finds out): it does not double the ban."""
        with self._lock:
            now = self._clock()
            until = self._until.get(address, 0.0)
            if until > now:
                return until - now
            n = self._failures.get(address, 0) + 1
            self._failures[address] = n
            # the exponent is capped: a server may fail thousands of times in a long run, and
            # 2 ** n of a large n is an int no float can hold
            duration = min(BAN_MAX_S, BAN_BASE_S * 2.0 ** min(n - 1, 32))
            self._until[address] = now + duration
            if len(self._until) > PRUNE_ABOVE:
                for a in [a for a, t in self._until.items() if t < now - BAN_MAX_S]:
                    del self._until[a]
                    self._failures.pop(a, None)
            return duration

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)
            if self._until.get(address, float("inf")) <= self._clock():
                del self._until[address]  # its ban is over and it works: nothing left to keep

    def is_banned(self, address: str) -> bool:
        with self._lock:
            return self._until.get(address, 0.0) > self._clock()

    def remaining_s(self, address: str) -> float:
        """Seconds until the server's ban ends (0 when it is not banned)."""
        with self._lock:
            return max(0.0, self._until.get(address, 0.0) - self._clock())

    def __len__(self) -> int:
        """How many addresses it keeps anything for."""
        with self._lock:
            return len(self._until.keys() | self._failures.keys())

    def banned(self) -> set[str]:
        now = self._clock()
        with self._lock:
            return {a for a, t in self._until.items() if t > now}
