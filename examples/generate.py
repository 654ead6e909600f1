#!/usr/bin/env python3
"""Generate text through your machine's swarmd.

    python examples/generate.py /path/to/model "Once upon a time" [--socket /run/swarmd/swarmd.sock]

The model directory is the same Hugging Face checkpoint the swarm serves (only its embeddings,
final norm, LM head and tokenizer are loaded here)."""

import argparse

from libswarm import AutoDistributedModelForCausalLM, load_tokenizer

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("prompt")
p.add_argument("--socket", default=None)
p.add_argument("--max-new-tokens", type=int, default=40)
args = p.parse_args()

tokenizer = load_tokenizer(args.model)  # a short name or a path
model = AutoDistributedModelForCausalLM.from_pretrained(args.model, socket=args.socket)
ids = tokenizer(args.prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=True, top_p=0.9, temperature=0.7)
print(tokenizer.decode(out[0], skip_special_tokens=True))
