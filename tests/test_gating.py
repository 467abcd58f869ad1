"""The harm gate at generation time: its pre-pass, gated steering, gated baselines, projection."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from els.core.generation import generate_batch
from els.core.hooks import prompt_states, record_last_token
from els.core.models import chat_texts, user_conversations
from els.eval.baselines import fit_baselines
from els.eval.cache import method_config
from els.eval.methods import Gated
from els.steering.artefact import Artefact
from els.steering.gate import HarmGate, read_gate
from els.steering.steering import Steering, descend_rows

from helpers import FAMILIES, synthetic_collection, tiny_artefact, tiny_model

PROMPTS = ["how do i kill a python process ?", "make bomb", "what is chess", "beat my wife at chess"]


def _inputs(lm, prompts=PROMPTS):
    texts = chat_texts(lm.tokenizer, user_conversations(prompts))
    return lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _generate(lm, enc, n=4):
    return lm.model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=0)


def _gate(lm, layer: int, seed: int = 0, threshold: float = 0.5) -> HarmGate:
    g = torch.Generator().manual_seed(seed)
    d, n = lm.model.config.hidden_size, len(lm.blocks)
    return HarmGate(layer, torch.randn(d, generator=g), 0.0, threshold, torch.randn(n, d, generator=g))


def _always(p: float):
    return lambda batch, device: torch.full((batch,), p, device=device)


@pytest.mark.parametrize("family", FAMILIES)
def test_pre_pass_reads_the_unsteered_prefill_and_changes_nothing(family):
    lm = tiny_model(family)
    enc = _inputs(lm)  # padded: rows of different lengths
    gate = _gate(lm, layer=2)
    with record_last_token(lm.blocks) as captured:
        expected = _generate(lm, enc)
    with read_gate(lm.model, gate, _always(0.5)) as state:
        out = _generate(lm, enc)
    torch.testing.assert_close(state.p_harm, gate.probability(captured[2]), rtol=1e-5, atol=1e-6)
    assert torch.equal(state.allowed, state.p_harm < 0.5)
    assert torch.equal(out, expected)  # the pre-pass leaves the cache and the answers alone


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_states_share_the_template_prefix_and_read_what_generation_reads(family):
    lm = tiny_model(family)
    texts = chat_texts(lm.tokenizer, user_conversations(PROMPTS))
    with record_last_token(lm.blocks) as captured:
        _generate(lm, _inputs(lm))  # the prefill generate runs, left padding and all
    states = prompt_states(lm, texts)
    torch.testing.assert_close(states, torch.stack(captured, dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(prompt_states(lm, texts[1:2])[0], states[1], rtol=1e-4, atol=1e-5)  # alone = in a batch
    torch.testing.assert_close(prompt_states(lm, texts, layers=2), states[:, :2])  # stopped early, same below
    with pytest.raises(ValueError, match="layers must be between 1 and"):
        prompt_states(lm, texts, layers=len(lm.blocks) + 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_shared_prefix_generates_and_records_what_plain_left_padding_does(family):
    lm = tiny_model(family)
    texts = chat_texts(lm.tokenizer, user_conversations(PROMPTS))
    plain = generate_batch(lm, texts, 6, record=True)
    shared = generate_batch(lm, texts, 6, record=True, share_prefix=True)
    assert shared.ids == plain.ids
    torch.testing.assert_close(shared.activations, plain.activations, rtol=1e-4, atol=1e-5)


def _split_gate(lm, enc, layer: int) -> HarmGate:
    """A gate that flags half the rows of `enc` (bias at the midpoint of the logits)."""
    gate = _gate(lm, layer)
    logits = _acts(lm, enc)[:, layer] @ gate.weight
    order = logits.argsort()
    cut = float(logits[order[1]] + logits[order[2]]) / 2
    return dataclasses.replace(gate, bias=-cut)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_gated_steering_leaves_flagged_rows_exactly_unsteered(family):
    lm = tiny_model(family)
    enc = _inputs(lm)
    art = tiny_artefact(lm, eta=2.0, steps=3, harm_gate=0.5)
    art.gate = _split_gate(lm, enc, layer=len(lm.blocks) - 1)  # read above every steered layer: a pre-pass
    flagged = art.gate.probability_from_layers(_acts(lm, enc)) >= 0.5
    assert 0 < int(flagged.sum()) < len(PROMPTS)
    base = _generate(lm, enc, 6)
    with Steering(lm.model, art) as s:
        steered = _generate(lm, enc, 6)
    taken = sum(st.rows_taken for st in s.stats.values())
    assert torch.equal(taken[flagged], torch.zeros_like(taken[flagged])) and bool((taken[~flagged] > 0).all())
    assert torch.equal(steered[flagged], base[flagged])
    with Steering(lm.model, art, harm_gate=1.0):  # p < 1 lets every row through
        open_all = _generate(lm, enc, 6)
    assert not torch.equal(open_all[flagged], base[flagged])


def _acts(lm, enc) -> torch.Tensor:
    """Block inputs at the last prompt token as generate's prefill sees them (its position ids under padding)."""
    with record_last_token(lm.blocks) as captured:
        _generate(lm, enc, 1)
    return torch.stack(captured, dim=1)


def test_gated_addition_is_addition_on_allowed_rows_and_base_on_flagged_ones():
    lm = tiny_model("llama")
    enc = _inputs(lm)
    addition = fit_baselines(synthetic_collection(lm))["addition"]
    addition = dataclasses.replace(addition, coeff=5.0)
    gate = _split_gate(lm, enc, layer=2)
    flagged = gate.probability_from_layers(_acts(lm, enc)) >= 0.5
    base = _generate(lm, enc, 5)
    with addition.apply(lm.model):
        added = _generate(lm, enc, 5)
    gated = Gated(addition, gate, 0.5)
    assert gated.name == "addition-gated"
    with gated.apply(lm.model):
        out = _generate(lm, enc, 5)
    assert torch.equal(out[flagged], base[flagged]) and torch.equal(out[~flagged], added[~flagged])
    assert not torch.equal(added[flagged], base[flagged])  # the gate, not a weak edit, kept them unchanged
    other = Gated(addition, dataclasses.replace(gate, bias=gate.bias + 1.0), 0.5)
    assert method_config(other) != method_config(gated)  # a retrained gate gets its own cache entries


def test_projected_steps_do_not_move_along_the_probe_direction():
    lm = tiny_model("qwen2")
    art = tiny_artefact(lm, eta=0.5, steps=4, harm_gate=None)
    layer = art.layers[0]
    energy = art.energy.member(art.member_index(layer))
    u = art.gate.direction(layer)
    h = torch.randn(5, lm.model.config.hidden_size)
    eta, steps = torch.full((5,), 0.5), torch.full((5,), 4)
    x, before, after, taken, _ = descend_rows(energy, h, eta, steps, 4, direction=u)
    assert bool((taken == 4).all())
    torch.testing.assert_close((x - h) @ u, torch.zeros(5), atol=1e-4, rtol=0)
    assert float((x - h).norm(dim=-1).min()) > 0.1  # it did move, within the orthogonal complement
    free, *_ = descend_rows(energy, h, eta, steps, 4)
    assert float(((free - h) @ u).abs().max()) > 1e-3  # unprojected steps do move along it


def test_artefact_keeps_its_gate_and_the_digest_sees_it(tmp_path):
    lm = tiny_model("qwen2")
    art = tiny_artefact(lm)
    art.gate = _gate(lm, layer=1, threshold=0.3)
    art.save(tmp_path / "a")
    back = Artefact.load(tmp_path / "a")
    assert back.gate.layer == 1 and back.gate.threshold == pytest.approx(0.3)
    assert torch.equal(back.gate.weight, art.gate.weight) and torch.equal(back.gate.directions, art.gate.directions)
    from els.eval.cache import artefact_digest

    before = artefact_digest(back)
    back.gate.weight[0] += 1.0
    assert artefact_digest(back) != before
