"""Training passes kept on the server between a `forward` asked with `keep` and its `backward`:
the backward differentiates the graph kept here instead of running the blocks forward again,
so a training step through the swarm runs each block forward once, as it does locally.

What is kept is the activations autograd saved (Span.graph counts their bytes). They are held
in the cache budget, one key's at most KEPT_KEY_SHARE of it (its own oldest go first), and
sessions come first: an open, an early push or a pass's scratch that would not fit otherwise
takes the room back, oldest pass first (CacheBudget.reclaim). So kept passes use the room
sessions leave and no more; a quarter of it for them (say) would only make a large batch's
backward recompute on a server with room to spare. A kept pass is dropped by its backward, after KEPT_TIMEOUT_S, or when
the server no longer serves the span it ran on. It is its caller's alone (the key that asked
for it) and answers only a backward of the same blocks and inputs (positions, mask, trainables,
adapter and scaling alike): any other
backward, or one whose pass is gone, recomputes the forward from its request as before. A
backward that sends no inputs (protocol 1.6) gets the pass as it was kept, or a `session`
error when it is gone."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from libswarm.errors import CacheFullError
from swarmd.runtime.cache import CacheBudget
from swarmd.runtime.span import Graph

KEPT_KEY_SHARE = 0.5  # of the cache budget, for one key's kept passes
KEPT_TIMEOUT_S = 120.0  # a backward comes seconds after its forward; one that has not by then will not
MAX_KEPT = 256  # passes kept at once, whatever their size


@dataclass
class Kept:
    owner: str | None  # the key that asked
    blocks: tuple[int, int]
    span: object  # the Span it ran on
    inputs: dict[str, torch.Tensor]  # every tensor the forward sent (input, positions, mask, trainables)
    how: tuple  # the fields that change the computation: the hosted adapter, the LoRA scaling
    graph: Graph
    created: float = field(default_factory=time.monotonic)


class KeptGraphs:
    """Thread-safe: passes are kept and taken on the compute thread, and given back to an open
    on the serving thread."""

    def __init__(self, served: Callable[[object], bool], clock: Callable[[], float] = time.monotonic):
        """`served(span)`: whether the server still serves that span (a pass on one it let go
        holds its weights in memory for nothing)."""
        self.served, self.clock = served, clock
        self.budget: CacheBudget | None = None
        self._kept: OrderedDict[str, Kept] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.used = 0  # backwards that found their pass kept
        self.dropped = 0  # passes dropped unused (room, time, the span moved): their backward recomputes
        self.refused = 0  # forwards asked to keep whose pass did not fit (a key's share, or no room): likewise

    def attach(self, budget: CacheBudget) -> None:
        self.budget = budget
        budget.reclaim = self.reclaim

    def __len__(self) -> int:
        return len(self._kept)

    def put(self, kept: Kept) -> str | None:
        """Keep a forward's pass; its id, or None when it is not kept (larger than a key's share,
        or no room in the budget even after this key's and everyone's oldest passes went)."""
        budget, n = self.budget, kept.graph.nbytes
        if budget is None or n > budget.max_bytes * KEPT_KEY_SHARE:
            self.refused += 1
            return None
        with self._lock:
            self._expire()
            mine = [k for k, x in self._kept.items() if x.owner == kept.owner]
            held = sum(self._kept[k].graph.nbytes for k in mine)
            while mine and held + n > budget.max_bytes * KEPT_KEY_SHARE:
                held -= self._kept[mine[0]].graph.nbytes
                self._drop(mine.pop(0))
            while self._kept and (n > budget.free_bytes or len(self._kept) >= MAX_KEPT):
                self._drop(next(iter(self._kept)))  # anyone's oldest pass, never a session
            try:
                budget.reserve(n, reclaim=False)
            except CacheFullError:  # sessions hold the room
                self.refused += 1
                return None
            pass_id = secrets.token_hex(12)
            kept.created = self.clock()
            self._kept[pass_id] = kept
            self.nbytes += n
        return pass_id

    def take(self, pass_id: object, owner: str | None, blocks: tuple[int, int], span: object,
             inputs: dict[str, torch.Tensor] | None = None, how: tuple | None = None) -> Graph | None:
        """The graph of the kept pass `pass_id` for this backward, or None (recompute). Another
        key's pass is neither used nor dropped by it. A backward that sent its inputs (and `how`)
        gets the pass only if they are the forward's; one that sent none (a lean backward) gets
        it as it was kept."""
        if not isinstance(pass_id, str):
            return None
        with self._lock:
            self._expire()
            kept = self._kept.get(pass_id)
            if kept is None or kept.owner != owner:
                return None
            self._drop(pass_id, used=True)
        same = kept.blocks == blocks and kept.span is span and (
            inputs is None or (kept.how == how and kept.inputs.keys() == inputs.keys()
                               and all(_equal(kept.inputs[k], v) for k, v in inputs.items())))
        if not same:
            self.dropped += 1
            return None
        self.used += 1
        return kept.graph

    def reclaim(self, nbytes: int) -> None:
        """Give the budget back at least `nbytes` (a session needs them), oldest passes first."""
        with self._lock:
            freed = 0
            while self._kept and freed < nbytes:
                pass_id = next(iter(self._kept))
                freed += self._kept[pass_id].graph.nbytes
                self._drop(pass_id)

    def expire(self) -> None:
        with self._lock:
            self._expire()

    def _expire(self) -> None:
        now = self.clock()
        for pass_id, kept in list(self._kept.items()):
            if now - kept.created > KEPT_TIMEOUT_S or not self.served(kept.span):
                self._drop(pass_id)

    def _drop(self, pass_id: str, used: bool = False) -> None:
        kept = self._kept.pop(pass_id)
        self.nbytes -= kept.graph.nbytes
        if self.budget is not None:
            self.budget.release(kept.graph.nbytes)
        if not used:
            self.dropped += 1


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
