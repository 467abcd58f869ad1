"""The wire protocol of `els serve`: limits, the chat request schema, API errors, the strict parsing of
request bodies (size cap, JSON without NaN, no lone surrogates, OpenAI's strict types) and the responses."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, model_serializer
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from els.steering.settings import MAX_ENERGY_GATE, MAX_ETA, MAX_STEPS

MIN_TEMPERATURE = 0.01  # a positive temperature below this is raised to it (as vLLM does): 1/T overflows the logits
MIN_TOP_P = 1e-6  # a top_p below this is raised to it: in float32 it rounds to 0 and no token would be kept
MAX_BATCH_WINDOW_MS = 1000.0  # longer holds every request that long and delays SIGTERM as much
INT64 = (-(1 << 63), (1 << 63) - 1)  # the seed's range, as torch.Generator.manual_seed takes it
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20
    max_batch: int = 16
    batch_window_ms: float = 5.0
    max_queue: int = 256

    def __post_init__(self) -> None:
        if (
            min(
                self.max_prompt_tokens,
                self.max_tokens,
                self.default_max_tokens,
                self.max_body_bytes,
                self.max_batch,
                self.max_queue,
            )
            < 1
            or not 0 <= self.batch_window_ms <= MAX_BATCH_WINDOW_MS
        ):
            raise ValueError(
                f"limits must be positive, the batch window within [0, {MAX_BATCH_WINDOW_MS:g}] ms: {self}"
            )


# ---- request schema -------------------------------------------------------------------------------------


class ElsOptions(BaseModel):
    """Per-request steering: the fields of `SteerSettings` by the same names (els.steering.settings); unset
    fields take the server's settings, and null turns a gate off (`"harm_gate": null`, `"refuse_gate": null`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    enabled: bool | None = None  # default: on when the server has an artefact
    eta: float | None = Field(default=None, ge=0, le=MAX_ETA, allow_inf_nan=False)
    steps: int | None = Field(default=None, ge=0, le=MAX_STEPS)
    energy_gate: float | None = Field(default=None, ge=-MAX_ENERGY_GATE, le=MAX_ENERGY_GATE, allow_inf_nan=False)
    harm_gate: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    flagged: Literal["refuse", "leave"] | None = None  # flagged prompts: steered towards refusal, or left alone
    refuse_eta: float | None = Field(default=None, ge=0, le=MAX_ETA, allow_inf_nan=False)
    refuse_gate: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)  # null: every flagged prompt
    positions: Literal["last", "prompt"] | None = None  # "prompt": steer the last prompt token only
    project: bool | None = None  # keep steps orthogonal to the harm probe's direction
    # Older spellings, still read: `threshold` is energy_gate; `gate: false` turns the energy gate off.
    threshold: float | None = Field(default=None, ge=-MAX_ENERGY_GATE, le=MAX_ENERGY_GATE, allow_inf_nan=False)
    gate: bool | None = None

    def changes(self) -> dict[str, Any]:
        """The settings this request changes, as `SteerSettings.override` takes them."""
        out = {k: getattr(self, k) for k in self.model_fields_set if k not in ("enabled", "gate")}
        if self.gate is False:
            out["energy_gate"] = None
        elif self.gate is True and out.get("energy_gate", out.get("threshold")) is None:
            out["energy_gate"] = 0.0  # on, at the calibrated offset
        return out


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # e.g. "name"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    # Unknown parameters are refused rather than ignored: silently dropping e.g. `tools` would be a wrong answer.
    # Strict types, as the OpenAI API: "2" or true is not a max_tokens, "0" not a temperature (an int is a float).
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64[0], le=INT64[1])
    stream: bool | None = None  # null is absent, as OpenAI takes it
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    user: str | None = None
    els: ElsOptions | None = None


# ---- response schema ------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "els"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class _Head(BaseModel):
    """What a whole answer and each of its streamed chunks begin with, in the wire's key order."""

    id: str
    created: int
    model: str


class ChatCompletion(_Head):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice]
    usage: Usage
    els: dict[str, Any]  # the steering applied: settings, the harm gate's side and p(harmful), per-layer energies


class _Sparse(BaseModel):
    """A response part whose fields left None are absent from the JSON, not null: OpenAI's chunks carry only
    what they have (the role in the first delta, `els` in the last chunk, `usage` in the usage chunk)."""

    @model_serializer(mode="wrap")
    def without_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkDelta(_Sparse):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(_Head, _Sparse):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None
    els: dict[str, Any] | None = None


# ---- errors and parsing ---------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _validation_error(e: ValidationError) -> ApiError:
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            if loc.startswith("els."):
                parts.append(f"unknown field {loc!r} (allowed in 'els': {', '.join(ElsOptions.model_fields)})")
            else:
                parts.append(f"unsupported parameter {loc!r}")
        else:
            got = err.get("input")
            shown = f" (got {got!r})" if isinstance(got, (int, float, str, bool)) and len(repr(got)) < 80 else ""
            parts.append(f"{loc}: {err['msg']}{shown}")
    first = e.errors()[0]
    return ApiError(400, "; ".join(parts), param=".".join(str(x) for x in first["loc"]) or None, code=first["type"])


def parse_request(obj: Any, max_parts: int) -> ChatRequest:
    """A decoded JSON body as a `ChatRequest`; anything else is an `ApiError` naming the first bad field. Its
    messages and content parts together are at most `max_parts`, counted before the schema is checked:
    pydantic holds the GIL, and so the event loop, for all of it (0.2 s for 28,000 messages)."""
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    messages = obj.get("messages")
    if isinstance(messages, list):
        parts = len(messages) + sum(
            len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
        )
        if parts > max_parts:
            raise ApiError(
                400,
                f"messages: {parts} messages and content parts, this server takes at most {max_parts} "
                "(--max-prompt-tokens: each is at least a token of the prompt)",
                param="messages",
                code="context_length_exceeded",
            )
    try:
        req = ChatRequest.model_validate(obj)
    except ValidationError as e:
        raise _validation_error(e) from None
    if req.stream_options is not None and not req.stream:  # OpenAI refuses it too
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
    return req


async def read_json_body(request: Request, cap: int) -> Any:
    """The request's body decoded as standard JSON (no NaN, no lone surrogates), at most `cap` bytes read."""
    length = request.headers.get("content-length")
    too_big = ApiError(413, f"request body exceeds {cap} bytes", code="request_too_large")
    if length is not None and length.isdigit() and int(length) > cap:
        raise too_big
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                raise too_big
    except ClientDisconnect:  # closed mid-body, or a malformed chunk: nobody is left to answer
        raise ApiError(
            400, "the client closed the connection before the body ended", code="client_disconnected"
        ) from None
    return await run_in_threadpool(_decode, bytes(body))  # walking a large body must not hold the event loop


def _decode(body: bytes) -> Any:
    try:
        obj = json.loads(body, parse_constant=_no_constant)
    except ValueError as e:  # UnicodeDecodeError included
        raise ApiError(400, f"malformed JSON in the request body: {e}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON in the request body: nested too deeply", code="invalid_json") from None
    # A lone surrogate can only come as a \u escape (UTF-8 has none): only then walk the whole body for it.
    if _SURROGATE_ESCAPE.search(body) and (where := _lone_surrogate(obj)) is not None:
        raise ApiError(
            400,
            f"{where or 'the body'}: a string holds a lone UTF-16 surrogate (e.g. \\ud800 "
            "without its pair), which is not text",
            param=where or None,
            code="invalid_unicode",
        )
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json takes NaN and Infinity; the standard does not


def _lone_surrogate(obj: Any, where: str = "") -> str | None:
    """The path of the first string (or key) in `obj` that is not valid Unicode text, else None."""
    stack = [(obj, where)]
    while stack:
        obj, where = stack.pop()
        if isinstance(obj, str):
            try:
                obj.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(obj, dict):
            for k, v in obj.items():
                path = f"{where}.{k}" if where else str(k)
                if _lone_surrogate(k) is not None:
                    return path.encode("utf-8", "backslashreplace").decode()
                stack.append((v, path))
        elif isinstance(obj, list):
            stack.extend((v, f"{where}.{i}" if where else str(i)) for i, v in enumerate(obj))
    return None
