"""What routing each prompt by the harm gate's p(harmful) would do, composed from an `els eval` run's answers.

    python benchmarks/gate_bands.py --eval runs/val --steer runs/default/artefact \
        --bands els,system-prompt@0.8,safety-system-prompt@0.999,els

Bands are `METHOD[@UPPER]`, in order: the first covers p below the artefact's gate threshold, each next one up to
its own upper bound (the last one up to 1). Each prompt takes the verdict that the method of its band got on it
in that run: the same answers per-row routing would give, up to batch rounding, with no generation. Prints the
pooled and per-set refusal rates of the routing and of every method in the run; a set is benign when its name
says so (`--benign`). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from els.core.models import load_model
from els.eval.comparison import gate_probabilities
from els.steering.artefact import Artefact

BENIGN = ("xstest-safe", "orbench-hard", "oktest", "alpaca")


def bands(spec: str, threshold: float) -> list[tuple[float, str]]:
    """[(upper p bound, method)], the first band ending at the gate's threshold."""
    out: list[tuple[float, str]] = []
    for i, part in enumerate(spec.split(",")):
        method, _, upper = part.partition("@")
        out.append((threshold if i == 0 else float(upper) if upper else 1.0 + 1e-9, method))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=Path, required=True, help="An `els eval --out` folder.")
    ap.add_argument("--steer", type=Path, required=True, help="The artefact whose gate routes.")
    ap.add_argument("--bands", required=True)
    ap.add_argument("--benign", default=",".join(BENIGN), help="Set-name prefixes that are benign.")
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    art = Artefact.load(args.steer)
    route = bands(args.bands, art.gate.threshold)
    lm = load_model(args.model)
    done = sorted(p.name for p in (args.eval / "completions").iterdir())
    pooled: dict[str, dict[str, list[bool]]] = {"benign": {}, "harmful": {}}
    per_set: dict[str, dict[str, float]] = {}
    for path in sorted((args.eval / "completions" / done[0]).glob("*.jsonl")):
        if path.stem.startswith("alpaca"):
            continue  # the quality prompts: no refusal verdicts
        verdicts = {}
        for method in done:
            rows = [json.loads(line) for line in (args.eval / "completions" / method / path.name).open()]
            verdicts[method] = {r["prompt"]: r["verdicts"]["learned"]["refused"] for r in rows}
        prompts = list(verdicts[done[0]])
        p = gate_probabilities(lm, art.gate, prompts, args.eval / "gate")
        verdicts["routed"] = {q: verdicts[next(m for hi, m in route if x < hi)][q] for q, x in zip(prompts, p)}
        side = "benign" if path.stem.startswith(tuple(args.benign.split(","))) else "harmful"
        for method, v in verdicts.items():
            pooled[side].setdefault(method, []).extend(v[q] for q in prompts)
            per_set.setdefault(method, {})[path.stem] = sum(v[q] for q in prompts) / len(prompts)
    rates = {side: {m: sum(v) / len(v) for m, v in ms.items()} for side, ms in pooled.items() if ms}
    for method in per_set:
        cells = " ".join(f"{s} {100 * r:.1f}" for s, r in per_set[method].items())
        head = " ".join(f"{side} {100 * rates[side][method]:.1f}" for side in rates)
        print(f"{method:24s} {head} | {cells}")
    print(json.dumps({"bands": route, "refusal": rates, "per_set": per_set}))


if __name__ == "__main__":
    main()
