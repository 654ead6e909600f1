#!/usr/bin/env python3
"""Per-token decode time on one GPU, side by side in one run: Hugging Face generate(), the
swarm (three daemons on that GPU over loopback, behind a gateway-only daemon) with a plain
cache, with an int8 KV cache and with nf4 weights, and accelerate's cpu_offload (the paper's
RAM-offloading baseline), with the ratios; then SmolLM2-135M through the swarm on the same
device, its tokens checked against Hugging Face's.

    python tools/bench_gpu.py                 # CUDA: a random-weight 7B Llama shape, bfloat16
    python tools/bench_gpu.py --shape small   # any device (the CPU run the suite makes)

The 7B checkpoint (hidden 4096, 32 layers, MLP 11008, vocabulary 32000) is written once to
--work with random weights (one random layer's tensors repeated: the speed is the same, the
writing quicker), so the whole run takes a few minutes. Every time is the median of single-
token steps after a prefill of --prompt positions (CUDA synchronised around each)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512),
}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def random_checkpoint(out: str, shape: dict, dtype: torch.dtype) -> str:
    """A Llama checkpoint of `shape` with random weights: one shard per layer, every layer the
    same random tensors (a 7B one in tens of seconds, mostly disk)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.exists(os.path.join(out, "model.safetensors.index.json")):
        return out
    os.makedirs(out, exist_ok=True)
    cfg = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    cfg.save_pretrained(out)
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)

    def rand(shape_, name):
        if name.endswith("norm.weight"):
            return torch.ones(shape_, dtype=dtype)
        return (torch.randn(shape_, generator=g) * 0.02).to(dtype)

    names = dict(meta.state_dict().items())
    layer0 = {k[len("model.layers.0."):]: rand(v.shape, k) for k, v in names.items() if k.startswith("model.layers.0.")}
    index: dict[str, str] = {}
    for i in range(cfg.num_hidden_layers):
        file = f"layer-{i:03d}.safetensors"
        tensors = {f"model.layers.{i}.{k}": v.clone() for k, v in layer0.items()}
        save_file(tensors, os.path.join(out, file), metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, file))
    rest = {k: rand(v.shape, k) for k, v in names.items() if not k.startswith("model.layers.")}
    save_file(rest, os.path.join(out, "rest.safetensors"), metadata={"format": "pt"})
    index.update(dict.fromkeys(rest, "rest.safetensors"))
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def hf_step_s(model, prompt: torch.Tensor, tokens: int, device: torch.device) -> float:
    """Median time of one decode step of Hugging Face's model (its own cache)."""
    from transformers import DynamicCache

    out = model(prompt.to(device), past_key_values=DynamicCache(config=model.config), use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(tokens):
        sync(device)
        t = time.perf_counter()
        out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def swarm_step_s(model, prompt: torch.Tensor, tokens: int, device: torch.device) -> float:
    """Median time of one decode step through the swarm (an inference session)."""
    times = []
    with model.inference_session(max_length=prompt.shape[1] + tokens + 1):
        out = model(prompt.to(device))
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(tokens):
            sync(device)
            t = time.perf_counter()
            out = model(nxt)
            nxt = out.logits[:, -1:].argmax(-1)
            sync(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def spans(n_layers: int, parts: int = 3) -> list[str]:
    cuts = [round(i * n_layers / parts) for i in range(parts + 1)]
    return [f"{a}:{b}" for a, b in zip(cuts, cuts[1:])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 7b on CUDA, small elsewhere")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--tokens", type=int, default=None, help="decode steps timed (default: 64 on CUDA, 8 on CPU)")
    p.add_argument("--prompt", type=int, default=16, help="prompt positions before the timed steps")
    p.add_argument("--offload-tokens", type=int, default=3, help="decode steps timed under cpu_offload")
    p.add_argument("--work", default=None, help="where the random checkpoint and the daemons' files go")
    p.add_argument("--cache", default="2GiB", help="each server's KV cache budget")
    p.add_argument("--servers", type=int, default=3, help="daemons serving the model, one span each")
    p.add_argument("--no-real", action="store_true", help="skip the SmolLM2 check")
    a = p.parse_args(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    cuda = device.type == "cuda"
    shape = SHAPES[a.shape or ("7b" if cuda else "small")]
    tokens = a.tokens or (64 if cuda else 8)
    dtype = torch.bfloat16 if cuda else torch.float32
    dname = str(dtype).removeprefix("torch.")
    if not cuda:
        torch.set_num_threads(1)  # as the daemons (one thread each)
    work = a.work or tempfile.mkdtemp(prefix="swarm-bench-gpu-")
    t_start = time.monotonic()

    from localswarm import running_swarm
    from transformers import AutoModelForCausalLM

    from libswarm import AutoDistributedModelForCausalLM
    from libswarm.client import SwarmClient

    say(f"writing a random {shape['num_hidden_layers']}-layer, hidden {shape['hidden_size']} checkpoint")
    model_dir = random_checkpoint(os.path.join(work, "model"), shape, dtype)
    prompt = torch.randint(3, shape["vocab_size"], (1, a.prompt), generator=torch.Generator().manual_seed(1))
    rows: dict[str, float | None] = {}

    say("Hugging Face generate(), on the device")
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    rows["hf"] = hf_step_s(ref, prompt, tokens, device)
    del ref
    if cuda:
        torch.cuda.empty_cache()

    layers = shape["num_hidden_layers"]
    root = os.path.join(work, "swarm")  # kept between configurations: weights are hashed once
    base = {"serve": {"device": str(device), "dtype": dname, "threads": 1 if not cuda else "auto",
                      "cache": {"max_bytes": a.cache}}}
    configs = {"swarm": {}, "swarm, int8 KV": {"serve": {"cache": {"max_bytes": a.cache, "kv_dtype": "int8"}}},
               "swarm, nf4 weights": {"serve": {"quant": "nf4"}}}
    capacity: dict[str, int] = {}
    for name, over in configs.items():
        say(f"{name}: {a.servers} daemons on {device}")
        extra = {k: {**base.get(k, {}), **v} for k, v in {**base, **over}.items()}
        with running_swarm(model_dir, spans(layers, a.servers), extra=extra, root=root) as (servers, gw):
            model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, socket=gw.socket, dtype=dtype)
            model.to(device)
            rows[name] = swarm_step_s(model, prompt, tokens, device)
            capacity[name] = SwarmClient(socket=servers[0].socket).status()["cache"]["capacity_tokens"]

    rows["cpu_offload"] = None
    if cuda:
        say("accelerate cpu_offload of the whole model")
        from accelerate import cpu_offload

        off = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        cpu_offload(off, execution_device=device)
        rows["cpu_offload"] = hf_step_s(off, prompt, a.offload_tokens, device)
        del off

    real_same = None
    if not a.no_real:
        say("SmolLM2-135M through the swarm, against Hugging Face (float32)")
        from libswarm.models import get_model

        real = get_model("smollm2-135m-instruct", os.path.join(os.path.dirname(HERE), ".cache", "models"))
        extra = {"serve": {"device": str(device), "dtype": "float32", "cache": {"max_bytes": "256MiB"}}}
        with running_swarm(real, spans(30, a.servers), extra=extra, root=os.path.join(work, "real")) as (_, gw):
            model = AutoDistributedModelForCausalLM.from_pretrained(real, socket=gw.socket).to(device)
            ref = AutoModelForCausalLM.from_pretrained(real, dtype=torch.float32).to(device).eval()
            from transformers import AutoTokenizer

            chat = AutoTokenizer.from_pretrained(real).apply_chat_template(
                [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                add_generation_prompt=True, return_tensors="pt")
            ids = (chat if torch.is_tensor(chat) else chat["input_ids"]).to(device)
            kw = dict(do_sample=False, max_new_tokens=24)
            real_same = torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))

    gpu = torch.cuda.get_device_name(device) if cuda else "none"
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, GPU: {gpu}, torch {torch.__version__}")
    print(f"model: random Llama, hidden {shape['hidden_size']}, {layers} layers, {dname}; servers "
          f"{', '.join(spans(layers, a.servers))}; prompt {a.prompt}, {tokens} steps timed (median); "
          f"run took {time.monotonic() - t_start:.0f} s")
    hf = rows["hf"]
    assert hf is not None
    for name, s in rows.items():
        if s is None:
            print(f"  {name:20s}      n/a (no GPU)")
            continue
        print(f"  {name:20s} {s * 1000:9.2f} ms/token   HF / this: {hf / s:6.2f}x")
    plain = rows["swarm"]
    assert plain is not None
    if rows["cpu_offload"]:
        print(f"  swarm vs cpu_offload: {rows['cpu_offload'] / plain:.0f}x faster")
    int8 = rows["swarm, int8 KV"]
    assert int8 is not None
    print(f"  int8 KV: {capacity['swarm, int8 KV'] / capacity['swarm']:.2f}x the tokens of cache in the same budget "
          f"({capacity['swarm']:,} -> {capacity['swarm, int8 KV']:,} on the first server); per token "
          f"{int8 / plain:.2f}x the plain cache's time")
    if real_same is not None:
        print(f"  SmolLM2-135M through the swarm on {device}: tokens equal to HF's: {'yes' if real_same else 'NO'}")
    return 0 if real_same in (None, True) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
