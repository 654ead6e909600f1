"""A local Hugging Face checkpoint directory: its config, its model id, and reading only the
tensors asked for (single safetensors file, a sharded index, or several files)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import cached_property

import torch

from libswarm.errors import ModelError

# Supported architectures -> family. The Llama family covers models that differ from Llama
# only in ways their config states (GQA, q/k/v biases, sliding windows, tied embeddings, rope scaling).
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "BloomForCausalLM": "bloom",
}

# Config keys that do not change what the model computes: left out of the model id so that
# the same weights saved by another transformers version, or in another dtype, match.
_ID_IGNORED_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
                    "architectures", "model_id"}

_LAYER_RE = re.compile(r"^(.*?)(?:layers|h)\.(\d+)\.(.+)$")


class Checkpoint:
    def __init__(self, model_dir: str):
        from libswarm.models import KNOWN, MODEL_TYPES, resolve_model

        self.dir = resolve_model(model_dir)  # a path, or a short name of a model got by `swarmctl model get`
        if not os.path.isdir(self.dir):
            name = os.path.basename(self.dir)
            raise ModelError(f"model directory {self.dir} does not exist" + (
                f"; get it with `swarmctl model get {name}`" if name in KNOWN else ""))
        path = os.path.join(self.dir, "config.json")
        try:
            with open(path) as f:
                self.raw_config = json.load(f)
        except FileNotFoundError:
            raise ModelError(f"{path} is missing: the model directory must hold a Hugging Face checkpoint") from None
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read {path}: {e}") from None
        if not isinstance(self.raw_config, dict):
            raise ModelError(f"{path} must hold a JSON object")
        archs = self.raw_config.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if not archs:  # as HF's Auto classes do: the model type says the class (GGUF-converted configs)
            arch = MODEL_TYPES.get(str(self.raw_config.get("model_type")))
        if arch is None:
            raise ModelError(
                f"unsupported architecture {archs or self.raw_config.get('model_type')!r} in {path}; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        self.architecture = arch
        self.family = ARCHITECTURES[arch]

    @cached_property
    def config(self):
        """The transformers config object, with every default filled in."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.dir)
        except Exception as e:  # transformers raises many kinds here
            raise ModelError(f"cannot parse {self.dir}/config.json: {e}") from None

    @property
    def num_layers(self) -> int:
        c = self.raw_config
        n = c.get("num_hidden_layers", c.get("n_layer"))
        if not isinstance(n, int) or n <= 0:
            raise ModelError(f"{self.dir}/config.json has no valid num_hidden_layers / n_layer")
        return n

    @cached_property
    def model_id(self) -> str:
        return model_id_of(self.raw_config)

    @cached_property
    def index(self) -> dict[str, str]:
        """tensor name -> safetensors file holding it."""
        idx_path = os.path.join(self.dir, "model.safetensors.index.json")
        if os.path.exists(idx_path):
            try:
                with open(idx_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ModelError(f"cannot read {idx_path}: {e}") from None
            return {k: os.path.join(self.dir, v) for k, v in weight_map.items()}
        files = sorted(f for f in os.listdir(self.dir) if f.endswith(".safetensors"))
        if not files:
            raise ModelError(f"{self.dir} holds no .safetensors weights (other formats are not read)")
        from safetensors import safe_open

        index = {}
        for name in files:
            path = os.path.join(self.dir, name)
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    index[key] = path
        return index

    @cached_property
    def layer_prefix(self) -> str:
        """The name prefix of block tensors, e.g. 'model.layers.' or 'transformer.h.'."""
        for key in self.index:
            m = _LAYER_RE.match(key)
            if m:
                return key[: m.start(2)]
        raise ModelError(f"{self.dir}: no transformer block tensors found in the checkpoint")

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read just these tensors, opening each file once."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.index]
        if missing:
            raise ModelError(f"{self.dir}: checkpoint lacks tensor(s) {', '.join(missing[:3])}")
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.index[n], []).append(n)
        out = {}
        for path, keys in by_file.items():
            with safe_open(path, framework="pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        return out

    def block_fingerprint(self, block: int) -> str:
        """A short hash that tells one checkpoint's block from another's with the same config.

        It covers every tensor's name, dtype and shape and the bytes of its first and last rows,
        read without loading the tensor: two different trainings (or fine-tunes) of a model
        differ there, while two copies of the same files always agree. A checkpoint converted
        to another dtype counts as different, which is the safe side."""
        from safetensors import safe_open

        digest = hashlib.sha256()
        names = sorted(self.block_tensor_names(block))
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.index[n], []).append(n)
        for path, keys in sorted(by_file.items()):
            with safe_open(path, framework="pt") as f:
                for k in keys:
                    sl = f.get_slice(k)
                    shape = sl.get_shape()
                    digest.update(f"{k[len(self.layer_prefix):]}|{sl.get_dtype()}|{shape}".encode())
                    if shape and shape[0] > 0:
                        for row in (sl[0:1], sl[shape[0] - 1:shape[0]]):
                            digest.update(row.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def block_tensor_names(self, block: int) -> list[str]:
        prefix = f"{self.layer_prefix}{block}."
        names = [k for k in self.index if k.startswith(prefix)]
        if not names:
            raise ModelError(f"{self.dir}: checkpoint has no tensors for block {block}")
        return names


def model_id_of(raw_config: dict) -> str:
    """The id every server and client derives from config.json alone; a `model_id` key overrides it."""
    override = raw_config.get("model_id")
    if isinstance(override, str) and override:
        return override
    canon = {k: v for k, v in raw_config.items() if k not in _ID_IGNORED_KEYS}
    digest = hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"{raw_config.get('model_type', 'model')}-{digest[:16]}"
