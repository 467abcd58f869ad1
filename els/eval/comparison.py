"""Comparisons on the same prompts: exact McNemar tests of paired verdicts, and the gate-composed methods.

`system-prompt-gated` and `system-prompt-two-sided` (els.eval.methods.COMPOSED) are what a practitioner would
build without ELS: the harm gate decides per prompt before generation, so their answers are exactly one
method's where the gate flags a prompt and another's elsewhere, composed here from those two methods' judged
answers instead of being generated again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from els.core.models import LoadedModel
from els.core.stats import wilson
from els.eval.summary import Paired, Rate
from els.steering.gate import HarmGate
from els.training.gate import prompt_activations


def rate(flags: Sequence[bool]) -> Rate:
    k, n = sum(flags), len(flags)
    return Rate(refusal_rate=k / n if n else float("nan"), ci95=wilson(k, n), n=n, refusals=k)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> Paired:
    """Exact two-sided McNemar test of paired refusals: `a_only` prompts refused by a alone, `b_only` by b
    alone; p is the binomial probability of a split at least this uneven among the discordant pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired verdicts of unequal length: {len(a)} and {len(b)}")
    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    n, k = a_only + b_only, min(a_only, b_only)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return Paired(a_only=a_only, b_only=b_only, p=p)


def gated_verdicts(
    p_harm: Sequence[float], threshold: float, flagged: Sequence[bool], allowed: Sequence[bool]
) -> list[bool]:
    """Per prompt: the `flagged` verdict where the gate flags it (p >= threshold), else the `allowed` one."""
    return banded_verdicts(p_harm, [(threshold, allowed), (math.inf, flagged)])


def banded_verdicts(p_harm: Sequence[float], bands: Sequence[tuple[float, Sequence[bool]]]) -> list[bool]:
    """Per prompt: the verdict of the first band whose upper bound its p(harmful) is under; `bands` are
    (upper bound, one verdict per prompt) in rising order, the last bound at least 1 (e.g. math.inf)."""
    return [next(v[i] for upper, v in bands if p < upper) for i, p in enumerate(p_harm)]


def gate_probabilities(lm: LoadedModel, gate: HarmGate, prompts: Sequence[str], cache: Path) -> list[float]:
    """p(harmful) the gate reads at each prompt's prefill (prompt-only forward passes, cached under `cache`)."""
    return gate.probability_from_layers(prompt_activations(lm, prompts, cache, layers=gate.layer + 1)).tolist()
