"""ELS: Energy Landscape Steering against over-refusal in chat LLMs."""

from collections.abc import Callable

from els.core.generation import generate
from els.core.models import LoadedModel, load_model
from els.steering.artefact import Artefact
from els.steering.settings import SteerSettings
from els.steering.steering import Steering, steer

__all__ = ["Artefact", "LoadedModel", "SteerSettings", "Steering", "generate", "load_model", "steer", "train"]


def __getattr__(name: str) -> Callable[..., Artefact]:
    # `train` needs collection and the judges; importing them lazily keeps `from els import steer` light.
    if name == "train":
        from els.training.recipe import train

        return train
    raise AttributeError(f"module 'els' has no attribute {name!r}")
