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
computes with is exactly what the file says (PackedLinear, below). config.json's `swarm_quantized` names the coarsest
kind stored ("int4" or "int8"); it changes the model's id (libswarm/checkpoint.py), so a swarm
never mixes these weights with the float ones they came from."""

from __future__ import annotations

import torch
from torch import nn

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


# --- torch's packed CPU kernels for these weights (servers' blocks; the app's LM head) -----------

INT4_INNER_K_TILES = 2  # the CPU kernel's packing of the input dimension (it takes 2, 4 or 8)


def int4_group(out_features: int, in_features: int, largest: int = 32) -> int | None:
    """The largest int4 group size up to `largest` the CPU kernel takes for a [out, in] weight
    (it wants out divisible by 16 and in by a group of 32, 64, 128 or 256), or None."""
    if out_features % 16:
        return None
    return next((g for g in (256, 128, 64, 32) if g <= largest and in_features % g == 0), None)


# The packed kernels' fast paths take bfloat16 inputs: with float32 or float16 ones they fall to a
# scalar loop 20-40x slower than a float32 product (tools/bench_quant_kernels.py). So the layer
# rounds its input to bfloat16 for the product and gives its output back in the input's dtype.
KERNEL_DTYPE = torch.bfloat16


def _packed_mm(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
    """x @ W.T through `layer`'s packed kernel, in x's dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE).contiguous()
    if flat.data_ptr() % 64:  # a view into the middle of a buffer: the kernels want it aligned
        flat = flat.clone()
    if layer.bits == 8:
        y = torch.ops.aten._weight_int8pack_mm(flat, layer.qweight, layer.scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, layer.qweight, layer.group_size, layer.scales_and_zeros)
    return y.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)


class _PackedMM(torch.autograd.Function):
    """_packed_mm with a gradient w.r.t. x, through the dequantized weight (the kernels have no
    backward; the weights are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return _packed_mm(x, layer)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        w = ctx.layer.dequantized().to(grad.dtype)
        return grad @ w, None


class PackedLinear(nn.Linear):
    """A linear layer whose weights are int8 per output row, or int4 per group of the input, in
    the layout of torch's CPU weight-only kernels, their scales in bfloat16 (KERNEL_DTYPE);
    inputs and outputs in float32, bfloat16 or float16, the bias in `compute_dtype`. Built from
    a checkpoint's stored parts (libswarm/quantized.py) or from a float layer (`from_linear`)."""

    qweight: torch.Tensor  # int8 [out, in]; int4: the kernel's packing, uint8 [out, in / 2]
    scales: torch.Tensor  # int8: [out]
    scales_and_zeros: torch.Tensor  # int4: [in / group, out, 2]

    def __init__(self, kind: str, parts: list[torch.Tensor], bias: torch.Tensor | None,
                 compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        if kind == "int8":
            q, scale = parts
            self.out_features, self.in_features = q.shape
            self.bits, self.group_size = 8, self.in_features
            # copies of their own: a tensor read from a file may start anywhere in its buffer, and
            # the kernel's vector loads need torch's own (64-byte) alignment (unaligned, it crashes)
            self.register_buffer("qweight", q.clone(memory_format=torch.contiguous_format))
            self.register_buffer("scales", scale.to(KERNEL_DTYPE).clone(memory_format=torch.contiguous_format))
        elif kind == "int4":
            packed, scale, zero = parts
            n, k = packed.shape[0], 2 * packed.shape[1]
            group = k // scale.shape[1]
            if int4_group(n, k, group) != group:
                raise ValueError(f"the int4 kernel cannot take a [{n}, {k}] weight in groups of {group}")
            self.out_features, self.in_features = n, k
            self.bits, self.group_size = 4, group
            q = unpack_int4(packed).to(torch.int32)
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES))
            self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1)
                                 .contiguous().to(KERNEL_DTYPE))  # [k / group, n, 2]
        else:
            raise ValueError(f"packed weights of kind {kind!r}")
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)  # type: ignore[assignment]

    @classmethod
    def from_linear(cls, layer: nn.Linear, bits: int, compute_dtype: torch.dtype,
                    group_size: int = 32) -> PackedLinear:
        """`layer`'s float weight quantized: int8 per row, or int4 in groups of `group_size`."""
        w = layer.weight.data
        bias = None if layer.bias is None else layer.bias.data
        if bits == 8:
            return cls("int8", list(int8_rows(w)), bias, compute_dtype)
        if bits != 4:
            raise ValueError(f"packed weights of {bits} bits")
        n, k = w.shape
        if int4_group(n, k, group_size) != group_size:
            raise ValueError(f"the int4 kernel cannot take a [{n}, {k}] weight in groups of {group_size}")
        q, scale, zero = int4_groups(w, group_size)
        return cls("int4", [pack_int4(q), scale, zero], bias, compute_dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight [out, in] these packed values stand for, in float32."""
        if self.bits == 8:
            return self.qweight.float() * self.scales.float()[:, None]
        k, g = self.in_features, self.group_size
        eye = torch.eye(k, dtype=self.scales_and_zeros.dtype)  # the kernel's I @ W.T is W.T
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, g, self.scales_and_zeros).T.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a Python autograd.Function costs ~18 us a call, more than a decode step's product on a
        # small model: only a pass that takes gradients goes through it
        y = _PackedMM.apply(x, self) if x.requires_grad and torch.is_grad_enabled() else _packed_mm(x, self)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}{group}"
