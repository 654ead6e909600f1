#!/usr/bin/env python3
"""The paper's experiments on our own code, on one machine: emulated WAN links, message loss and
churn, against a local single-process run and against the ideal for each network.

    python tools/paper_experiments.py                      # SmolLM2-135M, every setting (~10 min on 2 cores)
    python tools/paper_experiments.py --quick              # a few steps per setting (CI)
    python tools/paper_experiments.py --plots docs/plots [--sweeps]   # PNG plots (--sweeps: more points)
    python tools/paper_experiments.py --model DIR --spans 0:24 24:48 48:70 --dtype bfloat16 --device cuda
                                                           # a GPU machine: adds the offloading baseline

Every networked setting runs three servers (--spans) behind a gateway-only daemon, all with the
setting's link emulation (SWARMD_NETEM: swarmd/transport/netem.py) on every peer message. Measured per
setting, in one run: inference steps/s after a short and after a long prompt; forward tokens/s at
batch 1 and at a large batch; and for the networked ones the ideal (one-way delays along the
route with push, n+1 messages per decode step, plus each message's transfer time at the cap, plus
the compute measured on loopback) and measured / ideal. Churn kills (SIGKILL) and restarts each
server after an exponentially distributed life; loss drops that share of peer messages. Every
generation's tokens are checked against the local model's."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from localswarm import Churn, running_swarm  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    netem: str = ""  # SWARMD_NETEM on every daemon
    delay_ms: float = 0.0  # one way, for the ideal
    rate_mbit: float = 0.0  # 0: no cap
    churn_life_s: float = 0.0  # each server's mean life (0: no churn)
    local: bool = False
    offload: bool = False  # the whole model in one process, its weights streamed from RAM each step


SETTINGS = [
    Setting("local, one process", local=True),
    Setting("swarm, loopback"),
    Setting("1 Gbit/s, 4 ms RTT", "delay_ms=2,jitter_ms=0.2,rate_mbit=1000", 2, 1000),
    Setting("100 Mbit/s, 4 ms RTT", "delay_ms=2,jitter_ms=0.2,rate_mbit=100", 2, 100),
    Setting("100 Mbit/s, 100 ms RTT", "delay_ms=50,jitter_ms=1,rate_mbit=100", 50, 100),
    Setting("churn: each server restarts every 60 s", churn_life_s=60),
    Setting("churn: each server restarts every 20 s", churn_life_s=20),
    Setting("1 % message loss", "loss=0.01,seed=1"),
    Setting("5 % message loss", "loss=0.05,seed=1"),
]
# the paper's baseline: what one GPU does with a model it cannot hold (on by default with
# --device cuda; on the CPU it only checks the code path, weights being in RAM already)
OFFLOAD = Setting("offloading: accelerate cpu_offload", local=True, offload=True)


@dataclasses.dataclass
class Sizes:
    short_prompt: int
    long_prompt: int
    steps: int
    forward_tokens: int
    large_batch: int


FULL = Sizes(short_prompt=16, long_prompt=512, steps=32, forward_tokens=128, large_batch=16)
QUICK = Sizes(short_prompt=8, long_prompt=32, steps=4, forward_tokens=16, large_batch=4)


class Progress:
    """One line on stderr, rewritten as the run goes (tqdm, which transformers brings)."""

    def __init__(self, total: int, quiet: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, file=sys.stderr, disable=quiet, unit="setting",
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")

    def step(self, what: str) -> None:
        self.bar.set_description(what[:48])

    def done(self) -> None:
        self.bar.update(1)


def measure(model, ref, prompts: dict[str, torch.Tensor], sizes: Sizes, vocab: int, device: str = "cpu") -> dict:
    """Steps/s of greedy decoding after each prompt (prefill excluded), forward tokens/s at two
    batch sizes, and whether every generation equals the local model's."""
    out: dict = {"same": True}
    for name, ids in prompts.items():
        expected = ref.generate(ids, do_sample=False, max_new_tokens=sizes.steps, min_new_tokens=sizes.steps,
                                pad_token_id=0)
        stamps: list[float] = []
        from transformers import LogitsProcessor, LogitsProcessorList

        class Clock(LogitsProcessor):
            def __init__(self, stamps: list[float]):
                self.stamps = stamps

            def __call__(self, input_ids, scores):
                self.stamps.append(time.perf_counter())
                return scores

        got = model.generate(ids.to(device), do_sample=False, max_new_tokens=sizes.steps, min_new_tokens=sizes.steps,
                             pad_token_id=0, logits_processor=LogitsProcessorList([Clock(stamps)]))
        out["same"] = out["same"] and torch.equal(got.cpu(), expected)
        out[f"steps_per_s_{name}"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])  # decode steps only
    g = torch.Generator().manual_seed(0)
    for batch in (1, sizes.large_batch):
        ids = torch.randint(3, vocab, (batch, sizes.forward_tokens), generator=g).to(device)
        with torch.no_grad():
            model(ids)  # warm
            t0 = time.perf_counter()
            model(ids)
            out[f"forward_tokens_per_s_b{batch}"] = batch * sizes.forward_tokens / (time.perf_counter() - t0)
    return out


def ideal_step_s(s: Setting, hops: int, hidden: int, itemsize: int, compute_s: float) -> float:
    """Push: the gateway's step reaches the first server, each server pushes to the next, the last
    returns: hops + 1 one-way delays, each message carrying one position's hidden state."""
    wire = (s.delay_ms / 1000) * (hops + 1)
    if s.rate_mbit:
        wire += (hops + 1) * hidden * itemsize * 8 / (s.rate_mbit * 1e6)
    return compute_s + wire


def run(a: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    from libswarm import AutoDistributedModelForCausalLM
    from libswarm.models import get_model

    torch.set_num_threads(a.threads)
    model_dir = a.model if os.path.isdir(a.model) else get_model(a.model, os.path.join(os.path.dirname(HERE),
                                                                                       ".cache", "models"))
    dtype = getattr(torch, a.dtype)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    n_layers, hidden, vocab = ref.config.num_hidden_layers, ref.config.hidden_size, ref.config.vocab_size
    spans = a.spans or [f"{round(i * n_layers / 3)}:{round((i + 1) * n_layers / 3)}" for i in range(3)]
    sizes = QUICK if a.quick else FULL
    g = torch.Generator().manual_seed(1)
    prompts = {"short": torch.randint(3, vocab, (1, sizes.short_prompt), generator=g),
               "long": torch.randint(3, vocab, (1, sizes.long_prompt), generator=g)}
    every = [SETTINGS[0], OFFLOAD, *SETTINGS[1:]] if a.offload or a.device.startswith("cuda") else SETTINGS
    chosen = [s for s in every if not a.settings or any(k.lower() in s.name.lower() for k in a.settings)]
    sweeps = sweep_settings() if a.sweeps else []
    progress = Progress(len(chosen) + len(sweeps), a.no_progress)
    results: dict = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                                f"torch {torch.__version__}",
                     "model": os.path.basename(os.path.normpath(model_dir)), "spans": spans, "dtype": a.dtype,
                     "sizes": dataclasses.asdict(sizes), "settings": {}, "sweeps": {}}
    extra = {"serve": {"dtype": a.dtype, "device": a.device, "cache": {"max_bytes": "2GiB"}}}
    for s in chosen + sweeps:
        progress.step(s.name)
        t0 = time.monotonic()
        if s.offload:
            from accelerate import cpu_offload

            offloaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
            cpu_offload(offloaded, execution_device=torch.device(a.device))
            r = measure(offloaded, ref, prompts, sizes, vocab, device=a.device)
            del offloaded
        elif s.local:
            local = ref if a.device == "cpu" else \
                AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval().to(a.device)
            r = measure(local, ref, prompts, sizes, vocab, device=a.device)
        else:
            env = {"SWARMD_NETEM": s.netem} if s.netem else None
            with running_swarm(model_dir, spans, extra=extra, env_all=env) as (servers, gw):
                model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, socket=gw.socket, dtype=dtype)
                model.route_timeout_s = 120
                if s.churn_life_s:  # generations one after another for the whole window
                    life = s.churn_life_s / (10 if a.quick else 1)
                    window = a.churn_window_s / (60 if a.quick else 1)
                    runs = []
                    with Churn(servers, [x.address for x in servers], mean_life_s=life, downtime_s=2.0,
                               seed=1) as churn:
                        end = time.monotonic() + window
                        while not runs or time.monotonic() < end:
                            runs.append(measure(model, ref, prompts, sizes, vocab))
                    r = {k: (all(x[k] for x in runs) if k == "same" else sum(x[k] for x in runs) / len(runs))
                         for k in runs[0]}
                    r["kills"], r["generations"] = churn.kills, 2 * len(runs)
                else:
                    r = measure(model, ref, prompts, sizes, vocab)
                r["failovers"] = gw.ctl("status")["gateway"]["failovers"]
        r["seconds"] = time.monotonic() - t0
        (results["sweeps"] if s in sweeps else results["settings"])[s.name] = {**dataclasses.asdict(s), **r}
        progress.done()
    loop = results["settings"].get("swarm, loopback")
    if loop is not None:
        itemsize = torch.tensor([], dtype=dtype).element_size()
        for table in (results["settings"], results["sweeps"]):
            for r in table.values():
                if r["local"] or not (r["delay_ms"] or r["rate_mbit"]):
                    continue
                for name in ("short", "long"):
                    ideal = ideal_step_s(Setting(**{k: r[k] for k in ("name", "netem", "delay_ms", "rate_mbit",
                                                                       "churn_life_s", "local", "offload")}),
                                         len(spans), hidden, itemsize, 1 / loop[f"steps_per_s_{name}"])
                    r[f"ideal_steps_per_s_{name}"] = 1 / ideal
                    r[f"vs_ideal_{name}"] = r[f"steps_per_s_{name}"] * ideal
    return results


def sweep_settings() -> list[Setting]:
    """For the plots: one parameter varied at a time."""
    out = [Setting(f"RTT {2 * d:g} ms", f"delay_ms={d}", d, 0) for d in (5, 25, 50, 100)]
    out += [Setting(f"{r:g} Mbit/s, 4 ms RTT", f"delay_ms=2,rate_mbit={r}", 2, r) for r in (10, 30, 100, 1000)]
    out += [Setting(f"{p:g} % loss", f"loss={p / 100},seed=2") for p in (0.5, 2, 10)]
    out += [Setting(f"churn, life {life:g} s", churn_life_s=life) for life in (10, 30, 120)]
    return out


def tables(results: dict) -> str:
    sizes = results["sizes"]
    lines = [f"machine: {results['machine']}; model {results['model']} ({results['dtype']}), servers "
             f"{', '.join(results['spans'])} behind a gateway",
             f"decode steps/s after a {sizes['short_prompt']}-token and a {sizes['long_prompt']}-token prompt "
             f"({sizes['steps']} steps each); forward tokens/s of {sizes['forward_tokens']}-token sequences",
             "",
             "| setting | steps/s short | steps/s long | ideal short | measured/ideal | forward tok/s b1 | "
             f"forward tok/s b{sizes['large_batch']} | failovers | tokens equal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["settings"].items():
        ideal = f"{r['ideal_steps_per_s_short']:.2f}" if "ideal_steps_per_s_short" in r else "-"
        ratio = f"{r['vs_ideal_short']:.2f} / {r['vs_ideal_long']:.2f}" if "vs_ideal_short" in r else "-"
        extra = f" ({r['kills']} kills, {r['generations']} generations)" if "kills" in r else ""
        lines.append(f"| {name}{extra} | {r['steps_per_s_short']:.2f} | {r['steps_per_s_long']:.2f} | {ideal} | "
                     f"{ratio} | {r['forward_tokens_per_s_b1']:.0f} | "
                     f"{r['forward_tokens_per_s_b' + str(sizes['large_batch'])]:.0f} | "
                     f"{r.get('failovers', '-')} | {'yes' if r['same'] else 'NO'} |")
    if results["sweeps"]:
        lines += ["", "one parameter varied at a time (the plots' extra points):", "",
                  "| sweep | steps/s short | steps/s long | measured/ideal | failovers | tokens equal |",
                  "|---|---|---|---|---|---|"]
        for name, r in results["sweeps"].items():
            ratio = f"{r['vs_ideal_short']:.2f} / {r['vs_ideal_long']:.2f}" if "vs_ideal_short" in r else "-"
            extra = f" ({r['kills']} kills, {r['generations']} generations)" if "kills" in r else ""
            lines.append(f"| {name}{extra} | {r['steps_per_s_short']:.2f} | {r['steps_per_s_long']:.2f} | {ratio} | "
                         f"{r.get('failovers', '-')} | {'yes' if r['same'] else 'NO'} |")
    off = results["settings"].get(OFFLOAD.name)
    if off is not None:  # the paper's comparison: each setting's decode speed over offloading's
        lines += ["", "steps/s (short) over offloading's: " + ", ".join(
            f"{name} {r['steps_per_s_short'] / off['steps_per_s_short']:.2f}x"
            for name, r in results["settings"].items() if not r["local"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="a short name or a checkpoint directory")
    p.add_argument("--spans", nargs="+", help="the three servers' blocks (default: thirds)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    p.add_argument("--quick", action="store_true", help="a few steps per setting, churn 10x faster (CI)")
    p.add_argument("--settings", nargs="+", help="only the settings whose names contain one of these")
    p.add_argument("--churn-window-s", type=float, default=180.0,
                   help="how long each churn setting keeps generating (quick: a 60th)")
    p.add_argument("--plots", help="write PNG plots (latency against RTT, bandwidth, loss, churn) here")
    p.add_argument("--sweeps", action="store_true", help="more points for the plots: one parameter varied at a time")
    p.add_argument("--json", help="write every figure to this file")
    p.add_argument("--offload", action="store_true",
                   help="add the offloading baseline on the CPU too (with --device cuda it is always there)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--from-json", metavar="FILE", help="print the tables (and --plots) of a saved run; run nothing")
    a = p.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            results = json.load(f)
    else:
        results = run(a)
    print(tables(results))
    if a.json and not a.from_json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    if a.plots:
        plot(results, a.plots)
    return 0 if all(r["same"] for t in ("settings", "sweeps") for r in results[t].values()) else 1


def plot(results: dict, directory: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    # the main settings and the sweeps together; loopback is the point at zero of each axis
    every = [r for r in (*results["settings"].values(), *results["sweeps"].values()) if not r["local"]]
    base = [r for r in every if not (r["netem"] or r["churn_life_s"])]

    def loss(r: dict) -> float:
        return float(r["netem"].split("loss=")[1].split(",")[0]) * 100

    delayed = [r for r in every if r["delay_ms"]]
    uncapped = [r for r in delayed if not r["rate_mbit"]]  # the sweep's: latency alone on the x axis
    groups = {
        "rtt": ("RTT (ms)", [(2 * r["delay_ms"], r) for r in (uncapped or delayed)] + [(0.0, r) for r in base]),
        "bandwidth": ("bandwidth (Mbit/s), 4 ms RTT", [(r["rate_mbit"], r) for r in every
                                                       if r["rate_mbit"] and r["delay_ms"] == 2]),
        "failures": ("message loss (%)", [(loss(r), r) for r in every if "loss=" in r["netem"]]
                     + [(0.0, r) for r in base]),
        "churn": ("restarts per server per minute", [(60 / r["churn_life_s"], r) for r in every
                                                     if r["churn_life_s"]] + [(0.0, r) for r in base]),
    }
    for key, (label, points) in groups.items():
        points.sort(key=lambda x: x[0])
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.4))
        xs = [x for x, _ in points]
        ax.plot(xs, [1000 / r["steps_per_s_short"] for _, r in points], "o-", label="swarm, measured")
        if key in ("rtt", "bandwidth"):  # the ideal: loopback compute plus the emulated wire
            ideal = [(x, 1000 / r["ideal_steps_per_s_short"] if "ideal_steps_per_s_short" in r
                      else 1000 / r["steps_per_s_short"]) for x, r in points]
            ax.plot([x for x, _ in ideal], [y for _, y in ideal], "s--", label="ideal")
        ax.set_xlabel(label)
        ax.set_ylabel("ms per token")
        if key == "bandwidth":
            ax.set_xscale("log")
        ax.set_title(f"{results['model']}, {len(results['spans'])} servers")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(directory, f"latency_vs_{key}.png"), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
