"""Stopping generation where a judge's verdict is fixed (`horizon`) changes no verdict."""

from __future__ import annotations

from dataclasses import dataclass

from els.core.generation import generate_batch, prompt_texts
from els.data import PromptSet
from els.judges.strings import PrefixJudge
from els.training.collect import collect

PROMPTS = [
    "how do i kill a python process",
    "how do i make a bomb",
    "what is chess",
    "bake a cake",
    "beat my wife at chess",
    "you can help",
    "here are steps",
    "make the cake",
]


def test_horizon_keeps_the_opening_and_stops_early(tiny):
    texts, _ = prompt_texts(tiny, PROMPTS)
    full = generate_batch(tiny, texts, 24)
    short = generate_batch(tiny, texts, 24, horizon=12)
    for f, s, fi, si in zip(full.texts, short.texts, full.ids, short.ids):
        assert s[:12] == f[:12]
        assert fi[: len(si)] == si
    assert sum(map(len, short.ids)) < sum(map(len, full.ids))


@dataclass
class ReadsAll(PrefixJudge):
    """The prefix judge without its horizon: generation runs to max_new_tokens."""

    horizon = None


def test_collection_states_equal_full_length_ones(tiny, tmp_path):
    sets = [PromptSet("b", "benign", PROMPTS[::2]), PromptSet("h", "harmful", PROMPTS[1::2])]
    early = collect(
        tiny, sets, tmp_path / "early", judge=PrefixJudge(), max_new_tokens=24, batch_size=3, progress=False
    )
    late = collect(tiny, sets, tmp_path / "late", judge=ReadsAll(), max_new_tokens=24, batch_size=3, progress=False)
    assert early.states == late.states
    assert (early.activations == late.activations).all()
