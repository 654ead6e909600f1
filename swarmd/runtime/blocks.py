"""Transformer blocks of the supported families, written for a server that owns its KV cache.

Each block computes exactly what the Hugging Face layer of the same family computes (tests
compare them), but reads and writes a preallocated per-session cache instead of a growing
one, and takes its attention mask from a StepContext built once per step for all blocks.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from libswarm.errors import ModelError
from libswarm.layers import GemmaRMSNorm, RMSNorm, alibi_slopes
from swarmd.runtime.kvint8 import Int8KV

# per layer: K, V [B, kv_heads, max_length, head_dim] in the serving dtype, or their int8 form
KV = tuple[torch.Tensor, torch.Tensor] | Int8KV
# Rows of a step's batch that share one cache and one context: a session's. A step of one session
# is one part; a batched step of several sessions (peer/server.py) has one part per session.
Part = tuple[slice, "StepContext", "KV | None"]


@dataclass
class StepContext:
    """What every block of a span needs for one step, computed once."""

    start: int  # cache slot of the first new position
    length: int  # new positions this step (T)
    masks: dict[int | None, torch.Tensor | None]  # sliding window -> bool [B, 1, T, L], None = no mask
    causal: bool  # no mask and a fresh prefix: let SDPA apply the causal mask itself
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [B, T, head_dim]
    # Gemma 3: cos, sin per layer type (sliding layers have a rope base of their own)
    ropes: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    alibi: torch.Tensor | None = None  # float [B, heads, T|1, L] with masked slots at -inf
    # a decode step with static shapes (build_static_context): the cache slot of the new position
    # as a device tensor [1]; keys/values are written there and attention spans the cache's
    # first `attend` slots (a bucket that holds the slot)
    slot: torch.Tensor | None = None
    attend: int = 0


def _write_cache(kv: KV | None, k: torch.Tensor, v: torch.Tensor,
                 ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Store this step's keys/values at [start, start+T) and return all keys/values so far
    (with a static slot: at that slot, and return the first ctx.attend slots)."""
    if kv is None:
        return k, v
    if ctx.slot is not None:
        if isinstance(kv, Int8KV):
            return kv.write_at(k, v, ctx.slot, ctx.attend)
        kv[0].index_copy_(2, ctx.slot, k)
        kv[1].index_copy_(2, ctx.slot, v)
        return kv[0][:, :, :ctx.attend], kv[1][:, :, :ctx.attend]
    start = ctx.start
    if isinstance(kv, Int8KV):
        return kv.write(k, v, start)
    kbuf, vbuf = kv
    end = start + k.shape[2]
    kbuf[:, :, start:end] = k
    vbuf[:, :, start:end] = v
    return kbuf[:, :, :end], vbuf[:, :, :end]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary_attention(q_all: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, parts: list[Part],
                      ropes: list, window: int | None, scale: float) -> torch.Tensor:
    """Rotary embeddings over all rows at once (each part's rows at their own positions: `ropes`,
    a (cos, sin) per part), then attention per part over its own cache. q/k/v [B, heads, T, d];
    returns [B, heads, T, d]."""
    assert all(r is not None for r in ropes) and len(ropes) == len(parts)
    cos = (ropes[0][0] if len(ropes) == 1 else torch.cat([c for c, _ in ropes])).unsqueeze(1)
    sin = (ropes[0][1] if len(ropes) == 1 else torch.cat([s for _, s in ropes])).unsqueeze(1)
    q_all = q_all * cos + _rotate_half(q_all) * sin
    k_all = k_all * cos + _rotate_half(k_all) * sin
    gqa = k_all.shape[1] != q_all.shape[1]
    outs = []
    for rows, ctx, kv in parts:
        q, k, v = q_all[rows], k_all[rows], v_all[rows]
        k, v = _write_cache(kv, k, v, ctx)
        mask = ctx.masks.get(window)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=ctx.causal and mask is None,
                                                   scale=scale, enable_gqa=gqa))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class _Projections(nn.Module):
    """A named group of linear layers, so that parameter names match the checkpoint's."""

    def __init__(self, **layers: nn.Linear):
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)

    def __getattr__(self, name: str) -> nn.Linear:  # typed access to the registered layers
        return super().__getattr__(name)  # type: ignore[return-value]


QK_NORM_TYPES = ("qwen3",)


class LlamaBlock(nn.Module):
    """Llama / Mistral / Qwen2 / Qwen3 decoder layer (pre-norm, rotary, GQA, SwiGLU-style MLP;
    Qwen3's per-head norms of queries and keys)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.window = sliding_window_of(config, layer_idx)
        hidden, inter = config.hidden_size, config.intermediate_size
        qkv_bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        o_bias = bool(getattr(config, "attention_bias", False))
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.self_attn = _Projections(
            q_proj=nn.Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias),
            k_proj=nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias),
            v_proj=nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias),
            o_proj=nn.Linear(self.num_heads * self.head_dim, hidden, bias=o_bias),
        )
        # Qwen3: each head's queries and keys RMS-normed (over head_dim) before the rotary
        self.qk_norm = config.model_type in QK_NORM_TYPES
        if self.qk_norm:
            self.self_attn.add_module("q_norm", RMSNorm(self.head_dim, config.rms_norm_eps))
            self.self_attn.add_module("k_norm", RMSNorm(self.head_dim, config.rms_norm_eps))
        self.mlp = _Projections(
            gate_proj=nn.Linear(hidden, inter, bias=mlp_bias),
            up_proj=nn.Linear(hidden, inter, bias=mlp_bias),
            down_proj=nn.Linear(inter, hidden, bias=mlp_bias),
        )
        from transformers.activations import ACT2FN

        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor, ctx: StepContext, kv: KV | None) -> torch.Tensor:
        return self.forward_parts(x, [(slice(0, x.shape[0]), ctx, kv)])

    def forward_parts(self, x: torch.Tensor, parts: list[Part]) -> torch.Tensor:
        """x [B, T, hidden] whose rows are the parts' (in order): the projections and the MLP run
        once over all rows (the weights are read once), attention per part over its own cache."""
        B, T, _ = x.shape
        attn = self.self_attn
        h = self.input_layernorm(x)
        q_all = attn.q_proj(h).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k_all = attn.k_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_all = attn.v_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q_all, k_all = attn.q_norm(q_all), attn.k_norm(k_all)
        out = _rotary_attention(q_all, k_all, v_all, parts, [ctx.rope for _, ctx, _ in parts], self.window,
                                self.head_dim**-0.5)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        return x + self.feed_forward(self.post_attention_layernorm(x))

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp.down_proj(self.act(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


class MixtralBlock(LlamaBlock):
    """Mixtral decoder layer: Llama's attention, and a sparse mixture of experts for the MLP:
    a router picks each position's top num_experts_per_tok of num_local_experts SwiGLU experts
    (softmax in float32, the picked weights renormalized) and sums their outputs so weighted.
    Every expert of the block lives here, as the checkpoint names them
    (block_sparse_moe.experts.N.w1/w2/w3, block_sparse_moe.gate)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        del self.mlp
        hidden, inter = config.hidden_size, config.intermediate_size
        self.top_k = config.num_experts_per_tok
        self.block_sparse_moe = _Projections(gate=nn.Linear(hidden, config.num_local_experts, bias=False))
        self.block_sparse_moe.add_module("experts", nn.ModuleList(
            _Projections(w1=nn.Linear(hidden, inter, bias=False), w2=nn.Linear(inter, hidden, bias=False),
                         w3=nn.Linear(hidden, inter, bias=False))
            for _ in range(config.num_local_experts)))

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        moe = self.block_sparse_moe
        probs = F.softmax(moe.gate(x).float(), dim=-1)
        weights, picked = torch.topk(probs, self.top_k, dim=-1)
        weights /= weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        experts: nn.ModuleList = moe.experts  # type: ignore[assignment]
        for e in picked.unique().tolist():  # ascending: each position's experts add up in one order
            rows, slot = torch.where(picked == e)
            expert = experts[e]
            y = expert.w2(self.act(expert.w1(x[rows])) * expert.w3(x[rows])) * weights[rows, slot, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out.view(shape)


class Gemma3Block(nn.Module):
    """Gemma 3 decoder layer: Gemma's norms (weights stored less one) before and after both
    attention and MLP, per-head q/k norms, queries scaled by query_pre_attn_scalar ** -0.5,
    sliding layers with a rotary base of their own, a GELU (tanh) gated MLP."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        if getattr(config, "attn_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None):
            raise ModelError("Gemma with logit soft-capping (Gemma 2) is not served")
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.layer_type = config.layer_types[layer_idx]
        self.window = sliding_window_of(config, layer_idx)
        self.scale = config.query_pre_attn_scalar ** -0.5
        hidden, inter, eps = config.hidden_size, config.intermediate_size, config.rms_norm_eps
        bias = config.attention_bias
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            self.add_module(name, GemmaRMSNorm(hidden, eps))
        self.self_attn = _Projections(
            q_proj=nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias),
            k_proj=nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias),
            v_proj=nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias),
            o_proj=nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias),
        )
        self.self_attn.add_module("q_norm", GemmaRMSNorm(self.head_dim, eps))
        self.self_attn.add_module("k_norm", GemmaRMSNorm(self.head_dim, eps))
        self.mlp = _Projections(gate_proj=nn.Linear(hidden, inter, bias=False),
                                up_proj=nn.Linear(hidden, inter, bias=False),
                                down_proj=nn.Linear(inter, hidden, bias=False))
        from transformers.activations import ACT2FN

        self.act = ACT2FN[config.hidden_activation]

    def forward(self, x: torch.Tensor, ctx: StepContext, kv: KV | None) -> torch.Tensor:
        return self.forward_parts(x, [(slice(0, x.shape[0]), ctx, kv)])

    def forward_parts(self, x: torch.Tensor, parts: list[Part]) -> torch.Tensor:
        """As LlamaBlock.forward_parts."""
        B, T, _ = x.shape
        attn = self.self_attn
        h = self.input_layernorm(x)  # type: ignore[operator]
        q_all = attn.q_norm(attn.q_proj(h).view(B, T, self.num_heads, self.head_dim).transpose(1, 2))
        k_all = attn.k_norm(attn.k_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2))
        v_all = attn.v_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        ropes = [ctx.ropes[self.layer_type] if ctx.ropes is not None else None for _, ctx, _ in parts]
        out = _rotary_attention(q_all, k_all, v_all, parts, ropes, self.window, self.scale)
        x = x + self.post_attention_layernorm(attn.o_proj(out.transpose(1, 2).reshape(B, T, -1)))  # type: ignore[operator]
        h = self.pre_feedforward_layernorm(x)  # type: ignore[operator]
        h = self.mlp.down_proj(self.act(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))
        return x + self.post_feedforward_layernorm(h)  # type: ignore[operator]


def _bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    # BLOOM's tanh approximation of GELU, with its constant sqrt(2/pi) ~ 0.79788456
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class BloomBlock(nn.Module):
    """BLOOM block: fused QKV, ALiBi position bias, LayerNorms, GELU MLP."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.n_head
        self.num_kv_heads = self.num_heads
        self.head_dim = hidden // self.num_heads
        self.window = None
        self.post_ln_residual = bool(config.apply_residual_connection_post_layernorm)
        eps = config.layer_norm_epsilon
        self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.self_attention = _Projections(
            query_key_value=nn.Linear(hidden, 3 * hidden), dense=nn.Linear(hidden, hidden)
        )
        self.mlp = _Projections(
            dense_h_to_4h=nn.Linear(hidden, 4 * hidden), dense_4h_to_h=nn.Linear(4 * hidden, hidden)
        )

    def forward(self, x: torch.Tensor, ctx: StepContext, kv: KV | None) -> torch.Tensor:
        return self.forward_parts(x, [(slice(0, x.shape[0]), ctx, kv)])

    def forward_parts(self, x: torch.Tensor, parts: list[Part]) -> torch.Tensor:
        """As LlamaBlock.forward_parts."""
        B, T, H = x.shape
        ln = self.input_layernorm(x)
        residual = ln if self.post_ln_residual else x
        fused = self.self_attention.query_key_value(ln).view(B, T, self.num_heads, 3, self.head_dim)
        outs = []
        for rows, ctx, kv in parts:
            q, k, v = (fused[rows, :, :, i, :].transpose(1, 2) for i in range(3))
            k, v = _write_cache(kv, k, v, ctx)
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.alibi, scale=self.head_dim**-0.5))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        x = self.self_attention.dense(out.transpose(1, 2).reshape(B, T, H)) + residual
        ln = self.post_attention_layernorm(x)
        residual = ln if self.post_ln_residual else x
        return self.mlp.dense_4h_to_h(_bloom_gelu(self.mlp.dense_h_to_4h(ln))) + residual


BLOCK_CLASSES: dict[str, type[LlamaBlock] | type[BloomBlock]] = {"llama": LlamaBlock, "bloom": BloomBlock}


def block_class(family: str, config) -> type[LlamaBlock] | type[BloomBlock] | type[Gemma3Block]:
    """The block of a family; in the Llama family, Mixtral's when the config has experts and
    Gemma 3's for its model type."""
    if family == "llama" and config.model_type == "gemma3_text":
        return Gemma3Block
    if family == "llama" and getattr(config, "num_local_experts", None):
        return MixtralBlock
    return BLOCK_CLASSES[family]


def sliding_window_of(config, layer_idx: int) -> int | None:
    """The attention window of a layer as the config says, or None for full attention."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if config.model_type == "qwen2":  # configs from before layer_types existed
        use = getattr(config, "use_sliding_window", False)
        return window if use and layer_idx >= getattr(config, "max_window_layers", 0) else None
    return window


class Rotary(nn.Module):
    """cos/sin for rotary embeddings, delegated to the family's own transformers module so that
    every rope scaling type its config names (linear, dynamic, yarn, llama3, ...) is honoured."""

    def __init__(self, config):
        super().__init__()
        mt = config.model_type
        mt = mt.removesuffix("_text")  # gemma3_text lives in transformers.models.gemma3
        module = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
        cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
        self.impl: nn.Module = cls(config=config)
        # Gemma 3: one rotary per layer type (its forward takes the type)
        self.layer_types = sorted(set(config.layer_types)) if mt == "gemma3" else None

    def forward(self, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layer_types is not None:
            return self.impl(like, position_ids, "full_attention")
        return self.impl(like, position_ids)

    def per_type(self, like: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos, sin for each layer type (Gemma 3's), in `like`'s dtype."""
        assert self.layer_types is not None
        out = {}
        for t in self.layer_types:
            cos, sin = self.impl(like, position_ids, t)
            out[t] = (cos.to(like.dtype), sin.to(like.dtype))
        return out


def build_context(
    family: str,
    *,
    start: int,
    length: int,
    key_mask: torch.Tensor | None,
    key_positions: torch.Tensor,
    position_ids: torch.Tensor,
    windows: set[int | None],
    rotary: Rotary | None,
    slopes: torch.Tensor | None,
    like: torch.Tensor,
) -> StepContext:
    """Masks and position encodings for one step.

    key_mask: bool [B, L] (L = start + length), False for padding; None when nothing is padded.
    key_positions: int [B, L], the position id of each cached slot (ALiBi needs them).
    position_ids: int [B, T] for the new positions.
    """
    L = start + length
    device = like.device
    masks: dict[int | None, torch.Tensor | None] = {}
    need_mask = key_mask is not None or (length > 1 and start > 0)
    q_slots = torch.arange(start, L, device=device)[:, None]  # [T, 1]
    k_slots = torch.arange(L, device=device)[None, :]  # [1, L]
    for w in windows:
        if not need_mask and (w is None or L <= w):
            masks[w] = None
            continue
        allowed = k_slots <= q_slots
        if w is not None:
            allowed = allowed & (k_slots > q_slots - w)
        m = allowed[None, None]  # [1, 1, T, L]
        if key_mask is not None:
            m = m & key_mask[:, None, None, :]
            # a padded query would see no key at all (NaN); let it see itself, its output is never used
            m = m | (k_slots == q_slots)[None, None]
        masks[w] = m
    causal = not need_mask and start == 0 and length > 1
    ctx = StepContext(start=start, length=length, masks=masks, causal=causal)
    if family == "llama":
        assert rotary is not None
        cos, sin = rotary(like, position_ids)
        ctx.rope = (cos.to(like.dtype), sin.to(like.dtype))
        if rotary.layer_types is not None:
            ctx.ropes = rotary.per_type(like, position_ids)
    else:
        assert slopes is not None
        # ALiBi bias depends on the key's position only (a per-query constant cancels in softmax)
        bias = slopes.to(device)[None, :, None, None] * key_positions[:, None, None, :L].float()
        bool_mask = masks.get(None)
        if bool_mask is None and (causal or length > 1):
            bool_mask = (k_slots <= q_slots)[None, None]
        if bool_mask is not None:
            bias = bias.masked_fill(~bool_mask, float("-inf"))
        ctx.alibi = bias.to(like.dtype)
        ctx.causal = False
    return ctx


def build_static_context(*, slot: torch.Tensor, key_mask: torch.Tensor, position_ids: torch.Tensor,
                         windows: set[int | None], rotary: Rotary, like: torch.Tensor) -> StepContext:
    """A one-position decode step (Llama family) whose shapes do not depend on the session's
    length, so that it can be captured once as a CUDA graph and replayed at every position of
    a bucket: the new keys/values go to cache slot `slot` (a device tensor [1]) and attention
    spans the first `key_mask.shape[1]` slots of the cache (the bucket), those after `slot`
    masked out.

    key_mask: bool [B, bucket], the cache's own mask of those slots, False for padding (slots
    not yet written are masked by position). position_ids: [B, 1]."""
    L = key_mask.shape[1]
    k_slots = torch.arange(L, device=like.device)
    seen = k_slots <= slot  # [L]
    padded = key_mask[:, None, None, :]  # [B, 1, 1, L]
    masks: dict[int | None, torch.Tensor | None] = {}
    for w in windows:
        allowed = seen if w is None else seen & (k_slots > slot - w)
        masks[w] = allowed[None, None, None, :] & padded
    cos, sin = rotary(like, position_ids)
    return StepContext(start=-1, length=1, masks=masks, causal=False, rope=(cos.to(like.dtype), sin.to(like.dtype)),
                       slot=slot, attend=L)


MIN_BUCKET = 64


def attend_bucket(length: int, max_length: int) -> int:
    """The cache slots a static-shape step at slot `length` attends over: the smallest power
    of two (at least MIN_BUCKET) above `length`, at most the cache's size. A step costs what
    its bucket holds, not the session's max_length, for log2(max_length / 64) graphs a session."""
    bucket = MIN_BUCKET
    while bucket <= length:
        bucket *= 2
    return min(bucket, max_length)


def make_slopes(config, family: str) -> torch.Tensor | None:
    return alibi_slopes(config.n_head) if family == "bloom" else None
