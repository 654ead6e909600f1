"""A local Hugging Face checkpoint directory: its config, its model id, and reading only the
tensors asked for (single safetensors file, a sharded index, or several files)."""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property

import torch

from libswarm import quantized
from libswarm.errors import ModelError

# Supported architectures -> family. The Llama family covers models that differ from Llama
# only in ways their config states (GQA, q/k/v biases, sliding windows, tied embeddings, rope
# scaling, Qwen3's q/k norms, Mixtral's experts).
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "MixtralForCausalLM": "llama",  # its blocks' experts: swarmd/runtime/blocks.py MixtralBlock
    "Gemma3ForCausalLM": "llama",  # Gemma 3 text: its own block (Gemma3Block), scaled embeddings, Gemma's norm
    "BloomForCausalLM": "bloom",
}

# Config keys that do not change what the model computes: left out of the model id so that
# the same weights saved by another transformers version, or in another dtype, match.
_ID_IGNORED_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
                    "architectures", "model_id"}

_LAYER_RE = re.compile(r"^(.*?)(?:layers|h)\.(\d+)\.(.+)$")
MAX_HEADER_BYTES = 100 << 20  # a safetensors header is JSON; the format itself caps it at 100 MB
HASH_THREADS = 4  # hashlib frees the GIL: tensors are hashed side by side

log = logging.getLogger("libswarm.checkpoint")


class Checkpoint:
    def __init__(self, model_dir: str, digest_cache: str | None = None):
        from libswarm.models import KNOWN, MODEL_TYPES, resolve_model
        from libswarm.paths import closed_directory

        self.dir = resolve_model(model_dir)  # a path, or a short name of a model got by `swarmctl model get`
        if not os.path.isdir(self.dir):
            name = os.path.basename(self.dir)
            closed = closed_directory(self.dir)
            if closed is not None:
                raise ModelError(f"cannot read {self.dir}: permission denied on {closed} (models for apps and "
                                 "daemons alike belong in /srv/swarmd/models, readable by everyone)")
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
        self.digest_cache = digest_cache  # a JSON file keeping each weight file's tensor digests

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

    @property
    def stored_quant(self) -> str:
        """The coarsest kind of the blocks' linear weights as stored: "none" (floats), or "int8" /
        "int4" for a GGUF imported with its quantization kept (libswarm/quantized.py)."""
        kind = self.raw_config.get(quantized.CONFIG_KEY, "none")
        if kind not in ("none", *quantized.KINDS):
            raise ModelError(f"{self.dir}/config.json: {quantized.CONFIG_KEY} {kind!r} is not one of "
                             f"{', '.join(quantized.KINDS)}")
        return kind

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
        """A hash of every byte of a block's weights (with each tensor's name, dtype and shape).

        Two copies of the same files always agree; any changed bit (bit rot, a tampered file, a
        partial fine-tune) makes it differ. A checkpoint converted to another dtype counts as
        different, which is the safe side. Each file is hashed once and its tensors' digests
        kept in `digest_cache` (keyed by the file's size and mtime), so later starts read nothing."""
        digest = hashlib.sha256()
        for k in sorted(self.block_tensor_names(block)):
            dtype, shape, tensor_digest = self.tensor_digests(self.index[k])[k]
            digest.update(f"{k[len(self.layer_prefix):]}|{dtype}|{shape}|{tensor_digest}\n".encode())
        return digest.hexdigest()

    def tensor_digests(self, path: str) -> dict[str, tuple[str, list[int], str]]:
        """name -> (dtype, shape, sha256 of its bytes) of every tensor in one safetensors file."""
        with self._digest_lock:
            done = self._digests.get(path)
            if done is not None:
                return done
            st = os.stat(path)
            # size and mtime can be put back by whoever may write the file (touch -d); the
            # change time and the inode cannot: a rewrite or a replacement always shows
            stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
            cached = self._read_digest_cache().get(path)
            if isinstance(cached, dict) and cached.get("stamp") == stamp and isinstance(cached.get("tensors"), dict):
                done = {k: (v[0], v[1], v[2]) for k, v in cached["tensors"].items()}
            else:
                done = _hash_safetensors(path)
                self._write_digest_cache(path, stamp, done)
            self._digests[path] = done
            return done

    @cached_property
    def _digest_lock(self) -> threading.Lock:
        return threading.Lock()

    @cached_property
    def _digests(self) -> dict[str, dict[str, tuple[str, list[int], str]]]:
        return {}

    def _read_digest_cache(self) -> dict:
        if not self.digest_cache:
            return {}
        try:
            with open(self.digest_cache) as f:
                data = json.load(f)
            return data.get("files", {}) if isinstance(data, dict) and data.get("version") == 1 else {}
        except (OSError, ValueError):
            return {}  # absent or damaged: hash again

    def _write_digest_cache(self, path: str, stamp: list[int], digests: dict) -> None:
        if not self.digest_cache:
            return
        files = self._read_digest_cache()
        files[path] = {"stamp": stamp, "tensors": {k: list(v) for k, v in digests.items()}}
        tmp = f"{self.digest_cache}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"version": 1, "files": files}, f)
            os.replace(tmp, self.digest_cache)
        except OSError as e:  # a read-only state dir costs a rehash at the next start, nothing else
            log.warning("cannot keep weight digests in %s: %s", self.digest_cache, e)

    def block_tensor_names(self, block: int) -> list[str]:
        prefix = f"{self.layer_prefix}{block}."
        names = [k for k in self.index if k.startswith(prefix)]
        if not names:
            raise ModelError(f"{self.dir}: checkpoint has no tensors for block {block}")
        return names


def _hash_safetensors(path: str) -> dict[str, tuple[str, list[int], str]]:
    """sha256 of each tensor's bytes, read straight from the file's mapped data section: the
    safetensors header (8-byte length, then JSON) gives each tensor's offsets, which the
    library does not expose."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise ModelError(f"{path}: safetensors header of {n} bytes is beyond the format's limit")
            header = json.loads(f.read(n))
            size = os.fstat(f.fileno()).st_size
            spans = {}
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                begin, end = meta["data_offsets"]
                if not 0 <= begin <= end <= size - 8 - n:
                    raise ModelError(f"{path}: tensor {name} lies outside the file")
                spans[name] = (str(meta["dtype"]), list(meta["shape"]), 8 + n + begin, 8 + n + end)
            if size == 0 or not spans:
                return {}
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    def one(item):
                        dtype, shape, a, b = item
                        return dtype, shape, hashlib.sha256(view[a:b]).hexdigest()

                    with ThreadPoolExecutor(HASH_THREADS) as pool:
                        return dict(zip(spans, pool.map(one, spans.values())))
                finally:
                    view.release()
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise ModelError(f"cannot read {path} to fingerprint its weights: {e}") from None


def model_id_of(raw_config: dict) -> str:
    """The id every server and client derives from config.json alone; a `model_id` key overrides it."""
    override = raw_config.get("model_id")
    if isinstance(override, str) and override:
        return override
    canon = {k: v for k, v in raw_config.items() if k not in _ID_IGNORED_KEYS}
    digest = hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"{raw_config.get('model_type', 'model')}-{digest[:16]}"
