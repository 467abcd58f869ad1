"""Regenerate results/<model>/ from scratch: collect and train the default recipe, report the harm gate, evaluate
the artefact `els run` writes (the library's default recipe, untuned) against the baselines on held-out tests.

    python benchmarks/reproduce.py                               # default model, the whole protocol
    python benchmarks/reproduce.py --limit 100                   # seeded samples of the test sets

Protocol (docs/results.md's tables come from it):
1. `els run`: states of the project's own training prompts (els-benign, els-harmful and their train-family
   jailbreak framings; no benchmark prompt), the compliance and safety energies for every layer, and the harm
   gate from prompt-only forward passes of its pool (near-duplicates of every test and tuning prompt removed).
2. The gate's report on every test set (AUROC, TPR at 1% and 5% benign FPR, share flagged): `els gate`.
3. `els eval`: base, ELS at the artefact's own settings, ELS on top of the balanced system prompt, the system
   prompts (balanced, safety) and the two gate-composed ones (system-prompt-gated, system-prompt-two-sided),
   and the activation baselines behind the same gate, on held-out tests judged by the learned judge:
   xstest-safe, xstest-unsafe, orbench-hard@test and oktest@test (20% test splits, seed 0), jbb, harmbench,
   and jbb-wrapped (JailbreakBench in the project's evaluation framings, worded unlike the training framings),
   32 new tokens; quality on 128-token answers to Alpaca prompts, capability on MMLU.
4. With --trials N: `els tune` on validation prompts only, its Pareto front copied beside the results.
Every stage resumes where an interrupted run stopped. Answers stay in RUN (they quote the benchmark
prompts); results/<model>/ gets the summary, report, plots, the gate report and reproduce.json with the
commands and the wall time of each stage.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from els.core.io import write_atomic

METHODS = "base,els,els+system-prompt,system-prompt,safety-system-prompt,addition-gated,surgical-gated"
TESTS = ("xstest-safe", "xstest-unsafe", "orbench-hard@test", "oktest@test", "jbb", "harmbench", "jbb-wrapped~200")
COPIED = ("summary.json", "report.md", "refusal_rates.png", "tradeoff.png", "layer_auc.png", "energy_hist.png")
TUNE_COPIED = ("pareto.json", "pareto.md", "pareto.png")


def stage(name: str, cmd: list[str], log: dict) -> None:
    print(f"\n== {name}: {shlex.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    log[name] = {"command": shlex.join(["python", *cmd[1:]]), "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument(
        "--run", type=Path, default=Path("runs/reproduce"), help="Working directory (activations, answers)."
    )
    ap.add_argument("--results", type=Path, default=None, help="Default: results/<model name>.")
    ap.add_argument(
        "--benchmarks", default=",".join(TESTS), help="Test sets; NAME~N takes a seeded sample of N of that set."
    )
    ap.add_argument(
        "--limit",
        type=int,
        default=None,
        help="Seeded sample of N prompts per test set without its own ~N (all by default).",
    )
    ap.add_argument("--trials", type=int, default=0, help="els tune trials (0: no tune).")
    ap.add_argument("--tune-limit", type=int, default=32, help="Validation prompts per side in els tune.")
    # 32 new tokens give the verdicts of 48 on 99.5% of 2,400 validation answers, every method at >= 98.3%
    # (benchmarks/verdict_tokens.py, docs/results.md): a third less decoding for the whole protocol.
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--quality-n", type=int, default=64)
    ap.add_argument("--capability-n", type=int, default=300)
    ap.add_argument("--methods", default=METHODS)
    args = ap.parse_args()
    results = args.results or Path("results") / Path(args.model).name
    run, log = args.run, {}
    start = time.perf_counter()
    els = [sys.executable, "-m", "els"]

    if not (run / "artefact" / "els.json").exists():
        stage("run", [*els, "run", "--model", args.model, "--out", str(run)], log)
    stage("gate", [*els, "gate", "--model", args.model, "--out", str(run / "gate")], log)
    evaluate = [
        *els,
        "eval",
        "--model",
        args.model,
        "--steer",
        str(run / "artefact"),
        "--states",
        str(run / "collect"),
        "--methods",
        args.methods,
        "--benchmarks",
        args.benchmarks,
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--quality-n",
        str(args.quality_n),
        "--capability-n",
        str(args.capability_n),
        "--out",
        str(run / "eval"),
    ]
    if args.limit:
        evaluate += ["--limit", str(args.limit)]
    stage("eval", evaluate, log)
    if args.trials:
        stage(
            "tune",
            [
                *els,
                "tune",
                "--model",
                args.model,
                "--steer",
                str(run / "artefact"),
                "--out",
                str(run / "tune"),
                "--trials",
                str(args.trials),
                "--limit",
                str(args.tune_limit),
                "--judge",
                "learned",
            ],
            log,
        )

    results.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (run / "eval" / name).exists():
            shutil.copy2(run / "eval" / name, results / name)
    for name in TUNE_COPIED if args.trials else ():
        shutil.copy2(run / "tune" / name, results / name)
    shutil.copy2(run / "gate" / "gate.json", results / "gate.json")
    log["total_wall_s"] = round(time.perf_counter() - start, 1)
    log["argv"] = sys.argv[1:]
    write_atomic(results / "reproduce.json", json.dumps(log, indent=2) + "\n")
    print(f"\nresults written to {results} in {log['total_wall_s']:.0f} s")


if __name__ == "__main__":
    main()
