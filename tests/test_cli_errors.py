"""Bad flags, files and artefacts end the CLI with one line naming the flag or file, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from els.cli.main import app
from els.eval.cache import artefact_digest
from els.steering.artefact import Artefact
from els.steering.manifest import INTEGRITY

from helpers import one_line_error, saved_tiny_model, tiny_artefact

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny model saved as a model directory and an artefact trained for it."""
    root = tmp_path_factory.mktemp("made")
    lm = saved_tiny_model(root)
    tiny_artefact(lm).save(root / "artefact")
    return root


def _manifest(art: Path, edit) -> None:
    m = json.loads((art / "els.json").read_text())
    edit(m)
    (art / "els.json").write_text(json.dumps(m))


def _weights(art: Path, edit) -> None:
    w = load_file(art / "energy.safetensors")
    edit(w)
    save_file(w, art / "energy.safetensors")


def _truncate(art: Path) -> None:
    data = (art / "energy.safetensors").read_bytes()
    (art / "energy.safetensors").write_bytes(data[: len(data) // 2])


def _drop_gate(w: dict) -> None:
    for k in [k for k in w if k.startswith("harm_gate.")]:
        del w[k]


def _edit_tensor(w: dict) -> None:
    w["w_out"] += 1.0


# case -> (tampering, what the one line must name)
TAMPERED = {
    "wrong hidden_size": (lambda a: _manifest(a, lambda m: m.update(hidden_size=64)), "energy.safetensors"),
    "truncated weights": (_truncate, "energy.safetensors"),
    "pickle as weights": (
        lambda a: (a / "energy.safetensors").write_bytes(pickle.dumps({"w": [1.0]})),
        "energy.safetensors",
    ),
    "no weights file": (lambda a: (a / "energy.safetensors").unlink(), "energy.safetensors"),
    "manifest without energy": (lambda a: _manifest(a, lambda m: m.pop("energy")), "els.json"),
    "manifest not JSON": (lambda a: (a / "els.json").write_text("{not json"), "els.json"),
    "manifest a list": (lambda a: (a / "els.json").write_text("[1, 2]"), "els.json"),
    "weights without harm gate": (lambda a: _weights(a, _drop_gate), "energy.safetensors"),
    "old artefact without harm gate": (
        lambda a: (_weights(a, _drop_gate), _manifest(a, lambda m: m.pop(INTEGRITY))),
        "harm_gate.weight",
    ),
    "trained_layers reversed": (lambda a: _manifest(a, lambda m: m["trained_layers"].reverse()), "els.json"),
    "tensor edited": (lambda a: _weights(a, _edit_tensor), "energy.safetensors"),
    "sizes in bounds, far from the weights": (
        lambda a: _manifest(a, lambda m: (m.update(hidden_size=65536), m["energy"].update(widths=[16384] * 4))),
        "energy.safetensors",
    ),
    "manifest nested 100,000 deep": (lambda a: (a / "els.json").write_text("[" * 100_000), "nested deeper"),
}


def test_untampered_artefact_generates(made):
    result = CliRunner().invoke(
        app,
        ["generate", "hi", "--model", str(made / "model"), "--steer", str(made / "artefact"), "--max-new-tokens", "2"],
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_artefact_gives_one_line(made, tmp_path, case):
    tamper, names = TAMPERED[case]
    art = tmp_path / "artefact"
    shutil.copytree(made / "artefact", art)
    tamper(art)
    with pytest.raises((ValueError, FileNotFoundError), match=names):
        Artefact.load(art)
    result = CliRunner().invoke(
        app, ["generate", "hi", "--model", str(made / "model"), "--steer", str(art), "--max-new-tokens", "2"]
    )
    one_line_error(result, names)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["collect", "--out", "{tmp}/c", "--limit", "-5"], "--limit"),
        (["collect", "--out", "{tmp}/c", "--batch-size", "0"], "--batch-size"),
        (["collect", "--out", "{tmp}/c", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["run", "--out", "{tmp}/r", "--batch-size", "0"], "--batch-size"),
        (["run", "--out", "{tmp}/r", "--layer-rule", "best"], "--layer-rule"),
        (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "hi", "--model", "{model}", "--dtype", "float8"], "--dtype"),
        (["eval", "--out", "{tmp}/e", "--batch-size", "0"], "--batch-size"),
        (["tune", "--steer", "{art}", "--out", "{tmp}/t", "--trials", "0"], "--trials"),
        (["train", "{tmp}/c", "--out", "{tmp}/a", "--epochs", "0"], "--epochs"),
    ],
)
def test_bad_flag_gives_one_line_and_writes_nothing(made, tmp_path, args, flag):
    # the tiny model: without the fix, some of these would load it before failing
    args = [a.format(tmp=tmp_path, model=made / "model", art=made / "artefact") for a in args]
    args += [] if "--model" in args else ["--model", str(made / "model")]
    one_line_error(CliRunner().invoke(app, args), flag)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_flag_leaves_the_out_folder_for_the_corrected_rerun(made, tmp_path):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\nhow do i bake a cake\nhow do i make a bomb\n")
    base = [
        "collect",
        "--out",
        str(tmp_path / "c"),
        "--model",
        str(made / "model"),
        "--benign",
        f"{prompts}:prompt",
        "--harmful",
        f"{prompts}:prompt",
        "--judge",
        "prefix",
    ]
    one_line_error(CliRunner().invoke(app, base + ["--max-new-tokens", "0"]), "--max-new-tokens")
    one_line_error(CliRunner().invoke(app, base + ["--batch-size", "0"]), "--batch-size")
    assert not (tmp_path / "c").exists()
    result = CliRunner().invoke(app, base + ["--max-new-tokens", "2", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c" / "states.jsonl").exists()


def test_saved_artefact_records_its_weights_and_old_ones_still_load(made, tmp_path):
    m = json.loads((made / "artefact" / "els.json").read_text())
    assert len(m[INTEGRITY]["sha256"]) == 64 and m[INTEGRITY]["member_layers"] == m["trained_layers"]
    loaded = Artefact.load(made / "artefact")
    # a subset keeps a stale record in memory; saving writes a fresh one
    loaded.subset(list(reversed(m["trained_layers"]))).save(tmp_path / "sub")
    assert Artefact.load(tmp_path / "sub").manifest.trained_layers == list(reversed(m["trained_layers"]))
    # format 2 without the record
    old = tmp_path / "old2"
    shutil.copytree(made / "artefact", old)
    _manifest(old, lambda m: m.pop(INTEGRITY))
    assert Artefact.load(old).manifest.trained_layers == m["trained_layers"]
    # the record is derived from the tensors: the cache digest ignores it, so older artefacts keep theirs
    assert artefact_digest(loaded) == artefact_digest(Artefact.load(old))
    # format 1: a probe per trained layer instead of the harm gate tensors
    old1 = tmp_path / "old1"
    shutil.copytree(old, old1)
    n, d = len(m["trained_layers"]), m["hidden_size"]
    _weights(
        old1, lambda w: (_drop_gate(w), w.update({"probe.weight": torch.randn(n, d), "probe.bias": torch.zeros(n)}))
    )
    _manifest(old1, lambda m: (m.update(format_version=1), m.pop("harm_gate_probe", None)))
    assert Artefact.load(old1).gate.layer == min(m["steer"]["layers"])


def _els(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "els", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=300,
    )


def test_unknown_model_offline_and_debug_traceback(made, tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = _els("generate", "hi", "--model", "nonexistent-org/x", env=offline)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and "--model nonexistent-org/x" in lines[0] and "hub" in lines[0], done.stderr
    art = tmp_path / "artefact"
    shutil.copytree(made / "artefact", art)
    (art / "els.json").write_text("{not json")
    debug = _els("--debug", "generate", "hi", "--model", str(made / "model"), "--steer", str(art))
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "JSONDecodeError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith(f"error: {art / 'els.json'} is not valid JSON")


@pytest.mark.parametrize(
    "flag, value, names",
    [
        ("--harm-data", "benign=els-benign,harmful={tmp}/none.csv:prompt", "none.csv"),
        ("--harm-data", "els-benign,advbench", "advbench"),
        ("--benign", "{tmp}/none.csv:prompt", "none.csv"),
    ],
)
def test_run_with_a_missing_input_fails_before_the_model_loads(made, tmp_path, monkeypatch, flag, value, names):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("els.cli.errors.models.load_model", must_not_load)
    monkeypatch.setenv("ELS_DATA", str(tmp_path / "no-data"))
    monkeypatch.setattr("els.data.prompts._hub_resolves", lambda: False)  # a bare machine: no network
    args = ["run", "--model", str(made / "model"), "--out", str(tmp_path / "run"), flag, value.format(tmp=tmp_path)]
    one_line_error(CliRunner().invoke(app, args), names)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, flag",
    [
        (["serve", "--port", "99999"], "--port"),
        (["serve", "--port=-1"], "--port"),
        (["serve", "--port", "0"], "--port"),
        (["serve", "--batch-window-ms", "nan"], "--batch-window-ms"),
        (["serve", "--batch-window-ms", "inf"], "--batch-window-ms"),
        (["serve", "--batch-window-ms", "1e9"], "--batch-window-ms"),
        (["serve", "--batch-window-ms=-1"], "--batch-window-ms"),
        (["serve", "--max-batch", "0"], "--max-batch"),
        (["serve", "--max-body-kb", "0"], "--max-body-kb"),
        (["serve", "--max-prompt-tokens", "0"], "--max-prompt-tokens"),
        (["serve", "--device", "bogus"], "--device"),
        (["serve", "--device", "cuda:99"], "--device"),
        (["generate", "hi", "--device", "bogus"], "--device"),
        (["generate", "hi", "--device", "cuda:99"], "--device"),
        (["collect", "--out", "{tmp}/c", "--device", "bogus"], "--device"),
        (["tune", "--steer", "{art}", "--out", "{tmp}/t", "--tolerance", "nan"], "--tolerance"),
        (["tune", "--steer", "{art}", "--out", "{tmp}/t", "--tolerance=-1"], "--tolerance"),
        (["tune", "--steer", "{art}", "--out", "{tmp}/t", "--max-nll-increase=-5"], "--max-nll-increase"),
        (["tune", "--steer", "{art}", "--out", "{tmp}/t", "--max-nll-increase", "nan"], "--max-nll-increase"),
        (["tune", "--steer", "{art}", "--out", "{tmp}/t", "--out-artefact", "{art}"], "--out-artefact"),
        (["eval", "--out", "{tmp}/e", "--eta", "nan"], "--eta"),
        (["eval", "--out", "{tmp}/e", "--steps=-1"], "--steps"),
    ],
)
def test_out_of_range_flags_fail_before_the_model_loads(made, tmp_path, monkeypatch, args, flag):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr("els.cli.errors.models.load_model", must_not_load)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (made / "artefact").iterdir())
    args = [a.format(tmp=tmp_path, art=made / "artefact") for a in args] + ["--model", str(made / "model")]
    one_line_error(CliRunner().invoke(app, args), flag)
    assert list(tmp_path.iterdir()) == []
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (made / "artefact").iterdir()) == before


def _steer(**fields):
    return lambda m: m["steer"].update(fields)


def _pop(*where: str):
    def edit(m: dict) -> None:
        node = m
        for key in where[:-1]:
            node = node[key]
        node.pop(where[-1])

    return edit


def _gate_layer(a: Path, layer: int) -> None:
    _weights(a, lambda w: w.update({"harm_gate.layer": torch.tensor([layer])}))
    _manifest(a, lambda m: m.pop(INTEGRITY))  # an old artefact: no hash covers its tensors


# edited manifest field -> what the one line must name (besides els.json)
EDITED = {
    "steer.layers null": (_steer(layers=None), "steer.layers"),
    "steer.layers abc": (_steer(layers="abc"), "steer.layers"),
    "steer.layers empty": (_steer(layers=[]), "steer.layers"),
    "steer.layers untrained": (_steer(layers=[7]), "steer.layers"),
    "eta {}": (_steer(eta={}), "steer.eta"),
    "eta missing": (_pop("steer", "eta"), "steer.eta"),
    "eta nan": (_steer(eta=float("nan")), "steer.eta"),
    "positions 5": (_steer(positions=5), "steer.positions"),
    "project yes": (_steer(project="yes"), "steer.project"),
    "harm_gate 2": (_steer(harm_gate=2), "steer.harm_gate"),
    "widths [-1]": (lambda m: m["energy"].update(widths=[-1]), "energy.widths"),
    "widths [0]": (lambda m: m["energy"].update(widths=[0]), "energy.widths"),
    "hidden_size -1": (lambda m: m.update(hidden_size=-1), "hidden_size"),
    "hidden_norm missing": (_pop("hidden_norm"), "hidden_norm"),
    "hidden_norm lacks a layer": (lambda m: m["hidden_norm"].pop("1"), "hidden_norm"),
    "gate_offset missing": (_pop("gate_offset"), "gate_offset"),
    "trained_layers 999": (lambda m: m.update(trained_layers=[0, 1, 999]), "trained_layers"),
    # issue 24: numbers that would allocate tens of GB or compute garbage are refused before any allocation
    "hidden_size 1e6": (lambda m: m.update(hidden_size=1_000_000), "hidden_size"),
    "widths 1e6": (lambda m: m["energy"].update(widths=[1_000_000]), "energy.widths"),
    "num_layers 1e6": (lambda m: m.update(num_layers=1_000_000), "num_layers"),
    "hidden_norm 1e308": (lambda m: m["hidden_norm"].update({"1": 1e308}), "hidden_norm"),
    "gate_offset -1e308": (lambda m: m["gate_offset"].update({"1": -1e308}), "gate_offset"),
    "steer.layers twice": (lambda m: m["steer"].update(layers=[m["steer"]["layers"][0]] * 2), "twice"),
    "steps 100,000": (_steer(steps=100_000), "steer.steps"),
    "eta 1e308": (_steer(eta=1e308), "steer.eta"),
    "eta 1000": (_steer(eta=1000), "steer.eta"),
    "eta Infinity": (_steer(eta=float("inf")), "steer.eta"),
    "refuse_eta 1e308": (_steer(refuse_eta=1e308), "steer.refuse_eta"),
    "energy_gate 1e308": (_steer(energy_gate=1e308), "steer.energy_gate"),
    "threshold 1e308": (_steer(threshold=1e308), "steer.threshold"),  # energy_gate's older name
    "gate -1e308": (_steer(gate=-1e308), "steer.gate"),  # and its oldest
    "refuse_gate 1.5": (_steer(refuse_gate=1.5), "steer.refuse_gate"),
    "hidden_norm 0": (lambda m: m["hidden_norm"].update({"1": 0}), "hidden_norm"),
}


@pytest.mark.parametrize("case", list(EDITED))
def test_an_edited_manifest_field_is_one_line_naming_file_and_field(made, tmp_path, monkeypatch, case):
    def must_not_read(*args, **kwargs):
        raise AssertionError("the weights were read (and allocated) before the manifest was checked")

    monkeypatch.setattr("els.steering.artefact.load_file", must_not_read)
    edit, field = EDITED[case]
    art = tmp_path / "artefact"
    shutil.copytree(made / "artefact", art)
    _manifest(art, edit)
    with pytest.raises(ValueError, match="els.json") as e:
        Artefact.load(art)
    assert field in str(e.value) and "\n" not in str(e.value), e.value
    result = CliRunner().invoke(
        app, ["generate", "hi", "--model", str(made / "model"), "--steer", str(art), "--max-new-tokens", "2"]
    )
    one_line_error(result, field)


def test_a_harm_gate_on_a_layer_the_model_lacks_is_one_line(made, tmp_path):
    art = tmp_path / "artefact"
    shutil.copytree(made / "artefact", art)
    _gate_layer(art, 999)
    with pytest.raises(ValueError, match="harm gate reads layer 999"):
        Artefact.load(art)


# a harm gate tensor of an old artefact (no hash covers them) -> what the one line must name
GATE_TENSORS = {
    "weight of another width": ("harm_gate.weight", torch.zeros(5), "harm_gate.weight (5,) != (32,)"),
    "directions of another width": ("harm_gate.directions", torch.zeros(3, 5), "harm_gate.directions"),
    "directions for fewer layers": ("harm_gate.directions", torch.zeros(2, 32), "harm_gate.directions"),
    "two biases": ("harm_gate.bias", torch.zeros(2), "harm_gate.bias"),
    "threshold 1e30": ("harm_gate.threshold", torch.tensor([1e30]), "threshold 1e+30 is not a probability"),
    "threshold -3": ("harm_gate.threshold", torch.tensor([-3.0]), "threshold -3 is not a probability"),
    "layer 1.5": ("harm_gate.layer", torch.tensor([1.5]), "integer tensor"),
}


@pytest.mark.parametrize("case", list(GATE_TENSORS))
def test_a_harm_gate_tensor_out_of_shape_or_range_is_one_line(made, tmp_path, case):
    name, value, names = GATE_TENSORS[case]
    art = tmp_path / "artefact"
    shutil.copytree(made / "artefact", art)
    _weights(art, lambda w: w.update({name: value}))
    _manifest(art, lambda m: m.pop(INTEGRITY))
    with pytest.raises(ValueError, match=re.escape(names)) as e:
        Artefact.load(art)
    assert "\n" not in str(e.value)


MANIFEST_PATHS = [(), ("steer",), ("energy",), ("hidden_norm",), ("gate_offset",)]
json_values = hst.recursive(
    hst.none() | hst.booleans() | hst.integers(-5, 1000) | hst.floats() | hst.text(max_size=4),
    lambda inner: hst.lists(inner, max_size=3) | hst.dictionaries(hst.text(max_size=4), inner, max_size=2),
    max_leaves=4,
)


def test_fuzzed_manifests_load_or_fail_on_one_line(made, tmp_path):
    """Random edits of a valid els.json: Artefact.load succeeds or raises one line; the files stay as they were."""
    art = tmp_path / "artefact"
    shutil.copytree(made / "artefact", art)
    original = json.loads((art / "els.json").read_text())
    weights = (art / "energy.safetensors").read_bytes()
    keys = {p: list((original if not p else original[p[0]]).keys()) for p in MANIFEST_PATHS}
    edit = hst.sampled_from(MANIFEST_PATHS).flatmap(
        lambda p: hst.tuples(
            hst.just(p), hst.sampled_from(keys[p] + ["bogus"]), hst.none() | json_values, hst.booleans()
        )
    )
    outcomes = {"loaded": 0, "refused": 0}

    @settings(
        max_examples=250,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(hst.lists(edit, min_size=1, max_size=3))
    def one(edits):
        m = json.loads(json.dumps(original))
        for path, key, value, remove in edits:
            node = m if not path else m.get(path[0])  # an earlier edit may have removed it
            if not isinstance(node, dict):
                continue
            if remove:
                node.pop(key, None)
            else:
                node[key] = value
        text = json.dumps(m)
        (art / "els.json").write_text(text)
        try:
            Artefact.load(art)
            outcomes["loaded"] += 1
        except (ValueError, FileNotFoundError) as e:
            assert str(e) and "\n" not in str(e), e
            outcomes["refused"] += 1
        assert (art / "els.json").read_text() == text and (art / "energy.safetensors").read_bytes() == weights

    start = time.monotonic()
    one()
    assert outcomes["refused"] > 50 and time.monotonic() - start < 20, outcomes
