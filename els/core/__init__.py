"""The layer everything else stands on: model loading, hooks on decoder blocks, generation, atomic I/O,
statistics and the executor protocol. It imports nothing else of els."""

from els.core.executor import Batch, Executor, LocalExecutor
from els.core.generation import DEFAULT_MAX_NEW_TOKENS, generate
from els.core.models import LoadedModel, load_model

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "Batch", "Executor", "LoadedModel", "LocalExecutor", "generate", "load_model"]
