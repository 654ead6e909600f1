"""Structured output: a JSON schema (or a tool's call) enforced while decoding.

Before each token is chosen, the tokens that cannot continue a text the grammar accepts get a
logit of -inf; the chosen token then advances the grammar. The grammar engine is llguidance
(the one llama.cpp, vLLM and SGLang use): it compiles a JSON schema or a Lark grammar against
the model's own tokenizer, and computes a step's mask over the whole vocabulary in tens of
microseconds (docs/benchmarks.md), so constraining costs little beside a swarm step. xgrammar
needs torch's compiler for its CPU masks and outlines-core builds an index of every state up
front (seconds for a large schema); llguidance computes each mask lazily and refuses schemas it
cannot enforce in one line.

`Constraint` is one generation's state; `GrammarLogitsProcessor` is the same for Hugging Face's
generate() (libswarm's distributed model included):

    from libswarm.grammar import GrammarLogitsProcessor, json_grammar
    model.generate(ids, logits_processor=[GrammarLogitsProcessor(tokenizer, json_grammar(schema))])
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import torch

_lock = threading.Lock()


class GrammarError(ValueError):
    """A schema or grammar the grammar engine refuses, in one line."""


def _engine():
    try:
        import llguidance
    except ImportError:
        raise GrammarError("structured output needs the llguidance package (pip install 'swarmd[api]')") from None
    return llguidance


def ll_tokenizer(tokenizer, vocab: int | None = None):
    """llguidance's view of a Hugging Face fast tokenizer, made once per tokenizer (about 0.5 s)
    and kept on it; `vocab`: the model's logits' width when it exceeds the tokenizer's."""
    key = ("_swarm_llguidance", vocab)
    with _lock:
        made = getattr(tokenizer, "_swarm_llguidance", {})
        if key not in made:
            from llguidance.hf import from_tokenizer

            try:
                made[key] = from_tokenizer(tokenizer, n_vocab=vocab)
            except ValueError as e:
                raise GrammarError(f"this model's tokenizer cannot be constrained: {e}") from None
            tokenizer._swarm_llguidance = made
        return made[key]


def json_grammar(schema: dict | None = None) -> str:
    """The grammar of JSON text matching `schema` (None: any JSON object)."""
    engine = _engine()
    try:
        return engine.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"})
    except (ValueError, TypeError) as e:
        raise GrammarError(f"the JSON schema is refused: {_line(e)}") from None


def tool_call_grammar(functions: list[dict], named: bool) -> str:
    """The rest of a tool call after its opening (libswarm/api/tools.py's form): with `named`,
    the one function's arguments matching its parameters' schema (the opening holds its
    name); else any of the functions, named, with its arguments; then the object's end."""
    engine = _engine()
    # the grammar ends with the call's object: the closing tag may be one special token (Qwen2.5's
    # </tool_call>), which the engine does not take for its text; the call is parsed without it
    end = json.dumps("}")
    rules = []
    for i, f in enumerate(functions):
        schema = json.dumps(f["function"].get("parameters") or {"type": "object"})
        rules.append(f"args{i}: %json {schema}")
        head = "" if named else json.dumps(f'{{"name": {json.dumps(f["function"]["name"])}, "arguments": ') + " "
        rules.append(f"call{i}: {head}args{i} {end}")
    rules.insert(0, "start: " + " | ".join(f"call{i}" for i in range(len(functions))))
    try:
        return engine.LLMatcher.grammar_from_lark("\n".join(rules))
    except (ValueError, TypeError) as e:
        raise GrammarError(f"a tool's parameters are refused: {_line(e)}") from None


def check(tokenizer, grammar: str, vocab: int | None = None) -> None:
    """GrammarError unless the engine compiles `grammar` for this tokenizer."""
    engine = _engine()
    error = engine.LLMatcher.validate_grammar(grammar, ll_tokenizer(tokenizer, vocab))
    if error:
        raise GrammarError(f"the grammar engine refuses it: {_line(error)}")


class Constraint:
    """One generation held to `grammar`: `mask` the logits before a token is chosen, `advance`
    with the token chosen; `done` once the grammar is complete."""

    def __init__(self, tokenizer, grammar: str, vocab: int | None = None):
        engine = _engine()
        self.matcher = engine.LLMatcher(ll_tokenizer(tokenizer, vocab), grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar engine refuses it: {_line(self.matcher.get_error())}")

    def allowed(self, vocab: int) -> torch.Tensor:
        """Which of the first `vocab` token ids may come next (bool)."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.from_numpy(bits.view(np.bool_))
        if allowed.numel() < vocab:  # ids beyond the tokenizer's (padding rows of the head)
            allowed = torch.cat([allowed, allowed.new_zeros(vocab - allowed.numel())])
        return allowed[:vocab]

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (the last dimension: the vocabulary) with what may not come next at -inf."""
        return logits.masked_fill(~self.allowed(logits.shape[-1]), float("-inf"))

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} does not continue the grammar: {_line(self.matcher.get_error())}")

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()


class GrammarLogitsProcessor:
    """A Hugging Face LogitsProcessor holding every row of a generate() to `grammar`: pass it
    in `logits_processor=[...]`. Each row's tokens since the prompt advance its own state."""

    def __init__(self, tokenizer, grammar: str, vocab: int | None = None):
        self.tokenizer, self.grammar, self.vocab = tokenizer, grammar, vocab
        self.rows: list[Constraint] = []
        self.start = 0
        self.seen = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            self.rows = [Constraint(self.tokenizer, self.grammar, self.vocab) for _ in range(input_ids.shape[0])]
            self.start = self.seen = input_ids.shape[1]
        for row, constraint in enumerate(self.rows):
            for token in input_ids[row, self.seen:].tolist():
                if not constraint.done:
                    constraint.advance(token)
        self.seen = input_ids.shape[1]
        out = scores.clone()
        for row, constraint in enumerate(self.rows):
            if constraint.done:  # complete: only the end of text may follow
                eos = self.tokenizer.eos_token_id
                out[row] = float("-inf")
                out[row, eos] = 0.0
            else:
                out[row] = constraint.mask(scores[row])
        return out


def _line(e: Any) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
