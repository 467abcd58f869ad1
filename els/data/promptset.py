"""A prompt set: named prompts of one kind, with seeded samples and the fixed train/val/test split."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["benign", "harmful"]
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
SPLIT_SEED = 0
KINDS = ("benign", "harmful")


@dataclass(frozen=True)
class PromptSet:
    name: str
    kind: Kind | None  # None for a user file whose kind the caller decides
    prompts: list[str]
    categories: list[str] = field(default_factory=list)  # empty, or one per prompt

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: list[int], name: str | None = None) -> PromptSet:
        cats = [self.categories[i] for i in idx] if self.categories else []
        return PromptSet(name or self.name, self.kind, [self.prompts[i] for i in idx], cats)

    def with_kind(self, kind: Kind) -> PromptSet:
        return PromptSet(self.name, kind, self.prompts, self.categories)

    def sample(self, n: int | None, seed: int = 0) -> PromptSet:
        """A seeded sample of n prompts in their original order (all of them when n is None or larger)."""
        if n is None or n >= len(self):
            return self
        idx = sorted(random.Random(seed).sample(range(len(self)), n))
        return self.subset(idx)

    def split(self, which: str) -> PromptSet:
        if which not in SPLITS:
            raise ValueError(f"unknown split {which!r}; use one of {', '.join(SPLITS)}")
        order = list(range(len(self)))
        random.Random(SPLIT_SEED).shuffle(order)
        a = round(SPLIT_FRACTIONS[0] * len(order))
        b = a + round(SPLIT_FRACTIONS[1] * len(order))
        part = {"train": order[:a], "val": order[a:b], "test": order[b:]}[which]
        return self.subset(sorted(part), f"{self.name}@{which}")

    def content_hash(self) -> str:
        return hashlib.sha256("\x00".join(self.prompts).encode()).hexdigest()[:16]
