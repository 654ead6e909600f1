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
from libswarm.api.engine import Completion, Sampling
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

log = logging.getLogger("swarm-api")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")
MAX_BODY_BYTES = 4 << 20  # a request's JSON; prompts longer than any context fit well within
POLL_S = 0.2  # how often a request waiting for tokens checks that its client is still there


class ApiError(Exception):
    """A refusal in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


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
        self.slots = threading.BoundedSemaphore(config.api.max_concurrent)
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
                self._draft = draft
            return self._draft

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
        n = _integer(data, "n", 1, 128)
        if n not in (None, 1):
            raise ApiError(400, "n must be 1: each request is one completion", param="n")
        for key in ("logprobs", "echo"):
            if data.get(key) not in (None, False, 0):
                raise ApiError(400, f"{key} is not supported by swarm-api", param=key)
        if kind == "completion" and data.get("best_of") not in (None, 1):
            raise ApiError(400, "best_of must be 1", param="best_of")
        if kind == "completion" and data.get("suffix") not in (None, ""):
            raise ApiError(400, "suffix is not supported by swarm-api", param="suffix")
        if kind == "chat" and data.get("tools"):
            raise ApiError(400, "tools are not supported by swarm-api", param="tools")
        fmt = data.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise ApiError(400, "response_format must be {\"type\": \"text\"}", param="response_format")
        self.stream = _flag(data, "stream")
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

    def sampling(self, prompt_tokens: int, context: int, default_max: int, param: str) -> Sampling:
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
        return Sampling(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=seed,
                        stop=self.stop, presence_penalty=self.presence, frequency_penalty=self.frequency)


def chat_prompt(tokenizer, messages: Any) -> torch.Tensor:
    """The model's chat template applied to OpenAI messages (text content only)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", param=f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, developer, user or assistant, got {role!r}",
                           param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           param=f"messages[{i}].content")
        turns.append({"role": role, "content": content})
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
    try:
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_tensors="pt")
    except Exception as e:  # a template may raise on what it does not accept (e.g. roles out of turn)
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ApiError(400, f"the model's chat template refused these messages: {line}", param="messages") from None
    return ids if torch.is_tensor(ids) else ids["input_ids"]


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
        # a slot first, then the prompt tokenized off the event loop: a prompt of megabytes takes
        # seconds to tokenize, and neither holds up other requests nor runs beyond the limit
        if not service.slots.acquire(blocking=False):
            raise ApiError(429, f"{config.api.max_concurrent} completions are running (api.max_concurrent); "
                           "try again shortly", "rate_limit_error", code="too_many_requests")
        try:
            if kind == "chat":
                prompt, param = await _in_thread(chat_prompt, service.tokenizer, data.get("messages")), "messages"
            else:
                prompt, param = await _in_thread(text_prompt, service.tokenizer, data.get("prompt")), "prompt"
            sampling = req.sampling(prompt.shape[1], service.context(model), config.api.max_tokens, param)
        except BaseException:
            service.slots.release()
            raise
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event) -> None:
            if event[0] in ("done", "error"):  # the session is closed by now
                service.slots.release()
                service.jobs.discard(job)
            with contextlib.suppress(RuntimeError):  # the loop is gone: swarm-api is stopping
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Completion(model, service.tokenizer, config.socket, prompt, sampling, emit,
                         config.api.route_timeout_s, service.eos(model), draft=draft)
        service.jobs.add(job)
        job.start()
        reply = Reply(kind, req.model_name, prompt.shape[1])
        try:
            first = await _next(events, request)
        except BaseException:
            job.cancel()
            raise
        if first is None:  # the client left before the first token
            job.cancel()
            return Response(status_code=499)
        if first[0] == "error":
            raise swarm_error(first[1])  # type: ignore[arg-type]
        if req.stream:
            return StreamingResponse(stream(request, events, job, reply, first, req.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        event: tuple | None = first
        try:
            while event is not None and event[0] == "text":
                event = await _next(events, request)
        finally:
            if event is None or event[0] == "text":
                job.cancel()
        if event is None:
            return Response(status_code=499)
        if event[0] == "error":
            raise swarm_error(event[1])
        return JSONResponse(reply.whole(event[1]))

    async def stream(request: Request, events: asyncio.Queue, job: Completion, reply: Reply, first: tuple,
                     include_usage: bool):
        event: tuple | None = first
        finished = False
        try:
            if reply.kind == "chat":  # the first chunk names the role
                yield reply.sse(reply.opening())
            while event is not None:
                kind, value = event
                if kind == "text":
                    yield reply.sse(reply.delta(value))
                elif kind == "error":
                    err = swarm_error(value)  # type: ignore[arg-type]
                    yield reply.sse({"error": {"message": err.message, "type": err.type, "param": err.param,
                                               "code": err.code}})
                    finished = True
                    return
                else:
                    yield reply.sse(reply.closing(value))
                    if include_usage:
                        yield reply.sse(reply.usage_chunk(value))
                    yield "data: [DONE]\n\n"
                    finished = True
                    return
                event = await _next(events, request)
        finally:
            if not finished:  # the client went away: free the session now
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


class Reply:
    """OpenAI's response objects for one completion, whole or as stream chunks."""

    def __init__(self, kind: str, model: str, prompt_tokens: int):
        self.kind, self.model, self.prompt_tokens = kind, model, prompt_tokens
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"

    def usage(self, result) -> dict:
        n = len(result.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def whole(self, result) -> dict:
        finish = result.finish_reason
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage(result)}

    def chunk(self, choices: list) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _choice(self, text: str | None, finish: str | None, role: bool = False) -> dict:
        if self.kind == "chat":
            delta: dict = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def opening(self) -> dict:
        return self.chunk([self._choice(None, None, role=True)])

    def delta(self, text: str) -> dict:
        return self.chunk([self._choice(text, None)])

    def closing(self, result) -> dict:
        return self.chunk([self._choice(None, result.finish_reason)])

    def usage_chunk(self, result) -> dict:
        return {**self.chunk([]), "usage": self.usage(result)}

    @staticmethod
    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _is_address(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False
