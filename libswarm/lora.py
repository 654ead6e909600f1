"""LoRA adapters trained by the client: the A and B matrices of every target module of every
block live here, as ordinary parameters in the user's optimizer. Forward and backward send
them with the hidden states; servers apply them for that call only and return their
gradients. Saved in PEFT's format, they load with `peft.PeftModel.from_pretrained` on the
full local model."""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

# module name (as PEFT's target_modules says it) -> its path inside one block
TARGETS = {
    "llama": {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
              "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
              "down_proj": "mlp.down_proj"},
    "bloom": {"query_key_value": "self_attention.query_key_value", "dense": "self_attention.dense",
              "dense_h_to_4h": "mlp.dense_h_to_4h", "dense_4h_to_h": "mlp.dense_4h_to_h"},
}


def linear_shapes(config, family: str) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target module of a block."""
    h = config.hidden_size
    if family == "bloom":
        return {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, 4 * h),
                "dense_4h_to_h": (4 * h, h)}
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or h // heads
    inter = config.intermediate_size
    return {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


class LoraAdapters(nn.Module):
    def __init__(self, config, family: str, num_layers: int, rank: int, alpha: float, target_modules):
        super().__init__()
        known = TARGETS[family]
        targets = list(target_modules)
        unknown = [t for t in targets if t not in known]
        if unknown or not targets:
            raise ValueError(f"unknown LoRA target modules {unknown} (this {family} model has {sorted(known)})")
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        self.family, self.rank, self.alpha, self.targets = family, rank, float(alpha), targets
        self.num_layers = num_layers
        shapes = linear_shapes(config, family)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for t in targets:
            fan_in, fan_out = shapes[t]
            a = torch.empty(num_layers, rank, fan_in)
            for i in range(num_layers):  # as PEFT initializes lora_A; B starts at zero
                nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
            self.A[t] = nn.Parameter(a)
            self.B[t] = nn.Parameter(torch.zeros(num_layers, fan_out, rank))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def named_wire(self) -> list[tuple[str, nn.Parameter]]:
        """(tensor name on the wire, parameter), in a fixed order."""
        paths = TARGETS[self.family]
        out = []
        for t in self.targets:
            out.append((f"lora_A.{paths[t]}", self.A[t]))
            out.append((f"lora_B.{paths[t]}", self.B[t]))
        return out

    def save(self, directory: str, base_model: str, layer_prefix: str) -> None:
        """adapter_config.json + adapter_model.safetensors, as PEFT writes them."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        paths = TARGETS[self.family]
        tensors = {}
        for t in self.targets:
            for i in range(self.num_layers):
                stem = f"base_model.model.{layer_prefix}{i}.{paths[t]}"
                tensors[f"{stem}.lora_A.weight"] = self.A[t][i].detach().contiguous().clone()
                tensors[f"{stem}.lora_B.weight"] = self.B[t][i].detach().contiguous().clone()
        save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": 0.0, "target_modules": self.targets,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
            "init_lora_weights": True, "use_rslora": False,
        }
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
