"""`els collect` on 2 Ray workers vs 1, side by side in one run, and whether both match the single process.

    python benchmarks/ray_speedup.py --limit 8 --max-new-tokens 16 --batch-size 4

One local Ray cluster with `--cpus` slots (default: all cores). The 1-worker executor gets every slot as
torch threads; the 2-worker executor gives each actor half. Actors load the model before the clock starts.
Runs alternate (1, 2, 1, 2, ...) so drift on a shared machine hits both alike; the median wall times and
their ratio are printed, then whether each collection equals the single-process one (records and
activations). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from els.core.models import load_model
from els.data.prompts import load_prompts
from els.eval.cache import model_fingerprint
from els.judges.model import get_judge
from els.parallel.ray_executor import ModelSpec, RayExecutor, connect, import_ray
from els.training.collect import collect


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--limit", type=int, default=8, help="prompts per class (els-benign, els-harmful)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    args = ap.parse_args()

    ray = import_ray()
    connect(num_cpus=args.cpus)
    torch.set_num_threads(args.cpus)
    lm = load_model(args.model, dtype=args.dtype)
    sets = [
        load_prompts("els-benign").with_kind("benign").sample(args.limit, 0),
        load_prompts("els-harmful").with_kind("harmful").sample(args.limit, 0),
    ]
    judge = get_judge("prefix")
    kw = dict(judge=judge, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False)
    tmp = Path(tempfile.mkdtemp(prefix="ray_speedup."))

    t = time.perf_counter()
    alone = collect(lm, sets, tmp / "alone", **kw)
    alone_s = time.perf_counter() - t
    spec, fp = ModelSpec(args.model, dtype=args.dtype), model_fingerprint(lm)
    times: dict[int, list[float]] = {1: [], 2: []}
    same: dict[int, dict] = {}
    for r in range(args.rounds):
        for workers in (1, 2):
            with RayExecutor(spec, workers, expect_fingerprint=fp) as ex:  # started: models loaded
                threads = ray.get([a.threads.remote() for a in ex.actors])
                t = time.perf_counter()
                col = collect(lm, sets, tmp / f"w{workers}-{r}", executor=ex, **kw)
                times[workers].append(time.perf_counter() - t)
            diff = (col.activations.float() - alone.activations.float()).abs()
            same[workers] = {
                "threads_per_worker": threads,
                "records_equal": col.records == alone.records,
                "answers_equal": [x.answer for x in col.records] == [x.answer for x in alone.records],
                "activations_bit_identical": torch.equal(col.activations, alone.activations),
                "max_abs_diff": float(diff.max()),
                "max_rel_diff": float(diff.max() / alone.activations.float().abs().max()),
            }
            print(f"round {r}, {workers} worker(s) x {threads[0]} thread(s): {times[workers][-1]:.1f} s", flush=True)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    n = sum(len(ps) for ps in sets)
    print(
        f"single process ({args.cpus} threads): {alone_s:.1f} s; Ray 1 worker: {one:.1f} s; Ray 2 workers: "
        f"{two:.1f} s; speed-up 2 vs 1: x{one / two:.2f} ({n} prompts, {args.max_new_tokens} new tokens, "
        f"batch {args.batch_size}, {lm.model.dtype})"
    )
    for w, s in same.items():
        print(f"{w} worker(s) vs single process: {s}")
    print(
        json.dumps(
            {
                "prompts": n,
                "max_new_tokens": args.max_new_tokens,
                "batch_size": args.batch_size,
                "cpus": args.cpus,
                "dtype": str(lm.model.dtype),
                "single_s": alone_s,
                "one_worker_s": times[1],
                "two_workers_s": times[2],
                "speedup_2_vs_1": one / two,
                "identity": same,
            }
        )
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
