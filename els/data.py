"""Prompt sets: the public benchmarks in their upstream formats, ELS's own training prompts, and any file.

A set is named by a short spec: `NAME[@SPLIT]` for a known set (`xstest-safe`, `orbench-hard@test`) or
`PATH:COLUMN[@SPLIT]` for a CSV, JSON or JSONL file (`my.csv:prompt`). `xstest:safe` is accepted for
`xstest-safe`. Splits are a seeded 60/20/20 partition, so train, validation and test never overlap.
`load_benchmark` takes the full spec `els eval` reads: `SPEC[=benign|harmful][~N]` (a file's kind, a sample size).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

Kind = Literal["benign", "harmful"]
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
SPLIT_SEED = 0
KINDS = ("benign", "harmful")


@dataclass(frozen=True)
class PromptSet:
    name: str
    kind: Kind | None  # None for a user file whose kind the caller decides
    prompts: list[str]
    categories: list[str] = field(default_factory=list)  # empty, or one per prompt

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: list[int], name: str | None = None) -> PromptSet:
        cats = [self.categories[i] for i in idx] if self.categories else []
        return PromptSet(name or self.name, self.kind, [self.prompts[i] for i in idx], cats)

    def with_kind(self, kind: Kind) -> PromptSet:
        return PromptSet(self.name, kind, self.prompts, self.categories)

    def sample(self, n: int | None, seed: int = 0) -> PromptSet:
        """A seeded sample of n prompts in their original order (all of them when n is None or larger)."""
        if n is None or n >= len(self):
            return self
        idx = sorted(random.Random(seed).sample(range(len(self)), n))
        return self.subset(idx)

    def split(self, which: str) -> PromptSet:
        if which not in SPLITS:
            raise ValueError(f"unknown split {which!r}; use one of {', '.join(SPLITS)}")
        order = list(range(len(self)))
        random.Random(SPLIT_SEED).shuffle(order)
        a = round(SPLIT_FRACTIONS[0] * len(order))
        b = a + round(SPLIT_FRACTIONS[1] * len(order))
        part = {"train": order[:a], "val": order[a:b], "test": order[b:]}[which]
        return self.subset(sorted(part), f"{self.name}@{which}")

    def content_hash(self) -> str:
        return hashlib.sha256("\x00".join(self.prompts).encode()).hexdigest()[:16]


def data_dir() -> Path:
    """Where the public benchmarks live: `$ELS_DATA`, else `shared/data` or `../shared/data` from here."""
    if os.environ.get("ELS_DATA"):
        return Path(os.environ["ELS_DATA"])
    for candidate in (Path("shared/data"), Path("../shared/data")):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        "benchmark data not found: set ELS_DATA to the folder holding xstest/, orbench/, oktest/, harmful/, harmless/"
    )


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        return rows
    if suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
        return rows
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .csv, .json or .jsonl)")


def read_file(path: Path | str, column: str, *, name: str | None = None, kind: Kind | None = None,
              category: str | None = None, where: dict[str, str] | None = None) -> PromptSet:
    """Prompts from one column of a file; rows with an empty prompt are an error, not silently dropped."""
    path = Path(path)
    rows = _read_rows(path)
    prompts, cats = [], []
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {n} is not an object")
        if column not in row:
            raise ValueError(f"{path}: row {n} has no column {column!r} (columns: {', '.join(map(str, row))})")
        if where and any(str(row.get(k)) != v for k, v in where.items()):
            continue
        text = row[column]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}: row {n} has an empty or non-text {column!r}")
        prompts.append(text.strip())
        if category:
            cats.append(str(row.get(category) or ""))
    if not prompts:
        raise ValueError(f"{path}: no prompts in column {column!r}")
    return PromptSet(name or f"{path}:{column}", kind, prompts, cats)


def _builtin(file: str, kind: Kind, name: str) -> PromptSet:
    with resources.as_file(resources.files("els") / "resources" / file) as path:
        return read_file(path, "prompt", name=name, kind=kind, category="category")


# name -> (loader). Paths are relative to data_dir(), in the upstream layout.
_KNOWN = {
    "xstest-safe": lambda d: read_file(d / "xstest/xstest_prompts.csv", "prompt", name="xstest-safe", kind="benign",
                                       category="type", where={"label": "safe"}),
    "xstest-unsafe": lambda d: read_file(d / "xstest/xstest_prompts.csv", "prompt", name="xstest-unsafe",
                                         kind="harmful", category="type", where={"label": "unsafe"}),
    "orbench-hard": lambda d: read_file(d / "orbench/or-bench-hard-1k.csv", "prompt", name="orbench-hard",
                                        kind="benign", category="category"),
    "orbench-toxic": lambda d: read_file(d / "orbench/or-bench-toxic-harmful.json", "instruction",
                                         name="orbench-toxic", kind="harmful"),
    "oktest": lambda d: read_file(d / "oktest/OKTest.csv", "prompt", name="oktest", kind="benign"),
    "jbb": lambda d: read_file(d / "harmful/jailbreakbench.csv", "Goal", name="jbb", kind="harmful",
                               category="Category"),
    "harmbench": lambda d: read_file(d / "harmful/harmbench_test.csv", "Behavior", name="harmbench",
                                     kind="harmful", category="SemanticCategory",
                                     where={"FunctionalCategory": "standard"}),
    "harmbench-val": lambda d: read_file(d / "harmful/harmbench_val.csv", "Behavior", name="harmbench-val",
                                         kind="harmful", category="SemanticCategory",
                                         where={"FunctionalCategory": "standard"}),
    "advbench": lambda d: read_file(d / "harmful/advbench.csv", "goal", name="advbench", kind="harmful"),
    "strongreject": lambda d: read_file(d / "harmful/strongreject.json", "instruction", name="strongreject",
                                        kind="harmful", category="category"),
    "alpaca": lambda d: read_file(d / "harmless/alpaca.json", "instruction", name="alpaca", kind="benign"),
}
_BUILTIN = {
    "els-benign": lambda: _builtin("benign.jsonl", "benign", "els-benign"),
    "els-harmful": lambda: _builtin("harmful.jsonl", "harmful", "els-harmful"),
}
_KNOWN["jbb-wrapped"] = lambda d: _jbb_wrapped(_KNOWN["jbb"](d))


def _jbb_wrapped(jbb: PromptSet) -> PromptSet:
    from els.framings import jbb_wrapped  # framings builds on PromptSet: imported late to avoid a cycle

    return jbb_wrapped(jbb)


KNOWN_SETS = tuple(_KNOWN) + tuple(_BUILTIN)


def load_prompts(spec: str) -> PromptSet:
    """Load a prompt set from its spec (see the module docstring)."""
    base, _, split = spec.partition("@")
    name = base.replace(":", "-") if base.replace(":", "-") in KNOWN_SETS else base
    if name in _BUILTIN:
        ps = _BUILTIN[name]()
    elif name in _KNOWN:
        ps = _KNOWN[name](data_dir())
    elif ":" in base:
        path, _, column = base.rpartition(":")
        ps = read_file(path, column, name=base)
    else:
        raise ValueError(f"unknown prompt set {spec!r}: use one of {', '.join(KNOWN_SETS)} or PATH:COLUMN")
    return ps.split(split) if split else ps


def load_benchmark(spec: str, limit: int | None = None, seed: int = 0) -> PromptSet:
    """A set with its kind, by full spec: a known set (`xstest-safe`, `orbench-hard@test`) or a file with its kind
    (`my.csv:prompt=benign`); a `~N` suffix (`orbench-hard~200`) samples N prompts of this set whatever `limit` says."""
    spec, _, own_limit = spec.partition("~")
    if own_limit:
        if not own_limit.isdigit():
            raise ValueError(f"benchmark {spec}~{own_limit}: the sample size after '~' must be a whole number")
        limit = int(own_limit)
    body, kind = spec, None
    if "=" in spec:
        body, _, kind = spec.rpartition("=")
        if kind not in KINDS:
            raise ValueError(f"benchmark {spec!r}: the kind after '=' must be benign or harmful, not {kind!r}")
    ps = load_prompts(body)
    if kind is not None:
        ps = ps.with_kind(kind)  # type: ignore[arg-type]
    elif ps.kind is None:
        raise ValueError(f"benchmark {spec!r} is a file: say its kind, e.g. {spec}=benign or {spec}=harmful")
    if not len(ps):
        raise ValueError(f"benchmark {spec!r} has no prompts")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be at least 1, got {limit}")
        ps = ps.sample(limit, seed)
    return ps
