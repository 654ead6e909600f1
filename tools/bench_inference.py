#!/usr/bin/env python3
"""Per-token decode latency of one model run (a) locally with Hugging Face, (b) through one
swarmd server, (c) through three servers, all on loopback behind a gateway-only daemon, measured
side by side in one run. Prints each, the ratios, and the overhead per extra hop.

    python tools/bench_inference.py [--family llama] [--layers 6] [--hidden 64] [--tokens 200]
    python tools/bench_inference.py --model smollm2-135m-instruct [--dtype float16] [--llama-bench PATH --gguf FILE]
    python tools/bench_inference.py --model smollm2-135m-instruct --quant int8,int4 --no-passes

With --model (a short name from libswarm.models, got into .cache/models once), the model is
that real checkpoint, the prompt is a chat, and a forward/backward pass to the input
embeddings through the frozen blocks (a prompt-tuning step) is timed side by side too.

The overhead per hop is (three servers - one server) / 2: the two extra round trips between
the gateway and a server that a three-server chain makes for every token."""

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
def swarm_step_s(model, prompt: torch.Tensor, tokens: int) -> list[float]:
    times = []
    with model.inference_session(max_length=prompt.shape[1] + tokens + 1):
        out = model(prompt)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(tokens):
            t = time.perf_counter()
            out = model(nxt)
            nxt = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
    return times


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


def llama_cpp_step_s(binary: str, gguf: str, tokens: int) -> list[float]:
    """llama.cpp's time per generated token (one thread, no prompt), from llama-bench."""
    import json
    import subprocess

    out = subprocess.run([binary, "-m", gguf, "-t", "1", "-p", "0", "-n", str(tokens), "-r", "1", "-o", "json"],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    return [1.0 / ts for ts in json.loads(out)[0]["samples_ts"]] * tokens


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
    p.add_argument("--llama-bench", default=None, metavar="PATH",
                   help="llama.cpp's llama-bench, run between rounds on --gguf with one thread (the same weights "
                        "converted by llama.cpp's convert_hf_to_gguf.py at the same precision)")
    p.add_argument("--gguf", default=None, metavar="FILE")
    p.add_argument("--no-passes", action="store_true", help="with --model: time decode only (no forward/backward)")
    p.add_argument("--quant", default="", metavar="KINDS",
                   help="also three servers with serve.quant of each of these (comma-separated: int8,int4,nf4), "
                        "timed in the same rounds")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="weights and compute everywhere: local HF, the servers (serve.dtype) and libswarm's "
                        "embeddings and head")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    torch.set_num_threads(1)  # the daemons run with one thread each, so does the local reference

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
    results: dict[str, list[float]] = {"local HF": [], "1 server": [], "3 servers": []}
    if a.llama_bench:
        results = {"llama.cpp": [], **results}
    passes: dict[str, list[float]] = {"local HF": [], "1 server": [], "3 servers": []}
    batch = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(1))
    ref.requires_grad_(False)  # as the swarm's blocks: gradients flow to the inputs only
    serve = {"serve": {"dtype": a.dtype}}
    quants = [q for q in a.quant.split(",") if q and q != "none"]
    with contextlib.ExitStack() as stack:
        _, gw1 = stack.enter_context(running_swarm(d, spans(layers, 1), extra=serve))
        _, gw3 = stack.enter_context(running_swarm(d, spans(layers, 3), extra=serve))
        m1 = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw1.socket, dtype=dtype)
        m3 = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw3.socket, dtype=dtype)
        mq = {}
        for q in quants:
            _, gwq = stack.enter_context(running_swarm(d, spans(layers, 3),
                                                       extra={"serve": {"dtype": a.dtype, "quant": q}}))
            mq[q] = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gwq.socket, dtype=dtype)
            results[f"3 servers, {q}"] = []
        for m in (m1, m3, *mq.values()):
            swarm_step_s(m, prompt, 20)  # warm up connections and allocators
        local_step_s(ref, prompt, 20)
        for _ in range(a.rounds):  # interleaved, so that machine noise hits all three alike
            if a.llama_bench:
                results["llama.cpp"] += llama_cpp_step_s(a.llama_bench, a.gguf, a.tokens)
            results["local HF"] += local_step_s(ref, prompt, a.tokens)
            results["1 server"] += swarm_step_s(m1, prompt, a.tokens)
            results["3 servers"] += swarm_step_s(m3, prompt, a.tokens)
            for q, m in mq.items():
                results[f"3 servers, {q}"] += swarm_step_s(m, prompt, a.tokens)
            if a.model and not a.no_passes:
                for key, model in (("local HF", ref), ("1 server", m1), ("3 servers", m3)):
                    passes[key] += fwd_bwd_s(model, batch, 3)
    med = {k: statistics.median(v) * 1e3 for k, v in results.items()}
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    what = (a.model or f"{a.family}, {a.layers} layers, hidden {a.hidden}") + f", {a.dtype}"
    print(f"model: {what}; {a.tokens * a.rounds} decode steps each after a {prompt.shape[1]}-token prompt, median")
    for k, v in med.items():
        vs_llama = f", {v / med['llama.cpp']:.2f}x llama.cpp" if "llama.cpp" in med else ""
        print(f"  {k:17s} {v:8.3f} ms/token   ({v / med['local HF']:.2f}x local{vs_llama})")
    per_hop_us = (med["3 servers"] - med["1 server"]) / 2 * 1e3
    print(f"  overhead of the swarm with one server: {(med['1 server'] - med['local HF']) * 1e3:.0f} us/token")
    print(f"  overhead per extra hop: {per_hop_us:.0f} us  (target <= 200 us)")
    if a.model and not a.no_passes:
        fb = {k: statistics.median(v) * 1e3 for k, v in passes.items()}
        print(f"forward/backward to the input embeddings of a {batch.shape[0]}x{batch.shape[1]} batch, "
              f"{len(passes['local HF'])} passes each, median:")
        for k, v in fb.items():
            print(f"  {k:10s} {v:8.1f} ms/pass    ({v / fb['local HF']:.2f}x local)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
