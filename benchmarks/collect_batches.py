"""The collection's generate batches: the rows' shared prefix run once vs plain left padding.

    python benchmarks/collect_batches.py --model default --n 128

`els collect` (and `els run`'s first stage) generates each batch with `share_prefix=True`: the chat template's
system turn and user header run once per batch and their keys and values serve every row. The reference is the
same batches generated with plain left padding. Both record the prefill states and stop where the collection's
judge stops (its horizon). Same prompts (the collection's own sets, mixed), batches and dtype, alternated
twice. Prints both wall times, the ratio, the share of equal answers and verdicts, and the largest difference
in the recorded states relative to their scale. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from els.core.generation import Generated, generate_batch, length_batches, prompt_texts
from els.core.models import load_model
from els.data.prompts import load_prompts
from els.judges.model import get_judge
from els.training.recipe import DEFAULT_BENIGN, DEFAULT_COLLECT_JUDGE, DEFAULT_HARMFUL, Recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=128, help="Prompts, a seeded sample of the collection's sets.")
    args = ap.parse_args()
    lm = load_model(args.model)
    recipe, judge = Recipe(), get_judge(DEFAULT_COLLECT_JUDGE)
    per_set = -(-args.n // len(DEFAULT_BENIGN + DEFAULT_HARMFUL))
    prompts = [p for name in (*DEFAULT_BENIGN, *DEFAULT_HARMFUL) for p in load_prompts(name).sample(per_set).prompts]
    texts, lengths = prompt_texts(lm, prompts)
    batches = [[texts[i] for i in idx] for idx in length_batches(texts, lengths, recipe.batch_size)]
    times = {"shared": 0.0, "plain": 0.0}
    outs: dict[str, list[Generated]] = {}
    for _ in range(2):
        for name in times:
            t = time.perf_counter()
            outs[name] = [
                generate_batch(
                    lm, b, recipe.max_new_tokens, record=True, horizon=judge.horizon, share_prefix=name == "shared"
                )
                for b in batches
            ]
            times[name] += time.perf_counter() - t
    answers = {name: [a for g in gens for a in g.texts] for name, gens in outs.items()}
    flat = [p for b in batches for p in b]
    verdicts = {name: judge(flat, a) for name, a in answers.items()}
    shared = torch.cat([g.activations for g in outs["shared"]])  # type: ignore[misc]
    plain = torch.cat([g.activations for g in outs["plain"]])  # type: ignore[misc]
    rel = float(((shared - plain).abs().amax(-1) / plain.abs().amax(-1)).max())
    same_answer = sum(a == b for a, b in zip(answers["shared"], answers["plain"])) / len(flat)
    same_verdict = sum(a == b for a, b in zip(verdicts["shared"], verdicts["plain"])) / len(flat)
    print(f"{len(flat)} prompts in {len(batches)} batches of {recipe.batch_size}, {lm.model.dtype}")
    ratio = times["plain"] / times["shared"]
    print(f"shared prefix {times['shared']:.1f} s, plain {times['plain']:.1f} s, ratio {ratio:.2f}")
    print(f"equal answers {same_answer:.3f}, equal verdicts {same_verdict:.3f}, largest state difference {rel:.4f}")
    print(
        json.dumps(
            {**{f"{k}_s": round(v, 2) for k, v in times.items()}, "equal_verdicts": same_verdict, "max_rel_diff": rel}
        )
    )


if __name__ == "__main__":
    main()
