"""Bootstrap contacts: the addresses (and maybe keys) a daemon is given by its seed list and by
mDNS, before and besides the nodes its table knows.

Decided here: a new seed list replaces the seeds (mDNS contacts stay); a contact given anew
with another key is tried again at once; a contact that fails is retried with capped doubling
backoff (HINT_RETRY_MAX_S), its first failure logged and its recovery too; and how contacts
that do not answer yet show in `swarmctl peers`. Which of them a round contacts is targets.py's
choice."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from swarmd.config import Seed
from swarmd.identity import short_id

log = logging.getLogger("swarmd.discovery")

HINT_RETRY_MAX_S = 5.0  # a contact that fails is retried at most this far apart


@dataclass
class Hint:
    """A bootstrap contact: an address (and maybe its key) from a seed list or mDNS."""

    address: str
    key: str | None
    source: str  # "seed" | "mdns"
    failures: int = 0
    next_try: float = 0.0
    error: str | None = None


class BootstrapContacts:
    """The bootstrap contacts by address, and when each is to be tried next."""

    def __init__(self) -> None:
        self.hints: dict[str, Hint] = {}
        self._lock = threading.Lock()

    def set_seeds(self, seeds: list[Seed]) -> None:
        with self._lock:
            for address in [a for a, h in self.hints.items() if h.source == "seed"]:
                del self.hints[address]
            for s in seeds:
                self.hints.setdefault(s.address, Hint(s.address, s.key, "seed"))

    def add(self, address: str, key: str | None, source: str) -> None:
        with self._lock:
            h = self.hints.get(address)
            if h is None:
                self.hints[address] = Hint(address, key, source)
            elif key and h.key != key:
                h.key, h.failures, h.next_try = key, 0, 0.0

    def retry_now(self) -> None:
        """Forget the backoff of failed contacts."""
        with self._lock:
            for h in self.hints.values():
                h.next_try = 0.0

    def key_at(self, address: str) -> str | None:
        h = self.hints.get(address)
        return h.key if h else None

    def source_of(self, address: str) -> str:
        """Where the contact at `address` came from ("seed" for an address not held)."""
        return self.hints[address].source if address in self.hints else "seed"

    def all(self) -> list[Hint]:
        with self._lock:
            return list(self.hints.values())

    def answered(self, address: str) -> None:
        h = self.hints.get(address)
        if h is not None:
            if h.failures:
                log.info("%s %s answers now", h.source, address)
            h.failures, h.error, h.next_try = 0, None, 0.0

    def failed(self, address: str, error: str, interval_s: float) -> None:
        """The contact at `address` failed: retried after 2, 4, 8 ... gossip intervals
        (`interval_s`), at most HINT_RETRY_MAX_S apart."""
        h = self.hints.get(address)
        if h is not None:
            if h.failures == 0:
                log.warning("%s %s: %s", h.source, address, error)
            h.failures += 1
            h.error = error
            h.next_try = time.monotonic() + min(interval_s * 2 ** h.failures, HINT_RETRY_MAX_S)

    def rows(self, known: set[str]) -> list[dict]:
        """swarmctl peers rows for the contacts at none of the `known` addresses (the table's)."""
        return [{"node_id": h.key, "short_id": short_id(h.key) if h.key else "-", "address": h.address,
                 "addresses": [h.address], "model_id": None, "span": None,
                 "state": "unreachable" if h.failures else "contacting", "throughput": 0.0,
                 "cache_free_bytes": 0, "sessions": 0, "version": "", "protocol": "", "rtt_ms": None,
                 "last_seen_s_ago": None, "error": h.error, "is_self": False, "source": h.source}
                for h in self.all() if h.address not in known]
