#!/usr/bin/env python3
"""Fine-tune a model you cannot hold with LoRA trained here: the adapters (A and B for the
chosen projections of every block) are ordinary parameters in this process's optimizer; the
swarm's servers run the frozen blocks forward and backward and keep nothing between steps.
The dataset is made in the script: teach the model a few fixed sentences. The adapter is
saved in PEFT's format at the end.

    python examples/finetune_lora.py /path/to/model [--socket /run/swarmd/swarmd.sock] [--steps 30] [--out adapter]
"""

import argparse

import torch

from libswarm import AutoDistributedModelForCausalLM, load_tokenizer

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--socket", default=None)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--rank", type=int, default=8)
p.add_argument("--out", default=None, help="save the adapter here (PEFT format)")
args = p.parse_args()

tokenizer = load_tokenizer(args.model)  # a short name or a path
model = AutoDistributedModelForCausalLM.from_pretrained(args.model, socket=args.socket)
lora = model.add_lora(rank=args.rank, alpha=2 * args.rank, target_modules=["q_proj", "v_proj", "down_proj"])
texts = ["the swarm serves every block", "servers keep nothing of ours", "gradients come back home"]
batch = tokenizer(texts, return_tensors="pt", padding=True)
labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
opt = torch.optim.AdamW(lora.parameters(), lr=3e-3)

for step in range(args.steps):
    loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
    opt.zero_grad()
    loss.backward()  # servers recompute their blocks with our adapters and send the gradients back
    opt.step()
    print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)

if args.out:
    model.save_lora(args.out)
    print(f"adapter saved in {args.out} (load it with peft.PeftModel.from_pretrained on the full model)")
