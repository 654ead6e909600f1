#!/usr/bin/env python3
"""What fingerprinting a checkpoint's weights costs: the full hash of every tensor at a
daemon's first start, and reading the kept digests at every later one.

    python tools/bench_fingerprint.py [--dir /tmp/llama7b-shaped] [--model DIR]

Without --model it writes (once) a checkpoint of Llama-2-7B's shapes in float16, 13.5 GB in
two shards of random bytes (what is hashed, not what it means, sets the cost), and times
Checkpoint.block_fingerprint over all 32 blocks: cold (hashing, the files in the page cache
after being written; --drop-caches, as root, reads them from disk), then from the digests
kept in the state dir."""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from libswarm.checkpoint import HASH_THREADS, Checkpoint  # noqa: E402

LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "torch_dtype": "float16"}


def block_shapes(i: int) -> dict[str, list[int]]:
    h, f, p = 4096, 11008, f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [h, h],
            p + "self_attn.v_proj.weight": [h, h], p + "self_attn.o_proj.weight": [h, h],
            p + "mlp.gate_proj.weight": [f, h], p + "mlp.up_proj.weight": [f, h], p + "mlp.down_proj.weight": [h, f],
            p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h]}


def write_shard(path: str, shapes: dict[str, list[int]], noise: bytes) -> None:
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2
        for s in shape:
            n *= s
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path + ".part", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        left = offset
        while left:
            chunk = noise[:min(left, len(noise))]
            f.write(chunk)
            left -= len(chunk)
    os.replace(path + ".part", path)


def make_checkpoint(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(LLAMA_7B, f)
    noise = os.urandom(64 << 20)
    weight_map = {}
    for shard, blocks in enumerate((range(0, 16), range(16, 32))):
        name = f"model-{shard + 1:05d}-of-00002.safetensors"
        shapes = {k: v for i in blocks for k, v in block_shapes(i).items()}
        if shard == 0:
            shapes["model.embed_tokens.weight"] = [32000, 4096]
        else:
            shapes.update({"model.norm.weight": [4096], "lm_head.weight": [32000, 4096]})
        path = os.path.join(out, name)
        if not os.path.exists(path):
            print(f"writing {path} ...", flush=True)
            write_shard(path, shapes, noise)
        weight_map.update({k: name for k in shapes})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/llama7b-shaped", help="where the 7B-shaped checkpoint is (made once)")
    ap.add_argument("--model", help="time this checkpoint instead")
    ap.add_argument("--drop-caches", action="store_true", help="drop the page cache first (root only)")
    args = ap.parse_args()
    model = args.model or args.dir
    if not args.model:
        make_checkpoint(args.dir)
    if args.drop_caches:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    ck = Checkpoint(model)
    size = sum(os.path.getsize(p) for p in set(ck.index.values()))
    cpu = platform.processor() or platform.machine()
    print(f"{model}: {ck.num_layers} blocks, {size / 1e9:.1f} GB of weights; {cpu}, {os.cpu_count()} CPUs, "
          f"{HASH_THREADS} hashing threads")
    with tempfile.TemporaryDirectory() as state:
        cache = os.path.join(state, "weights.json")
        for label in ("first start (hash every byte)", "later starts (kept digests)"):
            ck = Checkpoint(model, digest_cache=cache)
            t0 = time.perf_counter()
            for b in range(ck.num_layers):
                ck.block_fingerprint(b)
            dt = time.perf_counter() - t0
            print(f"{label:34s} {dt:8.3f} s  ({size / dt / 1e9:6.2f} GB/s)")


if __name__ == "__main__":
    main()
