"""Server-hosted LoRA adapters (`serve.adapters: {name: directory}`), read from PEFT's format
(adapter_config.json + adapter_model.safetensors) for the blocks a server holds. Clients pick
one by name for inference; it is applied the same way as a client's own LoRA (span.Lora)."""

from __future__ import annotations

import json
import math
import os
import re

import torch

from libswarm.checkpoint import Checkpoint
from libswarm.errors import ConfigError
from swarmd.runtime.span import Lora


def load_adapter(name: str, directory: str, checkpoint: Checkpoint, start: int, end: int) -> Lora:
    """The adapter's A and B for blocks [start, end), stacked per module as span.Lora wants them
    (blocks the adapter does not touch get zeros: no change there)."""
    from safetensors.torch import load_file

    where = f"serve.adapters.{name} ({directory})"
    try:
        with open(os.path.join(directory, "adapter_config.json")) as f:
            cfg = json.load(f)
        tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: not a PEFT adapter directory: {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA" or not isinstance(cfg.get("r"), int):
        raise ConfigError(f"{where}: only LoRA adapters are supported (peft_type LORA with r)")
    r, alpha = cfg["r"], float(cfg.get("lora_alpha", cfg["r"]))
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    pattern = re.compile(rf"^base_model\.model\.{re.escape(checkpoint.layer_prefix)}(\d+)\.(.+)\.lora_([AB])\.weight$")
    found: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for key, t in tensors.items():
        m = pattern.match(key)
        if m is None:
            raise ConfigError(f"{where}: tensor {key} is not a LoRA weight of this model's blocks")
        found.setdefault(m.group(2), {})[(int(m.group(1)), m.group(3))] = t
    out: dict[str, torch.Tensor] = {}
    for path, parts in found.items():
        a_shape = next(t.shape for (i, ab), t in parts.items() if ab == "A")
        b_shape = next(t.shape for (i, ab), t in parts.items() if ab == "B")
        a = [parts.get((i, "A"), torch.zeros(a_shape)) for i in range(start, end)]
        b = [parts.get((i, "B"), torch.zeros(b_shape)) for i in range(start, end)]
        out[f"lora_A.{path}"] = torch.stack(a).float()
        out[f"lora_B.{path}"] = torch.stack(b).float()
    return Lora(scaling, out)


def slice_lora(lora: Lora, span_start: int, first: int, last: int) -> Lora:
    return Lora(lora.scaling, {k: v[first - span_start:last - span_start] for k, v in lora.tensors.items()})
