"""Regenerate results/<model>/ from scratch: collect and train, tune on validation, evaluate on held-out tests.

    python benchmarks/reproduce.py                  # default model, the protocol below
    python benchmarks/reproduce.py --limit 40       # a smaller sample per test benchmark

Protocol (docs/results.md's tables come from it):
1. `els run`: states of the project's own training prompts (els-benign, els-harmful; no benchmark
   prompt), energy models for every layer (80/20 train/validation split of those states, seed 0).
2. `els tune`: the Optuna search over layers, eta, K, gates and positions on validation prompts only
   (orbench-hard@val and oktest@val against harmbench-val and orbench-toxic@val, seeded samples), its
   chosen point written to RUN/artefact-tuned.
3. `els eval`: base, ELS (tuned) and the baselines (fitted on the step-1 states) on held-out tests:
   xstest-safe, xstest-unsafe, oktest, jbb, harmbench and orbench-hard@test (the 20% test split,
   seed 0), judged by the learned judge.
Every stage resumes where an interrupted run stopped. Answers stay in RUN (they quote the benchmark
prompts); results/<model>/ gets the summary, report, plots, the tune's Pareto front and reproduce.json
with the commands and the wall time of each stage.
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

from els.collect import write_atomic

METHODS = "base,els,system-prompt,ablation,addition,surgical,probe-gated"
TESTS = ("xstest-safe", "xstest-unsafe", "oktest", "jbb", "harmbench")
COPIED = ("summary.json", "report.md", "refusal_rates.png", "tradeoff.png", "layer_auc.png", "energy_hist.png")
TUNE_COPIED = ("pareto.json", "pareto.md", "pareto.png")


def els(*args: str) -> list[str]:
    return [sys.executable, "-m", "els", *args]


def stage(name: str, cmd: list[str], log: dict) -> None:
    print(f"\n== {name}: {shlex.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    log[name] = {"command": shlex.join(["els", *cmd[3:]]), "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--run", type=Path, default=Path("runs/reproduce"),
                    help="Working directory (activations, answers).")
    ap.add_argument("--results", type=Path, default=None, help="Default: results/<model name>.")
    ap.add_argument("--limit", type=int, default=None,
                    help="Seeded sample of N prompts per test benchmark (all by default).")
    ap.add_argument("--orbench-limit", type=int, default=None, help="Sample of orbench-hard@test (default: --limit).")
    ap.add_argument("--trials", type=int, default=24, help="els tune trials.")
    ap.add_argument("--tune-limit", type=int, default=32, help="Validation prompts per side in els tune.")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--methods", default=METHODS)
    args = ap.parse_args()
    results = args.results or Path("results") / Path(args.model).name
    run, log = args.run, {}
    start = time.perf_counter()

    if not (run / "artefact" / "els.json").exists():
        stage("run", els("run", "--model", args.model, "--out", str(run)), log)
    stage("tune", els("tune", "--model", args.model, "--steer", str(run / "artefact"), "--out", str(run / "tune"),
                      "--out-artefact", str(run / "artefact-tuned"), "--trials", str(args.trials),
                      "--limit", str(args.tune_limit), "--judge", "learned"), log)
    orbench = "orbench-hard@test" + (f"~{args.orbench_limit}" if args.orbench_limit else "")
    evaluate = els("eval", "--model", args.model, "--steer", str(run / "artefact-tuned"), "--states",
                   str(run / "collect"), "--methods", args.methods, "--benchmarks", ",".join([*TESTS, orbench]),
                   "--max-new-tokens", str(args.max_new_tokens), "--out", str(run / "eval"))
    if args.limit:
        evaluate += ["--limit", str(args.limit)]
    stage("eval", evaluate, log)

    results.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (run / "eval" / name).exists():
            shutil.copy2(run / "eval" / name, results / name)
    for name in TUNE_COPIED:
        shutil.copy2(run / "tune" / name, results / name)
    log["total_wall_s"] = round(time.perf_counter() - start, 1)
    log["argv"] = sys.argv[1:]
    write_atomic(results / "reproduce.json", json.dumps(log, indent=2) + "\n")
    print(f"\nresults written to {results} in {log['total_wall_s']:.0f} s")


if __name__ == "__main__":
    main()
