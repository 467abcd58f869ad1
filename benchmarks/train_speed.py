"""Training all layers' energy models together vs one layer at a time, on a collection.

    python benchmarks/train_speed.py --states runs/default/collect

Same data, same config, same seeds: the stacked trainer runs every layer in one batched step. Prints
both wall times, the ratio and the largest per-layer validation-AUC difference. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from els.training.collect import load_collection
from els.training.energy import TrainConfig, train_energy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--states", default="runs/default/collect")
    ap.add_argument("--widths", default="512,256")
    ap.add_argument("--epochs", type=int, default=120)
    args = ap.parse_args()
    col = load_collection(args.states)
    cfg = TrainConfig(widths=tuple(int(w) for w in args.widths.split(",")), epochs=args.epochs)
    layers = col.activations.shape[1]
    print(
        f"{len(col.records)} states {col.counts()}, {layers} layers, widths {cfg.widths}, "
        f"{torch.get_num_threads()} threads"
    )

    t = time.perf_counter()
    stacked = train_energy(col.activations, col.states, cfg)
    new = time.perf_counter() - t
    print(f"stacked: {new:.1f} s ({stacked.epochs_run} epochs)")

    t = time.perf_counter()
    single = [train_energy(col.activations, col.states, cfg, layers=[layer]).val_auc[0] for layer in range(layers)]
    old = time.perf_counter() - t
    print(f"one layer at a time: {old:.1f} s")

    diff = max(abs(a - b) for a, b in zip(stacked.val_auc, single))
    print("layer  stacked  single")
    for layer in range(layers):
        print(f"{layer:>5}  {stacked.val_auc[layer]:.3f}    {single[layer]:.3f}")
    print(f"ratio (old / new): {old / new:.2f}; max per-layer AUC difference {diff:.3f}")
    print(
        json.dumps(
            {
                "train_seconds": round(new, 1),
                "old_seconds": round(old, 1),
                "ratio": round(old / new, 2),
                "max_auc_diff": round(diff, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
