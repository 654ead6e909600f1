#!/usr/bin/env python3
"""Prompt tuning through your machine's swarmd: a few trainable embeddings, held here and
trained by your optimizer, are put before every input (with --deep, every block also gets its
own trainable prompt, added by the servers for each call and kept nowhere); the swarm's frozen
blocks run forward and backward. The dataset is made in the script: teach the model to answer
every question with the same word.

    python examples/prompt_tuning.py /path/to/model [--socket /run/swarmd/swarmd.sock] [--steps 30] [--deep]
"""

import argparse

import torch

from libswarm import AutoDistributedModelForCausalLM, load_tokenizer

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--socket", default=None)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--prompt-tokens", type=int, default=8)
p.add_argument("--deep", action="store_true", help="a trainable prompt for every block too")
args = p.parse_args()

tokenizer = load_tokenizer(args.model)  # a short name or a path
model = AutoDistributedModelForCausalLM.from_pretrained(args.model, socket=args.socket)
texts = [f"Q: {q}? A: swarm" for q in ("who serves the blocks", "what runs the model", "who answers", "what is this")]
batch = tokenizer(texts, return_tensors="pt", padding=True)
ids, mask = batch.input_ids, batch.attention_mask
labels = ids.masked_fill(mask == 0, -100)

torch.manual_seed(0)
prompts = model.add_prompts(args.prompt_tokens, deep=args.deep)  # the only trainable weights: here
opt = torch.optim.Adam(prompts.parameters(), lr=0.05)

for step in range(args.steps):
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # prompts are put in front
    opt.zero_grad()
    loss.backward()  # through the swarm: servers recompute their blocks and return gradients
    opt.step()
    print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
