"""The peer table: what this daemon knows of every peer it has heard from."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

from swarmd.gateway.routing import ServerSpan


@dataclass
class PeerRecord:
    address: str
    model_id: str | None = None
    span: tuple[int, int] | None = None
    state: str = "unknown"  # unknown | online | unreachable
    cache_free_bytes: int = 0
    sessions: int = 0
    rtt_ms: float | None = None
    last_seen: float | None = None  # unix time of the last answer
    error: str | None = None
    is_self: bool = False
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("info")
        d["span"] = list(self.span) if self.span else None
        d["last_seen_s_ago"] = round(time.time() - self.last_seen, 1) if self.last_seen else None
        return d


class PeerTable:
    def __init__(self):
        self._peers: dict[str, PeerRecord] = {}
        self._lock = threading.Lock()

    def update(self, record: PeerRecord) -> None:
        with self._lock:
            self._peers[record.address] = record

    def mark_unreachable(self, address: str, error: str) -> None:
        with self._lock:
            r = self._peers.setdefault(address, PeerRecord(address))
            r.state, r.error = "unreachable", error

    def records(self) -> list[PeerRecord]:
        with self._lock:
            return sorted(self._peers.values(), key=lambda r: r.address)

    def servers_for(self, model_id: str) -> list[ServerSpan]:
        """Spans of the online servers of this model, for routing."""
        return [
            ServerSpan(r.address, r.span[0], r.span[1], r.cache_free_bytes)
            for r in self.records()
            if r.state == "online" and r.model_id == model_id and r.span is not None
        ]
