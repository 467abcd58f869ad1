import json

import pytest
import torch

from els.core.generation import generate
from els.data.promptset import PromptSet
from els.training.collect import collect, load_collection, state_of

from helpers import tiny_model


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
