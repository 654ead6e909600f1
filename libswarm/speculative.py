"""Speculative greedy decoding with a draft that keeps drafting while the swarm verifies.

A small draft model of the same tokenizer, run in the app, proposes k tokens; one pass through
the swarm scores them all; the longest prefix the model itself would have chosen is kept, with
the model's own token after it. The tokens are exactly those of plain greedy decoding, and a
pass costs one trip through the chain for up to k + 1 of them.

What this adds to Hugging Face's assisted generation: the draft does not sit idle while a pass
is out. A thread of the draft goes on proposing, as if the pass would take every draft and its
own guess for the model's next token. When the pass does exactly that, the next proposal is
already made and the next pass leaves at once: the draft's time is hidden behind the pass's
round trips. When it does not, the guesses are dropped (the draft's cache is cut back) and the
draft proposes again from what was kept, as it would have without them. Over a WAN, where a pass
is mostly waiting, a draft that usually agrees costs almost nothing.

`GreedySpeculator` knows nothing of the swarm: it takes the pass (`verify`) and the cut of the
session (`rollback`) as functions, so the OpenAI API (libswarm/api/engine.py), the benchmark
(tools/bench_speculative.py) and the tests use one loop."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

# what HF's causal LMs call their cache, in and out: `cache` from transformers 5.24, `past_key_values` before
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
FIRST_DRAFT_TOKENS = 4  # the first proposal; then +2 while all are taken, -1 when not (as HF schedules it)
MAX_DRAFT_TOKENS = 16


@dataclasses.dataclass
class SpeculationStats:
    drafted: int = 0  # tokens proposed to the model
    accepted: int = 0  # of those, taken
    passes: int = 0  # passes through the swarm
    ahead_passes: int = 0  # passes whose whole proposal was drafted while the pass before it was out
    ahead_drafts: int = 0  # drafts proposed that were made while the pass before was out
    draft_s: float = 0.0  # in the draft's forward passes, all of them
    draft_waited_s: float = 0.0  # of which the decoding waited for (not hidden behind a pass)
    verify_s: float = 0.0  # in passes through the swarm
    carried: list[int] = dataclasses.field(default_factory=list)  # drafts each pass carried, in order

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Costs:
    """What this decoding measured: a pass's time against the positions it carries (a straight
    line fitted to the last passes: the round trips, then the compute of each position), the
    draft's time a token, and how often a draft is the model's token."""

    WINDOW = 16

    def __init__(self) -> None:
        self.passes: deque[tuple[int, float]] = deque(maxlen=self.WINDOW)  # (positions, seconds)
        self.trials: deque[bool] = deque(maxlen=4 * self.WINDOW)  # a draft (or a guess) checked: taken?
        self.drafts: deque[float] = deque(maxlen=self.WINDOW)  # seconds of the draft's last one-token steps
        self._line: tuple[float, float] | None = None  # the last fit: (seconds, seconds a position)

    def add_pass(self, positions: int, seconds: float) -> None:
        """A pass timed. The line is fitted once 4 passes of 2 lengths or more were: by medians
        (Theil-Sen), which a pass slowed by something else (a loaded machine) does not tilt."""
        self.passes.append((positions, seconds))
        slopes = sorted((t2 - t1) / (p2 - p1) for i, (p1, t1) in enumerate(self.passes)
                        for p2, t2 in list(self.passes)[i + 1:] if p2 != p1)
        if len(self.passes) < 4 or not slopes:  # passes of one length only (a steady k) keep the last line
            return
        slope = max(0.0, slopes[len(slopes) // 2])
        rest = sorted(t - slope * p for p, t in self.passes)
        self._line = (max(0.0, rest[len(rest) // 2]), slope)

    @property
    def draft_token_s(self) -> float | None:
        """The median of the draft's last steps (its first, warming up, is an outlier)."""
        return sorted(self.drafts)[len(self.drafts) // 2] if self.drafts else None

    def pass_s(self, positions: int) -> float | None:
        if self._line is None:
            return None
        return self._line[0] + self._line[1] * positions

    def acceptance(self) -> float | None:
        """The chance that a draft is taken, given that the ones before it were (every pass
        checks drafts until the first the model would not choose)."""
        if len(self.trials) < 4:
            return None
        return sum(self.trials) / len(self.trials)


class GreedySpeculator:
    """Greedy decoding of a model (`verify`) with `draft` proposing.

    verify(tokens): the model's logits [len(tokens), vocab] after each of `tokens`, fed after
    what it has seen (its cache grows by them). rollback(n): forget every position from n on.
    `draft`: a causal LM of the same token ids (Hugging Face's interface, with a DynamicCache).
    `ahead`: draft on while a pass is out (False: Hugging Face's order, for comparison).
    `pick(tokens, logits)`: the model's token after `tokens` from its logits there (default:
    the argmax; generate() passes one that applies Hugging Face's logits processors first).

    How many drafts a pass carries: until passes of two lengths were timed, Hugging Face's
    schedule (`first_k`, then +2 while all are taken, -1 when not); then the k of 0 to `max_k`
    that gives the most tokens a second by what was measured: a pass of n positions takes
    a + b n, drafting what is not drafted yet takes its time, and k drafts yield
    (1 - p^(k+1)) / (1 - p) tokens when each is taken with chance p. k = 0 is a plain step
    (the draft still guesses ahead, and a guess that comes true is drafted for free; one pass in
    EXPLORE + 1 carries a draft all the same, to keep the measures fresh): where passes cost as
    much per position as drafting saves (a slow CPU on a fast link), decoding is about as fast as
    plain."""

    EXPLORE = 8  # after this many plain steps in a row, one draft

    def __init__(self, draft, verify: Callable[[list[int]], torch.Tensor], rollback: Callable[[int], None],
                 first_k: int = FIRST_DRAFT_TOKENS, max_k: int = MAX_DRAFT_TOKENS, ahead: bool = True,
                 pick: Callable[[list[int], torch.Tensor], int] | None = None):
        if not 1 <= first_k <= max_k:
            raise ValueError(f"draft tokens: first {first_k}, most {max_k}: want 1 <= first <= most")
        self.draft, self.verify, self.rollback, self.pick = draft, verify, rollback, pick
        self.first_k, self.max_k, self.ahead = first_k, max_k, ahead
        self.stats = SpeculationStats()
        self.costs = Costs()
        self._seq: list[int] = []  # the draft's sequence: what was kept, then its proposals and guesses
        self._fed = 0  # how much of _seq the draft's cache holds (all but the last token, or less)
        self._cache: Any = None  # the draft's DynamicCache, made by decode()

    def _draft_one(self) -> None:
        """One more draft token at the end of _seq."""
        feed = self._seq[self._fed:]
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.draft(input_ids=torch.tensor([feed]), use_cache=True, **{CACHE_FIELD: self._cache})
        took = time.perf_counter() - t0
        self.stats.draft_s += took
        if len(feed) <= 2:  # a token's step (a longer feed is the prompt's, or what a pass kept)
            self.costs.drafts.append(took)
        self._fed += len(feed)
        self._seq.append(int(out.logits[0, -1].argmax()))

    def _draft_to(self, length: int) -> None:
        t0 = time.perf_counter()
        while len(self._seq) < length:
            self._draft_one()
        self.stats.draft_waited_s += time.perf_counter() - t0

    def _draft_ahead(self, length: int, stop: threading.Event, failed: list[BaseException]) -> None:
        try:
            while len(self._seq) < length and not stop.is_set():
                self._draft_one()
        except BaseException as e:  # raised again by the decoding thread
            failed.append(e)

    def decode(self, tokens: list[int], limit: int) -> Generator[tuple[int, torch.Tensor], None, None]:
        """The greedy tokens after `tokens` (every token so far; all but the last one already
        through `verify`), each with the model's logits it was chosen from, up to `limit` of
        them. Stop early by closing the iterator (a `break` does)."""
        from transformers import DynamicCache

        tokens = list(tokens)
        self._seq, self._fed, self._cache = list(tokens), 0, DynamicCache()
        verified, k, left, plain = len(tokens) - 1, self.first_k, limit, 0
        while left > 0:
            pending = tokens[verified:]  # the last kept token (more after a rollback)
            ready = len(self._seq) - len(tokens)  # guesses of the last pass that stand
            k = self._choose(k, ready, len(pending), left)
            plain = plain + 1 if k == 0 else 0
            if plain > self.EXPLORE and left > 2:  # now and then a draft, lest the measures go stale
                k, plain = 1, 0
            self.stats.ahead_drafts += min(k, ready)
            self.stats.ahead_passes += 0 < k <= ready
            self._draft_to(len(tokens) + k)
            proposal = self._seq[len(tokens):len(tokens) + k]
            stop, failed = threading.Event(), list[BaseException]()
            helper = None
            if self.ahead and left > k + 1:  # guesses: the model's next token, then the next proposal
                ahead_to = len(tokens) + k + 1 + min(max(k + 2, self.first_k), self.max_k, left - k - 1)
                helper = threading.Thread(target=self._draft_ahead, args=(ahead_to, stop, failed),
                                          name="draft-ahead", daemon=True)
                helper.start()
            t0 = time.perf_counter()
            try:
                logits = self.verify(pending + proposal)
            finally:
                took = time.perf_counter() - t0
                self.stats.verify_s += took
                stop.set()
                if helper is not None:
                    t1 = time.perf_counter()
                    helper.join()  # at most the draft token it is computing
                    self.stats.draft_waited_s += time.perf_counter() - t1
            if failed:
                raise failed[0]
            self.costs.add_pass(len(pending) + k, took)
            scored = logits[len(pending) - 1:]  # the model's choice after the last kept token and each draft
            accepted, kept = self._accept(tokens, proposal, scored)
            self.costs.trials.extend([True] * accepted)
            if accepted < k:
                self.costs.trials.append(False)
            elif len(self._seq) > len(tokens) + k:  # the draft's guess of the model's own next token
                self.costs.trials.append(self._seq[len(tokens) + k] == kept[-1])
            self.rollback(len(tokens) + accepted)  # positions whose keys and values stay
            verified = len(tokens) + accepted
            self.stats.passes += 1
            self.stats.drafted += k
            self.stats.carried.append(k)
            self.stats.accepted += accepted
            tokens.extend(kept)
            self._keep(tokens)
            for j, t in enumerate(kept[:left]):
                yield t, scored[j]
            left -= len(kept)
            if k:
                k = min(k + 2, self.max_k) if accepted == k else k - 1

    def _accept(self, tokens: list[int], proposal: list[int], scored: torch.Tensor) -> tuple[int, list[int]]:
        """How many of `proposal` the model takes after `tokens` (row j of `scored`: its logits
        after the first j drafts), and the tokens kept: those, then the model's own."""
        if self.pick is None:
            chosen = scored.argmax(-1).tolist()
        else:  # processors read the sequence before each position: one row at a time, as far as taken
            chosen = [self.pick(tokens, scored[0])]
        accepted = 0
        while accepted < len(proposal) and proposal[accepted] == chosen[accepted]:
            accepted += 1
            if self.pick is not None:
                chosen.append(self.pick(tokens + proposal[:accepted], scored[accepted]))
        return accepted, proposal[:accepted] + [chosen[accepted]]

    def _choose(self, scheduled: int, ready: int, pending: int, left: int) -> int:
        """How many drafts the next pass carries (the class's docstring says how)."""
        most = min(self.max_k, left - 1)  # a pass yields up to k + 1 tokens
        if most <= 0:
            return 0
        p, d, plain = self.costs.acceptance(), self.costs.draft_token_s, self.costs.pass_s(pending)
        if p is None or d is None or plain is None:
            return max(1, min(scheduled, most))
        p = min(p, 0.98)
        best, best_rate = 0, 1.0 / max(plain, 1e-9)
        for k in range(1, most + 1):
            seconds = self.costs.pass_s(pending + k) + d * max(0, k - ready)  # type: ignore[operator]
            rate = (1 - p ** (k + 1)) / (1 - p) / max(seconds, 1e-9)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def _keep(self, tokens: list[int]) -> None:
        """Cut the draft's sequence and cache back to the longest prefix it shares with `tokens`;
        the guesses beyond stay when every one it made so far was kept."""
        same = 0
        for a, b in zip(self._seq, tokens):
            if a != b:
                break
            same += 1
        if same < len(tokens):
            self._seq = list(tokens)
            self._fed = min(self._fed, same)
        # else: _seq continues tokens with guesses that still stand
        held = self._cache.get_seq_length()
        if held > self._fed:  # a negative crop removes (transformers 5.17 on)
            self._cache.crop(self._fed - held)


def packed_draft(model, kind: str):
    """`model` (a draft, in place) with its linear layers, the LM head included, in torch's
    packed weight-only kernels (libswarm/quantized.py): "int8" (a scale per row) or "int4" (in
    groups of 32; a layer the int4 kernel cannot take goes int8). A draft need not be exact, and
    on a CPU it reads its weights once a token: 0.5B drafts ~1.7x faster in int8 than in float32
    (docs/benchmarks.md)."""
    from torch import nn

    from libswarm.quantized import PackedLinear, int4_group

    if kind not in ("int8", "int4"):
        raise ValueError(f"draft weights {kind!r}: int8 or int4")
    dtype = next(model.parameters()).dtype
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                out, inp = child.weight.shape
                bits = 4 if kind == "int4" and int4_group(out, inp) == 32 else 8
                setattr(parent, name, PackedLinear.from_linear(child, bits, dtype))
    return model


def generate(model, draft, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
             first_k: int = FIRST_DRAFT_TOKENS) -> tuple[torch.Tensor, SpeculationStats]:
    """Greedy decoding of `model` (a DistributedModelForCausalLM) through its own inference
    session, `draft` drafting ahead: (`input_ids` [1, T] with the new tokens, what the loop
    counted). The tokens are those of `model.generate(input_ids, do_sample=False, ...)`, up to
    `max_new_tokens` or an end token (kept, as generate() keeps it)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative generate takes one sequence [1, T], got {list(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ends = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    length = input_ids.shape[1] + max_new_tokens
    with torch.no_grad(), model.inference_session(length + MAX_DRAFT_TOKENS + 1):
        return _greedy(model, draft, input_ids, None, lambda tokens: tokens[-1] in ends, length, first_k)


def assisted_greedy(model, draft, input_ids: torch.Tensor, processors, stopping, max_length: int,
                    streamer=None, first_k: int = FIRST_DRAFT_TOKENS) -> torch.Tensor:
    """`model.generate(input_ids, assistant_model=draft)`, greedy, in `model`'s active session:
    the sequence with its new tokens, exactly those of greedy decoding with Hugging Face's
    logits `processors` and `stopping` criteria (checked after every token, as plain greedy
    does, where HF's assisted loop checks after each pass), fed to `streamer` as they come.
    The session's servers have seen every token of `input_ids` before its active position;
    `first_k`: the drafts of the first pass (HF's num_assistant_tokens), before any is measured."""
    def pick(tokens: list[int], row: torch.Tensor) -> int:
        return int(processors(torch.tensor([tokens], device=input_ids.device), row[None].float()).argmax())

    def stopped(tokens: list[int]) -> bool:
        if streamer is not None:
            streamer.put(torch.tensor([tokens[-1]]))
        return bool(stopping(torch.tensor([tokens], device=input_ids.device), None).all())

    out, _ = _greedy(model, draft, input_ids, pick if processors else None, stopped, max_length, first_k)
    if streamer is not None:
        streamer.end()
    return out


def _greedy(model, draft, input_ids: torch.Tensor, pick: Callable[[list[int], torch.Tensor], int] | None,
            stopped: Callable[[list[int]], bool], max_length: int, first_k: int
            ) -> tuple[torch.Tensor, SpeculationStats]:
    """The drafting loop of generate() and assisted_greedy(), in `model`'s active session: the
    first token from the prompt's pass, then GreedySpeculator's, until `stopped(tokens)` (asked
    after each token) or `max_length` tokens in all; and what the loop counted."""
    sess = model.active_session
    seq = input_ids[0].tolist()
    row = model(input_ids=input_ids[:, sess.position:]).logits[0, -1]
    out = [*seq, pick(seq, row) if pick is not None else int(row.argmax())]
    stats = SpeculationStats()
    if not stopped(out) and max_length > len(out):
        def verify(fed: list[int]) -> torch.Tensor:
            return model(input_ids=torch.tensor([fed], device=input_ids.device)).logits[0]

        spec = GreedySpeculator(draft, verify, sess.rollback, pick=pick, first_k=min(max(1, first_k), MAX_DRAFT_TOKENS))
        stats = spec.stats
        steps = spec.decode(out, max_length - len(out))
        try:
            for t, _ in steps:
                out.append(t)
                if stopped(out):
                    break
        finally:
            steps.close()
    # a pass may have taken drafts past the token where decoding stopped: the servers keep the
    # positions of every token but the last, as after plain greedy decoding
    if sess.position > len(out) - 1:
        sess.rollback(len(out) - 1)
    return torch.tensor([out], dtype=input_ids.dtype, device=input_ids.device), stats
