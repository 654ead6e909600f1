"""One completion: a decoding loop in its own thread, its own inference session and its own
connection to swarmd, reporting text as it comes and stopping at once when cancelled.

The loop is ours rather than Hugging Face's generate() for three reasons: OpenAI's `seed` must
make sampling reproducible while other requests sample at the same time (HF samples from the
process-wide generator; here each request has its own `torch.Generator`); a client that goes
away must end the session before the next step; and `stop` strings must be cut from the text,
streamed or not. Greedy decoding picks the argmax of the same logits, so with temperature 0 the
tokens are those of HF's greedy generate() on the whole model."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import torch

from libswarm.client import SwarmClient
from libswarm.grammar import Constraint
from libswarm.speculative import GreedySpeculator


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none reported; k: each token's log-probability and the k likeliest
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit) before choosing
    prompt_logprobs: bool = False  # also each prompt token's log-probability after the ones before it
    grammar: str | None = None  # the answer held to it (libswarm/grammar.py): a JSON schema's, a tool call's


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token and its log-probability under the model: the log-softmax of the model's logits at
    that position, before temperature, penalties and logit_bias (what the model itself says, as
    Hugging Face computes it from the same logits); `top`: the k likeliest, most likely first."""
    token: int
    logprob: float | None  # None for a prompt's first token (nothing before it)
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass
class Result:
    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end of text or a stop string), "length", "cancelled"
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # one a token, with Sampling.logprobs
    starts: list[int] = dataclasses.field(default_factory=list)  # where each token's text starts in the text
    prompt_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    sent_logprobs: int = 0  # how many of `logprobs` went out with the text

    def shown_logprobs(self) -> list[TokenLogprob]:
        """The log-probabilities of the tokens whose text is in `text`: not the end-of-text token,
        nor those of a stop string that was cut."""
        return [lp for lp, start in zip(self.logprobs, self.starts) if start < len(self.text)]


@dataclasses.dataclass(frozen=True)
class Piece:
    """Text that has grown, and the log-probabilities of the tokens it shows (with logprobs)."""
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    starts: tuple[int, ...] = ()  # where each of those tokens' text starts in the completion's text


# events sent to the caller, in order: ("text", Piece) ..., then ("done", Result) or ("error", exc)
Event = tuple[str, object]


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under `logits` (one position) and the `top` likeliest."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = lp.topk(top)
        best = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(lp[token]), best)


def prompt_logprobs(logits: torch.Tensor, ids: list[int], top: int) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the ones before it (`logits`: [T, vocab] of the
    prompt's positions); the first token has none."""
    out = [TokenLogprob(ids[0], None)]
    out += [token_logprob(logits[i - 1], ids[i], top) for i in range(1, len(ids))]
    return out


class Completion:
    """Decode `prompt` ([1, T] token ids) through the swarm; events go to `emit` from the
    decoding thread."""

    def __init__(self, model, tokenizer, socket: str, prompt: torch.Tensor, sampling: Sampling,
                 emit: Callable[[Event], None], route_timeout_s: float, eos: set[int], draft=None):
        self.model, self.tokenizer, self.socket, self.draft = model, tokenizer, socket, draft
        self.speculator: GreedySpeculator | None = None  # with a draft: its loop, and what it counted
        self.prompt, self.sampling, self.emit = prompt, sampling, emit
        self.route_timeout_s, self.eos = route_timeout_s, eos
        self.cancelled = threading.Event()
        self.session_id: str | None = None
        self._shown = 0  # the length of the text the tokens so far decode to
        self.constraint: Constraint | None = None  # with Sampling.grammar
        self.prompt_logprobs: list[TokenLogprob] = []  # with Sampling.prompt_logprobs, once the prompt went through
        self.thread = threading.Thread(target=self._run, name="completion", daemon=True)

    def start(self) -> Completion:
        self.thread.start()
        return self

    def cancel(self) -> None:
        """Stop before the next step; the session is closed on the servers as the thread ends."""
        self.cancelled.set()

    def _run(self) -> None:
        try:
            result = self._decode()
        except BaseException as e:  # every failure reaches the request that waits for it
            self.emit(("error", e))
        else:
            self.emit(("done", result))

    def _decode(self) -> Result:
        s = self.sampling
        gen = torch.Generator()
        if s.seed is not None:
            gen.manual_seed(s.seed)
        else:
            gen.seed()
        result = Result()
        stops = StopText(s.stop)
        length = self.prompt.shape[1] + s.max_tokens
        counts = torch.zeros(self.model.config.vocab_size)
        if s.grammar is not None:
            self.constraint = Constraint(self.tokenizer, s.grammar, self.model.config.vocab_size)
        with SwarmClient(socket=self.socket) as client, torch.no_grad(), \
                self.model.inference_session(length, route_timeout_s=self.route_timeout_s, client=client) as sess:
            if self.drafting():
                self._decode_drafted(sess, result, stops, counts)
                return result
            step_input = self.prompt
            while True:
                if self.cancelled.is_set():
                    result.finish_reason = "cancelled"
                    break
                all_logits = self.model(input_ids=step_input).logits[0]
                if step_input is self.prompt:
                    self._prompt_logprobs(result, all_logits)
                logits = all_logits[-1].float()
                self.session_id = sess.id
                token = self._choose(logits, counts, gen)
                if self._take(result, token, counts, stops, logits):
                    break
                step_input = torch.tensor([[token]])
        return result

    def _prompt_logprobs(self, result: Result, logits: torch.Tensor) -> None:
        if self.sampling.prompt_logprobs:
            result.prompt_logprobs = prompt_logprobs(logits, self.prompt[0].tolist(), self.sampling.logprobs or 0)
            self.prompt_logprobs = result.prompt_logprobs

    def drafting(self) -> bool:
        """Whether this completion decodes with the draft model: greedy without penalties, where
        verifying the draft's tokens gives exactly the tokens plain greedy decoding would."""
        s = self.sampling
        return self.draft is not None and s.temperature == 0 and s.grammar is None and \
            not (s.presence_penalty or s.frequency_penalty or s.logit_bias)

    def _take(self, result: Result, token: int, counts: torch.Tensor, stops: StopText, logits: torch.Tensor) -> bool:
        """Add a generated token (chosen from `logits`) to the result and report the text; True
        when the completion ends."""
        if self.sampling.logprobs is not None:
            result.logprobs.append(token_logprob(logits, token, self.sampling.logprobs))
        result.starts.append(self._shown)
        result.tokens.append(token)
        counts[token] += 1
        if token in self.eos:  # what was held back for a stop string goes out
            self._send(result, self.tokenizer.decode(result.tokens[:-1], skip_special_tokens=True))
            result.finish_reason = "stop"
            return True
        if self.constraint is not None:
            self.constraint.advance(token)
        text = self.tokenizer.decode(result.tokens, skip_special_tokens=True)
        self._shown = len(text.rstrip("\ufffd"))  # where the next token's text starts
        cut = stops.cut(text)
        if cut is not None or (self.constraint is not None and self.constraint.done):  # or the grammar's end
            self._send(result, text if cut is None else cut)
            result.finish_reason = "stop"
            return True
        self._send(result, text[:stops.safe_end(text)])
        if len(result.tokens) >= self.sampling.max_tokens:
            self._send(result, text)
            result.finish_reason = "length"
            return True
        return False

    def _decode_drafted(self, sess, result: Result, stops: StopText, counts: torch.Tensor) -> None:
        """Speculative greedy decoding (api.draft_model) by libswarm/speculative.py: the draft
        proposes tokens, one pass through the swarm checks them all, and the draft goes on
        proposing while the pass is out. The tokens are plain greedy decoding's."""
        all_logits = self.model(input_ids=self.prompt).logits[0]
        self._prompt_logprobs(result, all_logits)
        self.session_id = sess.id
        token = int(all_logits[-1].argmax())
        if self._take(result, token, counts, stops, all_logits[-1]):
            return
        tokens = self.prompt[0].tolist() + [token]  # every token so far; the last one not yet through the swarm

        def verify(fed: list[int]) -> torch.Tensor:
            return self.model(input_ids=torch.tensor([fed])).logits[0]

        self.speculator = GreedySpeculator(self.draft, verify, sess.rollback)
        decoded = self.speculator.decode(tokens, self.sampling.max_tokens - len(result.tokens))
        try:
            for t, logits in decoded:
                if self._take(result, t, counts, stops, logits):
                    return
                if self.cancelled.is_set():  # checked between tokens: a pass's later tokens are not sent
                    result.finish_reason = "cancelled"
                    return
        finally:
            decoded.close()

    def _send(self, result: Result, text: str) -> None:
        """Report the text that has grown; held back: a possible start of a stop string, and a
        character still missing bytes (the tokenizer's replacement character)."""
        while text.endswith("\ufffd"):
            text = text[:-1]
        if len(text) > len(result.text) and text.startswith(result.text):
            delta, result.text = text[len(result.text):], text
            shown = len(result.shown_logprobs())
            sent, result.sent_logprobs = result.sent_logprobs, shown
            self.emit(("text", Piece(delta, tuple(result.logprobs[sent:shown]), tuple(result.starts[sent:shown]))))

    def _choose(self, logits: torch.Tensor, counts: torch.Tensor, gen: torch.Generator) -> int:
        s = self.sampling
        if self.constraint is not None:  # what cannot continue the grammar is out, whatever else is said
            logits = self.constraint.mask(logits)
        if s.presence_penalty or s.frequency_penalty:  # OpenAI's definition, on the completion's tokens
            logits = logits - s.frequency_penalty * counts - s.presence_penalty * (counts > 0).float()
        if s.logit_bias:
            ids, bias = zip(*s.logit_bias)
            logits = logits.index_add(0, torch.tensor(ids), torch.tensor(bias, dtype=logits.dtype))
        if s.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < s.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=gen))


class StopText:
    """OpenAI's `stop`: the text ends before the first stop string, which is not returned."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(x for x in stops if x)

    def cut(self, text: str) -> str | None:
        """The text up to the earliest stop string, or None when none occurs."""
        hits = [i for i in (text.find(x) for x in self.stops) if i >= 0]
        return text[:min(hits)] if hits else None

    def safe_end(self, text: str) -> int:
        """How much of `text` can be sent: all but a tail that may be the start of a stop string."""
        held = 0
        for x in self.stops:
            for n in range(min(len(x) - 1, len(text)), held, -1):
                if text.endswith(x[:n]):
                    held = n
                    break
        return len(text) - held
