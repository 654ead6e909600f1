"""The HTTP app: OpenAI's /v1/models, /v1/chat/completions and /v1/completions (streamed as
server-sent events or not), and the swarm page at / with the daemon's status behind it. This
module holds the routes and runs a completion's choices (their threads, their events, the
client that leaves); what a request may do, says and gets back is decided in access.py,
slots.py, params.py, prompts.py and reply.py, and errors.py maps the swarm's errors to HTTP.

Starlette (with uvicorn serving it) rather than FastAPI: the API is a handful of routes whose
requests we check ourselves, so that every refusal is OpenAI's error shape with OpenAI's status
code and names the parameter; FastAPI would add pydantic and its own 422 errors to translate.
Starlette is the well-kept ASGI toolkit FastAPI is built on: routing, streaming responses,
client disconnects, static files."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from libswarm.api.access import check_host
from libswarm.api.config import ApiConfig
from libswarm.api.engine import Completion, Result
from libswarm.api.errors import ApiError, swarm_error
from libswarm.api.params import Params, grammar_for, read_json
from libswarm.api.prompts import chat_prompt, prompt_text, text_prompt
from libswarm.api.reply import Reply
from libswarm.api.service import Service
from libswarm.api.slots import POLL_S
from libswarm.errors import SwarmError

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")


def create_app(config: ApiConfig, model=None, tokenizer=None) -> Starlette:
    service = Service(config, model, tokenizer)

    async def guarded(request: Request, handler) -> Response:
        try:
            check_host(request, config.api.keys_file)
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
