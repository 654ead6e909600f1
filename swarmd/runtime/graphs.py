"""Decode steps as CUDA graphs: a one-position step of a session through a span is a few
hundred small kernels (0.7 ms per Llama-7B layer eagerly on an H100, against a memory floor
near 0.07 ms), so on CUDA it is captured once per session and replayed at every position.

What makes a step replayable is Span._static_step: the same shapes at every position of a
bucket (the new keys/values go to a slot given as a device tensor; attention spans the
cache's first 64, 128, 256, ... slots, a power of two above the slot, with the slots after it
masked out). A graph bakes in the addresses of its session's cache, so there is one per session
and bucket (at most MAX_GRAPHS, the least recently used dropped), captured at the first step in
that bucket. The first replay on a span is checked against the same
step run eagerly; a capture or a check that fails turns graphs off for the span (logged), and
steps run eagerly as before. Prefills, several positions, LoRA, deep prompts and batched steps
of several sessions always run eagerly.

Host and device exchange each step's hidden state once each way, through pinned buffers."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol

import torch

from swarmd.runtime.blocks import attend_bucket

if TYPE_CHECKING:
    from swarmd.runtime.cache import SessionCache

log = logging.getLogger("swarmd.runtime")

MAX_GRAPHS = 32  # captured steps kept (sessions x buckets), the least recently used dropped
CHECK_TOLERANCE = 1e-2  # graph against eager on the first replay: the same kernels, so ~0


class Span(Protocol):
    """What the graphs need of a span (swarmd/runtime/span.py's Span, which owns them): this
    module takes it so and imports nothing of span.py, so the runtime's imports form a tree."""

    device: torch.device
    dtype: torch.dtype
    hidden_size: int
    start: int
    end: int

    def _static_step(self, x: torch.Tensor, position_ids: torch.Tensor, slot: torch.Tensor, cache: SessionCache,
                     first: int, last: int, attend: int) -> torch.Tensor: ...


class _Graph:
    """One session's captured step over blocks [first, last), attending over `attend` slots."""

    def __init__(self, span: Span, cache: SessionCache, first: int, last: int, attend: int, pool):
        dev, B, H = span.device, cache.batch, span.hidden_size
        self.cache, self.first, self.last, self.attend = cache, first, last, attend
        self.x = torch.zeros(B, 1, H, dtype=span.dtype, device=dev)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=dev)
        # capturing runs the step: with the slot at the cache's length, what it writes there is
        # overwritten by the real step that follows
        self.slot = torch.full((1,), cache.length, dtype=torch.long, device=dev)
        self.x_host = torch.zeros(B, 1, H, dtype=span.dtype).pin_memory()
        self.out_host = torch.zeros(B, 1, H, dtype=span.dtype).pin_memory()
        stream = torch.cuda.current_stream(dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(stream)
        with torch.cuda.stream(side):  # warm-up off the capture (allocator, lazy inits)
            for _ in range(2):
                span._static_step(self.x, self.pos, self.slot, cache, first, last, attend)
        stream.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads of the daemon may use the device while this one captures
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.out = span._static_step(self.x, self.pos, self.slot, cache, first, last, attend)

    def replay(self, hidden: torch.Tensor, position_ids: torch.Tensor, slot: int) -> torch.Tensor:
        self.x_host.copy_(hidden)
        self.x.copy_(self.x_host, non_blocking=True)
        self.pos.copy_(position_ids)
        self.slot.fill_(slot)
        self.graph.replay()
        self.out_host.copy_(self.out, non_blocking=True)
        torch.cuda.current_stream(self.x.device).synchronize()
        return self.out_host.clone()


class DecodeGraphs:
    """The captured decode steps of one span's sessions."""

    def __init__(self, span: Span):
        self.span = span
        # (id(cache), bucket) -> graph, least recently used first
        self.graphs: OrderedDict[tuple[int, int], _Graph] = OrderedDict()
        self.off: str | None = None  # why graphs are not used (None: they are)
        self.checked = False
        self.captured = 0
        self._lock = threading.Lock()
        # one memory pool for every graph's activations: graphs replay one at a time, on the
        # compute thread, and each output is copied out at once, so what one leaves behind
        # another may overwrite (without sharing, each graph would hold its own: for an int8
        # cache, the dequantized keys and values of a whole bucket)
        self.pool = torch.cuda.graph_pool_handle()

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, cache: SessionCache, first: int,
             last: int) -> torch.Tensor | None:
        """The step's output (on the CPU), or None when it is to run eagerly."""
        if self.off is not None:
            return None
        attend = attend_bucket(cache.length, cache.max_length)
        key = (id(cache), attend)
        with self._lock:
            g = self.graphs.get(key)
            if g is not None and (g.cache is not cache or (g.first, g.last) != (first, last)):
                g = None
            if g is not None:
                self.graphs.move_to_end(key)
        cache.record(position_ids.to(self.span.device), None)
        slot = cache.length
        if g is None:
            try:
                g = _Graph(self.span, cache, first, last, attend, self.pool)
            except Exception as e:  # e.g. an op that cannot be captured on this build
                self._turn_off(f"capture failed: {type(e).__name__}: {e}")
                return None
            with self._lock:
                self.graphs[key] = g
                self.captured += 1
                while len(self.graphs) > MAX_GRAPHS:
                    self.graphs.popitem(last=False)
        out = g.replay(hidden, position_ids, slot)
        if not self.checked:
            # the same step eagerly (it writes the same keys/values to the same slot again)
            x = hidden.to(self.span.device, self.span.dtype)
            eager = self.span._static_step(x, position_ids.to(self.span.device),
                                           torch.full((1,), slot, device=self.span.device), cache, first, last,
                                           attend).cpu()
            scale = eager.abs().max().item() or 1.0
            if not torch.isfinite(out).all() or (out - eager).abs().max().item() > CHECK_TOLERANCE * scale:
                self._turn_off("a replayed step differs from the same step run eagerly")
                out = eager
            self.checked = True
        cache.advance(1)
        return out

    def forget(self, cache: SessionCache) -> None:
        """The session is closed: its graphs (and the memory they hold) go."""
        with self._lock:
            for key in [k for k, g in self.graphs.items() if g.cache is cache]:
                del self.graphs[key]

    def _turn_off(self, why: str) -> None:
        self.off = why
        with self._lock:
            self.graphs.clear()
        log.error("CUDA graphs for decode steps are off for blocks %d:%d (%s); steps run eagerly",
                  self.span.start, self.span.end, why)
