"""The client side of the dual cache, and what the gateway learns of each server's speed."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch


@dataclass
class History:
    """Everything sent to each span of a session's route, step by step.

    `inputs[b]` holds, for the hop that starts at block b, the hidden states it was given at
    every step, exactly as they were sent (same dtype, no conversion): replaying them into a
    fresh server rebuilds its KV cache bit for bit. Position ids and key masks are shared by
    all hops."""

    inputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    positions: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)

    def append(self, step_inputs: dict[int, torch.Tensor], boundaries: list[int], positions: torch.Tensor,
               mask: torch.Tensor | None, order: torch.Tensor | None = None) -> None:
        """A completed step. With `order` (beam search), the rows of everything before it were
        reordered first, as the servers reordered their caches: a replay rebuilds those."""
        if order is not None and self.positions:  # one entry of all steps so far, its rows reordered
            for b in self.inputs:
                self.inputs[b] = [torch.cat(self.inputs[b], dim=1)[order]]
            mask = self.replay_inputs(next(iter(self.inputs))).get("key_mask") if self.inputs else None
            self.positions = [torch.cat(self.positions, dim=1)[order]]
            self.masks = [mask[order] if mask is not None else None]
        for b in boundaries:
            self.inputs.setdefault(b, []).append(step_inputs[b])
        self.positions.append(positions)
        self.masks.append(mask)

    def truncate(self, n: int) -> None:
        """Forget every position from `n` on (the app cut its session back: rejected drafts)."""
        for b in self.inputs:
            self.inputs[b] = _cut(self.inputs[b], n)
        kept = _cut(self.positions, n)
        self.masks = [m[:, :p.shape[1]] if m is not None else None for m, p in zip(self.masks, kept)]
        self.positions = kept

    def replay_inputs(self, boundary: int) -> dict[str, torch.Tensor]:
        """The tensors of one step that replays every position so far into the hop at `boundary`."""
        out = {"hidden": torch.cat(self.inputs[boundary], dim=1), "position_ids": torch.cat(self.positions, dim=1)}
        if any(m is not None for m in self.masks):
            masks = [m if m is not None else torch.ones_like(p, dtype=torch.bool)
                     for m, p in zip(self.masks, self.positions)]
            out["key_mask"] = torch.cat(masks, dim=1)
        return out

    def reset_boundary(self, boundary: int, replayed: torch.Tensor) -> None:
        """A new boundary made by splitting a span: its history is the replay's output."""
        self.inputs[boundary] = [replayed]


def _cut(tensors: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The first `n` positions (dim 1) of tensors laid end to end."""
    out, total = [], 0
    for t in tensors:
        if total >= n:
            break
        out.append(t if total + t.shape[1] <= n else t[:, :n - total])
        total += t.shape[1]
    return out


# A step's time is a fixed part (network, Python, kernel launches) plus a part that grows with
# the tokens; counting the fixed part as 16 tokens' worth fits small and large models alike.
FIXED_COST_TOKENS = 16
EMA_WEIGHT = 0.2  # how fast the estimate follows a server that speeds up or slows down
# Servers whose times are kept: past this, the one timed longest ago is forgotten (it is then
# given what its record claims, as before its first step). Every address a gateway ever
# stepped through would otherwise stay for good in a long run under churn.
MAX_TIMED_SERVERS = 4096
# A step not answered within RESEND_FACTOR times the 90th percentile of a server's last
# RECENT_STEPS timed steps (each a round trip plus its compute, as this gateway measured it),
# plus RESEND_SLACK_S of scheduling noise, is sent to it again: a lost message costs about two
# of its usual steps, not the hop deadline and a failover. Not before MIN_RECENT_STEPS were timed.
RECENT_STEPS = 20
MIN_RECENT_STEPS = 4
RESEND_FACTOR = 2.0
RESEND_SLACK_S = 0.005


class StepTimes:
    """Per server: a moving average of seconds per token of step work, with how many blocks the
    server ran in its last timed step and when that was."""

    def __init__(self, max_servers: int = MAX_TIMED_SERVERS, clock=time.monotonic):
        self._timed: OrderedDict[str, tuple[float, int, float]] = OrderedDict()  # per unit, blocks, when
        self._recent: dict[str, deque[float]] = {}  # the last RECENT_STEPS seconds per unit
        self._max = max_servers
        self._clock = clock
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._timed)

    @staticmethod
    def units(tokens: int) -> int:
        return tokens + FIXED_COST_TOKENS

    def record(self, address: str, seconds: float, tokens: int, blocks: int = 0) -> None:
        x = seconds / self.units(tokens)
        with self._lock:
            old = self._timed.pop(address, None)
            per_unit = x if old is None else (1 - EMA_WEIGHT) * old[0] + EMA_WEIGHT * x
            self._timed[address] = (per_unit, blocks or (old[1] if old else 0), self._clock())
            recent = self._recent.get(address) if old is not None else None
            if recent is None:
                recent = self._recent[address] = deque(maxlen=RECENT_STEPS)
            recent.append(x)
            if len(self._timed) > self._max:
                gone, _ = self._timed.popitem(last=False)
                self._recent.pop(gone, None)

    def expected_s(self, address: str, tokens: int) -> float | None:
        with self._lock:
            timed = self._timed.get(address)
        return None if timed is None else timed[0] * self.units(tokens)

    def resend_s(self, address: str, tokens: int) -> float | None:
        """How long a step of `tokens` may go unanswered before it is sent again; None when the
        server was not timed often enough yet to tell a lost message from its usual pace."""
        with self._lock:
            recent = self._recent.get(address)
            times = sorted(recent) if recent is not None and len(recent) >= MIN_RECENT_STEPS else None
        if times is None:
            return None
        p90 = times[min(len(times) - 1, (9 * len(times)) // 10)]
        return RESEND_FACTOR * p90 * self.units(tokens) + RESEND_SLACK_S

    def block_s(self, address: str, rtt_s: float, max_age_s: float) -> float | None:
        """Its measured time per block of a one-token step, the round trip `rtt_s` taken off;
        None when it was not timed within `max_age_s` or its blocks are unknown."""
        with self._lock:
            timed = self._timed.get(address)
        if timed is None or not timed[1] or self._clock() - timed[2] > max_age_s:
            return None
        return max(0.0, timed[0] * self.units(1) - rtt_s) / timed[1]
