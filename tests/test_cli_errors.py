"""Bad flags, files and artefacts end the CLI with one line naming the flag or file, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from els.cli.main import app
from els.eval.cache import artefact_digest
from els.steering.artefact import INTEGRITY, Artefact

from helpers import tiny_artefact, tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny model saved as a model directory and an artefact trained for it."""
    root = tmp_path_factory.mktemp("made")
    lm = tiny_model("qwen2")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
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
    "pickle as weights": (lambda a: (a / "energy.safetensors").write_bytes(pickle.dumps({"w": [1.0]})),
                          "energy.safetensors"),
    "no weights file": (lambda a: (a / "energy.safetensors").unlink(), "energy.safetensors"),
    "manifest without energy": (lambda a: _manifest(a, lambda m: m.pop("energy")), "els.json"),
    "manifest not JSON": (lambda a: (a / "els.json").write_text("{not json"), "els.json"),
    "manifest a list": (lambda a: (a / "els.json").write_text("[1, 2]"), "els.json"),
    "weights without harm gate": (lambda a: _weights(a, _drop_gate), "energy.safetensors"),
    "old artefact without harm gate": (lambda a: (_weights(a, _drop_gate),
                                                  _manifest(a, lambda m: m.pop(INTEGRITY))), "harm_gate.weight"),
    "trained_layers reversed": (lambda a: _manifest(a, lambda m: m["trained_layers"].reverse()), "els.json"),
    "tensor edited": (lambda a: _weights(a, _edit_tensor), "energy.safetensors"),
}


def _one_line_error(result, names: str) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, RuntimeError))
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], result.output
    return lines[0]


def test_untampered_artefact_generates(made):
    result = CliRunner().invoke(app, ["generate", "hi", "--model", str(made / "model"), "--steer",
                                      str(made / "artefact"), "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_artefact_gives_one_line(made, tmp_path, case):
    tamper, names = TAMPERED[case]
    art = tmp_path / "artefact"
    shutil.copytree(made / "artefact", art)
    tamper(art)
    with pytest.raises((ValueError, FileNotFoundError), match=names):
        Artefact.load(art)
    result = CliRunner().invoke(app, ["generate", "hi", "--model", str(made / "model"), "--steer", str(art),
                                      "--max-new-tokens", "2"])
    _one_line_error(result, names)


@pytest.mark.parametrize("args, flag", [
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
])
def test_bad_flag_gives_one_line_and_writes_nothing(made, tmp_path, args, flag):
    # the tiny model: without the fix, some of these would load it before failing
    args = [a.format(tmp=tmp_path, model=made / "model", art=made / "artefact") for a in args]
    args += [] if "--model" in args else ["--model", str(made / "model")]
    _one_line_error(CliRunner().invoke(app, args), flag)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_flag_leaves_the_out_folder_for_the_corrected_rerun(made, tmp_path):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\nhow do i bake a cake\nhow do i make a bomb\n")
    base = ["collect", "--out", str(tmp_path / "c"), "--model", str(made / "model"), "--benign", f"{prompts}:prompt",
            "--harmful", f"{prompts}:prompt", "--judge", "prefix"]
    _one_line_error(CliRunner().invoke(app, base + ["--max-new-tokens", "0"]), "--max-new-tokens")
    _one_line_error(CliRunner().invoke(app, base + ["--batch-size", "0"]), "--batch-size")
    assert not (tmp_path / "c").exists()
    result = CliRunner().invoke(app, base + ["--max-new-tokens", "2", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c" / "states.jsonl").exists()


def test_saved_artefact_records_its_weights_and_old_ones_still_load(made, tmp_path):
    m = json.loads((made / "artefact" / "els.json").read_text())
    assert len(m[INTEGRITY]["sha256"]) == 64 and m[INTEGRITY]["member_layers"] == m["trained_layers"]
    loaded = Artefact.load(made / "artefact")
    # the record is derived from the tensors: the cache digest ignores it, so older artefacts keep theirs
    assert artefact_digest(loaded) == artefact_digest(Artefact(loaded.energy, {k: v for k, v in m.items()
                                                                               if k != INTEGRITY}, loaded.gate))
    # a subset keeps a stale record in memory; saving writes a fresh one
    loaded.subset(list(reversed(m["trained_layers"]))).save(tmp_path / "sub")
    assert Artefact.load(tmp_path / "sub").manifest["trained_layers"] == list(reversed(m["trained_layers"]))
    # format 2 without the record
    old = tmp_path / "old2"
    shutil.copytree(made / "artefact", old)
    _manifest(old, lambda m: m.pop(INTEGRITY))
    assert Artefact.load(old).manifest["trained_layers"] == m["trained_layers"]
    # format 1: a probe per trained layer instead of the harm gate tensors
    old1 = tmp_path / "old1"
    shutil.copytree(old, old1)
    n, d = len(m["trained_layers"]), m["hidden_size"]
    _weights(old1, lambda w: (_drop_gate(w), w.update({"probe.weight": torch.randn(n, d),
                                                       "probe.bias": torch.zeros(n)})))
    _manifest(old1, lambda m: (m.update(format_version=1), m.pop("harm_gate_probe", None)))
    assert Artefact.load(old1).gate.layer == min(m["steer"]["layers"])


def _els(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "els", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=300)


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
