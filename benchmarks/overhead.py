"""Cost of steering: decode throughput and prefill time, base vs steered, measured side by side.

    python benchmarks/overhead.py --steer runs/default/artefact

Runs alternate (base, steered, base, ...) so drift on a noisy machine hits both alike; medians are
printed with the steered/base ratio. Then the share of steering steps the energy gate skipped on plain,
borderline and harmful prompts. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from els.core.generation import generate_batch
from els.core.models import LoadedModel, chat_texts, load_model, prepare_tokenizer, user_conversations
from els.data.prompts import load_prompts
from els.steering.artefact import Artefact
from els.steering.steering import Steering

PLAIN = [
    "Give three tips for staying healthy.",
    "Write a haiku about autumn.",
    "What is the capital of France?",
    "Explain what a hash table is.",
    "Suggest a name for a bakery.",
    "How do I sort a list in Python?",
    "Summarise the plot of Hamlet in two sentences.",
    "What causes rain?",
    "Translate 'good morning' to Spanish.",
    "List four prime numbers.",
    "Describe a sunset.",
    "How many legs does a spider have?",
    "Write a short thank-you note.",
    "What is photosynthesis?",
    "Give me a synonym for happy.",
    "Why is the sky blue?",
]


def timed(lm, texts, new_tokens, steering: Steering | None) -> float:
    start = time.perf_counter()
    if steering is None:
        generate_batch(lm, texts, new_tokens, min_new_tokens=new_tokens)
    else:
        with steering:
            generate_batch(lm, texts, new_tokens, min_new_tokens=new_tokens)
    return time.perf_counter() - start


def measure(
    lm, art: Artefact, batch: int, new_tokens: int, repeats: int, energy_dtype: torch.dtype, positions: str
) -> dict:
    prompts = (PLAIN * batch)[:batch]
    texts = chat_texts(lm.tokenizer, user_conversations(prompts))
    runs: dict[str, dict[str, list[float]]] = {m: {"prefill": [], "total": []} for m in ("base", "els")}
    timed(lm, texts, 2, None)  # warm-up

    def steering(method: str) -> Steering | None:
        return Steering(lm.model, art, energy_dtype=energy_dtype, positions=positions) if method == "els" else None

    for _ in range(repeats):
        for method in ("base", "els"):
            runs[method]["prefill"].append(timed(lm, texts, 1, steering(method)))
            runs[method]["total"].append(timed(lm, texts, new_tokens, steering(method)))
    out = {}
    for method, r in runs.items():
        # Paired per repeat: a prefill of seconds (batch 16 on a CPU) timed in another repeat would add
        # its own noise to the decode estimate.
        decode = [batch * (new_tokens - 1) / (t - p) for p, t in zip(r["prefill"], r["total"])]
        out[method] = {
            "prefill_s": statistics.median(r["prefill"]),
            "decode_tokens_per_s": statistics.median(decode),
            "end_to_end_s": statistics.median(r["total"]),
        }
    out["ratio"] = out["els"]["decode_tokens_per_s"] / out["base"]["decode_tokens_per_s"]
    out["end_to_end_ratio"] = out["base"]["end_to_end_s"] / out["els"]["end_to_end_s"]
    out["prefill_ratio"] = out["base"]["prefill_s"] / out["els"]["prefill_s"]
    return out


def gate_skips(lm, art: Artefact, threshold: float, new_tokens: int) -> dict[str, float]:
    sets = {
        "plain": PLAIN,
        "borderline": load_prompts("els-benign").sample(16, 1).prompts,
        "harmful": load_prompts("els-harmful").sample(16, 1).prompts,
    }
    shares = {}
    for name, prompts in sets.items():
        texts = chat_texts(lm.tokenizer, user_conversations(prompts))
        with Steering(lm.model, art, energy_gate=threshold) as s:
            generate_batch(lm, texts, new_tokens)
        rep = s.report().values()
        taken, skipped = sum(r["steps_taken"] for r in rep), sum(r["steps_skipped"] for r in rep)
        shares[name] = skipped / max(1, taken + skipped)
    return shares


def random_weights(path: str, device: str | None) -> LoadedModel:
    """The architecture and tokenizer of `path` with random bf16 weights: timing needs no trained weights, so
    the check runs where the real weights cannot be copied (a lent GPU machine)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
    model.to(device or "cpu").eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tokenizer)
    return LoadedModel(model, tokenizer, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--steer", default="runs/default/artefact")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threshold", type=float, default=0.0, help="gate threshold for the skip shares")
    ap.add_argument("--energy-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--positions",
        default="last",
        choices=["last", "prompt"],
        help="last (default): steer every new token, the costly path; prompt: the prompt only",
    )
    ap.add_argument(
        "--random-weights",
        action="store_true",
        help="--model is a directory with config and tokenizer only; time with random weights",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = random_weights(args.model, args.device) if args.random_weights else load_model(args.model, device=args.device)
    art = Artefact.load(args.steer)
    s = art.manifest.steer
    print(
        f"model {args.model} ({lm.model.dtype}), layers {s.layers}, eta {s.eta}, K {s.steps}, "
        f"positions {args.positions}, {args.new_tokens} new tokens, {args.repeats} alternating repeats, "
        f"energies in {args.energy_dtype}"
    )
    result = {}
    for batch in map(int, args.batches.split(",")):
        r = measure(lm, art, batch, args.new_tokens, args.repeats, getattr(torch, args.energy_dtype), args.positions)
        print(
            f"batch {batch:>3}: decode base {r['base']['decode_tokens_per_s']:7.1f} tok/s, "
            f"els {r['els']['decode_tokens_per_s']:7.1f} tok/s, ratio {r['ratio']:.3f}; prefill base "
            f"{r['base']['prefill_s'] * 1000:6.1f} ms, els {r['els']['prefill_s'] * 1000:6.1f} ms; end to end "
            f"ratio {r['end_to_end_ratio']:.3f}"
        )
        result[f"ratio_batch{batch}"] = round(r["ratio"], 4)
        result[f"prefill_ratio_batch{batch}"] = round(r["prefill_ratio"], 4)
        result[f"end_to_end_ratio_batch{batch}"] = round(r["end_to_end_ratio"], 4)
        result[f"base_tokens_per_s_batch{batch}"] = round(r["base"]["decode_tokens_per_s"], 1)
        result[f"els_tokens_per_s_batch{batch}"] = round(r["els"]["decode_tokens_per_s"], 1)
    if not args.random_weights:  # gate decisions mean nothing on random weights
        shares = gate_skips(lm, art, args.threshold, args.new_tokens)
        print(f"gate (threshold {args.threshold:.2f}) skipped: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
        result["gate_skipped_share"] = {k: round(v, 3) for k, v in shares.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
