#!/usr/bin/env python3
"""What checking servers' outputs costs per token: three gateways on one swarm, with
swarm.verify off, sample (the default p) and strict, decoding the same prompt in turn, rounds
alternated, on loopback. Prints the median per-token time of each, the ratios to `off`, and
how many steps the servers ran per token generated.

    python tools/bench_verify.py [--tokens 100] [--rounds 3] [--probability 0.05]
    python tools/bench_verify.py --model smollm2-135m-instruct

The swarm holds every block twice (two chains of two servers), as strict needs. The sample
gateway's checks run on its checking thread, beside the decode: they compete for these two
cores, as on a real gateway they would compete for the servers'."""

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
sys.path.insert(0, os.path.dirname(HERE))

from bench_inference import spans, swarm_step_s  # noqa: E402
from make_test_model import make_model  # noqa: E402

MODES = ("off", "sample", "strict")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a short name from libswarm.models (default: a tiny random Llama)")
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--probability", type=float, default=0.05)
    a = ap.parse_args(argv)
    from localswarm import Daemon, running_swarm, until

    from libswarm import AutoDistributedModelForCausalLM

    if a.model:
        from libswarm.models import get_model

        d = get_model(a.model, os.path.join(os.path.dirname(HERE), ".cache", "models"))
    else:
        d = make_model("llama", tempfile.mkdtemp(prefix="bench-verify-"), layers=6, kv_heads=2)
    layers = int(__import__("json").load(open(os.path.join(d, "config.json")))["num_hidden_layers"])
    root = tempfile.mkdtemp(prefix="bench-verify-")
    chain = spans(layers, 2)
    with running_swarm(d, chain + chain, gateway=False, root=root) as (servers, _):
        gws = {m: Daemon(root, f"gw-{m}", d, "none", {"swarm": {"verify": m, "verify_probability": a.probability}})
               for m in MODES}
        try:
            for g in gws.values():
                g.start([s.address for s in servers])
            for g in gws.values():
                g.wait_ready()
                until(lambda g=g: sum(p["state"] == "online" for p in g.ctl("peers")["peers"]) == len(servers), 30)
            prompt = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0))
            models = {m: AutoDistributedModelForCausalLM.from_pretrained(d, socket=g.socket) for m, g in gws.items()}
            times: dict[str, list[float]] = {m: [] for m in MODES}
            steps: dict[str, list[int]] = {m: [] for m in MODES}
            for m in MODES:  # warm up: measured speeds, shadows and bands
                swarm_step_s(models[m], prompt, 8)
            for _ in range(a.rounds):
                for m in MODES:
                    before = sum(s.ctl("status")["stats"]["steps"] for s in servers)
                    times[m] += swarm_step_s(models[m], prompt, a.tokens)
                    if m == "sample":  # let its last queued check finish before the next gateway's round
                        time.sleep(1.0)
                    steps[m].append(sum(s.ctl("status")["stats"]["steps"] for s in servers) - before)
            checks = gws["sample"].ctl("status")["gateway"]["verify"]["checks"]
        finally:
            for g in gws.values():
                g.stop()
    cpu = platform.processor() or platform.machine()
    print(f"{os.path.basename(d)}: {layers} blocks, servers {chain} twice; {a.tokens} tokens x {a.rounds} rounds; "
          f"{cpu}, {os.cpu_count()} CPUs")
    base = statistics.median(times["off"])
    for m in MODES:
        med = statistics.median(times[m])
        per_token = sum(steps[m]) / (a.rounds * (a.tokens + 1))
        print(f"  {m:7s} {med * 1000:8.2f} ms/token  {med / base:5.2f}x off   {per_token:5.2f} server steps per token")
    print(f"  sample checks: {checks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
