#!/usr/bin/env python3
"""A chat loop in one inference session: the servers keep the conversation's attention caches,
so each turn sends only its new tokens.

    python examples/chat.py /path/to/model [--socket PATH]"""

import argparse

from transformers import AutoTokenizer

from libswarm import AutoDistributedModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--socket", default=None)
p.add_argument("--max-length", type=int, default=2048)
args = p.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoDistributedModelForCausalLM.from_pretrained(args.model, socket=args.socket)
with model.inference_session(max_length=args.max_length) as session:
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        ids = tokenizer(line + "\n", return_tensors="pt").input_ids
        known = 0 if session.ids is None else session.ids.shape[1]
        out = model.generate(ids, max_new_tokens=60, do_sample=True, top_p=0.9, temperature=0.7)
        new_tokens = out[0, known + ids.shape[1] :]  # generate() returns the whole conversation so far
        print("model>", tokenizer.decode(new_tokens, skip_special_tokens=True))
