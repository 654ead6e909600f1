"""Quantized weights for a server's blocks (serve.quant), through bitsandbytes.

Every linear layer of a block is replaced, once its weights are loaded, by bitsandbytes' own:
`int8` is LLM.int8() (int8 weights with a scale per output row; activation columns with an
outlier above INT8_THRESHOLD run in 16 bits), `nf4` is 4-bit NormalFloat with a scale per 64
weights, the scales themselves quantized again (QLoRA's double quantization). Norms and
embeddings stay in the serving dtype. bitsandbytes runs both on CUDA and on CPU (on CPU it
saves memory, not time).

The replaced layers are still `nn.Linear`s to the rest of the code: LoRA hooks, the checks of
a client's LoRA shapes and autograd for training (the gradient w.r.t. the input; the weights
stay frozen) work as on unquantized blocks."""

from __future__ import annotations

import logging

import torch
from torch import nn

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


def quantize_linear(layer: nn.Linear, mode: str, device: torch.device, compute_dtype: torch.dtype) -> nn.Linear:
    """`layer` (weights loaded, on the CPU) as a bitsandbytes layer of `mode` on `device`."""
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
