#!/usr/bin/env python3
"""swarm-api under load and with structured output, side by side in one run.

    python tools/bench_api.py [--model smollm2-135m-instruct] [--tokens 32] [--concurrency 1 8 32]

Two servers (15 blocks each) and swarm-api in front of them, as an operator runs them:
- tokens/s of chat completions with 1, 8 and 32 requests at once (each sampled, its end-of-text
  token barred so each runs --tokens tokens): the requests' sessions are batched by the servers;
- the cost of a JSON schema held while decoding: a token's time with and without the schema, one
  request at a time, and the grammar engine's own time per token in this process (its mask over
  the whole vocabulary and its advance), measured over the tokens of a real answer."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from localswarm import running_api, running_swarm  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 24}}, "required": ["name", "age", "city"], "additionalProperties": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import openai
    import torch
    from transformers import AutoTokenizer

    from libswarm.grammar import Constraint, json_grammar
    from libswarm.models import get_model

    model = get_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    barred = {str(tokenizer.eos_token_id): -100}
    print(f"{platform.node()}: {os.cpu_count()} CPUs, torch {torch.__version__}; {args.model}, 2 servers + swarm-api")
    # a private swarm with one gateway: its sessions may take the whole cache (serve.limits)
    serve = {"cache": {"max_bytes": "1GiB"}, "limits": {"cache_share_per_key": 1.0}}
    with running_swarm(model, ["0:15", "15:30"], gateway=False, extra={"serve": serve}) as (_, first):
        with running_api(first, {"max_concurrent": max(args.concurrency)}) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
            ask = dict(model=args.model, messages=[{"role": "user", "content": "Tell me a story."}],
                       temperature=1.0, max_tokens=args.tokens, logit_bias=barred)
            client.chat.completions.create(**ask, seed=0)  # warm: the API's model and the servers' first steps

            print(f"\nconcurrent requests, {args.tokens} tokens each (median of {args.rounds} rounds):")
            print("| requests at once | wall s | tokens/s | per request tokens/s |")
            print("|---|---|---|---|")
            for c in args.concurrency:
                walls = []
                for r in range(args.rounds):
                    done: list[int] = []

                    def one(seed: int, done: list[int] = done) -> None:
                        out = client.chat.completions.create(**ask, seed=seed)
                        done.append(out.usage.completion_tokens)

                    threads = [threading.Thread(target=one, args=(1000 * r + i,)) for i in range(c)]
                    t0 = time.perf_counter()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    walls.append(time.perf_counter() - t0)
                    assert sum(done) == c * args.tokens, done
                wall = statistics.median(walls)
                print(f"| {c} | {wall:.2f} | {c * args.tokens / wall:.1f} | {args.tokens / wall:.1f} |")

            fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
            per_token: dict[str, list[float]] = {"free": [], "schema": []}
            for r in range(args.rounds):  # interleaved: the same minutes for both
                for mode in ("free", "schema"):
                    extra = {"response_format": fmt} if mode == "schema" else {"logit_bias": barred}
                    t0 = time.perf_counter()
                    out = client.chat.completions.create(model=args.model, temperature=1.0, seed=r, max_tokens=48,
                                                         messages=[{"role": "user", "content": "Invent a person."}],
                                                         **extra)
                    per_token[mode].append((time.perf_counter() - t0) / out.usage.completion_tokens)
            free, held = statistics.median(per_token["free"]), statistics.median(per_token["schema"])
            print(f"\na token's time through swarm-api, one request: free text {free * 1e3:.1f} ms, "
                  f"held to the schema {held * 1e3:.1f} ms ({held / free:.2f}x)")

    answer = tokenizer('{"name": "Ada Lovelace", "age": 36, "city": "London"}', add_special_tokens=False)["input_ids"]
    vocab = 49152 if "smollm2" in args.model else len(tokenizer)
    logits = torch.zeros(vocab)
    costs = []
    for _ in range(args.rounds * 5):
        c = Constraint(tokenizer, json_grammar(SCHEMA), vocab)
        t0 = time.perf_counter()
        for t in answer:
            c.mask(logits)
            c.advance(t)
        costs.append((time.perf_counter() - t0) / len(answer))
    print(f"the grammar engine in-process: {statistics.median(costs) * 1e6:.0f} us a token "
          f"(mask over {vocab} tokens and advance; median of {len(costs)} answers of {len(answer)} tokens)")


if __name__ == "__main__":
    main()
