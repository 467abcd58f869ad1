"""A damaged or edited collection is one line naming the file, exit code 2, no traceback, no output written and no
input changed (tests/test_cli_errors.py does the same for flags and artefacts)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging
from typer.testing import CliRunner

from els.cli import app
from els.data import read_file
from els.training.collect import load_collection

from helpers import one_line_error, save_collection, saved_tiny_model, synthetic_collection

TRAIN = ["--harm-data", "none", "--epochs", "1", "--widths", "8", "--top-n", "1"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny model saved as a model directory and a collection of its shape, as `els collect` writes it."""
    root = tmp_path_factory.mktemp("made")
    lm = saved_tiny_model(root)
    col = synthetic_collection(lm, n=32)
    save_collection(col, root / "col")
    return root


def _acts(edit):
    def tamper(c: Path) -> None:
        a = load_file(c / "states.safetensors")["activations"]
        save_file(edit(a), c / "states.safetensors")

    return tamper


def _rows(edit):
    def tamper(c: Path) -> None:
        rows = [json.loads(x) for x in (c / "states.jsonl").read_text().splitlines()]
        edit(rows[3])
        (c / "states.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    return tamper


def _bytes(name: str, edit):
    return lambda c: (c / name).write_bytes(edit((c / name).read_bytes()))


def _nan(a: torch.Tensor) -> dict:
    a[2, 1, 5] = float("nan")
    return {"activations": a}


def _inf(a: torch.Tensor) -> dict:
    a[0, 0, 0] = float("inf")
    return {"activations": a}


# damage -> what the one line must name
DAMAGED = {
    "truncated states": (_bytes("states.safetensors", lambda b: b[: len(b) // 2]), "states.safetensors"),
    "empty states": (_bytes("states.safetensors", lambda b: b""), "states.safetensors"),
    "garbage states": (_bytes("states.safetensors", lambda b: b"\x07garbage" * 100), "states.safetensors"),
    "no states": (lambda c: (c / "states.safetensors").unlink(), "states.safetensors"),
    "wrong key": (_acts(lambda a: {"acts": a}), "activations"),
    "1-D": (_acts(lambda a: {"activations": a.flatten().contiguous()}), "[N, L, d]"),
    "2-D": (_acts(lambda a: {"activations": a[:, 0].contiguous()}), "[N, L, d]"),
    "integer": (_acts(lambda a: {"activations": a.long()}), "[N, L, d]"),
    "NaN": (_acts(_nan), "NaN"),
    "inf": (_acts(_inf), "infinity"),
    "1e30": (_acts(lambda a: {"activations": a.index_fill_(0, torch.tensor([3]), 1e30)}), "magnitude 1e+30"),
    "row nested 100,000 deep": (_bytes("states.jsonl", lambda b: b + b"[" * 100_000 + b"\n"), "nested deeper"),
    "a row short": (_acts(lambda a: {"activations": a[1:].contiguous()}), "31 activation rows for 32 records"),
    "too few layers": (_acts(lambda a: {"activations": a[:, :2].contiguous()}), "do not fit --model"),
    "too narrow": (_acts(lambda a: {"activations": a[..., :16].contiguous()}), "do not fit --model"),
    "row key renamed": (_rows(lambda r: r.update(text=r.pop("prompt"))), "states.jsonl line 4: prompt"),
    "row key missing": (_rows(lambda r: r.pop("state")), "states.jsonl line 4: state"),
    "refused yes": (_rows(lambda r: r.update(refused="yes")), "states.jsonl line 4: refused"),
    "unknown state": (_rows(lambda r: r.update(state="confused")), "states.jsonl line 4: state"),
    "row a list": (_bytes("states.jsonl", lambda b: b"[1, 2]\n" + b), "states.jsonl line 1"),
    "rows not JSON": (_bytes("states.jsonl", lambda b: b[:-40]), "not valid JSON"),
    "rows not UTF-8": (_bytes("states.jsonl", lambda b: b"\xff\xfe" + b), "states.jsonl"),
    "rows empty": (_bytes("states.jsonl", lambda b: b""), "states.jsonl holds no records"),
    "collect.json a list": (lambda c: (c / "collect.json").write_text("[1, 2]"), "collect.json"),
    "collect.json not JSON": (lambda c: (c / "collect.json").write_text("{model"), "collect.json"),
    "collect.json without model": (
        _bytes("collect.json", lambda b: json.dumps({k: v for k, v in json.loads(b).items() if k != "model"}).encode()),
        "collect.json: model",
    ),
    "no collect.json": (lambda c: (c / "collect.json").unlink(), "collect.json"),
}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_untouched_collection_trains(made, tmp_path):
    result = CliRunner().invoke(
        app, ["train", str(made / "col"), "--out", str(tmp_path / "a"), "--model", str(made / "model"), *TRAIN]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "els.json").exists()


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_collection_is_one_line_and_writes_nothing(made, tmp_path, request, case):
    damage, names = DAMAGED[case]
    col = tmp_path / "col"
    shutil.copytree(made / "col", col)
    damage(col)
    before = _snapshot(col)
    if "fit" in names:  # the model loads to be compared: its progress bar is not the error's
        hf_logging.disable_progress_bar()
        request.addfinalizer(hf_logging.enable_progress_bar)
    else:  # the library refuses it too, without a model
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            load_collection(col)
        assert "\n" not in str(e.value)
    result = CliRunner().invoke(
        app, ["train", str(col), "--out", str(tmp_path / "a"), "--model", str(made / "model"), *TRAIN]
    )
    one_line_error(result, names)
    assert not (tmp_path / "a").exists() and _snapshot(col) == before


LONG = "how do i bake a cake " * 10_000  # 210,000 characters: over csv's default field limit of 131,072


def test_csv_fields_over_the_default_limit_are_read(tmp_path):
    prompts = tmp_path / "p.csv"
    with prompts.open("w", newline="") as f:
        csv.writer(f).writerows([["prompt"], ["short one"], [LONG]])
    assert read_file(prompts, "prompt").prompts == ["short one", LONG.strip()]
    labelled = tmp_path / "labelled.csv"
    with labelled.open("w", newline="") as f:
        csv.writer(f).writerows(
            [
                ["prompt", "completion", "final_label"],
                ["p1", "Sure, " + LONG, "1_full_compliance"],
                ["p2", "I'm sorry, I cannot help with that.", "2_full_refusal"],
            ]
        )
    result = CliRunner().invoke(app, ["judge-check", str(labelled), "--judges", "prefix"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("judges", ["", " , ,"])
def test_judge_check_without_judges_is_one_line(tmp_path, judges):
    one_line_error(CliRunner().invoke(app, ["judge-check", str(tmp_path / "any.csv"), "--judges", judges]), "--judges")


@pytest.mark.parametrize(
    "spec, names",
    [
        ("{tmp}/none.csv:prompt=benign", "none.csv"),
        ("{tmp}/p.csv:text=benign", "text"),
        ("{tmp}/p.csv:prompt=neutral", "neutral"),
        ("no-such-benchmark", "no-such-benchmark"),
        (" , ", "--benchmarks"),
    ],
)
def test_eval_with_a_bad_benchmark_writes_no_folder(made, tmp_path, spec, names):
    (tmp_path / "p.csv").write_text("prompt\nhow do i bake a cake\n")
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--out",
            str(tmp_path / "e"),
            "--model",
            str(made / "model"),
            "--benchmarks",
            spec.format(tmp=tmp_path),
            "--judge",
            "prefix",
            "--quality-n",
            "0",
            "--speed-n",
            "0",
        ],
    )
    one_line_error(result, names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]


def test_eval_with_a_damaged_collection_fails_before_generating(made, tmp_path):
    col = tmp_path / "col"
    shutil.copytree(made / "col", col)
    DAMAGED["NaN"][0](col)
    (tmp_path / "p.csv").write_text("prompt\nhow do i bake a cake\n")
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--out",
            str(tmp_path / "e"),
            "--model",
            str(made / "model"),
            "--benchmarks",
            f"{tmp_path / 'p.csv'}:prompt=benign",
            "--states",
            str(col),
            "--judge",
            "prefix",
            "--quality-n",
            "0",
            "--speed-n",
            "0",
        ],
    )
    one_line_error(result, "states.safetensors")
    assert not (tmp_path / "e").exists()


def test_a_blank_last_line_in_states_jsonl_is_no_row(made, tmp_path):
    col = tmp_path / "col"
    shutil.copytree(made / "col", col)
    (col / "states.jsonl").write_text((col / "states.jsonl").read_text() + "\n")
    assert len(load_collection(col).records) == 32


@pytest.mark.parametrize(
    "suffix, text",
    [
        (".csv", "\ufeffprompt\nhow do i bake a cake\n"),
        (".jsonl", '\ufeff{"prompt": "how do i bake a cake"}\n'),
        (".json", '\ufeff[{"prompt": "how do i bake a cake"}]'),
    ],
)
def test_a_prompt_file_with_a_byte_order_mark_reads(tmp_path, suffix, text):
    path = tmp_path / f"p{suffix}"
    path.write_text(text, encoding="utf-8")
    assert read_file(path, "prompt").prompts == ["how do i bake a cake"]


@pytest.mark.parametrize(
    "name, data, names",
    [
        ("p.csv", b"prompt\n\xff\xfe cake\n", "p.csv is not UTF-8"),
        ("p.json", b"[" * 100_000, "nested deeper"),
        ("p.jsonl", b'{"prompt": "a"}\n' + b"[" * 100_000, "nested deeper"),
    ],
)
def test_an_unreadable_prompt_file_is_one_line_naming_it(made, tmp_path, name, data, names):
    (tmp_path / name).write_bytes(data)
    for args in (
        ["collect", "--out", str(tmp_path / "c"), "--benign", f"{tmp_path / name}:prompt"],
        ["eval", "--out", str(tmp_path / "e"), "--benchmarks", f"{tmp_path / name}:prompt=benign"],
    ):
        assert name in one_line_error(CliRunner().invoke(app, [*args, "--model", str(made / "model")]), names)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_labelled_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    (tmp_path / "lab.csv").write_bytes(b"prompt,completion,final_label\n\xff,a,1_full_compliance\n")
    one_line_error(
        CliRunner().invoke(app, ["judge-check", str(tmp_path / "lab.csv"), "--judges", "prefix"]),
        "lab.csv is not UTF-8",
    )


@pytest.mark.parametrize(
    "args, names",
    [
        (["train", "{col}", "--out", "{tmp}/a", "--dtype", "float8", *TRAIN], "--dtype"),
        (["train", "{col}", "--out", "{tmp}/a", "--device", "bogus", *TRAIN], "--device"),
        (["eval", "--out", "{tmp}/e", "--judge", ",", "--benchmarks", "xstest-safe"], "--judge"),
        (["serve", "--max-body-kb", "4611686018427387904"], "--max-body-kb"),
        (["serve", "--read-timeout", "0"], "--read-timeout"),
        (["serve", "--keep-alive", "nan"], "--keep-alive"),
        (["serve", "--limit-concurrency", "1"], "--limit-concurrency"),
    ],
)
def test_flags_are_checked_even_when_no_model_loads(made, tmp_path, args, names):
    one_line_error(CliRunner().invoke(app, [a.format(col=made / "col", tmp=tmp_path) for a in args]), names)
    assert not list(tmp_path.iterdir())
