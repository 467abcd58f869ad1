"""Where fixed batches are generated: the `Executor` protocol and the in-process `LocalExecutor`
(els.parallel adds Ray actors behind the same protocol)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from els.core.generation import Generated, generate_batch
from els.core.models import LoadedModel

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from torch import nn


class Steerer(Protocol):
    """What a batch runs under: anything with an `apply(model)` context (an eval method)."""

    def apply(self, model: nn.Module) -> AbstractContextManager: ...


@dataclass
class Batch:
    """One fixed batch: chat-templated texts generated greedily together, under `method` (None: the base)."""

    texts: list[str]
    max_new_tokens: int
    record: bool = False  # also return each block's input at the last prompt token
    method: Steerer | None = None
    tag: Any = None  # the caller's handle on the batch (which rows it holds), returned with the result
    horizon: int | None = None  # stop each answer at this many characters (see generation.generate_batch)
    share_prefix: bool = False  # run the rows' shared prefix once (unsteered batches only, see generate_batch)


def run_batch(lm: LoadedModel, batch: Batch, generate: Callable[..., Generated] = generate_batch) -> Generated:
    """Generate one batch under its method: a fresh `apply` context per call (methods keep per-call state)."""
    with batch.method.apply(lm.model) if batch.method is not None else nullcontext():
        return generate(
            lm,
            batch.texts,
            batch.max_new_tokens,
            record=batch.record,
            horizon=batch.horizon,
            share_prefix=batch.share_prefix,
        )


class Executor(Protocol):
    """Runs batches; `map` yields (batch, result) pairs in completion order, each batch exactly once."""

    def map(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, Generated]]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Today's loop: every batch in turn, in this process, on `lm`."""

    def __init__(self, lm: LoadedModel, generate: Callable[..., Generated] = generate_batch):
        self.lm, self.generate = lm, generate

    def map(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, Generated]]:
        for batch in batches:
            yield batch, run_batch(self.lm, batch, self.generate)

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
