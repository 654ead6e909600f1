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

from localswarm import Churn, Daemon, running_swarm, wait_converged  # noqa: E402


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
    if a.dozen_only:
        chosen = []
    progress = Progress(len(chosen) + len(sweeps) + bool(a.dozen or a.dozen_only), a.no_progress)
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
    if a.dozen or a.dozen_only:
        progress.step("a dozen servers, two continents")
        itemsize = torch.tensor([], dtype=dtype).element_size()
        results["dozen"] = run_dozen(a, model_dir, ref, prompts, sizes, vocab, hidden, itemsize, extra)
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


# The paper's "real servers" setting: a dozen servers of 1-3 blocks each, on two continents, each
# link's one-way delay from where its ends are (swarmd/transport/netem.py's geographic model:
# last mile + great-circle distance x 1.3 at 200 km/ms). One server per city; a client (a
# gateway-only daemon) on each side.
CITIES = [("London", 51.51, -0.13), ("Frankfurt", 50.11, 8.68), ("Amsterdam", 52.37, 4.90),
          ("Paris", 48.86, 2.35), ("Stockholm", 59.33, 18.07), ("Warsaw", 52.23, 21.01),
          ("New York", 40.71, -74.01), ("Ashburn", 39.04, -77.49), ("Toronto", 43.65, -79.38),
          ("Chicago", 41.88, -87.63), ("Dallas", 32.78, -96.80), ("San Jose", 37.34, -121.89)]
CLIENTS = [("client in Amsterdam", 52.37, 4.90), ("client in New York", 40.71, -74.01)]


def dozen_spans(n_layers: int, servers: int, rng) -> list[tuple[int, int]]:
    """`servers` contiguous spans of 1-3 blocks covering every block once (a random composition)."""
    if not servers <= n_layers <= 3 * servers:
        raise SystemExit(f"--dozen: {servers} servers of 1-3 blocks cannot cover {n_layers} blocks")
    sizes = [1] * servers
    for _ in range(n_layers - servers):
        sizes[rng.choice([i for i, x in enumerate(sizes) if x < 3])] += 1
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def run_dozen(a: argparse.Namespace, model_dir: str, ref, prompts: dict, sizes: Sizes, vocab: int,
              hidden: int, itemsize: int, extra: dict) -> dict:
    """Loopback first (the compute), then the geographic links: each client generates, then
    each again while servers restart at random (churn)."""
    import random
    import shutil
    import tempfile

    from libswarm import AutoDistributedModelForCausalLM
    from swarmd.identity import load_or_create_identity
    from swarmd.transport.netem import one_way_s

    rng = random.Random(a.dozen_seed)
    spans = dozen_spans(ref.config.num_hidden_layers, len(CITIES), rng)
    cities = rng.sample(CITIES, len(CITIES))  # which server sits where: a chain crosses the ocean at random
    out: dict = {"spans": [f"{x}:{y}" for x, y in spans], "cities": [c[0] for c in cities], "runs": {}}
    for geo in (False, True):
        root = tempfile.mkdtemp(prefix="swarm-dozen-")
        servers = [Daemon(root, f"s{i}", model_dir, f"{x}:{y}", extra) for i, (x, y) in enumerate(spans)]
        clients = [Daemon(root, f"c{i}", model_dir, "none", extra) for i in range(len(CLIENTS))]
        places = {}
        for d, (name, lat, lon) in [*zip(servers, cities), *zip(clients, CLIENTS)]:
            node_id = load_or_create_identity(d.cfg["state_dir"]).public_key  # the daemon keeps this key
            places[node_id] = {"name": name, "lat": lat, "lon": lon}
        path = os.path.join(root, "places.json")
        with open(path, "w") as f:
            json.dump({"places": places}, f)
        for d in servers + clients:
            if geo:
                d.env["SWARMD_NETEM"] = f"jitter_ms=0.5,places={path}"
        everyone = servers + clients
        seeds = [d.address for d in servers]
        try:
            for d in everyone:
                d.start(seeds)
            for d in everyone:
                d.wait_ready(timeout=180)
            wait_converged(everyone, len(servers), limit_s=60)
            todo = [(c, name, lat, lon, churn) for (c, (name, lat, lon)) in zip(clients, CLIENTS)
                    for churn in ((False, True) if geo else (False,))]
            for c, name, lat, lon, churn in todo:
                label = ("loopback, " + name) if not geo else name + (", churn" if churn else "")
                model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, socket=c.socket)
                model.route_timeout_s = 120
                before = c.ctl("status")["gateway"]["failovers"]
                if churn:
                    life = a.dozen_churn_life_s / (2 if a.quick else 1)
                    with Churn(servers, seeds, mean_life_s=life, downtime_s=2.0, seed=1) as ch:
                        r = measure(model, ref, prompts, sizes, vocab)
                    r["kills"] = ch.kills
                else:
                    r = measure(model, ref, prompts, sizes, vocab)
                r["failovers"] = c.ctl("status")["gateway"]["failovers"] - before
                if geo:  # the wire along the route with push: client -> s0 -> ... -> s11 -> client
                    ends = [(lat, lon), *[(c_[1], c_[2]) for c_ in cities], (lat, lon)]
                    wire = sum(one_way_s(x, y) for x, y in zip(ends, ends[1:]))
                    wire += (len(spans) + 1) * hidden * itemsize * 8 / 1e9  # serialising, negligible at 1 Gbit/s
                    r["wire_s"] = wire
                    for k in ("short", "long"):
                        compute = 1 / out["runs"]["loopback, " + name][f"steps_per_s_{k}"]
                        r[f"ideal_steps_per_s_{k}"] = 1 / (compute + wire)
                        r[f"vs_ideal_{k}"] = r[f"steps_per_s_{k}"] * (compute + wire)
                out["runs"][label] = r
                print(f"  {label}: {r['steps_per_s_short']:.2f} / {r['steps_per_s_long']:.2f} steps/s",
                      file=sys.stderr)
        finally:
            for d in everyone:
                d.terminate()
            for d in everyone:
                d.stop()
            shutil.rmtree(root, ignore_errors=True)
    return out


def dozen_table(dozen: dict) -> str:
    lines = ["", f"a dozen servers on two continents: spans {', '.join(dozen['spans'])}",
             f"in {', '.join(dozen['cities'])} (in block order)", "",
             "| client | steps/s short | steps/s long | ideal short | measured/ideal | wire one way, summed | "
             "failovers | kills | tokens equal |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in dozen["runs"].items():
        ideal = f"{r['ideal_steps_per_s_short']:.2f}" if "ideal_steps_per_s_short" in r else "-"
        ratio = f"{r['vs_ideal_short']:.2f} / {r['vs_ideal_long']:.2f}" if "vs_ideal_short" in r else "-"
        wire = f"{r['wire_s'] * 1000:.0f} ms" if "wire_s" in r else "-"
        lines.append(f"| {name} | {r['steps_per_s_short']:.2f} | {r['steps_per_s_long']:.2f} | {ideal} | {ratio} | "
                     f"{wire} | {r['failovers']} | {r.get('kills', '-')} | {'yes' if r['same'] else 'NO'} |")
    return "\n".join(lines)


def sweep_settings() -> list[Setting]:
    """For the plots: one parameter varied at a time."""
    out = [Setting(f"RTT {2 * d:g} ms", f"delay_ms={d}", d, 0) for d in (5, 25, 50, 100)]
    out += [Setting(f"{r:g} Mbit/s, 4 ms RTT", f"delay_ms=2,rate_mbit={r}", 2, r) for r in (10, 30, 100, 1000)]
    out += [Setting(f"{p:g} % loss", f"loss={p / 100},seed=2") for p in (0.5, 2, 10)]
    out += [Setting(f"churn, life {life:g} s", churn_life_s=life) for life in (10, 30, 120)]
    return out


def tables(results: dict) -> str:
    sizes = results["sizes"]
    if not results["settings"] and not results["sweeps"] and "dozen" in results:  # --dozen-only
        return f"machine: {results['machine']}; model {results['model']} ({results['dtype']})\n" + dozen_table(
            results["dozen"])
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
    if "dozen" in results:
        lines.append(dozen_table(results["dozen"]))
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
    p.add_argument("--dozen", action="store_true",
                   help="add the paper's real-servers setting: 12 servers of 1-3 blocks in 12 cities of Europe and "
                        "North America, a client on each side, with and without churn")
    p.add_argument("--dozen-only", action="store_true", help="only that setting")
    p.add_argument("--dozen-seed", type=int, default=0, help="draws the dozen's spans and cities")
    p.add_argument("--dozen-churn-life-s", type=float, default=300.0,
                   help="a server's mean life under churn (a kill every 25 s over the dozen; each block is on one "
                        "server, so a kill stalls every generation until its server is back)")
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
    runs = [*results["settings"].values(), *results["sweeps"].values(),
            *results.get("dozen", {}).get("runs", {}).values()]
    return 0 if all(r["same"] for r in runs) else 1


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
    dozen = results.get("dozen")
    if dozen:  # per client and prompt: measured against the ideal (compute + the route's wire), and under churn
        groups = [(c, k) for c, _, _ in CLIENTS if c in dozen["runs"] for k in ("short", "long")]
        fig, ax = plt.subplots(figsize=(7, 3.6))
        width = 0.27
        for j, what in enumerate(("ideal", "measured", "measured, churn")):
            ys = []
            for c, k in groups:
                r = dozen["runs"].get(c + ", churn" if what.endswith("churn") else c)
                key = f"ideal_steps_per_s_{k}" if what == "ideal" else f"steps_per_s_{k}"
                ys.append(1000 / r[key] if r is not None and key in r else 0.0)
            ax.bar([i + (j - 1) * width for i in range(len(groups))], ys, width, label=what)
        ax.set_xticks(range(len(groups)), [f"{c.removeprefix('client in ')}\n{k} prompt" for c, k in groups])
        ax.set_ylabel("ms per token")
        ax.set_title(f"{results['model']}, 12 servers in Europe and North America", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(directory, "dozen_two_continents.png"), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
