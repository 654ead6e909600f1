"""Learning about peers by asking the seed addresses of the config for their info."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from libswarm.errors import SwarmError
from swarmd.discovery.table import PeerRecord, PeerTable
from swarmd.gateway.connection import ConnectionPool

log = logging.getLogger("swarmd.discovery")

REFRESH_INTERVAL_S = 5.0  # how often seeds are asked again (spans and free cache change)
INFO_TIMEOUT_S = 2.0  # a seed that does not answer info in this time is marked unreachable


class SeedPoller:
    def __init__(self, pool: ConnectionPool, table: PeerTable, seeds: Callable[[], list[str]],
                 self_record: Callable[[], PeerRecord | None],
                 expected_fingerprint: Callable[[int], str | None] = lambda block: None):
        self.pool, self.table = pool, table
        self.seeds, self.self_record = seeds, self_record
        self.expected_fingerprint = expected_fingerprint
        self._refresh_lock = threading.Lock()
        self._logged_failures: set[str] = set()

    def refresh(self, skip: set[str] | frozenset[str] = frozenset()) -> None:
        """Ask every seed (but those in `skip`) for its info now; one refresh at a time."""
        with self._refresh_lock:
            own = self.self_record()
            if own is not None:
                self.table.update(own)
            for address in self.seeds():
                if (own is not None and address == own.address) or address in skip:
                    continue
                self._ask(address)

    def _ask(self, address: str) -> None:
        t0 = time.monotonic()
        try:
            info = self.pool.get(address).request("info", timeout_s=INFO_TIMEOUT_S).fields
        except SwarmError as e:
            self.pool.drop(address)
            self.table.mark_unreachable(address, str(e))
            if address not in self._logged_failures:  # say it once, not every refresh
                self._logged_failures.add(address)
                log.warning("seed %s: %s", address, e)
            return
        raw_span = info.get("span")
        span = (raw_span[0], raw_span[1]) if (
            isinstance(raw_span, list) and len(raw_span) == 2 and all(isinstance(x, int) for x in raw_span)
        ) else None
        mismatch = self._weights_mismatch(span, info.get("fingerprints"))
        if mismatch and address not in self._logged_failures:
            log.warning("peer %s: %s; it will not be routed to", address, mismatch)
        if mismatch:
            self._logged_failures.add(address)
        else:
            self._logged_failures.discard(address)
        self.table.update(PeerRecord(
            address=address,
            model_id=info.get("model_id") if isinstance(info.get("model_id"), str) else None,
            span=span,
            state="mismatch" if mismatch else "online",
            error=mismatch,
            cache_free_bytes=int(info.get("cache_free_bytes") or 0),
            sessions=int(info.get("sessions") or 0),
            rtt_ms=round((time.monotonic() - t0) * 1000, 3),
            last_seen=time.time(),
            info=info,
        ))

    def _weights_mismatch(self, span: tuple[int, int] | None, fingerprints: object) -> str | None:
        """Why a peer's weights differ from this daemon's checkpoint, or None (also when this
        daemon cannot tell: it lacks those blocks, or the peer sent no fingerprints)."""
        if span is None or not isinstance(fingerprints, list) or len(fingerprints) != span[1] - span[0]:
            return None
        for block, theirs in zip(range(*span), fingerprints):
            ours = self.expected_fingerprint(block)
            if ours is not None and theirs != ours:
                return f"weights of block {block} differ from this daemon's checkpoint (same config, other weights)"
        return None

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.refresh()
            except Exception:
                log.exception("refreshing seeds failed")
            stop.wait(REFRESH_INTERVAL_S)
