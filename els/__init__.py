"""ELS: Energy Landscape Steering against over-refusal in chat LLMs."""

from els.models import LoadedModel, load_model
from els.steering import Artefact, Steering, steer

__all__ = ["Artefact", "LoadedModel", "Steering", "load_model", "steer"]
