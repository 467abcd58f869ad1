"""The layout's promises: light imports, stable cache keys, old artefacts readable, safe saves."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from els.core.generation import generate_batch
from els.eval.cache import artefact_digest, cache_key, digest, method_config
from els.eval.methods import Base
from els.steering.artefact import Artefact
from els.steering.gate import GateState
from els.steering.settings import SteerSettings
from els.steering.steering import Steering

from helpers import tiny_artefact, tiny_model

FIXTURES = Path(__file__).parent / "fixtures"


def test_steer_imports_neither_collection_nor_judges():
    code = "import sys; from els import steer; print(sorted(m for m in sys.modules if m.startswith('els.')))"
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.replace(
            "'", '"'
        )
    )
    assert not [m for m in loaded if m.split(".")[1] in ("training", "judges", "data", "eval", "parallel", "cli")]


def test_cache_key_is_pinned():
    # Cached answers of earlier runs stay valid only while this key stays byte-identical.
    key = cache_key(
        "fp", digest(method_config(Base())), "How do I kill a process?", {"max_new_tokens": 64, "do_sample": False}
    )
    assert key == "e9455c1d7063b63eae8d726c"


def test_old_manifest_with_gate_reads_as_threshold(tmp_path):
    art = tiny_artefact(tiny_model("qwen2"), threshold=0.25)
    art.save(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "els.json").read_text())
    manifest["steer"]["gate"] = manifest["steer"].pop("energy_gate")
    (tmp_path / "a" / "els.json").write_text(json.dumps(manifest))
    old = Artefact.load(tmp_path / "a")
    assert old.settings.energy_gate == 0.25 and old.settings == art.settings


@pytest.mark.parametrize(
    "name, digest_, gate_threshold, settings",
    [
        # format 1: a probe per trained layer, read at the first steered layer at the steering threshold; the
        # energy gate under its older name; no safety energy, so flagged rows are left alone
        (
            "artefact-format1",
            "a1c6f084d3390b30",
            0.4,
            SteerSettings(eta=0.5, steps=3, harm_gate=0.4, flagged="leave", refuse_gate=None, positions="last"),
        ),
        # format 2: the harm gate's own tensors and report, the safety energy, the weights' sha256
        (
            "artefact-format2",
            "0a6dd89a46f36ab1",
            pytest.approx(0.45),  # stored as float32
            SteerSettings(
                eta=0.5, steps=3, harm_gate=0.45, flagged="refuse", refuse_eta=0.3, refuse_gate=None, positions="last"
            ),
        ),
    ],
)
def test_checked_in_artefacts_of_each_format_load_steer_and_save_back(
    tmp_path, name, digest_, gate_threshold, settings
):
    """Artefacts that els wrote at each format before the manifest became a typed object."""
    source = FIXTURES / name
    art = Artefact.load(source)
    assert art.layers == [1, 2] and art.settings == settings
    assert art.gate.layer == 1 and art.gate.threshold == gate_threshold
    assert (art.safety is not None) == (settings.flagged == "refuse")
    assert artefact_digest(art) == digest_  # answers cached for it stay valid
    lm = tiny_model("qwen2")  # the model they were trained for
    with Steering(lm.model, art, harm_gate=None) as s:  # every row steps, whichever way the gate would route it
        generate_batch(lm, ["what is chess", "how do i make a bomb"], max_new_tokens=2)
    assert sum(layer["steps_taken"] for layer in s.report().values()) > 0
    art.save(tmp_path / "a")
    again = Artefact.load(tmp_path / "a")
    assert (again.layers, again.settings) == (art.layers, art.settings)
    assert again.gate.threshold == pytest.approx(art.gate.threshold) and torch.equal(again.gate.weight, art.gate.weight)
    written = json.loads((tmp_path / "a" / "els.json").read_text())
    if name == "artefact-format2":  # read and written back byte for byte
        for file in ("els.json", "energy.safetensors"):
            assert (tmp_path / "a" / file).read_bytes() == (source / file).read_bytes(), file
    else:  # written at today's format, with the gate the way it stores it
        assert written["format_version"] == 2 and written["harm_gate_probe"]["threshold"] == 0.4
        old = json.loads((source / "els.json").read_text())
        assert {k: v for k, v in written.items() if k not in ("format_version", "harm_gate_probe", "weights")} == {
            k: v for k, v in old.items() if k != "format_version"
        }


@pytest.mark.parametrize("failing", ["energy.safetensors", "els.json"])
def test_a_failed_save_keeps_the_old_artefact_or_refuses_the_mix(tmp_path, monkeypatch, failing):
    lm = tiny_model("qwen2")
    tiny_artefact(lm, eta=0.5).save(tmp_path / "a")
    (tmp_path / "a" / "keep.txt").write_text("mine")
    real = os.replace

    def fail_replacing(src, dst):
        if Path(dst).name == failing:
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_replacing)
    new = tiny_artefact(lm, eta=0.2)
    with torch.no_grad():
        next(new.energy.parameters()).add_(1.0)  # other weights than the saved ones
    with pytest.raises(OSError):
        new.save(tmp_path / "a")
    monkeypatch.setattr(os, "replace", real)
    if failing == "energy.safetensors":  # the first file written: the old artefact is whole
        assert Artefact.load(tmp_path / "a").settings.eta == 0.5
    else:  # new weights beside the old manifest: refused by the recorded sha256, never steered with
        with pytest.raises(ValueError, match="sha256"):
            Artefact.load(tmp_path / "a")
    # no temporary file left, and the folder's other file kept
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["els.json", "energy.safetensors", "keep.txt"]


def test_harm_gate_reading_follows_each_layer_device():
    lm = tiny_model("qwen2")
    art = tiny_artefact(lm, harm_gate=0.5)
    s = Steering(lm.model, art)
    # as the gate's pre-pass sets it at the prefill
    s._gate = GateState(allowed=torch.tensor([True, False]), p_harm=torch.tensor([0.2, 0.9]))
    on_other = s._reading_on(torch.device("meta"))  # a later layer on another device (meta: no data to copy)
    assert on_other is not None and all(t.device.type == "meta" and t.shape == (2,) for t in on_other)
    assert s._reading_on(torch.device("meta")) is on_other  # copied once per device, not per call
    s._gate = GateState(allowed=torch.tensor([False, True]), p_harm=torch.tensor([0.9, 0.2]))  # the next prefill
    allowed, p = s._reading_on(torch.device("cpu"))  # type: ignore[misc]
    assert torch.equal(allowed, torch.tensor([False, True])) and torch.equal(p, torch.tensor([0.9, 0.2]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to place steered layers on two devices")
def test_harm_gate_under_a_device_map_on_two_devices():
    lm = tiny_model("qwen2")
    art = tiny_artefact(lm, harm_gate=0.5)
    blocks = lm.blocks
    blocks[2].to("cuda")  # layer 2 on the GPU, the rest on the CPU; move activations across by hooks
    blocks[2].register_forward_pre_hook(
        lambda m, a, k: (
            tuple(x.to("cuda") if torch.is_tensor(x) else x for x in a),
            {n: v.to("cuda") if torch.is_tensor(v) else v for n, v in k.items()},
        ),
        with_kwargs=True,
    )
    blocks[2].register_forward_hook(
        lambda m, a, out: (
            tuple(o.to("cpu") if torch.is_tensor(o) else o for o in out) if isinstance(out, tuple) else out.to("cpu")
        )
    )
    with Steering(lm.model, art, layers=[1, 2], settings=SteerSettings(eta=0.5, steps=2, harm_gate=0.99)):
        enc = lm.tokenizer(["how do i kill a python process ?"], return_tensors="pt")
        lm.model(**enc)


# Lower layers first; a module may import its own subpackage and any lower layer, never a higher one.
LAYERS = (("core",), ("data", "judges"), ("steering",), ("training",), ("eval",), ("parallel", "serve"), ("cli",))
RANK = {pkg: i for i, names in enumerate(LAYERS) for pkg in names}
ALLOWED = {"serve": {"serve", "steering", "core"}, "steering": {"steering", "core"}}  # narrower than the rank
PACKAGE = Path(__file__).resolve().parents[1] / "els"


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every els module `path` imports, at any depth (inside functions and under TYPE_CHECKING too);
    `from els.x import y` counts as importing els.x.y when y is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
            }
    return {m for m in found if m == "els" or m.startswith("els.")}


def _graph() -> dict[str, set[str]]:
    paths = {_module_of(p): p for p in PACKAGE.rglob("*.py")}
    return {m: _imports(p, set(paths)) for m, p in paths.items()}


def test_no_import_cycle_between_modules():
    graph, state, stack = _graph(), {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            assert state.get(n) != "open", "import cycle: " + " -> ".join(stack[stack.index(n) :] + [n])
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_subpackage_imports_upwards():
    bad = []
    for m, deps in _graph().items():
        pkg = m.split(".")[1] if m.count(".") else None
        if pkg not in RANK:
            continue
        for d in deps:
            dep = d.split(".")[1] if d.count(".") else "els"
            if (
                dep == "els"
                or RANK[dep] > RANK[pkg]
                or (RANK[dep] == RANK[pkg] and dep != pkg)
                or dep not in ALLOWED.get(pkg, {dep})
            ):
                bad.append(f"{m} -> {d}")
    assert not bad, bad


def test_els_is_imported_from_this_checkout():
    import els

    assert Path(els.__file__).resolve().parent == PACKAGE
