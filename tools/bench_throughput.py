#!/usr/bin/env python3
"""Many users at once: N concurrent clients decoding through the same swarm, with the servers'
cross-session batching off (serve.batch_window_ms: 0) and on (auto), side by side in one run.
Prints, for each N, the total tokens per second and the per-token latency percentiles.

    python tools/bench_throughput.py [--clients 1,4,16,64] [--tokens 24]
    python tools/bench_throughput.py --model smollm2-135m-instruct [--device cuda --dtype float16]

Two swarms run at once, identical but for the window: each has two servers (the model's blocks
in halves) and a gateway-only daemon. Each client opens its own session (a prompt of 8 tokens)
and decodes greedily, one token per step, timing each step; the clients of one measurement
start together. The clients compute nothing themselves: each step sends the embedding of the
token the first client would pick (what a step costs the servers does not depend on the
values), so that this machine's cores go to the servers, which are what is measured; apps
would run their embeddings and heads on their own machines."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from bench_inference import spans  # noqa: E402
from make_test_model import make_model  # noqa: E402

MODES = {"off": 0, "on": "auto"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a short name from libswarm.models (default: a tiny random Llama)")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--tokens", type=int, default=24, help="decode steps per client")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args(argv)
    from localswarm import Daemon, until
    from transformers import AutoModelForCausalLM

    from libswarm.client import SwarmClient

    if a.model:
        from libswarm.models import get_model

        d = get_model(a.model, os.path.join(os.path.dirname(HERE), ".cache", "models"))
    else:
        d = make_model("llama", tempfile.mkdtemp(prefix="bench-throughput-"), layers=6, kv_heads=2)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    layers = ref.config.num_hidden_layers
    root = tempfile.mkdtemp(prefix="bench-throughput-")
    serve = {"device": a.device, "dtype": a.dtype, "cache": {"max_bytes": "2GiB"}, "threads": "auto"}
    swarms: dict[str, tuple[list, Daemon]] = {}
    everyone: list[Daemon] = []
    try:
        for mode, window in MODES.items():
            servers = [Daemon(root, f"{mode}-{k}", d, span, {"serve": {**serve, "batch_window_ms": window}})
                       for k, span in enumerate(spans(layers, 2))]
            gw = Daemon(root, f"{mode}-gw", d, "none")
            swarms[mode] = (servers, gw)
            everyone += [*servers, gw]
            for x in [*servers, gw]:
                x.start([s.address for s in servers])
        for x in everyone:
            x.wait_ready(300)
        for servers, gw in swarms.values():
            until(lambda gw=gw, servers=servers: sum(p["state"] == "online" for p in gw.ctl("peers")["peers"])
                  == len(servers), 60)
        model_id = SwarmClient(swarms["off"][1].socket).model_info()["model_id"]
        with torch.no_grad():
            token = ref.model.embed_tokens(ref(torch.arange(3, 11)[None]).logits[:, -1:].argmax(-1))

        @torch.no_grad()
        def client(socket: str, seed: int, times: list[float], ready: threading.Barrier) -> None:
            c = SwarmClient(socket)
            ids = torch.randint(3, 500, (1, 8), generator=torch.Generator().manual_seed(seed))
            sid = c.open_session(model_id, max_length=8 + a.tokens + 1, batch=1)["session"]
            try:
                ready.wait()
                c.step(sid, ref.model.embed_tokens(ids))
                for _ in range(a.tokens):
                    t = time.perf_counter()
                    c.step(sid, token)
                    times.append(time.perf_counter() - t)
            finally:
                c.close_session(sid)
                c.close()

        rows = []
        for n in (int(x) for x in a.clients.split(",")):
            for mode, (servers, gw) in swarms.items():
                before = [s.ctl("status")["stats"] for s in servers]
                times: list[float] = []
                ready = threading.Barrier(n + 1)
                threads = [threading.Thread(target=client, args=(gw.socket, k, times, ready)) for k in range(n)]
                for t in threads:
                    t.start()
                ready.wait()
                t0 = time.perf_counter()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                after = [s.ctl("status")["stats"] for s in servers]
                steps = sum(x["steps"] - y["steps"] for x, y in zip(after, before))
                runs = sum(x["runs"] - y["runs"] for x, y in zip(after, before))
                q = statistics.quantiles(times, n=100) if len(times) > 1 else times * 99
                rows.append((n, mode, n * a.tokens / wall, q[49] * 1000, q[89] * 1000, steps / max(runs, 1)))
    finally:
        for x in everyone:
            x.terminate()
        for x in everyone:
            x.stop()
    cpu = platform.processor() or platform.machine()
    print(f"{os.path.basename(d)}: {layers} blocks in two servers, {a.device} {a.dtype}; {a.tokens} tokens per "
          f"client; {cpu}, {os.cpu_count()} CPUs")
    print(f"  {'clients':>7s} {'batching':>8s} {'tokens/s':>9s} {'x off':>6s} {'p50 ms':>8s} {'p90 ms':>8s} "
          f"{'steps/run':>9s}")
    base = {n: tps for n, mode, tps, *_ in rows if mode == "off"}
    single = {mode: p50 for n, mode, _, p50, *_ in rows if n == min(base)}
    for n, mode, tps, p50, p90, per_run in rows:
        print(f"  {n:7d} {mode:>8s} {tps:9.1f} {tps / base[n]:6.2f} {p50:8.2f} {p90:8.2f} {per_run:9.2f}")
    print("  p50 against one client with the same setting: " + ", ".join(
        f"{n} {mode} {p50 / single[mode]:.2f}x" for n, mode, _, p50, *_ in rows if n != min(base)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
