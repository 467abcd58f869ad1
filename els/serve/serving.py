"""The chat completions of `els serve` between HTTP and the model, as vLLM's `serving_chat`: a request made
into a job for the worker (its checks against the served model and the limits, its steering settings), and
the job's events made into the answer, whole or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from els.core.models import LoadedModel, chat_ids
from els.serve.jobs import Delta, Done, Event, Failed, Job
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
)
from els.serve.worker import Engine
from els.steering.settings import SteerSettings

log = logging.getLogger("els.serve.app")  # the server's logger, as before the split
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


class ChatServing:
    """Chat requests for `lm` as jobs for `engine`, steered by `steer_defaults` (None: the server was started
    without an artefact) unless a request's `els` field overrides them."""

    def __init__(self, lm: LoadedModel, engine: Engine, limits: Limits, steer_defaults: SteerSettings | None):
        self.lm, self.engine, self.limits, self.steer_defaults = lm, engine, limits, steer_defaults
        self.context: int | None = getattr(lm.model.config.get_text_config(), "max_position_embeddings", None)
        self.created = int(time.time())
        self.tokenizing = threading.Lock()  # requests tokenise in worker threads; the tokenizer is not reentrant

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.lm.name, created=self.created)])

    async def chat(
        self, req: ChatRequest, is_disconnected: Callable[[], Awaitable[bool]]
    ) -> ChatCompletion | AsyncIterator[str]:
        """The answer to `req`: whole, or (`stream`) the lines of its server-sent events."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue[Event]()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone: the server is shutting down
                pass

        job = await run_in_threadpool(self.make_job, req, emit)  # a long prompt must not hold the event loop
        self.engine.submit(job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self.stream(job, events, rid, created, include_usage)
        try:
            event = await _last_event(events, is_disconnected)
        finally:
            job.cancelled = True  # no-op once done; frees the row if the client went away
        if isinstance(event, Failed):
            raise event.error
        return ChatCompletion(
            id=rid,
            created=created,
            model=self.lm.name,
            choices=[Choice(message=AssistantMessage(content=event.text), finish_reason=event.finish_reason)],
            usage=_usage(event),
            els=event.els,
        )

    def steer_settings(self, opts: ElsOptions) -> SteerSettings | None:
        changes = opts.changes()
        if self.steer_defaults is None:
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
            return self.steer_defaults.override(**changes)
        except ValueError as e:
            raise ApiError(400, f"els: {e}", param="els") from None

    def make_job(self, req: ChatRequest, emit: Callable[[Event], None]) -> Job:
        lm, limits = self.lm, self.limits
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
            with self.tokenizing:
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
        if self.context is not None and len(ids) + max_tokens > self.context:
            raise ApiError(
                400,
                f"prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceed the model's "
                f"context of {self.context} tokens",
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
            steer=self.steer_settings(req.els or ElsOptions()),
            stream=bool(req.stream),
            emit=emit,
        )

    async def stream(
        self, job: Job, events: asyncio.Queue[Event], rid: str, created: int, include_usage: bool
    ) -> AsyncIterator[str]:
        def chunk(choices: list[ChunkChoice], **extra: Any) -> str:
            body = ChatCompletionChunk(id=rid, created=created, model=self.lm.name, choices=choices, **extra)
            return _sse(body.model_dump())

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
                    yield _sse(event.error.body())
                    return
        finally:
            job.cancelled = True  # the client went away mid-stream: stop generating for it


async def _last_event(events: asyncio.Queue[Event], is_disconnected: Callable[[], Awaitable[bool]]) -> Done | Failed:
    """A non-streamed job's last event; raises if the client goes first, so that its row is freed."""
    while True:
        try:
            event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await is_disconnected():
                raise ApiError(400, "the client closed the connection", code="client_disconnected") from None
            continue
        if not isinstance(event, Delta):
            return event


def _usage(done: Done) -> Usage:
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
    )


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"
