#!/usr/bin/env python3
"""How much quantized weights (serve.quant) change a real model's choices: the share of
positions of real chat answers where the quantized model's top token is the float32 model's.

The float32 model answers each chat prompt greedily; every position of those answers is then
run through all the blocks as a server runs them (swarmd's Span, in-process), once in float32
and once per quantization, and the logits' top tokens compared (the same embeddings and head,
in float32, as the app's side keeps them). The greedy answers themselves are compared too.

    python tools/quant_quality.py [--model smollm2-135m-instruct] [--quant int8,int4,nf4] [--positions 256]
    python tools/quant_quality.py --kept FILE.gguf [--kept FILE2.gguf ...]

--kept compares a GGUF imported with its quantization kept (swarmctl model import --keep-quant)
with the same file imported as float32: what serving the file's own values costs (Q6_K/Q5 as
int8 rows, scales and inputs in bfloat16), not what the file's quantization cost its model.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

CHATS = ["Tell me about swarms of bees.", "Write a Python function that reverses a linked list.",
         "What is the capital of France, and why is it famous?", "Explain recursion to a child.",
         "List three uses of a hash map."]


@torch.no_grad()
def answers(model_dir: str, positions: int) -> tuple[object, list[tuple[torch.Tensor, int]]]:
    """The float32 HF model and, per chat, prompt + its greedy answer (and the prompt's length),
    `positions` answer positions in all."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seqs, left = [], positions
    per = -(-positions // len(CHATS))
    for text in CHATS:
        if left <= 0:
            break
        chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       return_tensors="pt")
        ids = chat if torch.is_tensor(chat) else chat["input_ids"]
        n = min(per, left)
        seqs.append((ref.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                  pad_token_id=tok.eos_token_id), ids.shape[1]))
        left -= n
    return ref, seqs


@torch.no_grad()
def top_tokens(ref, span, seq: torch.Tensor) -> torch.Tensor:
    """The top token after every position of `seq` [1, T], the blocks run by `span`."""
    h = ref.get_input_embeddings()(seq)
    out = span.run(h, torch.arange(seq.shape[1])[None], None, span.start, span.end)
    return ref.lm_head(ref.model.norm(out.float())).argmax(-1)


def agreement(model_dir: str, quants: list[str], positions: int = 256) -> dict[str, dict]:
    """Per quantization: `top1`, the share of answer positions whose top token is float32's
    Span's, and `positions` compared."""
    from libswarm.checkpoint import Checkpoint
    from swarmd.runtime.span import Span

    ref, seqs = answers(model_dir, positions)
    ck = Checkpoint(model_dir)
    cpu = torch.device("cpu")
    full = Span(ck, 0, ck.num_layers, cpu, torch.float32).load()
    want = [top_tokens(ref, full, s) for s, _ in seqs]
    del full
    result = {}
    for q in quants:
        span = Span(ck, 0, ck.num_layers, cpu, torch.float32, quant=q).load()
        same = total = 0
        for (seq, p), w in zip(seqs, want):
            got = top_tokens(ref, span, seq)
            same += int((got[:, p - 1:-1] == w[:, p - 1:-1]).sum())
            total += w[:, p - 1:-1].numel()
        result[q] = {"top1": same / total, "positions": total}
        del span
    return result


def kept_agreement(path: str, positions: int = 256) -> dict:
    """`path`'s kept import against its float32 import (see the module's doc)."""
    import tempfile

    from libswarm.checkpoint import Checkpoint
    from libswarm.convert import convert_gguf
    from swarmd.runtime.span import Span

    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        floats, kept = os.path.join(tmp, "float"), os.path.join(tmp, "kept")
        os.makedirs(floats)
        os.makedirs(kept)
        convert_gguf(path, floats, "float32")
        kinds = convert_gguf(path, kept, "float32", keep_quant=True)["kept"]
        ref, seqs = answers(floats, positions)
        ck, cpu = Checkpoint(floats), torch.device("cpu")
        full = Span(ck, 0, ck.num_layers, cpu, torch.float32).load()
        want = [top_tokens(ref, full, s) for s, _ in seqs]
        del full
        ckk = Checkpoint(kept)
        span = Span(ckk, 0, ckk.num_layers, cpu, torch.float32, quant=ckk.stored_quant).load()
        same = total = 0
        for (seq, p), w in zip(seqs, want):
            got = top_tokens(ref, span, seq)
            same += int((got[:, p - 1:-1] == w[:, p - 1:-1]).sum())
            total += w[:, p - 1:-1].numel()
        return {"top1": same / total, "positions": total, "kept": kinds, "served": ckk.stored_quant}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quant", default="int8,int4,nf4")
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--int4-group", type=int, default=None, help="int4's group size (swarmd: quant.INT4_GROUP)")
    ap.add_argument("--kept", action="append", default=[], metavar="FILE",
                    help="a GGUF: its kept import against its float32 import (repeatable)")
    a = ap.parse_args(argv)
    if a.kept:
        for path in a.kept:
            r = kept_agreement(path, a.positions)
            print(f"{os.path.basename(path)} kept ({r['served']}; tensors kept as {r['kept']}) top-1 agreement "
                  f"with its float32 import: {r['top1']:.1%} over {r['positions']} positions")
        return 0
    if a.int4_group:
        from swarmd.runtime import quant

        quant.INT4_GROUP = a.int4_group
    from libswarm.models import get_model

    d = get_model(a.model, os.path.join(os.path.dirname(HERE), ".cache", "models"))
    for q, r in agreement(d, a.quant.split(","), a.positions).items():
        print(f"{a.model} {q:5s} top-1 agreement with float32: {r['top1']:.1%} over {r['positions']} positions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
