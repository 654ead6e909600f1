"""A span of transformer blocks [start, end) loaded from a local checkpoint, and the
function that runs a step (or a cache-less forward) through any sub-range of it."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from libswarm.checkpoint import Checkpoint
from libswarm.errors import ConfigError, ModelError
from swarmd.runtime.blocks import BLOCK_CLASSES, BloomBlock, LlamaBlock, Rotary, build_context, make_slopes
from swarmd.runtime.cache import SessionCache

log = logging.getLogger("swarmd.runtime")


class Span:
    def __init__(self, checkpoint: Checkpoint, start: int, end: int, device: torch.device, dtype: torch.dtype):
        n = checkpoint.num_layers
        if not (0 <= start < end <= n):
            raise ConfigError(f"blocks {start}:{end} out of range: the model has blocks 0:{n}")
        self.checkpoint, self.start, self.end = checkpoint, start, end
        self.device, self.dtype = device, dtype
        self.config = checkpoint.config
        self.family = checkpoint.family
        self.blocks = nn.ModuleList()
        self.rotary = Rotary(self.config).to(device) if self.family == "llama" else None
        self.slopes = make_slopes(self.config, self.family)
        first = self._make_block(start)
        self.num_kv_heads: int = first.num_kv_heads
        self.head_dim: int = first.head_dim
        self.windows: set[int | None] = {first.window}
        self.hidden_size = self.config.hidden_size
        self.fingerprints: list[str] = []  # one per block, from the checkpoint (see Checkpoint.block_fingerprint)

    def _make_block(self, i: int) -> LlamaBlock | BloomBlock:
        with torch.device("meta"):
            return BLOCK_CLASSES[self.family](self.config, i)

    def load(self, progress=None) -> Span:
        """Read only this span's tensors, block by block, reporting progress."""
        t0 = time.monotonic()
        self.fingerprints = [self.checkpoint.block_fingerprint(i) for i in range(self.start, self.end)]
        for n, i in enumerate(range(self.start, self.end)):
            block = self._make_block(i)
            names = self.checkpoint.block_tensor_names(i)
            prefix = f"{self.checkpoint.layer_prefix}{i}."
            tensors = self.checkpoint.read(names)
            state = {k[len(prefix):]: v.to(self.dtype) for k, v in tensors.items()}
            expected = set(block.state_dict().keys())
            missing, extra = expected - state.keys(), state.keys() - expected
            # rotary inv_freq buffers appear in some old checkpoints; they are recomputed here
            extra = {k for k in extra if not k.endswith("inv_freq")}
            if missing or extra:
                raise ModelError(
                    f"block {i} of {self.checkpoint.dir} does not match the {self.checkpoint.architecture} layout "
                    f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
                )
            block.load_state_dict({k: state[k] for k in expected}, assign=True)
            block.to(self.device).eval().requires_grad_(False)
            self.blocks.append(block)
            self.windows.add(block.window)
            if progress:
                progress(n + 1, self.end - self.start)
        log.info("loaded blocks %d:%d in %.1f s", self.start, self.end, time.monotonic() - t0)
        return self

    @torch.inference_mode()
    def run(self, hidden: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor | None, first: int,
            last: int, cache: SessionCache | None = None) -> torch.Tensor:
        """Run blocks [first, last) (global indices) on hidden [B, T, H], without autograd.

        With a cache, the new positions go to slots [cache.length, cache.length + T) and attend
        to everything cached before them; without one, this is a plain causal forward."""
        return self._run(hidden, position_ids, key_mask, first, last, cache)

    def backward(self, hidden: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor | None, first: int,
                 last: int, grad_output: torch.Tensor) -> torch.Tensor:
        """The gradient of blocks [first, last)'s output w.r.t. their input `hidden`, given the
        gradient of the output: the forward is recomputed with autograd (nothing was kept from
        an earlier forward), the weights stay frozen."""
        with torch.enable_grad():
            x = hidden.to(self.device, self.dtype).detach().requires_grad_(True)
            out = self._run(x, position_ids, key_mask, first, last, None)
            (grad,) = torch.autograd.grad(out, x, grad_output.to(self.device, out.dtype))
        return grad

    def _run(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        key_mask: torch.Tensor | None,
        first: int,
        last: int,
        cache: SessionCache | None = None,
    ) -> torch.Tensor:
        x = hidden.to(self.device, self.dtype)
        position_ids = position_ids.to(self.device)
        B, T, _ = x.shape
        if cache is not None:
            start = cache.length
            cache.record(position_ids, key_mask)
            key_positions, full_mask = cache.key_positions(start + T), cache.key_mask(start + T)
        else:
            start, key_positions = 0, position_ids
            full_mask = None if key_mask is None or bool(key_mask.all()) else key_mask.to(self.device)
        ctx = build_context(
            self.family, start=start, length=T, key_mask=full_mask, key_positions=key_positions,
            position_ids=position_ids, windows=self.windows, rotary=self.rotary, slopes=self.slopes, like=x,
        )
        for i in range(first, last):
            kv = cache.layer(i) if cache is not None else None
            x = self.blocks[i - self.start](x, ctx, kv)
        if cache is not None:
            cache.advance(T)
        return x
