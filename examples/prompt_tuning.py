#!/usr/bin/env python3
"""Prompt tuning through your machine's swarmd: a few trainable embeddings, held here and
trained by your optimizer, are prepended to every input; the swarm's frozen blocks run
forward and backward. The dataset is made in the script: teach the model to answer every
question with the same word.

    python examples/prompt_tuning.py /path/to/model [--socket /run/swarmd/swarmd.sock] [--steps 30]
"""

import argparse

import torch
from transformers import AutoTokenizer

from libswarm import AutoDistributedModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--socket", default=None)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--prompt-tokens", type=int, default=8)
args = p.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoDistributedModelForCausalLM.from_pretrained(args.model, socket=args.socket)
texts = [f"Q: {q}? A: swarm" for q in ("who serves the blocks", "what runs the model", "who answers", "what is this")]
batch = tokenizer(texts, return_tensors="pt", padding=True)
ids, mask = batch.input_ids, batch.attention_mask
n, hidden = args.prompt_tokens, model.config.hidden_size

torch.manual_seed(0)
prompt = torch.nn.Parameter(torch.randn(1, n, hidden) * 0.02)  # the only trainable weights: here, not on servers
opt = torch.optim.Adam([prompt], lr=0.05)
labels = torch.cat([torch.full((len(texts), n), -100), ids.masked_fill(mask == 0, -100)], dim=1)
full_mask = torch.cat([torch.ones(len(texts), n, dtype=mask.dtype), mask], dim=1)

for step in range(args.steps):
    embeds = torch.cat([prompt.expand(len(texts), -1, -1), model.get_input_embeddings()(ids)], dim=1)
    loss = model(inputs_embeds=embeds, attention_mask=full_mask, labels=labels).loss
    opt.zero_grad()
    loss.backward()  # through the swarm: servers recompute their blocks and return gradients
    opt.step()
    print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
