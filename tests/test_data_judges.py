import json

import pytest

from els.data import KNOWN_SETS, load_prompts, read_file
from els.judges import PrefixJudge, SubstringJudge, get_judge

EXPECTED = {"xstest-safe": 250, "xstest-unsafe": 200, "orbench-hard": 1319, "oktest": 300, "jbb": 100,
            "advbench": 520, "strongreject": 313, "orbench-toxic": 2303, "els-benign": 320, "els-harmful": 320}


@pytest.mark.parametrize("name", KNOWN_SETS)
def test_known_sets_load(name):
    ps = load_prompts(name)
    assert ps.kind in ("benign", "harmful") and len(ps) > 0
    assert all(p.strip() for p in ps.prompts)
    if name in EXPECTED:
        assert len(ps) == EXPECTED[name]


def test_harmbench_is_standard_behaviours_only():
    ps = load_prompts("harmbench")
    assert 0 < len(ps) < 320 and ps.kind == "harmful"


def test_colon_alias_and_splits_are_disjoint_and_stable():
    assert load_prompts("xstest:safe").prompts == load_prompts("xstest-safe").prompts
    parts = [set(load_prompts(f"orbench-hard@{s}").prompts) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == 1319 and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert load_prompts("orbench-hard@test").prompts == load_prompts("orbench-hard@test").prompts


def test_seeded_sample():
    ps = load_prompts("jbb")
    assert ps.sample(10, seed=1).prompts == ps.sample(10, seed=1).prompts
    assert ps.sample(10, seed=1).prompts != ps.sample(10, seed=2).prompts


def test_user_files(tmp_path):
    (tmp_path / "a.csv").write_text("text,other\nhello there,1\nsecond one,2\n")
    assert load_prompts(f"{tmp_path}/a.csv:text").prompts == ["hello there", "second one"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"q": "x"}) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"b.jsonl:2"):
        load_prompts(f"{tmp_path}/b.jsonl:q")
    with pytest.raises(ValueError, match="no column 'nope'"):
        load_prompts(f"{tmp_path}/a.csv:nope")
    with pytest.raises(FileNotFoundError):
        load_prompts(f"{tmp_path}/missing.csv:text")
    (tmp_path / "c.json").write_text(json.dumps([{"q": "fine"}, {"q": ""}]))
    with pytest.raises(ValueError, match="row 2"):
        read_file(tmp_path / "c.json", "q")
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompts("no-such-set")
    with pytest.raises(ValueError, match="unknown split"):
        load_prompts("jbb@holdout")


def test_judges_handle_curly_apostrophes():
    answers = ["I can\u2019t help with that.", "Sure! Here is how to kill a Python process.",
               "Sorry, I won't.", "Here is the answer. I cannot stress enough how easy it is."]
    assert SubstringJudge()([""] * 4, answers) == [True, False, False, True]
    assert PrefixJudge()([""] * 4, answers) == [True, False, True, False]
    with pytest.raises(ValueError, match="unknown judge"):
        get_judge("oracle")
