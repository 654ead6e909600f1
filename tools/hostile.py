#!/usr/bin/env python3
"""One hostile server per behaviour, each in a swarm of its own with honest servers beside it,
against a gateway with output checks (docs/security.md): whether the app's greedy tokens
equalled Hugging Face's, how many steps the hostile server computed before the gateway stopped
trusting it, and how many honest servers were blamed (banned, distrusted, suspected of pushing,
or charged an offence: there must be none).

    python tools/hostile.py [--tokens 12] [--verify strict] [--only push_wrong,reply_zeros]

The hostile servers are real daemons armed with a test-only failpoint (swarmd/peer/failpoints.py)
and advertising a fast speed, so that routes prefer them, as a hostile server would make sure
they did. `strict` (the default) checks every step of every span before the app gets it: every
generation must equal HF's. `sample` shows how long a liar goes unseen at the default p."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from make_test_model import make_model  # noqa: E402

MAX_PROMPTS = 20  # prompts run before a liar not yet caught is called not caught
FAST, SLOW = 0.00001, 0.001  # seconds per block and step, advertised: the hostile server looks fastest
REPLICATED = ["0:6", "0:6", "0:6"]  # the hostile server is s0; two honest servers hold the same blocks
CHAINED = ["0:3", "0:3", "3:6", "3:6", "3:6"]  # s0 (hostile) pushes to s2; s1, s3, s4 hold the same blocks


@dataclass
class Behaviour:
    name: str
    what: str
    spans: list[str] = field(default_factory=lambda: list(REPLICATED))
    env: dict[str, str] = field(default_factory=dict)
    serve: dict = field(default_factory=dict)
    pusher: bool = False  # caught as a pusher not to trust with pushes, not as a liar


def behaviours(tolerance_lie: float, int8_lie: float) -> list[Behaviour]:
    return [
        Behaviour("lie_always", "one element of every output moved by 8x its row's norm"),
        Behaviour("lie_sometimes", "the same, once in 50 steps"),
        Behaviour("lie_scaled", f"float32, every output's last position scaled by {1 + tolerance_lie:.6g} "
                  "(twice the tolerance)", env={"SWARMD_LIE_SCALE": f"{tolerance_lie:.6g}"}),
        Behaviour("lie_scaled", f"int8 weights, the only server of its quantization, scaled by {1 + int8_lie:.4g} "
                  "(twice the int8/float32 tolerance)", env={"SWARMD_LIE_SCALE": f"{int8_lie:.6g}"},
                  serve={"quant": "int8"}),
        Behaviour("reply_nan", "NaN outputs"),
        Behaviour("reply_wrong_shape", "outputs one hidden element short"),
        Behaviour("reply_huge", "outputs 1000x too large after 3 right ones"),
        Behaviour("reply_zeros", "zeros from its first reply (would poison a band learned from every reply)"),
        Behaviour("push_wrong", "returns the right output, pushes a nudged one", spans=list(CHAINED), pusher=True),
        Behaviour("push_extra", "returns the right output, pushes one position more", spans=list(CHAINED),
                  pusher=True),
        Behaviour("push_float16", "returns the right output, pushes it rounded to float16", spans=list(CHAINED),
                  pusher=True),
        Behaviour("push_stale", "returns the right output, pushes the previous step's", spans=list(CHAINED),
                  pusher=True),
        Behaviour("push_none", "says it pushed its output, sends nothing", spans=list(CHAINED), pusher=True),
    ]


def blamed(gw, honest) -> list[str]:
    """Honest servers the gateway holds anything against."""
    status = gw.ctl("status")["gateway"]
    rows = {r["node_id"]: r for r in status["verify"]["servers"]}
    suspects = {x["address"] for x in status["verify"]["push_suspects"]}
    states = {p.get("node_id"): p["state"] for p in gw.ctl("peers")["peers"]}
    out = []
    for s in honest:
        r = rows.get(s.node_id, {})
        if r.get("offences") or s.address in status["banned"] or s.address in suspects \
                or states.get(s.node_id) == "distrusted":
            out.append(s.address)
    return out


def caught(gw, liar, pusher: bool) -> bool:
    status = gw.ctl("status")["gateway"]["verify"]
    if pusher:
        return liar.address in {x["address"] for x in status["push_suspects"]}
    return any(r["node_id"] == liar.node_id and r["distrusted_s"] > 0 for r in status["servers"])


def run_one(model_dir: str, b: Behaviour, tokens: int, prompts: int, verify: str) -> dict:
    from localswarm import running_swarm, until, wait_tables

    from libswarm import AutoDistributedModelForCausalLM

    ref = __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    speeds = {i: (FAST if i in (0, 2) else SLOW) for i in range(len(b.spans))}
    extra = {"swarm": {"verify": verify}}
    with running_swarm(model_dir, b.spans, extra=extra, speeds=speeds,
                       server_extra={0: {"serve": b.serve}} if b.serve else None,
                       env={0: {"SWARMD_FAILPOINTS": b.name, **b.env}}) as (servers, gw):
        ids = {x.node_id for x in servers}
        wait_tables([gw], ids, 60)  # a server with quantized weights loads slower
        until(lambda: {p.get("node_id") for p in gw.ctl("peers")["peers"] if p.get("rtt_ms") is not None} >= ids,
              30, "the gateway to reach every server")
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, socket=gw.socket)
        equal, done, at_catch = 0, 0, None
        kw = dict(do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
        while done < prompts or (at_catch is None and done < MAX_PROMPTS):  # a rare liar needs more steps
            x = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(done))
            equal += int(torch.equal(model.generate(x, **kw), ref.generate(x, **kw)))
            done += 1
            if at_catch is None and caught(gw, servers[0], b.pusher):
                # a distrusted server computes no step more; a suspect pusher keeps serving, but
                # is not asked to push again
                at_catch = servers[0].ctl("status")["stats"]["pushes_sent" if b.pusher else "steps"]
        honest_blamed = blamed(gw, servers[1:])
        for s in servers[:1]:
            s.kill()  # a hostile server keeps sessions the gateway gave up on: no graceful stop
    return {"equal": equal, "prompts": done, "caught": at_catch, "blamed": len(honest_blamed)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=12, help="greedy tokens per prompt")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--verify", default="strict", choices=("strict", "sample"))
    ap.add_argument("--only", help="comma-separated behaviour names")
    a = ap.parse_args(argv)
    from swarmd.gateway.verify import Numerics, pair_tolerance

    d = make_model("llama", tempfile.mkdtemp(prefix="hostile-"), layers=6, kv_heads=2)
    plan = behaviours(2 * pair_tolerance(Numerics(), Numerics(), 6).row,
                      2 * pair_tolerance(Numerics(quant="int8"), Numerics(), 6).row)
    if a.only:
        plan = [b for b in plan if b.name in a.only.split(",")]
    print(f"# tools/hostile.py --verify {a.verify}: tiny Llama (6 blocks), {a.prompts} prompts x {a.tokens} "
          f"greedy tokens per behaviour, {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}")
    print("| behaviour | what the hostile server does | generations = HF | caught after | honest blamed |")
    print("|---|---|---|---|---|")
    failed = 0
    for b in plan:
        t0 = time.monotonic()
        r = run_one(d, b, a.tokens, a.prompts, a.verify)
        ok = r["equal"] == r["prompts"] and r["caught"] is not None and r["blamed"] == 0
        failed += not ok
        caught_as = "not caught" if r["caught"] is None else \
            f"{r['caught']} wrong push(es): not asked to push again" if b.pusher else \
            f"{r['caught']} step(s) it computed: distrusted"
        print(f"| `{b.name}` | {b.what} | {r['equal']}/{r['prompts']} | {caught_as} | {r['blamed']} |", flush=True)
        print(f"  ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    return 1 if failed and a.verify == "strict" else 0


if __name__ == "__main__":
    sys.exit(main())
