"""OpenAI's response objects for one request, whole or as server-sent-event chunks: the choices
(best_of's best n of them), tool calls parsed out of a chat answer, usage, and log-probabilities
in the chat and the completions shapes."""

from __future__ import annotations

import json
import time
import uuid

from libswarm.api.engine import Piece, Result, TokenLogprob
from libswarm.api.params import Params
from libswarm.api.tools import parse_calls, visible_end


class Reply:
    """OpenAI's response objects for one request, whole or as stream chunks."""

    def __init__(self, params: Params, tokenizer, prompt_ids: list[int], prompt_text: str = ""):
        self.params, self.kind, self.model, self.tokenizer = params, params.kind, params.model_name, tokenizer
        self.prompt_tokens, self.prompt_text = len(prompt_ids), prompt_text
        self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if self.kind == "chat" else "text_completion"
        self.offset = len(prompt_text)  # where a completion's own text starts in what is returned
        self.tools = params.tools
        self.streamed: dict[int, tuple[str, int]] = {}  # with tools: each choice's text so far, and how much was sent

    def usage(self, results: list[Result]) -> dict:
        n = sum(len(r.tokens) for r in results)  # every choice's tokens, best_of's discarded ones too
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def whole(self, results: list[Result]) -> dict:
        shown = sorted(range(len(results)), key=lambda i: -mean_logprob(results[i]))[:self.params.n] \
            if len(results) > self.params.n else list(range(len(results)))
        choices = []
        for index, i in enumerate(shown):
            r = results[i]
            lps = r.shown_logprobs()
            if self.kind == "chat":
                message: dict = {"role": "assistant", "content": r.text}
                finish = r.finish_reason
                if self.tools.active:
                    message["content"], calls = parse_calls(self.tools.prefill + r.text, self.tools.names)
                    if calls:
                        message["tool_calls"], finish = calls, "tool_calls"
                choice = {"index": index, "message": message, "logprobs": self.chat_logprobs(lps),
                          "finish_reason": finish}
            else:
                choice = {"index": index, "text": self.prompt_text + r.text,
                          "logprobs": self.completion_logprobs(r.prompt_logprobs, lps, r.starts),
                          "finish_reason": r.finish_reason}
            choices.append(choice)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(results)}

    # log-probabilities in OpenAI's two shapes
    def _token(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def chat_logprobs(self, lps: list[TokenLogprob]) -> dict | None:
        if self.params.logprobs is None:
            return None

        def entry(token: int, lp: float) -> dict:
            text = self._token(token)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(x.token, x.logprob or 0.0),
                             "top_logprobs": [entry(t, v) for t, v in x.top]} for x in lps], "refusal": None}

    def completion_logprobs(self, prompt: list[TokenLogprob], lps: list[TokenLogprob] | tuple[TokenLogprob, ...],
                            starts: list[int] | tuple[int, ...]) -> dict | None:
        if self.params.logprobs is None:
            return None
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        at = 0
        for x in prompt:  # echo: the prompt's tokens first, at their place in the prompt's text
            text = self._token(x.token)
            out["text_offset"].append(at)
            at += len(text)
            self._completion_entry(out, x, text)
        for x, start in zip(lps, starts):
            out["text_offset"].append(self.offset + start)
            self._completion_entry(out, x, self._token(x.token))
        return out

    def _completion_entry(self, out: dict, x: TokenLogprob, text: str) -> None:
        out["tokens"].append(text)
        out["token_logprobs"].append(x.logprob)
        out["top_logprobs"].append(None if x.logprob is None else {self._token(t): v for t, v in x.top})

    # streamed
    def chunk(self, choices: list) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _choice(self, index: int, text: str | None, finish: str | None, role: bool = False,
                logprobs: dict | None = None) -> dict:
        if self.kind == "chat":
            delta: dict = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    def opening(self, index: int) -> dict:
        return self.chunk([self._choice(index, None, None, role=True)])

    def echoed(self, index: int, prompt_logprobs: list[TokenLogprob]) -> dict:
        """A completion's first chunk with echo: the prompt, and its tokens' log-probabilities."""
        return self.chunk([self._choice(index, self.prompt_text, None, logprobs=self.completion_logprobs(
            prompt_logprobs, [], []))])

    def delta(self, index: int, piece: Piece) -> dict:
        if self.kind == "chat":
            text = piece.text
            if self.tools.active:  # text up to the first call goes out; the calls at the end
                full, sent = self.streamed.get(index, (self.tools.prefill, 0))
                full += piece.text
                end = max(sent, visible_end(full))
                text, self.streamed[index] = full[sent:end], (full, end)
            return self.chunk([self._choice(index, text, None, logprobs=self.chat_logprobs(list(piece.logprobs)))])
        return self.chunk([self._choice(index, piece.text, None, logprobs=self.completion_logprobs(
            [], piece.logprobs, piece.starts))])

    def closing(self, index: int, result: Result) -> list[dict]:
        """A choice's last chunks: with tools, its calls (or the text held back for one), then
        its finish_reason."""
        finish = result.finish_reason
        out = []
        if self.kind == "chat" and self.tools.active:
            full = self.tools.prefill + result.text
            _, calls = parse_calls(full, self.tools.names)
            if calls:
                finish = "tool_calls"
                out.append(self.chunk([{"index": index, "delta": {"tool_calls": [{"index": k, **c} for k, c in
                                                                                 enumerate(calls)]},
                                        "logprobs": None, "finish_reason": None}]))
            else:
                sent = self.streamed.get(index, ("", 0))[1]
                if full[sent:]:
                    out.append(self.chunk([self._choice(index, full[sent:], None)]))
        return [*out, self.chunk([self._choice(index, None, finish)])]

    def usage_chunk(self, results: list[Result]) -> dict:
        return {**self.chunk([]), "usage": self.usage(results)}

    @staticmethod
    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def mean_logprob(result: Result) -> float:
    """best_of's measure: the mean log-probability of a choice's tokens."""
    values = [x.logprob for x in result.logprobs if x.logprob is not None]
    return sum(values) / len(values) if values else float("-inf")
