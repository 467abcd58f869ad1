"""Comparisons on the same prompts: exact McNemar tests of paired verdicts, and the gated system prompt.

`system-prompt-gated` is what a practitioner would build without ELS: the harm gate decides per prompt before
generation, so its answers are exactly the base model's where the gate flags a prompt and the system prompt's
elsewhere, composed here from those two methods' judged answers instead of being generated a third time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from els.gate_training import prompt_activations
from els.gating import HarmGate
from els.models import LoadedModel

GATED_SYSTEM_PROMPT = "system-prompt-gated"
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(flags: Sequence[bool]) -> dict:
    k, n = sum(flags), len(flags)
    lo, hi = wilson(k, n)
    return {"refusal_rate": k / n if n else float("nan"), "ci95": [lo, hi], "n": n, "refusals": k}


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact two-sided McNemar test of paired refusals: `a_only` prompts refused by a alone, `b_only` by b
    alone; p is the binomial probability of a split at least this uneven among the discordant pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired verdicts of unequal length: {len(a)} and {len(b)}")
    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    n, k = a_only + b_only, min(a_only, b_only)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": p}


def gated_verdicts(p_harm: Sequence[float], threshold: float, flagged: Sequence[bool],
                   allowed: Sequence[bool]) -> list[bool]:
    """Per prompt: the `flagged` verdict where the gate flags it (p >= threshold), else the `allowed` one."""
    return [f if p >= threshold else a for p, f, a in zip(p_harm, flagged, allowed)]


def gate_probabilities(lm: LoadedModel, gate: HarmGate, prompts: Sequence[str], cache: Path) -> list[float]:
    """p(harmful) the gate reads at each prompt's prefill (prompt-only forward passes, cached under `cache`)."""
    return gate.probability_from_layers(prompt_activations(lm, prompts, cache)).tolist()
