#!/usr/bin/env python3
"""One linear layer's product on a CPU, one thread: float32, bfloat16, and serve.quant's packed
int8 and int4 (swarmd/runtime/quant.py's PackedLinear) with the kernels' inputs in bfloat16,
float16 and float32, timed side by side for a few batch sizes (1: a decode step).

    python tools/bench_quant_kernels.py [--shapes 1536x576,8960x1536] [--rows 1,4,32]
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
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1536x576,8960x1536", help="OUTxIN, comma-separated")
    ap.add_argument("--rows", default="1,4,32")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"machine: {platform.node()} {platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, 1 thread; ms a product (median)")
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        layer = nn.Linear(k, n, bias=False)
        half = nn.Linear(k, n, bias=False).bfloat16()
        packed = {bits: quant.PackedLinear(layer, bits, torch.float32) for bits in (8, 4)}
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
