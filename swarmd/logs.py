"""Log lines that a peer can cause, at a bounded rate: every refused frame logging a line would
let anyone fill the disk. One line per (key, reason) per interval, saying how many were
suppressed since the last."""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable

MAX_KEYS = 4096  # the keys remembered; beyond that the table starts afresh (a flood of new keys)


class LineBudget:
    """At most `lines` log lines per `per_s` seconds for each key and `total` for all keys
    together: for lines that are each worth reading (distinct reasons), but whose number a
    peer decides."""

    def __init__(self, lines: int, per_s: float, total: int, clock=time.monotonic):
        self.lines, self.per_s, self.total, self._clock = lines, per_s, total, clock
        self._used: dict[Hashable, tuple[float, int]] = {}  # key -> (window start, lines in it)

    def take(self, key: Hashable) -> bool:
        now = self._clock()
        if len(self._used) >= MAX_KEYS:
            self._used.clear()
        windows = {}
        for k in (key, None):  # None: all keys together
            start, n = self._used.get(k, (now, 0))
            windows[k] = (now, 0) if now - start >= self.per_s else (start, n)
        if windows[key][1] >= self.lines or windows[None][1] >= self.total:
            return False
        for k, (start, n) in windows.items():
            self._used[k] = (start, n + 1)
        return True


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval_s: float, clock=time.monotonic):
        self.logger, self.interval_s, self._clock = logger, interval_s, clock
        self._last: dict[Hashable, tuple[float, int]] = {}  # key -> (when last logged, suppressed since)

    def _admit(self, key: Hashable) -> int | None:
        """None when `key` logged within the interval (counted), else how many were suppressed."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return None
        if len(self._last) >= MAX_KEYS:
            self._last.clear()
        self._last[key] = (now, 0)
        return last[1] if last is not None else 0

    def allow(self, key: Hashable) -> bool:
        """Whether a line for `key` may be logged now (by the caller, e.g. with a traceback)."""
        return self._admit(key) is not None

    def log(self, level: int, key: Hashable, fmt: str, *args) -> bool:
        """Log unless `key` logged within the interval; True when it did."""
        suppressed = self._admit(key)
        if suppressed is None:
            return False
        if suppressed:
            fmt += f" ({suppressed} more like it in the last {self.interval_s:.0f} s not logged)"
        self.logger.log(level, fmt, *args)
        return True

    def info(self, key: Hashable, fmt: str, *args) -> bool:
        return self.log(logging.INFO, key, fmt, *args)

    def warning(self, key: Hashable, fmt: str, *args) -> bool:
        return self.log(logging.WARNING, key, fmt, *args)
