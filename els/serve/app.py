"""OpenAI-compatible chat server with per-request steering (`els serve`).

    app = create_app(load_model("default"), Artefact.load("run/artefact"))
    uvicorn.run(app, port=8000)

This module is the HTTP side: routes, streaming (SSE), lifespan and signal handling. The request schema
and input checks are in `els.serve.protocol`, the batching generation worker in `els.serve.worker`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from els.core.models import LoadedModel, chat_ids
from els.serve.connections import quiet_accept_errors
from els.serve.protocol import (
    MIN_TEMPERATURE,
    MIN_TOP_P,
    ApiError,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Choice,
    ChunkChoice,
    ChunkDelta,
    ElsOptions,
    Limits,
    ModelCard,
    ModelList,
    Usage,
    parse_request,
    read_json_body,
)
from els.serve.worker import Delta, Done, Engine, Event, Failed, Job
from els.steering.artefact import Artefact
from els.steering.settings import SteerSettings

log = logging.getLogger("els.serve.app")
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


# ---- HTTP -----------------------------------------------------------------------------------------------


def create_app(
    lm: LoadedModel, artefact: Artefact | None = None, limits: Limits = Limits(), settings: SteerSettings | None = None
) -> FastAPI:
    """The FastAPI app serving `lm` (named `lm.name` in /v1/models), steered with `artefact` if given, by
    `settings` (default: the artefact's) unless a request's `els` field overrides them."""
    if artefact is not None:
        artefact.check_model(lm.model)
    engine = Engine(lm, artefact, limits)
    steer_defaults = (settings or artefact.settings) if artefact is not None else None
    context = getattr(lm.model.config.get_text_config(), "max_position_embeddings", None)
    created = int(time.time())
    tokenizing = threading.Lock()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        quiet_accept_errors(asyncio.get_running_loop())
        engine.start()
        restore = _on_termination(engine.abort)
        try:
            yield
        finally:
            restore()
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="els", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(
            ApiError(500, f"internal error: {type(e).__name__}", type="server_error").body(), status_code=500
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        engine.ensure_running()
        serving = not engine.stopping and engine.thread.is_alive()
        return JSONResponse(
            {
                "status": "ok" if serving else engine.state,
                "model": lm.name,
                "steering": artefact is not None,
                "worker": engine.state,
                "worker_restarts": engine.restarts,
                "worker_last_error": engine.last_error,
                "queued": engine.waiting(),
                **engine.counters,
            },
            status_code=200 if serving else 503,
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return ModelList(data=[ModelCard(id=lm.name, created=created)]).model_dump()

    def steer_settings(opts: ElsOptions) -> SteerSettings | None:
        changes = opts.changes()
        if steer_defaults is None:
            if (opts.enabled is True or changes) and opts.enabled is not False:
                raise ApiError(
                    400,
                    "steering is not available: the server was started without --steer",
                    param="els",
                    code="steering_unavailable",
                )
            return None
        if opts.enabled is False:
            return None
        try:
            return steer_defaults.override(**changes)
        except ValueError as e:
            raise ApiError(400, f"els: {e}", param="els") from None

    def make_job(req: ChatRequest, emit: Callable[[Event], None]) -> Job:
        if req.model != lm.name:
            raise ApiError(
                404,
                f"model {req.model!r} is not served here; this server serves {lm.name!r}",
                param="model",
                code="model_not_found",
            )
        max_tokens = req.max_completion_tokens or req.max_tokens or min(limits.default_max_tokens, limits.max_tokens)
        if max_tokens > limits.max_tokens:
            raise ApiError(
                400, f"max_tokens is {max_tokens}, this server allows at most {limits.max_tokens}", param="max_tokens"
            )
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")
        conversation = [
            {
                "role": "system" if m.role == "developer" else m.role,
                "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content),
            }
            for m in req.messages
        ]
        try:
            with tokenizing:  # requests tokenise in worker threads; one at a time, the tokenizer is not reentrant
                ids = chat_ids(lm.tokenizer, conversation)
        except Exception as e:  # noqa: BLE001 - templates raise their own errors (e.g. on role order), tokenizers too
            raise ApiError(
                400, f"the chat template or tokenizer refused these messages: {type(e).__name__}: {e}", param="messages"
            ) from None
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt is {len(ids)} tokens, this server allows at most {limits.max_prompt_tokens}",
                param="messages",
                code="context_length_exceeded",
            )
        if context is not None and len(ids) + max_tokens > context:
            raise ApiError(
                400,
                f"prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceed the model's "
                f"context of {context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        temperature = 1.0 if req.temperature is None else req.temperature
        if 0 < temperature < MIN_TEMPERATURE:
            log.warning("temperature %g raised to %g", temperature, MIN_TEMPERATURE)
            temperature = MIN_TEMPERATURE
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p < MIN_TOP_P:
            log.warning("top_p %g raised to %g", top_p, MIN_TOP_P)
            top_p = MIN_TOP_P
        return Job(
            ids=ids,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=req.seed,
            stop=stop,
            steer=steer_settings(req.els or ElsOptions()),
            stream=bool(req.stream),
            emit=emit,
        )

    # response_model=None: the union below is two kinds of answer, not a schema for FastAPI to validate against
    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> StreamingResponse | dict[str, Any]:
        req = parse_request(await read_json_body(request, limits.max_body_bytes))
        loop, events = asyncio.get_running_loop(), asyncio.Queue[Event]()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone: the server is shutting down
                pass

        job = await run_in_threadpool(make_job, req, emit)  # a long prompt must not hold the event loop
        engine.submit(job)
        head: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": lm.name,
        }
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, events, head, include_usage), media_type="text/event-stream")
        try:
            event = await _answer(request, events)
        finally:
            job.cancelled = True  # no-op once done; frees the row if the client went away
        if isinstance(event, Failed):
            raise event.error
        return ChatCompletion(
            **head,
            choices=[Choice(message=AssistantMessage(content=event.text), finish_reason=event.finish_reason)],
            usage=_usage(event),
            els=event.els,
        ).model_dump()

    return app


def _on_termination(callback: Callable[[], None]) -> Callable[[], None]:
    """Calls `callback` on SIGTERM and SIGINT before the handler in place (uvicorn's, which starts its
    graceful shutdown), and returns what undoes that. uvicorn waits for open requests to end before it
    shuts the app down, so without this a long generation would hold a SIGTERM for minutes."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals are the main thread's; a server run elsewhere is stopped by its owner
    installed = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue  # default or ignored: no graceful shutdown to hurry

        def handler(signum: int, frame: Any, previous: Callable = previous) -> None:
            callback()
            previous(signum, frame)

        signal.signal(sig, handler)
        installed[sig] = (handler, previous)

    def restore() -> None:
        for sig, (handler, previous) in installed.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, previous)

    return restore


async def _answer(request: Request, events: asyncio.Queue[Event]) -> Done | Failed:
    """A non-streamed job's last event; raises if the client goes first, so that its row is freed."""
    while True:
        try:
            event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ApiError(400, "the client closed the connection", code="client_disconnected") from None
            continue
        if not isinstance(event, Delta):
            return event


def _usage(r: Done) -> Usage:
    return Usage(
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        total_tokens=r.prompt_tokens + r.completion_tokens,
    )


async def _sse(job: Job, events: asyncio.Queue[Event], head: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[ChunkChoice], **extra: Any) -> str:
        return f"data: {json.dumps(ChatCompletionChunk(**head, choices=choices, **extra).model_dump())}\n\n"

    try:
        yield chunk([ChunkChoice(delta=ChunkDelta(role="assistant", content=""))])
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield chunk([ChunkChoice(delta=ChunkDelta(content=event.text))])
            elif isinstance(event, Done):
                yield chunk([ChunkChoice(delta=ChunkDelta(), finish_reason=event.finish_reason)], els=event.els)
                if include_usage:
                    yield chunk([], usage=_usage(event))
                yield "data: [DONE]\n\n"
                return
            else:
                yield f"data: {json.dumps(event.error.body())}\n\n"
                return
    finally:
        job.cancelled = True  # the client went away mid-stream: stop generating for it
