"""Quantized weights for a server's blocks (serve.quant).

On a CPU, `int8` and `int4` are weight-only quantizations run by torch's own packed kernels
(PackedLinear): int8 with a scale per output row, int4 in groups of INT4_GROUP weights along
the input, each group with a scale and a minimum. The activations stay in the serving dtype, so
a row's output never depends on the other rows of its batch. The kernels read a quarter (int8)
or an eighth (int4) of float32's bytes per token, which is what a one-position step waits on.

Through bitsandbytes (CUDA; nf4 on CPU too): `int8` on CUDA is LLM.int8() (int8 weights with a
scale per output row; activation columns with an outlier above INT8_THRESHOLD run in 16 bits),
`nf4` is 4-bit NormalFloat with a scale per 64 weights, the scales themselves quantized again
(QLoRA's double quantization). int4 is CPU-only (on CUDA, nf4 is the 4-bit kind). Norms and
embeddings stay in the serving dtype.

The replaced layers are still `nn.Linear`s to the rest of the code: LoRA hooks, the checks of
a client's LoRA shapes and autograd for training (the gradient w.r.t. the input; the weights
stay frozen) work as on unquantized blocks."""

from __future__ import annotations

import logging

import torch
from torch import nn

from libswarm import quantized
from libswarm.errors import ConfigError

log = logging.getLogger("swarmd.runtime")

INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold (bitsandbytes' and transformers' default)


def _bnb():
    """bitsandbytes, imported on first use (it costs a second and logs about optional kernels)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as e:
        raise ConfigError(f"serve.quant needs bitsandbytes, which cannot be imported here ({e}); "
                          "install it (pip install bitsandbytes) or use serve.quant: none") from None
    return bitsandbytes


INT4_GROUP = 32  # weights of a row sharing an int4 scale and minimum: GGUF Q4_K and Q4_0 blocks
INT4_INNER_K_TILES = 2  # the CPU kernel's packing of the input dimension (it takes 2, 4 or 8)


def packed_on(mode: str, device: torch.device) -> bool:
    """Whether `mode` runs as PackedLinear (torch's CPU kernels) on `device`."""
    return device.type == "cpu" and mode in ("int8", "int4")


def rows_independent(mode: str, device: torch.device) -> bool:
    """Whether a row's output is the same whatever other rows share its batch. Not with
    LLM.int8() weights: bitsandbytes quantizes a batch's activations together (and runs in 16
    bits the columns holding an outlier in any row), so one session's activations would change
    another's outputs (tests/unit/test_quantization.py). Weight-only kinds keep rows apart."""
    return not (mode == "int8" and not packed_on(mode, device))


def int4_group(out_features: int, in_features: int, largest: int = INT4_GROUP) -> int | None:
    """The largest int4 group size up to `largest` the CPU kernel takes for a [out, in] weight
    (it wants out divisible by 16 and in by a group of 32, 64, 128 or 256), or None."""
    if out_features % 16:
        return None
    return next((g for g in (256, 128, 64, 32) if g <= largest and in_features % g == 0), None)


def served_quant(stored: str, asked: str, device: torch.device) -> str:
    """The weights' kind a server computes with, from the checkpoint's `stored` kind and
    serve.quant (`asked`). A checkpoint stored as int8/int4 is served as it is on a CPU (its
    values are what the model is: requantizing them could only lose), unless nf4 is asked; on a
    GPU it is dequantized to floats and then quantized as asked."""
    if stored != "none" and device.type == "cpu" and asked in ("none", "int8", "int4"):
        return stored
    return asked


def check_mode(mode: str, device: torch.device) -> None:
    if mode == "int4" and device.type != "cpu":
        raise ConfigError("serve.quant int4 runs on CPUs (torch's packed kernels); on a GPU use nf4")


# The packed kernels' fast paths take bfloat16 inputs: with float32 or float16 ones they fall to a
# scalar loop 20-40x slower than a float32 product (tools/bench_quant_kernels.py). So the layer
# rounds its input to bfloat16 for the product and gives its output back in the input's dtype.
KERNEL_DTYPE = torch.bfloat16


class _PackedMM(torch.autograd.Function):
    """x @ W.T through a packed kernel; the gradient w.r.t. x through the dequantized weight
    (the kernels have no backward; the weights are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        flat = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE).contiguous()
        if flat.data_ptr() % 64:  # a view into the middle of a buffer: the kernels want it aligned
            flat = flat.clone()
        if layer.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(flat, layer.qweight, layer.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, layer.qweight, layer.group_size,
                                                            layer.scales_and_zeros)
        return y.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)

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
            q = quantized.unpack_int4(packed).to(torch.int32)
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES))
            self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1)
                                 .contiguous().to(KERNEL_DTYPE))  # [k / group, n, 2]
        else:
            raise ValueError(f"packed weights of kind {kind!r}")
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)  # type: ignore[assignment]

    @classmethod
    def from_linear(cls, layer: nn.Linear, bits: int, compute_dtype: torch.dtype,
                    group_size: int = INT4_GROUP) -> PackedLinear:
        """`layer`'s float weight quantized: int8 per row, or int4 in groups of `group_size`."""
        w = layer.weight.data
        bias = None if layer.bias is None else layer.bias.data
        if bits == 8:
            return cls("int8", list(quantized.int8_rows(w)), bias, compute_dtype)
        if bits != 4:
            raise ValueError(f"packed weights of {bits} bits")
        n, k = w.shape
        if int4_group(n, k, group_size) != group_size:
            raise ValueError(f"the int4 kernel cannot take a [{n}, {k}] weight in groups of {group_size}")
        q, scale, zero = quantized.int4_groups(w, group_size)
        return cls("int4", [quantized.pack_int4(q), scale, zero], bias, compute_dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight [out, in] these packed values stand for, in float32."""
        if self.bits == 8:
            return self.qweight.float() * self.scales.float()[:, None]
        k, g = self.in_features, self.group_size
        eye = torch.eye(k, dtype=self.scales_and_zeros.dtype)  # the kernel's I @ W.T is W.T
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, g, self.scales_and_zeros).T.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _PackedMM.apply(x, self)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}{group}"


def quantize_linear(layer: nn.Linear, mode: str, device: torch.device, compute_dtype: torch.dtype,
                    packed: bool | None = None) -> nn.Linear:
    """`layer` (weights loaded, on the CPU) as a quantized layer of `mode` on `device`: packed
    for torch's CPU kernels, or bitsandbytes' (`packed`: which; by default, by the device)."""
    if packed if packed is not None else packed_on(mode, device):
        if mode == "int8":
            return PackedLinear.from_linear(layer, 8, compute_dtype)
        group = int4_group(layer.out_features, layer.in_features, INT4_GROUP)
        if group is None:  # a shape the kernel cannot take (only tiny test models have one): kept as it is
            log.debug("a [%d, %d] linear layer stays unquantized", layer.out_features, layer.in_features)
            return layer.to(device, compute_dtype)
        return PackedLinear.from_linear(layer, 4, compute_dtype, group)
    check_mode(mode, device)
    bnb = _bnb()
    bias = layer.bias is not None
    q: nn.Linear
    if mode == "nf4":
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(layer.weight.data.to(compute_dtype), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4", module=q)
        # On CPUs with AVX512-BF16, bitsandbytes repacks the weight at the first inference
        # forward into a layout whose kernel has no autograd: a training pass (Span.backward)
        # after it would get no gradient through the layer. Servers do both: keep the one layout.
        q.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
    elif mode == "int8":
        q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias, has_fp16_weights=False,
                                threshold=INT8_THRESHOLD, device="meta")
        q.weight = bnb.nn.Int8Params(layer.weight.data.to(compute_dtype), requires_grad=False,
                                     has_fp16_weights=False)
    else:
        raise ValueError(f"unknown quantization {mode!r}")
    if bias:
        assert layer.bias is not None
        q.bias = nn.Parameter(layer.bias.data.to(compute_dtype), requires_grad=False)
    return q.to(device)  # bitsandbytes quantizes the weight as it moves it


def quantize_block(block: nn.Module, mode: str, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    """Every nn.Linear of `block` replaced by its quantized form (in place); returns the block."""
    if mode == "none":
        return block
    check_mode(mode, device)
    for child in list(block.modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is nn.Linear:
                setattr(child, attr, quantize_linear(sub, mode, device, compute_dtype))
    return block


def module_bytes(module: nn.Module) -> int:
    """What a module's weights take in memory: parameters and buffers, with a quantized
    weight's scales (its quant state) counted too."""
    total = 0
    seen: set[int] = set()
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:  # nf4: absmax (itself quantized) and its code books
            nested = getattr(state, "state2", None)
            for part in (state.absmax, state.code, getattr(nested, "absmax", None), getattr(nested, "code", None)):
                if isinstance(part, torch.Tensor):
                    total += part.numel() * part.element_size()
        scb = getattr(t, "SCB", None)
        if isinstance(scb, torch.Tensor):  # int8: a scale per output row
            total += scb.numel() * scb.element_size()
    return total
