#!/usr/bin/env python3
"""What a failure costs, and what push saves, measured on real daemons on loopback.

    python tools/bench_faults.py [--delay-ms 5] [--tokens 64]

1. The stall one failure causes: a server of the route is killed (SIGKILL) or hung (SIGSTOP)
   in the middle of a 64-token generation; the stall is the time from the kill to the next
   token minus a normal token's time, split into detection (kill -> the gateway notices),
   re-routing (choosing and opening replacements) and replay (rebuilding their caches).
2. Per-token latency with and without server-to-server push when every peer message is
   delayed by --delay-ms (SWARMD_NET_DELAY_MS on every daemon), for three servers:
   push should cut the network part of a token by close to (n-1)/(2n) = 1/3."""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from localswarm import running_swarm  # noqa: E402
from make_test_model import make_model  # noqa: E402


def stall(model, servers, gw, ids, sig: int, tokens: int, kill_at: int) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []
    killed = {}

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.time())
            if len(stamps) == kill_at:
                by_address = {s.address: s for s in servers}
                victim = by_address[session.route[1][0]]  # the middle server
                killed["at"], killed["victim"] = time.time(), victim
                victim.kill(sig)
            return scores

    with model.inference_session(max_length=ids.shape[1] + tokens + 1) as session:
        model.generate(ids, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0,
                       logits_processor=LogitsProcessorList([Clock()]))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    normal = statistics.median(gaps)
    fo = gw.ctl("status")["gateway"]["last_failover"]
    victim = killed["victim"]
    if sig == signal.SIGSTOP:
        victim.kill(signal.SIGCONT)
    victim.kill()
    victim.revive([s.address for s in servers])
    return {
        "stall_s": stamps[kill_at] - killed["at"] - normal,
        "token_s": normal,
        "detect_s": fo["detected_at"] - killed["at"],
        "reroute_s": fo["reroute_s"],
        "replay_s": fo["replay_s"],
        "replayed": fo["replayed_positions"],
    }


def token_latency(model, ids, tokens: int, push: bool) -> float:
    times = []
    with model.inference_session(max_length=ids.shape[1] + tokens + 1, push=push):
        nxt = model(ids).logits[:, -1:].argmax(-1)
        for _ in range(tokens):
            t = time.perf_counter()
            nxt = model(nxt).logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delay-ms", type=float, default=5.0, help="emulated one-way delay per peer message")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from libswarm import AutoDistributedModelForCausalLM

    d = make_model("llama", tempfile.mkdtemp(prefix="bench-faults-"), layers=6)
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print("model: llama, 6 layers, hidden 64; route of 3 servers, each with a spare")
    with running_swarm(d, ["0:2", "2:4", "4:6", "0:2", "2:4", "4:6"]) as (servers, gw):
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        model.generate(ids, max_new_tokens=4, pad_token_id=0)  # warm up, measure step times
        for name, sig in (("kill -9", signal.SIGKILL), ("SIGSTOP", signal.SIGSTOP)):
            runs = [stall(model, servers, gw, ids, sig, a.tokens, kill_at=a.tokens // 2) for _ in range(a.repeats)]
            for r in runs:
                print(f"    run: stall {r['stall_s'] * 1e3:.1f} ms, detection {r['detect_s'] * 1e3:.1f} ms, "
                      f"re-routing {r['reroute_s'] * 1e3:.1f} ms, replay {r['replay_s'] * 1e3:.1f} ms")
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"  {name:8s} stall {med['stall_s'] * 1e3:7.1f} ms = detection {med['detect_s'] * 1e3:7.1f} ms"
                  f" + re-routing {med['reroute_s'] * 1e3:6.1f} ms + replay {med['replay_s'] * 1e3:6.1f} ms"
                  f" of {med['replayed']:.0f} positions  (normal token {med['token_s'] * 1e3:.1f} ms;"
                  f" median of {a.repeats})")
    env = {"SWARMD_NET_DELAY_MS": str(a.delay_ms)}
    with running_swarm(d, ["0:2", "2:4", "4:6"], env_all=env) as (servers, gw):
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        token_latency(model, ids, 8, True)
        with_push = statistics.median(token_latency(model, ids, a.tokens, True) for _ in range(a.repeats))
        without = statistics.median(token_latency(model, ids, a.tokens, False) for _ in range(a.repeats))
    n = 3
    net_push, net_relay = (n + 1) * a.delay_ms, 2 * n * a.delay_ms
    print(f"  {a.delay_ms:g} ms per peer message, 3 servers: push {with_push * 1e3:.1f} ms/token, "
          f"through the gateway {without * 1e3:.1f} ms/token: {(1 - with_push / without) * 100:.0f}% less "
          f"(network alone: {net_push:g} vs {net_relay:g} ms, {(1 - net_push / net_relay) * 100:.0f}% less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
