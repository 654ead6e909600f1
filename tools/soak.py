#!/usr/bin/env python3
"""A soak of a swarm under churn with two bad members, every token checked against Hugging Face.

    python tools/soak.py [--seconds 150] [--clients 3] [--mean-life 20] [--downtime 3]

Six servers of a tiny 6-block Llama, three for each half (0:3, 3:6), behind a gateway-only
daemon. In each half one server is bad and claims to be 10 times faster than the others, so
that routes go to it first: in 0:3 it computes every step 0.3 s slower (failpoint slow_steps:
a liar, or a device now shared with other work), in 3:6 it never answers a step (failpoint
hang_steps: a wedged device). The other four are killed (SIGKILL) and restarted at random,
each living --mean-life seconds on average and staying down --downtime seconds. --clients
threads share one model object and generate 12 greedy tokens after random prompts, over and
over; each result is compared with Hugging Face's own model.

Prints, every 15 s and at the end: generations equal to HF, different from HF, failed, and
generation times (median, 95th percentile, slowest); then the gateway's failovers and what
it thinks of each server. Exits 1 if any generation failed or differed."""

from __future__ import annotations

import argparse
import collections
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from localswarm import Churn, running_swarm  # noqa: E402
from make_test_model import make_model  # noqa: E402

SPANS = ["0:3", "0:3", "0:3", "3:6", "3:6", "3:6"]
BAD = {0: "slow_steps", 3: "hang_steps"}
NEW_TOKENS = 12


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.equal = self.different = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.seconds: list[float] = []

    def line(self) -> str:
        with self.lock:
            s = sorted(self.seconds) or [0.0]
            p95 = s[min(len(s) - 1, int(0.95 * len(s)))]
            return (f"equal to HF {self.equal}, different {self.different}, failed {sum(self.errors.values())}; "
                    f"seconds per generation: median {statistics.median(s):.2f}, p95 {p95:.2f}, "
                    f"slowest {s[-1]:.2f}")


def client(model, ref, tally: Tally, seed: int, end: float) -> None:
    rng = random.Random(seed)
    kw = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    while time.monotonic() < end:
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        ids = torch.randint(3, 500, (1, rng.randint(2, 12)), generator=gen)
        t0 = time.monotonic()
        try:
            out = model.generate(ids, **kw)
        except Exception as e:  # a soak counts every failure, of any kind
            with tally.lock:
                tally.errors[f"{type(e).__name__}: {str(e)[:160]}"] += 1
            continue
        took = time.monotonic() - t0
        with torch.no_grad():
            same = torch.equal(out, ref.generate(ids, **kw))
        with tally.lock:
            tally.seconds.append(took)
            if same:
                tally.equal += 1
            else:
                tally.different += 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=150.0)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--mean-life", type=float, default=20.0, help="mean seconds a churned server lives")
    p.add_argument("--downtime", type=float, default=3.0, help="seconds a killed server stays down")
    p.add_argument("--logs", help="keep the daemons' folders (logs, state) here (default: removed at the end)")
    a = p.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from libswarm import AutoDistributedModelForCausalLM

    d = make_model("llama", tempfile.mkdtemp(prefix="soak-"), layers=6)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    speeds = {i: (0.0001 if i in BAD else 0.001) for i in range(len(SPANS))}
    print(f"{platform.node()}, {os.cpu_count()} cores; {a.clients} clients for {a.seconds:.0f} s; churn: mean life "
          f"{a.mean_life:.0f} s, {a.downtime:.0f} s down; bad: {BAD}", flush=True)
    tally = Tally()
    if a.logs:
        os.makedirs(a.logs, exist_ok=True)
    with running_swarm(d, SPANS, speeds=speeds, root=a.logs,
                       env={i: {"SWARMD_FAILPOINTS": name} for i, name in BAD.items()}) as (servers, gw):
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        end = time.monotonic() + a.seconds
        churned = [s for i, s in enumerate(servers) if i not in BAD]
        with Churn(churned, [s.address for s in servers], a.mean_life, a.downtime) as churn:
            threads = [threading.Thread(target=client, args=(model, ref, tally, k, end)) for k in range(a.clients)]
            for t in threads:
                t.start()
            t0 = time.monotonic()
            while any(t.is_alive() for t in threads):
                next(t for t in threads if t.is_alive()).join(15.0)
                print(f"[{time.monotonic() - t0:5.0f} s] {tally.line()}; kills {churn.kills}", flush=True)
        status = gw.ctl("status")["gateway"]
        print(f"\n{tally.line()}\nkills {churn.kills}, restart errors {len(churn.errors)}, "
              f"failovers {status['failovers']}")
        for error, n in tally.errors.most_common(5):
            print(f"  {n} x {error}")
        print("the gateway's view:")
        names = {s.address: f"s{i} {SPANS[i]}" + (f" ({BAD[i]})" if i in BAD else "") for i, s in enumerate(servers)}
        for row in gw.ctl("peers")["peers"]:
            if row["address"] in names:
                step = f"{row['step_ms']:.1f} ms a step" if row.get("step_ms") is not None else "never timed"
                print(f"  {names[row['address']]:<22} {row['state']:<12} {step:<20} {row.get('error') or ''}")
        for i in BAD:
            servers[i].kill()  # a hung serving thread cannot drain
    return 0 if tally.different == 0 and not tally.errors else 1


if __name__ == "__main__":
    sys.exit(main())
