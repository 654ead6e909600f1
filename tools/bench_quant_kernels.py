#!/usr/bin/env python3
"""One linear layer's product on a CPU, one thread: float32, bfloat16, and serve.quant's packed
int8 and int4 (swarmd/runtime/quant.py's PackedLinear) with the kernels' inputs in bfloat16,
float16 and float32, timed side by side for a few batch sizes (1: a decode step).

    python tools/bench_quant_kernels.py [--shapes 1536x576,8960x1536] [--rows 1,4,32]

With --model, a real model's blocks instead, as a server runs them (swarmd's Span, in-process,
one thread): one-position decode steps with a KV cache through every block, float32, bfloat16
and serve.quant int8 and int4 (float32 spans), in interleaved rounds; and each span's weight
bytes.

    python tools/bench_quant_kernels.py --model qwen2.5-coder-1.5b-instruct [--steps 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from swarmd.runtime import quant  # noqa: E402


def timed(f, x: torch.Tensor, seconds: float = 0.3) -> float:
    """Median of 5 runs of repeated calls, in milliseconds a call."""
    f(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 5:
        f(x)
        n += 1
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            f(x)
        runs.append((time.perf_counter() - t) / n * 1e3)
    return sorted(runs)[2]


@torch.inference_mode()
def model_steps(name: str, steps: int, rounds: int) -> None:
    import statistics

    from libswarm.checkpoint import Checkpoint
    from libswarm.models import get_model
    from swarmd.runtime.span import Span

    d = get_model(name, os.path.join(os.path.dirname(HERE), ".cache", "models"))
    ck = Checkpoint(d)
    cpu, n = torch.device("cpu"), ck.num_layers
    kinds = {"float32": (torch.float32, "none"), "bfloat16": (torch.bfloat16, "none"),
             "int8": (torch.float32, "int8"), "int4": (torch.float32, "int4")}
    spans = {k: Span(ck, 0, n, cpu, dt, quant=q).load() for k, (dt, q) in kinds.items()}
    h = torch.randn(1, 16 + steps, ck.config.hidden_size, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {k: [] for k in spans}
    for _ in range(rounds):
        for k, sp in spans.items():
            cache = sp.new_cache(0, n, 1, 16 + steps)
            sp.run(h[:, :16], torch.arange(16)[None], None, 0, n, cache=cache)
            for t in range(16, 16 + steps):
                t0 = time.perf_counter()
                sp.run(h[:, t:t + 1], torch.tensor([[t]]), None, 0, n, cache=cache)
                times[k].append(time.perf_counter() - t0)
    print(f"{name}: {n} blocks, one-position steps after 16 positions, {steps * rounds} each, median")
    base = statistics.median(times["float32"])
    for k, ts in times.items():
        ms = statistics.median(ts) * 1e3
        print(f"  {k:9s} {ms:8.2f} ms a step ({base * 1e3 / ms:.2f}x float32's speed), "
              f"weights {spans[k].weight_bytes() / 2**20:7.0f} MiB")


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1536x576,8960x1536", help="OUTxIN, comma-separated")
    ap.add_argument("--rows", default="1,4,32")
    ap.add_argument("--model", default=None, help="a real model by short name: its blocks' decode steps")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"machine: {platform.node()} {platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, 1 thread")
    if a.model:
        model_steps(a.model, a.steps, a.rounds)
        return 0
    print("ms a product (median)")
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        layer = nn.Linear(k, n, bias=False)
        half = nn.Linear(k, n, bias=False).bfloat16()
        packed = {bits: quant.PackedLinear.from_linear(layer, bits, torch.float32) for bits in (8, 4)}
        for rows in (int(r) for r in a.rows.split(",")):
            x = torch.randn(rows, k)
            cols = {"float32": timed(layer, x), "bfloat16": timed(half, x.bfloat16())}
            for bits, p in packed.items():
                for dt in (torch.bfloat16, torch.float16, torch.float32):
                    scales = p.scales if bits == 8 else p.scales_and_zeros
                    s = scales.to(dt)
                    if bits == 8:
                        def f(v, p=p, s=s):
                            return torch.ops.aten._weight_int8pack_mm(v, p.qweight, s)
                    else:
                        def f(v, p=p, s=s):
                            return torch.ops.aten._weight_int4pack_mm_for_cpu(v, p.qweight, p.group_size, s)
                    cols[f"int{bits} {str(dt)[6:]}"] = timed(f, x.to(dt))
            print(f"[{n}, {k}] x {rows:3d} rows: " + "  ".join(f"{name} {ms:.3f}" for name, ms in cols.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
