#!/usr/bin/env python3
"""Tokens per second of greedy decoding through a 3-server swarm over an emulated slow network,
plain and speculative, side by side in one run, with the same tokens checked.

    python tools/bench_speculative.py [--model smollm2-135m-instruct] [--delay-ms 50] [--draft-blocks 10 20]
                                      [--draft-model DIR ...]

Every peer message is delayed by --delay-ms (SWARMD_NET_DELAY_MS: a round trip of twice that),
so a token's cost is mostly the chain's round trips. Speculative decoding drafts tokens locally
and verifies several in one pass through the swarm:
- "assisted": Hugging Face's own assisted generation loop (which generate(assistant_model=) ran
  before it ran libswarm's) with a draft model made of the same model's first --draft-blocks
  blocks, its final norm and LM head (same tokenizer, no other checkpoint), drafting
  --draft-tokens tokens per pass;
- "assisted, DIR": the same with a separate draft checkpoint of the same tokenizer (--draft-model:
  a directory, or a model name libswarm.models knows);
- "ahead, DIR": the same draft in libswarm's own loop (libswarm/speculative.py), which goes on
  drafting while a pass is out, as the OpenAI API does with api.draft_model;
- "generate, DIR": model.generate(assistant_model=DIR's draft), which runs that loop;
- "prompt lookup": drafts copied from the prompt (HF's prompt_lookup_num_tokens), for
  answers that repeat their input.
Each mode must give exactly the plain greedy tokens."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time

import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from localswarm import running_swarm  # noqa: E402

PROMPTS = {
    "chat": [
        "Repeat after me, word for word: the swarm serves every block of the model, and the gateway keeps the "
        "inputs it sent, so a replacement server is rebuilt by replay.",
        "Write two sentences about why bees live in swarms.",
    ],
    "coding": [
        "Write a Python function that returns the n-th Fibonacci number iteratively.",
        "Write a Python function that checks whether a string is a palindrome, ignoring case.",
    ],
}


class Timer:
    """Seconds spent inside a callable, and how many calls."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return timed


def draft_model(model_dir: str, blocks: int | None, tokens: int, dtype: str = "float32", quant: str = "none"):
    """The draft: the model's first `blocks` blocks (all of them: None), then its final norm and
    LM head; with `quant`, its linear layers packed (libswarm.speculative.packed_draft)."""
    from transformers import AutoModelForCausalLM

    from libswarm.speculative import packed_draft

    draft = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    if quant != "none":
        packed_draft(draft, quant)
    if blocks is not None:
        draft.model.layers = draft.model.layers[:blocks]
        draft.config.num_hidden_layers = blocks
    draft.generation_config.num_assistant_tokens = tokens
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    return draft


@contextlib.contextmanager
def hf_assisted_loop():
    """Hugging Face's own assisted loop in generate(), for comparison (libswarm's runs otherwise)."""
    from transformers import GenerationMixin

    from libswarm.model import DistributedModelForCausalLM

    ours = DistributedModelForCausalLM._assisted_decoding
    DistributedModelForCausalLM._assisted_decoding = GenerationMixin._assisted_decoding  # type: ignore[method-assign]
    try:
        yield
    finally:
        DistributedModelForCausalLM._assisted_decoding = ours  # type: ignore[method-assign]


def ahead(model, draft, ids: torch.Tensor, n: int, first_k: int, eos: int | None):
    """Greedy tokens by libswarm's speculative loop (drafting while passes are out), stopped at
    `n` new tokens or the end of text as generate() stops: (ids with the new tokens, its stats)."""
    from libswarm import speculative

    return speculative.generate(model, draft, ids, n, eos, first_k=first_k)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--delay-ms", type=float, default=50.0, help="added to every peer message (RTT: twice this)")
    p.add_argument("--draft-blocks", type=int, nargs="*", default=[10, 20])
    p.add_argument("--draft-model", nargs="*", default=[],
                   help="separate draft checkpoints (directories or known model names); the model's own name is "
                        "the perfect draft, an upper bound")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per pass (constant)")
    p.add_argument("--draft-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="of a separate draft model (bfloat16: half its bytes a token, and a draft need not be exact)")
    p.add_argument("--draft-quant", default="none", choices=["none", "int8", "int4"],
                   help="a separate draft's linear layers in torch's packed kernels")
    p.add_argument("--no-ahead", action="store_true", help="without the modes of libswarm's own loop (ahead, generate)")
    p.add_argument("--serve", default=None, metavar="YAML",
                   help="the servers' `serve:` settings as YAML, e.g. '{quant: int8}' (default: the daemon's)")
    p.add_argument("--modes", nargs="*", default=None, choices=["assisted", "ahead", "generate", "prompt lookup"],
                   help="only these beside plain (default: all)")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--prompts", choices=sorted(PROMPTS), default=None,
                   help="chat or coding (default: coding for a coder model, else chat)")
    a = p.parse_args(argv)
    prompts = PROMPTS[a.prompts or ("coding" if "coder" in a.model else "chat")]
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from libswarm import AutoDistributedModelForCausalLM
    from libswarm.models import get_model

    d = get_model(a.model, os.path.join(os.path.dirname(HERE), ".cache", "models"))
    tokenizer = AutoTokenizer.from_pretrained(d)
    n = AutoModelForCausalLM.from_pretrained(d).config.num_hidden_layers
    cuts = [round(i * n / 3) for i in range(4)]
    spans = [f"{x}:{y}" for x, y in zip(cuts, cuts[1:])]
    modes: dict[str, dict] = {"plain": {}}
    for blocks in a.draft_blocks:
        modes[f"assisted, {blocks} blocks"] = {"assistant_model": draft_model(d, blocks, a.draft_tokens)}
    for name in a.draft_model:
        path = name if os.path.isdir(name) else get_model(name, os.path.join(os.path.dirname(HERE), ".cache", "models"))
        draft = draft_model(path, None, a.draft_tokens, a.draft_dtype, a.draft_quant)
        short = os.path.basename(os.path.normpath(name))
        modes[f"assisted, {short}"] = {"assistant_model": draft}
        if not a.no_ahead:
            modes[f"ahead, {short}"] = {"ahead": draft}
            modes[f"generate, {short}"] = {"assistant_model": draft}
    modes["prompt lookup"] = {"prompt_lookup_num_tokens": 10}
    if a.modes:  # plain always runs: the others are measured against it
        modes = {m: o for m, o in modes.items() if m == "plain" or m.split(",")[0] in a.modes}
    results: dict[str, list[tuple[int, float]]] = {m: [] for m in modes}
    same = {m: True for m in modes}
    # where a mode's time goes: the draft's forward passes, the swarm's passes (a step through
    # every server and back: round trips and the servers' compute), and the rest (this process's
    # embeddings, head and generate() itself)
    drafting = {m: Timer() for m in modes}
    passes = {m: Timer() for m in modes}
    running = {"mode": ""}  # the mode timed now: a draft serves an assisted and an ahead mode

    def timed(forward):
        def run(*args, **kwargs):
            return drafting[running["mode"]].wrap(forward)(*args, **kwargs)
        return run

    for draft in {id(d): d for o in modes.values() for k, d in o.items() if k in ("assistant_model", "ahead")}.values():
        draft.forward = timed(draft.forward)
    ahead_stats: dict[str, list] = {m: [] for m in modes}
    from libswarm.model import RemoteSession

    step = RemoteSession.step
    env = {"SWARMD_NET_DELAY_MS": str(a.delay_ms)}
    serve = {"serve": yaml.safe_load(a.serve)} if a.serve else {}
    with running_swarm(d, spans, env_all=env, server_extra={i: serve for i in range(len(spans))}) as (_, gw):
        model = AutoDistributedModelForCausalLM.from_pretrained(d, socket=gw.socket)
        for prompt in prompts:
            chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 return_tensors="pt")
            ids = chat if torch.is_tensor(chat) else chat["input_ids"]
            plain = None
            for mode, opts in modes.items():
                RemoteSession.step = passes[mode].wrap(step)  # type: ignore[method-assign]
                running["mode"] = mode
                t0 = time.perf_counter()
                if "ahead" in opts:
                    out, stats = ahead(model, opts["ahead"], ids, a.tokens, a.draft_tokens, tokenizer.eos_token_id)
                    ahead_stats[mode].append(stats)
                else:
                    with hf_assisted_loop() if mode.startswith("assisted") else contextlib.nullcontext():
                        out = model.generate(ids, do_sample=False, max_new_tokens=a.tokens, **opts)
                results[mode].append((out.shape[1] - ids.shape[1], time.perf_counter() - t0))
                RemoteSession.step = step  # type: ignore[method-assign]
                plain = out if plain is None else plain
                same[mode] = same[mode] and torch.equal(out, plain)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"model: {a.model}, servers {', '.join(spans)}; every peer message delayed {a.delay_ms:g} ms; "
          f"greedy, up to {a.tokens} new tokens for each of {len(prompts)} prompts (prefill included)")
    base = sum(t for t, _ in results["plain"]) / sum(s for _, s in results["plain"])
    for mode, runs in results.items():
        rate = sum(t for t, _ in runs) / sum(s for _, s in runs)
        per_prompt = ", ".join(f"{t / s:.2f}" for t, s in runs)
        print(f"  {mode:34s} {rate:6.2f} tokens/s  ({rate / base:.2f}x plain; per prompt {per_prompt})  "
              f"same tokens as plain: {'yes' if same[mode] else 'NO'}")
        tokens, seconds = sum(t for t, _ in runs), sum(s for _, s in runs)
        swarm, draft = passes[mode], drafting[mode]
        if mode.startswith("generate"):  # its draft runs beside the passes, and generate() tells not how much
            print(f"  {'':34s} a token: {1000 * seconds / tokens:.0f} ms = swarm {1000 * swarm.seconds / tokens:.0f} "
                  f"({swarm.calls} passes, {tokens / max(1, swarm.calls):.2f} tokens a pass) + the rest; the draft "
                  f"ran {1000 * draft.seconds / tokens:.0f} a token, beside the passes in part")
            continue
        # drafting ahead overlaps the passes: only what the decoding waited for adds up
        draft_s = sum(x.draft_waited_s for x in ahead_stats[mode]) if ahead_stats[mode] else draft.seconds
        print(f"  {'':34s} a token: {1000 * seconds / tokens:.0f} ms = draft {1000 * draft_s / tokens:.0f} "
              f"({draft.calls} forward passes) + swarm {1000 * swarm.seconds / tokens:.0f} ({swarm.calls} passes, "
              f"{1000 * swarm.seconds / max(1, swarm.calls):.0f} ms each, {tokens / max(1, swarm.calls):.2f} tokens "
              f"a pass) + the rest {1000 * (seconds - draft_s - swarm.seconds) / tokens:.0f}")
        if ahead_stats[mode]:
            st = ahead_stats[mode]
            waited, total = sum(x.draft_waited_s for x in st), sum(x.draft_s for x in st)
            print(f"  {'':34s} of the draft's {1000 * total / tokens:.0f} ms a token, {1000 * waited / tokens:.0f} "
                  f"waited for (the rest ran while passes were out); {sum(x.ahead_drafts for x in st)} of "
                  f"{sum(x.drafted for x in st)} drafts made while the pass before was out "
                  f"({sum(x.ahead_passes for x in st)} of {sum(x.passes for x in st)} passes left with all "
                  f"of theirs); {sum(x.accepted for x in st)} drafts taken; drafts a pass: "
                  f"{' | '.join(' '.join(map(str, x.carried)) for x in st)}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
