"""The HTTP app: OpenAI's /v1/models, /v1/chat/completions and /v1/completions (streamed as
server-sent events or not), and the swarm page at / with the daemon's status behind it.

Starlette (with uvicorn serving it) rather than FastAPI: the API is a handful of routes whose
requests we check ourselves, so that every refusal is OpenAI's error shape with OpenAI's status
code and names the parameter; FastAPI would add pydantic and its own 422 errors to translate.
Starlette is the well-kept ASGI toolkit FastAPI is built on: routing, streaming responses,
client disconnects, static files."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import threading
import time
import uuid
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from libswarm.api.config import ApiConfig, host_port
from libswarm.api.engine import Completion, Piece, Result, Sampling, TokenLogprob
from libswarm.api.tools import ToolError, Tools, parse_calls, template_messages, visible_end
from libswarm.client import SwarmClient
from libswarm.errors import (
    CacheFullError,
    LimitError,
    ModelError,
    NoRouteError,
    PeerUnavailableError,
    SessionError,
    SwarmError,
    TensorError,
)
from libswarm.grammar import GrammarError, check, json_grammar, tool_call_grammar

log = logging.getLogger("swarm-api")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")
MAX_BODY_BYTES = 4 << 20  # a request's JSON; prompts longer than any context fit well within
POLL_S = 0.2  # how often a request waiting for tokens checks that its client is still there
MAX_CHOICES = 16  # n and best_of: each choice is an inference session of its own
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs (the completions API's logprobs: 5 there, 20 here)
MAX_LOGIT_BIAS = 1024  # entries of logit_bias


class ApiError(Exception):
    """A refusal in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


def swarm_error(e: BaseException) -> ApiError:
    """What the swarm said, as an HTTP answer: the gateway's reason, one line."""
    line = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, NoRouteError):
        return ApiError(503, line, "server_error", code="no_route")
    if isinstance(e, PeerUnavailableError):
        return ApiError(503, line, "server_error", code="swarmd_unavailable")
    if isinstance(e, CacheFullError):
        return ApiError(503, line, "server_error", code="cache_full")
    if isinstance(e, LimitError):
        if "max_length" in line:  # the servers' serve.max_length: this request's length, not load
            return ApiError(400, f"This request's prompt and max_tokens are longer than the swarm's servers take: "
                            f"{line}", param="max_tokens", code="context_length_exceeded")
        return ApiError(429, line, "rate_limit_error", code="limit")
    if isinstance(e, (TensorError, SessionError)):
        return ApiError(400, line)
    if isinstance(e, SwarmError):
        return ApiError(502, line, "server_error", code="swarm_error")
    log.exception("internal error", exc_info=e)
    return ApiError(500, f"internal error: {line}", "server_error")


class Keys:
    """Bearer keys from api.keys_file, one a line (# comments), re-read when the file changes."""

    def __init__(self, path: str | None):
        self.path = path
        self.keys: list[bytes] = []
        self.stamp: tuple | None = None
        self.lock = threading.Lock()
        if path is not None:
            self.current()  # an unreadable file stops swarm-api at start, not at the first request

    def current(self) -> list[bytes]:
        assert self.path is not None
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self.lock:
            if stamp != self.stamp:
                with open(self.path) as f:
                    lines = (line.split("#", 1)[0].strip() for line in f)
                    self.keys = [k.encode() for k in lines if k]
                self.stamp = stamp
            return self.keys

    def check(self, request: Request) -> None:
        if self.path is None:
            return
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer ") or not auth[7:].strip():
            raise ApiError(401, "You didn't provide an API key: send `Authorization: Bearer KEY` (api.keys_file "
                           "holds the keys).", code="invalid_api_key")
        given = auth[7:].strip().encode()
        try:
            keys = self.current()
        except OSError as e:
            raise ApiError(500, f"cannot read the keys file: {e.strerror}", "server_error") from None
        # compare with every key, so the time taken does not tell which one nearly matched
        if not any([hmac.compare_digest(given, k) for k in keys]):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


class Slots:
    """api.max_concurrent completions at once (each choice is an inference session); a request
    that finds too few free waits its turn, first come first served, while at most
    api.max_queued wait; one more is answered 429 with Retry-After. Taken and waited for on the
    event loop, given back from the decoding threads."""

    def __init__(self, total: int, max_waiting: int):
        self.total, self.free, self.max_waiting = total, total, max_waiting
        self.waiting: list[tuple[int, asyncio.Future]] = []  # (slots wanted, woken with them), in order
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ended: list[float] = []  # when recent completions ended and how long they ran (Retry-After)

    async def take(self, k: int, request: Request) -> bool:
        """k slots, once free; False when the client left while waiting."""
        self.loop = asyncio.get_running_loop()
        if not self.waiting and self.free >= k:
            self.free -= k
            return True
        if len(self.waiting) >= self.max_waiting:
            raise ApiError(429, f"{self.total} completions are running and {len(self.waiting)} requests wait "
                           "(api.max_concurrent, api.max_queued); try again shortly", "rate_limit_error",
                           code="too_many_requests", headers={"Retry-After": str(self.retry_after())})
        turn: asyncio.Future = self.loop.create_future()
        entry = (k, turn)
        self.waiting.append(entry)
        try:
            while not turn.done():
                try:
                    await asyncio.wait_for(asyncio.shield(turn), POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self._leave(entry)
                        return False
        except BaseException:  # cancelled while waiting or as its turn came
            if turn.done():
                self.give(k)
            else:
                self._leave(entry)
            raise
        return True

    def _leave(self, entry: tuple[int, asyncio.Future]) -> None:
        self.waiting.remove(entry)
        self._wake()  # those behind it may fit now

    def give(self, k: int) -> None:
        """k slots back (on the event loop)."""
        self.free += k
        self._wake()

    def give_from_thread(self, k: int, ran_s: float) -> None:
        self.ended = [*self.ended[-15:], ran_s]
        loop = self.loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone: swarm-api is stopping
            loop.call_soon_threadsafe(self.give, k)

    def _wake(self) -> None:
        while self.waiting and self.free >= self.waiting[0][0]:
            k, turn = self.waiting.pop(0)
            self.free -= k
            turn.set_result(None)

    def retry_after(self) -> int:
        """Seconds until a try may find room: how long a completion has lately run, over how many
        run at once, times the requests already waiting (1 s at least)."""
        if not self.ended:
            return 1
        typical = sorted(self.ended)[len(self.ended) // 2]
        return max(1, min(60, round(typical * (1 + len(self.waiting)) / max(1, self.total))))


class Service:
    """The model's client side (embeddings, head, tokenizer), loaded once and shared by every
    request; each request decodes in its own thread, session and connection."""

    def __init__(self, config: ApiConfig, model=None, tokenizer=None):
        self.config = config
        self.settings = config.api
        self.keys = Keys(config.api.keys_file)
        self._model, self.tokenizer = model, tokenizer
        self._draft = None
        self._load_lock = threading.Lock()
        self.status_client = SwarmClient(socket=config.socket, timeout_s=10.0)
        self.slots = Slots(config.api.max_concurrent, config.api.max_queued)
        self.jobs: set[Completion] = set()  # running completions, cancelled when swarm-api stops
        self.created = int(os.stat(config.model).st_mtime)
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(config.model)
            except Exception as e:  # transformers raises OSError, ValueError and more for a bad directory
                line = next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)
                raise ModelError(f"{config.model}: cannot load the model's tokenizer: {line}") from None
        threading.Thread(target=self._warm, name="load", daemon=True).start()

    def _warm(self) -> None:
        """Load the model's client side now rather than at the first request, if swarmd answers."""
        try:
            self.model()
            self.draft()
        except Exception as e:  # the first request that needs the model says what is wrong
            log.warning("not connected to swarmd yet: %s", str(e).splitlines()[0] if str(e) else e)

    def model(self):
        """The distributed model; loaded at the first request that needs it (swarmd may start
        after swarm-api, or restart under it)."""
        with self._load_lock:
            if self._model is None:
                from libswarm import AutoDistributedModelForCausalLM

                self._model = AutoDistributedModelForCausalLM.from_pretrained(self.config.model,
                                                                             socket=self.config.socket)
            return self._model

    def draft(self):
        """The draft model (api.draft_model), loaded with the model; None without one. Its
        tokenizer must be the model's: a draft of other token ids would never be accepted."""
        path = self.settings.draft_model
        if path is None:
            return None
        with self._load_lock:
            if self._draft is None:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                from libswarm.checkpoint import Checkpoint

                if Checkpoint(path).stored_quant != "none":  # transformers would fill those weights at random
                    raise ModelError(f"api.draft_model {path}: its blocks are stored quantized (imported with "
                                     "--keep-quant), which the local draft cannot load; import it without")
                try:
                    vocab = AutoTokenizer.from_pretrained(path).get_vocab()
                    draft = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
                except Exception as e:  # transformers raises many kinds for a bad directory
                    line = next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)
                    raise ModelError(f"api.draft_model {path}: cannot load it: {line}") from None
                if vocab != self.tokenizer.get_vocab():
                    raise ModelError(f"api.draft_model {path}: its tokenizer is not the model's "
                                     f"({len(vocab)} and {len(self.tokenizer.get_vocab())} tokens, or other ids)")
                if self.settings.draft_quant != "none":
                    from libswarm.speculative import packed_draft

                    packed_draft(draft, self.settings.draft_quant)
                self._draft = draft
            return self._draft

    def vocab_size(self) -> int:
        return int(self.model().config.vocab_size)

    @property
    def model_id(self) -> str | None:
        return self._model.model_id if self._model is not None else None

    def context(self, model) -> int:
        return int(getattr(model.config, "max_position_embeddings", 0) or 2048)

    def eos(self, model) -> set[int]:
        ids: set[int] = set()
        for source in (model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(x) for x in source)
        return ids


# --- requests ----------------------------------------------------------------------------------------
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


def chat_prompt(tokenizer, messages: Any, tools: Tools | None = None) -> torch.Tensor:
    """The model's chat template applied to OpenAI messages (text content, tool calls and their
    results), with the request's tools; then the answer's opening when a call is required."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", param=f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}].role must be system, developer, user, assistant or tool, got "
                           f"{role!r}", param=f"messages[{i}].role")
        content = m.get("content")
        if content is None and role == "assistant" and m.get("tool_calls"):
            content = ""
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           param=f"messages[{i}].content")
        turn = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls") is not None:
            turn["tool_calls"] = m["tool_calls"]
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            turn["tool_call_id"] = m["tool_call_id"]
        turns.append(turn)
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
    try:
        turns = template_messages(turns)
    except ToolError as e:
        raise ApiError(400, str(e), param=e.param) from None
    functions = tools.functions if tools is not None and tools.active else None
    try:
        ids = tokenizer.apply_chat_template(turns, tools=functions, add_generation_prompt=True, return_tensors="pt")
    except Exception as e:  # a template may raise on what it does not accept (e.g. roles out of turn)
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ApiError(400, f"the model's chat template refused these messages: {line}", param="messages") from None
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    if tools is not None and tools.prefill:
        opening = tokenizer(tools.prefill, add_special_tokens=False)["input_ids"]
        ids = torch.cat([ids, torch.tensor([opening], dtype=ids.dtype)], dim=1)
    return ids


def text_prompt(tokenizer, prompt: Any) -> torch.Tensor:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < len(tokenizer) for t in prompt):
            raise ApiError(400, f"prompt: token ids must be from 0 to {len(tokenizer) - 1}", param="prompt")
        return torch.tensor([prompt])
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string or a list of token ids (one prompt a request)",
                       param="prompt")
    return torch.tensor([tokenizer(prompt)["input_ids"]])


# --- the app ---------------------------------------------------------------------------------------------
def create_app(config: ApiConfig, model=None, tokenizer=None) -> Starlette:
    service = Service(config, model, tokenizer)

    def check_host(request: Request) -> None:
        """Without keys, only an address may name this server in Host: a page whose own name
        was rebound to 127.0.0.1 (DNS rebinding) would otherwise read and use an open API."""
        if config.api.keys_file is not None:
            return
        host = request.headers.get("host", "")
        m = host_port(host)
        name = (m[0] if m else host).strip("[]").lower()
        if not (name == "localhost" or _is_address(name)):
            raise ApiError(421, f"Host {host!r} does not name this server: use its address (an API without "
                           "api.keys_file answers only to addresses)", code="misdirected_request")

    async def guarded(request: Request, handler) -> Response:
        try:
            check_host(request)
            service.keys.check(request)
            return await handler(request)
        except ApiError as e:
            return e.response()

    async def models(request: Request) -> Response:
        async def handler(_):
            return JSONResponse({"object": "list", "data": [model_card()]})

        return await guarded(request, handler)

    async def one_model(request: Request) -> Response:
        async def handler(_):
            name = request.path_params["name"]
            if name not in (config.model_name, service.model_id):
                raise ApiError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
            return JSONResponse(model_card())

        return await guarded(request, handler)

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": service.created, "owned_by": "swarm"}

    async def chat(request: Request) -> Response:
        return await guarded(request, lambda r: complete(r, "chat"))

    async def completions(request: Request) -> Response:
        return await guarded(request, lambda r: complete(r, "completion"))

    async def complete(request: Request, kind: str) -> Response:
        data = await read_json(request)
        model = await _in_thread(service.model)
        draft = await _in_thread(service.draft)
        req = Params(data, service, kind)
        runs = req.best_of  # one inference session a choice (n, or best_of to keep the best n of)
        # slots first, then the prompt tokenized off the event loop: a prompt of megabytes takes
        # seconds to tokenize, and neither holds up other requests nor runs beyond the limit
        if not await service.slots.take(runs, request):
            return Response(status_code=499)  # the client left while its request waited
        try:
            if kind == "chat":
                prompt, param = await _in_thread(chat_prompt, service.tokenizer, data.get("messages"),
                                                 req.tools), "messages"
            else:
                prompt, param = await _in_thread(text_prompt, service.tokenizer, data.get("prompt")), "prompt"
            grammar = await _in_thread(grammar_for, req, service.tokenizer, service.vocab_size())
            sampling = req.sampling(prompt.shape[1], service.context(model), config.api.max_tokens, param, grammar)
        except BaseException:
            service.slots.give(runs)
            raise
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()  # (choice, event)
        jobs: list[Completion] = []

        def emitter(i: int):
            started = time.monotonic()

            def emit(event) -> None:
                if event[0] in ("done", "error"):  # the session is closed by now
                    service.slots.give_from_thread(1, time.monotonic() - started)
                    service.jobs.discard(jobs[i])
                with contextlib.suppress(RuntimeError):  # the loop is gone: swarm-api is stopping
                    loop.call_soon_threadsafe(events.put_nowait, (i, event))
            return emit

        for i in range(runs):  # choice i samples with seed + i: n choices differ, and each is reproducible
            seeded = sampling if sampling.seed is None else \
                dataclasses.replace(sampling, seed=(sampling.seed + i) % (1 << 63))
            jobs.append(Completion(model, service.tokenizer, config.socket, prompt, seeded, emitter(i),
                                   config.api.route_timeout_s, service.eos(model), draft=draft))
        service.jobs.update(jobs)
        for job in jobs:
            job.start()
        reply = Reply(req, service.tokenizer, prompt[0].tolist(), prompt_text(service.tokenizer, data, kind, prompt))

        def cancel() -> None:
            for job in jobs:
                job.cancel()

        try:
            first = await _next(events, request)
        except BaseException:
            cancel()
            raise
        if first is None:  # the client left before the first token
            cancel()
            return Response(status_code=499)
        if first[1][0] == "error":
            cancel()
            raise swarm_error(first[1][1])
        if req.stream:
            return StreamingResponse(stream(request, events, jobs, reply, first, req.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results: dict[int, Result] = {}
        event: tuple | None = first
        try:
            while event is not None:
                i, (what, value) = event
                if what == "error":
                    raise swarm_error(value)
                if what == "done":
                    results[i] = value
                    if len(results) == runs:
                        break
                event = await _next(events, request)
        finally:
            if len(results) < runs:
                cancel()
        if event is None:
            return Response(status_code=499)
        return JSONResponse(reply.whole([results[i] for i in range(runs)]))

    async def stream(request: Request, events: asyncio.Queue, jobs: list[Completion], reply: Reply, first: tuple,
                     include_usage: bool):
        event: tuple | None = first
        results: dict[int, Result] = {}
        finished = False
        try:
            for i in range(len(jobs)):
                if reply.kind == "chat":  # each choice's first chunk names the role
                    yield reply.sse(reply.opening(i))
                elif reply.params.echo:  # and a completion's, with echo, is the prompt (the same for all:
                    # the choice that answered first has its log-probabilities)
                    yield reply.sse(reply.echoed(i, jobs[first[0]].prompt_logprobs))
            while event is not None:
                i, (kind, value) = event
                if kind == "text":
                    yield reply.sse(reply.delta(i, value))
                elif kind == "error":
                    err = swarm_error(value)  # type: ignore[arg-type]
                    yield reply.sse({"error": {"message": err.message, "type": err.type, "param": err.param,
                                               "code": err.code}})
                    finished = True
                    return
                else:
                    results[i] = value
                    for chunk in reply.closing(i, value):
                        yield reply.sse(chunk)
                    if len(results) == len(jobs):
                        if include_usage:
                            yield reply.sse(reply.usage_chunk(list(results.values())))
                        yield "data: [DONE]\n\n"
                        finished = True
                        return
                event = await _next(events, request)
        finally:
            if not finished:  # the client went away, or a choice failed: free the sessions now
                for job in jobs:
                    job.cancel()

    async def page(request: Request) -> Response:
        return FileResponse(PAGE, media_type="text/html", headers={"Cache-Control": "no-cache"})

    async def swarm_status(request: Request) -> Response:
        async def handler(_):
            try:
                status = await _in_thread(service.status_client.status)
            except SwarmError as e:
                raise swarm_error(e) from None
            return JSONResponse({"model": {"name": config.model_name, "id": status["model"]["id"]},
                                 "time": time.time(), "status": status})

        return await guarded(request, handler)

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        text = "Not found" if code == 404 else "Method not allowed"
        return ApiError(code, f"{text}: {request.method} {request.url.path}", code="unknown_url").response()

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    routes = [
        Route("/", page),
        Route("/swarm/status", swarm_status),
        Route("/v1/models", models),
        Route("/v1/models/{name:path}", one_model),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # stopping: whatever still decodes ends before its next step and closes its session on
        # the servers (instead of leaving it to their idle timeout)
        jobs = list(service.jobs)
        for job in jobs:
            job.cancel()
        deadline = time.monotonic() + 10
        for job in jobs:
            await asyncio.get_running_loop().run_in_executor(None, job.thread.join,
                                                             max(0.0, deadline - time.monotonic()))

    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found, ApiError: api_error},
                    lifespan=lifespan)
    app.state.service = service
    return app


async def _in_thread(fn, *args):
    try:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    except SwarmError as e:
        raise swarm_error(e) from None


async def _next(events: asyncio.Queue, request: Request) -> tuple | None:
    """The completion's next event, or None once the client has gone."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None


def prompt_text(tokenizer, data: dict, kind: str, prompt: torch.Tensor) -> str:
    """The prompt as echo returns it: as sent, or decoded from the token ids sent."""
    if kind != "completion" or not data.get("echo"):
        return ""
    given = data.get("prompt")
    if isinstance(given, list) and len(given) == 1:
        given = given[0]
    return given if isinstance(given, str) else tokenizer.decode(prompt[0].tolist())


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


def _is_address(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False
