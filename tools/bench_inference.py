#!/usr/bin/env python3
"""Per-token decode latency of one model run (a) locally with Hugging Face, (b) through one
swarmd server, (c) through three servers, all on loopback behind a gateway-only daemon, measured
side by side in one run. Prints each, the ratios, and the overhead per extra hop.

    python tools/bench_inference.py [--family llama] [--layers 6] [--hidden 64] [--tokens 200] [--cpu]
    python tools/bench_inference.py --model smollm2-135m-instruct [--dtype float16] [--llama-bench PATH --gguf FILE]
    python tools/bench_inference.py --model smollm2-135m-instruct --quant int8,int4 --no-passes
    python tools/bench_inference.py --model qwen2.5-coder-1.5b-instruct --no-passes --skip 1,3 \
        --llama-bench PATH --gguf int8=Q8_0.gguf --gguf int4=Q4_K_M.gguf

--gguf KIND=FILE (int8 or int4) runs llama.cpp on FILE and, in the same rounds, three servers on
FILE imported with its quantization kept (compared with each other, and --quant KIND's servers
with the first FILE of KIND) (swarmctl model import --keep-quant): the very weights
llama.cpp computes with, with the app's LM head in int8 (libswarm's head_quant auto); a plain
--gguf FILE (a float file) is compared with the float servers. --threads sets the compute
threads of everyone alike: the local reference, each daemon (serve.threads) and llama.cpp.

With --model (a short name from libswarm.models, got into .cache/models once), the model is
that real checkpoint, the prompt is a chat, and a forward/backward pass to the input
embeddings through the frozen blocks (a prompt-tuning step) is timed side by side too.

The overhead per hop is (three servers - one server) / 2: the two extra round trips between
the gateway and a server that a three-server chain makes for every token. With --cpu, the CPU
each process spends a decode step is read around the timed steps (the scheduler's count per
thread): where a hop's time goes, and whether the steps are serial work (the sum near the wall
time) or wait on something."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from localswarm import cpu_split, thread_cpu  # noqa: E402
from make_test_model import make_model  # noqa: E402


@torch.no_grad()
def local_step_s(ref, prompt: torch.Tensor, tokens: int) -> list[float]:
    from transformers import DynamicCache

    cache = DynamicCache(config=ref.config)
    out = ref(prompt, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(tokens):
        t = time.perf_counter()
        out = ref(nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t)
    return times


@torch.no_grad()
def swarm_step_s(model, prompt: torch.Tensor, tokens: int, probe=None) -> list[float]:
    """Each decode step's time in a session; `probe(True)` is called after the prefill and
    `probe(False)` after the last step."""
    times = []
    with model.inference_session(max_length=prompt.shape[1] + tokens + 1):
        out = model(prompt)
        nxt = out.logits[:, -1:].argmax(-1)
        if probe is not None:
            probe(True)
        for _ in range(tokens):
            t = time.perf_counter()
            out = model(nxt)
            nxt = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
        if probe is not None:
            probe(False)
    return times


class CpuMeter:
    """The CPU time decode steps cost each process of a swarm (this one, the gateway, each
    server; the daemons' Python threads apart from ZeroMQ's I/O threads), summed over the
    probed stretches: the per-hop breakdown of --cpu."""

    def __init__(self, daemons: list[tuple[str, int]]):
        self.daemons = daemons
        self.spent = {name: [0.0, 0.0] for name in ["app", *(name for name, _ in daemons)]}
        self.steps = 0
        self._before: dict = {}

    def probe(self, tokens: int):
        def probe(starting: bool) -> None:
            if starting:
                self._before = {name: thread_cpu(pid) for name, pid in self.daemons}
                self._before["app"] = time.process_time()
                return
            self.spent["app"][0] += time.process_time() - self._before["app"]
            for name, pid in self.daemons:
                py, io = cpu_split(self._before[name], thread_cpu(pid))
                self.spent[name][0] += py
                self.spent[name][1] += io
            self.steps += tokens
        return probe

    def report(self, wall_ms: float) -> str:
        per = {name: (1e3 * py / self.steps, 1e3 * io / self.steps) for name, (py, io) in self.spent.items()}
        parts = [f"{name} {py:.2f}" + (f" + {io:.2f}" if name != "app" else "") for name, (py, io) in per.items()]
        total = sum(py + io for py, io in per.values())
        return f"{', '.join(parts)}; all {total:.2f} ms a token (wall {wall_ms:.2f})"


def fwd_bwd_s(model, ids: torch.Tensor, repeats: int) -> list[float]:
    """A causal-LM loss over `ids`, forward and backward to the input embeddings through the
    frozen blocks: what a prompt-tuning step computes (LoRA adds little on top)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=embeds, labels=ids).loss.backward()
        times.append(time.perf_counter() - t)
    return times


def llama_cpp_step_s(binary: str, gguf: str, tokens: int, threads: int) -> list[float]:
    """llama.cpp's time per generated token (no prompt), from llama-bench: one mean over `tokens`
    tokens, counted once per token so that rounds weigh alike in the median."""
    import json
    import subprocess

    out = subprocess.run([binary, "-m", gguf, "-t", str(threads), "-p", "0", "-n", str(tokens), "-r", "1",
                          "-o", "json"], capture_output=True, text=True, check=True, timeout=600).stdout
    return [1.0 / ts for ts in json.loads(out)[0]["samples_ts"]] * tokens


def gguf_pairs(values: list[str]) -> list[tuple[str, str]]:
    """--gguf values as (kind, file): "int8=F" / "int4=F" (kept quantized), or "F" (float)."""
    out = []
    for v in values:
        kind, sep, path = v.partition("=")
        if not sep:
            kind, path = "float", v
        if kind not in ("float", "int8", "int4"):
            raise SystemExit(f"--gguf {v!r}: KIND=FILE with KIND int8 or int4, or a float FILE")
        if not os.path.isfile(path):
            raise SystemExit(f"--gguf {v!r}: no such file")
        out.append((kind, path))
    return out


def spans(n_layers: int, parts: int) -> list[str]:
    cuts = [round(i * n_layers / parts) for i in range(parts + 1)]
    return [f"{a}:{b}" for a, b in zip(cuts, cuts[1:])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a real model by short name, e.g. smollm2-135m-instruct")
    p.add_argument("--family", default="llama")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--tokens", type=int, default=200, help="decode steps timed per configuration")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median step is reported")
    p.add_argument("--threads", type=int, default=1, help="compute threads of each process (default 1)")
    p.add_argument("--llama-bench", default=None, metavar="PATH", help="llama.cpp's llama-bench, run between "
                   "rounds on each --gguf file")
    p.add_argument("--gguf", action="append", default=[], metavar="[KIND=]FILE",
                   help="a GGUF of the model for llama.cpp (repeatable); KIND int8 or int4: also served "
                        "kept quantized by three servers")
    p.add_argument("--skip", default="", metavar="WHICH",
                   help="configurations left out (comma-separated: local, 1, 3): a large model's float "
                        "copies may not all fit in memory at once")
    p.add_argument("--no-passes", action="store_true", help="with --model: time decode only (no forward/backward)")
    p.add_argument("--quant", default="", metavar="KINDS",
                   help="also three servers with serve.quant of each of these (comma-separated: int8,int4,nf4), "
                        "timed in the same rounds")
    p.add_argument("--cpu", action="store_true",
                   help="also the CPU each process spends a decode step (app, gateway, each server; Python "
                        "threads + ZeroMQ I/O threads): where a hop's time goes")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="weights and compute everywhere: local HF, the servers (serve.dtype) and libswarm's "
                        "embeddings and head")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    torch.set_num_threads(a.threads)  # as each daemon (serve.threads) and llama.cpp (-t)
    skip = {w.strip() for w in a.skip.split(",") if w.strip()}
    if skip - {"local", "1", "3"}:
        raise SystemExit(f"--skip {a.skip!r}: a comma-separated list of local, 1, 3")
    ggufs = gguf_pairs(a.gguf)
    if ggufs and not a.llama_bench:
        raise SystemExit("--gguf needs --llama-bench PATH")

    from localswarm import running_swarm
    from transformers import AutoModelForCausalLM

    from libswarm import AutoDistributedModelForCausalLM

    if a.model:
        from transformers import AutoTokenizer

        from libswarm.models import get_model

        d = get_model(a.model, os.path.join(os.path.dirname(HERE), ".cache", "models"))
        tokenizer = AutoTokenizer.from_pretrained(d)
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about swarms of bees."}],
                                             add_generation_prompt=True, return_tensors="pt")
        prompt = chat if torch.is_tensor(chat) else chat["input_ids"]
    else:
        d = make_model(a.family, tempfile.mkdtemp(prefix="bench-"), layers=a.layers, hidden=a.hidden)
        prompt = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
    layers = ref.config.num_hidden_layers
    ref.requires_grad_(False)  # as the swarm's blocks: gradients flow to the inputs only
    if "local" in skip:
        ref = None
    batch = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(1))
    serve = {"dtype": a.dtype, "threads": a.threads}
    swarms: dict[str, object] = {}  # configuration -> the model through its swarm
    meters: dict[str, CpuMeter] = {}  # configuration -> the CPU its processes spent (--cpu)
    llama: dict[str, str] = {}  # configuration -> its GGUF file
    with contextlib.ExitStack() as stack:
        def swarm(name: str, model_dir: str, n: int, **extra) -> None:
            servers, gw = stack.enter_context(running_swarm(model_dir, spans(layers, n),
                                                            extra={"serve": {**serve, **extra}}))
            swarms[name] = AutoDistributedModelForCausalLM.from_pretrained(model_dir, socket=gw.socket, dtype=dtype)
            meters[name] = CpuMeter([("gateway", gw.proc.pid)] + [(f"server {i}", s.proc.pid)
                                                                  for i, s in enumerate(servers)])

        for n in (1, 3):
            if str(n) not in skip:
                swarm(f"{n} server" + "s" * (n > 1), d, n)
        for q in (q for q in a.quant.split(",") if q and q != "none"):
            swarm(f"3 servers, {q}", d, 3, quant=q)
        pairs: dict[str, str] = {}  # a configuration -> the llama.cpp one it is compared with
        for kind, path in ggufs:
            stem = os.path.splitext(os.path.basename(path))[0]
            llama[f"llama.cpp {stem}"] = path
            if kind == "float":
                pairs["3 servers"] = f"llama.cpp {stem}"
            else:
                from libswarm.convert import convert_gguf

                kept = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-kept-"))
                convert_gguf(path, kept, a.dtype, keep_quant=True)
                swarm(f"3 servers, {stem} kept", kept, 3)
                pairs[f"3 servers, {stem} kept"] = f"llama.cpp {stem}"
                pairs.setdefault(f"3 servers, {kind}", f"llama.cpp {stem}")  # quantized as it loads
        for m in swarms.values():
            swarm_step_s(m, prompt, 20)  # warm up connections and allocators
        if ref is not None:
            local_step_s(ref, prompt, 20)
        results: dict[str, list[float]] = {k: [] for k in [*llama, *(["local HF"] if ref is not None else []),
                                                             *swarms]}
        passes: dict[str, list[float]] = {}
        for _ in range(a.rounds):  # interleaved, so that machine noise hits all alike
            for k, path in llama.items():
                results[k] += llama_cpp_step_s(a.llama_bench, path, a.tokens, a.threads)
            if ref is not None:
                results["local HF"] += local_step_s(ref, prompt, a.tokens)
            for k, m in swarms.items():
                results[k] += swarm_step_s(m, prompt, a.tokens, meters[k].probe(a.tokens) if a.cpu else None)
            if a.model and not a.no_passes:
                for k, model in (("local HF", ref), ("1 server", swarms.get("1 server")),
                                 ("3 servers", swarms.get("3 servers"))):
                    if model is not None:
                        passes.setdefault(k, []).extend(fwd_bwd_s(model, batch, 3))
    med = {k: statistics.median(v) * 1e3 for k, v in results.items()}
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    what = (a.model or f"{a.family}, {a.layers} layers, hidden {a.hidden}") + f", {a.dtype}"
    print(f"model: {what}; {a.tokens * a.rounds} decode steps each after a {prompt.shape[1]}-token prompt, "
          f"median; {a.threads} thread(s) a process")
    for k, v in med.items():
        vs = [f"{v / med['local HF']:.2f}x local"] if "local HF" in med else []
        if pairs.get(k) in med:
            vs.append(f"{v / med[pairs[k]]:.2f}x {pairs[k]}")
        print(f"  {k:34s} {v:8.3f} ms/token   ({', '.join(vs) or '-'})")
    if "local HF" in med and "1 server" in med:
        print(f"  overhead of the swarm with one server: {(med['1 server'] - med['local HF']) * 1e3:.0f} us/token")
    if "1 server" in med and "3 servers" in med:
        per_hop_us = (med["3 servers"] - med["1 server"]) / 2 * 1e3
        print(f"  overhead per extra hop: {per_hop_us:.0f} us  (target <= 300 us)")
    if a.cpu:
        print("CPU a decode step, per process (ms; daemons: Python threads + ZeroMQ I/O threads):")
        for k, meter in meters.items():
            print(f"  {k:34s} {meter.report(statistics.mean(results[k]) * 1e3)}")
    if passes:
        fb = {k: statistics.median(v) * 1e3 for k, v in passes.items()}
        print(f"forward/backward to the input embeddings of a {batch.shape[0]}x{batch.shape[1]} batch, "
              f"{len(next(iter(passes.values())))} passes each, median:")
        for k, v in fb.items():
            vs = f"    ({v / fb['local HF']:.2f}x local)" if "local HF" in fb else ""
            print(f"  {k:10s} {v:8.1f} ms/pass{vs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
