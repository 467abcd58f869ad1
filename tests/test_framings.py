import re

from els.data.framings import CATEGORIES, EVAL_TEMPLATES, TRAIN_TEMPLATES, frame, frame_set, framed_sources, jbb_wrapped
from els.data.promptset import PromptSet


def _words(template: str) -> list[str]:
    return re.findall(r"[a-z']+", template.replace("{prompt}", " ").lower())


def _ngrams(family: dict, n: int) -> set[tuple[str, ...]]:
    out = set()
    for templates in family.values():
        for t in templates:
            w = _words(t)
            out |= {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}
    return out


def test_families_cover_every_category_and_hold_the_prompt_once():
    for family in (TRAIN_TEMPLATES, EVAL_TEMPLATES):
        assert set(family) == set(CATEGORIES)
        for templates in family.values():
            assert templates and all(t.count("{prompt}") == 1 for t in templates)


def test_train_and_eval_families_share_no_template_wording():
    # No run of 4 words in common: the eval family is not a paraphrase-by-substitution of the train one.
    assert not (_ngrams(TRAIN_TEMPLATES, 4) & _ngrams(EVAL_TEMPLATES, 4))
    # The check itself can fail: a family shares its own wording.
    assert _ngrams(TRAIN_TEMPLATES, 4) & _ngrams(TRAIN_TEMPLATES, 4)


def test_framing_is_deterministic_and_independent_of_set_order():
    a = frame("How do I bake bread", "train", n=2, seed=3)
    assert a == frame("How do I bake bread", "train", n=2, seed=3)
    assert len({fid.split("/")[0] for fid, _ in a}) == 2  # two different categories
    assert all("How do I bake bread." in text for _, text in a)
    ps = PromptSet("p", "benign", ["one thing", "another thing", "a third"])
    fwd = frame_set(ps, "train", per_prompt=2)
    rev = frame_set(PromptSet("p", "benign", ps.prompts[::-1]), "train", per_prompt=2)
    assert sorted(fwd.prompts) == sorted(rev.prompts)
    assert framed_sources(ps, 2) == ["one thing", "one thing", "another thing", "another thing", "a third", "a third"]
    assert fwd.kind == "benign" and len(fwd) == 6 and len(fwd.categories) == 6


def test_seed_changes_the_choice():
    prompts = [f"request number {i}" for i in range(20)]
    assert [frame(p, seed=0) for p in prompts] != [frame(p, seed=1) for p in prompts]


def test_jbb_wrapped_uses_every_eval_category_per_goal():
    jbb = PromptSet("jbb", "harmful", ["Write a guide to something bad", "Explain how to do harm"])
    out = jbb_wrapped(jbb)
    assert out.name == "jbb-wrapped" and out.kind == "harmful" and len(out) == 2 * len(CATEGORIES)
    assert {c.split("/")[0] for c in out.categories[: len(CATEGORIES)]} == set(CATEGORIES)
    eval_texts = {t.format(prompt="X") for ts in EVAL_TEMPLATES.values() for t in ts}
    assert all(
        p.replace("Write a guide to something bad.", "X").replace("Explain how to do harm.", "X") in eval_texts
        for p in out.prompts
    )
    assert jbb_wrapped(jbb).prompts == out.prompts
