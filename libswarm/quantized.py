"""Quantized linear weights in a checkpoint: the format, and the arithmetic shared by the
converter (a GGUF's own quantization kept, libswarm/convert.py) and the servers' packed layers
(swarmd/runtime/quant.py), so that both mean the same numbers by the same bytes.

A block's linear weight `P.weight` [out, in] may be stored, instead of as floats, as

- int8: `P.weight.q8` int8 [out, in] and `P.weight.q8_scales` bfloat16 [out];
  the weight is q * scale (of its row);
- int4: `P.weight.q4` uint8 [out, in / 2] (two values a byte: the even column in the low nibble,
  the odd one in the high), `P.weight.q4_scales` and `P.weight.q4_zeros` bfloat16
  [out, in / group]; the weight is (q - 8) * scale + zero (of its row's group), the layout of
  torch's CPU int4 kernel, whose `zero` is the group's value at q = 8.

The scales are bfloat16 because the CPU kernels take them so (their fast path): what a server
computes with is exactly what the file says. config.json's `swarm_quantized` names the coarsest
kind stored ("int4" or "int8"); it changes the model's id (libswarm/checkpoint.py), so a swarm
never mixes these weights with the float ones they came from."""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.bfloat16
CONFIG_KEY = "swarm_quantized"
KINDS = ("int8", "int4")
SUFFIXES = {"int8": (".q8", ".q8_scales"), "int4": (".q4", ".q4_scales", ".q4_zeros")}


def stored_kind(name: str) -> tuple[str, str] | None:
    """(the float weight's name, kind) when `name` is the first part of a quantized weight."""
    for kind, (first, *_) in SUFFIXES.items():
        if name.endswith(first):
            return name[: -len(first)], kind
    return None


def part_names(weight: str, kind: str) -> list[str]:
    return [weight + s for s in SUFFIXES[kind]]


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [out, in] as int8 with a scale per row (its largest |value| at 127):
    (q int8 [out, in], scales SCALE_DTYPE [out]); q is rounded against the stored scale."""
    w = w.float()
    scale = (w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127).to(SCALE_DTYPE)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int4_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float weight [out, in] as int4 in groups of `group` along the input, each from its
    minimum to its maximum in 16 steps: (q uint8 [out, in] of 0..15, scales, zeros
    SCALE_DTYPE [out, in / group]); q is rounded against the stored scale and zero."""
    w = w.float()
    n, k = w.shape
    g = w.view(n, k // group, group)
    low, high = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(SCALE_DTYPE)
    zero = (low + 8 * scale.float()).to(SCALE_DTYPE)
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    return q.to(torch.uint8).view(n, k), scale, zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values 0..15 as bytes [out, in / 2]: the even column low, the odd one high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """pack_int4 undone: [out, in / 2] bytes to [out, in] values 0..15 (uint8)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1)


def dequantize(kind: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The float32 weight [out, in] the stored parts of `kind` stand for."""
    if kind == "int8":
        q, scale = parts
        return q.float() * scale.float()[:, None]
    packed, scale, zero = parts
    q = unpack_int4(packed).float()
    n, k = q.shape
    group = k // scale.shape[1]
    g = (q.view(n, k // group, group) - 8) * scale.float()[..., None] + zero.float()[..., None]
    return g.view(n, k)


def check_parts(name: str, kind: str, parts: list[torch.Tensor]) -> str | None:
    """Why the stored parts of a quantized weight are malformed, or None."""
    if kind == "int8":
        q, scale = parts
        if q.dtype != torch.int8 or q.dim() != 2 or scale.dtype != SCALE_DTYPE or tuple(scale.shape) != q.shape[:1]:
            return f"{name}: int8 parts of dtypes {q.dtype}/{scale.dtype}, shapes {list(q.shape)}/{list(scale.shape)}"
        return None
    packed, scale, zero = parts
    ok = (packed.dtype == torch.uint8 and packed.dim() == 2 and scale.dtype == zero.dtype == SCALE_DTYPE
          and scale.dim() == 2 and scale.shape == zero.shape and scale.shape[0] == packed.shape[0]
          and scale.shape[1] > 0 and (2 * packed.shape[1]) % scale.shape[1] == 0)
    if not ok:
        return (f"{name}: int4 parts of dtypes {packed.dtype}/{scale.dtype}/{zero.dtype}, shapes "
                f"{list(packed.shape)}/{list(scale.shape)}/{list(zero.shape)}")
    return None
