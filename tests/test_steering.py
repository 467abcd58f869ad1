import json

import pytest
import torch

from els.core.generation import generate_batch
from els.core.hooks import record_last_token
from els.core.models import chat_texts, decoder_blocks, user_conversations
from els.core.stats import stratified_split
from els.steering.artefact import Artefact
from els.steering.energy import STATES
from els.steering.settings import ALIASES, FIELDS, SteerSettings
from els.steering.steering import descend_rows, steer
from els.training.energy import TrainConfig, train_energy
from els.training.recipe import make_artefact

from helpers import FAMILIES, synthetic_collection, tiny_artefact, tiny_model

PROMPTS = ["how do i kill a python process ?", "what is chess", "how do i make bomb", "bake cake"]


def _texts(lm, prompts=PROMPTS):
    return chat_texts(lm.tokenizer, user_conversations(prompts))


def test_blocks_found_and_recorded(tiny):
    blocks = decoder_blocks(tiny.model)
    assert len(blocks) == 3
    enc = tiny.tokenizer(_texts(tiny), return_tensors="pt", padding=True, add_special_tokens=False)
    with record_last_token(blocks) as captured, torch.no_grad():
        out = tiny.model(**enc, output_hidden_states=True)
    acts = torch.stack(captured, 1)
    assert acts.shape == (len(PROMPTS), 3, 32) and acts.dtype == torch.float32
    if tiny.model.config.model_type != "gpt2":  # hidden_states[l] is block l's input in these families
        for layer in range(3):
            assert torch.allclose(acts[:, layer], out.hidden_states[layer][:, -1], atol=1e-5)


def test_steering_changes_only_the_last_position_and_lowers_energy(tiny):
    art = tiny_artefact(tiny)
    enc = tiny.tokenizer(_texts(tiny), return_tensors="pt", padding=True, add_special_tokens=False)
    layer = min(art.layers)  # no steered layer before it, so its input is the unsteered model's
    with record_last_token(decoder_blocks(tiny.model)) as base_caps, torch.no_grad():
        base = tiny.model(**enc).logits
    with steer(tiny.model, art) as s, torch.no_grad():
        steered = tiny.model(**enc).logits
    assert torch.allclose(base[:, :-1], steered[:, :-1], atol=1e-5)  # earlier positions untouched
    assert not torch.allclose(base[:, -1], steered[:, -1])
    rep = s.report()[layer]
    # The energy steering started from is the energy of the unsteered residual at the last position...
    energy = art.energy.member(art.member_index(layer))
    assert torch.allclose(torch.tensor(rep["energy_before"]), energy(base_caps[layer]).float(), atol=1e-4)
    # ... and every row ended lower, after all K steps.
    assert all(a < b for a, b in zip(rep["energy_after"], rep["energy_before"]))
    assert rep["steps_taken"] == len(PROMPTS) * art.manifest.steer.steps


def test_each_step_moves_by_eta_times_norm():
    lm = tiny_model("qwen2")
    art = tiny_artefact(lm, steps=1, eta=0.1)
    layer = art.layers[0]
    energy = art.energy.member(art.member_index(layer))
    h = torch.randn(5, 32)
    x, *_ = descend_rows(energy, h, torch.full((5,), 0.1 * 2.0), torch.ones(5, dtype=torch.long), 1)
    assert torch.allclose((x - h).norm(dim=-1), torch.full((5,), 0.2), atol=1e-5)


def test_kv_cache_generation_steers_every_token():
    lm = tiny_model("llama")
    art = tiny_artefact(lm)
    with steer(lm.model, art) as s:
        generate_batch(lm, _texts(lm)[:1], max_new_tokens=5)
    # one prefill call and four decode calls per layer, K steps each
    assert s.report()[art.layers[0]]["steps_taken"] == 5 * art.manifest.steer.steps


def test_prompt_positions_steer_the_prefill_only():
    lm = tiny_model("llama")
    art = tiny_artefact(lm, eta=2.0)
    texts = _texts(lm)[:2]
    with steer(lm.model, art, positions="prompt") as s:
        prompt_only = generate_batch(lm, texts, max_new_tokens=5).texts
    assert s.report()[art.layers[0]]["steps_taken"] == 2 * art.manifest.steer.steps  # the prefill's only
    with steer(lm.model, art):  # the same prefill: the first token agrees
        first = generate_batch(lm, texts, max_new_tokens=1).texts
    assert all(a.startswith(f) for a, f in zip(prompt_only, first))


def test_per_row_positions_match_separate_runs():
    lm = tiny_model("qwen2")
    art = tiny_artefact(lm, eta=2.0)
    texts = _texts(lm)[:2]
    rows = [art.settings.override(positions="last"), art.settings.override(positions="prompt")]
    with steer(lm.model, art, rows) as mixed:
        both = generate_batch(lm, texts, max_new_tokens=6).texts
    with steer(lm.model, art, positions="last"):
        row0 = generate_batch(lm, texts[:1], max_new_tokens=6).texts
    with steer(lm.model, art, positions="prompt"):
        row1 = generate_batch(lm, texts[1:], max_new_tokens=6).texts
    assert both == row0 + row1
    taken = mixed.stats[art.layers[0]].rows_taken.tolist()
    assert taken[1] == art.manifest.steer.steps and taken[0] > taken[1]
    with pytest.raises(ValueError, match="positions"):
        steer(lm.model, art, positions="first")


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_single_rows(family):
    lm = tiny_model(family)
    art = tiny_artefact(lm)
    texts = _texts(lm)
    with steer(lm.model, art):
        batched = generate_batch(lm, texts, max_new_tokens=6).texts
        single = [generate_batch(lm, [t], max_new_tokens=6).texts[0] for t in texts]
    assert batched == single


def test_steered_generation_differs_and_is_deterministic():
    lm = tiny_model("qwen2")
    art = tiny_artefact(lm, eta=2.0)
    texts = _texts(lm)
    base = generate_batch(lm, texts, max_new_tokens=8).texts
    with steer(lm.model, art):
        first = generate_batch(lm, texts, max_new_tokens=8).texts
    with steer(lm.model, art):
        second = generate_batch(lm, texts, max_new_tokens=8).texts
    assert first == second
    assert first != base


def test_hooks_removed_after_exception(tiny):
    art = tiny_artefact(tiny)
    blocks = decoder_blocks(tiny.model)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny.model, art):
            assert any(b._forward_pre_hooks for b in blocks)
            raise RuntimeError("boom")
    assert not any(b._forward_pre_hooks for b in blocks)


def test_gate_skips_rows_below_threshold():
    lm = tiny_model("qwen2")
    art = tiny_artefact(lm)
    enc = lm.tokenizer(_texts(lm), return_tensors="pt", padding=True, add_special_tokens=False)
    with steer(lm.model, art, energy_gate=1e6) as closed, torch.no_grad():
        gated = lm.model(**enc).logits
    base = lm.model(**enc).logits
    assert torch.allclose(gated, base)
    rep = closed.report()
    assert all(r["steps_taken"] == 0 and r["steps_skipped"] > 0 for r in rep.values())
    with steer(lm.model, art, energy_gate=-1e6) as opened, torch.no_grad():
        lm.model(**enc)
    assert all(r["steps_skipped"] == 0 for r in opened.report().values())


def test_per_row_settings_match_separate_runs():
    lm = tiny_model("qwen2")
    art = tiny_artefact(lm)
    texts = _texts(lm)[:2]
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with (
        steer(lm.model, art, [art.settings.override(eta=0.0), art.settings.override(eta=1.0, steps=2)]),
        torch.no_grad(),
    ):
        mixed = lm.model(**enc).logits[:, -1]
    with steer(lm.model, art, eta=0.0), torch.no_grad():
        row0 = lm.model(**enc).logits[0, -1]
    with steer(lm.model, art, eta=1.0, steps=2), torch.no_grad():
        row1 = lm.model(**enc).logits[1, -1]
    assert torch.allclose(mixed[0], row0, atol=1e-5) and torch.allclose(mixed[1], row1, atol=1e-5)


def test_bad_settings_are_refused():
    lm = tiny_model("qwen2")
    art = tiny_artefact(lm)
    with pytest.raises(ValueError, match="eta"):
        steer(lm.model, art, eta=float("nan"))
    with pytest.raises(ValueError, match="steps"):
        steer(lm.model, art, steps=-1)
    with pytest.raises(ValueError, match="layer 7"):
        steer(lm.model, art, layers=[7]).attach()


def test_artefact_roundtrip_and_mismatch(tmp_path):
    lm = tiny_model("qwen2")
    art = tiny_artefact(lm)
    art.save(tmp_path / "a")
    assert not list(tmp_path.glob(".a.*"))  # no temporary left behind
    loaded = Artefact.load(tmp_path / "a")
    assert loaded.manifest_json() == (tmp_path / "a" / "els.json").read_text()  # written back byte for byte
    h = torch.randn(3, 4, 32)
    assert torch.allclose(loaded.energy(h), art.energy.eval()(h))
    # No pickle: the weights are a safetensors file (8-byte header length, then a JSON header) ...
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["els.json", "energy.safetensors"]
    raw = (tmp_path / "a" / "energy.safetensors").read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and json.loads(raw[8 : 8 + header])
    # ... and a pickle under that name is refused, not unpickled.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "els.json").write_bytes((tmp_path / "a" / "els.json").read_bytes())
    torch.save(art.energy.state_dict(), pickled / "energy.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file .*deserializing header"):
        Artefact.load(pickled)
    with pytest.raises(ValueError, match="does not fit this model"):
        steer(tiny_model("llama").model, loaded)
    other = tiny_model("qwen2")
    other.model.config.hidden_size = 64
    with pytest.raises(ValueError, match="hidden size"):
        loaded.check_model(other.model)


def test_saving_an_artefact_replaces_only_its_own_files(tmp_path):
    """A folder holding other files (the issue's collection, a user's notes) keeps them through a save."""
    lm = tiny_model("qwen2")
    folder = tmp_path / "a"
    (folder / "sub").mkdir(parents=True)
    others = {"collect.json": "{}", "states.jsonl": "", "keep.txt": "mine", "sub/notes.md": "# notes"}
    for name, text in others.items():
        (folder / name).write_text(text)
    tiny_artefact(lm, eta=0.5).save(folder)
    tiny_artefact(lm, eta=0.2).save(folder)
    assert Artefact.load(folder).settings.eta == 0.2
    assert {name: (folder / name).read_text() for name in others} == others
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["els.json", "energy.safetensors", "collect.json", "states.jsonl", "keep.txt", "sub"]
    )


def test_artefact_with_nan_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    lm = tiny_model("qwen2")
    tiny_artefact(lm).save(tmp_path / "a")
    weights = load_file(tmp_path / "a" / "energy.safetensors")
    weights["w_out"][0, 0] = float("nan")
    save_file(weights, tmp_path / "a" / "energy.safetensors")
    with pytest.raises(ValueError, match="NaN"):
        Artefact.load(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="not an ELS artefact"):
        Artefact.load(tmp_path)


def test_steering_over_several_generate_calls_of_different_batch_sizes():
    from els.core.generation import generate

    lm = tiny_model("qwen2")
    art = tiny_artefact(lm)
    prompts = PROMPTS[:3]
    with steer(lm.model, art) as s:
        together = generate(lm, prompts, max_new_tokens=4, batch_size=2)  # batches of 2 then 1
    assert len(s.report()[art.layers[0]]["energy_before"]) == 1  # the last call's rows
    with steer(lm.model, art):
        alone = [generate(lm, [p], max_new_tokens=4)[0] for p in prompts]
    assert together == alone


def test_harm_gate_leaves_rows_the_probe_finds_harmful():
    lm = tiny_model("qwen2")
    art = tiny_artefact(lm)
    enc = lm.tokenizer(_texts(lm), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        base = lm.model(**enc).logits[:, -1]
    with steer(lm.model, art, harm_gate=0.0) as none, torch.no_grad():  # p < 0 never holds: nobody steered
        closed = lm.model(**enc).logits[:, -1]
    assert torch.allclose(closed, base) and all(r["steps_taken"] == 0 for r in none.report().values())
    with steer(lm.model, art, harm_gate=1.0) as everyone, torch.no_grad():
        opened = lm.model(**enc).logits[:, -1]
    assert not torch.allclose(opened, base) and all(r["steps_skipped"] == 0 for r in everyone.report().values())
    with pytest.raises(ValueError, match="harm_gate"):
        steer(lm.model, art, harm_gate=1.5)


def test_harm_probe_learns_the_harmful_direction():
    from els.training.energy import fit_harm_probe

    g = torch.Generator().manual_seed(0)
    harmful = torch.arange(200) % 2 == 0
    acts = torch.randn(200, 2, 16, generator=g) * 3 + 5
    acts[:, 1, 3] += torch.where(harmful, 8.0, -8.0)
    w, b = fit_harm_probe(acts, harmful, list(range(150)))
    logits = torch.einsum("nsd,sd->sn", acts[150:], w) + b[:, None]
    acc = ((logits > 0) == harmful[150:]).float().mean(1)
    assert acc[1] > 0.95 and acc[0] < 0.8


def test_per_row_harm_gate():
    lm = tiny_model("qwen2")
    art = tiny_artefact(lm)
    enc = lm.tokenizer(_texts(lm)[:2], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        base = lm.model(**enc).logits[:, -1]
    with (
        steer(lm.model, art, [art.settings.override(harm_gate=0.0), art.settings.override(harm_gate=None)]),
        torch.no_grad(),
    ):
        mixed = lm.model(**enc).logits[:, -1]
    assert torch.allclose(mixed[0], base[0]) and not torch.allclose(mixed[1], base[1])
    with pytest.raises(ValueError, match="per-row settings have 3 rows for a batch of 2"), torch.no_grad():
        with steer(lm.model, art, [art.settings] * 3):
            lm.model(**enc)


def test_two_sided_flagged_rows_descend_the_safety_energy():
    """flagged="refuse": a flagged row takes the safety energy's steps (and lowers that energy), a passed row
    the compliance energy's; "leave" leaves the flagged row as base has it."""
    lm = tiny_model("qwen2")
    art = tiny_artefact(lm, eta=0.5, steps=2, refuse_eta=0.5)
    enc = lm.tokenizer(_texts(lm)[:2], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        base = lm.model(**enc).logits[:, -1]
    # row 0 flagged (p >= 0 always), row 1 passed (p < 1 + eps always)
    refuse = [
        art.settings.override(harm_gate=0.0, flagged="refuse", refuse_gate=None),  # every flagged row refuses
        art.settings.override(harm_gate=1.0),
    ]
    leave = [art.settings.override(harm_gate=0.0, flagged="leave"), art.settings.override(harm_gate=1.0)]
    with steer(lm.model, art, refuse) as two, torch.no_grad():
        two_sided = lm.model(**enc).logits[:, -1]
    with steer(lm.model, art, leave) as one, torch.no_grad():
        one_sided = lm.model(**enc).logits[:, -1]
    assert torch.allclose(one_sided[0], base[0]) and not torch.allclose(two_sided[0], base[0])
    assert torch.allclose(one_sided[1], two_sided[1])  # the passed row is steered the same either way
    assert [side for side, _ in two.sides()] == ["refuse", "answer"]
    assert [side for side, _ in one.sides()] == ["leave", "answer"]
    stats = two.stats[art.layers[0]]
    assert stats.rows_taken.tolist() == [2, 2] and float(stats.energy_after[0]) < float(stats.energy_before[0])
    # the flagged row's energies are the safety energy's
    safety = art.safety.member(art.member_index(art.layers[0]))
    h = lm.model(**enc, output_hidden_states=True).hidden_states[art.layers[0]][:, -1]
    assert float(stats.energy_before[0]) == pytest.approx(float(safety(h.float())[0]), abs=1e-4)


def test_refuse_gate_leaves_flagged_rows_below_it_and_refuses_those_above():
    """refuse_gate: a flagged row whose p(harmful) is under it generates as base does; at or over it, it
    descends the safety energy as with no refuse gate."""
    lm = tiny_model("qwen2")
    art = tiny_artefact(lm, eta=0.5, steps=2, refuse_eta=0.5)
    enc = lm.tokenizer(_texts(lm)[:2], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        base = lm.model(**enc).logits[:, -1]
    flagged = art.settings.override(harm_gate=0.0, flagged="refuse", refuse_gate=None)
    with steer(lm.model, art, [flagged, flagged]) as plain, torch.no_grad():
        refused = lm.model(**enc).logits[:, -1]
    p = [prob for _, prob in plain.sides()]
    cut = (p[0] + p[1]) / 2  # between the two rows' p(harmful): one row under it, one over
    low, high = (0, 1) if p[0] < p[1] else (1, 0)
    with steer(lm.model, art, [flagged.override(refuse_gate=cut)] * 2) as gated, torch.no_grad():
        out = lm.model(**enc).logits[:, -1]
    assert torch.allclose(out[low], base[low]) and torch.allclose(out[high], refused[high])
    assert [side for side, _ in gated.sides()][low] == "unsure" and [s for s, _ in gated.sides()][high] == "refuse"
    stats = gated.stats[art.layers[0]]
    assert int(stats.rows_taken[low]) == 0 and int(stats.rows_taken[high]) == 2


def test_refuse_needs_a_safety_energy():
    lm = tiny_model("qwen2")
    art = tiny_artefact(lm)
    old = Artefact(art.energy, art.manifest, art.gate)  # as written before two-sided steering
    with pytest.raises(ValueError, match="safety energy"):
        steer(lm.model, old, harm_gate=0.5, flagged="refuse")
    steer(lm.model, old, harm_gate=0.5, flagged="leave")  # the one-sided mode still works
    steer(lm.model, old, harm_gate=None, flagged="refuse")  # no gate: nothing is flagged


def test_settings_are_one_type_with_one_spelling_of_off():
    s = SteerSettings()
    assert s.override(harm_gate=None).harm_gate is None and s.override(eta=1.0).harm_gate == s.harm_gate
    assert s.override(threshold=0.3).energy_gate == 0.3  # the older name still reads
    assert s.override(refuse_gate=0.9).override(refuse_gate=None).refuse_gate is None
    with pytest.raises(ValueError, match="unknown steering setting 'bogus'"):
        s.override(bogus=1)
    for bad in (
        {"eta": float("inf")},
        {"eta": 5.0},
        {"steps": 33},
        {"steps": 1.5},
        {"harm_gate": 1.5},
        {"harmful": "ignore"},
        {"positions": "first"},
        {"refuse_eta": -1.0},
        {"refuse_gate": 1.5},
        {"project": 1},
    ):
        with pytest.raises(ValueError):
            s.override(**bad)
    old = {"layers": [1], "eta": 0.2, "steps": 2, "gate": 0.1, "harm_gate": 0.5}  # a format-1 steer section
    assert SteerSettings.from_manifest(old) == SteerSettings(
        eta=0.2,
        steps=2,
        energy_gate=0.1,
        harm_gate=0.5,
        flagged="leave",
        refuse_eta=0.2,
        refuse_gate=None,
        positions="last",
    )


# issue 24: values no real artefact holds (a step past the hidden norm, a gate past any energy, a probability
# above 1, a run past any time limit)
OUT_OF_BOUNDS = [
    ("steps", 100_000),
    ("steps", -1),
    ("eta", 1e308),
    ("eta", 1000.0),
    ("eta", float("nan")),
    ("refuse_eta", float("inf")),
    ("energy_gate", 1e308),
    ("threshold", -1e308),
    ("harm_gate", 1.5),
    ("refuse_gate", -0.1),
]


@pytest.mark.parametrize("name, value", OUT_OF_BOUNDS)
def test_a_setting_out_of_bounds_is_refused_on_every_surface(name, value):
    """By SteerSettings (the library, and the CLI's flags through it), an artefact's steer section and a server
    request's els field alike."""
    from pydantic import ValidationError

    from els.serve.protocol import ElsOptions
    from els.steering.manifest import SteerFields

    field = ALIASES.get(name, name)
    with pytest.raises(ValueError, match=field):
        SteerSettings().override(**{name: value})
    with pytest.raises(ValueError, match=field):
        SteerSettings.from_manifest({name: value})
    with pytest.raises(ValidationError, match=name):
        SteerFields.model_validate({"layers": [1], "eta": 0.5, "steps": 3} | {name: value})
    with pytest.raises(ValidationError, match=name):
        ElsOptions.model_validate({name: value})


def test_every_setting_has_one_name_on_every_surface():
    """A SteerSettings field is a CLI flag of every steering command, a request field and a manifest field."""
    from els.cli.options import STEER_OPTIONS
    from els.serve.protocol import ElsOptions
    from els.steering.manifest import SteerFields

    names = set(FIELDS)
    assert set(STEER_OPTIONS) == names
    assert names <= set(ElsOptions.model_fields) and names <= set(SteerFields.model_fields)


def test_artefact_records_contrast_layer_rule_and_positions(tmp_path):
    lm = tiny_model("qwen2")
    col = synthetic_collection(lm)
    cfg = TrainConfig(widths=(16,), epochs=3, lr=1e-3, batch_size=16, contrast="benign")
    result = train_energy(col.activations, col.states, cfg)
    settings = SteerSettings(eta=0.1, steps=2, energy_gate=None, harm_gate=0.5, flagged="leave", positions="prompt")
    art = make_artefact(result, col, cfg, settings, layer_rule="last", top_n=2)
    art.save(tmp_path / "a")
    loaded = Artefact.load(tmp_path / "a")
    m = json.loads((tmp_path / "a" / "els.json").read_text())
    assert m["steer"]["layers"] == [1, 2] and m["steer"]["positions"] == "prompt"
    assert m["steer"]["layer_rule"] == "last" and m["energy"]["contrast"] == "benign"
    assert loaded.settings == settings and "gate" not in m["steer"] and m["steer"]["energy_gate"] is None
    assert loaded.manifest.steer.layers == [1, 2] and loaded.manifest.steer.layer_rule == "last"
    # the harm probe is fitted and scored on both kinds, whatever rows the energy used: its validation split
    # is drawn over all four states, so it holds harmful and benign rows
    _, probe_val = stratified_split(col.states, cfg.val_fraction, cfg.seed, STATES)
    assert {col.records[i].kind for i in probe_val} == {"benign", "harmful"}
    assert set(m["probe_val_acc"]) == {"0", "1", "2"}
    shares = {round(k / len(probe_val), 4) for k in range(len(probe_val) + 1)}
    assert all(a in shares for a in m["probe_val_acc"].values())
    with steer(lm.model, art) as s:  # the manifest's positions apply: one step set per prompt, none per token
        generate_batch(lm, _texts(lm)[:1], max_new_tokens=4)
    assert s.report()[2]["steps_taken"] + s.report()[2]["steps_skipped"] == 2
    with pytest.raises(ValueError, match="layer rule"):
        make_artefact(result, col, cfg, settings, layer_rule="best")


def test_descend_rows_with_settings_gathered_by_row_id_equals_each_row_alone():
    """The hook-free step an engine with its own batching (vLLM) would call: per-request settings in a table,
    gathered by each row's request id, give every row what it gets when steered alone."""
    from els.steering.steering import descend_rows

    lm = tiny_model("llama")
    art = tiny_artefact(lm)
    energy = art.energy.member(art.member_index(art.layers[0]))
    eta_table, steps_table = torch.tensor([0.0, 0.3, 1.0]), torch.tensor([0, 2, 5])
    allowed_table = torch.tensor([True, True, False])
    row_ids = torch.tensor([2, 0, 1, 1, 2])  # continuous batching: rows in any order, a request twice
    h = torch.randn(5, lm.model.config.hidden_size, dtype=torch.float64).float()
    x, before, after, taken, skipped = descend_rows(
        energy, h, eta_table[row_ids], steps_table[row_ids], 5, allowed=allowed_table[row_ids]
    )
    for i, r in enumerate(row_ids.tolist()):
        alone, *_ = descend_rows(
            energy, h[i : i + 1], eta_table[r : r + 1], steps_table[r : r + 1], 5, allowed=allowed_table[r : r + 1]
        )
        torch.testing.assert_close(x[i : i + 1], alone, rtol=1e-5, atol=1e-6)
    assert taken.tolist() == [0, 0, 2, 2, 0] and skipped.tolist() == [5, 0, 0, 0, 5]
    assert torch.equal(x[[0, 1, 4]], h[[0, 1, 4]])  # eta 0 or gated off: unchanged
    assert bool((after[2:4] < before[2:4]).all())  # stepped rows went down the energy
