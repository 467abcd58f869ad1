"""Would shorter answers get the same verdicts? The judge on answers cut to N tokens vs the whole answer.

    python benchmarks/verdict_tokens.py runs/val/g --tokens 16,24,32,40

Reads the answers `els eval --out DIR` cached (DIR/completions, every method and set but the quality prompts),
cuts each to its first N generated tokens and judges it again with the learned judge. Decoding is greedy, so
the first N tokens of a longer answer are the N-token answer: a generation budget of N gives these verdicts.
Prints, per N, the share of answers whose verdict is unchanged (overall and per method) and the refusal rate
both ways. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from els.core.generation import decode_text
from els.core.models import load_model
from els.eval.cache import CompletionFile
from els.judges.model import get_judge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="els eval output folders")
    ap.add_argument("--model", default="default")
    ap.add_argument("--tokens", default="16,24,32,40")
    ap.add_argument("--skip-sets", default="alpaca", help="Sets left out (the quality prompts, not judged).")
    args = ap.parse_args()
    skip = set(args.skip_sets.split(","))
    rows: dict[str, dict] = {}  # by cache key: a method's answer cached in two folders counts once
    for d in args.dirs:
        for path in sorted((d / "completions").glob("*/*.jsonl")):
            rows |= {k: r for k, r in CompletionFile(path).rows.items() if r["set"] not in skip}
    answers = list(rows.values())
    tok = load_model(args.model).tokenizer
    judge = get_judge("learned")
    prompts = [r["prompt"] for r in answers]
    full = judge(prompts, [r["answer"] for r in answers])
    longest = max(len(r["tokens"]) for r in answers)
    print(f"{len(answers)} answers of up to {longest} tokens; refusal {sum(full) / len(full):.4f} on the whole answers")
    out = {}
    for n in (int(t) for t in args.tokens.split(",")):
        cut = judge(prompts, [decode_text(tok, r["tokens"][:n]) for r in answers])
        same = [a == b for a, b in zip(full, cut)]
        by_method: dict[str, list[bool]] = defaultdict(list)
        for r, s in zip(answers, same):
            by_method[r["method"]].append(s)
        per = {m: round(sum(v) / len(v), 4) for m, v in sorted(by_method.items())}
        agree = sum(same) / len(same)
        print(f"{n:3d} tokens: equal verdicts {agree:.4f}, refusal {sum(cut) / len(cut):.4f}; per method {per}")
        out[n] = {"equal_verdicts": agree, "refusal": sum(cut) / len(cut), "per_method": per}
    print(json.dumps({"answers": len(answers), "refusal_full": sum(full) / len(full), "cut": out}))


if __name__ == "__main__":
    main()
