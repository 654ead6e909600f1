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

from libswarm.errors import ConfigError
from libswarm.quantized import PackedLinear, int4_group

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


def packed_on(mode: str, device: torch.device) -> bool:
    """Whether `mode` runs as PackedLinear (torch's CPU kernels) on `device`."""
    return device.type == "cpu" and mode in ("int8", "int4")


def rows_independent(mode: str, device: torch.device) -> bool:
    """Whether a row's output is the same whatever other rows share its batch. Not with
    LLM.int8() weights: bitsandbytes quantizes a batch's activations together (and runs in 16
    bits the columns holding an outlier in any row), so one session's activations would change
    another's outputs (tests/unit/test_quantization.py). Weight-only kinds keep rows apart."""
    return not (mode == "int8" and not packed_on(mode, device))


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
