"""What a completion request says, read and checked: its JSON body, each of OpenAI's parameters
against its type and range (every refusal names the parameter), the sampling it asks for, and
the grammar its answer is held to."""

from __future__ import annotations

import json

from starlette.requests import Request

from libswarm.api.engine import Sampling
from libswarm.api.errors import ApiError
from libswarm.api.service import Service
from libswarm.api.tools import ToolError, Tools
from libswarm.grammar import GrammarError, check, json_grammar, tool_call_grammar

MAX_BODY_BYTES = 4 << 20  # a request's JSON; prompts longer than any context fit well within
MAX_CHOICES = 16  # n and best_of: each choice is an inference session of its own
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs (the completions API's logprobs: 5 there, 20 here)
MAX_LOGIT_BIAS = 1024  # entries of logit_bias


async def read_json(request: Request) -> dict:
    # a page in a browser may POST text/plain or a form to any address without asking first
    # (no CORS preflight): only JSON, which it cannot send cross-site unasked, is read
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, f"The body of your request must be sent as application/json, not {ctype or 'untyped'}.")
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "We could not parse the JSON body of your request: it is not valid JSON.") from None
    except RecursionError:
        raise ApiError(400, "The JSON body of your request nests too deeply.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The body of your request must be a JSON object.")
    return data


def _number(data: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    v = data.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (low < v if low_open else low <= v) or v > high:
        raise ApiError(400, f"{key} must be a number {'>' if low_open else '>='} {low:g} and <= {high:g}, got {v!r}",
                       param=key)
    return float(v)


def _integer(data: dict, key: str, low: int, high: int) -> int | None:
    v = data.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ApiError(400, f"{key} must be an integer from {low} to {high}, got {v!r}", param=key)
    return v


def _flag(data: dict, key: str) -> bool:
    v = data.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, f"{key} must be true or false, got {v!r}", param=key)
    return v


def _stops(data: dict) -> tuple[str, ...]:
    v = data.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > 4 or not all(isinstance(x, str) for x in v):
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
    return tuple(v)


class Params:
    """What every completion request says, checked."""

    def __init__(self, data: dict, service: Service, kind: str):
        self.data = data
        name = data.get("model")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "you must provide a model parameter", param="model")
        known = {service.config.model_name, *([service.model_id] if service.model_id else [])}
        if name not in known:
            raise ApiError(404, f"The model `{name}` does not exist: this swarm serves "
                           f"`{service.config.model_name}`.", param="model", code="model_not_found")
        self.model_name = name
        self.kind = kind
        self.stream = _flag(data, "stream")
        self.n = _integer(data, "n", 1, MAX_CHOICES) or 1
        self.best_of = self.n
        self.echo = False
        if kind == "chat":
            self.logprobs: int | None = None
            if _flag(data, "logprobs"):
                self.logprobs = _integer(data, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
            elif data.get("top_logprobs") is not None:
                raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        else:
            self.logprobs = _integer(data, "logprobs", 0, MAX_TOP_LOGPROBS)
            self.echo = _flag(data, "echo")
            best_of = _integer(data, "best_of", 1, MAX_CHOICES)
            if best_of is not None:
                if best_of < self.n:
                    raise ApiError(400, f"best_of must be at least n ({self.n}), got {best_of}", param="best_of")
                if best_of > self.n and self.stream:
                    raise ApiError(400, "best_of cannot be streamed: the best choices are known only at the end",
                                   param="best_of")
                self.best_of = best_of
        if self.best_of > service.settings.max_concurrent:
            param = "best_of" if self.best_of > self.n else "n"
            raise ApiError(400, f"{param} must be at most api.max_concurrent ({service.settings.max_concurrent}): "
                           "each choice is an inference session", param=param)
        self.logit_bias = _logit_bias(data, service.vocab_size())
        if kind == "completion" and data.get("suffix") not in (None, ""):
            raise ApiError(400, "suffix is not supported by swarm-api", param="suffix")
        try:
            self.tools = Tools(data if kind == "chat" else {}, getattr(service.tokenizer, "chat_template", None))
        except ToolError as e:
            raise ApiError(400, str(e), param=e.param) from None
        self.schema, self.json = _response_format(data)
        opts = data.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        self.include_usage = bool((opts or {}).get("include_usage", False))
        key = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
        self.max_tokens_key = key
        self.max_tokens = _integer(data, key, 1, 1 << 20)
        self.temperature = _number(data, "temperature", 1.0, 0.0, 2.0)
        self.top_p = _number(data, "top_p", 1.0, 0.0, 1.0, low_open=True)
        self.seed = _integer(data, "seed", -(1 << 63), (1 << 63) - 1)
        self.stop = _stops(data)
        self.presence = _number(data, "presence_penalty", 0.0, -2.0, 2.0)
        self.frequency = _number(data, "frequency_penalty", 0.0, -2.0, 2.0)

    def sampling(self, prompt_tokens: int, context: int, default_max: int, param: str,
                 grammar: str | None = None) -> Sampling:
        if prompt_tokens >= context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, your {param} "
                           f"resulted in {prompt_tokens} tokens. Please reduce the length of the {param}.",
                           param=param, code="context_length_exceeded")
        max_tokens = self.max_tokens if self.max_tokens is not None else min(default_max, context - prompt_tokens)
        if prompt_tokens + max_tokens > context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                           f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {param}, {max_tokens} in "
                           f"the completion). Please reduce the length of the {param} or completion.",
                           param=self.max_tokens_key, code="context_length_exceeded")
        seed = None if self.seed is None else self.seed % (1 << 63)
        # best_of ranks its choices by their tokens' log-probabilities, asked for or not
        logprobs = 0 if self.logprobs is None and self.best_of > self.n else self.logprobs
        return Sampling(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=seed,
                        stop=self.stop, presence_penalty=self.presence, frequency_penalty=self.frequency,
                        logprobs=logprobs, logit_bias=self.logit_bias,
                        prompt_logprobs=self.echo and self.logprobs is not None, grammar=grammar)


def _response_format(data: dict) -> tuple[dict | None, bool]:
    """response_format: text, json_object (any JSON object) or json_schema; (its schema, whether
    the answer is JSON)."""
    fmt = data.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None, False
    if kind == "json_object":
        return None, True
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ApiError(400, "response_format.json_schema must be an object with a schema object",
                           param="response_format")
        return spec.get("schema") or {"type": "object"}, True
    raise ApiError(400, "response_format.type must be text, json_object or json_schema", param="response_format")


def grammar_for(req: Params, tokenizer, vocab: int) -> str | None:
    """The grammar a request's answer is held to, checked against the model's tokenizer (off
    the event loop: a large schema takes a while): a required or named tool's call, or the
    response_format's JSON. None: free text."""
    param = "tools" if req.tools.prefill else "response_format"
    try:
        if req.tools.prefill:
            named = [f for f in req.tools.functions if f["function"]["name"] == req.tools.named]
            grammar = tool_call_grammar(named or req.tools.functions, bool(named))
        elif req.json:
            grammar = json_grammar(req.schema)
        else:
            return None
        check(tokenizer, grammar, vocab)
    except GrammarError as e:
        raise ApiError(400, str(e), param=param) from None
    return grammar


def _logit_bias(data: dict, vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: {"token id": bias from -100 to 100}, added to those logits."""
    v = data.get("logit_bias")
    if v is None:
        return ()
    if not isinstance(v, dict) or len(v) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"logit_bias must be an object of up to {MAX_LOGIT_BIAS} token ids and biases",
                       param="logit_bias")
    out = []
    for key, bias in v.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 12 and int(key) < vocab):
            raise ApiError(400, f"logit_bias: {key!r} is not a token id from 0 to {vocab - 1}", param="logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ApiError(400, f"logit_bias[{key}] must be a number from -100 to 100, got {bias!r}",
                           param="logit_bias")
        out.append((int(key), float(bias)))
    return tuple(out)
