"""OpenAI-compatible chat server with per-request steering (`els serve`).

    app = create_app(load_model("default"), Artefact.load("run/artefact"))
    uvicorn.run(app, port=8000)

This module is the HTTP side: routes, lifespan, error handlers and signal handling. The request and
response schemas and the input checks are in `els.serve.protocol`; turning a request into a job and the
job's events into the answer (whole or streamed as SSE) in `els.serve.serving`; the batching generation
worker in `els.serve.worker` (its jobs in `els.serve.jobs`, their rows in a batch in `els.serve.rows`);
deadlines and limits on connections in `els.serve.connections`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from els.core.models import LoadedModel
from els.serve.connections import quiet_accept_errors
from els.serve.protocol import ApiError, ChatCompletion, Limits, parse_request, read_json_body
from els.serve.serving import ChatServing
from els.serve.worker import Engine
from els.steering.artefact import Artefact
from els.steering.settings import SteerSettings

log = logging.getLogger("els.serve.app")


def create_app(
    lm: LoadedModel, artefact: Artefact | None = None, limits: Limits = Limits(), settings: SteerSettings | None = None
) -> FastAPI:
    """The FastAPI app serving `lm` (named `lm.name` in /v1/models), steered with `artefact` if given, by
    `settings` (default: the artefact's) unless a request's `els` field overrides them."""
    if artefact is not None:
        artefact.check_model(lm.model)
    engine = Engine(lm, artefact, limits)
    serving_chat = ChatServing(lm, engine, limits, (settings or artefact.settings) if artefact is not None else None)

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
        return serving_chat.models().model_dump()

    # response_model=None: the union below is two kinds of answer, not a schema for FastAPI to validate against
    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> StreamingResponse | dict[str, Any]:
        req = parse_request(await read_json_body(request, limits.max_body_bytes), limits.max_prompt_tokens)
        answer = await serving_chat.chat(req, request.is_disconnected)
        if isinstance(answer, ChatCompletion):
            return answer.model_dump()
        return StreamingResponse(answer, media_type="text/event-stream")

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
