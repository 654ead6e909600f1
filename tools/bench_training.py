#!/usr/bin/env python3
"""Training throughput through the swarm against the same model locally, side by side.

    python tools/bench_training.py [--layers 6] [--hidden 256] [--rounds 3]

Forward + backward (loss.backward() with client-held LoRA on q_proj and v_proj) in tokens per
second, at batch 1 x 64 tokens and batch 16 x 64 tokens: the local Hugging Face model with
PEFT, and libswarm through three daemons on loopback (one compute thread each)."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from localswarm import running_swarm  # noqa: E402
from make_test_model import make_model  # noqa: E402


def timed(step, rounds: int) -> float:
    step()  # warm up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from libswarm import AutoDistributedModelForCausalLM

    d = make_model("llama", tempfile.mkdtemp(prefix="bench-training-"), layers=args.layers, hidden=args.hidden)
    local = get_peft_model(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"model: llama, {args.layers} layers, hidden {args.hidden}; LoRA r=8 on q_proj, v_proj; fp32")
    third = args.layers // 3
    spans = [f"0:{third}", f"{third}:{2 * third}", f"{2 * third}:{args.layers}"]
    with running_swarm(d, spans) as (servers, gw):
        swarm = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        swarm.add_lora(rank=8, alpha=16, target_modules=["q_proj", "v_proj"])
        for batch in (1, 16):
            ids = torch.randint(3, 500, (batch, 64), generator=torch.Generator().manual_seed(batch))

            def step(m, ids=ids):
                return lambda: m(input_ids=ids, labels=ids).loss.backward()

            t_local, t_swarm = timed(step(local), args.rounds), timed(step(swarm), args.rounds)
            tokens = batch * 64
            print(f"batch {batch:2d} x 64: local {tokens / t_local:8.0f} tokens/s, swarm (3 daemons) "
                  f"{tokens / t_swarm:8.0f} tokens/s ({t_local / t_swarm:.2f}x local)")


if __name__ == "__main__":
    main()
