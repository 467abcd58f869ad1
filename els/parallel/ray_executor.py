"""Executors: where fixed batches are generated. In this process (the default), or on Ray actors.

    with RayExecutor(ModelSpec("default"), workers=2) as ex:     # els collect --ray --workers 2
        collect(lm, sets, out, judge=judge, executor=ex)

`collect` and `evaluate` make the same fixed batches either way (`length_batches`), hand them to
`executor.map`, and write each finished batch as it comes back, in completion order, into the same files a
single-process run writes; so a run is resumable and its result does not depend on where it ran.

A `RayExecutor` starts `workers` actors, each loading the model once (one GPU each, or a share of the CPUs
with torch's thread count set to it) and running `generate_batch`, the function the single-process path
runs, under the batch's method. Answers and activations come back through Ray's object store. An actor
that dies costs the batch it held: Ray restarts the actor and retries the batch (`max_restarts`,
`max_task_retries`); should that give up, the driver resubmits it. The driver writes a batch only when its
result arrives, so nothing is lost and nothing is written twice. Ray is optional: `pip install 'els[ray]'`.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from els.core.executor import Batch, LocalExecutor, Steerer, run_batch
from els.core.generation import Generated
from els.core.models import LoadedModel, load_model

INSTALL_HINT = "--ray needs Ray, an optional extra: pip install 'els[ray]'"
RETRIES = 3  # resubmissions of one batch by the driver after Ray's own retries gave up


class RayMissing(ImportError):
    """Ray is not installed; the message says how to install it."""


# ---------------------------------------------------------------------------------------------------------------
# Ray


def import_ray() -> ModuleType:
    """The `ray` module, or `RayMissing` with the one line that says how to install it."""
    try:
        import ray
    except ImportError:
        raise RayMissing(INSTALL_HINT) from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at `address` ("auto", "HOST:PORT", "ray://HOST:10001"), or start a local one
    (`num_cpus`: its CPU slots; default all). Returns whether this call connected (and so should shut down)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address is None:
        # Workers of a local cluster inherit this environment: make this copy of els importable there.
        root = str(Path(__file__).resolve().parents[2])
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False)
    else:
        ray.init(address=address, configure_logging=False)
    return True


@dataclass(frozen=True)
class ModelSpec:
    """What each actor loads, with `load_model`'s arguments; must give the driver's model (checked)."""

    name: str
    device: str | None = None
    dtype: str = "auto"
    device_map: str | None = None

    @property
    def on_gpu(self) -> bool:
        return (self.device or "").startswith("cuda")


class _Worker:
    """A Ray actor's body: one model, loaded once; the methods it was sent, cached by the driver's key."""

    def __init__(self, spec: ModelSpec, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs: "cuda" is the first of them.
        device = "cuda" if (spec.device or "").startswith("cuda") else spec.device
        self.lm = load_model(spec.name, device=device, dtype=spec.dtype, device_map=spec.device_map)
        self.methods: dict[int, Steerer] = {}

    def fingerprint(self) -> str:
        from els.eval.cache import model_fingerprint

        return model_fingerprint(self.lm)

    def threads(self) -> int:
        return torch.get_num_threads()

    def run(
        self,
        texts: list[str],
        max_new_tokens: int,
        record: bool,
        method_key: int | None,
        method_ref: list,
        crash_marker: str | None = None,
        horizon: int | None = None,
        share_prefix: bool = False,
    ) -> Generated:
        method = None
        if method_key is not None:
            if method_key not in self.methods:  # the method travels once per actor (a list keeps Ray from
                import ray  # resolving the reference with every batch)

                self.methods[method_key] = ray.get(method_ref[0])
            method = self.methods[method_key]
        if crash_marker is not None:
            _crash_once(crash_marker)
        batch = Batch(texts, max_new_tokens, record, method, horizon=horizon, share_prefix=share_prefix)
        return run_batch(self.lm, batch)


def _crash_once(marker: str) -> None:
    """Test hook: the first actor to get here creates `marker` and dies with its batch in flight."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


@dataclass
class RayExecutor:
    """`workers` Ray actors generating batches of `spec`'s model (see the module's docstring).

    `address`: join that cluster; None: the one this process is connected to, else a new local one.
    `workers`: default one per free GPU of the cluster (a GPU model), else 1. On CPUs each actor gets an
    equal share of the cluster's free CPU slots as its torch thread count. `gpus_per_worker` > 1 (with a `device_map`)
    gives each actor several GPUs for a model larger than one. `expect_fingerprint`: the driver's
    `store.model_fingerprint`; an actor whose model differs fails the run before any batch.
    """

    spec: ModelSpec
    workers: int | None = None
    address: str | None = None
    gpus_per_worker: int = 1
    expect_fingerprint: str | None = None
    max_restarts: int = 2
    crash_marker: str | None = None  # test hook, see `_crash_once`
    actors: list = field(default_factory=list, init=False)
    _started: bool = field(default=False, init=False)
    _methods: dict = field(default_factory=dict, init=False)  # id(method) -> (method, ObjectRef)

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError("--workers must be at least 1")
        self.ray = import_ray()

    def start(self) -> RayExecutor:
        if self.actors:
            return self
        ray = self.ray
        self._started = connect(self.address)
        # Free slots, not the cluster's total: actors that cannot be placed would wait for ever. Killed actors
        # (a previous executor's) release theirs asynchronously: wait for them a little.
        deadline = time.monotonic() + 30
        while True:
            free = ray.available_resources()
            gpus, cpus = int(free.get("GPU", 0)), int(free.get("CPU", 0))
            if cpus >= (self.workers or 1) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if self.spec.on_gpu or (self.spec.device_map is not None and gpus > 0):
            n = self.workers or max(1, gpus // self.gpus_per_worker)
            if gpus < n * self.gpus_per_worker or cpus < n:
                raise ValueError(
                    f"{n} worker(s) of {self.gpus_per_worker} GPU(s) need {n * self.gpus_per_worker} "
                    f"GPUs and {n} CPUs; the Ray cluster has {gpus} and {cpus} free"
                )
            options, threads = {"num_gpus": self.gpus_per_worker, "num_cpus": 1}, None
        else:
            n = self.workers or 1
            if cpus < n:
                raise ValueError(f"{n} worker(s) need {n} CPU slots; the Ray cluster has {cpus} free")
            threads = cpus // n
            options = {"num_cpus": threads}
        actor = ray.remote(_Worker).options(
            max_restarts=self.max_restarts, max_task_retries=self.max_restarts, **options
        )
        self.actors = [actor.remote(self.spec, threads) for _ in range(n)]
        if self.expect_fingerprint is not None:
            for fp in ray.get([a.fingerprint.remote() for a in self.actors]):
                if fp != self.expect_fingerprint:
                    self.close()
                    raise ValueError(
                        f"a Ray worker loaded {self.spec.name!r} with fingerprint {fp}, the driver "
                        f"{self.expect_fingerprint}: the nodes hold different weights or settings"
                    )
        return self

    def _method_ref(self, method: Steerer | None) -> tuple[int | None, list]:
        if method is None:
            return None, []
        if id(method) not in self._methods:  # holding the method keeps its id unique
            self._methods[id(method)] = (method, self.ray.put(method))
        return id(method), [self._methods[id(method)][1]]

    def map(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, Generated]]:
        ray = self.ray
        from ray.exceptions import RayActorError

        self.start()
        todo: deque[tuple[Batch, int]] = deque((b, 0) for b in batches)
        idle = deque(range(len(self.actors)))
        flight: dict = {}  # ObjectRef -> (batch, tries, actor index)
        try:
            while todo or flight:
                while todo and idle:
                    batch, tries = todo.popleft()
                    i = idle.popleft()
                    key, ref = self._method_ref(batch.method)
                    task = self.actors[i].run.remote(
                        batch.texts,
                        batch.max_new_tokens,
                        batch.record,
                        key,
                        ref,
                        self.crash_marker,
                        batch.horizon,
                        batch.share_prefix,
                    )
                    flight[task] = (batch, tries, i)
                (done,), _ = ray.wait(list(flight), num_returns=1)
                batch, tries, i = flight.pop(done)
                try:
                    result = ray.get(done)
                except RayActorError:
                    # Ray's restarts and retries of this actor gave up: resubmit the batch (to any actor).
                    if tries + 1 > RETRIES:
                        raise
                    todo.appendleft((batch, tries + 1))
                    idle.append(i)
                    continue
                idle.append(i)
                yield batch, result
        finally:
            for task in flight:  # the caller stopped early (an error, an interrupt): drop the rest
                try:
                    ray.cancel(task)
                except Exception:  # noqa: BLE001  (already finished, or its actor is gone)
                    pass

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors, self._methods = [], {}
        if self._started:
            self.ray.shutdown()
            self._started = False

    def __enter__(self) -> RayExecutor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_executor(
    lm: LoadedModel,
    ray: bool = False,
    address: str | None = None,
    workers: int | None = None,
    *,
    device: str | None = None,
    dtype: str = "auto",
    device_map: str | None = None,
) -> LocalExecutor | RayExecutor:
    """The executor the command line asked for: local without --ray (and --workers), else `RayExecutor`
    with the driver's model fingerprint to check the workers against."""
    if not (ray or address):
        if workers not in (None, 1):
            raise ValueError("--workers needs --ray (a local Ray cluster) or --ray-address")
        return LocalExecutor(lm)
    from els.eval.cache import model_fingerprint

    return RayExecutor(
        ModelSpec(lm.name, device, dtype, device_map), workers, address, expect_fingerprint=model_fingerprint(lm)
    )
