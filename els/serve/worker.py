"""The generation worker of `els serve`.

One worker thread owns the model. It gathers the requests that arrived within a few milliseconds and runs
them as one `generate` call: steering settings (`Steering` takes them per row), sampling (a per-row logits
processor with its own seeded generator) and stopping (a per-row stopping criterion) are all per row, so
any requests can share a batch and none sees another's settings. Only prompts of very different lengths
are kept apart, where padding would cost more than batching saves.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from contextlib import nullcontext

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from els.core.generation import eos_ids
from els.core.models import LoadedModel
from els.serve.jobs import Failed, Job, shutting_down
from els.serve.protocol import ApiError, Limits
from els.serve.rows import Row, RowSampler, RowTracker
from els.steering.artefact import Artefact
from els.steering.steering import Steering

log = logging.getLogger("els.serve.app")  # the server's logger, as before the split


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
        # A SIGTERM during a long prefill (one forward pass over thousands of tokens) ends it at the next layer,
        # not at the pass's end: each decoder block first checks the flag.
        self._interrupts = [block.register_forward_pre_hook(self._interrupt) for block in lm.blocks]

    def _new_thread(self) -> threading.Thread:
        self._dying = False
        return threading.Thread(target=self._main, name="els-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def state(self) -> str:
        """ "ok"; "restarted" once the worker has failed and been restarted (it serves); "stopping"."""
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
        for hook in self._interrupts:
            hook.remove()

    def _interrupt(self, module: torch.nn.Module, args: tuple) -> None:
        if self.stopping:  # caught by _run, which answers the batch's requests 503 shutting_down
            raise RuntimeError("the server is shutting down")

    def submit(self, job: Job) -> None:
        if self.stopping:
            raise shutting_down()
        self.ensure_running()
        if self.waiting() >= self.limits.max_queue:
            raise ApiError(
                503, "server overloaded: too many queued requests, retry later", type="server_error", code="overloaded"
            )
        self.jobs.put(job)

    def waiting(self) -> int:
        """Requests not yet in a batch: queued, or taken by the worker for a later batch."""
        return self.jobs.qsize() + len(self._pending)

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
        error = ApiError(
            500,
            f"the generation worker failed ({why}) and was restarted; retry the request",
            type="server_error",
            code="worker_restarted",
        )
        held, self._pending, self._running = self._pending + self._running, [], []
        for job in held:
            job.answer(Failed(error))

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
            job.answer(Failed(shutting_down()))

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
                    job.answer(Failed(shutting_down()))
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
        return Steering(self.lm.model, self.artefact, rows, check=False)

    def _run(self, batch: list[Job], retry: bool = False) -> None:
        """One generate call for `batch`. If it fails, each unanswered row is run again alone, so only the
        faulty request gets the error (and a fault of the batch as a whole, e.g. its size, answers none)."""
        model, tok = self.lm.model, self.lm.tokenizer
        self.counters["batches"] += 1
        if not retry:
            self.counters["requests"] += len(batch)
            self.counters["largest_batch"] = max(self.counters["largest_batch"], len(batch))
        rows: list[Row] = []
        try:
            device = model.device
            width = max(len(j.ids) for j in batch)
            pad = tok.pad_token_id
            # Left padding built by hand: the tokenizer is not touched here while request threads encode with it.
            input_ids = torch.tensor([[pad] * (width - len(j.ids)) + j.ids for j in batch], device=device)
            mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in batch], device=device)
            rows = [
                Row(j, i, self._generator(j, device), sent=len(j.delivered), resumed=bool(j.delivered))
                for i, j in enumerate(batch)
            ]
            steering = self._steering(batch)
            tracker = RowTracker(rows, self.lm, self.eos, lambda: self.stopping, steering)
            with steering if steering is not None else nullcontext(), torch.inference_mode():
                model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=max(j.max_tokens for j in batch),
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad,
                    logits_processor=LogitsProcessorList([RowSampler(rows)]),
                    stopping_criteria=StoppingCriteriaList([tracker]),
                )
            for row in rows:
                if not row.done:  # generate stopped on its own (e.g. the model's max_length)
                    tracker.finish(row, "length")
        except Exception as e:  # noqa: BLE001 - a failed batch must not stop the server
            for row in rows:
                row.done = True  # a row the tracker still holds must not be answered twice
            left = [j for j in batch if not j.answered and not j.cancelled]
            if len(batch) > 1 and not self.stopping:
                log.warning(
                    "a batch of %d failed (%s: %s); retrying its %d unanswered rows one by one",
                    len(batch),
                    type(e).__name__,
                    e,
                    len(left),
                )
                self.counters["failed_batches"] += 1
                for job in left:
                    self.counters["retried_rows"] += 1
                    self._run([job], retry=True)
                return
            log.exception("generation failed")
            error = (
                shutting_down()
                if self.stopping
                else ApiError(
                    500, f"generation failed: {type(e).__name__}: {e}", type="server_error", code="generation_failed"
                )
            )
            for job in left:
                job.answer(Failed(error))

    @staticmethod
    def _generator(job: Job, device: torch.device) -> torch.Generator | None:
        if job.temperature == 0:
            return None
        return torch.Generator(device=device).manual_seed(job.seed if job.seed is not None else secrets.randbits(63))
