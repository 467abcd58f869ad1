import json
import re

import pytest
import torch

from els.core.generation import generate
from els.data.promptset import PromptSet
from els.training.collect import collect, load_collection, state_of

from helpers import save_collection, synthetic_collection, tiny_model


class FlakyJudge:
    """Calls answers refusals on alternate prompts; raises on the call number `fail_at` (an interruption)."""

    name = "flaky"
    horizon = None

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, prompts, answers):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return ["kill" in p or "bomb" in p for p in prompts]


SETS = [
    PromptSet("b", "benign", ["how do i kill a python process", "bake cake", "what is chess", "how do i bake"]),
    PromptSet("h", "harmful", ["how do i make bomb", "beat my wife", "kill", "make bomb at the"]),
]


def test_state_table():
    assert [
        state_of("benign", False),
        state_of("benign", True),
        state_of("harmful", True),
        state_of("harmful", False),
    ] == ["helpful", "false_refusal", "safe_refusal", "jailbreak"]


def test_collect_writes_states_and_resumes_after_interruption(tmp_path):
    lm = tiny_model("qwen2")
    with pytest.raises(KeyboardInterrupt):
        collect(lm, SETS, tmp_path, judge=FlakyJudge(fail_at=3), max_new_tokens=3, batch_size=2, progress=False)
    done = sorted(p.name for p in (tmp_path / "batches").glob("*.safetensors"))
    assert done == ["00000.safetensors", "00001.safetensors"]
    judge = FlakyJudge()
    col = collect(lm, SETS, tmp_path, judge=judge, max_new_tokens=3, batch_size=2, progress=False)
    assert judge.calls == 2  # only the two missing batches ran
    assert not (tmp_path / "batches").exists()
    assert [r.prompt for r in col.records] == SETS[0].prompts + SETS[1].prompts
    assert col.activations.shape == (8, 3, 32)
    fresh = collect(lm, SETS, tmp_path / "fresh", judge=FlakyJudge(), max_new_tokens=3, batch_size=2, progress=False)
    assert torch.allclose(fresh.activations, col.activations, atol=1e-5)
    assert [r.answer for r in fresh.records] == [r.answer for r in col.records]
    loaded = load_collection(tmp_path)
    assert loaded.counts() == col.counts() and sum(col.counts().values()) == 8
    rows = [json.loads(line) for line in (tmp_path / "states.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"prompt", "kind", "source", "answer", "refused", "state"}
    meta = json.loads((tmp_path / "collect.json").read_text())
    assert (meta["num_layers"], meta["hidden_size"]) == (3, 32)  # what load_collection checks the activations by


@pytest.mark.parametrize("torn", ["00001.safetensors", "00001.jsonl"])
def test_a_torn_shard_is_generated_again_on_resume(tmp_path, torn):
    lm = tiny_model("qwen2")
    run = dict(max_new_tokens=3, batch_size=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        collect(lm, SETS, tmp_path / "c", judge=FlakyJudge(fail_at=3), **run)
    shard = tmp_path / "c" / "batches" / torn
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    judge = FlakyJudge()
    col = collect(lm, SETS, tmp_path / "c", judge=judge, **run)
    assert judge.calls == 3  # the torn batch and the two never written
    fresh = collect(lm, SETS, tmp_path / "fresh", judge=FlakyJudge(), **run)
    assert col.states == fresh.states and [r.answer for r in col.records] == [r.answer for r in fresh.records]
    assert torch.allclose(fresh.activations, col.activations, atol=1e-5)


def test_collect_refuses_other_settings_in_same_dir(tmp_path):
    lm = tiny_model("qwen2")
    collect(lm, SETS, tmp_path, judge=FlakyJudge(), max_new_tokens=3, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        collect(lm, SETS, tmp_path, judge=FlakyJudge(), max_new_tokens=4, batch_size=2, progress=False)


def test_collect_rejects_empty_or_kindless_sets(tmp_path):
    lm = tiny_model("qwen2")
    with pytest.raises(ValueError, match="needs a kind"):
        collect(lm, [PromptSet("x", None, ["a"])], tmp_path, judge=FlakyJudge())
    with pytest.raises(ValueError, match="empty"):
        collect(lm, [PromptSet("x", "benign", [])], tmp_path, judge=FlakyJudge())


def test_generate_returns_answers_in_prompt_order():
    lm = tiny_model("llama")
    prompts = ["how do i kill a python process ?", "bake", "what is chess"]
    together = generate(lm, prompts, max_new_tokens=4, batch_size=2)
    assert together == [generate(lm, [p], max_new_tokens=4)[0] for p in prompts]


def test_a_collection_begun_before_collect_json_held_the_shape_resumes(tmp_path):
    lm = tiny_model("qwen2")
    run = dict(max_new_tokens=3, batch_size=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        collect(lm, SETS, tmp_path, judge=FlakyJudge(fail_at=3), **run)
    meta = json.loads((tmp_path / "collect.json").read_text())
    older = {k: v for k, v in meta.items() if k not in ("num_layers", "hidden_size")}
    (tmp_path / "collect.json").write_text(json.dumps(older))
    judge = FlakyJudge()
    assert collect(lm, SETS, tmp_path, judge=judge, **run).activations.shape == (8, 3, 32)
    assert judge.calls == 2 and load_collection(tmp_path).meta == older


def _shaped(tmp_path, acts=None, meta=None):
    """The synthetic collection of the tiny model, its collect.json recording the shape as `els collect` does,
    with its activations or settings replaced."""
    col = synthetic_collection(tiny_model("qwen2"), n=8)
    col.meta |= {"num_layers": 3, "hidden_size": 32} | (meta or {})
    if acts is not None:
        col.activations = acts(col.activations)
    return save_collection(col, tmp_path / "col")


# what differs from collect.json -> what the one line must name
MISFIT = {
    "too narrow": ({"acts": lambda a: a[..., :16].contiguous()}, "width 16 do not fit the collection's collect.json"),
    "too few layers": ({"acts": lambda a: a[:, :2].contiguous()}, "2 layers of width 32 do not fit"),
    "too many layers": ({"acts": lambda a: torch.cat([a, a[:, :1]], 1)}, "4 layers"),
    "collect.json hidden_size 0": ({"meta": {"hidden_size": 0}}, "collect.json: hidden_size"),
    "collect.json num_layers 1e9": ({"meta": {"num_layers": 10**9}}, "collect.json: num_layers"),
    "collect.json num_layers 2.5": ({"meta": {"num_layers": 2.5}}, "collect.json: num_layers"),
    "1e30": ({"acts": lambda a: a.index_fill(0, torch.tensor([3]), 1e30)}, "magnitude 1e+30"),
    "NaN": ({"acts": lambda a: a.index_fill(0, torch.tensor([3]), float("nan"))}, "NaN"),
}


@pytest.mark.parametrize("case", list(MISFIT))
def test_activations_that_do_not_fit_collect_json_are_one_line(tmp_path, case):
    change, names = MISFIT[case]
    path = _shaped(tmp_path, **change)
    with pytest.raises(ValueError, match=re.escape(names)) as e:
        load_collection(path)
    assert "\n" not in str(e.value)


def test_blank_lines_in_states_jsonl_hold_no_row(tmp_path):
    path = _shaped(tmp_path)
    lines = (path / "states.jsonl").read_text().splitlines()
    (path / "states.jsonl").write_text("\n".join(lines[:3] + ["", "  "] + lines[3:]) + "\n\n\n")
    assert len(load_collection(path).records) == 8
