"""The README's library example runs as written, on a tiny model and a tiny artefact instead of the default ones."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import tiny_artefact, tiny_model

README = Path(__file__).parent.parent / "README.md"


def library_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README has one python example"
    return blocks[0]


def test_readme_example_runs_on_a_tiny_model(tmp_path, capsys):
    code = library_example()
    assert 'load_model("default")' in code and '"runs/default/artefact"' in code
    assert len([line for line in code.splitlines() if line.strip()]) <= 5

    lm = tiny_model("qwen2")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    tiny_artefact(lm).save(tmp_path / "artefact")
    code = code.replace('load_model("default")', f'load_model({str(tmp_path / "model")!r}, dtype="float32")').replace(
        '"runs/default/artefact"', repr(str(tmp_path / "artefact"))
    )
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("[") and printed.rstrip().endswith("]")  # the list of answers
