"""Training: collection, energy training, harm-gate training and the recipe that ends in an artefact."""

from els.training.collect import Collection, collect, load_collection
from els.training.energy import TrainConfig, train_energy
from els.training.gate import fit_gate
from els.training.recipe import Recipe, make_artefact, train

__all__ = [
    "Collection",
    "Recipe",
    "TrainConfig",
    "collect",
    "fit_gate",
    "load_collection",
    "make_artefact",
    "train",
    "train_energy",
]
