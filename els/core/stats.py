"""The statistics every stage shares: AUROC, Youden's threshold, the per-layer logistic fit, splits, intervals."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """P(score of a positive > score of a negative), ties counting half, over the last dimension:
    [..., P], [..., N] -> [...] (one AUROC per leading index, e.g. per layer); nan where a side is empty.

    Counted by binary search in the sorted negatives, not over all P x N pairs, so large sets stay cheap.
    """
    dtype = torch.promote_types(torch.promote_types(pos.dtype, neg.dtype), torch.float32)
    if not pos.shape[-1] or not neg.shape[-1]:
        return torch.full(pos.shape[:-1], float("nan"), dtype=dtype)
    below = neg.to(dtype).sort(-1).values.contiguous()
    p = pos.to(dtype).contiguous()
    # A positive beats the negatives strictly below it and ties with those equal to it: (left + right) / 2.
    wins = torch.searchsorted(below, p, side="left") + torch.searchsorted(below, p, side="right")
    return wins.to(dtype).mean(-1) / (2 * neg.shape[-1])


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    sample_weight: torch.Tensor,
    l2: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted logistic regression on inputs standardised with the training rows' mean and std: minimises
    sum_i sample_weight_i / sum(sample_weight) * BCE_i + l2 * |w|^2 (the bias unpenalised), which is
    scikit-learn's LogisticRegression with C = 1 / (2 * l2) on normalised weights (tests compare the two).

    Standardised because the residual stream has a few dimensions hundreds of times larger than the rest
    and its scale grows with depth: one L2 grid then means the same at every layer. Returns (w, b) on the
    standardised scale (callers fold the scaling back into raw-activation weights). Hand-written rather than
    scikit-learn's because the probes fit one per layer (and per L2, warm-started): on 1,500 x 896 rows per
    layer, 17 layers x 4 L2, this took 29 s, scikit-learn 168 s and one L-BFGS over all layers stacked
    135 s (its line search waits for the slowest layer).
    """
    w = (init[0].clone() if init else torch.zeros(x.shape[1])).requires_grad_(True)
    b = (init[1].clone() if init else torch.zeros(())).requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, tolerance_grad=1e-6, line_search_fn="strong_wolfe")
    sw = sample_weight / sample_weight.sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none") * sw).sum() + l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def youden_threshold(score: torch.Tensor, low: torch.Tensor) -> float:
    """The score that best separates the `low` rows (at or below it) from the rest (above): max TPR - FPR,
    the lowest such score on ties."""
    cands = score.sort().values
    j = (score[~low][:, None] > cands).float().mean(0) - (score[low][:, None] > cands).float().mean(0)
    return float(cands[j.argmax()])


def stratified_split(
    states: Sequence[str], val_fraction: float, seed: int, strata: Sequence[str]
) -> tuple[list[int], list[int]]:
    """Train/validation indices with every state of `strata` (in that order: it fixes the draws) represented
    in both where it has two or more rows."""
    rng = random.Random(seed)
    train, val = [], []
    for s in strata:
        idx = [i for i, st in enumerate(states) if st == s]
        rng.shuffle(idx)
        k = round(len(idx) * val_fraction) if len(idx) > 1 else 0
        k = max(k, 1) if len(idx) > 1 else k
        val += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(val)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
