"""Log lines that a peer can cause, at a bounded rate: every refused frame logging a line would
let anyone fill the disk. One line per (key, reason) per interval, saying how many were
suppressed since the last."""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable

MAX_KEYS = 4096  # the keys remembered; beyond that the table starts afresh (a flood of new keys)


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval_s: float, clock=time.monotonic):
        self.logger, self.interval_s, self._clock = logger, interval_s, clock
        self._last: dict[Hashable, tuple[float, int]] = {}  # key -> (when last logged, suppressed since)

    def log(self, level: int, key: Hashable, fmt: str, *args) -> bool:
        """Log unless `key` logged within the interval; True when it did."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return False
        if len(self._last) >= MAX_KEYS:
            self._last.clear()
        suppressed = last[1] if last is not None else 0
        self._last[key] = (now, 0)
        if suppressed:
            fmt += f" ({suppressed} more like it in the last {self.interval_s:.0f} s not logged)"
        self.logger.log(level, fmt, *args)
        return True

    def info(self, key: Hashable, fmt: str, *args) -> bool:
        return self.log(logging.INFO, key, fmt, *args)

    def warning(self, key: Hashable, fmt: str, *args) -> bool:
        return self.log(logging.WARNING, key, fmt, *args)
