#!/usr/bin/env python3
"""How often a draft made of a model's own first blocks proposes the token the whole model
chooses, and what that allows speculative decoding at best. One run, no swarm: it answers
whether a speed-up target can be met with the drafts at hand before anything is timed.

    python tools/draft_agreement.py [--model smollm2-135m-instruct] [--cuts 10 15 20] [--drafts 4]

For each cut L, two drafts read the hidden state after block L:
- "early exit": the model's final norm and LM head applied to it as it is;
- "fitted map": an affine map to the whole model's final hidden state (after its final norm),
  fitted by least squares (ridge) on text the model sampled itself, then the LM head (a "tuned
  lens"). A client can fit one from what it already sees: its draft's states and the swarm's
  final hidden states.
Agreement is measured on the model's greedy answers to other prompts (answer tokens only).
Tokens per pass replays greedy speculative decoding over those answers exactly (a draft here
depends only on the tokens before it, and the accepted ones are the answer's): each pass keeps
the drafted tokens up to the first disagreement, at most k, plus the model's own next token.
Plain decoding's round trips are divided by at most that, before the draft's own time."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

TOPICS = ["bees", "bicycles", "pancakes", "Paris", "dragons", "the sky", "languages", "rivers", "exercise",
          "photosynthesis", "autumn", "computers", "earthquakes", "Shakespeare", "tea", "machine learning",
          "cities", "sleep", "job interviews", "black holes", "holidays", "the internet", "vaccines", "cooking",
          "numbers", "gravity", "oceans", "music", "history", "friendship", "gardening", "money"]
ASKS = ["Write a short paragraph about {}.", "Explain {} to a child.", "Give three facts about {}."]
TEST_PROMPTS = ["Write two sentences about why bees live in swarms.", "Why is the sky blue?",
                "Describe the water cycle.", "How do I make a cup of tea?", "What is the history of the internet?",
                "Give advice for a job interview.", "Explain what a black hole is.", "What are prime numbers?"]


def chats(tokenizer, prompts: list[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=False) for p in prompts]


@torch.no_grad()
def generated(model, tokenizer, prompts: list[str], new: int, sample: bool, batch: int = 24):
    """(sequence, prompt length) pairs of the model's answers, padding removed."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch):
        enc = tokenizer(chats(tokenizer, prompts[i:i + batch]), return_tensors="pt", padding=True)
        seqs = model.generate(**enc, do_sample=sample, temperature=0.7 if sample else None, top_p=None,
                              top_k=None, max_new_tokens=new, pad_token_id=tokenizer.pad_token_id)
        width = enc["input_ids"].shape[1]
        for row, mask in zip(seqs, enc["attention_mask"]):
            pad = int((mask == 0).sum())
            body = row[pad:]
            keep = torch.ones_like(body, dtype=torch.bool)
            keep[width - pad:] = body[width - pad:] != tokenizer.pad_token_id
            out.append((body[keep], width - pad))
    return out


@torch.no_grad()
def hidden(model, seqs, cuts: list[int]):
    """Hidden states after each cut and the final one (after the final norm), the whole
    model's greedy choice at every position, and which positions are answer tokens."""
    states: dict[int, list[torch.Tensor]] = {L: [] for L in cuts}
    last, choice, answer = [], [], []
    for seq, n in seqs:
        o = model(seq[None], output_hidden_states=True)
        for L in cuts:
            states[L].append(o.hidden_states[L][0])
        last.append(o.hidden_states[-1][0])
        choice.append(o.logits[0].argmax(-1))
        a = torch.zeros(seq.numel(), dtype=torch.bool)
        a[max(n - 1, 0):-1] = True  # positions whose next token is an answer token
        answer.append(a)
    return {L: torch.cat(v) for L, v in states.items()}, torch.cat(last), torch.cat(choice), torch.cat(answer)


def fit(x: torch.Tensor, y: torch.Tensor, ridge: float = 1.0) -> torch.Tensor:
    """Least-squares affine map x -> y (weights with the bias as the last row)."""
    X = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    return torch.linalg.solve(X.T @ X + ridge * torch.eye(X.shape[1], dtype=torch.double), X.T @ y.double())


def tokens_per_pass(agrees: torch.Tensor, ends: list[int], k: int | None) -> float:
    """Tokens a pass yields in greedy speculative decoding with `k` drafts a pass (None: no
    limit), given whether the draft agrees at each answer position (answers end at `ends`)."""
    tokens = passes = 0
    start = 0
    for end in ends:
        i = start
        while i < end:
            j = 0
            while (k is None or j < k) and i + j < end and bool(agrees[i + j]):
                j += 1
            i += j + 1
            passes += 1
        tokens += end - start
        start = end
    return tokens / passes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--cuts", type=int, nargs="+", default=[10, 15, 20])
    p.add_argument("--drafts", type=int, default=4, help="tokens drafted per pass (k)")
    p.add_argument("--calibration-tokens", type=int, default=128, help="new tokens sampled per calibration prompt")
    p.add_argument("--test-tokens", type=int, default=96)
    a = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from libswarm.models import get_model

    t0 = time.perf_counter()
    d = get_model(a.model, os.path.join(os.path.dirname(HERE), ".cache", "models"))
    tokenizer = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    n = model.config.num_hidden_layers
    if any(not 0 < L < n for L in a.cuts):
        p.error(f"--cuts must be within 1..{n - 1}")
    torch.manual_seed(0)
    calibration = generated(model, tokenizer, [x.format(t) for t in TOPICS for x in ASKS], a.calibration_tokens,
                            sample=True)
    test = generated(model, tokenizer, TEST_PROMPTS, a.test_tokens, sample=False)
    cal_states, cal_last, _, _ = hidden(model, calibration, a.cuts)
    states, _, choice, answer = hidden(model, test, a.cuts)
    ends = torch.tensor([max(len(seq) - prompt, 0) for seq, prompt in test]).cumsum(0).tolist()
    norm, head = model.model.norm, model.lm_head
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"model: {a.model} ({n} blocks); fitted on {len(cal_last)} positions of {len(calibration)} sampled "
          f"answers; measured on {int(answer.sum())} answer tokens of {len(test)} greedy answers "
          f"({time.perf_counter() - t0:.0f} s)")
    print(f"  {'draft':28s} {'agrees':>7s} {'top-4':>6s} {'tokens/pass, k=' + str(a.drafts):>18s} "
          f"{'unlimited k':>12s}")
    with torch.no_grad():
        for L in a.cuts:
            A = fit(cal_states[L], cal_last)
            x = states[L]
            for name, logits in (("early exit", head(norm(x))),
                                 ("fitted map", head((torch.cat([x, torch.ones(len(x), 1)], 1).double() @ A).float()))):
                lg = logits[answer]
                want = choice[answer]
                hits = lg.argmax(-1) == want
                top4 = float(((lg > lg.gather(1, want[:, None])).sum(1) < 4).float().mean())
                print(f"  {f'first {L} blocks, ' + name:28s} {float(hits.float().mean()):7.3f} {top4:6.3f} "
                      f"{tokens_per_pass(hits, ends, a.drafts):18.2f} {tokens_per_pass(hits, ends, None):12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
