"""What routing each prompt by the harm gate's p(harmful) would do, composed from an `els eval` run's answers.

    python benchmarks/gate_bands.py --eval runs/val --steer runs/default/artefact \
        --bands els,system-prompt@0.8,safety-system-prompt@0.999,els

Bands are `METHOD[@UPPER]`, in order: the first covers p below the artefact's gate threshold, each next one up to
its own upper bound (the last one up to 1). Each prompt takes the verdict that the method of its band got on it
in that run (`els.eval.comparison.banded_verdicts`, as the run's gate-composed methods are made): the same
answers per-row routing would give, up to batch rounding, with no generation. Prints the pooled and per-set
refusal rates of the routing and of every method the run generated, by the run's headline judge and with its
sets' kinds. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from els.core.models import load_model
from els.eval.cache import CompletionFile, slug
from els.eval.comparison import banded_verdicts, gate_probabilities
from els.eval.summary import Summary
from els.steering.artefact import Artefact


def bands(spec: str, threshold: float) -> list[tuple[float, str]]:
    """[(upper p bound, method)], the first band ending at the gate's threshold and the last at infinity."""
    parts = [part.partition("@") for part in spec.split(",")]
    uppers = [threshold, *(float(upper) for _, _, upper in parts[1:-1]), math.inf]
    return [(upper, method) for upper, (method, _, _) in zip(uppers, parts)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=Path, required=True, help="An `els eval --out` folder.")
    ap.add_argument("--steer", type=Path, required=True, help="The artefact whose gate routes.")
    ap.add_argument("--bands", required=True)
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    art = Artefact.load(args.steer)
    route = bands(args.bands, art.gate.threshold)
    summary = Summary.read(args.eval / "summary.json")
    lm = load_model(args.model)
    pooled: dict[str, dict[str, list[bool]]] = {}
    per_set: dict[str, dict[str, float]] = {}
    for set_name, bench in summary.benchmarks.items():
        verdicts: dict[str, dict[str, bool]] = {}
        for method in summary.methods:
            rows = CompletionFile(args.eval / "completions" / slug(method) / f"{slug(set_name)}.jsonl").rows
            verdicts[method] = {r["prompt"]: r["verdicts"][summary.judge]["refused"] for r in rows.values()}
        prompts = list(verdicts[next(iter(summary.methods))])
        p = gate_probabilities(lm, art.gate, prompts, args.eval / "gate")
        by_method = {m: [v[q] for q in prompts] for m, v in verdicts.items()}
        by_method["routed"] = banded_verdicts(p, [(upper, by_method[m]) for upper, m in route])
        for method, v in by_method.items():
            pooled.setdefault(bench.kind, {}).setdefault(method, []).extend(v)
            per_set.setdefault(method, {})[set_name] = sum(v) / len(v)
    rates = {kind: {m: sum(v) / len(v) for m, v in ms.items()} for kind, ms in pooled.items()}
    for method in per_set:
        cells = " ".join(f"{s} {100 * r:.1f}" for s, r in per_set[method].items())
        head = " ".join(f"{kind} {100 * rates[kind][method]:.1f}" for kind in rates)
        print(f"{method:24s} {head} | {cells}")
    bounds = [(None if math.isinf(upper) else upper, method) for upper, method in route]  # standard JSON
    print(json.dumps({"bands": bounds, "refusal": rates, "per_set": per_set}))


if __name__ == "__main__":
    main()
