"""A span of transformer blocks [start, end) loaded from a local checkpoint, and the
function that runs a step (or a cache-less forward) through any sub-range of it."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import time
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from libswarm import quantized
from libswarm.checkpoint import Checkpoint
from libswarm.errors import ConfigError, ModelError, TensorError
from swarmd.config import QUANT_MODES
from swarmd.runtime.blocks import (
    BloomBlock,
    Gemma3Block,
    LlamaBlock,
    Rotary,
    StepContext,
    attend_bucket,
    block_class,
    build_context,
    build_static_context,
    make_slopes,
)
from swarmd.runtime.cache import SessionCache
from swarmd.runtime.graphs import DecodeGraphs
from swarmd.runtime.kvint8 import Kernels, kernels_for
from swarmd.runtime.quant import PackedLinear, module_bytes, packed_on, quantize_block, rows_independent

log = logging.getLogger("swarmd.runtime")


DEEP_PROMPTS = "deep_prompts"  # [blocks, (batch,) prompt, hidden]: added to the first positions at each block


def client_trainables(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The client-held trainables among a message's tensors: LoRA matrices and deep prompts."""
    return {k: v for k, v in tensors.items() if k.startswith(("lora_A.", "lora_B.")) or k == DEEP_PROMPTS}


@dataclass
class Lora:
    """LoRA adapters for one call (a client's own, or one hosted here): `lora_A.<module path>`
    [blocks, r, in] and `lora_B.<module path>` [blocks, out, r] per target module, with their
    scaling alpha / r."""

    scaling: float
    tensors: dict[str, torch.Tensor]

    def pairs(self):
        for name, a in self.tensors.items():
            if name.startswith("lora_A."):
                path = name[len("lora_A."):]
                b = self.tensors.get(f"lora_B.{path}")
                if b is None:
                    raise TensorError(f"lora_A.{path} came without lora_B.{path}")
                yield path, a, b


def _owned(t: torch.Tensor, copy: bool) -> torch.Tensor:
    return t.clone() if copy and t.device.type == "cpu" else t


def _release_freed_memory() -> None:
    """Give the C heap's free pages back to the system. Quantizing a span frees several times
    its quantized size in temporaries of every size, and glibc keeps most of them mapped (its
    mmap threshold grows with each large free; freed heap is returned only from the top): a
    quantized server would hold more memory than a float one (measured in docs/benchmarks.md)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass


@dataclass
class Graph:
    """A forward through blocks with autograd, awaiting its backward (Span.graph)."""

    out: torch.Tensor
    input: torch.Tensor  # the leaf the blocks ran on
    leaves: dict[str, torch.Tensor]  # the client's trainables, by tensor name
    nbytes: int  # the activations autograd saved for the backward, and the output

    def grad(self, grad_output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The gradients w.r.t. the input and each trainable (`grad_<name>`); the graph is
        freed by it."""
        grads = torch.autograd.grad(self.out, [self.input, *self.leaves.values()],
                                    grad_output.to(self.out.device, self.out.dtype))
        return grads[0], {f"grad_{name}": g for name, g in zip(self.leaves, grads[1:])}


class Span:
    def __init__(self, checkpoint: Checkpoint, start: int, end: int, device: torch.device, dtype: torch.dtype,
                 quant: str = "none", kv_int8: bool = False, cuda_graphs: bool = True):
        """Blocks [start, end) of `checkpoint` computing in `dtype` on `device`, their linear
        layers' weights quantized by `quant` (swarmd/runtime/quant.py), and sessions' KV caches
        kept as int8 when `kv_int8` (swarmd/runtime/kvint8.py). On CUDA, sessions' one-position
        steps are replayed as CUDA graphs unless `cuda_graphs` is False (swarmd/runtime/graphs.py)."""
        n = checkpoint.num_layers
        if not (0 <= start < end <= n):
            raise ConfigError(f"blocks {start}:{end} out of range: the model has blocks 0:{n}")
        if quant not in QUANT_MODES:
            raise ConfigError(f"unknown weight quantization {quant!r} (one of {', '.join(QUANT_MODES)})")
        self.checkpoint, self.start, self.end = checkpoint, start, end
        self.device, self.dtype = device, dtype
        self.quant, self.kv_int8 = quant, kv_int8
        self.kv_kernels: Kernels | None = None  # set by load() on CUDA
        self.graphs: DecodeGraphs | None = None  # set by load() on CUDA
        self._cuda_graphs = cuda_graphs
        self._weight_bytes = 0
        self._weight_ptrs: set[int] | None = None  # the blocks' tensors' storages (Span.graph counts the rest)
        self._graph_bytes: dict[tuple, int] = {}  # what autograd saves in Span.graph, by the pass's shapes
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
        self.num_heads: int = self.hidden_size // self.head_dim
        self.fingerprints: list[str] = []  # one per block, from the checkpoint (see Checkpoint.block_fingerprint)

    def _make_block(self, i: int) -> LlamaBlock | BloomBlock | Gemma3Block:
        with torch.device("meta"):
            return block_class(self.family, self.config)(self.config, i)

    def load(self, progress=None) -> Span:
        """Read only this span's tensors, block by block, reporting progress."""
        t0 = time.monotonic()
        self.fingerprints = [self.checkpoint.block_fingerprint(i) for i in range(self.start, self.end)]
        for n, i in enumerate(range(self.start, self.end)):
            block = self._make_block(i)
            names = self.checkpoint.block_tensor_names(i)
            prefix = f"{self.checkpoint.layer_prefix}{i}."
            tensors = self.checkpoint.read(names)
            stored = self._stored_weights(tensors, prefix, i)
            # safetensors' tensors live in a map of their file for as long as any of them does: a
            # quantizing span copies out what it keeps as read (norms, biases), so that the map
            # and the float weights read through it go once they are quantized
            copy = self.quant != "none"
            state = {k[len(prefix):]: _owned(v.to(self.dtype), copy) for k, v in tensors.items()}
            expected = set(block.state_dict().keys())
            packed = packed_on(self.quant, self.device)
            for weight, (kind, parts) in stored.items():
                if packed:  # as the file has it, no float copy on the way
                    self._put_packed(block, weight, kind, parts, state, i)
                    expected -= {weight, weight.removesuffix("weight") + "bias"}
                else:
                    state[weight] = quantized.dequantize(kind, parts).to(self.dtype)
            missing, extra = expected - state.keys(), state.keys() - expected
            # rotary inv_freq buffers appear in some old checkpoints; they are recomputed here
            extra = {k for k in extra if not k.endswith("inv_freq")}
            if missing or extra:
                raise ModelError(
                    f"block {i} of {self.checkpoint.dir} does not match the {self.checkpoint.architecture} layout "
                    f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
                )
            block.load_state_dict({k: state[k] for k in expected}, assign=True, strict=not (stored and packed))
            quantize_block(block, self.quant, self.device, self.dtype)
            block.to(self.device).eval().requires_grad_(False)
            self.blocks.append(block)
            self.windows.add(block.window)
            if progress:
                progress(n + 1, self.end - self.start)
        self._weight_bytes = module_bytes(self.blocks)
        if self.quant != "none":
            _release_freed_memory()  # the float weights and the quantization's temporaries
        if self.kv_int8:
            self.kv_kernels = kernels_for(self.device, self.dtype, self.head_dim)
        # LLM.int8() picks outlier columns per input (shapes that depend on the data): not capturable
        if self.device.type == "cuda" and self._cuda_graphs and self.static_steps() and self.quant != "int8":
            self.graphs = DecodeGraphs(self)
        log.info("loaded blocks %d:%d in %.1f s%s", self.start, self.end, time.monotonic() - t0,
                 f" ({self.quant} weights, {self.weight_bytes() / 2**20:.1f} MiB)" if self.quant != "none" else "")
        return self

    def _stored_weights(self, tensors: dict[str, torch.Tensor], prefix: str,
                        block: int) -> dict[str, tuple[str, list[torch.Tensor]]]:
        """The block's weights stored quantized (libswarm/quantized.py), taken out of `tensors`:
        {name in the block: (kind, parts)}."""
        stored = {}
        for name in sorted(tensors):
            hit = quantized.stored_kind(name)
            if hit is None:
                continue
            weight, kind = hit
            wanted = quantized.part_names(weight, kind)
            if any(n not in tensors for n in wanted):
                raise ModelError(f"block {block} of {self.checkpoint.dir}: {weight} lacks a part of its {kind} form")
            parts = [tensors.pop(n) for n in wanted]
            why = quantized.check_parts(weight, kind, parts)
            if why:
                raise ModelError(f"block {block} of {self.checkpoint.dir}: {why}")
            stored[weight[len(prefix):]] = (kind, parts)
        return stored

    def _put_packed(self, block: nn.Module, weight: str, kind: str, parts: list[torch.Tensor],
                    state: dict[str, torch.Tensor], i: int) -> None:
        """The linear layer of `weight` in `block` replaced by a PackedLinear of its stored parts
        (its bias taken from `state`)."""
        path = weight.removesuffix(".weight")
        parent, _, attr = path.rpartition(".")
        try:
            layer = block.get_submodule(path)
        except AttributeError:
            layer = None
        if type(layer) is not nn.Linear:
            raise ModelError(f"block {i} of {self.checkpoint.dir}: {weight} is stored quantized but is not a "
                             "linear layer's weight")
        bias = state.pop(path + ".bias", None)
        try:
            q = PackedLinear(kind, parts, bias, self.dtype)
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"block {i} of {self.checkpoint.dir}: {weight}: {e}") from None
        if (q.out_features, q.in_features) != (layer.out_features, layer.in_features) or \
                (bias is None) != (layer.bias is None):
            raise ModelError(f"block {i} of {self.checkpoint.dir}: {weight} is stored as [{q.out_features}, "
                             f"{q.in_features}], the layer is [{layer.out_features}, {layer.in_features}]")
        setattr(block.get_submodule(parent) if parent else block, attr, q)

    @property
    def rows_independent(self) -> bool:
        """Whether a row's output is the same whatever other rows share its batch, so that steps
        of several sessions may run as one batch (not with LLM.int8(): quant.rows_independent)."""
        return rows_independent(self.quant, self.device)

    def static_steps(self) -> bool:
        """Whether one-position steps can run with static shapes (_static_step): the Llama
        family, with rotary embeddings that do not change with the sequence's length."""
        if self.family != "llama" or self.rotary is None or self.rotary.layer_types is not None:
            return False  # (Gemma 3's rotary per layer type: eager steps)
        rope_type = str(getattr(self.rotary.impl, "rope_type", "default"))
        return "dynamic" not in rope_type and "longrope" not in rope_type

    @torch.inference_mode()
    def decode_static(self, hidden: torch.Tensor, position_ids: torch.Tensor, first: int, last: int,
                      cache: SessionCache) -> torch.Tensor:
        """A one-position step as a CUDA graph runs it, eagerly: equal to run() (tested)."""
        pos = position_ids.to(self.device)
        cache.record(pos, None)
        slot = torch.full((1,), cache.length, dtype=torch.long, device=self.device)
        out = self._static_step(hidden.to(self.device, self.dtype), pos, slot, cache, first, last,
                                attend_bucket(cache.length, cache.max_length))
        cache.advance(1)
        return out

    def _static_step(self, x: torch.Tensor, position_ids: torch.Tensor, slot: torch.Tensor, cache: SessionCache,
                     first: int, last: int, attend: int) -> torch.Tensor:
        """Blocks [first, last) on x [B, 1, H] at cache slot `slot` (a device tensor), attending
        over the cache's first `attend` slots: shapes that do not depend on the slot (what a
        CUDA graph captures, once per bucket of slots)."""
        assert self.rotary is not None
        ctx = build_static_context(slot=slot, key_mask=cache.slot_mask()[:, :attend], position_ids=position_ids,
                                   windows=self.windows, rotary=self.rotary, like=x)
        for i in range(first, last):
            x = self.blocks[i - self.start](x, ctx, cache.layer(i))
        return x

    def forget(self, cache: SessionCache) -> None:
        """A session over this span is closed (its CUDA graph, if any, is dropped)."""
        if self.graphs is not None:
            self.graphs.forget(cache)

    def weight_bytes(self) -> int:
        """What the loaded blocks' weights take in memory (quantized ones with their scales)."""
        return self._weight_bytes

    def cache_bytes(self, first: int, last: int, batch: int, max_length: int) -> int:
        """What a session's KV cache over blocks [first, last) takes (SessionCache.nbytes)."""
        return SessionCache.bytes_needed(blocks=last - first, batch=batch, max_length=max_length,
                                         kv_heads=self.num_kv_heads, head_dim=self.head_dim, dtype=self.dtype,
                                         kv_int8=self.kv_int8)

    def new_cache(self, first: int, last: int, batch: int, max_length: int) -> SessionCache:
        return SessionCache(first=first, last=last, batch=batch, max_length=max_length, kv_heads=self.num_kv_heads,
                            head_dim=self.head_dim, dtype=self.dtype, device=self.device, kv_int8=self.kv_int8,
                            kernels=self.kv_kernels)

    @torch.inference_mode()
    def run(self, hidden: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor | None, first: int,
            last: int, cache: SessionCache | None = None, lora: Lora | None = None,
            deep_prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Run blocks [first, last) (global indices) on hidden [B, T, H], without autograd.

        With a cache, the new positions go to slots [cache.length, cache.length + T) and attend
        to everything cached before them; without one, this is a plain causal forward. `lora`
        and `deep_prompts` apply for this call only."""
        if lora is None:  # the decode hot path: no hooks to set up
            if self.graphs is not None and cache is not None and hidden.shape[1] == 1 and deep_prompts is None \
                    and (key_mask is None or bool(key_mask.all())):
                out = self.graphs.step(hidden, position_ids, cache, first, last)
                if out is not None:
                    return out
            return self._run(hidden, position_ids, key_mask, first, last, cache, deep_prompts)
        with self._lora_applied(lora, first, last):
            return self._run(hidden, position_ids, key_mask, first, last, cache, deep_prompts)

    def backward(self, hidden: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor | None, first: int,
                 last: int, grad_output: torch.Tensor, lora: Lora | None = None,
                 deep_prompts: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The gradient of blocks [first, last)'s output w.r.t. their input `hidden` (and w.r.t.
        the client's LoRA matrices and deep prompts, `grad_<tensor name>`), given the gradient
        of the output. The forward is recomputed with autograd (nothing was kept from an earlier
        forward: see `graph` for one that was); the weights stay frozen."""
        return self.graph(hidden, position_ids, key_mask, first, last, lora, deep_prompts).grad(grad_output)

    def graph(self, hidden: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor | None, first: int,
              last: int, lora: Lora | None = None, deep_prompts: torch.Tensor | None = None) -> Graph:
        """Blocks [first, last) forward with autograd: the output, and what its backward needs
        (the activations autograd saves, counted in bytes), to differentiate later."""
        def leaf(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, self.dtype).detach().requires_grad_(True)

        # What autograd saves depends on the shapes alone: counted (a Python hook per saved tensor,
        # a fifth of a small pass's time) the first time a shape comes, remembered after
        shapes = (tuple(hidden.shape), first, last, key_mask is None, tuple(position_ids.shape),
                  None if deep_prompts is None else tuple(deep_prompts.shape),
                  None if lora is None else tuple((k, tuple(v.shape)) for k, v in lora.tensors.items()))
        known = self._graph_bytes.get(shapes)
        if self._weight_ptrs is None:
            self._weight_ptrs = {t.untyped_storage().data_ptr() for b in self.blocks
                                 for t in (*b.parameters(), *b.buffers())}
        weights, counted, nbytes = self._weight_ptrs, set(), 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal nbytes
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in weights and ptr not in counted:  # the frozen weights are held anyway
                counted.add(ptr)
                nbytes += storage.nbytes()
            return t

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if known is None \
            else contextlib.nullcontext()
        with torch.enable_grad(), hooks:
            x = leaf(hidden)
            leaves: dict[str, torch.Tensor] = {}
            if lora is not None:
                leaves = {name: leaf(t) for name, t in lora.tensors.items()}
                lora = Lora(lora.scaling, leaves)
            if deep_prompts is not None:
                deep_prompts = leaves[DEEP_PROMPTS] = leaf(deep_prompts)
            with self._lora_applied(lora, first, last):
                out = self._run(x, position_ids, key_mask, first, last, None, deep_prompts)
        if known is None:
            known = self._graph_bytes[shapes] = nbytes + out.untyped_storage().nbytes()
            while len(self._graph_bytes) > 256:
                del self._graph_bytes[next(iter(self._graph_bytes))]
        return Graph(out, x, leaves, known)

    def attention_scratch_bytes(self, batch: int, length: int, blocks: int = 1) -> int:
        """What attention over `length` new positions may allocate beyond the KV cache: scores
        and an ALiBi bias [B, heads, T, T] and a mask [B, 1, T, T], for each block held at once
        (one in a forward; every block of the call in a backward, whose autograd keeps them)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return blocks * batch * length * length * (2 * self.num_heads * itemsize + 1)

    def check_deep_prompts(self, deep: torch.Tensor, first: int, last: int) -> None:
        if deep.ndim not in (3, 4) or deep.shape[0] != last - first or deep.shape[-1] != self.hidden_size:
            raise TensorError(f"deep_prompts must be [{last - first} blocks, (batch,) prompt, {self.hidden_size}], "
                              f"got {list(deep.shape)}")

    def check_lora(self, lora: Lora, first: int, last: int) -> None:
        """Each `lora_A.<module>` [blocks, r, in] has its `lora_B.<module>` [blocks, out, r], for a
        module of these blocks; a TensorError names what does not fit."""
        block = self.blocks[first - self.start]
        for path, a, b in lora.pairs():
            try:
                mod = block.get_submodule(path)
            except AttributeError:
                known = sorted(n for n, m in block.named_modules() if isinstance(m, nn.Linear))
                raise TensorError(f"LoRA target {path!r} is not a module of these blocks (known: {known})") from None
            if not isinstance(mod, nn.Linear):
                raise TensorError(f"LoRA target {path!r} is not a linear layer")
            n = last - first
            if a.ndim != 3 or b.ndim != 3 or a.shape[0] != n or b.shape[0] != n or a.shape[1] != b.shape[2] \
                    or a.shape[2] != mod.in_features or b.shape[1] != mod.out_features:
                raise TensorError(
                    f"LoRA for {path}: want A [{n}, r, {mod.in_features}] and B [{n}, {mod.out_features}, r], "
                    f"got {list(a.shape)} and {list(b.shape)}")

    @contextlib.contextmanager
    def _lora_applied(self, lora: Lora | None, first: int, last: int):
        if lora is None or not lora.tensors:
            yield
            return
        handles = []
        try:
            for path, a, b in lora.pairs():
                for j, i in enumerate(range(first, last)):
                    mod = self.blocks[i - self.start].get_submodule(path)
                    aj, bj = a[j].to(self.device, self.dtype), b[j].to(self.device, self.dtype)
                    handles.append(mod.register_forward_hook(
                        lambda m, inp, out, aj=aj, bj=bj: out + lora.scaling * ((inp[0] @ aj.T) @ bj.T)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _run(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        key_mask: torch.Tensor | None,
        first: int,
        last: int,
        cache: SessionCache | None = None,
        deep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = hidden.to(self.device, self.dtype)
        position_ids = position_ids.to(self.device)
        T = x.shape[1]
        ctx = self._context(x, position_ids, key_mask, cache)
        for i in range(first, last):
            kv = cache.layer(i) if cache is not None else None
            if deep is not None:  # out of place: autograd needs x as it was
                prompt = deep[i - first].to(self.device, self.dtype)
                x = torch.cat([x[:, :prompt.shape[-2]] + prompt, x[:, prompt.shape[-2]:]], dim=1)
            x = self.blocks[i - self.start](x, ctx, kv)
        if cache is not None:
            cache.advance(T)
        return x

    def _context(self, x: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor | None,
                 cache: SessionCache | None) -> StepContext:
        """Masks and position encodings of a step of `x` [B, T, H] (recorded in its cache)."""
        T = x.shape[1]
        if cache is not None:
            start = cache.length
            cache.record(position_ids, key_mask)
            key_positions, full_mask = cache.key_positions(start + T), cache.key_mask(start + T)
        else:
            start, key_positions = 0, position_ids
            full_mask = None if key_mask is None or bool(key_mask.all()) else key_mask.to(self.device)
        return build_context(
            self.family, start=start, length=T, key_mask=full_mask, key_positions=key_positions,
            position_ids=position_ids, windows=self.windows, rotary=self.rotary, slopes=self.slopes, like=x,
        )

    @torch.inference_mode()
    def run_steps(self, steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, SessionCache]],
                  first: int, last: int) -> list[torch.Tensor]:
        """One step of each of several sessions through blocks [first, last), as one batch:
        `steps` are (hidden [B_i, T, H], position_ids [B_i, T], key_mask or None, cache), all of
        the same T. The projections and MLPs run once over every session's rows (a decode step
        reads the weights once, however many sessions it carries); attention runs per session
        over its own cache, each at its own length. Returns each session's output."""
        lengths = {h.shape[1] for h, _, _, _ in steps}
        if len(lengths) != 1:
            raise TensorError(f"steps of one batch must have one length, got {sorted(lengths)}")
        (T,) = lengths
        xs = [h.to(self.device, self.dtype) for h, _, _, _ in steps]
        parts, at = [], 0
        for x, (_, pos, mask, cache) in zip(xs, steps):
            rows = slice(at, at + x.shape[0])
            parts.append((rows, self._context(x, pos.to(self.device), mask, cache), cache))
            at = rows.stop
        x = torch.cat(xs)
        for i in range(first, last):
            block = cast(LlamaBlock | BloomBlock, self.blocks[i - self.start])
            x = block.forward_parts(x, [(rows, ctx, cache.layer(i)) for rows, ctx, cache in parts])
        for _, _, cache in parts:
            cache.advance(T)
        return [x[rows] for rows, _, _ in parts]
