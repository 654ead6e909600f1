#!/usr/bin/env python3
"""A chat in one inference session: the servers keep the conversation's attention caches, so
each turn sends only its new tokens; the answer is printed as it is generated.

    swarmctl model get smollm2-135m-instruct
    python examples/chat.py smollm2-135m-instruct [--socket PATH]

The model is a short name (a model got with `swarmctl model get`) or a checkpoint directory;
its tokenizer's chat template formats the conversation."""

import argparse

import torch
from transformers import TextStreamer

from libswarm import AutoDistributedModelForCausalLM, load_tokenizer, resolve_model

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--socket", default=None)
p.add_argument("--max-length", type=int, default=2048)
p.add_argument("--max-new-tokens", type=int, default=200)
args = p.parse_args()

model_dir = resolve_model(args.model)
tokenizer = load_tokenizer(model_dir)
model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, socket=args.socket)
streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
messages: list[dict] = []
with model.inference_session(max_length=args.max_length) as session:
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        messages.append({"role": "user", "content": line})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids if torch.is_tensor(ids) else ids["input_ids"]
        known = 0 if session.ids is None else session.ids.shape[1]  # what the servers already hold
        print("model> ", end="", flush=True)
        out = model.generate(ids[:, known:], max_new_tokens=args.max_new_tokens, do_sample=True, top_p=0.9,
                             temperature=0.7, streamer=streamer)
        messages.append({"role": "assistant",
                         "content": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)})
