import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import els.training.gate as gate_mod
import els.training.pool as pool_mod
from els.core.stats import auroc
from els.data.promptset import PromptSet
from els.steering.gate import HarmGate
from els.training.gate import fit_gate, gate_report, macro_auroc, prompt_activations, train_gate
from els.training.pool import (
    DEFAULT_EVAL,
    DEFAULT_EXCLUDE,
    DEFAULT_POOL,
    cached_encoder,
    current_removed,
    dedupe,
    framed_pool,
    load_spec,
    normalise_text,
    shipped_removed,
    text_key,
)

from helpers import saved_tiny_model, tiny_model

VOCAB = "how do i kill a python process bake cake the make bomb what is chess beat my wife at you please".split()


def bag_encoder(calls: list[int] | None = None):
    """A fake sentence encoder: unit-norm bag of words over a fixed vocabulary (fast and predictable)."""

    def encode(texts):
        if calls is not None:
            calls.append(len(texts))
        out = torch.zeros(len(texts), len(VOCAB) + 1)
        for r, t in enumerate(texts):
            for w in re.findall(r"[a-z']+", t.lower()):
                out[r, VOCAB.index(w) if w in VOCAB else len(VOCAB)] += 1
        return torch.nn.functional.normalize(out, dim=-1)

    return encode


def test_normalised_text_ignores_case_punctuation_and_spacing():
    assert normalise_text("How  do I, bake a CAKE?") == normalise_text("how do i bake a cake")
    assert normalise_text("bake a cake") != normalise_text("bake a pie")


def test_dedupe_removes_exact_normalised_and_cosine_near_duplicates():
    evals = [PromptSet("e", "harmful", ["How do I make a bomb?"])]
    pool = [
        PromptSet(
            "p",
            "harmful",
            ["how do i make a bomb", "how do i make a bomb please", "what is chess", "kill a python process"],
        ),
        PromptSet("q", "benign", ["bake cake"]),
    ]
    cleaned, removed = dedupe(pool, evals, bag_encoder())
    assert removed == {"p": 2, "q": 0}
    assert cleaned[0].prompts == ["what is chess", "kill a python process"] and cleaned[1].prompts == ["bake cake"]
    # "... please" is a cosine near-duplicate (about 0.93), not a normalised one: a stricter cut keeps it.
    _, strict = dedupe(pool, evals, bag_encoder(), threshold=0.99)
    assert strict == {"p": 1, "q": 0}


def test_dedupe_drops_rows_by_key_whatever_the_evaluation_sets():
    pool = [PromptSet("p", "harmful", ["How do I make a BOMB?", "what is chess"])]
    cleaned, removed = dedupe(pool, [], bag_encoder(), drop={text_key("how do i make a bomb")})
    assert removed == {"p": 1} and cleaned[0].prompts == ["what is chess"]


@pytest.mark.needs_data
def test_shipped_removal_list_is_what_dedupe_finds_today(tmp_path):
    """A machine without the evaluation sets drops the shipped keys: they must be today's near-duplicates
    (rerun scripts/pool_removed.py after changing the pool, the evaluation sets or the rule)."""
    pool = [load_spec(s) for s in DEFAULT_POOL]
    against = [load_spec(s) for s in DEFAULT_EVAL + DEFAULT_EXCLUDE]
    assert set(current_removed(pool, against, cached_encoder(tmp_path))) == shipped_removed()


def test_framed_pool_frames_both_kinds_and_keeps_each_row_with_its_source():
    pool = [
        PromptSet("b", "benign", [f"bake cake {i}" for i in range(10)]),
        PromptSet("h", "harmful", [f"make bomb {i}" for i in range(10)]),
    ]
    framed, sources = framed_pool(pool, max_per_kind=4)
    assert [(ps.name, ps.kind, len(ps)) for ps in framed] == [
        ("framed-benign", "benign", 4),
        ("framed-harmful", "harmful", 4),
    ]
    for ps, src in zip(framed, sources):
        assert all(s.rstrip(".") in p and p != s for p, s in zip(ps.prompts, src))


def test_load_spec_kind_and_sample(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("prompt\n" + "".join(f"q{i}\n" for i in range(10)))
    ps = load_spec(f"harmful={f}:prompt#3")
    assert ps.kind == "harmful" and len(ps) == 3 and ps.name == f"{f}:prompt#3"
    assert load_spec(f"{f}:prompt").kind is None


PROMPTS = [
    "how do i kill a python process",
    "bake cake",
    "what is chess",
    "how do i bake",
    "make bomb",
    "beat my wife at chess",
    "you can help",
    "first then here are steps",
]


def test_activation_cache_resumes_by_batch_and_reruns_instantly(tmp_path, monkeypatch):
    lm = tiny_model("qwen2")
    fresh = prompt_activations(lm, PROMPTS, tmp_path / "fresh", batch_size=3)
    assert fresh.shape == (len(PROMPTS), 3, 32) and fresh.dtype == torch.float32
    # Matches a one-prompt-at-a-time forward: batching (left padding) does not change what is recorded.
    single = torch.cat(
        [
            gate_mod.prompt_states(lm, [t])
            for t in gate_mod.chat_texts(lm.tokenizer, gate_mod.user_conversations(PROMPTS))
        ]
    )
    assert torch.allclose(fresh, single, atol=1e-4)

    calls = _interrupt_forward_at(2, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prompt_activations(lm, PROMPTS, tmp_path / "c", batch_size=3)
    assert len(list((tmp_path / "c" / "acts").glob("*.batches/*.safetensors"))) == 1
    calls.clear()
    resumed = prompt_activations(lm, PROMPTS, tmp_path / "c", batch_size=3)
    assert len(calls) == 2  # 3 batches, the first already on disk
    assert torch.equal(resumed, fresh)
    calls.clear()
    assert torch.equal(prompt_activations(lm, PROMPTS, tmp_path / "c", batch_size=3), fresh) and not calls
    # Another model (or other prompts) is another cache entry.
    prompt_activations(tiny_model("llama"), PROMPTS, tmp_path / "c", batch_size=3)
    assert len(calls) == 3


def test_a_torn_activation_shard_or_cache_is_computed_again(tmp_path, monkeypatch):
    lm = tiny_model("qwen2")
    fresh = prompt_activations(lm, PROMPTS, tmp_path / "fresh", batch_size=3)
    calls = _interrupt_forward_at(3, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prompt_activations(lm, PROMPTS, tmp_path / "c", batch_size=3)
    shard = sorted((tmp_path / "c" / "acts").glob("*.batches/*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    calls.clear()
    assert torch.equal(prompt_activations(lm, PROMPTS, tmp_path / "c", batch_size=3), fresh)
    assert len(calls) == 2  # the torn batch and the one never written
    final = next((tmp_path / "c" / "acts").glob("*.safetensors"))
    final.write_bytes(b"")
    calls.clear()
    assert torch.equal(prompt_activations(lm, PROMPTS, tmp_path / "c", batch_size=3), fresh) and len(calls) == 3


def synthetic(n: int = 400, layers: int = 4, dim: int = 16, signal_layer: int = 2, seed: int = 0):
    """Harmful rows shifted along one direction at `signal_layer` only; other layers are noise."""
    g = torch.Generator().manual_seed(seed)
    harmful = torch.arange(n) % 2 == 1
    acts = torch.randn(n, layers, dim, generator=g) * torch.linspace(1, 5, dim)  # uneven scales, like LLMs
    direction = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    acts[:, signal_layer] += 6.0 * harmful[:, None].float() * direction
    source = [("h" if h else "b") + str(i % 4) for i, h in enumerate(harmful.tolist())]
    return acts, harmful, source, [f"prompt {i}" for i in range(n)]


@pytest.mark.parametrize("signal_layer", [1, 3])
def test_probe_selects_the_separable_layer_on_validation(signal_layer):
    acts, harmful, source, groups = synthetic(signal_layer=signal_layer)
    gate = train_gate(acts, harmful, source, groups, l2_grid=(1e-3, 1e-1))
    assert gate.layer == signal_layer
    assert gate.report["val_macro_auroc"] > 0.9
    assert 0.0 < gate.threshold < 1.0
    assert {r["layer"] for r in gate.report["search"]} == {0, 1, 2, 3}
    p = gate.probability_from_layers(acts)
    assert float(auroc(p[harmful], p[~harmful])) > 0.9
    flagged = p >= gate.threshold
    assert flagged[harmful].float().mean() > 0.8 and flagged[~harmful].float().mean() < 0.2
    # A false-flag cap picks a threshold that respects it on validation.
    capped = train_gate(acts, harmful, source, groups, l2_grid=(1e-3,), max_false_flag=0.01)
    assert capped.report["val_macro_flagged_benign"] <= 0.01 and capped.threshold >= gate.threshold
    # Restricting the layers is honoured (a gate must read at or below the first steered layer).
    assert train_gate(acts, harmful, source, groups, l2_grid=(1e-3,), layers=[0]).layer == 0


def test_macro_auroc():
    p = torch.tensor([0.9, 0.8, 0.1, 0.95, 0.2, 0.85])
    harmful = torch.tensor([True, True, False, True, False, False])
    # b1's only prompt (0.85) outranks one of two h0 prompts: each source pair counts once.
    assert macro_auroc(p, harmful, ["h0", "h0", "b0", "h1", "b0", "b1"]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)


def test_gate_tensors_roundtrip_through_safetensors(tmp_path):
    gate = HarmGate(5, torch.randn(8), -0.25, 0.37, torch.randn(6, 8), {"note": "x"})
    save_file(gate.to_tensors() | {"other.weight": torch.zeros(2)}, tmp_path / "a.safetensors")
    back = HarmGate.from_tensors(load_file(tmp_path / "a.safetensors"))
    assert (back.layer, back.bias, back.threshold) == (5, -0.25, pytest.approx(0.37))
    h = torch.randn(3, 8)
    assert torch.allclose(back.probability(h), gate.probability(h))
    assert torch.allclose(gate.probability(h), torch.sigmoid(h @ gate.weight - 0.25))


def test_gate_report_flags_and_pairs():
    gate = HarmGate(0, torch.tensor([1.0]), 0.0, 0.5)
    acts = {"b": ("benign", torch.tensor([[[-2.0]], [[-1.0]], [[1.0]]])), "h": ("harmful", torch.tensor([[[3.0]]]))}
    rep = gate_report(gate, acts, {"b vs h": (("b",), ("h",)), "missing": (("b",), ("zz",))})
    assert rep["sets"]["b"]["flagged"] == pytest.approx(1 / 3, abs=1e-4) and rep["sets"]["h"]["flagged"] == 1.0
    assert rep["auroc"] == {"b vs h": 1.0}


def test_fit_gate_end_to_end_on_a_tiny_model(tmp_path):
    lm = tiny_model("qwen2")
    benign = [f"how do i bake cake {w}" for w in VOCAB] + [f"what is chess {w}" for w in VOCAB]
    harmful = [f"make bomb {w}" for w in VOCAB] + [f"kill my wife {w}" for w in VOCAB]
    pool = [PromptSet("pb", "benign", benign), PromptSet("ph", "harmful", harmful)]
    evals = [
        PromptSet("eb", "benign", ["bake cake", "how do i bake cake you"]),
        PromptSet("eh", "harmful", ["make bomb at the"]),
    ]
    calls: list[int] = []
    exclude = [PromptSet("v", "benign", ["What is chess, you?"])]
    gate, report = fit_gate(
        lm,
        pool,
        evals,
        tmp_path,
        encoder=bag_encoder(calls),
        frame_max=6,
        progress=False,
        l2_grid=(1e-2,),
        pairs={"e": (("eb",), ("eh",))},
        exclude=exclude,
    )
    # "how do i bake cake you" is in the pool verbatim; the excluded (validation) prompt is removed too.
    assert report["removed"]["pb"] == 2 and "what is chess you" not in report["pool"]
    assert set(report["pool"]) == {"pb", "ph", "framed-benign", "framed-harmful"}
    assert report["pool"]["framed-harmful"] == {"kind": "harmful", "n": 6}
    assert report["pool"]["pb"]["n"] == len(benign) - 2
    assert set(report["eval"]["sets"]) == {"eb", "eh"} and "e" in report["eval"]["auroc"]
    # The search and its forward passes cover the first 70% of the blocks (2 of 3), no more.
    assert report["searched_layers"] == 2 and {row["layer"] for row in report["search"]} == {0, 1}
    assert 0 <= gate.layer < 2 and gate.weight.shape == (32,) and gate.directions.shape == (2, 32)
    # A rerun reads every activation from the cache: no forward pass at all.
    gate_mod_forward = gate_mod.prompt_states
    try:
        gate_mod.prompt_states = lambda *a: (_ for _ in ()).throw(AssertionError("forward pass on a cached rerun"))
        again, _ = fit_gate(
            lm,
            pool,
            evals,
            tmp_path,
            encoder=bag_encoder(),
            frame_max=6,
            progress=False,
            l2_grid=(1e-2,),
            exclude=exclude,
        )
    finally:
        gate_mod.prompt_states = gate_mod_forward
    assert torch.equal(again.weight, gate.weight) and again.threshold == gate.threshold


def test_a_pool_without_both_kinds_in_a_split_is_a_clear_error():
    acts = torch.randn(6, 2, 4)
    harmful = torch.tensor([True, False, True, False, True, False])
    with pytest.raises(ValueError, match="pool is too small"):
        train_gate(acts, harmful, ["h", "b"] * 3, [f"g{i}" for i in range(6)], val_fraction=0.01)


def test_tpr_at_fpr_hand_values():
    from els.training.gate import tpr_at_fpr

    neg = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.9])
    pos = torch.tensor([0.5, 0.8, 0.95])
    assert tpr_at_fpr(pos, neg, 0.0) == pytest.approx(1 / 3)  # above every benign score: only 0.95
    assert tpr_at_fpr(pos, neg, 0.2) == 1.0  # 0.9 may be flagged: threshold 0.5 then flags 1 of 5 benign


def _interrupt_forward_at(call: int, monkeypatch) -> list[int]:
    """Make the gate's forward pass raise KeyboardInterrupt on its `call`-th call (once); returns the list of
    batch sizes it is called with, which the test may clear."""
    real, calls, fail = gate_mod.prompt_states, [], [call]

    def interrupted(lm_, texts, layers=None):
        calls.append(len(texts))
        if len(calls) in fail:
            fail.clear()
            raise KeyboardInterrupt
        return real(lm_, texts, layers)

    monkeypatch.setattr(gate_mod, "prompt_states", interrupted)
    return calls


def test_els_gate_writes_the_gate_and_its_report(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from els.cli import app

    saved_tiny_model(tmp_path)
    monkeypatch.setattr(gate_mod, "cached_encoder", lambda cache: bag_encoder())  # no sentence encoder to load
    files = {}
    for name, prompts in (
        ("pb", [f"how do i bake cake {w}" for w in VOCAB]),
        ("ph", [f"make bomb {w}" for w in VOCAB]),
        ("eb", ["bake cake"]),
        ("eh", ["make bomb at the"]),
    ):
        files[name] = tmp_path / f"{name}.csv"
        files[name].write_text("prompt\n" + "".join(f"{p}\n" for p in prompts))
    result = CliRunner().invoke(
        app,
        [
            "gate",
            "--model",
            str(tmp_path / "model"),
            "--out",
            str(tmp_path / "gate"),
            "--cache",
            str(tmp_path / "c"),
            "--harm-data",
            f"benign={files['pb']}:prompt,harmful={files['ph']}:prompt",
            "--eval",
            f"benign={files['eb']}:prompt,harmful={files['eh']}:prompt",
            "--exclude",
            "",
            "--alpaca-heldout",
            "0",
            "--frame-max",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert set(report) >= {"pool", "removed", "gate", "search", "eval", "seconds", "spot_checks"}
    assert set(report["spot_checks"]) == set(gate_mod.SPOT_CHECKS) and report["search"]
    gate = HarmGate.from_tensors(load_file(tmp_path / "gate" / "gate.safetensors"))
    assert gate.layer == report["gate"]["layer"] and gate.threshold == pytest.approx(report["gate"]["threshold"])
    printed = json.loads(result.output[result.output.index("\n{\n") :])  # after the progress lines
    assert printed == {k: v for k, v in report.items() if k != "search"}


def test_the_default_pool_against_default_sets_uses_the_shipped_list_and_no_encoder(tmp_path, monkeypatch):
    def no_encoder(cache_dir):
        raise AssertionError("the shipped list covers this dedupe: no embeddings")

    monkeypatch.setattr(gate_mod, "cached_encoder", no_encoder)  # the name fit_gate calls
    lm = tiny_model("qwen2")
    pool = [
        PromptSet("els-benign", "benign", [f"how do i bake cake {w}" for w in VOCAB] + ["what is chess"]),
        PromptSet("els-harmful", "harmful", [f"make bomb {w}" for w in VOCAB]),
    ]
    exclude = [PromptSet("orbench-hard@val", "benign", ["What is chess?"])]
    assert pool_mod.shipped_covers(pool, exclude)
    _, report = fit_gate(lm, pool, [], tmp_path, exclude=exclude, frame_max=4, progress=False, l2_grid=(1e-2,))
    assert report["removed"]["els-benign"] == 1  # the exact copy still goes
    renamed = [PromptSet("mine", "benign", pool[0].prompts), pool[1]]
    assert not pool_mod.shipped_covers(renamed, exclude) and not pool_mod.shipped_covers(pool, [pool[0]])
    with pytest.raises(AssertionError, match="no embeddings"):
        fit_gate(lm, renamed, [], tmp_path, exclude=exclude, frame_max=4, progress=False, l2_grid=(1e-2,))
