"""OpenAI-compatible chat server with per-request steering (`els serve`).

    app = create_app(load_model("default"), Artefact.load("run/artefact"))
    uvicorn.run(app, port=8000)

One worker thread owns the model. It gathers the requests that arrived within a few milliseconds and runs
them as one `generate` call: steering settings (`Steering` takes them per row), sampling (a per-row logits
processor with its own seeded generator) and stopping (a per-row stopping criterion) are all per row, so
any requests can share a batch and none sees another's settings. Only prompts of very different lengths
are kept apart, where padding would cost more than batching saves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import secrets
import signal
import threading
import time
import uuid
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from els.artefact import Artefact
from els.generation import eos_ids
from els.models import LoadedModel, chat_texts
from els.settings import SteerSettings
from els.steering import Steering

log = logging.getLogger("els.serve")

MAX_ETA = 4.0  # eta is a fraction of the layer's hidden norm per step; beyond this the model only babbles
MAX_STEPS = 32
MIN_TEMPERATURE = 0.01  # a positive temperature below this is raised to it (as vLLM does): 1/T overflows the logits
INT64 = (-(1 << 63), (1 << 63) - 1)  # the seed's range, as torch.Generator.manual_seed takes it
# Per-row gate thresholds standing for "no gate" and "closed" when rows of one batch differ.
_OPEN, _CLOSED = -1e30, 1e30


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
        if min(self.max_prompt_tokens, self.max_tokens, self.default_max_tokens, self.max_body_bytes, self.max_batch,
               self.max_queue) < 1 or self.batch_window_ms < 0:
            raise ValueError(f"limits must be positive: {self}")


# ---- request schema -------------------------------------------------------------------------------------


class ElsOptions(BaseModel):
    """Per-request steering; unset fields take the artefact's settings."""

    model_config = ConfigDict(extra="forbid", strict=True)
    enabled: bool | None = None  # default: on when the server has an artefact
    eta: float | None = Field(None, ge=0, le=MAX_ETA, allow_inf_nan=False)
    steps: int | None = Field(None, ge=0, le=MAX_STEPS)
    threshold: float | None = Field(None, ge=-1e6, le=1e6, allow_inf_nan=False)  # gate on, at this threshold
    gate: bool | None = None  # false: no gate even if the artefact has one
    harm_gate: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)  # skip prompts the probe finds harmful
    positions: Literal["last", "prompt"] | None = None  # "prompt": steer the last prompt token only


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
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    els: ElsOptions | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
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


# ---- jobs and the worker --------------------------------------------------------------------------------


@dataclass
class Job:
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    steer: SteerSettings | None
    stream: bool
    emit: Callable[[tuple], None]  # thread-safe: hands an event to the request's coroutine
    cancelled: bool = False
    answered: bool = False  # its "done" or "error" event is out
    delivered: str = ""  # the text streamed so far, which a retry must reproduce

    def answer(self, event: tuple) -> None:
        """The job's last event ("done", result) or ("error", ApiError); any later one is dropped."""
        if not self.answered:
            self.answered = True
            self.emit(event)


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")


@dataclass
class _Row:
    """A job's state inside one generate call."""

    job: Job
    index: int
    generator: torch.Generator | None
    out: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    generated: int = 0
    done: bool = False
    resumed: bool = False  # a retry of a streamed row: its text must begin with what was already sent


class _RowSampler(LogitsProcessor):
    """Samples each sampled row with its own temperature, top-p and generator, then leaves only that token,
    so the batch's greedy argmax picks it. A seed thus gives the same answer whatever shares the batch."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in self.rows:
            job = row.job
            if row.done or job.temperature == 0:
                continue
            probs = torch.softmax(scores[row.index].float() / job.temperature, dim=-1)
            if job.top_p < 1:
                p, idx = probs.sort(descending=True)
                keep = p.cumsum(0) - p < job.top_p
                probs = torch.zeros_like(probs).scatter(0, idx[keep], p[keep])
            token = torch.multinomial(probs, 1, generator=row.generator)
            scores[row.index] = float("-inf")
            scores[row.index, token] = 0.0
        return scores


class _RowTracker(StoppingCriteria):
    """Called once per generated token: streams each row's new text, applies its stop strings and token
    cap, and finishes it with its diagnostics while the batch goes on."""

    def __init__(self, rows: list[_Row], engine: Engine, steering: Steering | None):
        self.rows, self.engine, self.steering = rows, engine, steering

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for row in self.rows:
            if not row.done:
                self._step(row, last[row.index])
        return torch.tensor([row.done for row in self.rows], device=input_ids.device)

    def _step(self, row: _Row, token: int) -> None:
        job = row.job
        if job.cancelled:
            row.done = True
            return
        if self.engine.stopping:  # SIGTERM: end every row at its next token
            row.done = True
            return job.answer(("error", _shutting_down()))
        row.generated += 1
        if token in self.engine.eos:
            return self.finish(row, "stop")
        row.out.append(token)
        text = self.engine.lm.tokenizer.decode(row.out, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in job.stop) if i >= 0]
        if hits:
            row.text = text[: min(hits)]
            return self.finish(row, "stop")
        row.text = text
        if row.generated >= job.max_tokens:
            return self.finish(row, "length")
        # Hold back what could still become a stop string or an incomplete character.
        safe = len(text) - max((len(s) - 1 for s in job.stop), default=0)
        if (broken := text.find("\ufffd", row.sent)) >= 0:
            safe = min(safe, broken)
        self._send(row, safe)

    def _send(self, row: _Row, upto: int) -> None:
        if row.job.stream and upto > row.sent:
            if row.resumed:
                if row.text[: row.sent] != row.job.delivered:
                    raise RuntimeError("its retry did not reproduce the text already streamed")
                row.resumed = False
            row.job.emit(("delta", row.text[row.sent : upto]))
            row.job.delivered += row.text[row.sent : upto]
            row.sent = upto

    def finish(self, row: _Row, reason: str) -> None:
        self._send(row, len(row.text))
        row.done = True
        result = {"text": row.text, "finish_reason": reason, "prompt_tokens": len(row.job.ids),
                  "completion_tokens": row.generated, "els": self.diagnostics(row)}
        row.job.answer(("done", result))

    def diagnostics(self, row: _Row) -> dict:
        s = row.job.steer
        if s is None or self.steering is None:
            return {"enabled": False, "eta": None, "steps": None, "threshold": None, "harm_gate": None,
                    "positions": None, "layers": [], "steps_skipped": 0}
        layers = []
        for layer in self.steering.layers:
            st, i = self.steering.stats[layer], row.index
            layers.append({"layer": layer, "energy_before": float(st.energy_before[i]),
                           "energy_after": float(st.energy_after[i]), "steps_taken": int(st.rows_taken[i]),
                           "steps_skipped": int(st.rows_skipped[i])})
        return {"enabled": True, "eta": s.eta, "steps": s.steps, "threshold": s.threshold, "harm_gate": s.harm_gate,
                "positions": s.positions, "layers": layers,
                "steps_skipped": sum(x["steps_skipped"] for x in layers)}


class Engine:
    """The worker thread that owns the model, and the queue feeding it.

    Nothing a request holds can stop it: a failed batch is retried row by row so that only the faulty
    request gets an error, an error outside a batch fails the requests the worker held and restarts its
    loop, and a worker thread that died all the same is replaced on the next request or /health call."""

    def __init__(self, lm: LoadedModel, artefact: Artefact | None, limits: Limits):
        self.lm, self.limits = lm, limits
        self.artefact = artefact
        if artefact is not None:
            # Keep only the steered layers' energies: Steering copies its members on every attach.
            self.artefact = artefact.subset(artefact.layers)
        self.eos = eos_ids(lm)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.counters = {"requests": 0, "batches": 0, "largest_batch": 0, "failed_batches": 0, "retried_rows": 0}
        self.restarts = 0  # times the worker failed outside a batch and was restarted
        self.last_error: str | None = None
        self.stopping = False  # set on SIGTERM (from a signal handler: a flag only) and by stop()
        self._pending: list[Job] = []  # taken from the queue, not yet in a batch
        self._running: list[Job] = []  # the batch being generated
        self._lock = threading.Lock()
        self._dying = False  # an error is ending the worker thread
        self.thread = self._new_thread()

    def _new_thread(self) -> threading.Thread:
        self._dying = False
        return threading.Thread(target=self._main, name="els-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def state(self) -> str:
        """"ok"; "restarted" once the worker has failed and been restarted (it serves); "stopping"."""
        return "stopping" if self.stopping else "restarted" if self.restarts else "ok"

    def ensure_running(self) -> None:
        """Replaces a worker thread that died (an error escaped `_main`), failing the requests it held."""
        with self._lock:
            if self.stopping or self.thread.ident is None or (self.thread.is_alive() and not self._dying):
                return
            self.thread.join(5)  # a dying one is on its way out
            log.error("the generation worker thread died (%s); starting a new one", self.last_error)
            self._worker_failed(self.last_error or "the worker thread ended")
            self.thread = self._new_thread()
            self.thread.start()

    def abort(self) -> None:
        """Stop generating: running rows end at their next token and held ones get 503. Safe in a signal handler."""
        self.stopping = True

    def stop(self, timeout: float = 3.0) -> None:
        self.stopping = True
        self.jobs.put(None)
        self.thread.join(timeout=timeout)  # a daemon: a forward pass still running does not hold the process
        self._drain()

    def submit(self, job: Job) -> None:
        if self.stopping:
            raise _shutting_down()
        self.ensure_running()
        if self.jobs.qsize() >= self.limits.max_queue:
            raise ApiError(503, "server overloaded: too many queued requests, retry later", type="server_error",
                           code="overloaded")
        self.jobs.put(job)

    def _main(self) -> None:
        while True:
            try:
                self._loop()
                break  # stop() asked
            except Exception as e:  # noqa: BLE001 - a bug outside a batch: fail what is held, then carry on
                log.exception("the generation worker failed; restarting it")
                self.last_error = f"{type(e).__name__}: {e}"
                self._worker_failed(self.last_error)
            except BaseException as e:
                self.last_error, self._dying = f"{type(e).__name__}: {e}", True
                self._fail_held(self.last_error)  # their clients must not wait for the next request to notice
                raise  # the thread ends; ensure_running replaces it
        self._drain()

    def _worker_failed(self, why: str) -> None:
        self.restarts += 1
        self._fail_held(why)

    def _fail_held(self, why: str) -> None:
        error = ApiError(500, f"the generation worker failed ({why}) and was restarted; retry the request",
                         type="server_error", code="worker_restarted")
        held, self._pending, self._running = self._pending + self._running, [], []
        for job in held:
            job.answer(("error", error))

    def _drain(self) -> None:
        """After stop: refuse whatever is still held or queued."""
        held, self._pending, self._running = self._pending + self._running, [], []
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                held.append(job)
        for job in held:
            job.answer(("error", _shutting_down()))

    def _loop(self) -> None:
        while True:
            if not self._pending:
                first = self.jobs.get()
                if first is None:
                    return
                self._pending.append(first)
                time.sleep(self.limits.batch_window_ms / 1000)  # let a burst arrive
            while True:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    return
                self._pending.append(job)
            if self.stopping:
                held, self._pending = self._pending, []
                for job in held:
                    job.answer(("error", _shutting_down()))
                continue
            self._pending = [j for j in self._pending if not j.cancelled]
            if not self._pending:
                continue
            batch = self._pick(self._pending)
            self._running = batch
            self._pending = [j for j in self._pending if all(j is not b for b in batch)]
            self._run(batch)
            self._running = []

    def _pick(self, pending: list[Job]) -> list[Job]:
        """The oldest job and, up to max_batch, later ones whose prompts pad well with it."""
        lo = hi = len(pending[0].ids)
        batch = [pending[0]]
        for job in pending[1:]:
            if len(batch) == self.limits.max_batch:
                break
            n = len(job.ids)
            if max(hi, n) <= 2 * min(lo, n) + 32:
                batch.append(job)
                lo, hi = min(lo, n), max(hi, n)
        return batch

    def _steering(self, batch: list[Job]) -> Steering | None:
        rows = [j.steer for j in batch]
        if self.artefact is None or not any(rows):
            return None
        gated = any(r is not None and r.threshold is not None for r in rows)
        threshold = None
        if gated:
            threshold = [_CLOSED if r is None else _OPEN if r.threshold is None else r.threshold for r in rows]
        return Steering(self.lm.model, self.artefact, eta=[r.eta if r else 0.0 for r in rows],
                        steps=[r.steps if r else 0 for r in rows], threshold=threshold, gate=gated,
                        harm_gate=[r.harm_gate if r else None for r in rows],
                        positions=[r.positions if r else "prompt" for r in rows], check=False)

    def _run(self, batch: list[Job], retry: bool = False) -> None:
        """One generate call for `batch`. If it fails, each unanswered row is run again alone, so only the
        faulty request gets the error (and a fault of the batch as a whole, e.g. its size, answers none)."""
        model, tok = self.lm.model, self.lm.tokenizer
        self.counters["batches"] += 1
        if not retry:
            self.counters["requests"] += len(batch)
            self.counters["largest_batch"] = max(self.counters["largest_batch"], len(batch))
        rows: list[_Row] = []
        try:
            device = model.device
            width = max(len(j.ids) for j in batch)
            pad = tok.pad_token_id
            # Left padding built by hand: the tokenizer is not touched here while request threads encode with it.
            input_ids = torch.tensor([[pad] * (width - len(j.ids)) + j.ids for j in batch], device=device)
            mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in batch], device=device)
            rows = [_Row(j, i, self._generator(j, device), sent=len(j.delivered), resumed=bool(j.delivered))
                    for i, j in enumerate(batch)]
            steering = self._steering(batch)
            tracker = _RowTracker(rows, self, steering)
            with steering if steering is not None else nullcontext(), torch.inference_mode():
                model.generate(input_ids=input_ids, attention_mask=mask,
                               max_new_tokens=max(j.max_tokens for j in batch), do_sample=False,
                               temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                               logits_processor=LogitsProcessorList([_RowSampler(rows)]),
                               stopping_criteria=StoppingCriteriaList([tracker]))
            for row in rows:
                if not row.done:  # generate stopped on its own (e.g. the model's max_length)
                    tracker.finish(row, "length")
        except Exception as e:  # noqa: BLE001 - a failed batch must not stop the server
            for row in rows:
                row.done = True  # a row the tracker still holds must not be answered twice
            left = [j for j in batch if not j.answered and not j.cancelled]
            if len(batch) > 1 and not self.stopping:
                log.warning("a batch of %d failed (%s: %s); retrying its %d unanswered rows one by one",
                            len(batch), type(e).__name__, e, len(left))
                self.counters["failed_batches"] += 1
                for job in left:
                    self.counters["retried_rows"] += 1
                    self._run([job], retry=True)
                return
            log.exception("generation failed")
            error = _shutting_down() if self.stopping else ApiError(
                500, f"generation failed: {type(e).__name__}: {e}", type="server_error", code="generation_failed")
            for job in left:
                job.answer(("error", error))

    @staticmethod
    def _generator(job: Job, device: torch.device) -> torch.Generator | None:
        if job.temperature == 0:
            return None
        return torch.Generator(device=device).manual_seed(job.seed if job.seed is not None else secrets.randbits(63))


# ---- HTTP -----------------------------------------------------------------------------------------------


def create_app(lm: LoadedModel, artefact: Artefact | None = None, limits: Limits = Limits()) -> FastAPI:
    """The FastAPI app serving `lm` (named `lm.name` in /v1/models), steered with `artefact` if given."""
    if artefact is not None:
        artefact.check_model(lm.model)
    engine = Engine(lm, artefact, limits)
    steer_defaults = artefact.settings if artefact is not None else None
    context = getattr(lm.model.config.get_text_config(), "max_position_embeddings", None)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}", type="server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        engine.ensure_running()
        serving = not engine.stopping and engine.thread.is_alive()
        return JSONResponse({"status": "ok" if serving else engine.state, "model": lm.name,
                             "steering": artefact is not None, "worker": engine.state,
                             "worker_restarts": engine.restarts, "worker_last_error": engine.last_error,
                             "queued": engine.jobs.qsize(), **engine.counters}, status_code=200 if serving else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": lm.name, "object": "model", "created": created, "owned_by": "els"}]}

    def steer_settings(opts: ElsOptions) -> SteerSettings | None:
        asked = opts.enabled is True or any(v is not None for v in (opts.eta, opts.steps, opts.threshold, opts.gate,
                                                                     opts.harm_gate, opts.positions))
        if steer_defaults is None:
            if asked and opts.enabled is not False:
                raise ApiError(400, "steering is not available: the server was started without --steer",
                               param="els", code="steering_unavailable")
            return None
        if opts.enabled is False:
            return None
        return steer_defaults.override(eta=opts.eta, steps=opts.steps, threshold=opts.threshold, gate=opts.gate,
                                       harm_gate=opts.harm_gate, positions=opts.positions)

    def make_job(req: ChatRequest, emit: Callable[[tuple], None]) -> Job:
        if req.model != lm.name:
            raise ApiError(404, f"model {req.model!r} is not served here; this server serves {lm.name!r}",
                           param="model", code="model_not_found")
        max_tokens = req.max_completion_tokens or req.max_tokens or min(limits.default_max_tokens, limits.max_tokens)
        if max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens is {max_tokens}, this server allows at most {limits.max_tokens}",
                           param="max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")
        conversation = [{"role": "system" if m.role == "developer" else m.role,
                         "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                        for m in req.messages]
        try:
            text = chat_texts(lm.tokenizer, [conversation])[0]
        except Exception as e:  # noqa: BLE001 - templates raise their own errors, e.g. on role order
            raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None
        try:
            ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        except Exception as e:  # noqa: BLE001 - e.g. text the tokenizer cannot encode
            raise ApiError(400, f"the tokenizer refused these messages: {type(e).__name__}: {e}",
                           param="messages") from None
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(ids)} tokens, this server allows at most "
                           f"{limits.max_prompt_tokens}", param="messages", code="context_length_exceeded")
        if context is not None and len(ids) + max_tokens > context:
            raise ApiError(400, f"prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceed the model's "
                           f"context of {context} tokens", param="max_tokens", code="context_length_exceeded")
        temperature = 1.0 if req.temperature is None else req.temperature
        if 0 < temperature < MIN_TEMPERATURE:
            log.warning("temperature %g raised to %g", temperature, MIN_TEMPERATURE)
            temperature = MIN_TEMPERATURE
        return Job(ids=ids, max_tokens=max_tokens, temperature=temperature,
                   top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=stop,
                   steer=steer_settings(req.els or ElsOptions()), stream=req.stream, emit=emit)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = _parse(await _read_json(request, limits.max_body_bytes))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone: the server is shutting down
                pass

        job = make_job(req, emit)
        engine.submit(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": lm.name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, events, head, include_usage), media_type="text/event-stream")
        try:
            while (event := await events.get())[0] == "delta":
                pass
        finally:
            job.cancelled = True  # no-op once done; frees the row if the client went away
        if event[0] == "error":
            raise event[1]
        r = event[1]
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                             "finish_reason": r["finish_reason"], "logprobs": None}],
                "usage": _usage(r), "els": r["els"]}

    return app


def _parse(obj: Any) -> ChatRequest:
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return ChatRequest.model_validate(obj)
    except ValidationError as e:
        raise _validation_error(e) from None


async def _read_json(request: Request, cap: int) -> Any:
    length = request.headers.get("content-length")
    too_big = ApiError(413, f"request body exceeds {cap} bytes", code="request_too_large")
    if length is not None and length.isdigit() and int(length) > cap:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise too_big
    try:
        obj = json.loads(body, parse_constant=_no_constant)
    except ValueError as e:  # UnicodeDecodeError included
        raise ApiError(400, f"malformed JSON in the request body: {e}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON in the request body: nested too deeply", code="invalid_json") from None
    if (where := _lone_surrogate(obj)) is not None:
        raise ApiError(400, f"{where or 'the body'}: a string holds a lone UTF-16 surrogate (e.g. \\ud800 "
                       "without its pair), which is not text", param=where or None, code="invalid_unicode")
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


def _usage(r: dict) -> dict:
    return {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
            "total_tokens": r["prompt_tokens"] + r["completion_tokens"]}


async def _sse(job: Job, events: asyncio.Queue, head: dict, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, payload = await events.get()
            if kind == "delta":
                yield chunk({"content": payload})
            elif kind == "done":
                yield chunk({}, payload["finish_reason"], els=payload["els"])
                if include_usage:
                    usage = {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(payload)}
                    yield f"data: {json.dumps(usage)}\n\n"
                yield "data: [DONE]\n\n"
                return
            else:
                yield f"data: {json.dumps(payload.body())}\n\n"
                return
    finally:
        job.cancelled = True  # the client went away mid-stream: stop generating for it
