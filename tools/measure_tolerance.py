#!/usr/bin/env python3
"""The honest error between two servers' outputs for the same input, measured: what the output
checks' tolerances (swarmd/gateway/verify.py) are derived from.

For every numerics a server can announce (serve.dtype x serve.quant x serve.cache.kv_dtype), a
span of n blocks of the real model is run as a server runs it in a session (a prefill of the
prompt, then one position per step, with its own KV cache) and as a checker runs it (one
prefill of every position, the session's history replayed), both from the same input (the
float32 model's hidden states at the span's first block). Every pair of numerics is then
compared the way the gateway compares them, at every position:

    row      rms(a - b) / m, per position (how far the whole vector moved)
    element  max |a - b| / (|b| + m) (how far its worst element moved)

where m is the smaller of rms(a) and rms(b) (verify.errors: either side may be the liar).

Prints, per pair of numerics classes and per span length, the largest of each over every
span start and prompt, and the tolerance that verify.py applies there (so the margin shows).

    python tools/measure_tolerance.py [--model smollm2-135m-instruct] [--lengths 1,4,10,30] [--int4-group 64]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from libswarm.checkpoint import Checkpoint  # noqa: E402
from swarmd.gateway.verify import Numerics, errors, pair_tolerance  # noqa: E402
from swarmd.runtime.span import Span  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPTS = ["Write two sentences about why bees live in swarms.",
           "List the planets of the solar system, one line each, with their order from the sun.",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\""]
NUMERICS = [Numerics(d, q, kv) for d in ("float32", "bfloat16", "float16") for q in ("none", "int8", "int4", "nf4")
            for kv in ("auto", "int8")]


def token_ids(model_dir: str, new_tokens: int, prompts: int = len(PROMPTS)) -> list[tuple[torch.Tensor, int]]:
    """Each prompt with the model's own greedy answer: positions as a session would have them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for p in PROMPTS[:prompts]:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt")
        ids = ids if torch.is_tensor(ids) else ids["input_ids"]
        with torch.no_grad():
            full = ref.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            h = ref.base_model.get_input_embeddings()(full)
        out.append((h, ids.shape[1]))
    return out


def block_inputs(ck: Checkpoint, h: torch.Tensor) -> list[torch.Tensor]:
    """The float32 model's hidden states entering each block (and leaving the last)."""
    span = Span(ck, 0, ck.num_layers, torch.device("cpu"), torch.float32).load()
    pos = torch.arange(h.shape[1]).expand(h.shape[0], -1)
    xs = [h]
    for i in range(ck.num_layers):
        xs.append(span.run(xs[-1], pos, None, i, i + 1))
    return xs


def as_server(span: Span, x: torch.Tensor, prefill: int, first: int, last: int) -> torch.Tensor:
    """Blocks [first, last) on x [1, L, H] as in a session: a prefill, then one position a step."""
    L = x.shape[1]
    pos = torch.arange(L).expand(x.shape[0], -1)
    cache = span.new_cache(first, last, x.shape[0], L)
    parts = [span.run(x[:, :prefill], pos[:, :prefill], None, first, last, cache=cache)]
    parts += [span.run(x[:, t:t + 1], pos[:, t:t + 1], None, first, last, cache=cache) for t in range(prefill, L)]
    return torch.cat(parts, 1).float()


def as_checker(span: Span, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """The same blocks as a checker runs them: every position in one prefill, into a fresh cache."""
    pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    cache = span.new_cache(first, last, x.shape[0], x.shape[1])
    return span.run(x, pos, None, first, last, cache=cache).float()


def measure(model: str, lengths_arg: str, new_tokens: int) -> list[dict]:
    """Every pair of numerics, every span length: the worst row and element error."""
    from libswarm.models import get_model

    torch.manual_seed(0)
    d = get_model(model, os.path.join(os.path.dirname(HERE), ".cache", "models"))
    ck = Checkpoint(d)
    n_layers = ck.num_layers
    lengths = [min(int(n), n_layers) for n in lengths_arg.split(",")]
    inputs = [(block_inputs(ck, h), prefill) for h, prefill in token_ids(d, new_tokens)]
    # spans: each length at the start, the middle and the end of the model
    spans = sorted({(f, f + n) for n in lengths for f in (0, (n_layers - n) // 2, n_layers - n)})
    t0 = time.monotonic()
    outs: dict[Numerics, dict] = {}
    for num in NUMERICS:
        span = Span(ck, 0, n_layers, torch.device("cpu"), DTYPES[num.dtype], quant=num.quant,
                    kv_int8=num.kv_dtype == "int8").load()
        outs[num] = {(f, e, k): (as_server(span, xs[f], prefill, f, e), as_checker(span, xs[f], f, e))
                     for f, e in spans for k, (xs, prefill) in enumerate(inputs)}
        print(f"  {num}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    rows = []
    for a_num, b_num in itertools.combinations_with_replacement(NUMERICS, 2):
        for n in lengths:
            worst = [0.0, 0.0]
            for (f, e, k) in outs[a_num]:
                if e - f != n:
                    continue
                for served, checked in ((outs[a_num][f, e, k][0], outs[b_num][f, e, k][1]),
                                        (outs[b_num][f, e, k][0], outs[a_num][f, e, k][1])):
                    row, element = errors(served, checked)
                    worst = [max(worst[0], float(row.max())), max(worst[1], float(element.max()))]
            rows.append({"a": a_num.__dict__, "b": b_num.__dict__, "blocks": n, "row": worst[0], "element": worst[1]})
    return rows


def sources(rows: list[dict]) -> dict[str, dict[int, tuple[float, float]]]:
    """The table verify.MEASURED holds: per source of error, per length, the worst (row,
    element). A dtype, a quantization and the int8 KV cache against the exact output (float32,
    unquantized), and two servers of one quantization against each other: of one dtype (`=`) and
    of two (`~`: the weights are quantized from the checkpoint rounded to each one's dtype)."""
    exact = Numerics()
    picks: dict[str, list] = {"float32": [(exact, exact)], "bfloat16": [(exact, Numerics("bfloat16"))],
                              "float16": [(exact, Numerics("float16"))], "int8": [(exact, Numerics(quant="int8"))],
                              "int4": [(exact, Numerics(quant="int4"))],
                              "nf4": [(exact, Numerics(quant="nf4"))], "int8 KV": [(exact, Numerics(kv_dtype="int8"))]}
    for d1, d2 in itertools.combinations_with_replacement(DTYPES, 2):
        alike = "=" if d1 == d2 else "~"  # of one dtype / of two
        for q in ("int8", "int4", "nf4"):
            picks.setdefault(f"{q}{alike}{q}", []).append((Numerics(d1, q), Numerics(d2, q)))
        picks.setdefault(f"int8 KV{alike}int8 KV", []).append((Numerics(d1, kv_dtype="int8"),
                                                                Numerics(d2, kv_dtype="int8")))
    table: dict[str, dict[int, tuple[float, float]]] = {}
    for name, pairs in picks.items():
        for r in rows:
            a, b = Numerics(**r["a"]), Numerics(**r["b"])
            if (a, b) in pairs or (b, a) in pairs:
                row, el = table.setdefault(name, {}).get(r["blocks"], (0.0, 0.0))
                table[name][r["blocks"]] = (max(row, r["row"]), max(el, r["element"]))
    return table


def report(rows: list[dict], show_pairs: bool) -> None:
    print("\nThe worst error of each source (verify.MEASURED holds these, rounded up):")
    for name, by_length in sources(rows).items():
        print(f"    {name!r}: (" + ", ".join(f"({r:.2g}, {e:.2g})" for _, (r, e) in sorted(by_length.items())) + "),")
    for r in rows:
        tol = pair_tolerance(Numerics(**r["a"]), Numerics(**r["b"]), r["blocks"])
        r["tol_row"], r["tol_element"] = tol.row, tol.element
        r["margin"] = min(tol.row / max(r["row"], 1e-12), tol.element / max(r["element"], 1e-12))
    least = min(rows, key=lambda r: r["margin"])
    over = [r for r in rows if r["margin"] < 1]
    name = {id(r): (str(Numerics(**r["a"])), str(Numerics(**r["b"]))) for r in rows}
    print(f"\n{len(rows)} pairs x lengths compared; {len(over)} over their tolerance; the least margin is "
          f"{least['margin']:.2f}x ({name[id(least)][0]} against {name[id(least)][1]}, {least['blocks']} blocks)")
    if show_pairs or over:
        print(f"\n{'server':<32} {'checker':<32} {'blocks':>6} {'row':>9} {'tol':>7} {'element':>9} {'tol':>7}")
        for r in rows if show_pairs else over:
            print(f"{name[id(r)][0]:<32} {name[id(r)][1]:<32} {r['blocks']:>6} {r['row']:>9.2e} {r['tol_row']:>7.3g} "
                  f"{r['element']:>9.2e} {r['tol_element']:>7.3g}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", default="1,4,10,30", help="span lengths in blocks")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--pairs", action="store_true", help="print every pair, not only those over their tolerance")
    ap.add_argument("--json", help="write the measured errors to this file")
    ap.add_argument("--from", dest="source", help="report on errors measured before (a --json file), measuring none")
    ap.add_argument("--int4-group", type=int, default=64,
                    help="int4's group size here (swarmd's is 32, that of GGUF's Q4 blocks: on a checkpoint made "
                         "from a Q4 GGUF, as SmolLM2's is, it gives the weights back exactly and measures no error; "
                         "groups of 64 across two Q4 blocks measure what int4 does to weights off its grid)")
    a = ap.parse_args(argv)
    from swarmd.runtime import quant

    quant.INT4_GROUP = a.int4_group
    if a.source:
        with open(a.source) as f:
            rows = json.load(f)
    else:
        rows = measure(a.model, a.lengths, a.new_tokens)
        print(f"# {a.model}, {len(PROMPTS)} prompts of {a.new_tokens} decoded positions, "
              f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{k: r[k] for k in ("a", "b", "blocks", "row", "element")} for r in rows], f, indent=1)
    report(rows, a.pairs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
