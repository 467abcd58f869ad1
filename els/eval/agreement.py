"""How well each refusal judge agrees with human labels (`els judge-check`): accuracy, Cohen's kappa,
refusal precision and recall, per labelled file and pooled."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from els.data.prompts import data_dir
from els.judges.learned import LearnedJudge, preload_embeddings, read_labelled, train_learned_judge
from els.judges.model import ModelJudge, get_judge

Log = Callable[[str], None]


def cohen_kappa(truth: Sequence[bool], pred: Sequence[bool]) -> float:
    """Cohen's kappa of two binary raters; 1.0 when both are constant and agree, 0.0 when chance explains all."""
    n = len(truth)
    if n == 0 or n != len(pred):
        raise ValueError(f"kappa needs two equally long, non-empty label lists (got {n} and {len(pred)})")
    po = sum(t == p for t, p in zip(truth, pred)) / n
    pt, pp = sum(truth) / n, sum(pred) / n
    pe = pt * pp + (1 - pt) * (1 - pp)
    if pe == 1:
        return 1.0 if po == 1 else 0.0
    return (po - pe) / (1 - pe)


def agreement(truth: Sequence[bool], pred: Sequence[bool]) -> dict:
    """Accuracy, kappa, and precision / recall of refusal (None where undefined) against human labels."""
    tp = sum(t and p for t, p in zip(truth, pred))
    return {
        "n": len(truth),
        "accuracy": sum(t == p for t, p in zip(truth, pred)) / len(truth),
        "kappa": cohen_kappa(truth, pred),
        "precision": tp / sum(pred) if sum(pred) else None,
        "recall": tp / sum(truth) if sum(truth) else None,
    }


def default_labelled_files() -> list[Path]:
    files = sorted((data_dir() / "xstest" / "labelled_completions").glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no labelled completions in {data_dir() / 'xstest' / 'labelled_completions'}")
    return files


def judge_check(
    files: Sequence[Path],
    judges: Sequence[str],
    *,
    model_judge_limit: int | None = None,
    seed: int = 0,
    log: Log = print,
) -> list[dict]:
    """Agreement of each judge with the human labels, per file and pooled ("all").

    The learned judge is scored only on answers it did not learn from: for a file among its training files it
    is retrained on the other training files (leave one file out). The model judge, slow on a CPU, is scored on
    a seeded sample of `model_judge_limit` answers per file when that is set.
    """
    sets = [read_labelled(f) for f in files]
    if "learned" in judges:
        preload_embeddings(sets)  # embeds each file once (cached on disk), not once per left-out fold
    results: list[dict] = []
    for name in judges:
        judge = get_judge(name)
        truth_all: list[bool] = []
        pred_all: list[bool] = []
        for s in sets:
            idx = list(range(len(s.answers)))
            note = ""
            scored = judge
            if isinstance(judge, ModelJudge) and model_judge_limit and model_judge_limit < len(idx):
                idx = sorted(random.Random(seed).sample(idx, model_judge_limit))
                note = f"seeded sample of {model_judge_limit}"
            if isinstance(judge, LearnedJudge) and s.sha256 in judge.trained_on:
                others = [read_labelled(f) for f in _training_files(judge, exclude=s.sha256)]
                scored = train_learned_judge(others, l2=judge.meta.get("l2", 1e-3))
                note = "left out: retrained on " + ", ".join(o.name for o in others)
            t = time.perf_counter()
            pred = scored([s.prompts[i] for i in idx], [s.answers[i] for i in idx])
            truth = [s.refused[i] for i in idx]
            row = {
                "judge": judge.name,
                "file": s.name,
                **agreement(truth, pred),
                "note": note,
                "seconds": round(time.perf_counter() - t, 1),
            }
            if isinstance(judge, ModelJudge):
                row["fallbacks"] = judge.fallbacks
                judge.fallbacks = 0
            log(f"{judge.name} on {s.name}: accuracy {row['accuracy']:.3f}, kappa {row['kappa']:.3f}")
            results.append(row)
            truth_all += truth
            pred_all += pred
        results.append(
            {
                "judge": judge.name,
                "file": "all",
                **agreement(truth_all, pred_all),
                "note": "pooled",
                "seconds": round(sum(r["seconds"] for r in results if r["judge"] == judge.name), 1),
            }
        )
    return results


def _training_files(judge: object, exclude: str) -> list[Path]:
    trained = {f["sha256"]: f["file"] for f in judge.meta.get("trained_on", [])}  # type: ignore[attr-defined]
    found = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in default_labelled_files()}
    missing = [name for sha, name in trained.items() if sha != exclude and sha not in found]
    if missing:
        raise FileNotFoundError(f"leave-one-out needs the learned judge's other training files: {', '.join(missing)}")
    return [found[sha] for sha in trained if sha != exclude]


def judge_table(results: list[dict]) -> str:
    """The agreement table in Markdown."""

    def f(x: float | None) -> str:
        return "–" if x is None else f"{x:.3f}"

    lines = [
        "| judge | file | n | accuracy | kappa | refusal precision | refusal recall | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        bold = "**" if r["file"] == "all" else ""
        note = r["note"] + (f"; {r['fallbacks']} unparseable → prefix" if r.get("fallbacks") else "")
        lines.append(
            f"| {r['judge']} | {bold}{r['file']}{bold} | {r['n']} | {bold}{f(r['accuracy'])}{bold} | "
            f"{f(r['kappa'])} | {f(r['precision'])} | {f(r['recall'])} | {note} |"
        )
    return "\n".join(lines)
