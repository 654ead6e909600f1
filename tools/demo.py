#!/usr/bin/env python3
"""`make demo`: a swarm of three swarmd daemons on loopback serving a small random Llama model,
used through libswarm as if the model were local.

It makes the checkpoint with tools/make_test_model.py, starts the daemons (each serving a third
of the blocks), generates text through the first daemon's socket, prints the route (which daemon
served which blocks), the tokens, the speed, and whether Hugging Face's own model on the same
weights generates the very same tokens; then it stops the daemons cleanly. The weights are
random, so the text is gibberish: the point is that it is exactly what the whole model says."""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from localswarm import running_swarm  # noqa: E402
from make_test_model import make_model  # noqa: E402

LAYERS = 6
NEW_TOKENS = 48


def main() -> int:
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="swarm-demo-")
    print(f"making a random {LAYERS}-block Llama checkpoint in {root}/model ...", flush=True)
    model_dir = make_model("llama", os.path.join(root, "model"), layers=LAYERS, hidden=128, heads=4, kv_heads=2,
                           vocab=512, seed=1)
    spans = ["0:2", "2:4", "4:6"]
    print(f"starting 3 swarmd daemons serving blocks {', '.join(spans)} ...", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from libswarm import AutoDistributedModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with running_swarm(model_dir, spans, gateway=False, root=root) as (daemons, first):
        names = {d.address: d.name for d in daemons}
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, socket=first.socket)
        prompt = "The swarm serves a large language model"
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            t0 = time.perf_counter()
            out = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 pad_token_id=tokenizer.pad_token_id)
            seconds = time.perf_counter() - t0
            route = session.route
        print("\nroute (the app talks to daemon s0's socket; s0 plans the chain):")
        for address, first_block, last_block in route:
            print(f"  blocks {first_block}:{last_block}  served by {names.get(address, address)} at {address}")
        new = out[0, ids.shape[1]:]
        print(f"\nprompt: {prompt!r}")
        print(f"tokens: {new.tolist()}")
        print(f"text:   {tokenizer.decode(new)!r}")
        print(f"speed:  {NEW_TOKENS / seconds:.1f} tokens/s ({seconds * 1000 / NEW_TOKENS:.1f} ms/token, "
              "prefill included)")
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        expected = ref.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                pad_token_id=tokenizer.pad_token_id)
        same = torch.equal(out, expected)
        print(f"same tokens as Hugging Face's own model on the same weights: {'yes' if same else 'NO'}")
        print("\nstopping the daemons ...")
    codes = [d.proc.returncode if d.proc else None for d in daemons]
    print(f"daemons exited with {codes} (0 = clean shutdown)")
    return 0 if same and codes == [0, 0, 0] else 1


if __name__ == "__main__":
    sys.exit(main())
