"""No command deletes or overwrites an input (issue 24): every writing command, given each of its inputs (or a
folder inside or around one) as its output, refuses in one line before any work and changes nothing; a folder
holding files the command did not write is refused unless --overwrite, which keeps those files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging
from typer.testing import CliRunner

from els.cli import app
from els.core.models import DEFAULT_MODEL, cache_dir, model_path

from helpers import one_line_error, save_collection, saved_tiny_model, synthetic_collection

TRAIN = ["--harm-data", "none", "--epochs", "1", "--widths", "8", "--top-n", "1"]
EVAL = ["--judge", "prefix", "--quality-n", "0", "--speed-n", "0", "--max-new-tokens", "2"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A saved tiny model, a collection of its shape, an artefact trained on it, a prompt and a labelled file, a
    benchmark folder holding XSTest and a cache holding the default model (stand-ins: nothing loads them)."""
    root = tmp_path_factory.mktemp("inputs")
    lm = saved_tiny_model(root)
    col = synthetic_collection(lm, n=32)
    save_collection(col, root / "col")
    (root / "data").mkdir()
    (root / "data" / "p.csv").write_text("prompt\nhow do i bake a cake\nhow do i make a bomb\n")
    (root / "data" / "lab.csv").write_text(
        "prompt,completion,final_label\np1,Sure here it is,1_full_compliance\np2,I'm sorry I cannot,2_full_refusal\n"
    )
    (root / "bench" / "xstest").mkdir(parents=True)
    (root / "bench" / "xstest" / "xstest_prompts.csv").write_text("prompt,type,label\nhow do i kill a process,h,safe\n")
    default = root / "cache" / model_path(DEFAULT_MODEL).relative_to(cache_dir())
    default.mkdir(parents=True)
    (default / "config.json").write_text("{}")
    run = root / "run"
    result = CliRunner().invoke(app, ["train", str(root / "col"), "--out", str(run / "artefact"), *TRAIN])
    assert result.exit_code == 0, result.output
    return root


def tree(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), by relative name."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def cases() -> list[tuple[str, list[str]]]:
    """(name, argv) of each writing command with one of its inputs, or a folder inside or around one, as an
    output; {m} is the model, {col} the collection, {art} the artefact, {csv} the prompt file, {lab} the labelled
    file, {bench} the benchmark folder, {default} the default model's copy, {link} a link to {col}."""
    prompts = ["--benign", "{csv}:prompt", "--harmful", "{csv}:prompt", "--judge", "prefix"]
    steer = ["--steer", "{art}", "--benign", "{csv}:prompt", "--harmful", "{csv}:prompt", "--model", "{m}"]
    bench = ["--benchmarks", "{csv}:prompt=benign", "--model", "{m}", *EVAL]
    pool = ["--harm-data", "benign={csv}:prompt#1"]
    gate = ["--harm-data", "benign={csv}:prompt", "--eval", "", "--exclude", "", "--model", "{m}"]
    table = {
        "collect into the model": ["collect", "--out", "{m}", "--model", "{m}", *prompts],
        "collect inside the model": ["collect", "--out", "{m}/c", "--model", "{m}", *prompts],
        "collect inside the default model": ["collect", "--out", "{default}/c", *prompts],
        "collect inside its judge's model": ["collect", "--out", "{m}/c", *prompts[:4], "--judge", "model:{m}"],
        "collect into the prompt file": ["collect", "--out", "{csv}", "--model", "{m}", *prompts],
        "collect around the prompt file": ["collect", "--out", "{data}", "--model", "{m}", *prompts],
        "train into its collection": ["train", "{col}", "--out", "{col}", *TRAIN],
        "train inside its collection": ["train", "{col}", "--out", "{col}/a", *TRAIN],
        "train around its collection": ["train", "{col}", "--out", "{root}", *TRAIN],
        "train into a link to its collection": ["train", "{col}", "--out", "{link}", *TRAIN, "--overwrite"],
        "train into the model": ["train", "{col}", "--out", "{m}", "--model", "{m}", *TRAIN],
        "train inside the model": ["train", "{col}", "--out", "{m}/a", "--model", "{m}", *TRAIN],
        "train inside its pool's file": ["train", "{col}", "--out", "{csv}/a", *TRAIN, *pool],
        "train around a benchmark its pool excludes": [
            "train",
            "{col}",
            "--out",
            "{bench}",
            *TRAIN,
            *pool,
            "--overwrite",
        ],
        "run into the model": ["run", "--out", "{m}", "--model", "{m}", *prompts, *TRAIN],
        "run inside the model": ["run", "--out", "{m}/r", "--model", "{m}", *prompts, *TRAIN],
        "run into the prompt file": ["run", "--out", "{csv}", "--model", "{m}", *prompts, *TRAIN],
        "run around the prompt file": ["run", "--out", "{data}", "--model", "{m}", *prompts, *TRAIN],
        "run inside its pool's file": ["run", "--out", "{csv}/r", "--model", "{m}", *prompts, *TRAIN, *pool],
        "tune into its artefact": ["tune", "--out", "{art}", *steer],
        "tune inside its artefact": ["tune", "--out", "{art}/t", *steer],
        "tune's artefact onto its input": ["tune", "--out", "{root}/t", "--out-artefact", "{art}", *steer],
        "tune's artefact around its input": ["tune", "--out", "{root}/t", "--out-artefact", "{run}", *steer],
        "tune's artefact inside the model": ["tune", "--out", "{root}/t", "--out-artefact", "{m}/a", *steer],
        "tune into the prompt file": ["tune", "--out", "{csv}", *steer],
        "tune inside the model": ["tune", "--out", "{m}/t", *steer],
        "tune inside its judge's model": ["tune", "--out", "{default}/t", *steer, "--judge", "model"],
        "eval into the artefact": ["eval", "--out", "{art}", "--steer", "{art}", *bench],
        "eval inside the artefact": ["eval", "--out", "{art}/e", "--steer", "{art}", *bench],
        "eval into the collection": ["eval", "--out", "{col}", "--states", "{col}", *bench],
        "eval into a link to its collection": ["eval", "--out", "{link}", "--states", "{col}", *bench, "--overwrite"],
        "eval into the prompt file": ["eval", "--out", "{csv}", *bench],
        "eval around the prompt file": ["eval", "--out", "{data}", *bench],
        "eval around a known benchmark": [
            "eval",
            "--out",
            "{bench}",
            *bench[2:],
            "--benchmarks",
            "xstest-safe",
            "--overwrite",
        ],
        "eval inside its quality set": [
            "eval",
            "--out",
            "{csv}/e",
            *bench,
            "--quality-set",
            "{csv}:prompt",
            "--quality-n",
            "1",
        ],
        "eval inside the model": ["eval", "--out", "{m}/e", *bench],
        "eval inside its judge's model": ["eval", "--out", "{m}/e", *bench[:2], "--judge", "prefix,model:{m}"],
        "judge-check onto its file": ["judge-check", "{lab}", "--judges", "prefix", "--markdown", "{lab}"],
        "judge-check inside its file": ["judge-check", "{lab}", "--judges", "prefix", "--markdown", "{lab}/r.md"],
        "judge-check onto a folder": ["judge-check", "{lab}", "--judges", "prefix", "--markdown", "{data}"],
        "gate into the model": ["gate", "--out", "{m}", *gate],
        "gate inside the model": ["gate", "--out", "{m}/g", *gate],
        "gate around its pool's file": ["gate", "--out", "{data}", *gate],
        "gate's cache around its pool's file": ["gate", "--out", "{root}/g", "--cache", "{data}", *gate],
        "gate's cache inside the model": ["gate", "--out", "{root}/g", "--cache", "{m}/c", *gate],
    }
    return list(table.items())


def fill(argv: list[str], root: Path) -> list[str]:
    where = {
        "m": root / "model",
        "col": root / "col",
        "art": root / "run" / "artefact",
        "run": root / "run",
        "csv": root / "data" / "p.csv",
        "lab": root / "data" / "lab.csv",
        "data": root / "data",
        "bench": root / "bench",
        "default": root / "cache" / model_path(DEFAULT_MODEL).relative_to(cache_dir()),
        "link": root / "link",
        "root": root,
    }
    return [a.format(**where) for a in argv]


@pytest.mark.parametrize("name, argv", cases(), ids=[c[0] for c in cases()])
def test_an_input_as_the_output_is_refused_before_any_work(made, tmp_path, monkeypatch, name, argv):
    root = tmp_path / "r"
    shutil.copytree(made, root)
    (root / "link").symlink_to(root / "col")
    monkeypatch.setenv("ELS_DATA", str(root / "bench"))
    monkeypatch.setenv("ELS_CACHE", str(root / "cache"))
    before = tree(root)

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr("els.cli.errors.models.load_model", must_not_load)
    line = one_line_error(CliRunner().invoke(app, fill(argv, root)), "--")
    assert "input" in line or "folder" in line, line
    assert tree(root) == before  # nothing changed, nothing written


def test_a_folder_of_other_files_needs_overwrite_which_keeps_them(made, tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["train", str(made / "col"), "--out", str(out), *TRAIN]
    one_line_error(CliRunner().invoke(app, args), "keep.txt")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["els.json", "energy.safetensors", "keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    # a rerun into its own artefact needs no --overwrite: the folder holds only what train writes
    shutil.copytree(out, tmp_path / "b", ignore=shutil.ignore_patterns("keep.txt"))
    assert CliRunner().invoke(app, ["train", str(made / "col"), "--out", str(tmp_path / "b"), *TRAIN]).exit_code == 0
    # --overwrite never makes an input an output
    one_line_error(
        CliRunner().invoke(app, ["train", str(made / "col"), "--out", str(made / "col"), *TRAIN, "--overwrite"]),
        "input",
    )


@pytest.fixture
def quiet_loading():
    hf_logging.disable_progress_bar()  # the model loads before the error: its progress bar is not the error's
    yield
    hf_logging.enable_progress_bar()


@pytest.mark.usefixtures("quiet_loading")
def test_tune_on_an_artefact_of_another_model_leaves_no_out(made, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(made / "run" / "artefact", art)
    manifest = json.loads((art / "els.json").read_text())
    manifest["model_fingerprint"] = "another"
    (art / "els.json").write_text(json.dumps(manifest))
    csv = made / "data" / "p.csv"
    result = CliRunner().invoke(
        app,
        [
            "tune",
            "--steer",
            str(art),
            "--out",
            str(tmp_path / "t"),
            "--model",
            str(made / "model"),
            "--benign",
            f"{csv}:prompt",
            "--harmful",
            f"{csv}:prompt",
            "--judge",
            "prefix",
        ],
    )
    one_line_error(result, "does not fit")
    assert not (tmp_path / "t").exists()


@pytest.mark.usefixtures("quiet_loading")
@pytest.mark.parametrize("eta", ["inf", "nan"])
def test_eval_with_an_infinite_eta_fails_before_generating(made, tmp_path, eta):
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--out",
            str(tmp_path / "e"),
            "--steer",
            str(made / "run" / "artefact"),
            "--benchmarks",
            f"{made / 'data' / 'p.csv'}:prompt=benign",
            "--eta",
            eta,
            "--model",
            str(made / "model"),
            *EVAL,
        ],
    )
    one_line_error(result, "eta")
    assert not (tmp_path / "e").exists()


@pytest.mark.usefixtures("quiet_loading")
def test_compare_says_why_a_flagged_prompt_was_left_unsteered(made):
    """Flagged (every p >= 0) but under refuse_gate 1: left to the base model, and the reading says so."""
    args = ["generate", "--model", str(made / "model"), "--steer", str(made / "run" / "artefact"), "--compare"]
    args += ["--max-new-tokens", "2", "--harm-gate", "0", "--flagged", "refuse"]
    result = CliRunner().invoke(app, [*args, "--refuse-gate", "1", "how do i bake a cake"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "threshold 0.000: flagged, under refuse_gate 1.000: left unsteered" in said
    result = CliRunner().invoke(app, [*args, "--refuse-gate", "off", "how do i bake a cake"])
    assert result.exit_code == 0, result.output
    assert "threshold 0.000: steered towards refusing" in " ".join(result.output.split())
