"""A fuzz over the files a user hands the CLI (issue 24): artefact folders, collection folders and prompt files,
damaged byte by byte or edited field by field. Each is read (or trained on) successfully, or refused with one
line (exit code 2 in the CLI), never a traceback; no input changes; a refused command writes no output.
Derandomized and small enough for CI (about 20 s on 2 CPU cores)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from els.cli import app
from els.core.io import read_json_object
from els.data.prompts import load_prompts
from els.eval.summary import Summary
from els.steering.artefact import Artefact
from els.training.collect import load_collection
from els.training.timings import Timings

from helpers import save_collection, synthetic_collection, tiny_artefact, tiny_model

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TRAIN = ["--harm-data", "none", "--epochs", "1", "--widths", "8", "--top-n", "1"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=4,
)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    lm = tiny_model("qwen2")
    tiny_artefact(lm).save(root / "artefact")
    col = synthetic_collection(lm, n=16)
    save_collection(col, root / "col")
    (root / "prompts").mkdir()
    (root / "prompts" / "p.csv").write_text('prompt,category\nhow do i bake a cake,food\n"a, b",x\n')
    (root / "prompts" / "p.jsonl").write_text('{"prompt": "how do i bake a cake"}\n{"prompt": "hi"}\n')
    (root / "prompts" / "p.json").write_text('[{"prompt": "how do i bake a cake"}, {"prompt": "hi"}]')
    return root


@st.composite
def damage(draw, folder: Path) -> tuple[str, bytes]:
    """One file of `folder` and its damaged bytes: cut, a byte changed, bytes inserted, or a JSON field edited."""
    name = draw(st.sampled_from(sorted(p.name for p in folder.iterdir())))
    data = (folder / name).read_bytes()
    at = draw(st.integers(0, len(data)))
    how = draw(
        st.sampled_from(
            ["cut", "byte", "insert", "field"] if name.endswith(("json", "jsonl")) else ["cut", "byte", "insert"]
        )
    )
    if how == "cut":
        return name, data[:at]
    if how == "byte":
        return name, data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    if how == "insert":
        return name, data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    lines = data.decode().splitlines()
    i = draw(st.integers(0, len(lines) - 1)) if name.endswith("jsonl") else None
    obj = json.loads(lines[i] if i is not None else data)
    node = obj[0] if isinstance(obj, list) else obj
    for _ in range(draw(st.integers(0, 2))):  # sometimes a field inside a field (the manifest's steer, energy)
        inner = [k for k, v in node.items() if isinstance(v, dict) and v]
        if not inner:
            break
        node = node[draw(st.sampled_from(sorted(inner)))]
    node[draw(st.sampled_from(sorted(node)) | st.text(max_size=4))] = draw(JSON_VALUES)
    text = json.dumps(obj)
    if i is not None:
        text = "\n".join(lines[:i] + [text] + lines[i + 1 :])
    return name, text.encode()


def tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _damaged(tmp_path: Path, source: Path, case: tuple[str, bytes]) -> Path:
    folder = tmp_path / source.name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder)
    (folder / case[0]).write_bytes(case[1])
    return folder


def _one_line(e: BaseException) -> None:
    assert isinstance(e, (ValueError, OSError)), repr(e)  # what the CLI turns into one line, exit code 2
    assert str(e) and "\n" not in str(e), repr(e)


def test_fuzzed_collections_train_or_fail_on_one_line_writing_nothing(made, tmp_path):
    @FUZZ
    @given(case=damage(made / "col"))
    def run(case):
        col = _damaged(tmp_path, made / "col", case)
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        before = tree(col)
        result = CliRunner().invoke(app, ["train", str(col), "--out", str(out), *TRAIN])
        lines = [line for line in result.output.splitlines() if line.strip()]
        if result.exit_code == 0:
            assert sorted(p.name for p in out.iterdir()) == ["els.json", "energy.safetensors"]
        else:
            assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
            assert len(lines) == 1 and lines[0].startswith("error: "), result.output
            assert not out.exists()  # nothing half-written
        assert tree(col) == before

    run()


def test_fuzzed_artefacts_load_or_fail_on_one_line(made, tmp_path):
    @FUZZ
    @given(case=damage(made / "artefact"))
    def run(case):
        art = _damaged(tmp_path, made / "artefact", case)
        before = tree(art)
        try:
            Artefact.load(art)
        except Exception as e:  # noqa: BLE001 - the assertion names what escaped
            _one_line(e)
        assert tree(art) == before

    run()


def test_fuzzed_prompt_files_load_or_fail_on_one_line(made, tmp_path):
    @FUZZ
    @given(case=damage(made / "prompts"))
    def run(case):
        folder = _damaged(tmp_path, made / "prompts", case)
        before = tree(folder)
        try:
            ps = load_prompts(f"{folder / case[0]}:prompt")
            assert ps.prompts and all(isinstance(p, str) and p for p in ps.prompts)
        except Exception as e:  # noqa: BLE001 - the assertion names what escaped
            _one_line(e)
        assert tree(folder) == before

    run()


DEEP = "[" * 100_000 + "]" * 100_000


# a JSON file the project reads -> (its folder in `made`, or None, how it is read); JSONL files get the line added
NESTED = {
    "els.json": ("artefact", Artefact.load),
    "collect.json": ("col", load_collection),
    "states.jsonl": ("col", load_collection),
    "p.json": ("prompts", lambda f: load_prompts(f"{f / 'p.json'}:prompt")),
    "p.jsonl": ("prompts", lambda f: load_prompts(f"{f / 'p.jsonl'}:prompt")),
    "timings.json": (None, lambda f: Timings.read(f / "timings.json")),
    "summary.json": (None, lambda f: Summary.read(f / "summary.json")),
    "quality_cache.json": (None, lambda f: read_json_object(f / "quality_cache.json", "a quality cache")),
}


@pytest.mark.parametrize("name", list(NESTED))
def test_json_nested_100000_deep_is_one_line_naming_the_file(made, tmp_path, name):
    folder, read = NESTED[name]
    copy = tmp_path / (folder or "records")
    if folder is None:
        copy.mkdir()
    else:
        shutil.copytree(made / folder, copy)
    path = copy / name
    path.write_text((path.read_text() if name.endswith(".jsonl") else "") + DEEP + "\n")
    with pytest.raises(ValueError, match="nested deeper than") as e:
        read(copy)
    _one_line(e.value)
    assert str(path) in str(e.value)
