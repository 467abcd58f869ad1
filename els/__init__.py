"""ELS: Energy Landscape Steering against over-refusal in chat LLMs."""

from els.artefact import Artefact
from els.generation import generate
from els.models import LoadedModel, load_model
from els.settings import SteerSettings
from els.steering import Steering, steer

__all__ = ["Artefact", "LoadedModel", "SteerSettings", "Steering", "generate", "load_model", "steer", "train"]


def __getattr__(name: str):
    # `train` needs collection and the judges; importing them lazily keeps `from els import steer` light.
    if name == "train":
        from els.recipe import train

        return train
    raise AttributeError(f"module 'els' has no attribute {name!r}")
