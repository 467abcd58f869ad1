import pytest
import torch

from els.core.generation import generate_batch
from els.core.models import chat_texts, decoder_blocks, user_conversations
from els.eval.baselines import fit_baselines, knobs, lda_probe, mean_direction
from els.eval.methods import (
    BALANCED_SYSTEM_PROMPT,
    DirectionAblation,
    DirectionAddition,
    ProbeGatedAddition,
    SurgicalAblation,
)

from helpers import synthetic_collection, tiny_model

PROMPTS = ["how do i kill a python process ?", "what is chess", "how do i make bomb", "bake cake"]


def _enc(lm):
    texts = chat_texts(lm.tokenizer, user_conversations(PROMPTS))
    return lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _block_inputs(lm, method=None) -> list[torch.Tensor]:
    """Every block's input [B, T, d] as the block sees it (capture hooks run after the method's)."""
    blocks = decoder_blocks(lm.model)
    seen: list[torch.Tensor] = [None] * len(blocks)

    def capture(i):
        def hook(module, args, kwargs):
            seen[i] = (args[0] if args else kwargs["hidden_states"]).clone()

        return hook

    ctx = method.apply(lm.model) if method else torch.no_grad()
    with ctx:
        handles = [b.register_forward_pre_hook(capture(i), with_kwargs=True) for i, b in enumerate(blocks)]
        with torch.no_grad():
            lm.model(**_enc(lm))
        for h in handles:
            h.remove()
    return seen


@pytest.fixture(scope="module")
def fitted():
    lm = tiny_model("qwen2")
    col = synthetic_collection(lm)
    return lm, col, fit_baselines(col)


def test_fit_returns_every_method(fitted):
    _, _, methods = fitted
    assert set(methods) == {"system-prompt", "ablation", "addition", "probe-gated", "surgical"}
    assert methods["system-prompt"].system == BALANCED_SYSTEM_PROMPT
    assert all(m.name == key for key, m in methods.items())
    assert knobs(methods["addition"])["coeff"] > 0


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_ablation_removes_the_direction_everywhere(family):
    lm = tiny_model(family)
    r = torch.nn.functional.normalize(torch.randn(32), dim=0)
    before = _block_inputs(lm)
    after = _block_inputs(lm, DirectionAblation(r, layer=1))
    for b, a in zip(before, after):
        assert (b @ r).abs().max() > 1e-2  # there was something to remove
        assert (a @ r).abs().max() < 1e-4 * a.norm(dim=-1).max()  # at every layer and position


def test_addition_shifts_one_layer_by_coeff_times_scale(fitted):
    lm, _, methods = fitted
    m: DirectionAddition = methods["addition"]
    m = DirectionAddition(m.direction, m.layer, coeff=0.3, scale=2.0)
    before, after = _block_inputs(lm), _block_inputs(lm, m)
    for layer in range(m.layer):
        assert torch.allclose(before[layer], after[layer])
    shift = after[m.layer] - before[m.layer]  # every position moved by the same vector
    assert torch.allclose(shift, (-0.6 * m.direction).expand_as(shift), atol=1e-5)


def test_surgical_vector_is_orthogonal_to_refusal(fitted):
    _, col, methods = fitted
    s: SurgicalAblation = methods["surgical"]
    harmful = torch.tensor([r.kind == "harmful" for r in col.records])
    refusal = mean_direction(col.activations, harmful, ~harmful)[s.layer]
    assert abs(float(s.direction @ refusal)) < 1e-5
    assert abs(float(s.direction.norm()) - 1) < 1e-5
    assert float(s.direction @ methods["ablation"].direction) != pytest.approx(1.0)


def test_probe_gate_follows_the_probe_through_generation(fitted):
    lm, _, methods = fitted
    add: DirectionAddition = methods["addition"]
    add = DirectionAddition(add.direction, add.layer, coeff=3.0, scale=add.scale)
    texts = chat_texts(lm.tokenizer, user_conversations(PROMPTS))
    w = torch.randn(32)

    def run(method):
        with method.apply(lm.model):
            return generate_batch(lm, texts, max_new_tokens=6).texts

    def gated(bias):
        return ProbeGatedAddition(add.direction, add.layer, add.coeff, add.scale, probe_w=w * 0, probe_b=bias)

    base, added = generate_batch(lm, texts, max_new_tokens=6).texts, run(add)
    assert base != added
    assert run(gated(-1.0)) == added  # probe says benign everywhere: the addition, on every generated token
    assert run(gated(1.0)) == base  # harmful everywhere: untouched


def test_lda_probe_separates_a_shifted_class():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    harmful = torch.arange(200) % 2 == 0
    x[harmful] += 2.0
    w, b = lda_probe(x, harmful)
    assert ((x @ w + b > 0) == harmful).float().mean() > 0.9


def test_hooks_removed_on_exit_and_error(fitted):
    lm, _, methods = fitted
    blocks = decoder_blocks(lm.model)
    for m in methods.values():
        with pytest.raises(RuntimeError):
            with m.apply(lm.model):
                raise RuntimeError("boom")
        assert not any(b._forward_pre_hooks for b in blocks), m.name
