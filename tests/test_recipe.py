"""The one-call recipe (els.training.recipe): train, fit, held_out and validate on a tiny model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from els.core.generation import generate
from els.data.promptset import PromptSet
from els.judges.model import PrefixJudge
from els.steering.artefact import Artefact
from els.steering.energy import CONTRASTS
from els.steering.settings import SteerSettings
from els.steering.steering import steer
from els.training import recipe
from els.training.energy import TrainConfig, train_energy
from els.training.recipe import Recipe, fit, held_out, safety_config, train, validate

from helpers import synthetic_collection, tiny_model

TINY = Recipe(
    train=TrainConfig(widths=(16, 8), epochs=4, lr=1e-3, batch_size=8),
    top_n=2,
    judge="prefix",
    max_new_tokens=4,
    batch_size=4,
    harm_data=(),
)


def test_fit_uses_the_recipe_defaults_and_matches_the_steps_it_chains():
    lm = tiny_model("qwen2")
    col = synthetic_collection(lm)
    art = fit(col, TINY)
    assert art.manifest.energy.contrast == TrainConfig().contrast == "benign"
    assert art.settings == TINY.settings == SteerSettings()  # the library's defaults are the recipe's
    assert len(art.layers) == TINY.top_n
    again = fit(col, TINY)  # deterministic: the same artefact twice
    h = torch.randn(3, 5, 32)
    assert torch.equal(art.energy(h), again.energy(h)) and art.manifest.steer == again.manifest.steer


def _trained_rows(col, cfg: TrainConfig) -> tuple[set[int], set[int]]:
    """The rows the compliance and the safety energy learned from, drawn as train_energy draws them."""
    out = []
    for c in (cfg, safety_config(cfg)):
        good, bad = CONTRASTS[c.contrast]
        used = {i for i, s in enumerate(col.states) if s in good + bad}
        out.append(used - set(train_energy(col.activations, col.states, c).val_index))
    return out[0], out[1]


def test_held_out_rows_are_disjoint_from_every_training_row():
    lm = tiny_model("qwen2")
    col = synthetic_collection(lm, n=128)
    for contrast in ("benign", "four-state"):
        cfg = TrainConfig(widths=(8,), epochs=1, batch_size=8, contrast=contrast)
        rows = held_out(col, cfg)
        energy_train, safety_train = _trained_rows(col, cfg)
        assert rows and not set(rows) & (energy_train | safety_train), contrast
        kinds = {col.records[i].kind for i in rows}
        assert kinds == {"benign", "harmful"}, contrast


def test_validate_reports_both_kinds_base_from_the_collection_and_steered_from_a_direct_generate():
    lm = tiny_model("qwen2")
    col = synthetic_collection(lm)
    art = fit(col, TINY)
    rows = list(range(len(col.records)))
    judge = PrefixJudge()
    out = validate(lm, art, col, rows, judge, n=5, max_new_tokens=4)
    assert set(out) == {"base", "steered"}
    for name in out:
        assert out[name]["benign_n"] == out[name]["harmful_n"] == 5
    for kind, key in (("benign", "benign_compliance"), ("harmful", "harmful_refusal")):
        records = [r for r in col.records if r.kind == kind][:5]
        prompts = [r.prompt for r in records]
        with steer(lm.model, art):
            steered = judge(prompts, generate(lm, prompts, max_new_tokens=4))
        for name, refused in (("base", [r.refused for r in records]), ("steered", steered)):
            share = sum(refused) / len(prompts)
            assert out[name][key] == (1 - share if kind == "benign" else share)


class _Alternating:
    """Refuses every other prompt, so the collection has all four states whatever the tiny model says."""

    name = "alternating"
    horizon = None

    def __call__(self, prompts, answers):
        return [int(p.split()[-1]) % 2 == 0 for p in prompts]


def test_train_collects_fits_and_saves_a_steerable_artefact(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "get_judge", lambda name: _Alternating())
    lm = tiny_model("qwen2")
    benign = PromptSet("b", "benign", [f"what is chess {i}" for i in range(12)])
    harmful = PromptSet("h", "harmful", [f"how do i make bomb {i}" for i in range(12)])
    art = train(lm, tmp_path, benign=[benign], harmful=[harmful], recipe=TINY, progress=False)
    assert (tmp_path / "collect" / "states.jsonl").exists()
    loaded = Artefact.load(tmp_path / "artefact")
    assert loaded.manifest == art.manifest and art.manifest.data["counts"] == {
        "helpful": 6,
        "false_refusal": 6,
        "safe_refusal": 6,
        "jailbreak": 6,
    }
    with steer(lm.model, loaded, harm_gate=1.0) as s:  # harm gate open (None would keep the artefact's 0.5)
        generate(lm, ["what is chess"], max_new_tokens=2)
    assert sum(layer["steps_taken"] for layer in s.report().values()) > 0


def test_train_fits_the_pooled_harm_gate_deterministically_from_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ELS_CACHE", str(tmp_path / "cache"))  # the gate's activations are cached there
    monkeypatch.setattr(recipe, "get_judge", lambda name: _Alternating())
    lm = tiny_model("qwen2")
    benign = PromptSet("b", "benign", [f"what is chess {i}" for i in range(12)])
    harmful = PromptSet("h", "harmful", [f"how do i make bomb {i}" for i in range(12)])
    pooled = dataclasses.replace(TINY, harm_data=("els-benign#24", "els-harmful#24"), harm_exclude=())
    art = train(lm, tmp_path / "run", benign=[benign], harmful=[harmful], recipe=pooled, progress=False)
    report = json.loads((tmp_path / "run" / "artefact" / "els.json").read_text())["harm_gate_probe"]
    assert report == {k: v for k, v in art.gate.report.items() if k != "search"}  # the gate's own, written once
    assert set(report["pool"]) >= {"els-benign#24", "els-harmful#24", "framed-benign", "framed-harmful"}
    assert art.settings.harm_gate == pytest.approx(art.gate.threshold)  # the threshold chosen on validation
    assert art.gate.directions.shape == (len(lm.blocks), lm.model.config.hidden_size)
    # Searched layers keep the gate's own directions; above them (the pool's forward stopped) the collection's.
    # (Layer 0 reads the last template token's embedding, the same in every prompt: no direction there.)
    assert report["searched_layers"] == 2 and all(art.gate.direction(layer) is not None for layer in (1, 2))
    assert any((tmp_path / "cache" / "gate" / "acts").iterdir())
    again = train(lm, tmp_path / "run", benign=[benign], harmful=[harmful], recipe=pooled, progress=False)
    assert torch.equal(again.gate.weight, art.gate.weight)  # deterministic, from the cache
