#!/usr/bin/env python3
"""Training throughput through the swarm against the same model locally, side by side.

    python tools/bench_training.py [--layers 6] [--hidden 256] [--rounds 10] [--spans 0:6]

Forward + backward (loss.backward() with client-held LoRA on q_proj and v_proj) in tokens per
second, at batch 1 x 64 tokens and batch 16 x 64 tokens: the local Hugging Face model with
PEFT, and libswarm through three servers on loopback (one compute thread each) behind a
gateway-only daemon; `--spans 0:6` runs every block on one server instead.

Where a swarm step's time goes: the three servers' blocks are also run here, in this process,
as the servers run them (forward with autograd, then its backward, with the app's LoRA): their
sum is the step's compute, and what the swarm takes beyond it is transfer, hand-offs and
waiting. A batch split into parts runs them at once on different servers, so there compute
overlaps and the remainder can be negative.

And the CPU time a swarm step costs each process, read around each timed swarm step (the
scheduler's count per thread, /proc/PID/task/TID/schedstat: the daemons' Python threads apart
from their ZeroMQ I/O threads; this process's by process_time): where the sum comes near the
step's wall time, the step is serial work, and what the servers spend beyond their blocks is
what messaging costs them."""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from localswarm import cpu_split, running_swarm, thread_cpu  # noqa: E402
from make_test_model import make_model  # noqa: E402


def timed(steps, rounds: int, probe=None) -> list[float]:
    """Each step's median time over `rounds`, the steps taken in turn within each round (so
    that a slow spell of this shared machine falls on all of them alike), the first one
    first in even rounds and last in odd ones. As timeit does, the collector is run
    between steps and kept off during them, for the local model and the swarm alike.
    `probe(i, before)` is called around each timed run of step i, outside its timing."""
    for step in steps:
        step()  # warm up
    times: list[list[float]] = [[] for _ in steps]
    for r in range(rounds):
        order = range(len(steps)) if r % 2 == 0 else reversed(range(len(steps)))
        for i in order:
            gc.collect()
            if probe is not None:
                probe(i, True)
            gc.disable()
            try:
                t0 = time.perf_counter()
                steps[i]()
                times[i].append(time.perf_counter() - t0)
            finally:
                gc.enable()
            if probe is not None:
                probe(i, False)
    return [statistics.median(t) for t in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--spans", default=None, metavar="A:B,...",
                   help="the servers' spans (default: three servers of a third each); 0:6 puts every block "
                        "on one server, so that the difference is what the extra hops cost")
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
    spans = args.spans.split(",") if args.spans else [f"0:{third}", f"{third}:{2 * third}",
                                                      f"{2 * third}:{args.layers}"]
    from libswarm.checkpoint import Checkpoint
    from swarmd.runtime.span import Lora, Span

    spans_here = [Span(Checkpoint(d), int(a), int(b), torch.device("cpu"), torch.float32).load()
                  for a, b in (x.split(":") for x in spans)]

    def blocks_step(span, swarm, shape) -> None:
        """One span's forward with autograd and its backward, as its server runs them."""
        x = torch.randn(*shape, span.hidden_size)
        pos = torch.arange(shape[1]).expand(shape)
        lora = swarm._lora_wire()
        tensors = {k: v[span.start:span.end] for k, v in lora["lora"].items()}
        graph = span.graph(x, pos, None, span.start, span.end, Lora(lora["lora_scaling"], tensors))
        graph.grad(torch.randn_like(x))

    with running_swarm(d, spans) as (servers, gw):
        daemons = [("gateway", gw.proc.pid)] + [(f"server {i}", s.proc.pid) for i, s in enumerate(servers)]
        swarm = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        swarm.add_lora(rank=8, alpha=16, target_modules=["q_proj", "v_proj"])
        for batch in (1, 16):
            ids = torch.randint(3, 500, (batch, 64), generator=torch.Generator().manual_seed(batch))

            def step(m, ids=ids):
                return lambda: m(input_ids=ids, labels=ids).loss.backward()

            # CPU of each timed swarm step, each daemon's and this process's (medians reported)
            cpu: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in daemons}
            app_cpu: list[float] = []
            before: dict = {}

            def probe(i: int, starting: bool, cpu=cpu, app_cpu=app_cpu, before=before) -> None:
                if i != 1:  # the swarm's step
                    return
                if starting:
                    before.update({name: thread_cpu(pid) for name, pid in daemons}, app=time.process_time())
                    return
                app_cpu.append(time.process_time() - before["app"])
                for name, pid in daemons:
                    cpu[name].append(cpu_split(before[name], thread_cpu(pid)))

            blocks = [lambda s=s, shape=ids.shape: blocks_step(s, swarm, shape) for s in spans_here]
            t_local, t_swarm, *t_spans = timed([step(local), step(swarm), *blocks], args.rounds, probe)
            t_blocks = sum(t_spans)
            tokens = batch * 64
            print(f"batch {batch:2d} x 64: local {tokens / t_local:8.0f} tokens/s, swarm ({len(spans)} servers) "
                  f"{tokens / t_swarm:8.0f} tokens/s ({t_local / t_swarm:.2f}x local); a swarm step "
                  f"{1e3 * t_swarm:.1f} ms: the servers' blocks {1e3 * t_blocks:.1f} ms, the rest "
                  f"{1e3 * (t_swarm - t_blocks):.1f} ms")
            spent = {name: [1e3 * statistics.median(t) for t in zip(*steps)] for name, steps in cpu.items()}
            app_ms = 1e3 * statistics.median(app_cpu)
            print("  CPU a swarm step, medians (ms; Python threads + ZeroMQ I/O threads): "
                  + ", ".join(f"{name} {py:.1f} + {io:.1f}" for name, (py, io) in spent.items())
                  + f", app {app_ms:.1f}; all {sum(map(sum, spent.values())) + app_ms:.1f}")


if __name__ == "__main__":
    main()
